//! The wasmtime engine Weft runs modules on: its configuration (every security-relevant knob
//! set on purpose), the epoch ticker ([`super::ticker`]) that bounds each call, the linker
//! with Weft's host functions and nothing else, and compilation with ABI checks and a cache
//! keyed by sha256.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::{Config, Engine, ExternType, FuncType, InstancePre, Linker, Module, OptLevel, WasmFeatures};
use weft_guest::abi::names;

use super::instance::{self, HostCtx};
use super::ticker::Ticker;
use super::WasmError;

/// Resource limits applied to every module, and the keys modules must be signed with.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest module accepted, in bytes of Wasm.
    pub max_module_bytes: usize,
    /// Most linear memory one instance may have.
    pub max_memory_bytes: usize,
    /// Most CPU time one decision may use before it is interrupted.
    pub call_deadline: Duration,
    /// Most CPU time instantiating and configuring may use.
    pub configure_deadline: Duration,
    /// Native stack a call may use.
    pub max_stack_bytes: usize,
    /// What a module may hold before it is compiled at all.
    pub shape: super::shape::ShapeLimits,
    /// When set, only modules signed by one of these keys are added or run.
    pub trusted_keys: Option<Arc<super::signature::TrustedKeys>>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_module_bytes: 1 << 20,
            max_memory_bytes: 16 << 20,
            call_deadline: Duration::from_millis(5),
            configure_deadline: Duration::from_millis(500),
            max_stack_bytes: 512 << 10,
            shape: super::shape::ShapeLimits::default(),
            trusted_keys: None,
        }
    }
}

/// A module compiled and checked against the ABI, ready to instantiate.
pub struct Compiled {
    /// sha256 of the Wasm bytes.
    pub sha256: [u8; 32],
    pub(super) pre: InstancePre<HostCtx>,
    /// Exports `weft_policy`.
    pub has_policy: bool,
    /// Exports `weft_route`.
    pub has_route: bool,
}

/// The engine, linker and compile cache; one per process.
pub struct Runtime {
    engine: Engine,
    linker: Linker<HostCtx>,
    cache: Mutex<HashMap<[u8; 32], Arc<Compiled>>>,
    limits: Limits,
    ticker: Arc<Ticker>,
    pool: Arc<super::pool::CompilePool>,
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.ticker.stop();
    }
}

/// Hex of a digest.
pub fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn engine_config(limits: &Limits) -> Config {
    let mut c = Config::new();
    // Time: epoch interruption is near free per call (fuel costs ~2x on call-heavy code);
    // each call gets a deadline of a few ticks.
    c.epoch_interruption(true);
    c.consume_fuel(false);
    // Stack: a bounded native stack, so deep recursion traps instead of hitting the guard page
    // of a data-path thread.
    c.max_wasm_stack(limits.max_stack_bytes);
    // Proposals: what Rust's wasm32 target emits (multi-value, bulk memory, reference types for
    // call_indirect tables, SIMD on request) and nothing else. Threads, GC, exceptions, memory64,
    // multiple memories, stack switching and the component model stay off: surface without use.
    c.wasm_multi_value(true);
    c.wasm_bulk_memory(true);
    c.wasm_features(WasmFeatures::REFERENCE_TYPES, true);
    c.wasm_simd(true);
    // Relaxed SIMD results differ between CPUs: verdicts must not.
    c.wasm_relaxed_simd(false);
    c.wasm_multi_memory(false);
    c.wasm_memory64(false);
    c.wasm_tail_call(false);
    c.wasm_custom_page_sizes(false);
    c.wasm_wide_arithmetic(false);
    c.wasm_stack_switching(false);
    c.wasm_shared_everything_threads(false);
    c.wasm_features(WasmFeatures::THREADS, false);
    c.wasm_features(WasmFeatures::GC, false);
    c.wasm_features(WasmFeatures::FUNCTION_REFERENCES, false);
    c.wasm_features(WasmFeatures::EXCEPTIONS, false);
    c.wasm_features(WasmFeatures::COMPONENT_MODEL, false);
    c.cranelift_opt_level(OptLevel::Speed);
    // No DWARF for uploaded code; traps are reported by module and entry point instead.
    c.debug_info(false);
    c.wasm_backtrace_max_frames(None);
    c
}

fn sig(ft: &FuncType) -> String {
    let p: Vec<String> = ft.params().map(|t| t.to_string()).collect();
    let r: Vec<String> = ft.results().map(|t| t.to_string()).collect();
    format!("({}) -> ({})", p.join(", "), r.join(", "))
}

/// The signature every import and export of the ABI must have.
fn expected(name: &str) -> Option<&'static str> {
    Some(match name {
        names::LOG => "(i32, i32, i32) -> ()",
        names::NOW_NS => "() -> (i64)",
        names::COUNTER => "(i32, i32) -> (i32)",
        names::COUNTER_ADD => "(i32, i64) -> ()",
        names::LEASE_OWNER => "(i32) -> (i64)",
        names::ABI_VERSION => "() -> (i32)",
        names::ALLOC => "(i32) -> (i32)",
        names::CONFIGURE => "(i32, i32) -> (i64)",
        names::FLOW => "() -> (i32)",
        names::POLICY | names::ROUTE => "() -> (i64)",
        _ => return None,
    })
}

