//! The stand-in Kubernetes API server as a test runs it: its own process in a namespace on
//! the lab's underlay, HTTPS with a certificate for that address, a bearer token, a kubeconfig
//! that agents and the real `kubectl` both use, and its objects in a file so a stop and start
//! keeps them.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use weft::lab::cluster::run_checked;

use crate::TlsFiles;

/// The port it listens on (the API server's usual one).
pub const PORT: u16 = 6443;
/// The bearer token every client presents.
const TOKEN: &str = "weft-test-token-2b7c";

/// The stand-in binary: `$WEFT_KUBE_STANDIN`, else the workspace's release build, else debug.
pub fn standin_bin() -> PathBuf {
    crate::workspace_bin(
        "kube-standin",
        "WEFT_KUBE_STANDIN",
        "cargo build --release -p weft-tests --bins",
    )
}

/// A running (or stopped) stand-in API server.
pub struct KubeApi {
    /// The namespace it runs in.
    pub ns: String,
    /// Its underlay address.
    pub addr: Ipv4Addr,
    /// The kubeconfig naming it.
    pub kubeconfig: PathBuf,
    tls: TlsFiles,
    state: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl KubeApi {
    /// Starts one in `ns` at `addr`, keeping its files under `dir`.
    pub fn start(ns: String, addr: Ipv4Addr, dir: &Path) -> KubeApi {
        std::fs::create_dir_all(dir).expect("kube dir");
        let tls = TlsFiles::generate(dir, addr);
        let kubeconfig = dir.join("kubeconfig");
        let ca = std::fs::read(&tls.ca).expect("ca");
        let ca64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, ca);
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: https://{addr}:{PORT}\n    certificate-authority-data: {ca64}\nusers:\n- name: weft\n  user:\n    token: {TOKEN}\ncontexts:\n- name: lab\n  context: {{cluster: lab, user: weft}}\ncurrent-context: lab\n"
            ),
        )
        .expect("kubeconfig");
        let mut k = KubeApi {
            ns,
            addr,
            kubeconfig,
            tls,
            state: dir.join("objects.json"),
            log: dir.join("standin.log"),
            child: None,
        };
        k.resume(false);
        k
    }

    /// (Re)starts the server over the same objects and waits until it answers. With
    /// `compact`, every watch from before the restart is answered 410 Gone.
    pub fn resume(&mut self, compact: bool) {
        assert!(self.child.is_none(), "stand-in already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("stand-in log");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns])
            .arg(standin_bin())
            .arg(format!("{}:{PORT}", self.addr))
            .args([&self.tls.server.0, &self.tls.server.1])
            .arg(TOKEN)
            .arg(&self.state);
        if compact {
            cmd.arg("--compact");
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn kube-standin");
        self.child = Some(child);
        let until = Instant::now() + Duration::from_secs(10);
        while self.kubectl(&["get", "--raw", "/version"]).is_err() {
            assert!(Instant::now() < until, "stand-in never answered:\n{}", self.log_tail());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A service account directory as the kubelet mounts one into a pod (token, CA, namespace).
    pub fn service_account(&self, dir: &Path) -> PathBuf {
        let sa = dir.join("serviceaccount");
        std::fs::create_dir_all(&sa).expect("sa dir");
        std::fs::write(sa.join("token"), TOKEN).expect("token");
        std::fs::copy(&self.tls.ca, sa.join("ca.crt")).expect("ca.crt");
        std::fs::write(sa.join("namespace"), "kube-weft").expect("namespace");
        sa
    }

    /// Stops the server (as an API server that goes away does): SIGTERM, which it answers by
    /// saving its objects (as the etcd behind a real one keeps them), then SIGKILL.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let until = Instant::now() + Duration::from_secs(5);
            while Instant::now() < until && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The server's log.
    pub fn log_tail(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs the real `kubectl` against it, from its namespace: stdout, or the error output.
    pub fn kubectl(&self, args: &[&str]) -> Result<String, String> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, "kubectl", "--kubeconfig"])
            .arg(&self.kubeconfig)
            .args(["--request-timeout", "5s"])
            .args(args);
        run_checked(&mut cmd).map_err(|e| e.to_string())
    }

    /// [`kubectl`](Self::kubectl), panicking with the output on failure.
    pub fn must(&self, args: &[&str]) -> String {
        self.kubectl(args)
            .unwrap_or_else(|e| panic!("kubectl {args:?}: {e}\nstand-in log:\n{}", self.log_tail()))
    }

    /// Applies a manifest given as JSON text with `kubectl apply -f`.
    pub fn apply(&self, dir: &Path, name: &str, manifest: &serde_json::Value) -> String {
        let file = dir.join(format!("{name}.json"));
        std::fs::write(&file, manifest.to_string()).expect("manifest");
        self.must(&["apply", "-f", &file.display().to_string()])
    }

    /// A Node object as `kubectl get node -o json` gives it.
    pub fn node(&self, name: &str) -> serde_json::Value {
        serde_json::from_str(&self.must(&["get", "node", name, "-o", "json"])).expect("node JSON")
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A Node object for fake lease `i`: flannel's annotations for `kind`, pod CIDR
/// [`fake_subnet`](crate::fake_subnet)`(i)`.
pub fn fake_node(i: u32, kind: crate::Fake) -> serde_json::Value {
    let lease: serde_json::Value = serde_json::from_str(&crate::fake_lease_json(i, kind)).expect("lease JSON");
    let p = "flannel.alpha.coreos.com";
    let cidr = crate::fake_subnet(i).to_string();
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": format!("fake-{i}"), "annotations": {
            format!("{p}/kube-subnet-manager"): "true",
            format!("{p}/backend-type"): lease["BackendType"],
            format!("{p}/backend-data"): lease["BackendData"].to_string(),
            format!("{p}/public-ip"): lease["PublicIP"],
        }},
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
        "status": {"conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": "2026-01-01T00:00:00Z"}]},
    })
}

