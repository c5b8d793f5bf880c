//! How far the module chain is in force on a path the workers do not serve themselves, so
//! that a node reports a module as `loaded` only once traffic is actually decided by it.
//!
//! The userspace workers pick up a new chain before their next packet: there a module is in
//! force as soon as the chain holds it. On the kernel paths (`vxlan`, `host-gw`) it is in force
//! only once netfilter queues new flows to the agent, which the kernel path's rules thread
//! arranges after the chain changed (an `iptables-restore` away, longer on a loaded node). A
//! report written before that would tell an operator, or a script waiting for `loaded`, that a
//! firewall blocks what still passes; so such a module reads `pending` until the rules are in,
//! with the reason when they cannot be installed.
//!
//! The kernel's maps of known services (`nfq::known`) are emptied by their own thread, woken by
//! the same change of the chain: one netlink batch, done long before a report is written and
//! read, so they are not waited for here.

use tokio::sync::watch;

use super::spec::{ModuleStatus, LOADED, PENDING};

/// Where the kernel path stands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Enforcement {
    /// Whether something outside the workers must apply the chain (a kernel path's rules).
    pub required: bool,
    /// The newest chain generation it applies.
    pub generation: u64,
    /// Why it does not apply a newer one; cleared when it catches up.
    pub error: Option<String>,
}

impl Enforcement {
    /// Whether the chain of `generation` decides traffic.
    pub fn in_force(&self, generation: u64) -> bool {
        !self.required || (self.generation >= generation && self.error.is_none())
    }

    /// `statuses`, as the chain of `generation` loaded them, as a node reports them: the ones
    /// that loaded are `pending` while that chain is not in force.
    pub fn report(&self, generation: u64, statuses: &[ModuleStatus]) -> Vec<ModuleStatus> {
        if self.in_force(generation) {
            return statuses.to_vec();
        }
        let why = match &self.error {
            Some(e) => format!("loaded, but not in force on the kernel path: {e}"),
            None => "loaded; the kernel path's rules are being installed".to_string(),
        };
        statuses
            .iter()
            .map(|s| match s.state.as_str() {
                LOADED => ModuleStatus {
                    state: PENDING.into(),
                    error: Some(why.clone()),
                    ..s.clone()
                },
                _ => s.clone(),
            })
            .collect()
    }
}

/// The shared record of [`Enforcement`], written by the kernel path and watched by the
/// registry, which reports again when it changes.
#[derive(Debug)]
pub struct Enforcer(watch::Sender<Enforcement>);

impl Default for Enforcer {
    fn default() -> Self {
        Enforcer(watch::Sender::new(Enforcement::default()))
    }
}

impl Enforcer {
    /// Where it stands now.
    pub fn current(&self) -> Enforcement {
        self.0.borrow().clone()
    }

    /// A receiver that wakes on every change.
    pub fn subscribe(&self) -> watch::Receiver<Enforcement> {
        self.0.subscribe()
    }

    /// The chain of `generation` (and every older one) is in force.
    pub fn applied(&self, generation: u64) {
        self.0.send_if_modified(|e| {
            let before = e.clone();
            e.required = true;
            e.generation = e.generation.max(generation);
            e.error = None;
            *e != before
        });
    }

    /// Newer chains are not in force, for `why`.
    pub fn failed(&self, why: String) {
        self.0.send_if_modified(|e| {
            let changed = !e.required || e.error.as_deref() != Some(why.as_str());
            e.required = true;
            e.error = Some(why);
            changed
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loaded(name: &str) -> ModuleStatus {
        ModuleStatus {
            name: name.into(),
            sha256: "ab".into(),
            revision: None,
            state: "loaded".into(),
            error: None,
        }
    }

    #[test]
    fn without_a_kernel_path_a_loaded_module_is_in_force() {
        let e = Enforcer::default();
        assert_eq!(e.current().report(7, &[loaded("fw")]), vec![loaded("fw")]);
    }

    #[test]
    fn a_module_is_pending_until_its_generation_is_applied() {
        let e = Enforcer::default();
        e.applied(3);
        let failed = ModuleStatus {
            state: "failed".into(),
            error: Some("bad".into()),
            ..loaded("broken")
        };
        let r = e.current().report(4, &[loaded("fw"), failed.clone()]);
        assert_eq!(r[0].state, PENDING);
        assert!(r[0].error.as_deref().unwrap_or("").contains("being installed"), "{r:?}");
        assert_eq!(r[1], failed, "a failed module stays failed");
        e.applied(5);
        assert_eq!(e.current().report(4, &[loaded("fw")]), vec![loaded("fw")]);
    }

    #[test]
    fn a_failure_is_reported_until_the_path_catches_up() {
        let e = Enforcer::default();
        let mut rx = e.subscribe();
        e.applied(2);
        e.failed("iptables-restore refused the rules: nope".into());
        assert!(rx.has_changed().unwrap_or(false));
        let r = e.current().report(2, &[loaded("fw")]);
        assert_eq!(r[0].state, PENDING);
        assert!(r[0].error.as_deref().unwrap_or("").contains("nope"), "{r:?}");
        rx.mark_unchanged();
        e.failed("iptables-restore refused the rules: nope".into());
        assert!(!rx.has_changed().unwrap_or(true), "the same failure again wakes nobody");
        e.applied(2);
        assert!(rx.has_changed().unwrap_or(false));
        assert!(e.current().in_force(2));
    }
}
