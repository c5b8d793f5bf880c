//! The decision chain: the ordered modules every node runs, and each data-path worker's own
//! instances of them and verdict cache. A worker asks once per new flow and direction; the
//! answer is cached for as long as the modules allow, or until the chain changes.
//!
//! A verdict every module consulted gave for more than the flow (any source port, or any
//! source, of the service: the ABI's scope) is also kept under the service's key, so the
//! service's next new flows are answered without a call; [`WorkerChain::decide_flow`] says so,
//! and the kernel paths hand such verdicts to the kernel. Those wide verdicts also lapse when
//! a subnet changes hands in the lease table, since a module may have read the lease facts of
//! the record.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;
use ipnet::Ipv4Net;
use weft_guest::abi::{self, Word, CACHE_FLOW, RECORD_SIZE};

use crate::packet::route::RouteTable;

use super::cache::{FlowCache, Lookup, Ttl, Verdict};
use super::flow::{self, Direction, FlowMeta, Local, Scope};
use super::instance::{CallError, Entry, HostCtx, Instance, Leases};
use super::runtime::{Compiled, Runtime};
use super::spec::{FailurePolicy, ModuleSpec, ModuleStatus};
use super::stats::{ModuleStats, Tally, TraceReason, TraceRecord, VerdictKind};
use super::WasmError;

/// Flows a worker's cache holds at most.
pub const CACHE_CAPACITY: usize = 65_536;
/// Services (by wide key) a worker's cache of wide verdicts holds at most.
pub const WIDE_CAPACITY: usize = 16_384;
/// How long a flow decided while its module had no instance ready keeps that verdict.
const NOT_READY_TTL_MS: Ttl = 50;

/// One module call in this many is timed (the clock costs a third of a cheap call).
const TIMED_EVERY: u64 = 16;
/// Decisions a worker adds to the trace per millisecond, at most.
const TRACES_PER_MS: u32 = 4;

/// How long a verdict made by a failure policy stands: long enough that a module failing on
/// one flow costs a call per second, not per packet; short enough to notice a recovery.
const FAILURE_TTL_MS: Ttl = 1_000;

/// A module as the chain holds it: settings, code (or why it did not load) and counters.
pub struct LoadedModule {
    /// Module name.
    pub name: Arc<str>,
    /// sha256 of the code, hex.
    pub sha256: String,
    /// Config bytes.
    pub config: Vec<u8>,
    /// What a failure means.
    pub failure: FailurePolicy,
    /// Decide and count only.
    pub dry_run: bool,
    /// The configured place in the chain (lower runs first).
    pub order: i32,
    /// The signature stored with it.
    pub signature: Option<super::signature::Signature>,
    /// The spec's revision, reported with the module's state.
    pub revision: String,
    /// The trusted key its signature verified with (none when this node trusts no keys).
    pub signed_by: Option<String>,
    /// The compiled code, or why there is none.
    pub compiled: Result<Arc<Compiled>, WasmError>,
    /// Counters.
    pub stats: Arc<ModuleStats>,
    /// Instances prepared for the workers to take.
    pub spares: super::spares::Spares,
}

impl LoadedModule {
    fn has(&self, e: Entry) -> bool {
        match (&self.compiled, e) {
            (Ok(c), Entry::Policy) => c.has_policy,
            (Ok(c), Entry::Route) => c.has_route,
            // A module that failed to load still stands in the chain for its failure policy.
            (Err(_), Entry::Policy) => true,
            (Err(_), Entry::Route) => false,
        }
    }

    fn same_as(&self, s: &ModuleSpec) -> bool {
        *self.name == *s.name
            && self.sha256 == s.sha256
            && self.config == s.config.as_bytes()
            && self.failure == s.failure
            && self.dry_run == s.dry_run
            && self.order == s.order
            && self.signature == s.signature
    }
}

/// One generation of the chain.
pub struct Chain {
    /// Bumped on every change; stamps cache entries.
    pub generation: u64,
    /// Modules in order.
    pub modules: Vec<Arc<LoadedModule>>,
    /// This node's subnet: egress decisions are for packets from it, ingress for packets to it.
    pub own: Option<Ipv4Net>,
    /// This node's PublicIP.
    pub local: Ipv4Addr,
}

