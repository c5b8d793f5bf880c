//! A client of an etcd cluster that behaves as `etcdctl` does on it: every member given is a
//! candidate, a request that fails on one member is retried on the next, and the member that
//! last answered is tried first. Every request carries etcd's `hasleader` metadata, so a member
//! that has lost its cluster's leader (a partition, lost quorum) refuses at once rather than
//! serving stale reads or holding a watch that will never see another event; the request then
//! moves on to a member that still has one.
//!
//! gRPC framing comes from `tonic`, message encoding from `prost` ([`super::proto`]); this file
//! only decides which member a request goes to.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::uri::PathAndQuery;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status, Streaming};
use tonic_prost::ProstCodec;

use super::proto::{path, WatchCreateRequest, WatchRequest, WatchRequestUnion, WatchResponse};

/// How to reach the cluster.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Client URLs of the members.
    pub endpoints: Vec<String>,
    /// PEM CA bundle that verifies the members' certificates.
    pub ca_pem: Option<Vec<u8>>,
    /// PEM client certificate and key, for mutual TLS.
    pub identity_pem: Option<(Vec<u8>, Vec<u8>)>,
}

/// Why a request found no member to answer it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EtcdError {
    /// The options cannot make a client.
    #[error("{0}")]
    Config(String),
    /// No member answered; one reason per member tried.
    #[error("{0}")]
    Unavailable(String),
    /// A member answered with a refusal another member would repeat (bad request, compacted
    /// revision, missing lease, permission).
    #[error("etcd refused the request: {message}")]
    Refused {
        /// The gRPC status code.
        code: Code,
        /// etcd's message, e.g. `etcdserver: mvcc: required revision has been compacted`.
        message: String,
    },
}

impl EtcdError {
    /// Whether etcd refused because the revision asked for was compacted away.
    pub fn is_compacted(&self) -> bool {
        matches!(self, EtcdError::Refused { message, .. } if message.contains("compacted"))
    }
}

/// Time to open a connection to one member.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Time one member gets to answer one request before the next member is asked.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest response accepted (a page of leases is far smaller; etcd's own default is 2 GiB).
const MAX_RESPONSE: usize = 64 << 20;

struct Member {
    url: String,
    channel: Channel,
}

/// The members of one etcd cluster.
#[derive(Clone)]
pub struct Cluster {
    members: Arc<[Member]>,
    preferred: Arc<AtomicUsize>,
}

/// Status codes after which another member may well succeed. Everything else (invalid
/// argument, compaction, a missing lease, permissions) is the cluster's answer, not one
/// member's trouble.
fn retryable(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Unknown
            | Code::Cancelled
            | Code::Aborted
            | Code::Internal
            | Code::ResourceExhausted
    )
}

fn tls(opts: &ClusterOptions) -> Option<ClientTlsConfig> {
    if opts.ca_pem.is_none() && opts.identity_pem.is_none() {
        return None;
    }
    let mut t = ClientTlsConfig::new();
    if let Some(ca) = &opts.ca_pem {
        t = t.ca_certificate(Certificate::from_pem(ca));
    }
    if let Some((cert, key)) = &opts.identity_pem {
        t = t.identity(Identity::from_pem(cert, key));
    }
    Some(t)
}

fn endpoint(url: &str, tls: Option<&ClientTlsConfig>) -> Result<Endpoint, EtcdError> {
    let bad = |e: &dyn std::fmt::Display| EtcdError::Config(format!("etcd endpoint {url:?}: {e}"));
    let mut e = Endpoint::from_shared(url.to_string())
        .map_err(|e| bad(&e))?
        .connect_timeout(CONNECT_TIMEOUT)
        // Keep-alives notice a member that died without closing the connection, even on an
        // otherwise silent watch.
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    if let Some(t) = tls {
        e = e.tls_config(t.clone()).map_err(|e| bad(&e))?;
    }
    Ok(e)
}

fn with_leader<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("hasleader", tonic::metadata::MetadataValue::from_static("true"));
    r
}

fn describe(s: &Status) -> String {
    let m = s.message();
    if m.is_empty() {
        format!("{:?}", s.code())
    } else {
        m.to_string()
    }
}

