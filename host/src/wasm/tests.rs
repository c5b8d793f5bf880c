//! The host against hand-written modules, well-behaved and hostile: load-time checks, the
//! chain's verdicts and caching, failure policies, quarantine and hot swap.

use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::chain::{Decided, Pipeline, WorkerChain};
use super::flow::Scope;
use super::spec::{FailurePolicy, ModuleSpec};
use super::{check, Direction, Limits, Runtime, Verdict, WasmError};
use crate::packet::build_udp;
use crate::packet::route::RouteTable;

/// A module speaking ABI 1 whose `weft_policy` body is `policy` (record at 1024).
fn module(policy: &str) -> Vec<u8> {
    module_with(
        "",
        "(i32.const 1)",
        "(i64.const 0)",
        &format!("(func (export \"weft_policy\") (result i64) {policy})"),
    )
}

fn module_with(imports: &str, version: &str, configure: &str, decisions: &str) -> Vec<u8> {
    let text = format!(
        r#"(module
  {imports}
  (memory (export "memory") 1)
  (data (i32.const 4096) "no thanks")
  (func (export "weft_abi_version") (result i32) {version})
  (func (export "weft_alloc") (param i32) (result i32) (i32.const 2048))
  (func (export "weft_flow") (result i32) (i32.const 1024))
  (func (export "weft_configure") (param i32 i32) (result i64) {configure})
  {decisions})"#
    );
    wat::parse_str(text).expect("test module parses")
}

/// Drops UDP/TCP to destination port 7777 (record offset 18), allows the rest.
const DROP_7777: &str = "(if (result i64) (i32.eq (i32.load16_u (i32.const 1042)) (i32.const 7777)) \
    (then (i64.const 0xFFFF0001)) (else (i64.const 0xFFFF0000)))";
/// Loops forever on port 7777, allows the rest.
const LOOP_ON_7777: &str = "(if (i32.eq (i32.load16_u (i32.const 1042)) (i32.const 7777)) \
    (then (loop $l (br $l)))) (i64.const 0xFFFF0000)";

fn rt() -> Arc<Runtime> {
    Runtime::new(Limits::default()).unwrap()
}

