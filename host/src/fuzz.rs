//! Property tests over everything that reads bytes or text from outside: packets from pods and
//! peers, VXLAN frames, nfnetlink_queue messages and netlink replies, lease JSON and keys in the store, the offline
//! bench's flows, expectations and captures, and random valid Wasm modules through the
//! module host. What they hold: no input panics, and what is accepted is consistent (lengths
//! within the buffer, encodings that read back as written). The budget is proptest's case count
//! (`PROPTEST_CASES`, 256 by default; CI runs the default), so the run stays bounded.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use proptest::prelude::*;

use crate::packet::{self, route::RouteTable};

fn routes() -> RouteTable {
    let net: Ipv4Net = "10.244.0.0/16".parse().expect("net");
    let own: Ipv4Net = "10.244.1.0/24".parse().expect("own");
    let mut t = RouteTable::new(net, 24, Some(own));
    t.set_local(own, Ipv4Addr::new(198, 18, 0, 1));
    t.insert("10.244.2.0/24".parse().expect("peer"), Ipv4Addr::new(198, 18, 0, 2));
    t
}

/// Packets that are mostly well formed, so the mutations below reach the deeper parsers.
fn packets() -> impl Strategy<Value = Vec<u8>> {
    let base = (
        any::<u8>(),
        0u16..2048,
        0u16..2048,
        any::<u8>(),
        proptest::collection::vec(any::<u8>(), 0..80),
    )
        .prop_map(|(kind, sport, dport, ttl, data)| {
            let (src, dst) = (Ipv4Addr::new(10, 244, 1, 5), Ipv4Addr::new(10, 244, 2, 7));
            match kind % 3 {
                0 => packet::build_tcp(src, sport, dst, dport, kind, ttl, &data),
                1 => packet::build_udp(src, sport, dst, dport, ttl, &data),
                _ => packet::build_icmp_echo(src, dst, sport, dport, ttl),
            }
        });
    (
        base,
        proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        any::<usize>(),
    )
        .prop_map(|(mut p, flips, cut)| {
            for (at, v) in flips {
                let n = p.len();
                p[at % n] = v;
            }
            p.truncate(cut % (p.len() + 1));
            p
        })
}

