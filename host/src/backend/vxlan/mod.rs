//! The `vxlan` backend, flannel's production default. Two data paths share one wire format:
//!
//! - kernel (the default): a VXLAN device `weft.<VNI>` the kernel forwards through, programmed
//!   over netlink by [`kernel`] (device, then per remote lease a neighbour, an FDB entry and an
//!   onlink route, as flannel's); Wasm policy reaches this path through NFQUEUE
//!   ([`crate::nfq`]): only each flow's first packet visits the agent.
//! - userspace (`"Userspace": true`): the `udp` backend's forwarding loop with VXLAN framing
//!   ([`wire`]), so modules see every packet; its packets are what a kernel VXLAN device sends
//!   and accepts, so the two modes (and flannel's nodes) mix in one cluster.
//!
//! Either way the lease's BackendData is flannel's `{"VNI":1,"VtepMAC":"..."}` and the VTEP MAC
//! is kept across restarts ([`mac`]).

pub mod kernel;
pub mod mac;
pub mod plan;
pub mod wire;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::Ipv4Net;
use tokio::sync::{mpsc, watch};

use self::plan::Peer;
use self::wire::Mac;
use super::reconcile::{self, KernelWrites, Work};
use super::{Backend, BackendError, NodeEnv};
use crate::config::NetworkConfig;
use crate::lease::table::TableUpdate;
use crate::lease::Lease;
use crate::packet::route::SharedRoutes;
use crate::stats::DataplaneStats;

/// The `Backend` section's vxlan fields, defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanOptions {
    /// `VNI` (default 1).
    pub vni: u32,
    /// `Port` (default 8472).
    pub port: u16,
    /// `DirectRouting`: plain routes to peers on the same L2 segment.
    pub direct_routing: bool,
    /// `TxChecksumOffload` (default true): false turns it off on the device.
    pub tx_checksum_offload: bool,
    /// `Userspace`: Weft's own forwarding loop instead of the kernel device.
    pub userspace: bool,
    /// `RouteCheckSecs`: the reconcile period.
    pub check: Duration,
}

impl VxlanOptions {
    /// Reads the vxlan fields of `config`'s backend section.
    pub fn from_config(config: &NetworkConfig) -> Result<Self, BackendError> {
        let b = &config.backend;
        let field = |name: &str| BackendError::Config(format!("Backend.{name}"));
        let bool_of = |name: &str, default: bool| -> Result<bool, BackendError> {
            b.bool_field(name)
                .map_err(|e| BackendError::Config(format!("Backend.{name}: {e}")))
                .map(|v| v.unwrap_or(default))
        };
        let vni = match b.u64_field("VNI").map_err(|_| field("VNI must be an integer"))? {
            None => wire::DEFAULT_VNI,
            Some(v) if (1..=u64::from(wire::MAX_VNI)).contains(&v) => v as u32,
            Some(v) => return Err(field(&format!("VNI {v} is out of range (1..={})", wire::MAX_VNI))),
        };
        let port = match b.u64_field("Port").map_err(|_| field("Port must be an integer"))? {
            None => wire::DEFAULT_PORT,
            Some(p) => u16::try_from(p)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| field(&format!("Port {p} is not a UDP port")))?,
        };
        if b.bool_field("GBP").ok().flatten() == Some(true) {
            return Err(field("GBP is not supported by Weft"));
        }
        Ok(VxlanOptions {
            vni,
            port,
            direct_routing: bool_of("DirectRouting", false)?,
            tx_checksum_offload: bool_of("TxChecksumOffload", true)?,
            userspace: bool_of("Userspace", false)?,
            check: super::hostgw::check_period(config)?,
        })
    }

    /// The device name: `weft.<VNI>`, as flannel's `flannel.<VNI>`.
    pub fn device(&self) -> String {
        format!("weft.{}", self.vni)
    }

    /// flannel's `BackendData` for a VTEP with `mac`.
    pub fn backend_data(&self, mac: Mac) -> serde_json::Value {
        serde_json::json!({"VNI": self.vni, "VtepMAC": mac.to_string()})
    }
}

/// The VTEP MAC for this node, kept in the state directory.
pub fn vtep_mac(state_dir: &std::path::Path, device: &str) -> Result<Mac, BackendError> {
    mac::load_or_create(&mac::path(state_dir, device)).map_err(|e| BackendError::Config(e.to_string()))
}

/// A lease as a VXLAN peer, or None (logged) when it cannot be one.
pub fn peer_of(l: &Lease, vni: u32) -> Option<Peer> {
    Peer::from_lease(l, vni)
        .map_err(|e| tracing::warn!(error = %e, "lease is not reachable over VXLAN; skipped"))
        .ok()
}

/// How the userspace VXLAN path reads a lease into a route: with the peer's VTEP MAC.
pub fn route_entry(vni: u32) -> crate::packet::route::EntryOf {
    Arc::new(move |l: &Lease| crate::packet::route::RouteEntry {
        subnet: l.subnet,
        public_ip: l.attrs.public_ip,
        vtep: Peer::from_lease(l, vni).ok().map(|p| p.mac),
    })
}

/// The kernel `vxlan` backend.
pub struct VxlanBackend {
    opts: VxlanOptions,
    node: NodeEnv,
    mac: Mac,
    mtu: u32,
    routes: SharedRoutes,
    work: mpsc::UnboundedSender<Work<Peer>>,
    work_rx: std::sync::Mutex<Option<mpsc::UnboundedReceiver<Work<Peer>>>>,
    applied: watch::Sender<u64>,
    writes: Arc<KernelWrites>,
    stats: Arc<DataplaneStats>,
}

