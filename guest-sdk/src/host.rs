//! The host functions a module may call: logging, a clock, counters and lease lookups. On
//! wasm32 they are imports from the `weft` module; elsewhere [`crate::testing`] serves them.

use core::net::Ipv4Addr;

/// Log levels, as the host's `log` import numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Something is wrong.
    Error = 0,
    /// Something is odd.
    Warn = 1,
    /// Worth knowing.
    Info = 2,
    /// Detail.
    Debug = 3,
}

#[cfg(target_arch = "wasm32")]
mod imp {
    #[link(wasm_import_module = "weft")]
    extern "C" {
        fn log(level: i32, ptr: i32, len: i32);
        fn now_ns() -> i64;
        fn counter(ptr: i32, len: i32) -> i32;
        fn counter_add(id: i32, delta: i64);
        fn lease_owner(addr: i32) -> i64;
    }

    pub fn log_(level: i32, msg: &str) {
        // SAFETY: the host reads `len` bytes at `ptr` within this module's memory.
        unsafe { log(level, msg.as_ptr() as i32, msg.len() as i32) }
    }
    pub fn now_ns_() -> i64 {
        // SAFETY: no arguments.
        unsafe { now_ns() }
    }
    pub fn counter_(name: &str) -> i32 {
        // SAFETY: as for `log`.
        unsafe { counter(name.as_ptr() as i32, name.len() as i32) }
    }
    pub fn counter_add_(id: i32, delta: i64) {
        // SAFETY: plain integers.
        unsafe { counter_add(id, delta) }
    }
    pub fn lease_owner_(addr: u32) -> i64 {
        // SAFETY: a plain integer.
        unsafe { lease_owner(addr as i32) }
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod imp {
    pub(super) use crate::testing::{counter_, counter_add_, lease_owner_, log_, now_ns_};
}

/// Logs a message through the host (rate-limited there: a flood is counted, not printed).
pub fn log(level: Level, msg: &str) {
    imp::log_(level as i32, msg)
}

/// Monotonic nanoseconds from the host's clock.
pub fn now_ns() -> u64 {
    imp::now_ns_().max(0) as u64
}

/// The underlay address of the node leasing `addr`, if a lease covers it.
pub fn lease_owner(addr: Ipv4Addr) -> Option<Ipv4Addr> {
    let v = imp::lease_owner_(u32::from(addr));
    (v >= 0).then(|| Ipv4Addr::from(v as u32))
}

/// A counter the module defines; the host exports it as a metric labelled with its name.
#[derive(Debug, Clone, Copy)]
pub struct Counter {
    id: i32,
}

impl Counter {
    /// Defines (or finds) the counter `name`: ASCII letters, digits and `_`, at most 64 bytes.
    /// A refused name gives a counter that counts nothing.
    pub fn new(name: &str) -> Counter {
        Counter {
            id: imp::counter_(name),
        }
    }

    /// Adds `delta`.
    pub fn add(self, delta: i64) {
        if self.id >= 0 {
            imp::counter_add_(self.id, delta)
        }
    }

    /// Adds one.
    pub fn inc(self) {
        self.add(1)
    }
}
