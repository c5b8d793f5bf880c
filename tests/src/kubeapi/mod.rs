//! A stand-in Kubernetes API server: exactly the subset Weft uses, over HTTPS with a bearer
//! token. No real API server can be installed on these machines (Debian 12 ships only
//! kubectl, and there is no image registry for kind or k3s), so the tests run Weft against
//! this, and `tests/kube.rs` drives it with the real `kubectl` to show its answers are ones a
//! Kubernetes client accepts.
//!
//! Served: discovery (`/api`, `/apis`, each group version), Nodes and
//! CustomResourceDefinitions, and the custom resources the CRDs define; get, list (also as a
//! `Table`, with a CRD's printer columns), watch (from a resourceVersion, bookmarks, 410 Gone
//! for a version no longer kept, timeoutSeconds), create, replace, delete, and merge and
//! strategic-merge PATCH of objects and their `/status`.

pub mod db;
pub mod table;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::sync::broadcast;

use self::db::{Db, Event, Failure};

/// The server's state.
pub struct Server {
    db: Mutex<Db>,
    events: broadcast::Sender<Event>,
    token: String,
    /// How often a watch that asked for bookmarks gets one.
    pub bookmark_every: Duration,
}

impl Server {
    /// A server over `db` that accepts `token`.
    pub fn new(db: Db, token: String) -> Arc<Server> {
        Arc::new(Server {
            db: Mutex::new(db),
            events: broadcast::channel(4096).0,
            token,
            bookmark_every: Duration::from_secs(1),
        })
    }

    /// Saves the objects if they changed (see [`Db::save`]).
    pub fn save(&self) {
        self.db().save();
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Db> {
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The router: one handler that reads the path as the API server lays it out.
    pub fn router(self: &Arc<Self>) -> axum::Router {
        let s = self.clone();
        axum::Router::new().fallback(move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
            let s = s.clone();
            async move { s.handle(method, uri, headers, body).await }
        })
    }

    async fn handle(self: Arc<Self>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
        let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
        if auth != Some(&format!("Bearer {}", self.token)) {
            return failure(Failure(401, "Unauthorized", "Unauthorized".into()));
        }
        let path: Vec<&str> = uri
            .path()
            .trim_matches('/')
            .split('/')
            .filter(|s| !s.is_empty())
            .collect();
        let query = Query::parse(uri.query().unwrap_or(""));
        let table = headers
            .get("accept")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("as=Table"));
        match self.discovery(&path) {
            Some(v) if method == Method::GET => return json_response(200, v),
            _ => {}
        }
        let Some(target) = self.target(&path) else {
            return failure(Failure(
                404,
                "NotFound",
                format!("the server could not find the requested resource ({})", uri.path()),
            ));
        };
        let ua = headers
            .get("user-agent")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_string();
        let line = format!("{method} {uri}");
        let req = Request {
            method,
            target,
            query,
            table,
            headers,
            body,
        };
        let r = match self.resource(req).await {
            Ok(r) => r,
            Err(f) => failure(f),
        };
        // The request log tests read: which lists and watches each client made.
        eprintln!("{line} {} ua={ua}", r.status().as_u16());
        r
    }

