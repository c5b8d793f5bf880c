//! `/config`, `/nodes` and `/stats`: the network config, every node with what it reported, and
//! the answering node's data path counters.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::State;
use axum::Json;
use ipnet::Ipv4Net;

use super::error::ApiError;
use super::views::{ConfigView, LeaseView, ModuleStatusView, NodeView, PeerView, StatsView};
use super::ApiState;
use crate::lease::{DocKind, Lease};
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
    Ok(Json(node_views(&super::leases::all(&s).await?, &reports, own, now)))
}

/// Joins the leases with the nodes' reports (by PublicIP), indexing the reports once: the
/// answer grows with the nodes, not with their square (5,000 nodes, each with a report).
fn node_views(leases: &[Lease], reports: &[NodeStatus], own: Option<Ipv4Net>, now: u64) -> Vec<NodeView> {
    let by_node: HashMap<&str, &NodeStatus> = reports.iter().map(|r| (r.node.as_str(), r)).collect();
    leases
        .iter()
        .map(|l| {
            let ip = l.attrs.public_ip.to_string();
            let report = by_node.get(ip.as_str());
            NodeView {
                lease: LeaseView::of(l, Some(l.subnet) == own),
                last_seen_secs: report.map(|r| now.saturating_sub(r.updated)),
                modules: report
                    .map(|r| r.modules.iter().map(ModuleStatusView::of).collect())
                    .unwrap_or_default(),
                public_ip: ip,
            }
        })
        .collect()
}

/// This node's data path counters.
pub fn stats_view(s: &ApiState) -> StatsView {
    let mut v = counters_view(s);
    v.routes = s
        .agent
        .backend
        .routes()
        .into_iter()
        .map(|(n, ip)| (n.to_string(), ip.to_string()))
        .collect();
    v
}

/// The counters without the route list, which the once-a-second stats event only counts.
fn counters_view(s: &ApiState) -> StatsView {
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
        routes: Vec::new(),
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

/// The `stats` event of `/events`: [`stats_view`] with the routes counted (`route_count`), not
/// listed, and in `peers` only the peers whose counters moved since the stream's previous event
/// (`sent` remembers what it carried; every peer when `all_peers`, the stream's first). An open
/// dashboard is then sent what changed each second, not every route and peer: 591 KB a second
/// at 5,000 nodes.
pub fn stats_event(s: &ApiState, all_peers: bool, sent: &mut HashMap<String, [u64; 4]>) -> serde_json::Value {
    let mut v = counters_view(s);
    let route_count = s.agent.backend.routes().len();
    v.peers = moved_peers(std::mem::take(&mut v.peers), all_peers, sent);
    let mut j = serde_json::to_value(&v).unwrap_or_default();
    if let Some(o) = j.as_object_mut() {
        o.remove("routes");
        o.insert("route_count".into(), route_count.into());
        o.insert("all_peers".into(), all_peers.into());
    }
    j
}

/// The peers whose counters differ from what `sent` holds (all of them with `all`), which then
/// holds the new counters; peers no longer listed are forgotten.
fn moved_peers(peers: Vec<PeerView>, all: bool, sent: &mut HashMap<String, [u64; 4]>) -> Vec<PeerView> {
    if all {
        sent.clear();
    }
    let moved: Vec<bool> = peers
        .iter()
        .map(|p| {
            let now = [p.tx_packets, p.tx_bytes, p.rx_packets, p.rx_bytes];
            sent.insert(p.public_ip.clone(), now) != Some(now)
        })
        .collect();
    if sent.len() > peers.len() {
        let here: HashSet<&str> = peers.iter().map(|p| p.public_ip.as_str()).collect();
        sent.retain(|ip, _| here.contains(ip.as_str()));
    }
    peers
        .into_iter()
        .zip(moved)
        .filter_map(|(p, m)| m.then_some(p))
        .collect()
}

/// This node's data path counters.
#[utoipa::path(get, path = "/stats", tag = "cluster", responses((status = 200, body = StatsView)))]
pub async fn stats(State(s): State<Arc<ApiState>>) -> Json<StatsView> {
    Json(stats_view(&s))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::time::Duration;

    use super::*;
    use crate::lease::LeaseAttrs;
    use crate::wasm::spec::{ModuleStatus, LOADED};

    fn lease(i: u8) -> Lease {
        Lease {
            subnet: format!("10.244.{i}.0/24").parse().unwrap(),
            attrs: LeaseAttrs::new(Ipv4Addr::new(198, 18, 0, i), "udp", serde_json::Value::Null),
            expiration: SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000),
            revision: 1,
            ttl_handle: 0,
        }
    }

    fn report(i: u8, updated: u64) -> NodeStatus {
        NodeStatus {
            node: Ipv4Addr::new(198, 18, 0, i).to_string(),
            updated,
            modules: vec![ModuleStatus {
                name: format!("m{i}"),
                sha256: "ab".into(),
                revision: None,
                state: LOADED.into(),
                error: None,
            }],
        }
    }

    fn peer(i: u8, tx: u64) -> PeerView {
        PeerView {
            public_ip: format!("198.18.0.{i}"),
            tx_packets: tx,
            tx_bytes: tx * 100,
            rx_packets: 0,
            rx_bytes: 0,
        }
    }

    fn ips(v: &[PeerView]) -> Vec<&str> {
        v.iter().map(|p| p.public_ip.as_str()).collect()
    }

    #[test]
    fn a_stats_event_carries_every_peer_first_then_only_those_that_moved() {
        let mut sent = HashMap::new();
        let first = moved_peers(vec![peer(1, 0), peer(2, 5)], true, &mut sent);
        assert_eq!(ips(&first), ["198.18.0.1", "198.18.0.2"]);
        assert!(moved_peers(vec![peer(1, 0), peer(2, 5)], false, &mut sent).is_empty());
        assert_eq!(
            ips(&moved_peers(vec![peer(1, 0), peer(2, 6)], false, &mut sent)),
            ["198.18.0.2"]
        );
        // A new peer is news; one that left is forgotten, and is news again when it comes back.
        assert_eq!(
            ips(&moved_peers(vec![peer(2, 6), peer(3, 0)], false, &mut sent)),
            ["198.18.0.3"]
        );
        assert!(moved_peers(vec![peer(3, 0)], false, &mut sent).is_empty());
        assert_eq!(
            ips(&moved_peers(vec![peer(1, 0), peer(3, 0)], false, &mut sent)),
            ["198.18.0.1"]
        );
        // The stream's first event after a reconnect repeats everything.
        assert_eq!(moved_peers(vec![peer(1, 0), peer(3, 0)], true, &mut sent).len(), 2);
    }

    #[test]
    fn each_node_gets_its_own_report_whatever_order_they_come_in() {
        let leases = [lease(1), lease(2), lease(3)];
        // Node 3 has not reported; 9 reported but holds no lease; the reports come in reverse.
        let reports = [report(9, 10), report(2, 950), report(1, 900)];
        let own = Some(leases[1].subnet);
        let v = node_views(&leases, &reports, own, 1_000);
        assert_eq!(v.len(), 3);
        assert_eq!(v[0].public_ip, "198.18.0.1");
        assert_eq!(v[0].last_seen_secs, Some(100));
        assert_eq!(v[0].modules.len(), 1);
        assert_eq!(v[0].modules[0].name, "m1");
        assert_eq!(v[1].last_seen_secs, Some(50));
        assert_eq!(v[1].modules[0].name, "m2");
        assert!(v[1].lease.own && !v[0].lease.own);
        assert_eq!(v[2].last_seen_secs, None);
        assert!(v[2].modules.is_empty());
    }
}
