//! Network namespaces that remove themselves, and running code inside one.

use std::fs::File;
use std::process::Command;

use nix::sched::{setns, CloneFlags};

use super::LabError;

/// Runs `ip` with `args`, returning its stdout.
pub fn ip(args: &[&str]) -> Result<String, LabError> {
    let cmd = format!("ip {}", args.join(" "));
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| LabError::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(LabError::Command {
            cmd,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// A named network namespace, deleted (with every process still inside killed) on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace with its loopback up.
    pub fn create(name: &str) -> Result<Netns, LabError> {
        ip(&["netns", "add", name])?;
        let ns = Netns { name: name.to_string() };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <ns> args`.
    pub fn ip(&self, args: &[&str]) -> Result<String, LabError> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `f` on a fresh thread that has entered this namespace; sockets it opens live there.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, LabError> {
        enter_and_run(&self.name, f)
    }
}

/// Runs `f` on a new thread inside the named namespace.
pub fn enter_and_run<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T, LabError> {
    let path = format!("/run/netns/{ns}");
    let file = File::open(&path).map_err(|source| LabError::Netns {
        ns: ns.to_string(),
        source,
    })?;
    let name = ns.to_string();
    let handle = std::thread::spawn(move || -> Result<T, LabError> {
        setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| LabError::Netns {
            ns: name,
            source: std::io::Error::from(e),
        })?;
        Ok(f())
    });
    handle
        .join()
        .map_err(|_| LabError::Probe(format!("a thread in namespace {ns} panicked")))?
}

/// Kills every process in a namespace and deletes it; errors are ignored (best effort).
pub fn remove(name: &str) {
    if let Ok(pids) = ip(&["netns", "pids", name]) {
        for pid in pids.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
    let _ = ip(&["netns", "del", name]);
}

/// Names of existing namespaces starting with `prefix`.
pub fn list_with_prefix(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

impl Drop for Netns {
    fn drop(&mut self) {
        remove(&self.name);
    }
}
