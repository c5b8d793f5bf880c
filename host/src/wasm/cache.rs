//! The per-worker verdict cache: one entry per flow (direction + 5-tuple), stamped with the
//! chain generation that decided it. An entry from an older generation is not a hit, but it
//! still tells the chain that the flow was already in flight.
//!
//! Set-associative, like a CPU cache: a flow can live in one of the four slots of one set, and a
//! set is two adjacent cache lines. A new flow's lookup and its insert touch the same lines, so
//! deciding one costs one memory miss, not the three a general hash map's control bytes, slot
//! and growth cost; a full set forgets its least recently seen flow, so no insert ever sweeps
//! the table (the cost of an event does not grow with the flows held); and flows crafted to
//! collide only push each other out of their own set.

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

/// Slots per set.
const WAYS: usize = 4;
/// Words per slot: the key (two), generation and via (one), last seen and expiry (one).
const WORDS: usize = 4;
/// A set's alignment in words: 128 bytes, the pair of lines the CPU fetches together.
const SET_ALIGN_WORDS: usize = 16;

/// The huge page size tables are aligned to when they are at least this large.
const HUGE_PAGE: usize = 2 << 20;

/// Asks the kernel to back `words` with huge pages (where transparent huge pages are enabled
/// for those who ask); without them the table works the same, a little slower.
fn huge_pages(words: &[u64]) {
    // SAFETY: the range is memory this process owns (a live allocation), and MADV_HUGEPAGE
    // only changes how it is backed, never its contents.
    let rc = unsafe {
        libc::madvise(
            words.as_ptr() as *mut libc::c_void,
            std::mem::size_of_val(words),
            libc::MADV_HUGEPAGE,
        )
    };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "verdict cache stays on small pages");
    }
}

/// Flags in the key's high word, above the 105 bits a [`FlowKey`] uses.
const OCCUPIED: u64 = 1 << 63;
const DROP: u64 = 1 << 62;
const HAS_VIA: u64 = 1 << 61;
const FLAGS: u64 = DROP | HAS_VIA;

/// Times are kept as 32-bit milliseconds from the cache's base; the base moves on before they
/// could wrap.
const REBASE_AT: u64 = 1 << 31;
/// An expiry that never comes (the verdict stands for the flow's life).
const FOREVER: u32 = u32::MAX;

/// One slot, unpacked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    generation: u32,
    verdict: Verdict,
    /// Milliseconds from the base.
    seen: u32,
    expires: u32,
}

impl Entry {
    fn hit(&self, generation: u32, now: u32) -> bool {
        self.generation == generation && (self.expires == FOREVER || now < self.expires)
    }
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

/// The packed key's hash ([`crate::packet::hash`]); a set holds colliding flows' harm to
/// themselves.
#[inline]
fn mix(key: FlowKey) -> u64 {
    crate::packet::hash::mix((key as u64) ^ ((key >> 64) as u64).rotate_left(29))
}

/// A bounded map from flows to verdicts.
pub struct FlowCache {
    /// The slots, as plain words: allocated zeroed (an empty slot is all zeroes), so the pages
    /// of sets no flow reached are never touched.
    words: Vec<u64>,
    /// Where the first set starts in `words` (for its alignment).
    first: usize,
    /// Sets minus one (a power of two minus one).
    mask: usize,
    /// The clock reading times are counted from.
    base_ms: u64,
    occupied: usize,
    /// The last hit, so the segments of one super-packet skip even the set.
    last: Option<(FlowKey, Entry)>,
    /// Flows forgotten to make room.
    pub evictions: u64,
}

impl FlowCache {
    /// A cache for about `capacity` flows (rounded up to whole sets of a power-of-two count).
    pub fn new(capacity: usize) -> Self {
        let sets = capacity.div_ceil(WAYS).max(1).next_power_of_two();
        let len = sets * WAYS * WORDS;
        // A table of a huge page or more starts on one and asks for them: a new flow's set
        // is a random place in it, and on small pages that is a TLB miss as well.
        let align = if len * 8 >= HUGE_PAGE {
            HUGE_PAGE
        } else {
            SET_ALIGN_WORDS * 8
        };
        let words = vec![0u64; len + align / 8];
        let first = ((align - words.as_ptr() as usize % align) % align) / 8;
        if align == HUGE_PAGE {
            huge_pages(&words[first..first + len]);
        }
        FlowCache {
            words,
            first,
            mask: sets - 1,
            base_ms: 0,
            occupied: 0,
            last: None,
            evictions: 0,
        }
    }

    /// Flows held.
    pub fn len(&self) -> usize {
        self.occupied
    }

