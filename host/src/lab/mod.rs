//! A lab of network namespaces: the local multi-node cluster used by `weft demo`, the
//! integration tests and the benchmarks. Host plumbing goes through `ip` here on purpose: this
//! builds test hosts, it is not the agent's data path.

pub mod cluster;
pub mod demo;
pub mod http;
pub mod netns;
pub mod probe;

/// Errors building or using a lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("`{cmd}` failed: {stderr}")]
    Command { cmd: String, stderr: String },
    #[error("cannot run `{cmd}`: {source} (is iproute2 installed?)")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("network namespace {ns}: {source}")]
    Netns { ns: String, source: std::io::Error },
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    Probe(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}
