//! One node's agent: lease a subnet, bring the data path up, follow the other nodes' leases,
//! keep the lease alive, and publish `subnet.env` once ready.
//!
//! Shutdown leaves the lease in the store (a restart adopts it by PublicIP) and the subnet file
//! in place (CNI DEL still needs it); the TUN device is not persistent, so the kernel removes it
//! and its routes when the process exits. A restarted agent therefore starts from a clean data
//! path and the same subnet, with no state to reconcile.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ipnet::Ipv4Net;
use tokio::sync::Notify;

use crate::backend::route::RouteTable;
use crate::backend::{self, Backend, BackendError, NodeEnv};
use crate::config::{ConfigError, NetworkConfig};
use crate::iface::{self, IfaceError};
use crate::lease::keeper::{AcquireError, LeaseKeeper};
use crate::lease::watch::{follow, StoreHealth};
use crate::lease::{Lease, LeaseAttrs, LeaseEvent, StoreError};
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
    /// The NFQUEUE number for Wasm policy on kernel data paths.
    pub policy_queue: u16,
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
    #[error("--ip-masq: {0}")]
    Masq(#[from] crate::masq::MasqError),
    #[error("cannot write the subnet file {path}: {source}")]
    SubnetFile { path: PathBuf, source: std::io::Error },
}

/// State shared between the agent's tasks and its admin endpoint.
pub struct AgentState {
    /// True once the subnet file is written.
    pub ready: AtomicBool,
    /// The data path.
    pub backend: Arc<dyn Backend>,
    /// Lease store health.
    pub store_health: Arc<StoreHealth>,
    /// Leases known in the cluster.
    pub leases_known: AtomicUsize,
    /// Times this node acquired its lease.
    pub acquisitions: AtomicU64,
    /// Successful renewals.
    pub renewals: AtomicU64,
    /// The Wasm decision chain.
    pub modules: Arc<Pipeline>,
    /// The cluster's leases as this node follows them (the API serves reads from here).
    pub leases: arc_swap::ArcSwap<crate::lease::watch::LeaseTable>,
    /// Whether `leases` holds a first full listing yet.
    pub leases_synced: AtomicBool,
    /// The kernel-path policy's counters, on backends whose packets stay in the kernel.
    pub kernel_policy: Option<Arc<crate::nfq::PolicyStats>>,
    own: Mutex<Option<Lease>>,
}

impl AgentState {
    /// This node's current lease.
    pub fn own_lease(&self) -> Option<Lease> {
        self.own.lock().ok().and_then(|g| g.clone())
    }

    fn set_own(&self, l: Lease) {
        if let Ok(mut g) = self.own.lock() {
            *g = Some(l);
        }
    }

