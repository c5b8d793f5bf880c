//! Finding the underlay interface, its address and its MTU.

use std::net::Ipv4Addr;

use nix::ifaddrs::getifaddrs;
use nix::net::if_::InterfaceFlags;

/// Why the underlay could not be determined.
#[derive(Debug, thiserror::Error)]
pub enum IfaceError {
    #[error("interface {0:?} not found or has no IPv4 address")]
    NoSuchInterface(String),
    #[error("no interface holds --public-ip {0}")]
    NoInterfaceForIp(Ipv4Addr),
    #[error(
        "no usable interface: no default route and no up, non-loopback interface with an IPv4 address; pass --iface"
    )]
    NothingUsable,
    #[error("cannot list interfaces: {0}")]
    Sys(#[from] nix::Error),
    #[error("cannot read the MTU of {iface}: {reason}")]
    Mtu { iface: String, reason: String },
}

/// The chosen underlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Underlay {
    /// Interface name.
    pub iface: String,
    /// Its IPv4 address (the default PublicIP).
    pub addr: Ipv4Addr,
    /// Its MTU.
    pub mtu: u32,
}

fn ipv4_addrs() -> Result<Vec<(String, Ipv4Addr, InterfaceFlags)>, IfaceError> {
    Ok(getifaddrs()?
        .filter_map(|i| {
            let a = i.address?.as_sockaddr_in()?.ip();
            Some((i.interface_name, a, i.flags))
        })
        .collect())
}

/// The interface of the IPv4 default route, from `/proc/net/route` (per network namespace).
fn default_route_iface() -> Option<String> {
    let text = std::fs::read_to_string("/proc/net/route").ok()?;
    text.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 7 && f[1] == "00000000" && f[7] == "00000000").then(|| f[0].to_string())
    })
}

fn mtu_of(iface: &str) -> Result<u32, IfaceError> {
    let path = format!("/sys/class/net/{iface}/mtu");
    std::fs::read_to_string(&path)
        .map_err(|e| e.to_string())
        .and_then(|s| s.trim().parse().map_err(|e: std::num::ParseIntError| e.to_string()))
        .map_err(|reason| IfaceError::Mtu {
            iface: iface.to_string(),
            reason,
        })
}

/// Picks the underlay as flannel does: `--iface` if given, else the interface holding
/// `--public-ip`, else the default route's interface, else the first up non-loopback one.
pub fn discover(iface: Option<&str>, public_ip: Option<Ipv4Addr>) -> Result<Underlay, IfaceError> {
    let addrs = ipv4_addrs()?;
    let (name, addr) = if let Some(want) = iface {
        let (n, a, _) = addrs
            .iter()
            .find(|(n, _, _)| n == want)
            .ok_or_else(|| IfaceError::NoSuchInterface(want.to_string()))?;
        (n.clone(), *a)
    } else if let Some(ip) = public_ip {
        let (n, a, _) = addrs
            .iter()
            .find(|(_, a, _)| *a == ip)
            .ok_or(IfaceError::NoInterfaceForIp(ip))?;
        (n.clone(), *a)
    } else if let Some((n, a, _)) = default_route_iface().and_then(|d| addrs.iter().find(|(n, _, _)| *n == d)) {
        (n.clone(), *a)
    } else {
        let (n, a, _) = addrs
            .iter()
            .find(|(_, a, f)| !a.is_loopback() && f.contains(InterfaceFlags::IFF_UP))
            .ok_or(IfaceError::NothingUsable)?;
        (n.clone(), *a)
    };
    let mtu = mtu_of(&name)?;
    Ok(Underlay {
        iface: name,
        addr: public_ip.unwrap_or(addr),
        mtu,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_found_by_name() {
        let u = discover(Some("lo"), None).unwrap();
        assert_eq!(u.addr, Ipv4Addr::LOCALHOST);
        assert!(u.mtu >= 1500);
    }

    #[test]
    fn unknown_interface_is_named_in_the_error() {
        let e = discover(Some("nope-does-not-exist"), None).unwrap_err();
        assert!(e.to_string().contains("nope-does-not-exist"));
        assert!(matches!(
            discover(None, Some(Ipv4Addr::new(203, 0, 113, 77))),
            Err(IfaceError::NoInterfaceForIp(_))
        ));
    }
}