impl Chain {
    /// True when some enforcing module steers flows, so peers may relay each other's traffic.
    pub fn routes(&self) -> bool {
        self.modules.iter().any(|m| !m.dry_run && m.has(Entry::Route))
    }
}

/// What [`Pipeline::on_change`] calls.
type Listener = Box<dyn Fn(u64) + Send + Sync>;

/// The node's chain and what every worker shares: the runtime, the lease view and counters.
pub struct Pipeline {
    runtime: Arc<Runtime>,
    preparer: super::spares::Preparer,
    chain: ArcSwap<Chain>,
    generation: AtomicU64,
    leases: Arc<Leases>,
    stats: Mutex<HashMap<String, Arc<ModuleStats>>>,
    /// Called with the new generation after every change of the chain.
    listeners: Mutex<Vec<Listener>>,
    /// How far the chain is in force where the workers do not apply it (the kernel path).
    enforcer: super::enforcement::Enforcer,
    /// Packets answered from a verdict cache.
    pub cache_hits: AtomicU64,
    /// Packets that needed a decision.
    pub cache_misses: AtomicU64,
    /// Of the cache hits, new flows answered by a verdict a module gave for their whole
    /// service (any source port or any source).
    pub wide_hits: AtomicU64,
    /// Routing verdicts naming a node that holds no lease (ignored).
    pub bad_via: AtomicU64,
}

impl Pipeline {
    /// An empty chain for the node at `local`, whose modules see the leases in `leases` (the
    /// node's route table, this node's subnet included).
    pub fn new(runtime: Arc<Runtime>, local: Ipv4Addr, leases: Arc<Leases>) -> Result<Arc<Pipeline>, WasmError> {
        let preparer = super::spares::Preparer::start(runtime.clone(), leases.clone())
            .map_err(|e| WasmError::Engine(format!("cannot start the instance preparer: {e}")))?;
        Ok(Arc::new(Pipeline {
            runtime,
            preparer,
            chain: ArcSwap::from_pointee(Chain {
                generation: 1,
                modules: Vec::new(),
                own: None,
                local,
            }),
            generation: AtomicU64::new(1),
            leases,
            stats: Mutex::new(HashMap::new()),
            listeners: Mutex::new(Vec::new()),
            enforcer: Default::default(),
            cache_hits: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
            wide_hits: AtomicU64::new(0),
            bad_via: AtomicU64::new(0),
        }))
    }

    /// The runtime.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// The current chain.
    pub fn chain(&self) -> Arc<Chain> {
        self.chain.load_full()
    }

    fn publish(&self, f: impl FnOnce(&Chain) -> Chain) {
        // One writer at a time (the registry task and lease updates), so read-modify-write is safe
        // under the stats lock, which every writer takes.
        let _writer = self.stats.lock();
        let next = f(&self.chain.load());
        let g = next.generation;
        self.chain.store(Arc::new(next));
        self.generation.store(g, Ordering::Release);
        if let Ok(listeners) = self.listeners.lock() {
            for l in listeners.iter() {
                l(g);
            }
        }
    }

    /// Calls `f` with the new generation after every change of the chain, at once: for what
    /// keeps verdicts outside the workers (the kernel's) and must forget them with the chain.
    pub fn on_change(&self, f: impl Fn(u64) + Send + Sync + 'static) {
        if let Ok(mut l) = self.listeners.lock() {
            l.push(Box::new(f));
        }
    }

    /// How far the chain is in force on the kernel path, which reports it here.
    pub fn enforcer(&self) -> &super::enforcement::Enforcer {
        &self.enforcer
    }

    /// The current chain's generation.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The lease table's generation, as the modules see it.
    pub fn lease_generation(&self) -> u64 {
        self.leases.load().generation()
    }

    /// Sets this node's subnet (after acquiring or re-acquiring the lease).
    pub fn set_own(&self, own: Ipv4Net) {
        self.publish(|c| Chain {
            generation: c.generation + 1,
            modules: c.modules.clone(),
            own: Some(own),
            local: c.local,
        });
    }

