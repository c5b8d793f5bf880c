//! The cluster network configuration, in flannel's JSON format.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde_json::{Map, Value};

use crate::subnet::SubnetRange;

/// Why a network configuration was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("invalid network config: not a JSON object: {0}")]
    Json(String),
    #[error("invalid network config: \"Network\" is missing")]
    MissingNetwork,
    #[error("invalid network config: {field} {value:?} is not a valid IPv4 {what}")]
    BadAddress {
        field: &'static str,
        value: String,
        what: &'static str,
    },
    #[error("invalid network config: Network {0} is too small: it must be /28 or shorter")]
    NetworkTooSmall(Ipv4Net),
    #[error("invalid network config: SubnetLen {len} is out of range: it must be longer than the Network prefix /{net_len} and at most 30")]
    SubnetLenOutOfRange { len: u8, net_len: u8 },
    #[error("invalid network config: {field} {addr} is not inside Network {network}")]
    OutsideNetwork {
        field: &'static str,
        addr: Ipv4Addr,
        network: Ipv4Net,
    },
    #[error("invalid network config: {field} {addr} is not on a /{len} subnet boundary")]
    Unaligned {
        field: &'static str,
        addr: Ipv4Addr,
        len: u8,
    },
    #[error("invalid network config: SubnetMin {min} is above SubnetMax {max}")]
    MinAboveMax { min: Ipv4Addr, max: Ipv4Addr },
    #[error("invalid network config: {field} must be {what}")]
    BadField { field: &'static str, what: &'static str },
    #[error("invalid network config: IPv6 (EnableIPv6) is not supported yet")]
    Ipv6Unsupported,
    #[error("invalid network config: EnableIPv4 is false and IPv6 is not supported, so there is nothing to run")]
    NothingEnabled,
}

/// A validated network configuration with every default filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    /// The cluster network every node subnet is carved from.
    pub network: Ipv4Net,
    /// Prefix length of one node subnet.
    pub subnet_len: u8,
    /// Lowest subnet that may be leased.
    pub subnet_min: Ipv4Addr,
    /// Highest subnet that may be leased.
    pub subnet_max: Ipv4Addr,
    /// Backend section: its `Type` plus backend-specific fields kept as given.
    pub backend: BackendConfig,
}

/// The `Backend` section of the network config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// Lower-cased backend type (`udp` when absent, as in flannel).
    pub kind: String,
    /// The whole section with lower-cased keys, for the backend to read its own fields.
    pub fields: Map<String, Value>,
}

impl BackendConfig {
    /// A boolean field of the backend section (keys are case-insensitive).
    pub fn bool_field(&self, name: &str) -> Result<Option<bool>, ConfigError> {
        match self.fields.get(&name.to_ascii_lowercase()) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(ConfigError::BadField {
                field: "Backend field",
                what: "true or false",
            }),
        }
    }

    /// An unsigned integer field of the backend section (keys are case-insensitive).
    pub fn u64_field(&self, name: &str) -> Result<Option<u64>, ConfigError> {
        match self.fields.get(&name.to_ascii_lowercase()) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or(ConfigError::BadField {
                field: "Backend field",
                what: "a non-negative integer",
            }),
        }
    }
}

/// Lower-cases every key of a JSON object, recursively, because flannel reads field names
/// case-insensitively and operators write `SubnetLen`, `subnetLen` and `subnetlen` alike.
fn lowercase_keys(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), lowercase_keys(v)))
                .collect(),
        ),
        other => other,
    }
}

fn addr_field(m: &Map<String, Value>, key: &str, field: &'static str) -> Result<Option<Ipv4Addr>, ConfigError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => s.parse().map(Some).map_err(|_| ConfigError::BadAddress {
            field,
            value: s.clone(),
            what: "address",
        }),
        Some(other) => Err(ConfigError::BadAddress {
            field,
            value: other.to_string(),
            what: "address",
        }),
    }
}

fn bool_field(m: &Map<String, Value>, key: &str, field: &'static str, default: bool) -> Result<bool, ConfigError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ConfigError::BadField {
            field,
            what: "true or false",
        }),
    }
}

