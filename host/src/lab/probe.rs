//! Reachability probes run inside namespaces: ICMP echo and checked TCP transfers.

use std::io::{Read, Write};
use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use super::netns::enter_and_run;
use super::LabError;
use crate::packet::checksum;

/// Sends ICMP echo requests from namespace `ns` to `dst` until one is answered or `timeout`
/// passes; returns the round-trip time.
pub fn ping(ns: &str, dst: Ipv4Addr, timeout: Duration) -> Result<Duration, LabError> {
    enter_and_run(ns, move || ping_here(dst, timeout))?
}

fn ping_here(dst: Ipv4Addr, timeout: Duration) -> Result<Duration, LabError> {
    let sock = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    let id = (std::process::id() as u16) ^ (rand::random::<u16>());
    let deadline = Instant::now() + timeout;
    let mut seq: u16 = 0;
    while Instant::now() < deadline {
        seq = seq.wrapping_add(1);
        let mut req = [0u8; 16];
        req[0] = 8;
        req[4..6].copy_from_slice(&id.to_be_bytes());
        req[6..8].copy_from_slice(&seq.to_be_bytes());
        req[8..16].copy_from_slice(b"weftping");
        let c = checksum(&req);
        req[2..4].copy_from_slice(&c.to_be_bytes());
        let sent = Instant::now();
        let to = SocketAddr::V4(SocketAddrV4::new(dst, 0));
        if sock.send_to(&req, &to.into()).is_err() {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        let wait_until = (sent + Duration::from_millis(500)).min(deadline);
        while Instant::now() < wait_until {
            let mut buf = [MaybeUninit::<u8>::uninit(); 1500];
            let Ok((n, _)) = sock.recv_from(&mut buf) else { continue };
            // SAFETY: recv_from initialised the first n bytes.
            let pkt: Vec<u8> = buf[..n].iter().map(|b| unsafe { b.assume_init() }).collect();
            let Ok(meta) = crate::packet::parse_ipv4(&pkt) else {
                continue;
            };
            let icmp = &pkt[meta.header_len..];
            if meta.src == dst
                && icmp.len() >= 8
                && icmp[0] == 0
                && icmp[4..6] == id.to_be_bytes()
                && icmp[6..8] == seq.to_be_bytes()
            {
                return Ok(sent.elapsed());
            }
        }
    }
    Err(LabError::Probe(format!("no echo reply from {dst} within {timeout:?}")))
}

/// The byte at offset `i` of a checked transfer: a pattern no stuck or reordered stream matches.
fn pattern(i: u64) -> u8 {
    let x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 56) as u8 ^ (i as u8)
}

/// How long a fixed port stays taken by a listener this process has already closed.
const PORT_FREED_WITHIN: Duration = Duration::from_secs(2);

/// A listener on `addr`. A fixed port a probe just released can still read as in use: any
/// process forked (for `ip`, `nft`, the agent) before the close holds a copy of the listening
/// socket until it execs, so a bind that meets that window is retried, not failed.
fn listen(addr: (Ipv4Addr, u16)) -> std::io::Result<TcpListener> {
    let until = Instant::now() + PORT_FREED_WITHIN;
    loop {
        match TcpListener::bind(addr) {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(5));
            }
            r => return r,
        }
    }
}

/// Sends `bytes` over TCP from namespace `client_ns` to `server_ip` in `server_ns` and checks
/// every byte that arrives; returns the elapsed time.
pub fn tcp_transfer(
    server_ns: &str,
    server_ip: Ipv4Addr,
    client_ns: &str,
    bytes: u64,
    timeout: Duration,
) -> Result<Duration, LabError> {
    tcp_transfer_on(server_ns, server_ip, 0, client_ns, bytes, timeout)
}

