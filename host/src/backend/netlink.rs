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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

/// How many netlink requests one batch keeps in flight: the kernel answers each in
/// microseconds, so a few dozen outstanding hide the round trips without queueing much.
const IN_FLIGHT: usize = 64;

/// Runs `op` on every item, `IN_FLIGHT` at a time; returns how many succeeded and the first
/// error (the others are logged by `op`'s caller through `what`).
pub async fn each<T, F, Fut>(items: Vec<T>, what: &str, op: F) -> (usize, Option<NlError>)
where
    T: std::fmt::Debug + Copy,
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = Result<(), NlError>>,
{
    use futures::StreamExt;
    let mut done = 0;
    let mut first = None;
    let mut results = futures::stream::iter(items.into_iter().map(|i| {
        let fut = op(i);
        async move { (i, fut.await) }
    }))
    .buffer_unordered(IN_FLIGHT);
    while let Some((item, r)) = results.next().await {
        match r {
            Ok(()) => {
                done += 1;
                tracing::debug!(entry = ?item, "{what}");
            }
            Err(e) => {
                tracing::warn!(entry = ?item, error = %e, "{what} failed");
                first.get_or_insert(e);
            }
        }
    }
    (done, first)
}

/// Whether a failed delete only says the entry is gone already.
pub fn already_gone(e: &NlError) -> bool {
    matches!(e, NlError::Netlink(rtnetlink::Error::NetlinkError(m))
        if m.code.is_some_and(|c| c.get() == -libc::ENOENT || c.get() == -libc::ESRCH))
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

    #[test]
    fn peers_must_be_on_an_underlay_network() {
        let nets = ["198.18.0.0/24".parse().unwrap()];
        assert!(on_link("198.18.0.7".parse().unwrap(), &nets));
        assert!(!on_link("203.0.113.7".parse().unwrap(), &nets));
    }
}