    /// Counters of every module loaded or once loaded, by name.
    pub fn module_stats(&self) -> Vec<(String, Arc<ModuleStats>)> {
        let mut v: Vec<_> = self
            .stats
            .lock()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Loads `specs` as the new chain: unchanged modules are kept as they are (with their
    /// instances' state), changed ones compiled and probed first; the swap itself is one
    /// pointer store, so the data path never waits and never runs a half-built chain.
    pub fn load(&self, mut specs: Vec<ModuleSpec>) -> Vec<ModuleStatus> {
        specs.sort_by(|a, b| a.order.cmp(&b.order).then_with(|| a.name.cmp(&b.name)));
        let old = self.chain.load_full();
        let mut modules = Vec::with_capacity(specs.len());
        for s in &specs {
            if let Some(m) = old.modules.iter().find(|m| m.same_as(s)) {
                modules.push(m.clone());
                continue;
            }
            modules.push(Arc::new(self.load_one(s)));
        }
        let statuses: Vec<ModuleStatus> = modules
            .iter()
            .map(|m| ModuleStatus {
                name: m.name.to_string(),
                sha256: m.sha256.clone(),
                revision: Some(m.revision.clone()),
                state: if m.compiled.is_ok() {
                    super::spec::LOADED
                } else {
                    super::spec::FAILED
                }
                .into(),
                error: m.compiled.as_ref().err().map(|e| e.to_string()),
            })
            .collect();
        // The same modules read again (the registry's heartbeat re-reads them every 30 s):
        // the chain did not change, and verdicts made under it stand.
        let same =
            modules.len() == old.modules.len() && modules.iter().zip(&old.modules).all(|(a, b)| Arc::ptr_eq(a, b));
        if same {
            return statuses;
        }
        let keep: Vec<[u8; 32]> = modules
            .iter()
            .filter_map(|m| m.compiled.as_ref().ok().map(|c| c.sha256))
            .collect();
        let names: Vec<Arc<str>> = modules.iter().map(|m| m.name.clone()).collect();
        self.publish(|c| Chain {
            generation: c.generation + 1,
            modules,
            own: c.own,
            local: c.local,
        });
        self.runtime.retain(&keep);
        if let Ok(mut m) = self.stats.lock() {
            m.retain(|k, _| names.iter().any(|n| **n == **k));
        }
        statuses
    }

    /// Verifies, compiles and configures one module, and prepares every worker's instance of
    /// it; a module that fails any step stands in the chain for its failure policy.
    fn load_one(&self, s: &ModuleSpec) -> LoadedModule {
        let stats = self
            .stats
            .lock()
            .map(|mut m| m.entry(s.name.clone()).or_default().clone())
            .unwrap_or_default();
        let mut first = None;
        let mut signed_by = None;
        let compiled = s.code().and_then(|wasm| {
            signed_by = self.runtime.verify(&wasm, s.config.as_bytes(), s.signature.as_ref())?;
            let c = self.runtime.compile(&wasm)?;
            // Configure one instance now, so a config the module rejects is reported here
            // instead of failing on the data path; it becomes the first spare.
            let ctx = HostCtx::new(
                &self.runtime,
                s.name.as_str().into(),
                stats.clone(),
                self.leases.clone(),
            );
            first = Some(Instance::new(&self.runtime, &c, ctx, s.config.as_bytes())?);
            Ok(c)
        });
        match &compiled {
            Ok(_) => {
                tracing::info!(module = %s.name, sha256 = %s.sha256, order = s.order, failure = ?s.failure, dry_run = s.dry_run, signed_by = ?signed_by, "module loaded")
            }
            Err(e) => {
                tracing::error!(module = %s.name, sha256 = %s.sha256, error = %e, failure = ?s.failure, "module failed to load; its failure policy stands in for it")
            }
        }
        let lm = LoadedModule {
            name: s.name.as_str().into(),
            sha256: s.sha256.clone(),
            config: s.config.clone().into_bytes(),
            failure: s.failure,
            dry_run: s.dry_run,
            order: s.order,
            signature: s.signature.clone(),
            revision: s.revision(),
            signed_by,
            compiled,
            stats,
            spares: Default::default(),
        };
        if let Some(i) = first {
            lm.spares.put(i);
        }
        // Every worker finds its instance ready when the chain is swapped in.
        self.preparer.fill_now(&self.runtime, &self.leases, &lm);
        lm
    }
}

/// A worker's view of the chain: its own instances, cache and record buffer.
pub struct WorkerChain {
    chain: Arc<Chain>,
    asker: Asker,
    cache: FlowCache,
    /// Verdicts given for whole services, by [`flow::wide_key`], stamped with `wide_gen`.
    wide: FlowCache,
    /// Bumped when the chain or the lease table changes: wide verdicts of older ones lapse.
    wide_gen: u64,
    /// The lease table generation `wide_gen` stands for.
    wide_leases: u64,
    trail: Vec<Trail>,
    traced_ms: u64,
    traced_in_ms: u32,
    hits: u64,
    misses: u64,
    wide_hits: u64,
}

/// A verdict and, when it holds for more than the flow, for which flows and how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decided {
    /// What to do with the packet.
    pub verdict: Verdict,
    /// The scope (wider than the flow) and how long from now the verdict holds for it.
    pub wide: Option<(Scope, Ttl)>,
}

impl Decided {
    fn flow(verdict: Verdict) -> Decided {
        Decided { verdict, wide: None }
    }
}

/// What asking the modules takes besides the chain asked: kept apart from [`WorkerChain`] so a
/// decision borrows the chain and this at once, with no reference count taken per new flow.
struct Asker {
    pipeline: Arc<Pipeline>,
    /// The lease table as of this worker's last look: checking for a new one is a plain load,
    /// where taking a guard per call would be a locked instruction.
    leases: arc_swap::Cache<Arc<Leases>, Arc<RouteTable>>,
    instances: Vec<Option<Instance>>,
    /// Counts per module of the current chain, published once per batch.
    tallies: Vec<Tally>,
    record: [u8; RECORD_SIZE],
    calls: u64,
}

fn cache_ms(c: u16) -> Ttl {
    match c {
        abi::CACHE_NONE => 0,
        CACHE_FLOW => Ttl::MAX,
        s => u64::from(s) * 1000,
    }
}

impl Drop for WorkerChain {
    fn drop(&mut self) {
        self.flush_stats();
        self.asker.pipeline.preparer.worker(false);
    }
}

impl WorkerChain {
    /// A worker's chain over `pipeline`.
    pub fn new(pipeline: Arc<Pipeline>) -> Self {
        pipeline.preparer.worker(true);
        let chain = pipeline.chain();
        let n = chain.modules.len();
        let mut leases = arc_swap::Cache::new(pipeline.leases.clone());
        let wide_leases = leases.load().generation();
        WorkerChain {
            chain,
            asker: Asker {
                pipeline,
                leases,
                instances: (0..n).map(|_| None).collect(),
                tallies: vec![Tally::default(); n],
                record: [0; RECORD_SIZE],
                calls: 0,
            },
            cache: FlowCache::new(CACHE_CAPACITY),
            wide: FlowCache::new(WIDE_CAPACITY),
            wide_gen: 1,
            wide_leases,
            trail: Vec::with_capacity(8),
            traced_ms: 0,
            traced_in_ms: 0,
            hits: 0,
            misses: 0,
            wide_hits: 0,
        }
    }

