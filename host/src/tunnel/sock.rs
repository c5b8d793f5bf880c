//! The underlay UDP sockets, with UDP GSO for sending runs of datagrams in one message and UDP
//! GRO for receiving them coalesced, each probed at run time and dropped cleanly if
//! unsupported; `sendmmsg` and `recvmmsg` move several such messages per system call, where
//! GSO and GRO cannot merge (several peers, sizes that keep changing).
//!
//! With several queues, every queue has a receiving socket in one `SO_REUSEPORT` group on the
//! backend's port, and the kernel picks the queue of each arriving datagram by its source
//! port (a classic BPF program on the group, [`steer`]). Queue `q > 0` sends from a port of
//! its own, `port + 840 + q` (840 is divisible by every queue count up to 8), so a peer's
//! queues each get the flows one of ours sends: a flow stays on one queue end to end (the TUN
//! device keeps it on one of its queues, the queue keeps one source port), and the peer's
//! GRO still coalesces each queue's run.

use std::io::IoSlice;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::socket::{self, sockopt};
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

    /// Sends each slice of `run` to `peer` with a call of its own, for a kernel or device
    /// without UDP GSO. A full send buffer is waited out (backpressure for the sender, not a
    /// drop).
    fn send_one_by_one(&self, peer: Ipv4Addr, run: &[IoSlice<'_>]) -> std::io::Result<()> {
        let dst = SocketAddrV4::new(peer, self.port);
        for dgram in run {
            self.retrying(|| self.sock.send_to(dgram, dst).map(drop))?;
        }
        Ok(())
    }

    /// Sends several runs with one `sendmmsg`: `runs[i]` is a peer, a segment size and the range
    /// of `datagrams` it sends (one GSO message per run, each datagram `segment` bytes but the
    /// last). `done(i, result)` is told the outcome of each run, in order. A full send buffer is
    /// waited out (backpressure for the sender, not a drop).
    pub fn send_runs(
        &self,
        datagrams: &[IoSlice<'_>],
        runs: &[RunSpec],
        mut done: impl FnMut(usize, std::io::Result<()>),
    ) {
        let runs = &runs[..runs.len().min(MAX_MESSAGES)];
        let one_by_one = |from: usize, done: &mut dyn FnMut(usize, std::io::Result<()>)| {
            for (k, r) in runs.iter().enumerate().skip(from) {
                done(k, self.send_one_by_one(r.peer, &datagrams[r.first..r.end]));
            }
        };
        if !self.gso() {
            return one_by_one(0, &mut done);
        }
        let mut m = Messages::new();
        for r in runs {
            m.add(
                SocketAddrV4::new(r.peer, self.port),
                r.segment,
                &datagrams[r.first..r.end],
            );
        }
        let (mut i, mut waits) = (0, 0);
        while i < runs.len() {
            let e = match m.send(self.fd(), i) {
                Ok(n) => {
                    (i..i + n).for_each(|k| done(k, Ok(())));
                    i += n;
                    continue;
                }
                Err(e) => e,
            };
            let gso_message = runs[i].end - runs[i].first > 1;
            match (e.kind(), e.raw_os_error()) {
                (std::io::ErrorKind::Interrupted, _) => {}
                (std::io::ErrorKind::WouldBlock, _) if waits < 100 => {
                    waits += 1;
                    self.wait_writable();
                }
                // Kernels or devices without UDP GSO refuse the first GSO message: this run and
                // the rest go one datagram at a time, and so does every later send.
                (_, Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT)) if gso_message => {
                    tracing::info!("UDP GSO unavailable; sending datagrams one by one");
                    self.gso.store(false, Ordering::Relaxed);
                    return one_by_one(i, &mut done);
                }
                _ => {
                    done(i, Err(e));
                    i += 1;
                }
            }
        }
    }

    /// Waits up to 10 ms for room in the send buffer.
    fn wait_writable(&self) {
        let mut pfd = libc::pollfd {
            fd: self.fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: one valid pollfd, count 1, for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, 10) };
    }

    /// Runs `send`, waiting (up to a second in all) while the send buffer is full.
    fn retrying(&self, mut send: impl FnMut() -> std::io::Result<()>) -> std::io::Result<()> {
        for _ in 0..100 {
            match send() {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => self.wait_writable(),
                other => return other,
            }
        }
        Err(std::io::Error::from(std::io::ErrorKind::WouldBlock))
    }

    /// Receives up to `bufs.len()` messages (at most [`MAX_MESSAGES`]) with one `recvmmsg`,
    /// without waiting: each into its buffer, described in `got` as (bytes, sender, GRO segment
    /// size: the datagrams' size, the last may be shorter); how many. `WouldBlock` when nothing is queued. Where GRO
    /// cannot coalesce (datagrams from several peers, sizes that keep changing) this still
    /// takes a burst in one system call.
    pub fn recv_many(&self, bufs: &mut [Vec<u8>], got: &mut [(usize, SocketAddrV4, usize)]) -> std::io::Result<usize> {
        let count = bufs.len().min(got.len()).min(MAX_MESSAGES);
        // SAFETY: plain C structs for which all-zero is valid (null pointers, zero lengths).
        let mut hdrs: [libc::mmsghdr; MAX_MESSAGES] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut addrs: [libc::sockaddr_in; MAX_MESSAGES] = unsafe { std::mem::zeroed() };
        let mut controls = [Control::default(); MAX_MESSAGES];
        let mut iovs = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; MAX_MESSAGES];
        for k in 0..count {
            iovs[k] = libc::iovec {
                iov_base: bufs[k].as_mut_ptr() as *mut libc::c_void,
                iov_len: bufs[k].len(),
            };
            let h = &mut hdrs[k].msg_hdr;
            h.msg_name = &mut addrs[k] as *mut libc::sockaddr_in as *mut libc::c_void;
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_iov = &mut iovs[k];
            h.msg_iovlen = 1;
            h.msg_control = controls[k].as_mut_ptr() as *mut libc::c_void;
            h.msg_controllen = std::mem::size_of::<Control>() as _;
        }
        // SAFETY: the first `count` headers point at live, writable buffers, addresses and
        // control buffers of the lengths given; they outlive the call.
        let n = unsafe { recv_messages(self.fd(), &mut hdrs[..count]) }?;
        for k in 0..n {
            let bytes = (hdrs[k].msg_len as usize).min(bufs[k].len());
            let segment = gro_segment(&hdrs[k].msg_hdr).unwrap_or(bytes).max(1);
            let a = &addrs[k];
            let from = SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            );
            got[k] = (bytes, from, segment);
        }
        Ok(n)
    }
}

