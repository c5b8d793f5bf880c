//! The agent's HTTP endpoint: Prometheus metrics, health checks, and the REST API (`crate::api`).
//!
//! Metrics are encoded by the Prometheus project's Rust client (`prometheus-client`, OpenMetrics
//! text). The counters themselves stay where the data path keeps them (atomics it bumps without
//! a lock); a collector reads them on each scrape, so a scrape costs the series, never the
//! packet path.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::state::AgentState;
use crate::stats::DropReason;

/// What `/metrics` is served from.
struct Metrics {
    state: Arc<AgentState>,
    registry: Registry,
}

/// Serves the admin endpoint until the process ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    state: Arc<AgentState>,
    api: Arc<crate::api::ApiState>,
    body_limit: usize,
) -> std::io::Result<()> {
    let metrics = Arc::new(Metrics {
        registry: registry(state.clone()),
        state,
    });
    let app = Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(metrics)
        .merge(crate::api::router(api, body_limit))
        .merge(crate::dashboard::router());
    match tls {
        None => axum::serve(listener, app).await,
        Some(acceptor) => serve_tls(listener, acceptor, app).await,
    }
}

/// How long a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The admin endpoint over TLS: each connection's handshake and requests run in their own task,
/// so a client that stalls or fails its handshake (no certificate, a wrong CA, plain HTTP) holds
/// up no one else.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    app: Router,
) -> std::io::Result<()> {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: wait, rather than spin on the error.
                tracing::warn!(error = %e, "admin endpoint cannot accept");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "admin TLS handshake failed"),
                Err(_) => return tracing::debug!(%peer, "admin TLS handshake timed out"),
            };
            let io = hyper_util::rt::TokioIo::new(tls);
            let svc = hyper_util::service::TowerToHyperService::new(app);
            let http = hyper::server::conn::http1::Builder::new();
            if let Err(e) = http.serve_connection(io, svc).with_upgrades().await {
                tracing::debug!(%peer, error = %e, "admin connection ended with an error");
            }
        });
    }
}

/// Binds the admin listener (done before anything else so a port clash fails fast).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

async fn healthz(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    match m.state.backend.stats().failure() {
        None => (StatusCode::OK, "ok\n".to_string()),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("data path stopped: {why}\n")),
    }
}

async fn readyz(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    if m.state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the first lease listing is not in the data path yet\n",
        )
    }
}

async fn metrics_page(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    let mut body = String::with_capacity(16 << 10);
    match prometheus_client::encoding::text::encode(&mut body, &m.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            format!("cannot encode metrics: {e}\n"),
        ),
    }
}

/// The registry of an agent: one collector over its state.
pub fn registry(state: Arc<AgentState>) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(AgentCollector { state }));
    r
}

/// Reads the agent's counters on each scrape.
struct AgentCollector {
    state: Arc<AgentState>,
}

impl std::fmt::Debug for AgentCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentCollector")
    }
}

