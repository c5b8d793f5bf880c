//! etcd specifics: flannel's layout read and written both ways, and an etcd outage.

use std::time::{Duration, Instant};

use weft_tests::*;

#[test]
fn etcd_outage_keeps_traffic_and_agents_reconnect_with_the_same_subnets() {
    let mut c = TestCluster::new("eo", StoreKind::Etcd, 3);
    c.up(1);
    let before: Vec<_> = (1..=3).map(|n| c.subnet(n)).collect();
    let pods: Vec<_> = (1..=3).map(|n| c.pod(n, 1)).collect();

    c.etcd.as_mut().expect("etcd").stop();
    // For 30 s without etcd, traffic keeps flowing between every pair.
    let start = Instant::now();
    let mut rounds = 0;
    while start.elapsed() < Duration::from_secs(30) {
        for (a, b) in [(0, 1), (1, 2), (2, 0)] {
            assert!(
                ping(&pods[a].0, pods[b].1),
                "traffic stopped during the etcd outage after {:?}",
                start.elapsed()
            );
        }
        rounds += 1;
        std::thread::sleep(Duration::from_secs(2));
    }
    assert!(rounds >= 5);
    tcp_transfer(&pods[0].0, &pods[2].0, pods[2].1, 2 << 20);
    for n in 1..=3 {
        assert_eq!(
            c.metric(n, "weft_store_connected"),
            0.0,
            "node {n} did not notice the outage"
        );
        assert!(
            c.lab.nodes[n - 1].agent.as_mut().expect("agent").exited().is_none(),
            "agent {n} exited"
        );
    }

    c.etcd.as_mut().expect("etcd").resume();
    for n in 1..=3 {
        assert!(
            eventually(Duration::from_secs(30), || c.metric(n, "weft_store_connected") == 1.0),
            "node {n} did not reconnect:\n{}",
            c.lab.nodes[n - 1].log_tail(20)
        );
        assert!(c.metric(n, "weft_store_watch_restarts_total") >= 1.0);
        let env = weft::subnet_file::SubnetEnv::read(&c.lab.nodes[n - 1].subnet_file()).expect("subnet file");
        assert_eq!(env.subnet, before[n - 1], "node {n} changed subnet");
    }
    assert_eq!(c.lease_lines().len(), 3, "{:?}", c.lease_lines());
    // The watches are live again: a node joining now is routed by every old node.
    let n4 = c.lab.add_node().expect("node 4");
    c.up(1);
    let (_, p4) = c.pod(n4, 1);
    for (ns, _) in &pods {
        assert!(
            eventually(Duration::from_secs(15), || ping(ns, p4)),
            "{ns} cannot reach the new node"
        );
    }
}

#[test]
fn flannel_and_weft_read_each_others_leases() {
    let mut c = TestCluster::new("fc", StoreKind::Etcd, 2);
    c.up(1);
    let etcd = c.etcd.as_ref().expect("etcd");

    // Weft's lease is a flannel lease: flannel's key, flannel's JSON, on an etcd lease.
    let key = format!("/coreos.com/network/subnets/{}-24", c.subnet(1).network());
    let raw = etcd.etcdctl(&["get", &key, "--print-value-only"]).expect("get");
    let v: serde_json::Value = serde_json::from_str(raw.trim()).expect("lease JSON");
    assert_eq!(v["PublicIP"], c.lab.nodes[0].underlay_ip.to_string());
    assert_eq!(v["BackendType"], "udp");
    assert!(v.get("BackendData").is_some(), "{v}");
    let meta = etcd.etcdctl(&["get", &key, "-w", "json"]).expect("get json");
    let meta: serde_json::Value = serde_json::from_str(meta.trim()).expect("etcdctl json");
    assert!(
        meta["kvs"][0]["lease"].as_i64().unwrap_or(0) != 0,
        "lease key has no TTL: {meta}"
    );
    let cfg = etcd
        .etcdctl(&["get", "/coreos.com/network/config", "--print-value-only"])
        .expect("config");
    assert!(cfg.contains("10.244.0.0/16"));

    // A lease written by flannel (byte for byte its format, on an etcd lease) becomes a route.
    let grant = etcd.etcdctl(&["lease", "grant", "600"]).expect("grant");
    let id = grant.split_whitespace().nth(1).expect("lease id").to_string();
    let flannel = r#"{"PublicIP":"198.18.0.99","PublicIPv6":null,"BackendType":"udp","BackendData":null}"#;
    etcd.etcdctl(&[
        "put",
        "--lease",
        &id,
        "/coreos.com/network/subnets/10.244.250.0-24",
        flannel,
    ])
    .expect("put");
    for n in 1..=2 {
        assert!(
            eventually(Duration::from_secs(10), || c.metric(n, "weft_routes") == 2.0),
            "node {n} ignored flannel's lease"
        );
    }
    assert!(c
        .lease_lines()
        .iter()
        .any(|l| l.contains("10.244.250.0/24") && l.contains("198.18.0.99")));
    // Revoking flannel's etcd lease (its TTL running out) removes the route.
    etcd.etcdctl(&["lease", "revoke", &id]).expect("revoke");
    for n in 1..=2 {
        assert!(eventually(Duration::from_secs(10), || c.metric(n, "weft_routes") == 1.0));
    }
    // Junk under the prefix is skipped, not fatal.
    etcd.etcdctl(&["put", "/coreos.com/network/subnets/garbage", "{"])
        .expect("put junk");
    etcd.etcdctl(&["put", "/coreos.com/network/subnets/10.244.251.0-24", "not json"])
        .expect("put junk");
    std::thread::sleep(Duration::from_secs(1));
    let (p1, _) = c.pod(1, 1);
    let (_, p2) = c.pod(2, 1);
    assert!(ping(&p1, p2));
    assert_eq!(c.metric(1, "weft_routes"), 1.0);
}

