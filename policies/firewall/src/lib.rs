//! An L4 firewall driven by JSON config: ordered rules matching direction, protocol, source and
//! destination CIDRs and destination ports; the first matching rule decides, else the default.
//!
//! ```json
//! {"default": "allow",
//!  "rules": [{"action": "deny", "protocol": "tcp", "dst": ["10.244.0.0/16"], "ports": ["5201"]},
//!            {"action": "log", "direction": "ingress", "protocol": "udp", "ports": ["53"]}]}
//! ```
//!
//! No rule looks at source ports, so every verdict holds for any source port of its source,
//! and for any source at all when no rule up to the deciding one names sources: the host then
//! decides a service's later connections without asking (on kernel paths, the kernel does).
//! `"per_flow": true` has every flow asked (to count or trace each one).

use serde::Deserialize;
use weft_guest::net::{protocol_number, Cidr, PortRange};
use weft_guest::{Decision, Direction, Flow, Module};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "allow")]
    default: String,
    #[serde(default)]
    rules: Vec<RuleConfig>,
    #[serde(default)]
    per_flow: bool,
}

fn allow() -> String {
    "allow".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleConfig {
    action: String,
    #[serde(default)]
    direction: Option<String>,
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default)]
    src: Vec<String>,
    #[serde(default)]
    dst: Vec<String>,
    #[serde(default)]
    ports: Vec<serde_json::Value>,
}

#[derive(Debug)]
struct Rule {
    decision: Decision,
    direction: Option<Direction>,
    protocol: Option<u8>,
    src: Vec<Cidr>,
    dst: Vec<Cidr>,
    ports: Vec<PortRange>,
}

impl Rule {
    fn matches(&self, f: &Flow) -> bool {
        self.direction.is_none_or(|d| d == f.direction())
            && self.protocol.is_none_or(|p| p == f.protocol())
            && (self.src.is_empty() || self.src.iter().any(|c| c.contains(f.src())))
            && (self.dst.is_empty() || self.dst.iter().any(|c| c.contains(f.dst())))
            && (self.ports.is_empty()
                || ((f.is_tcp() || f.is_udp()) && self.ports.iter().any(|r| r.contains(f.dst_port()))))
    }
}

fn decision(action: &str) -> Result<Decision, String> {
    match action {
        "allow" => Ok(Decision::allow()),
        "deny" | "drop" => Ok(Decision::drop()),
        "log" => Ok(Decision::allow_and_log()),
        other => Err(format!("unknown action {other:?} (allow, deny or log)")),
    }
}

/// The firewall: its rules in order and the default verdict.
pub struct Firewall {
    rules: Vec<Rule>,
    default: Decision,
    /// `sourced[i]`: some rule among the first `i` names sources (the last entry: any rule).
    sourced: Vec<bool>,
    per_flow: bool,
}

