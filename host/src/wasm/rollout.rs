//! How far a module's current code has reached across the cluster: on which nodes holding a
//! lease it decides traffic, where it is pending or failed (and why), and where older code or
//! none still runs. `weft module add --wait` and `GET /modules/{name}/rollout` both answer from
//! this, over the leases and the nodes' stored reports, so one rule says when a change is in
//! force everywhere; `weft module rm --wait` asks [`Removal`] where a removed one still runs.
//! Leases, not report ages, say which nodes count: on Kubernetes a report entry is rewritten
//! only when it changes, so its age says nothing about the node.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use super::spec::{ModuleSpec, ModuleStatus, NodeStatus, FAILED, LOADED};

/// How many nodes a summary names in each list before it only counts the rest.
const NAMED: usize = 5;

/// One node and what it says about the module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeReason {
    /// The node (its PublicIP).
    pub node: String,
    /// Why the module is pending or failed there.
    pub reason: String,
}

/// Where one version of a module stands on the nodes that hold leases.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Rollout {
    /// The code this rollout is of.
    pub sha256: String,
    /// The spec's revision (code and settings) this rollout is of.
    pub revision: String,
    /// Nodes holding a lease.
    pub nodes: usize,
    /// Nodes where this code decides traffic.
    pub loaded: usize,
    /// Nodes where it loaded but the kernel path does not ask it yet.
    pub pending: Vec<NodeReason>,
    /// Nodes where it could not load: its failure policy decides there.
    pub failed: Vec<NodeReason>,
    /// Nodes whose agent reports, but not this code yet: they run older code, or none.
    pub behind: Vec<String>,
    /// Nodes holding a lease with no report at all: no Weft agent runs there (a flannel node,
    /// an agent down: a lease outlives its agent until it expires), or, on Kubernetes, whose
    /// agent has not loaded any module yet (a node running none has nothing to report).
    pub unreported: Vec<String>,
}

impl Rollout {
    /// The rollout of `spec` on `nodes` (the PublicIPs of the leases), from the nodes' last
    /// reports. Reports of nodes without a lease are not counted: the node is gone. A report
    /// without a revision (an agent older than revisions) counts by the code's sha256.
    pub fn of(spec: &ModuleSpec, nodes: &[String], reports: &[NodeStatus]) -> Self {
        let (name, sha256, revision) = (&spec.name, &spec.sha256, spec.revision());
        let runs_it = |m: &&ModuleStatus| {
            m.name == *name && m.sha256 == *sha256 && m.revision.as_ref().is_none_or(|r| *r == revision)
        };
        let mut r = Rollout {
            sha256: sha256.to_string(),
            revision: revision.clone(),
            nodes: nodes.len(),
            ..Rollout::default()
        };
        // One pass over the reports, then one lookup per node: 5,000 nodes cost 5,000 steps,
        // not 25 million comparisons.
        let by_node: HashMap<&str, &NodeStatus> = reports.iter().map(|r| (r.node.as_str(), r)).collect();
        for node in nodes {
            let Some(report) = by_node.get(node.as_str()) else {
                r.unreported.push(node.clone());
                continue;
            };
            let this = report.modules.iter().find(runs_it);
            let because = |m: &ModuleStatus| NodeReason {
                node: node.clone(),
                reason: m.error.clone().unwrap_or_else(|| m.state.clone()),
            };
            match this {
                Some(m) if m.state == LOADED => r.loaded += 1,
                Some(m) if m.state == FAILED => r.failed.push(because(m)),
                // Pending, or a state this build does not know: either way not in force.
                Some(m) => r.pending.push(because(m)),
                None => r.behind.push(node.clone()),
            }
        }
        r
    }

    /// Every node runs this code in force (and there is at least one node: a module stored
    /// before any agent runs is in force nowhere).
    pub fn complete(&self) -> bool {
        self.nodes > 0 && self.loaded == self.nodes
    }

    /// One line saying how far the rollout is and what holds it up.
    pub fn summary(&self) -> String {
        let mut parts = vec![format!("loaded on {} of {} node(s)", self.loaded, self.nodes)];
        parts.extend(self.holdups());
        parts.join("; ")
    }