#[test]
fn etcd_over_mutual_tls() {
    let mut c = TestCluster::new("tl", StoreKind::EtcdTls, 2);
    c.up(1);
    let (p1, _) = c.pod(1, 1);
    let (_, p2) = c.pod(2, 1);
    assert!(ping(&p1, p2));
    let etcd = c.etcd.as_ref().expect("etcd");
    assert!(etcd.endpoint().starts_with("https://"));
    let keys = etcd
        .etcdctl(&["get", "--prefix", "--keys-only", "/coreos.com/network/subnets/"])
        .expect("get");
    assert_eq!(keys.lines().filter(|l| !l.is_empty()).count(), 2, "{keys}");

    // Without a client certificate the server refuses the agent, and the agent says why.
    let (ns, addr) = (etcd.ns.clone(), etcd.endpoint());
    let tls = etcd.tls.clone().expect("tls files");
    let lease_ls = |flag: &str, file: &std::path::Path| {
        let bin = weft_bin().display().to_string();
        let file = file.display().to_string();
        std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                &bin,
                "lease",
                "--etcd-endpoints",
                &addr,
                flag,
                &file,
                "ls",
            ])
            .output()
            .expect("weft lease ls")
    };
    let out = lease_ls("--etcd-cafile", &tls.ca);
    assert!(!out.status.success(), "etcd accepted a client without a certificate");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach etcd at https://"), "{err}");
    // A half-given client identity is a usage error, not a silent fallback.
    let out = lease_ls("--etcd-certfile", &tls.client.0);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--etcd-certfile and --etcd-keyfile must be given together"));
}

/// Runs `f`'s future on a Tokio runtime inside etcd's namespace, the one place its address is
/// reachable from (store clients and the lossy proxy open their sockets there).
fn in_etcd_namespace<T, F>(etcd: &Etcd, f: impl FnOnce() -> F + Send + 'static) -> T
where
    F: std::future::Future<Output = T>,
    T: Send + 'static,
{
    weft::lab::netns::enter_and_run(&etcd.ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(f())
    })
    .expect("namespace")
}

/// The etcd store at `endpoint`, in flannel's key layout.
async fn store_at(endpoint: String) -> weft::lease::etcd::EtcdStore {
    let opts = weft::lease::etcd::EtcdOptions {
        endpoints: vec![endpoint],
        prefix: "/coreos.com/network".into(),
        ..Default::default()
    };
    weft::lease::etcd::EtcdStore::connect(&opts).await.expect("connect")
}

