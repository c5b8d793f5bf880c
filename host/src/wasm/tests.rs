//! The host against hand-written modules, well-behaved and hostile: load-time checks, the
//! chain's verdicts and caching, failure policies, quarantine and hot swap.

use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::chain::{Pipeline, WorkerChain};
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
        (module("(i64.const 0x100)"), "undefined verdict"),
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