    /// What holds the rollout up, one phrase per kind of node (failed, pending, behind, no
    /// report), each naming its first few nodes; empty when nothing does.
    pub fn holdups(&self) -> Vec<String> {
        let why =
            |v: &[NodeReason]| -> Vec<String> { v.iter().map(|n| format!("{} ({})", n.node, n.reason)).collect() };
        [
            ("failed on", why(&self.failed)),
            ("pending on", why(&self.pending)),
            ("not running it yet:", self.behind.clone()),
            ("no report from a Weft agent:", self.unreported.clone()),
        ]
        .into_iter()
        .filter(|(_, nodes)| !nodes.is_empty())
        .map(|(label, nodes)| format!("{label} {}", named(&nodes)))
        .collect()
    }
}

/// Where a removed module still has effect, among the nodes holding a lease: those whose last
/// report still lists it, in any state (a module that failed there still decides by its failure
/// policy). A node reports the chain without it once that chain is in force, so a node that
/// no longer lists it no longer runs it. A node that never reported runs nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Removal {
    /// Nodes holding a lease.
    pub nodes: usize,
    /// Nodes still listing the module.
    pub still: Vec<String>,
}

impl Removal {
    /// The removal of module `name` on `nodes` (the PublicIPs of the leases), from the nodes'
    /// last reports.
    pub fn of(name: &str, nodes: &[String], reports: &[NodeStatus]) -> Self {
        let listing: HashSet<&str> = reports
            .iter()
            .filter(|r| r.modules.iter().any(|m| m.name == name))
            .map(|r| r.node.as_str())
            .collect();
        Removal {
            nodes: nodes.len(),
            still: nodes.iter().filter(|n| listing.contains(n.as_str())).cloned().collect(),
        }
    }

    /// No node holding a lease runs it any more.
    pub fn complete(&self) -> bool {
        self.still.is_empty()
    }

    /// One line: how far the removal is, and where it still runs.
    pub fn summary(&self) -> String {
        let done = format!(
            "removed from {} of {} node(s)",
            self.nodes - self.still.len(),
            self.nodes
        );
        match self.still.is_empty() {
            true => done,
            false => format!("{done}; still running it: {}", named(&self.still)),
        }
    }
}

