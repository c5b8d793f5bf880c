//! An egress-gateway / weighted router: flows to chosen destinations leave through chosen nodes
//! instead of going straight to the destination's owner. Each route lists its gateways with
//! weights; a flow's 5-tuple picks one, so a flow always takes the same gateway. A gateway is a
//! node's underlay address (`node`) or "whichever node leases this address" (`owner_of`), which
//! follows the lease table; gateways without a live lease are skipped.
//!
//! ```json
//! {"routes": [{"dst": ["10.244.2.0/24"], "src": ["10.244.1.0/24"],
//!              "via": [{"node": "198.18.0.13", "weight": 3}, {"owner_of": "10.244.5.1"}]}]}
//! ```

use std::net::Ipv4Addr;

use serde::Deserialize;
use weft_guest::host::{self, Counter};
use weft_guest::net::{protocol_number, Cidr};
use weft_guest::{Flow, Module, Route};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    routes: Vec<RouteConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteConfig {
    dst: Vec<String>,
    #[serde(default)]
    src: Vec<String>,
    #[serde(default)]
    protocol: Option<String>,
    via: Vec<GatewayConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GatewayConfig {
    #[serde(default)]
    node: Option<Ipv4Addr>,
    #[serde(default)]
    owner_of: Option<Ipv4Addr>,
    #[serde(default = "one")]
    weight: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Copy)]
enum Gateway {
    Node(Ipv4Addr),
    OwnerOf(Ipv4Addr),
}

impl Gateway {
    /// The node's underlay address, if it is up.
    fn resolve(self) -> Option<Ipv4Addr> {
        match self {
            Gateway::Node(a) => Some(a),
            Gateway::OwnerOf(a) => host::lease_owner(a),
        }
    }
}

struct Steer {
    dst: Vec<Cidr>,
    src: Vec<Cidr>,
    protocol: Option<u8>,
    via: Vec<(Gateway, u32)>,
}

/// The routes, in order; the first whose selectors match a flow steers it.
pub struct Router {
    routes: Vec<Steer>,
    steered: Counter,
    no_gateway: Counter,
}

/// FNV-1a over the flow's 5-tuple: cheap, stable, and spreads flows over replicas.
fn flow_hash(f: &Flow) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    eat(&f.src().octets());
    eat(&f.dst().octets());
    eat(&[f.protocol()]);
    eat(&f.src_port().to_le_bytes());
    eat(&f.dst_port().to_le_bytes());
    h
}

impl Module for Router {
    fn configure(config: &[u8]) -> Result<Self, String> {
        let c: Config = serde_json::from_slice(config).map_err(|e| format!("router config: {e}"))?;
        let mut routes = Vec::new();
        for (i, r) in c.routes.into_iter().enumerate() {
            let at = |e: String| format!("route {i}: {e}");
            if r.dst.is_empty() {
                return Err(at("needs at least one dst".into()));
            }
            if r.via.is_empty() {
                return Err(at("needs at least one gateway in via".into()));
            }
            let cidrs = |v: &[String]| v.iter().map(|s| Cidr::parse(s)).collect::<Result<Vec<_>, _>>();
            let mut via = Vec::new();
            for g in r.via {
                let gw = match (g.node, g.owner_of) {
                    (Some(n), None) => Gateway::Node(n),
                    (None, Some(a)) => Gateway::OwnerOf(a),
                    _ => return Err(at("each gateway names exactly one of node or owner_of".into())),
                };
                if g.weight == 0 {
                    return Err(at("gateway weights must be at least 1".into()));
                }
                via.push((gw, g.weight));
            }
            routes.push(Steer {
                dst: cidrs(&r.dst).map_err(at)?,
                src: cidrs(&r.src).map_err(at)?,
                protocol: match r.protocol.as_deref() {
                    None => None,
                    Some(p) => protocol_number(p).map_err(at)?,
                },
                via,
            });
        }
        Ok(Router {
            routes,
            steered: Counter::new("steered"),
            no_gateway: Counter::new("no_gateway_up"),
        })
    }

