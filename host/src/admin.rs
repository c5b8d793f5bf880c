//! The agent's HTTP endpoint: Prometheus metrics and health checks.

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
pub async fn serve(listener: tokio::net::TcpListener, state: Arc<AgentState>) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state);
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

/// The Prometheus text exposition of the agent's state.
pub fn render(s: &AgentState) -> String {
    let mut o = String::with_capacity(4096);
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, u64)]| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(o, "{name}{labels} {v}");
        }
    };
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
        metric(name, kind, help, &[(String::new(), v)]);
    }
    if let Some(own) = s.own_lease() {
        let labels = format!(
            "{{subnet=\"{}\",public_ip=\"{}\",backend=\"{}\"}}",
            own.subnet,
            own.attrs.public_ip,
            s.backend.kind()
        );
        metric("weft_node_info", "gauge", "This node's lease.", &[(labels, 1)]);
    }
    let drops: Vec<(String, u64)> = DropReason::ALL
        .iter()
        .map(|r| (format!("{{reason=\"{}\"}}", r.label()), st.drops(*r)))
        .collect();
    metric(
        "weft_dataplane_dropped_packets_total",
        "counter",
        "Packets dropped, by reason.",
        &drops,
    );
    o
}
