//! `weft-cni`: the CNI plugin (spec 1.0) pods join Weft through. Like flannel's meta-plugin it
//! owns no interface itself: it reads the agent's `subnet.env`, turns it into a `bridge` +
//! `host-local` configuration, saves that (DEL must undo exactly what ADD did, even after the
//! subnet file changed), and runs the standard plugins with it.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Map, Value};

use crate::subnet_file::SubnetEnv;

/// The CNI versions this plugin speaks (results come from the delegate in the config's version).
pub const SUPPORTED_VERSIONS: [&str; 4] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"];
/// Where flannel (and Weft) write the subnet file.
pub const DEFAULT_SUBNET_FILE: &str = "/run/flannel/subnet.env";
/// Where the delegate configs of running containers are kept.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/weft";

/// A CNI error, printed as the spec's JSON error object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}")]
pub struct CniError {
    /// The spec's error code (1 version, 4 env, 5 I/O, 6 decode, 7 config, 11 try later).
    pub code: u32,
    /// What went wrong.
    pub msg: String,
    /// More detail.
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The error as the spec's JSON object.
    pub fn to_json(&self, version: &str) -> Value {
        json!({"cniVersion": version, "code": self.code, "msg": self.msg, "details": self.details})
    }
}

/// The plugin's own network configuration (stdin).
#[derive(Debug, Clone)]
pub struct NetConf {
    /// `cniVersion`.
    pub version: String,
    /// `name`.
    pub name: String,
    /// `subnetFile`.
    pub subnet_file: PathBuf,
    /// `dataDir`.
    pub data_dir: PathBuf,
    /// `delegate`: fields that override the generated bridge configuration.
    pub delegate: Map<String, Value>,
}

impl NetConf {
    /// Parses stdin's configuration.
    pub fn parse(bytes: &[u8]) -> Result<NetConf, CniError> {
        let v: Value = serde_json::from_slice(bytes)
            .map_err(|e| CniError::new(6, "cannot decode the network configuration", e.to_string()))?;
        let o = v
            .as_object()
            .ok_or_else(|| CniError::new(6, "the network configuration is not a JSON object", ""))?;
        let text = |k: &str| o.get(k).and_then(Value::as_str).map(str::to_string);
        let version = text("cniVersion").unwrap_or_else(|| "0.3.1".into());
        if !SUPPORTED_VERSIONS.contains(&version.as_str()) {
            return Err(CniError::new(
                1,
                format!("CNI version {version} is not supported"),
                format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
            ));
        }
        let name = text("name").ok_or_else(|| CniError::new(7, "the network configuration has no name", ""))?;
        let delegate = match o.get("delegate") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(m)) => m.clone(),
            Some(_) => return Err(CniError::new(7, "\"delegate\" must be an object", "")),
        };
        Ok(NetConf {
            version,
            name,
            subnet_file: text("subnetFile").map_or_else(|| DEFAULT_SUBNET_FILE.into(), PathBuf::from),
            data_dir: text("dataDir").map_or_else(|| DEFAULT_DATA_DIR.into(), PathBuf::from),
            delegate,
        })
    }
}

/// The `bridge` + `host-local` configuration for this node, as flannel's plugin builds it:
/// pods on a `cni0` bridge whose address is their gateway, an address from the node's subnet,
/// a route to the whole cluster network, the agent's MTU, and masquerading by the bridge plugin
/// only when the agent does not masquerade itself. `delegate` fields override (its `ipam`
/// fields are merged into the generated `ipam`).
pub fn delegate_conf(conf: &NetConf, env: &SubnetEnv) -> Value {
    let mut ipam = json!({
        "type": "host-local",
        "ranges": [[{"subnet": env.subnet.to_string()}]],
        // The gateway is spelled out: the bridge plugin routes via it anyway, and its CHECK
        // compares the kernel's route with this one.
        "routes": [{"dst": env.network.to_string(), "gw": crate::subnet::first_host(&env.subnet).to_string()}],
    });
    let mut d = json!({
        "cniVersion": conf.version,
        "name": conf.name,
        "type": "bridge",
        "bridge": "cni0",
        "isGateway": true,
        // Pods reach beyond the cluster through their node (with --ip-masq, as the node).
        "isDefaultGateway": true,
        "ipMasq": !env.ip_masq,
        "mtu": env.mtu,
        "hairpinMode": true,
    });
    if let (Some(Value::Object(extra)), Some(base)) = (conf.delegate.get("ipam"), ipam.as_object_mut()) {
        for (k, v) in extra {
            base.insert(k.clone(), v.clone());
        }
    }
    if let Some(m) = d.as_object_mut() {
        for (k, v) in &conf.delegate {
            if k != "ipam" {
                m.insert(k.clone(), v.clone());
            }
        }
        m.insert("ipam".into(), ipam);
    }
    d
}

