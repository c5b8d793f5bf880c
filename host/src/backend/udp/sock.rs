//! The underlay UDP socket, with UDP GSO for sending runs of datagrams in one call and UDP GRO
//! for receiving them coalesced, each probed at run time and dropped cleanly if unsupported.

use std::io::{IoSlice, IoSliceMut};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::socket::{self, sockopt, ControlMessage, ControlMessageOwned, MsgFlags, SockaddrIn};
use socket2::{Domain, Protocol, Socket, Type};

const SOCKET_BUFFER: usize = 4 << 20;

/// The underlay socket.
pub struct UnderlaySocket {
    sock: UdpSocket,
    port: u16,
    gso: AtomicBool,
    gro: bool,
}

impl UnderlaySocket {
    /// Binds `0.0.0.0:port`; with `offload`, turns on GRO where the kernel has it and tries GSO.
    pub fn open(port: u16, offload: bool) -> std::io::Result<Self> {
        let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        // Large buffers absorb bursts while a thread is descheduled; the kernel caps them.
        let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
        let _ = s.set_send_buffer_size(SOCKET_BUFFER);
        s.bind(&SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)).into())?;
        let sock: UdpSocket = s.into();
        let gro = offload && socket::setsockopt(&sock, sockopt::UdpGroSegment, &true).is_ok();
        Ok(UnderlaySocket {
            sock,
            port,
            gso: AtomicBool::new(offload),
            gro,
        })
    }

    /// Whether received datagrams may arrive coalesced.
    pub fn gro(&self) -> bool {
        self.gro
    }

    /// Whether GSO sends are (still) in use.
    pub fn gso(&self) -> bool {
        self.gso.load(Ordering::Relaxed)
    }

    /// Sends `count` datagrams packed in `bytes` (each `segment` long but the last) to `peer`.
    pub fn send_run(&self, peer: Ipv4Addr, segment: usize, count: usize, bytes: &[u8]) -> std::io::Result<()> {
        let dst = SocketAddrV4::new(peer, self.port);
        if count > 1 && self.gso() {
            let seg = u16::try_from(segment).unwrap_or(u16::MAX);
            let addr = SockaddrIn::from(dst);
            let cmsg = [ControlMessage::UdpGsoSegments(&seg)];
            match socket::sendmsg(
                self.sock.as_raw_fd(),
                &[IoSlice::new(bytes)],
                &cmsg,
                MsgFlags::empty(),
                Some(&addr),
            ) {
                Ok(_) => return Ok(()),
                // Kernels or devices without UDP GSO say so here; fall back for good.
                Err(nix::errno::Errno::EIO | nix::errno::Errno::EINVAL | nix::errno::Errno::ENOPROTOOPT) => {
                    tracing::info!("UDP GSO unavailable; sending datagrams one by one");
                    self.gso.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(e.into()),
            }
        }
        for chunk in bytes.chunks(segment.max(1)) {
            self.sock.send_to(chunk, dst)?;
        }
        Ok(())
    }

    /// Receives into `buf`: (bytes, sender, segment size). With GRO, `bytes` may hold several
    /// datagrams of `segment` bytes each (the last may be shorter).
    pub fn recv(&self, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddrV4, usize)> {
        let mut cmsg = nix::cmsg_space!(i32);
        let mut iov = [IoSliceMut::new(buf)];
        let msg = socket::recvmsg::<SockaddrIn>(self.sock.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::empty())?;
        let n = msg.bytes;
        let mut segment = n;
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::UdpGroSegments(s) = c {
                    segment = usize::try_from(s).unwrap_or(n).max(1);
                }
            }
        }
        let from = msg
            .address
            .map(|a| SocketAddrV4::new(a.ip(), a.port()))
            .unwrap_or_else(|| SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
        Ok((n, from, segment))
    }
}
