//! Wasm modules as Kubernetes objects: one cluster-scoped `WasmModule`
//! (`weft.dev/v1alpha1`) per module, and each node's report of it in the object's
//! `.status.nodes`, keyed by the node's PublicIP. Pure translation between those objects and
//! the store's documents (the module spec JSON and each node's report JSON), so the registry,
//! the REST API and the dashboard see the same documents as on etcd.
//!
//! The code travels inline, base64 in `.spec.wasm`, not in a ConfigMap: one object is then one
//! atomic change of code, config and signature (a ConfigMap reference could point at code the
//! signature never covered, or change under a running module), one RBAC grant and one watch.
//! An object is bounded by etcd's 1.5 MiB request limit; `--module-max-kib` defaults to 1 MiB,
//! whose base64 fits.

use std::collections::BTreeMap;

use kube::api::{ApiResource, DynamicObject};
use serde_json::{json, Map, Value};

use super::super::Doc;

/// The API group of Weft's custom resources.
pub const GROUP: &str = "weft.dev";
/// Their version.
pub const VERSION: &str = "v1alpha1";
/// The kind of a module.
pub const KIND: &str = "WasmModule";
/// Its plural, as in the URL path and `kubectl get wasmmodules`.
pub const PLURAL: &str = "wasmmodules";

/// The resource `kube` needs to address WasmModule objects.
pub fn resource() -> ApiResource {
    ApiResource {
        group: GROUP.into(),
        version: VERSION.into(),
        api_version: format!("{GROUP}/{VERSION}"),
        kind: KIND.into(),
        plural: PLURAL.into(),
    }
}

/// The name of an object.
pub fn name(o: &DynamicObject) -> &str {
    o.metadata.name.as_deref().unwrap_or("")
}

/// The spec generation: it moves on every change of `.spec` and never on `.status`, so it is
/// the document revision that says "this module changed" without the nodes' reports.
pub fn generation(o: &DynamicObject) -> i64 {
    o.metadata.generation.unwrap_or(0)
}

/// The module spec document (Weft's `ModuleSpec` JSON) an object holds.
pub fn spec_doc(o: &DynamicObject) -> Doc {
    let s = &o.data["spec"];
    let mut m = Map::new();
    m.insert("name".into(), json!(name(o)));
    for (ours, theirs) in [
        ("sha256", "sha256"),
        ("wasm", "wasm"),
        ("config", "config"),
        ("order", "order"),
    ] {
        if let Some(v) = s.get(theirs) {
            m.insert(ours.into(), v.clone());
        }
    }
    if let Some(f) = s.get("failurePolicy") {
        m.insert("failure".into(), f.clone());
    }
    m.insert("dry_run".into(), json!(s["mode"].as_str() == Some("dry-run")));
    if let Some(sig) = s.get("signature").filter(|v| !v.is_null()) {
        m.insert("signature".into(), sig.clone());
    }
    Doc {
        name: name(o).to_string(),
        value: serde_json::to_vec(&Value::Object(m)).unwrap_or_default(),
        revision: generation(o),
    }
}

/// The object for a module spec document (the inverse of [`spec_doc`]).
pub fn object_of(name: &str, spec_json: &[u8]) -> Result<DynamicObject, String> {
    let v: Value = serde_json::from_slice(spec_json).map_err(|e| format!("module {name}: {e}"))?;
    let mode = if v["dry_run"].as_bool() == Some(true) {
        "dry-run"
    } else {
        "enforce"
    };
    let mut spec = json!({
        "order": v["order"].as_i64().unwrap_or(0),
        "mode": mode,
        "failurePolicy": v["failure"].as_str().unwrap_or("closed"),
        "config": v["config"].as_str().unwrap_or(""),
        "sha256": v["sha256"],
        "wasm": v["wasm"],
    });
    if let Some(sig) = v.get("signature").filter(|s| !s.is_null()) {
        spec["signature"] = sig.clone();
    }
    let mut o = DynamicObject::new(name, &resource());
    o.data = json!({ "spec": spec });
    Ok(o)
}

/// One node's report of one module, as `.status.nodes[<node>]` holds it.
fn entry_of(module: &Value, updated: &Value) -> Value {
    json!({
        "state": module["state"],
        "sha256": module["sha256"],
        "revision": module.get("revision").cloned().unwrap_or(Value::Null),
        "error": module.get("error").cloned().unwrap_or(Value::Null),
        "updated": updated,
    })
}

/// The status patches that record node `node`'s report (`NodeStatus` JSON), one per module
/// whose entry differs from what its object already holds: a node re-reporting the same
/// state writes nothing.
pub fn report_patches(objects: &BTreeMap<String, DynamicObject>, node: &str, report: &[u8]) -> Vec<(String, Value)> {
    let Ok(r) = serde_json::from_slice::<Value>(report) else {
        return Vec::new();
    };
    let updated = r["updated"].clone();
    let mut out = Vec::new();
    for m in r["modules"].as_array().into_iter().flatten() {
        let Some(module) = m["name"].as_str() else { continue };
        let Some(o) = objects.get(module) else { continue };
        let want = entry_of(m, &updated);
        let have = &o.data["status"]["nodes"][node];
        let same = ["state", "sha256", "revision", "error"]
            .iter()
            .all(|k| have[*k] == want[*k]);
        if !same {
            out.push((module.to_string(), json!({ "status": { "nodes": { node: want } } })));
        }
    }
    out
}

