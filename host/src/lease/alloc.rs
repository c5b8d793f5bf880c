//! Choosing which subnet a node leases: pure logic over a lease listing.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use rand::Rng;

use super::Lease;
use crate::subnet::SubnetRange;

/// How many free subnets from the bottom of the range a new node picks among, as flannel does:
/// random enough to keep simultaneous joiners apart, low enough to keep the map compact.
pub const CANDIDATES: usize = 100;

/// What a node should do to get its subnet.
#[derive(Debug, Clone, PartialEq)]
pub enum Choice {
    /// A lease with this node's PublicIP already exists: adopt it.
    Reuse(Lease),
    /// Try to create a lease on this free subnet.
    Create(Ipv4Net),
    /// Every subnet in the range is taken.
    Exhausted {
        /// Subnets in the range.
        range_size: u64,
        /// Leases held in the range.
        leased: usize,
    },
}

/// Picks the subnet for the node at `public_ip`: its existing lease, else `previous` (from the
/// subnet file) if still free, else a random one of the lowest free subnets. `tried` holds
/// subnets lost to a creation race in this attempt, never picked again.
pub fn choose<R: Rng>(
    range: &SubnetRange,
    leases: &[Lease],
    public_ip: Ipv4Addr,
    previous: Option<Ipv4Net>,
    tried: &HashSet<Ipv4Net>,
    rng: &mut R,
) -> Choice {
    if let Some(own) = leases
        .iter()
        .find(|l| l.attrs.public_ip == public_ip && range.contains(&l.subnet) && !tried.contains(&l.subnet))
    {
        return Choice::Reuse(own.clone());
    }
    let taken: HashSet<Ipv4Net> = leases.iter().map(|l| l.subnet).collect();
    if let Some(prev) = previous {
        if range.contains(&prev) && !taken.contains(&prev) && !tried.contains(&prev) {
            return Choice::Create(prev);
        }
    }
    let free: Vec<Ipv4Net> = range
        .iter()
        .filter(|n| !taken.contains(n) && !tried.contains(n))
        .take(CANDIDATES)
        .collect();
    if free.is_empty() {
        return Choice::Exhausted {
            range_size: range.len(),
            leased: leases.iter().filter(|l| range.contains(&l.subnet)).count(),
        };
    }
    Choice::Create(free[rng.random_range(0..free.len())])
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;
    use crate::lease::LeaseAttrs;

    fn range() -> SubnetRange {
        SubnetRange::new(24, "10.244.1.0".parse().unwrap(), "10.244.4.0".parse().unwrap())
    }

    fn lease(net: &str, ip: &str) -> Lease {
        Lease {
            subnet: net.parse().unwrap(),
            attrs: LeaseAttrs::new(ip.parse().unwrap(), "udp", serde_json::Value::Null),
            expiration: SystemTime::now(),
            revision: 1,
            ttl_handle: 0,
        }
    }

    fn rng() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    #[test]
    fn reuses_the_lease_with_our_public_ip() {
        let leases = vec![lease("10.244.1.0/24", "1.1.1.1"), lease("10.244.3.0/24", "2.2.2.2")];
        let c = choose(
            &range(),
            &leases,
            "2.2.2.2".parse().unwrap(),
            None,
            &HashSet::new(),
            &mut rng(),
        );
        assert_eq!(c, Choice::Reuse(leases[1].clone()));
    }

    #[test]
    fn ignores_our_lease_outside_the_range() {
        let leases = vec![lease("10.244.9.0/24", "2.2.2.2")];
        let c = choose(
            &range(),
            &leases,
            "2.2.2.2".parse().unwrap(),
            None,
            &HashSet::new(),
            &mut rng(),
        );
        assert!(matches!(c, Choice::Create(_)));
    }

    #[test]
    fn previous_subnet_is_preferred_when_free() {
        let prev = "10.244.4.0/24".parse().unwrap();
        let c = choose(
            &range(),
            &[],
            "2.2.2.2".parse().unwrap(),
            Some(prev),
            &HashSet::new(),
            &mut rng(),
        );
        assert_eq!(c, Choice::Create(prev));
    }

    #[test]
    fn previous_subnet_taken_by_another_falls_back() {
        let leases = vec![lease("10.244.4.0/24", "9.9.9.9")];
        let prev = "10.244.4.0/24".parse().unwrap();
        let c = choose(
            &range(),
            &leases,
            "2.2.2.2".parse().unwrap(),
            Some(prev),
            &HashSet::new(),
            &mut rng(),
        );
        match c {
            Choice::Create(n) => assert_ne!(n, prev),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn never_picks_a_taken_or_tried_subnet() {
        let leases = vec![lease("10.244.1.0/24", "1.1.1.1"), lease("10.244.2.0/24", "1.1.1.2")];
        let tried: HashSet<Ipv4Net> = ["10.244.3.0/24".parse().unwrap()].into();
        for seed in 0..50 {
            let c = choose(
                &range(),
                &leases,
                "2.2.2.2".parse().unwrap(),
                None,
                &tried,
                &mut StdRng::seed_from_u64(seed),
            );
            assert_eq!(c, Choice::Create("10.244.4.0/24".parse().unwrap()));
        }
    }

    #[test]
    fn exhausted_when_full() {
        let leases: Vec<_> = (1..=4)
            .map(|i| lease(&format!("10.244.{i}.0/24"), &format!("1.1.1.{i}")))
            .collect();
        let c = choose(
            &range(),
            &leases,
            "2.2.2.2".parse().unwrap(),
            None,
            &HashSet::new(),
            &mut rng(),
        );
        assert_eq!(
            c,
            Choice::Exhausted {
                range_size: 4,
                leased: 4
            }
        );
    }

    #[test]
    fn random_choice_spreads_over_candidates() {
        let big = SubnetRange::new(24, "10.0.1.0".parse().unwrap(), "10.255.255.0".parse().unwrap());
        let mut seen = HashSet::new();
        let mut r = rng();
        for _ in 0..200 {
            if let Choice::Create(n) = choose(&big, &[], "2.2.2.2".parse().unwrap(), None, &HashSet::new(), &mut r) {
                assert!(u32::from(n.network()) < u32::from("10.0.101.0".parse::<Ipv4Addr>().unwrap()));
                seen.insert(n);
            }
        }
        assert!(seen.len() > 50, "only {} distinct picks", seen.len());
    }
}
