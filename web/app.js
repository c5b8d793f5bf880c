// Weft dashboard: plain JS over the agent's /api/v1, live through its event stream.
"use strict";

const api = "/api/v1";
const $ = (s) => document.querySelector(s);
const state = { config: null, leases: [], byNet: new Map(), modules: [], rollouts: new Map(), nodes: [], stats: null, peers: new Map(), hover: -1 };
const COLORS = { free: "#e5e8ee", leased: "#3b82f6", own: "#10b981", expiring: "#f59e0b", reserved: "#9ca3af" };
const EXPIRING_SECS = 3600;

const tokenInput = $("#token");
tokenInput.value = localStorage.getItem("weft-token") || "";
tokenInput.addEventListener("change", () => localStorage.setItem("weft-token", tokenInput.value.trim()));

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const t = tokenInput.value.trim();
  if (t) h["Authorization"] = "Bearer " + t;
  return h;
}

async function call(method, path, body, ctype) {
  const init = { method, headers: headers(ctype ? { "Content-Type": ctype } : {}) };
  if (body !== undefined) init.body = body;
  const r = await fetch(api + path, init);
  const text = await r.text();
  const data = text ? JSON.parse(text) : null;
  if (!r.ok) throw new Error((data && data.error && data.error.message) || r.status + " " + r.statusText);
  return data;
}

// IPv4 helpers over unsigned 32-bit numbers.
const ip2n = (s) => s.split(".").reduce((a, o) => a * 256 + Number(o), 0);
const n2ip = (n) => [24, 16, 8, 0].map((s) => Math.floor(n / 2 ** s) % 256).join(".");

function geometry() {
  const c = state.config;
  const [net, len] = c.network.split("/");
  const base = ip2n(net);
  const size = 2 ** (32 - c.subnet_len);
  const slots = 2 ** (c.subnet_len - Number(len));
  return { base, size, slots, min: ip2n(c.subnet_min), max: ip2n(c.subnet_max) };
}

function slotState(i, g) {
  const addr = g.base + i * g.size;
  const l = state.byNet.get(addr);
  if (l) return l.own ? "own" : l.expires_in < EXPIRING_SECS ? "expiring" : "leased";
  return addr < g.min || addr > g.max ? "reserved" : "free";
}

function drawMap() {
  if (!state.config) return;
  const g = geometry();
  const canvas = $("#map");
  const cols = Math.ceil(Math.sqrt(g.slots));
  const rows = Math.ceil(g.slots / cols);
  const width = canvas.parentElement.clientWidth - 8;
  const cell = Math.max(1, Math.floor(Math.min(width / cols, 28)));
  const gap = cell >= 6 ? 1 : 0;
  canvas.width = cols * cell;
  canvas.height = rows * cell;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  for (let i = 0; i < g.slots; i++) {
    ctx.fillStyle = COLORS[slotState(i, g)];
    ctx.fillRect((i % cols) * cell, Math.floor(i / cols) * cell, cell - gap, cell - gap);
  }
  if (state.hover >= 0 && cell >= 4) {
    ctx.strokeStyle = "#111";
    ctx.strokeRect((state.hover % cols) * cell + 0.5, Math.floor(state.hover / cols) * cell + 0.5, cell - 1, cell - 1);
  }
  canvas.dataset.cols = cols;
  canvas.dataset.cell = cell;
  const leased = state.leases.length;
  const usable = Math.floor((g.max - g.min) / g.size) + 1;
  $("#map-summary").textContent = `${leased} of ${usable} subnets leased (${g.slots} slots of /${state.config.subnet_len})`;
  $("#network").textContent = `${state.config.network} · backend ${state.config.backend}`;
  showSlot();
}

function fmtSecs(s) {
  if (s < 0) return "expired";
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  return h ? `${h}h ${m}m` : m ? `${m}m ${r}s` : `${r}s`;
}