    /// Picks up a new chain if there is one; called once per batch of packets. Instances of
    /// modules that did not change are kept, so their state survives an unrelated swap.
    #[inline]
    pub fn refresh(&mut self) {
        let leases = self.asker.leases.load().generation();
        if leases != self.wide_leases {
            self.wide_leases = leases;
            self.wide_gen += 1;
        }
        if self.asker.pipeline.generation.load(Ordering::Acquire) == self.chain.generation {
            return;
        }
        self.wide_gen += 1;
        // The tallies count by place in the old chain.
        self.flush_stats();
        let next = self.asker.pipeline.chain();
        let mut old: Vec<(Arc<LoadedModule>, Option<Instance>)> = self
            .chain
            .modules
            .iter()
            .cloned()
            .zip(std::mem::take(&mut self.asker.instances))
            .collect();
        self.asker.instances = next
            .modules
            .iter()
            .map(|m| {
                old.iter_mut()
                    .find(|(o, _)| Arc::ptr_eq(o, m))
                    .and_then(|(_, i)| i.take())
            })
            .collect();
        self.asker.tallies = vec![Tally::default(); next.modules.len()];
        self.chain = next;
    }

    /// True when peers may relay each other's flows (a routing module is active).
    pub fn relaying(&self) -> bool {
        self.chain.routes()
    }

    /// Milliseconds on the process-wide clock every worker and the quarantine share.
    #[inline]
    pub fn now_ms(&self) -> u64 {
        clock_ms()
    }

