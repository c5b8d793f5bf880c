//! Bad input to the agent ends in one clear line naming the problem, never a panic or a hang.

use std::process::Command;
use std::time::Duration;

use weft::lab::netns::Netns;
use weft_tests::*;

/// Runs `weft agent` with `args` inside a throwaway namespace (so nothing touches the host),
/// optionally hiding `/dev/net/tun`; returns (exit code, last stderr line).
fn agent_fails(args: &[&str], hide_tun: bool) -> (i32, String) {
    require_root();
    let ns = Netns::create(&unique_prefix("err")).expect("netns");
    let bin = weft_bin().display().to_string();
    let mut script = String::new();
    if hide_tun {
        script.push_str("mount -t tmpfs none /dev/net && ");
    }
    script.push_str("exec \"$0\" agent --iface lo --admin-listen 127.0.0.1:0 \"$@\"");
    let out = Command::new("ip")
        .args(["netns", "exec", ns.name(), "unshare", "-m", "sh", "-c", &script, &bin])
        .args(args)
        .env("WEFT_LOG", "warn")
        .output()
        .expect("run weft");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let last = stderr.lines().last().unwrap_or_default().to_string();
    assert!(!stderr.contains("panicked"), "weft panicked:\n{stderr}");
    (out.status.code().unwrap_or(-1), last)
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let p = dir.path().join(name);
    std::fs::write(&p, text).expect("write");
    p.display().to_string()
}

#[test]
fn invalid_network_configs_are_named() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = dir.path().join("s.db").display().to_string();
    let cases = [
        (
            r#"{"Network":"10.244.0.0/33"}"#,
            "Network \"10.244.0.0/33\" is not a valid IPv4 CIDR",
        ),
        (
            r#"{"Network":"10.244.0.0/16","SubnetLen":8}"#,
            "SubnetLen 8 is out of range",
        ),
        (
            r#"{"Network":"10.244.0.0/16","SubnetLen":31}"#,
            "SubnetLen 31 is out of range",
        ),
        (
            r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.9.0","SubnetMax":"10.244.2.0"}"#,
            "SubnetMin 10.244.9.0 is above SubnetMax 10.244.2.0",
        ),
        ("{oops", "invalid network config: not a JSON object"),
    ];
    for (cfg, want) in cases {
        let path = write(&dir, "net.json", cfg);
        let (code, line) = agent_fails(&["--store", &store, "--net-config", &path], false);
        assert_eq!(code, 1, "{cfg}: {line}");
        assert!(line.starts_with("weft: error: "), "{line}");
        assert!(line.contains(want), "{cfg}: got {line:?}, want {want:?}");
    }
    // A bad config never reaches the store: a later good one still initialises it.
    let (code, line) = agent_fails(&["--store", &store], false);
    assert_eq!(code, 1);
    assert!(line.contains("no network config"), "{line}");
}

