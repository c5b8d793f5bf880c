//! The per-worker verdict cache: one entry per flow (direction + 5-tuple), stamped with the
//! chain generation that decided it. An entry from an older generation is not a hit, but it
//! still tells the chain that the flow was already in flight.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::Ipv4Addr;

use super::flow::FlowKey;

/// What the data path does with a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Verdict {
    /// Drop the packet.
    pub drop: bool,
    /// Send through this node instead of the destination's owner.
    pub via: Option<Ipv4Addr>,
}

impl Verdict {
    /// Forward as usual.
    pub const PASS: Verdict = Verdict { drop: false, via: None };
    /// Drop.
    pub const DROP: Verdict = Verdict { drop: true, via: None };
}

/// How long a verdict may be reused, in milliseconds from now; `u64::MAX` is the flow's life.
pub type Ttl = u64;

/// A flow with no packet for this long is forgotten (it counts as new when it comes back).
pub const IDLE_MS: u64 = 120_000;

#[derive(Debug, Clone, Copy)]
struct Entry {
    generation: u64,
    verdict: Verdict,
    expires_ms: u64,
    seen_ms: u64,
}

/// The answer of a lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// A verdict of the current generation, still valid.
    Hit(Verdict),
    /// Ask the chain; `established` when the flow was seen (under any generation) recently.
    Miss {
        /// The flow is in flight.
        established: bool,
    },
}

/// A multiply-xorshift hash of the packed key: the key is already uniform in its low bits
/// (addresses and ports), so SipHash's collision resistance would buy nothing here but cost.
#[derive(Default)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
    }

    fn write_u128(&mut self, v: u128) {
        let x = (v as u64) ^ ((v >> 64) as u64).rotate_left(29);
        let x = x.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 = x ^ (x >> 32);
    }
}

/// The cache; bounded, so a scan of many flows cannot grow it without limit.
pub struct FlowCache {
    map: HashMap<FlowKey, Entry, BuildHasherDefault<KeyHasher>>,
    capacity: usize,
    /// Consecutive segments of one super-packet share a flow: the last hit answers them with
    /// no hashing at all.
    last: Option<(FlowKey, Entry)>,
    /// Entries thrown away to make room (idle or not).
    pub evictions: u64,
}

impl FlowCache {
    /// A cache of at most `capacity` flows.
    pub fn new(capacity: usize) -> Self {
        FlowCache {
            map: HashMap::with_capacity_and_hasher(capacity.min(4096), Default::default()),
            capacity: capacity.max(1),
            last: None,
            evictions: 0,
        }
    }

    /// Number of flows held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Looks `key` up for chain generation `generation` at time `now_ms`.
    #[inline]
    pub fn lookup(&mut self, key: FlowKey, generation: u64, now_ms: u64) -> Lookup {
        if let Some((k, e)) = &self.last {
            if *k == key && e.generation == generation && now_ms < e.expires_ms && now_ms < e.seen_ms + 1000 {
                return Lookup::Hit(e.verdict);
            }
        }
        let Some(e) = self.map.get_mut(&key) else {
            return Lookup::Miss { established: false };
        };
        let idle = now_ms.saturating_sub(e.seen_ms) >= IDLE_MS;
        if idle {
            return Lookup::Miss { established: false };
        }
        e.seen_ms = now_ms;
        if e.generation == generation && now_ms < e.expires_ms {
            self.last = Some((key, *e));
            Lookup::Hit(e.verdict)
        } else {
            Lookup::Miss { established: true }
        }
    }

    /// Records a verdict; `ttl_ms` 0 records only that the flow was seen.
    pub fn insert(&mut self, key: FlowKey, generation: u64, verdict: Verdict, ttl_ms: Ttl, now_ms: u64) {
        if self.map.len() >= self.capacity && !self.map.contains_key(&key) {
            let before = self.map.len();
            self.map.retain(|_, e| now_ms.saturating_sub(e.seen_ms) < IDLE_MS);
            if self.map.len() >= self.capacity {
                self.map.clear();
            }
            self.evictions += (before - self.map.len()) as u64;
        }
        let e = Entry {
            generation,
            verdict,
            expires_ms: now_ms.saturating_add(ttl_ms),
            seen_ms: now_ms,
        };
        self.map.insert(key, e);
        self.last = (ttl_ms > 0).then_some((key, e));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hits_need_the_same_generation_and_an_unexpired_entry() {
        let mut c = FlowCache::new(16);
        assert_eq!(c.lookup(1, 1, 0), Lookup::Miss { established: false });
        c.insert(1, 1, Verdict::DROP, u64::MAX, 0);
        assert_eq!(c.lookup(1, 1, 10), Lookup::Hit(Verdict::DROP));
        assert_eq!(
            c.lookup(1, 2, 10),
            Lookup::Miss { established: true },
            "a new chain decides again"
        );
        c.insert(2, 1, Verdict::PASS, 5_000, 0);
        assert_eq!(c.lookup(2, 1, 4_999), Lookup::Hit(Verdict::PASS));
        assert_eq!(c.lookup(2, 1, 5_000), Lookup::Miss { established: true }, "ttl ran out");
        c.insert(3, 1, Verdict::PASS, 0, 0);
        assert_eq!(
            c.lookup(3, 1, 1),
            Lookup::Miss { established: true },
            "ttl 0 is never a hit"
        );
    }

    #[test]
    fn idle_flows_are_new_again() {
        let mut c = FlowCache::new(16);
        c.insert(1, 1, Verdict::PASS, u64::MAX, 0);
        assert_eq!(c.lookup(1, 1, IDLE_MS + 1), Lookup::Miss { established: false });
    }

    #[test]
    fn the_cache_stays_bounded_preferring_to_drop_idle_flows() {
        let mut c = FlowCache::new(4);
        for k in 0..4 {
            c.insert(k, 1, Verdict::PASS, u64::MAX, 0);
        }
        c.lookup(3, 1, IDLE_MS - 1);
        c.insert(10, 1, Verdict::PASS, u64::MAX, IDLE_MS);
        assert_eq!(c.len(), 2, "three idle flows went, the busy one stayed");
        assert_eq!(c.lookup(3, 1, IDLE_MS + 1), Lookup::Hit(Verdict::PASS));
        for k in 20..40 {
            c.insert(k, 1, Verdict::PASS, u64::MAX, IDLE_MS + 2);
            assert!(c.len() <= 4);
        }
        assert!(c.evictions > 0);
    }

    #[test]
    fn the_last_flow_memo_never_outlives_the_entry() {
        let mut c = FlowCache::new(16);
        c.insert(7, 1, Verdict::PASS, 100, 0);
        assert_eq!(c.lookup(7, 1, 50), Lookup::Hit(Verdict::PASS));
        assert_eq!(c.lookup(7, 1, 100), Lookup::Miss { established: true });
        assert_eq!(c.lookup(7, 2, 50), Lookup::Miss { established: true });
    }
}
