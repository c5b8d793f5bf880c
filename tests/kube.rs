//! The Kubernetes subnet manager against the stand-in API server (`weft_tests::kubeapi`), with
//! the real `kubectl` as the client that shows the server's answers are Kubernetes' own kind.
//! Weft nodes in `--kube-subnet-mgr` mode and a node set up exactly as flannel leaves one
//! (its annotations in flannel's format, a kernel VXLAN device or host routes programmed as
//! flannel programs them) route to each other; nodes without a pod CIDR wait for one; a node
//! deleted leaves every peer's routes; an API server gone for 30 s costs no packet, and the
//! agents resume (through a 410 Gone re-list) when it returns; a WasmModule applied with
//! kubectl is enforced on every node.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use weft::lab::cluster::kube_node_name;
use weft_tests::*;

const VXLAN: &str =
    r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","RouteCheckSecs":1,"TxChecksumOffload":false}}"#;
const HOST_GW: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw","RouteCheckSecs":1}}"#;
const PREFIX: &str = "flannel.alpha.coreos.com";
/// The VTEP MAC of the flannel node.
const FLANNEL_MAC: &str = "0a:66:6c:00:00:04";

fn sh(ns: &str, cmd: &str) -> String {
    let args: Vec<&str> = cmd.split_whitespace().collect();
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(&args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} in {ns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn kube(c: &TestCluster) -> &kubelab::KubeApi {
    c.kube.as_ref().expect("the cluster runs the stand-in API server")
}

/// Registers node `i` as the kubelet does, with the pod CIDR kube-controller-manager would
/// give it (`None`: not assigned yet).
fn register_node(c: &TestCluster, i: usize, cidr: Option<&str>) {
    let mut node = json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": kube_node_name(i), "labels": {"kubernetes.io/hostname": kube_node_name(i)}},
        "spec": {},
        "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}]},
    });
    if let Some(cidr) = cidr {
        node["spec"] = json!({"podCIDR": cidr, "podCIDRs": [cidr]});
    }
    let file = c.tmp.path().join(format!("node-{i}.json"));
    std::fs::write(&file, node.to_string()).expect("node manifest");
    kube(c).must(&["create", "-f", &file.display().to_string()]);
}

/// Waits until node `n` routes `peers` peers.
fn wait_routes(c: &TestCluster, n: usize, peers: usize) {
    assert!(
        eventually(Duration::from_secs(20), || c.lab.metric(n, "weft_routes").ok()
            == Some(peers as f64)),
        "node {n} never routed {peers} peers:\n{}",
        c.lab.nodes[n - 1].log_tail(20)
    );
}