impl NetworkConfig {
    /// Parses and validates flannel-format network config JSON.
    pub fn parse(json: &str) -> Result<Self, ConfigError> {
        let raw: Value = serde_json::from_str(json).map_err(|e| ConfigError::Json(e.to_string()))?;
        let Value::Object(m) = lowercase_keys(raw) else {
            return Err(ConfigError::Json("top level is not an object".into()));
        };

        if !bool_field(&m, "enableipv4", "EnableIPv4", true)? {
            return Err(ConfigError::NothingEnabled);
        }
        if bool_field(&m, "enableipv6", "EnableIPv6", false)? {
            return Err(ConfigError::Ipv6Unsupported);
        }

        let network = match m.get("network") {
            None | Some(Value::Null) => return Err(ConfigError::MissingNetwork),
            Some(Value::String(s)) => s.parse::<Ipv4Net>().map_err(|_| ConfigError::BadAddress {
                field: "Network",
                value: s.clone(),
                what: "CIDR",
            })?,
            Some(other) => {
                return Err(ConfigError::BadAddress {
                    field: "Network",
                    value: other.to_string(),
                    what: "CIDR",
                })
            }
        };
        // flannel masks the network address silently; so do we, it is what users expect.
        let network = network.trunc();
        if network.prefix_len() > 28 {
            return Err(ConfigError::NetworkTooSmall(network));
        }

        let subnet_len = match m.get("subnetlen") {
            None | Some(Value::Null) => {
                if network.prefix_len() <= 22 {
                    24
                } else {
                    network.prefix_len() + 2
                }
            }
            Some(v) => {
                let n = v.as_u64().ok_or(ConfigError::BadField {
                    field: "SubnetLen",
                    what: "an integer",
                })?;
                u8::try_from(n).unwrap_or(u8::MAX)
            }
        };
        if subnet_len <= network.prefix_len() || subnet_len > 30 {
            return Err(ConfigError::SubnetLenOutOfRange {
                len: subnet_len,
                net_len: network.prefix_len(),
            });
        }

        let step = 1u32 << (32 - subnet_len);
        let first = u32::from(network.network());
        let last = u32::from(network.broadcast()) - (step - 1);
        let check = |field: &'static str, addr: Ipv4Addr| -> Result<Ipv4Addr, ConfigError> {
            if !network.contains(&addr) {
                return Err(ConfigError::OutsideNetwork { field, addr, network });
            }
            if u32::from(addr) % step != 0 {
                return Err(ConfigError::Unaligned {
                    field,
                    addr,
                    len: subnet_len,
                });
            }
            Ok(addr)
        };
        // The first subnet is skipped by default, as flannel does: its .0 is the network address.
        let subnet_min = match addr_field(&m, "subnetmin", "SubnetMin")? {
            Some(a) => check("SubnetMin", a)?,
            None => Ipv4Addr::from(first + step),
        };
        let subnet_max = match addr_field(&m, "subnetmax", "SubnetMax")? {
            Some(a) => check("SubnetMax", a)?,
            None => Ipv4Addr::from(last),
        };
        if u32::from(subnet_min) > u32::from(subnet_max) {
            return Err(ConfigError::MinAboveMax {
                min: subnet_min,
                max: subnet_max,
            });
        }

