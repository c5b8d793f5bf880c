//! The `vxlan` backend across the wire: the kernel data path Weft programs (device, neighbour,
//! FDB, onlink route per peer), kept right through restarts, lease removals and a device
//! deleted by hand; the userspace mode exchanging traffic with a plain kernel VXLAN device
//! configured by `ip link`; and Wasm policy on the kernel path through NFQUEUE.

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

use weft_tests::*;

const VXLAN: &str =
    r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","RouteCheckSecs":1,"TxChecksumOffload":false}}"#;
const USERSPACE: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","Userspace":true}}"#;

/// Runs a command in node `n`'s namespace and returns its stdout.
fn in_node(c: &TestCluster, n: usize, cmd: &[&str]) -> String {
    in_ns(c.lab.nodes[n - 1].ns.name(), cmd)
}

fn in_ns(ns: &str, cmd: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmd)
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} in {ns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn lines(s: String) -> Vec<String> {
    s.lines().filter(|l| !l.trim().is_empty()).map(str::to_string).collect()
}

/// What the kernel holds for Weft on node `n`: (neighbours, FDB entries, routes).
fn entries(c: &TestCluster, n: usize) -> (Vec<String>, Vec<String>, Vec<String>) {
    (
        lines(in_node(
            c,
            n,
            &["ip", "-4", "neigh", "show", "dev", "weft.1", "nud", "permanent"],
        )),
        lines(in_node(c, n, &["bridge", "fdb", "show", "dev", "weft.1"]))
            .into_iter()
            .filter(|l| l.contains(" dst "))
            .collect(),
        lines(in_node(c, n, &["ip", "-4", "route", "show", "proto", "87"])),
    )
}

/// The MAC of node `n`'s VXLAN device, if it exists.
fn device_mac(c: &TestCluster, n: usize) -> Option<String> {
    let out = Command::new("ip")
        .args(["-n", c.lab.nodes[n - 1].ns.name(), "-j", "link", "show", "weft.1"])
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v.get(0)?.get("address")?.as_str().map(str::to_string)
}

/// The VtepMAC node `n` published in its lease (read with etcdctl, as flannel's tools do).
fn lease_mac(c: &TestCluster, n: usize) -> String {
    let s = c.subnet(n);
    let key = format!("/coreos.com/network/subnets/{}-{}", s.network(), s.prefix_len());
    let etcd = c.etcd.as_ref().expect("etcd");
    let v: serde_json::Value =
        serde_json::from_str(&etcd.etcdctl(&["get", &key, "--print-value-only"]).expect("get")).expect("lease JSON");
    assert_eq!(v["BackendType"], "vxlan", "{v}");
    assert_eq!(v["BackendData"]["VNI"], 1, "{v}");
    v["BackendData"]["VtepMAC"].as_str().expect("VtepMAC").to_string()
}

fn all_pairs_talk(c: &TestCluster, nodes: usize) {
    for a in 1..=nodes {
        for b in (1..=nodes).filter(|b| *b != a) {
            let (src, _) = c.pod(a, 1);
            let (dst_ns, dst) = c.pod(b, 1);
            let (ok, out) = ping_output(&src, dst);
            assert!(ok, "ping {a} -> {b}:\n{out}\n{}", c.lab.nodes[a - 1].log_tail(20));
            tcp_transfer(&src, &dst_ns, dst, 2 << 20);
        }
    }
}

#[test]
fn kernel_vxlan_programs_flannels_entries_and_keeps_them_right() {
    let mut c = TestCluster::with_config("vx", StoreKind::Etcd, 3, VXLAN, &[]);
    c.up(1);
    all_pairs_talk(&c, 3);

    for n in 1..=3 {
        let detail = in_node(&c, n, &["ip", "-d", "link", "show", "weft.1"]);
        assert!(detail.contains("vxlan id 1 "), "{detail}");
        assert!(detail.contains("dstport 8472"), "{detail}");
        assert!(detail.contains("nolearning"), "{detail}");
        assert!(detail.contains("mtu 1450"), "underlay 1500 - 50: {detail}");
        let mac = device_mac(&c, n).expect("device");
        assert_eq!(mac, lease_mac(&c, n), "the lease carries the device's MAC");
        let first = u8::from_str_radix(&mac[..2], 16).expect("hex");
        assert_eq!(first & 0x03, 0x02, "{mac}: unicast, locally administered");
        let offload = in_node(&c, n, &["ethtool", "-k", "weft.1"]);
        assert!(
            offload.contains("tx-checksumming: off"),
            "TxChecksumOffload=false:\n{offload}"
        );

        assert_eq!(policy_rules(&c, n), "", "no module, no rule on the forwarding path");
        let (neigh, fdb, routes) = entries(&c, n);
        assert_eq!(
            (neigh.len(), fdb.len(), routes.len()),
            (2, 2, 2),
            "node {n}: {neigh:?} {fdb:?} {routes:?}"
        );
        for m in (1..=3).filter(|m| *m != n) {
            let s = c.subnet(m);
            let gw = s.network().to_string();
            let peer_mac = lease_mac(&c, m);
            assert!(
                neigh.iter().any(|l| l.starts_with(&format!("{gw} lladdr {peer_mac}"))),
                "{neigh:?}"
            );
            let ip = c.lab.nodes[m - 1].underlay_ip.to_string();
            assert!(
                fdb.iter()
                    .any(|l| l.starts_with(&peer_mac) && l.contains(&format!("dst {ip} "))),
                "{fdb:?}"
            );
            assert!(
                routes
                    .iter()
                    .any(|l| l.starts_with(&format!("{s} via {gw} dev weft.1")) && l.contains("onlink")),
                "{routes:?}"
            );
        }
    }

    // A restart keeps the MAC and adds nothing twice.
    let mac1 = device_mac(&c, 1).expect("device");
    c.lab.stop_agent(1, false).expect("kill");
    c.lab.start_agent(1).expect("start");
    c.lab.wait_ready(1, Duration::from_secs(20)).expect("ready");
    assert_eq!(
        device_mac(&c, 1).as_deref(),
        Some(mac1.as_str()),
        "same MAC after a restart"
    );
    assert_eq!(lease_mac(&c, 1), mac1);
    std::thread::sleep(Duration::from_secs(2));
    let (neigh, fdb, routes) = entries(&c, 1);
    assert_eq!(
        (neigh.len(), fdb.len(), routes.len()),
        (2, 2, 2),
        "{neigh:?} {fdb:?} {routes:?}"
    );
    let (p1, _) = c.pod(1, 1);
    let (p2ns, p2) = c.pod(2, 1);
    assert!(ping(&p1, p2));

    // The device deleted by hand comes back, with its MAC and entries, and traffic resumes.
    let mac2 = device_mac(&c, 2).expect("device");
    in_node(&c, 2, &["ip", "link", "del", "weft.1"]);
    assert!(
        eventually(Duration::from_secs(10), || {
            device_mac(&c, 2).as_deref() == Some(mac2.as_str()) && {
                let (n, f, r) = entries(&c, 2);
                (n.len(), f.len(), r.len()) == (2, 2, 2)
            }
        }),
        "weft.1 not re-created on node 2:\n{}",
        c.lab.nodes[1].log_tail(20)
    );
    assert!(ping(&p1, p2), "traffic after re-creation");
    tcp_transfer(&p1, &p2ns, p2, 1 << 20);

    // A lease removed: its neighbour, FDB entry and route leave every peer.
    let s3 = c.subnet(3);
    let mac3 = lease_mac(&c, 3);
    c.lab.stop_agent(3, false).expect("kill 3");
    c.delete_lease(s3);
    for n in 1..=2 {
        assert!(
            eventually(Duration::from_secs(10), || {
                let (neigh, fdb, routes) = entries(&c, n);
                !neigh.iter().any(|l| l.starts_with(&format!("{} ", s3.network())))
                    && !fdb.iter().any(|l| l.starts_with(&mac3))
                    && !routes.iter().any(|l| l.starts_with(&s3.to_string()))
                    && (neigh.len(), fdb.len(), routes.len()) == (1, 1, 1)
            }),
            "node {n} kept entries for {s3}: {:?}\n{}",
            entries(&c, n),
            c.lab.nodes[n - 1].log_tail(15)
        );
    }
    assert!(ping(&p1, p2), "the remaining peers still talk");
}

/// A peer that is nothing but Linux: a kernel VXLAN device set up with `ip`, a bridge and a
/// pod, wired as flannel would wire it, and a lease written with etcdctl.
struct KernelPeer {
    host: String,
    pod: String,
    pod_ip: Ipv4Addr,
}

impl KernelPeer {
    const MAC: &'static str = "0a:77:00:00:00:01";

    fn build(c: &mut TestCluster) -> KernelPeer {
        // A subnet no Weft node holds (nodes lease theirs at random in the /16).
        let third = (77u8..)
            .find(|t| (1..=c.lab.nodes.len()).all(|n| c.subnet(n).network().octets()[2] != *t))
            .expect("a free subnet");
        let net = format!("10.244.{third}");
        let (host, addr) = c.lab.add_host("kv").expect("peer host");
        let pod = format!("{host}p");
        let sh = |ns: &str, cmd: &str| {
            let args: Vec<&str> = cmd.split_whitespace().collect();
            in_ns(ns, &args);
        };
        let local = addr.to_string();
        sh(
            &host,
            &format!(
                "ip link add vx0 address {} type vxlan id 1 dstport 8472 local {local} dev eth0 nolearning",
                Self::MAC
            ),
        );
        sh(&host, &format!("ip addr add {net}.0/32 dev vx0"));
        sh(&host, "ip link set vx0 mtu 1450 up");
        sh(&host, "ip link add cni0 type bridge");
        sh(&host, &format!("ip addr add {net}.1/24 dev cni0"));
        sh(&host, "ip link set cni0 mtu 1450 up");
        sh(&host, "sysctl -qw net.ipv4.ip_forward=1");
        let st = Command::new("ip")
            .args(["netns", "add", &pod])
            .status()
            .expect("ip netns add");
        assert!(st.success());
        let st = Command::new("ip")
            .args([
                "link", "add", "eth0", "netns", &pod, "type", "veth", "peer", "name", "vp1", "netns", &host,
            ])
            .status()
            .expect("veth");
        assert!(st.success());
        sh(&host, "ip link set vp1 master cni0 mtu 1450 up");
        sh(&pod, &format!("ip addr add {net}.2/24 dev eth0"));
        sh(&pod, "ip link set eth0 mtu 1450 up");
        sh(&pod, "ip link set lo up");
        sh(&pod, &format!("ip route add default via {net}.1"));
        let lease = format!(
            r#"{{"PublicIP":"{local}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{}"}}}}"#,
            Self::MAC
        );
        c.etcd
            .as_ref()
            .expect("etcd")
            .etcdctl(&["put", &format!("/coreos.com/network/subnets/{net}.0-24"), &lease])
            .expect("put the peer's lease");
        KernelPeer {
            host,
            pod,
            pod_ip: format!("{net}.2").parse().expect("ip"),
        }
    }

    /// Points the peer's kernel at a Weft node: flannel's three entries, written with `ip`.
    fn route_to(&self, subnet: ipnet::Ipv4Net, node_ip: Ipv4Addr, mac: &str) {
        let gw = subnet.network().to_string();
        let node = node_ip.to_string();
        let net = subnet.to_string();
        in_ns(
            &self.host,
            &[
                "ip",
                "neigh",
                "replace",
                &gw,
                "lladdr",
                mac,
                "dev",
                "vx0",
                "nud",
                "permanent",
            ],
        );
        in_ns(
            &self.host,
            &[
                "bridge",
                "fdb",
                "append",
                mac,
                "dev",
                "vx0",
                "dst",
                &node,
                "self",
                "permanent",
            ],
        );
        in_ns(
            &self.host,
            &["ip", "route", "replace", &net, "via", &gw, "dev", "vx0", "onlink"],
        );
    }
}

impl Drop for KernelPeer {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.pod]).status();
    }
}

