//! The Kubernetes subnet manager (`--kube-subnet-mgr`): leases kept on Node objects the way
//! flannel keeps them, so Weft replaces kube-flannel node by node. The API server never
//! allocates for us: a node's subnet is its `spec.podCIDR`, set by kube-controller-manager
//! (`--allocate-node-cidrs`); the agent publishes its backend in the node's annotations and
//! follows every node through an informer. Modules are `WasmModule` custom resources.

pub mod annotations;
pub mod feed;
pub mod informer;
pub mod module;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use tokio::sync::{mpsc, Notify};

use self::annotations::Keys;
use self::feed::LeaseFeed;
use self::informer::Change;
use super::{
    Assignment, Doc, DocKind, DocWatchStream, Lease, LeaseAttrs, LeaseSnapshot, LeaseStore, LeaseWatchStream,
    StoreError,
};

/// flannel's annotation prefix.
pub const DEFAULT_PREFIX: &str = "flannel.alpha.coreos.com";

/// How to reach the API server and what to publish.
#[derive(Debug, Clone)]
pub struct KubeOptions {
    /// API server URL (`--kube-api-url`); overrides the kubeconfig's or in-cluster one.
    pub api_url: Option<String>,
    /// kubeconfig file (`--kubeconfig-file`); else the in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
    /// Annotation prefix (`--kube-annotation-prefix`).
    pub annotation_prefix: String,
    /// This node's name (`NODE_NAME`, from the downward API); the command line needs none.
    pub node_name: Option<String>,
    /// The network config (`--net-config-path`, the mounted `net-conf.json`).
    pub net_config: PathBuf,
    /// Set the node condition `NetworkUnavailable=False` once the lease is published.
    pub set_network_unavailable: bool,
}

/// How long a read waits for the informers' first listing.
const FIRST_LIST_WAIT: Duration = Duration::from_secs(10);
/// Attempts of one write before its error is returned.
const WRITE_ATTEMPTS: u32 = 5;

/// Modules and reports, as the WasmModule informer last saw them.
#[derive(Default)]
struct ModuleCache {
    objects: BTreeMap<String, DynamicObject>,
    listed: bool,
    up: bool,
    last_error: Option<String>,
    module_subs: Vec<mpsc::Sender<Result<i64, StoreError>>>,
    report_subs: Vec<mpsc::Sender<Result<i64, StoreError>>>,
    changes: i64,
}

impl ModuleCache {
    fn on_change(&mut self, change: Change<DynamicObject>) {
        let (spec, report) = match change {
            Change::Listed(all) => {
                self.objects = all.into_iter().map(|o| (module::name(&o).to_string(), o)).collect();
                self.listed = true;
                self.up = true;
                (true, true)
            }
            Change::Applied(o) => {
                let name = module::name(&o).to_string();
                let old = self.objects.insert(name, o.clone());
                let spec = old.as_ref().map(module::generation) != Some(module::generation(&o));
                let report = old.map(|p| p.data["status"].clone()) != Some(o.data["status"].clone());
                (spec, report)
            }
            Change::Deleted(o) => {
                self.objects.remove(module::name(&o));
                (true, true)
            }
            Change::Connected => {
                self.up = true;
                (false, false)
            }
            Change::Disconnected(why) => {
                if self.up || self.last_error.is_none() {
                    tracing::warn!(error = %why, "WasmModule objects unreadable (is the CRD installed?); modules stay as they are");
                }
                self.up = false;
                for s in self.module_subs.drain(..).chain(self.report_subs.drain(..)) {
                    let _ = s.try_send(Err(StoreError::Unavailable(why.clone())));
                }
                self.last_error = Some(why);
                (false, false)
            }
        };
        self.changes += 1;
        if spec {
            signal(&mut self.module_subs, self.changes);
        }
        if report {
            signal(&mut self.report_subs, self.changes);
        }
    }
}

