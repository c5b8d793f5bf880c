//! The deployment files are checked against what they deploy: the Kubernetes manifests against
//! the Kubernetes schemas (kubernetes-validate, from PyPI) and against `weft` itself (every flag
//! and variable they use exists, the ConfigMap's configs parse, the init container's command
//! installs the plugin); the systemd unit's environment file names only real variables.

use std::path::{Path, PathBuf};
use std::process::Command;

use weft_tests::*;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The DaemonSet manifests: etcd-backed, and the kube-flannel drop-in (`--kube-subnet-mgr`).
fn manifests() -> [PathBuf; 2] {
    [
        root().join("deploy/kubernetes/weft.yaml"),
        root().join("deploy/kubernetes/kube-weft.yml"),
    ]
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The help text of `weft <sub>`: every flag and `[env: ...]` name it accepts.
fn help(sub: &str) -> String {
    let (ok, out) = run(Command::new(weft_bin()).args([sub, "--help"]));
    assert!(ok, "{out}");
    out
}

#[test]
fn manifests_pass_the_kubernetes_schemas_and_a_broken_one_does_not() {
    let validate = |path: &Path| {
        run(Command::new("python3")
            .args(["-m", "kubernetes_validate", "--strict", "-k", "1.30.0"])
            .arg(path))
    };
    let dir = tempfile::tempdir().expect("tmp");
    for manifest in manifests() {
        let (ok, out) = validate(&manifest);
        assert!(ok, "kubernetes-validate (scripts/deps installs it from PyPI):\n{out}");
        assert!(out.contains("passed for resource daemonset/"), "{out}");
        // The validator really validates: a misspelt field in the DaemonSet is refused.
        let broken = dir.path().join("broken.yaml");
        let text = std::fs::read_to_string(&manifest).expect("manifest");
        std::fs::write(&broken, text.replace("hostNetwork: true", "hostNetwerk: true")).expect("write");
        let (ok, out) = validate(&broken);
        assert!(!ok, "a misspelt field passed:\n{out}");
    }
    let crd = root().join("deploy/kubernetes/wasmmodule-crd.yml");
    let (ok, out) = validate(&crd);
    assert!(
        ok && out.contains("customresourcedefinition/wasmmodules.weft.dev"),
        "{out}"
    );
    let text = std::fs::read_to_string(&crd).expect("crd");
    std::fs::write(
        dir.path().join("crd.yaml"),
        text.replace("scope: Cluster", "scoop: Cluster"),
    )
    .expect("write");
    let (ok, out) = validate(&dir.path().join("crd.yaml"));
    assert!(!ok, "a misspelt CRD field passed:\n{out}");
}

/// A document's field as JSON, read from the manifest with PyYAML (kubernetes-validate's own).
fn yaml_field(manifest: &Path, kind: &str, expr: &str) -> String {
    let script = format!(
        "import json,sys,yaml\nfor d in yaml.safe_load_all(open(sys.argv[1])):\n  if d and d['kind']=='{kind}':\n    print(json.dumps({expr}))"
    );
    let (ok, out) = run(Command::new("python3").args(["-c", &script]).arg(manifest));
    assert!(ok, "{out}");
    out.trim().to_string()
}

#[test]
fn manifests_use_only_what_weft_has() {
    for m in manifests() {
        uses_only_what_weft_has(&m);
    }
}

fn uses_only_what_weft_has(manifest: &Path) {
    let yaml_field = |kind: &str, expr: &str| yaml_field(manifest, kind, expr);
    // The ConfigMap's network config is one Weft accepts.
    let data: serde_json::Value = serde_json::from_str(&yaml_field("ConfigMap", "d['data']")).expect("data");
    let net = data["net-conf.json"].as_str().expect("net-conf.json");
    weft::config::NetworkConfig::parse(net).expect("the ConfigMap's net-conf.json");

    // The init container's command installs the plugin and the conflist.
    let init: Vec<String> = serde_json::from_str(&yaml_field(
        "DaemonSet",
        "d['spec']['template']['spec']['initContainers'][0]['command']",
    ))
    .expect("init command");
    assert_eq!(&init[..2], ["/weft", "install-cni"]);
    let dir = tempfile::tempdir().expect("tmp");
    let conf = dir.path().join("cni-conf.json");
    std::fs::write(&conf, data["cni-conf.json"].as_str().expect("cni-conf.json")).expect("write");
    let plugin = weft_bin().with_file_name("weft-cni");
    let (ok, out) = run(Command::new(weft_bin())
        .args(["install-cni", "--plugin"])
        .arg(&plugin)
        .arg("--bin-dir")
        .arg(dir.path().join("bin"))
        .arg("--conf")
        .arg(&conf)
        .arg("--conf-dir")
        .arg(dir.path().join("net.d")));
    assert!(ok, "{out}");
    assert_eq!(
        std::fs::read(dir.path().join("bin/weft")).expect("installed plugin"),
        std::fs::read(&plugin).expect("weft-cni")
    );
    assert!(dir.path().join("net.d/10-weft.conflist").exists());
    let install_help = help("install-cni");
    for flag in init.iter().filter(|a| a.starts_with("--")) {
        assert!(install_help.contains(flag.as_str()), "install-cni has no {flag}");
    }

    // The agent's flags and variables exist.
    let agent_help = help("agent");
    let cmd: Vec<String> = serde_json::from_str(&yaml_field(
        "DaemonSet",
        "d['spec']['template']['spec']['containers'][0]['command']",
    ))
    .expect("command");
    assert_eq!(&cmd[..2], ["/weft", "agent"]);
    for flag in cmd.iter().filter(|a| a.starts_with("--")) {
        assert!(agent_help.contains(flag.as_str()), "weft agent has no {flag}");
    }
    let env: Vec<serde_json::Value> = serde_json::from_str(&yaml_field(
        "DaemonSet",
        "d['spec']['template']['spec']['containers'][0]['env']",
    ))
    .expect("env");
    for e in env {
        let name = e["name"].as_str().expect("name");
        assert!(
            agent_help.contains(&format!("[env: {name}=")),
            "weft agent reads no {name}"
        );
    }
    // Probes hit the endpoints the agent serves, on the port it listens on.
    let probe = yaml_field(
        "DaemonSet",
        "d['spec']['template']['spec']['containers'][0]['readinessProbe']",
    );
    assert!(probe.contains("/readyz") && probe.contains("8286"), "{probe}");
}

#[test]
fn the_systemd_environment_names_only_real_variables() {
    let agent_help = help("agent");
    let env = std::fs::read_to_string(root().join("deploy/systemd/weft.env")).expect("weft.env");
    let mut n = 0;
    for line in env.lines().filter(|l| !l.starts_with('#') && l.contains('=')) {
        let name = line.split('=').next().expect("name");
        assert!(
            agent_help.contains(&format!("[env: {name}=")),
            "weft agent reads no {name}"
        );
        n += 1;
    }
    assert!(n >= 5, "{env}");
    let unit = std::fs::read_to_string(root().join("deploy/systemd/weft.service")).expect("unit");
    assert!(unit.contains("ExecStart=/usr/local/bin/weft agent"), "{unit}");
    assert!(unit.contains("EnvironmentFile=-/etc/weft/weft.env"));
    // The JIT compiles Wasm modules to executable memory: this hardening would break modules.
    assert!(!unit.contains("MemoryDenyWriteExecute=yes"));
}

#[test]
fn the_compose_file_names_only_real_variables_and_configs() {
    // `docker-compose config` resolves the anchors and defaults exactly as `up` will.
    let (ok, out) = run(Command::new("docker-compose")
        .arg("-f")
        .arg(root().join("deploy/compose.yaml"))
        .args(["config"]));
    assert!(
        ok,
        "docker-compose config (scripts/deps installs docker-compose):\n{out}"
    );
    let script = "import json,sys,yaml\nd=yaml.safe_load(sys.stdin)\nprint(json.dumps(d['services']))";
    let mut py = Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    std::io::Write::write_all(&mut py.stdin.take().expect("stdin"), out.as_bytes()).expect("write");
    let services: serde_json::Value =
        serde_json::from_slice(&py.wait_with_output().expect("python3").stdout).expect("services");
    let agent_help = help("agent");
    let mut nodes = 0;
    for (name, svc) in services.as_object().expect("services") {
        if name == "etcd" {
            continue;
        }
        nodes += 1;
        for var in svc["environment"].as_object().expect("environment").keys() {
            if var != "RUST_LOG" {
                assert!(
                    agent_help.contains(&format!("[env: {var}=")),
                    "weft agent reads no {var}"
                );
            }
        }
        assert_eq!(
            svc["cap_add"],
            serde_json::json!(["NET_ADMIN"]),
            "{name}: least privilege"
        );
        assert_eq!(svc["cap_drop"], serde_json::json!(["ALL"]), "{name}: least privilege");
        assert_eq!(svc["read_only"], serde_json::json!(true), "{name}: writable root");
        assert!(svc.get("privileged").is_none(), "{name} is privileged");
    }
    assert_eq!(nodes, 3);
    // Every backend the file offers has a network config Weft accepts.
    for backend in ["vxlan", "udp", "host-gw"] {
        let text = std::fs::read_to_string(root().join(format!("deploy/compose/{backend}.json"))).expect("config");
        let cfg = weft::config::NetworkConfig::parse(&text).unwrap_or_else(|e| panic!("{backend}.json: {e}"));
        assert_eq!(cfg.backend.kind, backend);
    }
}
