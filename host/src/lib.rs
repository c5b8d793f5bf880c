//! Weft: a flannel-compatible overlay network agent.

pub mod admin;
pub mod agent;
pub mod api;
pub mod atomic;
pub mod backend;
pub mod client;
pub mod clock;
pub mod cni;
pub mod config;
pub mod dashboard;
pub mod follower;
pub mod iface;
pub mod lab;
pub mod lease;
pub mod masq;
pub mod nfq;
pub mod packet;
pub mod state;
pub mod stats;
pub mod store;
pub mod subnet;
pub mod subnet_file;
pub mod tls;
pub mod tunnel;
pub mod wasm;

#[cfg(test)]
mod fuzz;