    /// The verdict for one packet crossing in `dir`.
    #[inline]
    pub fn decide(&mut self, dir: Direction, pkt: &[u8], now_ms: u64) -> Verdict {
        if self.chain.modules.is_empty() {
            return Verdict::PASS;
        }
        match crate::packet::parse_ipv4(pkt) {
            Ok(m) => self.decide_parsed(dir, &m, pkt, now_ms),
            Err(_) => Verdict::PASS,
        }
    }

    /// The verdict for one packet the data path has parsed already (`m` is `pkt` parsed): the
    /// route lookup, the source check and the flow key share that one parse.
    #[inline]
    pub fn decide_parsed(&mut self, dir: Direction, m: &FlowMeta, pkt: &[u8], now_ms: u64) -> Verdict {
        self.decide_flow(dir, m, pkt, now_ms).verdict
    }

    /// The chain generation and lease table generation this worker decides under: what a
    /// wide verdict handed elsewhere must be forgotten with.
    pub fn epoch(&self) -> (u64, u64) {
        (self.chain.generation, self.wide_leases)
    }

    /// As [`decide_parsed`](Self::decide_parsed), and whether the verdict holds for the flow's
    /// whole service (asked now, or answered from a verdict that did).
    #[inline]
    pub fn decide_flow(&mut self, dir: Direction, m: &FlowMeta, pkt: &[u8], now_ms: u64) -> Decided {
        if self.chain.modules.is_empty() {
            return Decided::flow(Verdict::PASS);
        }
        let Some(own) = self.chain.own else {
            return Decided::flow(Verdict::PASS);
        };
        // Only the pods' own traffic is decided here; a flow relayed through this node was
        // decided where it started and is decided again where it ends.
        let ours = match dir {
            Direction::Egress => own.contains(&m.src),
            Direction::Ingress => own.contains(&m.dst),
        };
        if !ours {
            return Decided::flow(Verdict::PASS);
        }
        let key = flow::key(m, dir);
        let generation = self.chain.generation;
        match self.cache.lookup(key, generation, now_ms) {
            Lookup::Hit(v) => {
                self.hits += 1;
                Decided::flow(v)
            }
            Lookup::Miss { established } => {
                // A flow in flight under an older chain is asked about itself: a module may
                // let such flows drain where it would refuse new ones.
                let widened = !established && wide_protocol(m);
                if widened {
                    if let Some(d) = self.wide_lookup(m, dir, key, now_ms) {
                        return d;
                    }
                }
                self.misses += 1;
                let (v, life) = self.evaluate(m, dir, established, pkt, now_ms);
                self.cache.insert(key, generation, v, life.ttl, now_ms);
                if !widened || life.scope == Scope::Flow || life.ttl == 0 {
                    return Decided::flow(v);
                }
                let wide = flow::wide_key(m, dir, life.scope);
                self.wide.insert(wide, self.wide_gen, v, life.ttl, now_ms);
                Decided {
                    verdict: v,
                    wide: Some((life.scope, life.ttl)),
                }
            }
        }
    }

    /// The verdict a module gave for the whole service of a new flow, if one stands: kept for
    /// the flow too, as long as it stands.
    fn wide_lookup(&mut self, m: &FlowMeta, dir: Direction, key: flow::FlowKey, now_ms: u64) -> Option<Decided> {
        if self.wide.is_empty() {
            return None;
        }
        for scope in [Scope::AnySourcePort, Scope::AnySource] {
            let Some((v, ttl)) = self
                .wide
                .lookup_ttl(flow::wide_key(m, dir, scope), self.wide_gen, now_ms)
            else {
                continue;
            };
            self.cache.insert(key, self.chain.generation, v, ttl, now_ms);
            self.hits += 1;
            self.wide_hits += 1;
            return Some(Decided {
                verdict: v,
                wide: Some((scope, ttl)),
            });
        }
        None
    }

    /// Decides `pkt` afresh, past the cache and whichever subnet is this node's, and says what
    /// each module said: the offline test bench's question.
    pub fn explain(&mut self, dir: Direction, pkt: &[u8], now_ms: u64) -> (Verdict, Life, Vec<Trail>) {
        self.refresh();
        let Ok(m) = crate::packet::parse_ipv4(pkt) else {
            return (Verdict::PASS, Life::OPEN, Vec::new());
        };
        let mut trail = Vec::new();
        let (v, mut life) = self
            .asker
            .decide_all(&self.chain, &m, dir, false, pkt, now_ms, &mut trail);
        self.flush_stats();
        if !wide_protocol(&m) {
            // What the data path would keep: per flow.
            life.scope = Scope::Flow;
        }
        (v, life, trail)
    }