/// Label pairs of one sample.
type Labels = Vec<(&'static str, String)>;

/// One family written through `e`: counters are named without `_total` (the encoder adds it).
struct Family<'a, 'b> {
    e: &'a mut DescriptorEncoder<'b>,
}

impl Family<'_, '_> {
    fn counter(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Labels, u64)>,
    ) -> std::fmt::Result {
        let mut m = self.e.encode_descriptor(name, help, None, MetricType::Counter)?;
        let mut samples = samples.into_iter().peekable();
        if let Some((_, v)) = samples.next_if(|(l, _)| l.is_empty()) {
            // An unlabelled series has one sample, written without a label set.
            return ConstCounter::new(v).encode(m);
        }
        for (labels, v) in samples {
            ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }

    fn gauge(&mut self, name: &str, help: &str, samples: impl IntoIterator<Item = (Labels, i64)>) -> std::fmt::Result {
        let mut m = self.e.encode_descriptor(name, help, None, MetricType::Gauge)?;
        let mut samples = samples.into_iter().peekable();
        if let Some((_, v)) = samples.next_if(|(l, _)| l.is_empty()) {
            return ConstGauge::new(v).encode(m);
        }
        for (labels, v) in samples {
            ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

fn one<V>(v: V) -> [(Labels, V); 1] {
    [(Vec::new(), v)]
}

fn gauge_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Collector for AgentCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let s = &*self.state;
        let mut f = Family { e: &mut e };
        node(&mut f, s)?;
        dataplane(&mut f, s)?;
        kernel(&mut f, s)?;
        peers(&mut f, s)?;
        modules(&mut f, s)?;
        module_series(&mut f, s)
    }
}

fn node(f: &mut Family, s: &AgentState) -> std::fmt::Result {
    let h = &s.store_health;
    f.gauge(
        "weft_ready",
        "1 once every lease of the first listing is in the data path and the subnet file is written.",
        one(i64::from(s.ready.load(Ordering::Relaxed))),
    )?;
    f.gauge(
        "weft_store_connected",
        "1 while the lease store answers and the lease watch stands.",
        one(i64::from(h.connected.load(Ordering::Relaxed))),
    )?;
    f.counter(
        "weft_store_watch_restarts",
        "Times the lease watch was re-established after breaking.",
        one(load(&h.watch_restarts)),
    )?;
    f.counter(
        "weft_store_listings",
        "Full listings of the leases read from the store.",
        one(load(&h.listings)),
    )?;
    f.counter(
        "weft_lease_acquisitions",
        "Times this node acquired its lease (1 at start; more means it was lost and re-acquired).",
        one(load(&s.acquisitions)),
    )?;
    f.counter(
        "weft_lease_renewals",
        "Successful renewals of this node's lease.",
        one(load(&s.renewals)),
    )?;
    f.gauge(
        "weft_leases",
        "Leases known in the cluster.",
        one(gauge_of(s.leases_known() as u64)),
    )?;
    f.counter(
        "weft_lease_table_updates",
        "Lease table updates handed to the data path (a snapshot or a batch of changes).",
        one(load(&s.table_updates)),
    )?;
    f.counter(
        "weft_lease_table_update_subnets",
        "Subnets those updates named: what following the table cost.",
        one(load(&s.table_update_subnets)),
    )?;
    if let Some(own) = s.own_lease() {
        let labels = vec![
            ("subnet", own.subnet.to_string()),
            ("public_ip", own.attrs.public_ip.to_string()),
            ("backend", s.backend.kind().to_string()),
        ];
        f.gauge("weft_node_info", "This node's lease.", [(labels, 1)])?;
    }
    Ok(())
}

fn dataplane(f: &mut Family, s: &AgentState) -> std::fmt::Result {
    let st = s.backend.stats();
    f.gauge(
        "weft_routes",
        "Remote subnets the data path routes.",
        one(gauge_of(s.backend.routes().len() as u64)),
    )?;
    f.counter(
        "weft_dataplane_tx_packets",
        "Packets sent to peers.",
        one(load(&st.tx_packets)),
    )?;
    f.counter(
        "weft_dataplane_tx_bytes",
        "Inner bytes sent to peers.",
        one(load(&st.tx_bytes)),
    )?;
    f.counter(
        "weft_dataplane_rx_packets",
        "Packets received from peers and delivered.",
        one(load(&st.rx_packets)),
    )?;
    f.counter(
        "weft_dataplane_rx_bytes",
        "Inner bytes received from peers and delivered.",
        one(load(&st.rx_bytes)),
    )?;
    f.counter(
        "weft_dataplane_icmp_errors_sent",
        "ICMP errors generated (net unreachable, time exceeded).",
        one(load(&st.icmp_sent)),
    )?;
    f.gauge(
        "weft_dataplane_up",
        "1 while the data path runs.",
        one(i64::from(st.failure().is_none())),
    )?;
    let queues: Vec<(Labels, u64)> = (0..st.queue_tx.len())
        .filter(|&q| load(&st.queue_tx[q]) + load(&st.queue_rx[q]) > 0)
        .flat_map(|q| {
            [("tx", load(&st.queue_tx[q])), ("rx", load(&st.queue_rx[q]))]
                .map(|(dir, v)| (vec![("queue", q.to_string()), ("dir", dir.to_string())], v))
        })
        .collect();
    if !queues.is_empty() {
        f.counter(
            "weft_dataplane_queue_packets",
            "Packets each queue of the userspace data path sent (tx) and delivered (rx).",
            queues,
        )?;
        f.counter(
            "weft_dataplane_helped_turns",
            "Turns in which a userspace queue's thread moved the other direction's packets while that direction's thread slept (a wake-up saved).",
            [("tx", load(&st.helped_tx)), ("rx", load(&st.helped_rx))]
                .map(|(dir, v)| (vec![("dir", dir.to_string())], v)),
        )?;
        f.counter(
            "weft_dataplane_parks",
            "Times a userspace queue's thread parked while traffic was light and its partner carried both directions alone.",
            [(vec![], load(&st.parks))],
        )?;
        f.counter(
            "weft_dataplane_unparks",
            "Times a turn that moved more than one packet a side woke a parked userspace queue thread, so both directions have a thread again.",
            [(vec![], load(&st.unparks))],
        )?;
        f.counter(
            "weft_dataplane_coalesced_segments",
            "TCP segments from peers written into the device merged into super-packets (receive offload in userspace).",
            [(vec![], load(&st.coalesced_segments))],
        )?;
        f.counter(
            "weft_dataplane_coalesced_writes",
            "Super-packets those segments made, one write into the device each.",
            [(vec![], load(&st.coalesced_writes))],
        )?;
    }
    f.counter(
        "weft_dataplane_dropped_packets",
        "Packets dropped, by reason.",
        DropReason::ALL
            .iter()
            .map(|r| (vec![("reason", r.label().to_string())], st.drops(*r))),
    )
}

/// What a kernel backend wrote, and the kernel-path policy.
fn kernel(f: &mut Family, s: &AgentState) -> std::fmt::Result {
    if let Some(w) = s.backend.kernel_writes() {
        f.counter(
            "weft_kernel_entries_written",
            "Kernel entries (neighbours, FDB entries, routes) written, by operation.",
            [
                (vec![("op", "add".to_string())], load(&w.added)),
                (vec![("op", "delete".to_string())], load(&w.deleted)),
            ],
        )?;
        f.counter(
            "weft_kernel_full_rounds",
            "Reconcile rounds that read the kernel's entries back.",
            one(load(&w.full_rounds)),
        )?;
    }
    let Some(k) = &s.kernel_policy else { return Ok(()) };
    f.gauge(
        "weft_kernel_policy_available",
        "1 while Wasm policy reaches the kernel data path (NFQUEUE bound, rules loaded).",
        one(i64::from(k.available.load(Ordering::Relaxed))),
    )?;
    f.counter(
        "weft_kernel_policy_packets",
        "Packets the kernel queued to the agent, by verdict; only each flow's first packet is queued.",
        [
            (vec![("verdict", "allow".to_string())], load(&k.allowed)),
            (vec![("verdict", "deny".to_string())], load(&k.denied)),
        ],
    )?;
    f.counter(
        "weft_kernel_policy_verdicts",
        "Verdict messages sent to the kernel: on one packet, or on every allowed packet of a burst at once (batch).",
        [
            (vec![("kind", "packet".to_string())], load(&k.single_verdicts)),
            (vec![("kind", "batch".to_string())], load(&k.batch_verdicts)),
        ],
    )?;
    f.counter(
        "weft_kernel_policy_errors",
        "Queue messages that did not parse and verdicts that could not be sent.",
        one(load(&k.errors)),
    )?;
    f.gauge(
        "weft_kernel_policy_known_ready",
        "1 while the kernel's maps of known services (table ip weft_policy) are loaded.",
        one(i64::from(k.known.ready.load(Ordering::Relaxed))),
    )?;
    f.counter(
        "weft_kernel_policy_known_services",
        "Services decided for more than one flow handed to the kernel (added), or not taken (refused: a full map or backlog).",
        [
            (vec![("result", "added".to_string())], load(&k.known.added)),
            (vec![("result", "refused".to_string())], load(&k.known.refused)),
        ],
    )?;
    f.counter(
        "weft_kernel_policy_known_flushes",
        "Times the kernel's maps of known services were emptied because the chain or the lease table changed.",
        one(load(&k.known.flushes)),
    )
}

/// Traffic with each peer node.
fn peers(f: &mut Family, s: &AgentState) -> std::fmt::Result {
    type Pick = fn(&crate::packet::route::PeerCounters) -> u64;
    let peers = s.backend.peer_stats();
    let series: [(&str, &str, Pick); 4] = [
        (
            "weft_dataplane_peer_tx_packets",
            "Packets sent to each peer node.",
            |c| load(&c.tx_packets),
        ),
        (
            "weft_dataplane_peer_tx_bytes",
            "Inner bytes sent to each peer node.",
            |c| load(&c.tx_bytes),
        ),
        (
            "weft_dataplane_peer_rx_packets",
            "Packets from each peer node delivered here.",
            |c| load(&c.rx_packets),
        ),
        (
            "weft_dataplane_peer_rx_bytes",
            "Inner bytes from each peer node delivered here.",
            |c| load(&c.rx_bytes),
        ),
    ];
    for (name, help, pick) in series {
        f.counter(
            name,
            help,
            peers.iter().map(|(ip, c)| (vec![("peer", ip.to_string())], pick(c))),
        )?;
    }
    Ok(())
}

/// The chain's series.
fn modules(f: &mut Family, s: &AgentState) -> std::fmt::Result {
    let p = &s.modules;
    let chain = p.chain();
    f.counter(
        "weft_flow_cache_hits",
        "Packets answered from a verdict cache.",
        one(load(&p.cache_hits)),
    )?;
    f.counter(
        "weft_flow_cache_misses",
        "Packets that needed the module chain.",
        one(load(&p.cache_misses)),
    )?;
    f.counter(
        "weft_flow_cache_wide_hits",
        "New flows answered without a call by a verdict the modules gave for their whole service (any source port or any source).",
        one(load(&p.wide_hits)),
    )?;
    f.counter(
        "weft_module_bad_via",
        "Routing verdicts naming a node without a lease (ignored).",
        one(load(&p.bad_via)),
    )?;
    f.gauge(
        "weft_module_chain_generation",
        "Generation of the module chain (bumps on every change).",
        one(gauge_of(chain.generation)),
    )?;
    f.gauge(
        "weft_module_info",
        "Modules in the chain: 1 when loaded, 0 when they failed to load.",
        chain.modules.iter().map(|m| {
            let labels = vec![
                ("module", m.name.to_string()),
                ("sha256", m.sha256.clone()),
                ("order", m.order.to_string()),
                ("failure", m.failure.label().to_string()),
                ("dry_run", m.dry_run.to_string()),
            ];
            (labels, i64::from(m.compiled.is_ok()))
        }),
    )
}

/// Each module's own counters.
fn module_series(f: &mut Family, s: &AgentState) -> std::fmt::Result {
    use crate::wasm::stats::{ModuleStats, VerdictKind};
    let stats = s.modules.module_stats();
    let now_ms = crate::wasm::chain::clock_ms();
    let by_module = |pick: &dyn Fn(&ModuleStats) -> u64| -> Vec<(Labels, u64)> {
        stats
            .iter()
            .map(|(name, m)| (vec![("module", name.clone())], pick(m)))
            .collect()
    };
    type Pick = fn(&ModuleStats) -> u64;
    let counters: [(&str, &str, Pick); 9] = [
        ("weft_module_calls", "Decision calls into the module.", |m| {
            load(&m.calls)
        }),
        (
            "weft_module_call_nanoseconds",
            "Time spent in decision calls (divide by calls for ns per call).",
            |m| load(&m.call_ns),
        ),
        ("weft_module_traps", "Calls that trapped.", |m| load(&m.traps)),
        ("weft_module_timeouts", "Calls interrupted at their deadline.", |m| {
            load(&m.timeouts)
        }),
        (
            "weft_module_bad_verdicts",
            "Calls that returned a verdict the ABI does not define.",
            |m| load(&m.bad_verdicts),
        ),
        (
            "weft_module_cache_hits",
            "Packets answered from the verdict cache while the module was in the chain.",
            |m| load(&m.cache_hits),
        ),
        (
            "weft_module_dry_run_drops",
            "Drops a dry-run module asked for and did not get.",
            |m| load(&m.dry_run_drops),
        ),
        ("weft_module_quarantines", "Times the module was quarantined.", |m| {
            load(&m.quarantines)
        }),
        (
            "weft_module_logs_suppressed",
            "Module log lines dropped by the rate limit.",
            |m| load(&m.logs_suppressed),
        ),
    ];
    for (name, help, pick) in counters {
        f.counter(name, help, by_module(&pick))?;
    }
    f.gauge(
        "weft_module_quarantined",
        "1 while the module is quarantined.",
        stats
            .iter()
            .map(|(name, m)| (vec![("module", name.clone())], i64::from(m.quarantined(now_ms)))),
    )?;
    f.counter(
        "weft_module_verdicts",
        "Verdicts by kind (failure: the failure policy decided).",
        stats.iter().flat_map(|(name, m)| {
            VerdictKind::ALL.map(|k| {
                (
                    vec![("module", name.clone()), ("verdict", k.label().to_string())],
                    m.verdicts(k),
                )
            })
        }),
    )?;
    f.gauge(
        "weft_module_counter",
        "Counters the modules define, by name.",
        stats.iter().flat_map(|(module, m)| {
            m.counters()
                .into_iter()
                .map(move |(name, v)| (vec![("module", module.clone()), ("name", name)], v))
        }),
    )
}