function showSlot() {
  const box = $("#slot");
  if (state.hover < 0 || !state.config) return;
  const g = geometry();
  const addr = g.base + state.hover * g.size;
  const l = state.byNet.get(addr);
  const subnet = `${n2ip(addr)}/${state.config.subnet_len}`;
  box.classList.toggle("muted", !l);
  if (!l) {
    box.textContent = `${subnet}: ${slotState(state.hover, g)}`;
    return;
  }
  const left = l.expires_at - Math.floor(Date.now() / 1000);
  box.innerHTML = "";
  const lines = [
    ["Subnet", subnet + (l.own ? " (this node)" : "")], ["Node / PublicIP", l.public_ip],
    ["Backend", l.backend_type + " " + JSON.stringify(l.backend_data)], ["Expires in", fmtSecs(left)],
  ];
  for (const [k, v] of lines) {
    const d = document.createElement("div");
    d.innerHTML = `<b></b> <span></span>`;
    d.querySelector("b").textContent = k + ":";
    d.querySelector("span").textContent = v;
    box.appendChild(d);
  }
}

function slotAt(ev) {
  const canvas = $("#map");
  const r = canvas.getBoundingClientRect();
  const scale = canvas.width / r.width;
  const cell = Number(canvas.dataset.cell), cols = Number(canvas.dataset.cols);
  const x = Math.floor(((ev.clientX - r.left) * scale) / cell), y = Math.floor(((ev.clientY - r.top) * scale) / cell);
  const i = y * cols + x;
  return x < cols && i < geometry().slots ? i : -1;
}
$("#map").addEventListener("mousemove", (ev) => { const i = slotAt(ev); if (i !== state.hover) { state.hover = i; drawMap(); } });
$("#map").addEventListener("click", (ev) => { state.hover = slotAt(ev); drawMap(); });

function td(text, code) {
  const c = document.createElement("td");
  if (code) { const k = document.createElement("code"); k.textContent = text; c.appendChild(k); } else c.textContent = text;
  return c;
}

function bytes(n) {
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + u[i];
}

// The traffic column is refreshed every second, the rest of the node table when the nodes are
// read again. Each stats event carries only the peers whose counters moved (all of them in a
// stream's first), so a tick rewrites just their cells: rebuilding the table and searching the
// peers for each row took ~86 ms at 5,000 nodes.
const trafficCells = new Map();
function traffic(p) {
  return p ? `↑ ${bytes(p.tx_bytes)} ↓ ${bytes(p.rx_bytes)}` : "-";
}
function renderTraffic(moved) {
  const show = (ip, cell) => {
    const text = traffic(state.peers.get(ip));
    if (cell.textContent !== text) cell.textContent = text;
  };
  if (!moved) { for (const [ip, cell] of trafficCells) show(ip, cell); return; }
  for (const p of moved) { const cell = trafficCells.get(p.public_ip); if (cell) show(p.public_ip, cell); }
}

function renderNodes() {
  const body = $("#nodes tbody");
  body.innerHTML = "";
  trafficCells.clear();
  for (const n of state.nodes) {
    const tr = document.createElement("tr");
    const t = td("-");
    trafficCells.set(n.public_ip, t);
    tr.append(td(n.lease.subnet + (n.lease.own ? " ★" : "")), td(n.public_ip, true), td(n.lease.backend_type),
      td(fmtSecs(n.lease.expires_in)), td(n.last_seen_secs == null ? "never" : fmtSecs(n.last_seen_secs) + " ago"),
      t, td(n.modules.map((m) => `${m.name}:${m.state}`).join(", ") || "none"));
    body.appendChild(tr);
  }
  renderTraffic();
}

function renderStats() {
  const s = state.stats;
  if (!s) return;
  const cells = [["tx packets", s.tx_packets], ["tx bytes", s.tx_bytes], ["rx packets", s.rx_packets], ["rx bytes", s.rx_bytes],
    ["cache hits", s.flow_cache_hits], ["cache misses", s.flow_cache_misses], ["routes", s.route_count]];
  for (const [k, v] of Object.entries(s.drops)) if (v) cells.push(["drop " + k, v]);
  const grid = $("#stats");
  grid.innerHTML = "";
  for (const [k, v] of cells) {
    const d = document.createElement("div");
    d.innerHTML = "<b></b><span class=muted></span>";
    d.querySelector("b").textContent = Number(v).toLocaleString();
    d.querySelector("span").textContent = k;
    grid.appendChild(d);
  }
}

