//! `weft demo`: a local cluster anyone can run as root, with a reachability matrix.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use super::cluster::{Cluster, ClusterSpec, LabStore, ADMIN_PORT};
use super::netns::{list_with_prefix, remove};
use super::probe::ping;
use super::LabError;

/// Namespace prefix of the demo.
pub const PREFIX: &str = "weftdemo";
const STATE_DIR: &str = "/run/weft-demo";

/// Removes every namespace (and process inside) a previous demo left; returns how many.
pub async fn down() -> Result<usize, LabError> {
    let names = list_with_prefix(&format!("{PREFIX}-"));
    // Pods and nodes before the switch, so veth peers die with their owners.
    let mut sorted = names.clone();
    sorted.sort_by_key(|n| std::cmp::Reverse(n.len()));
    for n in &sorted {
        remove(n);
    }
    let _ = std::fs::remove_dir_all(STATE_DIR);
    Ok(names.len())
}

fn preflight() -> Result<(), LabError> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err(LabError::Probe(
            "weft demo needs root: it creates network namespaces".into(),
        ));
    }
    super::netns::ip(&["-V"]).map(|_| ())
}

/// Builds the demo cluster, proves reachability, and (unless `once`) keeps it up until
/// `shutdown`. Returns whether every pod reached every other pod.
pub async fn run(
    nodes: u8,
    pods: u8,
    once: bool,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<bool, LabError> {
    preflight()?;
    let leftovers = down().await?;
    if leftovers > 0 {
        println!("removed {leftovers} namespaces left by an earlier demo");
    }
    let dir = PathBuf::from(STATE_DIR);
    let spec = ClusterSpec {
        prefix: PREFIX.into(),
        dir: dir.clone(),
        weft_bin: std::env::current_exe()?,
        store: LabStore::Embedded(dir.join("store.db")),
        net_config: r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"udp"}}"#.into(),
        agent_args: vec![],
    };
    let (nodes, pods) = (usize::from(nodes), usize::from(pods));
    println!("building {nodes} nodes with {pods} pods each in network namespaces ({PREFIX}-*)...");
    let mut cluster = tokio::task::spawn_blocking(move || -> Result<Cluster, LabError> {
        let mut c = Cluster::build(spec, nodes)?;
        c.up(pods, Duration::from_secs(30))?;
        Ok(c)
    })
    .await
    .map_err(|e| LabError::Probe(e.to_string()))??;

    for n in &cluster.nodes {
        println!(
            "  node {} ({}) underlay {:<12} subnet {}",
            n.index,
            n.ns.name(),
            n.underlay_ip,
            n.subnet.map(|s| s.to_string()).unwrap_or_default()
        );
    }
    let (ok, cluster_back) = tokio::task::spawn_blocking(move || {
        let ok = print_matrix(&cluster);
        (ok, cluster)
    })
    .await
    .map_err(|e| LabError::Probe(e.to_string()))?;
    cluster = cluster_back;

    let first = &cluster.nodes[0];
    let last = &cluster.nodes[cluster.nodes.len() - 1];
    let (src, dst) = (&first.pods[0], &last.pods[0]);
    println!("\nTry it by hand (as root, in another terminal):");
    println!("  ip netns exec {} ping -c 3 {}", src.ns.name(), dst.ip);
    println!("  ip netns exec {} ip route", first.ns.name());
    println!(
        "  ip netns exec {} curl -s 127.0.0.1:{ADMIN_PORT}/metrics",
        first.ns.name()
    );
    println!(
        "  {} lease ls --store {}",
        std::env::current_exe()?.display(),
        dir.join("store.db").display()
    );
    println!("  agent logs: {}/n*/agent.log", dir.display());
    if once {
        println!("\n--once: tearing down");
    } else {
        println!("\nThe cluster is up. Press Ctrl-C to tear it down.");
        shutdown.await;
        println!("tearing down");
    }
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .map_err(|e| LabError::Probe(e.to_string()))?;
    let _ = std::fs::remove_dir_all(STATE_DIR);
    Ok(ok)
}

/// Pings every pod from every pod (in parallel) and prints the matrix; true if all answered.
fn print_matrix(c: &Cluster) -> bool {
    let pods: Vec<(String, String, Ipv4Addr)> = c
        .nodes
        .iter()
        .flat_map(|n| {
            n.pods
                .iter()
                .enumerate()
                .map(move |(k, p)| (format!("n{}p{}", n.index, k + 1), p.ns.name().to_string(), p.ip))
        })
        .collect();
    let mut handles = Vec::new();
    for (i, (_, ns, _)) in pods.iter().enumerate() {
        for (j, (_, _, ip)) in pods.iter().enumerate() {
            if i == j {
                continue;
            }
            let (ns, ip) = (ns.clone(), *ip);
            handles.push((
                (i, j),
                std::thread::spawn(move || ping(&ns, ip, Duration::from_secs(5))),
            ));
        }
    }
    let mut results = vec![vec![None; pods.len()]; pods.len()];
    for ((i, j), h) in handles {
        results[i][j] = Some(h.join().map_err(|_| ()).and_then(|r| r.map_err(|_| ())));
    }
    println!("\nreachability (ICMP echo, row pings column; rtt in ms):");
    print!("{:>10}", "");
    for (name, _, _) in &pods {
        print!("{name:>8}");
    }
    println!();
    let mut all = true;
    for (i, (name, _, ip)) in pods.iter().enumerate() {
        print!("{:>10}", name);
        for cell in &results[i] {
            match cell {
                None => print!("{:>8}", "-"),
                Some(Ok(rtt)) => print!("{:>8.2}", rtt.as_secs_f64() * 1000.0),
                Some(Err(())) => {
                    all = false;
                    print!("{:>8}", "FAIL");
                }
            }
        }
        println!("   {ip}");
    }
    let n = pods.len();
    println!(
        "\n{}",
        if all {
            format!(
                "all {} pod pairs reach each other across {} nodes",
                n * (n - 1),
                c.nodes.len()
            )
        } else {
            "SOME PAIRS FAILED: see the agent logs".into()
        }
    );
    all
}