    /// True when no flow is held.
    pub fn is_empty(&self) -> bool {
        self.occupied == 0
    }

    /// Where `key`'s set starts in `words`.
    #[inline]
    fn set(&self, key: FlowKey) -> usize {
        self.first + ((mix(key) >> 32) as usize & self.mask) * WAYS * WORDS
    }

    /// `now_ms` as a time from the base, moving the base on first if needed.
    #[inline]
    fn now(&mut self, now_ms: u64) -> u32 {
        let rel = now_ms.saturating_sub(self.base_ms);
        if rel < REBASE_AT {
            return rel as u32;
        }
        self.rebase(rel - REBASE_AT / 2);
        now_ms.saturating_sub(self.base_ms) as u32
    }

    /// Moves the base `shift` ms on: once every 12 days of uptime, a walk over the sets.
    #[cold]
    fn rebase(&mut self, shift: u64) {
        self.base_ms += shift;
        let shift = u32::try_from(shift).unwrap_or(u32::MAX);
        let first = self.first;
        for w in self.words[first..].chunks_exact_mut(WORDS) {
            if w[1] & OCCUPIED == 0 {
                continue;
            }
            let (seen, expires) = (w[3] as u32, (w[3] >> 32) as u32);
            let expires = if expires == FOREVER {
                FOREVER
            } else {
                expires.saturating_sub(shift)
            };
            w[3] = u64::from(seen.saturating_sub(shift)) | u64::from(expires) << 32;
        }
        self.last = None;
    }

    /// The slot of `key` in the set at `set`, if it is there.
    #[inline]
    fn find(&self, set: usize, key: FlowKey) -> Option<usize> {
        let (lo, hi) = (key as u64, (key >> 64) as u64 | OCCUPIED);
        (0..WAYS)
            .map(|way| set + way * WORDS)
            .find(|&s| self.words[s] == lo && self.words[s + 1] & !FLAGS == hi)
    }

    fn entry(&self, s: usize) -> Entry {
        let (hi, gv, t) = (self.words[s + 1], self.words[s + 2], self.words[s + 3]);
        let via = (hi & HAS_VIA != 0).then(|| Ipv4Addr::from((gv >> 32) as u32));
        Entry {
            generation: gv as u32,
            verdict: Verdict {
                drop: hi & DROP != 0,
                via,
            },
            seen: t as u32,
            expires: (t >> 32) as u32,
        }
    }

    fn store(&mut self, s: usize, key: FlowKey, e: &Entry) {
        let mut hi = (key >> 64) as u64 | OCCUPIED;
        if e.verdict.drop {
            hi |= DROP;
        }
        if e.verdict.via.is_some() {
            hi |= HAS_VIA;
        }
        let via = e.verdict.via.map_or(0, u32::from);
        self.words[s] = key as u64;
        self.words[s + 1] = hi;
        self.words[s + 2] = u64::from(e.generation) | u64::from(via) << 32;
        self.words[s + 3] = u64::from(e.seen) | u64::from(e.expires) << 32;
    }

    /// `key`'s entry, if it is held and has not idled out, seen again at `now`.
    #[inline]
    fn touch(&mut self, key: FlowKey, now: u32) -> Option<Entry> {
        let s = self.find(self.set(key), key)?;
        let mut e = self.entry(s);
        if u64::from(now.saturating_sub(e.seen)) >= IDLE_MS {
            return None;
        }
        e.seen = now;
        self.words[s + 3] = u64::from(e.seen) | u64::from(e.expires) << 32;
        Some(e)
    }

    /// The cached verdict of `key` under chain `generation` (compared in its low 32 bits: a chain
    /// changes when an operator loads modules, so they do not come round again), refreshing
    /// the flow's last-seen time.
    #[inline]
    pub fn lookup(&mut self, key: FlowKey, generation: u64, now_ms: u64) -> Lookup {
        let (generation, now) = (generation as u32, self.now(now_ms));
        if let Some((k, e)) = &self.last {
            // Within a second of the last look the memo's seen time is fresh enough.
            if *k == key && e.hit(generation, now) && now < e.seen.saturating_add(1000) {
                return Lookup::Hit(e.verdict);
            }
        }
        let Some(e) = self.touch(key, now) else {
            return Lookup::Miss { established: false };
        };
        if e.hit(generation, now) {
            self.last = Some((key, e));
            Lookup::Hit(e.verdict)
        } else {
            Lookup::Miss { established: true }
        }
    }

