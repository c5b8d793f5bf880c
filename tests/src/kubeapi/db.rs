//! The stand-in API server's objects: one revision counter for everything (as etcd's), a
//! history of changes for watches, the status-subresource rule (a write to `/status` keeps
//! the spec, a write to the object keeps the status), generations that move with the spec,
//! and the patch flavours Weft and kubectl send. Saved to a file after each write, so a
//! restarted server keeps its objects, as an API server restarted over the same etcd does.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;

use serde_json::{json, Map, Value};

/// Most changes kept for watches; a watch from before them gets 410 Gone.
const HISTORY: usize = 10_000;

/// A resource the server serves.
#[derive(Debug, Clone)]
pub struct Kind {
    pub group: String,
    pub version: String,
    pub kind: String,
    pub plural: String,
    /// What `kubectl get` also accepts (`no`, `crd`, a CRD's `shortNames`).
    pub short_names: Vec<String>,
    /// `additionalPrinterColumns` of a custom resource.
    pub columns: Vec<Column>,
}

impl Kind {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

/// A printer column: what `kubectl get` shows of an object.
#[derive(Debug, Clone)]
pub struct Column {
    pub name: String,
    /// OpenAPI type: `date` cells are shown as an age.
    pub kind: String,
    pub json_path: String,
    /// 0 always shown, higher only with `-o wide`.
    pub priority: i64,
}

/// A change, as a watch reports it.
#[derive(Debug, Clone)]
pub struct Event {
    pub rv: u64,
    pub plural: String,
    pub kind: &'static str,
    pub object: Value,
}

/// An answer that is not a success: HTTP code, reason and message.
#[derive(Debug)]
pub struct Failure(pub u16, pub &'static str, pub String);

pub struct Db {
    pub rv: u64,
    /// Watches from before this revision are answered 410.
    pub oldest: u64,
    pub objects: BTreeMap<(String, String), Value>,
    pub history: VecDeque<Event>,
    pub kinds: BTreeMap<String, Kind>,
    file: Option<PathBuf>,
    uid: u64,
    dirty: bool,
}

fn builtin() -> BTreeMap<String, Kind> {
    let mut k = BTreeMap::new();
    for (group, version, kind, plural, short) in [
        ("", "v1", "Node", "nodes", &["no"][..]),
        (
            "apiextensions.k8s.io",
            "v1",
            "CustomResourceDefinition",
            "customresourcedefinitions",
            &["crd", "crds"][..],
        ),
    ] {
        k.insert(
            plural.to_string(),
            Kind {
                group: group.into(),
                version: version.into(),
                kind: kind.into(),
                plural: plural.into(),
                short_names: short.iter().map(|s| s.to_string()).collect(),
                columns: Vec::new(),
            },
        );
    }
    k
}

/// RFC 7386 merge, with lists of objects merged by key where the strategic merge of
/// Kubernetes does (`conditions` and `addresses` by `type`, `taints` by `key`).
pub fn merge(target: &mut Value, patch: &Value, strategic: bool) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Some(t) = target.as_object_mut() else { return };
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
            continue;
        }
        let key = match k.as_str() {
            "conditions" | "addresses" => Some("type"),
            "taints" => Some("key"),
            _ => None,
        };
        match (strategic, key, v, t.get_mut(k)) {
            (true, Some(key), Value::Array(items), Some(Value::Array(have))) => {
                for item in items {
                    match have.iter_mut().find(|h| h[key] == item[key]) {
                        Some(h) => merge(h, item, true),
                        None => have.push(item.clone()),
                    }
                }
            }
            (_, _, _, Some(existing)) if v.is_object() => merge(existing, v, strategic),
            _ => {
                t.insert(k.clone(), v.clone());
            }
        }
    }
}

