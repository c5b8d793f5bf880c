//! Command-line parsing and dispatch. Every flag is also read from `WEFT_<FLAG>`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use weft::agent::{self, AgentOptions};
use weft::lease::etcd::EtcdOptions;
use weft::store::StoreOptions;

#[derive(Parser)]
#[command(name = "weft", version, about = "Weft: an overlay network for container clusters")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent.
    Agent(AgentArgs),
    /// Build a local multi-node cluster in network namespaces and prove pods reach each other.
    Demo(DemoArgs),
    /// Inspect or change leases directly in the store.
    Lease(LeaseArgs),
}

#[derive(Args, Clone)]
struct StoreArgs {
    /// etcd client URLs, comma separated; when empty the embedded store is used.
    #[arg(long, env = "WEFT_ETCD_ENDPOINTS", value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    /// etcd key prefix (flannel's default).
    #[arg(long, env = "WEFT_ETCD_PREFIX", default_value = "/coreos.com/network")]
    etcd_prefix: String,
    /// CA certificate to verify etcd.
    #[arg(long, env = "WEFT_ETCD_CAFILE")]
    etcd_cafile: Option<PathBuf>,
    /// Client certificate for etcd.
    #[arg(long, env = "WEFT_ETCD_CERTFILE")]
    etcd_certfile: Option<PathBuf>,
    /// Client key for etcd.
    #[arg(long, env = "WEFT_ETCD_KEYFILE")]
    etcd_keyfile: Option<PathBuf>,
    /// The embedded store's database file, used when no etcd endpoint is given.
    #[arg(long, env = "WEFT_STORE", default_value = "/var/lib/weft/store.db")]
    store: PathBuf,
}

impl StoreArgs {
    fn options(&self) -> StoreOptions {
        StoreOptions::from_flags(
            EtcdOptions {
                endpoints: self.etcd_endpoints.clone(),
                prefix: self.etcd_prefix.clone(),
                ca_file: self.etcd_cafile.clone(),
                cert_file: self.etcd_certfile.clone(),
                key_file: self.etcd_keyfile.clone(),
            },
            self.store.clone(),
        )
    }
}

#[derive(Args)]
struct AgentArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Underlay interface (default: the default route's).
    #[arg(long, env = "WEFT_IFACE")]
    iface: Option<String>,
    /// Address other nodes reach this one at (default: the interface's address).
    #[arg(long, env = "WEFT_PUBLIC_IP")]
    public_ip: Option<Ipv4Addr>,
    /// Where to write flannel's subnet.env.
    #[arg(long, env = "WEFT_SUBNET_FILE", default_value = "/run/flannel/subnet.env")]
    subnet_file: PathBuf,
    /// Renew the lease this many minutes before it expires (1..1439).
    #[arg(long, env = "WEFT_SUBNET_LEASE_RENEW_MARGIN", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..1440))]
    subnet_lease_renew_margin: u64,
    /// Lease time to live in seconds (flannel's is fixed at 24 h).
    #[arg(long, env = "WEFT_LEASE_TTL", default_value_t = 86400,
          value_parser = clap::value_parser!(u64).range(2..=31_536_000))]
    lease_ttl: u64,
    /// Network config JSON (flannel format), written to a store that has none.
    #[arg(long, env = "WEFT_NET_CONFIG")]
    net_config: Option<PathBuf>,
    /// Address of the metrics and health endpoint.
    #[arg(long, env = "WEFT_ADMIN_LISTEN", default_value = "127.0.0.1:8286")]
    admin_listen: SocketAddr,
}

#[derive(Args)]
struct DemoArgs {
    /// Number of nodes.
    #[arg(long, env = "WEFT_NODES", default_value_t = 3, value_parser = clap::value_parser!(u8).range(2..=50))]
    nodes: u8,
    /// Pods per node.
    #[arg(long, env = "WEFT_PODS", default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=20))]
    pods: u8,
    /// Prove reachability, print the result, tear down and exit (0 only if every pair answered).
    #[arg(long, env = "WEFT_ONCE")]
    once: bool,
    /// Remove the leftovers of a demo that was killed.
    #[arg(long, env = "WEFT_DOWN", conflicts_with = "once")]
    down: bool,
}

#[derive(Args)]
struct LeaseArgs {
    #[command(flatten)]
    store: StoreArgs,
    #[command(subcommand)]
    action: LeaseAction,
}

#[derive(Subcommand)]
enum LeaseAction {
    /// List leases.
    Ls,
    /// Delete the lease on a subnet (e.g. 10.244.3.0/24).
    Rm { subnet: ipnet::Ipv4Net },
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WEFT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only for a person at a terminal; log files and journald get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
}

/// Parses the command line and runs it; errors print as one line.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weft: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("weft: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
    }
}

async fn dispatch(cmd: Command) -> Result<ExitCode> {
    match cmd {
        Command::Agent(a) => {
            let opts = AgentOptions {
                store: a.store.options(),
                iface: a.iface,
                public_ip: a.public_ip,
                subnet_file: a.subnet_file,
                renew_margin: Duration::from_secs(a.subnet_lease_renew_margin * 60),
                lease_ttl: Duration::from_secs(a.lease_ttl),
                net_config: a.net_config,
                admin_listen: a.admin_listen,
            };
            agent::run(opts, shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo(d) => {
            if d.down {
                let removed = weft::lab::demo::down().await?;
                println!("removed {removed} demo namespaces");
                return Ok(ExitCode::SUCCESS);
            }
            let ok = weft::lab::demo::run(d.nodes, d.pods, d.once, shutdown_signal()).await?;
            Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Lease(l) => {
            let store = l.store.options().open().await.context("opening the lease store")?;
            match l.action {
                LeaseAction::Ls => {
                    let snap = store.list_leases().await?;
                    println!("{:<20} {:<16} {:<8} BACKEND DATA", "SUBNET", "PUBLIC IP", "BACKEND");
                    for l in snap.leases {
                        println!(
                            "{:<20} {:<16} {:<8} {}",
                            l.subnet.to_string(),
                            l.attrs.public_ip.to_string(),
                            l.attrs.backend_type,
                            l.attrs.backend_data
                        );
                    }
                }
                LeaseAction::Rm { subnet } => {
                    if !store.delete_lease(subnet.trunc()).await? {
                        anyhow::bail!("no lease on {subnet}");
                    }
                    println!("deleted the lease on {}", subnet.trunc());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
