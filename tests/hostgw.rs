//! The `host-gw` backend across the wire: kernel routes via peers, Wasm policy through NFQUEUE,
//! routes reconciled against manual damage, removed with their lease, no duplicates after a
//! restart, and a clear refusal when a peer is not on the same L2 segment.

use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use weft_tests::*;

const HOST_GW: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw","RouteCheckSecs":1}}"#;

/// Weft's routes in node `n`'s namespace (route protocol 87), one line each.
fn weft_routes(c: &TestCluster, n: usize) -> Vec<String> {
    let out = Command::new("ip")
        .args(["-n", c.lab.nodes[n - 1].ns.name(), "-4", "route", "show", "proto", "87"])
        .output()
        .expect("ip route");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

fn ip_route(c: &TestCluster, n: usize, args: &[&str]) {
    let st = Command::new("ip")
        .args(["-n", c.lab.nodes[n - 1].ns.name(), "route"])
        .args(args)
        .status()
        .expect("ip route");
    assert!(st.success(), "ip route {args:?}");
}

#[test]
fn host_gw_routes_traffic_and_keeps_its_routes_right() {
    let mut c = TestCluster::with_config("hg", StoreKind::Etcd, 3, HOST_GW, &[]);
    c.up(1);
    for (a, b) in [(1, 2), (2, 3), (3, 1), (1, 3), (3, 2), (2, 1)] {
        let (src, _) = c.pod(a, 1);
        let (dst_ns, dst) = c.pod(b, 1);
        assert!(ping(&src, dst), "ping {a} -> {b}");
        tcp_transfer(&src, &dst_ns, dst, 2 << 20);
    }
    for n in 1..=3 {
        let routes = weft_routes(&c, n);
        assert_eq!(routes.len(), 2, "node {n}: {routes:?}");
        for m in (1..=3).filter(|m| *m != n) {
            let want = format!("{} via {} dev eth0", c.subnet(m), c.lab.nodes[m - 1].underlay_ip);
            assert!(
                routes.iter().any(|r| r.starts_with(&want)),
                "node {n} lacks {want}: {routes:?}"
            );
        }
    }

    // Wasm policy on this kernel path too: the firewall, through NFQUEUE.
    let fw = policy_wasm("firewall").display().to_string();
    let cfg = r#"{"rules":[{"action":"deny","protocol":"tcp","ports":[7777]}]}"#;
    c.weft_module(1, &["add", "fw", &fw, "--config-json", cfg])
        .expect("add");
    let (p1, _) = c.pod(1, 1);
    let (p3ns, p3) = c.pod(3, 1);
    assert!(
        eventually(Duration::from_secs(20), || !tcp_connects(&p1, &p3ns, p3, 7777)),
        "tcp/7777 passes host-gw with the firewall loaded:\n{}",
        c.lab.nodes[0].log_tail(10)
    );
    assert!(tcp_connects(&p1, &p3ns, p3, 7778), "other ports pass");
    assert!(c.metric(1, "weft_kernel_policy_packets_total{verdict=\"deny\"}") >= 1.0);
    // `rm --wait` returns once no node runs it: the port it denied connects at once.
    let out = c.weft_module(1, &["rm", "fw", "--wait", "20"]).expect("rm --wait");
    assert!(out.contains("module fw removed from all 3 node(s)"), "{out}");
    assert!(tcp_connects(&p1, &p3ns, p3, 7777), "tcp/7777 refused after rm --wait");

    // A node whose agent is frozen still runs it (its rules stay in its kernel): the wait
    // names it, and the node drops the rules once it wakes.
    c.weft_module(1, &["add", "fw", &fw, "--config-json", cfg, "--wait", "20"])
        .expect("add again");
    assert!(!tcp_connects(&p1, &p3ns, p3, 7777));
    c.lab.signal_agent(3, Signal::SIGSTOP).expect("freeze node 3");
    let err = c.weft_module(1, &["rm", "fw", "--wait", "2"]);
    c.lab.signal_agent(3, Signal::SIGCONT).expect("wake node 3");
    let err = err.expect_err("node 3 cannot remove it while frozen");
    let node3 = c.lab.nodes[2].underlay_ip.to_string();
    assert!(
        err.contains(&format!(
            "module fw still runs after 2 s: removed from 2 of 3 node(s); still running it: {node3}"
        )),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(eventually(Duration::from_secs(20), || tcp_connects(
        &p1, &p3ns, p3, 7777
    )));

    // Damage: a route deleted by hand comes back; a stale Weft route goes.
    let s2 = c.subnet(2).to_string();
    ip_route(&c, 1, &["del", &s2]);
    let stale_via = c.lab.nodes[1].underlay_ip.to_string();
    ip_route(
        &c,
        1,
        &[
            "add",
            "10.244.250.0/24",
            "via",
            &stale_via,
            "dev",
            "eth0",
            "proto",
            "87",
        ],
    );
    assert!(
        eventually(Duration::from_secs(10), || {
            let r = weft_routes(&c, 1);
            r.len() == 2 && r.iter().any(|l| l.starts_with(&s2)) && !r.iter().any(|l| l.starts_with("10.244.250.0"))
        }),
        "not reconciled: {:?}",
        weft_routes(&c, 1)
    );

    // A restart adopts the routes: still exactly one per peer, and traffic flows.
    c.lab.stop_agent(1, false).expect("kill");
    c.lab.start_agent(1).expect("start");
    c.lab.wait_ready(1, Duration::from_secs(20)).expect("ready");
    assert_eq!(weft_routes(&c, 1).len(), 2, "{:?}", weft_routes(&c, 1));
    let (p1, _) = c.pod(1, 1);
    let (_, p2ip) = c.pod(2, 1);
    assert!(ping(&p1, p2ip));

    // A lease removed (its node gone): its route leaves every peer.
    c.lab.stop_agent(3, false).expect("kill 3");
    c.delete_lease(c.subnet(3));
    let s3 = c.subnet(3).to_string();
    for n in 1..=2 {
        assert!(
            eventually(Duration::from_secs(10), || !weft_routes(&c, n)
                .iter()
                .any(|l| l.starts_with(&s3))),
            "node {n} kept the route to {s3}"
        );
    }

    // A peer off the L2 segment: running agents skip it; a starting agent refuses to start.
    let etcd = c.etcd.as_ref().expect("etcd");
    etcd.etcdctl(&[
        "put",
        "/coreos.com/network/subnets/10.244.200.0-24",
        r#"{"PublicIP":"203.0.113.9","BackendType":"host-gw"}"#,
    ])
    .expect("put an off-link lease");
    std::thread::sleep(Duration::from_secs(2));
    assert!(!weft_routes(&c, 1).iter().any(|l| l.starts_with("10.244.200.0")));
    assert_eq!(
        c.lab.http_get(1, "/healthz").expect("healthz").0,
        200,
        "running agents carry on"
    );
    let n = c.lab.add_node().expect("node");
    c.lab.start_agent(n).expect("start");
    let exited = eventually(Duration::from_secs(20), || {
        c.lab.nodes[n - 1].agent.as_mut().and_then(|a| a.exited()).is_some()
    });
    let log = c.lab.nodes[n - 1].log_tail(5);
    assert!(exited, "the new agent kept running:\n{log}");
    assert!(
        log.contains("host-gw needs every node on one L2 segment, but the node leasing 10.244.200.0/24 (203.0.113.9)"),
        "{log}"
    );
}