proptest! {
    #[test]
    fn ipv4_parsing_never_panics_and_stays_in_the_buffer(pkt in packets()) {
        if let Ok(m) = packet::parse_ipv4(&pkt) {
            prop_assert!(m.header_len >= 20 && m.header_len <= m.total_len);
            prop_assert!(m.total_len <= pkt.len());
            prop_assert!(m.payload.0 + m.payload.1 <= m.total_len);
        }
    }

    #[test]
    fn random_bytes_never_panic_the_packet_core(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = packet::parse_ipv4(&bytes);
        let _ = packet::icmp_error(&bytes, Ipv4Addr::new(198, 18, 0, 1), 3, 1);
        let mut b = bytes.clone();
        let _ = packet::decrement_ttl(&mut b);
        let mut b = bytes.clone();
        let _ = packet::complete_partial_checksum(&mut b);
    }

    #[test]
    fn forwarding_decisions_never_panic(pkt in packets(), relay in any::<bool>()) {
        let t = routes();
        let mut out = pkt.clone();
        if let packet::forward::Outbound::Send { len, .. } = packet::forward::outbound(&t, &mut out) {
            prop_assert!(len <= pkt.len());
        }
        let mut inb = pkt.clone();
        if let packet::forward::Inbound::Deliver { len } = packet::forward::inbound(&t, Ipv4Addr::new(198, 18, 0, 2), &mut inb, relay) {
            prop_assert!(len <= pkt.len());
        }
    }

    #[test]
    fn icmp_errors_quote_within_limits(pkt in packets()) {
        if let Some(e) = packet::icmp_error(&pkt, Ipv4Addr::new(198, 18, 0, 1), 11, 0) {
            let m = packet::parse_ipv4(&e);
            prop_assert!(m.is_ok(), "an ICMP error we build must parse: {:?}", m);
            prop_assert!(e.len() <= 576);
        }
    }

    #[test]
    fn vxlan_frames_open_only_when_they_are_ours(
        vni in 0u32..(1 << 24),
        flips in proptest::collection::vec((0usize..22, any::<u8>()), 0..3),
        cut in 0usize..60,
        inner in packets(),
    ) {
        use crate::backend::vxlan::wire;
        let own = crate::packet::mac::Mac([2, 0, 0, 0, 0, 1]);
        let mut frame = wire::header(vni, own, crate::packet::mac::Mac([2, 0, 0, 0, 0, 2])).to_vec();
        frame.extend_from_slice(&inner);
        prop_assert!(wire::open(&frame, vni, own).is_ok());
        for (at, v) in flips {
            frame[at] = v;
        }
        frame.truncate(frame.len().saturating_sub(cut).max(frame.len().min(cut)));
        if wire::open(&frame, vni, own).is_ok() {
            prop_assert!(frame.len() >= wire::HEADER_LEN);
            prop_assert_eq!(u32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]) >> 8, vni);
        }
        let _ = wire::super_frame(&frame, 1400, vni, own, 1450);
    }

    #[test]
    fn nfqueue_messages_never_panic_the_parser(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = crate::nfq::msg::parse(&bytes);
    }

    #[test]
    fn nfqueue_verdicts_read_back(queue in any::<u16>(), id in any::<u32>(), verdict in 0u32..5, mark in proptest::option::of(any::<u32>())) {
        let mut msg = Vec::new();
        crate::nfq::msg::verdict(&mut msg, queue, id, verdict, mark);
        crate::nfq::msg::verdict_batch(&mut msg, queue, id, verdict, mark);
        prop_assert!(crate::nfq::msg::parse(&msg).is_ok());
    }

    /// Whatever the bursts, gaps and lost reads, the kernel (modelled: a verdict answers its
    /// packet, a batch every waiting packet up to its id) ends with each packet answered as
    /// decided, and a packet whose message was lost answered by nothing.
    #[test]
    fn planned_verdicts_answer_each_packet_as_decided(
        bursts in proptest::collection::vec((proptest::collection::vec(any::<bool>(), 0..8), any::<bool>(), 0u8..8), 1..20)
    ) {
        use std::collections::BTreeMap;
        let mut planner = crate::nfq::verdicts::Planner::bound(3, 0x10_0000);
        let (mut next, mut waiting, mut answered) = (1u32, BTreeMap::new(), BTreeMap::new());
        let mut unseen = Vec::new();
        for (allows, gap, lost) in bursts {
            next += u32::from(gap); // a packet the kernel never queued
            if lost == 0 {
                waiting.insert(next, ());
                unseen.push(next);
                planner.lost();
                next += 1;
            }
            let burst: Vec<_> = allows.iter().enumerate()
                .map(|(k, &allow)| crate::nfq::verdicts::Decided { id: next + k as u32, allow })
                .collect();
            next += allows.len() as u32;
            for d in &burst {
                waiting.insert(d.id, ());
            }
            let mut out = Vec::new();
            planner.plan(&burst, &mut out);
            for (kind, verdict, id, _) in crate::nfq::msg::read_verdicts(&out) {
                let hit: Vec<u32> = match kind {
                    1 => waiting.contains_key(&id).then_some(id).into_iter().collect(),
                    _ => waiting.range(..=id).map(|(w, _)| *w).collect(),
                };
                for w in hit {
                    waiting.remove(&w);
                    answered.insert(w, verdict == crate::nfq::msg::NF_REPEAT);
                }
            }
            for d in &burst {
                prop_assert_eq!(answered.get(&d.id), Some(&d.allow), "packet {}", d.id);
            }
            for u in &unseen {
                prop_assert!(!answered.contains_key(u), "packet {} answered unseen", u);
            }
        }
    }

    #[test]
    fn netlink_replies_never_panic_the_framing(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        use crate::nfq::nl;
        if let Ok(msgs) = nl::split(&bytes) {
            for m in msgs {
                prop_assert!(m.body.len() + nl::NLMSG_HDRLEN <= bytes.len());
                let _ = nl::error(m.body);
                if let Ok(attrs) = nl::attrs(m.body) {
                    for (_, data) in attrs {
                        let _ = nl::attrs(data);
                    }
                }
            }
        }
    }

    #[test]
    fn set_element_batches_read_back(
        keys in proptest::collection::vec((any::<u32>(), any::<u8>(), any::<u16>(), any::<bool>(), 1u64..200_000), 1..40),
        seq in any::<u32>(),
    ) {
        use crate::nfq::{nft, nl};
        let keys: Vec<(Vec<u8>, bool, u64)> = keys
            .into_iter()
            .map(|(a, p, port, allow, t)| (nft::concat(&[&a.to_be_bytes(), &[p], &port.to_be_bytes()]), allow, t))
            .collect();
        let elements: Vec<nft::Element> = keys
            .iter()
            .map(|(k, allow, t)| nft::Element {
                key: k,
                action: if *allow { nft::Action::Jump("allowed") } else { nft::Action::Drop },
                timeout_ms: *t,
            })
            .collect();
        let mut b = nft::Batch::new("weft_policy", seq);
        b.add("egress", &elements);
        let (bytes, _) = b.finish();
        let msgs = nl::split(&bytes).expect("a batch splits");
        prop_assert_eq!(msgs.len(), 3);
        let top = nl::attrs(&msgs[1].body[nl::NFGEN_LEN..]).expect("attributes");
        let listed = nl::attrs(top[2].1).expect("elements");
        prop_assert_eq!(listed.len(), keys.len());
        for ((_, el), (k, _, t)) in listed.iter().zip(&keys) {
            let parts = nl::attrs(el).expect("element");
            let key = nl::attrs(parts[0].1).expect("key");
            prop_assert_eq!(key[0].1, &k[..]);
            prop_assert_eq!(parts[2].1, &t.to_be_bytes()[..]);
        }
    }

    #[test]
    fn lease_json_never_panics_and_round_trips(text in "\\PC{0,120}", ip in any::<u32>(), backend in "[a-z-]{0,10}") {
        let _ = serde_json::from_str::<crate::lease::LeaseAttrs>(&text);
        let a = crate::lease::LeaseAttrs::new(Ipv4Addr::from(ip), &backend, serde_json::json!({"VNI": 1}));
        let json = serde_json::to_string(&a).expect("serialize");
        prop_assert_eq!(serde_json::from_str::<crate::lease::LeaseAttrs>(&json).ok(), Some(a));
    }

    #[test]
    fn kube_nodes_never_panic_and_published_leases_read_back(
        cidr in "\\PC{0,24}", ip in "\\PC{0,20}", data in "\\PC{0,60}", marker in "\\PC{0,6}",
        addr in any::<u32>(), net in any::<u32>(), len in 8u8..=30, backend in "[a-z-]{0,10}",
    ) {
        use crate::lease::kube::annotations::{self, Keys};
        let keys = Keys::new("flannel.alpha.coreos.com");
        // Whatever another writer left on a node is read without panicking.
        let node: k8s_openapi::api::core::v1::Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n", "resourceVersion": ip, "annotations": {
                keys.subnet_manager.clone(): marker, keys.public_ip.clone(): ip,
                keys.backend_data.clone(): data, keys.backend_type.clone(): backend,
            }},
            "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
        })).expect("a node");
        let _ = annotations::lease_of(&node, &keys);
        // What Weft publishes reads back as the same lease.
        let subnet = Ipv4Net::new(Ipv4Addr::from(net), len).expect("len").trunc();
        let attrs = crate::lease::LeaseAttrs::new(Ipv4Addr::from(addr), &backend, serde_json::json!({"VNI": 1, "x": data}));
        let patch = annotations::publish_patch(&keys, &attrs, attrs.public_ip);
        let mut node: k8s_openapi::api::core::v1::Node = serde_json::from_value(patch).expect("patch is a node");
        node.spec = Some(k8s_openapi::api::core::v1::NodeSpec { pod_cidr: Some(subnet.to_string()), ..Default::default() });
        let lease = annotations::lease_of(&node, &keys).expect("published lease reads back");
        prop_assert_eq!(lease.subnet, subnet);
        prop_assert_eq!(lease.attrs, attrs);
    }

    #[test]
    fn lease_keys_parse_back(addr in any::<u32>(), len in 0u8..=32, junk in "\\PC{0,30}") {
        let net = Ipv4Net::new(Ipv4Addr::from(addr), len).expect("len").trunc();
        prop_assert_eq!(crate::subnet::parse_subnet_key(&crate::subnet::subnet_key(&net)), Some(net));
        if let Some(n) = crate::subnet::parse_subnet_key(&junk) {
            prop_assert_eq!(n.trunc(), n);
        }
    }

    #[test]
    fn bench_inputs_never_panic(text in "\\PC{0,200}", bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        use crate::wasm::replay;
        let own: Ipv4Net = "10.244.1.0/24".parse().expect("own");
        let _ = replay::flows_from_json_lines(&text, own);
        let _ = replay::expectations(&text);
        let _ = replay::leases_from_json(&text);
        let _ = replay::flows_from_capture(&bytes, own);
        let mut pcap = vec![0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 1, 0, 0, 0];
        pcap.extend_from_slice(&bytes);
        let _ = replay::flows_from_capture(&pcap, own);
    }
}

