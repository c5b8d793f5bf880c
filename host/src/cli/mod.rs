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

mod module;
mod replay;
mod rollout;
use module::{api_rollouts, module_command, print_modules, ModuleArgs};

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
    /// Manage the Wasm policy and routing modules every node runs.
    Module(ModuleArgs),
    /// Show the cluster as an agent sees it: nodes, modules and this node's data path.
    Status(StatusArgs),
    /// Install the CNI plugin and its network configuration onto this node (an init container's job).
    InstallCni(InstallCniArgs),
}

#[derive(Args)]
struct InstallCniArgs {
    /// The plugin binary to install.
    #[arg(long, default_value = "/weft-cni")]
    plugin: PathBuf,
    /// Where the runtime looks for plugins.
    #[arg(long, default_value = "/opt/cni/bin")]
    bin_dir: PathBuf,
    /// The network configuration (a conflist with a plugin of type "weft", or a single conf).
    #[arg(long)]
    conf: PathBuf,
    /// Where the runtime looks for network configurations.
    #[arg(long, default_value = "/etc/cni/net.d")]
    conf_dir: PathBuf,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum Output {
    /// Aligned columns for people.
    Table,
    /// JSON for programs.
    Json,
}

/// How to reach an agent's API.
#[derive(Args, Clone)]
pub(crate) struct ServerArgs {
    /// Go through an agent's API (e.g. http://127.0.0.1:8286, or https://node:8286) instead of
    /// the store.
    #[arg(global = true, long, env = "WEFT_SERVER")]
    pub(crate) server: Option<String>,
    /// CA certificate (PEM) an https:// server's certificate must chain to (besides the
    /// system's CAs).
    #[arg(global = true, long, env = "WEFT_SERVER_CA")]
    server_ca: Option<PathBuf>,
    /// Client certificate (PEM) for an agent that asks for one (--admin-tls-client-ca).
    #[arg(global = true, long, env = "WEFT_CLIENT_CERT", requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// The private key of --client-cert (PEM).
    #[arg(global = true, long, env = "WEFT_CLIENT_KEY", requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// The API's bearer token (else read from --token-file).
    #[arg(global = true, long, env = "WEFT_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the API's bearer token.
    #[arg(
        global = true,
        long,
        env = "WEFT_ADMIN_TOKEN_FILE",
        default_value = "/var/lib/weft/admin-token"
    )]
    token_file: PathBuf,
    /// Output format.
    #[arg(global = true, short = 'o', long, value_enum, default_value = "table")]
    pub(crate) output: Output,
}

impl ServerArgs {
    /// A client of `--server` (or `default`), with the token if one can be had: reads may not
    /// need it, so an unreadable token file is not an error here.
    pub(crate) fn client(&self, default: Option<&str>) -> Result<Option<weft::client::Client>> {
        let Some(server) = self.server.as_deref().or(default) else {
            return Ok(None);
        };
        let token = self.token.clone().or_else(|| {
            std::fs::read_to_string(&self.token_file)
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        });
        let tls = weft::client::TlsOptions {
            ca: self.server_ca.clone(),
            identity: self.client_cert.clone().zip(self.client_key.clone()),
        };
        Ok(Some(weft::client::Client::new(server, token, &tls)?))
    }
}