/// Tells every watcher that something changed. A watcher with a signal still queued needs no
/// second one; one that hung up is dropped.
fn signal(subs: &mut Vec<mpsc::Sender<Result<i64, StoreError>>>, n: i64) {
    subs.retain(|s| !matches!(s.try_send(Ok(n)), Err(mpsc::error::TrySendError::Closed(_))));
}

/// Leases on Node objects, modules as WasmModule objects.
pub struct KubeStore {
    nodes: Api<Node>,
    modules: Api<DynamicObject>,
    keys: Keys,
    opts: KubeOptions,
    url: String,
    feed: Arc<Mutex<LeaseFeed>>,
    cache: Arc<Mutex<ModuleCache>>,
    listed: Arc<Notify>,
    // Each informer starts on the first use of what it follows: `weft module ls` never lists
    // every node, and an agent's start is not held up by the modules it has not asked for.
    node_task: OnceLock<tokio::task::JoinHandle<()>>,
    module_task: OnceLock<tokio::task::JoinHandle<()>>,
}

impl Drop for KubeStore {
    fn drop(&mut self) {
        for t in [self.node_task.get(), self.module_task.get()].into_iter().flatten() {
            t.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("Kubernetes API: {e}"))
}

/// A kube error with its causes, as a store error.
fn kube_error(what: &str, e: &kube::Error) -> StoreError {
    unavailable(format!("{what}: {}", informer::chain(e)))
}

/// The client configuration: the kubeconfig file, else the pod's service account, with
/// `--kube-api-url` replacing the server either names.
async fn client_config(opts: &KubeOptions) -> Result<kube::Config, StoreError> {
    let url = opts
        .api_url
        .as_deref()
        .map(|u| {
            u.parse::<http::Uri>()
                .map_err(|e| unavailable(format!("--kube-api-url {u}: {e}")))
        })
        .transpose()?;
    let mut config = match (&opts.kubeconfig, &url) {
        (Some(path), _) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| unavailable(format!("--kubeconfig-file {}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| unavailable(format!("--kubeconfig-file {}: {e}", path.display())))?
        }
        (None, Some(u)) => kube::Config::incluster().unwrap_or_else(|_| kube::Config::new(u.clone())),
        (None, None) => kube::Config::incluster().map_err(|e| {
            unavailable(format!(
                "not running in a pod ({e}); give --kubeconfig-file or --kube-api-url"
            ))
        })?,
    };
    if let Some(u) = url {
        config.cluster_url = u;
    }
    Ok(config)
}

impl KubeStore {
    /// Connects and starts following nodes and modules.
    pub async fn connect(opts: &KubeOptions) -> Result<KubeStore, StoreError> {
        let config = client_config(opts).await?;
        let url = config.cluster_url.to_string();
        let client = kube::Client::try_from(config).map_err(|e| kube_error("cannot build a client", &e))?;
        let nodes: Api<Node> = Api::all(client.clone());
        let modules: Api<DynamicObject> = Api::all_with(client, &module::resource());
        let keys = Keys::new(&opts.annotation_prefix);
        let feed = Arc::new(Mutex::new(LeaseFeed::new(keys.clone())));
        let cache = Arc::new(Mutex::new(ModuleCache::default()));
        let listed = Arc::new(Notify::new());
        Ok(KubeStore {
            nodes,
            modules,
            keys,
            opts: opts.clone(),
            url,
            feed,
            cache,
            listed,
            node_task: OnceLock::new(),
            module_task: OnceLock::new(),
        })
    }

    /// The node informer's state, starting the informer on first use.
    fn feed(&self) -> &Mutex<LeaseFeed> {
        self.node_task.get_or_init(|| {
            let what = format!("nodes at {}", self.url);
            spawn_informer(
                self.nodes.clone(),
                what,
                self.feed.clone(),
                self.listed.clone(),
                |f, c| f.on_change(c),
            )
        });
        &self.feed
    }

    /// The module informer's state, starting the informer on first use.
    fn cache(&self) -> &Mutex<ModuleCache> {
        self.module_task.get_or_init(|| {
            let what = format!("WasmModule objects at {}", self.url);
            spawn_informer(
                self.modules.clone(),
                what,
                self.cache.clone(),
                self.listed.clone(),
                |m, c| m.on_change(c),
            )
        });
        &self.cache
    }

    fn node_name(&self) -> Result<&str, StoreError> {
        self.opts.node_name.as_deref().ok_or_else(|| {
            StoreError::Unavailable(
                "--kube-subnet-mgr needs this node's name: set NODE_NAME (the downward API's spec.nodeName)".into(),
            )
        })
    }

    /// Waits (boundedly) until `done` says the informer's first listing is in, or its first
    /// attempt failed (the caller then reports why rather than wait out the bound).
    async fn first_listing(&self, done: impl Fn() -> bool) {
        let until = tokio::time::Instant::now() + FIRST_LIST_WAIT;
        while !done() && tokio::time::Instant::now() < until {
            let _ = tokio::time::timeout(Duration::from_millis(100), self.listed.notified()).await;
        }
    }

    /// Publishes `attrs` on this node (unless it already carries them) and says the network is
    /// up; `None` when the node's pod CIDR is not `subnet`.
    async fn publish(&self, subnet: Ipv4Net, attrs: &LeaseAttrs) -> Result<Option<Lease>, StoreError> {
        let name = self.node_name()?.to_string();
        let node = self
            .nodes
            .get(&name)
            .await
            .map_err(|e| kube_error(&format!("cannot read node {name}"), &e))?;
        if annotations::pod_cidr(&node) != Some(subnet) {
            return Ok(None);
        }
        let ip = annotations::published_ip(&node, &self.keys, attrs.public_ip);
        let mut node = node;
        if !annotations::already_published(&node, &self.keys, attrs, ip) {
            let patch = annotations::publish_patch(&self.keys, attrs, ip);
            node = self
                .patch_node(&name, &Patch::Strategic(patch), "publishing the node's annotations")
                .await?;
            tracing::info!(node = %name, %subnet, public_ip = %ip, "published the lease in the node's annotations");
        }
        if self.opts.set_network_unavailable {
            let patch = annotations::network_up_patch(&annotations::rfc3339(SystemTime::now()));
            self.patch_node(&name, &Patch::Strategic(patch), "setting NetworkUnavailable=False")
                .await?;
        }
        let mut lease = annotations::lease_of(&node, &self.keys).ok_or_else(|| StoreError::Corrupt {
            key: format!("node {name}"),
            reason: "the published annotations do not read back as a lease".into(),
        })?;
        lease.attrs.public_ip = ip;
        Ok(Some(lease))
    }

    async fn patch_module_status(&self, patches: Vec<(String, serde_json::Value)>) -> Result<(), StoreError> {
        for (module, patch) in patches {
            match self
                .modules
                .patch_status(&module, &PatchParams::default(), &Patch::Merge(patch))
                .await
            {
                Ok(o) => self.wrote(Change::Applied(o)),
                // Deleted meanwhile: nothing to report on.
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(kube_error(&format!("cannot report on wasmmodule {module}"), &e)),
            }
        }
        Ok(())
    }

    async fn put_module(&self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        let obj = module::object_of(name, value).map_err(|reason| StoreError::Corrupt {
            key: format!("wasmmodule {name}"),
            reason,
        })?;
        let written = match self.modules.create(&PostParams::default(), &obj).await {
            Ok(o) => o,
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let mut current = self
                    .modules
                    .get(name)
                    .await
                    .map_err(|e| kube_error(&format!("cannot read wasmmodule {name}"), &e))?;
                current.data["spec"] = obj.data["spec"].clone();
                self.modules
                    .replace(name, &PostParams::default(), &current)
                    .await
                    .map_err(|e| kube_error(&format!("cannot replace wasmmodule {name}"), &e))?
            }
            Err(e) => return Err(kube_error(&format!("cannot create wasmmodule {name}"), &e)),
        };
        self.wrote(Change::Applied(written));
        Ok(())
    }

    /// Reads its own writes: the cache takes what the API server answered at once, so an
    /// add followed by a read (the REST API answers with the module it stored) sees it before
    /// the watch brings the same change.
    fn wrote(&self, change: Change<DynamicObject>) {
        lock(self.cache()).on_change(change);
    }
}

fn spawn_informer<K, S>(
    api: Api<K>,
    what: String,
    state: Arc<Mutex<S>>,
    listed: Arc<Notify>,
    on: fn(&mut S, Change<K>),
) -> tokio::task::JoinHandle<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    S: Send + 'static,
{
    tokio::spawn(informer::run(api, what, move |c| {
        let news = matches!(c, Change::Listed(_) | Change::Disconnected(_));
        on(&mut lock(&state), c);
        if news {
            listed.notify_waiters();
        }
    }))
}

impl KubeStore {
    /// Patches a node through its status subresource, as flannel does (the API server keeps
    /// metadata changes made there), retrying what may pass (the server unreachable, a
    /// conflict, throttling, a 5xx) with backoff; a refusal is returned at once.
    async fn patch_node(&self, name: &str, patch: &Patch<serde_json::Value>, what: &str) -> Result<Node, StoreError> {
        let mut wait = Duration::from_millis(100);
        let mut attempt = 1;
        loop {
            match self.nodes.patch_status(name, &PatchParams::default(), patch).await {
                Ok(v) => return Ok(v),
                Err(kube::Error::Api(e)) if !matches!(e.code, 409 | 429 | 500..) => {
                    return Err(unavailable(format!("{what}: {} ({})", e.message, e.code)))
                }
                Err(e) if attempt >= WRITE_ATTEMPTS => return Err(kube_error(what, &e)),
                Err(e) => tracing::debug!(error = %e, attempt, "{what}: retrying"),
            }
            tokio::time::sleep(wait).await;
            wait *= 2;
            attempt += 1;
        }
    }
}

#[async_trait]
impl LeaseStore for KubeStore {
    fn reports_outlive_modules(&self) -> bool {
        false
    }

