//! What the kernel must hold for a lease table, sans I/O: per remote lease, flannel's three
//! entries on the VXLAN device (neighbour `<subnet>.0 -> VtepMAC`, FDB `VtepMAC -> PublicIP`,
//! route `<subnet> via <subnet>.0 onlink`), or with DirectRouting a plain route via the peer
//! when it shares the underlay's L2 segment.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use super::wire::Mac;
use crate::backend::netlink::{on_link, KernelRoute};
use crate::lease::Lease;

/// A remote node as a VXLAN peer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
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

/// The interfaces (and, with DirectRouting, the underlay's networks) entries are written for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Links {
    /// The VXLAN device's index.
    pub device: u32,
    /// The underlay interface's index.
    pub underlay: u32,
    /// The underlay's networks when DirectRouting is on.
    pub direct: Option<Vec<Ipv4Net>>,
}

/// The kernel entries of one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entries {
    /// Permanent neighbour on the VXLAN device: gateway address -> VTEP MAC.
    pub neighbour: Option<(Ipv4Addr, Mac)>,
    /// Permanent FDB entry on the VXLAN device: VTEP MAC -> PublicIP.
    pub fdb: Option<(Mac, Ipv4Addr)>,
    /// Weft's route (on the VXLAN device, or on the underlay with DirectRouting).
    pub route: KernelRoute,
}

/// flannel's entries for `p`: neighbour, FDB entry and onlink route through the tunnel, or
/// with DirectRouting a plain route via the peer when it shares the underlay's segment.
pub fn entries(p: &Peer, links: &Links) -> Entries {
    if links.direct.as_deref().is_some_and(|nets| on_link(p.public_ip, nets)) {
        return Entries {
            neighbour: None,
            fdb: None,
            route: KernelRoute {
                dst: p.subnet,
                via: p.public_ip,
                dev: links.underlay,
                onlink: false,
            },
        };
    }
    let gw = p.subnet.network();
    Entries {
        neighbour: Some((gw, p.mac)),
        fdb: Some((p.mac, p.public_ip)),
        route: KernelRoute {
            dst: p.subnet,
            via: gw,
            dev: links.device,
            onlink: true,
        },
    }
}

/// Weft's entries of each kind, as the kernel holds them or as the peers want them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntrySet {
    /// Neighbours: (gateway, MAC).
    pub neighbours: HashSet<(Ipv4Addr, Mac)>,
    /// FDB entries: (MAC, PublicIP).
    pub fdb: HashSet<(Mac, Ipv4Addr)>,
    /// Routes.
    pub routes: HashSet<KernelRoute>,
}

impl EntrySet {
    /// What `peers` want.
    pub fn of<'a>(peers: impl IntoIterator<Item = &'a Peer>, links: &Links) -> Self {
        let mut s = EntrySet::default();
        for p in peers {
            let e = entries(p, links);
            s.neighbours.extend(e.neighbour);
            s.fdb.extend(e.fdb);
            s.routes.insert(e.route);
        }
        s
    }
}

/// Netlink writes, run in flannel's order: removals (routes, FDB, neighbours), then additions
/// (neighbours, FDB, routes), so a route never points at a gateway the kernel cannot resolve.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ops {
    /// Routes to delete.
    pub del_routes: Vec<KernelRoute>,
    /// FDB entries to delete.
    pub del_fdb: Vec<(Mac, Ipv4Addr)>,
    /// Neighbours to delete.
    pub del_neighbours: Vec<(Ipv4Addr, Mac)>,
    /// Neighbours to add (or replace).
    pub add_neighbours: Vec<(Ipv4Addr, Mac)>,
    /// FDB entries to add (or replace).
    pub add_fdb: Vec<(Mac, Ipv4Addr)>,
    /// Routes to add (or replace).
    pub add_routes: Vec<KernelRoute>,
}

impl Ops {
    /// The number of writes.
    pub fn len(&self) -> usize {
        self.del_routes.len()
            + self.del_fdb.len()
            + self.del_neighbours.len()
            + self.add_neighbours.len()
            + self.add_fdb.len()
            + self.add_routes.len()
    }