fn a(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn pipeline(rt: Arc<Runtime>) -> Arc<Pipeline> {
    let mut t = RouteTable::new("10.244.0.0/16".parse().unwrap(), 24, None);
    t.set_local("10.244.1.0/24".parse().unwrap(), a("198.18.0.1"));
    t.insert("10.244.2.0/24".parse().unwrap(), a("198.18.0.2"));
    t.insert("10.244.3.0/24".parse().unwrap(), a("198.18.0.3"));
    let p = Pipeline::new(rt, a("198.18.0.1"), Arc::new(arc_swap::ArcSwap::from_pointee(t))).unwrap();
    p.set_own("10.244.1.0/24".parse().unwrap());
    p
}

fn spec(name: &str, wasm: &[u8]) -> ModuleSpec {
    ModuleSpec::new(name, wasm, String::new())
}

fn egress(dport: u16) -> Vec<u8> {
    build_udp(a("10.244.1.5"), 4000, a("10.244.2.7"), dport, 64, b"x")
}

#[test]
fn load_time_checks_name_the_problem() {
    let rt = Runtime::new(Limits {
        max_module_bytes: 4096,
        ..Limits::default()
    })
    .unwrap();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"hello, not wasm".to_vec(), "not a WebAssembly module"),
        (vec![0u8; 5000], "over the limit of 4096 bytes"),
        (b"\0asm\x01\0\0\0\xff".to_vec(), "invalid WebAssembly"),
        (module_with("", "(i32.const 2)", "(i64.const 0)", &format!("(func (export \"weft_policy\") (result i64) {DROP_7777})")), "ABI version 2"),
        (module_with("", "(i32.const 1)", "(i64.const 0)", ""), "exports no decision function"),
        (
            module_with(r#"(import "env" "abort" (func))"#, "(i32.const 1)", "(i64.const 0)", "(func (export \"weft_policy\") (result i64) (i64.const 0))"),
            "imports env.abort",
        ),
        (
            module_with(r#"(import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))"#, "(i32.const 1)", "(i64.const 0)", "(func (export \"weft_policy\") (result i64) (i64.const 0))"),
            "imports wasi_snapshot_preview1.fd_write",
        ),
        (
            module_with(r#"(import "weft" "log" (func (param i32)))"#, "(i32.const 1)", "(i64.const 0)", "(func (export \"weft_policy\") (result i64) (i64.const 0))"),
            "import weft.log has signature (i32) -> ()",
        ),
        (
            module_with("", "(i32.const 1)", "(i64.const 0)", "(func (export \"weft_policy\") (result i32) (i32.const 0))"),
            "export weft_policy has signature () -> (i32)",
        ),
        (
            module_with("", "(i32.const 1)", "(i64.const 0x0000100000000009)", "(func (export \"weft_policy\") (result i64) (i64.const 0))"),
            "config rejected: no thanks",
        ),
        (module("(loop $l (br $l)) (i64.const 0)"), "weft_policy timed out on a probe flow"),
        (module("(unreachable)"), "weft_policy trapped"),
        (module("(i64.const 0x300)"), "undefined verdict"),
        (
            wat::parse_str(r#"(module (memory (export "memory") 2000) (func (export "weft_abi_version") (result i32) (i32.const 1)) (func (export "weft_alloc") (param i32) (result i32) (i32.const 0)) (func (export "weft_flow") (result i32) (i32.const 0)) (func (export "weft_configure") (param i32 i32) (result i64) (i64.const 0)) (func (export "weft_policy") (result i64) (i64.const 0)))"#).unwrap(),
            "cannot instantiate",
        ),
    ];
    for (wasm, needle) in cases {
        let err = check(&rt, &wasm, b"").expect_err(needle).to_string();
        assert!(err.contains(needle), "wanted {needle:?} in {err:?}");
    }
    assert_eq!(check(&rt, &module(DROP_7777), b"").unwrap(), (true, false));
}

#[test]
fn a_policy_drops_its_flows_and_verdicts_are_cached() {
    let p = pipeline(rt());
    p.load(vec![spec("fw", &module(DROP_7777))]);
    let mut w = WorkerChain::new(p.clone());
    w.refresh();
    let now = w.now_ms();
    assert_eq!(w.decide(Direction::Egress, &egress(7777), now), Verdict::DROP);
    assert_eq!(w.decide(Direction::Egress, &egress(80), now), Verdict::PASS);
    for _ in 0..100 {
        assert_eq!(w.decide(Direction::Egress, &egress(7777), now), Verdict::DROP);
    }
    w.flush_stats();
    let (_, stats) = &p.module_stats()[0];
    assert_eq!(stats.calls.load(Ordering::Relaxed), 2, "one call per flow");
    assert_eq!(stats.cache_hits.load(Ordering::Relaxed), 100);
    // Transit traffic (neither end local) is not this node's to decide.
    let transit = build_udp(a("10.244.3.5"), 4000, a("10.244.2.7"), 7777, 64, b"x");
    assert_eq!(w.decide(Direction::Egress, &transit, now), Verdict::PASS);
    assert_eq!(
        w.decide(Direction::Egress, b"garbage", now),
        Verdict::PASS,
        "the codec drops malformed packets"
    );
}

#[test]
fn first_deny_wins_and_dry_run_enforces_nothing() {
    let p = pipeline(rt());
    let mut dry = spec("a-dry", &module("(i64.const 0xFFFF0001)"));
    dry.dry_run = true;
    let mut allow_all = spec("b-allow", &module("(i64.const 0xFFFF0000)"));
    allow_all.order = 5;
    let mut deny_all = spec("c-deny", &module("(i64.const 0xFFFF0001)"));
    deny_all.order = 9;
    p.load(vec![deny_all.clone(), allow_all.clone(), dry.clone()]);
    let mut w = WorkerChain::new(p.clone());
    w.refresh();
    assert_eq!(w.decide(Direction::Egress, &egress(80), w.now_ms()), Verdict::DROP);
    let stats = p.module_stats();
    assert_eq!(stats[0].1.dry_run_drops.load(Ordering::Relaxed), 1);
    p.load(vec![allow_all, dry]);
    w.refresh();
    assert_eq!(w.decide(Direction::Egress, &egress(80), w.now_ms()), Verdict::PASS);
}

#[test]
fn failing_modules_follow_their_failure_policy_and_are_quarantined() {
    let p = pipeline(rt());
    let mut open = spec("open", &module(LOOP_ON_7777));
    open.failure = FailurePolicy::Open;
    p.load(vec![open]);
    let mut w = WorkerChain::new(p.clone());
    w.refresh();
    let t = Instant::now();
    assert_eq!(
        w.decide(Direction::Egress, &egress(7777), w.now_ms()),
        Verdict::PASS,
        "fail-open lets it through"
    );
    assert!(
        t.elapsed() < Duration::from_millis(200),
        "the deadline interrupted the loop"
    );
    assert_eq!(w.decide(Direction::Egress, &egress(80), w.now_ms()), Verdict::PASS);
    let stats = p.module_stats()[0].1.clone();
    assert_eq!(stats.timeouts.load(Ordering::Relaxed), 1);

    let p = pipeline(rt());
    p.load(vec![spec("closed", &module(LOOP_ON_7777))]);
    let mut w = WorkerChain::new(p.clone());
    w.refresh();
    assert_eq!(
        w.decide(Direction::Egress, &egress(7777), w.now_ms()),
        Verdict::DROP,
        "fail-closed drops it"
    );
    assert_eq!(
        w.decide(Direction::Egress, &egress(80), w.now_ms()),
        Verdict::PASS,
        "other flows still pass"
    );
    // Many distinct failing flows, outnumbering the good ones, bench the module.
    let stats = p.module_stats()[0].1.clone();
    for sport in 0..25u16 {
        let pkt = build_udp(a("10.244.1.5"), 5000 + sport, a("10.244.2.7"), 7777, 64, b"x");
        assert_eq!(w.decide(Direction::Egress, &pkt, w.now_ms()), Verdict::DROP);
    }
    assert_eq!(stats.quarantines.load(Ordering::Relaxed), 1);
    w.flush_stats();
    let calls = stats.calls.load(Ordering::Relaxed);
    assert!(calls > 0, "the failing calls were counted");
    let fresh = build_udp(a("10.244.1.6"), 1, a("10.244.2.7"), 80, 64, b"x");
    assert_eq!(
        w.decide(Direction::Egress, &fresh, w.now_ms()),
        Verdict::DROP,
        "quarantined and fail-closed"
    );
    w.flush_stats();
    assert_eq!(
        stats.calls.load(Ordering::Relaxed),
        calls,
        "a quarantined module is not called"
    );
}

#[test]
fn traps_memory_bombs_and_deep_recursion_are_contained() {
    let rt = Runtime::new(Limits {
        max_memory_bytes: 4 << 20,
        ..Limits::default()
    })
    .unwrap();
    let bomb = "(if (i32.eq (i32.load16_u (i32.const 1042)) (i32.const 7777)) \
        (then (loop $l (br_if $l (i32.ne (memory.grow (i32.const 16)) (i32.const -1)))) (unreachable))) \
        (i64.const 0xFFFF0000)";
    let recurse = r#"(module
      (memory (export "memory") 1)
      (func (export "weft_abi_version") (result i32) (i32.const 1))
      (func (export "weft_alloc") (param i32) (result i32) (i32.const 2048))
      (func (export "weft_flow") (result i32) (i32.const 1024))
      (func (export "weft_configure") (param i32 i32) (result i64) (i64.const 0))
      (func $deep (param i32) (result i64)
        (if (result i64) (i32.eq (local.get 0) (i32.const 0)) (then (i64.const 0xFFFF0000))
          (else (call $deep (i32.sub (local.get 0) (i32.const 1))))))
      (func (export "weft_policy") (result i64)
        (if (result i64) (i32.eq (i32.load16_u (i32.const 1042)) (i32.const 7777))
          (then (call $deep (i32.const 100000000))) (else (i64.const 0xFFFF0000)))))"#;
    for (name, wasm) in [("bomb", module(bomb)), ("recurse", wat::parse_str(recurse).unwrap())] {
        let p = pipeline(rt.clone());
        let mut s = spec(name, &wasm);
        s.failure = FailurePolicy::Open;
        let st = p.load(vec![s]);
        assert_eq!(st[0].state, "loaded", "{name}: {:?}", st[0].error);
        let mut w = WorkerChain::new(p.clone());
        w.refresh();
        assert_eq!(
            w.decide(Direction::Egress, &egress(7777), w.now_ms()),
            Verdict::PASS,
            "{name}"
        );
        assert_eq!(
            w.decide(Direction::Egress, &egress(80), w.now_ms()),
            Verdict::PASS,
            "{name}"
        );
        let stats = p.module_stats()[0].1.clone();
        assert_eq!(stats.traps.load(Ordering::Relaxed), 1, "{name}");
    }
}

#[test]
fn a_module_that_fails_to_load_stands_in_by_its_failure_policy() {
    let p = pipeline(rt());
    let mut broken = spec("broken", b"\0asm\x01\0\0\0\x01");
    let status = p.load(vec![broken.clone()]);
    assert_eq!(status[0].state, "failed");
    assert!(status[0].error.as_deref().unwrap_or("").contains("invalid WebAssembly"));
    let mut w = WorkerChain::new(p.clone());
    w.refresh();
    assert_eq!(
        w.decide(Direction::Egress, &egress(80), w.now_ms()),
        Verdict::DROP,
        "closed by default"
    );
    broken.failure = FailurePolicy::Open;
    p.load(vec![broken]);
    w.refresh();
    assert_eq!(w.decide(Direction::Egress, &egress(81), w.now_ms()), Verdict::PASS);
    let mut tampered = spec("tampered", &module(DROP_7777));
    tampered.sha256 = "ab".repeat(32);
    assert!(p.load(vec![tampered])[0]
        .error
        .as_deref()
        .unwrap_or("")
        .contains("does not match"));
}

#[test]
fn a_swap_re_decides_flows_marking_them_established_and_keeps_unchanged_instances() {
    let p = pipeline(rt());
    // Counts calls in memory at 0: state that only survives if the instance does.
    let counting = "(i32.store (i32.const 0) (i32.add (i32.load (i32.const 0)) (i32.const 1))) \
        (if (result i64) (i32.and (i32.load8_u (i32.const 1031)) (i32.const 1)) \
          (then (i64.const 0xFFFF0002)) (else (i64.const 0xFFFF0000)))";
    let keep = spec("keep", &module(counting));
    p.load(vec![keep.clone()]);
    let mut w = WorkerChain::new(p.clone());
    w.refresh();
    let now = w.now_ms();
    assert_eq!(w.decide(Direction::Egress, &egress(80), now), Verdict::PASS);
    let stats = p.module_stats()[0].1.clone();
    assert_eq!(
        stats.verdicts(super::stats::VerdictKind::Allow),
        0,
        "counted by the worker until it publishes"
    );
    w.flush_stats();
    assert_eq!(stats.verdicts(super::stats::VerdictKind::Allow), 1);
    let mut other = spec("other", &module(DROP_7777));
    other.order = 1;
    p.load(vec![keep, other]);
    w.refresh();
    assert_eq!(w.decide(Direction::Egress, &egress(80), now), Verdict::PASS);
    // The swap published the old chain's counts; these are the new chain's.
    w.flush_stats();
    assert_eq!(
        stats.verdicts(super::stats::VerdictKind::Log),
        1,
        "the flow was re-decided with the established flag"
    );
    assert_eq!(stats.calls.load(Ordering::Relaxed), 2);
}

#[test]
fn routing_steers_to_live_nodes_only() {
    let p = pipeline(rt());
    let via = |addr: u32| {
        format!(
            "(func (export \"weft_route\") (result i64) (i64.const {}))",
            (u64::from(addr) << 32) | 0xFFFF_0001
        )
    };
    let to3 = module_with("", "(i32.const 1)", "(i64.const 0)", &via(u32::from(a("198.18.0.3"))));
    p.load(vec![spec("r", &to3)]);
    let mut w = WorkerChain::new(p.clone());
    w.refresh();
    assert!(w.relaying());
    assert_eq!(
        w.decide(Direction::Egress, &egress(80), w.now_ms()).via,
        Some(a("198.18.0.3"))
    );
    assert_eq!(
        w.decide(
            Direction::Ingress,
            &build_udp(a("10.244.2.7"), 80, a("10.244.1.5"), 4000, 64, b""),
            w.now_ms()
        ),
        Verdict::PASS,
        "routing is an egress decision"
    );
    let nowhere = module_with("", "(i32.const 1)", "(i64.const 0)", &via(u32::from(a("203.0.113.9"))));
    p.load(vec![spec("r", &nowhere)]);
    w.refresh();
    assert_eq!(w.decide(Direction::Egress, &egress(81), w.now_ms()), Verdict::PASS);
    assert_eq!(p.bad_via.load(Ordering::Relaxed), 1);
}

#[test]
fn host_functions_work_and_unknown_counter_ids_are_ignored() {
    let imports = r#"(import "weft" "counter" (func $counter (param i32 i32) (result i32)))
        (import "weft" "counter_add" (func $add (param i32 i64)))
        (import "weft" "lease_owner" (func $owner (param i32) (result i64)))
        (import "weft" "log" (func $log (param i32 i32 i32)))
        (import "weft" "now_ns" (func $now (result i64)))"#;
    // Counts "seen" by one, adds the owner of 10.244.3.1 to "owner", logs, pokes id 99.
    let body = r#"(func (export "weft_policy") (result i64)
        (call $add (call $counter (i32.const 4096) (i32.const 4)) (i64.const 1))
        (call $add (call $counter (i32.const 4100) (i32.const 5))
                   (call $owner (i32.const 0x0AF40301)))
        (call $add (i32.const 99) (i64.const 1))
        (call $log (i32.const 2) (i32.const 4096) (i32.const 9))
        (drop (call $now))
        (i64.const 0xFFFF0000))"#;
    let text = format!(
        r#"(module {imports}
  (memory (export "memory") 1)
  (data (i32.const 4096) "seenowner")
  (func (export "weft_abi_version") (result i32) (i32.const 1))
  (func (export "weft_alloc") (param i32) (result i32) (i32.const 2048))
  (func (export "weft_flow") (result i32) (i32.const 1024))
  (func (export "weft_configure") (param i32 i32) (result i64) (i64.const 0))
  {body})"#
    );
    let p = pipeline(rt());
    p.load(vec![spec("h", &wat::parse_str(text).unwrap())]);
    let mut w = WorkerChain::new(p.clone());
    w.refresh();
    w.decide(Direction::Egress, &egress(80), w.now_ms());
    let counters = p.module_stats()[0].1.counters();
    assert_eq!(counters[0], ("seen".into(), 1));
    assert_eq!(counters[1], ("owner".into(), i64::from(u32::from(a("198.18.0.3")))));
}