#[test]
fn userspace_vxlan_talks_to_a_plain_kernel_vxlan_peer_both_ways() {
    let mut c = TestCluster::with_config("vu", StoreKind::Etcd, 1, USERSPACE, &[]);
    c.up(1);
    let peer = KernelPeer::build(&mut c);
    let mac = lease_mac(&c, 1);
    peer.route_to(c.subnet(1), c.lab.nodes[0].underlay_ip, &mac);
    assert!(
        eventually(Duration::from_secs(10), || c.lab.metric(1, "weft_routes").ok()
            == Some(1.0)),
        "the Weft node never routed the kernel peer's lease"
    );
    // The Weft side is a TUN device with Weft's loop behind it, not a kernel VXLAN device.
    let kind = in_node(&c, 1, &["ip", "-d", "link", "show", "weft.1"]);
    assert!(kind.contains("tun") && !kind.contains("vxlan id"), "{kind}");

    let (wpod, wip) = c.pod(1, 1);
    let (ok, out) = ping_output(&wpod, peer.pod_ip);
    assert!(ok, "Weft pod -> kernel pod:\n{out}\n{}", c.lab.nodes[0].log_tail(20));
    let (ok, out) = ping_output(&peer.pod, wip);
    assert!(ok, "kernel pod -> Weft pod:\n{out}");
    tcp_transfer(&wpod, &peer.pod, peer.pod_ip, 4 << 20);
    tcp_transfer(&peer.pod, &wpod, wip, 4 << 20);
    assert!(c.metric(1, "weft_dataplane_rx_packets_total") > 1000.0);
    // The kernel peer's super-frames, cut into segments, went into the device merged again.
    assert!(
        c.metric(1, "weft_dataplane_coalesced_writes_total") > 10.0,
        "no super-packet was written: {}",
        c.metric(1, "weft_dataplane_coalesced_segments_total")
    );
    assert_eq!(
        c.metric(1, "weft_dataplane_dropped_packets_total{reason=\"foreign_frame\"}"),
        0.0,
        "every frame from the kernel peer was understood"
    );

    // The kernel peer's frames for another VNI are not ours: counted, not delivered.
    in_ns(
        &peer.host,
        &[
            "ip",
            "link",
            "add",
            "vx9",
            "type",
            "vxlan",
            "id",
            "9",
            "dstport",
            "8472",
            "dev",
            "eth0",
            "nolearning",
        ],
    );
    in_ns(&peer.host, &["ip", "addr", "add", "10.99.0.1/24", "dev", "vx9"]);
    in_ns(&peer.host, &["ip", "link", "set", "vx9", "up"]);
    let node = c.lab.nodes[0].underlay_ip.to_string();
    in_ns(
        &peer.host,
        &[
            "bridge",
            "fdb",
            "append",
            "00:00:00:00:00:00",
            "dev",
            "vx9",
            "dst",
            &node,
        ],
    );
    let _ = ping(&peer.host, "10.99.0.2".parse().expect("ip"));
    assert!(
        c.metric(1, "weft_dataplane_dropped_packets_total{reason=\"foreign_frame\"}") >= 1.0,
        "a VNI 9 frame was not counted as foreign"
    );
    assert_eq!(c.lab.http_get(1, "/healthz").expect("healthz").0, 200);
}

