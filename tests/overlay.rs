//! Cross-node behaviour of the `udp` backend on both lease stores: reachability, checked
//! transfers, lease loss, restarts, many joiners, spoofing, and an etcd outage.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use weft::packet::build_udp;
use weft_tests::*;

/// Two nodes of the `udp` backend with `queues` queues each, up, and a pod on each: the
/// cluster, the first pod's namespace, the second's namespace and address.
fn two_nodes(tag: &str, queues: usize) -> (TestCluster, String, String, Ipv4Addr) {
    let cfg = format!(r#"{{"Network":"10.244.0.0/16","Backend":{{"Type":"udp","Queues":{queues}}}}}"#);
    let mut c = TestCluster::with_config(tag, StoreKind::Embedded, 2, &cfg, &[]);
    c.up(1);
    let (src, _) = c.pod(1, 1);
    let (dst_ns, dst) = c.pod(2, 1);
    (c, src, dst_ns, dst)
}

/// Every ordered pair of distinct nodes.
fn pairs(n: usize) -> Vec<(usize, usize)> {
    (1..=n)
        .flat_map(|a| (1..=n).filter(move |b| *b != a).map(move |b| (a, b)))
        .collect()
}

fn three_nodes_traffic(store: StoreKind) {
    let mut c = TestCluster::new("tr", store, 3);
    c.up(2);
    let subnets: std::collections::HashSet<_> = (1..=3).map(|n| c.subnet(n)).collect();
    assert_eq!(subnets.len(), 3, "nodes share a subnet: {subnets:?}");

    for (a, b) in pairs(3) {
        for p in 1..=2 {
            let (src, _) = c.pod(a, 1);
            let (_, dst) = c.pod(b, p);
            let (ok, out) = ping_output(&src, dst);
            assert!(ok, "ping node {a} -> node {b} pod {p} ({dst}) failed:\n{out}");
        }
        // 4 MiB, every byte checked at the far end.
        let (src, _) = c.pod(a, 1);
        let (dst_ns, dst_ip) = c.pod(b, 2);
        tcp_transfer(&src, &dst_ns, dst_ip, 4 << 20);
    }
    for n in 1..=3 {
        assert!(c.metric(n, "weft_dataplane_tx_bytes_total") > 8.0 * 1024.0 * 1024.0);
        assert!(c.metric(n, "weft_dataplane_rx_bytes_total") > 8.0 * 1024.0 * 1024.0);
        assert_eq!(c.metric(n, "weft_routes"), 2.0);
        assert_eq!(c.metric(n, "weft_dataplane_up"), 1.0);
        assert_eq!(c.lab.http_get(n, "/healthz").expect("healthz").0, 200);
        assert_eq!(
            c.metric(n, "weft_dataplane_dropped_packets_total{reason=\"spoofed_source\"}"),
            0.0
        );
        // The kernel's own IPv6 chatter (router solicitations, MLD) never reaches the IPv4
        // overlay: IPv6 is off on the device, so nothing the node emits counts as malformed.
        assert_eq!(
            c.metric(n, "weft_dataplane_dropped_packets_total{reason=\"malformed\"}"),
            0.0
        );
        let v6 = weft::lab::cluster::run_checked(
            c.lab.nodes[n - 1]
                .ns
                .command("sysctl")
                .args(["-n", "net.ipv6.conf.weft0.disable_ipv6"]),
        )
        .expect("sysctl");
        assert_eq!(v6.trim(), "1", "IPv6 still on for weft0 on node {n}");
        // The subnet file is flannel's, complete, and the MTU is the underlay's minus 28.
        let env = std::fs::read_to_string(c.lab.nodes[n - 1].subnet_file()).expect("subnet.env");
        let gw = weft::subnet::first_host(&c.subnet(n));
        assert!(env.contains("FLANNEL_NETWORK=10.244.0.0/16\n"), "{env}");
        assert!(env.contains(&format!("FLANNEL_SUBNET={gw}/24\n")), "{env}");
        assert!(env.contains("FLANNEL_MTU=1472\n"), "{env}");
        assert!(env.contains("FLANNEL_IPMASQ=false\n"), "{env}");
    }
    assert_eq!(c.lease_lines().len(), 3, "{:?}", c.lease_lines());
}

fn lease_removed(store: StoreKind) {
    let mut c = TestCluster::new("lr", store, 3);
    c.up(1);
    let (p1, _) = c.pod(1, 1);
    let (_, p3ip) = c.pod(3, 1);
    assert!(ping(&p1, p3ip));

    // A dead node's lease removed: its routes leave every peer, and traffic to it is refused
    // with ICMP net-unreachable rather than black-holed.
    c.lab.stop_agent(3, false).expect("kill agent 3");
    c.delete_lease(c.subnet(3));
    for n in [1, 2] {
        assert!(
            eventually(Duration::from_secs(10), || c.metric(n, "weft_routes") == 1.0),
            "node {n} still routes the removed subnet"
        );
    }
    let (ok, out) = ping_output(&p1, p3ip);
    assert!(!ok, "removed subnet still reachable:\n{out}");
    assert!(
        out.contains("Unreachable"),
        "expected ICMP net unreachable, got:\n{out}"
    );
    assert!(c.metric(1, "weft_dataplane_icmp_errors_sent_total") >= 1.0);

    // A live node's lease removed: the node re-acquires the same subnet by itself and stays up.
    let before = c.subnet(2);
    let (_, p2ip) = c.pod(2, 1);
    c.delete_lease(before);
    assert!(
        eventually(Duration::from_secs(20), || c.metric(2, "weft_lease_acquisitions_total")
            >= 2.0),
        "node 2 did not re-acquire:\n{}",
        c.lab.nodes[1].log_tail(20)
    );
    assert!(
        c.lab.nodes[1].agent.as_mut().expect("agent 2").exited().is_none(),
        "agent 2 exited"
    );
    assert!(
        eventually(Duration::from_secs(10), || c
            .lease_lines()
            .iter()
            .any(|l| l.starts_with(&before.to_string()))),
        "lease on {before} not back: {:?}",
        c.lease_lines()
    );
    assert!(
        eventually(Duration::from_secs(10), || ping(&p1, p2ip)),
        "node 2 unreachable after re-acquiring"
    );
}

fn restart_same_subnet(store: StoreKind) {
    // A short TTL so renewal is exercised too: the lease must outlive several TTLs.
    let mut c = TestCluster::with_config("rs", store, 2, NET_CONFIG, &["--lease-ttl", "4"]);
    c.up(1);
    let first = c.subnet(1);
    std::thread::sleep(Duration::from_secs(9));
    assert!(c.metric(1, "weft_lease_renewals_total") >= 2.0, "lease was not renewed");
    assert_eq!(
        c.lease_lines().len(),
        2,
        "a lease expired despite renewal: {:?}",
        c.lease_lines()
    );

    // Graceful stop (SIGTERM) exits 0 and a restart gets the same subnet back.
    let status = c.lab.stop_agent(1, true).expect("stop").expect("exit status");
    assert!(
        status.success(),
        "agent exited with {status} on SIGTERM:\n{}",
        c.lab.nodes[0].log_tail(10)
    );
    // The TUN device (and with it every route through it) went with the process.
    assert!(
        c.lab.nodes[0].ns.ip(&["link", "show", "weft0"]).is_err(),
        "weft0 survived the agent"
    );
    c.lab.start_agent(1).expect("restart");
    assert_eq!(c.lab.wait_ready(1, Duration::from_secs(30)).expect("ready"), first);

    // A crash (SIGKILL) too, and with the subnet file gone: the lease is found by PublicIP.
    c.lab.stop_agent(1, false).expect("kill");
    std::fs::remove_file(c.lab.nodes[0].subnet_file()).expect("remove subnet file");
    c.lab.start_agent(1).expect("restart");
    assert_eq!(c.lab.wait_ready(1, Duration::from_secs(30)).expect("ready"), first);
    assert_eq!(
        c.lease_lines().len(),
        2,
        "restart duplicated a lease: {:?}",
        c.lease_lines()
    );
    let (p2, _) = c.pod(2, 1);
    let (_, p1ip) = c.pod(1, 1);
    assert!(
        eventually(Duration::from_secs(10), || ping(&p2, p1ip)),
        "restarted node unreachable"
    );
}

fn twenty_at_once(store: StoreKind) {
    // 31 leasable subnets for 20 nodes: random picks collide often, so lost races are retried.
    let cfg = r#"{"Network":"10.50.0.0/22","SubnetLen":27,"Backend":{"Type":"udp"}}"#;
    let mut c = TestCluster::with_config("tw", store, 20, cfg, &[]);
    for i in 1..=20 {
        c.lab.start_agent(i).expect("start");
    }
    let mut subnets = std::collections::HashSet::new();
    for i in 1..=20 {
        let s = c
            .lab
            .wait_ready(i, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("node {i}: {e}"));
        assert_eq!(s.prefix_len(), 27);
        assert!(subnets.insert(s), "subnet {s} given twice");
    }
    assert_eq!(subnets.len(), 20);
    assert_eq!(c.lease_lines().len(), 20, "{:?}", c.lease_lines());
    for i in [1, 20] {
        assert!(eventually(Duration::from_secs(10), || c.metric(i, "weft_routes") == 19.0));
    }
}

/// Sends one raw datagram to node 1's udp port from namespace `ns`.
fn send_datagram(ns: &str, to: Ipv4Addr, payload: Vec<u8>) {
    weft::lab::netns::enter_and_run(ns, move || {
        let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
        s.send_to(&payload, SocketAddr::from((to, 8285))).expect("send");
    })
    .expect("enter namespace");
}

fn spoofing(store: StoreKind) {
    let mut c = TestCluster::new("sp", store, 3);
    c.up(1);
    let (intruder, _) = c.lab.add_host("evil").expect("intruder host");
    let n1 = c.lab.nodes[0].underlay_ip;
    let n2_ns = c.lab.nodes[1].ns.name().to_string();
    let (p1_ns, p1_ip) = c.pod(1, 1);
    let (_, p2_ip) = c.pod(2, 1);
    let (_, p3_ip) = c.pod(3, 1);

    // A UDP listener in pod 1 records what gets through.
    let listener = weft::lab::netns::enter_and_run(&p1_ns, move || {
        let s = UdpSocket::bind((p1_ip, 7777)).expect("bind listener");
        s.set_read_timeout(Some(Duration::from_millis(1500))).expect("timeout");
        s
    })
    .expect("listener");
    let recv = |l: &UdpSocket| -> Option<String> {
        let mut b = [0u8; 256];
        l.recv(&mut b)
            .ok()
            .map(|n| String::from_utf8_lossy(&b[..n]).to_string())
    };

    let drops = |r: &str| c.metric(1, &format!("weft_dataplane_dropped_packets_total{{reason=\"{r}\"}}"));
    let (spoof0, unknown0, malformed0) = (drops("spoofed_source"), drops("unknown_peer"), drops("malformed"));

    // Node 2 (a leased peer) claims node 3's pod as the source: spoofed.
    send_datagram(&n2_ns, n1, build_udp(p3_ip, 5000, p1_ip, 7777, 64, b"spoofed"));
    // A host with no lease sends a perfectly valid packet: unknown peer.
    send_datagram(&intruder, n1, build_udp(p2_ip, 5000, p1_ip, 7777, 64, b"stranger"));
    // Garbage from a leased peer: malformed, and the agent carries on.
    send_datagram(&n2_ns, n1, b"\x45\x00 this is not an IPv4 packet".to_vec());
    send_datagram(&n2_ns, n1, vec![]);
    assert_eq!(recv(&listener), None, "a forged datagram reached the pod");
    assert!(
        eventually(Duration::from_secs(5), || drops("spoofed_source") == spoof0 + 1.0),
        "spoofed_source went from {spoof0} to {}",
        drops("spoofed_source")
    );
    assert!(eventually(Duration::from_secs(5), || drops("unknown_peer") == unknown0 + 1.0));
    assert!(eventually(Duration::from_secs(5), || drops("malformed") >= malformed0 + 2.0));

    // The same datagram with an honest source gets through: the filter is not just closed.
    send_datagram(&n2_ns, n1, build_udp(p2_ip, 5000, p1_ip, 7777, 64, b"honest"));
    assert_eq!(recv(&listener).as_deref(), Some("honest"));
    assert!(ping(&p1_ns, p3_ip), "data path broken after hostile input");
}

macro_rules! on_both_stores {
    ($($name:ident => $f:ident),* $(,)?) => {
        mod embedded {
            use super::*;
            $( #[test] fn $name() { $f(StoreKind::Embedded) } )*
        }
        mod etcd {
            use super::*;
            $( #[test] fn $name() { $f(StoreKind::Etcd) } )*
        }
    };
}

on_both_stores! {
    three_nodes_ping_and_checked_tcp_across_every_pair => three_nodes_traffic,
    removed_lease_routes_leave_peers_and_live_node_reacquires => lease_removed,
    restarted_node_keeps_its_subnet_and_renews => restart_same_subnet,
    twenty_agents_at_once_get_twenty_subnets => twenty_at_once,
    spoofed_and_malformed_datagrams_are_dropped_and_counted => spoofing,
}

#[test]
fn deleted_tun_device_stops_the_agent_and_a_restart_recovers() {
    let mut c = TestCluster::new("dv", StoreKind::Embedded, 2);
    c.up(1);
    let subnet = c.subnet(2);
    c.lab.nodes[1].ns.ip(&["link", "del", "weft0"]).expect("delete weft0");
    let exited = eventually(Duration::from_secs(10), || {
        c.lab.nodes[1].agent.as_mut().expect("agent").exited().is_some()
    });
    assert!(exited, "agent kept running without its device");
    let log = c.lab.nodes[1].log_tail(5);
    assert!(
        log.contains("weft: error: the data path stopped: TUN device weft0 failed"),
        "{log}"
    );
    c.lab.start_agent(2).expect("restart");
    assert_eq!(c.lab.wait_ready(2, Duration::from_secs(30)).expect("ready"), subnet);
    let (p1, _) = c.pod(1, 1);
    let (_, p2) = c.pod(2, 1);
    assert!(
        eventually(Duration::from_secs(10), || ping(&p1, p2)),
        "traffic did not resume"
    );
}

#[test]
fn offloads_off_moves_packets_one_by_one_and_still_carries_everything() {
    // One queue too: flannel's shape, one socket sending and receiving on the port.
    let cfg = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp","Offload":false,"Queues":1,"SpinMicros":0}}"#;
    let mut c = TestCluster::with_config("no", StoreKind::Embedded, 2, cfg, &[]);
    c.up(1);
    let log = std::fs::read_to_string(c.lab.nodes[0].log_file()).expect("log");
    assert!(
        log.contains("tun_offload=false") && log.contains("udp_gso=false") && log.contains("udp_gro=false"),
        "{log}"
    );
    assert!(log.contains("queues=1") && log.contains("spin_us=0"), "{log}");
    for (a, b) in pairs(2) {
        let (src, _) = c.pod(a, 1);
        let (dst_ns, dst_ip) = c.pod(b, 1);
        assert!(ping(&src, dst_ip));
        tcp_transfer(&src, &dst_ns, dst_ip, 4 << 20);
    }
    for n in [1, 2] {
        assert_eq!(
            c.metric(n, "weft_dataplane_coalesced_segments_total"),
            0.0,
            "without offloads nothing may be merged for the device"
        );
    }
    // With offloads on (the default) the same log says so.
    let mut d = TestCluster::new("of", StoreKind::Embedded, 1);
    d.up(0);
    let log = std::fs::read_to_string(d.lab.nodes[0].log_file()).expect("log");
    assert!(
        log.contains("tun_offload=true") && log.contains("udp_gso=true") && log.contains("udp_gro=true"),
        "{log}"
    );
}

/// Idle pings (each crosses alone) are carried by whichever thread is awake: on the answering
/// node the thread that wrote the request into the device sends the reply it caused, on the
/// asking node the thread that sent the request delivers the reply it waits for (which thread
/// that is depends on which one parked). Every ping is answered, and both nodes count turns
/// they saved a wake-up in.
#[test]
fn an_idle_round_trip_is_carried_by_the_thread_that_is_awake() {
    let mut c = TestCluster::new("hp", StoreKind::Embedded, 2);
    c.up(1);
    let (src, _) = c.pod(1, 1);
    let (_, dst) = c.pod(2, 1);
    assert!(ping(&src, dst));
    let helped = |c: &TestCluster, n| {
        c.metric(n, "weft_dataplane_helped_turns_total{dir=\"rx\"}")
            + c.metric(n, "weft_dataplane_helped_turns_total{dir=\"tx\"}")
    };
    let before = (helped(&c, 1), helped(&c, 2));
    let (ok, out) = weft_tests::ping_output_with(&src, dst, &["-c", "40", "-i", "0.02"]);
    assert!(ok && out.contains(" 0% packet loss"), "{out}");
    let after = (helped(&c, 1), helped(&c, 2));
    assert!(
        after.0 > before.0,
        "on the asking node one thread never carried both directions: {before:?} -> {after:?}"
    );
    assert!(
        after.1 > before.1,
        "on the answering node one thread never carried both directions: {before:?} -> {after:?}"
    );
}

/// A ping-pong (one packet at a time each way) parks one thread of the queue on each node,
/// the other carrying both directions; a bulk transfer wakes it (both directions need their
/// own thread again) and arrives intact; ping-pong works again afterwards. One queue, so the
/// ping and the transfer share it.
#[test]
fn light_traffic_parks_a_thread_and_heavy_traffic_wakes_it() {
    let (c, src, dst_ns, dst) = two_nodes("pk", 1);
    assert!(eventually(Duration::from_secs(10), || ping(&src, dst)));
    // -A: the next request leaves as soon as the reply is in.
    let (ok, out) = weft_tests::ping_output_with(&src, dst, &["-A", "-c", "500"]);
    assert!(ok && out.contains(" 0% packet loss"), "{out}");
    for n in 1..=2 {
        assert!(
            c.metric(n, "weft_dataplane_parks_total") >= 1.0,
            "no thread of node {n} parked during a ping-pong"
        );
    }
    tcp_transfer(&src, &dst_ns, dst, 16 << 20);
    for n in 1..=2 {
        assert!(
            c.metric(n, "weft_dataplane_unparks_total") >= 1.0,
            "node {n}'s parked thread was not woken by a bulk transfer"
        );
    }
    let (ok, out) = weft_tests::ping_output_with(&src, dst, &["-A", "-c", "200"]);
    assert!(ok && out.contains(" 0% packet loss"), "{out}");
}

/// Sixteen flows at once between two nodes with two queues each: every byte arrives checked,
/// the flows spread over both queues of the sender (the TUN device's flow hash) and of the
/// receiver (steered by the sender's per-queue source port), and each flow stays on one. The
/// receiver merged their segments into super-packets for its device, runs of flows
/// interleaved.
#[test]
fn many_flows_use_every_queue_and_arrive_intact() {
    let (c, src, dst_ns, dst_ip) = two_nodes("mq", 2);
    let flows: Vec<_> = (0..16)
        .map(|_| {
            let (src, dst_ns) = (src.clone(), dst_ns.clone());
            std::thread::spawn(move || tcp_transfer(&src, &dst_ns, dst_ip, 512 << 10))
        })
        .collect();
    for f in flows {
        f.join().expect("a flow");
    }
    let q = |n: usize, queue: u8, dir: &str| {
        c.metric(
            n,
            &format!("weft_dataplane_queue_packets_total{{queue=\"{queue}\",dir=\"{dir}\"}}"),
        )
    };
    for queue in [0, 1] {
        assert!(q(1, queue, "tx") > 100.0, "queue {queue} of the sender carried nothing");
        assert!(
            q(2, queue, "rx") > 100.0,
            "queue {queue} of the receiver carried nothing"
        );
    }
    assert_eq!(
        c.metric(2, "weft_dataplane_dropped_packets_total{reason=\"malformed\"}"),
        0.0
    );
    let (segments, writes) = (
        c.metric(2, "weft_dataplane_coalesced_segments_total"),
        c.metric(2, "weft_dataplane_coalesced_writes_total"),
    );
    assert!(
        writes > 10.0 && segments >= 2.0 * writes,
        "the receiver merged no runs: {segments} segments in {writes} writes"
    );
}