#[test]
fn wrong_sha_in_the_cache_is_impossible_and_a_new_version_is_compiled() {
    let rt = rt();
    let c1 = rt.compile(&module(DROP_7777)).unwrap();
    let c2 = rt.compile(&module(DROP_7777)).unwrap();
    assert!(Arc::ptr_eq(&c1, &c2), "compiled once per sha256");
    let c3 = rt.compile(&module("(i64.const 0)")).unwrap();
    assert_ne!(c1.sha256, c3.sha256);
    assert!(matches!(rt.compile(b"\0asm"), Err(WasmError::Invalid(_))));
}

/// The epoch ticker parks after an idle second (an idle node spends nothing on it), and the
/// next call wakes it: a runaway call is still cut at its deadline.
#[test]
fn a_parked_ticker_still_interrupts_the_next_runaway_call() {
    let p = pipeline(rt());
    let mut open = spec("open", &module(LOOP_ON_7777));
    open.failure = FailurePolicy::Open;
    p.load(vec![open]);
    let mut w = WorkerChain::new(p.clone());
    w.refresh();
    std::thread::sleep(Duration::from_millis(1_500));
    let t = Instant::now();
    assert_eq!(w.decide(Direction::Egress, &egress(7777), w.now_ms()), Verdict::PASS);
    assert!(
        t.elapsed() < Duration::from_millis(200),
        "the deadline fired after the idle spell"
    );
    assert_eq!(p.module_stats()[0].1.timeouts.load(Ordering::Relaxed), 1);
}

