//! `/leases`: the cluster's leases, filtered, and one by subnet.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::Json;
use serde::Deserialize;
use utoipa::IntoParams;

use super::error::{ApiError, ErrorBody};
use super::views::LeaseView;
use super::ApiState;
use crate::lease::Lease;
use crate::subnet::parse_subnet_key;

/// Filters of the lease list; all optional, all must match.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LeaseFilter {
    /// Only the node with this PublicIP or subnet (`10.244.3.0-24`): nodes are known by either.
    pub node: Option<String>,
    /// Only the lease of the node with this underlay address.
    #[param(value_type = Option<String>, format = "ipv4")]
    pub public_ip: Option<std::net::Ipv4Addr>,
    /// Only leases of this backend type.
    pub backend: Option<String>,
    /// Only leases expiring within this many seconds.
    pub expiring_within: Option<u64>,
}

/// Every lease, in address order. Served from the table this node follows by watch (what it
/// routes by), so reads cost no store round trip; before the first listing, from the store.
pub(super) async fn all(s: &ApiState) -> Result<Vec<Lease>, ApiError> {
    let mut v: Vec<Lease> = if s.agent.leases_synced.load(Ordering::Relaxed) {
        s.agent.leases.load().leases().cloned().collect()
    } else {
        s.store.list_leases().await?.leases
    };
    v.sort_by_key(|l| u32::from(l.subnet.network()));
    Ok(v)
}

/// Lists leases.
#[utoipa::path(get, path = "/leases", tag = "leases", params(LeaseFilter),
    responses((status = 200, body = [LeaseView]), (status = 400, body = ErrorBody)))]
pub async fn list(
    State(s): State<Arc<ApiState>>,
    q: Result<Query<LeaseFilter>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<LeaseView>>, ApiError> {
    let Query(f) = q?;
    let own = s.agent.own_lease().map(|l| l.subnet);
    Ok(Json(
        all(&s)
            .await?
            .iter()
            .filter(|l| f.public_ip.is_none_or(|ip| ip == l.attrs.public_ip))
            .filter(|l| {
                f.node.as_deref().is_none_or(|n| {
                    n == l.attrs.public_ip.to_string() || parse_subnet_key(n).is_some_and(|s| s == l.subnet)
                })
            })
            .filter(|l| f.backend.as_ref().is_none_or(|b| *b == l.attrs.backend_type))
            .map(|l| LeaseView::of(l, Some(l.subnet) == own))
            .filter(|l| {
                f.expiring_within
                    .is_none_or(|w| l.expires_in <= i64::try_from(w).unwrap_or(i64::MAX))
            })
            .collect(),
    ))
}

/// One lease, by subnet: `10.244.3.0-24` (flannel's key form) or `10.244.3.0%2F24`.
#[utoipa::path(get, path = "/leases/{subnet}", tag = "leases",
    params(("subnet" = String, Path, description = "e.g. 10.244.3.0-24")),
    responses((status = 200, body = LeaseView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get(
    State(s): State<Arc<ApiState>>,
    p: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<Json<LeaseView>, ApiError> {
    let Path(raw) = p?;
    let net = parse_subnet_key(&raw)
        .or_else(|| raw.parse::<ipnet::Ipv4Net>().ok())
        .ok_or_else(|| ApiError::BadRequest(format!("{raw:?} is not a subnet (use 10.244.3.0-24)")))?;
    let own = s.agent.own_lease().map(|l| l.subnet);
    let found = if s.agent.leases_synced.load(Ordering::Relaxed) {
        s.agent.leases.load().get(&net.trunc()).cloned()
    } else {
        all(&s).await?.into_iter().find(|l| l.subnet == net.trunc())
    };
    found
        .map(|l| Json(LeaseView::of(&l, Some(l.subnet) == own)))
        .ok_or_else(|| ApiError::NotFound(format!("no lease on {}", net.trunc())))
}
