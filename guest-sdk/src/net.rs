//! Address helpers modules keep needing: CIDR blocks and port ranges, parsed from config text.

use alloc::format;
use alloc::string::String;
use core::net::Ipv4Addr;

/// An IPv4 CIDR block such as `10.244.0.0/16` (a bare address means `/32`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: u32,
    mask: u32,
}

impl Cidr {
    /// Parses `a.b.c.d/len` or `a.b.c.d`; host bits are ignored.
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (
                a,
                l.parse::<u8>()
                    .ok()
                    .filter(|l| *l <= 32)
                    .ok_or_else(|| format!("bad prefix length in {s:?}"))?,
            ),
            None => (s, 32),
        };
        let addr: Ipv4Addr = addr.trim().parse().map_err(|_| format!("bad IPv4 address in {s:?}"))?;
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) };
        Ok(Cidr {
            net: u32::from(addr) & mask,
            mask,
        })
    }

    /// Whether `a` lies in the block.
    pub fn contains(&self, a: Ipv4Addr) -> bool {
        u32::from(a) & self.mask == self.net
    }
}

/// An inclusive port range such as `8000-8080` (a single port is a range of one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    lo: u16,
    hi: u16,
}

impl PortRange {
    /// Parses `p` or `lo-hi`.
    pub fn parse(s: &str) -> Result<PortRange, String> {
        let p = |t: &str| t.trim().parse::<u16>().map_err(|_| format!("bad port in {s:?}"));
        let (lo, hi) = match s.split_once('-') {
            Some((a, b)) => (p(a)?, p(b)?),
            None => (p(s)?, p(s)?),
        };
        if lo > hi {
            return Err(format!("empty port range {s:?}"));
        }
        Ok(PortRange { lo, hi })
    }

    /// A single port.
    pub fn one(p: u16) -> PortRange {
        PortRange { lo: p, hi: p }
    }

    /// Whether `p` lies in the range.
    pub fn contains(&self, p: u16) -> bool {
        (self.lo..=self.hi).contains(&p)
    }
}

/// The protocol numbers operators write by name.
pub fn protocol_number(name: &str) -> Result<Option<u8>, String> {
    match name.to_ascii_lowercase().as_str() {
        "any" | "*" => Ok(None),
        "tcp" => Ok(Some(crate::TCP)),
        "udp" => Ok(Some(crate::UDP)),
        "icmp" => Ok(Some(crate::ICMP)),
        other => other
            .parse::<u8>()
            .map(Some)
            .map_err(|_| format!("unknown protocol {name:?} (tcp, udp, icmp, any or a number)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_and_ports_parse_and_match() {
        let c = Cidr::parse("10.244.1.7/24").unwrap();
        assert!(c.contains("10.244.1.200".parse().unwrap()));
        assert!(!c.contains("10.244.2.1".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains("1.2.3.4".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.1").unwrap().contains("10.0.0.1".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("10.0.0/8").is_err());
        let r = PortRange::parse("8000-8080").unwrap();
        assert!(r.contains(8000) && r.contains(8080) && !r.contains(8081));
        assert!(PortRange::parse("9-1").is_err());
        assert_eq!(protocol_number("TCP"), Ok(Some(6)));
        assert!(protocol_number("sctpx").is_err());
    }
}
