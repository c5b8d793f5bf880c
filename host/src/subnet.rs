//! Subnet arithmetic and flannel's subnet key format (`10.244.1.0-24`).

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// The leasable subnets: every aligned `/len` block from `min` to `max` inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubnetRange {
    len: u8,
    min: u32,
    max: u32,
}

impl SubnetRange {
    /// A range of `/len` subnets from `min` to `max` (both subnet addresses, already validated).
    pub fn new(len: u8, min: Ipv4Addr, max: Ipv4Addr) -> Self {
        SubnetRange {
            len,
            min: u32::from(min),
            max: u32::from(max),
        }
    }

    fn step(&self) -> u32 {
        1u32 << (32 - self.len)
    }

    /// Number of subnets in the range.
    pub fn len(&self) -> u64 {
        if self.max < self.min {
            return 0;
        }
        u64::from((self.max - self.min) / self.step()) + 1
    }

    /// True when the range holds no subnet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `net` is one of this range's subnets.
    pub fn contains(&self, net: &Ipv4Net) -> bool {
        let a = u32::from(net.network());
        net.prefix_len() == self.len && a >= self.min && a <= self.max && (a - self.min).is_multiple_of(self.step())
    }

    /// The subnets in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = Ipv4Net> + '_ {
        let step = self.step();
        let len = self.len;
        let count = self.len();
        (0..count).filter_map(move |i| {
            let a = self.min.checked_add(u32::try_from(i).ok()?.checked_mul(step)?)?;
            Ipv4Net::new(Ipv4Addr::from(a), len).ok()
        })
    }
}

/// flannel's etcd key for a subnet: `10.244.1.0-24`.
pub fn subnet_key(net: &Ipv4Net) -> String {
    format!("{}-{}", net.network(), net.prefix_len())
}

/// Parses a flannel subnet key. The dual-stack form (`v4-24&v6-64`) yields its IPv4 half.
pub fn parse_subnet_key(key: &str) -> Option<Ipv4Net> {
    let v4 = key.split('&').next()?;
    let (addr, len) = v4.rsplit_once('-')?;
    let net = Ipv4Net::new(addr.parse().ok()?, len.parse().ok()?).ok()?;
    // A key whose address has host bits set is not one flannel or Weft ever wrote.
    (net.trunc() == net).then_some(net)
}

/// The first usable address of a subnet (the gateway address pods use, `.1` for a /24).
pub fn first_host(net: &Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()) + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn keys_round_trip() {
        assert_eq!(subnet_key(&net("10.244.1.0/24")), "10.244.1.0-24");
        assert_eq!(parse_subnet_key("10.244.1.0-24"), Some(net("10.244.1.0/24")));
        assert_eq!(parse_subnet_key("10.244.1.0-24&fc00::-64"), Some(net("10.244.1.0/24")));
        assert_eq!(parse_subnet_key("10.244.1.3-24"), None);
        assert_eq!(parse_subnet_key("garbage"), None);
        assert_eq!(parse_subnet_key("10.244.1.0-40"), None);
    }

    #[test]
    fn range_iterates_aligned_subnets() {
        let r = SubnetRange::new(24, "10.244.1.0".parse().unwrap(), "10.244.4.0".parse().unwrap());
        let all: Vec<_> = r.iter().collect();
        assert_eq!(
            all,
            vec![
                net("10.244.1.0/24"),
                net("10.244.2.0/24"),
                net("10.244.3.0/24"),
                net("10.244.4.0/24")
            ]
        );
        assert_eq!(r.len(), 4);
        assert!(r.contains(&net("10.244.3.0/24")));
        assert!(!r.contains(&net("10.244.5.0/24")));
        assert!(!r.contains(&net("10.244.0.0/24")));
        assert!(!r.contains(&net("10.244.2.0/25")));
    }

    #[test]
    fn range_reaching_the_top_of_the_address_space() {
        let r = SubnetRange::new(24, "255.255.254.0".parse().unwrap(), "255.255.255.0".parse().unwrap());
        assert_eq!(r.iter().count(), 2);
    }

    #[test]
    fn a_slash_8_split_in_slash_24s() {
        let r = SubnetRange::new(24, "10.0.1.0".parse().unwrap(), "10.255.255.0".parse().unwrap());
        assert_eq!(r.len(), 65535);
    }

    #[test]
    fn first_host_is_dot_one() {
        assert_eq!(first_host(&net("10.244.7.0/24")), Ipv4Addr::new(10, 244, 7, 1));
    }
}
