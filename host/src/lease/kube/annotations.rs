//! A node's lease as flannel's Kubernetes subnet manager keeps it: the subnet is the node's
//! `spec.podCIDR`, everything else is annotations under one prefix
//! (`flannel.alpha.coreos.com/` by default). Pure code over the Node object, so flannel nodes
//! and Weft nodes read each other's leases, and what Weft writes is byte-for-byte what flannel
//! writes (its `pkg/subnet/kube/annotations.go` and `kube.go`).

use std::net::Ipv4Addr;
use std::time::SystemTime;

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Node;
use serde_json::{json, Map, Value};

use super::super::{Lease, LeaseAttrs, DEFAULT_TTL};

/// The annotation keys under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    /// `<prefix>/kube-subnet-manager`: "true" on nodes whose agent took its lease this way.
    pub subnet_manager: String,
    /// `<prefix>/backend-type`.
    pub backend_type: String,
    /// `<prefix>/backend-data`: the backend's JSON, as a string.
    pub backend_data: String,
    /// `<prefix>/public-ip`: where peers send to.
    pub public_ip: String,
    /// `<prefix>/public-ip-overwrite`: set by an operator to replace the address published.
    pub public_ip_overwrite: String,
}

impl Keys {
    /// The keys under `prefix` (flannel appends the `/` when it is missing).
    pub fn new(prefix: &str) -> Keys {
        let p = prefix.trim_end_matches('/');
        let k = |s: &str| format!("{p}/{s}");
        Keys {
            subnet_manager: k("kube-subnet-manager"),
            backend_type: k("backend-type"),
            backend_data: k("backend-data"),
            public_ip: k("public-ip"),
            public_ip_overwrite: k("public-ip-overwrite"),
        }
    }
}

/// The node's IPv4 pod CIDR: `spec.podCIDR`, else the first IPv4 one of `spec.podCIDRs`
/// (dual-stack clusters list both families there).
pub fn pod_cidr(node: &Node) -> Option<Ipv4Net> {
    let spec = node.spec.as_ref()?;
    let first = spec.pod_cidr.iter();
    let rest = spec.pod_cidrs.iter().flatten();
    first
        .chain(rest)
        .find_map(|c| c.parse::<Ipv4Net>().ok())
        .map(|n| n.trunc())
}

/// The node's name.
pub fn name(node: &Node) -> &str {
    node.metadata.name.as_deref().unwrap_or("")
}

fn annotation<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
    node.metadata.annotations.as_ref()?.get(key).map(String::as_str)
}

/// The lease node `node` publishes, if it publishes one: only nodes annotated
/// `kube-subnet-manager: "true"`, with a pod CIDR and a readable public IP, are leases (as in
/// flannel: a node whose agent has not started yet is not routed to). Its revision is the
/// object's resourceVersion when that is a number (it is on every API server backed by etcd).
pub fn lease_of(node: &Node, keys: &Keys) -> Option<Lease> {
    if annotation(node, &keys.subnet_manager) != Some("true") {
        return None;
    }
    let subnet = pod_cidr(node)?;
    let public_ip: Ipv4Addr = annotation(node, &keys.public_ip)?.trim().parse().ok()?;
    let backend_type = annotation(node, &keys.backend_type).unwrap_or("").to_string();
    let backend_data = annotation(node, &keys.backend_data)
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or(Value::Null);
    let revision = node
        .metadata
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Some(Lease {
        subnet,
        attrs: LeaseAttrs::new(public_ip, &backend_type, backend_data),
        // Kubernetes leases do not expire: the node object is the lease. A day ahead keeps the
        // keeper's renewal (a re-publish of the annotations) daily, as flannel's resync heals.
        expiration: SystemTime::now() + DEFAULT_TTL,
        revision,
        ttl_handle: 0,
    })
}

/// The address a node publishes: the operator's `public-ip-overwrite` when it holds an
/// address, else the agent's own.
pub fn published_ip(node: &Node, keys: &Keys, own: Ipv4Addr) -> Ipv4Addr {
    annotation(node, &keys.public_ip_overwrite)
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(own)
}

/// The strategic-merge patch that publishes `attrs` on a node, as flannel sends it:
/// `backend-data` is the backend's JSON serialised into a string (`null` when it has none).
pub fn publish_patch(keys: &Keys, attrs: &LeaseAttrs, public_ip: Ipv4Addr) -> Value {
    let data = serde_json::to_string(&attrs.backend_data).unwrap_or_else(|_| "null".into());
    let mut a = Map::new();
    a.insert(keys.subnet_manager.clone(), json!("true"));
    a.insert(keys.backend_data.clone(), json!(data));
    a.insert(keys.backend_type.clone(), json!(attrs.backend_type));
    a.insert(keys.public_ip.clone(), json!(public_ip.to_string()));
    json!({ "metadata": { "annotations": a } })
}

/// Whether `node` already carries exactly what [`publish_patch`] would write (a restart then
/// writes nothing).
pub fn already_published(node: &Node, keys: &Keys, attrs: &LeaseAttrs, public_ip: Ipv4Addr) -> bool {
    let patch = publish_patch(keys, attrs, public_ip);
    let Some(want) = patch["metadata"]["annotations"].as_object() else {
        return false;
    };
    want.iter().all(|(k, v)| annotation(node, k) == v.as_str())
}

/// The JSON merge patch that withdraws a node's lease: every annotation of ours removed.
pub fn withdraw_patch(keys: &Keys) -> Value {
    let mut a = Map::new();
    for k in [
        &keys.subnet_manager,
        &keys.backend_data,
        &keys.backend_type,
        &keys.public_ip,
    ] {
        a.insert(k.clone(), Value::Null);
    }
    json!({ "metadata": { "annotations": a } })
}

