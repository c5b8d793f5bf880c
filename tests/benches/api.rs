//! The admin API and dashboard with 5,000 leases in the store: p50/p99 latency and requests/s
//! of the lease list and of one lease lookup under `wrk` (Debian's), and the dashboard's time to
//! first render of the map (a /8 split into /24s: 65,536 slots) in headless Chromium.
//!
//! As root: `cargo bench -p weft-tests --bench api` (`-- --quick` for a short smoke run).

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use weft::lease::embedded::EmbeddedStore;
use weft::lease::{LeaseAttrs, LeaseStore};
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
        ] {
            let (rps, p50, p99) = wrk(&ns, &format!("http://127.0.0.1:8286{path}"), secs, conns);
            println!("{label:<42} {rps:>10.1} {p50:>9.2} {p99:>9.2} {:>9.3}x", rps / ref_rps);
        }
    }

    let browser = Browser::start(&ns, 9517);
    let mut renders = Vec::new();
    for _ in 0..if quick { 1 } else { 5 } {
        browser.goto("http://127.0.0.1:8286/");
        assert!(browser.wait_for("return document.body.dataset.rendered === '1'", Duration::from_secs(60)));
        let ms = browser.eval("return window.weftFirstRenderMs", json!([]));
        renders.push(ms.as_f64().expect("render time"));
    }
    let slots = browser.eval("return document.querySelector('#map-summary').textContent", json!([]));
    renders.sort_by(f64::total_cmp);
    println!(
        "\ndashboard first render of the map (navigation start to map drawn), median of {}: {:.0} ms ({renders:?}); {}",
        renders.len(),
        renders[renders.len() / 2],
        slots.as_str().unwrap_or("")
    );
}
