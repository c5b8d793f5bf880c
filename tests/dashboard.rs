//! The dashboard in a real browser: headless Chromium (Debian's `chromium` + `chromium-driver`)
//! driven over WebDriver against the agents of a 3-node cluster.

use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::json;
use weft_tests::webdriver::Browser;
use weft_tests::*;

const RENDERED: &str = "return document.body.dataset.rendered === '1'";

#[test]
fn the_map_shows_the_leases_and_an_upload_reaches_another_nodes_dashboard() {
    let mut c = TestCluster::new("ui", StoreKind::Embedded, 3);
    c.up(1);
    let token = c.lab.admin_token().expect("token");
    let one = Browser::start(c.lab.nodes[0].ns.name(), 9515);
    let two = Browser::start(c.lab.nodes[1].ns.name(), 9516);
    for b in [&one, &two] {
        b.goto("http://127.0.0.1:8286/");
        assert!(
            b.wait_for(RENDERED, Duration::from_secs(20)),
            "the dashboard never rendered: {}",
            b.eval(
                "return document.readyState + ', ' + document.querySelector('#map-summary').textContent",
                json!([])
            )
        );
    }

    // Each lease sits in its own slot, in the colour of its state; other slots are free.
    let colors = one.eval("return window.weftMap.colors", json!([]));
    for n in 1..=3 {
        let subnet = c.subnet(n).to_string();
        let slot = one.eval("return window.weftMap.slotOf(arguments[0])", json!([subnet]));
        let want = u64::from(c.subnet(n).network().octets()[2]);
        assert_eq!(slot.as_u64(), Some(want), "slot of {subnet}");
        let color = one.eval("return window.weftMap.colorAt(arguments[0])", json!([slot]));
        let expected = if n == 1 { &colors["own"] } else { &colors["leased"] };
        assert_eq!(&color, expected, "{subnet} drawn as {color}");
    }
    let free = (0..256u64)
        .find(|i| (1..=3).all(|n| u64::from(c.subnet(n).network().octets()[2]) != *i) && *i > 0)
        .expect("a free slot");
    assert_eq!(
        one.eval("return window.weftMap.colorAt(arguments[0])", json!([free])),
        colors["free"]
    );
    assert_eq!(
        one.eval("return window.weftMap.colorAt(0)", json!([])),
        colors["reserved"],
        "10.244.0.0/24 is below SubnetMin"
    );
    let summary = one.eval("return document.querySelector('#map-summary').textContent", json!([]));
    assert!(summary.as_str().unwrap_or("").starts_with("3 of "), "{summary}");
    let rows = one.eval("return document.querySelectorAll('#nodes tbody tr').length", json!([]));
    assert_eq!(rows, json!(3));
    traffic_column_follows_the_stats_events(&c, &one);
    let png = one.screenshot("#map-section");
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/dashboard-map.png");
    std::fs::write(&out, &png).expect("save the screenshot");

    // Upload a module through the page on node 1; node 2's page shows it after the event stream.
    assert!(one.wait_for(
        "return document.querySelector('#live').textContent === 'live'",
        Duration::from_secs(10)
    ));
    assert!(two.wait_for(
        "return document.querySelector('#live').textContent === 'live'",
        Duration::from_secs(10)
    ));
    // Node 3's agent is frozen while the module is added: its lease stays, and its catching up
    // later writes no lease, so only the page's own polling can see it (other nodes' reports
    // raise no event on this node).
    let node3 = c.lab.nodes[2].underlay_ip.to_string();
    c.lab.signal_agent(3, Signal::SIGSTOP).expect("freeze node 3");
    one.type_into("#token", &token);
    one.type_into("#upload input[name=name]", "audit");
    one.type_into("#upload input[name=wasm]", &policy_wasm("audit").display().to_string());
    one.type_into("#upload textarea[name=config]", r#"{"one_in":5}"#);
    // Signed (nodes here trust no keys, so it is shown, not required).
    let key = c.tmp.path().join("ui.key");
    let sig = c.tmp.path().join("audit.sig");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(weft_bin())
            .args(args)
            .output()
            .expect("weft");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    run(&["module", "keygen", "--out", &key.display().to_string()]);
    let audit = policy_wasm("audit").display().to_string();
    run(&[
        "module",
        "sign",
        &audit,
        "--config-json",
        r#"{"one_in":5}"#,
        "--key",
        &key.display().to_string(),
        "--out",
        &sig.display().to_string(),
    ]);
    let key_id = serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(&sig).expect("sig")).expect("json")
        ["key_id"]
        .as_str()
        .expect("key id")
        .to_string();
    one.type_into("#upload input[name=signature]", &sig.display().to_string());
    one.click("#upload button[type=submit]");
    let listed = "return !!document.querySelector('#modules tbody tr[data-module=audit]')";
    assert!(
        one.wait_for(listed, Duration::from_secs(15)),
        "upload result: {}",
        one.eval("return document.querySelector('#upload-result').textContent", json!([]))
    );
    assert!(
        two.wait_for(listed, Duration::from_secs(15)),
        "node 2's dashboard never showed the module"
    );
    // The page shows the rollout as the API words it: in force on 2 of the 3 nodes holding a
    // lease, and which node holds it up.
    let rollout = "const c = document.querySelector('#modules tbody tr[data-module=audit] td.rollout'); \
                   return c ? c.textContent : ''";
    let held_up = format!(
        "const c = document.querySelector('#modules tbody tr[data-module=audit] td.rollout'); \
         return !!c && c.textContent.startsWith('2 of 3') && c.textContent.includes('{node3}')"
    );
    assert!(
        two.wait_for(&held_up, Duration::from_secs(15)),
        "rollout cell: {}",
        two.eval(rollout, json!([]))
    );
    assert_eq!(
        two.eval(
            "return document.querySelector('#modules tbody tr[data-module=audit] td.rollout .pill').className",
            json!([])
        ),
        json!("pill wait")
    );
    // Node 3 wakes and loads it: both pages follow without a reload.
    c.lab.signal_agent(3, Signal::SIGCONT).expect("wake node 3");
    let in_force = "const c = document.querySelector('#modules tbody tr[data-module=audit] td.rollout'); \
                    return !!c && c.textContent === '3 of 3' && c.querySelector('.pill').className === 'pill on'";
    for (b, which) in [(&one, "node 1"), (&two, "node 2")] {
        assert!(
            b.wait_for(in_force, Duration::from_secs(30)),
            "{which}'s rollout cell: {}",
            b.eval(rollout, json!([]))
        );
    }
    let row = two.eval(
        "return document.querySelector('#modules tbody tr[data-module=audit]').textContent",
        json!([]),
    );
    assert!(
        row.as_str().is_some_and(|r| r.contains(&key_id)),
        "signer not shown: {row}"
    );
    // And it really is stored for the cluster.
    let r = c.lab.http_get(3, "/api/v1/modules/audit").expect("api");
    assert_eq!(r.0, 200, "{}", r.1);
    // A refused upload shows the API's reason on the page.
    one.type_into("#upload input[name=name]", "audit");
    one.type_into("#upload input[name=wasm]", &policy_wasm("audit").display().to_string());
    one.click("#upload button[type=submit]");
    assert!(one.wait_for(
        "return document.querySelector('#upload-result').textContent.includes('already exists')",
        Duration::from_secs(10)
    ));
}