    fn discovery(&self, path: &[&str]) -> Option<Value> {
        let db = self.db();
        let kinds: Vec<&db::Kind> = db.kinds.values().collect();
        let resources = |group: &str, version: &str| {
            let mut list = Vec::new();
            for k in kinds.iter().filter(|k| k.group == group && k.version == version) {
                let verbs = ["create", "delete", "get", "list", "patch", "update", "watch"];
                list.push(json!({"name": k.plural, "singularName": k.kind.to_lowercase(), "namespaced": false, "kind": k.kind, "verbs": verbs, "shortNames": k.short_names}));
                list.push(json!({"name": format!("{}/status", k.plural), "singularName": "", "namespaced": false, "kind": k.kind, "verbs": ["get", "patch", "update"]}));
            }
            let gv = if group.is_empty() {
                version.to_string()
            } else {
                format!("{group}/{version}")
            };
            json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": list})
        };
        Some(match path {
            ["version"] => {
                json!({"major": "1", "minor": "32", "gitVersion": "v1.32.0-weft-standin", "platform": "linux/amd64"})
            }
            ["api"] => {
                json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}]})
            }
            ["api", "v1"] => resources("", "v1"),
            ["apis"] => {
                let mut groups: Vec<Value> = Vec::new();
                for k in kinds.iter().filter(|k| !k.group.is_empty()) {
                    let gv = json!({"groupVersion": k.api_version(), "version": k.version});
                    groups.push(json!({"name": k.group, "versions": [gv.clone()], "preferredVersion": gv}));
                }
                groups.dedup_by(|a, b| a["name"] == b["name"]);
                json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
            }
            ["apis", g, v] if kinds.iter().any(|k| k.group == *g && k.version == *v) => resources(g, v),
            ["openapi", "v3"] => {
                let mut paths = serde_json::Map::new();
                for k in &kinds {
                    let gv = if k.group.is_empty() {
                        "api/v1".to_string()
                    } else {
                        format!("apis/{}", k.api_version())
                    };
                    paths.insert(
                        gv.clone(),
                        json!({"serverRelativeURL": format!("/openapi/v3/{gv}?hash=standin")}),
                    );
                }
                json!({"paths": paths})
            }
            ["openapi", "v3", "api", "v1"] => openapi_doc(kinds.iter().filter(|k| k.group.is_empty())),
            ["openapi", "v3", "apis", g, v] => openapi_doc(kinds.iter().filter(|k| k.group == *g && k.version == *v)),
            _ => return None,
        })
    }

    fn target(&self, path: &[&str]) -> Option<Target> {
        let (group, version, rest) = match path {
            ["api", v, rest @ ..] => ("", *v, rest),
            ["apis", g, v, rest @ ..] => (*g, *v, rest),
            _ => return None,
        };
        let (plural, name, status) = match rest {
            [p] => (*p, None, false),
            [p, n] => (*p, Some(n.to_string()), false),
            [p, n, "status"] => (*p, Some(n.to_string()), true),
            _ => return None,
        };
        let kind = self.db().kinds.get(plural).cloned()?;
        (kind.group == group && kind.version == version).then_some(Target { kind, name, status })
    }

    async fn resource(self: &Arc<Self>, r: Request) -> Result<Response, Failure> {
        let plural = r.target.kind.plural.clone();
        match (&r.method, &r.target.name) {
            (&Method::GET, None) if r.query.watch => Ok(self.watch(&r)),
            (&Method::GET, None) => {
                let db = self.db();
                let items = db.list(&plural);
                let rv = db.rv.to_string();
                Ok(json_response(
                    200,
                    if r.table {
                        table::of(&r.target.kind, &items, &rv)
                    } else {
                        json!({"kind": format!("{}List", r.target.kind.kind), "apiVersion": r.target.kind.api_version(), "metadata": {"resourceVersion": rv}, "items": items})
                    },
                ))
            }
            (&Method::GET, Some(name)) => {
                let db = self.db();
                let o = db.get(&plural, name)?;
                Ok(json_response(
                    200,
                    if r.table {
                        table::of(&r.target.kind, &[o], &db.rv.to_string())
                    } else {
                        o
                    },
                ))
            }
            (&Method::POST, None) => {
                let o = parse(&r.body)?;
                let mut db = self.db();
                let (o, e) = db.create(&plural, o)?;
                // Sent under the lock: watchers see changes in revision order.
                let _ = self.events.send(e);
                Ok(json_response(201, o))
            }
            (&Method::PUT, Some(name)) => {
                let o = parse(&r.body)?;
                self.write(&mut self.db(), &plural, name, o, r.target.status)
            }
            (&Method::PATCH, Some(name)) => self.patch(&r, name),
            (&Method::DELETE, Some(name)) => {
                let mut db = self.db();
                let (o, e) = db.delete(&plural, name)?;
                let _ = self.events.send(e);
                Ok(json_response(200, o))
            }
            _ => Err(Failure(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource".into(),
            )),
        }
    }

    /// A merge or strategic-merge patch, read, merged and written under one lock so
    /// concurrent patches never lose each other.
    fn patch(&self, r: &Request, name: &str) -> Result<Response, Failure> {
        let plural = &r.target.kind.plural;
        let patch = parse(&r.body)?;
        let kind = r
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let strategic = match kind.split(';').next().unwrap_or("") {
            "application/merge-patch+json" => false,
            "application/strategic-merge-patch+json" => true,
            other => return Err(Failure(415, "UnsupportedMediaType", format!("the body of the request was in an unknown format - accepted media types include: application/merge-patch+json, application/strategic-merge-patch+json (got {other})"))),
        };
        let mut db = self.db();
        let mut o = db.get(plural, name)?;
        db::merge(&mut o, &patch, strategic);
        // A patch applies to the latest version, whatever the body says.
        if let Some(m) = o.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("resourceVersion");
        }
        self.write(&mut db, plural, name, o, r.target.status)
    }

    fn write(&self, db: &mut Db, plural: &str, name: &str, o: Value, status: bool) -> Result<Response, Failure> {
        let (o, e) = db.update(plural, name, o, status)?;
        if let Some(e) = e {
            let _ = self.events.send(e);
        }
        Ok(json_response(200, o))
    }

    /// What a watch from `version` starts with: the kept changes after it (410 when they are
    /// no longer kept), or with no version every object as ADDED, as the API server does; and
    /// the version it then continues from.
    fn backlog(&self, kind: &db::Kind, version: Option<u64>) -> Result<(Vec<Event>, u64), Failure> {
        let db = self.db();
        let Some(from) = version else {
            let all = db.list(&kind.plural).into_iter();
            let added = all.map(|o| Event {
                rv: db.rv,
                plural: kind.plural.clone(),
                kind: "ADDED",
                object: o,
            });
            return Ok((added.collect(), db.rv));
        };
        db.since(&kind.plural, from).map(|evs| (evs, from))
    }

    /// A watch: the kept changes after the asked version, then live ones, bookmarks if asked,
    /// until timeoutSeconds or the client leaves.
    fn watch(self: &Arc<Self>, r: &Request) -> Response {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(256);
        let live = self.events.subscribe();
        let kind = r.target.kind.clone();
        let (table, bookmarks) = (r.table, r.query.bookmarks);
        let timeout = Duration::from_secs(r.query.timeout.unwrap_or(1800));
        let backlog = self.backlog(&kind, r.query.version);
        let w = Watch {
            kind,
            table,
            bookmarks,
            timeout,
            every: self.bookmark_every,
        };
        tokio::spawn(w.run(self.clone(), backlog, live, tx));
        let stream =
            futures::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|o| o.map(Ok::<_, std::convert::Infallible>)));
        Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(Body::from_stream(stream))
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
    }
}