/// The patches that remove node `node`'s entries from every object.
pub fn forget_patches(objects: &BTreeMap<String, DynamicObject>, node: &str) -> Vec<(String, Value)> {
    objects
        .iter()
        .filter(|(_, o)| !o.data["status"]["nodes"][node].is_null())
        .map(|(n, _)| (n.clone(), json!({ "status": { "nodes": { node: null } } })))
        .collect()
}

/// Every node's report rebuilt from the objects' status: the same `NodeStatus` JSON a node
/// writes on etcd, one document per node.
pub fn report_docs(objects: &BTreeMap<String, DynamicObject>) -> Vec<Doc> {
    let mut by_node: BTreeMap<String, (u64, Vec<Value>)> = BTreeMap::new();
    for (module, o) in objects {
        for (node, e) in o.data["status"]["nodes"].as_object().into_iter().flatten() {
            let slot = by_node.entry(node.clone()).or_default();
            slot.0 = slot.0.max(e["updated"].as_u64().unwrap_or(0));
            let mut m = json!({ "name": module, "sha256": e["sha256"], "state": e["state"] });
            for k in ["error", "revision"] {
                if let Some(v) = e[k].as_str() {
                    m[k] = json!(v);
                }
            }
            slot.1.push(m);
        }
    }
    by_node
        .into_iter()
        .map(|(node, (updated, modules))| Doc {
            value: serde_json::to_vec(&json!({ "node": node, "updated": updated, "modules": modules }))
                .unwrap_or_default(),
            name: node,
            revision: 0,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_json() -> Vec<u8> {
        br#"{"name":"fw","sha256":"ab","wasm":"AGFzbQ==","config":"{\"deny\":[7777]}","order":10,"failure":"open","dry_run":true}"#.to_vec()
    }

    #[test]
    fn a_spec_survives_the_round_trip() {
        let o = object_of("fw", &spec_json()).unwrap();
        assert_eq!(o.data["spec"]["mode"], "dry-run");
        assert_eq!(o.data["spec"]["failurePolicy"], "open");
        let back: Value = serde_json::from_slice(&spec_doc(&o).value).unwrap();
        let want: Value = serde_json::from_slice(&spec_json()).unwrap();
        assert_eq!(back, want);
    }

    #[test]
    fn reports_are_written_only_when_they_change_and_read_back_per_node() {
        let mut objects = BTreeMap::new();
        objects.insert("fw".to_string(), object_of("fw", &spec_json()).unwrap());
        let report = br#"{"node":"198.18.0.2","updated":100,"modules":[{"name":"fw","sha256":"ab","state":"loaded"},{"name":"gone","sha256":"cd","state":"loaded"}]}"#;
        let patches = report_patches(&objects, "198.18.0.2", report);
        assert_eq!(patches.len(), 1, "only modules that exist: {patches:?}");
        // Apply the patch as the API server would, then the same report is no news.
        let o = objects.get_mut("fw").unwrap();
        o.data["status"] = patches[0].1["status"].clone();
        assert!(report_patches(&objects, "198.18.0.2", report).is_empty());
        let docs = report_docs(&objects);
        assert_eq!(docs.len(), 1);
        let v: Value = serde_json::from_slice(&docs[0].value).unwrap();
        assert_eq!(v["node"], "198.18.0.2");
        assert_eq!(v["updated"], 100);
        assert_eq!(v["modules"][0], json!({"name":"fw","sha256":"ab","state":"loaded"}));
        assert_eq!(forget_patches(&objects, "198.18.0.2").len(), 1);
        assert!(forget_patches(&objects, "198.18.0.3").is_empty());
    }

    #[test]
    fn a_new_revision_of_the_same_code_is_written_and_read_back() {
        let mut objects = BTreeMap::new();
        objects.insert("fw".to_string(), object_of("fw", &spec_json()).unwrap());
        let report = |rev: &str| {
            format!(
                r#"{{"node":"n","updated":1,"modules":[{{"name":"fw","sha256":"ab","revision":"{rev}","state":"loaded"}}]}}"#
            )
        };
        let patches = report_patches(&objects, "n", report("r1").as_bytes());
        objects.get_mut("fw").unwrap().data["status"] = patches[0].1["status"].clone();
        let patches = report_patches(&objects, "n", report("r2").as_bytes());
        assert_eq!(patches.len(), 1, "a config change alone is news");
        objects.get_mut("fw").unwrap().data["status"] = patches[0].1["status"].clone();
        let v: Value = serde_json::from_slice(&report_docs(&objects)[0].value).unwrap();
        assert_eq!(v["modules"][0]["revision"], "r2");
    }
}
