//! `weft module test`: replays flows through a module offline with the agent's own host code
//! ([`weft::wasm::replay`]) and prints each verdict, what the module logged while deciding it,
//! and how long the decision took; with `--expect`, exits non-zero when a verdict differs.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use clap::Args;
use weft::wasm::replay::{self, Bench, Expected, Flow, Node};

use super::module::ConfigArg;
use super::Output;

#[derive(Args)]
pub(crate) struct TestArgs {
    /// The .wasm file.
    wasm: PathBuf,
    #[command(flatten)]
    config: ConfigArg,
    /// Flows to decide, one JSON object per line: {"protocol":"tcp","src":"10.244.1.5:40000","dst":"10.244.2.7:80"}
    /// (also "direction", "flags" for TCP, default "S", and "payload").
    #[arg(long, required_unless_present = "pcap")]
    flows: Option<PathBuf>,
    /// A packet capture (pcap or pcapng, e.g. from tcpdump): the first packet of each flow to or
    /// from --node-subnet is decided.
    #[arg(long, conflicts_with = "flows")]
    pcap: Option<PathBuf>,
    /// Expected verdicts, one per flow in order: allow, drop or via ADDR.
    #[arg(long)]
    expect: Option<PathBuf>,
    /// Leases the module sees (JSON as `weft lease ls -o json` prints), besides this node's.
    #[arg(long)]
    leases: Option<PathBuf>,
    /// This node's PublicIP.
    #[arg(long, default_value = "198.18.0.1")]
    node_ip: std::net::Ipv4Addr,
    /// This node's subnet: egress flows come from it, ingress flows go to it.
    #[arg(long, default_value = "10.244.1.0/24")]
    node_subnet: ipnet::Ipv4Net,
    /// The cluster network.
    #[arg(long, default_value = "10.244.0.0/16")]
    network: ipnet::Ipv4Net,
    /// What a failure of the module means, as in `weft module add`.
    #[arg(long, value_enum, default_value = "closed")]
    failure: super::module::Failure,
}

/// Module log lines while a capture is armed.
static ARMED: AtomicBool = AtomicBool::new(false);
static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// A tracing layer that keeps the lines modules log (target `weft::module`) while the bench
/// decides a flow, so each flow's lines are printed with it.
pub(crate) struct LogCapture;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for LogCapture {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: tracing_subscriber::layer::Context<'_, S>) {
        if !ARMED.load(Ordering::Relaxed) || event.metadata().target() != "weft::module" {
            return;
        }
        let mut v = Fields::default();
        event.record(&mut v);
        let line = format!(
            "{} {}: {}",
            event.metadata().level().as_str().to_lowercase(),
            v.module,
            v.message
        );
        if let Ok(mut l) = LINES.lock() {
            l.push(line);
        }
    }
}

#[derive(Default)]
struct Fields {
    module: String,
    message: String,
}

impl tracing::field::Visit for Fields {
    fn record_str(&mut self, f: &tracing::field::Field, v: &str) {
        if f.name() == "module" {
            self.module = v.to_string();
        }
    }

    fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
        match f.name() {
            "message" => self.message = format!("{v:?}"),
            "module" => self.module = format!("{v:?}").trim_matches('"').to_string(),
            _ => {}
        }
    }
}

fn captured() -> Vec<String> {
    LINES.lock().map(|mut l| std::mem::take(&mut *l)).unwrap_or_default()
}

fn read(p: &PathBuf, what: &str) -> Result<Vec<u8>> {
    std::fs::read(p).with_context(|| format!("reading {what} {}", p.display()))
}

fn flows(a: &TestArgs) -> Result<Vec<Flow>> {
    if let Some(p) = &a.pcap {
        let c = replay::flows_from_capture(&read(p, "--pcap")?, a.node_subnet)
            .with_context(|| format!("--pcap {}", p.display()))?;
        eprintln!(
            "{}: {} frames, {} flows to or from {}, {} frames skipped (not IPv4 to or from that subnet)",
            p.display(),
            c.frames,
            c.flows.len(),
            a.node_subnet,
            c.skipped
        );
        return Ok(c.flows);
    }
    let Some(p) = &a.flows else {
        bail!("give --flows or --pcap")
    };
    let text =
        String::from_utf8(read(p, "--flows")?).with_context(|| format!("--flows {} is not UTF-8", p.display()))?;
    replay::flows_from_json_lines(&text, a.node_subnet).with_context(|| format!("--flows {}", p.display()))
}

