//! What the kernel must hold for a lease table, sans I/O: per remote lease, flannel's three
//! entries on the VXLAN device (neighbour `<subnet>.0 -> VtepMAC`, FDB `VtepMAC -> PublicIP`,
//! route `<subnet> via <subnet>.0 onlink`), or with DirectRouting a plain route via the peer
//! when it shares the underlay's L2 segment.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use super::wire::Mac;
use crate::backend::netlink::{on_link, KernelRoute};
use crate::lease::Lease;

/// A remote node as a VXLAN peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The peer's subnet.
    pub subnet: Ipv4Net,
    /// Where its VTEP is reached.
    pub public_ip: Ipv4Addr,
    /// Its VTEP MAC (`BackendData.VtepMAC`).
    pub mac: Mac,
}

/// Why a lease cannot be a VXLAN peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    #[error("lease {subnet} runs backend {kind:?}, not vxlan")]
    OtherBackend { subnet: Ipv4Net, kind: String },
    #[error("lease {subnet} has no usable BackendData.VtepMAC")]
    NoMac { subnet: Ipv4Net },
    #[error("lease {subnet} uses VNI {vni}, this node {ours}")]
    OtherVni { subnet: Ipv4Net, vni: u64, ours: u32 },
}

impl Peer {
    /// Reads a lease's vxlan BackendData (`{"VNI":1,"VtepMAC":"..."}`, as flannel writes it).
    pub fn from_lease(l: &Lease, vni: u32) -> Result<Peer, PeerError> {
        if !l.attrs.backend_type.eq_ignore_ascii_case("vxlan") {
            return Err(PeerError::OtherBackend {
                subnet: l.subnet,
                kind: l.attrs.backend_type.clone(),
            });
        }
        let data = &l.attrs.backend_data;
        let field = |name: &str| {
            data.as_object()
                .and_then(|m| m.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)))
                .map(|(_, v)| v)
        };
        if let Some(v) = field("VNI").and_then(|v| v.as_u64()) {
            if v != u64::from(vni) {
                return Err(PeerError::OtherVni {
                    subnet: l.subnet,
                    vni: v,
                    ours: vni,
                });
            }
        }
        let mac = field("VtepMAC")
            .and_then(|v| v.as_str())
            .and_then(|s| s.parse::<Mac>().ok())
            .filter(|m| m.0[0] & 1 == 0 && m.0 != [0; 6])
            .ok_or(PeerError::NoMac { subnet: l.subnet })?;
        Ok(Peer {
            subnet: l.subnet,
            public_ip: l.attrs.public_ip,
            mac,
        })
    }
}

/// Everything the kernel should hold for the current peers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// Permanent neighbours on the VXLAN device: gateway address -> VTEP MAC.
    pub neighbours: Vec<(Ipv4Addr, Mac)>,
    /// Permanent FDB entries on the VXLAN device: VTEP MAC -> PublicIP.
    pub fdb: Vec<(Mac, Ipv4Addr)>,
    /// Weft's routes (on the VXLAN device, or on the underlay with DirectRouting).
    pub routes: Vec<KernelRoute>,
}

