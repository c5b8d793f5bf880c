//! One node's agent: lease a subnet, bring the data path up, follow the other nodes' leases,
//! keep the lease alive, and publish `subnet.env` once every lease is routable. This file only
//! wires the parts together; each has its own module.
//!
//! Shutdown leaves the lease in the store (a restart adopts it by PublicIP), the subnet file in
//! place (CNI DEL still needs it), and on the kernel backends the device and its entries, which
//! a restart adopts without rewriting. The `udp` backend's TUN device is not persistent: the
//! kernel removes it and its routes when the process exits.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ipnet::Ipv4Net;
use tokio::sync::{broadcast, Notify};

use crate::api::ApiEvent;
use crate::backend::{self, Backend, BackendError, NodeEnv};
use crate::config::{ConfigError, NetworkConfig};
use crate::follower::{self, Follower, Sink};
use crate::iface::{self, IfaceError};
use crate::lease::keeper::{AcquireError, LeaseKeeper};
use crate::lease::watch::{follow, StoreHealth};
use crate::lease::{Lease, LeaseAttrs, LeaseStore, StoreError};
use crate::packet::route::SharedRoutes;
use crate::state::AgentState;
use crate::store::StoreOptions;
use crate::subnet_file::SubnetEnv;
use crate::wasm::{self, Pipeline, WasmError};