/// The `id_sequence`s of the agent's NFQUEUE queues (`queue` and the ones after it that share
/// flows) in node `n`, summed: how many packets the kernel has queued to the agent.
fn queued(c: &TestCluster, n: usize, queue: u16) -> u64 {
    let text = in_node(c, n, &["cat", "/proc/net/netfilter/nfnetlink_queue"]);
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| {
            f.first()
                .and_then(|q| q.parse::<u16>().ok())
                .is_some_and(|q| (queue..queue + 8).contains(&q))
        })
        .filter_map(|f| f.get(7).and_then(|v| v.parse::<u64>().ok()))
        .sum()
}

/// Whether `weft module ls` shows fw loaded on both nodes, none pending or failed.
fn fw_loaded_on_both(c: &TestCluster) -> bool {
    c.weft_module(1, &["ls"])
        .is_ok_and(|t| t.lines().any(|l| l.starts_with("fw ") && l.ends_with(" 2/2")))
}

/// Adds the firewall denying tcp/7777 with `--wait`, which returns once both nodes report it
/// loaded, which on the kernel path means in force: both then queue new flows.
fn add_firewall(c: &TestCluster) {
    let fw = policy_wasm("firewall").display().to_string();
    let cfg = r#"{"rules":[{"action":"deny","protocol":"tcp","ports":[7777]}]}"#;
    let out = c
        .weft_module(1, &["add", "fw", &fw, "--config-json", cfg, "--wait", "20"])
        .expect("add --wait");
    assert!(out.contains("module fw in force on all 2 node(s)"), "{out}");
    assert!(fw_loaded_on_both(c), "{:?}", c.weft_module(1, &["ls"]));
    for n in 1..=2 {
        assert!(
            policy_rules(c, n).contains("NFQUEUE"),
            "node {n} reports fw loaded but does not queue new flows:\n{}",
            c.lab.nodes[n - 1].log_tail(20)
        );
    }
}