/// Drops port 7777 for any source port of the source, allows the rest for any source.
const WIDE_7777: &str = "(if (result i64) (i32.eq (i32.load16_u (i32.const 1042)) (i32.const 7777)) \
    (then (i64.const 0xFFFF0101)) (else (i64.const 0xFFFF0200)))";

fn udp_from(src: &str, sport: u16, dport: u16) -> Vec<u8> {
    build_udp(a(src), sport, a("10.244.2.7"), dport, 64, b"x")
}

fn calls(p: &Pipeline, w: &mut WorkerChain) -> Vec<u64> {
    w.flush_stats();
    p.module_stats()
        .iter()
        .map(|(_, s)| s.calls.load(Ordering::Relaxed))
        .collect()
}

fn decide(w: &mut WorkerChain, dir: Direction, pkt: &[u8]) -> Decided {
    let m = crate::packet::parse_ipv4(pkt).unwrap();
    let now = w.now_ms();
    w.decide_flow(dir, &m, pkt, now)
}

/// A node running only the WIDE_7777 module, and a worker of it.
fn wide_worker() -> (Arc<Pipeline>, WorkerChain) {
    let p = pipeline(rt());
    p.load(vec![spec("wide", &module(WIDE_7777))]);
    let mut w = WorkerChain::new(p.clone());
    w.refresh();
    (p, w)
}

