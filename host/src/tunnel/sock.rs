//! The underlay UDP sockets, with UDP GSO for sending runs of datagrams in one call and UDP GRO
//! for receiving them coalesced, each probed at run time and dropped cleanly if unsupported.
//!
//! With several queues, every queue has a receiving socket in one `SO_REUSEPORT` group on the
//! backend's port, and the kernel picks the queue of each arriving datagram by its source
//! port (a classic BPF program on the group, [`steer`]). Queue `q > 0` sends from a port of
//! its own, `port + 840 + q` (840 is divisible by every queue count up to 8), so a peer's
//! queues each get the flows one of ours sends: a flow stays on one queue end to end (the TUN
//! device keeps it on one of its queues, the queue keeps one source port), and the peer's
//! GRO still coalesces each queue's run.

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

/// Ports a queue's sender may use beyond the receiving port: `port + 840 * k + q`.
const SENDER_STRIDE: u16 = 840;

/// How long a socket busy-polls its device in a blocking receive (`SO_BUSY_POLL`), where the
/// device supports it.
const BUSY_POLL_US: u32 = 50;

impl UnderlaySocket {
    /// Binds `0.0.0.0:port`; with `offload`, turns on GRO where the kernel has it and tries GSO.
    pub fn open(port: u16, offload: bool) -> std::io::Result<Self> {
        Self::bind(port, port, offload, false)
    }

    /// One member of the receiving group on `port` (`SO_REUSEPORT`).
    pub fn open_member(port: u16, offload: bool) -> std::io::Result<Self> {
        Self::bind(port, port, offload, true)
    }

