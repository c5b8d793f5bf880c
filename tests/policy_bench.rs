//! `weft module test`, the offline bench, against every example policy: the flows, configs and
//! expected verdicts in `policies/<name>/bench/` (the ones the READMEs show) pass, a wrong
//! expectation fails with exit code 1, and a tcpdump capture of real pod traffic replays.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use weft_tests::*;

fn bench_dir(policy: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../policies")
        .join(policy)
        .join("bench")
}

fn module_test(policy: &str, extra: &[&str]) -> Output {
    let dir = bench_dir(policy);
    let mut cmd = Command::new(weft_bin());
    cmd.args(["module", "test"])
        .arg(policy_wasm(policy))
        .arg("--config")
        .arg(dir.join("config.json"));
    if dir.join("leases.json").exists() {
        cmd.arg("--leases").arg(dir.join("leases.json"));
    }
    cmd.args(extra).output().expect("weft module test")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn every_example_policy_passes_its_bench_and_a_wrong_expectation_fails() {
    for policy in ["audit", "firewall", "ratelimit", "router", "tenants"] {
        let dir = bench_dir(policy);
        let (flows, expect) = (dir.join("flows.jsonl"), dir.join("expect"));
        let (flows_s, expect_s) = (flows.display().to_string(), expect.display().to_string());
        let out = module_test(policy, &["--flows", &flows_s, "--expect", &expect_s]);
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(out.status.success(), "{policy}: {stdout}{stderr}");
        let wanted: Vec<String> = std::fs::read_to_string(&expect)
            .expect("expect")
            .lines()
            .map(|l| l.split('#').next().unwrap_or("").trim().to_string())
            .filter(|l| !l.is_empty())
            .collect();
        let decided: Vec<&str> = stdout.lines().filter(|l| !l.trim_start().starts_with("log ")).collect();
        assert_eq!(decided.len(), wanted.len(), "{policy}: one line per flow: {stdout}");
        for (line, want) in decided.iter().zip(&wanted) {
            assert!(
                line.contains(&format!(" {want} ")),
                "{policy}: {line:?} is not {want:?}"
            );
            assert!(line.contains(" µs "), "{policy}: no call time in {line:?}");
        }
        assert!(
            stderr.contains(&format!("all {} flows got the expected verdict", wanted.len())),
            "{policy}: {stderr}"
        );
        assert!(
            !stderr.contains(" INFO "),
            "{policy}: agent chatter in the bench's output: {stderr}"
        );

        // Flip the first expectation: the bench says which flow and fails.
        let tmp = tempfile::NamedTempFile::new().expect("tmp");
        let flipped = if wanted[0] == "drop" { "allow" } else { "drop" };
        let rest: Vec<&str> = wanted[1..].iter().map(String::as_str).collect();
        std::fs::write(tmp.path(), format!("{flipped}\n{}\n", rest.join("\n"))).expect("write");
        let wrong = tmp.path().display().to_string();
        let out = module_test(policy, &["--flows", &flows_s, "--expect", &wrong]);
        assert_eq!(out.status.code(), Some(1), "{policy}: {}", text(&out.stdout));
        assert!(
            text(&out.stdout).contains(&format!("MISMATCH, expected {flipped}")),
            "{policy}: {}",
            text(&out.stdout)
        );
        assert!(text(&out.stderr).contains("1 of "), "{}", text(&out.stderr));
    }
    // The audit module's log lines are shown with the flow that caused them.
    let dir = bench_dir("audit");
    let out = module_test(
        "audit",
        &["--flows", &dir.join("flows.jsonl").display().to_string(), "-o", "json"],
    );
    let lines: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    let logged: Vec<_> = lines
        .iter()
        .filter(|l| l["logs"].as_array().is_some_and(|a| !a.is_empty()))
        .collect();
    assert_eq!(logged.len(), 2, "one in two logged: {lines:?}");
    assert!(
        logged[0]["logs"][0]
            .as_str()
            .is_some_and(|s| s.contains("audit: egress tcp")),
        "{:?}",
        logged[0]
    );
}

#[test]
fn a_tcpdump_capture_of_pod_traffic_replays_through_the_firewall() {
    let mut c = TestCluster::new("pcap", StoreKind::Embedded, 2);
    c.up(1);
    let (src, _) = c.pod(1, 1);
    let (dst_ns, dst) = c.pod(2, 1);
    let pcap = c.tmp.path().join("pod.pcap");
    let tcpdump = Command::new("ip")
        .args([
            "netns",
            "exec",
            &src,
            "tcpdump",
            "-i",
            "eth0",
            "--immediate-mode",
            "-U",
            "-n",
            "-w",
        ])
        .arg(&pcap)
        .args(["ip", "and", "tcp"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("tcpdump");
    assert!(
        eventually(Duration::from_secs(5), || pcap.exists()),
        "tcpdump never started"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(tcp_connects(&src, &dst_ns, dst, 80));
    assert!(tcp_connects(&src, &dst_ns, dst, 5201));
    std::thread::sleep(Duration::from_millis(300));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(tcpdump.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    let dump = tcpdump.wait_with_output().expect("tcpdump");
    eprintln!("tcpdump: {}", text(&dump.stderr).trim());
    // Each connection is two flows: the SYN out (egress) and the answers back (ingress).
    let expect = c.tmp.path().join("expect");
    std::fs::write(&expect, "allow\nallow\ndrop\nallow\n").expect("write");
    let out = module_test(
        "firewall",
        &[
            "--pcap",
            &pcap.display().to_string(),
            "--node-subnet",
            &c.subnet(1).to_string(),
            "--expect",
            &expect.display().to_string(),
        ],
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains(&format!("-> {dst}:5201")), "{stdout}");
    assert!(
        text(&out.stderr).contains("frames"),
        "says what it read: {}",
        text(&out.stderr)
    );
}