#[test]
fn a_wide_verdict_answers_its_services_new_flows_without_a_call() {
    let (p, mut w) = wide_worker();
    let e = Direction::Egress;
    let first = decide(&mut w, e, &udp_from("10.244.1.5", 4000, 7777));
    assert_eq!(first.verdict, Verdict::DROP);
    assert_eq!(first.wide, Some((Scope::AnySourcePort, u64::MAX)));
    for sport in 4001..4101 {
        let d = decide(&mut w, e, &udp_from("10.244.1.5", sport, 7777));
        assert_eq!(d, first, "source port {sport}");
    }
    assert_eq!(calls(&p, &mut w), [1], "one call for a hundred and one flows");
    assert_eq!(p.wide_hits.load(Ordering::Relaxed), 100);
    // Its next packet hits the flow's own entry: that says nothing of the service.
    assert_eq!(decide(&mut w, e, &udp_from("10.244.1.5", 4001, 7777)).wide, None);
    // Any source port is not any source.
    assert_eq!(
        decide(&mut w, e, &udp_from("10.244.1.6", 4000, 7777)).verdict,
        Verdict::DROP
    );
    assert_eq!(calls(&p, &mut w), [2]);
    // Port 80 is allowed for anyone: every other source's flows are answered.
    let d = decide(&mut w, e, &udp_from("10.244.1.5", 4000, 80));
    assert_eq!(d.wide, Some((Scope::AnySource, u64::MAX)));
    for src in ["10.244.1.6", "10.244.1.7", "10.244.1.200"] {
        assert_eq!(decide(&mut w, e, &udp_from(src, 999, 80)).verdict, Verdict::PASS);
    }
    assert_eq!(calls(&p, &mut w), [3]);
    // The other direction and the other ports are services of their own.
    let ingress = build_udp(a("10.244.2.7"), 5, a("10.244.1.5"), 80, 64, b"x");
    decide(&mut w, Direction::Ingress, &ingress);
    decide(&mut w, e, &udp_from("10.244.1.5", 4000, 81));
    assert_eq!(calls(&p, &mut w), [5]);
}

#[test]
fn a_chain_answers_for_no_more_flows_than_its_narrowest_answer() {
    let p = pipeline(rt());
    let mut narrow = spec("narrow", &module("(i64.const 0xFFFF0000)"));
    narrow.order = 1;
    let logging = spec("logging", &module("(i64.const 0xFFFF0202)"));
    p.load(vec![spec("wide", &module(WIDE_7777)), narrow]);
    let mut w = WorkerChain::new(p.clone());
    w.refresh();
    for sport in 0..10 {
        let d = decide(&mut w, Direction::Egress, &udp_from("10.244.1.5", sport, 80));
        assert_eq!(d.wide, None);
    }
    // (Counters by name: narrow, wide.)
    assert_eq!(
        calls(&p, &mut w),
        [10, 10],
        "a module answering per flow is asked per flow"
    );
    // A drop by the first module ends the chain: its own scope is the chain's.
    for sport in 0..10 {
        decide(&mut w, Direction::Egress, &udp_from("10.244.1.5", sport, 7777));
    }
    assert_eq!(calls(&p, &mut w), [10, 11]);
    // A logged flow is logged one by one, whatever scope came with it.
    p.load(vec![logging]);
    w.refresh();
    for sport in 0..5 {
        assert_eq!(
            decide(&mut w, Direction::Egress, &udp_from("10.244.1.5", sport, 80)).wide,
            None
        );
    }
    assert_eq!(calls(&p, &mut w), [5]);
    // So is a protocol without ports.
    p.load(vec![spec("wide", &module(WIDE_7777))]);
    w.refresh();
    for id in 0..5 {
        let ping = crate::packet::build_icmp_echo(a("10.244.1.5"), a("10.244.2.7"), id, 1, 64);
        assert_eq!(decide(&mut w, Direction::Egress, &ping).wide, None);
    }
    assert_eq!(calls(&p, &mut w), [5]);
}

