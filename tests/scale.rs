//! The control plane with many leases: restarts that disturb nothing (the kernel's entries are
//! adopted, none deleted, no ping lost), readiness that means every lease is routable, and
//! lease changes that cost what changed. Fake peers (leases of nodes that do not exist, written
//! into Debian's etcd in flannel's format) make the table large; two real nodes carry traffic.

use std::time::Duration;

use weft_tests::*;

const VXLAN: &str = r#"{"Type":"vxlan"}"#;
const HOST_GW: &str = r#"{"Type":"host-gw"}"#;

fn weft_route_count(c: &TestCluster, n: usize) -> usize {
    let out = weft::lab::cluster::run_checked(
        c.lab.nodes[n - 1]
            .ns
            .command("ip")
            .args(["route", "show", "proto", "87"]),
    )
    .expect("ip route");
    out.lines().count()
}

fn writes(c: &TestCluster, n: usize, op: &str) -> f64 {
    c.metric(n, &format!("weft_kernel_entries_written_total{{op=\"{op}\"}}"))
}

/// Restarts node 1's agent (SIGTERM, then start) while node 2's pod pings node 1's at 10 Hz,
/// watching node 1's kernel: nothing of Weft's is deleted, nothing rewritten, no ping lost.
fn restart_disturbs_nothing(backend: &str, fakes: u32, kind: Fake) {
    let mut c = TestCluster::with_config("rs", StoreKind::Etcd, 2, &scale_net(backend), &[]);
    c.fake_leases(0..fakes, kind);
    c.up(1);
    let (p2, _) = c.pod(2, 1);
    let (_, p1ip) = c.pod(1, 1);
    assert!(ping(&p2, p1ip), "pods reach each other before the restart");
    let ns = c.lab.nodes[0].ns.name().to_string();
    let (routes, fdb) = kernel_monitor(&ns);
    let pinger = steady_ping(&p2, p1ip, 60);
    std::thread::sleep(Duration::from_millis(500));
    c.lab.stop_agent(1, true).expect("stop agent 1");
    c.lab.start_agent(1).expect("start agent 1");
    c.lab
        .wait_ready(1, Duration::from_secs(30))
        .expect("agent 1 ready again");
    let pings = pinger.finish(Duration::from_secs(15));
    let mut seen = routes.lines();
    seen.extend(fdb.lines());
    let deleted = weft_deletions(&seen);
    assert!(
        deleted.is_empty(),
        "the restart deleted {} entries, e.g. {:?}",
        deleted.len(),
        &deleted[..deleted.len().min(5)]
    );
    let (sent, received) = ping_counts(&pings).unwrap_or_else(|| panic!("no ping summary: {pings:?}"));
    assert_eq!((sent, received), (60, 60), "pings lost across the restart");
    assert_eq!(weft_route_count(&c, 1), fakes as usize + 1);
    // The restarted agent read the kernel back and found nothing to write.
    assert!(c.metric(1, "weft_kernel_full_rounds_total") >= 1.0);
    assert_eq!((writes(&c, 1, "add"), writes(&c, 1, "delete")), (0.0, 0.0));
}

#[test]
fn vxlan_restart_adopts_the_kernel_entries_and_loses_no_ping() {
    restart_disturbs_nothing(VXLAN, 500, Fake::Vxlan);
}

#[test]
fn host_gw_restart_adopts_the_kernel_routes_and_loses_no_ping() {
    restart_disturbs_nothing(HOST_GW, 150, Fake::HostGw);
}

/// The subnet file (what the CNI plugin waits for) appears only once the kernel holds a route
/// for every lease of the first listing.
#[test]
fn ready_means_every_lease_is_routable() {
    let mut c = TestCluster::with_config("rd", StoreKind::Etcd, 1, &scale_net(VXLAN), &[]);
    c.fake_leases(0..2_000, Fake::Vxlan);
    c.lab.start_agent(1).expect("start");
    let file = c.lab.nodes[0].subnet_file();
    assert!(
        eventually(Duration::from_secs(30), || file.exists()),
        "no subnet file:\n{}",
        c.lab.nodes[0].log_tail(10)
    );
    let routes = weft_route_count(&c, 1);
    assert_eq!(
        routes, 2_000,
        "the subnet file was written with {routes} of 2,000 routes in the kernel"
    );
    assert_eq!(c.lab.http_get(1, "/readyz").expect("readyz").0, 200);
    // The first listing was one update: one snapshot of 2,001 subnets (ours included).
    assert_eq!(c.metric(1, "weft_lease_table_updates_total"), 1.0);
    assert_eq!(c.metric(1, "weft_lease_table_update_subnets_total"), 2_001.0);
}

/// 1,024 leases deleted with one request (one etcd revision) are one update of 1,024 subnets,
/// and a lease added to a table of thousands writes its three kernel entries and no more.
#[test]
fn changes_cost_what_changed() {
    let mut c = TestCluster::with_config("ch", StoreKind::Etcd, 2, &scale_net(VXLAN), &[]);
    c.fake_leases(0..1_500, Fake::Vxlan);
    c.up(1);
    let before = (
        c.metric(1, "weft_lease_table_updates_total"),
        c.metric(1, "weft_lease_table_update_subnets_total"),
        writes(&c, 1, "add"),
    );
    c.fake_leases(5_000..5_001, Fake::Vxlan);
    assert!(eventually(Duration::from_secs(10), || c.metric(1, "weft_routes") == 1_502.0));
    assert!(
        eventually(Duration::from_secs(5), || writes(&c, 1, "add") == before.2 + 3.0),
        "a new lease wrote {} entries",
        writes(&c, 1, "add") - before.2
    );
    assert_eq!(c.metric(1, "weft_lease_table_update_subnets_total") - before.1, 1.0);

    let etcd = c.etcd.as_ref().expect("etcd");
    assert_eq!(etcd.delete_fake_blocks(0..4), 1_024);
    assert!(eventually(Duration::from_secs(10), || weft_route_count(&c, 1) == 1_500 + 2 - 1_024));
    for n in 1..=2 {
        assert!(eventually(Duration::from_secs(10), || c.metric(n, "weft_routes") == 478.0));
    }
    let updates = c.metric(1, "weft_lease_table_updates_total") - before.0;
    let subnets = c.metric(1, "weft_lease_table_update_subnets_total") - before.1;
    assert_eq!(subnets, 1.0 + 1_024.0, "what the updates named");
    assert!(updates <= 3.0, "1,024 deletions in one revision took {updates} updates");
    let (p1, _) = c.pod(1, 1);
    let (_, p2ip) = c.pod(2, 1);
    assert!(ping(&p1, p2ip), "the real peer is untouched");
}
