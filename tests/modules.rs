//! Wasm modules across the wire: added on one node, enforced on every node; a router steering
//! a flow through a third node; a swap under a running iperf3 flow; hostile modules refused at
//! add time or contained at run time while other traffic flows.

use std::process::Command;
use std::time::{Duration, Instant};

use weft_tests::*;

/// The sha256 `weft module add|set` printed.
fn sha_of(out: &str) -> String {
    out.split("sha256 ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .unwrap_or_else(|| panic!("no sha256 in {out:?}"))
        .to_string()
}

/// True when node `n` has module `name` at `sha` loaded (state from its metrics).
fn loaded(c: &TestCluster, n: usize, name: &str, sha: &str) -> bool {
    let Ok((_, body)) = c.lab.http_get(n, "/metrics") else {
        return false;
    };
    let want = format!("weft_module_info{{module=\"{name}\",sha256=\"{sha}\"");
    body.lines().any(|l| l.starts_with(&want) && l.ends_with(" 1"))
}

fn wait_loaded_everywhere(c: &TestCluster, name: &str, sha: &str) {
    for n in 1..=c.lab.nodes.len() {
        assert!(
            eventually(Duration::from_secs(20), || loaded(c, n, name, sha)),
            "node {n} never loaded {name} {sha}:\n{}",
            c.lab.nodes[n - 1].log_tail(30)
        );
    }
}

fn wasm_arg(name: &str) -> String {
    policy_wasm(name).display().to_string()
}

/// Runs `weft module <args>` on node `n` and waits until every node runs the code it stored.
fn store_and_wait(c: &TestCluster, n: usize, name: &str, args: &[&str]) -> String {
    let out = c
        .weft_module(n, args)
        .unwrap_or_else(|e| panic!("weft module {args:?}: {e}"));
    let sha = sha_of(&out);
    wait_loaded_everywhere(c, name, &sha);
    sha
}

#[test]
fn firewall_added_on_one_node_blocks_a_port_on_every_node() {
    let mut c = TestCluster::new("fw", StoreKind::Etcd, 3);
    c.up(1);
    let cfg = r#"{"rules":[{"action":"deny","protocol":"tcp","ports":[7777]}]}"#;
    let sha = store_and_wait(&c, 2, "fw", &["add", "fw", &wasm_arg("firewall"), "--config-json", cfg]);

    for (a, b) in [(1, 2), (2, 3), (3, 1), (2, 1)] {
        let (src, _) = c.pod(a, 1);
        let (dst_ns, dst) = c.pod(b, 1);
        assert!(ping(&src, dst), "ping {a} -> {b} blocked");
        tcp_transfer_port(&src, &dst_ns, dst, 7778, 1 << 20);
        assert!(
            !tcp_connects(&src, &dst_ns, dst, 7777),
            "tcp/7777 {a} -> {b} got through"
        );
    }
    let drops: f64 = (1..=3)
        .map(|n| c.metric(n, "weft_dataplane_dropped_packets_total{reason=\"policy\"}"))
        .sum();
    assert!(drops >= 4.0, "policy drops {drops}");
    assert!(c.metric(1, "weft_module_calls_total{module=\"fw\"}") > 0.0);
    assert!(c.metric(1, "weft_module_cache_hits_total{module=\"fw\"}") > 0.0);

    // Flannel's layout, visible to etcdctl: the spec, and each node's report of what it loaded.
    let etcd = c.etcd.as_ref().expect("etcd");
    let spec = etcd
        .etcdctl(&["get", "/coreos.com/network/modules/fw", "--print-value-only"])
        .expect("get");
    assert!(spec.contains(&format!("\"sha256\":\"{sha}\"")), "{spec:.200}");
    let status = etcd
        .etcdctl(&[
            "get",
            "--prefix",
            "/coreos.com/network/module-status/",
            "--print-value-only",
        ])
        .expect("get status");
    assert_eq!(status.matches(&sha).count(), 3, "{status}");
    let ls = c.weft_module(1, &["ls"]).expect("ls");
    assert!(ls.lines().any(|l| l.starts_with("fw ") && l.ends_with(" 3/3")), "{ls}");

    c.weft_module(3, &["rm", "fw"]).expect("rm");
    let (src, _) = c.pod(1, 1);
    let (dst_ns, dst) = c.pod(2, 1);
    assert!(
        eventually(Duration::from_secs(15), || tcp_connects(&src, &dst_ns, dst, 7777)),
        "tcp/7777 still blocked after rm"
    );
}

#[test]
fn router_steers_a_flow_through_a_third_node() {
    let mut c = TestCluster::new("rt", StoreKind::Embedded, 3);
    c.up(1);
    let via = c.lab.nodes[2].underlay_ip;
    let (src, _) = c.pod(1, 1);
    let (dst_ns, dst) = c.pod(2, 1);
    let relayed = |c: &TestCluster| c.metric(3, "weft_dataplane_tx_bytes_total");
    let before = relayed(&c);
    tcp_transfer(&src, &dst_ns, dst, 2 << 20);
    assert!(
        relayed(&c) - before < 1e6,
        "node 3 carried node 1's traffic without a router"
    );

    let cfg = format!(
        r#"{{"routes":[{{"dst":["{}"],"via":[{{"node":"{via}"}}]}}]}}"#,
        c.subnet(2)
    );
    store_and_wait(
        &c,
        1,
        "steer",
        &["add", "steer", &wasm_arg("router"), "--config-json", &cfg],
    );
    let before = relayed(&c);
    tcp_transfer(&src, &dst_ns, dst, 8 << 20);
    let carried = relayed(&c) - before;
    assert!(carried >= 8.0 * 1024.0 * 1024.0, "node 3 relayed only {carried} bytes");
    assert!(c.metric(1, "weft_module_counter{module=\"steer\",name=\"steered\"}") >= 1.0);
    assert!(ping(&src, dst), "ping through the gateway");
    assert_eq!(
        c.metric(2, "weft_dataplane_dropped_packets_total{reason=\"spoofed_source\"}"),
        0.0
    );
    // Traffic not matched by the route still goes straight to its owner.
    let (p3, p3ip) = c.pod(3, 1);
    let (_, p1ip) = c.pod(1, 1);
    assert!(ping(&p3, p1ip) && ping(&src, p3ip));
}

/// iperf3's per-interval throughput, from its JSON report.
fn intervals(json: &str) -> Vec<f64> {
    let v: serde_json::Value = serde_json::from_str(json).expect("iperf3 JSON");
    v["intervals"]
        .as_array()
        .map(|a| a.iter().filter_map(|i| i["sum"]["bits_per_second"].as_f64()).collect())
        .unwrap_or_default()
}

#[test]
fn a_module_swapped_under_iperf3_leaves_the_flow_running() {
    let mut c = TestCluster::new("sw", StoreKind::Embedded, 2);
    c.up(1);
    let fw = r#"{"rules":[{"action":"deny","protocol":"tcp","ports":[9999]}]}"#;
    store_and_wait(
        &c,
        1,
        "gate",
        &["add", "gate", &wasm_arg("firewall"), "--config-json", fw],
    );
    let (src, _) = c.pod(1, 1);
    let (dst_ns, dst) = c.pod(2, 1);
    let mut server = Command::new("ip")
        .args([
            "netns",
            "exec",
            &dst_ns,
            "iperf3",
            "-s",
            "-1",
            "-B",
            &dst.to_string(),
            "-p",
            "5301",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("iperf3 server");
    std::thread::sleep(Duration::from_millis(500));
    let client = Command::new("ip")
        .args([
            "netns",
            "exec",
            &src,
            "iperf3",
            "-c",
            &dst.to_string(),
            "-p",
            "5301",
            "-t",
            "6",
            "-i",
            "0.5",
            "-J",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("iperf3 client");
    std::thread::sleep(Duration::from_secs(2));
    // New code (the audit module), not just new config: a real swap of the instances.
    let swapped = Instant::now();
    store_and_wait(
        &c,
        2,
        "gate",
        &[
            "set",
            "gate",
            "--wasm",
            &wasm_arg("audit"),
            "--config-json",
            r#"{"one_in":1}"#,
        ],
    );
    assert!(
        swapped.elapsed() < Duration::from_secs(3),
        "the swap reached both nodes while iperf3 ran"
    );
    let report = client.wait_with_output().expect("iperf3 client");
    let _ = server.wait();
    assert!(
        report.status.success(),
        "iperf3 failed: {}",
        String::from_utf8_lossy(&report.stdout)
    );
    let iv = intervals(&String::from_utf8_lossy(&report.stdout));
    assert!(iv.len() >= 11, "{} intervals", iv.len());
    let peak = iv.iter().cloned().fold(0.0, f64::max);
    assert!(
        iv.iter().all(|b| *b > peak * 0.05),
        "an interval stalled around the swap: {iv:?}"
    );
    for n in 1..=2 {
        let dropped = c.metric(n, "weft_dataplane_dropped_packets_total{reason=\"policy\"}");
        assert!(
            dropped == 0.0,
            "node {n} dropped {dropped} packets by policy around the swap; its log ends:\n{}",
            c.lab.nodes[n - 1].log_tail(30)
        );
        assert!(c.metric(n, "weft_module_chain_generation") >= 3.0);
    }
    // The flow was re-decided by the new code, in flight.
    assert!(c.metric(1, "weft_module_counter{module=\"gate\",name=\"flows_tcp_egress\"}") >= 1.0);
}

const HOSTILE_PREFIX: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "weft_abi_version") (result i32) (i32.const 1))
  (func (export "weft_alloc") (param i32) (result i32) (i32.const 2048))
  (func (export "weft_flow") (result i32) (i32.const 1024))
  (func (export "weft_configure") (param i32 i32) (result i64) (i64.const 0))"#;

fn write_module(dir: &std::path::Path, name: &str, text: &str) -> String {
    let p = dir.join(format!("{name}.wasm"));
    std::fs::write(&p, wat::parse_str(text).expect("wat")).expect("write module");
    p.display().to_string()
}

#[test]
fn hostile_modules_are_refused_or_contained_and_traffic_flows() {
    let mut c = TestCluster::new("ho", StoreKind::Embedded, 2);
    c.up(1);
    let dir = c.tmp.path().to_path_buf();
    let refused = [
        (
            "garbage",
            {
                let p = dir.join("garbage.wasm");
                std::fs::write(&p, b"#!/bin/sh\necho not wasm\n").expect("write");
                p.display().to_string()
            },
            "not a WebAssembly module",
        ),
        (
            "spin",
            write_module(
                &dir,
                "spin",
                &format!(
                    "{HOSTILE_PREFIX} (func (export \"weft_policy\") (result i64) (loop $l (br $l)) (i64.const 0)))"
                ),
            ),
            "timed out on a probe flow",
        ),
        (
            "trap",
            write_module(
                &dir,
                "trap",
                &format!("{HOSTILE_PREFIX} (func (export \"weft_policy\") (result i64) (unreachable)))"),
            ),
            "trapped",
        ),
        (
            "nodecide",
            write_module(&dir, "nodecide", &format!("{HOSTILE_PREFIX})")),
            "exports no decision function",
        ),
        (
            "wasi",
            write_module(
                &dir,
                "wasi",
                r#"(module (import "wasi_snapshot_preview1" "proc_exit" (func (param i32))) (memory (export "memory") 1))"#,
            ),
            "imports wasi_snapshot_preview1.proc_exit",
        ),
        (
            "abi2",
            write_module(
                &dir,
                "abi2",
                &format!(
                    "{} (func (export \"weft_policy\") (result i64) (i64.const 0)))",
                    HOSTILE_PREFIX.replace("(i32.const 1))", "(i32.const 2))")
                ),
            ),
            "ABI version 2",
        ),
        ("badcfg", wasm_arg("firewall"), "config rejected: firewall config"),
    ];
    for (name, path, needle) in &refused {
        let err = c
            .weft_module(1, &["add", name, path, "--config-json", "{\"nope\":1}"])
            .expect_err(name);
        assert!(err.contains(needle), "{name}: wanted {needle:?} in {err}");
        assert_eq!(err.matches(needle).count(), 1, "{name}: the reason once: {err}");
        assert_eq!(err.matches("weft: error:").count(), 1, "one error line: {err}");
    }
    let err = c
        .weft_module(1, &["--module-max-kib", "16", "add", "big", &wasm_arg("audit")])
        .expect_err("too large");
    assert!(err.contains("over the limit of 16384 bytes"), "{err}");
    let ls = c.weft_module(1, &["ls"]).expect("ls");
    assert_eq!(ls.lines().count(), 1, "nothing refused was stored: {ls}");

    // A packet of death: fine on the probe, loops forever on tcp/7777. Fail-closed (the default)
    // drops that flow; every other flow keeps flowing and the agents stay up.
    let death = write_module(
        &dir,
        "death",
        &format!(
            "{HOSTILE_PREFIX} (func (export \"weft_policy\") (result i64) \
             (if (i32.eq (i32.load16_u (i32.const 1042)) (i32.const 7777)) (then (loop $l (br $l)))) \
             (i64.const 0xFFFF0000)))"
        ),
    );
    store_and_wait(&c, 1, "death", &["add", "death", &death]);
    let (src, _) = c.pod(1, 1);
    let (dst_ns, dst) = c.pod(2, 1);
    assert!(!tcp_connects(&src, &dst_ns, dst, 7777));
    assert!(ping(&src, dst));
    tcp_transfer_port(&src, &dst_ns, dst, 7778, 4 << 20);
    assert!(c.metric(1, "weft_module_timeouts_total{module=\"death\"}") >= 1.0);
    for n in 1..=2 {
        assert_eq!(c.lab.http_get(n, "/healthz").expect("healthz").0, 200);
        let agent = c.lab.nodes[n - 1].agent.as_mut().expect("agent");
        assert_eq!(agent.exited(), None, "agent {n} died");
    }
    // Fail-open lets the flow the module cannot decide through.
    c.weft_module(2, &["set", "death", "--failure", "open"])
        .expect("set open");
    assert!(
        eventually(Duration::from_secs(15), || tcp_connects(&src, &dst_ns, dst, 7777)),
        "fail-open module still blocks"
    );
}