// Each second's counters: the stats grid and the node table's traffic column. `all_peers`
// (a stream's first event, or a full read of /stats) replaces what is known of the peers.
function showStats(s) {
  if (s.all_peers) state.peers = new Map();
  for (const p of s.peers) state.peers.set(p.public_ip, p);
  state.stats = s;
  renderStats();
  renderTraffic(s.all_peers ? null : s.peers);
}

function renderModules() {
  const body = $("#modules tbody");
  body.innerHTML = "";
  for (const m of state.modules) {
    const tr = document.createElement("tr");
    tr.dataset.module = m.name;
    const v = Object.entries(m.metrics.verdicts).filter(([, n]) => n).map(([k, n]) => `${k} ${n}`).join(", ");
    tr.append(td(String(m.order)), td(m.name, true), td(m.mode), td(m.failure), rolloutCell(state.rollouts.get(m.name)),
      td(m.signed_by || "unsigned"), td(String(m.metrics.calls)), td(v || "-"));
    const actions = document.createElement("td");
    const btn = (label, fn) => { const b = document.createElement("button"); b.textContent = label; b.onclick = fn; actions.appendChild(b); };
    btn(m.mode === "enforce" ? "dry-run" : "enforce", () => act("PATCH", m.name, { mode: m.mode === "enforce" ? "dry_run" : "enforce" }));
    btn("order", () => { const o = prompt("Order for " + m.name, m.order); if (o !== null) act("PATCH", m.name, { order: Number(o) }); });
    btn("remove", () => { if (confirm("Remove " + m.name + " from every node?")) act("DELETE", m.name); });
    tr.appendChild(actions);
    body.appendChild(tr);
  }
}

// On how many of the nodes holding a lease the module's current revision decides traffic and,
// while that is not every node, the API's one line on what holds it up (the line `weft module
// add --wait` prints).
function rolloutCell(r) {
  const cell = document.createElement("td");
  cell.className = "rollout";
  if (!r) { cell.textContent = "-"; return cell; }
  const count = document.createElement("span");
  count.className = "pill " + (r.complete ? "on" : r.failed.length ? "off" : "wait");
  count.textContent = `${r.loaded} of ${r.nodes}`;
  cell.append(count);
  if (!r.complete) {
    const why = document.createElement("div");
    why.className = "why muted";
    why.textContent = r.summary;
    cell.append(why);
  }
  return cell;
}

async function act(method, name, body) {
  try {
    await call(method, "/modules/" + encodeURIComponent(name), body && JSON.stringify(body), body && "application/json");
    await loadModules();
  } catch (e) { alert(e.message); }
}

$("#upload").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const out = $("#upload-result");
  out.className = "";
  out.textContent = "uploading...";
  try {
    const m = await call("POST", "/modules", new FormData(ev.target));
    out.textContent = `added ${m.name} (sha256 ${m.sha256.slice(0, 12)})`;
    ev.target.reset();
    await loadModules();
  } catch (e) { out.className = "err"; out.textContent = e.message; }
});

