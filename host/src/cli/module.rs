//! `weft module`: add, change, remove and list the Wasm modules every node runs (through the
//! store or an agent's API), make and use signing keys, and test a module offline against
//! recorded flows.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use super::rollout::{wait_for, Source, Written};
use super::{print_json, LimitArgs, Output, ServerArgs, StoreArgs};
use weft::wasm::rollout::Rollout;

#[derive(Args)]
pub(crate) struct ModuleArgs {
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(subcommand)]
    action: ModuleAction,
}

impl ModuleArgs {
    /// `weft module test`: its output is the verdicts, so the agent code it runs logs only
    /// warnings unless WEFT_LOG says otherwise.
    pub(crate) fn is_test(&self) -> bool {
        matches!(self.action, ModuleAction::Test(_))
    }
}

#[derive(Args)]
pub(crate) struct ConfigArg {
    /// The module's config, read from a file (usually JSON).
    #[arg(long, conflicts_with = "config_json")]
    config: Option<PathBuf>,
    /// The module's config, given inline.
    #[arg(long)]
    config_json: Option<String>,
}

impl ConfigArg {
    pub(crate) fn read(&self) -> Result<Option<String>> {
        match (&self.config, &self.config_json) {
            (Some(p), _) => Ok(Some(
                std::fs::read_to_string(p).with_context(|| format!("reading --config {}", p.display()))?,
            )),
            (None, Some(s)) => Ok(Some(s.clone())),
            (None, None) => Ok(None),
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum Failure {
    /// Drop flows the module cannot decide.
    Closed,
    /// Skip the module when it fails.
    Open,
}

impl From<Failure> for weft::wasm::FailurePolicy {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Closed => weft::wasm::FailurePolicy::Closed,
            Failure::Open => weft::wasm::FailurePolicy::Open,
        }
    }
}

#[derive(Subcommand)]
enum ModuleAction {
    #[command(flatten)]
    Stored(StoredAction),
    /// Make an Ed25519 key pair for signing modules: the secret key (mode 0600) and FILE.pub.
    Keygen {
        /// Where to write the secret key (never overwritten).
        #[arg(long, default_value = "weft-module.key")]
        out: PathBuf,
    },
    /// Sign a module's code and config with a secret key, for nodes started with --module-trusted-keys.
    Sign {
        /// The .wasm file.
        wasm: PathBuf,
        #[command(flatten)]
        config: ConfigArg,
        /// The secret key (`weft module keygen`, or an Ed25519 PKCS#8 PEM from openssl).
        #[arg(long)]
        key: PathBuf,
        /// Where to write the signature (default: the .wasm file's path with .sig added).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Replay flows through a module offline, with the agent's own host code, and print each verdict.
    Test(super::replay::TestArgs),
}

/// The actions on the modules stored for the cluster.
#[derive(Subcommand)]
enum StoredAction {
    /// Check a module here (ABI, config, a probe decision) and store it for every node.
    Add {
        /// Module name.
        name: String,
        /// The .wasm file (compiled on each node; precompiled artifacts are never accepted).
        wasm: PathBuf,
        #[command(flatten)]
        config: ConfigArg,
        /// Place in the chain: lower runs first.
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        order: i32,
        /// What a failure of the module means.
        #[arg(long, value_enum, default_value = "closed")]
        failure: Failure,
        /// Decide and count, enforce nothing.
        #[arg(long)]
        dry_run: bool,
        /// The module's signature (`weft module sign`), for nodes that only run signed modules.
        #[arg(long)]
        signature: Option<PathBuf>,
        /// Wait until every node holding a lease runs this in force, up to SECS (60 when given
        /// bare); fail with the nodes' reasons if one cannot load it or time runs out.
        #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "60")]
        wait: Option<u64>,
    },
    /// Change a stored module: its code, config or settings.
    Set {
        /// Module name.
        name: String,
        /// New .wasm file.
        #[arg(long)]
        wasm: Option<PathBuf>,
        #[command(flatten)]
        config: ConfigArg,
        /// New place in the chain.
        #[arg(long, allow_negative_numbers = true)]
        order: Option<i32>,
        /// New failure policy.
        #[arg(long, value_enum)]
        failure: Option<Failure>,
        /// Turn dry-run on or off.
        #[arg(long)]
        dry_run: Option<bool>,
        /// A signature of the code and config after the change; changing either without one
        /// leaves the module unsigned.
        #[arg(long)]
        signature: Option<PathBuf>,
        /// Wait until every node holding a lease runs this in force, up to SECS (60 when given
        /// bare); fail with the nodes' reasons if one cannot load it or time runs out.
        #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "60")]
        wait: Option<u64>,
    },
    /// Remove a module from every node.
    Rm {
        /// Module name.
        name: String,
        /// Wait until no node holding a lease runs it any more, up to SECS (60 when given
        /// bare); fail naming the nodes that still do when time runs out.
        #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "60")]
        wait: Option<u64>,
    },
    /// List modules and which code each node has loaded.
    Ls,
}

fn read_wasm(p: &PathBuf) -> Result<Vec<u8>> {
    std::fs::read(p).with_context(|| format!("reading {}", p.display()))
}

/// The module table: each module's settings and its rollout, on how many of the nodes holding
/// a lease its current revision is in force and, until it is everywhere, what holds it up (as
/// `--wait` words it). `rollouts` are the modules' in the same order (none: not readable).
pub(crate) fn print_modules(views: &[serde_json::Value], rollouts: &[Option<Rollout>]) {
    println!(
        "{:<16} {:>6} {:<8} {:<7} {:<14} {:<16} IN FORCE (nodes)",
        "NAME", "ORDER", "MODE", "FAILURE", "SHA256", "SIGNED BY"
    );
    for (k, m) in views.iter().enumerate() {
        let sha = m["sha256"].as_str().unwrap_or("");
        let in_force = rollouts.get(k).and_then(Option::as_ref).map_or("?".to_string(), |r| {
            let count = format!("{}/{}", r.loaded, r.nodes);
            match r.holdups() {
                h if h.is_empty() => count,
                h => format!("{count} ({})", h.join("; ")),
            }
        });
        println!(
            "{:<16} {:>6} {:<8} {:<7} {:<14} {:<16} {in_force}",
            m["name"].as_str().unwrap_or(""),
            m["order"],
            m["mode"].as_str().unwrap_or(""),
            m["failure"].as_str().unwrap_or(""),
            &sha[..sha.len().min(12)],
            m["signed_by"].as_str().unwrap_or("-"),
        );
    }
}

/// Each listed module's rollout as an agent's API answers it, in the order of `views`.
pub(crate) async fn api_rollouts(c: &weft::client::Client, views: &[serde_json::Value]) -> Vec<Option<Rollout>> {
    let mut out = Vec::with_capacity(views.len());
    for v in views {
        let name = v["name"].as_str().unwrap_or("");
        out.push(super::rollout::from_api(c, name).await.ok().flatten());
    }
    out
}

impl StoredAction {
    /// How long to wait for the change to be in force (`--wait`), if at all.
    fn wait(&self) -> Option<u64> {
        match self {
            StoredAction::Add { wait, .. } | StoredAction::Set { wait, .. } | StoredAction::Rm { wait, .. } => *wait,
            StoredAction::Ls => None,
        }
    }
}

/// A module command with its files read: what both the store path and the API path carry out.
enum ModuleOp {
    Add(weft::wasm::ModuleSpec),
    Set(String, weft::wasm::registry::Changes),
    Rm(String),
    Ls,
}

fn read_signature(p: &Option<PathBuf>) -> Result<Option<weft::wasm::signature::Signature>> {
    let Some(p) = p else { return Ok(None) };
    let text = std::fs::read(p).with_context(|| format!("reading --signature {}", p.display()))?;
    let sig = serde_json::from_slice(&text).with_context(|| {
        format!(
            "--signature {} is not a signature `weft module sign` wrote",
            p.display()
        )
    })?;
    Ok(Some(sig))
}

impl ModuleOp {
    fn read(action: StoredAction) -> Result<ModuleOp> {
        Ok(match action {
            StoredAction::Add {
                name,
                wasm,
                config,
                order,
                failure,
                dry_run,
                signature,
                ..
            } => {
                let mut spec =
                    weft::wasm::ModuleSpec::new(&name, &read_wasm(&wasm)?, config.read()?.unwrap_or_default());
                spec.order = order;
                spec.failure = failure.into();
                spec.dry_run = dry_run;
                spec.signature = read_signature(&signature)?;
                ModuleOp::Add(spec)
            }
            StoredAction::Set {
                name,
                wasm,
                config,
                order,
                failure,
                dry_run,
                signature,
                ..
            } => ModuleOp::Set(
                name,
                weft::wasm::registry::Changes {
                    wasm: wasm.as_ref().map(read_wasm).transpose()?,
                    config: config.read()?,
                    order,
                    failure: failure.map(Into::into),
                    dry_run,
                    signature: read_signature(&signature)?,
                },
            ),
            StoredAction::Rm { name, .. } => ModuleOp::Rm(name),
            StoredAction::Ls => ModuleOp::Ls,
        })
    }
}

pub(crate) async fn module_command(m: ModuleArgs) -> Result<std::process::ExitCode> {
    let action = match m.action {
        ModuleAction::Stored(a) => a,
        ModuleAction::Keygen { out } => return keygen(&out),
        ModuleAction::Sign { wasm, config, key, out } => return sign(&wasm, &config, &key, out),
        ModuleAction::Test(t) => return super::replay::run(t, m.limits.limits()?, m.server.output).await,
    };
    stored(m.store, m.server, m.limits, action).await?;
    Ok(std::process::ExitCode::SUCCESS)
}

fn keygen(out: &std::path::Path) -> Result<std::process::ExitCode> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let (key, secret) = weft::wasm::signature::SigningKey::generate()?;
    let public_path = PathBuf::from(format!("{}.pub", out.display()));
    // Never overwrite a key: losing one means re-signing every module.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("creating {} (an existing key is never overwritten)", out.display()))?;
    f.write_all(secret.as_bytes())
        .with_context(|| format!("writing {}", out.display()))?;
    std::fs::write(&public_path, key.public_pem()).with_context(|| format!("writing {}", public_path.display()))?;
    println!(
        "key {}: secret key in {}, public key in {} (give that to agents with --module-trusted-keys)",
        key.id(),
        out.display(),
        public_path.display()
    );
    Ok(std::process::ExitCode::SUCCESS)
}

fn sign(wasm: &PathBuf, config: &ConfigArg, key: &PathBuf, out: Option<PathBuf>) -> Result<std::process::ExitCode> {
    let code = read_wasm(wasm)?;
    let config = config.read()?.unwrap_or_default();
    let secret = std::fs::read_to_string(key).with_context(|| format!("reading --key {}", key.display()))?;
    let key =
        weft::wasm::signature::SigningKey::from_pem(&secret).with_context(|| format!("--key {}", key.display()))?;
    let sig = key.sign(&code, config.as_bytes());
    let out = out.unwrap_or_else(|| PathBuf::from(format!("{}.sig", wasm.display())));
    std::fs::write(&out, serde_json::to_vec_pretty(&sig)?).with_context(|| format!("writing {}", out.display()))?;
    println!(
        "signed {} and its config with key {} into {}",
        wasm.display(),
        sig.key_id,
        out.display()
    );
    Ok(std::process::ExitCode::SUCCESS)
}

/// Why `rm --wait` is refused, before anything is removed, where reports do not outlive it.
const REMOVAL_UNSEEN: &str = "rm --wait cannot follow a removal on the Kubernetes store: a node's report of a \
     module lives in its WasmModule's status, which removing the module deletes; nothing was removed \
     (remove it without --wait)";

async fn stored(store: StoreArgs, server: ServerArgs, limits: LimitArgs, action: StoredAction) -> Result<()> {
    let wait = action.wait();
    let op = ModuleOp::read(action)?;
    let follow_removal = matches!(op, ModuleOp::Rm(_)) && wait.is_some();
    if let Some(client) = server.client(None)? {
        if follow_removal {
            let c: serde_json::Value = client.call("GET", "/config", None, b"").await?;
            if c["removal_reported"] == false {
                bail!("{REMOVAL_UNSEEN}");
            }
        }
        let written = module_via_api(&client, op, server.output).await?;
        if let (Some(secs), Some(w)) = (wait, written) {
            wait_for(&w, secs, Source::Api(&client)).await?;
        }
        return Ok(());
    }
    use weft::wasm::registry;
    // Adding a module may create the embedded store (modules stored before the first agent
    // starts are loaded by it); reading or removing never does: a mistyped path is an error.
    let opts = store.options();
    let store = match &op {
        ModuleOp::Add(_) => opts.open().await,
        _ => opts.open_existing().await,
    }
    .context("opening the lease store")?;
    if follow_removal && !store.reports_outlive_modules() {
        bail!("{REMOVAL_UNSEEN}");
    }
    let rt = weft::wasm::Runtime::new(limits.limits()?)?;
    let written = match op {
        ModuleOp::Add(spec) => {
            let (name, sha, revision) = (spec.name.clone(), spec.sha256.clone(), spec.revision());
            registry::add(store.as_ref(), &rt, spec).await?;
            println!("added module {name} (sha256 {sha})");
            Written::Revision { name, revision }
        }
        ModuleOp::Set(name, changes) => {
            let spec = registry::set(store.as_ref(), &rt, &name, changes).await?;
            println!("updated module {name} (sha256 {})", spec.sha256);
            Written::Revision {
                name,
                revision: spec.revision(),
            }
        }
        ModuleOp::Rm(name) => {
            registry::remove(store.as_ref(), &name).await?;
            println!("removed module {name}");
            Written::Removed(name)
        }
        ModuleOp::Ls => {
            let (specs, reports) = registry::list(store.as_ref()).await?;
            let views: Vec<serde_json::Value> = specs
                .iter()
                .map(|s| {
                    let v = weft::api::views::ModuleView::of(s, &reports, Default::default());
                    serde_json::to_value(v).unwrap_or_default()
                })
                .collect();
            match server.output {
                Output::Json => print_json(&views)?,
                Output::Table => {
                    let nodes = super::rollout::lease_nodes(store.as_ref()).await?;
                    let rollouts: Vec<_> = specs.iter().map(|s| Some(Rollout::of(s, &nodes, &reports))).collect();
                    print_modules(&views, &rollouts)
                }
            }
            return Ok(());
        }
    };
    if let Some(secs) = wait {
        wait_for(&written, secs, Source::Store(store.as_ref())).await?;
    }
    Ok(())
}

fn failure_name(f: weft::wasm::FailurePolicy) -> &'static str {
    match f {
        weft::wasm::FailurePolicy::Closed => "closed",
        weft::wasm::FailurePolicy::Open => "open",
    }
}

