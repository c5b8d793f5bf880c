//! A cluster of node namespaces on one underlay switch, each node with an agent and pods
//! behind a bridge, wired the way the flannel CNI plugin wires a real node.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;

use super::netns::{enter_and_run, Netns};
use super::LabError;
use crate::subnet_file::SubnetEnv;

/// The underlay: addresses reserved for benchmarking (RFC 2544), so nothing here can be
/// mistaken for, or leak towards, a real network.
pub const UNDERLAY_PREFIX: [u8; 3] = [198, 18, 0];
/// The admin endpoint each agent listens on, inside its node's namespace.
pub const ADMIN_PORT: u16 = 8286;

/// Where the cluster keeps its leases.
#[derive(Debug, Clone)]
pub enum LabStore {
    /// The embedded store file, shared by every agent.
    Embedded(PathBuf),
    /// etcd endpoints and key prefix.
    Etcd { endpoints: String, prefix: String },
    /// A Kubernetes API server, reached with this kubeconfig; node `i` is Node `node-<i>`.
    Kube { kubeconfig: PathBuf },
}

/// The Kubernetes node name of lab node `i` (1-based).
pub fn kube_node_name(i: usize) -> String {
    format!("node-{i}")
}

/// What to build.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// Namespace name prefix, unique per cluster.
    pub prefix: String,
    /// Directory for logs, subnet files and the network config.
    pub dir: PathBuf,
    /// The `weft` binary agents run.
    pub weft_bin: PathBuf,
    /// Lease store.
    pub store: LabStore,
    /// Network config JSON.
    pub net_config: String,
    /// Extra arguments for every agent.
    pub agent_args: Vec<String>,
}

/// A running agent process.
#[derive(Debug)]
pub struct AgentProc {
    child: Child,
}

