//! `--ip-masq`: pods reach the world outside the cluster network through their node's address,
//! while pod-to-pod traffic keeps its addresses. The rules are flannel's, in an nftables table of
//! Weft's own (`ip weft`), so they never mix with anyone else's and go away in one step on
//! shutdown.

use std::io::Write;
use std::process::{Command, Stdio};

use ipnet::Ipv4Net;

/// Weft's table.
pub const TABLE: &str = "weft";

/// The ruleset (for `nft -f`) masquerading for `network`, this node holding `subnet`. Loading it
/// replaces any earlier version of the table atomically.
pub fn render(network: Ipv4Net, subnet: Ipv4Net) -> String {
    format!(
        "table ip {TABLE} {{}}
delete table ip {TABLE}
table ip {TABLE} {{
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    # Pod to pod, on any node: addresses kept.
    ip saddr {network} ip daddr {network} return
    # Pod to the outside world (but not to multicast): the node's address.
    ip saddr {network} ip daddr != 224.0.0.0/4 masquerade fully-random
    # The outside world to this node's pods: as is.
    ip saddr != {network} ip daddr {subnet} return
    # The outside world to other nodes' pods: through this node, so replies come back here.
    ip saddr != {network} ip daddr {network} masquerade fully-random
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    ip saddr {network} accept
    ip daddr {network} accept
  }}
}}
"
    )
}

/// Why the masquerading rules could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum MasqError {
    #[error("cannot run nft: {0} (install nftables)")]
    Spawn(std::io::Error),
    #[error("nft refused the masquerading rules: {0}")]
    Refused(String),
}

fn nft(script: &str) -> Result<(), MasqError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(MasqError::Spawn)?;
    if let Some(mut i) = child.stdin.take() {
        i.write_all(script.as_bytes()).map_err(MasqError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(MasqError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(MasqError::Refused(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// Installs (or replaces) the masquerading rules.
pub fn install(network: Ipv4Net, subnet: Ipv4Net) -> Result<(), MasqError> {
    nft(&render(network, subnet))
}

/// Removes Weft's table, if it is there.
pub fn remove() -> Result<(), MasqError> {
    nft(&format!("table ip {TABLE} {{}}\ndelete table ip {TABLE}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_to_pod_returns_before_anything_is_masqueraded() {
        let r = render("10.244.0.0/16".parse().unwrap(), "10.244.7.0/24".parse().unwrap());
        let ret = r
            .find("ip saddr 10.244.0.0/16 ip daddr 10.244.0.0/16 return")
            .expect("pod-to-pod rule");
        let masq = r.find("masquerade").expect("a masquerade rule");
        assert!(ret < masq, "{r}");
        assert!(r.contains("ip daddr != 224.0.0.0/4 masquerade"), "never multicast");
        assert!(r.contains("ip saddr != 10.244.0.0/16 ip daddr 10.244.7.0/24 return"));
        assert!(
            r.starts_with("table ip weft {}\ndelete table ip weft\n"),
            "replaces atomically"
        );
    }
}
