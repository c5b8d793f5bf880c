//! Test harness: clusters of namespaces with agents, an etcd server on the underlay, and
//! helpers to prove traffic across them. Everything made here is removed on drop, also when
//! a test panics.

pub mod kubeapi;
pub mod kubelab;
pub mod lossy;
pub mod webdriver;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub use weft::lab::cluster::metric_value;
use weft::lab::cluster::{run_checked, Cluster, ClusterSpec, LabStore};
use weft::lab::probe;

/// Default network config of test clusters.
pub const NET_CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#;

/// The `weft` binary under test: `$WEFT_BIN`, else the workspace's release build, else debug.
pub fn weft_bin() -> PathBuf {
    workspace_bin("weft", "WEFT_BIN", "cargo build --release -p weft")
}

/// A binary of this workspace: `$var`, else the release build, else the debug one.
pub fn workspace_bin(name: &str, var: &str, build: &str) -> PathBuf {
    if let Ok(p) = std::env::var(var) {
        return PathBuf::from(p);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    for profile in ["release", "debug"] {
        let p = root.join("target").join(profile).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("no {name} binary: run `{build}` first or set {var}");
}

/// An example module built by `scripts/build-policies`: `target/policies/<name>.wasm`, or
/// `$WEFT_POLICY_DIR/<name>.wasm`.
pub fn policy_wasm(name: &str) -> PathBuf {
    let dir = std::env::var("WEFT_POLICY_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/policies"));
    let p = dir.join(format!("{name}.wasm"));
    assert!(
        p.exists(),
        "{} is missing: run scripts/build-policies first",
        p.display()
    );
    // Canonical, because browsers refuse file paths with `..` in them.
    std::fs::canonicalize(&p).unwrap_or(p)
}

/// Tries a TCP handshake from `client_ns` to a listener on `ip:port` in `server_ns`.
pub fn tcp_connects(client_ns: &str, server_ns: &str, ip: Ipv4Addr, port: u16) -> bool {
    match probe::tcp_connect(server_ns, ip, port, client_ns, Duration::from_secs(2)) {
        Ok(()) => true,
        Err(weft::lab::LabError::Probe(_)) => false,
        // A listener that cannot start must not read as a blocked port.
        Err(e) => panic!("cannot probe tcp/{port} in {server_ns}: {e}"),
    }
}

/// [`tcp_transfer`] to a fixed server port.
pub fn tcp_transfer_port(from: &str, to: &str, to_ip: Ipv4Addr, port: u16, bytes: u64) -> Duration {
    match probe::tcp_transfer_on(to, to_ip, port, from, bytes, Duration::from_secs(30)) {
        Ok(d) => d,
        Err(e) => panic!("TCP transfer {from} -> {to_ip}:{port} failed: {e}"),
    }
}

/// Fails the test unless it runs as root: these tests build network namespaces.
pub fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "integration tests need root (network namespaces); run them as root"
    );
}

/// A namespace prefix no other test (or test run) uses at the same time: `wt<pid>-<n><tag>`.
/// The pid lets `scripts/test` remove what a killed run left behind (its process is gone).
pub fn unique_prefix(tag: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("wt{}-{}{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed), tag)
}

/// Which store a test cluster uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// The embedded SQLite store.
    Embedded,
    /// etcd, started by the harness on the underlay.
    Etcd,
    /// etcd serving only TLS with client-certificate authentication.
    EtcdTls,
    /// The stand-in Kubernetes API server (`--kube-subnet-mgr`); the test creates the Nodes.
    Kube,
}

/// A test cluster: the lab, its temp dir, and etcd if used. Field order is drop order.
pub struct TestCluster {
    /// The namespaces and agents.
    pub lab: Cluster,
    /// etcd, when the store is etcd.
    pub etcd: Option<Etcd>,
    /// The Kubernetes API server, when the store is Kubernetes.
    pub kube: Option<kubelab::KubeApi>,
    /// Keeps the directory alive as long as the cluster.
    pub tmp: tempfile::TempDir,
    /// Leases written for nodes that do not exist: routes every node holds besides its peers'.
    pub fake_routes: usize,
}

