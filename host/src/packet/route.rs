//! The overlay routing table: which node (PublicIP) owns which subnet, built from leases, and
//! the source check that keeps a node from speaking for another's pods.
//!
//! One [`SharedRoutes`] per node serves everyone who asks "who owns this address": the
//! forwarding threads, the Wasm modules' lease view and the admin API. Readers never lock; a
//! lease change costs what changed, not the table: the table is kept twice (left-right), the
//! change is written into the copy no reader holds, the copies are swapped with one pointer
//! store, and the other copy catches up on the next change.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use super::hash::FastMap;
use ipnet::Ipv4Net;

use super::mac::Mac;
use crate::lease::table::{Changes, TableUpdate};
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

/// Traffic with one peer node. Shared by both copies of the table and kept while the peer
/// holds a lease, so counts survive every table change.
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

/// What the table knows of one peer node.
#[derive(Debug, Clone)]
struct Peer {
    subnets: Vec<Ipv4Net>,
    counters: Arc<PeerCounters>,
    vtep: Option<Mac>,
}

/// Remote subnets and their owners. Every subnet of one Network has the same length, so a
/// lookup is a mask and a hash probe.
#[derive(Debug, Clone)]
pub struct RouteTable {
    network: Ipv4Net,
    mask: u32,
    own: Option<Ipv4Net>,
    local: Option<Ipv4Addr>,
    by_subnet: FastMap<u32, Ipv4Addr>,
    by_peer: FastMap<Ipv4Addr, Peer>,
    /// Bumped by every change of which node owns which subnet that [`SharedRoutes`] swaps in
    /// (a renewal, which changes nothing, is not one): what a reader compares to learn that
    /// answers derived from the table (a wide verdict, say) may be stale.
    generation: u64,
}

