//! Weft guest SDK: write Weft policy and routing modules in safe Rust.
//!
//! A module is a type implementing [`Module`], exported with one macro:
//!
//! ```ignore
//! use weft_guest::{Decision, Flow, Module};
//!
//! struct DenyTelnet;
//!
//! impl Module for DenyTelnet {
//!     fn configure(_config: &[u8]) -> Result<Self, String> {
//!         Ok(DenyTelnet)
//!     }
//!     fn policy(&mut self, flow: &Flow) -> Decision {
//!         if flow.is_tcp() && flow.dst_port() == 23 { Decision::drop() } else { Decision::allow() }
//!     }
//! }
//!
//! weft_guest::export!(DenyTelnet: policy);
//! ```
//!
//! Build with `cargo build --target wasm32-unknown-unknown --release` (crate type `cdylib`).
//! The SDK itself is `no_std` + `alloc` on wasm32; a `no_std` module must bring its own global
//! allocator and panic handler. On other targets the host functions are served by [`testing`],
//! so the same module code is unit-tested natively. `ABI.md` documents the wire contract.

#![cfg_attr(target_arch = "wasm32", no_std)]

extern crate alloc;

pub mod abi;
mod flow;
pub mod host;
pub mod net;
mod verdict;

#[cfg(not(target_arch = "wasm32"))]
pub mod testing;

#[doc(hidden)]
pub mod rt;

pub use flow::{Direction, Flow, FlowBuilder, ICMP, TCP, UDP};
pub use verdict::{Decision, Route};

use alloc::string::String;

/// A Weft module: configured once per instance, then asked about flows.
///
/// Instances live per worker thread of the data path, so state kept in `self` (a rate
/// limiter's buckets, say) is per worker; the host calls one instance from one thread only.
pub trait Module: Sized {
    /// Builds the module from its config bytes (usually JSON); an error rejects the config, and
    /// its text reaches the operator.
    fn configure(config: &[u8]) -> Result<Self, String>;

    /// The policy decision for a new flow (exported only when listed in [`export!`]).
    fn policy(&mut self, _flow: &Flow) -> Decision {
        Decision::allow()
    }

    /// The routing decision for a new egress flow (exported only when listed in [`export!`]).
    fn route(&mut self, _flow: &Flow) -> Route {
        Route::owner()
    }
}

/// Exports a [`Module`] type with the entry points it implements: `policy`, `route` or both.
///
/// `weft_guest::export!(MyModule: policy, route);`
#[macro_export]
macro_rules! export {
    ($ty:ty : $($entry:ident),+ $(,)?) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            static STATE: $crate::rt::Slot<$ty> = $crate::rt::Slot::new();

            #[no_mangle]
            pub extern "C" fn weft_abi_version() -> i32 {
                $crate::abi::ABI_VERSION as i32
            }

            #[no_mangle]
            pub extern "C" fn weft_alloc(len: i32) -> i32 {
                $crate::rt::alloc(len)
            }

            #[no_mangle]
            pub extern "C" fn weft_flow() -> i32 {
                $crate::rt::flow_ptr()
            }

            #[no_mangle]
            pub extern "C" fn weft_configure(ptr: i32, len: i32) -> i64 {
                $crate::rt::configure::<$ty>(&STATE, ptr, len)
            }

            $( $crate::__weft_entry!($entry, $ty, STATE); )+
        };
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __weft_entry {
    (policy, $ty:ty, $state:ident) => {
        #[no_mangle]
        pub extern "C" fn weft_policy() -> i64 {
            $crate::rt::policy::<$ty>(&$state)
        }
    };
    (route, $ty:ty, $state:ident) => {
        #[no_mangle]
        pub extern "C" fn weft_route() -> i64 {
            $crate::rt::route::<$ty>(&$state)
        }
    };
}