impl TestCluster {
    /// Builds `nodes` nodes on `store` with `NET_CONFIG`; starts nothing but etcd.
    pub fn new(tag: &str, store: StoreKind, nodes: usize) -> TestCluster {
        Self::with_config(tag, store, nodes, NET_CONFIG, &[])
    }

    /// Builds with a given network config and extra agent arguments.
    pub fn with_config(
        tag: &str,
        store: StoreKind,
        nodes: usize,
        net_config: &str,
        agent_args: &[&str],
    ) -> TestCluster {
        require_root();
        let tmp = tempfile::tempdir().expect("temp dir");
        let prefix = unique_prefix(tag);
        let lab_store = match store {
            StoreKind::Embedded => LabStore::Embedded(tmp.path().join("store.db")),
            StoreKind::Kube => LabStore::Kube {
                kubeconfig: tmp.path().join("kube").join("kubeconfig"),
            },
            // Filled in once etcd has an address.
            StoreKind::Etcd | StoreKind::EtcdTls => LabStore::Etcd {
                endpoints: String::new(),
                prefix: "/coreos.com/network".into(),
            },
        };
        let spec = ClusterSpec {
            prefix,
            dir: tmp.path().join("lab"),
            weft_bin: weft_bin(),
            store: lab_store,
            net_config: net_config.to_string(),
            agent_args: agent_args.iter().map(|s| s.to_string()).collect(),
        };
        let mut lab = Cluster::build(spec, nodes).expect("build lab");
        let kube = (store == StoreKind::Kube).then(|| {
            let (ns, addr) = lab.add_host("kubeapi").expect("API server host");
            kubelab::KubeApi::start(ns, addr, &tmp.path().join("kube"))
        });
        let etcd = match store {
            StoreKind::Embedded | StoreKind::Kube => None,
            StoreKind::Etcd | StoreKind::EtcdTls => {
                let (ns, addr) = lab.add_host("etcd").expect("etcd host");
                let tls = (store == StoreKind::EtcdTls).then(|| TlsFiles::generate(tmp.path(), addr));
                if let Some(t) = &tls {
                    lab.spec.agent_args.extend(t.agent_args());
                }
                let e = Etcd::start(ns, addr, tmp.path().join("etcd"), tls);
                lab.spec.store = LabStore::Etcd {
                    endpoints: e.endpoint(),
                    prefix: "/coreos.com/network".into(),
                };
                Some(e)
            }
        };
        TestCluster {
            lab,
            etcd,
            kube,
            tmp,
            fake_routes: 0,
        }
    }

    /// Writes fake leases `range` into etcd (see [`Etcd::put_fake_leases`]).
    pub fn fake_leases(&mut self, range: std::ops::Range<u32>, kind: Fake) {
        let n = range.len();
        self.etcd
            .as_ref()
            .expect("fake leases need etcd")
            .put_fake_leases(range, kind);
        self.fake_routes += n;
    }

    /// Starts every agent, waits for readiness and gives each node `pods` pods.
    pub fn up(&mut self, pods: usize) {
        if let Err(e) = self.lab.up(pods, Duration::from_secs(40)) {
            panic!("cluster did not come up: {e}");
        }
        // Ready means a node routes the peers it saw at start; later joiners arrive by watch.
        // Tests start from a converged cluster: every node routes every other.
        let peers = (self.lab.nodes.len() - 1 + self.fake_routes) as f64;
        for n in 1..=self.lab.nodes.len() {
            assert!(
                eventually(Duration::from_secs(15), || self.lab.metric(n, "weft_routes").ok()
                    == Some(peers)),
                "node {n} never routed all {peers} peers:\n{}",
                self.lab.nodes[n - 1].log_tail(20)
            );
        }
    }

    /// The namespace and address of pod `p` on node `n` (both 1-based).
    pub fn pod(&self, n: usize, p: usize) -> (String, Ipv4Addr) {
        let pod = &self.lab.nodes[n - 1].pods[p - 1];
        (pod.ns.name().to_string(), pod.ip)
    }

    /// Node `n`'s subnet.
    pub fn subnet(&self, n: usize) -> ipnet::Ipv4Net {
        self.lab.nodes[n - 1].subnet.expect("node has a subnet")
    }

