//! The kernel's VXLAN data path, programmed over rtnetlink: Weft owns one VXLAN device and, per
//! remote lease, a permanent neighbour, a permanent FDB entry and an onlink route, added in that
//! order (a route must never point at a gateway the kernel cannot resolve yet) and removed in
//! the reverse order. A full round reads what the kernel holds and writes only the difference,
//! so a restart adopts the device and its entries as they are and writes nothing; a lease
//! change writes only its own entries; a device deleted by hand is re-created (the kernel
//! removed its entries with it, so they are all re-added).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, LinkVxlan};

use super::plan::{self, EntrySet, FdbUsers, Links, Ops, Peer};
use super::wire::Mac;
use crate::backend::netlink::{self, NlError};
use crate::backend::reconcile::{Fatal, Kernel, KernelWrites, Peers};

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

/// The (address, MAC) pairs of the entries `family` holds on interface `index`; neighbours only
/// if permanent (the kernel's own learnt ones are not Weft's).
async fn dump(handle: &Handle, family: AddressFamily, index: u32) -> Result<Vec<(Ipv4Addr, Mac)>, NlError> {
    let mut s = handle.neighbours().get().set_address_family(family).execute();
    let mut out = Vec::new();
    while let Some(m) = s.try_next().await? {
        let mine = m.header.ifindex == index
            && (family == AddressFamily::Bridge || m.header.state == NeighbourState::Permanent);
        if let (true, (Some(ip), Some(mac))) = (mine, neigh_parts(&m)) {
            out.push((ip, mac));
        }
    }
    Ok(out)
}

/// The message naming one neighbour of the VXLAN device, for deleting it.
fn neigh_message(index: u32, ip: Ipv4Addr) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Inet;
    m.header.ifindex = index;
    m.header.state = NeighbourState::Permanent;
    m.attributes = vec![NeighbourAttribute::Destination(NeighbourAddress::Inet(ip))];
    m
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

/// The kernel side of the `vxlan` backend: the device and its entries, driven by
/// [`crate::backend::reconcile::drive`].
pub struct VxlanKernel {
    /// The netlink handle.
    pub handle: Handle,
    /// The device.
    pub spec: DeviceSpec,
    /// This node's subnet gateway (`<subnet>.0`), the device's address.
    pub address: Ipv4Addr,
    /// Whether DirectRouting is on.
    pub direct_routing: bool,
    /// What was written, for metrics.
    pub writes: Arc<KernelWrites>,
    /// The interfaces as the last full round found them.
    links: Links,
    /// Peers per FDB entry, as the last round left them.
    users: FdbUsers,
}

impl VxlanKernel {
    /// A kernel driver for `spec`; nothing is read or written until the first round.
    pub fn new(
        handle: Handle,
        spec: DeviceSpec,
        address: Ipv4Addr,
        direct_routing: bool,
        writes: Arc<KernelWrites>,
    ) -> Self {
        VxlanKernel {
            handle,
            spec,
            address,
            direct_routing,
            writes,
            links: Links::default(),
            users: FdbUsers::new(),
        }
    }

    /// Weft's entries as the kernel holds them now.
    async fn held(&self) -> Result<EntrySet, NlError> {
        let h = &self.handle;
        let dev = self.links.device;
        Ok(EntrySet {
            neighbours: dump(h, AddressFamily::Inet, dev).await?.into_iter().collect(),
            fdb: dump(h, AddressFamily::Bridge, dev)
                .await?
                .into_iter()
                .map(|(ip, mac)| (mac, ip))
                .collect(),
            routes: netlink::weft_routes(h).await?.into_iter().collect(),
        })
    }

    /// Runs `ops` in flannel's order; deletions of entries already gone count as done.
    async fn write(&self, ops: Ops) -> Result<(), NlError> {
        let h = &self.handle;
        let dev = self.links.device;
        let gone_ok = |r: Result<(), NlError>| match r {
            Err(e) if netlink::already_gone(&e) => Ok(()),
            other => other,
        };
        let (routes, _) = netlink::each(ops.del_routes, "route removed", |r| async move {
            gone_ok(netlink::del_route(h, r).await)
        })
        .await;
        let (fdb, _) = netlink::each(ops.del_fdb, "FDB entry removed", |(mac, ip)| async move {
            gone_ok(
                h.neighbours()
                    .del(fdb_message(dev, mac, ip))
                    .execute()
                    .await
                    .map_err(Into::into),
            )
        })
        .await;
        let (neigh, _) = netlink::each(ops.del_neighbours, "neighbour removed", |(ip, _)| async move {
            gone_ok(
                h.neighbours()
                    .del(neigh_message(dev, ip))
                    .execute()
                    .await
                    .map_err(Into::into),
            )
        })
        .await;
        let deleted = routes + fdb + neigh;
        let (a1, e1) = netlink::each(ops.add_neighbours, "neighbour added", |(ip, mac)| async move {
            h.neighbours()
                .add(dev, IpAddr::V4(ip))
                .link_layer_address(&mac.0)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(Into::into)
        })
        .await;
        let (a2, e2) = netlink::each(ops.add_fdb, "FDB entry added", |(mac, ip)| async move {
            h.neighbours()
                .add_bridge(dev, &mac.0)
                .destination(IpAddr::V4(ip))
                .flags(NeighbourFlags::Own)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(Into::into)
        })
        .await;
        let (a3, e3) = netlink::each(ops.add_routes, "route added", |r| netlink::add_route(h, r)).await;
        self.writes.count(a1 + a2 + a3, deleted);
        if a1 + a2 + a3 + deleted > 0 {
            tracing::info!(device = %self.spec.name, neighbours = a1, fdb = a2, routes = a3, deleted, "kernel entries written");
        }
        match e1.or(e2).or(e3) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Kernel for VxlanKernel {
    type Peer = Peer;

    async fn full(&mut self, peers: &Peers<Peer>, _first: bool) -> Result<Option<Fatal>, NlError> {
        let h = &self.handle;
        let device = ensure_device(h, &self.spec, self.address).await?;
        let underlay = netlink::require_link(h, &self.spec.underlay).await?;
        let direct = if self.direct_routing {
            Some(netlink::networks(h, underlay).await?)
        } else {
            None
        };
        self.links = Links {
            device,
            underlay,
            direct,
        };
        let want = EntrySet::of(peers.values(), &self.links);
        self.users = plan::fdb_users(peers.values(), &self.links);
        let ops = plan::full(&want, &self.held().await?);
        self.writes
            .full_rounds
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.write(ops).await.map(|()| None)
    }

    async fn delta(&mut self, _peers: &Peers<Peer>, changed: &[(Option<Peer>, Option<Peer>)]) -> Result<(), NlError> {
        let ops = plan::delta(changed, &self.links, &mut self.users);
        self.write(ops).await
    }
}