impl Cluster {
    /// A client of the members at `opts.endpoints`. No connection is opened here.
    pub fn new(opts: &ClusterOptions) -> Result<Self, EtcdError> {
        let urls: Vec<&str> = opts
            .endpoints
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .collect();
        if urls.is_empty() {
            return Err(EtcdError::Config("no etcd endpoint given".into()));
        }
        let tls = tls(opts);
        let members = urls
            .iter()
            .map(|u| {
                Ok(Member {
                    url: u.to_string(),
                    channel: endpoint(u, tls.as_ref())?.connect_lazy(),
                })
            })
            .collect::<Result<Vec<_>, EtcdError>>()?;
        Ok(Cluster {
            members: members.into(),
            preferred: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// The members' URLs, comma separated.
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| m.url.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Member indexes in the order to try them: the one that last answered first.
    fn order(&self) -> impl Iterator<Item = usize> {
        let n = self.members.len();
        let start = self.preferred.load(Ordering::Relaxed) % n;
        (0..n).map(move |i| (start + i) % n)
    }

    fn answered(&self, k: usize, tried: usize) {
        if tried > 0 {
            tracing::info!(member = %self.members[k].url, "etcd requests moved to another member");
        }
        self.preferred.store(k, Ordering::Relaxed);
    }

    /// One unary call, on the first member that answers it.
    pub async fn unary<Q, R>(&self, method: &'static str, req: Q) -> Result<R, EtcdError>
    where
        Q: prost::Message + Clone + Send + Sync + 'static,
        R: prost::Message + Default + Send + Sync + 'static,
    {
        let mut why = Vec::new();
        for (tried, k) in self.order().enumerate() {
            let m = &self.members[k];
            let mut grpc = tonic::client::Grpc::new(m.channel.clone()).max_decoding_message_size(MAX_RESPONSE);
            let call = async {
                grpc.ready()
                    .await
                    .map_err(|e| Status::unavailable(format!("not ready: {e}")))?;
                grpc.unary(
                    with_leader(req.clone()),
                    PathAndQuery::from_static(method),
                    ProstCodec::<Q, R>::default(),
                )
                .await
            };
            match tokio::time::timeout(REQUEST_TIMEOUT, call).await {
                Ok(Ok(r)) => {
                    self.answered(k, tried);
                    return Ok(r.into_inner());
                }
                Ok(Err(s)) if !retryable(&s) => {
                    return Err(EtcdError::Refused {
                        code: s.code(),
                        message: s.message().to_string(),
                    })
                }
                Ok(Err(s)) => why.push(format!("{}: {}", m.url, describe(&s))),
                Err(_) => why.push(format!("{}: no answer within {:?}", m.url, REQUEST_TIMEOUT)),
            }
        }
        Err(EtcdError::Unavailable(why.join("; ")))
    }

    /// Opens a watch on the first member that accepts it, and returns the stream after the
    /// member confirmed its creation, with that member's URL. `hasleader` makes the member end
    /// the stream if it loses its leader, so a watch never goes silently stale.
    pub async fn watch(&self, create: WatchCreateRequest) -> Result<(Streaming<WatchResponse>, String), EtcdError> {
        let mut why = Vec::new();
        for (tried, k) in self.order().enumerate() {
            let m = &self.members[k];
            let req = WatchRequest {
                request_union: Some(WatchRequestUnion::Create(create.clone())),
            };
            // The request side stays open for the life of the watch: etcd reads it for more
            // requests, and a closed side ends some servers' streams.
            let requests = futures::StreamExt::chain(futures::stream::iter([req]), futures::stream::pending());
            let mut grpc = tonic::client::Grpc::new(m.channel.clone()).max_decoding_message_size(MAX_RESPONSE);
            let open = async {
                grpc.ready()
                    .await
                    .map_err(|e| Status::unavailable(format!("not ready: {e}")))?;
                let mut s = grpc
                    .streaming(
                        with_leader(requests),
                        PathAndQuery::from_static(path::WATCH),
                        ProstCodec::<WatchRequest, WatchResponse>::default(),
                    )
                    .await?
                    .into_inner();
                match s.message().await? {
                    Some(first) if first.created && !first.canceled => Ok((s, first)),
                    Some(first) => Err(Status::unavailable(format!(
                        "watch not created: {}",
                        first.cancel_reason
                    ))),
                    None => Err(Status::unavailable("watch stream closed at once")),
                }
            };
            match tokio::time::timeout(REQUEST_TIMEOUT, open).await {
                Ok(Ok((s, first))) => {
                    if first.compact_revision > 0 {
                        return Err(EtcdError::Refused {
                            code: Code::OutOfRange,
                            message: format!("watch revision compacted at {}", first.compact_revision),
                        });
                    }
                    self.answered(k, tried);
                    return Ok((s, m.url.clone()));
                }
                Ok(Err(s)) if !retryable(&s) => {
                    return Err(EtcdError::Refused {
                        code: s.code(),
                        message: s.message().to_string(),
                    })
                }
                Ok(Err(s)) => why.push(format!("{}: {}", m.url, describe(&s))),
                Err(_) => why.push(format!("{}: no answer within {:?}", m.url, REQUEST_TIMEOUT)),
            }
        }
        Err(EtcdError::Unavailable(why.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn members_are_tried_from_the_last_that_answered() {
        let c = Cluster::new(&ClusterOptions {
            endpoints: vec![
                "http://127.0.0.1:1".into(),
                " http://127.0.0.1:2 ".into(),
                "".into(),
                "http://127.0.0.1:3".into(),
            ],
            ..Default::default()
        });
        let c = c.unwrap();
        assert_eq!(
            c.endpoints(),
            "http://127.0.0.1:1,http://127.0.0.1:2,http://127.0.0.1:3"
        );
        assert_eq!(c.order().collect::<Vec<_>>(), vec![0, 1, 2]);
        c.answered(2, 1);
        assert_eq!(c.order().collect::<Vec<_>>(), vec![2, 0, 1]);
    }

    #[tokio::test]
    async fn no_endpoint_or_a_bad_one_is_a_config_error() {
        assert!(matches!(
            Cluster::new(&ClusterOptions::default()),
            Err(EtcdError::Config(_))
        ));
        let bad = Cluster::new(&ClusterOptions {
            endpoints: vec!["not a url".into()],
            ..Default::default()
        });
        assert!(matches!(bad, Err(EtcdError::Config(_))));
    }

    #[test]
    fn only_member_trouble_is_retried() {
        assert!(retryable(&Status::unavailable("etcdserver: no leader")));
        assert!(retryable(&Status::deadline_exceeded("timeout")));
        assert!(!retryable(&Status::out_of_range(
            "mvcc: required revision has been compacted"
        )));
        assert!(!retryable(&Status::not_found("etcdserver: requested lease not found")));
        assert!(!retryable(&Status::invalid_argument("etcdserver: key is not provided")));
        let e = EtcdError::Refused {
            code: Code::OutOfRange,
            message: "etcdserver: mvcc: required revision has been compacted".into(),
        };
        assert!(e.is_compacted());
    }
}