#[test]
fn wide_verdicts_lapse_with_the_chain_and_the_lease_table() {
    let rt = rt();
    let mut t = RouteTable::new("10.244.0.0/16".parse().unwrap(), 24, None);
    t.set_local("10.244.1.0/24".parse().unwrap(), a("198.18.0.1"));
    t.insert("10.244.2.0/24".parse().unwrap(), a("198.18.0.2"));
    let leases = Arc::new(arc_swap::ArcSwap::from_pointee(t.clone()));
    let p = Pipeline::new(rt, a("198.18.0.1"), leases.clone()).unwrap();
    p.set_own("10.244.1.0/24".parse().unwrap());
    let changes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = changes.clone();
    p.on_change(move |g| seen.lock().unwrap().push(g));
    let wide = spec("wide", &module(WIDE_7777));
    p.load(vec![wide.clone()]);
    assert_eq!(*changes.lock().unwrap(), [p.generation()], "a load is announced");
    let mut w = WorkerChain::new(p.clone());
    w.refresh();
    let e = Direction::Egress;
    decide(&mut w, e, &udp_from("10.244.1.5", 1, 80));
    decide(&mut w, e, &udp_from("10.244.1.5", 2, 80));
    assert_eq!(calls(&p, &mut w), [1]);
    let epoch = w.epoch();
    // The node moved to another peer: the module may have read the old owner.
    let mut moved = t.clone();
    moved.insert("10.244.2.0/24".parse().unwrap(), a("198.18.0.9"));
    moved.follows(&leases.load());
    leases.store(Arc::new(moved));
    w.refresh();
    assert_ne!(w.epoch(), epoch);
    assert_eq!(p.lease_generation(), 1);
    decide(&mut w, e, &udp_from("10.244.1.5", 3, 80));
    decide(&mut w, e, &udp_from("10.244.1.5", 4, 80));
    assert_eq!(calls(&p, &mut w), [2], "asked once more, then answered again");
    // A new chain (the same module, configured anew) asks again too.
    let mut again = wide;
    again.config = "{}".into();
    p.load(vec![again]);
    w.refresh();
    decide(&mut w, e, &udp_from("10.244.1.5", 5, 80));
    decide(&mut w, e, &udp_from("10.244.1.5", 6, 80));
    assert_eq!(
        calls(&p, &mut w),
        [3],
        "the reconfigured module's first call, then none"
    );
    assert_eq!(changes.lock().unwrap().len(), 2);
}

#[test]
fn a_flow_in_flight_across_a_swap_is_asked_about_itself() {
    let (p, mut w) = wide_worker();
    let e = Direction::Egress;
    decide(&mut w, e, &udp_from("10.244.1.5", 1, 80));
    p.load(vec![spec("wide2", &module(WIDE_7777))]);
    w.refresh();
    // A new flow decides the service for the new chain...
    assert!(decide(&mut w, e, &udp_from("10.244.1.5", 2, 80)).wide.is_some());
    // ...but the flow from before the swap is in flight: its own question, its own answer.
    assert_eq!(decide(&mut w, e, &udp_from("10.244.1.5", 1, 80)).wide, None);
    assert_eq!(calls(&p, &mut w), [2]);
}

#[test]
fn reading_the_same_modules_again_changes_nothing() {
    let p = pipeline(rt());
    let specs = vec![spec("wide", &module(WIDE_7777))];
    p.load(specs.clone());
    let g = p.generation();
    let mut w = WorkerChain::new(p.clone());
    w.refresh();
    decide(&mut w, Direction::Egress, &udp_from("10.244.1.5", 1, 80));
    let statuses = p.load(specs.clone());
    assert_eq!(statuses[0].state, "loaded", "the status is reported all the same");
    assert_eq!(p.generation(), g, "no new chain for the same modules");
    w.refresh();
    assert_eq!(
        decide(&mut w, Direction::Egress, &udp_from("10.244.1.5", 1, 80)).verdict,
        Verdict::PASS
    );
    decide(&mut w, Direction::Egress, &udp_from("10.244.1.5", 2, 80));
    assert_eq!(calls(&p, &mut w), [1], "cached verdicts and wide ones stand");
    p.load(vec![]);
    assert_ne!(p.generation(), g, "removing the modules is a change");
}

#[test]
fn the_bench_catches_a_module_whose_verdicts_differ_inside_their_scope() {
    use super::replay::{Bench, Flow, Node};
    let node = Node {
        ip: a("198.18.0.1"),
        subnet: "10.244.1.0/24".parse().unwrap(),
        network: "10.244.0.0/16".parse().unwrap(),
    };
    // Drops odd source ports, yet says the verdict holds for any source port.
    let liar = "(i64.or (i64.const 0xFFFF0100) \
        (i64.extend_i32_u (i32.and (i32.load16_u (i32.const 1040)) (i32.const 1))))";
    let flow = |sport| Flow {
        direction: Direction::Egress,
        packet: udp_from("10.244.1.5", sport, 80),
    };
    let mut bench = Bench::new(rt(), vec![spec("liar", &module(liar))], node, &[]).unwrap();
    let o = bench.decide(&flow(4000));
    assert_eq!((o.verdict, o.scope), (Verdict::PASS, Scope::AnySourcePort));
    let why = o.broken_scope.expect("a false scope is caught");
    assert!(
        why.contains("any source port") && why.contains(":4001") && why.contains("drop"),
        "{why}"
    );
    let mut honest = Bench::new(rt(), vec![spec("wide", &module(WIDE_7777))], node, &[]).unwrap();
    for f in [flow(4000), flow(4001)] {
        assert_eq!(honest.decide(&f).broken_scope, None);
    }
    assert_eq!(honest.decide(&flow(1)).scope, Scope::AnySource);
}