fn mode_name(dry_run: bool) -> &'static str {
    if dry_run {
        "dry_run"
    } else {
        "enforce"
    }
}

/// Carries out `op` through an agent's API; what the store took, for an add or a set.
async fn module_via_api(c: &weft::client::Client, op: ModuleOp, output: Output) -> Result<Option<Written>> {
    use weft::client::{multipart, Field};
    type V = serde_json::Value;
    match op {
        ModuleOp::Add(spec) => {
            let code = spec.code()?;
            let order = spec.order.to_string();
            let signature = spec.signature.as_ref().map(serde_json::to_vec).transpose()?;
            let field = |name, value| Field {
                name,
                filename: None,
                value,
            };
            let mut fields = vec![
                field("name", spec.name.as_bytes()),
                Field {
                    name: "wasm",
                    filename: Some("module.wasm"),
                    value: &code,
                },
                field("config", spec.config.as_bytes()),
                field("order", order.as_bytes()),
                field("mode", mode_name(spec.dry_run).as_bytes()),
                field("failure", failure_name(spec.failure).as_bytes()),
            ];
            if let Some(s) = &signature {
                fields.push(field("signature", s));
            }
            let (ct, body) = multipart(&fields);
            let v: V = c.call("POST", "/modules", Some(&ct), &body).await?;
            println!(
                "added module {} (sha256 {})",
                spec.name,
                v["sha256"].as_str().unwrap_or("?")
            );
            Ok(Some(written_view(&v)))
        }
        ModuleOp::Set(name, changes) => {
            use base64::Engine as _;
            let mut patch = serde_json::Map::new();
            if let Some(w) = &changes.wasm {
                patch.insert(
                    "wasm_base64".into(),
                    base64::engine::general_purpose::STANDARD.encode(w).into(),
                );
            }
            if let Some(cfg) = changes.config {
                patch.insert("config".into(), cfg.into());
            }
            if let Some(o) = changes.order {
                patch.insert("order".into(), o.into());
            }
            if let Some(f) = changes.failure {
                patch.insert("failure".into(), failure_name(f).into());
            }
            if let Some(d) = changes.dry_run {
                patch.insert("mode".into(), mode_name(d).into());
            }
            if let Some(s) = changes.signature {
                patch.insert("signature".into(), serde_json::to_value(s)?);
            }
            let body = serde_json::to_vec(&patch)?;
            let path = format!("/modules/{name}");
            let v: V = c.call("PATCH", &path, Some("application/json"), &body).await?;
            println!("updated module {name} (sha256 {})", v["sha256"].as_str().unwrap_or("?"));
            Ok(Some(written_view(&v)))
        }
        ModuleOp::Rm(name) => {
            let _: V = c.call("DELETE", &format!("/modules/{name}"), None, b"").await?;
            println!("removed module {name}");
            Ok(Some(Written::Removed(name)))
        }
        ModuleOp::Ls => {
            let views: Vec<V> = c.call("GET", "/modules", None, b"").await?;
            match output {
                Output::Json => print_json(&views)?,
                Output::Table => print_modules(&views, &api_rollouts(c, &views).await),
            }
            Ok(None)
        }
    }
}

/// What the store took, from the module view an upload or a change answers with.
fn written_view(v: &serde_json::Value) -> Written {
    Written::Revision {
        name: v["name"].as_str().unwrap_or_default().to_string(),
        revision: v["revision"].as_str().unwrap_or_default().to_string(),
    }
}