/// What [`KubeApi::fake_nodes`] does to each fake node.
#[derive(Debug, Clone, Copy)]
pub enum FakeOp {
    /// Create it.
    Create(crate::Fake),
    /// Patch its status as kubelet's heartbeat does (a new `lastHeartbeatTime`, nothing else).
    Heartbeat(u32),
    /// Delete it.
    Delete,
}

impl KubeApi {
    /// Applies `op` to fake nodes `range` with the same client library Weft uses, 64 requests
    /// at a time, from the server's namespace; returns when the last answer is in.
    pub fn fake_nodes(&self, range: std::ops::Range<u32>, op: FakeOp) {
        let kubeconfig = self.kubeconfig.clone();
        weft::lab::netns::enter_and_run(&self.ns, move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                use futures::StreamExt;
                use k8s_openapi::api::core::v1::Node;
                use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
                let kc = kube::config::Kubeconfig::read_from(&kubeconfig).expect("kubeconfig");
                let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.expect("config");
                let api: Api<Node> = Api::all(kube::Client::try_from(config).expect("client"));
                let calls = futures::stream::iter(range.map(|i| {
                    let api = api.clone();
                    async move {
                        let name = format!("fake-{i}");
                        match op {
                            FakeOp::Create(kind) => {
                                let node: Node = serde_json::from_value(fake_node(i, kind)).expect("node");
                                api.create(&PostParams::default(), &node).await.map(|_| ())
                            }
                            FakeOp::Heartbeat(beat) => {
                                let t = format!("2026-01-01T00:{:02}:{:02}Z", beat / 60 % 60, beat % 60);
                                let p = serde_json::json!({"status": {"conditions": [{"type": "Ready", "lastHeartbeatTime": t}]}});
                                api.patch_status(&name, &PatchParams::default(), &Patch::Strategic(p)).await.map(|_| ())
                            }
                            FakeOp::Delete => api.delete(&name, &DeleteParams::default()).await.map(|_| ()),
                        }
                    }
                }))
                .buffer_unordered(64);
                let errors: Vec<_> = calls.filter_map(|r| async move { r.err() }).collect().await;
                assert!(errors.is_empty(), "{} calls failed, first: {:?}", errors.len(), errors.first());
            })
        })
        .expect("in the API server's namespace");
    }
}