    /// True when the kernel already holds what is wanted.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops deletions an addition overwrites in place (a route to the same subnet, a neighbour
    /// on the same address): replacing never leaves the gap a delete-then-add would.
    fn without_replaced(mut self) -> Self {
        let dsts: HashSet<Ipv4Net> = self.add_routes.iter().map(|r| r.dst).collect();
        self.del_routes.retain(|r| !dsts.contains(&r.dst));
        let gws: HashSet<Ipv4Addr> = self.add_neighbours.iter().map(|n| n.0).collect();
        self.del_neighbours.retain(|n| !gws.contains(&n.0));
        self
    }
}

/// What turns the kernel's `have` into `want`: set differences, O(entries).
pub fn full(want: &EntrySet, have: &EntrySet) -> Ops {
    fn missing<T: Copy + Eq + std::hash::Hash>(w: &HashSet<T>, h: &HashSet<T>) -> Vec<T> {
        w.difference(h).copied().collect()
    }
    Ops {
        del_routes: missing(&have.routes, &want.routes),
        del_fdb: missing(&have.fdb, &want.fdb),
        del_neighbours: missing(&have.neighbours, &want.neighbours),
        add_neighbours: missing(&want.neighbours, &have.neighbours),
        add_fdb: missing(&want.fdb, &have.fdb),
        add_routes: missing(&want.routes, &have.routes),
    }
    .without_replaced()
}

/// How many wanted peers use each FDB entry (one node may lease several subnets, all behind
/// one VTEP): an entry goes only with its last user.
pub type FdbUsers = HashMap<(Mac, Ipv4Addr), u32>;

/// Counts the FDB entries `peers` use.
pub fn fdb_users<'a>(peers: impl IntoIterator<Item = &'a Peer>, links: &Links) -> FdbUsers {
    let mut users = FdbUsers::new();
    for p in peers {
        if let Some(f) = entries(p, links).fdb {
            *users.entry(f).or_default() += 1;
        }
    }
    users
}