    /// A metric of node `n`, panicking with the agent log if it cannot be read.
    pub fn metric(&self, n: usize, series: &str) -> f64 {
        match self.lab.metric(n, series) {
            Ok(v) => v,
            Err(e) => panic!(
                "metric {series} of node {n}: {e}\n{}",
                self.lab.nodes[n - 1].log_tail(30)
            ),
        }
    }

    /// Lists leases as `weft lease ls` prints them, from inside the etcd host or directly.
    pub fn lease_lines(&self) -> Vec<String> {
        let out = self.weft_lease(&["ls"]).expect("weft lease ls");
        out.lines().skip(1).map(str::to_string).collect()
    }

    /// Runs `weft lease <args>` against this cluster's store.
    pub fn weft_lease(&self, args: &[&str]) -> Result<String, String> {
        self.weft_cli("lease", args, None)
    }

    /// Runs `weft module <args>` against this cluster's store from node `n`'s namespace, as an
    /// operator on that node would.
    pub fn weft_module(&self, n: usize, args: &[&str]) -> Result<String, String> {
        self.weft_cli("module", args, Some(self.lab.nodes[n - 1].ns.name()))
    }

    /// Runs `weft <sub> <store flags> <args>` from `ns` (default: etcd's host, or the root
    /// namespace for the embedded store).
    pub fn weft_cli(&self, sub: &str, args: &[&str], ns: Option<&str>) -> Result<String, String> {
        let mut cmd = match (&self.etcd, &self.kube) {
            (_, Some(k)) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns.unwrap_or(&k.ns)]);
                c.arg(weft_bin());
                c.args([sub, "--kube-subnet-mgr", "--kubeconfig-file"]);
                c.arg(&k.kubeconfig);
                c
            }
            (Some(e), None) => {
                let mut c = Command::new("ip");
                c.args([
                    "netns",
                    "exec",
                    ns.unwrap_or(&e.ns),
                    &weft_bin().display().to_string(),
                    sub,
                    "--etcd-endpoints",
                    &e.endpoint(),
                ]);
                if let Some(t) = &e.tls {
                    c.args(t.agent_args());
                }
                c
            }
            (None, None) => {
                let LabStore::Embedded(p) = &self.lab.spec.store else {
                    unreachable!()
                };
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns.unwrap_or(self.lab.nodes[0].ns.name())]);
                c.arg(weft_bin());
                c.args([sub, "--store", &p.display().to_string()]);
                c
            }
        };
        cmd.args(args);
        run_checked(&mut cmd).map_err(|e| e.to_string())
    }

    /// Deletes the lease on `subnet` from the store, as an operator would.
    pub fn delete_lease(&self, subnet: ipnet::Ipv4Net) {
        match &self.etcd {
            Some(e) => {
                let key = format!(
                    "/coreos.com/network/subnets/{}-{}",
                    subnet.network(),
                    subnet.prefix_len()
                );
                let out = e.etcdctl(&["del", &key]).expect("etcdctl del");
                assert_eq!(out.trim(), "1", "etcdctl del {key} deleted {out}");
            }
            None => {
                self.weft_lease(&["rm", &subnet.to_string()]).expect("weft lease rm");
            }
        }
    }
}

/// Pings `dst` from namespace `ns` with the system's `ping`; true if any reply came back.
pub fn ping(ns: &str, dst: Ipv4Addr) -> bool {
    ping_output(ns, dst).0
}

/// Pings `dst` from `ns` (3 tries, 2 s each): (success, ping's output).
pub fn ping_output(ns: &str, dst: Ipv4Addr) -> (bool, String) {
    ping_output_with(ns, dst, &["-c", "3", "-i", "0.2"])
}