    fn route(&mut self, flow: &Flow) -> Route {
        let Some(r) = self.routes.iter().find(|r| {
            r.dst.iter().any(|c| c.contains(flow.dst()))
                && (r.src.is_empty() || r.src.iter().any(|c| c.contains(flow.src())))
                && r.protocol.is_none_or(|p| p == flow.protocol())
        }) else {
            return Route::owner();
        };
        let up: Vec<(Ipv4Addr, u32)> = r.via.iter().filter_map(|(g, w)| g.resolve().map(|a| (a, *w))).collect();
        let total: u64 = up.iter().map(|(_, w)| u64::from(*w)).sum();
        if total == 0 {
            self.no_gateway.inc();
            // Not cached: the gateway may come back for this flow's next packet.
            return Route::owner().no_cache();
        }
        let mut pick = flow_hash(flow) % total;
        for (a, w) in up {
            if pick < u64::from(w) {
                self.steered.inc();
                return Route::via(a);
            }
            pick -= u64::from(w);
        }
        Route::owner()
    }
}

weft_guest::export!(Router: route);

#[cfg(test)]
mod tests {
    use super::*;
    use weft_guest::testing;

    fn flow(sport: u16, dst: &str) -> Flow {
        Flow::builder()
            .tcp("10.244.1.5".parse().unwrap(), sport, dst.parse().unwrap(), 80)
            .build()
    }

    #[test]
    fn matching_flows_go_through_the_gateway_others_to_the_owner() {
        testing::reset();
        let mut r =
            Router::configure(br#"{"routes":[{"dst":["10.244.2.0/24"],"via":[{"node":"198.18.0.13"}]}]}"#).unwrap();
        assert_eq!(
            r.route(&flow(1, "10.244.2.7")).through(),
            Some("198.18.0.13".parse().unwrap())
        );
        assert_eq!(r.route(&flow(1, "10.244.3.7")).through(), None);
        assert_eq!(testing::counter("steered"), 1);
    }

    #[test]
    fn weights_spread_flows_and_each_flow_sticks() {
        testing::reset();
        let mut r = Router::configure(
            br#"{"routes":[{"dst":["0.0.0.0/0"],"via":[{"node":"198.18.0.1","weight":3},{"node":"198.18.0.2","weight":1}]}]}"#,
        )
        .unwrap();
        let mut first = 0;
        for sport in 0..4000u16 {
            let f = flow(sport, "10.244.2.7");
            let a = r.route(&f).through().unwrap();
            assert_eq!(r.route(&f).through(), Some(a), "a flow always takes one gateway");
            if a == Ipv4Addr::new(198, 18, 0, 1) {
                first += 1;
            }
        }
        assert!((2700..3300).contains(&first), "3:1 weights gave {first} of 4000");
    }

    #[test]
    fn owner_of_gateways_follow_leases_and_are_skipped_when_gone() {
        testing::reset();
        let mut r =
            Router::configure(br#"{"routes":[{"dst":["10.244.2.0/24"],"via":[{"owner_of":"10.244.5.1"}]}]}"#).unwrap();
        let got = r.route(&flow(1, "10.244.2.7"));
        assert_eq!(
            got,
            Route::owner().no_cache(),
            "no lease on 10.244.5.0: straight to the owner"
        );
        assert_eq!(testing::counter("no_gateway_up"), 1);
        testing::set_lease("10.244.5.0".parse().unwrap(), 24, "198.18.0.15".parse().unwrap());
        assert_eq!(
            r.route(&flow(1, "10.244.2.7")).through(),
            Some("198.18.0.15".parse().unwrap())
        );
    }

    #[test]
    fn bad_configs_are_rejected() {
        for json in [
            r#"{"routes":[{"dst":[],"via":[{"node":"1.2.3.4"}]}]}"#,
            r#"{"routes":[{"dst":["10.0.0.0/8"],"via":[]}]}"#,
            r#"{"routes":[{"dst":["10.0.0.0/8"],"via":[{"node":"1.2.3.4","owner_of":"10.0.0.1"}]}]}"#,
            r#"{"routes":[{"dst":["10.0.0.0/8"],"via":[{"node":"1.2.3.4","weight":0}]}]}"#,
            r#"{"routes":[{"dst":["10.0.0.0/8"],"via":[{"node":"nope"}]}]}"#,
        ] {
            assert!(Router::configure(json.as_bytes()).is_err(), "{json}");
        }
    }
}
