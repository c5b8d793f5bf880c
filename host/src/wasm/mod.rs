//! Wasm routing and policy modules: the sandboxed runtime, the per-worker decision chain with
//! its verdict cache, and the module specs distributed through the lease store.
//!
//! The guest ABI (record layout, verdict words, import and export names) lives in the
//! `weft-guest` crate and is documented in `guest-sdk/ABI.md`; this side links the same code.

pub mod cache;
pub mod chain;
pub mod enforcement;
pub mod flow;
pub mod instance;
pub mod limit;
pub mod pool;
pub mod registry;
pub mod replay;
pub mod rollout;
pub mod runtime;
pub mod shape;
pub mod signature;
pub mod spares;
pub mod spec;
pub mod stats;
pub mod ticker;

pub use cache::Verdict;
pub use chain::{Pipeline, WorkerChain};
pub use flow::Direction;
pub use instance::CallError;
pub use runtime::{Limits, Runtime};
pub use spec::{FailurePolicy, ModuleSpec};

/// Why a module cannot be loaded, or a call into it failed at load time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WasmError {
    #[error("cannot set up the Wasm engine: {0}")]
    Engine(String),
    #[error("module is {size} bytes, over the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("not a WebAssembly module (no \\0asm header)")]
    NotWasm,
    #[error("{0}")]
    Shape(shape::ShapeError),
    #[error("{0}")]
    Pool(pool::PoolError),
    #[error("{0}")]
    Untrusted(signature::SignatureError),
    #[error("invalid WebAssembly: {0}")]
    Invalid(String),
    #[error("imports {module}.{name}, which Weft does not provide (allowed: weft.log, weft.now_ns, weft.counter, weft.counter_add, weft.lease_owner)")]
    UnknownImport { module: String, name: String },
    #[error("{name} has signature {got}; the ABI wants {want}")]
    Signature { name: String, want: String, got: String },
    #[error("does not export {0}, which ABI version 1 requires")]
    MissingExport(String),
    #[error("exports no decision function (weft_policy or weft_route)")]
    NoDecision,
    #[error("cannot instantiate: {0}")]
    Instantiate(String),
    #[error("speaks ABI version {0}; this host speaks version 1")]
    AbiVersion(i32),
    #[error("flow record buffer at {0} lies outside the module's memory")]
    BadFlowBuffer(i32),
    #[error("config rejected: {0}")]
    Rejected(String),
    #[error("{0} {1}")]
    Failed(&'static str, CallError),
    #[error("{0} {1} on a probe flow")]
    Probe(&'static str, CallError),
    #[error("stored sha256 {want} does not match the code's {got}")]
    Digest { want: String, got: String },
    #[error("undecodable module record: {0}")]
    Encoding(String),
}

/// Everything `weft module add` checks before a module reaches the store: it compiles, speaks
/// ABI 1, accepts its config, and decides a probe flow in each direction within its deadline.
/// Returns (has_policy, has_route).
pub fn check(rt: &Runtime, wasm: &[u8], config: &[u8]) -> Result<(bool, bool), WasmError> {
    use std::sync::Arc;
    let compiled = rt.compile(wasm)?;
    let table = || crate::packet::route::RouteTable::new(ipnet::Ipv4Net::default(), 24, None);
    let leases = Arc::new(instance::Leases::from_pointee(table()));
    let ctx = instance::HostCtx::new(rt, "probe".into(), Arc::default(), leases);
    let mut inst = instance::Instance::new(rt, &compiled, ctx, config)?;
    let pkt = crate::packet::build_udp([10, 244, 1, 5].into(), 40000, [10, 244, 2, 7].into(), 80, 64, b"probe");
    let meta = crate::packet::parse_ipv4(&pkt).map_err(|e| WasmError::Invalid(format!("probe packet: {e}")))?;
    for dir in [Direction::Egress, Direction::Ingress] {
        let rec = flow::record(
            &meta,
            dir,
            false,
            &pkt,
            &table(),
            flow::Local {
                node: [198, 18, 0, 1].into(),
            },
        );
        let mut buf = [0u8; weft_guest::abi::RECORD_SIZE];
        rec.encode(&mut buf);
        rt.calling(chain::clock_ms());
        if compiled.has_policy {
            inst.call(instance::Entry::Policy, &buf)
                .map_err(|e| WasmError::Probe("weft_policy", e))?;
        }
        if compiled.has_route && dir == Direction::Egress {
            inst.call(instance::Entry::Route, &buf)
                .map_err(|e| WasmError::Probe("weft_route", e))?;
        }
    }
    Ok((compiled.has_policy, compiled.has_route))
}

#[cfg(test)]
mod tests;