/// Every worker meets a swapped-in chain at the same moment (the two threads of a queue, the
/// other queues, the preparer refilling after the first take), and each must find its instance
/// ready: a closed module with none would drop the flow it was asked about.
#[test]
fn workers_meeting_a_new_chain_together_each_find_an_instance() {
    const WORKERS: usize = 4;
    const SWAPS: u16 = 150;
    let p = pipeline(rt());
    let allow = module("(i64.const 0xFFFF0000)");
    let version = |v: u16| ModuleSpec::new("gate", &allow, format!("{{\"v\":{v}}}"));
    p.load(vec![version(0)]);
    let start = Arc::new(std::sync::Barrier::new(WORKERS + 1));
    let done = Arc::new(std::sync::Barrier::new(WORKERS + 1));
    let threads: Vec<_> = (0..WORKERS)
        .map(|t| {
            let (p, start, done) = (p.clone(), start.clone(), done.clone());
            std::thread::spawn(move || {
                let mut w = WorkerChain::new(p);
                // Every worker is counted before the first swap prepares their instances.
                done.wait();
                let mut dropped = 0;
                for v in 1..=SWAPS {
                    start.wait();
                    w.refresh();
                    let pkt = udp_from("10.244.1.5", v * WORKERS as u16 + t as u16, 80);
                    if w.decide(Direction::Egress, &pkt, w.now_ms()) != Verdict::PASS {
                        dropped += 1;
                    }
                    done.wait();
                }
                dropped
            })
        })
        .collect();
    done.wait();
    for v in 1..=SWAPS {
        p.load(vec![version(v)]);
        start.wait();
        done.wait();
    }
    let dropped: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(dropped, 0, "flows met a worker with no instance of the new module");
}

/// Loops a thousand times the flow's destination port, then allows.
const COUNT_TO_PORT: &str = "(local $n i32) \
    (local.set $n (i32.mul (i32.load16_u (i32.const 1042)) (i32.const 1000))) \
    (loop $l (local.set $n (i32.sub (local.get $n) (i32.const 1))) \
      (br_if $l (i32.gt_s (local.get $n) (i32.const 0)))) \
    (i64.const 0xFFFF0000)";

/// Takes the thread that received it off the CPU for 10 ms, as a saturated node's scheduler
/// would.
extern "C" fn nap(_: libc::c_int) {
    let ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 10_000_000,
    };
    // SAFETY: nanosleep is async-signal-safe; ts outlives the call.
    unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
}

/// A call that needs a fraction of its CPU budget but is kept off the CPU for longer than the
/// budget finishes with its answer: the deadline counts CPU, not wall time. (With wall-clock
/// deadlines a closed module dropped a flow whenever a busy node held its worker off a core.)
#[test]
fn a_call_kept_off_the_cpu_is_not_cut_short() {
    use std::sync::atomic::AtomicBool;
    let cpu = super::limit::thread_cpu;
    // A budget of 20 ms, so the CPU the loops below take among other tests (up to three times
    // their calibration) stays well within it, and the wall time asserted below outlasts it.
    let limits = Limits {
        call_deadline: Duration::from_millis(20),
        ..Limits::default()
    };
    let p = pipeline(Runtime::new(limits).unwrap());
    p.load(vec![spec("count", &module(COUNT_TO_PORT))]);
    let mut w = WorkerChain::new(p.clone());
    w.refresh();
    // Loops that take about 3 ms of CPU here, timed on flows after the first (which also
    // takes the worker's instance).
    let per_200 = (0..4)
        .map(|i| {
            let t = cpu();
            let pkt = build_udp(a("10.244.1.5"), 4001 + i, a("10.244.2.7"), 200, 64, b"x");
            assert_eq!(w.decide(Direction::Egress, &pkt, w.now_ms()), Verdict::PASS);
            cpu() - t
        })
        .skip(1)
        .min()
        .unwrap_or_default()
        .max(Duration::from_micros(1));
    let port = (200.0 * 3e-3 / per_200.as_secs_f64()).clamp(1.0, 65_535.0) as u16;
    // SAFETY: nap only calls nanosleep, which is async-signal-safe; nothing else here uses
    // SIGUSR1.
    unsafe { libc::signal(libc::SIGUSR1, nap as *const () as libc::sighandler_t) };
    // SAFETY: pthread_self() is always valid for the calling thread.
    let me = unsafe { libc::pthread_self() } as usize;
    let calling = Arc::new(AtomicBool::new(true));
    let kicker = {
        let calling = calling.clone();
        std::thread::spawn(move || {
            while calling.load(Ordering::SeqCst) {
                // SAFETY: the test thread outlives this loop: it clears `calling`, then joins.
                unsafe { libc::pthread_kill(me as libc::pthread_t, libc::SIGUSR1) };
                // The nap plus 0.2 ms: the call runs in slices of a fifth of a millisecond.
                std::thread::sleep(Duration::from_micros(10_200));
            }
        })
    };
    let (start, c0) = (Instant::now(), cpu());
    let v = w.decide(Direction::Egress, &egress(port), w.now_ms());
    let (wall, used) = (start.elapsed(), cpu() - c0);
    calling.store(false, Ordering::SeqCst);
    kicker.join().unwrap();
    let timeouts = p.module_stats()[0].1.timeouts.load(Ordering::Relaxed);
    assert_eq!(
        (v, timeouts),
        (Verdict::PASS, 0),
        "cut short after {used:?} of CPU, {wall:?} of wall time"
    );
    assert!(
        wall > Duration::from_millis(20),
        "the call was not kept waiting ({wall:?} for {used:?} of CPU), so this proves nothing"
    );
}