    fn own_subnet(&self) -> Option<Ipv4Net> {
        self.own_lease().map(|l| l.subnet)
    }
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

/// Runs the agent until `shutdown` resolves.
pub async fn run(opts: AgentOptions, shutdown: impl std::future::Future<Output = ()>) -> Result<(), AgentError> {
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

    let node = NodeEnv {
        iface: underlay.iface.clone(),
        iface_mtu: underlay.mtu,
        public_ip: underlay.addr,
        state_dir: opts.state_dir.clone(),
    };
    let modules = Pipeline::new(wasm::Runtime::new(opts.module_limits)?, underlay.addr);
    let backend = backend::create(&config, &node, modules.clone())?;
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
    let health = Arc::new(StoreHealth::default());
    health.connected.store(true, Ordering::Relaxed);
    let state = Arc::new(AgentState {
        ready: AtomicBool::new(false),
        backend: backend.clone(),
        store_health: health.clone(),
        leases_known: AtomicUsize::new(0),
        acquisitions: AtomicU64::new(1),
        renewals: AtomicU64::new(0),
        modules: modules.clone(),
        leases: arc_swap::ArcSwap::from_pointee(Default::default()),
        leases_synced: AtomicBool::new(false),
        kernel_policy: backend.kernel_path().then(Default::default),
        own: Mutex::new(Some(lease.clone())),
    });
    modules.set_own(lease.subnet);
    // Modules load before traffic can flow: a node must not forward unfiltered while its
    // firewall is still being read from the store.
    let (modules_tx, mut modules_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(wasm::registry::follow(
        store.clone(),
        modules.clone(),
        underlay.addr,
        opts.module_poll,
        modules_tx,
    ));
    let _ = tokio::time::timeout(Duration::from_secs(30), modules_rx.wait_for(|s| *s)).await;
    ensure_ip_forwarding();
    backend.start(&lease)?;
    if let Some(stats) = &state.kernel_policy {
        if let Err(e) = crate::nfq::start(modules.clone(), config.network, opts.policy_queue, stats.clone()) {
            tracing::error!(error = %e, backend = backend.kind(),
                "Wasm policy on the kernel path is UNAVAILABLE: flows on this backend are not filtered by modules");
        }
    }

    let (token, source) = crate::api::auth::load_or_create(opts.admin_token.as_deref(), &opts.admin_token_file)?;
    match source {
        crate::api::auth::TokenSource::Generated(p) => {
            tracing::info!(file = %p.display(), "generated the admin API token (mode 0600)")
        }
        crate::api::auth::TokenSource::File(p) => tracing::info!(file = %p.display(), "admin API token read"),
        crate::api::auth::TokenSource::Given => tracing::info!("admin API token given"),
    }
    let (events, _) = tokio::sync::broadcast::channel(1024);
    let api = Arc::new(crate::api::ApiState {
        agent: state.clone(),
        store: store.clone(),
        config: config.clone(),
        token,
        protect_reads: opts.admin_auth_reads,
        events: events.clone(),
    });
    // Room for a module at the size limit in base64 (a PATCH), form and JSON overhead included.
    let body_limit = opts.module_limits.max_module_bytes / 3 * 4 + (256 << 10);
    let admin_state = state.clone();
    tokio::spawn(async move {
        if let Err(e) = crate::admin::serve(admin, admin_state, api, body_limit).await {
            tracing::error!(error = %e, "admin endpoint stopped");
        }
    });

    // Follow the cluster's leases. Losing our own lease wakes the keeper task.
    let lost = Arc::new(Notify::new());
    let (synced_tx, mut synced_rx) = tokio::sync::watch::channel(false);
    {
        let state = state.clone();
        let lost = lost.clone();
        let backend = backend.clone();
        let our_ip = underlay.addr;
        let (network, subnet_len) = (config.network, config.subnet_len);
        tokio::spawn(follow(store.clone(), health.clone(), move |table, ev| {
            state
                .modules
                .set_leases(RouteTable::from_leases(network, subnet_len, None, table.leases()));
            let Some(own) = state.own_subnet() else { return };
            match &ev {
                LeaseEvent::Removed(net) if *net == own => {
                    tracing::warn!(subnet = %net, "this node's lease vanished from the store; re-acquiring");
                    lost.notify_one();
                }
                LeaseEvent::Upserted(l) if l.subnet == own && l.attrs.public_ip != our_ip => {
                    tracing::error!(subnet = %l.subnet, other = %l.attrs.public_ip, "another node took this node's subnet; re-acquiring");
                    lost.notify_one();
                }
                LeaseEvent::Upserted(l) if l.subnet != own => {
                    tracing::info!(subnet = %l.subnet, public_ip = %l.attrs.public_ip, "route added");
                }
                LeaseEvent::Removed(net) => tracing::info!(subnet = %net, "route removed"),
                _ => {}
            }
            // Nobody listening is fine: the send only fails when no stream is open.
            let _ = events.send(match &ev {
                LeaseEvent::Upserted(l) => crate::api::ApiEvent::LeaseUpserted {
                    lease: crate::api::views::LeaseView::of(l, l.subnet == own),
                },
                LeaseEvent::Removed(net) => crate::api::ApiEvent::LeaseRemoved {
                    subnet: net.to_string(),
                },
            });
            state.leases_known.store(table.len(), Ordering::Relaxed);
            state.leases.store(Arc::new(table.clone()));
            state.leases_synced.store(true, Ordering::Relaxed);
            backend.sync_routes(own, table);
            let _ = synced_tx.send(true);
        }));
    }
    // Ready means peers are routable: wait for the first listing to reach the data path.
    let _ = tokio::time::timeout(Duration::from_secs(10), synced_rx.wait_for(|s| *s)).await;

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
    tracing::info!(subnet = %lease.subnet, file = %opts.subnet_file.display(), "node ready");

    let keep = tokio::spawn(keep_lease(keeper, state.clone(), lost, opts.subnet_file.clone(), env));
    // A data path that stopped (its device deleted under it, its socket dead) is not repaired in
    // place: the agent exits so its supervisor restarts it, and a restart starts clean.
    let stats = backend.stats();
    let failed = async move {
        loop {
            if let Some(why) = stats.failure() {
                return why.to_string();
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    let outcome = tokio::select! {
        () = shutdown => Ok(()),
        why = failed => Err(AgentError::Dataplane(why)),
    };
    keep.abort();
    if opts.ip_masq {
        if let Err(e) = crate::masq::remove() {
            tracing::warn!(error = %e, "cannot remove the masquerading rules");
        }
    }
    tracing::info!("shutting down: the lease stays for a restart to adopt; the TUN device goes with the process");
    outcome
}

/// Renews the lease before it expires and re-acquires it if it is lost; never gives up.
async fn keep_lease(
    keeper: Arc<LeaseKeeper>,
    state: Arc<AgentState>,
    lost: Arc<Notify>,
    subnet_file: PathBuf,
    mut env: SubnetEnv,
) {
    let retry = Duration::from_secs(10);
    loop {
        let Some(current) = state.own_lease() else { return };
        let wait = keeper
            .renew_at(&current)
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        let reacquire = tokio::select! {
            () = tokio::time::sleep(wait) => match keeper.renew(&current).await {
                Ok(Some(l)) => {
                    tracing::debug!(subnet = %l.subnet, "lease renewed");
                    state.renewals.fetch_add(1, Ordering::Relaxed);
                    state.set_own(l);
                    false
                }
                Ok(None) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "lease renewal failed; retrying");
                    tokio::time::sleep(retry).await;
                    false
                }
            },
            () = lost.notified() => true,
        };
        if !reacquire {
            continue;
        }
        loop {
            match keeper.acquire(Some(current.subnet)).await {
                Ok(l) => {
                    state.acquisitions.fetch_add(1, Ordering::Relaxed);
                    if l.subnet != current.subnet {
                        tracing::error!(old = %current.subnet, new = %l.subnet,
                            "this node's subnet changed: pods keep old addresses until re-created");
                        env.subnet = l.subnet;
                        if env.ip_masq {
                            if let Err(e) = crate::masq::install(env.network, l.subnet) {
                                tracing::error!(error = %e, "cannot update the masquerading rules");
                            }
                        }
                        if let Err(e) = env.write(&subnet_file) {
                            tracing::error!(error = %e, "cannot rewrite the subnet file");
                        }
                    } else {
                        tracing::info!(subnet = %l.subnet, "re-acquired the same subnet");
                    }
                    state.modules.set_own(l.subnet);
                    state.set_own(l);
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "re-acquiring the lease failed; retrying");
                    tokio::time::sleep(retry).await;
                }
            }
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