/// The status patch flannel sends once its network is up: condition `NetworkUnavailable`
/// false, merged into `status.conditions` by its `type` key.
pub fn network_up_patch(now: &str) -> Value {
    json!({
        "status": {
            "conditions": [{
                "type": "NetworkUnavailable",
                "status": "False",
                "reason": "FlannelIsUp",
                "message": "Flannel is running on this node",
                "lastTransitionTime": now,
                "lastHeartbeatTime": now,
            }]
        }
    })
}

/// RFC 3339 in UTC with seconds, as Kubernetes writes times (chrono, as k8s-openapi's `Time`).
pub fn rfc3339(t: SystemTime) -> String {
    use k8s_openapi::chrono::{DateTime, SecondsFormat, Utc};
    DateTime::<Utc>::from(t).to_rfc3339_opts(SecondsFormat::Secs, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node exactly as kube-flannel v0.26 leaves it (vxlan), annotations copied from a
    /// flannel node's `kubectl get node -o json`.
    fn flannel_node() -> Node {
        serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": "worker-1",
                "resourceVersion": "4711",
                "annotations": {
                    "flannel.alpha.coreos.com/backend-data": "{\"VNI\":1,\"VtepMAC\":\"6a:3f:0e:21:9c:10\"}",
                    "flannel.alpha.coreos.com/backend-type": "vxlan",
                    "flannel.alpha.coreos.com/kube-subnet-manager": "true",
                    "flannel.alpha.coreos.com/public-ip": "192.168.56.11",
                    "node.alpha.kubernetes.io/ttl": "0"
                }
            },
            "spec": { "podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"] }
        }))
        .unwrap()
    }

    #[test]
    fn reads_a_flannel_node() {
        let l = lease_of(&flannel_node(), &Keys::new("flannel.alpha.coreos.com")).unwrap();
        assert_eq!(l.subnet, "10.244.1.0/24".parse::<Ipv4Net>().unwrap());
        assert_eq!(l.attrs.public_ip, Ipv4Addr::new(192, 168, 56, 11));
        assert_eq!(l.attrs.backend_type, "vxlan");
        assert_eq!(l.attrs.backend_data, json!({"VNI":1,"VtepMAC":"6a:3f:0e:21:9c:10"}));
        assert_eq!(l.revision, 4711);
    }

    #[test]
    fn nodes_without_the_marker_or_cidr_are_not_leases() {
        let keys = Keys::new("flannel.alpha.coreos.com/");
        let mut n = flannel_node();
        n.metadata
            .annotations
            .as_mut()
            .unwrap()
            .remove("flannel.alpha.coreos.com/kube-subnet-manager");
        assert!(lease_of(&n, &keys).is_none());
        let mut n = flannel_node();
        n.spec = None;
        assert!(lease_of(&n, &keys).is_none());
        assert!(
            lease_of(&flannel_node(), &Keys::new("example.com")).is_none(),
            "other prefix"
        );
    }

    #[test]
    fn dual_stack_takes_the_ipv4_cidr() {
        let mut n = flannel_node();
        let spec = n.spec.as_mut().unwrap();
        spec.pod_cidr = Some("fd00:10:244:1::/64".into());
        spec.pod_cidrs = Some(vec!["fd00:10:244:1::/64".into(), "10.244.7.0/24".into()]);
        assert_eq!(pod_cidr(&n), Some("10.244.7.0/24".parse().unwrap()));
    }

    #[test]
    fn what_weft_publishes_is_what_flannel_reads() {
        let keys = Keys::new("flannel.alpha.coreos.com");
        let attrs = LeaseAttrs::new(
            Ipv4Addr::new(192, 168, 56, 11),
            "vxlan",
            json!({"VNI":1,"VtepMAC":"6a:3f:0e:21:9c:10"}),
        );
        let patch = publish_patch(&keys, &attrs, attrs.public_ip);
        let want = &flannel_node().metadata.annotations.unwrap();
        for (k, v) in patch["metadata"]["annotations"].as_object().unwrap() {
            assert_eq!(Some(v.as_str().unwrap()), want.get(k).map(String::as_str), "{k}");
        }
        assert!(already_published(&flannel_node(), &keys, &attrs, attrs.public_ip));
        let moved = Ipv4Addr::new(192, 168, 56, 99);
        assert!(!already_published(&flannel_node(), &keys, &attrs, moved));
    }

    #[test]
    fn the_overwrite_wins_when_it_is_an_address() {
        let keys = Keys::new("flannel.alpha.coreos.com");
        let mut n = flannel_node();
        let own = Ipv4Addr::new(10, 0, 0, 5);
        assert_eq!(published_ip(&n, &keys, own), own);
        let a = n.metadata.annotations.as_mut().unwrap();
        a.insert(keys.public_ip_overwrite.clone(), "203.0.113.9".into());
        assert_eq!(published_ip(&n, &keys, own), Ipv4Addr::new(203, 0, 113, 9));
        let a = n.metadata.annotations.as_mut().unwrap();
        a.insert(keys.public_ip_overwrite.clone(), "not-an-ip".into());
        assert_eq!(published_ip(&n, &keys, own), own);
    }

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_796_131_845);
        assert_eq!(rfc3339(t), "2026-12-01T13:30:45Z");
        let leap = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(951_825_600);
        assert_eq!(rfc3339(leap), "2000-02-29T12:00:00Z");
    }
}
