//! The overlay routing table: which node (PublicIP) owns which subnet, built from leases.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use arc_swap::ArcSwap;
use ipnet::Ipv4Net;

use super::vxlan::wire::Mac;
use crate::lease::Lease;

/// How an inner source address relates to the node a datagram came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceCheck {
    /// The sender holds a lease and the source lies in one of its subnets.
    Owned,
    /// The datagram came from an address that holds no lease.
    UnknownPeer,
    /// The sender holds a lease, but not on the source address.
    Spoofed,
}

/// Traffic with one peer node. Shared by the route tables that come and go as leases change,
/// so counts survive a table swap.
#[derive(Debug, Default)]
pub struct PeerCounters {
    /// Packets sent to the peer.
    pub tx_packets: AtomicU64,
    /// Inner bytes sent to the peer.
    pub tx_bytes: AtomicU64,
    /// Packets from the peer delivered here.
    pub rx_packets: AtomicU64,
    /// Inner bytes from the peer delivered here.
    pub rx_bytes: AtomicU64,
}

/// Remote subnets and their owners. Every subnet of one Network has the same length, so a
/// lookup is a mask and a hash probe.
#[derive(Debug, Clone)]
pub struct RouteTable {
    network: Ipv4Net,
    mask: u32,
    own: Option<Ipv4Net>,
    by_subnet: HashMap<u32, Ipv4Addr>,
    by_peer: HashMap<Ipv4Addr, Vec<Ipv4Net>>,
    counters: HashMap<Ipv4Addr, Arc<PeerCounters>>,
    vteps: HashMap<Ipv4Addr, Mac>,
}

