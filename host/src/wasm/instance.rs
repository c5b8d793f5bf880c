//! One instance of a module in its own store: the host functions it may import, its limits,
//! and the calls into it with a deadline each.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use wasmtime::{Caller, Linker, Memory, Store, StoreLimits, StoreLimitsBuilder, Trap, TypedFunc};
use weft_guest::abi::{names, Word, RECORD_SIZE};

use super::limit::{thread_cpu, Limit, Look, FIRST_LOOK_TICKS};
use super::runtime::{Compiled, Runtime};
use super::stats::ModuleStats;
use super::ticker::Ticker;
use super::WasmError;
use crate::packet::route::RouteTable;

/// The lease table modules may read: every lease, this node's included.
pub type Leases = ArcSwap<RouteTable>;

/// What a store carries for the host functions.
pub struct HostCtx {
    limits: StoreLimits,
    module: Arc<str>,
    stats: Arc<ModuleStats>,
    leases: Arc<Leases>,
    counters: Vec<Arc<AtomicI64>>,
    /// The running call's (or instantiation's) CPU budget: the epoch says when to look at it.
    limit: Limit,
    /// Whether a call must read its CPU clock as it starts ([`Ticker::late`]).
    ticker: Arc<Ticker>,
}

impl HostCtx {
    /// The context for one instance of `module`.
    pub fn new(rt: &Runtime, module: Arc<str>, stats: Arc<ModuleStats>, leases: Arc<Leases>) -> Self {
        HostCtx {
            limits: StoreLimitsBuilder::new()
                .memory_size(rt.limits().max_memory_bytes)
                .table_elements(100_000)
                .instances(1)
                .tables(4)
                .memories(1)
                .build(),
            module,
            stats,
            leases,
            counters: Vec::new(),
            limit: Limit::default(),
            ticker: rt.ticker().clone(),
        }
    }
}

/// Called when the epoch reaches a store's deadline: interrupts the call once it has used its
/// CPU budget, or looks again when it could have ([`super::limit`]).
fn on_deadline(mut ctx: wasmtime::StoreContextMut<'_, HostCtx>) -> wasmtime::Result<wasmtime::UpdateDeadline> {
    Ok(match ctx.data_mut().limit.look(thread_cpu()) {
        Look::Interrupt => wasmtime::UpdateDeadline::Interrupt,
        Look::Again(ticks) => {
            // Still running: the ticker must not park before the next look.
            ctx.data().ticker.wake(crate::clock::ms());
            wasmtime::UpdateDeadline::Continue(ticks)
        }
    })
}

/// Starts the budget of a call (or instantiation) about to run in `store`.
#[inline]
fn arm(store: &mut Store<HostCtx>, budget: Duration) {
    let ctx = store.data_mut();
    let late = ctx.ticker.late();
    ctx.limit.start(budget, late, thread_cpu);
    store.set_epoch_deadline(FIRST_LOOK_TICKS);
}

fn epoch_base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// Copies `len` bytes at `ptr` out of the caller's memory, at most `max`.
fn guest_bytes(caller: &mut Caller<'_, HostCtx>, ptr: i32, len: i32, max: usize) -> Option<Vec<u8>> {
    let mem = caller.get_export(names::MEMORY)?.into_memory()?;
    let (ptr, len) = (usize::try_from(ptr).ok()?, usize::try_from(len).ok()?.min(max));
    mem.data(&caller).get(ptr..ptr.checked_add(len)?).map(<[u8]>::to_vec)
}

