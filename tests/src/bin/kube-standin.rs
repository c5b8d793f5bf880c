//! Runs the stand-in Kubernetes API server (`weft_tests::kubeapi`) in a test's namespace:
//! `kube-standin LISTEN CERT KEY TOKEN STATE [--compact]`.

use std::net::SocketAddr;
use std::path::PathBuf;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, cert, key, token, state, rest @ ..] = &args[..] else {
        return Err("usage: kube-standin LISTEN CERT KEY TOKEN STATE [--compact]".into());
    };
    let addr: SocketAddr = listen.parse()?;
    let compact = rest.iter().any(|a| a == "--compact");
    let db = weft_tests::kubeapi::db::Db::open(Some(PathBuf::from(state)), compact);
    let server = weft_tests::kubeapi::Server::new(db, token.clone());
    let acceptor = weft::tls::acceptor(&weft::tls::ServerFiles {
        cert: cert.into(),
        key: key.into(),
        client_ca: None,
    })?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    eprintln!("kube-standin listening on https://{addr}");
    // The objects reach the file within 250 ms of a write, and at SIGTERM.
    let saver = server.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            saver.save();
        }
    });
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = weft::admin::serve_tls(listener, acceptor, server.router()) => r?,
        _ = term.recv() => server.save(),
    }
    Ok(())
}
