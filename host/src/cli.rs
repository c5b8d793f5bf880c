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
enum Output {
    /// Aligned columns for people.
    Table,
    /// JSON for programs.
    Json,
}

/// How to reach an agent's API.
#[derive(Args, Clone)]
struct ServerArgs {
    /// Go through an agent's API (e.g. http://127.0.0.1:8286) instead of the store.
    #[arg(global = true, long, env = "WEFT_SERVER")]
    server: Option<String>,
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
    output: Output,
}

impl ServerArgs {
    /// A client of `--server` (or `default`), with the token if one can be had: reads may not
    /// need it, so an unreadable token file is not an error here.
    fn client(&self, default: Option<&str>) -> Result<Option<weft::client::Client>> {
        let Some(server) = self.server.as_deref().or(default) else {
            return Ok(None);
        };
        let token = self.token.clone().or_else(|| {
            std::fs::read_to_string(&self.token_file)
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        });
        Ok(Some(weft::client::Client::new(server, token)?))
    }
}

#[derive(Args)]
struct StatusArgs {
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Args, Clone)]
struct StoreArgs {
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

/// Limits every module runs under; `weft module add` checks a module against the same ones.
#[derive(Args, Clone)]
struct LimitArgs {
    /// Largest module accepted, in KiB of Wasm.
    #[arg(global = true, long, env = "WEFT_MODULE_MAX_KIB", default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(1..=65_536))]
    module_max_kib: u64,
    /// Most linear memory one module instance may use, in MiB.
    #[arg(global = true, long, env = "WEFT_MODULE_MAX_MEMORY_MIB", default_value_t = 16,
          value_parser = clap::value_parser!(u64).range(1..=4096))]
    module_max_memory_mib: u64,
    /// Most time one decision may take, in milliseconds, before it is interrupted.
    #[arg(global = true, long, env = "WEFT_MODULE_DEADLINE_MS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    module_deadline_ms: u64,
}

