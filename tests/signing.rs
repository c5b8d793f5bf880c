//! Signed modules: nodes started with `--module-trusted-keys` refuse unsigned, tampered and
//! foreign-signed modules when they are added (command line and API) and when they are loaded
//! from the store (written there by a command line that did not check), and run the properly
//! signed one, showing its key id in `module ls` and the API.

use std::path::{Path, PathBuf};
use std::time::Duration;

use weft_tests::*;

fn weft(args: &[&str]) -> Result<String, String> {
    stdout_or_stderr(std::process::Command::new(weft_bin()).args(args))
}

/// `weft module sign` of `wasm` with `config` by `key`, written to `out`.
fn sign(wasm: &Path, config: &Path, key: &Path, out: &Path) -> String {
    let p = |p: &Path| p.display().to_string();
    weft(&[
        "module",
        "sign",
        &p(wasm),
        "--config",
        &p(config),
        "--key",
        &p(key),
        "--out",
        &p(out),
    ])
    .expect("sign");
    std::fs::read_to_string(out).expect("signature")
}

/// The key id `weft module keygen` notes in the public key file.
fn key_id(public: &Path) -> String {
    let text = std::fs::read_to_string(public).expect("public key");
    let line = text
        .lines()
        .find(|l| l.starts_with("# weft module key "))
        .expect("key id line");
    line.trim_start_matches("# weft module key ").trim().to_string()
}

