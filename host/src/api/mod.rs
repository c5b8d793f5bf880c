//! The admin REST API under `/api/v1`, served by every agent next to `/metrics`: leases, the
//! network config, nodes, modules, data path stats and an event stream. The OpenAPI document at
//! `/api/v1/openapi.json` is generated from the handlers' annotations. Mutations need the
//! bearer token; reads too with `--admin-auth-reads`.

pub mod auth;
mod cluster;
pub mod error;
pub mod events;
mod leases;
mod modules;
pub mod views;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use axum::{middleware, Json, Router};
use tokio::sync::broadcast;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::config::NetworkConfig;
use crate::lease::LeaseStore;
use crate::state::AgentState;
use error::ApiError;
pub use events::ApiEvent;

/// What every handler shares.
pub struct ApiState {
    /// The agent.
    pub agent: Arc<AgentState>,
    /// The lease store (leases, modules, node reports).
    pub store: Arc<dyn LeaseStore>,
    /// The network config in force.
    pub config: NetworkConfig,
    /// The bearer token.
    pub token: String,
    /// Whether reads need the token too.
    pub protect_reads: bool,
    /// Lease changes, for event streams.
    pub events: broadcast::Sender<ApiEvent>,
    /// The serialised full lease list, by table version and second (expiries count down).
    pub(crate) lease_body: std::sync::Mutex<Option<leases::CachedBody>>,
}

impl ApiState {
    /// The API's state over the agent's.
    pub fn new(
        agent: Arc<AgentState>,
        store: Arc<dyn LeaseStore>,
        config: NetworkConfig,
        token: String,
        protect_reads: bool,
        events: broadcast::Sender<ApiEvent>,
    ) -> Self {
        ApiState {
            agent,
            store,
            config,
            token,
            protect_reads,
            events,
            lease_body: Default::default(),
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Weft admin API", version = "1",
        description = "Leases, network config, nodes, Wasm modules and data path stats of a Weft cluster, \
            as seen by one agent. Mutations need `Authorization: Bearer <token>`."),
    servers((url = "/api/v1")),
    modifiers(&BearerAuth),
    components(schemas(error::ErrorBody, error::ErrorDetail)),
    tags((name = "leases"), (name = "modules"), (name = "cluster"))
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        if let Some(c) = doc.components.as_mut() {
            c.add_security_scheme(
                "bearer",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
        }
    }
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such API route".into())
}

/// The OpenAPI document of the routes.
pub fn openapi() -> utoipa::openapi::OpenApi {
    routes_and_doc().1
}

fn routes_and_doc() -> (Router<Arc<ApiState>>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(leases::list))
        .routes(routes!(leases::get))
        .routes(routes!(cluster::config))
        .routes(routes!(cluster::nodes))
        .routes(routes!(cluster::stats))
        .routes(routes!(events::events))
        .routes(routes!(modules::list, modules::upload))
        .routes(routes!(modules::get, modules::patch, modules::remove))
        .routes(routes!(modules::decisions))
        .routes(routes!(modules::rollout))
        .split_for_parts()
}

/// The `/api/v1` router. `body_limit` bounds every request body (a module upload included).
pub fn router(state: Arc<ApiState>, body_limit: usize) -> Router {
    let (api, doc) = routes_and_doc();
    let doc = Arc::new(doc);
    let api = api
        .route("/openapi.json", get(move || async move { Json(doc.as_ref().clone()) }))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), auth::require_token))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state);
    Router::new().nest("/api/v1", api)
}