/// Everything `weft agent` is told.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Where leases live.
    pub store: StoreOptions,
    /// Underlay interface (else discovered).
    pub iface: Option<String>,
    /// Address peers reach this node at (else the interface's).
    pub public_ip: Option<Ipv4Addr>,
    /// Where `subnet.env` goes.
    pub subnet_file: PathBuf,
    /// Where state that must survive restarts lives.
    pub state_dir: PathBuf,
    /// Renew this long before expiry.
    pub renew_margin: Duration,
    /// Lease time to live.
    pub lease_ttl: Duration,
    /// Network config to initialise a store that has none.
    pub net_config: Option<PathBuf>,
    /// Admin endpoint address.
    pub admin_listen: SocketAddr,
    /// TLS for the admin endpoint (plain HTTP when None).
    pub admin_tls: Option<crate::tls::ServerFiles>,
    /// Limits every Wasm module runs under.
    pub module_limits: wasm::Limits,
    /// How often the store is polled for module changes.
    pub module_poll: Duration,
    /// The API's bearer token, if given (else read from or generated into `admin_token_file`).
    pub admin_token: Option<String>,
    /// Where the API token is kept.
    pub admin_token_file: PathBuf,
    /// Whether API reads need the token too.
    pub admin_auth_reads: bool,
    /// The first NFQUEUE number for Wasm policy on kernel data paths.
    pub policy_queue: u16,
    /// How many queues (and threads) from it share new flows.
    pub policy_queues: u16,
    /// Masquerade pod traffic leaving the cluster network (flannel's `--ip-masq`).
    pub ip_masq: bool,
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Iface(#[from] IfaceError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Acquire(#[from] AcquireError),
    #[error(transparent)]
    Token(#[from] crate::api::auth::TokenError),
    #[error("Wasm runtime: {0}")]
    Wasm(#[from] WasmError),
    #[error("the data path stopped: {0}")]
    Dataplane(String),
    #[error("the store has no network config at its config key and no --net-config was given")]
    NoNetworkConfig,
    #[error("cannot read --net-config {path}: {source}")]
    NetConfigFile { path: PathBuf, source: std::io::Error },
    #[error("cannot listen on --admin-listen {addr}: {source}")]
    AdminListen { addr: SocketAddr, source: std::io::Error },
    #[error("--admin-tls: {0}")]
    AdminTls(#[from] crate::tls::TlsError),
    #[error("--ip-masq: {0}")]
    Masq(#[from] crate::masq::MasqError),
    #[error("cannot write the subnet file {path}: {source}")]
    SubnetFile { path: PathBuf, source: std::io::Error },
}

async fn load_network_config(
    store: &dyn crate::lease::LeaseStore,
    net_config: Option<&PathBuf>,
) -> Result<NetworkConfig, AgentError> {
    if let Some(path) = net_config {
        let text = std::fs::read_to_string(path).map_err(|source| AgentError::NetConfigFile {
            path: path.clone(),
            source,
        })?;
        // Validate before writing: a bad file must never become the cluster's config.
        NetworkConfig::parse(&text)?;
        if store.init_network_config(&text).await? {
            tracing::info!(path = %path.display(), "initialised the store's network config");
        }
    }
    let raw = store.network_config().await?.ok_or(AgentError::NoNetworkConfig)?;
    let config = NetworkConfig::parse(&raw)?;
    Ok(config)
}

/// What the data path and the decision chain are built from.
struct DataPath {
    backend: Arc<dyn Backend>,
    modules: Arc<Pipeline>,
    node: NodeEnv,
}

fn data_path(opts: &AgentOptions, config: &NetworkConfig, underlay: &iface::Underlay) -> Result<DataPath, AgentError> {
    let node = NodeEnv {
        iface: underlay.iface.clone(),
        iface_mtu: underlay.mtu,
        public_ip: underlay.addr,
        state_dir: opts.state_dir.clone(),
    };
    // One route table for the data path, the modules' lease view and the API.
    let routes = SharedRoutes::new(config.network, config.subnet_len);
    let modules = Pipeline::new(
        wasm::Runtime::new(opts.module_limits.clone())?,
        underlay.addr,
        routes.cell(),
    )?;
    let backend = backend::create(config, &node, modules.clone(), routes)?;
    Ok(DataPath { backend, modules, node })
}

/// Runs the agent until `shutdown` resolves.
pub async fn run(opts: AgentOptions, shutdown: impl std::future::Future<Output = ()>) -> Result<(), AgentError> {
    // Bad certificate files stop the agent here, before it takes a lease.
    let admin_tls = opts.admin_tls.as_ref().map(crate::tls::acceptor).transpose()?;
    let admin = crate::admin::bind(opts.admin_listen)
        .await
        .map_err(|source| AgentError::AdminListen {
            addr: opts.admin_listen,
            source,
        })?;
    let underlay = iface::discover(opts.iface.as_deref(), opts.public_ip)?;
    tracing::info!(iface = %underlay.iface, public_ip = %underlay.addr, mtu = underlay.mtu, "underlay");

    let store = opts.store.open().await?;
    tracing::info!(store = %store.describe(), "lease store open");
    let config = load_network_config(store.as_ref(), opts.net_config.as_ref()).await?;
    tracing::info!(network = %config.network, subnet_len = config.subnet_len, backend = %config.backend.kind, "network config");

    let DataPath { backend, modules, node } = data_path(&opts, &config, &underlay)?;
    let (keeper, lease) = take_lease(&opts, &store, &config, &underlay, &*backend).await?;
    let health = Arc::new(StoreHealth::default());
    health.connected.store(true, Ordering::Relaxed);
    let state = Arc::new(AgentState::new(
        backend.clone(),
        modules.clone(),
        health.clone(),
        lease.clone(),
    ));
    modules.set_own(lease.subnet);
    load_modules_first(&store, &modules, node.public_ip, opts.module_poll).await;
    // The policy's rules go in before the data path forwards anything.
    start_kernel_policy(&opts, &config, &state, &modules, &*backend);
    ensure_ip_forwarding();
    backend.start(&lease)?;
    let events = serve_admin(&opts, admin, admin_tls, &state, &store, &config)?;

    // Follow the cluster's leases. Losing our own lease wakes the keeper task.
    let lost = Arc::new(Notify::new());
    let (own_tx, own_rx) = tokio::sync::watch::channel(lease.subnet);
    follow_leases(
        &store,
        &health,
        &state,
        events,
        node.public_ip,
        lease.subnet,
        own_rx,
        lost.clone(),
    );
    tokio::select! {
        () = wait_routable(&*backend, &state) => {}
        why = dataplane_failure(backend.stats()) => return Err(AgentError::Dataplane(why)),
    }

    let env = declare_ready(&opts, &config, &lease, &*backend, &state)?;

    let keep = Keep {
        keeper,
        state: state.clone(),
        lost,
        own: own_tx,
        subnet_file: opts.subnet_file.clone(),
        retry: (opts.lease_ttl / 8).clamp(Duration::from_millis(250), Duration::from_secs(10)),
    };
    let keep = tokio::spawn(keep.run(env));
    let outcome = tokio::select! {
        () = shutdown => Ok(()),
        why = dataplane_failure(backend.stats()) => Err(AgentError::Dataplane(why)),
    };
    keep.abort();
    if opts.ip_masq {
        if let Err(e) = crate::masq::remove() {
            tracing::warn!(error = %e, "cannot remove the masquerading rules");
        }
    }
    tracing::info!("shutting down: the lease and the kernel's entries stay for a restart to adopt");
    outcome
}

/// This node's lease: the one it held (by PublicIP, or the subnet file's), a free one, or on
/// Kubernetes the one assigned to it; and the keeper that renews it.
async fn take_lease(
    opts: &AgentOptions,
    store: &Arc<dyn LeaseStore>,
    config: &NetworkConfig,
    underlay: &iface::Underlay,
    backend: &dyn Backend,
) -> Result<(Arc<LeaseKeeper>, Lease), AgentError> {
    let attrs = LeaseAttrs::new(underlay.addr, backend.kind(), backend.backend_data());
    let keeper = Arc::new(LeaseKeeper::new(
        store.clone(),
        config.clone(),
        attrs,
        opts.lease_ttl,
        opts.renew_margin,
    ));
    let previous = SubnetEnv::read(&opts.subnet_file).map(|e| e.subnet);
    let lease = keeper.acquire(previous).await?;
    Ok((keeper, lease))
}

/// Wasm policy on a kernel data path (NFQUEUE), when the backend has one. Failing to start it
/// is loud but not fatal: the network itself still works, and the node reports its modules as
/// pending, with the reason, instead of loaded.
fn start_kernel_policy(
    opts: &AgentOptions,
    config: &NetworkConfig,
    state: &AgentState,
    modules: &Arc<Pipeline>,
    backend: &dyn Backend,
) {
    let Some(stats) = &state.kernel_policy else { return };
    if let Err(e) = crate::nfq::start(
        modules.clone(),
        config.network,
        opts.policy_queue,
        opts.policy_queues,
        stats.clone(),
    ) {
        tracing::error!(error = %e, backend = backend.kind(),
            "Wasm policy on the kernel path is UNAVAILABLE: flows on this backend are not filtered by modules");
        modules.enforcer().failed(e.to_string());
    }
}

/// Once every lease is routable: masquerading if asked, then `subnet.env` (what CNI waits
/// for), then `/readyz`.
fn declare_ready(
    opts: &AgentOptions,
    config: &NetworkConfig,
    lease: &Lease,
    backend: &dyn Backend,
    state: &AgentState,
) -> Result<SubnetEnv, AgentError> {
    if opts.ip_masq {
        crate::masq::install(config.network, lease.subnet)?;
        tracing::info!(table = crate::masq::TABLE, network = %config.network, "masquerading pod traffic that leaves the cluster network");
    }
    let env = SubnetEnv {
        network: config.network,
        subnet: lease.subnet,
        mtu: backend.mtu(),
        ip_masq: opts.ip_masq,
    };
    env.write(&opts.subnet_file).map_err(|source| AgentError::SubnetFile {
        path: opts.subnet_file.clone(),
        source,
    })?;
    state.ready.store(true, Ordering::Relaxed);
    tracing::info!(subnet = %lease.subnet, leases = state.leases_known(), file = %opts.subnet_file.display(), "node ready: every lease is in the data path");
    Ok(env)
}

/// Modules load before traffic can flow: a node must not forward unfiltered while its firewall
/// is still being read from the store.
async fn load_modules_first(store: &Arc<dyn LeaseStore>, modules: &Arc<Pipeline>, node: Ipv4Addr, poll: Duration) {
    let (tx, mut rx) = tokio::sync::watch::channel(false);
    tokio::spawn(wasm::registry::follow(store.clone(), modules.clone(), node, poll, tx));
    if tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|s| *s))
        .await
        .is_err()
    {
        tracing::warn!("the stored modules did not load within 30 s; starting without them");
    }
}

/// Starts the admin endpoint; returns the API's event channel.
fn serve_admin(
    opts: &AgentOptions,
    admin: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    state: &Arc<AgentState>,
    store: &Arc<dyn LeaseStore>,
    config: &NetworkConfig,
) -> Result<broadcast::Sender<ApiEvent>, AgentError> {
    let (token, source) = crate::api::auth::load_or_create(opts.admin_token.as_deref(), &opts.admin_token_file)?;
    match source {
        crate::api::auth::TokenSource::Generated(p) => {
            tracing::info!(file = %p.display(), "generated the admin API token (mode 0600)")
        }
        crate::api::auth::TokenSource::File(p) => tracing::info!(file = %p.display(), "admin API token read"),
        crate::api::auth::TokenSource::Given => tracing::info!("admin API token given"),
    }
    let (events, _) = broadcast::channel(1024);
    let api = Arc::new(crate::api::ApiState::new(
        state.clone(),
        store.clone(),
        config.clone(),
        token,
        opts.admin_auth_reads,
        events.clone(),
    ));
    // Room for a module at the size limit in base64 (a PATCH), form and JSON overhead included.
    let body_limit = opts.module_limits.max_module_bytes / 3 * 4 + (256 << 10);
    let admin_state = state.clone();
    tokio::spawn(async move {
        if let Err(e) = crate::admin::serve(admin, tls, admin_state, api, body_limit).await {
            tracing::error!(error = %e, "admin endpoint stopped");
        }
    });
    Ok(events)
}

/// Follows the store's leases into the data path, the API's table and its event stream.
#[allow(clippy::too_many_arguments)]
fn follow_leases(
    store: &Arc<dyn LeaseStore>,
    health: &Arc<StoreHealth>,
    state: &Arc<AgentState>,
    events: broadcast::Sender<ApiEvent>,
    node_ip: Ipv4Addr,
    own: Ipv4Net,
    own_rx: tokio::sync::watch::Receiver<Ipv4Net>,
    lost: Arc<Notify>,
) {
    let (feed_tx, feed_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(follow(store.clone(), health.clone(), move |f| {
        // The follower ends only with the agent.
        let _ = feed_tx.send(f);
    }));
    let backend = state.backend.clone();
    let st = state.clone();
    let sinks: Vec<Sink> = vec![
        Box::new(move |u| backend.apply(u)),
        Box::new(move |u| st.publish(u)),
        Box::new(move |u| crate::api::events::publish(&events, u)),
    ];
    tokio::spawn(follower::run(Follower::new(own, node_ip), feed_rx, own_rx, sinks, lost));
}

/// Ready means routable: waits until the data path holds every lease of the first listing.
async fn wait_routable(backend: &dyn Backend, state: &AgentState) {
    let mut applied = backend.applied();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), applied.wait_for(|g| *g >= 1)).await {
            Ok(_) => return,
            Err(_) => tracing::info!(
                leases = state.leases_known(),
                connected = state.store_health.connected.load(Ordering::Relaxed),
                "waiting for the first lease listing to reach the data path before reporting ready"
            ),
        }
    }
}