    /// Publishes this worker's counts; called once per batch.
    pub fn flush_stats(&mut self) {
        let pipeline = &self.asker.pipeline;
        if self.hits > 0 {
            pipeline.cache_hits.fetch_add(self.hits, Ordering::Relaxed);
            for m in &self.chain.modules {
                m.stats.cache_hits.fetch_add(self.hits, Ordering::Relaxed);
            }
            self.hits = 0;
        }
        if self.misses > 0 {
            pipeline.cache_misses.fetch_add(self.misses, Ordering::Relaxed);
            self.misses = 0;
        }
        if self.wide_hits > 0 {
            pipeline.wide_hits.fetch_add(self.wide_hits, Ordering::Relaxed);
            self.wide_hits = 0;
        }
        for (m, t) in self.chain.modules.iter().zip(&mut self.asker.tallies) {
            m.stats.publish(t);
        }
    }

    fn evaluate(
        &mut self,
        m: &FlowMeta,
        dir: Direction,
        established: bool,
        pkt: &[u8],
        now_ms: u64,
    ) -> (Verdict, Life) {
        let mut trail = std::mem::take(&mut self.trail);
        trail.clear();
        let (verdict, life) = self
            .asker
            .decide_all(&self.chain, m, dir, established, pkt, now_ms, &mut trail);
        // The trace keeps the last few decisions: at a few per millisecond it is as fresh as
        // it gets, and a flood of new flows does not pay for it.
        if self.traced_ms != now_ms {
            (self.traced_ms, self.traced_in_ms) = (now_ms, 0);
        }
        self.traced_in_ms += 1;
        if self.traced_in_ms <= TRACES_PER_MS {
            self.trace(m, dir, now_ms, &mut trail);
        }
        self.trail = trail;
        (verdict, life)
    }

    /// Adds what each module said in `trail` to its decision trace.
    fn trace(&self, m: &FlowMeta, dir: Direction, now_ms: u64, trail: &mut Vec<Trail>) {
        let at_ms = unix_ms(now_ms);
        for (i, kind, reason) in trail.drain(..) {
            let Some(lm) = self.chain.modules.get(i) else { continue };
            lm.stats.trace(TraceRecord {
                at_ms,
                egress: dir == Direction::Egress,
                protocol: m.protocol,
                src: (m.src, m.src_port),
                dst: (m.dst, m.dst_port),
                verdict: kind,
                reason,
            });
        }
    }
}

impl Asker {
    /// Asks every module of `chain` in order; returns the verdict and its lifetime, and notes
    /// in `trail` what each module said.
    #[allow(clippy::too_many_arguments)]
    fn decide_all(
        &mut self,
        chain: &Chain,
        m: &FlowMeta,
        dir: Direction,
        established: bool,
        pkt: &[u8],
        now_ms: u64,
        trail: &mut Vec<Trail>,
    ) -> (Verdict, Life) {
        let local = Local { node: chain.local };
        flow::encode(m, dir, established, pkt, self.leases.load(), local, &mut self.record);
        let mut verdict = Verdict::PASS;
        let mut life = Life::OPEN;
        for (i, lm) in chain.modules.iter().enumerate() {
            if lm.has(Entry::Policy) {
                let asked = self.call(chain, i, Entry::Policy, now_ms);
                if self.policy_drops(i, lm, asked, m, dir, established, &mut life, trail) {
                    return (Verdict::DROP, life);
                }
            }
            if dir == Direction::Egress && verdict.via.is_none() && lm.has(Entry::Route) {
                let asked = self.call(chain, i, Entry::Route, now_ms);
                match self.route(i, lm, asked, m, local, &mut life, trail) {
                    Routed::Drop => return (Verdict::DROP, life),
                    Routed::Via(via) => verdict.via = Some(via),
                    Routed::Direct => {}
                }
            }
        }
        (verdict, life)
    }

