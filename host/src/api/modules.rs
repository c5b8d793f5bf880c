//! `/modules`: upload, list, inspect, change and remove Wasm modules. Changes go to the lease
//! store, so every node picks them up; uploads are checked here first, as `weft module add`.

use std::sync::Arc;

use axum::extract::{Multipart, Path, State};
use axum::http::StatusCode;
use axum::Json;
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::views::{Mode, ModuleMetrics, ModulePatch, ModuleView, RolloutView};
use super::ApiState;
use crate::wasm::chain::clock_ms;
use crate::wasm::registry::{self, Changes};
use crate::wasm::{FailurePolicy, ModuleSpec};

async fn views(s: &ApiState) -> Result<Vec<ModuleView>, ApiError> {
    let (specs, nodes) = registry::list(s.store.as_ref()).await?;
    let stats = s.agent.modules.module_stats();
    let now = clock_ms();
    Ok(specs
        .iter()
        .map(|spec| {
            let metrics = stats
                .iter()
                .find(|(n, _)| *n == spec.name)
                .map(|(_, st)| ModuleMetrics::of(st, now))
                .unwrap_or_default();
            ModuleView::of(spec, &nodes, metrics)
        })
        .collect())
}

/// Lists modules in chain order, with each node's loaded sha256 and this node's counters.
#[utoipa::path(get, path = "/modules", tag = "modules", responses((status = 200, body = [ModuleView])))]
pub async fn list(State(s): State<Arc<ApiState>>) -> Result<Json<Vec<ModuleView>>, ApiError> {
    let mut v = views(&s).await?;
    v.sort_by(|a, b| a.order.cmp(&b.order).then_with(|| a.name.cmp(&b.name)));
    Ok(Json(v))
}

/// One module.
#[utoipa::path(get, path = "/modules/{name}", tag = "modules", params(("name" = String, Path)),
    responses((status = 200, body = ModuleView), (status = 404, body = ErrorBody)))]
pub async fn get(State(s): State<Arc<ApiState>>, Path(name): Path<String>) -> Result<Json<ModuleView>, ApiError> {
    views(&s)
        .await?
        .into_iter()
        .find(|m| m.name == name)
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no module named {name}")))
}

/// How far the module's stored code has reached: on how many of the nodes holding a lease it
/// decides traffic, and which nodes have it pending or failed (with why) or do not run it yet.
#[utoipa::path(get, path = "/modules/{name}/rollout", tag = "modules", params(("name" = String, Path)),
    responses((status = 200, body = RolloutView), (status = 404, body = ErrorBody)))]
pub async fn rollout(State(s): State<Arc<ApiState>>, Path(name): Path<String>) -> Result<Json<RolloutView>, ApiError> {
    let nodes: Vec<String> = super::leases::all(&s)
        .await?
        .iter()
        .map(|l| l.attrs.public_ip.to_string())
        .collect();
    registry::rollout(s.store.as_ref(), &name, &nodes)
        .await?
        .map(|r| Json(r.into()))
        .ok_or_else(|| ApiError::NotFound(format!("no module named {name}")))
}

/// The multipart form of an upload (for the schema; parsed by hand).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct UploadForm {
    /// Module name.
    name: String,
    /// The `.wasm` file.
    #[schema(format = Binary, value_type = String)]
    wasm: Vec<u8>,
    /// Config text (usually JSON).
    config: Option<String>,
    /// Place in the chain.
    order: Option<i32>,
    /// `enforce` (default) or `dry_run`.
    mode: Option<String>,
    /// `closed` (default) or `open`.
    failure: Option<String>,
    /// The signature file `weft module sign` wrote (JSON), for nodes that only run signed modules.
    signature: Option<String>,
}

fn failure(v: &str) -> Result<FailurePolicy, ApiError> {
    match v {
        "closed" => Ok(FailurePolicy::Closed),
        "open" => Ok(FailurePolicy::Open),
        other => Err(ApiError::BadRequest(format!(
            "failure must be closed or open, not {other:?}"
        ))),
    }
}

fn dry_run(mode: &str) -> Result<bool, ApiError> {
    match mode {
        "enforce" => Ok(false),
        "dry_run" => Ok(true),
        other => Err(ApiError::BadRequest(format!(
            "mode must be enforce or dry_run, not {other:?}"
        ))),
    }
}

fn multipart_error(e: axum::extract::multipart::MultipartError) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::TooLarge(e.body_text())
    } else {
        ApiError::BadRequest(e.body_text())
    }
}

