//! The netfilter rules that send each new flow's first packet to the agent, in Weft's own
//! chain of the `filter` table's FORWARD hook. They are xtables rules (loaded through
//! `iptables-restore`, the nf_tables flavour where the system has it) because kernels built
//! without `CONFIG_NFT_QUEUE` have no nftables `queue` expression while the xtables NFQUEUE
//! target still works through `NFT_COMPAT`.
//!
//! A verdict is remembered in the connection's mark: the agent answers NF_REPEAT with the
//! packet mark set, the hook runs again, the first rule copies the packet mark into the
//! connection mark, and every later packet of that connection matches the `connmark` rule and
//! never leaves the kernel. Denied packets are dropped, so their connection is never confirmed
//! and nothing is remembered in the kernel: a retried connection is queued again and answered
//! from the agent's verdict cache.

use std::io::Write;
use std::process::{Command, Stdio};

use ipnet::Ipv4Net;

/// Weft's chain.
pub const CHAIN: &str = "WEFT-POLICY";
/// The mark bits Weft owns (both the packet and the connection mark).
pub const MASK: u32 = 0x0030_0000;
/// The mark of an allowed flow.
pub const ALLOW: u32 = 0x0010_0000;

/// What the chain holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleSet {
    /// The cluster network: only traffic from it and to it is looked at.
    pub network: Ipv4Net,
    /// The first queue number, when a module chain is loaded (else new flows pass unasked).
    pub queue: Option<u16>,
    /// Queues from `queue` on that share the flows (`--queue-balance`), one agent thread each.
    pub queues: u16,
    /// Whether packets pass when no agent listens on the queue (every module fail-open).
    pub bypass: bool,
}

/// The `iptables-restore --noflush` input that makes the chain hold `set`.
pub fn render(set: &RuleSet) -> String {
    let net = set.network;
    let mut s = String::from("*filter\n");
    // Declaring the chain flushes it: each load replaces the whole chain at once.
    s.push_str(&format!(":{CHAIN} - [0:0]\n"));
    // Established packets of allowed flows, nearly all of them, match the first rule and leave.
    s.push_str(&format!(
        "-A {CHAIN} -m connmark --mark {ALLOW:#x}/{MASK:#x} -j RETURN\n"
    ));
    // A packet the agent allowed comes back (NF_REPEAT) with the packet mark: remember it in the
    // connection and let it go, never to the queue a second time.
    s.push_str(&format!(
        "-A {CHAIN} -m mark --mark {ALLOW:#x}/{MASK:#x} -j CONNMARK --save-mark --nfmask {MASK:#x} --ctmask {MASK:#x}\n"
    ));
    s.push_str(&format!("-A {CHAIN} -m mark --mark {ALLOW:#x}/{MASK:#x} -j RETURN\n"));
    if let Some(q) = set.queue {
        let bypass = if set.bypass { " --queue-bypass" } else { "" };
        // Several queues share flows by hash, each flow always on the same one.
        let target = match set.queues {
            0 | 1 => format!("--queue-num {q}"),
            n => format!("--queue-balance {q}:{}", u32::from(q) + u32::from(n) - 1),
        };
        s.push_str(&format!(
            "-A {CHAIN} -s {net} -m conntrack --ctstate NEW -j NFQUEUE {target}{bypass}\n"
        ));
        s.push_str(&format!(
            "-A {CHAIN} -d {net} -m conntrack --ctstate NEW -j NFQUEUE {target}{bypass}\n"
        ));
    }
    s.push_str("COMMIT\n");
    s
}

/// Why the rules could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("cannot run {cmd}: {source} (install iptables and nftables)")]
    Spawn { cmd: &'static str, source: std::io::Error },
    #[error("{cmd} refused the rules: {stderr}")]
    Refused { cmd: &'static str, stderr: String },
}

/// Runs `cmd` with `args`, `input` on its standard input: false when it fails without input
/// (a check), an error naming its complaint when it refuses input.
pub fn run(cmd: &'static str, args: &[&str], input: Option<&str>) -> Result<bool, RulesError> {
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| RulesError::Spawn { cmd, source })?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .map_err(|source| RulesError::Spawn { cmd, source })?;
    }
    let out = child
        .wait_with_output()
        .map_err(|source| RulesError::Spawn { cmd, source })?;
    if out.status.success() {
        return Ok(true);
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if input.is_some() {
        return Err(RulesError::Refused { cmd, stderr });
    }
    Ok(false)
}

/// Installs `set`: the chain, then (once) the jump to it at the top of FORWARD. With no queue
/// (no module loaded) there is nothing to ask, so nothing is installed at all: the forwarding
/// path then pays for no rule and no connection tracking.
pub fn install(set: &RuleSet) -> Result<(), RulesError> {
    if set.queue.is_none() {
        return remove();
    }
    run("iptables-restore", &["-w", "5", "--noflush"], Some(&render(set)))?;
    if !run("iptables", &["-w", "5", "-C", "FORWARD", "-j", CHAIN], None)? {
        run(
            "iptables-restore",
            &["-w", "5", "--noflush"],
            Some(&format!("*filter\n-I FORWARD 1 -j {CHAIN}\nCOMMIT\n")),
        )?;
    }
    Ok(())
}

/// Removes the jump and the chain.
pub fn remove() -> Result<(), RulesError> {
    while run("iptables", &["-w", "5", "-D", "FORWARD", "-j", CHAIN], None)? {}
    run("iptables", &["-w", "5", "-F", CHAIN], None)?;
    run("iptables", &["-w", "5", "-X", CHAIN], None)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_flows_return_before_anything_is_queued() {
        let text = render(&RuleSet {
            network: "10.244.0.0/16".parse().unwrap(),
            queue: Some(8472),
            queues: 1,
            bypass: false,
        });
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[1], ":WEFT-POLICY - [0:0]");
        assert!(
            lines[2].contains("connmark --mark 0x100000/0x300000 -j RETURN"),
            "{text}"
        );
        assert!(lines[3].contains("CONNMARK --save-mark"), "{text}");
        assert!(
            lines[4].contains("-m mark --mark 0x100000/0x300000 -j RETURN"),
            "{text}"
        );
        assert!(lines[5].contains("-s 10.244.0.0/16 -m conntrack --ctstate NEW -j NFQUEUE --queue-num 8472"));
        assert!(!text.contains("--queue-bypass"), "fail-closed: no agent, no new flows");
        assert_eq!(lines.last(), Some(&"COMMIT"));
    }

    #[test]
    fn fail_open_bypasses_and_no_modules_queue_nothing() {
        let mut set = RuleSet {
            network: "10.244.0.0/16".parse().unwrap(),
            queue: Some(1),
            queues: 1,
            bypass: true,
        };
        assert!(render(&set).contains("--queue-num 1 --queue-bypass"));
        set.queue = None;
        assert!(!render(&set).contains("NFQUEUE"));
    }

    #[test]
    fn several_queues_share_flows_by_hash() {
        let set = RuleSet {
            network: "10.244.0.0/16".parse().unwrap(),
            queue: Some(8472),
            queues: 2,
            bypass: false,
        };
        assert!(
            render(&set).contains("-j NFQUEUE --queue-balance 8472:8473\n"),
            "{}",
            render(&set)
        );
    }
}
