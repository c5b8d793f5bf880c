//! `weft demo` end to end: the one-shot proof, Ctrl-C teardown, and `--down` after a kill.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use weft::lab::netns::list_with_prefix;
use weft_tests::*;

fn demo_namespaces() -> usize {
    list_with_prefix("weftdemo-").len()
}

/// Starts a long-running demo and waits until it says the cluster is up; returns it and its output so far.
fn start_demo() -> (Child, String) {
    let mut child = Command::new(weft_bin())
        .args(["demo", "--nodes", "2", "--pods", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start demo");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(90)) {
            Ok(line) => {
                seen.push_str(&line);
                seen.push('\n');
                if line.contains("Press Ctrl-C") {
                    return (child, seen);
                }
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("demo never came up:\n{seen}");
            }
        }
    }
}

#[test]
fn demo_once_ctrl_c_and_down() {
    require_root();

    let out = Command::new(weft_bin())
        .args(["demo", "--once", "--nodes", "2", "--pods", "2"])
        .output()
        .expect("run demo --once");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo --once failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("all 12 pod pairs reach each other across 2 nodes"),
        "{text}"
    );
    assert!(
        text.contains("ip netns exec weftdemo-n1-p1 ping"),
        "no how-to in:\n{text}"
    );
    assert_eq!(demo_namespaces(), 0, "demo --once left namespaces behind");

    // Ctrl-C tears everything down.
    let (mut child, seen) = start_demo();
    assert!(seen.contains("all 2 pod pairs reach each other"), "{seen}");
    assert_eq!(demo_namespaces(), 5, "2 nodes + 2 pods + the switch");
    kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).expect("SIGINT");
    let status = child.wait().expect("wait");
    assert!(status.success(), "demo exited with {status} on Ctrl-C");
    assert_eq!(demo_namespaces(), 0, "Ctrl-C left namespaces behind");

    // A killed demo leaves its cluster running; --down removes it.
    let (mut child, _) = start_demo();
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    assert_eq!(demo_namespaces(), 5);
    let down = Command::new(weft_bin())
        .args(["demo", "--down"])
        .output()
        .expect("demo --down");
    assert!(down.status.success());
    assert!(String::from_utf8_lossy(&down.stdout).contains("removed 5 demo namespaces"));
    assert_eq!(demo_namespaces(), 0, "--down left namespaces behind");
    let stray = Command::new("pgrep")
        .args(["-f", "weft agent --iface eth0 --subnet-file /run/weft-demo"])
        .output();
    if let Ok(o) = stray {
        assert!(
            o.stdout.is_empty(),
            "demo agents survived --down: {}",
            String::from_utf8_lossy(&o.stdout)
        );
    }
}
