//! One fast hash for the packet core's tables: the route table (a lookup per packet) and the
//! verdict cache (one per flow). Their keys are addresses and ports the cluster assigns, and
//! their contents are not chosen by whoever sends a packet, so SipHash's resistance to crafted
//! collisions buys nothing there, at 15-20 ns a lookup; a multiply and a fold do.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Spreads `x` over all 64 bits: a multiply by the golden ratio moves entropy up, the fold
/// brings it back down, so both the low bits (a map's bucket) and the high bits (its tag)
/// differ for keys that differ only in a few bits (like subnets, whose low byte is zero).
#[inline]
pub fn mix(x: u64) -> u64 {
    let x = x.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^ (x >> 32)
}

/// A [`Hasher`] over [`mix`], for keys of at most a few words.
#[derive(Debug, Default, Clone, Copy)]
pub struct FastHasher(u64);

impl Hasher for FastHasher {
    #[inline]
    fn finish(&self) -> u64 {
        mix(self.0)
    }

    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(w));
        }
    }

    #[inline]
    fn write_u32(&mut self, v: u32) {
        self.write_u64(u64::from(v));
    }

    #[inline]
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(29) ^ v).wrapping_mul(0x100_0000_01b3);
    }

    #[inline]
    fn write_usize(&mut self, v: usize) {
        self.write_u64(v as u64);
    }
}

/// A `HashMap` hashed with [`FastHasher`].
pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::hash::{BuildHasher, BuildHasherDefault};
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn subnets_spread_over_buckets_and_tags() {
        // 4,096 /24s of 10.0.0.0/8: the low byte of every key is zero.
        let b = BuildHasherDefault::<FastHasher>::default();
        let keys = (0..4096u32).map(|i| u32::from(Ipv4Addr::new(10, 0, 0, 0)) | i << 8);
        let hashes: Vec<u64> = keys.map(|k| b.hash_one(k)).collect();
        let buckets: HashSet<u64> = hashes.iter().map(|h| h & 4095).collect();
        let tags: HashSet<u64> = hashes.iter().map(|h| h >> 57).collect();
        assert!(buckets.len() > 2_400, "{} of 4096 buckets used", buckets.len());
        assert_eq!(tags.len(), 128, "every 7-bit tag occurs");
    }

    #[test]
    fn neighbouring_addresses_differ_and_find_their_entries() {
        let b = BuildHasherDefault::<FastHasher>::default();
        let (x, y) = (Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::new(198, 18, 0, 2));
        assert_ne!(b.hash_one(x.octets()), b.hash_one(y.octets()), "hashed as bytes too");
        assert_ne!(b.hash_one(x), b.hash_one(y));
        let mut m: FastMap<Ipv4Addr, u8> = FastMap::default();
        m.insert(x, 1);
        assert_eq!(m.get(&x), Some(&1));
        assert_eq!(m.get(&y), None);
    }
}