impl LimitArgs {
    fn limits(&self) -> weft::wasm::Limits {
        weft::wasm::Limits {
            max_module_bytes: usize::try_from(self.module_max_kib * 1024).unwrap_or(usize::MAX),
            max_memory_bytes: usize::try_from(self.module_max_memory_mib << 20).unwrap_or(usize::MAX),
            call_deadline: Duration::from_millis(self.module_deadline_ms),
            ..weft::wasm::Limits::default()
        }
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

#[derive(Args)]
struct ModuleArgs {
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(subcommand)]
    action: ModuleAction,
}

#[derive(Args)]
struct ConfigArg {
    /// The module's config, read from a file (usually JSON).
    #[arg(long, conflicts_with = "config_json")]
    config: Option<PathBuf>,
    /// The module's config, given inline.
    #[arg(long)]
    config_json: Option<String>,
}

impl ConfigArg {
    fn read(&self) -> Result<Option<String>> {
        match (&self.config, &self.config_json) {
            (Some(p), _) => Ok(Some(
                std::fs::read_to_string(p).with_context(|| format!("reading --config {}", p.display()))?,
            )),
            (None, Some(s)) => Ok(Some(s.clone())),
            (None, None) => Ok(None),
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Failure {
    /// Drop flows the module cannot decide.
    Closed,
    /// Skip the module when it fails.
    Open,
}

impl From<Failure> for weft::wasm::FailurePolicy {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Closed => weft::wasm::FailurePolicy::Closed,
            Failure::Open => weft::wasm::FailurePolicy::Open,
        }
    }
}

#[derive(Subcommand)]
enum ModuleAction {
    /// Check a module here (ABI, config, a probe decision) and store it for every node.
    Add {
        /// Module name.
        name: String,
        /// The .wasm file (compiled on each node; precompiled artifacts are never accepted).
        wasm: PathBuf,
        #[command(flatten)]
        config: ConfigArg,
        /// Place in the chain: lower runs first.
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        order: i32,
        /// What a failure of the module means.
        #[arg(long, value_enum, default_value = "closed")]
        failure: Failure,
        /// Decide and count, enforce nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Change a stored module: its code, config or settings.
    Set {
        /// Module name.
        name: String,
        /// New .wasm file.
        #[arg(long)]
        wasm: Option<PathBuf>,
        #[command(flatten)]
        config: ConfigArg,
        /// New place in the chain.
        #[arg(long, allow_negative_numbers = true)]
        order: Option<i32>,
        /// New failure policy.
        #[arg(long, value_enum)]
        failure: Option<Failure>,
        /// Turn dry-run on or off.
        #[arg(long)]
        dry_run: Option<bool>,
    },
    /// Remove a module from every node.
    Rm {
        /// Module name.
        name: String,
    },
    /// List modules and which code each node has loaded.
    Ls,
}

fn read_wasm(p: &PathBuf) -> Result<Vec<u8>> {
    std::fs::read(p).with_context(|| format!("reading {}", p.display()))
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

fn print_json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn print_modules(views: &[serde_json::Value]) {
    println!(
        "{:<16} {:>6} {:<8} {:<7} {:<14} NODES (loaded/failed)",
        "NAME", "ORDER", "MODE", "FAILURE", "SHA256"
    );
    for m in views {
        let nodes = m["nodes"].as_array().cloned().unwrap_or_default();
        let same = |n: &&serde_json::Value| n["sha256"] == m["sha256"];
        let loaded = nodes.iter().filter(same).filter(|n| n["state"] == "loaded").count();
        let failed: Vec<String> = nodes
            .iter()
            .filter(same)
            .filter(|n| n["state"] != "loaded")
            .map(|n| {
                format!(
                    "{}: {}",
                    n["name"].as_str().unwrap_or("?"),
                    n["error"].as_str().unwrap_or("failed")
                )
            })
            .collect();
        let sha = m["sha256"].as_str().unwrap_or("");
        println!(
            "{:<16} {:>6} {:<8} {:<7} {:<14} {}/{}{}",
            m["name"].as_str().unwrap_or(""),
            m["order"],
            m["mode"].as_str().unwrap_or(""),
            m["failure"].as_str().unwrap_or(""),
            &sha[..sha.len().min(12)],
            loaded,
            failed.len(),
            if failed.is_empty() {
                String::new()
            } else {
                format!(" ({})", failed.join("; "))
            }
        );
    }
}

/// A module command with its files read: what both the store path and the API path carry out.
enum ModuleOp {
    Add(weft::wasm::ModuleSpec),
    Set(String, weft::wasm::registry::Changes),
    Rm(String),
    Ls,
}

impl ModuleOp {
    fn read(action: ModuleAction) -> Result<ModuleOp> {
        Ok(match action {
            ModuleAction::Add {
                name,
                wasm,
                config,
                order,
                failure,
                dry_run,
            } => {
                let mut spec =
                    weft::wasm::ModuleSpec::new(&name, &read_wasm(&wasm)?, config.read()?.unwrap_or_default());
                spec.order = order;
                spec.failure = failure.into();
                spec.dry_run = dry_run;
                ModuleOp::Add(spec)
            }
            ModuleAction::Set {
                name,
                wasm,
                config,
                order,
                failure,
                dry_run,
            } => ModuleOp::Set(
                name,
                weft::wasm::registry::Changes {
                    wasm: wasm.as_ref().map(read_wasm).transpose()?,
                    config: config.read()?,
                    order,
                    failure: failure.map(Into::into),
                    dry_run,
                },
            ),
            ModuleAction::Rm { name } => ModuleOp::Rm(name),
            ModuleAction::Ls => ModuleOp::Ls,
        })
    }
}

async fn module_command(m: ModuleArgs) -> Result<()> {
    let op = ModuleOp::read(m.action)?;
    if let Some(client) = m.server.client(None)? {
        return module_via_api(&client, op, m.server.output).await;
    }
    use weft::wasm::registry;
    // Adding a module may create the embedded store (modules stored before the first agent
    // starts are loaded by it); reading or removing never does: a mistyped path is an error.
    let opts = m.store.options();
    let store = match &op {
        ModuleOp::Add(_) => opts.open().await,
        _ => opts.open_existing().await,
    }
    .context("opening the lease store")?;
    let rt = weft::wasm::Runtime::new(m.limits.limits())?;
    match op {
        ModuleOp::Add(spec) => {
            let (name, sha) = (spec.name.clone(), spec.sha256.clone());
            registry::add(store.as_ref(), &rt, spec).await?;
            println!("added module {name} (sha256 {sha})");
        }
        ModuleOp::Set(name, changes) => {
            let spec = registry::set(store.as_ref(), &rt, &name, changes).await?;
            println!("updated module {name} (sha256 {})", spec.sha256);
        }
        ModuleOp::Rm(name) => {
            registry::remove(store.as_ref(), &name).await?;
            println!("removed module {name}");
        }
        ModuleOp::Ls => {
            let (specs, nodes) = registry::list(store.as_ref()).await?;
            let views: Vec<serde_json::Value> = specs
                .iter()
                .map(|s| {
                    let v = weft::api::views::ModuleView::of(s, &nodes, Default::default());
                    serde_json::to_value(v).unwrap_or_default()
                })
                .collect();
            match m.server.output {
                Output::Json => print_json(&views)?,
                Output::Table => print_modules(&views),
            }
        }
    }
    Ok(())
}

fn failure_name(f: weft::wasm::FailurePolicy) -> &'static str {
    match f {
        weft::wasm::FailurePolicy::Closed => "closed",
        weft::wasm::FailurePolicy::Open => "open",
    }
}

fn mode_name(dry_run: bool) -> &'static str {
    if dry_run {
        "dry_run"
    } else {
        "enforce"
    }
}

async fn module_via_api(c: &weft::client::Client, op: ModuleOp, output: Output) -> Result<()> {
    use weft::client::{multipart, Field};
    type V = serde_json::Value;
    match op {
        ModuleOp::Add(spec) => {
            let code = spec.code()?;
            let order = spec.order.to_string();
            let field = |name, value| Field {
                name,
                filename: None,
                value,
            };
            let (ct, body) = multipart(&[
                field("name", spec.name.as_bytes()),
                Field {
                    name: "wasm",
                    filename: Some("module.wasm"),
                    value: &code,
                },
                field("config", spec.config.as_bytes()),
                field("order", order.as_bytes()),
                field("mode", mode_name(spec.dry_run).as_bytes()),
                field("failure", failure_name(spec.failure).as_bytes()),
            ]);
            let v: V = c.call("POST", "/modules", Some(&ct), &body).await?;
            println!(
                "added module {} (sha256 {})",
                spec.name,
                v["sha256"].as_str().unwrap_or("?")
            );
        }
        ModuleOp::Set(name, changes) => {
            use base64::Engine as _;
            let mut patch = serde_json::Map::new();
            if let Some(w) = &changes.wasm {
                patch.insert(
                    "wasm_base64".into(),
                    base64::engine::general_purpose::STANDARD.encode(w).into(),
                );
            }
            if let Some(cfg) = changes.config {
                patch.insert("config".into(), cfg.into());
            }
            if let Some(o) = changes.order {
                patch.insert("order".into(), o.into());
            }
            if let Some(f) = changes.failure {
                patch.insert("failure".into(), failure_name(f).into());
            }
            if let Some(d) = changes.dry_run {
                patch.insert("mode".into(), mode_name(d).into());
            }
            let body = serde_json::to_vec(&patch)?;
            let path = format!("/modules/{name}");
            let v: V = c.call("PATCH", &path, Some("application/json"), &body).await?;
            println!("updated module {name} (sha256 {})", v["sha256"].as_str().unwrap_or("?"));
        }
        ModuleOp::Rm(name) => {
            let _: V = c.call("DELETE", &format!("/modules/{name}"), None, b"").await?;
            println!("removed module {name}");
        }
        ModuleOp::Ls => {
            let views: Vec<V> = c.call("GET", "/modules", None, b"").await?;
            match output {
                Output::Json => print_json(&views)?,
                Output::Table => print_modules(&views),
            }
        }
    }
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
    print_modules(&modules);
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
                state_dir: a.state_dir,
                policy_queue: a.policy_queue,
                policy_queues: a.policy_queues.unwrap_or_else(weft::nfq::default_queues),
                ip_masq: a.ip_masq,
                renew_margin: Duration::from_secs(a.subnet_lease_renew_margin * 60),
                lease_ttl: Duration::from_secs(a.lease_ttl),
                net_config: a.net_config,
                admin_listen: a.admin_listen,
                module_limits: a.limits.limits(),
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
        Command::Module(m) => {
            module_command(m).await?;
            Ok(ExitCode::SUCCESS)
        }
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
