//! The Ethernet address type: VXLAN peers publish one (flannel's `VtepMAC`) and the userspace
//! VXLAN framing writes it into every frame.

use std::fmt;
use std::str::FromStr;

/// An Ethernet address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

/// A MAC address that would not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a MAC address (expected six hex pairs like 02:42:0a:f4:01:00)")]
pub struct BadMac(pub String);

impl Mac {
    /// A random unicast, locally administered address (the kernel's own choice for new
    /// devices, and never one a vendor assigned).
    pub fn random_local() -> Mac {
        let mut b: [u8; 6] = rand::random();
        b[0] = (b[0] & 0xfe) | 0x02;
        Mac(b)
    }

    /// Whether the address is unicast and locally administered.
    pub fn is_local_unicast(&self) -> bool {
        self.0[0] & 0x01 == 0 && self.0[0] & 0x02 != 0
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Mac {
    type Err = BadMac;

    fn from_str(s: &str) -> Result<Mac, BadMac> {
        let bad = || BadMac(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.trim().split([':', '-']);
        for b in &mut out {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Mac(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Mac = Mac([0x0a, 0xbb, 0xcc, 0xdd, 0xee, 0xff]);

    #[test]
    fn macs_parse_and_print_like_flannel() {
        let m: Mac = "0a:BB:cc:dd:ee:ff".parse().unwrap();
        assert_eq!(m, B);
        assert_eq!(m.to_string(), "0a:bb:cc:dd:ee:ff");
        assert_eq!("0a-bb-cc-dd-ee-ff".parse::<Mac>().unwrap(), B);
        for bad in [
            "",
            "0a:bb:cc:dd:ee",
            "0a:bb:cc:dd:ee:ff:00",
            "0a:bb:cc:dd:ee:fg",
            "a:bb:cc:dd:ee:ff",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
    }

    #[test]
    fn random_macs_are_local_unicast() {
        for _ in 0..100 {
            let m = Mac::random_local();
            assert!(m.is_local_unicast(), "{m}");
        }
        assert!(!Mac([0x01, 0, 0, 0, 0, 0]).is_local_unicast());
        assert!(!Mac([0x00, 0x11, 0, 0, 0, 0]).is_local_unicast());
    }
}