impl Runtime {
    /// The engine, with its epoch ticker thread.
    pub fn new(limits: Limits) -> Result<Arc<Runtime>, WasmError> {
        let engine = Engine::new(&engine_config(&limits)).map_err(|e| WasmError::Engine(format!("{e:#}")))?;
        let mut linker = Linker::new(&engine);
        instance::link(&mut linker).map_err(|e| WasmError::Engine(format!("{e:#}")))?;
        let ticker =
            Ticker::start(&engine).map_err(|e| WasmError::Engine(format!("cannot start the epoch thread: {e}")))?;
        // Two compiles at once, four more waiting: uploads beyond that are refused, never
        // allowed to take every core.
        let pool = super::pool::CompilePool::new(2, 4)
            .map_err(|e| WasmError::Engine(format!("cannot start the compile pool: {e}")))?;
        Ok(Arc::new(Runtime {
            engine,
            linker,
            cache: Mutex::new(HashMap::new()),
            limits,
            ticker,
            pool,
        }))
    }

    /// Says a module call (or instantiation) is about to start at `now_ms`, so the epoch
    /// ticker runs and its deadline can fire.
    #[inline]
    pub fn calling(&self, now_ms: u64) {
        self.ticker.wake(now_ms);
    }

    /// The epoch ticker, which says when a running call looks at its CPU budget.
    pub(super) fn ticker(&self) -> &Arc<Ticker> {
        &self.ticker
    }

    /// Checks a module's signature against the trusted keys: the key id that verified it, or
    /// `None` when this node trusts no keys (and so runs unsigned modules).
    pub fn verify(
        &self,
        wasm: &[u8],
        config: &[u8],
        sig: Option<&super::signature::Signature>,
    ) -> Result<Option<String>, WasmError> {
        let Some(keys) = &self.limits.trusted_keys else {
            return Ok(None);
        };
        keys.verify(wasm, config, sig).map(Some).map_err(WasmError::Untrusted)
    }

    /// Where compiling, instantiating and checking modules runs.
    pub fn pool(&self) -> &Arc<super::pool::CompilePool> {
        &self.pool
    }

    /// The limits every module runs under.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Compiles `wasm` on this node (never loading precompiled artifacts) and checks it against
    /// the ABI; a module already compiled is served from the cache by its sha256.
    pub fn compile(&self, wasm: &[u8]) -> Result<Arc<Compiled>, WasmError> {
        if wasm.len() > self.limits.max_module_bytes {
            return Err(WasmError::TooLarge {
                size: wasm.len(),
                limit: self.limits.max_module_bytes,
            });
        }
        if !wasm.starts_with(b"\0asm") {
            return Err(WasmError::NotWasm);
        }
        // Its shape bounds what compiling it can cost: refused before the compiler starts.
        super::shape::check(wasm, &self.limits.shape).map_err(|e| match e {
            super::shape::ShapeError::Invalid(why) => WasmError::Invalid(why),
            over => WasmError::Shape(over),
        })?;
        let sha = sha256(wasm);
        if let Some(c) = self.cache.lock().ok().and_then(|m| m.get(&sha).cloned()) {
            return Ok(c);
        }
        let module = Module::new(&self.engine, wasm).map_err(|e| WasmError::Invalid(format!("{e:#}")))?;
        for imp in module.imports() {
            let ok = imp.module() == names::HOST_MODULE
                && match (imp.ty(), expected(imp.name())) {
                    (ExternType::Func(ft), Some(want)) if is_host_fn(imp.name()) => {
                        let got = sig(&ft);
                        if got != want {
                            return Err(WasmError::Signature {
                                name: format!("import {}.{}", imp.module(), imp.name()),
                                want: want.into(),
                                got,
                            });
                        }
                        true
                    }
                    _ => false,
                };
            if !ok {
                return Err(WasmError::UnknownImport {
                    module: imp.module().into(),
                    name: imp.name().into(),
                });
            }
        }
        let export = |name: &str| module.get_export(name);
        match export(names::MEMORY) {
            Some(ExternType::Memory(_)) => {}
            _ => return Err(WasmError::MissingExport(names::MEMORY.into())),
        }
        let found = |name: &str, required: bool| -> Result<bool, WasmError> {
            match export(name) {
                None if required => Err(WasmError::MissingExport(name.into())),
                None => Ok(false),
                Some(ExternType::Func(ft)) => {
                    let (got, want) = (sig(&ft), expected(name).unwrap_or_default());
                    if got == want {
                        Ok(true)
                    } else {
                        Err(WasmError::Signature {
                            name: format!("export {name}"),
                            want: want.into(),
                            got,
                        })
                    }
                }
                Some(_) => Err(WasmError::MissingExport(format!(
                    "{name} (exported, but not as a function)"
                ))),
            }
        };
        for name in [names::ABI_VERSION, names::ALLOC, names::CONFIGURE, names::FLOW] {
            found(name, true)?;
        }
        let has_policy = found(names::POLICY, false)?;
        let has_route = found(names::ROUTE, false)?;
        if !has_policy && !has_route {
            return Err(WasmError::NoDecision);
        }
        let pre = self
            .linker
            .instantiate_pre(&module)
            .map_err(|e| WasmError::Invalid(format!("{e:#}")))?;
        let compiled = Arc::new(Compiled {
            sha256: sha,
            pre,
            has_policy,
            has_route,
        });
        if let Ok(mut m) = self.cache.lock() {
            m.insert(sha, compiled.clone());
        }
        Ok(compiled)
    }

    /// Forgets compiled modules whose sha256 is not in `keep`.
    pub fn retain(&self, keep: &[[u8; 32]]) {
        if let Ok(mut m) = self.cache.lock() {
            m.retain(|k, _| keep.contains(k));
        }
    }

    pub(super) fn engine(&self) -> &Engine {
        &self.engine
    }
}

fn is_host_fn(name: &str) -> bool {
    matches!(
        name,
        names::LOG | names::NOW_NS | names::COUNTER | names::COUNTER_ADD | names::LEASE_OWNER
    )
}
