//! Nanoseconds per decision of the Wasm chain, with the firewall module from `policies/`:
//! a raw module call, a new flow through the whole chain (record, call, cache insert; the
//! firewall asked per flow), a new flow of a service the firewall answered for every source
//! port (no call), and the cached path every later packet takes, against no module at all.
//!
//! `scripts/build-policies && cargo bench -p weft-tests --bench decision`

use std::hint::black_box;
use std::net::Ipv4Addr;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use weft::packet::route::RouteTable;
use weft::packet::{build_udp, parse_ipv4};
use weft::wasm::chain::{Pipeline, WorkerChain};
use weft::wasm::instance::{Entry, HostCtx, Instance, Leases};
use weft::wasm::{Direction, Limits, ModuleSpec, Runtime};

const CONFIG: &str = r#"{"default":"allow","rules":[
 {"action":"deny","protocol":"tcp","ports":["23","135-139","445"]},
 {"action":"deny","protocol":"udp","ports":["1900","5353"]},
 {"action":"deny","src":["192.0.2.0/24","198.51.100.0/24"]},
 {"action":"log","direction":"ingress","protocol":"tcp","ports":["22"]},
 {"action":"allow","protocol":"icmp"}]}"#;

fn leases() -> RouteTable {
    let mut t = RouteTable::new("10.244.0.0/16".parse().unwrap(), 24, None);
    t.set_local("10.244.1.0/24".parse().unwrap(), Ipv4Addr::new(198, 18, 0, 1));
    for i in 2..=50u8 {
        t.insert(
            format!("10.244.{i}.0/24").parse().unwrap(),
            Ipv4Addr::new(198, 18, 0, i),
        );
    }
    t
}

