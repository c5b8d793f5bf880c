//! Tenant isolation: named groups of subnets or addresses whose members may only talk inside
//! their group. Traffic between two addresses in no group follows `unlisted` (allow by default).
//!
//! ```json
//! {"groups": {"blue": ["10.244.1.0/24"], "red": ["10.244.2.0/24", "10.244.3.9"]},
//!  "unlisted": "allow"}
//! ```

use std::collections::BTreeMap;

use serde::Deserialize;
use weft_guest::host::Counter;
use weft_guest::net::Cidr;
use weft_guest::{Decision, Flow, Module};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    groups: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    unlisted: Option<String>,
}

/// The groups, as bit positions, and what to do with ungrouped traffic.
pub struct Tenants {
    members: Vec<(Cidr, u64)>,
    unlisted_allowed: bool,
    denied: Counter,
}

impl Tenants {
    /// The set of groups (one bit each) `a` belongs to.
    fn groups_of(&self, a: std::net::Ipv4Addr) -> u64 {
        self.members
            .iter()
            .filter(|(c, _)| c.contains(a))
            .fold(0, |acc, (_, g)| acc | g)
    }
}

impl Module for Tenants {
    fn configure(config: &[u8]) -> Result<Self, String> {
        let c: Config = serde_json::from_slice(config).map_err(|e| format!("tenants config: {e}"))?;
        if c.groups.len() > 64 {
            return Err(format!("{} groups; at most 64 are supported", c.groups.len()));
        }
        let mut members = Vec::new();
        for (i, (name, cidrs)) in c.groups.iter().enumerate() {
            if cidrs.is_empty() {
                return Err(format!("group {name:?} has no members"));
            }
            for s in cidrs {
                members.push((Cidr::parse(s).map_err(|e| format!("group {name:?}: {e}"))?, 1u64 << i));
            }
        }
        let unlisted_allowed = match c.unlisted.as_deref() {
            None | Some("allow") => true,
            Some("deny") => false,
            Some(other) => return Err(format!("unlisted: {other:?} is neither allow nor deny")),
        };
        Ok(Tenants {
            members,
            unlisted_allowed,
            denied: Counter::new("cross_tenant_denied"),
        })
    }

    fn policy(&mut self, flow: &Flow) -> Decision {
        let (s, d) = (self.groups_of(flow.src()), self.groups_of(flow.dst()));
        let allowed = if s == 0 && d == 0 {
            self.unlisted_allowed
        } else {
            s & d != 0
        };
        if allowed {
            Decision::allow()
        } else {
            self.denied.inc();
            Decision::drop()
        }
    }
}

weft_guest::export!(Tenants: policy);

#[cfg(test)]
mod tests {
    use super::*;
    use weft_guest::testing;

    fn flow(src: &str, dst: &str) -> Flow {
        Flow::builder()
            .tcp(src.parse().unwrap(), 1000, dst.parse().unwrap(), 80)
            .build()
    }

    #[test]
    fn members_talk_inside_their_group_only() {
        testing::reset();
        let mut t =
            Tenants::configure(br#"{"groups":{"blue":["10.244.1.0/24","10.244.3.9"],"red":["10.244.2.0/24"]}}"#)
                .unwrap();
        assert!(t.policy(&flow("10.244.1.5", "10.244.3.9")).allows());
        assert!(!t.policy(&flow("10.244.1.5", "10.244.2.7")).allows());
        assert!(!t.policy(&flow("10.244.3.9", "10.244.2.7")).allows());
        assert!(
            !t.policy(&flow("10.244.2.7", "10.244.4.1")).allows(),
            "a member may not reach the unlisted"
        );
        assert!(
            t.policy(&flow("10.244.4.1", "10.244.5.1")).allows(),
            "unlisted to unlisted follows `unlisted`"
        );
        assert_eq!(testing::counter("cross_tenant_denied"), 3);
    }

    #[test]
    fn shared_members_reach_both_groups_and_unlisted_can_be_denied() {
        testing::reset();
        let mut t = Tenants::configure(
            br#"{"groups":{"a":["10.0.1.0/24","10.0.9.9"],"b":["10.0.2.0/24","10.0.9.9"]},"unlisted":"deny"}"#,
        )
        .unwrap();
        assert!(t.policy(&flow("10.0.1.1", "10.0.9.9")).allows());
        assert!(t.policy(&flow("10.0.2.1", "10.0.9.9")).allows());
        assert!(!t.policy(&flow("10.0.1.1", "10.0.2.1")).allows());
        assert!(!t.policy(&flow("10.0.7.1", "10.0.8.1")).allows());
    }

    #[test]
    fn bad_configs_are_rejected() {
        for json in [
            r#"{}"#,
            r#"{"groups":{"a":[]}}"#,
            r#"{"groups":{"a":["x"]}}"#,
            r#"{"groups":{},"unlisted":"maybe"}"#,
        ] {
            assert!(Tenants::configure(json.as_bytes()).is_err(), "{json}");
        }
    }
}