/// One route as a lease gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteEntry {
    /// The remote subnet.
    pub subnet: Ipv4Net,
    /// The node that owns it.
    pub public_ip: Ipv4Addr,
    /// That node's VTEP MAC, where the framing needs one.
    pub vtep: Option<Mac>,
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
            local: None,
            by_subnet: FastMap::default(),
            by_peer: FastMap::default(),
            generation: 0,
        }
    }

    /// Which change of the shared table this is (0 for a table never shared).
    #[inline]
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Marks this table as the change after `prev`.
    pub fn follows(&mut self, prev: &RouteTable) {
        self.generation = prev.generation + 1;
    }

    /// Whether `op` would change who owns what in this table.
    fn changed_by(&self, op: &Op) -> bool {
        match *op {
            Op::Insert(e) => {
                self.routable(e.subnet) && self.by_subnet.get(&u32::from(e.subnet.network())) != Some(&e.public_ip)
            }
            Op::Remove(net) => self.by_subnet.contains_key(&u32::from(net.network())),
        }
    }

    /// Names this node: its subnet (never routed, but known to [`subnet_of`](Self::subnet_of))
    /// and its PublicIP.
    pub fn set_local(&mut self, own: Ipv4Net, local: Ipv4Addr) {
        self.own = Some(own);
        self.local = Some(local);
    }

    /// Adds a route to `subnet` via the node at `public_ip`.
    pub fn insert(&mut self, subnet: Ipv4Net, public_ip: Ipv4Addr) {
        self.insert_entry(
            RouteEntry {
                subnet,
                public_ip,
                vtep: None,
            },
            &mut |_| Arc::default(),
        );
    }

    /// Whether `subnet` is one this table routes (inside the network, of its length, not ours).
    fn routable(&self, subnet: Ipv4Net) -> bool {
        Some(subnet) != self.own && self.network.contains(&subnet) && u32::from(subnet.netmask()) == self.mask
    }

    fn insert_entry(&mut self, e: RouteEntry, counters: &mut dyn FnMut(Ipv4Addr) -> Arc<PeerCounters>) {
        if !self.routable(e.subnet) {
            return;
        }
        if let Some(prev) = self.by_subnet.insert(u32::from(e.subnet.network()), e.public_ip) {
            if prev != e.public_ip {
                self.detach(prev, e.subnet);
            }
        }
        let peer = self.by_peer.entry(e.public_ip).or_insert_with(|| Peer {
            subnets: Vec::new(),
            counters: counters(e.public_ip),
            vtep: None,
        });
        if !peer.subnets.contains(&e.subnet) {
            peer.subnets.push(e.subnet);
        }
        if e.vtep.is_some() {
            peer.vtep = e.vtep;
        }
    }

    /// Removes the route to `subnet`; returns the peer if that was its last subnet.
    fn remove(&mut self, subnet: Ipv4Net) -> Option<Ipv4Addr> {
        let ip = self.by_subnet.remove(&u32::from(subnet.network()))?;
        self.detach(ip, subnet)
    }

    fn detach(&mut self, ip: Ipv4Addr, subnet: Ipv4Net) -> Option<Ipv4Addr> {
        let peer = self.by_peer.get_mut(&ip)?;
        peer.subnets.retain(|n| *n != subnet);
        if peer.subnets.is_empty() {
            self.by_peer.remove(&ip);
            return Some(ip);
        }
        None
    }

    /// The PublicIP of the node owning `dst`, if any.
    #[inline]
    pub fn lookup(&self, dst: Ipv4Addr) -> Option<Ipv4Addr> {
        self.by_subnet.get(&(u32::from(dst) & self.mask)).copied()
    }

    /// The leased subnet holding `a` and its owner, as (network, prefix length, PublicIP);
    /// this node's own subnet included.
    #[inline]
    pub fn subnet_of(&self, a: Ipv4Addr) -> Option<(Ipv4Addr, u8, Ipv4Addr)> {
        let net = u32::from(a) & self.mask;
        let len = self.mask.count_ones() as u8;
        if let (Some(own), Some(local)) = (self.own, self.local) {
            if u32::from(own.network()) == net {
                return Some((own.network(), len, local));
            }
        }
        self.by_subnet.get(&net).map(|node| (Ipv4Addr::from(net), len, *node))
    }

    /// Whether a node with this PublicIP holds a lease (this node included).
    pub fn is_node(&self, public_ip: Ipv4Addr) -> bool {
        self.local == Some(public_ip) || self.by_peer.contains_key(&public_ip)
    }

    /// Whether `src` is a legitimate inner source for a datagram sent by `peer`.
    #[inline]
    pub fn check_source(&self, peer: Ipv4Addr, src: Ipv4Addr) -> SourceCheck {
        match self.by_peer.get(&peer) {
            None => SourceCheck::UnknownPeer,
            Some(p) if p.subnets.iter().any(|n| n.contains(&src)) => SourceCheck::Owned,
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

    /// The VTEP MAC of a peer, if it published one.
    #[inline]
    pub fn vtep(&self, peer: Ipv4Addr) -> Option<Mac> {
        self.by_peer.get(&peer).and_then(|p| p.vtep)
    }

    /// The counters of a peer, if it is routed.
    #[inline]
    pub fn counters(&self, peer: Ipv4Addr) -> Option<&PeerCounters> {
        self.by_peer.get(&peer).map(|p| &*p.counters)
    }

    /// Every route, as (subnet, PublicIP), sorted by subnet.
    pub fn routes(&self) -> Vec<(Ipv4Net, Ipv4Addr)> {
        let mut v: Vec<_> = self
            .by_peer
            .iter()
            .flat_map(|(ip, p)| p.subnets.iter().map(move |n| (*n, *ip)))
            .collect();
        v.sort();
        v
    }
}

/// How a backend reads a lease into a route (the VTEP MAC of VXLAN framing, say).
pub type EntryOf = Arc<dyn Fn(&Lease) -> RouteEntry + Send + Sync>;

/// A route change, kept for the copy of the table that has not seen it yet.
#[derive(Debug, Clone, Copy)]
enum Op {
    Insert(RouteEntry),
    Remove(Ipv4Net),
}

struct Writer {
    /// The copy readers held before the last swap, and the changes it lacks.
    spare: Option<Arc<RouteTable>>,
    behind: Vec<Op>,
    /// Each peer's counters, shared by both copies.
    counters: HashMap<Ipv4Addr, Arc<PeerCounters>>,
}

/// The route table every reader shares. See the module documentation.
#[derive(Clone)]
pub struct SharedRoutes {
    network: Ipv4Net,
    subnet_len: u8,
    entry_of: EntryOf,
    live: Arc<ArcSwap<RouteTable>>,
    writer: Arc<Mutex<Writer>>,
    writes: Arc<AtomicU64>,
}

/// How long a writer waits for readers to let go of the spare copy before copying the live one
/// instead. Readers hold a table for one batch of packets: microseconds.
const SPARE_WAIT: Duration = Duration::from_millis(50);

impl SharedRoutes {
    /// An empty table for `network`, cut into subnets of length `subnet_len`; leases read as
    /// plain routes (no VTEP).
    pub fn new(network: Ipv4Net, subnet_len: u8) -> Self {
        Self::with_entries(
            network,
            subnet_len,
            Arc::new(|l: &Lease| RouteEntry {
                subnet: l.subnet,
                public_ip: l.attrs.public_ip,
                vtep: None,
            }),
        )
    }

    /// An empty table whose entries `entry_of` reads from leases.
    pub fn with_entries(network: Ipv4Net, subnet_len: u8, entry_of: EntryOf) -> Self {
        SharedRoutes {
            network,
            subnet_len,
            entry_of,
            live: Arc::new(ArcSwap::from_pointee(RouteTable::new(network, subnet_len, None))),
            writer: Arc::new(Mutex::new(Writer {
                spare: None,
                behind: Vec::new(),
                counters: HashMap::new(),
            })),
            writes: Arc::default(),
        }
    }

    /// The same table, with leases read by `entry_of` from now on (a backend's framing decides).
    pub fn reading_entries(mut self, entry_of: EntryOf) -> Self {
        self.entry_of = entry_of;
        self
    }

    /// The cluster network.
    pub fn network(&self) -> Ipv4Net {
        self.network
    }

    /// The current table.
    #[inline]
    pub fn load(&self) -> arc_swap::Guard<Arc<RouteTable>> {
        self.live.load()
    }

    /// The cell readers load from (the Wasm host holds it).
    pub fn cell(&self) -> Arc<ArcSwap<RouteTable>> {
        self.live.clone()
    }

    /// The current (subnet, next hop) pairs.
    pub fn routes(&self) -> Vec<(Ipv4Net, Ipv4Addr)> {
        self.live.load().routes()
    }

    /// Route entries written so far, both copies counted: what a lease change cost.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Every peer's counters, by PublicIP.
    pub fn peer_counters(&self) -> Vec<(Ipv4Addr, Arc<PeerCounters>)> {
        let mut v: Vec<_> = self
            .writer
            .lock()
            .map(|w| w.counters.iter().map(|(ip, c)| (*ip, c.clone())).collect())
            .unwrap_or_default();
        v.sort_by_key(|(ip, _)| *ip);
        v
    }

    /// Makes the table follow `update`: a snapshot rebuilds both copies, a delta writes only
    /// the subnets it names. `local` is this node's PublicIP.
    pub fn apply(&self, update: &TableUpdate, local: Ipv4Addr) {
        let Ok(mut w) = self.writer.lock() else { return };
        match &update.changes {
            Changes::Snapshot => self.rebuild(&mut w, update, local),
            Changes::Delta(changes) => {
                let ops: Vec<Op> = changes
                    .iter()
                    .flat_map(|c| {
                        let remove = c.before().filter(|o| c.after().is_none_or(|n| n.subnet != o.subnet));
                        remove
                            .map(|o| Op::Remove(o.subnet))
                            .into_iter()
                            .chain(c.after().map(|n| Op::Insert((self.entry_of)(n))))
                    })
                    .collect();
                self.write(&mut w, ops);
            }
        }
    }

    fn rebuild(&self, w: &mut Writer, update: &TableUpdate, local: Ipv4Addr) {
        let mut t = RouteTable::new(self.network, self.subnet_len, None);
        t.follows(&self.live.load());
        t.set_local(update.own, local);
        let mut fresh = HashMap::new();
        for l in update.table.leases() {
            let e = (self.entry_of)(l);
            t.insert_entry(e, &mut |ip| w.counters.get(&ip).cloned().unwrap_or_default());
        }
        for ip in t.by_peer.keys() {
            if let Some(p) = t.by_peer.get(ip) {
                fresh.insert(*ip, p.counters.clone());
            }
        }
        w.counters = fresh;
        self.writes.fetch_add(2 * t.len() as u64, Ordering::Relaxed);
        w.spare = Some(Arc::new(t.clone()));
        w.behind.clear();
        self.live.store(Arc::new(t));
    }

    /// Writes `ops` into the spare copy (after what it lacks), swaps it in, and keeps the
    /// copy readers held as the next spare.
    fn write(&self, w: &mut Writer, ops: Vec<Op>) {
        if ops.is_empty() {
            return;
        }
        let mut spare = match w.spare.take() {
            Some(s) => s,
            None => Arc::new((**self.live.load()).clone()),
        };
        // Readers drop their copy within one batch of packets. One that holds on past the wait
        // costs a copy of the spare (never a wrong answer: what it lacks is applied below).
        let deadline = Instant::now() + SPARE_WAIT;
        while Arc::strong_count(&spare) > 1 && Instant::now() < deadline {
            std::thread::yield_now();
        }
        if Arc::strong_count(&spare) > 1 {
            tracing::debug!("a reader still holds the spare route table; copying it");
        }
        let table = Arc::make_mut(&mut spare);
        let live = self.live.load();
        table.generation = live.generation + u64::from(ops.iter().any(|op| live.changed_by(op)));
        drop(live);
        let mut n = 0u64;
        let counters = &mut w.counters;
        for op in w.behind.iter().chain(ops.iter()) {
            n += 1;
            match *op {
                Op::Insert(e) => table.insert_entry(e, &mut |ip| counters.entry(ip).or_default().clone()),
                Op::Remove(net) => {
                    table.remove(net);
                }
            }
        }
        // Peers without a subnet left lose their counters once the table no longer names them.
        counters.retain(|ip, _| table.by_peer.contains_key(ip));
        self.writes.fetch_add(n, Ordering::Relaxed);
        w.spare = Some(self.live.swap(spare));
        w.behind = ops;
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::lease::table::{Change, LeaseTable};
    use crate::lease::{LeaseAttrs, LeaseEvent};

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

    #[test]
    fn the_own_subnet_is_known_but_not_routed() {
        let mut t = table();
        t.set_local("10.244.1.0/24".parse().unwrap(), a("198.18.0.1"));
        assert_eq!(t.lookup(a("10.244.1.5")), None);
        assert_eq!(
            t.subnet_of(a("10.244.1.5")),
            Some((a("10.244.1.0"), 24, a("198.18.0.1")))
        );
        assert!(t.is_node(a("198.18.0.1")));
        assert!(!t.is_node(a("198.18.0.9")));
    }

    fn lease(i: u32) -> crate::lease::Lease {
        crate::lease::Lease {
            subnet: Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 | (i << 8)), 24).unwrap(),
            attrs: LeaseAttrs::new(Ipv4Addr::from(0xc612_0000 | i), "udp", serde_json::Value::Null),
            expiration: SystemTime::now(),
            revision: 1,
            ttl_handle: 0,
        }
    }

    fn update(generation: u64, table: &LeaseTable, changes: Changes) -> TableUpdate {
        TableUpdate {
            generation,
            own: lease(0).subnet,
            table: table.clone(),
            changes,
        }
    }

    /// A lease change costs the subnets it names, whatever the table's size: 5,000 leases, then
    /// one more, one moved and one gone write 1, 2 and 1 entries into each copy.
    #[test]
    fn a_change_costs_what_changed_not_the_table() {
        let routes = SharedRoutes::new("10.0.0.0/8".parse().unwrap(), 24);
        let mut t = LeaseTable::default();
        t.replace((0..=5_000).map(lease).collect());
        routes.apply(&update(1, &t, Changes::Snapshot), a("198.18.0.0"));
        assert_eq!(routes.load().len(), 5_000, "own lease 0 is not routed");
        assert_eq!(routes.writes(), 10_000, "a snapshot writes both copies once");

        let before = routes.writes();
        let added = t.apply_all([LeaseEvent::Upserted(lease(6_000))]);
        routes.apply(&update(2, &t, Changes::Delta(added)), a("198.18.0.0"));
        assert_eq!(routes.writes() - before, 1);
        assert_eq!(
            routes.load().lookup(a("10.23.112.9")),
            Some(Ipv4Addr::from(0xc612_0000 | 6_000))
        );

        let before = routes.writes();
        let mut moved = lease(7);
        moved.attrs.public_ip = a("198.19.0.7");
        let changes = t.apply_all([LeaseEvent::Upserted(moved), LeaseEvent::Removed(lease(8).subnet)]);
        assert!(matches!(changes[0], Change::Changed { .. }));
        routes.apply(&update(3, &t, Changes::Delta(changes)), a("198.18.0.0"));
        assert_eq!(routes.writes() - before, 3, "the spare caught up on 1 and took 2");
        let now = routes.load();
        assert_eq!(now.lookup(a("10.0.7.1")), Some(a("198.19.0.7")));
        assert_eq!(now.lookup(a("10.0.8.1")), None);
        assert_eq!(now.len(), 5_000);
        assert!(
            !now.is_node(Ipv4Addr::from(0xc612_0000 | 7)),
            "the moved peer's old address is gone"
        );
    }

    /// Both copies end up equal whichever copy a change landed in first.
    #[test]
    fn both_copies_converge() {
        let routes = SharedRoutes::new("10.0.0.0/8".parse().unwrap(), 24);
        let mut t = LeaseTable::default();
        t.replace((0..10).map(lease).collect());
        routes.apply(&update(1, &t, Changes::Snapshot), a("198.18.0.0"));
        for (g, i) in (2..).zip(10..30) {
            let c = if i % 3 == 0 {
                t.apply_all([LeaseEvent::Removed(lease(i - 5).subnet)])
            } else {
                t.apply_all([LeaseEvent::Upserted(lease(i))])
            };
            let was = routes.load().generation();
            routes.apply(&update(g, &t, Changes::Delta(c)), a("198.18.0.0"));
            assert_eq!(routes.load().generation(), was + 1, "each change is a new generation");
            let want: Vec<_> = t
                .leases()
                .filter(|l| l.subnet != lease(0).subnet)
                .map(|l| (l.subnet, l.attrs.public_ip))
                .collect();
            assert_eq!(routes.routes(), want, "after change {i}");
        }
    }

    /// Routes following a table of leases 0-3 (lease 0 this node's).
    fn four_leases() -> (SharedRoutes, LeaseTable) {
        let routes = SharedRoutes::new("10.0.0.0/8".parse().unwrap(), 24);
        let mut t = LeaseTable::default();
        t.replace((0..4).map(lease).collect());
        routes.apply(&update(1, &t, Changes::Snapshot), a("198.18.0.0"));
        (routes, t)
    }

    #[test]
    fn a_change_that_moves_no_subnet_is_no_new_generation() {
        let (routes, mut t) = four_leases();
        let g = routes.load().generation();
        // The backend data changed (a VTEP MAC, say), the owner did not.
        let mut redone = lease(2);
        redone.attrs = LeaseAttrs::new(redone.attrs.public_ip, "udp", serde_json::json!({"VNI": 2}));
        let c = t.apply_all([LeaseEvent::Upserted(redone)]);
        assert!(!c.is_empty(), "the table saw the change");
        routes.apply(&update(2, &t, Changes::Delta(c)), a("198.18.0.0"));
        assert_eq!(routes.load().generation(), g, "nothing anyone reads changed");
        let mut moved = lease(2);
        moved.attrs.public_ip = a("198.19.0.2");
        let c = t.apply_all([LeaseEvent::Upserted(moved)]);
        routes.apply(&update(3, &t, Changes::Delta(c)), a("198.18.0.0"));
        assert_eq!(routes.load().generation(), g + 1);
    }

    #[test]
    fn a_reader_holding_a_copy_does_not_block_writers() {
        let (routes, mut t) = four_leases();
        // A reader keeps the live copy; after the next change it is the spare, still held.
        let held = routes.cell().load_full();
        let c = t.apply_all([LeaseEvent::Upserted(lease(4))]);
        routes.apply(&update(2, &t, Changes::Delta(c)), a("198.18.0.0"));
        let c = t.apply_all([LeaseEvent::Upserted(lease(5))]);
        routes.apply(&update(3, &t, Changes::Delta(c)), a("198.18.0.0"));
        assert_eq!(routes.load().len(), 5, "the writer copied the live table");
        assert_eq!(held.len(), 3, "the reader's view never changed under it");
        let c = t.apply_all([LeaseEvent::Removed(lease(2).subnet)]);
        routes.apply(&update(4, &t, Changes::Delta(c)), a("198.18.0.0"));
        assert_eq!(routes.load().len(), 4);
    }

    #[test]
    fn counters_follow_the_peer_across_changes() {
        let routes = SharedRoutes::new("10.0.0.0/8".parse().unwrap(), 24);
        let mut t = LeaseTable::default();
        t.replace((0..3).map(lease).collect());
        routes.apply(&update(1, &t, Changes::Snapshot), a("198.18.0.0"));
        let peer = Ipv4Addr::from(0xc612_0000 | 1);
        routes
            .load()
            .counters(peer)
            .unwrap()
            .tx_packets
            .fetch_add(5, Ordering::Relaxed);
        let c = t.apply_all([LeaseEvent::Upserted(lease(9))]);
        routes.apply(&update(2, &t, Changes::Delta(c)), a("198.18.0.0"));
        let c = t.apply_all([LeaseEvent::Upserted(lease(10))]);
        routes.apply(&update(3, &t, Changes::Delta(c)), a("198.18.0.0"));
        assert_eq!(
            routes.load().counters(peer).unwrap().tx_packets.load(Ordering::Relaxed),
            5
        );
        assert_eq!(routes.peer_counters().len(), 4);
        let c = t.apply_all([LeaseEvent::Removed(lease(1).subnet)]);
        routes.apply(&update(4, &t, Changes::Delta(c)), a("198.18.0.0"));
        assert!(routes.peer_counters().iter().all(|(ip, _)| *ip != peer));
    }
}
