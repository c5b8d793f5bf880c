//! `weft-cni` driven exactly as a container runtime drives it (CNI_* variables, config on stdin)
//! with the real `bridge` and `host-local` plugins from Debian's containernetworking-plugins:
//! pods on three nodes talk across the wire, CHECK passes, DEL leaves nothing behind; and
//! `--ip-masq` gives pods the node's address towards the outside world but never between pods.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use weft_tests::*;

fn cni_bin() -> PathBuf {
    weft_bin().with_file_name("weft-cni")
}

/// A pod namespace made for the test, removed on drop.
struct PodNs(String);

impl Drop for PodNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Node `n`'s plugin config: its subnet file, and data dirs of its own (nodes share this
/// machine's filesystem here, where real nodes would each have theirs).
fn conf(c: &TestCluster, n: usize) -> String {
    let node = &c.lab.nodes[n - 1];
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "weft",
        "type": "weft",
        "subnetFile": node.subnet_file(),
        "dataDir": node.dir.join("cni"),
        "delegate": {"ipam": {"dataDir": node.dir.join("ipam")}},
    })
    .to_string()
}

/// Runs `weft-cni` in node `n`'s namespace: (exit success, stdout).
fn cni(c: &TestCluster, n: usize, command: &str, container: &str, netns: &str, stdin: &str) -> (bool, String) {
    let out = run_cni(
        c.lab.nodes[n - 1].ns.name(),
        &cni_bin(),
        command,
        container,
        netns,
        stdin,
    );
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

fn links(ns: &str, kind: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["-n", ns, "-o", "link", "show", "type", kind])
        .output()
        .expect("ip link");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// Reserved addresses in a host-local data dir (one file per address).
fn reservations(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir.join("weft"))
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|f| f.parse::<Ipv4Addr>().is_ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The address a TCP server in `server_ns` on `ip:port` sees the client in `client_ns` come from.
fn seen_as(server_ns: &str, ip: Ipv4Addr, port: u16, client_ns: &str) -> Option<String> {
    let server = format!(
        "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('{ip}',{port}))\ns.listen()\ns.settimeout(8)\nc,a=s.accept()\nc.sendall(a[0].encode())\nc.close()"
    );
    let mut srv = Command::new("ip")
        .args(["netns", "exec", server_ns, "python3", "-c", &server])
        .spawn()
        .expect("server");
    std::thread::sleep(Duration::from_millis(400));
    let client = format!("import socket\ns=socket.create_connection(('{ip}',{port}),3)\nprint(s.recv(64).decode())");
    let out = Command::new("ip")
        .args(["netns", "exec", client_ns, "python3", "-c", &client])
        .output()
        .expect("client");
    let _ = srv.kill();
    let _ = srv.wait();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[test]
fn cni_pods_talk_across_nodes_and_leave_nothing_behind() {
    assert!(
        Path::new(CNI_PATH).join("bridge").exists(),
        "{CNI_PATH}/bridge missing: install containernetworking-plugins (scripts/deps)"
    );
    let mut c = TestCluster::with_config("cni", StoreKind::Embedded, 3, NET_CONFIG, &["--ip-masq"]);
    c.up(0);
    let (outside_ns, outside_ip) = c.lab.add_host("out").expect("outside host");

    // ADD, as a runtime would: one pod per node.
    let mut pods = Vec::new();
    let mut ips = Vec::new();
    let mut results = Vec::new();
    for n in 1..=3 {
        let ns = format!("{}-c{n}", c.lab.spec.prefix);
        assert!(Command::new("ip")
            .args(["netns", "add", &ns])
            .status()
            .expect("netns")
            .success());
        let pod = PodNs(ns.clone());
        let (ok, out) = cni(&c, n, "ADD", &format!("ctr{n}"), &ns, &conf(&c, n));
        assert!(ok, "ADD on node {n}: {out}");
        let result: serde_json::Value = serde_json::from_str(&out).expect("a CNI result");
        assert_eq!(result["cniVersion"], "1.0.0", "{result}");
        let addr = result["ips"][0]["address"].as_str().expect("an address");
        let ip: Ipv4Addr = addr.split('/').next().and_then(|a| a.parse().ok()).expect("IPv4");
        assert!(
            c.subnet(n).contains(&ip),
            "{ip} is not in node {n}'s subnet {}",
            c.subnet(n)
        );
        let mtu = std::fs::read_to_string(c.lab.nodes[n - 1].subnet_file()).expect("subnet file");
        assert!(mtu.contains("FLANNEL_IPMASQ=true"), "{mtu}");
        pods.push(pod);
        ips.push(ip);
        results.push(result);
    }
    for (a, b) in [(0, 1), (1, 2), (2, 0)] {
        let (ok, out) = ping_output(&pods[a].0, ips[b]);
        assert!(ok, "ping pod {a} -> pod {b}:\n{out}");
        tcp_transfer(&pods[a].0, &pods[b].0, ips[b], 1 << 20);
    }
    // CHECK gets the ADD result back as prevResult, as runtimes send it.
    let mut check: serde_json::Value = serde_json::from_str(&conf(&c, 1)).expect("conf");
    check["prevResult"] = results[0].clone();
    let (ok, out) = cni(&c, 1, "CHECK", "ctr1", &pods[0].0, &check.to_string());
    assert!(ok, "CHECK: {out}");

    // --ip-masq: the outside world sees the node; pods see each other as they are.
    assert_eq!(
        seen_as(&outside_ns, outside_ip, 9100, &pods[0].0).as_deref(),
        Some(c.lab.nodes[0].underlay_ip.to_string().as_str()),
        "pod -> outside is not masqueraded"
    );
    assert_eq!(
        seen_as(&pods[1].0, ips[1], 9101, &pods[0].0).as_deref(),
        Some(ips[0].to_string().as_str()),
        "pod -> pod was masqueraded"
    );

    // Bad input: a clear CNI error, nothing created.
    let (ok, out) = cni(&c, 1, "ADD", "ctr9", &pods[0].0, "{not json");
    assert!(!ok);
    let err: serde_json::Value = serde_json::from_str(out.trim()).expect("a CNI error object");
    assert_eq!(err["code"], 6, "{err}");

    // DEL: addresses released, veths gone, saved configs gone; DEL again still succeeds.
    for n in 1..=3 {
        let (ok, out) = cni(&c, n, "DEL", &format!("ctr{n}"), &pods[n - 1].0, &conf(&c, n));
        assert!(ok, "DEL on node {n}: {out}");
        let node = &c.lab.nodes[n - 1];
        assert_eq!(
            reservations(&node.dir.join("ipam")),
            Vec::<String>::new(),
            "node {n} kept an address"
        );
        let veths: Vec<_> = links(node.ns.name(), "veth")
            .into_iter()
            .filter(|l| !l.contains(" eth0@"))
            .collect();
        assert!(veths.is_empty(), "node {n} kept veths: {veths:?}");
        assert!(links(&pods[n - 1].0, "veth").is_empty(), "pod {n} kept its interface");
        assert!(!node.dir.join("cni").join(format!("ctr{n}")).exists());
        let (ok, out) = cni(&c, n, "DEL", &format!("ctr{n}"), &pods[n - 1].0, &conf(&c, n));
        assert!(ok, "a second DEL must succeed: {out}");
    }

    // The masquerading table goes with the agent.
    let node1 = c.lab.nodes[0].ns.name().to_string();
    let table = move |_: usize| {
        Command::new("ip")
            .args(["netns", "exec", &node1, "nft", "list", "tables"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    assert!(table(1).contains("table ip weft"), "{}", table(1));
    c.lab.stop_agent(1, true).expect("stop");
    assert!(!table(1).contains("table ip weft"), "left behind: {}", table(1));
}
