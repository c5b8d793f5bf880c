//! The kernel's VXLAN data path, programmed over rtnetlink: Weft owns one VXLAN device and, per
//! remote lease, a permanent neighbour, a permanent FDB entry and an onlink route, added in that
//! order (a route must never point at a gateway the kernel cannot resolve yet) and removed in
//! the reverse order. Every round reads what the kernel holds and applies only the difference,
//! so restarts leave no duplicates and no stale entries, and a device deleted by hand is
//! re-created (the kernel removed its entries with it, so they are all re-added).

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, LinkVxlan};
use tokio::sync::watch;

use super::plan::{self, Desired, Peer};
use super::wire::Mac;
use crate::backend::netlink::{self, NlError};

/// How the VXLAN device must look.
#[derive(Debug, Clone)]
pub struct DeviceSpec {
    /// Device name (`weft.<VNI>`).
    pub name: String,
    /// VXLAN network identifier.
    pub vni: u32,
    /// UDP destination port.
    pub port: u16,
    /// Local (PublicIP) address.
    pub local: Ipv4Addr,
    /// The underlay interface.
    pub underlay: String,
    /// Device MTU (underlay - 50).
    pub mtu: u32,
    /// The VTEP MAC, kept across restarts.
    pub mac: Mac,
    /// Whether TX checksum offload stays on (off works around drivers that corrupt checksums).
    pub tx_checksum_offload: bool,
}

/// The device as the kernel reports it.
#[derive(Debug, Default)]
struct Seen {
    index: u32,
    is_vxlan: bool,
    vni: Option<u32>,
    port: Option<u16>,
    local: Option<Ipv4Addr>,
    learning: Option<bool>,
    mac: Option<Vec<u8>>,
    mtu: Option<u32>,
    up: bool,
}