/// A runaway call with a budget longer than the ticker's idle second still ends at its budget:
/// it keeps the ticker awake by looking. (Before, the ticker parked a second after the call
/// started, the call's next look never came, and it ran forever: a configure of 500 ms of CPU
/// on a thread that got less than half a core did the same.)
#[test]
fn a_runaway_call_with_a_budget_past_the_tickers_idle_second_ends() {
    let limits = Limits {
        call_deadline: Duration::from_millis(1_500),
        ..Limits::default()
    };
    let p = pipeline(Runtime::new(limits).unwrap());
    let mut s = spec("spin", &module(LOOP_ON_7777));
    s.failure = FailurePolicy::Open;
    p.load(vec![s]);
    let (tx, rx) = std::sync::mpsc::channel();
    let caller = {
        let p = p.clone();
        std::thread::spawn(move || {
            let mut w = WorkerChain::new(p);
            w.refresh();
            let started = (Instant::now(), super::limit::thread_cpu());
            let v = w.decide(Direction::Egress, &egress(7777), w.now_ms());
            let _ = tx.send((v, started.0.elapsed(), super::limit::thread_cpu() - started.1));
        })
    };
    let (v, wall, cpu) = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the runaway call was still running after 30 s: its deadline never fired");
    caller.join().unwrap();
    assert_eq!(v, Verdict::PASS, "fail-open");
    assert_eq!(p.module_stats()[0].1.timeouts.load(Ordering::Relaxed), 1);
    assert!(
        cpu >= Duration::from_millis(1_500) && cpu < Duration::from_millis(1_800),
        "interrupted after {cpu:?} of CPU ({wall:?} of wall time), budget 1.5 s"
    );
}

/// The node's report, as the store holds it: (state, error) per module.
async fn reported(store: &dyn crate::lease::LeaseStore) -> Vec<(String, Option<String>)> {
    let (_, nodes) = super::registry::list(store).await.unwrap();
    nodes
        .first()
        .map(|n| n.modules.iter().map(|m| (m.state.clone(), m.error.clone())).collect())
        .unwrap_or_default()
}

/// Polls the report for 10 s (a report waits 3 s for the kernel path before it says pending).
async fn report_is(store: &dyn crate::lease::LeaseStore, state: &str, error_has: &str) -> bool {
    for _ in 0..500 {
        let r = reported(store).await;
        if r.len() == 1 && r[0].0 == state && r[0].1.as_deref().unwrap_or("").contains(error_has) {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    false
}

/// A node at 198.18.0.1 following the modules of a fresh embedded store for `p`, whose kernel
/// path put the empty chain in force: the store, its folder and the follower's task.
fn following(
    p: &Arc<Pipeline>,
) -> (
    Arc<dyn crate::lease::LeaseStore>,
    tempfile::TempDir,
    tokio::task::JoinHandle<()>,
) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn crate::lease::LeaseStore> =
        Arc::new(crate::lease::embedded::EmbeddedStore::open(&dir.path().join("s.db")).unwrap());
    p.enforcer().applied(p.generation());
    let (first, _) = tokio::sync::watch::channel(false);
    let follow = tokio::spawn(super::registry::follow(
        store.clone(),
        p.clone(),
        a("198.18.0.1"),
        std::time::Duration::from_secs(1),
        first,
    ));
    (store, dir, follow)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_reads_loaded_only_once_the_kernel_path_asks_it() {
    use crate::lease::DocKind;
    let p = pipeline(rt());
    // A kernel path that will be slow with the next chain.
    let (store, _dir, follow) = following(&p);
    let s = spec("fw", &module(DROP_7777));
    store.put_doc(DocKind::Module, "fw", &s.to_json()).await.unwrap();
    assert!(
        report_is(&*store, "pending", "rules are being installed").await,
        "{:?}",
        reported(&*store).await
    );
    p.enforcer().applied(p.generation());
    assert!(report_is(&*store, "loaded", "").await, "{:?}", reported(&*store).await);
    assert_eq!(reported(&*store).await[0].1, None);

    p.enforcer()
        .failed("iptables-restore refused the rules: no table".into());
    assert!(
        report_is(
            &*store,
            "pending",
            "not in force on the kernel path: iptables-restore refused"
        )
        .await,
        "{:?}",
        reported(&*store).await
    );
    p.enforcer().applied(p.generation());
    assert!(report_is(&*store, "loaded", "").await, "{:?}", reported(&*store).await);
    follow.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kernel_path_that_keeps_up_costs_one_report_and_no_pending() {
    use crate::lease::DocKind;
    let p = pipeline(rt());
    // Like the rules thread: woken by the change, in force 100 ms later.
    let weak = Arc::downgrade(&p);
    p.on_change(move |g| {
        let weak = weak.clone();
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            if let Some(p) = weak.upgrade() {
                p.enforcer().applied(g);
            }
        });
    });
    let (store, _dir, follow) = following(&p);
    let started = std::time::Instant::now();
    store
        .put_doc(DocKind::Module, "fw", &spec("fw", &module(DROP_7777)).to_json())
        .await
        .unwrap();
    let mut seen = Vec::new();
    while started.elapsed() < std::time::Duration::from_secs(2) {
        let r = reported(&*store).await;
        if seen.last() != Some(&r) {
            seen.push(r);
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let loaded = vec![("loaded".to_string(), None)];
    assert_eq!(seen.last(), Some(&loaded), "{seen:?}");
    assert!(
        seen.iter().all(|r| r.is_empty() || *r == loaded),
        "reported something else on the way: {seen:?}"
    );
    follow.abort();
}