impl Db {
    /// A server's objects: loaded from `file` when it exists. `compact` starts the history
    /// after a revision bump, so every watch from before the restart is answered 410 Gone.
    pub fn open(file: Option<PathBuf>, compact: bool) -> Db {
        let mut db = Db {
            rv: 1,
            oldest: 1,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            kinds: builtin(),
            file,
            uid: 0,
            dirty: false,
        };
        let saved = db.file.as_ref().and_then(|f| std::fs::read(f).ok());
        if let Some(v) = saved.and_then(|b| serde_json::from_slice::<Value>(&b).ok()) {
            db.rv = v["rv"].as_u64().unwrap_or(1);
            db.uid = v["uid"].as_u64().unwrap_or(0);
            for o in v["objects"].as_array().into_iter().flatten() {
                let plural = o["plural"].as_str().unwrap_or_default().to_string();
                let name = o["object"]["metadata"]["name"].as_str().unwrap_or_default().to_string();
                db.objects.insert((plural, name), o["object"].clone());
            }
            let crds: Vec<Value> = db.list("customresourcedefinitions");
            for crd in crds {
                db.register(&crd);
            }
        }
        if compact {
            db.rv += 1;
        }
        db.oldest = db.rv + 1;
        db
    }

    /// Writes the objects to the file if anything changed since the last save. Called on a
    /// timer and at shutdown, not per write: a write must cost the same at 5,000 objects as at 5.
    pub fn save(&mut self) {
        if !std::mem::take(&mut self.dirty) {
            return;
        }
        let Some(f) = &self.file else { return };
        let objects: Vec<Value> = self
            .objects
            .iter()
            .map(|((plural, _), o)| json!({ "plural": plural, "object": o }))
            .collect();
        let v = json!({ "rv": self.rv, "uid": self.uid, "objects": objects });
        let tmp = f.with_extension("tmp");
        if std::fs::write(&tmp, v.to_string()).is_ok() {
            let _ = std::fs::rename(&tmp, f);
        }
    }

    /// Serves the custom resource a CRD defines (its first served version).
    fn register(&mut self, crd: &Value) {
        let spec = &crd["spec"];
        let Some(version) = spec["versions"].as_array().and_then(|v| v.first()) else {
            return;
        };
        let columns = version["additionalPrinterColumns"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
                Column {
                    name: s("name"),
                    kind: s("type"),
                    json_path: s("jsonPath"),
                    priority: c["priority"].as_i64().unwrap_or(0),
                }
            })
            .collect();
        let plural = spec["names"]["plural"].as_str().unwrap_or_default().to_string();
        self.kinds.insert(
            plural.clone(),
            Kind {
                group: spec["group"].as_str().unwrap_or_default().into(),
                version: version["name"].as_str().unwrap_or_default().into(),
                kind: spec["names"]["kind"].as_str().unwrap_or_default().into(),
                plural,
                short_names: spec["names"]["shortNames"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect(),
                columns,
            },
        );
    }

    pub fn list(&self, plural: &str) -> Vec<Value> {
        self.objects
            .range((plural.to_string(), String::new())..)
            .take_while(|((p, _), _)| p == plural)
            .map(|(_, o)| o.clone())
            .collect()
    }

    pub fn get(&self, plural: &str, name: &str) -> Result<Value, Failure> {
        self.objects
            .get(&(plural.to_string(), name.to_string()))
            .cloned()
            .ok_or_else(|| Failure(404, "NotFound", format!("{plural} \"{name}\" not found")))
    }

    fn record(&mut self, plural: &str, kind: &'static str, object: &Value) -> Event {
        let e = Event {
            rv: self.rv,
            plural: plural.to_string(),
            kind,
            object: object.clone(),
        };
        self.history.push_back(e.clone());
        while self.history.len() > HISTORY {
            if let Some(old) = self.history.pop_front() {
                self.oldest = old.rv + 1;
            }
        }
        self.dirty = true;
        e
    }

    fn stamp(&mut self, o: &mut Value) {
        self.rv += 1;
        o["metadata"]["resourceVersion"] = json!(self.rv.to_string());
    }