fn seen(l: &LinkMessage) -> Seen {
    let mut s = Seen {
        index: l.header.index,
        up: l.header.flags.contains(LinkFlags::Up),
        ..Default::default()
    };
    for a in &l.attributes {
        match a {
            LinkAttribute::Address(m) => s.mac = Some(m.clone()),
            LinkAttribute::Mtu(m) => s.mtu = Some(*m),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    match i {
                        LinkInfo::Kind(InfoKind::Vxlan) => s.is_vxlan = true,
                        LinkInfo::Data(InfoData::Vxlan(v)) => {
                            for x in v {
                                match x {
                                    InfoVxlan::Id(id) => s.vni = Some(*id),
                                    InfoVxlan::Port(p) => s.port = Some(*p),
                                    InfoVxlan::Local(a) => s.local = Some(*a),
                                    InfoVxlan::Learning(b) => s.learning = Some(*b),
                                    _ => {}
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    s
}

/// Makes the device exist as `spec` says, holding `address`/32; returns its index.
pub async fn ensure_device(handle: &Handle, spec: &DeviceSpec, address: Ipv4Addr) -> Result<u32, NlError> {
    let underlay = netlink::require_link(handle, &spec.underlay).await?;
    let mut links = handle.link().get().match_name(spec.name.clone()).execute();
    let existing = match links.try_next().await {
        Ok(l) => l.map(|l| seen(&l)),
        Err(rtnetlink::Error::NetlinkError(_)) => None,
        Err(e) => return Err(e.into()),
    };
    let index = match existing {
        Some(s)
            if s.is_vxlan
                && s.vni == Some(spec.vni)
                && s.port == Some(spec.port)
                && s.local == Some(spec.local)
                && s.learning == Some(false) =>
        {
            let mut set = LinkUnspec::new_with_index(s.index);
            let mut change = false;
            if s.mac.as_deref() != Some(&spec.mac.0[..]) {
                set = set.address(spec.mac.0.to_vec());
                change = true;
            }
            if s.mtu != Some(spec.mtu) {
                set = set.mtu(spec.mtu);
                change = true;
            }
            if !s.up {
                set = set.up();
                change = true;
            }
            if change {
                handle.link().set(set.build()).execute().await?;
                tracing::info!(device = %spec.name, "VXLAN device brought back to its settings");
            }
            s.index
        }
        other => {
            if let Some(s) = other {
                // Someone else's device, or ours with another VNI/port/address: flannel replaces it too.
                tracing::warn!(device = %spec.name, vxlan = s.is_vxlan, vni = ?s.vni, port = ?s.port, local = ?s.local,
                    "replacing a device whose settings differ");
                handle.link().del(s.index).execute().await?;
            }
            let msg = LinkVxlan::new(&spec.name, spec.vni)
                .dev(underlay)
                .port(spec.port)
                .local(spec.local)
                .learning(false)
                .mtu(spec.mtu)
                .address(spec.mac.0.to_vec())
                .up()
                .build();
            handle.link().add(msg).execute().await?;
            let index = netlink::require_link(handle, &spec.name).await?;
            tracing::info!(device = %spec.name, vni = spec.vni, port = spec.port, local = %spec.local,
                mac = %spec.mac, mtu = spec.mtu, "VXLAN device created");
            index
        }
    };
    let want = Ipv4Net::new(address, 32).map_err(|_| NlError::NoIface(spec.name.clone()))?;
    let have = netlink::addresses(handle, index).await?;
    if !have.contains(&want) {
        handle
            .address()
            .add(index, IpAddr::V4(address), 32)
            .replace()
            .execute()
            .await?;
    }
    if have.iter().any(|a| *a != want) {
        let mut addrs = handle.address().get().set_link_index_filter(index).execute();
        while let Some(a) = addrs.try_next().await? {
            let stale = a.attributes.iter().any(|x| {
                matches!(x, rtnetlink::packet_route::address::AddressAttribute::Address(IpAddr::V4(ip))
                    if Ipv4Net::new(*ip, a.header.prefix_len).ok() != Some(want))
            });
            if stale {
                handle.address().del(a).execute().await?;
            }
        }
    }
    if !spec.tx_checksum_offload {
        if let Err(e) = set_tx_checksum(&spec.name, false) {
            tracing::warn!(device = %spec.name, error = %e, "cannot turn TX checksum offload off");
        }
    }
    Ok(index)
}

/// Turns TX checksum offload on a device on or off (`ethtool -K <dev> tx off`). Some drivers
/// and virtual NICs hand VXLAN packets over with a checksum the wire never fixes; computing it
/// in software is the field-tested workaround.
pub fn set_tx_checksum(device: &str, on: bool) -> std::io::Result<()> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_STXCSUM: u32 = 0x17;
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    #[repr(C)]
    struct IfReq {
        name: [libc::c_char; libc::IFNAMSIZ],
        data: *mut EthtoolValue,
        _pad: [u8; 16],
    }
    if device.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    let mut value = EthtoolValue {
        cmd: ETHTOOL_STXCSUM,
        data: u32::from(on),
    };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: &mut value,
        _pad: [0; 16],
    };
    for (d, s) in req.name.iter_mut().zip(device.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: a plain datagram socket, closed below; the ioctl reads `req` and the value it
    // points to, both alive for the call.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let r = libc::ioctl(fd, SIOCETHTOOL as _, &mut req);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if r < 0 {
            return Err(err);
        }
    }
    Ok(())
}

/// One entry the kernel holds, with the message that deletes it.
struct Held<K> {
    key: K,
    msg: NeighbourMessage,
}

fn neigh_parts(m: &NeighbourMessage) -> (Option<Ipv4Addr>, Option<Mac>) {
    let (mut ip, mut mac) = (None, None);
    for a in &m.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(d)) => ip = Some(*d),
            // FDB entries are dumped as AF_BRIDGE, whose addresses the parser leaves raw.
            NeighbourAttribute::Destination(NeighbourAddress::Other(b)) if b.len() == 4 => {
                ip = Some(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
            }
            NeighbourAttribute::LinkLayerAddress(l) if l.len() == 6 => {
                let mut b = [0u8; 6];
                b.copy_from_slice(l);
                mac = Some(Mac(b));
            }
            _ => {}
        }
    }
    (ip, mac)
}

async fn held(handle: &Handle, family: AddressFamily, index: u32) -> Result<Vec<NeighbourMessage>, NlError> {
    let mut s = handle.neighbours().get().set_address_family(family).execute();
    let mut out = Vec::new();
    while let Some(m) = s.try_next().await? {
        if m.header.ifindex == index {
            out.push(m);
        }
    }
    Ok(out)
}

async fn neighbours(handle: &Handle, index: u32) -> Result<Vec<Held<(Ipv4Addr, Mac)>>, NlError> {
    Ok(held(handle, AddressFamily::Inet, index)
        .await?
        .into_iter()
        .filter(|m| m.header.state == NeighbourState::Permanent)
        .filter_map(|msg| match neigh_parts(&msg) {
            (Some(ip), Some(mac)) => Some(Held { key: (ip, mac), msg }),
            _ => None,
        })
        .collect())
}

async fn fdb(handle: &Handle, index: u32) -> Result<Vec<Held<(Mac, Ipv4Addr)>>, NlError> {
    Ok(held(handle, AddressFamily::Bridge, index)
        .await?
        .into_iter()
        .filter_map(|dumped| match neigh_parts(&dumped) {
            (Some(ip), Some(mac)) => Some(Held {
                key: (mac, ip),
                msg: fdb_message(index, mac, ip),
            }),
            _ => None,
        })
        .collect())
}

/// The message naming one FDB entry of the VXLAN device itself (`bridge fdb del ... self`):
/// a dumped entry carries attributes the delete request must not.
fn fdb_message(index: u32, mac: Mac, ip: Ipv4Addr) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Bridge;
    m.header.ifindex = index;
    m.header.state = NeighbourState::Permanent;
    m.header.flags = NeighbourFlags::Own;
    m.attributes = vec![
        NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()),
        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)),
    ];
    m
}

