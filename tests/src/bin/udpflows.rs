//! Many concurrent UDP flows of small packets, for the data path benchmark (a rate iperf3
//! cannot make: it opens at most 128 streams, each a thread).
//!
//! `udpflows recv <ip> <port> <seconds>`: counts datagrams on one socket, prints kpps received.
//! `udpflows send <ip> <port> <flows> <seconds> <bytes>`: sends from `flows` sockets (one source
//! port each) round robin, as fast as the path takes them. `<bytes>` as `lo-hi` (e.g. `64-1400`)
//! gives datagrams of sizes spread over that range, changing from one datagram to the next (a
//! mix GSO and GRO cannot coalesce, as request-response traffic of many flows is).

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or_else(|| usage());
    let addr: SocketAddr = format!("{}:{}", arg(2), arg(3)).parse().unwrap_or_else(|_| usage());
    match arg(1) {
        "recv" => recv(addr, secs(arg(4))),
        "send" => {
            let flows: usize = arg(4).parse().unwrap_or_else(|_| usage());
            send(addr, flows, secs(arg(5)), sizes(arg(6)))
        }
        _ => usage(),
    }
}

/// The datagram sizes to cycle through: one size, or 61 spread over `lo-hi` in a scrambled order.
fn sizes(s: &str) -> Vec<usize> {
    let num = |t: &str| t.parse::<usize>().ok().filter(|&n| (1..=65_000).contains(&n));
    match s.split_once('-') {
        None => vec![num(s).unwrap_or_else(|| usage())],
        Some((lo, hi)) => {
            let (lo, hi) = (num(lo).unwrap_or_else(|| usage()), num(hi).unwrap_or_else(|| usage()));
            if lo > hi {
                usage();
            }
            // 61 is prime, so stepping by 23 visits every size once in an order that keeps changing.
            (0..61).map(|i| lo + (hi - lo) * ((i * 23) % 61) / 60).collect()
        }
    }
}

fn secs(s: &str) -> Duration {
    Duration::from_secs_f64(s.parse().unwrap_or_else(|_| usage()))
}

fn usage() -> ! {
    eprintln!(
        "usage: udpflows recv <ip> <port> <seconds> | udpflows send <ip> <port> <flows> <seconds> <bytes | lo-hi>"
    );
    std::process::exit(2)
}

fn recv(addr: SocketAddr, secs: Duration) {
    let s = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
    let mut buf = [0u8; 2048];
    // The clock starts with the first datagram and stops at the last: no idle time counted.
    let (mut n, mut first, mut last) = (0u64, None, Instant::now());
    let deadline = Instant::now() + secs + Duration::from_secs(5);
    while Instant::now() < deadline {
        match s.recv(&mut buf) {
            Ok(_) => {
                let now = Instant::now();
                first.get_or_insert(now);
                last = now;
                n += 1;
            }
            Err(_) if first.is_some() && last.elapsed() > Duration::from_millis(500) => break,
            Err(_) => {}
        }
    }
    let span = first.map_or(0.0, |f| last.duration_since(f).as_secs_f64());
    println!("{:.1}", if span > 0.0 { n as f64 / span / 1000.0 } else { 0.0 });
}

fn send(addr: SocketAddr, flows: usize, secs: Duration, sizes: Vec<usize>) {
    let socks: Vec<UdpSocket> = (0..flows)
        .map(|_| {
            let s = UdpSocket::bind("0.0.0.0:0").expect("bind a flow");
            s.connect(addr).expect("connect");
            s
        })
        .collect();
    let payload = vec![0x5au8; sizes.iter().copied().max().unwrap_or(1)];
    let end = Instant::now() + secs;
    let (mut i, mut k) = (0, 0);
    while Instant::now() < end {
        for s in &socks {
            // A full buffer is the path saying "slower": go on with the next flow.
            let _ = s.send(&payload[..sizes[k]]);
            k = (k + 1) % sizes.len();
        }
        i += 1;
    }
    eprintln!("sent {} rounds over {flows} flows", i);
}