        let fields = match m.get("backend") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(b)) => b.clone(),
            Some(_) => {
                return Err(ConfigError::BadField {
                    field: "Backend",
                    what: "an object",
                })
            }
        };
        let kind = match fields.get("type") {
            None | Some(Value::Null) => "udp".to_string(),
            Some(Value::String(s)) => s.to_ascii_lowercase(),
            Some(_) => {
                return Err(ConfigError::BadField {
                    field: "Backend.Type",
                    what: "a string",
                })
            }
        };

        Ok(NetworkConfig {
            network,
            subnet_len,
            subnet_min,
            subnet_max,
            backend: BackendConfig { kind, fields },
        })
    }

    /// The range of subnets leases may be taken from.
    pub fn range(&self) -> SubnetRange {
        SubnetRange::new(self.subnet_len, self.subnet_min, self.subnet_max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<NetworkConfig, ConfigError> {
        NetworkConfig::parse(s)
    }

    #[test]
    fn defaults_for_a_slash_16() {
        let c = parse(r#"{"Network":"10.244.0.0/16"}"#).unwrap();
        assert_eq!(c.subnet_len, 24);
        assert_eq!(c.subnet_min, Ipv4Addr::new(10, 244, 1, 0));
        assert_eq!(c.subnet_max, Ipv4Addr::new(10, 244, 255, 0));
        assert_eq!(c.backend.kind, "udp");
        assert_eq!(c.range().len(), 255);
    }

    #[test]
    fn defaults_for_a_small_network_use_prefix_plus_two() {
        let c = parse(r#"{"Network":"10.1.0.0/24"}"#).unwrap();
        assert_eq!(c.subnet_len, 26);
        assert_eq!(c.subnet_min, Ipv4Addr::new(10, 1, 0, 64));
        assert_eq!(c.subnet_max, Ipv4Addr::new(10, 1, 0, 192));
    }

    #[test]
    fn keys_are_case_insensitive_and_backend_is_kept() {
        let c = parse(r#"{"network":"10.5.0.0/16","SUBNETLEN":20,"backend":{"TYPE":"UDP","Port":9000}}"#).unwrap();
        assert_eq!(c.subnet_len, 20);
        assert_eq!(c.subnet_min, Ipv4Addr::new(10, 5, 16, 0));
        assert_eq!(c.backend.kind, "udp");
        assert_eq!(c.backend.u64_field("Port").unwrap(), Some(9000));
    }

    #[test]
    fn backend_booleans_are_checked() {
        let c = parse(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"udp","Offload":false}}"#).unwrap();
        assert_eq!(c.backend.bool_field("offload").unwrap(), Some(false));
        let c = parse(r#"{"Network":"10.5.0.0/16","Backend":{"Offload":"no"}}"#).unwrap();
        assert!(c.backend.bool_field("Offload").is_err());
        assert_eq!(c.backend.bool_field("Missing").unwrap(), None);
    }

    #[test]
    fn network_is_masked() {
        let c = parse(r#"{"Network":"10.244.3.7/16"}"#).unwrap();
        assert_eq!(c.network, "10.244.0.0/16".parse().unwrap());
    }

    #[test]
    fn bad_cidr_is_named() {
        let e = parse(r#"{"Network":"10.244.0.0/33"}"#).unwrap_err();
        assert!(matches!(e, ConfigError::BadAddress { field: "Network", .. }));
        assert!(e.to_string().contains("10.244.0.0/33"), "{e}");
        assert!(matches!(
            parse(r#"{"Network":"banana"}"#),
            Err(ConfigError::BadAddress { .. })
        ));
        assert_eq!(parse(r#"{"SubnetLen":24}"#).unwrap_err(), ConfigError::MissingNetwork);
        assert!(matches!(parse("[1,2]"), Err(ConfigError::Json(_))));
        assert!(matches!(parse("{not json"), Err(ConfigError::Json(_))));
    }

    #[test]
    fn network_smaller_than_slash_28_is_refused() {
        assert!(matches!(
            parse(r#"{"Network":"10.0.0.0/29"}"#),
            Err(ConfigError::NetworkTooSmall(_))
        ));
    }

    #[test]
    fn subnet_len_out_of_range() {
        for len in [16, 8, 31, 32, 300] {
            let e = parse(&format!(r#"{{"Network":"10.244.0.0/16","SubnetLen":{len}}}"#)).unwrap_err();
            assert!(matches!(e, ConfigError::SubnetLenOutOfRange { .. }), "{len}: {e}");
        }
        assert!(parse(r#"{"Network":"10.244.0.0/16","SubnetLen":"24"}"#).is_err());
    }

    #[test]
    fn min_above_max() {
        let e = parse(r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.9.0","SubnetMax":"10.244.3.0"}"#).unwrap_err();
        assert_eq!(
            e,
            ConfigError::MinAboveMax {
                min: Ipv4Addr::new(10, 244, 9, 0),
                max: Ipv4Addr::new(10, 244, 3, 0)
            }
        );
        assert!(e
            .to_string()
            .contains("SubnetMin 10.244.9.0 is above SubnetMax 10.244.3.0"));
    }

    #[test]
    fn min_max_must_be_aligned_and_inside() {
        assert!(matches!(
            parse(r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.1.5"}"#),
            Err(ConfigError::Unaligned { field: "SubnetMin", .. })
        ));
        assert!(matches!(
            parse(r#"{"Network":"10.244.0.0/16","SubnetMax":"10.9.1.0"}"#),
            Err(ConfigError::OutsideNetwork { field: "SubnetMax", .. })
        ));
    }

    #[test]
    fn ipv6_is_refused_clearly() {
        assert_eq!(
            parse(r#"{"Network":"10.244.0.0/16","EnableIPv6":true}"#).unwrap_err(),
            ConfigError::Ipv6Unsupported
        );
    }
}