/// Adds Weft's host functions, the only imports a module can have.
pub fn link(linker: &mut Linker<HostCtx>) -> wasmtime::Result<()> {
    let m = names::HOST_MODULE;
    linker.func_wrap(
        m,
        names::LOG,
        |mut caller: Caller<'_, HostCtx>, level: i32, ptr: i32, len: i32| {
            if !caller.data().stats.log_allowed() {
                return;
            }
            let msg = guest_bytes(&mut caller, ptr, len, 512).unwrap_or_else(|| b"<log outside memory>".to_vec());
            let msg = String::from_utf8_lossy(&msg);
            let module = &*caller.data().module;
            match level {
                0 => tracing::error!(target: "weft::module", module, "{msg}"),
                1 => tracing::warn!(target: "weft::module", module, "{msg}"),
                2 => tracing::info!(target: "weft::module", module, "{msg}"),
                _ => tracing::debug!(target: "weft::module", module, "{msg}"),
            }
        },
    )?;
    linker.func_wrap(m, names::NOW_NS, || -> i64 {
        i64::try_from(epoch_base().elapsed().as_nanos()).unwrap_or(i64::MAX)
    })?;
    linker.func_wrap(
        m,
        names::COUNTER,
        |mut caller: Caller<'_, HostCtx>, ptr: i32, len: i32| -> i32 {
            let Some(name) = guest_bytes(&mut caller, ptr, len, 65) else {
                return -1;
            };
            let Ok(name) = std::str::from_utf8(&name) else {
                return -1;
            };
            let Some(cell) = caller.data().stats.counter(name) else {
                return -1;
            };
            let ctx = caller.data_mut();
            let id = match ctx.counters.iter().position(|c| Arc::ptr_eq(c, &cell)) {
                Some(i) => i,
                None => {
                    ctx.counters.push(cell);
                    ctx.counters.len() - 1
                }
            };
            i32::try_from(id).unwrap_or(-1)
        },
    )?;
    linker.func_wrap(
        m,
        names::COUNTER_ADD,
        |caller: Caller<'_, HostCtx>, id: i32, delta: i64| {
            if let Some(c) = usize::try_from(id).ok().and_then(|i| caller.data().counters.get(i)) {
                c.fetch_add(delta, Ordering::Relaxed);
            }
        },
    )?;
    linker.func_wrap(m, names::LEASE_OWNER, |caller: Caller<'_, HostCtx>, addr: i32| -> i64 {
        let a = Ipv4Addr::from(addr as u32);
        caller
            .data()
            .leases
            .load()
            .subnet_of(a)
            .map_or(-1, |(_, _, node)| i64::from(u32::from(node)))
    })?;
    Ok(())
}

/// Which decision to ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// `weft_policy`.
    Policy,
    /// `weft_route`.
    Route,
}

/// How a call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The module trapped (or ran out of stack, or touched memory out of bounds).
    #[error("trapped: {0}")]
    Trap(String),
    /// The call ran past its deadline and was interrupted.
    #[error("timed out")]
    Timeout,
    /// The verdict word sets bits the ABI reserves, or names no known action.
    #[error("returned an undefined verdict {0:#x}")]
    BadVerdict(i64),
    /// The module does not export that entry point.
    #[error("does not export that decision")]
    Missing,
    /// No instance is ready yet (one is being prepared off the data path).
    #[error("no instance ready yet")]
    NotReady,
}

fn call_error(e: wasmtime::Error) -> CallError {
    match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => CallError::Timeout,
        _ => CallError::Trap(format!("{e:#}")),
    }
}

/// A live instance of one module.
pub struct Instance {
    store: Store<HostCtx>,
    memory: Memory,
    flow_ptr: usize,
    policy: Option<TypedFunc<(), i64>>,
    route: Option<TypedFunc<(), i64>>,
    /// CPU time a call may use.
    budget: Duration,
}