    /// The sending socket of queue `q > 0`: bound to the first free port `port + 840k + q`,
    /// sending to peers' `port`.
    pub fn open_sender(port: u16, q: u16, offload: bool) -> std::io::Result<Self> {
        let mut last = std::io::Error::from(std::io::ErrorKind::AddrInUse);
        for k in 1..=40u16 {
            let Some(local) = port.checked_add(SENDER_STRIDE * k).and_then(|p| p.checked_add(q)) else {
                break;
            };
            match Self::bind(local, port, offload, false) {
                Ok(s) => return Ok(s),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn bind(local: u16, peer_port: u16, offload: bool, reuse: bool) -> std::io::Result<Self> {
        let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        // Large buffers absorb bursts while a thread is descheduled; the kernel caps them.
        let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
        let _ = s.set_send_buffer_size(SOCKET_BUFFER);
        if reuse {
            s.set_reuse_port(true)?;
        }
        s.set_nonblocking(true)?;
        // Where the device supports busy polling it spares a wake-up; where not it is ignored.
        let _ = s.set_busy_poll(BUSY_POLL_US);
        s.bind(&SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, local)).into())?;
        let sock: UdpSocket = s.into();
        let gro = offload && socket::setsockopt(&sock, sockopt::UdpGroSegment, &true).is_ok();
        Ok(UnderlaySocket {
            sock,
            port: peer_port,
            gso: AtomicBool::new(offload),
            gro,
        })
    }

    /// The local port.
    pub fn local_port(&self) -> u16 {
        self.sock.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// The descriptor, for waiting on it.
    pub fn fd(&self) -> std::os::fd::RawFd {
        self.sock.as_raw_fd()
    }

    /// Whether received datagrams may arrive coalesced.
    pub fn gro(&self) -> bool {
        self.gro
    }

    /// Whether GSO sends are (still) in use.
    pub fn gso(&self) -> bool {
        self.gso.load(Ordering::Relaxed)
    }

    /// Sends one datagram per slice of `run` (each `segment` long but the last) to `peer`, the
    /// kernel gathering them. A full send buffer is waited out (backpressure for the sender,
    /// not a drop).
    pub fn send_run(&self, peer: Ipv4Addr, segment: usize, run: &[IoSlice<'_>]) -> std::io::Result<()> {
        let dst = SocketAddrV4::new(peer, self.port);
        if run.len() > 1 && self.gso() {
            let seg = u16::try_from(segment).unwrap_or(u16::MAX);
            let addr = SockaddrIn::from(dst);
            let cmsg = [ControlMessage::UdpGsoSegments(&seg)];
            let sent = self.retrying(|| {
                socket::sendmsg(self.sock.as_raw_fd(), run, &cmsg, MsgFlags::empty(), Some(&addr))
                    .map(drop)
                    .map_err(std::io::Error::from)
            });
            match sent {
                Ok(()) => return Ok(()),
                // Kernels or devices without UDP GSO say so here; fall back for good.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT)) => {
                    tracing::info!("UDP GSO unavailable; sending datagrams one by one");
                    self.gso.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        for dgram in run {
            self.retrying(|| self.sock.send_to(dgram, dst).map(drop))?;
        }
        Ok(())
    }

    /// Runs `send`, waiting (up to a second in all) while the send buffer is full.
    fn retrying(&self, mut send: impl FnMut() -> std::io::Result<()>) -> std::io::Result<()> {
        for _ in 0..100 {
            match send() {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let mut pfd = libc::pollfd {
                        fd: self.fd(),
                        events: libc::POLLOUT,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd, count 1, for the duration of the call.
                    unsafe { libc::poll(&mut pfd, 1, 10) };
                }
                other => return other,
            }
        }
        Err(std::io::Error::from(std::io::ErrorKind::WouldBlock))
    }

    /// Receives into `buf` without waiting: (bytes, sender, segment size); `WouldBlock` when
    /// nothing is queued. With GRO, `bytes` may hold several datagrams of `segment` bytes each
    /// (the last may be shorter).
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

/// The classic BPF program that picks a receiving queue for each datagram of a group of
/// `queues` sockets on `port`: `(source port - port) mod queues`, read from the outer UDP header
/// (its IPv4 header has no options on Linux). Senders' queue `q` uses a source port that gives
/// `q` (see the module documentation); anything else (flannel's fixed port, kernel VXLAN's
/// hashed ports) still lands on some queue, always the same for one source port.
pub fn steering_program(port: u16, queues: u16) -> Vec<libc::sock_filter> {
    const BPF_LD: u16 = 0x00;
    const BPF_H: u16 = 0x08;
    const BPF_ABS: u16 = 0x20;
    const BPF_ALU: u16 = 0x04;
    const BPF_ADD: u16 = 0x00;
    const BPF_MOD: u16 = 0x90;
    const BPF_K: u16 = 0x00;
    const BPF_RET: u16 = 0x06;
    const BPF_A: u16 = 0x10;
    // Negative offsets from SKF_NET_OFF address the network header.
    const SKF_NET_OFF: i32 = -0x100000;
    let ins = |code: u16, k: u32| libc::sock_filter { code, jt: 0, jf: 0, k };
    // (sport - port) mod q, computed as (sport + base - port) mod q with base the first
    // multiple of 840 at or above the port: never below zero, and every q up to 8 divides 840.
    let stride = u32::from(SENDER_STRIDE);
    let base = u32::from(port).div_ceil(stride) * stride;
    vec![
        ins(BPF_LD | BPF_H | BPF_ABS, (SKF_NET_OFF + 20) as u32),
        ins(BPF_ALU | BPF_ADD | BPF_K, base - u32::from(port)),
        ins(BPF_ALU | BPF_MOD | BPF_K, u32::from(queues.max(1))),
        ins(BPF_RET | BPF_A, 0),
    ]
}

/// Attaches the steering program to the group `member` belongs to.
pub fn steer(member: &UnderlaySocket, port: u16, queues: u16) -> std::io::Result<()> {
    let prog = steering_program(port, queues);
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;
    // SAFETY: `fprog` points at `prog`, alive for the call; the kernel copies the program.
    let r = unsafe {
        libc::setsockopt(
            member.fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            &fprog as *const libc::sock_fprog as *const libc::c_void,
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The program's arithmetic, run here on the values the kernel would load.
    fn run(prog: &[libc::sock_filter], sport: u16) -> u32 {
        let mut a: u32 = 0;
        for i in prog {
            match i.code {
                0x28 => a = u32::from(sport),
                0x04 => a = a.wrapping_add(i.k),
                0x94 => a %= i.k,
                0x16 => return a,
                other => panic!("unexpected instruction {other:#x}"),
            }
        }
        unreachable!("the program returns")
    }

    #[test]
    fn each_queues_source_port_lands_on_its_queue() {
        let port = 8285;
        for queues in [1u16, 2, 3, 4, 8] {
            let prog = steering_program(port, queues);
            assert_eq!(run(&prog, port), 0, "queue 0 sends from the port itself");
            for q in 1..queues {
                for k in 1..=3 {
                    let sport = port + SENDER_STRIDE * k + q;
                    assert_eq!(run(&prog, sport), u32::from(q), "{queues} queues, sender port {sport}");
                }
            }
            assert!(run(&prog, 1) < u32::from(queues), "any port gives a valid queue");
        }
    }
}
