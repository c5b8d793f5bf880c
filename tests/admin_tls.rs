//! The admin API beyond loopback: an agent serving `--admin-listen` on its underlay address
//! over TLS (certificates made by openssl), reached from another node's namespace by the
//! command line with `--server https://...`: a CA file makes it trusted, without one the
//! certificate is refused in one line, plain HTTP to it gets nowhere, and with
//! `--admin-tls-client-ca` only clients with a certificate from that CA get in.

use std::process::{Child, Command};
use std::time::Duration;

use weft_tests::*;

/// An agent started by hand (the lab's own start talks plain HTTP to loopback); killed on drop,
/// before the namespaces go.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(c: &TestCluster, tls: &[String]) -> Agent {
    let node = &c.lab.nodes[0];
    let mut args = c.lab.agent_args(1).expect("args");
    let listen = format!("{}:8286", node.underlay_ip);
    for a in args.iter_mut().filter(|a| a.starts_with("127.0.0.1:")) {
        *a = listen.clone();
    }
    let log = std::fs::File::create(c.tmp.path().join("tls-agent.log")).expect("log");
    let child = Command::new("ip")
        .args(["netns", "exec", node.ns.name()])
        .arg(weft_bin())
        .args(args)
        .args(tls)
        .stderr(log)
        .spawn()
        .expect("agent");
    Agent(child)
}

/// `weft <args>` from node 2's namespace.
fn weft_from_node2(c: &TestCluster, args: &[&str]) -> Result<String, String> {
    stdout_or_stderr(
        Command::new("ip")
            .args(["netns", "exec", c.lab.nodes[1].ns.name()])
            .arg(weft_bin())
            .args(args),
    )
}

fn flag(name: &str, p: &std::path::Path) -> [String; 2] {
    [name.to_string(), p.display().to_string()]
}

#[test]
fn the_admin_api_over_tls_trusts_a_ca_and_can_demand_client_certificates() {
    let c = TestCluster::new("atls", StoreKind::Embedded, 2);
    let ip = c.lab.nodes[0].underlay_ip;
    let files = TlsFiles::generate(c.tmp.path(), ip);
    let server = format!("https://{ip}:8286");
    let ca = files.ca.display().to_string();
    let server_tls: Vec<String> = [
        flag("--admin-tls-cert", &files.server.0),
        flag("--admin-tls-key", &files.server.1),
    ]
    .concat();

    // A key that is not there stops the agent at once, naming the file.
    let bad: Vec<String> = [
        flag("--admin-tls-cert", &files.server.0),
        flag("--admin-tls-key", &c.tmp.path().join("nope.key")),
    ]
    .concat();
    let mut agent = start(&c, &bad);
    let status = agent.0.wait().expect("wait");
    assert!(!status.success());
    let log = std::fs::read_to_string(c.tmp.path().join("tls-agent.log")).expect("log");
    assert!(log.contains("nope.key"), "{log}");

    let _agent = start(&c, &server_tls);
    assert!(
        eventually(Duration::from_secs(20), || weft_from_node2(
            &c,
            &["status", "--server", &server, "--server-ca", &ca]
        )
        .is_ok()),
        "never answered over TLS: {:?}",
        weft_from_node2(&c, &["status", "--server", &server, "--server-ca", &ca])
    );
    let status = weft_from_node2(&c, &["status", "--server", &server, "--server-ca", &ca]).expect("status");
    assert!(status.contains(&ip.to_string()), "{status}");
    let err = weft_from_node2(&c, &["status", "--server", &server]).expect_err("an unknown CA");
    eprintln!("without the CA: {}", err.trim());
    assert!(err.contains("certificate") && err.lines().count() == 1, "{err}");
    let err = weft_from_node2(&c, &["status", "--server", &format!("http://{ip}:8286")]).expect_err("plain HTTP");
    eprintln!("plain HTTP: {}", err.trim());
    assert_eq!(err.lines().count(), 1, "{err}");
    drop(_agent);

    // Client certificates demanded: the CA alone no longer gets in; the client's certificate does.
    let mutual: Vec<String> = [server_tls.clone(), flag("--admin-tls-client-ca", &files.ca).to_vec()].concat();
    let _agent = start(&c, &mutual);
    let with_cert = [
        "status",
        "--server",
        &server,
        "--server-ca",
        &ca,
        "--client-cert",
        &files.client.0.display().to_string(),
        "--client-key",
        &files.client.1.display().to_string(),
    ]
    .map(String::from);
    let with_cert: Vec<&str> = with_cert.iter().map(String::as_str).collect();
    assert!(
        eventually(Duration::from_secs(20), || weft_from_node2(&c, &with_cert).is_ok()),
        "{:?}",
        weft_from_node2(&c, &with_cert)
    );
    let err =
        weft_from_node2(&c, &["status", "--server", &server, "--server-ca", &ca]).expect_err("no client certificate");
    eprintln!("no client certificate: {}", err.trim());
    assert_eq!(err.lines().count(), 1, "{err}");
    let token = c.tmp.path().join("lab").join("admin-token").display().to_string();
    let mut ls = with_cert.clone();
    ls[0] = "module";
    ls.splice(1..1, ["ls", "--token-file", token.as_str()]);
    let modules = weft_from_node2(&c, &ls).expect("module ls over mutual TLS");
    assert!(modules.starts_with("NAME"), "{modules}");
}