/// The entries for `peers`. `device`/`underlay` are interface indexes; `direct` holds the
/// underlay's networks when DirectRouting is on.
pub fn desired(peers: &[Peer], device: u32, underlay: u32, direct: Option<&[Ipv4Net]>) -> Desired {
    let mut d = Desired::default();
    for p in peers {
        if direct.is_some_and(|nets| on_link(p.public_ip, nets)) {
            d.routes.push(KernelRoute {
                dst: p.subnet,
                via: p.public_ip,
                dev: underlay,
                onlink: false,
            });
            continue;
        }
        let gw = p.subnet.network();
        d.neighbours.push((gw, p.mac));
        if !d.fdb.contains(&(p.mac, p.public_ip)) {
            d.fdb.push((p.mac, p.public_ip));
        }
        d.routes.push(KernelRoute {
            dst: p.subnet,
            via: gw,
            dev: device,
            onlink: true,
        });
    }
    d
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::lease::LeaseAttrs;

    fn lease(subnet: &str, ip: &str, kind: &str, data: serde_json::Value) -> Lease {
        Lease {
            subnet: subnet.parse().unwrap(),
            attrs: LeaseAttrs::new(ip.parse().unwrap(), kind, data),
            expiration: SystemTime::now(),
            revision: 1,
            ttl_handle: 0,
        }
    }

    #[test]
    fn reads_flannels_backend_data() {
        let l = lease(
            "10.244.2.0/24",
            "198.18.0.12",
            "vxlan",
            serde_json::json!({"VNI": 1, "VtepMAC": "0a:58:0a:f4:02:00"}),
        );
        let p = Peer::from_lease(&l, 1).unwrap();
        assert_eq!(p.mac.to_string(), "0a:58:0a:f4:02:00");
        assert_eq!(p.public_ip, "198.18.0.12".parse::<Ipv4Addr>().unwrap());
        assert!(matches!(
            Peer::from_lease(&l, 7),
            Err(PeerError::OtherVni { vni: 1, .. })
        ));
        let udp = lease("10.244.3.0/24", "198.18.0.13", "udp", serde_json::Value::Null);
        assert!(matches!(Peer::from_lease(&udp, 1), Err(PeerError::OtherBackend { .. })));
        for bad in [
            serde_json::json!({"VNI": 1}),
            serde_json::json!({"VtepMAC": "nonsense"}),
            serde_json::json!({"VtepMAC": "01:00:5e:00:00:01"}),
            serde_json::json!("VtepMAC"),
        ] {
            let l = lease("10.244.4.0/24", "198.18.0.14", "vxlan", bad.clone());
            assert!(matches!(Peer::from_lease(&l, 1), Err(PeerError::NoMac { .. })), "{bad}");
        }
    }

    fn peer(subnet: &str, ip: &str, last: u8) -> Peer {
        Peer {
            subnet: subnet.parse().unwrap(),
            public_ip: ip.parse().unwrap(),
            mac: Mac([0x02, 0, 0, 0, 0, last]),
        }
    }

    #[test]
    fn three_entries_per_peer_in_flannels_shape() {
        let d = desired(
            &[
                peer("10.244.2.0/24", "198.18.0.12", 2),
                peer("10.244.3.0/24", "198.18.0.13", 3),
            ],
            7,
            2,
            None,
        );
        assert_eq!(
            d.neighbours,
            vec![
                ("10.244.2.0".parse().unwrap(), Mac([2, 0, 0, 0, 0, 2])),
                ("10.244.3.0".parse().unwrap(), Mac([2, 0, 0, 0, 0, 3]))
            ]
        );
        assert_eq!(d.fdb[1], (Mac([2, 0, 0, 0, 0, 3]), "198.18.0.13".parse().unwrap()));
        assert_eq!(
            d.routes[0],
            KernelRoute {
                dst: "10.244.2.0/24".parse().unwrap(),
                via: "10.244.2.0".parse().unwrap(),
                dev: 7,
                onlink: true
            }
        );
    }

    #[test]
    fn direct_routing_skips_the_tunnel_for_l2_neighbours_only() {
        let nets = ["198.18.0.0/24".parse().unwrap()];
        let d = desired(
            &[
                peer("10.244.2.0/24", "198.18.0.12", 2),
                peer("10.244.3.0/24", "203.0.113.9", 3),
            ],
            7,
            2,
            Some(&nets),
        );
        assert_eq!(
            d.routes[0],
            KernelRoute {
                dst: "10.244.2.0/24".parse().unwrap(),
                via: "198.18.0.12".parse().unwrap(),
                dev: 2,
                onlink: false
            }
        );
        assert_eq!(d.neighbours.len(), 1, "only the off-segment peer goes through VXLAN");
        assert_eq!(d.routes[1].dev, 7);
    }
}
