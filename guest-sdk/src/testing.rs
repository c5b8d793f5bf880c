//! A stand-in for the host, so a module's logic is unit-tested natively: it records logs and
//! counters, serves a settable clock and lease table, and is per thread, so tests run in
//! parallel without seeing each other.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::string::String;
use std::vec::Vec;

use crate::host::Level;

#[derive(Default)]
struct State {
    now_ns: i64,
    logs: Vec<(Level, String)>,
    counters: Vec<(String, i64)>,
    leases: Vec<(u32, u32, Ipv4Addr)>,
}

std::thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

/// Forgets logs, counters, leases and resets the clock to zero.
pub fn reset() {
    STATE.with(|s| *s.borrow_mut() = State::default());
}

/// Sets the clock.
pub fn set_now_ns(ns: u64) {
    STATE.with(|s| s.borrow_mut().now_ns = i64::try_from(ns).unwrap_or(i64::MAX));
}

/// Moves the clock forward.
pub fn advance_ns(ns: u64) {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        s.now_ns = s.now_ns.saturating_add(i64::try_from(ns).unwrap_or(i64::MAX));
    });
}

/// Declares that `node` leases `subnet/prefix`.
pub fn set_lease(subnet: Ipv4Addr, prefix: u8, node: Ipv4Addr) {
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    };
    STATE.with(|s| s.borrow_mut().leases.push((u32::from(subnet) & mask, mask, node)));
}

/// Everything logged so far.
pub fn logs() -> Vec<(Level, String)> {
    STATE.with(|s| s.borrow().logs.clone())
}

/// A counter's value (0 if never defined).
pub fn counter(name: &str) -> i64 {
    STATE.with(|s| {
        s.borrow()
            .counters
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, v)| *v)
    })
}

pub(crate) fn log_(level: i32, msg: &str) {
    let level = match level {
        0 => Level::Error,
        1 => Level::Warn,
        2 => Level::Info,
        _ => Level::Debug,
    };
    STATE.with(|s| s.borrow_mut().logs.push((level, msg.into())));
}

pub(crate) fn now_ns_() -> i64 {
    STATE.with(|s| s.borrow().now_ns)
}

pub(crate) fn counter_(name: &str) -> i32 {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        let id = match s.counters.iter().position(|(n, _)| n == name) {
            Some(i) => i,
            None => {
                s.counters.push((name.into(), 0));
                s.counters.len() - 1
            }
        };
        i32::try_from(id).unwrap_or(-1)
    })
}

pub(crate) fn counter_add_(id: i32, delta: i64) {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        if let Some(c) = usize::try_from(id).ok().and_then(|i| s.counters.get_mut(i)) {
            c.1 += delta;
        }
    });
}

pub(crate) fn lease_owner_(addr: u32) -> i64 {
    STATE.with(|s| {
        s.borrow()
            .leases
            .iter()
            .find(|(net, mask, _)| addr & mask == *net)
            .map_or(-1, |(_, _, node)| i64::from(u32::from(*node)))
    })
}

/// Counter values by name, for assertions on several at once.
pub fn counters() -> BTreeMap<String, i64> {
    STATE.with(|s| s.borrow().counters.iter().cloned().collect())
}