    pub fn create(&mut self, plural: &str, mut o: Value) -> Result<(Value, Event), Failure> {
        let kind = self
            .kinds
            .get(plural)
            .cloned()
            .ok_or_else(|| Failure(404, "NotFound", plural.into()))?;
        let name = o["metadata"]["name"].as_str().unwrap_or_default().to_string();
        if name.is_empty() {
            return Err(Failure(422, "Invalid", "metadata.name: Required value".into()));
        }
        if self.objects.contains_key(&(plural.to_string(), name.clone())) {
            return Err(Failure(
                409,
                "AlreadyExists",
                format!("{plural} \"{name}\" already exists"),
            ));
        }
        self.uid += 1;
        o["apiVersion"] = json!(kind.api_version());
        o["kind"] = json!(kind.kind);
        o["metadata"]["uid"] = json!(format!("00000000-0000-4000-8000-{:012x}", self.uid));
        o["metadata"]["creationTimestamp"] = json!(now_rfc3339());
        o["metadata"]["generation"] = json!(1);
        if plural == "customresourcedefinitions" {
            o["status"] = json!({
                "acceptedNames": o["spec"]["names"],
                "conditions": [
                    {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts"},
                    {"type": "Established", "status": "True", "reason": "InitialNamesAccepted"},
                ],
                "storedVersions": [o["spec"]["versions"][0]["name"]],
            });
            self.register(&o);
        }
        self.stamp(&mut o);
        self.objects.insert((plural.to_string(), name), o.clone());
        let e = self.record(plural, "ADDED", &o);
        Ok((o, e))
    }

    /// Writes `new` over `name`, keeping what the target may not change: the status on the
    /// object, everything but metadata and status on `/status`.
    pub fn update(
        &mut self,
        plural: &str,
        name: &str,
        mut new: Value,
        status: bool,
    ) -> Result<(Value, Option<Event>), Failure> {
        let old = self.get(plural, name)?;
        if let Some(rv) = new["metadata"]["resourceVersion"].as_str() {
            if rv != old["metadata"]["resourceVersion"].as_str().unwrap_or_default() {
                return Err(Failure(409, "Conflict", format!(
                    "Operation cannot be fulfilled on {plural} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
                )));
            }
        }
        for k in ["apiVersion", "kind"] {
            new[k] = old[k].clone();
        }
        for k in ["uid", "creationTimestamp", "name", "generation"] {
            new["metadata"][k] = old["metadata"][k].clone();
        }
        if status {
            new["spec"] = old["spec"].clone();
        } else if old.get("status").is_some() {
            new["status"] = old["status"].clone();
        }
        if new["spec"] != old["spec"] {
            new["metadata"]["generation"] = json!(old["metadata"]["generation"].as_i64().unwrap_or(1) + 1);
        }
        let mut same = new.clone();
        same["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
        if same == old {
            // A write that changes nothing is no change: no new version, no event.
            return Ok((old, None));
        }
        self.stamp(&mut new);
        self.objects.insert((plural.to_string(), name.to_string()), new.clone());
        let e = self.record(plural, "MODIFIED", &new);
        Ok((new, Some(e)))
    }

    pub fn delete(&mut self, plural: &str, name: &str) -> Result<(Value, Event), Failure> {
        let mut old = self
            .objects
            .remove(&(plural.to_string(), name.to_string()))
            .ok_or_else(|| Failure(404, "NotFound", format!("{plural} \"{name}\" not found")))?;
        self.stamp(&mut old);
        let e = self.record(plural, "DELETED", &old);
        Ok((old, e))
    }

    /// Changes after `since` of `plural`, or 410 when they are no longer kept.
    pub fn since(&self, plural: &str, since: u64) -> Result<Vec<Event>, Failure> {
        if since + 1 < self.oldest && since < self.rv {
            return Err(Failure(
                410,
                "Expired",
                format!("too old resource version: {since} ({})", self.oldest - 1),
            ));
        }
        Ok(self
            .history
            .iter()
            .filter(|e| e.rv > since && e.plural == plural)
            .cloned()
            .collect())
    }
}

pub fn now_rfc3339() -> String {
    weft::lease::kube::annotations::rfc3339(std::time::SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strategic_merge_keys_conditions_by_type() {
        let mut n = json!({"status":{"conditions":[{"type":"Ready","status":"True"},{"type":"NetworkUnavailable","status":"True"}]}});
        merge(
            &mut n,
            &json!({"status":{"conditions":[{"type":"NetworkUnavailable","status":"False","reason":"FlannelIsUp"}]}}),
            true,
        );
        let c = n["status"]["conditions"].as_array().unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[1]["status"], "False");
        merge(&mut n, &json!({"status":{"conditions":[{"type":"X"}]}}), false);
        assert_eq!(
            n["status"]["conditions"].as_array().unwrap().len(),
            1,
            "a merge patch replaces lists"
        );
    }
}
