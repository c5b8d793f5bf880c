//! The admin REST API over real HTTP against agents in a netns cluster: every route, each error
//! status, the bearer token, the event stream and the generated OpenAPI document.

use std::time::Duration;

use weft::lab::cluster::HttpResponse;
use weft_tests::*;

fn json(r: &HttpResponse) -> serde_json::Value {
    serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", r.body))
}

/// Asserts an error response: its status and the JSON error shape.
fn assert_error(r: &HttpResponse, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}", r.body);
    let v = json(r);
    assert_eq!(v["error"]["status"], status, "{v}");
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
}

struct Api<'a> {
    c: &'a TestCluster,
    token: String,
}

impl Api<'_> {
    fn req(
        &self,
        n: usize,
        method: &str,
        path: &str,
        auth: Option<&str>,
        ctype: Option<&str>,
        body: &[u8],
    ) -> HttpResponse {
        let bearer = auth.map(|t| format!("Bearer {t}"));
        let mut h: Vec<(&str, &str)> = Vec::new();
        if let Some(b) = &bearer {
            h.push(("Authorization", b));
        }
        if let Some(ct) = ctype {
            h.push(("Content-Type", ct));
        }
        self.c
            .lab
            .http(n, method, &format!("/api/v1{path}"), &h, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    fn get(&self, n: usize, path: &str) -> HttpResponse {
        self.req(n, "GET", path, None, None, b"")
    }

    fn upload(&self, n: usize, token: Option<&str>, fields: &[(&str, &[u8])]) -> HttpResponse {
        let (ct, body) = multipart(fields);
        self.req(n, "POST", "/modules", token, Some(&ct), &body)
    }
}

#[test]
fn every_route_and_error_status() {
    let mut c = TestCluster::with_config("api", StoreKind::Embedded, 2, NET_CONFIG, &["--module-max-kib", "256"]);
    c.up(1);
    let token = c.lab.admin_token().expect("a token was generated");
    let api = Api {
        c: &c,
        token: token.clone(),
    };
    let tok = Some(api.token.as_str());

    // Leases: list, filters, one by key, and the errors.
    let all = json(&api.get(1, "/leases"));
    assert_eq!(all.as_array().map(Vec::len), Some(2), "{all}");
    let own: Vec<_> = all.as_array().unwrap().iter().filter(|l| l["own"] == true).collect();
    assert_eq!(own.len(), 1);
    let ip2 = c.lab.nodes[1].underlay_ip.to_string();
    let only2 = json(&api.get(1, &format!("/leases?public_ip={ip2}")));
    assert_eq!(only2[0]["subnet"], c.subnet(2).to_string(), "{only2}");
    assert_eq!(only2.as_array().map(Vec::len), Some(1));
    let by_node = json(&api.get(1, &format!("/leases?node={}", only2[0]["key"].as_str().unwrap())));
    assert_eq!(by_node[0]["public_ip"], ip2);
    assert_eq!(
        json(&api.get(1, &format!("/leases?node={ip2}")))
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    assert_eq!(
        json(&api.get(1, "/leases?node=10.9.9.0-24")).as_array().map(Vec::len),
        Some(0)
    );
    assert_eq!(
        json(&api.get(1, "/leases?expiring_within=60")).as_array().map(Vec::len),
        Some(0)
    );
    assert_eq!(
        json(&api.get(1, "/leases?expiring_within=90000"))
            .as_array()
            .map(Vec::len),
        Some(2)
    );
    assert_error(&api.get(1, "/leases?public_ip=not-an-ip"), 400, "bad_request");
    assert_error(&api.get(1, "/leases?colour=red"), 400, "bad_request");
    let key = only2[0]["key"].as_str().unwrap().to_string();
    assert_eq!(json(&api.get(1, &format!("/leases/{key}")))["public_ip"], ip2);
    let encoded = c.subnet(2).to_string().replace('/', "%2F");
    assert_eq!(json(&api.get(1, &format!("/leases/{encoded}")))["public_ip"], ip2);
    assert_error(&api.get(1, "/leases/10.244.250.0-24"), 404, "not_found");
    assert_error(&api.get(1, "/leases/banana"), 400, "bad_request");

    // Config, nodes, stats, the OpenAPI document, an unknown route.
    let cfg = json(&api.get(2, "/config"));
    assert_eq!(
        (cfg["network"].as_str(), cfg["subnet_len"].as_u64()),
        (Some("10.244.0.0/16"), Some(24))
    );
    assert_eq!(cfg["raw"]["Backend"]["Type"], "udp");
    assert!(eventually(Duration::from_secs(10), || {
        let n = json(&api.get(2, "/nodes"));
        n.as_array()
            .is_some_and(|a| a.len() == 2 && a.iter().all(|x| x["last_seen_secs"].is_u64()))
    }));
    let (p1, _) = c.pod(1, 1);
    let (_, p2ip) = c.pod(2, 1);
    assert!(ping(&p1, p2ip));
    let stats = json(&api.get(1, "/stats"));
    assert_eq!(stats["backend"], "udp");
    let peer = &stats["peers"][0];
    assert_eq!(peer["public_ip"], ip2, "{stats}");
    assert!(
        peer["tx_packets"].as_u64() >= Some(3) && peer["rx_packets"].as_u64() >= Some(3),
        "{stats}"
    );
    assert!(c.metric(1, &format!("weft_dataplane_peer_rx_packets_total{{peer=\"{ip2}\"}}")) >= 3.0);
    assert_eq!(stats["routes"].as_array().map(Vec::len), Some(1));
    assert!(stats["drops"]["policy"].is_u64());
    let doc = json(&api.get(1, "/openapi.json"));
    assert_eq!(doc["servers"][0]["url"], "/api/v1");
    for path in [
        "/leases",
        "/leases/{subnet}",
        "/config",
        "/nodes",
        "/stats",
        "/events",
        "/modules",
        "/modules/{name}",
        "/decisions",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} missing from the OpenAPI document"
        );
    }
    assert!(doc["paths"]["/modules/{name}"]["patch"].is_object());
    assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    assert_error(&api.get(1, "/nothing-here"), 404, "not_found");

    // Modules: auth, upload, conflicts, bad input, size limits, patch, delete.
    let fw = std::fs::read(policy_wasm("firewall")).expect("firewall.wasm");
    let cfg_deny = br#"{"rules":[{"action":"deny","protocol":"tcp","ports":[7777]}]}"#;
    let fields: [(&str, &[u8]); 3] = [("name", b"fw"), ("wasm", &fw), ("config", cfg_deny)];
    let r = api.upload(1, None, &fields);
    assert_error(&r, 401, "unauthorized");
    assert_eq!(r.header("www-authenticate"), Some("Bearer realm=\"weft\""));
    assert_error(&api.upload(1, Some("wrong"), &fields), 401, "unauthorized");
    let r = api.upload(1, tok, &fields);
    assert_eq!(r.status, 201, "{}", r.body);
    let created = json(&r);
    assert_eq!(
        (created["name"].as_str(), created["mode"].as_str()),
        (Some("fw"), Some("enforce"))
    );
    assert_error(&api.upload(1, tok, &fields), 409, "conflict");
    assert_error(
        &api.upload(1, tok, &[("name", b"junk"), ("wasm", b"MZ not wasm")]),
        400,
        "bad_request",
    );
    assert_error(&api.upload(1, tok, &[("wasm", &fw)]), 400, "bad_request");
    assert_error(
        &api.upload(1, tok, &[("name", b"Bad Name"), ("wasm", &fw)]),
        400,
        "bad_request",
    );
    let bad_cfg: [(&str, &[u8]); 3] = [("name", b"fw2"), ("wasm", &fw), ("config", b"{\"rules\":5}")];
    let r = api.upload(1, tok, &bad_cfg);
    assert_error(&r, 400, "bad_request");
    assert!(r.body.contains("config rejected"), "{}", r.body);
    let big = {
        let mut b = b"\0asm\x01\0\0\0".to_vec();
        b.resize(300 << 10, 0);
        b
    };
    assert_error(
        &api.upload(1, tok, &[("name", b"big"), ("wasm", &big)]),
        413,
        "too_large",
    );
    let huge = vec![b'x'; 700 << 10];
    assert_error(
        &api.upload(1, tok, &[("name", b"huge"), ("wasm", &huge)]),
        413,
        "too_large",
    );

    assert!(
        eventually(Duration::from_secs(15), || {
            let m = json(&api.get(2, "/modules/fw"));
            m["nodes"]
                .as_array()
                .is_some_and(|n| n.len() == 2 && n.iter().all(|x| x["state"] == "loaded"))
        }),
        "both nodes report fw loaded"
    );
    let list = json(&api.get(2, "/modules"));
    assert_eq!(list[0]["sha256"], created["sha256"]);
    assert_error(&api.get(2, "/modules/none"), 404, "not_found");

    // The decision trace: a blocked connection shows up as fw's drop, newest first.
    let (src, _) = c.pod(1, 1);
    let (dst_ns, dst) = c.pod(2, 1);
    assert!(!tcp_connects(&src, &dst_ns, dst, 7777), "fw blocks tcp/7777");
    let trace = json(&api.get(1, "/decisions?module=fw&limit=5"));
    let drop = trace
        .as_array()
        .and_then(|a| a.iter().find(|d| d["verdict"] == "drop"))
        .unwrap_or_else(|| panic!("no drop in {trace}"));
    assert_eq!(drop["dst"], format!("{dst}:7777"));
    assert_eq!(drop["direction"], "egress");
    assert!(trace.as_array().map_or(0, Vec::len) <= 5);
    assert_error(&api.get(1, "/decisions?limit=many"), 400, "bad_request");

    let patch = |body: &[u8], t: Option<&str>, name: &str| {
        api.req(
            1,
            "PATCH",
            &format!("/modules/{name}"),
            t,
            Some("application/json"),
            body,
        )
    };
    assert_error(&patch(br#"{"mode":"dry_run"}"#, None, "fw"), 401, "unauthorized");
    assert_error(&patch(b"{not json", tok, "fw"), 400, "bad_request");
    assert_error(&patch(br#"{"colour":"red"}"#, tok, "fw"), 400, "bad_request");
    assert_error(&patch(br#"{"mode":"sometimes"}"#, tok, "fw"), 400, "bad_request");
    assert_error(&patch(br#"{"mode":"dry_run"}"#, tok, "nope"), 404, "not_found");
    let r = patch(br#"{"mode":"dry_run","order":7,"failure":"open"}"#, tok, "fw");
    assert_eq!(r.status, 200, "{}", r.body);
    let m = json(&r);
    assert_eq!(
        (m["mode"].as_str(), m["order"].as_i64(), m["failure"].as_str()),
        (Some("dry_run"), Some(7), Some("open"))
    );

    assert_error(
        &api.req(1, "DELETE", "/modules/fw", None, None, b""),
        401,
        "unauthorized",
    );
    assert_eq!(api.req(1, "DELETE", "/modules/fw", tok, None, b"").status, 204);
    assert_error(&api.req(1, "DELETE", "/modules/fw", tok, None, b""), 404, "not_found");
    assert_eq!(json(&api.get(1, "/modules")).as_array().map(Vec::len), Some(0));

    // With --admin-auth-reads, reads need the token too.
    c.lab.spec.agent_args.push("--admin-auth-reads".into());
    c.lab.stop_agent(2, true).expect("stop");
    c.lab.start_agent(2).expect("start");
    c.lab.wait_ready(2, Duration::from_secs(20)).expect("ready");
    let api = Api { c: &c, token };
    assert_error(&api.get(2, "/leases"), 401, "unauthorized");
    assert_eq!(api.req(2, "GET", "/leases", Some(&api.token), None, b"").status, 200);
    assert_eq!(api.get(1, "/leases").status, 200, "node 1 still serves reads openly");
    assert_eq!(
        c.lab.http_get(2, "/metrics").expect("metrics").0,
        200,
        "metrics stay open for scrapers"
    );
}

#[test]
fn the_event_stream_carries_lease_module_and_counter_events() {
    let mut c = TestCluster::new("sse", StoreKind::Embedded, 2);
    c.up(1);
    let token = c.lab.admin_token().expect("token");
    let reader = read_events(&c, Duration::from_secs(20), |text| {
        ["event: hello", "event: stats", "event: modules", "lease_removed"]
            .iter()
            .all(|k| text.contains(k))
    });
    std::thread::sleep(Duration::from_secs(2));
    let fw = std::fs::read(policy_wasm("audit")).expect("audit.wasm");
    let boundary = "b0undary";
    let mut body = format!("--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\naudit\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"wasm\"; filename=\"a.wasm\"\r\n\r\n").into_bytes();
    body.extend_from_slice(&fw);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let auth = format!("Bearer {token}");
    let ct = format!("multipart/form-data; boundary={boundary}");
    let r = c
        .lab
        .http(
            2,
            "POST",
            "/api/v1/modules",
            &[("Authorization", &auth), ("Content-Type", &ct)],
            &body,
        )
        .expect("upload");
    assert_eq!(r.status, 201, "{}", r.body);
    // Node 2 stops first: a live node re-acquires its subnet at once, and a removal and a
    // re-creation that arrive together are no change at all.
    let gone = c.subnet(2);
    c.lab.stop_agent(2, false).expect("stop agent 2");
    c.delete_lease(gone);
    let text = reader.join().expect("reader");
    assert!(
        text.contains("content-type: text/event-stream") || text.contains("Content-Type: text/event-stream"),
        "{text:.300}"
    );
    for k in ["event: hello", "event: stats", "event: modules", "lease_removed"] {
        assert!(text.contains(k), "no {k:?} in the stream:\n{text:.2000}");
    }
}

/// Reads node 1's event stream on a thread until `done` says so of what came or `secs` pass;
/// joined, the thread gives the raw text.
fn read_events(c: &TestCluster, secs: Duration, done: fn(&str) -> bool) -> std::thread::JoinHandle<String> {
    let ns = c.lab.nodes[0].ns.name().to_string();
    std::thread::spawn(move || {
        weft::lab::netns::enter_and_run(&ns, move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(("127.0.0.1", 8286)).expect("connect");
            s.write_all(b"GET /api/v1/events HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
                .expect("request");
            s.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
            let mut text = String::new();
            let deadline = std::time::Instant::now() + secs;
            let mut buf = [0u8; 8192];
            while std::time::Instant::now() < deadline && !done(&text) {
                if let Ok(n) = s.read(&mut buf) {
                    text.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
            text
        })
        .expect("enter namespace")
    })
}

/// The `data` of every `stats` event in an event stream's text, in order.
fn stats_events(text: &str) -> Vec<serde_json::Value> {
    text.split("\n\n")
        .filter(|e| e.lines().any(|l| l == "event: stats"))
        .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
        .map(|d| serde_json::from_str(d).expect("stats event JSON"))
        .collect()
}

#[test]
fn stats_events_carry_every_peer_first_then_only_those_that_moved() {
    let mut c = TestCluster::new("ssep", StoreKind::Embedded, 2);
    c.up(1);
    let ip2 = c.lab.nodes[1].underlay_ip.to_string();
    let reader = read_events(&c, Duration::from_secs(7), |_| false);
    // Two idle seconds, then traffic with node 2.
    std::thread::sleep(Duration::from_millis(2500));
    let (p1, _) = c.pod(1, 1);
    let (_, p2ip) = c.pod(2, 1);
    assert!(eventually(Duration::from_secs(3), || ping(&p1, p2ip)), "pod 1 -> pod 2");
    let events = stats_events(&reader.join().expect("reader"));
    assert!(events.len() >= 4, "{events:?}");
    let peers = |e: &serde_json::Value| -> Vec<String> {
        e["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["public_ip"].as_str().map(String::from))
            .collect()
    };
    let first = &events[0];
    assert_eq!(first["all_peers"], true, "{first}");
    assert_eq!(first["route_count"], 1, "{first}");
    assert!(first.get("routes").is_none(), "routes are counted, not listed: {first}");
    let tx_of = |e: &serde_json::Value| {
        e["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["public_ip"] == ip2.as_str())
            .and_then(|p| p["tx_packets"].as_u64())
    };
    let sent_first = tx_of(first).unwrap_or(0);
    // An idle second carries no peer at all; the traffic shows up with node 2 alone.
    assert!(
        events[1..]
            .iter()
            .any(|e| e["all_peers"] == false && peers(e).is_empty()),
        "no idle event without peers: {events:?}"
    );
    assert!(
        events[1..]
            .iter()
            .any(|e| peers(e) == [ip2.clone()] && tx_of(e).is_some_and(|n| n > sent_first)),
        "no event carrying the traffic with {ip2}: {events:?}"
    );
}

/// Runs `weft <args>` in node `n`'s namespace: Ok(stdout) or Err(stderr).
fn weft_in(c: &TestCluster, n: usize, args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", c.lab.nodes[n - 1].ns.name()])
        .arg(weft_bin())
        .args(args)
        .output()
        .expect("run weft");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn the_command_line_goes_through_the_api() {
    let mut c = TestCluster::new("cli", StoreKind::Embedded, 2);
    c.up(0);
    let tf = c.lab.spec.dir.join("admin-token").display().to_string();
    let server = "http://127.0.0.1:8286";

    let status = weft_in(&c, 1, &["status", "--token-file", &tf]).expect("status");
    for n in 1..=2 {
        assert!(status.contains(&c.subnet(n).to_string()), "{status}");
    }
    assert!(
        status.contains(&format!("{} *", c.subnet(1))),
        "own lease marked: {status}"
    );
    let v: serde_json::Value = serde_json::from_str(&weft_in(&c, 2, &["status", "-o", "json"]).expect("status json"))
        .expect("status -o json is JSON");
    assert_eq!(v["nodes"].as_array().map(Vec::len), Some(2), "{v}");
    assert_eq!(v["stats"]["backend"], "udp");

    let leases: serde_json::Value =
        serde_json::from_str(&weft_in(&c, 1, &["lease", "--server", server, "-o", "json", "ls"]).expect("lease ls"))
            .expect("lease ls -o json is JSON");
    assert_eq!(leases.as_array().map(Vec::len), Some(2), "{leases}");

    let module = |args: &[&str]| {
        let mut all = vec!["module", "--server", server, "--token-file", &tf];
        all.extend_from_slice(args);
        weft_in(&c, 1, &all)
    };
    let fw = policy_wasm("firewall").display().to_string();
    let out = module(&[
        "add",
        "fw",
        &fw,
        "--config-json",
        r#"{"rules":[]}"#,
        "--order",
        "3",
        "--wait",
    ])
    .expect("add");
    assert!(out.starts_with("added module fw (sha256 "), "{out}");
    assert!(out.contains("module fw in force on all 2 node(s)"), "{out}");
    let ls = module(&["ls"]).expect("ls");
    assert!(ls.lines().any(|l| l.starts_with("fw ") && l.ends_with(" 2/2")), "{ls}");
    let status = weft_in(&c, 1, &["status", "--token-file", &tf]).expect("status");
    assert!(
        status.lines().any(|l| l.starts_with("fw ") && l.ends_with(" 2/2")),
        "status shows the module in force on both nodes: {status}"
    );
    let audit = policy_wasm("audit").display().to_string();
    let out = module(&[
        "set",
        "fw",
        "--wasm",
        &audit,
        "--config-json",
        "{}",
        "--dry-run",
        "true",
        "--wait",
        "15",
    ])
    .expect("set");
    assert!(out.contains("module fw in force on all 2 node(s)"), "{out}");
    let ls: serde_json::Value = serde_json::from_str(&module(&["-o", "json", "ls"]).expect("ls json")).expect("JSON");
    assert_eq!(ls[0]["mode"], "dry_run");
    assert!(
        out.contains(ls[0]["sha256"].as_str().unwrap_or("none")),
        "{out} vs {ls}"
    );

    let err = weft_in(&c, 1, &["module", "--server", server, "--token", "nope", "rm", "fw"]).expect_err("bad token");
    assert!(
        err.contains("weft: error: 401: missing or invalid bearer token"),
        "{err}"
    );
    let err = weft_in(&c, 1, &["status", "--server", "http://127.0.0.1:1"]).expect_err("nobody there");
    assert!(err.contains("cannot reach the agent at http://127.0.0.1:1"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let out = module(&["rm", "fw", "--wait", "15"]).expect("rm");
    assert!(out.contains("removed module fw"), "{out}");
    assert!(out.contains("module fw removed from all 2 node(s)"), "{out}");
    for n in 1..=2 {
        let (_, nodes) = c.lab.http_get(n, "/api/v1/nodes").expect("nodes");
        assert!(!nodes.contains("\"name\":\"fw\""), "node {n} still lists fw: {nodes}");
    }
}

/// `schema` with every object that lists its properties closed to others: an answer carrying a
/// field the document does not name disagrees with it as much as a wrong type does. An `allOf`
/// (a struct flattened into another) is closed as a whole (`unevaluatedProperties`), its parts
/// left open: each part closed alone would refuse the other parts' fields.
fn closed(schema: &mut serde_json::Value) {
    let mut parts = Vec::new();
    all_of_refs(schema, &mut parts);
    for r in parts {
        if let Some(name) = r.strip_prefix("#/components/schemas/") {
            if let Some(part) = schema["components"]["schemas"].get_mut(name) {
                part[OPEN_PART] = true.into();
            }
        }
    }
    close(schema);
}

/// Marks a schema that is part of an `allOf`, for [`close`] (validators ignore it).
const OPEN_PART: &str = "x-open-part";

/// The `$ref`s named as parts of an `allOf` anywhere in `v`.
fn all_of_refs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            let parts = m.get("allOf").and_then(|a| a.as_array()).into_iter().flatten();
            out.extend(parts.filter_map(|p| p["$ref"].as_str().map(str::to_string)));
            m.values().for_each(|x| all_of_refs(x, out));
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| all_of_refs(x, out)),
        _ => {}
    }
}

fn close(schema: &mut serde_json::Value) {
    match schema {
        serde_json::Value::Object(m) => {
            if let Some(serde_json::Value::Array(parts)) = m.get_mut("allOf") {
                parts
                    .iter_mut()
                    .filter(|p| p.is_object())
                    .for_each(|p| p[OPEN_PART] = true.into());
                m.insert("unevaluatedProperties".into(), false.into());
            } else if m.contains_key("properties")
                && !m.contains_key("additionalProperties")
                && !m.contains_key(OPEN_PART)
            {
                m.insert("additionalProperties".into(), false.into());
            }
            for v in m.values_mut() {
                close(v);
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(close),
        _ => {}
    }
}

/// Checks a live answer against the document's schema for `method path` and its status.
fn conforms(doc: &serde_json::Value, method: &str, path: &str, r: &HttpResponse) {
    let status = r.status.to_string();
    let schema = &doc["paths"][path][method]["responses"][&status]["content"]["application/json"]["schema"];
    assert!(
        schema.is_object(),
        "{method} {path}: the document has no {status} answer"
    );
    let mut root = schema.clone();
    root["components"] = doc["components"].clone();
    closed(&mut root);
    let v = jsonschema::validator_for(&root).unwrap_or_else(|e| panic!("{method} {path}: bad schema: {e}"));
    let body = json(r);
    let errors: Vec<String> = v
        .iter_errors(&body)
        .map(|e| format!("{e} at {}", e.instance_path))
        .collect();
    assert!(
        errors.is_empty(),
        "{method} {path} {status} disagrees with the document:\n{}\n{body}",
        errors.join("\n")
    );
}

#[test]
fn live_answers_agree_with_the_openapi_document() {
    // udp leases publish no backend data (null): the case the document once got wrong.
    let mut c = TestCluster::new("oas", StoreKind::Embedded, 2);
    c.up(1);
    let token = c.lab.admin_token().expect("token");
    let api = Api { c: &c, token };
    let tok = Some(api.token.as_str());
    let doc = json(&api.get(1, "/openapi.json"));
    let fw = std::fs::read(policy_wasm("firewall")).expect("firewall.wasm");
    let cfg = br#"{"rules":[{"action":"deny","protocol":"tcp","ports":[7777]}]}"#;
    let up = api.upload(1, tok, &[("name", b"fw"), ("wasm", &fw), ("config", cfg)]);
    conforms(&doc, "post", "/modules", &up);
    assert!(eventually(Duration::from_secs(15), || json(&api.get(1, "/modules/fw"))
        ["nodes"]
        .as_array()
        .is_some_and(|n| n.len() == 2)));
    let sha = json(&up)["sha256"].clone();
    let in_force = |r: &serde_json::Value| {
        r["nodes"] == 2
            && r["loaded"] == 2
            && r["sha256"] == sha
            && r["complete"] == true
            && r["summary"] == "loaded on 2 of 2 node(s)"
    };
    assert!(
        eventually(Duration::from_secs(15), || in_force(&json(
            &api.get(1, "/modules/fw/rollout")
        ))),
        "{}",
        api.get(1, "/modules/fw/rollout").body
    );
    let (src, _) = c.pod(1, 1);
    let (dst_ns, dst) = c.pod(2, 1);
    assert!(!tcp_connects(&src, &dst_ns, dst, 7777));
    let key = json(&api.get(1, "/leases"))[0]["key"]
        .as_str()
        .expect("a key")
        .to_string();
    for (path, route) in [
        ("/leases".to_string(), "/leases"),
        ("/leases?limit=1".to_string(), "/leases"),
        (format!("/leases/{key}"), "/leases/{subnet}"),
        ("/leases/10.9.0.0-24".to_string(), "/leases/{subnet}"),
        ("/leases?expiring_within=9223372036854775808".to_string(), "/leases"),
        ("/leases?expiring_within=315360001".to_string(), "/leases"),
        ("/leases?limit=0".to_string(), "/leases"),
        ("/config".to_string(), "/config"),
        ("/nodes".to_string(), "/nodes"),
        ("/stats".to_string(), "/stats"),
        ("/modules".to_string(), "/modules"),
        ("/modules/fw".to_string(), "/modules/{name}"),
        ("/modules/none".to_string(), "/modules/{name}"),
        ("/modules/fw/rollout".to_string(), "/modules/{name}/rollout"),
        ("/modules/none/rollout".to_string(), "/modules/{name}/rollout"),
        ("/decisions".to_string(), "/decisions"),
        ("/decisions?limit=0".to_string(), "/decisions"),
    ] {
        conforms(&doc, "get", route, &api.get(1, &path));
    }
    let leases = json(&api.get(1, "/leases"));
    assert!(
        leases
            .as_array()
            .is_some_and(|a| a.iter().all(|l| l["backend_data"].is_null())),
        "{leases}"
    );
    let decisions = json(&api.get(1, "/decisions"));
    assert!(decisions.as_array().is_some_and(|a| !a.is_empty()), "{decisions}");
    let patch = api.req(
        1,
        "PATCH",
        "/modules/fw",
        tok,
        Some("application/json"),
        br#"{"mode":"dry_run"}"#,
    );
    conforms(&doc, "patch", "/modules/{name}", &patch);
    let bad = api.req(
        1,
        "PATCH",
        "/modules/fw",
        tok,
        Some("application/json"),
        br#"{"failure":"sometimes"}"#,
    );
    assert_eq!(bad.status, 400, "{}", bad.body);
    conforms(&doc, "patch", "/modules/{name}", &bad);
    let schema = &doc["components"]["schemas"];
    assert_eq!(
        schema["Mode"]["enum"],
        serde_json::json!(["enforce", "dry_run"]),
        "{}",
        schema["Mode"]
    );
    assert_eq!(schema["FailurePolicy"]["enum"], serde_json::json!(["closed", "open"]));
}

#[test]
fn a_closed_all_of_takes_its_parts_fields_and_refuses_others() {
    let mut root = serde_json::json!({
        "allOf": [
            {"$ref": "#/components/schemas/Part"},
            {"type": "object", "properties": {"extra": {"type": "boolean"}}}
        ],
        "components": {"schemas": {"Part": {"type": "object", "properties": {"n": {"type": "integer"}}}}}
    });
    closed(&mut root);
    let v = jsonschema::validator_for(&root).expect("schema");
    assert!(v.is_valid(&serde_json::json!({"n": 1, "extra": true})));
    assert!(!v.is_valid(&serde_json::json!({"n": 1, "extra": true, "stray": 0})));
    assert!(!v.is_valid(&serde_json::json!({"n": "one", "extra": true})));
}