impl RouteTable {
    /// An empty table for `network` split into `/subnet_len` subnets; `own` is never routed.
    pub fn new(network: Ipv4Net, subnet_len: u8, own: Option<Ipv4Net>) -> Self {
        RouteTable {
            network,
            mask: if subnet_len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(subnet_len))
            },
            own,
            by_subnet: HashMap::new(),
            by_peer: HashMap::new(),
            counters: HashMap::new(),
            vteps: HashMap::new(),
        }
    }

    /// A table holding every lease except our own and those outside the network.
    pub fn from_leases<'a>(
        network: Ipv4Net,
        subnet_len: u8,
        own: Option<Ipv4Net>,
        leases: impl IntoIterator<Item = &'a Lease>,
    ) -> Self {
        let mut t = RouteTable::new(network, subnet_len, own);
        for l in leases {
            t.insert(l.subnet, l.attrs.public_ip);
        }
        t
    }

    /// Adds a route to `subnet` via the node at `public_ip`.
    pub fn insert(&mut self, subnet: Ipv4Net, public_ip: Ipv4Addr) {
        if Some(subnet) == self.own || !self.network.contains(&subnet) || u32::from(subnet.netmask()) != self.mask {
            return;
        }
        self.by_subnet.insert(u32::from(subnet.network()), public_ip);
        self.by_peer.entry(public_ip).or_default().push(subnet);
    }

    /// The PublicIP of the node owning `dst`, if any.
    #[inline]
    pub fn lookup(&self, dst: Ipv4Addr) -> Option<Ipv4Addr> {
        self.by_subnet.get(&(u32::from(dst) & self.mask)).copied()
    }

    /// The leased subnet holding `a` and its owner, as (network, prefix length, PublicIP).
    #[inline]
    pub fn subnet_of(&self, a: Ipv4Addr) -> Option<(Ipv4Addr, u8, Ipv4Addr)> {
        let net = u32::from(a) & self.mask;
        self.by_subnet
            .get(&net)
            .map(|node| (Ipv4Addr::from(net), self.mask.count_ones() as u8, *node))
    }

    /// Whether a node with this PublicIP holds a lease in the table.
    pub fn is_node(&self, public_ip: Ipv4Addr) -> bool {
        self.by_peer.contains_key(&public_ip)
    }

    /// Whether `src` is a legitimate inner source for a datagram sent by `peer`.
    #[inline]
    pub fn check_source(&self, peer: Ipv4Addr, src: Ipv4Addr) -> SourceCheck {
        match self.by_peer.get(&peer) {
            None => SourceCheck::UnknownPeer,
            Some(nets) if nets.iter().any(|n| n.contains(&src)) => SourceCheck::Owned,
            Some(_) => SourceCheck::Spoofed,
        }
    }

    /// The cluster network.
    pub fn network(&self) -> Ipv4Net {
        self.network
    }

    /// Number of remote subnets routed.
    pub fn len(&self) -> usize {
        self.by_subnet.len()
    }

    /// True when no remote subnet is routed.
    pub fn is_empty(&self) -> bool {
        self.by_subnet.is_empty()
    }

    /// Attaches each peer's counters from `registry` (creating missing ones) and drops the
    /// registry's entries for peers that are gone.
    pub fn attach_counters(&mut self, registry: &mut HashMap<Ipv4Addr, Arc<PeerCounters>>) {
        registry.retain(|ip, _| self.by_peer.contains_key(ip));
        for ip in self.by_peer.keys() {
            let c = registry.entry(*ip).or_default().clone();
            self.counters.insert(*ip, c);
        }
    }

    /// Records the VTEP MAC of a routed peer (VXLAN framing needs it).
    pub fn set_vtep(&mut self, peer: Ipv4Addr, mac: Mac) {
        if self.by_peer.contains_key(&peer) {
            self.vteps.insert(peer, mac);
        }
    }

    /// The VTEP MAC of a peer, if it published one.
    #[inline]
    pub fn vtep(&self, peer: Ipv4Addr) -> Option<Mac> {
        self.vteps.get(&peer).copied()
    }

    /// The counters of a peer, if it is routed.
    #[inline]
    pub fn counters(&self, peer: Ipv4Addr) -> Option<&PeerCounters> {
        self.counters.get(&peer).map(|c| &**c)
    }

    /// Every route, as (subnet, PublicIP), sorted by subnet.
    pub fn routes(&self) -> Vec<(Ipv4Net, Ipv4Addr)> {
        let mut v: Vec<_> = self
            .by_peer
            .iter()
            .flat_map(|(ip, nets)| nets.iter().map(move |n| (*n, *ip)))
            .collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn table() -> RouteTable {
        let mut t = RouteTable::new(
            "10.244.0.0/16".parse().unwrap(),
            24,
            Some("10.244.1.0/24".parse().unwrap()),
        );
        t.insert("10.244.1.0/24".parse().unwrap(), a("198.18.0.1"));
        t.insert("10.244.2.0/24".parse().unwrap(), a("198.18.0.2"));
        t.insert("10.244.3.0/24".parse().unwrap(), a("198.18.0.3"));
        t.insert("10.9.3.0/24".parse().unwrap(), a("198.18.0.4"));
        t
    }

    #[test]
    fn lookup_masks_the_destination() {
        let t = table();
        assert_eq!(t.lookup(a("10.244.2.77")), Some(a("198.18.0.2")));
        assert_eq!(t.lookup(a("10.244.3.1")), Some(a("198.18.0.3")));
        assert_eq!(t.lookup(a("10.244.1.5")), None, "own subnet is never routed");
        assert_eq!(t.lookup(a("10.244.4.5")), None);
        assert_eq!(t.lookup(a("10.9.3.1")), None, "outside the network");
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn source_check_distinguishes_strangers_from_spoofers() {
        let t = table();
        assert_eq!(t.check_source(a("198.18.0.2"), a("10.244.2.9")), SourceCheck::Owned);
        assert_eq!(t.check_source(a("198.18.0.2"), a("10.244.3.9")), SourceCheck::Spoofed);
        assert_eq!(t.check_source(a("198.18.0.2"), a("8.8.8.8")), SourceCheck::Spoofed);
        assert_eq!(
            t.check_source(a("198.18.0.99"), a("10.244.2.9")),
            SourceCheck::UnknownPeer
        );
    }
}

/// The route table a backend publishes: replaced whole on every lease change, read without
/// locks by the forwarding threads and the admin API. Every backend keeps one.
#[derive(Debug, Clone)]
pub struct SharedRoutes {
    network: Ipv4Net,
    subnet_len: u8,
    table: Arc<ArcSwap<RouteTable>>,
}

impl SharedRoutes {
    /// An empty table for `network`, cut into subnets of length `subnet_len`.
    pub fn new(network: Ipv4Net, subnet_len: u8) -> Self {
        SharedRoutes {
            network,
            subnet_len,
            table: Arc::new(ArcSwap::from_pointee(RouteTable::new(network, subnet_len, None))),
        }
    }

    /// The cluster network.
    pub fn network(&self) -> Ipv4Net {
        self.network
    }

    /// A table of `leases` other than `own`, for the caller to complete and [`publish`](Self::publish).
    pub fn build<'a>(&self, own: Ipv4Net, leases: impl IntoIterator<Item = &'a Lease>) -> RouteTable {
        RouteTable::from_leases(self.network, self.subnet_len, Some(own), leases)
    }

    /// Makes `t` the table every reader sees from now on.
    pub fn publish(&self, t: RouteTable) {
        self.table.store(Arc::new(t));
    }

    /// The current table.
    pub fn load(&self) -> arc_swap::Guard<Arc<RouteTable>> {
        self.table.load()
    }

    /// The current (subnet, next hop) pairs.
    pub fn routes(&self) -> Vec<(Ipv4Net, Ipv4Addr)> {
        self.table.load().routes()
    }
}