/// The exports every generated module must have: the ABI's, so modules get past the export
/// checks into instantiation, configuration and a probe decision.
const ABI_EXPORTS: &str = r#"(module
  (memory (export "memory") 1 4)
  (func (export "weft_abi_version") (result i32) unreachable)
  (func (export "weft_alloc") (param i32) (result i32) unreachable)
  (func (export "weft_flow") (result i32) unreachable)
  (func (export "weft_configure") (param i32 i32) (result i64) unreachable)
  (func (export "weft_policy") (result i64) unreachable))"#;

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Random valid modules (wasm-smith) through what `weft module add` runs: the shape check,
    /// compilation, instantiation, configuration and a probe decision in each direction. Any
    /// answer is fine but a panic, a hang past the deadlines, or an engine failure.
    #[test]
    fn random_modules_are_checked_without_panics(seed in proptest::collection::vec(any::<u8>(), 64..4096), abi in any::<bool>()) {
        use arbitrary::{Arbitrary, Unstructured};
        let mut u = Unstructured::new(&seed);
        let Ok(mut config) = wasm_smith::Config::arbitrary(&mut u) else { return Ok(()) };
        // The proposals the host enables (runtime.rs), so generated modules are valid there.
        config.exceptions_enabled = false;
        config.gc_enabled = false;
        config.memory64_enabled = false;
        config.relaxed_simd_enabled = false;
        config.tail_call_enabled = false;
        config.threads_enabled = false;
        config.custom_page_sizes_enabled = false;
        config.wide_arithmetic_enabled = false;
        // The ABI's exports bring the one memory a module may have.
        config.max_memories = usize::from(!abi);
        config.max_tables = config.max_tables.min(4);
        config.max_imports = 0;
        config.reference_types_enabled = false;
        config.max_memory32_bytes = 1 << 20;
        config.max_funcs = config.max_funcs.min(50);
        if abi {
            config.exports = Some(wat::parse_str(ABI_EXPORTS).expect("wat"));
        }
        let Ok(module) = wasm_smith::Module::new(config, &mut u) else { return Ok(()) };
        let wasm = module.to_bytes();
        let rt = runtime();
        let started = std::time::Instant::now();
        if let Err(crate::wasm::WasmError::Engine(e)) = crate::wasm::check(rt, &wasm, b"{}") {
            prop_assert!(false, "engine failure: {e}");
        }
        // Compiling a module this small and the bounded calls take well under this; a call that
        // escaped its deadline would not.
        prop_assert!(started.elapsed() < std::time::Duration::from_secs(20));
    }
}

fn runtime() -> &'static crate::wasm::Runtime {
    static RT: std::sync::OnceLock<std::sync::Arc<crate::wasm::Runtime>> = std::sync::OnceLock::new();
    RT.get_or_init(|| crate::wasm::Runtime::new(crate::wasm::Limits::default()).expect("runtime"))
}
