//! What [`crate::export!`] expands to call: the glue between the raw exports and a
//! [`Module`]. Not for direct use.

use alloc::string::String;
use alloc::vec::Vec;
use core::cell::UnsafeCell;

use crate::abi::{Record, Word, RECORD_SIZE};
use crate::{Flow, Module};

/// A module's state. Wasm instances are single-threaded, and the host never re-enters a module,
/// so shared access through this cell is never concurrent.
pub struct Slot<T>(UnsafeCell<Option<T>>);

// SAFETY: a wasm32 module has one thread; see the type's comment.
unsafe impl<T> Sync for Slot<T> {}

impl<T> Slot<T> {
    /// An empty slot.
    pub const fn new() -> Self {
        Slot(UnsafeCell::new(None))
    }

    #[allow(clippy::mut_from_ref)]
    fn get(&self) -> &mut Option<T> {
        // SAFETY: single-threaded and never re-entered (see `Slot`).
        unsafe { &mut *self.0.get() }
    }
}

impl<T> Default for Slot<T> {
    fn default() -> Self {
        Self::new()
    }
}

#[repr(C, align(16))]
struct FlowBuf(UnsafeCell<[u8; RECORD_SIZE]>);

// SAFETY: as for `Slot`.
unsafe impl Sync for FlowBuf {}

static FLOW: FlowBuf = FlowBuf(UnsafeCell::new([0; RECORD_SIZE]));

/// Address of the flow record buffer.
pub fn flow_ptr() -> i32 {
    FLOW.0.get() as usize as i32
}

/// Room for `len` config bytes; handed back to [`configure`], which frees it.
pub fn alloc(len: i32) -> i32 {
    let len = usize::try_from(len).unwrap_or(0);
    let mut v: Vec<u8> = Vec::with_capacity(len.max(1));
    let p = v.as_mut_ptr();
    core::mem::forget(v);
    p as usize as i32
}

/// A verdict word no host accepts: reserved bits set. Returned when asked before configuring.
const NOT_READY: i64 = 0xFF00;

/// Runs `T::configure` on the config bytes at `ptr`; 0 or a packed reason.
pub fn configure<T: Module>(slot: &Slot<T>, ptr: i32, len: i32) -> i64 {
    let len = usize::try_from(len).unwrap_or(0);
    // SAFETY: `ptr` came from `alloc(len)` and the host filled `len` bytes.
    let bytes: Vec<u8> = unsafe { Vec::from_raw_parts(ptr as usize as *mut u8, len, len.max(1)) };
    match T::configure(&bytes) {
        Ok(m) => {
            *slot.get() = Some(m);
            0
        }
        Err(reason) => reason_word(reason),
    }
}

fn reason_word(reason: String) -> i64 {
    let reason = if reason.is_empty() {
        String::from("rejected")
    } else {
        reason
    };
    let bytes = reason.into_bytes().leak();
    ((bytes.as_ptr() as usize as i64) << 32) | bytes.len() as i64
}

fn current_flow() -> Option<Flow> {
    // SAFETY: the host writes the buffer only between calls.
    let buf = unsafe { &*FLOW.0.get() };
    Record::decode(buf).map(Flow::from_record)
}

/// The `weft_policy` export.
pub fn policy<T: Module>(slot: &Slot<T>) -> i64 {
    // The flow is borrowed where it was decoded: moving it out of the `Option` cost a
    // `memory.copy` of the whole record per call.
    match (slot.get().as_mut(), &current_flow()) {
        (Some(m), Some(f)) => m.policy(f).word(),
        _ => NOT_READY,
    }
}

/// The `weft_route` export.
pub fn route<T: Module>(slot: &Slot<T>) -> i64 {
    match (slot.get().as_mut(), &current_flow()) {
        (Some(m), Some(f)) => m.route(f).word(),
        _ => NOT_READY,
    }
}

const _: () = assert!(Word::unpack(NOT_READY).is_none());