/// Removes the entries of one kind the kernel holds but `want` lacks; returns the missing ones
/// (the caller adds them in flannel's order: neighbours, then FDB entries).
async fn remove_stale<K: PartialEq + Clone + std::fmt::Debug>(
    handle: &Handle,
    what: &str,
    want: &[K],
    have: Vec<Held<K>>,
) -> Result<Vec<K>, NlError> {
    let keys: Vec<K> = have.iter().map(|h| h.key.clone()).collect();
    let (del, add) = netlink::diff(want, &keys);
    for h in have.into_iter().filter(|h| del.contains(&h.key)) {
        match handle.neighbours().del(h.msg).execute().await {
            Ok(()) => tracing::info!(entry = ?h.key, "{what} removed"),
            Err(e) => tracing::warn!(entry = ?h.key, error = %e, "cannot remove a stale {what}"),
        }
    }
    Ok(add)
}

/// Keeps the device and its entries equal to what the lease table asks for.
pub struct Reconciler {
    /// The netlink handle.
    pub handle: Handle,
    /// The device.
    pub spec: DeviceSpec,
    /// This node's subnet gateway (`<subnet>.0`), the device's address.
    pub address: Ipv4Addr,
    /// Whether DirectRouting is on.
    pub direct_routing: bool,
    /// Period of the reconcile timer.
    pub check: Duration,
}

impl Reconciler {
    /// Runs forever: a round on every change of `desired` and on every timer tick.
    pub async fn run(self, mut desired: watch::Receiver<Vec<Peer>>) {
        loop {
            let peers = desired.borrow_and_update().clone();
            if let Err(e) = self.round(&peers).await {
                tracing::warn!(error = %e, device = %self.spec.name, "VXLAN reconcile failed; retrying");
            }
            tokio::select! {
                r = desired.changed() => if r.is_err() { return },
                () = tokio::time::sleep(self.check) => {}
            }
        }
    }

    /// One round: device, then the difference in neighbours, FDB entries and routes.
    pub async fn round(&self, peers: &[Peer]) -> Result<(), NlError> {
        let h = &self.handle;
        let dev = ensure_device(h, &self.spec, self.address).await?;
        let underlay = netlink::require_link(h, &self.spec.underlay).await?;
        let nets = if self.direct_routing {
            Some(netlink::networks(h, underlay).await?)
        } else {
            None
        };
        let d: Desired = plan::desired(peers, dev, underlay, nets.as_deref());
        // Removal first, in reverse order: routes, FDB, neighbours.
        let routes = netlink::weft_routes(h).await?;
        let (del_routes, add_routes) = netlink::diff(&d.routes, &routes);
        for r in del_routes {
            match netlink::del_route(h, r).await {
                Ok(()) => tracing::info!(net = %r.dst, via = %r.via, "route removed"),
                Err(e) => tracing::warn!(net = %r.dst, error = %e, "cannot remove a stale route"),
            }
        }
        let add_fdb = remove_stale(h, "FDB entry", &d.fdb, fdb(h, dev).await?).await?;
        let add_neigh = remove_stale(h, "neighbour", &d.neighbours, neighbours(h, dev).await?).await?;
        for (ip, mac) in add_neigh {
            h.neighbours()
                .add(dev, IpAddr::V4(ip))
                .link_layer_address(&mac.0)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await?;
            tracing::info!(%ip, %mac, "neighbour added");
        }
        for (mac, ip) in add_fdb {
            h.neighbours()
                .add_bridge(dev, &mac.0)
                .destination(IpAddr::V4(ip))
                .flags(NeighbourFlags::Own)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await?;
            tracing::info!(%mac, dst = %ip, "FDB entry added");
        }
        for r in add_routes {
            netlink::add_route(h, r).await?;
            tracing::info!(net = %r.dst, via = %r.via, onlink = r.onlink, "route added");
        }
        Ok(())
    }
}
