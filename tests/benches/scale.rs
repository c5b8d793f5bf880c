//! The control plane at cluster scale, against Debian's etcd with fake peers written in
//! flannel's format (leases of nodes that do not exist, so only the agent's own work is
//! measured). Each figure sits beside a reference measured in the same run:
//!
//! - `vxlan` initial sync of N leases (start until the subnet file, which now waits for every
//!   route) and its CPU time, beside `ip -batch` writing the same 3N entries by hand;
//! - one new lease until its route is in the kernel, beside an `etcdctl watch` seeing the put;
//! - 1,024 leases deleted in one revision until their routes are gone;
//! - a restart under a 10 Hz ping between two real pods: pings lost, entries deleted;
//! - agent memory at N and at the big table;
//! - 12 `udp` agents started together on N leases: until every agent holds every lease, beside
//!   one agent alone; then a new lease until all 12 hold it.
//!
//! As root: `tests/bench/scale.sh` (or `cargo bench -p weft-tests --bench scale -- [--quick]`).

use std::time::{Duration, Instant};

use weft_tests::*;

struct Opts {
    leases: u32,
    big: u32,
    agents: usize,
    trials: usize,
}

impl Opts {
    fn from_args() -> Opts {
        let args: Vec<String> = std::env::args().collect();
        let num = |flag: &str, default: u32| {
            args.iter()
                .position(|a| a == flag)
                .and_then(|i| args.get(i + 1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        if args.iter().any(|a| a == "--quick") {
            return Opts {
                leases: num("--leases", 1_000),
                big: 0,
                agents: 4,
                trials: 10,
            };
        }
        Opts {
            leases: num("--leases", 5_000),
            big: num("--big", 20_000),
            agents: num("--agents", 12) as usize,
            trials: num("--trials", 50) as usize,
        }
    }
}

fn routes_in(c: &TestCluster, n: usize) -> usize {
    weft::lab::cluster::run_checked(
        c.lab.nodes[n - 1]
            .ns
            .command("ip")
            .args(["route", "show", "proto", "87"]),
    )
    .map(|o| o.lines().count())
    .unwrap_or(0)
}

fn pid(c: &TestCluster, n: usize) -> u32 {
    c.lab.nodes[n - 1].agent.as_ref().map(|a| a.pid()).expect("agent runs")
}

/// Starts node `n`'s agent and returns (seconds until its subnet file appeared, CPU seconds
/// then, routes the kernel held the moment the file appeared).
fn start_and_time(c: &mut TestCluster, n: usize) -> (f64, f64, usize) {
    let file = c.lab.nodes[n - 1].subnet_file();
    let _ = std::fs::remove_file(&file);
    let t = Instant::now();
    c.lab.start_agent(n).expect("start agent");
    while !file.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "no subnet file:\n{}",
            c.lab.nodes[n - 1].log_tail(10)
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let secs = t.elapsed().as_secs_f64();
    let routes = routes_in(c, n);
    (secs, cpu_seconds(pid(c, n)), routes)
}

/// The kernel's own cost: the same neighbours, FDB entries and routes for `n` peers written by
/// one `ip -batch` (and one `bridge -batch`) into a fresh VXLAN device in namespace `ns`.
fn by_hand(ns: &str, n: u32) -> f64 {
    let ip = |args: &[&str]| {
        weft::lab::cluster::run_checked(std::process::Command::new("ip").args(["-n", ns]).args(args)).expect("ip")
    };
    ip(&[
        "link",
        "add",
        "ref.1",
        "type",
        "vxlan",
        "id",
        "77",
        "dstport",
        "8477",
        "local",
        "198.18.0.12",
        "nolearning",
    ]);
    ip(&["link", "set", "ref.1", "up"]);
    let mut neigh = String::new();
    let mut fdb = String::new();
    let mut routes = String::new();
    for i in 0..n {
        let s = fake_subnet(i);
        let mac = format!(
            "02:0e:00:{:02x}:{:02x}:{:02x}",
            (i >> 16) as u8,
            (i >> 8) as u8,
            i as u8
        );
        let gw = s.network();
        neigh.push_str(&format!("neigh replace {gw} lladdr {mac} dev ref.1 nud permanent\n"));
        fdb.push_str(&format!(
            "fdb replace {mac} dev ref.1 dst 198.19.{}.{} self permanent\n",
            (i >> 8) as u8,
            i as u8
        ));
        routes.push_str(&format!("route replace {s} via {gw} dev ref.1 onlink proto 88\n"));
    }
    let dir = tempfile::tempdir().expect("tmp");
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).expect("batch file");
        p.display().to_string()
    };
    let (n_file, f_file, r_file) = (write("neigh", &neigh), write("fdb", &fdb), write("routes", &routes));
    let t = Instant::now();
    ip(&["-batch", &n_file]);
    weft::lab::cluster::run_checked(std::process::Command::new("bridge").args(["-n", ns, "-batch", &f_file]))
        .expect("bridge");
    ip(&["-batch", &r_file]);
    let secs = t.elapsed().as_secs_f64();
    ip(&["link", "del", "ref.1"]);
    secs
}

/// The rows of an initial sync: its time beside `ip -batch`, the agent's CPU and memory.
fn sync_rows(label: &str, secs: f64, hand: f64, cpu: f64, rss: f64) {
    row(
        label,
        format!("{secs:.3}"),
        format!("{hand:.3} ip -batch"),
        format!("{:.2}x", secs / hand),
    );
    row(
        "  CPU of the agent until then (s)",
        format!("{cpu:.3}"),
        String::new(),
        String::new(),
    );
    row("  agent RSS (MiB)", format!("{rss:.1}"), String::new(), String::new());
}

fn row(label: &str, value: String, reference: String, ratio: String) {
    println!("{label:<68} {value:>12} {reference:>20} {ratio:>8}");
}

/// Whether the agent on this namespace's loopback answers 200 for `path`.
fn holds(path: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", 8286)) else {
        return false;
    };
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && &head[9..12] == b"200"
}