/// A data path that stopped (its device deleted under it, its socket dead) is not repaired in
/// place: the agent exits so its supervisor restarts it, and a restart starts clean.
async fn dataplane_failure(stats: Arc<crate::stats::DataplaneStats>) -> String {
    loop {
        if let Some(why) = stats.failure() {
            return why.to_string();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Renews the lease before it expires and re-acquires it if it is lost; never gives up.
struct Keep {
    keeper: Arc<LeaseKeeper>,
    state: Arc<AgentState>,
    lost: Arc<Notify>,
    own: tokio::sync::watch::Sender<Ipv4Net>,
    subnet_file: PathBuf,
    /// How soon a failed renewal is retried: well within the TTL, so a short-TTL lease cannot
    /// lapse while its store fails over.
    retry: Duration,
}

impl Keep {
    async fn run(self, mut env: SubnetEnv) {
        loop {
            let Some(current) = self.state.own_lease() else { return };
            let wait = self
                .keeper
                .renew_at(&current)
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            let reacquire = tokio::select! {
                () = tokio::time::sleep(wait) => self.renew(&current).await,
                () = self.lost.notified() => true,
            };
            if reacquire {
                self.reacquire(&current, &mut env).await;
            }
        }
    }

    /// One renewal; true if the lease turned out lost.
    async fn renew(&self, current: &Lease) -> bool {
        match self.keeper.renew(current).await {
            Ok(Some(l)) => {
                tracing::debug!(subnet = %l.subnet, "lease renewed");
                self.state.renewals.fetch_add(1, Ordering::Relaxed);
                self.state.set_own(l);
                false
            }
            Ok(None) => true,
            Err(e) => {
                tracing::warn!(error = %e, retry_ms = self.retry.as_millis() as u64, "lease renewal failed; retrying");
                tokio::time::sleep(self.retry).await;
                false
            }
        }
    }

    async fn reacquire(&self, current: &Lease, env: &mut SubnetEnv) {
        loop {
            match self.keeper.acquire(Some(current.subnet)).await {
                Ok(l) => {
                    self.state.acquisitions.fetch_add(1, Ordering::Relaxed);
                    if l.subnet != current.subnet {
                        self.moved(current.subnet, l.subnet, env);
                    } else {
                        tracing::info!(subnet = %l.subnet, "re-acquired the same subnet");
                    }
                    self.state.modules.set_own(l.subnet);
                    self.own.send_replace(l.subnet);
                    self.state.set_own(l);
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "re-acquiring the lease failed; retrying");
                    tokio::time::sleep(self.retry).await;
                }
            }
        }
    }

    fn moved(&self, old: Ipv4Net, new: Ipv4Net, env: &mut SubnetEnv) {
        tracing::error!(%old, %new, "this node's subnet changed: pods keep old addresses until re-created");
        env.subnet = new;
        if env.ip_masq {
            if let Err(e) = crate::masq::install(env.network, new) {
                tracing::error!(error = %e, "cannot update the masquerading rules");
            }
        }
        if let Err(e) = env.write(&self.subnet_file) {
            tracing::error!(error = %e, "cannot rewrite the subnet file");
        }
    }
}

/// Forwarding between the overlay device and the pod bridge needs IPv4 forwarding on; it is
/// per network namespace and off by default, so the agent turns it on for its node.
fn ensure_ip_forwarding() {
    let path = "/proc/sys/net/ipv4/ip_forward";
    match std::fs::read_to_string(path) {
        Ok(v) if v.trim() == "1" => {}
        _ => match std::fs::write(path, "1\n") {
            Ok(()) => tracing::info!("enabled IPv4 forwarding"),
            Err(e) => {
                tracing::warn!(error = %e, "IPv4 forwarding is off and could not be enabled; pods will not be reachable")
            }
        },
    }
}