    fn describe(&self) -> String {
        format!(
            "kubernetes {} (annotations {}/)",
            self.url,
            self.opts.annotation_prefix.trim_end_matches('/')
        )
    }

    async fn network_config(&self) -> Result<Option<String>, StoreError> {
        // The mounted net-conf.json is the config; every node reads its own copy.
        match tokio::fs::read_to_string(&self.opts.net_config).await {
            Ok(s) => Ok(Some(s)),
            Err(e) => Err(StoreError::Unavailable(format!(
                "--net-config-path {}: {e}",
                self.opts.net_config.display()
            ))),
        }
    }

    async fn init_network_config(&self, _json: &str) -> Result<bool, StoreError> {
        Ok(false)
    }

    async fn assignment(&self) -> Result<Assignment, StoreError> {
        let name = self.node_name()?;
        let node = match self.nodes.get(name).await {
            Ok(n) => n,
            Err(kube::Error::Api(e)) if e.code == 404 => {
                return Ok(Assignment::Pending(format!(
                    "node \"{name}\" does not exist in the Kubernetes API (check NODE_NAME)"
                )))
            }
            Err(e) => return Err(kube_error(&format!("cannot read node {name}"), &e)),
        };
        Ok(match annotations::pod_cidr(&node) {
            Some(net) => Assignment::Assigned(net),
            None => Assignment::Pending(format!(
                "node \"{name}\" pod cidr not assigned: kube-controller-manager must run with \
                 --allocate-node-cidrs=true and --cluster-cidr covering the network (or set spec.podCIDR); waiting"
            )),
        })
    }

