//! Following one kind of Kubernetes object as an informer does: list, then watch from the
//! list's resourceVersion with bookmarks (so a quiet watch still advances), resume a broken
//! watch from the last version seen, and list again only on 410 Gone (the version was
//! compacted away). Errors back off exponentially. Each change is handed on one object at a
//! time, so what a change costs does not grow with the number of objects; only a re-list
//! hands on the whole set.

use std::fmt::Debug;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use serde::de::DeserializeOwned;

/// What the informer saw.
#[derive(Debug)]
pub enum Change<K> {
    /// A full listing: exactly these objects exist.
    Listed(Vec<K>),
    /// An object was created or changed.
    Applied(K),
    /// An object was deleted (its last state).
    Deleted(K),
    /// The watch is established (after a listing or a resumed watch).
    Connected,
    /// The API server could not be read; the last known objects stand.
    Disconnected(String),
}

/// How long one watch request runs before it is renewed (the API server's own limit is
/// randomised between 30 and 60 minutes; shorter keeps a half-dead connection short-lived).
const WATCH_TIMEOUT_SECS: u32 = 290;
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// An error with its causes: kube's own text for a refused connection is only "client error
/// (Connect)", the reason is further down the chain.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let next = c.to_string();
        if !s.contains(&next) {
            s.push_str(": ");
            s.push_str(&next);
        }
        cause = c.source();
    }
    s
}

/// Follows every object of `api` forever, calling `on` in order; `what` names them in errors
/// (`nodes at https://...`).
pub async fn run<K, F>(api: Api<K>, what: String, mut on: F)
where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    F: FnMut(Change<K>) + Send,
{
    let mut backoff = BACKOFF_MIN;
    loop {
        let version = match api.list(&ListParams::default()).await {
            Ok(list) => {
                on(Change::Listed(list.items));
                list.metadata.resource_version.unwrap_or_default()
            }
            Err(e) => {
                on(Change::Disconnected(format!("cannot list {what}: {}", chain(&e))));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        backoff = BACKOFF_MIN;
        watch_from(&api, &what, version, &mut on).await;
    }
}

/// How one watch request ended.
enum End {
    /// Renew it from this version.
    Resume(String),
    /// The version is gone: list again.
    Relist,
}

/// Watches from `version` until it is compacted away, resuming after every break.
async fn watch_from<K, F>(api: &Api<K>, what: &str, mut version: String, on: &mut F)
where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    F: FnMut(Change<K>) + Send,
{
    let mut backoff = BACKOFF_MIN;
    loop {
        let params = WatchParams::default().timeout(WATCH_TIMEOUT_SECS);
        let stream = match api.watch(&params, &version).await {
            Ok(s) => s,
            Err(kube::Error::Api(e)) if e.code == 410 => return,
            Err(e) => {
                on(Change::Disconnected(format!("cannot watch {what}: {}", chain(&e))));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        on(Change::Connected);
        match drain(stream.boxed(), &mut version, on).await {
            Ok(End::Resume(v)) => {
                version = v;
                backoff = BACKOFF_MIN;
            }
            Ok(End::Relist) => return,
            Err(e) => {
                on(Change::Disconnected(format!(
                    "the watch of {what} broke: {}",
                    chain(&e)
                )));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

async fn drain<K, F>(
    mut stream: futures::stream::BoxStream<'_, kube::Result<WatchEvent<K>>>,
    version: &mut String,
    on: &mut F,
) -> kube::Result<End>
where
    K: kube::Resource + Clone + Debug,
    F: FnMut(Change<K>),
{
    let seen = |k: &K, version: &mut String| {
        if let Some(v) = k.meta().resource_version.clone() {
            *version = v;
        }
    };
    while let Some(event) = stream.try_next().await? {
        match event {
            WatchEvent::Added(k) | WatchEvent::Modified(k) => {
                seen(&k, version);
                on(Change::Applied(k));
            }
            WatchEvent::Deleted(k) => {
                seen(&k, version);
                on(Change::Deleted(k));
            }
            WatchEvent::Bookmark(b) => *version = b.metadata.resource_version,
            WatchEvent::Error(e) if e.code == 410 => {
                tracing::debug!(message = %e.message, "watch version expired; listing again");
                return Ok(End::Relist);
            }
            WatchEvent::Error(e) => return Err(kube::Error::Api(e)),
        }
    }
    Ok(End::Resume(version.clone()))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Node;

    use super::*;

    /// Watch events as the API server sends them (JSON lines), decoded as kube decodes them.
    fn events(lines: &[&str]) -> futures::stream::BoxStream<'static, kube::Result<WatchEvent<Node>>> {
        let decoded: Vec<kube::Result<WatchEvent<Node>>> = lines
            .iter()
            .map(|l| Ok(serde_json::from_str(l).expect("a watch event")))
            .collect();
        futures::stream::iter(decoded).boxed()
    }

    fn run_drain(lines: &[&str]) -> (kube::Result<End>, String, Vec<String>) {
        let mut version = "10".to_string();
        let mut seen = Vec::new();
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("rt");
        let end = rt.block_on(drain(events(lines), &mut version, &mut |c: Change<Node>| {
            seen.push(match c {
                Change::Applied(n) => format!("applied {}", n.metadata.name.unwrap_or_default()),
                Change::Deleted(n) => format!("deleted {}", n.metadata.name.unwrap_or_default()),
                other => format!("{other:?}"),
            })
        }));
        (end, version, seen)
    }

    #[test]
    fn bookmarks_and_changes_advance_the_version_and_a_clean_end_resumes_from_it() {
        let (end, version, seen) = run_drain(&[
            r#"{"type":"ADDED","object":{"metadata":{"name":"a","resourceVersion":"11"}}}"#,
            r#"{"type":"BOOKMARK","object":{"kind":"Node","apiVersion":"v1","metadata":{"resourceVersion":"40"}}}"#,
            r#"{"type":"DELETED","object":{"metadata":{"name":"a","resourceVersion":"41"}}}"#,
            r#"{"type":"BOOKMARK","object":{"kind":"Node","apiVersion":"v1","metadata":{"resourceVersion":"57"}}}"#,
        ]);
        assert_eq!(seen, ["applied a", "deleted a"]);
        assert_eq!(version, "57", "a quiet watch still moves on: no 410 when it reconnects");
        assert!(matches!(end, Ok(End::Resume(v)) if v == "57"));
    }

    #[test]
    fn gone_means_list_again_and_other_errors_break_the_watch() {
        let (end, version, _) = run_drain(&[
            r#"{"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","status":"Failure","message":"too old resource version: 10 (30)","reason":"Expired","code":410}}"#,
        ]);
        assert!(matches!(end, Ok(End::Relist)));
        assert_eq!(version, "10");
        let (end, _, _) = run_drain(&[
            r#"{"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","status":"Failure","message":"internal error","reason":"InternalError","code":500}}"#,
        ]);
        assert!(matches!(end, Err(kube::Error::Api(e)) if e.code == 500));
    }
}