/// Pings `dst` from `ns` with `args` (count, interval) and a 2 s wait: (success, ping's output).
pub fn ping_output_with(ns: &str, dst: Ipv4Addr, args: &[&str]) -> (bool, String) {
    let dst = dst.to_string();
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "ping"])
        .args(args)
        .args(["-W", "2", "-n", &dst])
        .output()
        .expect("run ping (is iputils-ping installed?)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Sends `bytes` checked bytes over TCP from pod namespace `from` to `to_ip` in `to`.
pub fn tcp_transfer(from: &str, to: &str, to_ip: Ipv4Addr, bytes: u64) -> Duration {
    match probe::tcp_transfer(to, to_ip, from, bytes, Duration::from_secs(30)) {
        Ok(d) => d,
        Err(e) => panic!("TCP transfer {from} -> {to_ip} failed: {e}"),
    }
}

/// Node `n`'s WEFT-POLICY chain as `iptables -S` prints it; empty when the chain does not exist.
pub fn policy_rules(c: &TestCluster, n: usize) -> String {
    Command::new("ip")
        .args([
            "netns",
            "exec",
            c.lab.nodes[n - 1].ns.name(),
            "iptables",
            "-S",
            "WEFT-POLICY",
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Polls `f` until it is true or `timeout` passes; returns whether it became true.
pub fn eventually(timeout: Duration, f: impl FnMut() -> bool) -> bool {
    eventually_every(timeout, Duration::from_millis(200), f)
}

/// [`eventually`], polling every `period`: for checks that must catch a state soon after it
/// appears (a report that precedes what it claims by less than the default period).
pub fn eventually_every(timeout: Duration, period: Duration, mut f: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        if f() {
            return true;
        }
        std::thread::sleep(period);
    }
    f()
}

/// An etcd server (Debian's `etcd-server`) in its own namespace on the underlay.
pub struct Etcd {
    /// Namespace it runs in.
    pub ns: String,
    /// Its underlay address.
    pub addr: Ipv4Addr,
    data_dir: PathBuf,
    child: Option<Child>,
    /// Certificates, when it serves TLS only.
    pub tls: Option<TlsFiles>,
    /// This member's name and the whole cluster (`name=peer-url,...`), for a cluster member.
    member: Option<(String, String)>,
}

/// A CA, a server certificate for etcd's address and a client certificate, made with openssl.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// CA certificate.
    pub ca: PathBuf,
    /// etcd's certificate and key.
    pub server: (PathBuf, PathBuf),
    /// The client's certificate and key.
    pub client: (PathBuf, PathBuf),
}

impl TlsFiles {
    /// Generates the files under `dir/tls` for a server at `addr`.
    pub fn generate(dir: &std::path::Path, addr: Ipv4Addr) -> TlsFiles {
        let d = dir.join("tls");
        std::fs::create_dir_all(&d).expect("tls dir");
        let p = |n: &str| d.join(n).display().to_string();
        let openssl = |args: &[&str]| {
            run_checked(Command::new("openssl").args(args)).unwrap_or_else(|e| panic!("openssl {args:?}: {e}"));
        };
        let genkey = |file: &str| openssl(&["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", &p(file)]);
        genkey("ca.key");
        openssl(&[
            "req",
            "-x509",
            "-new",
            "-key",
            &p("ca.key"),
            "-subj",
            "/CN=weft-test-ca",
            "-days",
            "2",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-out",
            &p("ca.crt"),
        ]);
        for (name, ext) in [
            // etcd 3.4 dials itself with its server certificate, so it must allow client auth too.
            (
                "server",
                format!("subjectAltName=IP:{addr}\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE"),
            ),
            (
                "client",
                "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE".to_string(),
            ),
        ] {
            genkey(&format!("{name}.key"));
            openssl(&[
                "req",
                "-new",
                "-key",
                &p(&format!("{name}.key")),
                "-subj",
                &format!("/CN=weft-{name}"),
                "-out",
                &p(&format!("{name}.csr")),
            ]);
            std::fs::write(d.join(format!("{name}.ext")), ext).expect("ext file");
            openssl(&[
                "x509",
                "-req",
                "-in",
                &p(&format!("{name}.csr")),
                "-CA",
                &p("ca.crt"),
                "-CAkey",
                &p("ca.key"),
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &p(&format!("{name}.ext")),
                "-out",
                &p(&format!("{name}.crt")),
            ]);
        }
        TlsFiles {
            ca: d.join("ca.crt"),
            server: (d.join("server.crt"), d.join("server.key")),
            client: (d.join("client.crt"), d.join("client.key")),
        }
    }

    /// The agent flags that use these files.
    pub fn agent_args(&self) -> Vec<String> {
        vec![
            "--etcd-cafile".into(),
            self.ca.display().to_string(),
            "--etcd-certfile".into(),
            self.client.0.display().to_string(),
            "--etcd-keyfile".into(),
            self.client.1.display().to_string(),
        ]
    }
}

impl Etcd {
    /// Starts etcd and waits until it answers.
    pub fn start(ns: String, addr: Ipv4Addr, data_dir: PathBuf, tls: Option<TlsFiles>) -> Etcd {
        let mut e = Etcd {
            ns,
            addr,
            data_dir,
            child: None,
            tls,
            member: None,
        };
        e.resume();
        e
    }

    /// Starts one member of a cluster: `cluster` is etcd's `--initial-cluster` (every member's
    /// `name=http://addr:2380`). Returns at once: a member is healthy only once a quorum runs,
    /// so call [`wait_healthy`](Self::wait_healthy) after starting them all.
    pub fn member(ns: String, addr: Ipv4Addr, data_dir: PathBuf, name: &str, cluster: &str) -> Etcd {
        let mut e = Etcd {
            ns,
            addr,
            data_dir,
            child: None,
            tls: None,
            member: Some((name.to_string(), cluster.to_string())),
        };
        e.spawn();
        e
    }

    /// Whether the server process is running (not stopped by the test).
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// The client URL.
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}:2379", self.addr)
    }

    /// (Re)starts the server on the same data directory and waits until it is healthy.
    pub fn resume(&mut self) {
        self.spawn();
        self.wait_healthy();
    }

    /// (Re)starts the server process on the same data directory.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "etcd already running");
        std::fs::create_dir_all(&self.data_dir).expect("etcd data dir");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir.with_extension("log"))
            .expect("etcd log");
        let url = self.endpoint();
        let mut tls_args: Vec<String> = Vec::new();
        if let Some(t) = &self.tls {
            tls_args = vec![
                "--cert-file".into(),
                t.server.0.display().to_string(),
                "--key-file".into(),
                t.server.1.display().to_string(),
                "--trusted-ca-file".into(),
                t.ca.display().to_string(),
                "--client-cert-auth".into(),
            ];
        }
        let (name, peer, cluster) = match &self.member {
            None => (
                "weft-test".to_string(),
                "http://127.0.0.1:2380".to_string(),
                "weft-test=http://127.0.0.1:2380".to_string(),
            ),
            Some((name, cluster)) => (name.clone(), format!("http://{}:2380", self.addr), cluster.clone()),
        };
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns, "etcd"])
            .args(&tls_args)
            .args(["--name", &name, "--data-dir", &self.data_dir.display().to_string()])
            .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &cluster])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start etcd (is etcd-server installed?)");
        self.child = Some(child);
    }

    /// Waits until the server answers as healthy (its cluster has a leader).
    pub fn wait_healthy(&self) {
        let healthy = eventually(Duration::from_secs(20), || {
            self.etcdctl(&["endpoint", "health"]).is_ok()
        });
        if !healthy {
            let log = std::fs::read_to_string(self.data_dir.with_extension("log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            let probe = self.etcdctl(&["endpoint", "health"]).err().unwrap_or_default();
            panic!(
                "etcd did not become healthy ({probe}); its log ends:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }

    /// Stops the server (SIGKILL: an outage, not a maintenance).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs `etcdctl` (v3 API) against this server from inside its namespace.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String, String> {
        self.etcdctl_with(&self.endpoint(), args)
    }

    /// Runs `etcdctl` from inside this server's namespace against `endpoints` (comma separated).
    pub fn etcdctl_with(&self, endpoints: &str, args: &[&str]) -> Result<String, String> {
        let mut c = Command::new("ip");
        c.args([
            "netns",
            "exec",
            &self.ns,
            "etcdctl",
            "--endpoints",
            endpoints,
            "--command-timeout=3s",
        ]);
        if let Some(t) = &self.tls {
            c.arg(format!("--cacert={}", t.ca.display()))
                .arg(format!("--cert={}", t.client.0.display()))
                .arg(format!("--key={}", t.client.1.display()));
        }
        c.args(args).env("ETCDCTL_API", "3");
        run_checked(&mut c).map_err(|e| e.to_string())
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Where Debian's containernetworking-plugins puts the standard plugins.
pub const CNI_PATH: &str = "/usr/lib/cni";

/// Runs CNI `plugin` in namespace `ns` exactly as a container runtime does: CNI_* variables
/// (interface `eth0`, plugins from [`CNI_PATH`]), the config on stdin.
pub fn run_cni(ns: &str, plugin: &Path, command: &str, container: &str, pod_ns: &str, conf: &str) -> Output {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(plugin)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", format!("/var/run/netns/{pod_ns}"))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", CNI_PATH)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {}: {e}", plugin.display()));
    if let Some(mut stdin) = child.stdin.take() {
        std::io::Write::write_all(&mut stdin, conf.as_bytes()).expect("write the CNI config");
    }
    child.wait_with_output().expect("wait for the CNI plugin")
}

/// A network config for clusters of thousands: 10.0.0.0/8 cut into 65,536 /24 subnets, on
/// `backend` (a `Backend` JSON object).
pub fn scale_net(backend: &str) -> String {
    format!(r#"{{"Network":"10.0.0.0/8","SubnetLen":24,"Backend":{backend}}}"#)
}

/// Which backend the nodes behind fake leases run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fake {
    /// `vxlan` peers (a VTEP MAC each) at addresses off the underlay, where nothing is sent.
    Vxlan,
    /// `host-gw` peers at on-link underlay addresses where no host answers.
    HostGw,
    /// `udp` peers off the underlay.
    Udp,
}

/// Fake lease `i`'s subnet: 10.16.0.0/24 onward, far above where real nodes lease (real nodes
/// pick among the lowest free subnets from 10.0.1.0).
pub fn fake_subnet(i: u32) -> ipnet::Ipv4Net {
    ipnet::Ipv4Net::new(Ipv4Addr::from(0x0a10_0000 + (i << 8)), 24).expect("a /24")
}

/// flannel's JSON for fake lease `i`.
pub fn fake_lease_json(i: u32, kind: Fake) -> String {
    let off_link = Ipv4Addr::new(198, 19, (i >> 8) as u8, i as u8);
    match kind {
        Fake::Vxlan => format!(
            r#"{{"PublicIP":"{off_link}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"02:0f:00:{:02x}:{:02x}:{:02x}"}}}}"#,
            (i >> 16) as u8,
            (i >> 8) as u8,
            i as u8
        ),
        Fake::HostGw => format!(
            r#"{{"PublicIP":"198.18.0.{}","BackendType":"host-gw","BackendData":null}}"#,
            100 + i % 100
        ),
        Fake::Udp => format!(r#"{{"PublicIP":"{off_link}","BackendType":"udp","BackendData":null}}"#),
    }
}

/// The key of a lease on `subnet` in flannel's layout.
pub fn lease_key(subnet: ipnet::Ipv4Net) -> String {
    format!("/coreos.com/network/subnets/{}", weft::subnet::subnet_key(&subnet))
}

impl Etcd {
    /// Writes fake leases `range` straight into etcd as flannel writes them (no TTL), 64
    /// requests at a time, from inside etcd's namespace.
    pub fn put_fake_leases(&self, range: std::ops::Range<u32>, kind: Fake) {
        let url = self.endpoint();
        let written = weft::lab::netns::enter_and_run(&self.ns, move || {
            use futures::StreamExt;
            use weft::lease::etcd::client::{Cluster, ClusterOptions};
            use weft::lease::etcd::proto::{path, PutRequest, PutResponse};
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let c = Cluster::new(&ClusterOptions {
                    endpoints: vec![url],
                    ..Default::default()
                })
                .expect("etcd client");
                let puts = futures::stream::iter(range.map(|i| {
                    let c = c.clone();
                    async move {
                        let req = PutRequest {
                            key: lease_key(fake_subnet(i)).into_bytes(),
                            value: fake_lease_json(i, kind).into_bytes(),
                            lease: 0,
                        };
                        c.unary::<_, PutResponse>(path::PUT, req).await.map(|_| ())
                    }
                }))
                .buffer_unordered(64)
                .collect::<Vec<_>>()
                .await;
                puts.into_iter().collect::<Result<Vec<()>, _>>().map(|v| v.len())
            })
        })
        .expect("enter etcd's namespace");
        written.expect("write fake leases");
    }

    /// Deletes fake leases `256 * blocks.start .. 256 * blocks.end` (each block is one second
    /// octet, 10.16.x.0 onward) with one range delete: one etcd revision. Returns how many went.
    pub fn delete_fake_blocks(&self, blocks: std::ops::Range<u32>) -> usize {
        // Two-digit octets sort as numbers do, so the key range holds exactly these blocks.
        assert!(blocks.end + 16 <= 100, "blocks past 10.99.x do not sort as numbers");
        let key = |b: u32| format!("/coreos.com/network/subnets/10.{}.", 16 + b);
        let out = self
            .etcdctl(&["del", &key(blocks.start), &key(blocks.end)])
            .expect("etcdctl del range");
        out.trim().parse().unwrap_or(0)
    }
}

/// A command whose output lines are collected until it is dropped (`ip monitor`, `ping`).
pub struct Watcher {
    child: Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<(std::time::Instant, String)>>>,
}

impl Watcher {
    /// Starts `args` (a command in a namespace: `ip netns exec ...`, `ip -n ... monitor`).
    pub fn start(program: &str, args: &[&str]) -> Watcher {
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {program} {args:?}: {e}"));
        let lines: std::sync::Arc<std::sync::Mutex<Vec<(std::time::Instant, String)>>> = Default::default();
        for out in [
            child
                .stdout
                .take()
                .map(|o| Box::new(o) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|o| Box::new(o) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let lines = lines.clone();
            std::thread::spawn(move || {
                use std::io::BufRead;
                for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                    if let Ok(mut v) = lines.lock() {
                        v.push((std::time::Instant::now(), l));
                    }
                }
            });
        }
        // `ip monitor` subscribes before it prints anything: give it a moment.
        std::thread::sleep(Duration::from_millis(200));
        Watcher { child, lines }
    }

    /// The lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.timed_lines().into_iter().map(|(_, l)| l).collect()
    }

    /// The lines so far, each with the moment it was read.
    pub fn timed_lines(&self) -> Vec<(std::time::Instant, String)> {
        self.lines.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Waits up to `timeout` for a line satisfying `f` read at or after `since`; returns when.
    pub fn wait_line(
        &self,
        since: std::time::Instant,
        timeout: Duration,
        f: impl Fn(&str) -> bool,
    ) -> Option<std::time::Instant> {
        let until = std::time::Instant::now() + timeout;
        loop {
            if let Some(t) = self
                .timed_lines()
                .into_iter()
                .find(|(t, l)| *t >= since && f(l))
                .map(|(t, _)| t)
            {
                return Some(t);
            }
            if std::time::Instant::now() >= until {
                return None;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Waits for the command to end by itself (within `timeout`), then returns every line.
    pub fn finish(mut self, timeout: Duration) -> Vec<String> {
        let until = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(100));
        self.lines()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Watches namespace `ns` for every route, neighbour and FDB change the kernel reports.
pub fn kernel_monitor(ns: &str) -> (Watcher, Watcher) {
    (
        Watcher::start("ip", &["-n", ns, "monitor", "route", "neigh"]),
        Watcher::start("bridge", &["-n", ns, "monitor", "fdb"]),
    )
}

/// The deletions of Weft's entries among monitor lines: routes with protocol 87, and
/// neighbours and FDB entries on Weft's devices.
pub fn weft_deletions(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter(|l| l.starts_with("Deleted") && (l.contains("proto 87") || l.contains("dev weft.")))
        .cloned()
        .collect()
}

/// A steady ping from `ns` to `dst`: `count` pings at 10 Hz.
pub fn steady_ping(ns: &str, dst: Ipv4Addr, count: u32) -> Watcher {
    Watcher::start(
        "ip",
        &[
            "netns",
            "exec",
            ns,
            "ping",
            "-n",
            "-i",
            "0.1",
            "-W",
            "1",
            "-c",
            &count.to_string(),
            &dst.to_string(),
        ],
    )
}

/// (sent, received) from ping's summary line.
pub fn ping_counts(lines: &[String]) -> Option<(u32, u32)> {
    lines.iter().find_map(|l| {
        let (sent, rest) = l.split_once(" packets transmitted, ")?;
        let received = rest.split_whitespace().next()?;
        Some((sent.trim().parse().ok()?, received.parse().ok()?))
    })
}

impl Etcd {
    /// Writes fake lease `i` and returns the moment the request left (after a warm-up request,
    /// so connecting to etcd is not counted).
    pub fn put_fake_lease_timed(&self, i: u32, kind: Fake) -> std::time::Instant {
        let url = self.endpoint();
        weft::lab::netns::enter_and_run(&self.ns, move || {
            use weft::lease::etcd::client::{Cluster, ClusterOptions};
            use weft::lease::etcd::proto::{path, PutRequest, PutResponse, RangeRequest, RangeResponse};
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let c = Cluster::new(&ClusterOptions {
                    endpoints: vec![url],
                    ..Default::default()
                })
                .expect("etcd client");
                let warm = RangeRequest {
                    key: b"/weft-bench/warm-up".to_vec(),
                    ..Default::default()
                };
                c.unary::<_, RangeResponse>(path::RANGE, warm).await.expect("warm-up");
                let req = PutRequest {
                    key: lease_key(fake_subnet(i)).into_bytes(),
                    value: fake_lease_json(i, kind).into_bytes(),
                    lease: 0,
                };
                let t0 = std::time::Instant::now();
                c.unary::<_, PutResponse>(path::PUT, req).await.expect("put");
                t0
            })
        })
        .expect("enter etcd's namespace")
    }
}

/// The CPU time a process used so far (user + system), from `/proc/<pid>/stat`.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// The resident memory of a process in MiB, from `/proc/<pid>/status`.
pub fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// The p-th percentile (0..=100) of `v` (sorted here).
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[i.min(v.len() - 1)]
}

/// A module of `functions` empty functions that each declare `locals` i32 locals: the shape of
/// a compile bomb (compile time grows with both) when both are large, and of a module that is
/// costly but within limits when they are not. It has no exports, so it is refused after
/// compiling when it gets that far.
pub fn empty_functions_wasm(functions: u32, locals: u32) -> Vec<u8> {
    use wasm_encoder::{CodeSection, Function, FunctionSection, Instruction, Module, TypeSection, ValType};
    let mut types = TypeSection::new();
    types.ty().function([], []);
    let mut funcs = FunctionSection::new();
    let mut code = CodeSection::new();
    for _ in 0..functions {
        funcs.function(0);
        let mut f = Function::new([(locals, ValType::I32)]);
        f.instruction(&Instruction::End);
        code.function(&f);
    }
    let mut m = Module::new();
    m.section(&types).section(&funcs).section(&code);
    m.finish()
}

/// A `multipart/form-data` body of `fields` (the `wasm` field as a file), as the dashboard and
/// `weft module add --server` upload modules: (content type, body).
pub fn multipart(fields: &[(&str, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "weftboundary7d3a";
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"").as_bytes());
        if *name == "wasm" {
            body.extend_from_slice(b"; filename=\"m.wasm\"\r\nContent-Type: application/wasm");
        }
        body.extend_from_slice(b"\r\n\r\n");
        body.extend_from_slice(value);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// POSTs a module upload (see [`multipart`]) to node `n`'s API.
pub fn upload_module(
    c: &TestCluster,
    n: usize,
    token: &str,
    fields: &[(&str, &[u8])],
) -> weft::lab::cluster::HttpResponse {
    let (ct, body) = multipart(fields);
    let auth = format!("Bearer {token}");
    c.lab
        .http(
            n,
            "POST",
            "/api/v1/modules",
            &[("Authorization", &auth), ("Content-Type", &ct)],
            &body,
        )
        .unwrap_or_else(|e| panic!("upload to node {n}: {e}"))
}

/// Runs `cmd`: its stdout when it succeeds, else its stderr (what a person would read).
pub fn stdout_or_stderr(cmd: &mut Command) -> Result<String, String> {
    run_checked(cmd).map_err(|e| match e {
        weft::lab::LabError::Command { stderr, .. } => stderr,
        other => other.to_string(),
    })
}