/// One `recvmmsg` into `hdrs`, without waiting: how many messages it filled; `WouldBlock` when
/// none waits. Shared by every socket that reads bursts (the underlay here, NFQUEUE's netlink).
///
/// # Safety
/// Every header in `hdrs` must point at live buffers (iovecs, and any name or control buffer)
/// of the lengths it gives, writable for the whole call.
pub unsafe fn recv_messages(fd: std::os::fd::RawFd, hdrs: &mut [libc::mmsghdr]) -> std::io::Result<usize> {
    let count = libc::c_uint::try_from(hdrs.len()).unwrap_or(libc::c_uint::MAX);
    // SAFETY: the caller vouches for what the headers point at; `count` is within `hdrs`.
    let r = unsafe {
        libc::recvmmsg(
            fd,
            hdrs.as_mut_ptr(),
            count,
            libc::MSG_DONTWAIT as _,
            std::ptr::null_mut(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r as usize)
}

/// One run of [`UnderlaySocket::send_runs`]: datagrams `first..end` of the call's slices, for
/// `peer`, each `segment` bytes but the last.
#[derive(Debug, Clone, Copy)]
pub struct RunSpec {
    pub peer: Ipv4Addr,
    pub segment: usize,
    pub first: usize,
    pub end: usize,
}

impl RunSpec {
    /// No run, to fill arrays with.
    pub const NONE: RunSpec = RunSpec {
        peer: Ipv4Addr::UNSPECIFIED,
        segment: 0,
        first: 0,
        end: 0,
    };
}

/// Most messages one `sendmmsg` carries.
pub const MAX_MESSAGES: usize = 64;

/// Room for one `UDP_SEGMENT` (a `u16`) or `UDP_GRO` (an `int`) control message, aligned for a
/// `cmsghdr`.
type Control = [u64; 4];

/// The headers of one `sendmmsg`, built on the stack: each message's address, its GSO
/// control message and its iovecs (the caller's `IoSlice`s, ABI-compatible with `iovec`).
struct Messages {
    hdrs: [libc::mmsghdr; MAX_MESSAGES],
    addrs: [libc::sockaddr_in; MAX_MESSAGES],
    controls: [Control; MAX_MESSAGES],
    segments: [u16; MAX_MESSAGES],
    iovs: [(usize, usize); MAX_MESSAGES],
    len: usize,
}

impl Messages {
    fn new() -> Self {
        // SAFETY: mmsghdr and sockaddr_in are plain C structs for which all-zero is valid
        // (null pointers, zero lengths); every field used is set in `add` and `send`.
        unsafe { std::mem::zeroed() }
    }

    /// Adds one message: `dgrams` to `dst`, with a GSO segment size when there are several.
    fn add(&mut self, dst: SocketAddrV4, segment: usize, dgrams: &[IoSlice<'_>]) {
        let k = self.len;
        self.addrs[k] = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: dst.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*dst.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        self.segments[k] = u16::try_from(segment).unwrap_or(u16::MAX);
        self.iovs[k] = (dgrams.as_ptr() as usize, dgrams.len());
        self.len += 1;
    }

    /// Points every header from `from` on at its parts (here, so nothing moved since) and
    /// sends them; how many messages the kernel took.
    fn send(&mut self, fd: std::os::fd::RawFd, from: usize) -> std::io::Result<usize> {
        for k in from..self.len {
            let (iov, iovlen) = self.iovs[k];
            let h = &mut self.hdrs[k].msg_hdr;
            h.msg_name = &mut self.addrs[k] as *mut libc::sockaddr_in as *mut libc::c_void;
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_iov = iov as *mut libc::iovec;
            // `as _`: the field's type differs between glibc and musl.
            h.msg_iovlen = iovlen as _;
            h.msg_control = std::ptr::null_mut();
            h.msg_controllen = 0;
            if iovlen > 1 {
                let control = &mut self.controls[k];
                // SAFETY: `control` is 32 bytes aligned for a cmsghdr, more than CMSG_SPACE of a
                // u16 (24 on 64-bit Linux); the header and its data are written inside it.
                unsafe {
                    let space = libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32);
                    h.msg_control = control.as_mut_ptr() as *mut libc::c_void;
                    h.msg_controllen = space as _;
                    let c = libc::CMSG_FIRSTHDR(h);
                    (*c).cmsg_level = libc::SOL_UDP;
                    (*c).cmsg_type = libc::UDP_SEGMENT;
                    (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as _;
                    std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, self.segments[k]);
                }
            }
        }
        let count = (self.len - from) as libc::c_uint;
        // SAFETY: headers `from..len` point at live addresses, control buffers and the caller's
        // `IoSlice`s (alive for the whole `send_runs` call; std guarantees an `IoSlice` is
        // ABI-compatible with `iovec` on Unix); the kernel only reads them and writes each
        // header's `msg_len`.
        let r = unsafe { libc::sendmmsg(fd, self.hdrs[from..].as_mut_ptr(), count, 0) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(r as usize)
    }
}

/// The GRO segment size a received message's control data reports, if any.
fn gro_segment(h: &libc::msghdr) -> Option<usize> {
    // SAFETY: `h` was filled by the kernel: its control pointer and length describe the
    // control messages it wrote, which the CMSG macros walk without leaving them.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::c_int);
                return usize::try_from(v).ok();
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    None
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

    /// Three runs (two peers, GSO and single datagrams, a short last segment) in one
    /// `sendmmsg` over loopback: every datagram arrives whole, split where the runs say, and in
    /// the order sent.
    #[test]
    fn several_runs_leave_in_one_call_split_as_planned() {
        let rx = UdpSocket::bind("0.0.0.0:0").expect("receiver");
        rx.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .expect("timeout");
        let port = rx.local_addr().expect("addr").port();
        let tx = UnderlaySocket::bind(0, port, true, false).expect("sender");
        let (a, b) = (Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(127, 0, 0, 2));
        let payloads: Vec<Vec<u8>> = [(1, 100), (2, 100), (3, 60), (4, 40), (5, 300), (6, 300), (7, 10)]
            .iter()
            .map(|&(tag, len)| vec![tag as u8; len])
            .collect();
        let slices: Vec<IoSlice<'_>> = payloads.iter().map(|p| IoSlice::new(p)).collect();
        let run = |peer, segment, first, end| RunSpec {
            peer,
            segment,
            first,
            end,
        };
        let runs = [run(a, 100, 0, 3), run(b, 40, 3, 4), run(a, 300, 4, 7)];
        let mut told = Vec::new();
        tx.send_runs(&slices, &runs, |i, r| told.push((i, r.is_ok())));
        assert_eq!(told, vec![(0, true), (1, true), (2, true)]);
        assert!(tx.gso(), "loopback takes GSO messages: the sendmmsg path ran");
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        for _ in 0..payloads.len() {
            let (n, _) = rx.recv_from(&mut buf).expect("a datagram");
            got.push(buf[..n].to_vec());
        }
        assert_eq!(got, payloads, "each datagram whole, in order");
    }

    /// A GSO run, a single datagram and another run, sent in one call to a socket with GRO on:
    /// one `recvmmsg` takes all three messages, each with its segment size and sender.
    #[test]
    fn a_burst_arrives_in_one_call_with_its_gro_runs() {
        let rx = UnderlaySocket::bind(0, 0, true, false).expect("receiver");
        assert!(rx.gro(), "this kernel has UDP GRO");
        let tx = UnderlaySocket::bind(0, rx.local_port(), true, false).expect("sender");
        let payloads: Vec<Vec<u8>> = [100, 100, 100, 40, 300, 300, 10]
            .iter()
            .map(|&n| vec![n as u8; n])
            .collect();
        let slices: Vec<IoSlice<'_>> = payloads.iter().map(|p| IoSlice::new(p)).collect();
        let lo = Ipv4Addr::LOCALHOST;
        let run = |first, end, segment| RunSpec {
            peer: lo,
            segment,
            first,
            end,
        };
        tx.send_runs(&slices, &[run(0, 3, 100), run(3, 4, 40), run(4, 7, 300)], |_, r| {
            r.expect("sent");
        });
        let mut bufs = vec![vec![0u8; 65_536]; 4];
        let mut got = [(0, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0), 0); 4];
        let n = rx.recv_many(&mut bufs, &mut got).expect("three messages waiting");
        assert_eq!(n, 3);
        let shape: Vec<(usize, usize)> = got[..n].iter().map(|&(bytes, _, seg)| (bytes, seg)).collect();
        assert_eq!(shape, vec![(300, 100), (40, 40), (610, 300)]);
        assert!(got[..n]
            .iter()
            .all(|(_, from, _)| *from.ip() == lo && from.port() == tx.local_port()));
        assert_eq!(
            &bufs[2][..610],
            [payloads[4].as_slice(), &payloads[5], &payloads[6]].concat()
        );
        let again = rx.recv_many(&mut bufs, &mut got);
        assert!(matches!(again, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock));
    }

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