    async fn list_leases(&self) -> Result<LeaseSnapshot, StoreError> {
        self.first_listing(|| lock(self.feed()).tried()).await;
        lock(self.feed()).snapshot()
    }

    async fn create_lease(
        &self,
        subnet: Ipv4Net,
        attrs: &LeaseAttrs,
        _ttl: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        self.publish(subnet, attrs).await
    }

    async fn update_lease(
        &self,
        prev: &Lease,
        attrs: &LeaseAttrs,
        _ttl: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        self.publish(prev.subnet, attrs).await
    }

    async fn delete_lease(&self, subnet: Ipv4Net) -> Result<bool, StoreError> {
        let listed = self
            .nodes
            .list(&Default::default())
            .await
            .map_err(|e| kube_error("cannot list nodes", &e))?;
        let Some(node) = listed
            .items
            .iter()
            .find(|n| annotations::lease_of(n, &self.keys).map(|l| l.subnet) == Some(subnet))
        else {
            return Ok(false);
        };
        let name = annotations::name(node).to_string();
        let patch = annotations::withdraw_patch(&self.keys);
        self.patch_node(&name, &Patch::Merge(patch), "withdrawing the node's annotations")
            .await?;
        Ok(true)
    }

    async fn watch_leases(&self, revision: i64) -> Result<LeaseWatchStream, StoreError> {
        lock(self.feed()).subscribe(revision)
    }