impl AgentProc {
    /// The agent's process id (`ip netns exec` replaces itself with the agent).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the agent exited, and how.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub fn stop(mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let until = Instant::now() + grace;
        while Instant::now() < until {
            if let Some(s) = self.exited() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        self.child.wait().ok()
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A pod: a namespace with one address in its node's subnet.
#[derive(Debug)]
pub struct Pod {
    /// The pod's namespace.
    pub ns: Netns,
    /// The pod's address.
    pub ip: Ipv4Addr,
}

/// A node: a namespace on the underlay, its agent and its pods.
#[derive(Debug)]
pub struct Node {
    /// 1-based index.
    pub index: usize,
    /// The node's namespace.
    pub ns: Netns,
    /// The node's underlay address (its PublicIP).
    pub underlay_ip: Ipv4Addr,
    /// The running agent, if any.
    pub agent: Option<AgentProc>,
    /// The node's leased subnet, once known.
    pub subnet: Option<Ipv4Net>,
    /// Pods attached so far.
    pub pods: Vec<Pod>,
    /// Directory of this node's files.
    pub dir: PathBuf,
}

impl Node {
    /// The node's subnet file.
    pub fn subnet_file(&self) -> PathBuf {
        self.dir.join("subnet.env")
    }

    /// The node's agent log.
    pub fn log_file(&self) -> PathBuf {
        self.dir.join("agent.log")
    }

    /// The last `lines` lines of the agent log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_file()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// The whole lab. Dropping it stops every agent and removes every namespace it made.
#[derive(Debug)]
pub struct Cluster {
    /// What was built.
    pub spec: ClusterSpec,
    /// The underlay switch.
    pub switch: Netns,
    /// The nodes.
    pub nodes: Vec<Node>,
    /// Extra hosts on the underlay (etcd, an intruder...).
    pub hosts: Vec<(Netns, Ipv4Addr)>,
}

impl Cluster {
    /// Builds the switch and `nodes` node namespaces; starts nothing.
    pub fn build(spec: ClusterSpec, nodes: usize) -> Result<Cluster, LabError> {
        std::fs::create_dir_all(&spec.dir)?;
        std::fs::write(spec.dir.join("net-conf.json"), &spec.net_config)?;
        let switch = Netns::create(&format!("{}-sw", spec.prefix))?;
        switch.ip(&["link", "add", "br0", "type", "bridge"])?;
        switch.ip(&["link", "set", "br0", "up"])?;
        let mut c = Cluster {
            spec,
            switch,
            nodes: Vec::new(),
            hosts: Vec::new(),
        };
        for _ in 0..nodes {
            c.add_node()?;
        }
        Ok(c)
    }

    /// Plugs a namespace into the switch with `addr`/24 on its `eth0`.
    fn plug(&self, ns: &Netns, port: &str, addr: Ipv4Addr) -> Result<(), LabError> {
        super::netns::ip(&[
            "link",
            "add",
            "eth0",
            "netns",
            ns.name(),
            "type",
            "veth",
            "peer",
            "name",
            port,
            "netns",
            self.switch.name(),
        ])?;
        self.switch.ip(&["link", "set", port, "master", "br0", "up"])?;
        ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        Ok(())
    }

    /// Adds a node namespace on the underlay; returns its index.
    pub fn add_node(&mut self) -> Result<usize, LabError> {
        let index = self.nodes.len() + 1;
        if index > 150 {
            return Err(LabError::Probe("at most 150 nodes per lab".into()));
        }
        let ns = Netns::create(&format!("{}-n{index}", self.spec.prefix))?;
        let [a, b, c] = UNDERLAY_PREFIX;
        let underlay_ip = Ipv4Addr::new(a, b, c, 10 + index as u8);
        self.plug(&ns, &format!("n{index}"), underlay_ip)?;
        let dir = self.spec.dir.join(format!("n{index}"));
        std::fs::create_dir_all(&dir)?;
        self.nodes.push(Node {
            index,
            ns,
            underlay_ip,
            agent: None,
            subnet: None,
            pods: Vec::new(),
            dir,
        });
        Ok(index)
    }

    /// Adds a plain host on the underlay (no agent); returns its namespace name and address.
    pub fn add_host(&mut self, name: &str) -> Result<(String, Ipv4Addr), LabError> {
        let k = self.hosts.len() as u8;
        let ns = Netns::create(&format!("{}-{name}", self.spec.prefix))?;
        let [a, b, c] = UNDERLAY_PREFIX;
        let addr = Ipv4Addr::new(a, b, c, 200 + k);
        self.plug(&ns, &format!("h{k}"), addr)?;
        let ns_name = ns.name().to_string();
        self.hosts.push((ns, addr));
        Ok((ns_name, addr))
    }

    fn node(&self, i: usize) -> Result<&Node, LabError> {
        self.nodes
            .get(i.wrapping_sub(1))
            .ok_or_else(|| LabError::Probe(format!("no node {i}")))
    }

    fn node_mut(&mut self, i: usize) -> Result<&mut Node, LabError> {
        self.nodes
            .get_mut(i.wrapping_sub(1))
            .ok_or_else(|| LabError::Probe(format!("no node {i}")))
    }

    /// The command line that starts node `i`'s agent (without the leading `weft`).
    pub fn agent_args(&self, i: usize) -> Result<Vec<String>, LabError> {
        let n = self.node(i)?;
        let mut args: Vec<String> = vec![
            "agent".into(),
            "--iface".into(),
            "eth0".into(),
            "--subnet-file".into(),
            n.subnet_file().display().to_string(),
            "--state-dir".into(),
            n.dir.join("state").display().to_string(),
            "--net-config".into(),
            self.spec.dir.join("net-conf.json").display().to_string(),
            "--admin-listen".into(),
            format!("127.0.0.1:{ADMIN_PORT}"),
            "--admin-token-file".into(),
            self.spec.dir.join("admin-token").display().to_string(),
        ];
        match &self.spec.store {
            LabStore::Embedded(p) => args.extend(["--store".into(), p.display().to_string()]),
            LabStore::Etcd { endpoints, prefix } => args.extend([
                "--etcd-endpoints".into(),
                endpoints.clone(),
                "--etcd-prefix".into(),
                prefix.clone(),
            ]),
            LabStore::Kube { kubeconfig } => args.extend([
                "--kube-subnet-mgr".into(),
                "--kubeconfig-file".into(),
                kubeconfig.display().to_string(),
            ]),
        }
        args.extend(self.spec.agent_args.iter().cloned());
        Ok(args)
    }

    /// The admin API token the lab's agents share (the first agent to start generates it).
    pub fn admin_token(&self) -> Option<String> {
        std::fs::read_to_string(self.spec.dir.join("admin-token"))
            .ok()
            .map(|t| t.trim().to_string())
    }

    /// Starts node `i`'s agent (logging to its log file).
    pub fn start_agent(&mut self, i: usize) -> Result<(), LabError> {
        let args = self.agent_args(i)?;
        self.start_agent_with(i, &[], &[], &args)
    }

    /// Starts node `i`'s agent with `args`, run through `wrap` (a command line that ends by
    /// executing what follows it) and with `env` added.
    pub fn start_agent_with(
        &mut self,
        i: usize,
        wrap: &[&str],
        env: &[(&str, &str)],
        args: &[String],
    ) -> Result<(), LabError> {
        let bin = self.spec.weft_bin.display().to_string();
        let n = self.node_mut(i)?;
        if let Some(a) = n.agent.take() {
            drop(a);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(n.log_file())?;
        let err = log.try_clone()?;
        let (program, rest) = match wrap.split_first() {
            Some((p, rest)) => (
                p.to_string(),
                rest.iter().map(|s| s.to_string()).chain([bin.clone()]).collect(),
            ),
            None => (bin.clone(), Vec::new()),
        };
        let child =
            n.ns.command(&program)
                .args(&rest)
                .args(args)
                .envs(env.iter().copied())
                .env("WEFT_LOG", std::env::var("WEFT_LOG").unwrap_or_else(|_| "info".into()))
                .env("NODE_NAME", kube_node_name(i))
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(err)
                .spawn()
                .map_err(|source| LabError::Spawn {
                    cmd: bin.clone(),
                    source,
                })?;
        n.agent = Some(AgentProc { child });
        Ok(())
    }

    /// Sends `signal` to node `i`'s agent: SIGSTOP and SIGCONT freeze and wake it, as a node
    /// that hangs (its lease, report and kernel state stay as they were).
    pub fn signal_agent(&self, i: usize, signal: nix::sys::signal::Signal) -> Result<(), LabError> {
        let n = self.node(i)?;
        let a = n
            .agent
            .as_ref()
            .ok_or_else(|| LabError::Probe(format!("node {i} runs no agent")))?;
        let pid = nix::unistd::Pid::from_raw(a.pid() as i32);
        nix::sys::signal::kill(pid, signal)
            .map_err(|e| LabError::Probe(format!("signal {signal} to node {i}'s agent: {e}")))
    }

    /// Stops node `i`'s agent: gracefully (SIGTERM) or by SIGKILL.
    pub fn stop_agent(&mut self, i: usize, graceful: bool) -> Result<Option<std::process::ExitStatus>, LabError> {
        let n = self.node_mut(i)?;
        Ok(match n.agent.take() {
            Some(a) if graceful => a.stop(Duration::from_secs(10)),
            Some(a) => a.stop(Duration::ZERO),
            None => None,
        })
    }

    /// Waits until node `i`'s agent is ready: its admin endpoint says so (which happens right
    /// after it writes the subnet file). Returns the leased subnet.
    pub fn wait_ready(&mut self, i: usize, timeout: Duration) -> Result<Ipv4Net, LabError> {
        let until = Instant::now() + timeout;
        loop {
            let ready = self
                .http_get(i, "/readyz")
                .map(|(code, _)| code == 200)
                .unwrap_or(false);
            let n = self.node_mut(i)?;
            if ready {
                if let Some(env) = SubnetEnv::read(&n.subnet_file()) {
                    n.subnet = Some(env.subnet);
                    return Ok(env.subnet);
                }
            }
            if let Some(a) = n.agent.as_mut() {
                if let Some(status) = a.exited() {
                    return Err(LabError::Probe(format!(
                        "agent on node {i} exited ({status}):\n{}",
                        n.log_tail(20)
                    )));
                }
            }
            if Instant::now() > until {
                return Err(LabError::Timeout(format!(
                    "agent on node {i} not ready after {timeout:?}:\n{}",
                    n.log_tail(20)
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Gives node `i` a `cni0` bridge on its subnet and `count` pods, as the flannel CNI
    /// plugin (bridge + host-local) would: pod `k` gets the subnet's address `k+2`.
    pub fn attach_pods(&mut self, i: usize, count: usize) -> Result<(), LabError> {
        if count == 0 {
            // No bridge either: a CNI plugin under test makes its own.
            return Ok(());
        }
        let prefix = self.spec.prefix.clone();
        let n = self.node_mut(i)?;
        let env = SubnetEnv::read(&n.subnet_file())
            .ok_or_else(|| LabError::Probe(format!("node {i} has no subnet file yet")))?;
        let gw = crate::subnet::first_host(&env.subnet);
        let len = env.subnet.prefix_len();
        let mtu = env.mtu.to_string();
        if n.pods.is_empty() {
            n.ns.ip(&["link", "add", "cni0", "type", "bridge"])?;
            n.ns.ip(&["addr", "add", &format!("{gw}/{len}"), "dev", "cni0"])?;
            n.ns.ip(&["link", "set", "cni0", "mtu", &mtu, "up"])?;
        }
        for _ in 0..count {
            let k = n.pods.len() + 1;
            let ip = Ipv4Addr::from(u32::from(env.subnet.network()) + 1 + k as u32);
            let pod = Netns::create(&format!("{prefix}-n{i}-p{k}"))?;
            let port = format!("vp{k}");
            super::netns::ip(&[
                "link",
                "add",
                "eth0",
                "netns",
                pod.name(),
                "type",
                "veth",
                "peer",
                "name",
                &port,
                "netns",
                n.ns.name(),
            ])?;
            n.ns.ip(&["link", "set", &port, "master", "cni0", "mtu", &mtu, "up"])?;
            pod.ip(&["addr", "add", &format!("{ip}/{len}"), "dev", "eth0"])?;
            pod.ip(&["link", "set", "eth0", "mtu", &mtu, "up"])?;
            pod.ip(&["route", "add", "default", "via", &gw.to_string()])?;
            n.pods.push(Pod { ns: pod, ip });
        }
        n.subnet = Some(env.subnet);
        Ok(())
    }

    /// Starts every agent not yet running, waits for all of them, then gives each node `pods` pods.
    pub fn up(&mut self, pods: usize, timeout: Duration) -> Result<(), LabError> {
        for i in 1..=self.nodes.len() {
            if self.nodes[i - 1].agent.is_none() {
                self.start_agent(i)?;
            }
        }
        for i in 1..=self.nodes.len() {
            self.wait_ready(i, timeout)?;
        }
        for i in 1..=self.nodes.len() {
            let missing = pods.saturating_sub(self.nodes[i - 1].pods.len());
            self.attach_pods(i, missing)?;
        }
        Ok(())
    }

    /// A GET on node `i`'s admin endpoint: (status code, body).
    pub fn http_get(&self, i: usize, path: &str) -> Result<(u16, String), LabError> {
        self.http(i, "GET", path, &[], b"").map(|r| (r.status, r.body))
    }

    /// Any request on node `i`'s admin endpoint, with extra `headers` and a `body`.
    pub fn http(
        &self,
        i: usize,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<HttpResponse, LabError> {
        let ns = self.node(i)?.ns.name().to_string();
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        let mut req = head.into_bytes();
        req.extend_from_slice(body);
        enter_and_run(&ns, move || http_here(&req))?
    }

    /// One numeric sample from node `i`'s `/metrics` (`series` includes any labels).
    pub fn metric(&self, i: usize, series: &str) -> Result<f64, LabError> {
        let (_, body) = self.http_get(i, "/metrics")?;
        metric_value(&body, series).ok_or_else(|| LabError::Probe(format!("node {i} has no metric {series}")))
    }
}

/// Reads one sample from Prometheus text.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let (name, v) = l.rsplit_once(' ')?;
        (name == series).then(|| v.parse().ok()).flatten()
    })
}

/// An HTTP response as the lab reads it.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Header lines, lowercased names.
    pub headers: Vec<(String, String)>,
    /// The body (chunked encoding undone).
    pub body: String,
}

impl HttpResponse {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

fn http_here(req: &[u8]) -> Result<HttpResponse, LabError> {
    let mut s = TcpStream::connect_timeout(&([127, 0, 0, 1], ADMIN_PORT).into(), Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(req)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let r = super::http::parse_response(&raw)
        .ok_or_else(|| LabError::Probe(format!("bad HTTP response: {:.80}", String::from_utf8_lossy(&raw))))?;
    Ok(HttpResponse {
        status: r.status,
        headers: r.headers,
        body: String::from_utf8_lossy(&r.body).into_owned(),
    })
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Agents first, so none sees its namespace vanish under it; pods before their nodes.
        for n in &mut self.nodes {
            if let Some(a) = n.agent.take() {
                a.stop(Duration::from_secs(2));
            }
        }
        for n in &mut self.nodes {
            n.pods.clear();
        }
        self.nodes.clear();
        self.hosts.clear();
    }
}

/// Runs a command to completion, for lab helpers that shell out.
pub fn run_checked(cmd: &mut Command) -> Result<String, LabError> {
    let desc = format!("{cmd:?}");
    let out = cmd.output().map_err(|source| LabError::Spawn {
        cmd: desc.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(LabError::Command {
            cmd: desc,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}
