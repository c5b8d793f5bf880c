//! A module as stored in the lease store: its code, config and how the chain treats it. One
//! JSON document per module, under `<prefix>/modules/<name>` in etcd.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::runtime::{hex, sha256};
use super::WasmError;

/// What the chain does when a module fails (traps, times out, returns garbage, cannot load).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum FailurePolicy {
    /// Drop the flows the module could not decide (the default: a broken firewall must not
    /// open the network).
    #[default]
    Closed,
    /// Skip the module, as if it allowed the flow.
    Open,
}

impl FailurePolicy {
    /// The policy's name as the API, the command line and metric labels spell it.
    pub fn label(self) -> &'static str {
        match self {
            FailurePolicy::Closed => "closed",
            FailurePolicy::Open => "open",
        }
    }
}

/// One stored module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleSpec {
    /// Unique name: lowercase letters, digits, `-` and `_`, at most 63 bytes.
    pub name: String,
    /// sha256 of the Wasm code, hex.
    pub sha256: String,
    /// The Wasm code, base64.
    pub wasm: String,
    /// Config bytes handed to `weft_configure` (usually JSON text).
    #[serde(default)]
    pub config: String,
    /// Place in the chain: lower runs first; ties go by name.
    #[serde(default)]
    pub order: i32,
    /// What a failure means.
    #[serde(default)]
    pub failure: FailurePolicy,
    /// Decide and count, but enforce nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// Signature over the code and config (`weft module sign`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<super::signature::Signature>,
}

/// Checks a module name.
pub fn valid_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid module name {name:?}: use 1-63 lowercase letters, digits, '-' or '_'"
        ))
    }
}

impl ModuleSpec {
    /// A spec for `wasm` with default settings.
    pub fn new(name: &str, wasm: &[u8], config: String) -> Self {
        ModuleSpec {
            name: name.to_string(),
            sha256: hex(&sha256(wasm)),
            wasm: base64::engine::general_purpose::STANDARD.encode(wasm),
            config,
            order: 0,
            failure: FailurePolicy::Closed,
            dry_run: false,
            signature: None,
        }
    }

    /// Which version of the whole spec this is: a digest of the code's sha256 and every setting
    /// a node runs it with. A change of config alone keeps the code's sha256, so a node's report
    /// carries this too, to say it runs the new config and not only the same code.
    pub fn revision(&self) -> String {
        let settings = serde_json::json!({
            "sha256": self.sha256,
            "config": self.config,
            "order": self.order,
            "failure": self.failure,
            "dry_run": self.dry_run,
            "signature": self.signature,
        });
        let mut d = hex(&sha256(settings.to_string().as_bytes()));
        d.truncate(16);
        d
    }

    /// Replaces the code.
    pub fn set_wasm(&mut self, wasm: &[u8]) {
        self.sha256 = hex(&sha256(wasm));
        self.wasm = base64::engine::general_purpose::STANDARD.encode(wasm);
    }

    /// The code, checked against the recorded sha256.
    pub fn code(&self) -> Result<Vec<u8>, WasmError> {
        let wasm = base64::engine::general_purpose::STANDARD
            .decode(self.wasm.as_bytes())
            .map_err(|e| WasmError::Encoding(format!("wasm is not base64: {e}")))?;
        let got = hex(&sha256(&wasm));
        if got != self.sha256 {
            return Err(WasmError::Digest {
                want: self.sha256.clone(),
                got,
            });
        }
        Ok(wasm)
    }

    /// The spec as stored.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads a stored spec.
    pub fn from_json(bytes: &[u8]) -> Result<Self, WasmError> {
        serde_json::from_slice(bytes).map_err(|e| WasmError::Encoding(e.to_string()))
    }
}

/// What a node reports about one module it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleStatus {
    /// Module name.
    pub name: String,
    /// sha256 of the code loaded (or that failed to load).
    pub sha256: String,
    /// The spec's [`ModuleSpec::revision`] (absent from agents older than it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// `loaded`, `pending` (loaded, not in force on the kernel path yet) or `failed`.
    pub state: String,
    /// Why loading failed, or why the module is pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A module's state when it decides traffic.
pub const LOADED: &str = "loaded";
/// A module's state when it loaded but the kernel path does not ask it yet.
pub const PENDING: &str = "pending";
/// A module's state when it could not load (its failure policy stands in).
pub const FAILED: &str = "failed";

/// A node's report, stored under `<prefix>/module-status/<node>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The node's PublicIP.
    pub node: String,
    /// Seconds since the epoch when written.
    pub updated: u64,
    /// One entry per module in the chain.
    pub modules: Vec<ModuleStatus>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revision_changes_with_every_setting_and_only_with_them() {
        let s = ModuleSpec::new("fw", b"\0asm\x01\0\0\0", "{}".into());
        let r = s.revision();
        assert_eq!(r.len(), 16);
        assert_eq!(ModuleSpec::from_json(&s.to_json()).unwrap().revision(), r);
        let changed = [
            ModuleSpec {
                config: "{ }".into(),
                ..s.clone()
            },
            ModuleSpec { order: 1, ..s.clone() },
            ModuleSpec {
                failure: FailurePolicy::Open,
                ..s.clone()
            },
            ModuleSpec {
                dry_run: true,
                ..s.clone()
            },
            ModuleSpec::new("fw", b"\0asm\x01\0\0\0\0", "{}".into()),
        ];
        for c in changed {
            assert_ne!(c.revision(), r, "{c:?}");
        }
    }

    #[test]
    fn specs_round_trip_and_catch_tampered_code() {
        let mut s = ModuleSpec::new("fw", b"\0asm\x01\0\0\0", "{}".into());
        let back = ModuleSpec::from_json(&s.to_json()).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.code().unwrap(), b"\0asm\x01\0\0\0");
        s.sha256 = "00".repeat(32);
        assert!(matches!(s.code(), Err(WasmError::Digest { .. })));
        let defaults = ModuleSpec::from_json(br#"{"name":"a","sha256":"x","wasm":""}"#).unwrap();
        assert_eq!(
            (defaults.failure, defaults.dry_run, defaults.order),
            (FailurePolicy::Closed, false, 0)
        );
    }

    #[test]
    fn names_are_checked() {
        assert!(valid_name("fw-1_a").is_ok());
        for bad in ["", "Fw", "a/b", "a b", &"x".repeat(64)] {
            assert!(valid_name(bad).is_err(), "{bad}");
        }
    }
}