/// A node as flannel leaves it: the annotations flannel writes, a `cni0` bridge with one pod,
/// and (vxlan) a kernel `flannel.1` device; its routes to the others are added by
/// [`flannel_routes`] from their annotations, as flannel's own watch would.
fn flannel_node(c: &mut TestCluster, backend: &str) -> usize {
    let i = c.lab.add_node().expect("flannel node");
    let (ns, ip) = (c.lab.nodes[i - 1].ns.name().to_string(), c.lab.nodes[i - 1].underlay_ip);
    let subnet: ipnet::Ipv4Net = format!("10.244.{}.0/24", 40 + i).parse().expect("cidr");
    register_node(c, i, Some(&subnet.to_string()));
    let mtu = if backend == "vxlan" { 1450 } else { 1500 };
    if backend == "vxlan" {
        sh(&ns, &format!("ip link add flannel.1 address {FLANNEL_MAC} type vxlan id 1 local {ip} dev eth0 dstport 8472 nolearning"));
        sh(&ns, &format!("ip addr add {}/32 dev flannel.1", subnet.network()));
        sh(&ns, "ip link set flannel.1 mtu 1450 up");
    }
    sh(&ns, "sysctl -qw net.ipv4.ip_forward=1");
    let env = weft::subnet_file::SubnetEnv {
        network: "10.244.0.0/16".parse().expect("net"),
        subnet,
        mtu,
        ip_masq: false,
    };
    env.write(&c.lab.nodes[i - 1].subnet_file()).expect("subnet.env");
    c.lab.attach_pods(i, 1).expect("flannel pod");
    // Exactly flannel's annotations: backend-data is the JSON serialised into a string.
    let data = if backend == "vxlan" {
        format!(r#"{{"VNI":1,"VtepMAC":"{FLANNEL_MAC}"}}"#)
    } else {
        "null".into()
    };
    let patch = json!({"metadata": {"annotations": {
        format!("{PREFIX}/backend-data"): data,
        format!("{PREFIX}/backend-type"): backend,
        format!("{PREFIX}/kube-subnet-manager"): "true",
        format!("{PREFIX}/public-ip"): ip.to_string(),
    }}});
    let name = kube_node_name(i);
    let p = patch.to_string();
    kube(c).must(&[
        "patch",
        "node",
        &name,
        "--subresource=status",
        "--type",
        "strategic",
        "-p",
        &p,
    ]);
    i
}

/// Programs flannel's entries on node `f` towards every other node, read from their
/// annotations through kubectl: for vxlan a route onlink via the peer's VTEP address, its
/// neighbour and its FDB entry; for host-gw a route via the peer's address.
fn flannel_routes(c: &TestCluster, f: usize) {
    let ns = c.lab.nodes[f - 1].ns.name().to_string();
    let nodes: Value = serde_json::from_str(&kube(c).must(&["get", "nodes", "-o", "json"])).expect("nodes");
    for n in nodes["items"].as_array().expect("items") {
        let a = &n["metadata"]["annotations"];
        if n["metadata"]["name"] == kube_node_name(f).as_str() || a[format!("{PREFIX}/kube-subnet-manager")] != "true" {
            continue;
        }
        let cidr = n["spec"]["podCIDR"].as_str().expect("podCIDR");
        let gw = cidr.split('/').next().expect("net");
        let ip = a[format!("{PREFIX}/public-ip")].as_str().expect("public-ip");
        match a[format!("{PREFIX}/backend-type")].as_str() {
            Some("vxlan") => {
                let data: Value = serde_json::from_str(a[format!("{PREFIX}/backend-data")].as_str().expect("data"))
                    .expect("backend-data JSON");
                let mac = data["VtepMAC"].as_str().expect("VtepMAC");
                assert_eq!(data["VNI"], 1, "{data}");
                sh(
                    &ns,
                    &format!("ip neigh replace {gw} lladdr {mac} dev flannel.1 nud permanent"),
                );
                sh(
                    &ns,
                    &format!("bridge fdb append {mac} dev flannel.1 dst {ip} self permanent"),
                );
                sh(&ns, &format!("ip route replace {cidr} via {gw} dev flannel.1 onlink"));
            }
            _ => {
                sh(&ns, &format!("ip route replace {cidr} via {ip} dev eth0"));
            }
        }
    }
}

fn all_pairs_ping(c: &TestCluster, nodes: usize) {
    for a in 1..=nodes {
        for b in 1..=nodes {
            if a == b {
                continue;
            }
            let (src, _) = c.pod(a, 1);
            let (_, dst) = c.pod(b, 1);
            let (ok, out) = ping_output(&src, dst);
            assert!(ok, "pod on node {a} cannot reach pod {dst} on node {b}:\n{out}");
        }
    }
}

/// What Weft published on node `i`, as kubectl shows it.
fn check_published(c: &TestCluster, i: usize, backend: &str) {
    let n = kube(c).node(&kube_node_name(i));
    let a = &n["metadata"]["annotations"];
    assert_eq!(a[format!("{PREFIX}/kube-subnet-manager")], "true", "{n}");
    assert_eq!(a[format!("{PREFIX}/backend-type")], backend, "{n}");
    assert_eq!(
        a[format!("{PREFIX}/public-ip")],
        c.lab.nodes[i - 1].underlay_ip.to_string(),
        "{n}"
    );
    let data: Value =
        serde_json::from_str(a[format!("{PREFIX}/backend-data")].as_str().expect("string")).expect("JSON");
    if backend == "vxlan" {
        assert_eq!(data["VNI"], 1, "{data}");
        assert!(data["VtepMAC"].as_str().is_some_and(|m| m.len() == 17), "{data}");
    }
    let cond = n["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "NetworkUnavailable").cloned())
        .unwrap_or_else(|| panic!("no NetworkUnavailable condition: {n}"));
    assert_eq!(
        (cond["status"].as_str(), cond["reason"].as_str()),
        (Some("False"), Some("FlannelIsUp")),
        "{cond}"
    );
    let ready = n["status"]["conditions"]
        .as_array()
        .map(|cs| cs.iter().any(|c| c["type"] == "Ready"));
    assert_eq!(ready, Some(true), "the status patch kept kubelet's conditions: {n}");
}

fn weft_cluster(tag: &str, config: &str, nodes: usize) -> TestCluster {
    let c = TestCluster::with_config(tag, StoreKind::Kube, nodes, config, &[]);
    for i in 1..=nodes {
        register_node(&c, i, Some(&format!("10.244.{}.0/24", 10 + i)));
    }
    c
}

/// A WasmModule manifest for the example firewall denying tcp `port`, as a user would write.
fn firewall_manifest(port: u16) -> Value {
    let code = std::fs::read(policy_wasm("firewall")).expect("firewall.wasm (scripts/build-policies)");
    let config = format!(r#"{{"rules":[{{"action":"deny","protocol":"tcp","ports":[{port}]}}]}}"#);
    let spec = weft::wasm::ModuleSpec::new("fw", &code, config.clone());
    json!({
        "apiVersion": "weft.dev/v1alpha1",
        "kind": "WasmModule",
        "metadata": {"name": "fw"},
        "spec": {"order": 10, "mode": "enforce", "failurePolicy": "closed", "config": config, "sha256": spec.sha256, "wasm": spec.wasm},
    })
}

#[test]
fn vxlan_weft_and_flannel_nodes_route_to_each_other_through_outages_and_deletions() {
    let mut c = weft_cluster("kvx", VXLAN, 3);
    c.up(1);
    for i in 1..=3 {
        check_published(&c, i, "vxlan");
    }
    let f = flannel_node(&mut c, "vxlan");
    flannel_routes(&c, f);
    for n in 1..=3 {
        wait_routes(&c, n, 3);
    }
    all_pairs_ping(&c, 4);

    module_applied_with_kubectl_blocks_a_port_everywhere(&c);

    api_outage_costs_nothing(&mut c);

    // The node is deleted (its agent stopped first, as when a node leaves the cluster): its
    // routes leave every peer.
    c.lab.stop_agent(3, true).expect("stop node 3");
    let gone = c.subnet(3);
    kube(&c).must(&["delete", "node", &kube_node_name(3)]);
    for n in 1..=2 {
        wait_routes(&c, n, 2);
        let ns = c.lab.nodes[n - 1].ns.name().to_string();
        assert!(
            eventually(Duration::from_secs(10), || !sh(&ns, "ip route show")
                .contains(&gone.to_string())),
            "node {n} still routes {gone}"
        );
    }
    let (src, _) = c.pod(1, 1);
    let (_, dst) = c.pod(f, 1);
    assert!(ping(&src, dst), "node 1 lost the flannel node");
    flannel_node_moves_to_weft(&mut c, f);
    the_cluster_role_grants_exactly_what_weft_used(&c);
}

/// The flannel node moves to Weft, as a cluster migrates one node at a time: flannel stops and
/// its device goes (two VXLAN devices cannot share VNI 1 and port 8472), Weft's agent starts
/// on the same Node object, keeps its pod CIDR, publishes its own VTEP MAC, and every pod
/// reaches the node's pod again.
fn flannel_node_moves_to_weft(c: &mut TestCluster, f: usize) {
    let ns = c.lab.nodes[f - 1].ns.name().to_string();
    let subnet = c.subnet(f);
    sh(&ns, "ip link del flannel.1");
    c.lab.start_agent(f).expect("start Weft on the flannel node");
    assert_eq!(c.lab.wait_ready(f, Duration::from_secs(20)).expect("ready"), subnet);
    let n = kube(c).node(&kube_node_name(f));
    let data = n["metadata"]["annotations"][format!("{PREFIX}/backend-data")]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(
        !data.contains(FLANNEL_MAC) && data.contains("VtepMAC"),
        "Weft published its own MAC: {data}"
    );
    check_published(c, f, "vxlan");
    for n in [1, 2, f] {
        wait_routes(c, n, 2);
    }
    for (a, b) in [(1, f), (f, 2)] {
        let (src, _) = c.pod(a, 1);
        let (_, dst) = c.pod(b, 1);
        let (ok, out) = ping_output(&src, dst);
        assert!(ok, "node {a} -> node {b} after the move:\n{out}");
    }
    // Every node now runs Weft: a module added through the Kubernetes store with --wait is in
    // force on all three (the moved node, which ran no module, reports it once it loads it).
    let fw = policy_wasm("firewall").display().to_string();
    let out = c
        .weft_module(
            1,
            &["add", "moved", &fw, "--config-json", r#"{"rules":[]}"#, "--wait", "30"],
        )
        .expect("add --wait");
    assert!(out.contains("module moved in force on all 3 node(s)"), "{out}");
    // A node's report of a module lives in its WasmModule's status, which removal deletes:
    // `rm --wait` says so, in one line, before it removes anything.
    let err = c
        .weft_module(1, &["rm", "moved", "--wait", "30"])
        .expect_err("rm --wait on kube");
    assert!(
        err.contains("rm --wait cannot follow a removal on the Kubernetes store")
            && err.contains("nothing was removed"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    let ls = c.weft_module(1, &["ls"]).expect("ls");
    assert!(ls.lines().any(|l| l.starts_with("moved ")), "{ls}");
    c.weft_module(1, &["rm", "moved"]).expect("rm");
}

/// A module applied with kubectl is enforced on every Weft node (and on traffic from the
/// flannel node into them), reported per node, listed by `weft module ls`, and lifted by
/// `kubectl delete`.
fn module_applied_with_kubectl_blocks_a_port_everywhere(c: &TestCluster) {
    let k = kube(c);
    k.must(&[
        "apply",
        "-f",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/kubernetes/wasmmodule-crd.yml"),
    ]);
    k.apply(c.tmp.path(), "fw", &firewall_manifest(7777));
    assert!(
        eventually(Duration::from_secs(20), || {
            let o: Value =
                serde_json::from_str(&k.must(&["get", "wasmmodule", "fw", "-o", "json"])).unwrap_or_default();
            o["status"]["nodes"]
                .as_object()
                .is_some_and(|m| m.len() == 3 && m.values().all(|e| e["state"] == "loaded"))
        }),
        "fw not loaded on every node: {}",
        k.must(&["get", "wasmmodule", "fw", "-o", "json"])
    );
    let table = k.must(&["get", "wasmmodules"]);
    assert!(
        table.contains("ORDER") && table.lines().any(|l| l.starts_with("fw ") && l.contains("enforce")),
        "{table}"
    );
    // In force on the three Weft nodes; the flannel node's lease counts, and ls says why it is
    // not in force there.
    let ls = c.weft_module(1, &["ls"]).expect("weft module ls");
    assert!(
        ls.lines()
            .any(|l| l.starts_with("fw ") && l.contains(" 3/4 (no report from a Weft agent: ")),
        "{ls}"
    );
    // "loaded" means in force: on the kernel path the queue rules are in, no waiting for them.
    for n in 1..=3 {
        assert!(
            policy_rules(c, n).contains("NFQUEUE"),
            "node {n} reports fw loaded but does not queue new flows:\n{}",
            c.lab.nodes[n - 1].log_tail(20)
        );
    }
    for (a, b) in [(1, 2), (2, 3), (3, 1), (4, 1), (4, 2)] {
        let (src, _) = c.pod(a, 1);
        let (dst_ns, dst) = c.pod(b, 1);
        assert!(tcp_connects(&src, &dst_ns, dst, 7778), "tcp/7778 {a} -> {b} blocked");
        assert!(
            !tcp_connects(&src, &dst_ns, dst, 7777),
            "tcp/7777 {a} -> {b} got through"
        );
    }
    modules_through_the_rest_api(c);
    k.must(&["delete", "wasmmodule", "fw"]);
    let (src, _) = c.pod(1, 1);
    let (dst_ns, dst) = c.pod(2, 1);
    assert!(
        eventually(Duration::from_secs(15), || tcp_connects(&src, &dst_ns, dst, 7777)),
        "tcp/7777 still blocked after kubectl delete"
    );
}

/// `weft module` through an agent's REST API writes WasmModule objects kubectl sees.
fn modules_through_the_rest_api(c: &TestCluster) {
    let tf = c.lab.spec.dir.join("admin-token").display().to_string();
    let try_module = |args: &[&str]| {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", c.lab.nodes[0].ns.name()]).arg(weft_bin());
        cmd.args(["module", "--server", "http://127.0.0.1:8286", "--token-file", &tf])
            .args(args);
        weft::lab::cluster::run_checked(&mut cmd)
    };
    let module = |args: &[&str]| try_module(args).unwrap_or_else(|e| panic!("weft module {args:?}: {e}"));
    let fw = policy_wasm("firewall").display().to_string();
    let out = module(&["add", "gate", &fw, "--config-json", r#"{"rules":[]}"#, "--order", "3"]);
    assert!(out.starts_with("added module gate"), "{out}");
    let k = kube(c);
    let o: Value = serde_json::from_str(&k.must(&["get", "wm", "gate", "-o", "json"])).expect("JSON");
    assert_eq!(
        (o["spec"]["order"].as_i64(), o["spec"]["mode"].as_str()),
        (Some(3), Some("enforce")),
        "{o}"
    );
    // The flannel node holds a lease but runs no Weft agent: --wait names it, and gives up.
    let flannel = c.lab.nodes[3].underlay_ip.to_string();
    let err = try_module(&["set", "gate", "--dry-run", "true", "--wait", "3"])
        .expect_err("the flannel node never runs gate")
        .to_string();
    assert!(
        err.contains("not in force on every node after 3 s")
            && err.contains(&format!("no report from a Weft agent: {flannel}")),
        "{err}"
    );
    let o: Value = serde_json::from_str(&k.must(&["get", "wm", "gate", "-o", "json"])).expect("JSON");
    assert_eq!(o["spec"]["mode"], "dry-run", "{o}");
    assert_eq!(o["metadata"]["generation"], 2, "a spec change is a new generation: {o}");
    let err = try_module(&["rm", "gate", "--wait"])
        .expect_err("rm --wait through the API on kube")
        .to_string();
    assert!(
        err.contains("rm --wait cannot follow a removal on the Kubernetes store"),
        "{err}"
    );
    k.must(&["get", "wm", "gate"]);
    module(&["rm", "gate"]);
    let gone = k.kubectl(&["get", "wm", "gate"]).expect_err("deleted");
    assert!(gone.contains("not found"), "{gone}");
}

/// Every request Weft's agents and command line made (the stand-in logs each with its
/// user agent), as (resource, verb), is exactly what `kube-weft.yml`'s ClusterRole grants.
fn the_cluster_role_grants_exactly_what_weft_used(c: &TestCluster) {
    let mut used = std::collections::BTreeSet::new();
    for l in kube(c).log_tail().lines().filter(|l| !l.contains("ua=kubectl")) {
        let mut parts = l.split_whitespace();
        let (Some(method), Some(uri)) = (parts.next(), parts.next()) else {
            continue;
        };
        let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
        let rest = match path
            .strip_prefix("/api/v1/")
            .or_else(|| path.strip_prefix("/apis/weft.dev/v1alpha1/"))
        {
            Some(r) => r,
            None => continue,
        };
        let seg: Vec<&str> = rest.split('/').collect();
        let resource = match &seg[..] {
            [r, _, "status"] => format!("{r}/status"),
            [r, ..] => r.to_string(),
            [] => continue,
        };
        let verb = match (method, seg.len()) {
            ("GET", 1) if query.contains("watch=true") => "watch",
            ("GET", 1) => "list",
            ("GET", _) => "get",
            ("POST", _) => "create",
            ("PUT", _) => "update",
            ("PATCH", _) => "patch",
            ("DELETE", _) => "delete",
            _ => continue,
        };
        used.insert((resource, verb.to_string()));
    }
    let script = "import json,sys,yaml\nfor d in yaml.safe_load_all(open(sys.argv[1])):\n  if d and d['kind']=='ClusterRole':\n    print(json.dumps(d['rules']))";
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/kubernetes/kube-weft.yml");
    let out = weft::lab::cluster::run_checked(Command::new("python3").args(["-c", script, manifest])).expect("PyYAML");
    let rules: Value = serde_json::from_str(&out).expect("rules");
    let mut granted = std::collections::BTreeSet::new();
    for r in rules.as_array().expect("rules") {
        for res in r["resources"].as_array().expect("resources") {
            for v in r["verbs"].as_array().expect("verbs") {
                granted.insert((
                    res.as_str().unwrap_or("").to_string(),
                    v.as_str().unwrap_or("").to_string(),
                ));
            }
        }
    }
    assert_eq!(used, granted, "requests Weft made vs the ClusterRole");
}

/// The API server goes away for 30 s under a 10 Hz ping between two Weft pods and one to the
/// flannel node: no packet is lost, the agents notice, and when it returns with the old
/// watch versions compacted away they list again and follow new changes.
fn api_outage_costs_nothing(c: &mut TestCluster) {
    let (src, _) = c.pod(1, 1);
    let (_, dst) = c.pod(2, 1);
    let (_, flannel_pod) = c.pod(4, 1);
    // 32 s of 10 Hz pings, the outage inside them.
    let (p1, p2) = (steady_ping(&src, dst, 320), steady_ping(&src, flannel_pod, 320));
    std::thread::sleep(Duration::from_secs(1));
    c.kube.as_mut().expect("kube").stop();
    let stopped = Instant::now();
    let all_say = |c: &TestCluster, v: f64| (1..=3).all(|n| c.lab.metric(n, "weft_store_connected").ok() == Some(v));
    assert!(
        eventually(Duration::from_secs(20), || all_say(c, 0.0)),
        "the agents did not notice the API server leave"
    );
    std::thread::sleep(Duration::from_secs(30).saturating_sub(stopped.elapsed()));
    c.kube.as_mut().expect("kube").resume(true);
    for (name, p) in [("node 2", p1), ("the flannel node", p2)] {
        let lines = p.finish(Duration::from_secs(15));
        let counts = ping_counts(&lines);
        assert_eq!(
            counts,
            Some((320, 320)),
            "pings to {name} lost during the outage:\n{lines:?}"
        );
    }
    assert!(
        eventually(Duration::from_secs(30), || all_say(c, 1.0)),
        "the agents did not reconnect:\n{}",
        c.lab.nodes[0].log_tail(20)
    );
    // What the server saw after its restart: watches from the old versions answered 410,
    // then one new listing of the nodes per agent.
    let log = kube(c).log_tail();
    let since = log.rsplit("kube-standin listening").next().unwrap_or("");
    let gone = since
        .lines()
        .filter(|l| l.starts_with("watch of nodes answered 410"))
        .count();
    let lists = since
        .lines()
        .filter(|l| {
            let rest = l.strip_prefix("GET /api/v1/nodes").unwrap_or("!");
            (rest.starts_with(' ') || rest.starts_with('?')) && !l.contains("watch=true")
        })
        .count();
    assert!(
        gone >= 3 && lists >= 3,
        "{gone} watches refused, {lists} listings after the restart:\n{since}"
    );
}

#[test]
fn host_gw_waits_for_the_pod_cidr_then_routes_with_a_flannel_node() {
    let mut c = TestCluster::with_config("khg", StoreKind::Kube, 3, HOST_GW, &[]);
    register_node(&c, 1, Some("10.244.11.0/24"));
    register_node(&c, 2, Some("10.244.12.0/24"));
    register_node(&c, 3, None);
    start_in_a_pod(&mut c, 1);
    c.lab.start_agent(3).expect("start node 3");
    let log = c.lab.nodes[2].log_file();
    let said = |needle: &str| std::fs::read_to_string(&log).unwrap_or_default().contains(needle);
    assert!(
        eventually(Duration::from_secs(15), || said(
            "node \"node-3\" pod cidr not assigned"
        )),
        "no clear message:\n{}",
        c.lab.nodes[2].log_tail(20)
    );
    assert!(
        said("--allocate-node-cidrs"),
        "the message names the controller-manager flag"
    );
    std::thread::sleep(Duration::from_secs(3));
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(
        text.matches("pod cidr not assigned").count(),
        1,
        "said once, not every poll:\n{text}"
    );
    assert!(
        c.lab.nodes[2].agent.as_mut().expect("agent").exited().is_none(),
        "the agent waits rather than exits"
    );
    kube(&c).must(&[
        "patch",
        "node",
        "node-3",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"podCIDR":"10.244.13.0/24","podCIDRs":["10.244.13.0/24"]}}"#,
    ]);
    c.up(1);
    for n in 1..=3 {
        let log = c.lab.nodes[n - 1].log_tail(200);
        assert!(
            !log.contains("keeping the last known routes"),
            "a healthy start reported an outage:\n{log}"
        );
    }
    assert_eq!(c.subnet(3), "10.244.13.0/24".parse().expect("cidr"));
    check_published(&c, 3, "host-gw");
    // No WasmModule CRD in this cluster: the agents run, and say why modules are not read.
    assert!(
        c.lab.nodes[0]
            .log_tail(200)
            .contains("WasmModule objects unreadable (is the CRD installed?)"),
        "{}",
        c.lab.nodes[0].log_tail(30)
    );
    let f = flannel_node(&mut c, "host-gw");
    flannel_routes(&c, f);
    for n in 1..=3 {
        wait_routes(&c, n, 3);
    }
    all_pairs_ping(&c, 4);
    restart_under_traffic(&mut c);
    lease_commands_on_kubernetes(&c);
}

/// `weft lease ls` and `rm` on Kubernetes: the listing holds every published node (the
/// flannel one too); removing a live node's lease withdraws its annotations, and its agent
/// publishes them again at once, as it re-acquires a lease removed from etcd.
fn lease_commands_on_kubernetes(c: &TestCluster) {
    let ls = c.weft_cli("lease", &["ls"], None).expect("lease ls");
    for n in 1..=4 {
        assert!(ls.contains(&c.subnet(n).to_string()), "{ls}");
    }
    let two = c.subnet(2).to_string();
    c.weft_cli("lease", &["rm", &two], None).expect("lease rm");
    let marker = format!("{PREFIX}/kube-subnet-manager");
    assert!(
        eventually(Duration::from_secs(10), || kube(c).node("node-2")["metadata"]
            ["annotations"][&marker]
            == "true"),
        "node 2 never published again:\n{}",
        c.lab.nodes[1].log_tail(20)
    );
    assert!(
        c.lab.nodes[1].log_tail(50).contains("re-acquired the same subnet"),
        "{}",
        c.lab.nodes[1].log_tail(20)
    );
    let (src, _) = c.pod(1, 1);
    let (_, dst) = c.pod(2, 1);
    assert!(ping(&src, dst), "node 1 -> node 2 after the lease came back");
}

/// Node 2's agent restarted under a 10 Hz ping from node 1: no packet lost, and it adopts its
/// published lease without rewriting what flannel reads.
fn restart_under_traffic(c: &mut TestCluster) {
    let before = kube(c).node("node-2")["metadata"]["annotations"].clone();
    let (src, _) = c.pod(1, 1);
    let (_, dst) = c.pod(2, 1);
    let pinger = steady_ping(&src, dst, 50);
    std::thread::sleep(Duration::from_secs(1));
    c.lab.stop_agent(2, true).expect("stop");
    c.lab.start_agent(2).expect("start");
    c.lab.wait_ready(2, Duration::from_secs(20)).expect("ready again");
    let lines = pinger.finish(Duration::from_secs(15));
    assert_eq!(
        ping_counts(&lines),
        Some((50, 50)),
        "pings lost across the restart: {lines:?}"
    );
    assert_eq!(kube(c).node("node-2")["metadata"]["annotations"], before);
}

/// Starts node `n`'s agent as the DaemonSet runs it: no kubeconfig, only what a pod has (the
/// service account mounted at /var/run/secrets/kubernetes.io/serviceaccount, in a mount
/// namespace of its own over a private /run, and KUBERNETES_SERVICE_HOST/PORT).
fn start_in_a_pod(c: &mut TestCluster, n: usize) {
    let k = kube(c);
    let sa = k.service_account(&c.tmp.path().join(format!("pod-{n}")));
    let host = k.addr.to_string();
    let port = kubelab::PORT.to_string();
    let mut args = c.lab.agent_args(n).expect("args");
    let at = args
        .iter()
        .position(|a| a == "--kubeconfig-file")
        .expect("kubeconfig flag");
    args.drain(at..at + 2);
    let script = format!(
        "mount -t tmpfs tmpfs /run && mkdir -p /run/secrets/kubernetes.io && cp -r {} /run/secrets/kubernetes.io/ && exec \"$0\" \"$@\"",
        sa.display()
    );
    let wrap = ["unshare", "--mount", "--propagation", "private", "sh", "-c", &script];
    let env = [
        ("KUBERNETES_SERVICE_HOST", host.as_str()),
        ("KUBERNETES_SERVICE_PORT", port.as_str()),
    ];
    c.lab.start_agent_with(n, &wrap, &env, &args).expect("start in a pod");
}

/// The stand-in's fidelity: the real kubectl reads, patches, applies and watches through it.
#[test]
fn kubectl_accepts_the_stand_in() {
    let c = weft_cluster("kctl", HOST_GW, 1);
    let k = kube(&c);
    let nodes: Value = serde_json::from_str(&k.must(&["get", "nodes", "-o", "json"])).expect("JSON");
    assert_eq!(nodes["items"][0]["metadata"]["name"], "node-1");
    assert_eq!(nodes["items"][0]["spec"]["podCIDR"], "10.244.11.0/24");
    kubectl_watches(&c);
    kubectl_patches(k);
    kubectl_applies_the_crd_and_a_module(&c);
    // Unauthenticated and unknown requests get Kubernetes' Status answers.
    let bad = Command::new("ip")
        .args([
            "netns",
            "exec",
            &k.ns,
            "kubectl",
            "--server",
            &format!("https://{}:6443", k.addr),
            "--insecure-skip-tls-verify",
            "--token",
            "wrong",
            "get",
            "nodes",
        ])
        .output()
        .expect("kubectl");
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("Unauthorized") || err.contains("must be logged in"),
        "{err}"
    );
    let missing = k.kubectl(&["get", "node", "nope"]).expect_err("no such node");
    assert!(missing.contains("nodes \"nope\" not found"), "{missing}");
}

/// `kubectl get -w` sees a strategic-merge patch.
fn kubectl_watches(c: &TestCluster) {
    let k = kube(c);
    let watch = c.tmp.path().join("watch.out");
    let out = std::fs::File::create(&watch).expect("watch file");
    let mut w = Command::new("ip")
        .args(["netns", "exec", &k.ns, "kubectl", "--kubeconfig"])
        .arg(&k.kubeconfig)
        .args([
            "get",
            "nodes",
            "-w",
            "-o",
            "custom-columns=NAME:.metadata.name,TEAM:.metadata.annotations.team",
        ])
        .stdout(out)
        .spawn()
        .expect("kubectl get -w");
    std::thread::sleep(Duration::from_millis(800));
    k.must(&[
        "patch",
        "node",
        "node-1",
        "--type",
        "strategic",
        "-p",
        r#"{"metadata":{"annotations":{"team":"net"}}}"#,
    ]);
    let seen = eventually(Duration::from_secs(10), || {
        std::fs::read_to_string(&watch)
            .unwrap_or_default()
            .lines()
            .any(|l| l.starts_with("node-1") && l.ends_with("net"))
    });
    let _ = w.kill();
    let _ = w.wait();
    assert!(
        seen,
        "kubectl get -w saw no change:\n{}",
        std::fs::read_to_string(&watch).unwrap_or_default()
    );
}

/// A status patch keeps the spec; a JSON merge patch on the object removes a key.
fn kubectl_patches(k: &kubelab::KubeApi) {
    k.must(&[
        "patch",
        "node",
        "node-1",
        "--subresource=status",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"podCIDR":"10.9.9.0/24"},"status":{"phase":"Running"}}"#,
    ]);
    k.must(&[
        "patch",
        "node",
        "node-1",
        "--type",
        "merge",
        "-p",
        r#"{"metadata":{"annotations":{"team":null}}}"#,
    ]);
    let n = k.node("node-1");
    assert_eq!(n["spec"]["podCIDR"], "10.244.11.0/24", "{n}");
    assert_eq!(n["status"]["phase"], "Running", "{n}");
    assert!(n["metadata"]["annotations"].get("team").is_none(), "{n}");
}

/// The CRD and a module through `kubectl apply`, shown with the CRD's printer columns.
fn kubectl_applies_the_crd_and_a_module(c: &TestCluster) {
    let k = kube(c);
    let crd = k.must(&[
        "apply",
        "-f",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/kubernetes/wasmmodule-crd.yml"),
    ]);
    assert!(crd.contains("wasmmodules.weft.dev created"), "{crd}");
    let applied = k.apply(c.tmp.path(), "fw", &firewall_manifest(7777));
    assert!(applied.contains("wasmmodule.weft.dev/fw created"), "{applied}");
    let table = k.must(&["get", "wm"]);
    let header: Vec<&str> = table.lines().next().unwrap_or("").split_whitespace().collect();
    assert_eq!(header, ["NAME", "ORDER", "MODE", "FAILURE", "AGE"], "{table}");
    assert!(
        table
            .lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("fw") && l.contains("10") && l.contains("closed")),
        "{table}"
    );
    let wide = k.must(&["get", "wm", "-o", "wide"]);
    assert!(wide.contains("SHA256"), "priority-1 columns show with -o wide: {wide}");
}