    async fn list_docs(&self, kind: DocKind, values: bool) -> Result<Vec<Doc>, StoreError> {
        self.first_listing(|| {
            let c = lock(self.cache());
            c.listed || c.last_error.is_some()
        })
        .await;
        let cache = lock(self.cache());
        if !cache.listed {
            let why = cache.last_error.as_deref().unwrap_or("no answer yet");
            return Err(unavailable(format!("WasmModule objects not listed yet: {why}")));
        }
        let mut docs = match kind {
            DocKind::Module => cache.objects.values().map(module::spec_doc).collect(),
            DocKind::ModuleStatus => module::report_docs(&cache.objects),
        };
        if !values {
            docs.iter_mut().for_each(|d: &mut Doc| d.value.clear());
        }
        Ok(docs)
    }

    async fn put_doc(&self, kind: DocKind, name: &str, value: &[u8]) -> Result<(), StoreError> {
        match kind {
            DocKind::Module => self.put_module(name, value).await,
            DocKind::ModuleStatus => {
                let patches = module::report_patches(&lock(self.cache()).objects, name, value);
                self.patch_module_status(patches).await
            }
        }
    }

    async fn delete_doc(&self, kind: DocKind, name: &str) -> Result<bool, StoreError> {
        match kind {
            DocKind::Module => match self.modules.delete(name, &DeleteParams::default()).await {
                Ok(_) => {
                    self.wrote(Change::Deleted(DynamicObject::new(name, &module::resource())));
                    Ok(true)
                }
                Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
                Err(e) => Err(kube_error(&format!("cannot delete wasmmodule {name}"), &e)),
            },
            DocKind::ModuleStatus => {
                let patches = module::forget_patches(&lock(self.cache()).objects, name);
                let any = !patches.is_empty();
                self.patch_module_status(patches).await?;
                Ok(any)
            }
        }
    }

    async fn watch_docs(&self, kind: DocKind) -> Result<DocWatchStream, StoreError> {
        let mut cache = lock(self.cache());
        if !cache.up {
            let why = cache.last_error.as_deref().unwrap_or("no answer yet");
            return Err(unavailable(format!("WasmModule objects cannot be watched: {why}")));
        }
        let (tx, rx) = mpsc::channel(64);
        match kind {
            DocKind::Module => cache.module_subs.push(tx),
            DocKind::ModuleStatus => cache.report_subs.push(tx),
        }
        Ok(rx)
    }
}