/// Node `n`'s nftables tables, as `nft list tables` prints them.
fn nft_tables(c: &TestCluster, n: usize) -> String {
    in_node(c, n, &["nft", "list", "tables"])
}

/// Node `n`'s map `map` of known services, as `nft list map` prints it.
fn known_map(c: &TestCluster, n: usize, map: &str) -> String {
    in_node(c, n, &["nft", "list", "map", "ip", "weft_policy", map])
}

/// The firewall's verdicts hold for every source of a service, so after a service's first
/// flow the kernel answers its next ones: queued once, then never, allowed or denied, until the
/// chain changes; a change takes effect on the next flow.
#[test]
fn a_service_decided_once_is_answered_by_the_kernel_until_the_chain_changes() {
    let mut c = TestCluster::with_config("vk", StoreKind::Embedded, 2, VXLAN, &[]);
    c.up(1);
    add_firewall(&c);
    for n in 1..=2 {
        assert!(
            eventually(Duration::from_secs(20), || c
                .metric(n, "weft_kernel_policy_known_ready")
                == 1.0),
            "node {n} has no table of known services:\n{}",
            c.lab.nodes[n - 1].log_tail(20)
        );
    }
    let (p1, _) = c.pod(1, 1);
    let (p2, ip2) = c.pod(2, 1);
    // A module just loaded may still be readying its instance on a worker: the agent then
    // drops (fail-closed) for 50 ms, and the client's SYN retry is the first that passes.
    let before = (queued(&c, 1, 8472), queued(&c, 2, 8472));
    assert!(
        eventually(Duration::from_secs(10), || tcp_connects(&p1, &p2, ip2, 7778)),
        "tcp/7778 refused:\n{}",
        c.lab.nodes[0].log_tail(20)
    );
    for i in 0..20 {
        if let Err(e) = weft::lab::probe::tcp_connect(&p2, ip2, 7778, &p1, Duration::from_secs(2)) {
            panic!(
                "tcp/7778 refused on connection {i}: {e}\nnode 1:\n{}\nnode 2:\n{}",
                c.lab.nodes[0].log_tail(20),
                c.lab.nodes[1].log_tail(20)
            );
        }
    }
    for _ in 0..5 {
        assert!(!tcp_connects(&p1, &p2, ip2, 7777), "tcp/7777 got through");
    }
    let d = (queued(&c, 1, 8472) - before.0, queued(&c, 2, 8472) - before.1);
    // Node 2 sees 7777's first SYN only if node 1 let it through: it does not.
    assert!(
        d.0 <= 4 && d.1 <= 3,
        "26 connections to two services queued {d:?} packets"
    );
    let egress = known_map(&c, 1, "egress");
    assert!(
        egress.contains(&format!("{ip2} . tcp . 7778")) && egress.contains("jump allowed"),
        "{egress}"
    );
    assert!(
        egress.contains(&format!("{ip2} . tcp . 7777")) && egress.contains(": drop"),
        "{egress}"
    );
    let ingress = known_map(&c, 2, "ingress");
    assert!(ingress.contains(&format!("{ip2} . tcp . 7778")), "{ingress}");
    assert!(c.metric(1, "weft_kernel_policy_known_services_total{result=\"added\"}") >= 2.0);

    // 7778 denied from now on: once the nodes report the change in force, the next connection
    // is refused, not answered from the maps of the chain before.
    let cfg = r#"{"rules":[{"action":"deny","protocol":"tcp","ports":["7777-7778"]}]}"#;
    c.weft_module(1, &["set", "fw", "--config-json", cfg, "--wait", "20"])
        .expect("set --wait");
    assert!(
        !tcp_connects(&p1, &p2, ip2, 7778),
        "tcp/7778 still allowed after the nodes reported the firewall that denies it in force"
    );
    assert!(c.metric(1, "weft_kernel_policy_known_flushes_total") >= 1.0);
    let egress = known_map(&c, 1, "egress");
    assert!(
        !egress.contains("jump allowed"),
        "an allowed service outlived the chain that allowed it:\n{egress}"
    );
}

