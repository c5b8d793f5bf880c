//! What answering a rollout costs as the cluster grows: `Rollout::of` (behind `--wait`,
//! `GET /modules/{name}/rollout` and the dashboard's polling) and `Removal::of` (`rm --wait`),
//! at 50 nodes and at 5,000, each node with a report of three modules. The cost should grow
//! with the nodes, not with their square: the 5,000 case is read against the 50 one.
//!
//! `cargo bench -p weft-tests --bench rollout`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use weft::wasm::rollout::{Removal, Rollout};
use weft::wasm::spec::{ModuleStatus, NodeStatus, LOADED};
use weft::wasm::ModuleSpec;

/// `n` lease PublicIPs and, in another order, each node's report (the last node never reported).
fn cluster(spec: &ModuleSpec, n: u32) -> (Vec<String>, Vec<NodeStatus>) {
    let ip = |i: u32| format!("10.{}.{}.{}", i >> 16, (i >> 8) & 0xff, i & 0xff);
    let nodes: Vec<String> = (0..n).map(ip).collect();
    let runs = |name: &str| ModuleStatus {
        name: name.into(),
        sha256: spec.sha256.clone(),
        revision: Some(spec.revision()),
        state: LOADED.into(),
        error: None,
    };
    let reports = (0..n - 1)
        .rev()
        .map(|i| NodeStatus {
            node: ip(i),
            updated: 0,
            modules: vec![runs("audit"), runs(&spec.name), runs("ratelimit")],
        })
        .collect();
    (nodes, reports)
}

fn bench(c: &mut Criterion) {
    let spec = ModuleSpec::new("fw", b"code", "{}".into());
    for n in [50u32, 5_000] {
        let (nodes, reports) = cluster(&spec, n);
        c.bench_function(&format!("rollout of one module, {n} nodes"), |b| {
            b.iter(|| Rollout::of(black_box(&spec), black_box(&nodes), black_box(&reports)))
        });
        c.bench_function(&format!("removal of one module, {n} nodes"), |b| {
            b.iter(|| Removal::of(black_box("fw"), black_box(&nodes), black_box(&reports)))
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
