//! An audit module: allows everything, counts new flows by protocol and direction, and logs one
//! in `one_in` of them (deterministically, by arrival order, so a burst cannot hide).
//!
//! ```json
//! {"one_in": 100}
//! ```

use serde::Deserialize;
use weft_guest::host::{self, Counter, Level};
use weft_guest::{Decision, Direction, Flow, Module};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "hundred")]
    one_in: u64,
}

fn hundred() -> u64 {
    100
}

/// The audit module's counters and its place in the sampling cycle.
pub struct Audit {
    one_in: u64,
    seen: u64,
    by_kind: [Counter; 6],
    sampled: Counter,
}

fn kind_index(f: &Flow) -> usize {
    let p = match f.protocol() {
        weft_guest::TCP => 0,
        weft_guest::UDP => 1,
        _ => 2,
    };
    p * 2 + usize::from(f.direction() == Direction::Ingress)
}

/// A one-line description of a flow, as the log shows it.
pub fn describe(f: &Flow) -> String {
    let proto = match f.protocol() {
        weft_guest::TCP => "tcp".to_string(),
        weft_guest::UDP => "udp".to_string(),
        weft_guest::ICMP => "icmp".to_string(),
        n => format!("proto-{n}"),
    };
    let dir = match f.direction() {
        Direction::Egress => "egress",
        Direction::Ingress => "ingress",
    };
    format!(
        "{dir} {proto} {}:{} -> {}:{} len {}",
        f.src(),
        f.src_port(),
        f.dst(),
        f.dst_port(),
        f.packet_len()
    )
}

impl Module for Audit {
    fn configure(config: &[u8]) -> Result<Self, String> {
        let c: Config = if config.iter().all(u8::is_ascii_whitespace) {
            Config { one_in: hundred() }
        } else {
            serde_json::from_slice(config).map_err(|e| format!("audit config: {e}"))?
        };
        if c.one_in == 0 {
            return Err("one_in must be at least 1".into());
        }
        Ok(Audit {
            one_in: c.one_in,
            seen: 0,
            by_kind: [
                Counter::new("flows_tcp_egress"),
                Counter::new("flows_tcp_ingress"),
                Counter::new("flows_udp_egress"),
                Counter::new("flows_udp_ingress"),
                Counter::new("flows_other_egress"),
                Counter::new("flows_other_ingress"),
            ],
            sampled: Counter::new("sampled"),
        })
    }

    fn policy(&mut self, flow: &Flow) -> Decision {
        self.by_kind[kind_index(flow)].inc();
        self.seen += 1;
        if self.seen % self.one_in == 1 || self.one_in == 1 {
            self.sampled.inc();
            host::log(Level::Info, &describe(flow));
        }
        Decision::allow()
    }
}

weft_guest::export!(Audit: policy);

#[cfg(test)]
mod tests {
    use super::*;
    use weft_guest::testing;

    #[test]
    fn allows_everything_counts_and_samples() {
        testing::reset();
        let mut a = Audit::configure(br#"{"one_in":10}"#).unwrap();
        for i in 0..25u16 {
            let f = Flow::builder()
                .udp("10.244.1.5".parse().unwrap(), i, "10.244.2.7".parse().unwrap(), 53)
                .build();
            assert!(a.policy(&f).allows());
        }
        let logs = testing::logs();
        assert_eq!(logs.len(), 3, "flows 1, 11 and 21 are sampled");
        assert_eq!(logs[0].1, "egress udp 10.244.1.5:0 -> 10.244.2.7:53 len 0");
        assert_eq!(testing::counter("flows_udp_egress"), 25);
        assert_eq!(testing::counter("sampled"), 3);
    }

    #[test]
    fn empty_config_means_defaults_and_zero_is_refused() {
        assert_eq!(Audit::configure(b"").unwrap().one_in, 100);
        assert!(Audit::configure(br#"{"one_in":0}"#).is_err());
    }
}