/// One watch's stream: what it follows and how it is shown.
struct Watch {
    kind: db::Kind,
    table: bool,
    bookmarks: bool,
    timeout: Duration,
    every: Duration,
}

impl Watch {
    async fn run(
        self,
        server: Arc<Server>,
        backlog: Result<(Vec<Event>, u64), Failure>,
        mut live: broadcast::Receiver<Event>,
        tx: tokio::sync::mpsc::Sender<Bytes>,
    ) {
        let line = |t: &str, o: Value| {
            let o = if self.table && t != "ERROR" && t != "BOOKMARK" {
                table::of(&self.kind, &[o], "")
            } else {
                o
            };
            Bytes::from(format!("{}\n", json!({"type": t, "object": o})))
        };
        let (backlog, mut last) = match backlog {
            Ok(b) => b,
            Err(f) => {
                eprintln!("watch of {} answered {} {}", self.kind.plural, f.0, f.2);
                let _ = tx.send(line("ERROR", status_json(&f))).await;
                return;
            }
        };
        for e in backlog {
            last = last.max(e.rv);
            if tx.send(line(e.kind, e.object)).await.is_err() {
                return;
            }
        }
        let end = tokio::time::Instant::now() + self.timeout;
        let mut tick = tokio::time::interval(self.every);
        loop {
            let msg = tokio::select! {
                e = live.recv() => match e {
                    Ok(e) if e.plural == self.kind.plural && e.rv > last => { last = e.rv; line(e.kind, e.object) }
                    Ok(_) => continue,
                    // Too slow to keep up: end the watch, as the API server does.
                    Err(_) => return,
                },
                _ = tick.tick(), if self.bookmarks => {
                    // The server's version only when nothing is queued for this watch: a
                    // bookmark must never claim a change it has not delivered.
                    let rv = {
                        let db = server.db();
                        if live.is_empty() { db.rv.max(last) } else { last }
                    };
                    line("BOOKMARK", json!({"kind": self.kind.kind, "apiVersion": self.kind.api_version(), "metadata": {"resourceVersion": rv.to_string()}}))
                }
                () = tokio::time::sleep_until(end) => return,
                () = tx.closed() => return,
            };
            if tx.send(msg).await.is_err() {
                return;
            }
        }
    }
}

