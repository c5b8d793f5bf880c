//! A per-source new-connection rate limiter: each source address gets a token bucket of
//! `burst` connections refilled at `per_sec`; a new connection (TCP SYN, or the first packet
//! of a UDP/ICMP flow) without a token is dropped. Flows already in flight are never counted.
//!
//! ```json
//! {"per_sec": 10, "burst": 20, "direction": "ingress", "max_sources": 4096}
//! ```
//!
//! Buckets live in the module instance, one per data-path worker; limiting one direction keeps
//! them exact, since one worker sees all of a direction's new flows.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use serde::Deserialize;
use weft_guest::host::{self, Counter, Level};
use weft_guest::{Decision, Direction, Flow, Module};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    per_sec: f64,
    burst: f64,
    #[serde(default)]
    direction: Option<String>,
    #[serde(default = "default_max_sources")]
    max_sources: usize,
}

fn default_max_sources() -> usize {
    4096
}

struct Bucket {
    tokens: f64,
    at_ns: u64,
}

/// The limiter: its rate, and a bucket per recent source.
pub struct RateLimit {
    per_sec: f64,
    burst: f64,
    direction: Option<Direction>,
    max_sources: usize,
    buckets: HashMap<Ipv4Addr, Bucket>,
    limited: Counter,
}

impl RateLimit {
    /// Takes a token for `src` at `now`; false when its bucket is empty.
    fn take(&mut self, src: Ipv4Addr, now: u64) -> bool {
        if !self.buckets.contains_key(&src) && self.buckets.len() >= self.max_sources {
            // Full buckets carry no information, so they go first; failing that, the table is
            // reset rather than grown, which can only err on the side of letting traffic in.
            let (per_sec, burst) = (self.per_sec, self.burst);
            self.buckets
                .retain(|_, b| b.tokens + (now.saturating_sub(b.at_ns) as f64 / 1e9) * per_sec < burst);
            if self.buckets.len() >= self.max_sources {
                self.buckets.clear();
            }
        }
        let b = self.buckets.entry(src).or_insert(Bucket {
            tokens: self.burst,
            at_ns: now,
        });
        let elapsed = now.saturating_sub(b.at_ns) as f64 / 1e9;
        b.tokens = (b.tokens + elapsed * self.per_sec).min(self.burst);
        b.at_ns = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl Module for RateLimit {
    fn configure(config: &[u8]) -> Result<Self, String> {
        let c: Config = serde_json::from_slice(config).map_err(|e| format!("ratelimit config: {e}"))?;
        if !(c.per_sec > 0.0 && c.per_sec.is_finite()) {
            return Err("per_sec must be a positive number".into());
        }
        if !(c.burst >= 1.0 && c.burst.is_finite()) {
            return Err("burst must be at least 1".into());
        }
        if c.max_sources == 0 {
            return Err("max_sources must be at least 1".into());
        }
        let direction = match c.direction.as_deref() {
            None | Some("both") => None,
            Some("egress") => Some(Direction::Egress),
            Some("ingress") => Some(Direction::Ingress),
            Some(other) => return Err(format!("unknown direction {other:?}")),
        };
        Ok(RateLimit {
            per_sec: c.per_sec,
            burst: c.burst,
            direction,
            max_sources: c.max_sources,
            buckets: HashMap::new(),
            limited: Counter::new("limited"),
        })
    }

    fn policy(&mut self, flow: &Flow) -> Decision {
        let new_connection = if flow.is_tcp() {
            flow.is_syn()
        } else {
            !flow.is_established() && !flow.is_fragment()
        };
        if !new_connection || self.direction.is_some_and(|d| d != flow.direction()) {
            return Decision::allow();
        }
        if self.take(flow.src(), host::now_ns()) {
            // Allowed connections are decided once; a refused SYN is asked about again, so the
            // client's retry gets a fresh look at the bucket.
            Decision::allow()
        } else {
            self.limited.inc();
            host::log(Level::Debug, &format!("rate limited {}", flow.src()));
            Decision::drop().no_cache()
        }
    }
}

weft_guest::export!(RateLimit: policy);

#[cfg(test)]
mod tests {
    use super::*;
    use weft_guest::testing;

    fn syn(src: &str, sport: u16) -> Flow {
        Flow::builder()
            .tcp(src.parse().unwrap(), sport, "10.244.2.7".parse().unwrap(), 80)
            .build()
    }

    #[test]
    fn a_source_gets_its_burst_then_the_refill_rate() {
        testing::reset();
        let mut r = RateLimit::configure(br#"{"per_sec":2,"burst":3}"#).unwrap();
        let allowed = (0..10).filter(|i| r.policy(&syn("10.244.1.5", *i)).allows()).count();
        assert_eq!(allowed, 3);
        assert!(
            r.policy(&syn("10.244.1.6", 1)).allows(),
            "other sources have their own bucket"
        );
        testing::advance_ns(1_000_000_000);
        let allowed = (0..10).filter(|i| r.policy(&syn("10.244.1.5", *i)).allows()).count();
        assert_eq!(allowed, 2, "one second refills per_sec tokens");
        assert_eq!(testing::counter("limited"), 15);
    }

    #[test]
    fn in_flight_packets_and_other_directions_are_not_counted() {
        testing::reset();
        let mut r = RateLimit::configure(br#"{"per_sec":1,"burst":1,"direction":"ingress"}"#).unwrap();
        let ack = Flow::builder()
            .tcp("10.244.1.5".parse().unwrap(), 1, "10.244.2.7".parse().unwrap(), 80)
            .tcp_flags(0x10)
            .ingress()
            .build();
        for _ in 0..5 {
            assert!(r.policy(&ack).allows());
        }
        for i in 0..5 {
            assert!(r.policy(&syn("10.244.1.5", i)).allows(), "egress SYNs are not limited");
        }
        let ingress_syn = |p| {
            Flow::builder()
                .tcp("10.244.1.5".parse().unwrap(), p, "10.244.2.7".parse().unwrap(), 80)
                .ingress()
                .build()
        };
        assert!(r.policy(&ingress_syn(1)).allows());
        assert_eq!(r.policy(&ingress_syn(2)), Decision::drop().no_cache());
    }

    #[test]
    fn the_bucket_table_stays_bounded() {
        testing::reset();
        let mut r = RateLimit::configure(br#"{"per_sec":1,"burst":1,"max_sources":8}"#).unwrap();
        for i in 0..100u8 {
            r.policy(&syn(&format!("10.0.0.{i}"), 1));
            assert!(r.buckets.len() <= 8);
        }
    }

    #[test]
    fn bad_configs_are_rejected() {
        for json in [
            r#"{"per_sec":0,"burst":1}"#,
            r#"{"per_sec":1,"burst":0.5}"#,
            r#"{"per_sec":1}"#,
            r#"{"per_sec":1,"burst":1,"direction":"up"}"#,
        ] {
            assert!(RateLimit::configure(json.as_bytes()).is_err(), "{json}");
        }
    }
}
