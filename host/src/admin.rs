//! The agent's HTTP endpoint: Prometheus metrics, health checks, and the REST API (`crate::api`).

use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::agent::AgentState;
use crate::stats::DropReason;

/// Serves the admin endpoint until the process ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AgentState>,
    api: Arc<crate::api::ApiState>,
    body_limit: usize,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
        .merge(crate::api::router(api, body_limit))
        .merge(crate::dashboard::router());
    axum::serve(listener, app).await
}

/// Binds the admin listener (done before anything else so a port clash fails fast).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

async fn healthz(State(s): State<Arc<AgentState>>) -> impl IntoResponse {
    match s.backend.stats().failure() {
        None => (StatusCode::OK, "ok\n".to_string()),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("data path stopped: {why}\n")),
    }
}

async fn readyz(State(s): State<Arc<AgentState>>) -> impl IntoResponse {
    if s.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no subnet file written yet\n",
        )
    }
}

async fn metrics(State(s): State<Arc<AgentState>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], render(&s))
}

/// Writes one metric family: its HELP and TYPE lines, then each (labels, value) sample.
fn family<V: std::fmt::Display>(
    o: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    samples: impl IntoIterator<Item = (String, V)>,
) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, v) in samples {
        let _ = writeln!(o, "{name}{labels} {v}");
    }
}

/// The Prometheus text exposition of the agent's state.
pub fn render(s: &AgentState) -> String {
    let mut o = String::with_capacity(4096);
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let st = s.backend.stats();
    let routes = s.backend.routes().len() as u64;
    // (name, type, help, value) of every unlabelled series.
    let plain: [(&str, &str, &str, u64); 13] = [
        (
            "weft_ready",
            "gauge",
            "1 once the subnet file is written.",
            u64::from(s.ready.load(Ordering::Relaxed)),
        ),
        (
            "weft_store_connected",
            "gauge",
            "1 while the lease store answers.",
            u64::from(s.store_health.connected.load(Ordering::Relaxed)),
        ),
        (
            "weft_store_watch_restarts_total",
            "counter",
            "Times the lease watch was re-established after breaking.",
            load(&s.store_health.watch_restarts),
        ),
        (
            "weft_lease_acquisitions_total",
            "counter",
            "Times this node acquired its lease (1 at start; more means it was lost and re-acquired).",
            load(&s.acquisitions),
        ),
        (
            "weft_lease_renewals_total",
            "counter",
            "Successful renewals of this node's lease.",
            load(&s.renewals),
        ),
        (
            "weft_leases",
            "gauge",
            "Leases known in the cluster.",
            s.leases_known.load(Ordering::Relaxed) as u64,
        ),
        ("weft_routes", "gauge", "Remote subnets the data path routes.", routes),
        (
            "weft_dataplane_tx_packets_total",
            "counter",
            "Packets sent to peers.",
            load(&st.tx_packets),
        ),
        (
            "weft_dataplane_tx_bytes_total",
            "counter",
            "Inner bytes sent to peers.",
            load(&st.tx_bytes),
        ),
        (
            "weft_dataplane_rx_packets_total",
            "counter",
            "Packets received from peers and delivered.",
            load(&st.rx_packets),
        ),
        (
            "weft_dataplane_rx_bytes_total",
            "counter",
            "Inner bytes received from peers and delivered.",
            load(&st.rx_bytes),
        ),
        (
            "weft_dataplane_icmp_errors_sent_total",
            "counter",
            "ICMP errors generated (net unreachable, time exceeded).",
            load(&st.icmp_sent),
        ),
        (
            "weft_dataplane_up",
            "gauge",
            "1 while the data path runs.",
            u64::from(st.failure().is_none()),
        ),
    ];
    for (name, kind, help, v) in plain {
        family(&mut o, name, kind, help, [(String::new(), v)]);
    }
    if let Some(own) = s.own_lease() {
        let labels = format!(
            "{{subnet=\"{}\",public_ip=\"{}\",backend=\"{}\"}}",
            own.subnet,
            own.attrs.public_ip,
            s.backend.kind()
        );
        family(&mut o, "weft_node_info", "gauge", "This node's lease.", [(labels, 1)]);
    }
    family(
        &mut o,
        "weft_dataplane_dropped_packets_total",
        "counter",
        "Packets dropped, by reason.",
        DropReason::ALL
            .iter()
            .map(|r| (format!("{{reason=\"{}\"}}", r.label()), st.drops(*r))),
    );
    render_peers(&mut o, s);
    render_modules(&mut o, s);
    if let Some(k) = &s.kernel_policy {
        render_kernel_policy(&mut o, k);
    }
    o
}

/// The kernel-path (NFQUEUE) policy's series.
fn render_kernel_policy(o: &mut String, k: &crate::nfq::PolicyStats) {
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    family(
        o,
        "weft_kernel_policy_available",
        "gauge",
        "1 while Wasm policy reaches the kernel data path (NFQUEUE bound, rules loaded).",
        [(String::new(), u64::from(k.available.load(Ordering::Relaxed)))],
    );
    family(
        o,
        "weft_kernel_policy_packets_total",
        "counter",
        "Packets the kernel queued to the agent, by verdict; only each flow's first packet is queued.",
        [
            ("{verdict=\"allow\"}".to_string(), load(&k.allowed)),
            ("{verdict=\"deny\"}".to_string(), load(&k.denied)),
        ],
    );
    family(
        o,
        "weft_kernel_policy_errors_total",
        "counter",
        "Queue messages that did not parse and verdicts that could not be sent.",
        [(String::new(), load(&k.errors))],
    );
}

