//! The admin API and dashboard with 5,000 leases in the store, each node with a report of the
//! modules it runs: p50/p99 latency and requests/s of the lease list, one lease lookup and the
//! node list (leases joined with reports) under `wrk` (Debian's), and the dashboard's time to
//! first render of the map (a /8 split into /24s: 65,536 slots) in headless Chromium.
//!
//! As root: `cargo bench -p weft-tests --bench api` (`-- --quick` for a short smoke run).
//! `WEFT_BEFORE=<an older weft>` adds rounds in which the agent runs that binary on the same
//! store, taking turns with this build, and prints its node list beside this one's.

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use weft::lease::embedded::EmbeddedStore;
use weft::lease::{DocKind, LeaseAttrs, LeaseStore};
use weft_tests::webdriver::Browser;
use weft_tests::{StoreKind, TestCluster};

const LEASES: u32 = 5000;
const NET: &str = r#"{"Network":"10.0.0.0/8","SubnetLen":24,"Backend":{"Type":"udp"}}"#;

fn fill(path: &std::path::Path) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let store = EmbeddedStore::open(path).expect("store");
        store.init_network_config(NET).await.expect("config");
        for i in 1..=LEASES {
            let subnet = format!("10.{}.{}.0/24", i / 256, i % 256).parse().expect("subnet");
            let ip = Ipv4Addr::new(198, 19, (i / 256) as u8, (i % 256) as u8);
            let attrs = LeaseAttrs::new(ip, "udp", serde_json::Value::Null);
            let ttl = Duration::from_secs(3600 + u64::from(i) * 7);
            store
                .create_lease(subnet, &attrs, ttl)
                .await
                .expect("lease")
                .expect("free");
            // Every node reports the chain it runs, as agents do (the module itself need not
            // exist: /nodes shows reports as they are).
            let report = json!({"node": ip.to_string(), "updated": 1_700_000_000u64 + u64::from(i), "modules": [
                {"name": "fw", "sha256": format!("{i:064x}"), "state": "loaded"}]});
            let name = ip.to_string();
            store
                .put_doc(DocKind::ModuleStatus, &name, report.to_string().as_bytes())
                .await
                .expect("report");
        }
    });
}

/// (requests/s, p50 ms, p99 ms) from wrk's `--latency` report, with `conns` connections
/// (one client at a time with 1).
fn wrk(ns: &str, url: &str, secs: u32, conns: u32) -> (f64, f64, f64) {
    let threads = conns.min(2);
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "wrk",
            &format!("-t{threads}"),
            &format!("-c{conns}"),
            &format!("-d{secs}s"),
            "--latency",
            url,
        ])
        .output()
        .expect("wrk (apt-get install wrk)");
    let text = String::from_utf8_lossy(&out.stdout);
    let ms = |label: &str| -> f64 {
        let v = text
            .lines()
            .find_map(|l| l.trim().strip_prefix(label))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {label} in wrk output:\n{text}"));
        let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
        let n: f64 = num.parse().unwrap_or(f64::NAN);
        match unit {
            "us" => n / 1000.0,
            "ms" => n,
            "s" => n * 1000.0,
            _ => f64::NAN,
        }
    };
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Requests/sec in wrk output:\n{text}"));
    assert!(!text.contains("Non-2xx"), "wrk saw errors:\n{text}");
    (rps, ms("50%"), ms("99%"))
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let secs = if quick { 2 } else { 10 };
    let mut c = TestCluster::with_config("bapi", StoreKind::Embedded, 1, NET, &[]);
    let t = Instant::now();
    fill(&c.tmp.path().join("store.db"));
    println!("filled {LEASES} leases in {:.1} s", t.elapsed().as_secs_f64());
    c.lab.up(0, Duration::from_secs(60)).expect("agent up");
    let ns = c.lab.nodes[0].ns.name().to_string();
    let list = json!(c.lab.http_get(1, "/api/v1/leases").expect("list").1.len());
    println!("lease list: {list} bytes of JSON");

    // `/healthz` (a constant answer from the same server) is the reference: what the HTTP
    // stack itself costs on this machine in this run.
    for conns in [1, 16] {
        println!(
            "\n{:<42} {:>10} {:>9} {:>9} {:>10}",
            format!("wrk -t{} -c{conns} -d{secs}s", conns.min(2)),
            "req/s",
            "p50 ms",
            "p99 ms",
            "/healthz"
        );
        let (ref_rps, _, _) = wrk(&ns, "http://127.0.0.1:8286/healthz", secs, conns);
        for (label, path) in [
            ("GET /healthz (reference)", "/healthz"),
            ("GET /api/v1/leases (5,001 leases)", "/api/v1/leases"),
            ("GET /api/v1/leases?limit=500 (a page)", "/api/v1/leases?limit=500"),
            ("GET /api/v1/leases/10.0.77.0-24", "/api/v1/leases/10.0.77.0-24"),
            ("GET /api/v1/nodes (5,001 nodes, 5,000 reports)", "/api/v1/nodes"),
        ] {
            let (rps, p50, p99) = wrk(&ns, &format!("http://127.0.0.1:8286{path}"), secs, conns);
            println!("{label:<42} {rps:>10.1} {p50:>9.2} {p99:>9.2} {:>9.3}x", rps / ref_rps);
        }
    }

    let browser = Browser::start(&ns, 9517);
    if let Ok(before) = std::env::var("WEFT_BEFORE") {
        before_and_after(&mut c, &ns, &browser, std::path::PathBuf::from(before), secs);
    }

    let mut renders = Vec::new();
    for _ in 0..if quick { 1 } else { 5 } {
        browser.goto("http://127.0.0.1:8286/");
        assert!(browser.wait_for("return document.body.dataset.rendered === '1'", Duration::from_secs(60)));
        let ms = browser.eval("return window.weftFirstRenderMs", json!([]));
        renders.push(ms.as_f64().expect("render time"));
    }
    let slots = browser.eval("return document.querySelector('#map-summary').textContent", json!([]));
    let (bytes, peers, ms) = stats_tick(&browser);
    println!("each stats event (every second, after the stream's first): {bytes} bytes of JSON ({peers} peers); shown in {ms:.2} ms (median of 21)");
    renders.sort_by(f64::total_cmp);
    println!(
        "\ndashboard first render of the map (navigation start to map drawn), median of {}: {:.0} ms ({renders:?}); {}",
        renders.len(),
        renders[renders.len() / 2],
        slots.as_str().unwrap_or("")
    );
}

