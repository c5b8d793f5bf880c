//! `/config`, `/nodes` and `/stats`: the network config, every node with what it reported, and
//! the answering node's data path counters.

use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::State;
use axum::Json;

use super::error::ApiError;
use super::views::{ConfigView, LeaseView, ModuleStatusView, NodeView, PeerView, StatsView};
use super::ApiState;
use crate::lease::DocKind;
use crate::stats::DropReason;
use crate::wasm::spec::NodeStatus;

/// The network config, parsed and as stored.
#[utoipa::path(get, path = "/config", tag = "cluster", responses((status = 200, body = ConfigView)))]
pub async fn config(State(s): State<Arc<ApiState>>) -> Result<Json<ConfigView>, ApiError> {
    let c = &s.config;
    let raw = s
        .store
        .network_config()
        .await?
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(serde_json::Value::Null);
    Ok(Json(ConfigView {
        network: c.network.to_string(),
        subnet_len: c.subnet_len,
        subnet_min: c.subnet_min.to_string(),
        subnet_max: c.subnet_max.to_string(),
        backend: c.backend.kind.clone(),
        raw,
        removal_reported: s.store.reports_outlive_modules(),
    }))
}

/// Every node (one per lease, in address order) with its backend data and its last report.
#[utoipa::path(get, path = "/nodes", tag = "cluster", responses((status = 200, body = [NodeView])))]
pub async fn nodes(State(s): State<Arc<ApiState>>) -> Result<Json<Vec<NodeView>>, ApiError> {
    let own = s.agent.own_lease().map(|l| l.subnet);
    let reports: Vec<NodeStatus> = s
        .store
        .list_docs(DocKind::ModuleStatus, true)
        .await?
        .into_iter()
        .filter_map(|d| serde_json::from_slice(&d.value).ok())
        .collect();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let v: Vec<NodeView> = super::leases::all(&s)
        .await?
        .iter()
        .map(|l| {
            let ip = l.attrs.public_ip.to_string();
            let report = reports.iter().find(|r| r.node == ip);
            NodeView {
                public_ip: ip,
                lease: LeaseView::of(l, Some(l.subnet) == own),
                last_seen_secs: report.map(|r| now.saturating_sub(r.updated)),
                modules: report
                    .map(|r| r.modules.iter().map(ModuleStatusView::of).collect())
                    .unwrap_or_default(),
            }
        })
        .collect();
    Ok(Json(v))
}

/// This node's data path counters.
pub fn stats_view(s: &ApiState) -> StatsView {
    use std::sync::atomic::Ordering::Relaxed;
    let b = &s.agent.backend;
    let st = b.stats();
    let p = &s.agent.modules;
    StatsView {
        backend: b.kind().to_string(),
        tx_packets: st.tx_packets.load(Relaxed),
        tx_bytes: st.tx_bytes.load(Relaxed),
        rx_packets: st.rx_packets.load(Relaxed),
        rx_bytes: st.rx_bytes.load(Relaxed),
        drops: DropReason::ALL
            .iter()
            .map(|r| (r.label().to_string(), st.drops(*r)))
            .collect(),
        flow_cache_hits: p.cache_hits.load(Relaxed),
        flow_cache_misses: p.cache_misses.load(Relaxed),
        routes: b
            .routes()
            .into_iter()
            .map(|(n, ip)| (n.to_string(), ip.to_string()))
            .collect(),
        failure: st.failure().map(str::to_string),
        peers: b
            .peer_stats()
            .into_iter()
            .map(|(ip, c)| PeerView {
                public_ip: ip.to_string(),
                tx_packets: c.tx_packets.load(Relaxed),
                tx_bytes: c.tx_bytes.load(Relaxed),
                rx_packets: c.rx_packets.load(Relaxed),
                rx_bytes: c.rx_bytes.load(Relaxed),
            })
            .collect(),
    }
}

/// This node's data path counters.
#[utoipa::path(get, path = "/stats", tag = "cluster", responses((status = 200, body = StatsView)))]
pub async fn stats(State(s): State<Arc<ApiState>>) -> Json<StatsView> {
    Json(stats_view(&s))
}