/// Traffic with each peer node.
fn render_peers(o: &mut String, s: &AgentState) {
    type Pick = fn(&crate::backend::route::PeerCounters) -> u64;
    let peers = s.backend.peer_stats();
    let series: [(&str, &str, Pick); 4] = [
        (
            "weft_dataplane_peer_tx_packets_total",
            "Packets sent to each peer node.",
            |c| c.tx_packets.load(Ordering::Relaxed),
        ),
        (
            "weft_dataplane_peer_tx_bytes_total",
            "Inner bytes sent to each peer node.",
            |c| c.tx_bytes.load(Ordering::Relaxed),
        ),
        (
            "weft_dataplane_peer_rx_packets_total",
            "Packets from each peer node delivered here.",
            |c| c.rx_packets.load(Ordering::Relaxed),
        ),
        (
            "weft_dataplane_peer_rx_bytes_total",
            "Inner bytes from each peer node delivered here.",
            |c| c.rx_bytes.load(Ordering::Relaxed),
        ),
    ];
    for (name, help, pick) in series {
        let samples = peers.iter().map(|(ip, c)| (format!("{{peer=\"{ip}\"}}"), pick(c)));
        family(o, name, "counter", help, samples);
    }
}

/// The Wasm modules' series: the chain, each module's counters and its own counters.
fn render_modules(o: &mut String, s: &AgentState) {
    use crate::wasm::stats::VerdictKind;
    let p = &s.modules;
    let chain = p.chain();
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    for (name, help, v) in [
        (
            "weft_flow_cache_hits_total",
            "Packets answered from a verdict cache.",
            load(&p.cache_hits),
        ),
        (
            "weft_flow_cache_misses_total",
            "Packets that needed the module chain.",
            load(&p.cache_misses),
        ),
        (
            "weft_module_bad_via_total",
            "Routing verdicts naming a node without a lease (ignored).",
            load(&p.bad_via),
        ),
    ] {
        family(o, name, "counter", help, [(String::new(), v)]);
    }
    family(
        o,
        "weft_module_chain_generation",
        "gauge",
        "Generation of the module chain (bumps on every change).",
        [(String::new(), chain.generation)],
    );
    family(
        o,
        "weft_module_info",
        "gauge",
        "Modules in the chain: 1 when loaded, 0 when they failed to load.",
        chain.modules.iter().enumerate().map(|(i, m)| {
            (
                format!(
                    "{{module=\"{}\",sha256=\"{}\",order=\"{i}\",failure=\"{:?}\",dry_run=\"{}\"}}",
                    m.name, m.sha256, m.failure, m.dry_run
                ),
                u8::from(m.compiled.is_ok()),
            )
        }),
    );
    let stats = p.module_stats();
    let now_ms = crate::wasm::chain::clock_ms();
    type Pick = fn(&crate::wasm::stats::ModuleStats, u64) -> u64;
    let per_module: [(&str, &str, &str, Pick); 10] = [
        (
            "weft_module_calls_total",
            "counter",
            "Decision calls into the module.",
            |m, _| m.calls.load(Ordering::Relaxed),
        ),
        (
            "weft_module_call_nanoseconds_total",
            "counter",
            "Time spent in decision calls (divide by calls for ns per call).",
            |m, _| m.call_ns.load(Ordering::Relaxed),
        ),
        ("weft_module_traps_total", "counter", "Calls that trapped.", |m, _| {
            m.traps.load(Ordering::Relaxed)
        }),
        (
            "weft_module_timeouts_total",
            "counter",
            "Calls interrupted at their deadline.",
            |m, _| m.timeouts.load(Ordering::Relaxed),
        ),
        (
            "weft_module_bad_verdicts_total",
            "counter",
            "Calls that returned a verdict the ABI does not define.",
            |m, _| m.bad_verdicts.load(Ordering::Relaxed),
        ),
        (
            "weft_module_cache_hits_total",
            "counter",
            "Packets answered from the verdict cache while the module was in the chain.",
            |m, _| m.cache_hits.load(Ordering::Relaxed),
        ),
        (
            "weft_module_dry_run_drops_total",
            "counter",
            "Drops a dry-run module asked for and did not get.",
            |m, _| m.dry_run_drops.load(Ordering::Relaxed),
        ),
        (
            "weft_module_quarantines_total",
            "counter",
            "Times the module was quarantined.",
            |m, _| m.quarantines.load(Ordering::Relaxed),
        ),
        (
            "weft_module_logs_suppressed_total",
            "counter",
            "Module log lines dropped by the rate limit.",
            |m, _| m.logs_suppressed.load(Ordering::Relaxed),
        ),
        (
            "weft_module_quarantined",
            "gauge",
            "1 while the module is quarantined.",
            |m, now| u64::from(m.quarantined(now)),
        ),
    ];
    for (name, kind, help, pick) in per_module {
        let samples = stats
            .iter()
            .map(|(module, m)| (format!("{{module=\"{module}\"}}"), pick(m, now_ms)));
        family(o, name, kind, help, samples);
    }
    family(
        o,
        "weft_module_verdicts_total",
        "counter",
        "Verdicts by kind (failure: the failure policy decided).",
        stats.iter().flat_map(|(module, m)| {
            VerdictKind::ALL.map(|k| {
                (
                    format!("{{module=\"{module}\",verdict=\"{}\"}}", k.label()),
                    m.verdicts(k),
                )
            })
        }),
    );
    family(
        o,
        "weft_module_counter",
        "gauge",
        "Counters the modules define, by name.",
        stats.iter().flat_map(|(module, m)| {
            m.counters()
                .into_iter()
                .map(move |(name, v)| (format!("{{module=\"{module}\",name=\"{name}\"}}"), v))
        }),
    );
}