    /// Takes in module `i`'s policy answer: true when the flow is to be dropped.
    #[allow(clippy::too_many_arguments)]
    fn policy_drops(
        &mut self,
        i: usize,
        lm: &LoadedModule,
        asked: Result<Word, CallError>,
        m: &FlowMeta,
        dir: Direction,
        established: bool,
        life: &mut Life,
        trail: &mut Vec<Trail>,
    ) -> bool {
        let w = match asked {
            Ok(w) => w,
            Err(e) => return failure_drops(i, lm, &e, life, trail),
        };
        life.narrow(&w);
        let kind = match w.action {
            abi::action::DROP => VerdictKind::Drop,
            abi::action::ALLOW_LOG => VerdictKind::Log,
            _ => VerdictKind::Allow,
        };
        self.tallies[i].verdict(kind);
        if kind == VerdictKind::Log {
            // Logging is per flow: a logged flow is never answered for its service.
            life.scope = Scope::Flow;
        }
        let why = match (lm.dry_run, kind) {
            (true, VerdictKind::Drop) => TraceReason::DryRunDrop,
            _ => TraceReason::Answered { in_flight: established },
        };
        trail.push((i, kind, why));
        if kind == VerdictKind::Log && lm.stats.log_allowed() {
            tracing::info!(target: "weft::flow", module = %lm.name, direction = ?dir, protocol = m.protocol,
                src = %m.src, src_port = m.src_port, dst = %m.dst, dst_port = m.dst_port, dry_run = lm.dry_run, "flow logged");
        }
        if kind != VerdictKind::Drop {
            return false;
        }
        if lm.dry_run {
            lm.stats.dry_run_drops.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        // First deny wins: later modules are not asked.
        true
    }

    /// Takes in module `i`'s routing answer.
    #[allow(clippy::too_many_arguments)]
    fn route(
        &mut self,
        i: usize,
        lm: &LoadedModule,
        asked: Result<Word, CallError>,
        m: &FlowMeta,
        local: Local,
        life: &mut Life,
        trail: &mut Vec<Trail>,
    ) -> Routed {
        let w = match asked {
            Ok(w) => w,
            Err(e) => {
                let dropped = failure_drops(i, lm, &e, life, trail);
                return if dropped { Routed::Drop } else { Routed::Direct };
            }
        };
        life.narrow(&w);
        if w.action != abi::route::VIA {
            self.tallies[i].verdict(VerdictKind::Owner);
            trail.push((i, VerdictKind::Owner, TraceReason::Owner));
            return Routed::Direct;
        }
        self.tallies[i].verdict(VerdictKind::Via);
        let via = Ipv4Addr::from(w.addr);
        let dry_run = lm.dry_run;
        trail.push((i, VerdictKind::Via, TraceReason::Via { via, dry_run }));
        if dry_run {
            return Routed::Direct;
        }
        let leases = self.leases.load();
        if !leases.is_node(via) {
            self.pipeline.bad_via.fetch_add(1, Ordering::Relaxed);
            Routed::Direct
        } else if via != local.node && Some(via) != leases.subnet_of(m.dst).map(|s| s.2) {
            Routed::Via(via)
        } else {
            Routed::Direct
        }
    }

    /// One call into module `i` of `chain`, instantiating it first if needed; failures are
    /// counted, can quarantine the module, and throw the instance away (its memory may be
    /// inconsistent).
    fn call(&mut self, chain: &Chain, i: usize, entry: Entry, now_ms: u64) -> Result<Word, CallError> {
        let lm = &chain.modules[i];
        if let Err(e) = &lm.compiled {
            return Err(CallError::Trap(format!("not loaded: {e}")));
        }
        if lm.stats.quarantined(now_ms) {
            return Err(CallError::Trap("quarantined".into()));
        }
        if self.instances[i].is_none() {
            // Never made here: taken ready, and the preparer makes the next.
            let Some(inst) = lm.spares.take() else {
                self.pipeline.preparer.refill(lm, false);
                return Err(CallError::NotReady);
            };
            self.instances[i] = Some(inst);
            self.pipeline.preparer.refill(lm, false);
        }
        let Some(inst) = self.instances[i].as_mut() else {
            return Err(CallError::Missing);
        };
        // Reading the clock twice costs a third of a cheap call: one call in TIMED_EVERY is
        // timed and stands for the others, so ns per call stays right on average.
        self.calls = self.calls.wrapping_add(1);
        let timed = self.calls.is_multiple_of(TIMED_EVERY);
        let t = timed.then(Instant::now);
        self.pipeline.runtime.calling(now_ms);
        let r = inst.call(entry, &self.record);
        let tally = &mut self.tallies[i];
        tally.calls += 1;
        if let Some(t) = t {
            tally.call_ns += t.elapsed().as_nanos() as u64 * TIMED_EVERY;
        }
        match &r {
            Ok(_) => {
                lm.stats.outcome(true, now_ms);
            }
            Err(e) => self.failed_call(lm, i, entry, e, now_ms),
        }
        r
    }

    /// Counts a failed call, throws its instance away and asks for another; may quarantine.
    fn failed_call(&mut self, lm: &Arc<LoadedModule>, i: usize, entry: Entry, e: &CallError, now_ms: u64) {
        let st = &lm.stats;
        match e {
            CallError::Timeout => st.timeouts.fetch_add(1, Ordering::Relaxed),
            CallError::BadVerdict(_) => st.bad_verdicts.fetch_add(1, Ordering::Relaxed),
            _ => st.traps.fetch_add(1, Ordering::Relaxed),
        };
        if st.log_allowed() {
            tracing::warn!(module = %lm.name, sha256 = %lm.sha256, entry = ?entry, error = %e, "module call failed");
        }
        self.instances[i] = None;
        self.pipeline.preparer.refill(lm, true);
        if st.outcome(false, now_ms) {
            tracing::error!(module = %lm.name, sha256 = %lm.sha256, failure = ?lm.failure,
                "module quarantined after repeated failures; its failure policy decides meanwhile");
        }
    }
}

/// How long, and for which flows, a verdict holds: the shortest lifetime and the narrowest
/// scope of every answer that went into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Life {
    /// How long the verdict may be reused.
    pub ttl: Ttl,
    /// Which flows besides this one it holds for.
    pub scope: Scope,
}

impl Life {
    /// Before any module answered: forever, for anyone.
    const OPEN: Life = Life {
        ttl: Ttl::MAX,
        scope: Scope::AnySource,
    };