#[derive(Args)]
struct StatusArgs {
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Args, Clone)]
pub(crate) struct StoreArgs {
    /// etcd client URLs, comma separated; when empty the embedded store is used.
    #[arg(global = true, long, env = "WEFT_ETCD_ENDPOINTS", value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    /// etcd key prefix (flannel's default).
    #[arg(global = true, long, env = "WEFT_ETCD_PREFIX", default_value = "/coreos.com/network")]
    etcd_prefix: String,
    /// CA certificate to verify etcd.
    #[arg(global = true, long, env = "WEFT_ETCD_CAFILE")]
    etcd_cafile: Option<PathBuf>,
    /// Client certificate for etcd.
    #[arg(global = true, long, env = "WEFT_ETCD_CERTFILE")]
    etcd_certfile: Option<PathBuf>,
    /// Client key for etcd.
    #[arg(global = true, long, env = "WEFT_ETCD_KEYFILE")]
    etcd_keyfile: Option<PathBuf>,
    /// The embedded store's database file, used when no etcd endpoint is given.
    #[arg(global = true, long, env = "WEFT_STORE", default_value = "/var/lib/weft/store.db")]
    store: PathBuf,
    /// Keep leases on the Kubernetes API's Node objects, as flannel's --kube-subnet-mgr does
    /// (the subnet is the node's spec.podCIDR).
    #[arg(global = true, long, env = "WEFT_KUBE_SUBNET_MGR")]
    kube_subnet_mgr: bool,
    /// Kubernetes API server URL (default: the kubeconfig's, else the in-cluster one).
    #[arg(global = true, long, env = "WEFT_KUBE_API_URL")]
    kube_api_url: Option<String>,
    /// kubeconfig file (default: the pod's service account).
    #[arg(global = true, long, env = "WEFT_KUBECONFIG_FILE")]
    kubeconfig_file: Option<PathBuf>,
    /// Prefix of the node annotations the lease is published in (flannel's).
    #[arg(global = true, long, env = "WEFT_KUBE_ANNOTATION_PREFIX", default_value = weft::lease::kube::DEFAULT_PREFIX)]
    kube_annotation_prefix: String,
    /// This node's name in Kubernetes (the downward API's spec.nodeName).
    #[arg(global = true, long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Set the node condition NetworkUnavailable=False once the lease is published.
    #[arg(global = true, long, env = "WEFT_SET_NODE_NETWORK_UNAVAILABLE", default_value_t = true,
          num_args = 0..=1, default_missing_value = "true", require_equals = true, action = clap::ArgAction::Set)]
    set_node_network_unavailable: bool,
}

impl StoreArgs {
    /// The store the flags name; `net_config` is where the Kubernetes mode reads net-conf.json.
    pub(crate) fn options(&self) -> StoreOptions {
        self.options_with(None)
    }

    pub(crate) fn options_with(&self, net_config: Option<&PathBuf>) -> StoreOptions {
        if self.kube_subnet_mgr {
            return StoreOptions::Kube(weft::lease::kube::KubeOptions {
                api_url: self.kube_api_url.clone().filter(|u| !u.is_empty()),
                kubeconfig: self.kubeconfig_file.clone().filter(|p| !p.as_os_str().is_empty()),
                annotation_prefix: self.kube_annotation_prefix.clone(),
                node_name: self.node_name.clone().filter(|n| !n.is_empty()),
                net_config: net_config
                    .cloned()
                    .unwrap_or_else(|| PathBuf::from("/etc/kube-flannel/net-conf.json")),
                set_network_unavailable: self.set_node_network_unavailable,
            });
        }
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

/// Limits every module runs under; `weft module add` checks a module against the same ones.
#[derive(Args, Clone)]
pub(crate) struct LimitArgs {
    /// Largest module accepted, in KiB of Wasm.
    #[arg(global = true, long, env = "WEFT_MODULE_MAX_KIB", default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(1..=65_536))]
    module_max_kib: u64,
    /// Most linear memory one module instance may use, in MiB.
    #[arg(global = true, long, env = "WEFT_MODULE_MAX_MEMORY_MIB", default_value_t = 16,
          value_parser = clap::value_parser!(u64).range(1..=4096))]
    module_max_memory_mib: u64,
    /// Most CPU time one decision may use, in milliseconds, before it is interrupted (time
    /// spent waiting for a core does not count).
    #[arg(global = true, long, env = "WEFT_MODULE_DEADLINE_MS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    module_deadline_ms: u64,
    /// Only add and run modules signed by one of these Ed25519 public keys (PEM, several may
    /// be concatenated; `weft module keygen` writes one).
    #[arg(global = true, long, env = "WEFT_MODULE_TRUSTED_KEYS")]
    module_trusted_keys: Option<PathBuf>,
}