struct Target {
    kind: db::Kind,
    name: Option<String>,
    status: bool,
}

struct Request {
    method: Method,
    target: Target,
    query: Query,
    table: bool,
    headers: HeaderMap,
    body: Bytes,
}

#[derive(Default)]
struct Query {
    watch: bool,
    version: Option<u64>,
    bookmarks: bool,
    timeout: Option<u64>,
}

impl Query {
    fn parse(q: &str) -> Query {
        let mut out = Query::default();
        for (k, v) in q.split('&').filter_map(|kv| kv.split_once('=')) {
            match k {
                "watch" => out.watch = v == "true" || v == "1",
                "resourceVersion" if !v.is_empty() && v != "0" => out.version = v.parse().ok(),
                "allowWatchBookmarks" => out.bookmarks = v == "true",
                "timeoutSeconds" => out.timeout = v.parse().ok(),
                _ => {}
            }
        }
        out
    }
}

/// An OpenAPI v3 document for one group version that says only what kubectl looks for before
/// it sends a write: each kind's PATCH takes the `fieldValidation` parameter, so kubectl
/// leaves validation to the server instead of downloading schemas to validate itself.
fn openapi_doc<'a>(kinds: impl Iterator<Item = &'a &'a db::Kind>) -> Value {
    let mut paths = serde_json::Map::new();
    for k in kinds {
        let prefix = if k.group.is_empty() {
            "/api/v1".to_string()
        } else {
            format!("/apis/{}", k.api_version())
        };
        let gvk = json!({"group": k.group, "version": k.version, "kind": k.kind});
        paths.insert(
            format!("{prefix}/{}/{{name}}", k.plural),
            json!({
                "patch": {
                    "x-kubernetes-group-version-kind": gvk,
                    "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}}],
                    "responses": {"200": {"description": "OK"}},
                },
            }),
        );
    }
    json!({"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.32.0"}, "paths": paths, "components": {"schemas": {}}})
}

fn parse(body: &[u8]) -> Result<Value, Failure> {
    serde_json::from_slice(body).map_err(|e| Failure(400, "BadRequest", format!("the request body is not JSON: {e}")))
}

fn status_json(f: &Failure) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": f.2, "reason": f.1, "code": f.0})
}

fn failure(f: Failure) -> Response {
    json_response(f.0, status_json(&f))
}

fn json_response(code: u16, v: Value) -> Response {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(v.to_string()))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}