/// The writes for subnets whose peer went from `before` to `after`: O(changes), whatever the
/// number of peers. `users` is kept up to date.
pub fn delta(changed: &[(Option<Peer>, Option<Peer>)], links: &Links, users: &mut FdbUsers) -> Ops {
    let mut ops = Ops::default();
    for (before, _) in changed.iter().filter(|(b, a)| b.is_some() && b != a) {
        let Some(p) = before else { continue };
        let e = entries(p, links);
        ops.del_routes.push(e.route);
        ops.del_neighbours.extend(e.neighbour);
        if let Some(f) = e.fdb {
            let n = users.entry(f).or_default();
            *n = n.saturating_sub(1);
            if *n == 0 {
                users.remove(&f);
                ops.del_fdb.push(f);
            }
        }
    }
    for (_, after) in changed.iter().filter(|(b, a)| a.is_some() && b != a) {
        let Some(p) = after else { continue };
        let e = entries(p, links);
        ops.add_neighbours.extend(e.neighbour);
        if let Some(f) = e.fdb {
            let n = users.entry(f).or_default();
            *n += 1;
            if *n == 1 {
                ops.add_fdb.push(f);
            }
            ops.del_fdb.retain(|d| *d != f);
        }
        ops.add_routes.push(e.route);
    }
    ops.without_replaced()
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

    fn links() -> Links {
        Links {
            device: 7,
            underlay: 2,
            direct: None,
        }
    }

    #[test]
    fn three_entries_per_peer_in_flannels_shape() {
        let e = entries(&peer("10.244.2.0/24", "198.18.0.12", 2), &links());
        assert_eq!(
            e.neighbour,
            Some(("10.244.2.0".parse().unwrap(), Mac([2, 0, 0, 0, 0, 2])))
        );
        assert_eq!(e.fdb, Some((Mac([2, 0, 0, 0, 0, 2]), "198.18.0.12".parse().unwrap())));
        assert_eq!(
            e.route,
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
        let l = Links {
            direct: Some(vec!["198.18.0.0/24".parse().unwrap()]),
            ..links()
        };
        let near = entries(&peer("10.244.2.0/24", "198.18.0.12", 2), &l);
        assert_eq!(
            near.route,
            KernelRoute {
                dst: "10.244.2.0/24".parse().unwrap(),
                via: "198.18.0.12".parse().unwrap(),
                dev: 2,
                onlink: false
            }
        );
        assert_eq!((near.neighbour, near.fdb), (None, None));
        let far = entries(&peer("10.244.3.0/24", "203.0.113.9", 3), &l);
        assert_eq!(far.route.dev, 7, "only the off-segment peer goes through VXLAN");
    }

    fn many(n: u32) -> Vec<Peer> {
        (1..=n)
            .map(|i| Peer {
                subnet: Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 | (i << 8)), 24).unwrap(),
                public_ip: Ipv4Addr::from(0xc612_0000 | i),
                mac: Mac([2, 0, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8]),
            })
            .collect()
    }

    /// After a restart the kernel already holds every entry: one full reconcile at 5,000
    /// peers writes nothing.
    #[test]
    fn a_kernel_that_holds_everything_needs_no_write() {
        let peers = many(5_000);
        let want = EntrySet::of(&peers, &links());
        assert_eq!(want.routes.len(), 5_000);
        assert!(full(&want, &want.clone()).is_empty());
        let ops = full(&want, &EntrySet::default());
        assert_eq!(ops.len(), 15_000, "a cold start writes three entries a peer");
        assert!(full(&EntrySet::default(), &want).add_routes.is_empty());
    }

    #[test]
    fn full_removes_strays_and_replaces_moved_entries_in_place() {
        let peers = many(3);
        let want = EntrySet::of(&peers, &links());
        let mut have = want.clone();
        let stray = peer("10.9.9.0/24", "198.18.0.99", 9);
        let se = entries(&stray, &links());
        have.routes.insert(se.route);
        have.fdb.extend(se.fdb);
        have.neighbours.extend(se.neighbour);
        let moved = KernelRoute {
            via: "10.0.1.9".parse().unwrap(),
            ..*want.routes.iter().find(|r| r.dst == peers[0].subnet).unwrap()
        };
        have.routes
            .remove(want.routes.iter().find(|r| r.dst == peers[0].subnet).unwrap());
        have.routes.insert(moved);
        let ops = full(&want, &have);
        assert_eq!(
            ops.del_routes,
            vec![se.route],
            "the moved route is replaced, not deleted first"
        );
        assert_eq!(ops.add_routes.len(), 1);
        assert_eq!((ops.del_fdb.len(), ops.del_neighbours.len()), (1, 1));
    }

    /// One lease change writes the entries it names, whatever the number of peers.
    #[test]
    fn a_change_costs_three_writes_at_any_size() {
        let mut peers = many(5_000);
        let mut users = fdb_users(&peers, &links());
        let new = Peer {
            subnet: "10.250.0.0/24".parse().unwrap(),
            public_ip: "198.19.0.1".parse().unwrap(),
            mac: Mac([2, 9, 9, 9, 9, 9]),
        };
        let ops = delta(&[(None, Some(new.clone()))], &links(), &mut users);
        assert_eq!(
            (ops.add_neighbours.len(), ops.add_fdb.len(), ops.add_routes.len()),
            (1, 1, 1)
        );
        assert_eq!(ops.len(), 3);
        peers.push(new.clone());
        let ops = delta(&[(Some(new), None)], &links(), &mut users);
        assert_eq!(
            (ops.del_routes.len(), ops.del_fdb.len(), ops.del_neighbours.len()),
            (1, 1, 1)
        );
        assert_eq!(ops.len(), 3);
    }

    #[test]
    fn a_shared_fdb_entry_goes_with_its_last_user() {
        let a = peer("10.244.2.0/24", "198.18.0.12", 2);
        let b = peer("10.244.3.0/24", "198.18.0.12", 2);
        let mut users = fdb_users([&a, &b], &links());
        let ops = delta(&[(Some(a.clone()), None)], &links(), &mut users);
        assert!(ops.del_fdb.is_empty(), "b still needs the VTEP");
        let ops = delta(&[(Some(b), None)], &links(), &mut users);
        assert_eq!(ops.del_fdb, vec![(a.mac, a.public_ip)]);
    }

    #[test]
    fn a_peer_that_changed_its_mac_is_rewritten_without_a_gap() {
        let old = peer("10.244.2.0/24", "198.18.0.12", 2);
        let new = peer("10.244.2.0/24", "198.18.0.12", 7);
        let mut users = fdb_users([&old], &links());
        let ops = delta(&[(Some(old.clone()), Some(new.clone()))], &links(), &mut users);
        assert!(ops.del_routes.is_empty() && ops.del_neighbours.is_empty(), "{ops:?}");
        assert_eq!(ops.del_fdb, vec![(old.mac, old.public_ip)]);
        assert_eq!(ops.add_fdb, vec![(new.mac, new.public_ip)]);
        assert!(delta(&[(Some(new.clone()), Some(new))], &links(), &mut users).is_empty());
    }
}