impl VxlanBackend {
    /// A backend for `config` on `node`; the VTEP MAC is read (or made) in the node's state dir.
    pub fn new(node: &NodeEnv, opts: VxlanOptions, routes: SharedRoutes) -> Result<Self, BackendError> {
        let mtu = node.overlay_mtu(wire::OVERHEAD)?;
        let mac = vtep_mac(&node.state_dir, &opts.device())?;
        let (work, rx) = mpsc::unbounded_channel();
        Ok(VxlanBackend {
            mtu,
            mac,
            node: node.clone(),
            routes,
            work,
            work_rx: std::sync::Mutex::new(Some(rx)),
            applied: watch::channel(0).0,
            writes: Arc::default(),
            stats: Arc::new(DataplaneStats::default()),
            opts,
        })
    }
}

impl Backend for VxlanBackend {
    fn kind(&self) -> &'static str {
        "vxlan"
    }

    fn backend_data(&self) -> serde_json::Value {
        self.opts.backend_data(self.mac)
    }

    fn mtu(&self) -> u32 {
        self.mtu
    }

    fn start(&self, own: &Lease) -> Result<(), BackendError> {
        let (rt, handle) = super::netlink::connect(self.kind())?;
        let spec = kernel::DeviceSpec {
            name: self.opts.device(),
            vni: self.opts.vni,
            port: self.opts.port,
            local: self.node.public_ip,
            underlay: self.node.iface.clone(),
            mtu: self.mtu,
            mac: self.mac,
            tx_checksum_offload: self.opts.tx_checksum_offload,
        };
        let address = own.subnet.network();
        // The device must exist before the node says it is ready: a failure here is the
        // operator's to see at start, not a warning in a retry loop. An existing device with
        // the right settings is adopted as it is, entries and all.
        let first = tokio::task::block_in_place(|| rt.block_on(kernel::ensure_device(&handle, &spec, address)));
        if let Err(e) = first {
            return Err(BackendError::Config(format!(
                "cannot set up VXLAN device {}: {e}",
                spec.name
            )));
        }
        tracing::info!(device = %spec.name, vni = self.opts.vni, port = self.opts.port, mac = %self.mac, mtu = self.mtu,
            direct_routing = self.opts.direct_routing, check_secs = self.opts.check.as_secs(), "vxlan backend up (kernel data path)");
        let rx = self
            .work_rx
            .lock()
            .ok()
            .and_then(|mut r| r.take())
            .ok_or_else(|| BackendError::Config("the vxlan backend was started twice".into()))?;
        let k = kernel::VxlanKernel::new(handle, spec, address, self.opts.direct_routing, self.writes.clone());
        rt.spawn(reconcile::drive(
            k,
            rx,
            self.applied.clone(),
            self.opts.check,
            self.stats.clone(),
        ));
        Ok(())
    }

    fn apply(&self, update: &TableUpdate) {
        self.routes.apply(update, self.node.public_ip);
        let vni = self.opts.vni;
        // The receiver lives as long as the data path; once it stopped there is nothing to do.
        let _ = self.work.send(reconcile::work(update, |l| peer_of(l, vni)));
    }

    fn applied(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    fn kernel_writes(&self) -> Option<Arc<KernelWrites>> {
        Some(self.writes.clone())
    }

    fn routes(&self) -> Vec<(Ipv4Net, Ipv4Addr)> {
        self.routes.routes()
    }

    fn stats(&self) -> Arc<DataplaneStats> {
        self.stats.clone()
    }

    fn kernel_path(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(backend: &str) -> Result<VxlanOptions, BackendError> {
        let c = NetworkConfig::parse(&format!(r#"{{"Network":"10.244.0.0/16","Backend":{backend}}}"#)).unwrap();
        VxlanOptions::from_config(&c)
    }

    #[test]
    fn flannel_defaults() {
        let o = opts(r#"{"Type":"vxlan"}"#).unwrap();
        assert_eq!(
            (o.vni, o.port, o.direct_routing, o.tx_checksum_offload, o.userspace),
            (1, 8472, false, true, false)
        );
        assert_eq!(o.device(), "weft.1");
        assert_eq!(o.check, super::super::hostgw::DEFAULT_CHECK);
        assert_eq!(
            o.backend_data(Mac([2, 0, 0, 0, 0, 9])),
            serde_json::json!({"VNI": 1, "VtepMAC": "02:00:00:00:00:09"})
        );
    }

    #[test]
    fn fields_are_read_and_checked() {
        let o = opts(r#"{"Type":"vxlan","VNI":42,"Port":4789,"DirectRouting":true,"TxChecksumOffload":false,"Userspace":true,"RouteCheckSecs":2}"#).unwrap();
        assert_eq!(
            (o.vni, o.port, o.direct_routing, o.tx_checksum_offload, o.userspace),
            (42, 4789, true, false, true)
        );
        assert_eq!(o.check, Duration::from_secs(2));
        for bad in [
            r#"{"Type":"vxlan","VNI":0}"#,
            r#"{"Type":"vxlan","VNI":16777216}"#,
            r#"{"Type":"vxlan","Port":70000}"#,
            r#"{"Type":"vxlan","DirectRouting":"yes"}"#,
            r#"{"Type":"vxlan","GBP":true}"#,
            r#"{"Type":"vxlan","RouteCheckSecs":0}"#,
        ] {
            assert!(opts(bad).is_err(), "{bad}");
        }
    }
}