/// The first few of `items`, and how many more: a summary of 5,000 nodes stays one line.
fn named(items: &[String]) -> String {
    let shown = items[..items.len().min(NAMED)].join(", ");
    match items.len().saturating_sub(NAMED) {
        0 => shown,
        more => format!("{shown} and {more} more"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wasm::spec::PENDING;

    fn spec(code: &[u8], config: &str) -> ModuleSpec {
        ModuleSpec::new("fw", code, config.into())
    }

    /// A node's report that it runs `s` in `state`.
    fn runs(s: &ModuleSpec, state: &str, error: Option<&str>) -> ModuleStatus {
        ModuleStatus {
            name: s.name.clone(),
            sha256: s.sha256.clone(),
            revision: Some(s.revision()),
            state: state.into(),
            error: error.map(str::to_string),
        }
    }

    fn report(node: &str, modules: Vec<ModuleStatus>) -> NodeStatus {
        NodeStatus {
            node: node.into(),
            updated: 0,
            modules,
        }
    }

    fn nodes(ips: &[&str]) -> Vec<String> {
        ips.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_removal_waits_for_every_node_that_still_lists_the_module_in_any_state() {
        let fw = spec(b"fw", "{}");
        let other = ModuleSpec::new("other", b"x", "{}".into());
        let reports = [
            report("10.0.0.1", vec![runs(&other, LOADED, None)]),
            report("10.0.0.2", vec![runs(&fw, LOADED, None)]),
            report("10.0.0.3", vec![runs(&fw, FAILED, Some("untrusted key"))]),
            report("10.0.0.9", vec![runs(&fw, LOADED, None)]),
        ];
        let ips = nodes(&["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]);
        let r = Removal::of("fw", &ips, &reports);
        assert_eq!(
            r.still,
            ["10.0.0.2", "10.0.0.3"],
            "10.0.0.9 holds no lease; 10.0.0.4 never reported"
        );
        assert!(!r.complete());
        assert_eq!(
            r.summary(),
            "removed from 2 of 4 node(s); still running it: 10.0.0.2, 10.0.0.3"
        );
        let gone = [report("10.0.0.2", vec![runs(&other, LOADED, None)])];
        let r = Removal::of("fw", &ips, &gone);
        assert!(r.complete());
        assert_eq!(r.summary(), "removed from 4 of 4 node(s)");
    }

    #[test]
    fn each_node_is_counted_where_it_stands() {
        let new = spec(b"new", "{}");
        let old = spec(b"old", "{}");
        let other = ModuleSpec::new("other", b"new", "{}".into());
        let reports = [
            report("10.0.0.1", vec![runs(&new, LOADED, None)]),
            report("10.0.0.2", vec![runs(&new, PENDING, Some("cannot bind NFQUEUE 8472"))]),
            report("10.0.0.3", vec![runs(&new, FAILED, Some("untrusted key"))]),
            report("10.0.0.4", vec![runs(&old, LOADED, None)]),
            report("10.0.0.5", vec![runs(&other, LOADED, None)]),
            report("10.0.0.7", vec![runs(&new, LOADED, None)]),
        ];
        let ips = nodes(&["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"]);
        let r = Rollout::of(&new, &ips, &reports);
        assert_eq!((r.nodes, r.loaded), (6, 1), "10.0.0.7 holds no lease: not counted");
        assert_eq!(r.pending[0].reason, "cannot bind NFQUEUE 8472");
        assert_eq!(r.failed[0].node, "10.0.0.3");
        assert_eq!(r.behind, ["10.0.0.4", "10.0.0.5"]);
        assert_eq!(r.unreported, ["10.0.0.6"], "a lease whose node never reported");
        assert!(!r.complete());
        let s = r.summary();
        assert!(s.starts_with("loaded on 1 of 6 node(s)"), "{s}");
        assert!(s.contains("failed on 10.0.0.3 (untrusted key)"), "{s}");
        assert!(s.contains("pending on 10.0.0.2 (cannot bind NFQUEUE 8472)"), "{s}");
        assert!(s.contains("not running it yet: 10.0.0.4, 10.0.0.5;"), "{s}");
        assert!(s.contains("no report from a Weft agent: 10.0.0.6"), "{s}");
        assert_eq!(r.holdups().len(), 4, "one phrase per kind of node: {:?}", r.holdups());
    }

    #[test]
    fn a_node_on_the_same_code_with_the_old_config_is_behind() {
        let before = spec(b"code", r#"{"rules":[]}"#);
        let after = spec(b"code", r#"{"rules":[{"action":"deny"}]}"#);
        let reports = [report("10.0.0.1", vec![runs(&before, LOADED, None)])];
        let r = Rollout::of(&after, &nodes(&["10.0.0.1"]), &reports);
        assert_eq!(r.behind, ["10.0.0.1"]);
        let older_agent = ModuleStatus {
            revision: None,
            ..runs(&before, LOADED, None)
        };
        let r = Rollout::of(&after, &nodes(&["10.0.0.1"]), &[report("10.0.0.1", vec![older_agent])]);
        assert!(r.complete(), "an agent without revisions is judged by the code alone");
    }

    #[test]
    fn complete_once_every_node_runs_it_in_force() {
        let new = spec(b"new", "{}");
        let mut reports = vec![
            report("10.0.0.1", vec![runs(&new, LOADED, None)]),
            report("10.0.0.2", vec![runs(&new, PENDING, None)]),
        ];
        let ips = nodes(&["10.0.0.1", "10.0.0.2"]);
        let r = Rollout::of(&new, &ips, &reports);
        assert!(!r.complete());
        assert_eq!(
            r.pending[0].reason, "pending",
            "a pending node without a reason says so"
        );
        reports[1] = report("10.0.0.2", vec![runs(&new, LOADED, None)]);
        let r = Rollout::of(&new, &ips, &reports);
        assert!(r.complete(), "{}", r.summary());
        assert!(r.holdups().is_empty(), "nothing holds up a complete rollout");
        assert!(!Rollout::of(&new, &[], &[]).complete(), "no node runs it");
    }

    #[test]
    fn a_summary_of_thousands_of_nodes_stays_short() {
        let ips: Vec<String> = (0..5000).map(|i| format!("10.1.{}.{}", i / 250, i % 250)).collect();
        let s = Rollout::of(&spec(b"new", "{}"), &ips, &[]).summary();
        assert!(s.ends_with("and 4995 more"), "{s}");
        assert!(s.len() < 200, "{s}");
    }
}