    /// Takes in one module's answer.
    fn narrow(&mut self, w: &Word) {
        self.ttl = self.ttl.min(cache_ms(w.cache));
        self.scope = self.scope.min(Scope::from_abi(w.scope));
    }
}

/// Where a routing module sends a flow.
enum Routed {
    /// To the node that owns the destination, as the lease table says.
    Direct,
    /// Through this other node.
    Via(Ipv4Addr),
    /// Nowhere: the module failed closed.
    Drop,
}

/// Counts a failed call, applies `lm`'s failure policy and notes it in `trail`: true when the
/// flow is to be dropped. The verdict stands for at most [`FAILURE_TTL_MS`].
fn failure_drops(i: usize, lm: &LoadedModule, e: &CallError, life: &mut Life, trail: &mut Vec<Trail>) -> bool {
    lm.stats.verdict(VerdictKind::Failure);
    // A module with no instance ready yet is asked again soon, once one is.
    let stands = if *e == CallError::NotReady {
        NOT_READY_TTL_MS
    } else {
        FAILURE_TTL_MS
    };
    // A failure is about this flow: the next one of the service asks again.
    life.ttl = life.ttl.min(stands);
    life.scope = Scope::Flow;
    tracing::debug!(module = %lm.name, error = %e, "call failed; the failure policy decides");
    let dropped = lm.failure == FailurePolicy::Closed && !lm.dry_run;
    let why = e.to_string().into_boxed_str();
    trail.push((i, VerdictKind::Failure, TraceReason::Failed { why, dropped }));
    dropped
}

/// Whether a wide verdict can cover `m`'s flow: a first fragment or whole packet of a protocol
/// whose destination port names the service.
#[inline]
fn wide_protocol(m: &FlowMeta) -> bool {
    !m.later_fragment && flow::WIDE_PROTOCOLS.contains(&m.protocol)
}

/// What one module (by its place in the chain) said about a flow, for the decision trace.
pub type Trail = (usize, VerdictKind, TraceReason);

/// Milliseconds since the epoch at the moment the process clock read `now_ms`.
fn unix_ms(now_ms: u64) -> u64 {
    static BASE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let base = *BASE.get_or_init(|| {
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        unix.saturating_sub(clock_ms())
    });
    base + now_ms
}

/// Milliseconds since the process first asked: the clock of caches and quarantines.
#[inline]
pub fn clock_ms() -> u64 {
    crate::clock::ms()
}