    /// The verdict of `key` under `generation` and how much longer it holds (`Ttl::MAX`: for
    /// the life of what it covers), refreshing its last-seen time; `None` if there is none.
    #[inline]
    pub fn lookup_ttl(&mut self, key: FlowKey, generation: u64, now_ms: u64) -> Option<(Verdict, Ttl)> {
        let now = self.now(now_ms);
        let e = self.touch(key, now).filter(|e| e.hit(generation as u32, now))?;
        let left = match e.expires {
            FOREVER => Ttl::MAX,
            x => u64::from(x - now),
        };
        Some((e.verdict, left))
    }

    /// Caches `verdict` for `key` for `ttl_ms` (0: not at all past this packet), in place of
    /// the set's least recently seen flow if the set is full.
    pub fn insert(&mut self, key: FlowKey, generation: u64, verdict: Verdict, ttl_ms: Ttl, now_ms: u64) {
        let now = self.now(now_ms);
        let set = self.set(key);
        let s = match self.find(set, key) {
            Some(s) => s,
            None => self.room(set),
        };
        let expires = match ttl_ms {
            Ttl::MAX => FOREVER,
            t => u64::from(now).saturating_add(t).min(u64::from(FOREVER - 1)) as u32,
        };
        let e = Entry {
            generation: generation as u32,
            verdict,
            seen: now,
            expires,
        };
        self.store(s, key, &e);
        self.last = (ttl_ms > 0).then_some((key, e));
    }

