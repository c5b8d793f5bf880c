//! Server-side printing: the `Table` kubectl asks for (`Accept: ...;as=Table;...`), with a
//! node's usual columns and a custom resource's `additionalPrinterColumns`.

use serde_json::{json, Value};

use super::db::{Column, Kind};

/// The value a simple JSONPath (`.spec.order`) names in `o`.
fn at<'a>(o: &'a Value, path: &str) -> &'a Value {
    path.trim_start_matches('.')
        .split('.')
        .filter(|s| !s.is_empty())
        .fold(o, |v, k| &v[k])
}

/// How long ago an RFC 3339 time was, as kubectl shows ages (`45s`, `12m`, `3h`, `2d`).
fn age(t: &Value) -> String {
    let Some(s) = t.as_str() else { return "<unknown>".into() };
    let now = super::db::now_rfc3339();
    let secs = |x: &str| -> Option<i64> {
        let d = x.get(8..10)?.parse::<i64>().ok()?;
        let h = x.get(11..13)?.parse::<i64>().ok()?;
        let m = x.get(14..16)?.parse::<i64>().ok()?;
        let sec = x.get(17..19)?.parse::<i64>().ok()?;
        Some(((d * 24 + h) * 60 + m) * 60 + sec)
    };
    // Tests live for minutes: the day of the month is enough to order two times.
    match (secs(s), secs(&now)) {
        (Some(a), Some(b)) => match (b - a).max(0) {
            x if x < 120 => format!("{x}s"),
            x if x < 7200 => format!("{}m", x / 60),
            x if x < 172_800 => format!("{}h", x / 3600),
            x => format!("{}d", x / 86_400),
        },
        _ => "<unknown>".into(),
    }
}

fn text(v: &Value) -> Value {
    match v {
        Value::Null => json!("<none>"),
        Value::String(_) | Value::Number(_) | Value::Bool(_) => v.clone(),
        other => json!(other.to_string()),
    }
}

fn columns(kind: &Kind) -> Vec<Column> {
    let c = |n: &str, t: &str, p: &str| Column {
        name: n.into(),
        kind: t.into(),
        json_path: p.into(),
        priority: 0,
    };
    match kind.plural.as_str() {
        "nodes" => vec![
            c("Status", "string", "status"),
            c("Pod CIDR", "string", ".spec.podCIDR"),
            c("Age", "date", ".metadata.creationTimestamp"),
        ],
        _ if !kind.columns.is_empty() => kind.columns.clone(),
        _ => vec![c("Age", "date", ".metadata.creationTimestamp")],
    }
}

fn cell(o: &Value, col: &Column) -> Value {
    match col.json_path.as_str() {
        p if col.kind == "date" => json!(age(at(o, p))),
        "status" => {
            let ready = o["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["type"] == "Ready")
                .map(|c| c["status"] == "True");
            json!(match ready {
                Some(true) => "Ready",
                Some(false) => "NotReady",
                None => "Unknown",
            })
        }
        p => text(at(o, p)),
    }
}

/// `objects` as a Table of `kind`.
pub fn of(kind: &Kind, objects: &[Value], rv: &str) -> Value {
    let cols = columns(kind);
    let mut defs =
        vec![json!({"name": "Name", "type": "string", "format": "name", "description": "Name", "priority": 0})];
    defs.extend(
        cols.iter().map(
            |c| json!({"name": c.name, "type": c.kind, "format": "", "description": c.name, "priority": c.priority}),
        ),
    );
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            let mut cells = vec![o["metadata"]["name"].clone()];
            cells.extend(cols.iter().map(|c| cell(o, c)));
            json!({
                "cells": cells,
                "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]},
            })
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": rv},
        "columnDefinitions": defs,
        "rows": rows,
    })
}