impl LimitArgs {
    pub(crate) fn limits(&self) -> Result<weft::wasm::Limits> {
        let trusted_keys = match &self.module_trusted_keys {
            None => None,
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading --module-trusted-keys {}", p.display()))?;
                let keys = weft::wasm::signature::TrustedKeys::parse(&text)
                    .with_context(|| format!("--module-trusted-keys {}", p.display()))?;
                Some(std::sync::Arc::new(keys))
            }
        };
        Ok(weft::wasm::Limits {
            max_module_bytes: usize::try_from(self.module_max_kib * 1024).unwrap_or(usize::MAX),
            max_memory_bytes: usize::try_from(self.module_max_memory_mib << 20).unwrap_or(usize::MAX),
            call_deadline: Duration::from_millis(self.module_deadline_ms),
            trusted_keys,
            ..weft::wasm::Limits::default()
        })
    }
}

#[derive(Args)]
struct AgentArgs {
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    limits: LimitArgs,
    /// The admin API's bearer token (prefer the environment variable or the file).
    #[arg(long, env = "WEFT_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// File holding the admin API's token; generated (mode 0600) if missing and none is given.
    #[arg(long, env = "WEFT_ADMIN_TOKEN_FILE", default_value = "/var/lib/weft/admin-token")]
    admin_token_file: PathBuf,
    /// Require the token for API reads too, not only for changes.
    #[arg(long, env = "WEFT_ADMIN_AUTH_READS")]
    admin_auth_reads: bool,
    /// How often to look for module changes in the store, in milliseconds.
    #[arg(long, env = "WEFT_MODULE_POLL_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(50..=600_000))]
    module_poll_ms: u64,
    /// Underlay interface (default: the default route's).
    #[arg(long, env = "WEFT_IFACE")]
    iface: Option<String>,
    /// Address other nodes reach this one at (default: the interface's address).
    #[arg(long, env = "WEFT_PUBLIC_IP")]
    public_ip: Option<Ipv4Addr>,
    /// Where to write flannel's subnet.env.
    #[arg(long, env = "WEFT_SUBNET_FILE", default_value = "/run/flannel/subnet.env")]
    subnet_file: PathBuf,
    /// Masquerade pod traffic leaving the cluster network (never pod-to-pod), in nftables table `ip weft`.
    #[arg(long, env = "WEFT_IP_MASQ")]
    ip_masq: bool,
    /// First NFQUEUE number for Wasm policy on kernel data paths (vxlan, host-gw).
    #[arg(long, env = "WEFT_POLICY_QUEUE", default_value_t = weft::nfq::DEFAULT_QUEUE)]
    policy_queue: u16,
    /// NFQUEUE queues (one thread each) sharing new flows, from --policy-queue on (default: one per CPU, at most 8).
    #[arg(long, env = "WEFT_POLICY_QUEUES", value_parser = clap::value_parser!(u16).range(1..=8))]
    policy_queues: Option<u16>,
    /// Directory for state that must survive restarts and reboots (the VTEP MAC).
    #[arg(long, env = "WEFT_STATE_DIR", default_value = "/var/lib/weft")]
    state_dir: PathBuf,
    /// Renew the lease this many minutes before it expires (1..1439).
    #[arg(long, env = "WEFT_SUBNET_LEASE_RENEW_MARGIN", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..1440))]
    subnet_lease_renew_margin: u64,
    /// Lease time to live in seconds (flannel's is fixed at 24 h).
    #[arg(long, env = "WEFT_LEASE_TTL", default_value_t = 86400,
          value_parser = clap::value_parser!(u64).range(2..=31_536_000))]
    lease_ttl: u64,
    /// Network config JSON (flannel format), written to a store that has none; with
    /// --kube-subnet-mgr, the mounted net-conf.json (default /etc/kube-flannel/net-conf.json).
    #[arg(long, env = "WEFT_NET_CONFIG", visible_alias = "net-config-path")]
    net_config: Option<PathBuf>,
    /// Address of the metrics and health endpoint.
    #[arg(long, env = "WEFT_ADMIN_LISTEN", default_value = "127.0.0.1:8286")]
    admin_listen: SocketAddr,
    /// Serve the admin endpoint over TLS with this certificate chain (PEM, leaf first).
    #[arg(long, env = "WEFT_ADMIN_TLS_CERT", requires = "admin_tls_key")]
    admin_tls_cert: Option<PathBuf>,
    /// The private key of --admin-tls-cert (PEM).
    #[arg(long, env = "WEFT_ADMIN_TLS_KEY", requires = "admin_tls_cert")]
    admin_tls_key: Option<PathBuf>,
    /// Accept only clients with a certificate signed by this CA (PEM); needs --admin-tls-cert.
    #[arg(long, env = "WEFT_ADMIN_TLS_CLIENT_CA", requires = "admin_tls_cert")]
    admin_tls_client_ca: Option<PathBuf>,
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
    #[command(flatten)]
    server: ServerArgs,
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