impl Firewall {
    fn parse(config: &[u8]) -> Result<Firewall, String> {
        let c: Config = serde_json::from_slice(config).map_err(|e| format!("firewall config: {e}"))?;
        let mut rules = Vec::with_capacity(c.rules.len());
        for (i, r) in c.rules.into_iter().enumerate() {
            let at = |e: String| format!("rule {i}: {e}");
            let direction = match r.direction.as_deref() {
                None | Some("both") => None,
                Some("egress") => Some(Direction::Egress),
                Some("ingress") => Some(Direction::Ingress),
                Some(other) => return Err(at(format!("unknown direction {other:?}"))),
            };
            let protocol = match r.protocol.as_deref() {
                None => None,
                Some(p) => protocol_number(p).map_err(at)?,
            };
            let cidrs = |v: &[String]| v.iter().map(|s| Cidr::parse(s)).collect::<Result<Vec<_>, _>>();
            let ports = r
                .ports
                .iter()
                .map(|p| match p {
                    serde_json::Value::Number(n) => n
                        .as_u64()
                        .and_then(|n| u16::try_from(n).ok())
                        .map(PortRange::one)
                        .ok_or_else(|| format!("bad port {n}")),
                    serde_json::Value::String(s) => PortRange::parse(s),
                    other => Err(format!("bad port {other}")),
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(at)?;
            if !ports.is_empty() && protocol.is_some_and(|p| p != weft_guest::TCP && p != weft_guest::UDP) {
                return Err(at("ports only apply to tcp and udp".into()));
            }
            rules.push(Rule {
                decision: decision(&r.action).map_err(at)?,
                direction,
                protocol,
                src: cidrs(&r.src).map_err(at)?,
                dst: cidrs(&r.dst).map_err(at)?,
                ports,
            });
        }
        let sourced = std::iter::once(false)
            .chain(rules.iter().scan(false, |any, r| {
                *any |= !r.src.is_empty();
                Some(*any)
            }))
            .collect();
        Ok(Firewall {
            rules,
            default: decision(&c.default).map_err(|e| format!("default: {e}"))?,
            sourced,
            per_flow: c.per_flow,
        })
    }
}

impl Module for Firewall {
    fn configure(config: &[u8]) -> Result<Self, String> {
        Firewall::parse(config)
    }

    fn policy(&mut self, flow: &Flow) -> Decision {
        let (examined, d) = match self.rules.iter().position(|r| r.matches(flow)) {
            Some(i) => (i + 1, self.rules[i].decision),
            None => (self.rules.len(), self.default),
        };
        if self.per_flow {
            d
        } else if self.sourced[examined] {
            // A rule with sources was looked at: another source could have matched it.
            d.for_any_source_port()
        } else {
            d.for_any_source()
        }
    }
}

weft_guest::export!(Firewall: policy);

#[cfg(test)]
mod tests {
    use super::*;

    fn fw(json: &str) -> Firewall {
        Firewall::configure(json.as_bytes()).unwrap()
    }

    fn tcp(dport: u16) -> Flow {
        Flow::builder()
            .tcp(
                "10.244.1.5".parse().unwrap(),
                40000,
                "10.244.2.7".parse().unwrap(),
                dport,
            )
            .build()
    }

    #[test]
    fn first_matching_rule_wins_else_default() {
        let mut f = fw(r#"{"rules":[
            {"action":"allow","protocol":"tcp","ports":[5202]},
            {"action":"deny","protocol":"tcp","dst":["10.244.0.0/16"],"ports":["5200-5210"]}]}"#);
        assert_eq!(f.policy(&tcp(5201)), Decision::drop().for_any_source());
        assert_eq!(f.policy(&tcp(5202)), Decision::allow().for_any_source());
        assert_eq!(f.policy(&tcp(80)), Decision::allow().for_any_source());
        let ping = Flow::builder()
            .ping("10.244.1.5".parse().unwrap(), "10.244.2.7".parse().unwrap())
            .build();
        assert!(f.policy(&ping).allows(), "ports never match ICMP");
    }

    #[test]
    fn default_deny_with_direction_and_source_lists() {
        let mut f = fw(r#"{"default":"deny","rules":[
            {"action":"log","direction":"ingress","src":["10.244.1.0/24"]}]}"#);
        let t = tcp(22);
        assert_eq!(
            f.policy(&t),
            Decision::drop().for_any_source_port(),
            "egress is not matched by an ingress rule (which names sources)"
        );
        let ingress = Flow::builder()
            .tcp("10.244.1.5".parse().unwrap(), 1, "10.244.2.7".parse().unwrap(), 22)
            .ingress()
            .build();
        assert_eq!(f.policy(&ingress), Decision::allow_and_log().for_any_source_port());
    }

    #[test]
    fn verdicts_hold_for_every_source_the_rules_looked_at_could_not_tell_apart() {
        let mut f = fw(r#"{"rules":[
            {"action":"deny","protocol":"tcp","ports":[23]},
            {"action":"deny","src":["10.244.9.0/24"],"ports":[80]},
            {"action":"allow","protocol":"tcp","ports":[80]}]}"#);
        // Decided before any rule with sources: the same for anyone.
        assert_eq!(f.policy(&tcp(23)).scope(), weft_guest::abi::scope::ANY_SOURCE);
        // Decided after one: another source may have matched it, another source port not.
        assert_eq!(f.policy(&tcp(80)), Decision::allow().for_any_source_port());
        assert_eq!(f.policy(&tcp(443)).scope(), weft_guest::abi::scope::ANY_SOURCE_PORT);
        let mut per_flow = fw(r#"{"per_flow":true,"rules":[{"action":"deny","ports":[23]}]}"#);
        assert_eq!(per_flow.policy(&tcp(23)), Decision::drop());
        assert_eq!(per_flow.policy(&tcp(80)), Decision::allow());
        let mut empty = fw("{}");
        assert_eq!(empty.policy(&tcp(1)), Decision::allow().for_any_source());
    }

    #[test]
    fn bad_configs_are_rejected_with_the_reason() {
        for (json, needle) in [
            ("not json", "firewall config"),
            (r#"{"rules":[{"action":"maybe"}]}"#, "rule 0: unknown action"),
            (
                r#"{"rules":[{"action":"deny","src":["10.0.0.0/40"]}]}"#,
                "prefix length",
            ),
            (
                r#"{"rules":[{"action":"deny","protocol":"icmp","ports":[1]}]}"#,
                "only apply",
            ),
            (r#"{"rules":[{"action":"deny","ports":[70000]}]}"#, "bad port"),
            (r#"{"rulez":[]}"#, "unknown field"),
        ] {
            let err = Firewall::configure(json.as_bytes()).err().unwrap();
            assert!(err.contains(needle), "{json}: {err}");
        }
    }
}