/// Section one: a `vxlan` node and a table of `o.leases`.
fn vxlan(o: &Opts) {
    let n = o.leases;
    let mut c = TestCluster::with_config("bsc", StoreKind::Etcd, 2, &scale_net(r#"{"Type":"vxlan"}"#), &[]);
    let t = Instant::now();
    c.fake_leases(0..n, Fake::Vxlan);
    println!(
        "wrote {n} fake vxlan leases into etcd in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    println!(
        "\n{:<68} {:>12} {:>20} {:>8}",
        "vxlan, Debian's etcd", "Weft", "reference", "ratio"
    );
    let hand = by_hand(c.lab.nodes[1].ns.name(), n);
    let (secs, cpu, routes) = start_and_time(&mut c, 1);
    assert_eq!(routes, n as usize, "the subnet file came before every route");
    sync_rows(
        &format!("initial sync, {n} leases (start to subnet file, s)"),
        secs,
        hand,
        cpu,
        rss_mib(pid(&c, 1)),
    );
    c.lab.start_agent(2).expect("node 2");
    c.lab.wait_ready(2, Duration::from_secs(60)).expect("node 2 ready");
    c.lab.wait_ready(1, Duration::from_secs(60)).expect("node 1 ready");
    c.lab.attach_pods(1, 1).expect("pod");
    c.lab.attach_pods(2, 1).expect("pod");
    new_lease_latency(&c, n, o.trials);
    deletions(&c, n);
    restart(&mut c, n);
}

/// One new lease until node 1's kernel has its route, beside `etcdctl watch` seeing the put.
fn new_lease_latency(c: &TestCluster, n: u32, trials: usize) {
    let etcd = c.etcd.as_ref().expect("etcd");
    let ns = c.lab.nodes[0].ns.name().to_string();
    let monitor = Watcher::start("ip", &["-n", &ns, "monitor", "route"]);
    let watch = Watcher::start(
        "ip",
        &[
            "netns",
            "exec",
            &etcd.ns,
            "etcdctl",
            "--endpoints",
            &etcd.endpoint(),
            "watch",
            "--prefix",
            "/coreos.com/network/subnets/",
        ],
    );
    let (mut weft, mut reference) = (Vec::new(), Vec::new());
    for k in 0..trials as u32 {
        let i = 30_000 + k;
        let key = weft::subnet::subnet_key(&fake_subnet(i));
        let route = fake_subnet(i).to_string();
        let t0 = etcd.put_fake_lease_timed(i, Fake::Vxlan);
        let seen = monitor
            .wait_line(t0, Duration::from_secs(5), |l| l.starts_with(&route))
            .expect("route came");
        let told = watch
            .wait_line(t0, Duration::from_secs(5), |l| l.ends_with(&key))
            .expect("etcdctl saw the put");
        weft.push(seen.duration_since(t0).as_secs_f64() * 1000.0);
        reference.push(told.duration_since(t0).as_secs_f64() * 1000.0);
        std::thread::sleep(Duration::from_millis(20));
    }
    let label = format!("one new lease until its route is in the kernel, {n} leases");
    latency_rows(&label, &mut weft, &mut reference, "etcdctl watch");
}

/// p50 and p99 of `weft` beside `reference` (milliseconds), as two rows.
fn latency_rows(label: &str, weft: &mut [f64], reference: &mut [f64], what: &str) {
    let (w50, r50) = (percentile(weft, 50.0), percentile(reference, 50.0));
    let (w99, r99) = (percentile(weft, 99.0), percentile(reference, 99.0));
    row(
        &format!("{label} p50 (ms)"),
        format!("{w50:.2}"),
        format!("{r50:.2} {what}"),
        format!("{:.2}x", w50 / r50),
    );
    row(
        &format!("  p99 over {} (ms)", weft.len()),
        format!("{w99:.2}"),
        format!("{r99:.2}"),
        format!("{:.2}x", w99 / r99),
    );
}

/// 1,024 fake leases deleted in one revision until node 1's kernel lost their routes.
fn deletions(c: &TestCluster, n: u32) {
    let etcd = c.etcd.as_ref().expect("etcd");
    let ns = c.lab.nodes[0].ns.name().to_string();
    let monitor = Watcher::start("ip", &["-n", &ns, "monitor", "route"]);
    let t0 = Instant::now();
    let gone = etcd.delete_fake_blocks(0..4);
    let deadline = t0 + Duration::from_secs(30);
    let last = loop {
        let lines = monitor.timed_lines();
        let dels: Vec<Instant> = lines
            .iter()
            .filter(|(_, l)| l.starts_with("Deleted 10.") && l.contains("proto 87"))
            .map(|(t, _)| *t)
            .collect();
        if dels.len() >= gone || Instant::now() > deadline {
            break dels.into_iter().max();
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let secs = last.map_or(f64::NAN, |t| t.duration_since(t0).as_secs_f64());
    row(
        &format!("{gone} leases deleted in one revision, of {n}: routes gone (s)"),
        format!("{secs:.3}"),
        String::new(),
        String::new(),
    );
    // Put them back for the restart below.
    let before = routes_in(c, 1) + gone;
    etcd.put_fake_leases(0..1_024.min(n), Fake::Vxlan);
    let until = Instant::now() + Duration::from_secs(30);
    while routes_in(c, 1) < before && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A restart of node 1 under a 10 Hz ping from node 2's pod: pings lost, Weft entries deleted.
fn restart(c: &mut TestCluster, n: u32) {
    let (p2, _) = c.pod(2, 1);
    let (_, p1ip) = c.pod(1, 1);
    let ns = c.lab.nodes[0].ns.name().to_string();
    let (routes, fdb) = kernel_monitor(&ns);
    let pinger = steady_ping(&p2, p1ip, 80);
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    c.lab.stop_agent(1, true).expect("stop");
    c.lab.start_agent(1).expect("start");
    c.lab.wait_ready(1, Duration::from_secs(120)).expect("ready again");
    let secs = t.elapsed().as_secs_f64();
    let pings = pinger.finish(Duration::from_secs(20));
    let mut seen = routes.lines();
    seen.extend(fdb.lines());
    let deleted = weft_deletions(&seen).len();
    let (sent, received) = ping_counts(&pings).unwrap_or((0, 0));
    let label = format!("restart (SIGTERM, start) at {n} leases under a 10 Hz ping");
    row(
        &format!("{label}: pings lost"),
        format!("{} of {sent}", sent - received),
        String::new(),
        String::new(),
    );
    row(
        "  Weft entries deleted during it",
        format!("{deleted}"),
        String::new(),
        String::new(),
    );
    row(
        "  stop to ready again (s)",
        format!("{secs:.3}"),
        String::new(),
        String::new(),
    );
    let adds = c.metric(1, "weft_kernel_entries_written_total{op=\"add\"}");
    row(
        "  entries the restarted agent wrote",
        format!("{adds}"),
        String::new(),
        String::new(),
    );
}

/// The big table: initial sync and memory.
fn big(o: &Opts) {
    if o.big == 0 {
        return;
    }
    let mut c = TestCluster::with_config("bsb", StoreKind::Etcd, 1, &scale_net(r#"{"Type":"vxlan"}"#), &[]);
    c.fake_leases(0..o.big, Fake::Vxlan);
    let hand = by_hand(c.lab.nodes[0].ns.name(), o.big);
    let (secs, cpu, routes) = start_and_time(&mut c, 1);
    assert_eq!(routes, o.big as usize);
    // Memory once the agent has settled, not mid-sync.
    std::thread::sleep(Duration::from_secs(2));
    let rss = rss_mib(pid(&c, 1));
    sync_rows(&format!("initial sync, {} leases (s)", o.big), secs, hand, cpu, rss);
}

/// `o.agents` `udp` agents started together on `o.leases` leases.
fn many_agents(o: &Opts) {
    let n = o.leases;
    let k = o.agents;
    let mut c = TestCluster::with_config("bsm", StoreKind::Etcd, k, &scale_net(r#"{"Type":"udp"}"#), &[]);
    c.fake_leases(0..n, Fake::Udp);
    let want = |extra: usize| (n as usize + extra) as f64;
    // The reference: one agent alone on the same table.
    let t = Instant::now();
    c.lab.start_agent(1).expect("start");
    c.lab.wait_ready(1, Duration::from_secs(120)).expect("ready");
    while c.lab.metric(1, "weft_leases").unwrap_or(0.0) < want(1) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let alone = t.elapsed().as_secs_f64();
    c.lab.stop_agent(1, true).expect("stop");
    let t = Instant::now();
    for i in 1..=k {
        c.lab.start_agent(i).expect("start");
    }
    for i in 1..=k {
        c.lab.wait_ready(i, Duration::from_secs(300)).expect("ready");
        while c.lab.metric(i, "weft_leases").unwrap_or(0.0) < want(k) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let together = t.elapsed().as_secs_f64();
    row(
        &format!("{k} udp agents started together, {n} leases: all hold all (s)"),
        format!("{together:.3}"),
        format!("{alone:.3} one alone"),
        format!("{:.2}x", together / alone),
    );
    let etcd = c.etcd.as_ref().expect("etcd");
    let mut lat = Vec::new();
    for trial in 0..(o.trials / 5).max(4) as u32 {
        let i = 40_000 + trial;
        let path = format!("/api/v1/leases/{}", weft::subnet::subnet_key(&fake_subnet(i)));
        // One poller per agent, each inside its agent's namespace, all asking at once.
        let start = std::sync::Arc::new(std::sync::Barrier::new(k + 1));
        let pollers: Vec<_> = (1..=k)
            .map(|a| {
                let ns = c.lab.nodes[a - 1].ns.name().to_string();
                let (path, start) = (path.clone(), start.clone());
                std::thread::spawn(move || {
                    weft::lab::netns::enter_and_run(&ns, move || {
                        start.wait();
                        let until = Instant::now() + Duration::from_secs(10);
                        while Instant::now() < until {
                            if holds(&path) {
                                return Some(Instant::now());
                            }
                            std::thread::sleep(Duration::from_micros(500));
                        }
                        None
                    })
                    .ok()
                    .flatten()
                })
            })
            .collect();
        start.wait();
        let t0 = etcd.put_fake_lease_timed(i, Fake::Udp);
        for (a, p) in pollers.into_iter().enumerate() {
            let seen = p
                .join()
                .ok()
                .flatten()
                .unwrap_or_else(|| panic!("agent {} never saw the lease", a + 1));
            lat.push(seen.saturating_duration_since(t0).as_secs_f64() * 1000.0);
        }
    }
    let p50 = percentile(&mut lat, 50.0);
    let p99 = percentile(&mut lat, 99.0);
    row(
        &format!("  a new lease until each of the {k} holds it, p50 (ms)"),
        format!("{p50:.2}"),
        String::new(),
        String::new(),
    );
    row(
        &format!("  p99 over {} (ms)", lat.len()),
        format!("{p99:.2}"),
        String::new(),
        String::new(),
    );
}

/// Section four: the Kubernetes subnet manager (`--kube-subnet-mgr`) with `o.leases` fake
/// nodes in the stand-in API server, each with flannel's annotations.
fn kube(o: &Opts) {
    use weft_tests::kubelab::FakeOp;
    let n = o.leases;
    let mut c = TestCluster::with_config("bku", StoreKind::Kube, 3, &scale_net(r#"{"Type":"vxlan"}"#), &[]);
    for i in 1..=3 {
        register(&c, i);
    }
    let k = c.kube.as_ref().expect("kube");
    let fifth = n / 5;
    let t = Instant::now();
    k.fake_nodes(0..fifth, FakeOp::Create(Fake::Vxlan));
    println!(
        "\nwrote {fifth} fake nodes into the stand-in API server in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    println!(
        "\n{:<68} {:>12} {:>20} {:>8}",
        "vxlan, --kube-subnet-mgr (stand-in API server)", "Weft", "reference", "ratio"
    );
    let (_, _, routes) = start_and_time(&mut c, 1);
    assert_eq!(routes, fifth as usize, "node 1 routes every fake node");
    let small = heartbeat_cost(&c, 0..fifth, 1);
    let k = c.kube.as_ref().expect("kube");
    k.fake_nodes(fifth..n, FakeOp::Create(Fake::Vxlan));
    assert!(
        eventually(Duration::from_secs(60), || routes_in(&c, 1) == n as usize),
        "node 1 routes {} of {n} fake nodes:\n{}",
        routes_in(&c, 1),
        c.lab.nodes[0].log_tail(30)
    );
    let hand = by_hand(c.lab.nodes[1].ns.name(), n);
    let (secs, cpu, routes) = start_and_time(&mut c, 3);
    assert_eq!(
        routes,
        n as usize + 1,
        "the subnet file came before every route (the fakes and node 1)"
    );
    sync_rows(
        &format!("initial sync, {n} nodes (start to subnet file, s)"),
        secs,
        hand,
        cpu,
        rss_mib(pid(&c, 3)),
    );
    let big = heartbeat_cost(&c, 0..n, 2);
    row(
        &format!("CPU per kubelet heartbeat of a peer, {n} nodes (us)"),
        format!("{big:.1}"),
        format!("{small:.1} at {fifth}"),
        format!("{:.2}x", big / small),
    );
    new_node_latency(&c, n, o.trials);
}

fn register(c: &TestCluster, i: usize) {
    let name = weft::lab::cluster::kube_node_name(i);
    let node = serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
        "spec": {"podCIDR": format!("10.0.{i}.0/24")}});
    let file = c.tmp.path().join(format!("{name}.json"));
    std::fs::write(&file, node.to_string()).expect("node");
    c.kube
        .as_ref()
        .expect("kube")
        .must(&["create", "-f", &file.display().to_string()]);
}

/// Node 1's CPU per status heartbeat of the fake nodes in `range` (microseconds), asserting
/// that not one of them reached the kernel.
fn heartbeat_cost(c: &TestCluster, range: std::ops::Range<u32>, beat: u32) -> f64 {
    let ns = c.lab.nodes[0].ns.name().to_string();
    let monitor = Watcher::start("ip", &["-n", &ns, "monitor", "route", "neigh"]);
    std::thread::sleep(Duration::from_millis(200));
    // Enough heartbeats that the CPU they cost is many clock ticks.
    let rounds = (10_000 / range.len().max(1)).max(1) as u32;
    let count = (range.len() as u32 * rounds) as f64;
    let before = cpu_seconds(pid(c, 1));
    for r in 0..rounds {
        let op = weft_tests::kubelab::FakeOp::Heartbeat(beat * 100 + r);
        c.kube.as_ref().expect("kube").fake_nodes(range.clone(), op);
    }
    // The last heartbeats are still in flight to the agent for a moment.
    std::thread::sleep(Duration::from_secs(2));
    let spent = cpu_seconds(pid(c, 1)) - before;
    // The kernel's own entries (an IPv6 link-local route as a device comes up) are not ours.
    let changes: Vec<String> = monitor
        .lines()
        .into_iter()
        .filter(|l| !l.contains("proto kernel"))
        .collect();
    assert!(
        changes.is_empty(),
        "heartbeats reached the kernel: {:?}",
        &changes[..changes.len().min(5)]
    );
    spent / count * 1e6
}

/// One new Node with its annotations until node 1's kernel has its route, beside
/// `kubectl get nodes -w` seeing it.
fn new_node_latency(c: &TestCluster, n: u32, trials: usize) {
    let k = c.kube.as_ref().expect("kube");
    let ns = c.lab.nodes[0].ns.name().to_string();
    let monitor = Watcher::start("ip", &["-n", &ns, "monitor", "route"]);
    let kc = k.kubeconfig.display().to_string();
    let watch = Watcher::start(
        "ip",
        &[
            "netns",
            "exec",
            &k.ns,
            "kubectl",
            "--kubeconfig",
            &kc,
            "get",
            "nodes",
            "-w",
            "--watch-only",
            "-o",
            "name",
        ],
    );
    std::thread::sleep(Duration::from_millis(500));
    let (mut weft, mut reference) = (Vec::new(), Vec::new());
    for t in 0..trials as u32 {
        let i = 30_000 + t;
        let route = fake_subnet(i).to_string();
        let name = format!("node/fake-{i}");
        let t0 = Instant::now();
        k.fake_nodes(i..i + 1, weft_tests::kubelab::FakeOp::Create(Fake::Vxlan));
        let seen = monitor
            .wait_line(t0, Duration::from_secs(5), |l| l.starts_with(&route))
            .expect("route came");
        let told = watch
            .wait_line(t0, Duration::from_secs(5), |l| l.trim() == name)
            .expect("kubectl saw the node");
        weft.push(seen.duration_since(t0).as_secs_f64() * 1000.0);
        reference.push(told.duration_since(t0).as_secs_f64() * 1000.0);
    }
    let label = format!("one new node until its route is in the kernel, {n} nodes");
    latency_rows(&label, &mut weft, &mut reference, "kubectl get -w");
}

fn main() {
    let o = Opts::from_args();
    let only_kube = std::env::args().any(|a| a == "--kube-only");
    if !only_kube {
        vxlan(&o);
        big(&o);
        many_agents(&o);
    }
    kube(&o);
}