fn print_leases(leases: &[weft::api::views::LeaseView], output: Output) -> Result<()> {
    if let Output::Json = output {
        return print_json(&leases);
    }
    println!(
        "{:<20} {:<16} {:<8} {:>12} BACKEND DATA",
        "SUBNET", "PUBLIC IP", "BACKEND", "EXPIRES IN"
    );
    for l in leases {
        println!(
            "{:<20} {:<16} {:<8} {:>11}s {}",
            l.subnet, l.public_ip, l.backend_type, l.expires_in, l.backend_data
        );
    }
    Ok(())
}

pub(crate) fn print_json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

async fn status_command(a: StatusArgs) -> Result<()> {
    type V = serde_json::Value;
    let Some(c) = a.server.client(Some("http://127.0.0.1:8286"))? else {
        unreachable!("a default server is given")
    };
    let nodes: Vec<V> = c.call("GET", "/nodes", None, b"").await?;
    let modules: Vec<V> = c.call("GET", "/modules", None, b"").await?;
    let stats: V = c.call("GET", "/stats", None, b"").await?;
    if let Output::Json = a.server.output {
        return print_json(&serde_json::json!({"nodes": nodes, "modules": modules, "stats": stats}));
    }
    println!(
        "{:<20} {:<16} {:<8} {:>12} {:>10} MODULES",
        "SUBNET", "PUBLIC IP", "BACKEND", "EXPIRES IN", "SEEN"
    );
    for n in &nodes {
        let l = &n["lease"];
        let own = if l["own"] == true { " *" } else { "" };
        let mods: Vec<String> = n["modules"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|m| {
                        format!(
                            "{}:{}",
                            m["name"].as_str().unwrap_or(""),
                            m["state"].as_str().unwrap_or("")
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "{:<20} {:<16} {:<8} {:>11}s {:>10} {}",
            format!("{}{own}", l["subnet"].as_str().unwrap_or("")),
            n["public_ip"].as_str().unwrap_or(""),
            l["backend_type"].as_str().unwrap_or(""),
            l["expires_in"],
            n["last_seen_secs"]
                .as_u64()
                .map_or("never".to_string(), |s| format!("{s}s ago")),
            if mods.is_empty() {
                "-".to_string()
            } else {
                mods.join(", ")
            }
        );
    }
    println!();
    print_modules(&modules, &api_rollouts(&c, &modules).await);
    println!(
        "\nthis node: tx {} packets / {} bytes, rx {} packets / {} bytes, {} routes, flow cache {} hits / {} misses",
        stats["tx_packets"],
        stats["tx_bytes"],
        stats["rx_packets"],
        stats["rx_bytes"],
        stats["routes"].as_array().map_or(0, Vec::len),
        stats["flow_cache_hits"],
        stats["flow_cache_misses"]
    );
    if let Some(drops) = stats["drops"].as_object() {
        let nonzero: Vec<String> = drops
            .iter()
            .filter(|(_, v)| v.as_u64() != Some(0))
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        if !nonzero.is_empty() {
            println!("drops: {}", nonzero.join(", "));
        }
    }
    if let Some(f) = stats["failure"].as_str() {
        println!("DATA PATH STOPPED: {f}");
    }
    Ok(())
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WEFT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colour only for a person at a terminal; log files and journald get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_filter(filter);
    // Module log lines at every level for `weft module test` (a no-op unless it runs).
    let capture = replay::LogCapture
        .with_filter(tracing_subscriber::filter::Targets::new().with_target("weft::module", tracing::Level::TRACE));
    tracing_subscriber::registry().with(fmt).with(capture).init();
}

/// Parses the command line and runs it; errors print as one line.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // kube's client logs each failed request itself, without context; Weft reports them with
    // it. A one-shot command's error line already says what its store's warnings would.
    init_logging(match &cli.command {
        Command::Module(m) if m.is_test() => "warn",
        Command::Lease(_) | Command::Module(_) => "info,kube_client=off,weft::lease::kube=error",
        _ => "info,kube_client=off",
    });
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
            if a.store.kube_subnet_mgr && a.store.node_name.as_deref().is_none_or(str::is_empty) {
                anyhow::bail!(
                    "--kube-subnet-mgr needs this node's name: set NODE_NAME (the downward API's spec.nodeName) or --node-name"
                );
            }
            let opts = AgentOptions {
                store: a.store.options_with(a.net_config.as_ref()),
                iface: a.iface,
                public_ip: a.public_ip,
                subnet_file: a.subnet_file,
                state_dir: a.state_dir,
                policy_queue: a.policy_queue,
                policy_queues: a.policy_queues.unwrap_or_else(weft::nfq::default_queues),
                ip_masq: a.ip_masq,
                renew_margin: Duration::from_secs(a.subnet_lease_renew_margin * 60),
                lease_ttl: Duration::from_secs(a.lease_ttl),
                net_config: a.net_config,
                admin_listen: a.admin_listen,
                admin_tls: match (a.admin_tls_cert, a.admin_tls_key) {
                    (Some(cert), Some(key)) => Some(weft::tls::ServerFiles {
                        cert,
                        key,
                        client_ca: a.admin_tls_client_ca,
                    }),
                    _ => None,
                },
                module_limits: a.limits.limits()?,
                module_poll: Duration::from_millis(a.module_poll_ms),
                admin_token: a.admin_token,
                admin_token_file: a.admin_token_file,
                admin_auth_reads: a.admin_auth_reads,
            };
            agent::run(opts, shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::InstallCni(i) => {
            let (bin, conf) = weft::cni::install(&i.plugin, &i.bin_dir, &i.conf, &i.conf_dir)?;
            println!("installed {} and {}", bin.display(), conf.display());
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
        Command::Module(m) => module_command(m).await,
        Command::Status(a) => {
            status_command(a).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Lease(l) => {
            type LeaseView = weft::api::views::LeaseView;
            let api = l.server.client(None)?;
            match (l.action, api) {
                (LeaseAction::Ls, Some(c)) => {
                    let leases: Vec<LeaseView> = c.call("GET", "/leases", None, b"").await?;
                    print_leases(&leases, l.server.output)?;
                }
                (LeaseAction::Rm { .. }, Some(_)) => {
                    anyhow::bail!("deleting a lease goes to the store directly: drop --server")
                }
                (LeaseAction::Ls, None) => {
                    let store = l
                        .store
                        .options()
                        .open_existing()
                        .await
                        .context("opening the lease store")?;
                    let snap = store.list_leases().await?;
                    let leases: Vec<LeaseView> = snap.leases.iter().map(|x| LeaseView::of(x, false)).collect();
                    print_leases(&leases, l.server.output)?;
                }
                (LeaseAction::Rm { subnet }, None) => {
                    let store = l
                        .store
                        .options()
                        .open_existing()
                        .await
                        .context("opening the lease store")?;
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