impl Instance {
    /// Instantiates `c`, checks its ABI version and record buffer, and configures it.
    pub fn new(rt: &Runtime, c: &Compiled, ctx: HostCtx, config: &[u8]) -> Result<Instance, WasmError> {
        rt.calling(super::chain::clock_ms());
        let mut store = Store::new(rt.engine(), ctx);
        store.limiter(|c| &mut c.limits);
        store.epoch_deadline_callback(on_deadline);
        arm(&mut store, rt.limits().configure_deadline);
        let during = |what: &'static str| move |e: wasmtime::Error| WasmError::Failed(what, call_error(e));
        let inst = c
            .pre
            .instantiate(&mut store)
            .map_err(|e| WasmError::Instantiate(format!("{e:#}")))?;
        let memory = inst
            .get_memory(&mut store, names::MEMORY)
            .ok_or_else(|| WasmError::MissingExport(names::MEMORY.into()))?;
        let func = |store: &mut Store<HostCtx>, name: &str| {
            inst.get_typed_func::<(), i32>(store, name)
                .map_err(|e| WasmError::Invalid(format!("{name}: {e:#}")))
        };
        let version = func(&mut store, names::ABI_VERSION)?
            .call(&mut store, ())
            .map_err(during("weft_abi_version"))?;
        if version != weft_guest::abi::ABI_VERSION as i32 {
            return Err(WasmError::AbiVersion(version));
        }
        let flow_ptr = func(&mut store, names::FLOW)?
            .call(&mut store, ())
            .map_err(during("weft_flow"))?;
        let flow_ptr = usize::try_from(flow_ptr)
            .ok()
            .filter(|p| {
                p.checked_add(RECORD_SIZE)
                    .is_some_and(|end| end <= memory.data_size(&store))
            })
            .ok_or(WasmError::BadFlowBuffer(flow_ptr))?;
        let len = i32::try_from(config.len()).map_err(|_| WasmError::Rejected("config too large".into()))?;
        let alloc = inst
            .get_typed_func::<i32, i32>(&mut store, names::ALLOC)
            .map_err(|e| WasmError::Invalid(format!("{e:#}")))?;
        let ptr = alloc.call(&mut store, len).map_err(during("weft_alloc"))?;
        let at = usize::try_from(ptr).ok().filter(|p| {
            p.checked_add(config.len())
                .is_some_and(|end| end <= memory.data_size(&store))
        });
        let Some(at) = at else {
            return Err(WasmError::Rejected(format!(
                "weft_alloc returned {ptr}, outside memory"
            )));
        };
        memory.data_mut(&mut store)[at..at + config.len()].copy_from_slice(config);
        let configure = inst
            .get_typed_func::<(i32, i32), i64>(&mut store, names::CONFIGURE)
            .map_err(|e| WasmError::Invalid(format!("{e:#}")))?;
        let r = configure
            .call(&mut store, (ptr, len))
            .map_err(during("weft_configure"))?;
        if r != 0 {
            let (p, n) = ((r as u64 >> 32) as usize, (r as u64 & 0xFFFF_FFFF) as usize);
            let reason = memory
                .data(&store)
                .get(p..p.saturating_add(n.min(1024)))
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_else(|| "rejected (reason outside memory)".into());
            return Err(WasmError::Rejected(reason));
        }
        let policy = inst.get_typed_func::<(), i64>(&mut store, names::POLICY).ok();
        let route = inst.get_typed_func::<(), i64>(&mut store, names::ROUTE).ok();
        Ok(Instance {
            store,
            memory,
            flow_ptr,
            policy,
            route,
            budget: rt.limits().call_deadline,
        })
    }

    /// Asks for one decision about the flow `record` describes.
    pub fn call(&mut self, entry: Entry, record: &[u8; RECORD_SIZE]) -> Result<Word, CallError> {
        let f = match entry {
            Entry::Policy => self.policy.as_ref(),
            Entry::Route => self.route.as_ref(),
        }
        .ok_or(CallError::Missing)?;
        // The buffer was checked at instantiation, but memory can only grow, so it still fits.
        let dst = self
            .memory
            .data_mut(&mut self.store)
            .get_mut(self.flow_ptr..self.flow_ptr + RECORD_SIZE)
            .ok_or_else(|| CallError::Trap("flow buffer outside memory".into()))?;
        dst.copy_from_slice(record);
        arm(&mut self.store, self.budget);
        let v = f.call(&mut self.store, ()).map_err(call_error)?;
        let w = Word::unpack(v).ok_or(CallError::BadVerdict(v))?;
        let known = match entry {
            Entry::Policy => w.action <= weft_guest::abi::action::ALLOW_LOG,
            Entry::Route => w.action <= weft_guest::abi::route::VIA,
        };
        if !known {
            return Err(CallError::BadVerdict(v));
        }
        Ok(w)
    }

    /// Bytes of linear memory the instance holds.
    pub fn memory_bytes(&self) -> usize {
        self.memory.data_size(&self.store)
    }
}
