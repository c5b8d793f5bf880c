//! A TCP proxy that loses one request, or its answer, on purpose. A store client that gets no
//! answer cannot tell a request that never arrived from one that was applied and whose answer
//! was lost (a member dying or losing quorum mid-request); tests put this proxy between a
//! client and a real server to produce each case exactly once, at the request that carries a
//! given marker (bytes the request holds in the clear, such as a key in a gRPC message).
//!
//! Once tripped, a connection stays silent both ways (as a partitioned member's does) until
//! [`LossyProxy::heal`] closes it; connections opened afterwards are relayed faithfully.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What a tripped connection loses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loss {
    /// The request carrying the marker never reaches the server.
    Request,
    /// The request reaches the server; no answer reaches the client.
    Answer,
}

#[derive(Default)]
struct Armed {
    loss: Option<Loss>,
    marker: Vec<u8>,
    trips: u64,
}

impl Armed {
    /// Whether the last `fresh` bytes of `seen` (the connection's earlier bytes, then a new
    /// chunk) trip the connection: a marker ending in them, not one seen before arming.
    fn trip(&mut self, seen: &[u8], fresh: usize) -> Option<Loss> {
        let loss = self.loss?;
        let m = self.marker.len();
        let from = seen.len().saturating_sub(fresh + m.saturating_sub(1));
        if m == 0 || !seen[from..].windows(m).any(|w| w == self.marker) {
            return None;
        }
        self.loss = None;
        self.trips += 1;
        Some(loss)
    }
}

/// The proxy; it runs on the Tokio runtime that started it, until that runtime ends.
pub struct LossyProxy {
    addr: SocketAddr,
    armed: Arc<Mutex<Armed>>,
    heal: watch::Sender<u64>,
}

impl LossyProxy {
    /// Listens on `listen` and relays every connection to `upstream`.
    pub async fn start(listen: SocketAddr, upstream: SocketAddr) -> std::io::Result<LossyProxy> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let armed = Arc::new(Mutex::new(Armed::default()));
        let (heal, _) = watch::channel(0);
        let (a, h) = (armed.clone(), heal.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay(client, upstream, a.clone(), h.subscribe()));
            }
        });
        Ok(LossyProxy { addr, armed, heal })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The next request carrying `marker` trips its connection, losing `loss`.
    pub fn arm(&self, loss: Loss, marker: &[u8]) {
        let mut a = self.armed.lock().unwrap_or_else(PoisonError::into_inner);
        a.loss = Some(loss);
        a.marker = marker.to_vec();
    }

    /// Connections tripped so far.
    pub fn trips(&self) -> u64 {
        self.armed.lock().unwrap_or_else(PoisonError::into_inner).trips
    }

    /// Disarms, and closes every tripped connection.
    pub fn heal(&self) {
        self.armed.lock().unwrap_or_else(PoisonError::into_inner).loss = None;
        self.heal.send_modify(|n| *n += 1);
    }
}

/// Relays one connection both ways until either side closes, or it is tripped and healed.
async fn relay(client: TcpStream, upstream: SocketAddr, armed: Arc<Mutex<Armed>>, mut heal: watch::Receiver<u64>) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = (client.set_nodelay(true), server.set_nodelay(true));
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let mut tripped: Option<Loss> = None;
    // The end of the previous chunk, so a marker split between two reads is still seen.
    let mut seen: Vec<u8> = Vec::new();
    let (mut up, mut down) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    loop {
        tokio::select! {
            n = cr.read(&mut up) => {
                let n = match n { Ok(0) | Err(_) => return, Ok(n) => n };
                if tripped.is_none() {
                    seen.extend_from_slice(&up[..n]);
                    tripped = armed.lock().unwrap_or_else(PoisonError::into_inner).trip(&seen, n);
                    let keep = seen.len().min(256);
                    seen.drain(..seen.len() - keep);
                }
                if tripped == Some(Loss::Request) {
                    continue;
                }
                if sw.write_all(&up[..n]).await.is_err() {
                    return;
                }
            }
            n = sr.read(&mut down) => {
                let n = match n { Ok(0) | Err(_) => return, Ok(n) => n };
                if tripped.is_some() {
                    continue;
                }
                if cw.write_all(&down[..n]).await.is_err() {
                    return;
                }
            }
            r = heal.changed(), if tripped.is_some() => {
                let _ = r;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marker_trips_once_even_split_between_reads() {
        let mut a = Armed {
            loss: Some(Loss::Answer),
            marker: b"/subnets/10.5.1.0-24".to_vec(),
            trips: 0,
        };
        assert_eq!(a.trip(b"grant ttl 60", 12), None);
        let split = b"txn put /subnets/10.5.1.0-24 value";
        assert_eq!(
            a.trip(split, 20),
            Some(Loss::Answer),
            "the marker's end is in the new chunk"
        );
        assert_eq!(a.trip(split, 34), None, "one trip per arming");
        assert_eq!(a.trips, 1);
        a.loss = Some(Loss::Request);
        assert_eq!(a.trip(split, 5), None, "a marker read before arming does not trip");
    }
}