#[test]
fn firewall_on_the_kernel_path_queues_only_first_packets() {
    let mut c = TestCluster::with_config("vq", StoreKind::Etcd, 2, VXLAN, &[]);
    c.up(1);
    assert_eq!(
        c.metric(1, "weft_kernel_policy_available"),
        1.0,
        "{}",
        c.lab.nodes[0].log_tail(20)
    );
    add_firewall(&c);
    let rules = policy_rules(&c, 1);
    assert!(
        !rules.contains("--queue-bypass"),
        "the firewall is fail-closed: {rules}"
    );

    let (p1, ip1) = c.pod(1, 1);
    let (p2, ip2) = c.pod(2, 1);
    assert!(ping(&p1, ip2), "ping passes the firewall");
    assert!(
        !tcp_connects(&p1, &p2, ip2, 7777),
        "tcp/7777 got through on the kernel path"
    );
    assert!(!tcp_connects(&p2, &p1, ip1, 7777), "tcp/7777 got through the other way");
    assert!(c.metric(1, "weft_kernel_policy_packets_total{verdict=\"deny\"}") >= 1.0);

    // One long flow: thousands of packets, a handful queued (the first packet, at each end).
    let before = (queued(&c, 1, 8472), queued(&c, 2, 8472));
    tcp_transfer_port(&p1, &p2, ip2, 7778, 16 << 20);
    let after = (queued(&c, 1, 8472), queued(&c, 2, 8472));
    let d = (after.0 - before.0, after.1 - before.1);
    assert!(d.0 >= 1 && d.1 >= 1, "the flow was never asked about: {d:?}");
    assert!(
        d.0 <= 4 && d.1 <= 4,
        "established packets went to userspace: {d:?} queued for 16 MiB"
    );
    let returned = in_node(&c, 1, &["iptables", "-L", "WEFT-POLICY", "-v", "-x", "-n"]);
    // Bytes, not packets: the kernel forwards GRO super-packets, so 16 MiB is a few hundred.
    let remembered: u64 = returned
        .lines()
        .find(|l| l.contains("connmark match") && l.contains("RETURN"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(
        remembered >= 16 << 20,
        "the connection mark did not carry the flow:\n{returned}"
    );

    // Agent down, fail-closed: new flows of services never decided stop at the queue, those of
    // a service the kernel knows keep their verdict; the agent back, they all flow again.
    c.lab.stop_agent(2, true).expect("stop");
    assert!(
        !tcp_connects(&p1, &p2, ip2, 7779),
        "a new flow passed with no agent to ask (fail-closed)"
    );
    assert!(
        tcp_connects(&p1, &p2, ip2, 7778),
        "a known service was refused while the agent was away"
    );
    assert!(!tcp_connects(&p1, &p2, ip2, 7777), "a known denied service got through");
    c.lab.start_agent(2).expect("start");
    c.lab.wait_ready(2, Duration::from_secs(20)).expect("ready");
    assert!(
        eventually(Duration::from_secs(20), || tcp_connects(&p1, &p2, ip2, 7779)),
        "new flows after the agent came back:\n{}",
        c.lab.nodes[1].log_tail(20)
    );
    assert!(!tcp_connects(&p1, &p2, ip2, 7777));

    // The module removed: nothing is queued any more, and the kernel forgets every service.
    c.weft_module(1, &["rm", "fw"]).expect("rm");
    assert!(
        eventually(Duration::from_secs(20), || !policy_rules(&c, 1).contains("NFQUEUE")),
        "rules kept queueing without modules"
    );
    assert!(
        eventually(Duration::from_secs(20), || !nft_tables(&c, 1).contains("weft_policy")),
        "the table of known services outlived the modules"
    );
    assert!(eventually(Duration::from_secs(20), || tcp_connects(
        &p1, &p2, ip2, 7777
    )));
}

/// Packets waiting on NFQUEUE `queue` in node `n` for a verdict (`queue_total`).
fn waiting(c: &TestCluster, n: usize, queue: u16) -> u64 {
    let text = in_node(c, n, &["cat", "/proc/net/netfilter/nfnetlink_queue"]);
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.first() == Some(&queue.to_string().as_str()))
        .filter_map(|f| f.get(2).and_then(|v| v.parse::<u64>().ok()))
        .sum()
}

/// A backlog of new flows (node 1's agent frozen while they queue, allowed and denied ones
/// interleaved) is answered in batches when the agent wakes, and each flow as the firewall
/// decides: every allowed datagram arrives, no denied one does.
#[test]
fn a_backlog_of_new_flows_is_answered_in_batches_each_as_decided() {
    use nix::sys::signal::Signal;
    use std::net::UdpSocket;
    use weft::lab::netns::enter_and_run;

    let mut c = TestCluster::with_config("vb", StoreKind::Embedded, 2, VXLAN, &[]);
    c.up(1);
    let fw = policy_wasm("firewall").display().to_string();
    let cfg = r#"{"per_flow":true,"rules":[{"action":"deny","protocol":"udp","ports":["30000-30099"]}]}"#;
    let out = c
        .weft_module(1, &["add", "fw", &fw, "--config-json", cfg, "--wait", "20"])
        .expect("add --wait");
    assert!(out.contains("in force on all 2 node(s)"), "{out}");
    let ((p1, _), (p2, ip2)) = (c.pod(1, 1), c.pod(2, 1));
    // Allowed and denied ports in turn, so every burst the agent reads mixes both.
    let ports: Vec<u16> = (0..100).flat_map(|i| [31000 + i, 30000 + i]).collect();
    let bound = ports.clone();
    let receivers = enter_and_run(&p2, move || {
        bound
            .iter()
            .map(|&p| UdpSocket::bind((ip2, p)))
            .collect::<std::io::Result<Vec<_>>>()
    })
    .expect("pod 2")
    .expect("bind the receivers");

    c.lab.signal_agent(1, Signal::SIGSTOP).expect("freeze node 1's agent");
    let sent = ports.clone();
    let send = enter_and_run(&p1, move || -> std::io::Result<()> {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        sent.iter()
            .try_for_each(|&p| s.send_to(&p.to_be_bytes(), (ip2, p)).map(drop))
    });
    let queued_all = eventually(Duration::from_secs(10), || waiting(&c, 1, 8472) >= 200);
    let held = waiting(&c, 1, 8472);
    c.lab.signal_agent(1, Signal::SIGCONT).expect("wake node 1's agent");
    send.expect("pod 1").expect("send");
    assert!(queued_all, "only {held} of 200 new flows waited on node 1's queue");

    let mut got = vec![false; ports.len()];
    let delivered = |got: &mut Vec<bool>| {
        let mut b = [0u8; 16];
        for (k, r) in receivers.iter().enumerate() {
            r.set_nonblocking(true).expect("nonblocking");
            while r.recv(&mut b).is_ok() {
                got[k] = true;
            }
        }
        (0..ports.len()).step_by(2).all(|k| got[k])
    };
    let all_allowed = eventually(Duration::from_secs(10), || delivered(&mut got));
    std::thread::sleep(Duration::from_millis(500));
    delivered(&mut got);
    let missing: Vec<u16> = (0..ports.len())
        .step_by(2)
        .filter(|&k| !got[k])
        .map(|k| ports[k])
        .collect();
    let leaked: Vec<u16> = (1..ports.len())
        .step_by(2)
        .filter(|&k| got[k])
        .map(|k| ports[k])
        .collect();
    assert!(
        all_allowed && missing.is_empty(),
        "allowed flows never arrived: {missing:?}"
    );
    assert!(leaked.is_empty(), "denied flows arrived: {leaked:?}");
    assert_eq!(waiting(&c, 1, 8472), 0, "packets left waiting for a verdict");
    let batches = c.metric(1, "weft_kernel_policy_verdicts_total{kind=\"batch\"}");
    let singles = c.metric(1, "weft_kernel_policy_verdicts_total{kind=\"packet\"}");
    assert!(
        batches >= 1.0,
        "no batch verdict for a backlog of 200 ({singles} single verdicts)"
    );
    assert!(
        c.metric(1, "weft_kernel_policy_packets_total{verdict=\"deny\"}") >= 100.0,
        "node 1 did not deny the 100 denied flows"
    );
}

/// Another program's socket bound to NFQUEUE `queue` in node `n`'s namespace, held until dropped
/// (as an IDS listening on the queue Weft was told to use would).
fn hold_queue(c: &TestCluster, n: usize, queue: u16) -> weft::nfq::socket::Socket {
    use weft::nfq::{msg, socket::Socket};
    c.lab.nodes[n - 1]
        .ns
        .run(move || {
            let s = Socket::open(1 << 16).expect("netfilter socket");
            s.send(&msg::bind(queue, 1, 64, 0, 16)).expect("bind");
            let mut b = vec![0u8; 4096];
            let len = s.recv(&mut b, false).expect("ack");
            let acked = matches!(
                msg::parse(&b[..len]).ok().as_deref(),
                Some([msg::Message::Ack { errno: 0, .. }])
            );
            assert!(acked, "the holder could not bind queue {queue}");
            s
        })
        .expect("enter the node's namespace")
}

/// A node whose kernel path cannot queue (another program holds the queue) does not claim
/// its modules: they read pending, with the reason, until the path works; then loaded, with
/// the rules in.
#[test]
fn a_node_that_cannot_enforce_reports_its_modules_pending_with_the_reason() {
    let mut c = TestCluster::with_config("vp", StoreKind::Embedded, 2, VXLAN, &[]);
    c.up(1);
    c.lab.stop_agent(2, true).expect("stop");
    let holder = hold_queue(&c, 2, 8472);
    c.lab.start_agent(2).expect("start");
    c.lab.wait_ready(2, Duration::from_secs(20)).expect("ready");
    assert_eq!(c.metric(2, "weft_kernel_policy_available"), 0.0);

    let fw = policy_wasm("firewall").display().to_string();
    let cfg = r#"{"rules":[{"action":"deny","protocol":"tcp","ports":[7777]}]}"#;
    let node2 = c.lab.nodes[1].underlay_ip.to_string();
    let started = std::time::Instant::now();
    let err = c
        .weft_module(1, &["add", "fw", &fw, "--config-json", cfg, "--wait", "5"])
        .expect_err("node 2 cannot put fw in force");
    assert!(
        err.contains("not in force on every node after 5 s: loaded on 1 of 2 node(s); pending on ")
            && err.contains(&format!(
                "{node2} (loaded, but not in force on the kernel path: cannot bind NFQUEUE 8472"
            ))
            && started.elapsed() < Duration::from_secs(15),
        "{err}"
    );
    let pending = |t: &str| {
        t.lines().any(|l| {
            l.starts_with("fw ")
                && l.contains(" 1/2 (pending on ")
                && l.contains(&format!("{node2} (loaded, but not in force on the kernel path"))
                && l.contains("cannot bind NFQUEUE 8472: another program already listens on this queue")
        })
    };
    assert!(
        eventually(Duration::from_secs(20), || c
            .weft_module(1, &["ls"])
            .is_ok_and(|t| pending(&t))),
        "node 2 did not report fw pending: {:?}",
        c.weft_module(1, &["ls"])
    );
    let nodes = c
        .lab
        .http_get(1, "/api/v1/modules/fw")
        .expect("GET /api/v1/modules/fw")
        .1;
    assert!(nodes.contains(r#""state":"pending""#), "{nodes}");

    drop(holder);
    c.lab.stop_agent(2, true).expect("stop");
    c.lab.start_agent(2).expect("start");
    c.lab.wait_ready(2, Duration::from_secs(20)).expect("ready");
    assert!(
        eventually(Duration::from_secs(20), || fw_loaded_on_both(&c)),
        "node 2 never reported fw loaded: {:?}",
        c.weft_module(1, &["ls"])
    );
    assert!(policy_rules(&c, 2).contains("NFQUEUE"));
    // A change of config alone keeps the code: --wait still waits for the nodes to run it.
    let cfg = r#"{"rules":[{"action":"deny","protocol":"tcp","ports":[7777,7779]}]}"#;
    let out = c
        .weft_module(1, &["set", "fw", "--config-json", cfg, "--wait", "20"])
        .expect("set --wait");
    assert!(out.contains("module fw in force on all 2 node(s)"), "{out}");
    let (p1, _) = c.pod(1, 1);
    let (p2, ip2) = c.pod(2, 1);
    assert!(
        !tcp_connects(&p1, &p2, ip2, 7779),
        "tcp/7779 passed right after set --wait"
    );
}