/// Uploads a module (multipart form: `name`, `wasm`, optional `config`, `order`, `mode`,
/// `failure`). It is compiled, configured and probed here before it is stored.
#[utoipa::path(post, path = "/modules", tag = "modules",
    request_body(content = UploadForm, content_type = "multipart/form-data"),
    responses((status = 201, body = ModuleView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 413, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn upload(
    State(s): State<Arc<ApiState>>,
    form: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<(StatusCode, Json<ModuleView>), ApiError> {
    let mut form = form.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let (mut name, mut wasm, mut config) = (None, None, String::new());
    let (mut order, mut mode, mut fail, mut signature) = (0, false, FailurePolicy::Closed, None);
    while let Some(field) = form.next_field().await.map_err(multipart_error)? {
        let key = field.name().unwrap_or_default().to_string();
        let bytes = field.bytes().await.map_err(multipart_error)?;
        let text =
            || String::from_utf8(bytes.to_vec()).map_err(|_| ApiError::BadRequest(format!("{key} is not UTF-8")));
        match key.as_str() {
            "name" => name = Some(text()?),
            "wasm" => wasm = Some(bytes.to_vec()),
            "config" => config = text()?,
            "order" => {
                order = text()?
                    .trim()
                    .parse()
                    .map_err(|_| ApiError::BadRequest("order must be an integer".into()))?
            }
            "mode" => mode = dry_run(text()?.trim())?,
            "failure" => fail = failure(text()?.trim())?,
            // A form's file input left empty still sends the field, with nothing in it.
            "signature" if bytes.iter().all(u8::is_ascii_whitespace) => {}
            "signature" => {
                signature = Some(
                    serde_json::from_slice(&bytes)
                        .map_err(|e| ApiError::BadRequest(format!("signature is not a signature file: {e}")))?,
                )
            }
            other => return Err(ApiError::BadRequest(format!("unknown form field {other:?}"))),
        }
    }
    let name = name.ok_or_else(|| ApiError::BadRequest("the form needs a name".into()))?;
    let wasm = wasm.ok_or_else(|| ApiError::BadRequest("the form needs a wasm file".into()))?;
    let mut spec = ModuleSpec::new(&name, &wasm, config);
    spec.order = order;
    spec.dry_run = mode;
    spec.failure = fail;
    spec.signature = signature;
    let rt = s.agent.modules.runtime().clone();
    let store = s.store.clone();
    registry::add(store.as_ref(), &rt, spec).await?;
    let view = get(State(s), Path(name)).await?;
    Ok((StatusCode::CREATED, view))
}

/// Changes a module's order, mode, failure policy, config or code.
#[utoipa::path(patch, path = "/modules/{name}", tag = "modules", params(("name" = String, Path)),
    request_body = ModulePatch,
    responses((status = 200, body = ModuleView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn patch(
    State(s): State<Arc<ApiState>>,
    Path(name): Path<String>,
    body: Result<Json<ModulePatch>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<ModuleView>, ApiError> {
    let Json(p) = body?;
    let wasm = p
        .wasm_base64
        .as_deref()
        .map(|b| {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .map_err(|e| ApiError::BadRequest(format!("wasm_base64: {e}")))
        })
        .transpose()?;
    let changes = Changes {
        wasm,
        config: p.config,
        order: p.order,
        failure: p.failure,
        dry_run: p.mode.map(|m| m == Mode::DryRun),
        signature: p.signature,
    };
    let rt = s.agent.modules.runtime().clone();
    registry::set(s.store.as_ref(), &rt, &name, changes).await?;
    get(State(s), Path(name)).await
}

/// Filters of the decision trace.
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TraceFilter {
    /// Only this module's decisions.
    pub module: Option<String>,
    /// At most this many, newest first (default 100).
    #[param(minimum = 1, maximum = 10_000)]
    pub limit: Option<usize>,
}

/// The last decisions each module made on this node (bounded per module), newest first.
#[utoipa::path(get, path = "/decisions", tag = "modules", params(TraceFilter),
    responses((status = 200, body = [crate::wasm::stats::TraceEntry]), (status = 400, body = ErrorBody)))]
pub async fn decisions(
    State(s): State<Arc<ApiState>>,
    q: Result<axum::extract::Query<TraceFilter>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<crate::wasm::stats::TraceEntry>>, ApiError> {
    let axum::extract::Query(f) = q?;
    if f.limit.is_some_and(|l| l == 0 || l > 10_000) {
        return Err(ApiError::BadRequest("limit must be 1..=10000".into()));
    }
    let mut all: Vec<_> = s
        .agent
        .modules
        .module_stats()
        .into_iter()
        .filter(|(n, _)| f.module.as_ref().is_none_or(|m| m == n))
        .flat_map(|(n, st)| st.traced(&n))
        .collect();
    all.sort_by_key(|e| std::cmp::Reverse(e.at_ms));
    all.truncate(f.limit.unwrap_or(100));
    Ok(Json(all))
}

/// Removes a module from every node.
#[utoipa::path(delete, path = "/modules/{name}", tag = "modules", params(("name" = String, Path)),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn remove(State(s): State<Arc<ApiState>>, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    registry::remove(s.store.as_ref(), &name).await?;
    Ok(StatusCode::NO_CONTENT)
}
