//! The container image and `deploy/compose.yaml`, for real: `deploy/build-image` builds the
//! FROM-scratch images (static musl `weft` + `weft-cni`; Debian's etcd), compose starts etcd and
//! three agents as containers on a private Docker network, and pods made by the image's own
//! `weft-cni` (with Debian's bridge and host-local plugins, as a node's runtime would run them)
//! talk across the containers. Once per backend: vxlan, udp, host-gw.
//!
//! Skips, saying so, only when no Docker engine answers.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use weft_tests::*;

/// A pod: its namespace and its address.
type Pod = (String, Ipv4Addr);

/// The image tags `deploy/build-image` makes by default, which compose.yaml uses.
const IMAGE: &str = "weft:dev";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn output(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("could not run {cmd:?}: {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The engine's version, or why there is none.
fn docker_engine() -> Result<String, String> {
    let o = Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .map_err(|e| format!("no docker client: {e}"))?;
    if o.status.success() {
        Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
    } else {
        Err(text(&o).trim().to_string())
    }
}

/// Builds the images once for every test in this binary; the tests run in parallel.
fn build_images() {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let r = BUILT.get_or_init(|| {
        let o = output(&mut Command::new(repo().join("deploy/build-image")));
        o.status.success().then_some(()).ok_or_else(|| text(&o))
    });
    if let Err(e) = r {
        panic!("deploy/build-image failed:\n{e}");
    }
}

/// One compose project: its containers and network go on drop, with the namespaces the test
/// attached and made.
struct Cluster {
    project: String,
    backend: &'static str,
    net_prefix: String,
    /// Names under /run/netns: attached container namespaces and pods.
    netns: Vec<String>,
    prefix: String,
    dir: tempfile::TempDir,
}

impl Cluster {
    fn compose(&self) -> Command {
        let mut c = Command::new("docker-compose");
        c.args(["-p", &self.project, "-f"])
            .arg(repo().join("deploy/compose.yaml"));
        if self.backend == "host-gw" {
            c.arg("-f").arg(repo().join("deploy/compose.host-gw.yaml"));
        }
        c.env("WEFT_BACKEND", self.backend)
            .env("WEFT_NET_PREFIX", &self.net_prefix);
        c
    }

    /// Starts the cluster on a /24 no other Docker network holds.
    fn up(backend: &'static str) -> Cluster {
        static N: AtomicUsize = AtomicUsize::new(0);
        let prefix = unique_prefix(&format!("d{}", &backend[..2]));
        let mut last = String::new();
        for attempt in 0..12 {
            let n = N.fetch_add(1, Ordering::Relaxed);
            let octet = 16 + (std::process::id() as usize + 7 * n + attempt) % 200;
            let c = Cluster {
                project: prefix.replace('-', "x"),
                backend,
                net_prefix: format!("172.30.{octet}"),
                netns: Vec::new(),
                prefix: prefix.clone(),
                dir: tempfile::tempdir().expect("temp dir"),
            };
            let o = output(c.compose().args(["up", "-d"]));
            if o.status.success() {
                return c;
            }
            last = text(&o);
            if !last.contains("overlap") {
                panic!("docker-compose up ({backend}) failed:\n{last}");
            }
            // Dropping `c` removes whatever was created; try the next /24.
        }
        panic!("no free /24 under 172.30.0.0/16 for the compose network:\n{last}");
    }

    /// The host pid of a service's container, once it runs.
    fn pid(&self, service: &str) -> u32 {
        let o = output(self.compose().args(["ps", "-q", service]));
        let id = String::from_utf8_lossy(&o.stdout).trim().to_string();
        assert!(!id.is_empty(), "no container for {service}: {}", text(&o));
        let o = output(Command::new("docker").args(["inspect", "-f", "{{.State.Pid}}", &id]));
        String::from_utf8_lossy(&o.stdout).trim().parse().unwrap_or(0)
    }

    /// A file inside a service's container, as the host sees it.
    fn file(&self, service: &str, path: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{path}", self.pid(service)))
    }

    fn logs(&self) -> String {
        text(&output(self.compose().args(["logs", "--no-color", "--tail", "30"])))
    }

    /// Names the container's network namespace so `ip -n` and `ip netns exec` reach it.
    fn attach(&mut self, service: &str) -> String {
        let name = format!("{}-{service}", self.prefix);
        let pid = self.pid(service).to_string();
        let o = output(Command::new("ip").args(["netns", "attach", &name, &pid]));
        assert!(o.status.success(), "ip netns attach {name} {pid}: {}", text(&o));
        self.netns.push(name.clone());
        name
    }

    fn pod_netns(&mut self, node: usize) -> String {
        let name = format!("{}-n{node}-pod", self.prefix);
        let o = output(Command::new("ip").args(["netns", "add", &name]));
        assert!(o.status.success(), "ip netns add {name}: {}", text(&o));
        self.netns.push(name.clone());
        name
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- compose logs ({}):\n{}", self.project, self.logs());
        }
        let _ = self
            .compose()
            .args(["down", "-v", "--remove-orphans", "--timeout", "5"])
            .output();
        for ns in &self.netns {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// The FLANNEL_SUBNET a node's agent wrote, once it has.
fn node_subnet(c: &Cluster, service: &str) -> Option<ipnet::Ipv4Net> {
    let env = std::fs::read_to_string(c.file(service, "/run/flannel/subnet.env")).ok()?;
    env.lines()
        .find_map(|l| l.strip_prefix("FLANNEL_SUBNET="))
        .and_then(|s| s.parse::<ipnet::Ipv4Net>().ok())
        // flannel's format names the node's gateway address (10.244.7.1/24), not the network.
        .map(|n| n.trunc())
}

/// Runs `program args` inside a namespace: (success, output).
fn in_ns(ns: &str, program: &str, args: &[&str]) -> (bool, String) {
    let o = output(Command::new("ip").args(["netns", "exec", ns, program]).args(args));
    (o.status.success(), text(&o))
}

/// Runs the image's `weft-cni` in a node container's namespace, as that node's runtime would.
fn cni(c: &Cluster, node: usize, command: &str, node_ns: &str, pod_ns: &str) -> (bool, String) {
    let service = format!("node{node}");
    let conf = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "weft",
        "type": "weft",
        "subnetFile": c.file(&service, "/run/flannel/subnet.env"),
        "dataDir": c.dir.path().join(&service).join("cni"),
        "delegate": {"ipam": {"dataDir": c.dir.path().join(&service).join("ipam")}},
    })
    .to_string();
    let o = run_cni(
        node_ns,
        &c.file(&service, "/weft-cni"),
        command,
        &format!("ctr{node}"),
        pod_ns,
        &conf,
    );
    (o.status.success(), text(&o))
}

/// Starts a cluster on `backend`, makes one pod per node container and checks traffic between
/// every pair; returns the cluster, the node namespaces and the pods.
fn cluster_with_pods(backend: &'static str) -> Option<(Cluster, Vec<String>, Vec<Pod>)> {
    require_root();
    match docker_engine() {
        Ok(v) => eprintln!("Docker engine {v}"),
        Err(e) => {
            eprintln!("SKIPPED: no Docker engine answers ({e}); the container test needs one");
            return None;
        }
    }
    assert!(
        Path::new(CNI_PATH).join("bridge").exists(),
        "{CNI_PATH}/bridge missing: install containernetworking-plugins (scripts/deps)"
    );
    build_images();
    let mut c = Cluster::up(backend);
    let services = ["node1", "node2", "node3"];
    for s in services {
        assert!(
            eventually(Duration::from_secs(60), || node_subnet(&c, s).is_some()),
            "{s} never wrote its subnet file ({backend})"
        );
    }
    let subnets: Vec<_> = services.iter().filter_map(|s| node_subnet(&c, s)).collect();
    let mut nodes = Vec::new();
    for s in services {
        nodes.push(c.attach(s));
    }

    // The three leases are in the etcd container, under flannel's keys.
    let etcd_ns = c.attach("etcd");
    let (ok, keys) = in_ns(
        &etcd_ns,
        "etcdctl",
        &[
            "--endpoints",
            "http://127.0.0.1:2379",
            "get",
            "--prefix",
            "--keys-only",
            "/coreos.com/network/subnets/",
        ],
    );
    assert!(ok, "etcdctl: {keys}");
    for s in &subnets {
        let key = format!("/coreos.com/network/subnets/{}", s.to_string().replace('/', "-"));
        assert!(keys.contains(&key), "{key} missing from etcd:\n{keys}");
    }

    let mut pods = Vec::new();
    for (i, node_ns) in nodes.iter().enumerate() {
        let n = i + 1;
        let pod_ns = c.pod_netns(n);
        let (ok, out) = cni(&c, n, "ADD", node_ns, &pod_ns);
        assert!(ok, "ADD on node{n} ({backend}): {out}");
        let result: serde_json::Value = serde_json::from_str(&out).expect("a CNI result");
        let ip: Ipv4Addr = result["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no IPv4 in {result}"));
        assert!(subnets[i].contains(&ip), "{ip} is outside node{n}'s {}", subnets[i]);
        pods.push((pod_ns, ip));
    }

    for a in 0..3 {
        for b in 0..3 {
            if a != b {
                let (ok, out) = ping_output(&pods[a].0, pods[b].1);
                assert!(
                    ok,
                    "ping pod{} -> pod{} across containers ({backend}):\n{out}",
                    a + 1,
                    b + 1
                );
            }
        }
    }
    for (a, b) in [(0, 1), (1, 2), (2, 0)] {
        tcp_transfer(&pods[a].0, &pods[b].0, pods[b].1, 1 << 20);
    }

    // `--ip-masq` (compose sets it) loaded its table with the image's own nft.
    for (i, ns) in nodes.iter().enumerate() {
        let (ok, out) = in_ns(ns, "nft", &["list", "tables"]);
        assert!(ok && out.contains("table ip weft"), "node{}: {out}", i + 1);
    }
    Some((c, nodes, pods))
}

/// DEL every pod: the plugin releases its address and leaves no veth in the node.
fn delete_pods(c: &Cluster, nodes: &[String], pods: &[Pod]) {
    for (i, (node_ns, (pod_ns, ip))) in nodes.iter().zip(pods).enumerate() {
        let n = i + 1;
        let (ok, out) = cni(c, n, "DEL", node_ns, pod_ns);
        assert!(ok, "DEL on node{n}: {out}");
        let ipam = c.dir.path().join(format!("node{n}/ipam/weft/{ip}"));
        assert!(!ipam.exists(), "node{n} kept {ip} reserved");
        let (_, veths) = in_ns(node_ns, "ip", &["-o", "link", "show", "type", "veth"]);
        assert!(
            veths.lines().all(|l| l.contains(" eth0@")),
            "node{n} kept a pod veth:\n{veths}"
        );
    }
}

#[test]
fn vxlan_cluster_in_containers_passes_pod_traffic_and_applies_policy() {
    let Some((c, nodes, pods)) = cluster_with_pods("vxlan") else {
        return;
    };
    for ns in &nodes {
        let (_, link) = in_ns(ns, "ip", &["-d", "link", "show", "weft.1"]);
        assert!(link.contains("vxlan id 1") && link.contains("dstport 8472"), "{link}");
    }

    // Wasm policy on the kernel path needs the image's iptables: a firewall added through etcd
    // with the image's own CLI blocks tcp/7777 between pods in different containers.
    let fw = policy_wasm("firewall").display().to_string();
    let cfg = r#"{"rules":[{"action":"deny","protocol":"tcp","ports":[7777]}]}"#;
    let etcd = format!("http://{}.2:2379", c.net_prefix);
    let weft = c.file("node1", "/weft").display().to_string();
    let (ok, out) = in_ns(
        &nodes[0],
        &weft,
        &[
            "module",
            "--etcd-endpoints",
            &etcd,
            "add",
            "fw",
            &fw,
            "--config-json",
            cfg,
        ],
    );
    assert!(ok, "module add: {out}");
    for (i, ns) in nodes.iter().enumerate() {
        assert!(
            eventually(Duration::from_secs(20), || {
                in_ns(ns, "iptables", &["-S", "WEFT-POLICY"]).1.contains("NFQUEUE")
            }),
            "node{} never installed its queue rule",
            i + 1
        );
    }
    let (p1, _) = &pods[0];
    let (p2, ip2) = &pods[1];
    assert!(!tcp_connects(p1, p2, *ip2, 7777), "tcp/7777 got through");
    assert!(tcp_connects(p1, p2, *ip2, 7778), "tcp/7778 was blocked");
    assert!(ping(p1, *ip2), "ping was blocked by the firewall");

    delete_pods(&c, &nodes, &pods);
}

#[test]
fn udp_cluster_in_containers_passes_pod_traffic() {
    let Some((c, nodes, pods)) = cluster_with_pods("udp") else {
        return;
    };
    for ns in &nodes {
        let (_, link) = in_ns(ns, "ip", &["-d", "link", "show", "weft0"]);
        assert!(link.contains("tun"), "the udp backend's TUN device is missing:\n{link}");
    }
    delete_pods(&c, &nodes, &pods);
}

#[test]
fn host_gw_cluster_in_containers_passes_pod_traffic() {
    let Some((c, nodes, pods)) = cluster_with_pods("host-gw") else {
        return;
    };
    for (i, ns) in nodes.iter().enumerate() {
        let (_, routes) = in_ns(ns, "ip", &["route", "show", "proto", "87"]);
        assert_eq!(routes.lines().count(), 2, "node{}: {routes}", i + 1);
    }
    delete_pods(&c, &nodes, &pods);
}

/// The image holds what the Dockerfile says and nothing that needs a libc it lacks.
#[test]
fn image_runs_its_binaries() {
    require_root();
    if let Err(e) = docker_engine() {
        eprintln!("SKIPPED: no Docker engine answers ({e}); the container test needs one");
        return;
    }
    build_images();
    for (entry, args, expect) in [
        ("/weft", &["--version"][..], "weft "),
        ("/usr/sbin/nft", &["--version"][..], "nftables"),
        ("/usr/sbin/iptables", &["--version"][..], "nf_tables"),
    ] {
        let o = output(
            Command::new("docker")
                .args(["run", "--rm", "--network", "none", "--entrypoint", entry, IMAGE])
                .args(args),
        );
        assert!(o.status.success() && text(&o).contains(expect), "{entry}: {}", text(&o));
    }
    let o = output(Command::new("docker").args([
        "run",
        "--rm",
        "--network",
        "none",
        "-e",
        "CNI_COMMAND=VERSION",
        "--entrypoint",
        "/weft-cni",
        IMAGE,
    ]));
    assert!(
        text(&o).contains("\"supportedVersions\""),
        "weft-cni VERSION: {}",
        text(&o)
    );
    // No shell: nothing can be run that the Dockerfile did not put there.
    let o = output(Command::new("docker").args(["run", "--rm", "--network", "none", "--entrypoint", "/bin/sh", IMAGE]));
    assert!(!o.status.success(), "the image has a shell");
}