fn module_states(c: &TestCluster, name: &str) -> Vec<(String, String)> {
    let (_, body) = c
        .lab
        .http_get(1, &format!("/api/v1/modules/{name}"))
        .unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    v["nodes"]
        .as_array()
        .map(|n| {
            n.iter()
                .map(|s| {
                    (
                        s["state"].as_str().unwrap_or("").to_string(),
                        s["error"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Two key pairs (one trusted), a firewall config that closes tcp/7777, and signatures: good,
/// by the stranger, and for another config.
struct Keys {
    dir: tempfile::TempDir,
    trusted: String,
    wasm: String,
    deny: String,
}

impl Keys {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn make() -> Keys {
        let dir = tempfile::tempdir().expect("tmp");
        let k = |n: &str| -> PathBuf { dir.path().join(n) };
        for name in ["ops.key", "stranger.key"] {
            weft(&["module", "keygen", "--out", &k(name).display().to_string()]).expect("keygen");
        }
        let mode = std::fs::metadata(k("ops.key")).expect("key").permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600,
            "secret key readable by others"
        );
        assert!(
            weft(&["module", "keygen", "--out", &k("ops.key").display().to_string()]).is_err(),
            "a key was overwritten"
        );
        let wasm = policy_wasm("firewall");
        std::fs::write(
            k("deny.json"),
            r#"{"rules":[{"action":"deny","protocol":"tcp","ports":[7777]}]}"#,
        )
        .expect("config");
        std::fs::write(k("allow.json"), r#"{"rules":[]}"#).expect("config");
        sign(&wasm, &k("deny.json"), &k("ops.key"), &k("good.sig"));
        sign(&wasm, &k("deny.json"), &k("stranger.key"), &k("stranger.sig"));
        // Signed for another config: stored with the deny config, it no longer matches.
        sign(&wasm, &k("allow.json"), &k("ops.key"), &k("other-config.sig"));
        Keys {
            trusted: k("ops.key.pub").display().to_string(),
            wasm: wasm.display().to_string(),
            deny: k("deny.json").display().to_string(),
            dir,
        }
    }

    /// `weft module add NAME firewall --config deny.json [--signature SIG]`, checked against the
    /// trusted key or not checked at all.
    fn add(&self, c: &TestCluster, name: &str, sig: Option<&str>, check: bool) -> Result<String, String> {
        self.add_with(c, name, sig, check, &[])
    }

    /// [`Keys::add`] with more arguments.
    fn add_with(
        &self,
        c: &TestCluster,
        name: &str,
        sig: Option<&str>,
        check: bool,
        more: &[&str],
    ) -> Result<String, String> {
        let sig_path = sig.map(|s| self.path(s).display().to_string());
        let mut args: Vec<&str> = Vec::new();
        if check {
            args.extend(["--module-trusted-keys", self.trusted.as_str()]);
        }
        args.extend(["add", name, self.wasm.as_str(), "--config", self.deny.as_str()]);
        if let Some(s) = &sig_path {
            args.extend(["--signature", s.as_str()]);
        }
        if !check {
            // A module no node runs gets its failure policy: open, so what shows is whether
            // its code ran (its rule would block the port), not that everything is dropped.
            args.extend(["--failure", "open"]);
        }
        args.extend(more);
        c.weft_module(1, &args)
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).expect("read")
    }
}

fn refused_when_added(c: &TestCluster, keys: &Keys) {
    for (sig, why) in [
        (None, "unsigned"),
        (Some("stranger.sig"), "which this node does not trust"),
        (Some("other-config.sig"), "does not match this code and config"),
    ] {
        let err = keys.add(c, "fw", sig, true).expect_err("refused");
        assert!(err.contains(why), "{sig:?}: wanted {why:?} in {err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
    }
    let token = c.lab.admin_token().expect("token");
    let (wasm, deny) = (std::fs::read(&keys.wasm).expect("wasm"), keys.read("deny.json"));
    let stranger = keys.read("stranger.sig");
    for (sig, why) in [(None, "unsigned"), (Some(stranger.as_slice()), "does not trust")] {
        let mut fields: Vec<(&str, &[u8])> = vec![("name", b"fw"), ("wasm", &wasm), ("config", &deny)];
        fields.extend(sig.map(|s| ("signature", s)));
        let r = upload_module(c, 1, &token, &fields);
        assert_eq!(r.status, 400, "{}", r.body);
        assert!(r.body.contains(why), "{}", r.body);
    }
}

/// Written into the store by a command line that checks nothing: every node refuses to run them.
fn refused_when_loaded(c: &TestCluster, keys: &Keys, pods: &Pods) {
    assert!(pods.connects(), "blocked before any module");
    // Waiting for it ends as soon as a node reports that it cannot load it, with the reason.
    let started = std::time::Instant::now();
    let err = keys
        .add_with(c, "plain", None, false, &["--wait", "30"])
        .expect_err("no node runs an unsigned module");
    assert!(
        err.contains("module plain cannot load on every node: loaded on 0 of 2 node(s); failed on ")
            && err.contains("unsigned")
            && started.elapsed() < Duration::from_secs(20),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    keys.add(c, "forged", Some("other-config.sig"), false)
        .expect("stored unchecked");
    for (name, why) in [("plain", "unsigned"), ("forged", "does not match")] {
        assert!(
            eventually(Duration::from_secs(15), || {
                let s = module_states(c, name);
                s.len() == 2 && s.iter().all(|(state, e)| state == "failed" && e.contains(why))
            }),
            "{name}: {:?}",
            module_states(c, name)
        );
    }
    assert!(pods.connects(), "a refused module's rule was enforced");
    c.weft_module(1, &["rm", "plain"]).expect("rm");
    c.weft_module(1, &["rm", "forged"]).expect("rm");
}

/// The signed one is added, runs everywhere and shows who signed it.
fn signed_module_runs(c: &TestCluster, keys: &Keys, pods: &Pods) {
    let out = keys
        .add_with(c, "fw", Some("good.sig"), true, &["--wait", "20"])
        .expect("signed module added");
    assert!(out.contains("module fw in force on all 2 node(s)"), "{out}");
    let id = key_id(&keys.path("ops.key.pub"));
    let good = std::fs::read_to_string(keys.path("good.sig")).expect("sig");
    assert!(good.contains(&id), "{good}");
    let ls = c.weft_module(1, &["ls"]).expect("ls");
    assert!(ls.lines().any(|l| l.starts_with("fw") && l.contains(&id)), "{ls}");
    assert!(
        eventually(Duration::from_secs(15), || {
            let s = module_states(c, "fw");
            s.len() == 2 && s.iter().all(|(state, _)| state == "loaded")
        }),
        "{:?}",
        module_states(c, "fw")
    );
    let (_, body) = c.lab.http_get(2, "/api/v1/modules/fw").expect("module");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["signed_by"], id.as_str(), "{body}");
    assert!(
        eventually(Duration::from_secs(10), || !pods.connects()),
        "the signed module does not block"
    );
    // A config change without a new signature is refused; the API takes one with the upload.
    let allow = keys.path("allow.json").display().to_string();
    let err = c.weft_module(
        1,
        &["--module-trusted-keys", &keys.trusted, "set", "fw", "--config", &allow],
    );
    assert!(err.as_ref().is_err_and(|e| e.contains("unsigned")), "{err:?}");
    let token = c.lab.admin_token().expect("token");
    let (wasm, deny) = (std::fs::read(&keys.wasm).expect("wasm"), keys.read("deny.json"));
    let fields: [(&str, &[u8]); 4] = [
        ("name", b"fw2"),
        ("wasm", &wasm),
        ("config", &deny),
        ("signature", good.as_bytes()),
    ];
    let r = upload_module(c, 2, &token, &fields);
    assert_eq!(r.status, 201, "{}", r.body);
    assert!(r.body.contains(&id), "{}", r.body);
}

/// A pod on node 1 and one on node 2, for tcp/7777.
struct Pods {
    src: String,
    dst_ns: String,
    dst: std::net::Ipv4Addr,
}

impl Pods {
    fn connects(&self) -> bool {
        tcp_connects(&self.src, &self.dst_ns, self.dst, 7777)
    }
}

#[test]
fn only_modules_signed_by_a_trusted_key_are_added_and_run() {
    let keys = Keys::make();
    let mut c = TestCluster::with_config(
        "sig",
        StoreKind::Embedded,
        2,
        NET_CONFIG,
        &["--module-trusted-keys", &keys.trusted],
    );
    c.up(1);
    let ((src, _), (dst_ns, dst)) = (c.pod(1, 1), c.pod(2, 1));
    let pods = Pods { src, dst_ns, dst };
    refused_when_added(&c, &keys);
    refused_when_loaded(&c, &keys, &pods);
    signed_module_runs(&c, &keys, &pods);
}