#[test]
fn unreachable_etcd_is_reported() {
    let started = std::time::Instant::now();
    let (code, line) = agent_fails(&["--etcd-endpoints", "http://127.0.0.1:9"], false);
    assert_eq!(code, 1);
    assert!(line.contains("cannot reach etcd at http://127.0.0.1:9"), "{line}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn kubernetes_mode_without_what_it_needs_is_reported() {
    let dir = tempfile::tempdir().expect("tmp");
    let net = write(
        &dir,
        "net-conf.json",
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#,
    );
    let (code, line) = agent_fails(&["--kube-subnet-mgr", "--net-config-path", &net], false);
    assert_eq!(code, 1);
    assert!(
        line.contains("--kube-subnet-mgr needs this node's name: set NODE_NAME"),
        "{line}"
    );
    let (code, line) = agent_fails(
        &["--kube-subnet-mgr", "--node-name", "n1", "--net-config-path", &net],
        false,
    );
    assert_eq!(code, 1);
    assert!(
        line.contains("not running in a pod") && line.contains("--kubeconfig-file"),
        "{line}"
    );
    let kc = dir.path().join("missing-kubeconfig").display().to_string();
    let (code, line) = agent_fails(
        &["--kube-subnet-mgr", "--node-name", "n1", "--kubeconfig-file", &kc],
        false,
    );
    assert_eq!(code, 1);
    assert!(line.contains(&format!("--kubeconfig-file {kc}")), "{line}");
    let junk = write(&dir, "kubeconfig", "clusters: [nonsense");
    let (code, line) = agent_fails(
        &["--kube-subnet-mgr", "--node-name", "n1", "--kubeconfig-file", &junk],
        false,
    );
    assert_eq!(code, 1);
    assert!(line.contains(&format!("--kubeconfig-file {junk}")), "{line}");
    // An API server that refuses: the command line says where and why, in one line, at once.
    let started = std::time::Instant::now();
    let (code, _, err) = weft(&[
        "lease",
        "ls",
        "--kube-subnet-mgr",
        "--kube-api-url",
        "https://127.0.0.1:1",
    ]);
    assert_eq!(code, 1);
    let last = err.trim().lines().last().unwrap_or_default();
    assert!(last.starts_with("weft: error: "), "{err}");
    assert!(
        last.contains("nodes at https://127.0.0.1:1/") && last.contains("Connection refused"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn missing_dev_net_tun_is_reported() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = dir.path().join("s.db").display().to_string();
    let cfg = write(&dir, "net.json", NET_CONFIG);
    let sf = dir.path().join("subnet.env").display().to_string();
    let (code, line) = agent_fails(&["--store", &store, "--net-config", &cfg, "--subnet-file", &sf], true);
    assert_eq!(code, 1);
    assert!(line.contains("missing /dev/net/tun"), "{line}");
    assert!(
        !std::path::Path::new(&sf).exists(),
        "subnet file written by an agent that never came up"
    );
}

#[test]
fn no_free_subnet_left_is_reported() {
    // Exactly one leasable subnet and two nodes.
    let cfg = r#"{"Network":"10.60.0.0/24","SubnetLen":26,"SubnetMin":"10.60.0.64","SubnetMax":"10.60.0.64"}"#;
    let mut c = TestCluster::with_config("nf", StoreKind::Embedded, 2, cfg, &[]);
    c.lab.start_agent(1).expect("start 1");
    assert_eq!(
        c.lab.wait_ready(1, Duration::from_secs(30)).expect("ready").to_string(),
        "10.60.0.64/26"
    );
    c.lab.start_agent(2).expect("start 2");
    let err = c
        .lab
        .wait_ready(2, Duration::from_secs(30))
        .expect_err("node 2 must fail");
    let text = err.to_string();
    assert!(text.contains("exited"), "{text}");
    assert!(
        text.contains("no free subnet left in 10.60.0.0/24: all 1 subnets from SubnetMin 10.60.0.64 to SubnetMax 10.60.0.64 are leased"),
        "{text}"
    );
}

/// Runs `weft <args>` on the host (store commands only touch the given file): (exit code,
/// stdout, stderr).
fn weft(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(weft_bin())
        .args(args)
        .env("WEFT_LOG", "warn")
        .output()
        .expect("run weft");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Store flags go before or after the subcommand, and a read never creates a store: a
/// mistyped path is one error line naming it, and no file appears there.
#[test]
fn store_commands_take_flags_anywhere_and_never_invent_a_store() {
    let dir = tempfile::tempdir().expect("tmp");
    let missing = dir.path().join("mistyped.db");
    let m = missing.display().to_string();
    for args in [
        vec!["lease", "ls", "--store", &m],
        vec!["lease", "--store", &m, "ls"],
        vec!["module", "ls", "--store", &m],
        vec!["module", "--store", &m, "rm", "fw"],
        vec!["lease", "rm", "10.244.3.0/24", "--store", &m],
    ] {
        let (code, _, err) = weft(&args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(
            err.starts_with("weft: error: ") && err.contains(&m) && err.contains("no such file"),
            "{err}"
        );
        assert!(!missing.exists(), "{args:?} created a store");
    }
    // A store an agent made (here: the first `module add`, which may create one to bootstrap).
    let store = dir.path().join("store.db").display().to_string();
    let fw = policy_wasm("firewall").display().to_string();
    let (code, out, err) = weft(&[
        "module",
        "add",
        "fw",
        &fw,
        "--config-json",
        r#"{"rules":[]}"#,
        "--store",
        &store,
    ]);
    assert_eq!(code, 0, "{out}{err}");
    for args in [
        vec!["lease", "ls", "--store", &store],
        vec!["lease", "--store", &store, "ls"],
    ] {
        let (code, out, err) = weft(&args);
        assert_eq!(code, 0, "{args:?}: {err}");
        assert!(out.starts_with("SUBNET"), "{out}");
    }
    let (code, out, _) = weft(&["module", "ls", "-o", "json", "--store", &store]);
    assert_eq!(code, 0);
    assert!(out.contains("\"fw\""), "{out}");
}
