//! Weft on a real three-member etcd cluster (Debian's etcd, one member per namespace), given
//! every member in `--etcd-endpoints`: the leader killed under traffic while a node joins, then
//! the quorum lost for 20 s and regained. Every request that fails on one member moves to
//! another, watches follow a leader, `weft_store_connected` says when none is left, and no lease
//! is lost, moved or doubled.

use std::time::Duration;

use weft::lab::cluster::LabStore;
use weft_tests::*;

struct Members {
    etcd: Vec<Etcd>,
}

impl Members {
    /// Three members on the underlay of `c`.
    fn start(c: &mut TestCluster) -> Members {
        let hosts: Vec<(String, std::net::Ipv4Addr)> = (1..=3)
            .map(|i| c.lab.add_host(&format!("e{i}")).expect("etcd host"))
            .collect();
        let cluster = hosts
            .iter()
            .enumerate()
            .map(|(i, (_, a))| format!("m{}=http://{a}:2380", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let etcd: Vec<Etcd> = hosts
            .into_iter()
            .enumerate()
            .map(|(i, (ns, a))| {
                let dir = c.tmp.path().join(format!("etcd{}", i + 1));
                Etcd::member(ns, a, dir, &format!("m{}", i + 1), &cluster)
            })
            .collect();
        for e in &etcd {
            e.wait_healthy();
        }
        Members { etcd }
    }

    fn endpoints(&self) -> String {
        self.etcd.iter().map(Etcd::endpoint).collect::<Vec<_>>().join(",")
    }

    /// `etcdctl` against every member, run from a member that is up.
    fn etcdctl(&self, args: &[&str]) -> Result<String, String> {
        let live = self.etcd.iter().find(|e| e.running()).ok_or("no member runs")?;
        live.etcdctl_with(&self.endpoints(), args)
    }

    /// The index of the member that leads.
    fn leader(&self) -> usize {
        for _ in 0..50 {
            for (i, e) in self.etcd.iter().enumerate().filter(|(_, e)| e.running()) {
                let Ok(out) = e.etcdctl(&["endpoint", "status", "-w", "json"]) else {
                    continue;
                };
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&out) else {
                    continue;
                };
                let s = &v[0]["Status"];
                if s["leader"].as_u64().is_some() && s["leader"] == s["header"]["member_id"] {
                    return i;
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("no etcd member leads");
    }

    /// (subnet, PublicIP) of every lease, read through the cluster.
    fn leases(&self) -> Vec<(String, String)> {
        let out = self
            .etcdctl(&["get", "--prefix", "/coreos.com/network/subnets/"])
            .expect("etcdctl get");
        let lines: Vec<&str> = out.lines().collect();
        let mut v: Vec<(String, String)> = lines
            .chunks(2)
            .filter_map(|kv| {
                let ip = serde_json::from_str::<serde_json::Value>(kv.get(1)?).ok()?["PublicIP"]
                    .as_str()?
                    .to_string();
                Some((kv[0].rsplit('/').next()?.to_string(), ip))
            })
            .collect();
        v.sort();
        v
    }
}

fn connected(c: &TestCluster, n: usize) -> f64 {
    c.lab.metric(n, "weft_store_connected").unwrap_or(-1.0)
}

#[test]
fn leader_death_and_quorum_loss_lose_no_lease_and_no_ping() {
    // vxlan: the kernel carries the pods' traffic, so an agent restart loses no ping either.
    let net = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
    let mut c = TestCluster::with_config("ec", StoreKind::Embedded, 2, net, &["--lease-ttl", "8"]);
    let mut m = Members::start(&mut c);
    c.lab.spec.store = LabStore::Etcd {
        endpoints: m.endpoints(),
        prefix: "/coreos.com/network".into(),
    };
    c.up(1);
    let (p2, _) = c.pod(2, 1);
    let (_, p1ip) = c.pod(1, 1);
    let pinger = steady_ping(&p2, p1ip, 550);

    // The leader dies (SIGKILL) under traffic; a node joins meanwhile.
    let leader = m.leader();
    m.etcd[leader].stop();
    let n3 = c.lab.add_node().expect("node 3");
    c.lab.start_agent(n3).expect("start node 3");
    c.lab.wait_ready(n3, Duration::from_secs(30)).unwrap_or_else(|e| {
        panic!(
            "node 3 did not start with a member down: {e}\n{}",
            c.lab.nodes[2].log_tail(10)
        )
    });
    c.lab.attach_pods(n3, 1).expect("pod on node 3");
    for _ in 0..10 {
        let out = weft::lab::cluster::run_checked(c.lab.nodes[0].ns.command(&weft_bin().display().to_string()).args([
            "lease",
            "ls",
            "--etcd-endpoints",
            &m.endpoints(),
        ]));
        assert!(
            out.as_ref().is_ok_and(|o| o.lines().count() == 4),
            "lease ls with a member down: {out:?}"
        );
    }
    // An 8 s TTL renews every 4 s: two renewals on every node while the leader is gone.
    let renewals: Vec<f64> = (1..=3).map(|n| c.metric(n, "weft_lease_renewals_total")).collect();
    std::thread::sleep(Duration::from_secs(9));
    for n in 1..=3 {
        assert!(
            c.metric(n, "weft_lease_renewals_total") >= renewals[n - 1] + 2.0,
            "node {n} stopped renewing"
        );
        assert_eq!(connected(&c, n), 1.0, "node {n} lost the store with two members up");
    }
    let before = m.leases();
    assert_eq!(before.len(), 3, "{before:?}");
    m.etcd[leader].resume();
    // A restarted agent tries the members in order: node 1 now watches member 1, the one
    // that will be left without a leader below.
    c.lab.stop_agent(1, true).expect("stop node 1");
    c.lab.start_agent(1).expect("start node 1");
    c.lab
        .wait_ready(1, Duration::from_secs(30))
        .expect("node 1 ready again");

    // Quorum lost for 20 s: every agent says so, traffic keeps flowing, nothing expires.
    let down = [1, 2];
    for &i in &down {
        m.etcd[i].stop();
    }
    for n in 1..=3 {
        assert!(
            eventually(Duration::from_secs(15), || connected(&c, n) == 0.0),
            "node {n} still reports the store connected without a quorum"
        );
    }
    // ... and keeps saying so: no member without a leader is taken for a store that answers.
    for _ in 0..24 {
        std::thread::sleep(Duration::from_millis(500));
        for n in 1..=3 {
            assert_eq!(
                connected(&c, n),
                0.0,
                "node {n} took a leaderless member for a working store:\n{}",
                c.lab.nodes[n - 1].log_tail(60)
            );
        }
    }
    for &i in &down {
        m.etcd[i].spawn();
    }
    for &i in &down {
        m.etcd[i].wait_healthy();
    }
    for n in 1..=3 {
        assert!(
            eventually(Duration::from_secs(20), || connected(&c, n) == 1.0),
            "node {n} did not reconnect:\n{}",
            c.lab.nodes[n - 1].log_tail(10)
        );
    }

    // Every lease is where it was: none lost, moved or doubled; nobody had to re-acquire.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(m.leases(), before);
    for n in 1..=3 {
        assert_eq!(
            c.metric(n, "weft_lease_acquisitions_total"),
            1.0,
            "node {n} lost its lease; its log ends:\n{}",
            c.lab.nodes[n - 1].log_tail(60)
        );
        assert_eq!(c.metric(n, "weft_routes"), 2.0);
    }
    let (_, p3ip) = c.pod(3, 1);
    assert!(ping(&p2, p3ip), "the node that joined during the outage is routed");
    let pings = pinger.finish(Duration::from_secs(60));
    let (sent, received) = ping_counts(&pings).unwrap_or_else(|| panic!("no ping summary: {pings:?}"));
    assert_eq!(received, sent, "pings lost while etcd failed over");
}