async function loadLeases() {
  state.leases = await call("GET", "/leases");
  state.byNet = new Map(state.leases.map((l) => [ip2n(l.subnet.split("/")[0]), l]));
  state.nodes = await call("GET", "/nodes");
  drawMap();
  renderNodes();
}
// Other nodes' reports raise no event on this node, so a rollout in progress is read again
// until it completes: every 2 s while it moves, backing off to 30 s while it stands still (a
// node that never runs Weft keeps a rollout incomplete for good).
const ROLLOUT_POLL_MS = [2000, 30000];
const rolloutPoll = { timer: null, ms: ROLLOUT_POLL_MS[0], last: "" };
// An event says something moved: the next read counts as a change and polling starts fast.
function rolloutsMayMove() { rolloutPoll.last = ""; rolloutPoll.ms = ROLLOUT_POLL_MS[0]; }
async function loadModules() {
  const modules = await call("GET", "/modules");
  const rollouts = await Promise.all(modules.map((m) =>
    call("GET", "/modules/" + encodeURIComponent(m.name) + "/rollout").catch(() => null)));
  state.modules = modules;
  state.rollouts = new Map(modules.map((m, i) => [m.name, rollouts[i]]));
  renderModules();
  clearTimeout(rolloutPoll.timer);
  if (!rollouts.some((r) => r && !r.complete)) { rolloutPoll.ms = ROLLOUT_POLL_MS[0]; return; }
  const seen = JSON.stringify(rollouts);
  rolloutPoll.ms = seen === rolloutPoll.last ? Math.min(rolloutPoll.ms * 2, ROLLOUT_POLL_MS[1]) : ROLLOUT_POLL_MS[0];
  rolloutPoll.last = seen;
  rolloutPoll.timer = setTimeout(() => loadModules().catch(() => {}), rolloutPoll.ms);
}

async function loadDecisions() {
  const rows = await call("GET", "/decisions?limit=20");
  const body = $("#decisions tbody");
  body.innerHTML = "";
  for (const d of rows) {
    const tr = document.createElement("tr");
    const proto = { 1: "icmp", 6: "tcp", 17: "udp" }[d.protocol] || "proto " + d.protocol;
    tr.append(td(new Date(d.at_ms).toLocaleTimeString()), td(d.module, true),
      td(`${d.direction} ${proto} ${d.src} → ${d.dst}`), td(d.verdict), td(d.reason));
    body.appendChild(tr);
  }
}
async function loadAll() {
  state.config = await call("GET", "/config");
  await Promise.all([loadLeases(), loadModules(), loadDecisions(), call("GET", "/stats").then((s) => {
    // The event stream keeps the counters from its first event on; this read only fills the page before it.
    if (!state.stats) showStats({ ...s, route_count: s.routes.length, all_peers: true });
  })]);
  if (!document.body.dataset.rendered) window.weftFirstRenderMs = performance.now();
  document.body.dataset.rendered = "1";
}

let pending = null;
function soon(fn) { clearTimeout(pending); pending = setTimeout(fn, 200); }

function live() {
  const es = new EventSource(api + "/events");
  const pill = $("#live");
  es.addEventListener("hello", () => { pill.textContent = "live"; pill.className = "pill on"; });
  // A lease that comes or goes changes every rollout's count of nodes too.
  es.addEventListener("lease", () => { rolloutsMayMove(); soon(() => Promise.all([loadLeases(), loadModules()]).catch(() => {})); });
  es.addEventListener("modules", () => { rolloutsMayMove(); loadModules().catch(() => {}); });
  es.addEventListener("resync", () => loadAll());
  let ticks = 0;
  es.addEventListener("stats", (e) => {
    showStats(JSON.parse(e.data));
    if (++ticks % 3 === 0) loadDecisions().catch(() => {});
  });
  es.onerror = () => { pill.textContent = "reconnecting"; pill.className = "pill off"; };
}

// For tests and curious operators: where a subnet sits on the map and what colour it has.
window.weftMap = {
  slotOf(subnet) { const g = geometry(); return (ip2n(subnet.split("/")[0]) - g.base) / g.size; },
  colorAt(i) {
    const c = $("#map"), cell = Number(c.dataset.cell), cols = Number(c.dataset.cols);
    const p = c.getContext("2d").getImageData((i % cols) * cell, Math.floor(i / cols) * cell, 1, 1).data;
    return "#" + [p[0], p[1], p[2]].map((x) => x.toString(16).padStart(2, "0")).join("");
  },
  colors: COLORS,
};

window.addEventListener("resize", drawMap);
setInterval(showSlot, 1000);
setInterval(() => soon(loadLeases), 30000);
loadAll().then(live).catch((e) => { $("#map-summary").textContent = "cannot load: " + e.message; });
