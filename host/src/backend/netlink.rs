//! What the kernel backends share: reading links, addresses and Weft's own routes over
//! rtnetlink, and the set difference every reconcile round applies. Routes carry Weft's route
//! protocol number, so reconciliation touches only Weft's routes and leaves none stale after a
//! restart.

use std::net::Ipv4Addr;

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol};
use rtnetlink::{Handle, RouteMessageBuilder};

/// The route protocol number marking Weft's routes (`ip route show proto 87`).
pub const ROUTE_PROTO: u8 = 87;

/// One kernel route Weft owns: `dst via via dev <dev> [onlink]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelRoute {
    /// The remote subnet.
    pub dst: Ipv4Net,
    /// The next hop.
    pub via: Ipv4Addr,
    /// The output interface index.
    pub dev: u32,
    /// Whether the next hop is declared on-link (it is on no network of `dev`).
    pub onlink: bool,
}

/// Why a netlink exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum NlError {
    #[error("netlink: {0}")]
    Netlink(#[from] rtnetlink::Error),
    #[error("the interface {0} is gone")]
    NoIface(String),
}

/// A netlink handle for `backend`'s `start`, its connection running on the agent's runtime
/// (returned too, for the backend's own tasks).
pub fn connect(backend: &str) -> Result<(tokio::runtime::Handle, Handle), super::BackendError> {
    let rt = tokio::runtime::Handle::try_current()
        .map_err(|e| super::BackendError::Config(format!("{backend} needs the agent's runtime: {e}")))?;
    let (conn, handle, _) = rtnetlink::new_connection()?;
    rt.spawn(conn);
    Ok((rt, handle))
}

/// What to change so the kernel holds exactly `want`: (to delete, to add).
pub fn diff<T: PartialEq + Clone>(want: &[T], have: &[T]) -> (Vec<T>, Vec<T>) {
    let del = have.iter().filter(|r| !want.contains(r)).cloned().collect();
    let add = want.iter().filter(|r| !have.contains(r)).cloned().collect();
    (del, add)
}

/// Whether `peer` is directly reachable on one of `nets` (the underlay's networks).
pub fn on_link(peer: Ipv4Addr, nets: &[Ipv4Net]) -> bool {
    nets.iter().any(|n| n.contains(&peer))
}

/// The index of the interface `name`, if it exists.
pub async fn link_index(handle: &Handle, name: &str) -> Result<Option<u32>, NlError> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(l)) => Ok(Some(l.header.index)),
        Ok(None) | Err(rtnetlink::Error::NetlinkError(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The index of the interface `name`, which must exist.
pub async fn require_link(handle: &Handle, name: &str) -> Result<u32, NlError> {
    link_index(handle, name)
        .await?
        .ok_or_else(|| NlError::NoIface(name.to_string()))
}

/// The IPv4 addresses on interface `index`, with their prefix lengths.
pub async fn addresses(handle: &Handle, index: u32) -> Result<Vec<Ipv4Net>, NlError> {
    let mut addrs = handle.address().get().set_link_index_filter(index).execute();
    let mut out = Vec::new();
    while let Some(a) = addrs.try_next().await? {
        for attr in &a.attributes {
            if let AddressAttribute::Address(std::net::IpAddr::V4(ip)) = attr {
                if let Ok(n) = Ipv4Net::new(*ip, a.header.prefix_len) {
                    out.push(n);
                }
            }
        }
    }
    Ok(out)
}

/// The networks directly reachable on interface `index`.
pub async fn networks(handle: &Handle, index: u32) -> Result<Vec<Ipv4Net>, NlError> {
    Ok(addresses(handle, index).await?.into_iter().map(|n| n.trunc()).collect())
}

/// Every route carrying Weft's protocol number.
pub async fn weft_routes(handle: &Handle) -> Result<Vec<KernelRoute>, NlError> {
    let mut routes = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    let mut have = Vec::new();
    while let Some(r) = routes.try_next().await? {
        if r.header.protocol != RouteProtocol::Other(ROUTE_PROTO) {
            continue;
        }
        if let Some(route) = parse(&r) {
            have.push(route);
        }
    }
    Ok(have)
}

/// Installs `r` (replacing a route to the same destination).
pub async fn add_route(handle: &Handle, r: KernelRoute) -> Result<(), NlError> {
    handle.route().add(message(r)).replace().execute().await?;
    Ok(())
}

/// Removes `r`.
pub async fn del_route(handle: &Handle, r: KernelRoute) -> Result<(), NlError> {
    handle.route().del(message(r)).execute().await?;
    Ok(())
}

fn message(r: KernelRoute) -> RouteMessage {
    let b = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(r.dst.network(), r.dst.prefix_len())
        .gateway(r.via)
        .output_interface(r.dev)
        .protocol(RouteProtocol::Other(ROUTE_PROTO));
    if r.onlink {
        b.onlink().build()
    } else {
        b.build()
    }
}

fn parse(r: &RouteMessage) -> Option<KernelRoute> {
    let (mut dst, mut via, mut dev) = (None, None, None);
    for a in &r.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = Some(*d),
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => via = Some(*g),
            RouteAttribute::Oif(i) => dev = Some(*i),
            _ => {}
        }
    }
    Some(KernelRoute {
        dst: Ipv4Net::new(dst?, r.header.destination_prefix_length).ok()?,
        via: via?,
        dev: dev?,
        onlink: r.header.flags.contains(RouteFlags::Onlink),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(n: &str, v: &str) -> KernelRoute {
        KernelRoute {
            dst: n.parse().unwrap(),
            via: v.parse().unwrap(),
            dev: 2,
            onlink: false,
        }
    }

    #[test]
    fn diff_removes_stale_and_moved_entries_and_adds_missing_ones() {
        let want = [r("10.244.2.0/24", "198.18.0.2"), r("10.244.3.0/24", "198.18.0.3")];
        let have = [r("10.244.3.0/24", "198.18.0.9"), r("10.244.9.0/24", "198.18.0.9")];
        let (del, add) = diff(&want, &have);
        assert_eq!(del, have.to_vec(), "moved and vanished leases go");
        assert_eq!(add, want.to_vec());
        assert_eq!(diff(&want, &want), (vec![], vec![]), "nothing to do twice");
    }

    #[test]
    fn peers_must_be_on_an_underlay_network() {
        let nets = ["198.18.0.0/24".parse().unwrap()];
        assert!(on_link("198.18.0.7".parse().unwrap(), &nets));
        assert!(!on_link("203.0.113.7".parse().unwrap(), &nets));
    }
}