#[test]
fn a_watch_from_a_compacted_revision_asks_for_a_relist() {
    use weft::lease::{LeaseAttrs, LeaseStore, StoreError};

    let c = TestCluster::new("cp", StoreKind::Etcd, 1);
    let etcd = c.etcd.as_ref().expect("etcd");
    let endpoint = etcd.endpoint();
    let got = in_etcd_namespace(etcd, move || async move {
        let store = store_at(endpoint.clone()).await;
        let attrs = LeaseAttrs::new("198.18.0.77".parse().expect("ip"), "udp", serde_json::Value::Null);
        let old = store.list_leases().await.expect("list").revision;
        for i in 1..=5 {
            let net = format!("10.244.{i}.0/24").parse().expect("net");
            let created = store.create_lease(net, &attrs, Duration::from_secs(60)).await;
            assert!(created.expect("create").is_some());
        }
        let now = store.list_leases().await.expect("list").revision;
        let compact = std::process::Command::new("etcdctl")
            .args(["--endpoints", &endpoint, "compact", &now.to_string()])
            .env("ETCDCTL_API", "3")
            .status()
            .expect("etcdctl compact");
        assert!(compact.success());
        let mut w = store.watch_leases(old).await.expect("watch");
        let first = tokio::time::timeout(Duration::from_secs(10), w.recv())
            .await
            .expect("an answer");
        let relisted = store.list_leases().await.expect("relist").leases.len();
        (
            matches!(first, Some(Err(StoreError::Compacted(_)))),
            format!("{first:?}"),
            relisted,
        )
    });
    assert!(got.0, "expected a compaction error, got {}", got.1);
    assert_eq!(got.2, 5, "the re-list sees every lease");
}

/// A renewal whose request, or whose answer, is lost (a member dying mid-request, quorum
/// lost) leaves the outcome unknown. Either way the node's retry must find its lease still its
/// own: the key never deleted (peers would drop the node's routes), no re-acquisition, and no
/// etcd lease left behind once a write settles.
#[test]
fn a_renewal_whose_request_or_answer_is_lost_keeps_the_lease() {
    use weft::lease::{LeaseAttrs, LeaseEvent, LeaseStore};
    use weft_tests::lossy::{Loss, LossyProxy};

    let c = TestCluster::new("el", StoreKind::Etcd, 1);
    let etcd = c.etcd.as_ref().expect("etcd");
    let (direct, addr) = (etcd.endpoint(), etcd.addr);
    let net: ipnet::Ipv4Net = "10.244.9.0/24".parse().expect("net");
    let key = lease_key(net);
    let got = in_etcd_namespace(etcd, move || async move {
        let upstream = std::net::SocketAddr::from((addr, 2379));
        let proxy = LossyProxy::start((addr, 0).into(), upstream).await.expect("proxy");
        let store = store_at(format!("http://{}", proxy.addr())).await;
        let watcher = store_at(direct.clone()).await;
        let attrs = LeaseAttrs::new("198.18.0.77".parse().expect("ip"), "udp", serde_json::Value::Null);
        let ttl = Duration::from_secs(120);
        let mut lease = store
            .create_lease(net, &attrs, ttl)
            .await
            .expect("create")
            .expect("free");
        let mut events = watcher.watch_leases(lease.revision).await.expect("watch");
        let mut log = Vec::new();
        for loss in [Loss::Answer, Loss::Request] {
            proxy.arm(loss, key.as_bytes());
            let lost = store.update_lease(&lease, &attrs, ttl).await;
            log.push(format!("{loss:?}: first try {lost:?}"));
            assert!(
                lost.is_err(),
                "{loss:?}: the renewal saw no answer yet succeeded: {lost:?}"
            );
            proxy.heal();
            // As the agent does: retry the same renewal until the store answers.
            let mut retried = None;
            for _ in 0..10 {
                match store.update_lease(&lease, &attrs, ttl).await {
                    Ok(r) => {
                        retried = Some(r);
                        break;
                    }
                    Err(e) => log.push(format!("{loss:?}: retry {e}")),
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            let renewed = retried.unwrap_or_else(|| panic!("{loss:?}: never answered: {log:?}"));
            lease = renewed.unwrap_or_else(|| panic!("{loss:?}: the lease was taken for lost: {log:?}"));
        }
        let mut removed = Vec::new();
        while let Ok(Some(batch)) = tokio::time::timeout(Duration::from_secs(1), events.recv()).await {
            let (batch, _) = batch.expect("watch");
            removed.extend(batch.into_iter().filter(|e| matches!(e, LeaseEvent::Removed(_))));
        }
        let now = watcher.list_leases().await.expect("list").leases;
        (proxy.trips(), lease, removed, now, log)
    });
    let (trips, lease, removed, now, log) = got;
    assert_eq!(trips, 2, "each loss happened once: {log:?}");
    assert!(removed.is_empty(), "the lease key was deleted: {removed:?}; {log:?}");
    assert_eq!(now.len(), 1);
    assert_eq!((now[0].subnet, now[0].ttl_handle), (net, lease.ttl_handle));
    // Every grant of the lost writes was revoked once the retry settled: one etcd lease left.
    let leases = etcd.etcdctl(&["lease", "list"]).expect("etcdctl lease list");
    let ids: Vec<&str> = leases
        .lines()
        .skip(1)
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(ids, vec![format!("{:x}", lease.ttl_handle)], "etcd leases: {leases}");
}