/// [`tcp_transfer`] to a given server port (0: any free one).
pub fn tcp_transfer_on(
    server_ns: &str,
    server_ip: Ipv4Addr,
    server_port: u16,
    client_ns: &str,
    bytes: u64,
    timeout: Duration,
) -> Result<Duration, LabError> {
    let (port_tx, port_rx) = std::sync::mpsc::channel::<Result<u16, String>>();
    let sns = server_ns.to_string();
    let server = std::thread::spawn(move || -> Result<u64, LabError> {
        enter_and_run(&sns, move || -> Result<u64, LabError> {
            let l = match listen((server_ip, server_port)) {
                Ok(l) => l,
                Err(e) => {
                    let _ = port_tx.send(Err(e.to_string()));
                    return Err(e.into());
                }
            };
            let _ = port_tx.send(Ok(l.local_addr()?.port()));
            // A client that never connects must fail the probe, not hang it.
            l.set_nonblocking(true)?;
            let until = Instant::now() + timeout;
            let mut s = loop {
                match l.accept() {
                    Ok((s, _)) => break s,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < until => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            s.set_nonblocking(false)?;
            s.set_read_timeout(Some(timeout))?;
            let mut buf = vec![0u8; 64 * 1024];
            let mut off: u64 = 0;
            loop {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                for (k, b) in buf[..n].iter().enumerate() {
                    if *b != pattern(off + k as u64) {
                        return Err(LabError::Probe(format!("corrupted byte at offset {}", off + k as u64)));
                    }
                }
                off += n as u64;
            }
            s.write_all(&off.to_be_bytes())?;
            Ok(off)
        })?
    });
    let port = port_rx
        .recv_timeout(Duration::from_secs(5))
        .map_err(|_| LabError::Probe("server never started".into()))?
        .map_err(LabError::Probe)?;
    let started = Instant::now();
    let cns = client_ns.to_string();
    let client = enter_and_run(&cns, move || -> Result<u64, LabError> {
        let addr = SocketAddr::V4(SocketAddrV4::new(server_ip, port));
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_write_timeout(Some(timeout))?;
        s.set_read_timeout(Some(timeout))?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut off: u64 = 0;
        while off < bytes {
            let n = (bytes - off).min(buf.len() as u64) as usize;
            for (k, b) in buf[..n].iter_mut().enumerate() {
                *b = pattern(off + k as u64);
            }
            s.write_all(&buf[..n])?;
            off += n as u64;
        }
        s.shutdown(std::net::Shutdown::Write)?;
        let mut ack = [0u8; 8];
        s.read_exact(&mut ack)?;
        Ok(u64::from_be_bytes(ack))
    })?;
    let received = server
        .join()
        .map_err(|_| LabError::Probe("server thread panicked".into()))?;
    // The client's error says what went wrong; the server's is only its consequence.
    let acked = client?;
    let received = received?;
    if received != bytes || acked != bytes {
        return Err(LabError::Probe(format!(
            "sent {bytes} bytes, server received {received}, acknowledged {acked}"
        )));
    }
    Ok(started.elapsed())
}

/// Tries to open a TCP connection from `client_ns` to `ip:port` in `server_ns`, where a
/// listener is started for the attempt; Ok when the handshake completes within `timeout`.
/// Only [`LabError::Probe`] means the connection failed; other errors mean the probe could
/// not be set up, which says nothing about the path.
pub fn tcp_connect(
    server_ns: &str,
    ip: Ipv4Addr,
    port: u16,
    client_ns: &str,
    timeout: Duration,
) -> Result<(), LabError> {
    let listener = enter_and_run(server_ns, move || listen((ip, port)))??;
    let cns = client_ns.to_string();
    let r = enter_and_run(&cns, move || {
        TcpStream::connect_timeout(&SocketAddr::V4(SocketAddrV4::new(ip, port)), timeout).map(drop)
    })?;
    drop(listener);
    r.map_err(|e| LabError::Probe(format!("connect to {ip}:{port}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::{listen, pattern};
    use std::net::{Ipv4Addr, TcpListener};
    use std::time::Duration;

    #[test]
    fn a_port_still_held_for_a_moment_is_waited_for() {
        let held = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let port = held.local_addr().expect("addr").port();
        assert!(
            TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_err(),
            "the port is held"
        );
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            drop(held);
        });
        assert!(listen((Ipv4Addr::LOCALHOST, port)).is_ok());
        release.join().expect("release");
    }

    #[test]
    fn pattern_is_not_periodic_in_small_blocks() {
        let a: Vec<u8> = (0..4096).map(pattern).collect();
        let b: Vec<u8> = (4096..8192).map(pattern).collect();
        assert_ne!(a, b);
    }
}