fn bench(a: &TestArgs, limits: weft::wasm::Limits) -> Result<Bench> {
    let code = std::fs::read(&a.wasm).with_context(|| format!("reading {}", a.wasm.display()))?;
    let name = a
        .wasm
        .file_stem()
        .and_then(|s| s.to_str())
        .map(|s| {
            s.to_ascii_lowercase()
                .replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_")
        })
        .unwrap_or_else(|| "module".into());
    let mut spec = weft::wasm::ModuleSpec::new(&name, &code, a.config.read()?.unwrap_or_default());
    spec.failure = a.failure.into();
    let peers = match &a.leases {
        Some(p) => {
            let text = String::from_utf8(read(p, "--leases")?).with_context(|| format!("--leases {}", p.display()))?;
            replay::leases_from_json(&text).with_context(|| format!("--leases {}", p.display()))?
        }
        None => Vec::new(),
    };
    let node = Node {
        ip: a.node_ip,
        subnet: a.node_subnet.trunc(),
        network: a.network.trunc(),
    };
    // Checked as `weft module add` checks it first, so a module refused there fails here too.
    let rt = weft::wasm::Runtime::new(limits)?;
    weft::wasm::check(&rt, &code, spec.config.as_bytes()).with_context(|| format!("module {name}"))?;
    Ok(Bench::new(rt, vec![spec], node, &peers)?)
}

/// Runs the bench; the exit code says whether every expectation held.
pub(crate) async fn run(a: TestArgs, limits: weft::wasm::Limits, output: Output) -> Result<ExitCode> {
    let flows = flows(&a)?;
    let expected = match &a.expect {
        Some(p) => {
            let text = String::from_utf8(read(p, "--expect")?).with_context(|| format!("--expect {}", p.display()))?;
            Some(replay::expectations(&text).with_context(|| format!("--expect {}", p.display()))?)
        }
        None => None,
    };
    // Compiling and calling are blocking work: off the async runtime, as in the agent.
    tokio::task::spawn_blocking(move || decide_all(&a, limits, &flows, expected.as_deref(), output))
        .await
        .context("the bench stopped")?
}

fn decide_all(
    a: &TestArgs,
    limits: weft::wasm::Limits,
    flows: &[Flow],
    expected: Option<&[Expected]>,
    output: Output,
) -> Result<ExitCode> {
    let mut bench = bench(a, limits)?;
    let (mut wrong, mut broken) = (0usize, 0usize);
    ARMED.store(true, Ordering::Relaxed);
    for (i, f) in flows.iter().enumerate() {
        let o = bench.decide(f);
        let logs = captured();
        let want = expected.and_then(|e| e.get(i)).copied();
        let ok = want.is_none_or(|w| w.matches(o.verdict));
        wrong += usize::from(!ok);
        broken += usize::from(o.broken_scope.is_some());
        print_outcome(i + 1, f, &o, &logs, want, ok, output);
    }
    ARMED.store(false, Ordering::Relaxed);
    for (m, n) in bench.logs_suppressed() {
        eprintln!("{m}: {n} log lines held back by the agent's rate limit (10 a second)");
    }
    if broken > 0 {
        // Agents would answer the other flows of those services from the first verdict.
        eprintln!("weft: error: {broken} verdicts were given for more flows than the modules answer alike");
        return Ok(ExitCode::FAILURE);
    }
    let Some(e) = expected else {
        return Ok(ExitCode::SUCCESS);
    };
    if e.len() != flows.len() {
        eprintln!("weft: error: {} flows but {} expectations", flows.len(), e.len());
        return Ok(ExitCode::FAILURE);
    }
    if wrong > 0 {
        eprintln!(
            "weft: error: {wrong} of {} flows got another verdict than expected",
            flows.len()
        );
        return Ok(ExitCode::FAILURE);
    }
    eprintln!("all {} flows got the expected verdict", flows.len());
    Ok(ExitCode::SUCCESS)
}

fn print_outcome(
    n: usize,
    f: &Flow,
    o: &replay::Outcome,
    logs: &[String],
    want: Option<Expected>,
    ok: bool,
    output: Output,
) {
    let verdict = replay::verdict_name(o.verdict);
    let micros = o.took.as_secs_f64() * 1e6;
    if let Output::Json = output {
        let modules: Vec<serde_json::Value> = o
            .modules
            .iter()
            .map(|s| serde_json::json!({"module": s.module, "verdict": s.kind.label(), "reason": s.reason}))
            .collect();
        let line = serde_json::json!({
            "flow": n, "packet": f.describe(), "verdict": verdict, "micros": (micros * 10.0).round() / 10.0,
            "cpu_micros": (o.cpu.as_secs_f64() * 1e7).round() / 10.0,
            "modules": modules, "logs": logs, "expected": want.map(|w| w.to_string()), "ok": ok,
            "scope": replay::scope_name(o.scope), "broken_scope": o.broken_scope,
        });
        println!("{line}");
        return;
    }
    let said: Vec<String> = o
        .modules
        .iter()
        .map(|s| format!("{}: {} ({})", s.module, s.kind.label(), s.reason))
        .collect();
    let mut mismatch = match want {
        Some(w) if !ok => format!("  MISMATCH, expected {w}"),
        _ => String::new(),
    };
    if o.scope != weft::wasm::flow::Scope::Flow {
        mismatch += &format!("  [{}]", replay::scope_name(o.scope));
    }
    if let Some(b) = &o.broken_scope {
        mismatch += &format!("  BROKEN SCOPE: {b}");
    }
    println!(
        "{n:>4}  {:<52} {:<16} {:>8.1} µs  {}{mismatch}",
        f.describe(),
        verdict,
        micros,
        said.join("; ")
    );
    for l in logs {
        println!("      log {l}");
    }
}