    /// A slot in the set at `set` for a new flow: a free one, or the least recently seen.
    fn room(&mut self, set: usize) -> usize {
        let slots = (0..WAYS).map(|way| set + way * WORDS);
        if let Some(s) = slots.clone().find(|&s| self.words[s + 1] & OCCUPIED == 0) {
            self.occupied += 1;
            return s;
        }
        self.evictions += 1;
        let oldest = slots.min_by_key(|&s| self.words[s + 3] as u32);
        // The memo may hold the flow going out.
        self.last = None;
        oldest.unwrap_or(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_of_a_huge_page_starts_on_one_and_a_small_one_on_a_line_pair() {
        let big = FlowCache::new(65_536);
        assert_eq!(big.words[big.first..].as_ptr() as usize % HUGE_PAGE, 0);
        assert_eq!(big.words.len() - big.first, 65_536 * WORDS + HUGE_PAGE / 8 - big.first);
        let small = FlowCache::new(1_000);
        assert_eq!(small.words[small.first..].as_ptr() as usize % (SET_ALIGN_WORDS * 8), 0);
        assert!(small.words.len() < 2 * 1_024 * WORDS, "no huge page for a small table");
        // Both hold what they are given.
        for mut c in [big, small] {
            c.insert(7, 1, Verdict::DROP, Ttl::MAX, 0);
            assert_eq!(c.lookup(7, 1, 1), Lookup::Hit(Verdict::DROP));
        }
    }

    #[test]
    fn lookup_ttl_says_how_long_a_verdict_still_holds() {
        let mut c = FlowCache::new(16);
        assert_eq!(c.lookup_ttl(7, 1, 0), None);
        c.insert(7, 1, Verdict::DROP, 10_000, 1_000);
        assert_eq!(c.lookup_ttl(7, 1, 4_000), Some((Verdict::DROP, 7_000)));
        assert_eq!(c.lookup_ttl(7, 2, 4_000), None, "another generation");
        assert_eq!(c.lookup_ttl(7, 1, 11_000), None, "run out");
        c.insert(8, 1, Verdict::PASS, Ttl::MAX, 0);
        assert_eq!(c.lookup_ttl(8, 1, 100_000), Some((Verdict::PASS, Ttl::MAX)));
        assert_eq!(
            c.lookup_ttl(8, 1, 100_000 + IDLE_MS),
            None,
            "idle past IDLE_MS even when it would stand forever"
        );
    }

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
    fn a_full_set_forgets_its_least_recently_seen_flow() {
        // Capacity 4 is one set: every flow competes for the same four slots.
        let mut c = FlowCache::new(4);
        for k in 0..4 {
            c.insert(k, 1, Verdict::PASS, u64::MAX, k as u64);
        }
        assert_eq!(c.lookup(0, 1, 10), Lookup::Hit(Verdict::PASS), "flow 0 is busy again");
        c.insert(10, 1, Verdict::DROP, u64::MAX, 11);
        assert_eq!(c.len(), 4);
        assert_eq!(c.evictions, 1);
        assert_eq!(
            c.lookup(1, 1, 12),
            Lookup::Miss { established: false },
            "flow 1 was seen longest ago"
        );
        for k in [0, 2, 3] {
            assert_eq!(c.lookup(k, 1, 12), Lookup::Hit(Verdict::PASS));
        }
        assert_eq!(c.lookup(10, 1, 12), Lookup::Hit(Verdict::DROP));
        for k in 20..40 {
            c.insert(k, 1, Verdict::PASS, u64::MAX, 13);
            assert!(c.len() <= 4);
        }
    }

    #[test]
    fn verdicts_keep_their_via_and_drop_and_sizes_round_up() {
        let mut c = FlowCache::new(1000);
        assert_eq!(c.mask + 1, 256, "1000 flows are 250 sets, rounded up to 256");
        assert_eq!(
            (c.words.as_ptr() as usize + c.first * 8) % 128,
            0,
            "sets start on a line pair"
        );
        let via = Verdict {
            drop: false,
            via: Some(Ipv4Addr::new(198, 18, 0, 9)),
        };
        let both = Verdict {
            drop: true,
            via: Some(Ipv4Addr::UNSPECIFIED),
        };
        let big: FlowKey = (1 << 104) | (0xffff_u128 << 80) | 0xdead_beef;
        c.insert(big, 3, via, 5_000, 0);
        c.insert(big + 1, 3, both, u64::MAX, 0);
        assert_eq!(c.lookup(big, 3, 1), Lookup::Hit(via));
        assert_eq!(c.lookup(big + 1, 3, 1), Lookup::Hit(both));
        assert_eq!(c.lookup(big + 2, 3, 1), Lookup::Miss { established: false });
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn verdicts_outlive_the_clock_base_moving_on() {
        let mut c = FlowCache::new(64);
        let t = REBASE_AT - 10;
        c.insert(1, 1, Verdict::DROP, u64::MAX, t);
        c.insert(2, 1, Verdict::PASS, 5_000, t);
        c.insert(3, 1, Verdict::PASS, u64::MAX, t - IDLE_MS);
        // Days of uptime later, each call still means the same.
        assert_eq!(c.lookup(1, 1, t + 20), Lookup::Hit(Verdict::DROP));
        assert!(c.base_ms > 0, "the base moved on");
        assert_eq!(c.lookup(2, 1, t + 4_999), Lookup::Hit(Verdict::PASS));
        assert_eq!(
            c.lookup(2, 1, t + 5_000),
            Lookup::Miss { established: true },
            "ttl ran out"
        );
        assert_eq!(c.lookup(3, 1, t + 20), Lookup::Miss { established: false }, "idle");
        let far = 40 * REBASE_AT;
        assert_eq!(
            c.lookup(1, 1, far),
            Lookup::Miss { established: false },
            "idle after years"
        );
        c.insert(4, 1, Verdict::PASS, 1_000, far);
        assert_eq!(c.lookup(4, 1, far + 999), Lookup::Hit(Verdict::PASS));
        assert_eq!(c.lookup(4, 1, far + 1_000), Lookup::Miss { established: true });
    }

    proptest::proptest! {
        /// Against a plain map of what was inserted: a hit is always the verdict inserted last
        /// for that flow and generation, still within its ttl; a miss of a flow inserted and
        /// not expired happens only if some flow was evicted since.
        #[test]
        fn hits_are_never_wrong_and_misses_need_an_eviction(
            ops in proptest::collection::vec((0u128..48, 1u64..3, proptest::bool::ANY, 0u64..3, 0u64..50), 1..400),
        ) {
            let mut c = FlowCache::new(16);
            let mut model: std::collections::HashMap<FlowKey, (u64, Verdict, u64, u64)> = Default::default();
            let mut now = 0;
            for (k, generation, drop, ttl, step) in ops {
                now += step;
                let key = k * 0x1_0001_0001;
                let evictions = c.evictions;
                let expect = model.get(&key).copied();
                match c.lookup(key, generation, now) {
                    Lookup::Hit(v) => {
                        let (g, mv, exp, _) = expect.expect("a hit of a flow never inserted");
                        proptest::prop_assert_eq!((g, mv), (generation, v));
                        proptest::prop_assert!(now < exp);
                    }
                    Lookup::Miss { .. } => {
                        if let Some((g, _, exp, since)) = expect {
                            proptest::prop_assert!(
                                g != generation || now >= exp || c.evictions > since,
                                "a live flow missed without an eviction"
                            );
                        }
                        let v = Verdict { drop, via: None };
                        let ttl = [0, 100, u64::MAX][ttl as usize];
                        c.insert(key, generation, v, ttl, now);
                        let exp = now.saturating_add(ttl);
                        model.insert(key, (generation, v, exp, c.evictions.max(evictions)));
                    }
                }
                proptest::prop_assert!(c.len() <= 16);
            }
        }
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