/// One binary's measurements over the rounds of [`before_and_after`].
#[derive(Default)]
struct Runs {
    /// `/nodes` p50, ms.
    p50: Vec<f64>,
    /// `/nodes` requests/s over `/healthz`'s.
    ratio: Vec<f64>,
    /// A stats event shown, ms.
    tick: Vec<f64>,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `/api/v1/nodes` served by this build and by `before` in turns on the same store (the agent
/// restarted with each binary), one client, each against `/healthz` of the same agent; and the
/// time each one's dashboard takes to show a stats event.
fn before_and_after(c: &mut TestCluster, ns: &str, browser: &Browser, before: std::path::PathBuf, secs: u32) {
    let now = c.lab.spec.weft_bin.clone();
    let mut runs = [Runs::default(), Runs::default()];
    for round in 0..3 {
        for (k, (label, bin)) in [("this build", &now), ("before", &before)].into_iter().enumerate() {
            c.lab.stop_agent(1, true).expect("stop agent");
            c.lab.spec.weft_bin = bin.clone();
            c.lab.start_agent(1).expect("start agent");
            c.lab.wait_ready(1, Duration::from_secs(60)).expect("agent ready");
            let (ref_rps, _, _) = wrk(ns, "http://127.0.0.1:8286/healthz", secs, 1);
            let (rps, p50, _) = wrk(ns, "http://127.0.0.1:8286/api/v1/nodes", secs, 1);
            browser.goto("http://127.0.0.1:8286/");
            assert!(browser.wait_for("return document.body.dataset.rendered === '1'", Duration::from_secs(60)));
            let (_, _, tick) = stats_tick(browser);
            println!(
                "round {round}, {label}: /nodes {rps:.1} req/s, p50 {p50:.2} ms; /healthz {ref_rps:.0} req/s; stats event shown in {tick:.2} ms"
            );
            runs[k].p50.push(p50);
            runs[k].ratio.push(rps / ref_rps);
            runs[k].tick.push(tick);
        }
    }
    c.lab.stop_agent(1, true).expect("stop agent");
    c.lab.spec.weft_bin = now;
    c.lab.start_agent(1).expect("start agent");
    c.lab.wait_ready(1, Duration::from_secs(60)).expect("agent ready");
    for (label, r) in ["this build", "before"].iter().zip(&mut runs) {
        println!(
            "GET /api/v1/nodes, {label:<10} (median of 3): p50 {:.2} ms, {:.4}x the requests/s of /healthz; stats event shown in {:.2} ms",
            median(&mut r.p50),
            median(&mut r.ratio),
            median(&mut r.tick)
        );
    }
}

/// What each second's `stats` event costs the open dashboard at this size: the event's JSON (the
/// peers it carries) and the time to show it (the stats grid and the node table's traffic
/// column), median of 21: (bytes, peers, ms).
fn stats_tick(browser: &Browser) -> (u64, u64, f64) {
    // A stream's first event carries every peer; the ones after it, what each second costs.
    assert!(
        browser.wait_for(
            "return !!state.stats && state.stats.all_peers !== true",
            Duration::from_secs(30)
        ),
        "no stats event after the stream's first"
    );
    let v = browser.eval(
        "const times = []; for (let i = 0; i < 21; i++) { const t = performance.now(); \
         showStats(state.stats); times.push(performance.now() - t); } \
         times.sort((a, b) => a - b); \
         return [JSON.stringify(state.stats).length, state.stats.peers.length, times[10]];",
        json!([]),
    );
    (
        v[0].as_u64().unwrap_or(0),
        v[1].as_u64().unwrap_or(0),
        v[2].as_f64().unwrap_or(f64::NAN),
    )
}