/// The same rules, every flow asked: what a new flow costs when the module must be called.
fn per_flow() -> String {
    CONFIG.replacen('{', r#"{"per_flow":true,"#, 1)
}

fn pipeline(config: Option<&str>) -> Arc<Pipeline> {
    let cell = std::sync::Arc::new(arc_swap::ArcSwap::from_pointee(leases()));
    let p = Pipeline::new(
        Runtime::new(Limits::default()).unwrap(),
        Ipv4Addr::new(198, 18, 0, 1),
        cell,
    )
    .unwrap();
    p.set_own("10.244.1.0/24".parse().unwrap());
    if let Some(config) = config {
        let wasm = std::fs::read(weft_tests::policy_wasm("firewall")).unwrap();
        let st = p.load(vec![ModuleSpec::new("fw", &wasm, config.into())]);
        assert_eq!(st[0].state, "loaded", "{:?}", st[0].error);
    }
    p
}

/// `n` distinct egress flows (distinct ports and peers).
fn packets(n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let dst = Ipv4Addr::new(10, 244, 2 + (i % 40) as u8, 7);
            build_udp(
                Ipv4Addr::new(10, 244, 1, 5),
                1024 + (i / 40) as u16,
                dst,
                8080,
                64,
                &[0x42; 64],
            )
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let p = pipeline(Some(&per_flow()));
    let rt = p.runtime().clone();
    let wasm = std::fs::read(weft_tests::policy_wasm("firewall")).unwrap();
    let compiled = rt.compile(&wasm).unwrap();
    let ctx = HostCtx::new(
        &rt,
        "fw".into(),
        Arc::default(),
        Arc::new(Leases::from_pointee(leases())),
    );
    let mut inst = Instance::new(&rt, &compiled, ctx, CONFIG.as_bytes()).unwrap();
    let mut rec = [0u8; weft_guest::abi::RECORD_SIZE];
    let pkt = &packets(1)[0];
    let meta = parse_ipv4(pkt).unwrap();
    weft::wasm::flow::record(
        &meta,
        Direction::Egress,
        false,
        pkt,
        &leases(),
        weft::wasm::flow::Local {
            node: Ipv4Addr::new(198, 18, 0, 1),
        },
    )
    .encode(&mut rec);
    // The ABI's own cost: a module that answers at once (record copy-in, deadline, call, unpack).
    let trivial = wat::parse_str(
        r#"(module (memory (export "memory") 1)
          (func (export "weft_abi_version") (result i32) (i32.const 1))
          (func (export "weft_alloc") (param i32) (result i32) (i32.const 2048))
          (func (export "weft_flow") (result i32) (i32.const 1024))
          (func (export "weft_configure") (param i32 i32) (result i64) (i64.const 0))
          (func (export "weft_policy") (result i64) (i64.const 0xFFFF0000)))"#,
    )
    .unwrap();
    let tc = rt.compile(&trivial).unwrap();
    let tctx = HostCtx::new(
        &rt,
        "t".into(),
        Arc::default(),
        Arc::new(Leases::from_pointee(leases())),
    );
    let mut tinst = Instance::new(&rt, &tc, tctx, b"").unwrap();
    c.bench_function("module call: ABI overhead (module answers at once)", |b| {
        b.iter(|| black_box(tinst.call(Entry::Policy, black_box(&rec)).unwrap()))
    });
    c.bench_function("module call: firewall policy (5 rules, no match)", |b| {
        b.iter(|| black_box(inst.call(Entry::Policy, black_box(&rec)).unwrap()))
    });

    // A new flow: every decision a miss. The packet is one hot buffer whose source port
    // changes each time (a packet that just arrived is in cache too); the cache holds fewer
    // flows than the 2^20 ports and addresses cycled through.
    let mut w = WorkerChain::new(p.clone());
    w.refresh();
    let now = w.now_ms();
    let mut fresh = packets(1).remove(0);
    let mut n: u32 = 0;
    c.bench_function("chain: new flow (record, call, trace, cache insert)", |b| {
        b.iter(|| {
            n = n.wrapping_add(1);
            // Ports, not addresses: the IPv4 header (and its checksum) stays as it is.
            fresh[20..22].copy_from_slice(&(n as u16).to_be_bytes());
            fresh[22..24].copy_from_slice(&((n >> 16) as u16).to_be_bytes());
            let m = parse_ipv4(&fresh).expect("a packet");
            black_box(w.decide_parsed(Direction::Egress, &m, &fresh, now))
        })
    });
    // The same new flows, the firewall's verdicts holding for any source port (its default):
    // after the first, each is answered from the worker's verdicts for whole services.
    let wide = pipeline(Some(CONFIG));
    let mut w = WorkerChain::new(wide);
    w.refresh();
    c.bench_function(
        "chain: new flow of a service answered for any source port (no call)",
        |b| {
            b.iter(|| {
                n = n.wrapping_add(1);
                fresh[20..22].copy_from_slice(&(n as u16).to_be_bytes());
                let m = parse_ipv4(&fresh).expect("a packet");
                black_box(w.decide_parsed(Direction::Egress, &m, &fresh, now))
            })
        },
    );

    // Cached: the data path hands over the packet parsed already (the parse it needs for the
    // route lookup anyway), so this is the chain's own cost.
    let mut w = WorkerChain::new(p.clone());
    w.refresh();
    let few = packets(1024);
    let metas: Vec<_> = few.iter().map(|p| parse_ipv4(p).expect("a packet")).collect();
    let now = w.now_ms();
    for (pk, m) in few.iter().zip(&metas) {
        w.decide_parsed(Direction::Egress, m, pk, now);
    }
    let mut j = 0;
    c.bench_function("chain: cached, 1024 flows interleaved", |b| {
        b.iter(|| {
            j = (j + 1) % few.len();
            black_box(w.decide_parsed(Direction::Egress, &metas[j], &few[j], now))
        })
    });
    c.bench_function("chain: cached, same flow (a super-packet's segments)", |b| {
        b.iter(|| black_box(w.decide_parsed(Direction::Egress, black_box(&metas[0]), &few[0], now)))
    });

    let empty = pipeline(None);
    let mut w = WorkerChain::new(empty);
    w.refresh();
    c.bench_function("chain: no module loaded", |b| {
        b.iter(|| black_box(w.decide_parsed(Direction::Egress, black_box(&metas[0]), &few[0], now)))
    });

    // The one parse each packet gets, against etherparse's zero-copy slices reading the same
    // fields (IPv4 header checked, transport ports), on a 64-byte UDP packet.
    let pkt = &few[7];
    c.bench_function("parse: weft::packet::parse_ipv4 (header, checksum, ports)", |b| {
        b.iter(|| black_box(parse_ipv4(black_box(pkt)).expect("parses")))
    });
    c.bench_function("parse: etherparse Ipv4Slice + UdpHeaderSlice (same fields)", |b| {
        b.iter(|| {
            let ip = etherparse::Ipv4Slice::from_slice(black_box(pkt)).expect("parses");
            let h = ip.header();
            let sum_ok = h.header_checksum() == h.to_header().calc_header_checksum();
            let udp = etherparse::UdpHeaderSlice::from_slice(ip.payload().payload).expect("udp");
            black_box((
                h.source(),
                h.destination(),
                h.ttl(),
                sum_ok,
                udp.source_port(),
                udp.destination_port(),
            ))
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