/// Node 2's row on node 1's page shows the traffic with node 2 as each second's stats event
/// brings it, updating its cell in place (the table is not rebuilt every second).
fn traffic_column_follows_the_stats_events(c: &TestCluster, one: &Browser) {
    let ip2 = json!(c.lab.nodes[1].underlay_ip.to_string());
    let cell = format!(
        "const row = [...document.querySelectorAll('#nodes tbody tr')] \
         .find((r) => r.children[1].textContent === {ip2}); return row.children[5]"
    );
    let text = format!("{cell}.textContent");
    one.eval(&format!("{cell}.dataset.probe = 'same cell'"), json!([]));
    let before = one.eval(&text, json!([]));
    let (p1, _) = c.pod(1, 1);
    let (_, p2ip) = c.pod(2, 1);
    assert!(
        eventually(Duration::from_secs(10), || ping(&p1, p2ip)),
        "pod 1 -> pod 2"
    );
    // Bytes both ways: the echo went out to node 2 and its reply came back.
    assert!(
        one.wait_for(
            &format!(
                "const t = (() => {{ {text} }})(); return t !== {before} && /↑ [1-9]/.test(t) && /↓ [1-9]/.test(t)"
            ),
            Duration::from_secs(10)
        ),
        "node 2's traffic cell stayed {before} (now {})",
        one.eval(&text, json!([]))
    );
    assert_eq!(
        one.eval(&format!("{cell}.dataset.probe"), json!([])),
        json!("same cell"),
        "the traffic cell was rebuilt, not updated"
    );
}