/// What the runtime told the plugin through `CNI_*` variables.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// `CNI_COMMAND`.
    pub command: String,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_PATH`, split.
    pub path: Vec<PathBuf>,
}

impl Invocation {
    /// Reads the `CNI_*` variables from `env`.
    pub fn from_env(env: &HashMap<String, String>) -> Result<Invocation, CniError> {
        let get = |k: &str| env.get(k).filter(|v| !v.is_empty()).cloned();
        let command = get("CNI_COMMAND").ok_or_else(|| CniError::new(4, "CNI_COMMAND is not set", ""))?;
        if command == "VERSION" {
            return Ok(Invocation {
                command,
                container_id: String::new(),
                path: Vec::new(),
            });
        }
        let container_id = get("CNI_CONTAINERID").ok_or_else(|| CniError::new(4, "CNI_CONTAINERID is not set", ""))?;
        // The ID names a file: nothing that could leave the data directory.
        if container_id.contains('/') || container_id.starts_with('.') {
            return Err(CniError::new(
                4,
                "CNI_CONTAINERID is not a valid container ID",
                container_id,
            ));
        }
        for k in ["CNI_IFNAME", "CNI_PATH"] {
            if get(k).is_none() {
                return Err(CniError::new(4, format!("{k} is not set"), ""));
            }
        }
        if command != "DEL" && get("CNI_NETNS").is_none() {
            return Err(CniError::new(4, "CNI_NETNS is not set", ""));
        }
        let path = get("CNI_PATH")
            .unwrap_or_default()
            .split(':')
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .collect();
        Ok(Invocation {
            command,
            container_id,
            path,
        })
    }
}

/// The answer to VERSION.
pub fn version_result(version: &str) -> Value {
    json!({"cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS})
}

/// Runs one invocation: returns what goes to stdout on success.
pub fn run(inv: &Invocation, stdin: &[u8]) -> Result<Vec<u8>, CniError> {
    if inv.command == "VERSION" {
        let v = serde_json::from_slice::<Value>(stdin)
            .ok()
            .and_then(|v| v.get("cniVersion").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_else(|| "1.0.0".into());
        return Ok(version_result(&v).to_string().into_bytes());
    }
    let conf = NetConf::parse(stdin)?;
    let saved = conf.data_dir.join(&inv.container_id);
    match inv.command.as_str() {
        "ADD" => {
            let env = SubnetEnv::read(&conf.subnet_file).ok_or_else(|| {
                CniError::new(
                    11,
                    format!(
                        "{} is missing or incomplete: is the weft agent running?",
                        conf.subnet_file.display()
                    ),
                    "the agent writes it once the node holds a lease and its data path is up",
                )
            })?;
            let d = delegate_conf(&conf, &env);
            let bytes = d.to_string().into_bytes();
            save(&saved, &bytes)?;
            match delegate(inv, &d, &bytes, "ADD") {
                Ok(out) => Ok(out),
                Err(e) => {
                    // Nothing was set up, so nothing must be left to clean up.
                    let _ = std::fs::remove_file(&saved);
                    Err(e)
                }
            }
        }
        "DEL" => match std::fs::read(&saved) {
            Ok(bytes) => {
                let d: Value = serde_json::from_slice(&bytes)
                    .map_err(|e| CniError::new(6, format!("cannot decode {}", saved.display()), e.to_string()))?;
                delegate(inv, &d, &bytes, "DEL")?;
                std::fs::remove_file(&saved)
                    .map_err(|e| CniError::new(5, format!("cannot remove {}", saved.display()), e.to_string()))?;
                Ok(Vec::new())
            }
            // DEL of something never added (or already deleted) succeeds, as the spec asks.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(CniError::new(
                5,
                format!("cannot read {}", saved.display()),
                e.to_string(),
            )),
        },
        "CHECK" => {
            let bytes = std::fs::read(&saved).map_err(|e| {
                CniError::new(
                    3,
                    format!("no saved configuration for container {}", inv.container_id),
                    e.to_string(),
                )
            })?;
            let mut d: Value = serde_json::from_slice(&bytes)
                .map_err(|e| CniError::new(6, format!("cannot decode {}", saved.display()), e.to_string()))?;
            // The delegate checks against the result the runtime kept.
            if let (Some(prev), Some(m)) = (
                serde_json::from_slice::<Value>(stdin)
                    .ok()
                    .and_then(|v| v.get("prevResult").cloned()),
                d.as_object_mut(),
            ) {
                m.insert("prevResult".into(), prev);
            }
            let bytes = d.to_string().into_bytes();
            delegate(inv, &d, &bytes, "CHECK")?;
            Ok(Vec::new())
        }
        other => Err(CniError::new(
            4,
            format!("unknown CNI_COMMAND {other:?}"),
            "expected ADD, DEL, CHECK or VERSION",
        )),
    }
}

fn save(path: &Path, bytes: &[u8]) -> Result<(), CniError> {
    crate::atomic::write(path, bytes, None)
        .map_err(|e| CniError::new(5, format!("cannot save {}", path.display()), e.to_string()))
}

/// Runs the delegate plugin named by `conf.type` from `CNI_PATH` with `command`.
fn delegate(inv: &Invocation, conf: &Value, bytes: &[u8], command: &str) -> Result<Vec<u8>, CniError> {
    let kind = conf.get("type").and_then(Value::as_str).unwrap_or("bridge");
    let bin = inv
        .path
        .iter()
        .map(|d| d.join(kind))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            CniError::new(
                7,
                format!("plugin {kind:?} not found in CNI_PATH"),
                format!("{:?}", inv.path),
            )
        })?;
    let mut child = Command::new(&bin)
        .env("CNI_COMMAND", command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| CniError::new(5, format!("cannot run {}", bin.display()), e.to_string()))?;
    if let Some(mut i) = child.stdin.take() {
        i.write_all(bytes)
            .map_err(|e| CniError::new(5, format!("cannot write to {}", bin.display()), e.to_string()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| CniError::new(5, format!("{} failed", bin.display()), e.to_string()))?;
    if out.status.success() {
        return Ok(out.stdout);
    }
    // The delegate printed a CNI error: keep its code and message, say who said it.
    let (code, msg, details) = match serde_json::from_slice::<Value>(&out.stdout) {
        Ok(v) => (
            v.get("code").and_then(Value::as_u64).unwrap_or(999) as u32,
            v.get("msg").and_then(Value::as_str).unwrap_or("").to_string(),
            v.get("details").and_then(Value::as_str).unwrap_or("").to_string(),
        ),
        Err(_) => (
            999,
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            String::new(),
        ),
    };
    Err(CniError::new(code, format!("{kind} {command}: {msg}"), details))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> SubnetEnv {
        SubnetEnv::parse(
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
        )
        .unwrap()
    }

    #[test]
    fn builds_flannels_bridge_and_host_local_config() {
        let conf = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"weft","type":"weft"}"#).unwrap();
        assert_eq!(conf.subnet_file, PathBuf::from(DEFAULT_SUBNET_FILE));
        let d = delegate_conf(&conf, &env());
        assert_eq!(d["type"], "bridge");
        assert_eq!(d["bridge"], "cni0");
        assert_eq!(d["isGateway"], true);
        assert_eq!(d["isDefaultGateway"], true);
        assert_eq!(d["ipMasq"], false, "the agent masquerades, the bridge plugin must not");
        assert_eq!(d["mtu"], 1450);
        assert_eq!(d["ipam"]["ranges"][0][0]["subnet"], "10.244.7.0/24");
        assert_eq!(d["ipam"]["routes"][0]["dst"], "10.244.0.0/16");
        assert_eq!(d["ipam"]["routes"][0]["gw"], "10.244.7.1");
        assert_eq!(d["cniVersion"], "1.0.0");
    }

    #[test]
    fn delegate_fields_override_and_ipam_merges() {
        let conf = NetConf::parse(
            br#"{"cniVersion":"0.4.0","name":"n","type":"weft","subnetFile":"/x","dataDir":"/d",
                "delegate":{"bridge":"br9","hairpinMode":false,"ipam":{"dataDir":"/ipam"}}}"#,
        )
        .unwrap();
        let d = delegate_conf(&conf, &env());
        assert_eq!(d["bridge"], "br9");
        assert_eq!(d["hairpinMode"], false);
        assert_eq!(d["ipam"]["dataDir"], "/ipam");
        assert_eq!(d["ipam"]["type"], "host-local", "generated ipam fields stay");
        assert_eq!(conf.data_dir, PathBuf::from("/d"));
    }

    #[test]
    fn bad_input_gets_the_specs_codes() {
        assert_eq!(NetConf::parse(b"{nope").unwrap_err().code, 6);
        assert_eq!(
            NetConf::parse(br#"{"cniVersion":"9.9.9","name":"x"}"#)
                .unwrap_err()
                .code,
            1
        );
        assert_eq!(NetConf::parse(br#"{"cniVersion":"1.0.0"}"#).unwrap_err().code, 7);
        let env = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert_eq!(Invocation::from_env(&env(&[])).unwrap_err().code, 4);
        let traversal = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "../../etc/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
            ("CNI_NETNS", "/x"),
        ]);
        assert_eq!(Invocation::from_env(&traversal).unwrap_err().code, 4);
        let no_netns = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
        ]);
        assert_eq!(Invocation::from_env(&no_netns).unwrap_err().code, 4);
        let v = version_result("1.0.0");
        assert_eq!(v["supportedVersions"].as_array().map(Vec::len), Some(4));
    }

    #[test]
    fn add_without_a_subnet_file_says_try_again_and_del_of_nothing_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let conf = format!(
            r#"{{"cniVersion":"1.0.0","name":"weft","type":"weft","subnetFile":"{0}/missing.env","dataDir":"{0}/data"}}"#,
            dir.path().display()
        );
        let inv = |cmd: &str| Invocation {
            command: cmd.into(),
            container_id: "c1".into(),
            path: vec![dir.path().to_path_buf()],
        };
        let e = run(&inv("ADD"), conf.as_bytes()).unwrap_err();
        assert_eq!(e.code, 11);
        assert!(e.msg.contains("is the weft agent running"), "{e}");
        assert_eq!(run(&inv("DEL"), conf.as_bytes()).unwrap(), Vec::<u8>::new());
        assert_eq!(run(&inv("CHECK"), conf.as_bytes()).unwrap_err().code, 3);
    }
}

/// Why installing the plugin onto a node failed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a CNI network configuration: {why}")]
    BadConf { path: PathBuf, why: String },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// Installs the plugin binary as `<bin_dir>/weft` and the network configuration `conf` into
/// `conf_dir` (as `10-weft.conflist`, or `10-weft.conf` for a single plugin), each written aside
/// and renamed so a runtime never sees half a file. Returns the two paths written.
pub fn install(
    plugin: &Path,
    bin_dir: &Path,
    conf: &Path,
    conf_dir: &Path,
) -> Result<(PathBuf, PathBuf), InstallError> {
    let text = std::fs::read(conf).map_err(|source| InstallError::Read {
        path: conf.into(),
        source,
    })?;
    let bad = |why: String| InstallError::BadConf { path: conf.into(), why };
    let v: Value = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
    if v.get("name").and_then(Value::as_str).is_none() {
        return Err(bad("it has no \"name\"".into()));
    }
    let list = match v.get("plugins") {
        Some(Value::Array(p)) if p.iter().any(|p| p.get("type") == Some(&json!("weft"))) => true,
        Some(_) => return Err(bad("no plugin in \"plugins\" has \"type\": \"weft\"".into())),
        None if v.get("type") == Some(&json!("weft")) => false,
        None => return Err(bad("its \"type\" is not \"weft\"".into())),
    };
    let code = std::fs::read(plugin).map_err(|source| InstallError::Read {
        path: plugin.into(),
        source,
    })?;
    let bin = bin_dir.join("weft");
    let conf_out = conf_dir.join(if list { "10-weft.conflist" } else { "10-weft.conf" });
    write_atomically(&bin, &code, 0o755)?;
    write_atomically(&conf_out, &text, 0o644)?;
    Ok((bin, conf_out))
}

fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    crate::atomic::write(path, bytes, Some(mode)).map_err(|source| InstallError::Write {
        path: path.into(),
        source,
    })
}

#[cfg(test)]
mod install_tests {
    use super::*;

    #[test]
    fn installs_the_binary_and_a_conflist_and_refuses_other_configs() {
        let dir = tempfile::tempdir().unwrap();
        let plugin = dir.path().join("weft-cni");
        std::fs::write(&plugin, b"\x7fELF...").unwrap();
        let conf = dir.path().join("c.json");
        std::fs::write(
            &conf,
            br#"{"cniVersion":"1.0.0","name":"weft","plugins":[{"type":"weft"},{"type":"portmap"}]}"#,
        )
        .unwrap();
        let (bin, out) = install(&plugin, &dir.path().join("bin"), &conf, &dir.path().join("net.d")).unwrap();
        assert_eq!(std::fs::read(&bin).unwrap(), b"\x7fELF...");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&bin).unwrap().permissions().mode() & 0o777, 0o755);
        assert!(out.ends_with("10-weft.conflist"));
        std::fs::write(&conf, br#"{"cniVersion":"1.0.0","name":"weft","type":"bridge"}"#).unwrap();
        let e = install(&plugin, &dir.path().join("bin"), &conf, &dir.path().join("net.d")).unwrap_err();
        assert!(e.to_string().contains("not \"weft\""), "{e}");
        std::fs::write(&conf, b"{oops").unwrap();
        assert!(matches!(
            install(&plugin, dir.path(), &conf, dir.path()),
            Err(InstallError::BadConf { .. })
        ));
    }
}
