//! `/leases`: the cluster's leases, filtered or paged, and one by subnet.
//!
//! Reads come from the table this node follows by watch (what it routes by), so they cost no
//! store round trip. The full unfiltered list, what dashboards and scrapers poll, is serialised
//! once per table version and second (expiries count down) and served from that cache. Paged
//! reads (`limit`, then `continue` with the token of the previous page, as Kubernetes lists)
//! finish on the table version they started on, for as long as the agent keeps it.

use std::sync::Arc;
use std::time::SystemTime;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use ipnet::Ipv4Net;
use serde::Deserialize;
use utoipa::IntoParams;

use super::error::{ApiError, ErrorBody};
use super::views::LeaseView;
use super::ApiState;
use crate::lease::table::LeaseTable;
use crate::lease::Lease;
use crate::subnet::parse_subnet_key;

/// The longest `expiring_within` accepted: ten years, far beyond any lease's TTL.
pub const MAX_EXPIRING_WITHIN: u64 = 10 * 365 * 24 * 3600;
/// The largest page.
pub const MAX_LIMIT: usize = 10_000;
/// The response header holding the next page's token.
pub const CONTINUE_HEADER: &str = "x-continue";

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
    /// Only leases expiring within this many seconds (at most ten years).
    #[param(minimum = 0, maximum = 315_360_000)]
    pub expiring_within: Option<u64>,
    /// At most this many leases; the `x-continue` response header then names the next page.
    #[param(minimum = 1, maximum = 10_000)]
    pub limit: Option<usize>,
    /// The `x-continue` token of the previous page.
    #[serde(rename = "continue")]
    #[param(rename = "continue")]
    pub continue_: Option<String>,
}

impl LeaseFilter {
    fn is_plain(&self) -> bool {
        self.node.is_none()
            && self.public_ip.is_none()
            && self.backend.is_none()
            && self.expiring_within.is_none()
            && self.limit.is_none()
            && self.continue_.is_none()
    }

    fn check(&self) -> Result<(), ApiError> {
        if self.expiring_within.is_some_and(|w| w > MAX_EXPIRING_WITHIN) {
            return Err(ApiError::BadRequest(format!(
                "expiring_within must be at most {MAX_EXPIRING_WITHIN} seconds"
            )));
        }
        if self.limit.is_some_and(|l| l == 0 || l > MAX_LIMIT) {
            return Err(ApiError::BadRequest(format!("limit must be 1..={MAX_LIMIT}")));
        }
        Ok(())
    }

    fn matches(&self, l: &Lease) -> bool {
        self.public_ip.is_none_or(|ip| ip == l.attrs.public_ip)
            && self.node.as_deref().is_none_or(|n| {
                n == l.attrs.public_ip.to_string() || parse_subnet_key(n).is_some_and(|s| s == l.subnet)
            })
            && self.backend.as_ref().is_none_or(|b| *b == l.attrs.backend_type)
            && self
                .expiring_within
                .is_none_or(|w| super::views::secs_until(l.expiration) <= i64::try_from(w).unwrap_or(i64::MAX))
    }
}

/// A serialised full list and what it was made from.
pub(crate) struct CachedBody {
    version: u64,
    own: Option<Ipv4Net>,
    second: u64,
    body: Bytes,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A page token: the table version and the last subnet of the page.
fn token(version: u64, last: Ipv4Net) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{version}/{last}"))
}

fn read_token(t: &str) -> Option<(u64, Ipv4Net)> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(t).ok()?;
    let s = String::from_utf8(raw).ok()?;
    let (v, rest) = s.split_once('/')?;
    Some((v.parse().ok()?, rest.parse().ok()?))
}

/// The table reads are served from: the followed one, else (before the first listing) a
/// listing from the store.
async fn table(s: &ApiState) -> Result<Arc<LeaseTable>, ApiError> {
    if let Some(t) = s.agent.leases() {
        return Ok(t);
    }
    let mut t = LeaseTable::default();
    t.replace(s.store.list_leases().await?.leases);
    Ok(Arc::new(t))
}

fn json(body: Bytes) -> Response {
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        body,
    )
        .into_response()
}

/// The full list, from the cache when it is current.
fn full_list(s: &ApiState, t: &LeaseTable, own: Option<Ipv4Net>) -> Result<Response, ApiError> {
    let second = now_secs();
    if let Ok(cache) = s.lease_body.lock() {
        if let Some(c) = cache
            .as_ref()
            .filter(|c| c.version == t.version() && c.own == own && c.second == second)
        {
            return Ok(json(c.body.clone()));
        }
    }
    let views: Vec<LeaseView> = t.leases().map(|l| LeaseView::of(l, Some(l.subnet) == own)).collect();
    let body = Bytes::from(serde_json::to_vec(&views).map_err(|e| ApiError::Unavailable(e.to_string()))?);
    if let Ok(mut cache) = s.lease_body.lock() {
        *cache = Some(CachedBody {
            version: t.version(),
            own,
            second,
            body: body.clone(),
        });
    }
    Ok(json(body))
}

/// Lists leases in subnet order, filtered; with `limit`, one page at a time.
#[utoipa::path(get, path = "/leases", tag = "leases", params(LeaseFilter),
    responses(
        (status = 200, body = [LeaseView], headers(("x-continue" = String,
            description = "present when more leases follow: pass it as `continue` for the next page"))),
        (status = 400, body = ErrorBody),
        (status = 410, body = ErrorBody, description = "the `continue` token's table version is no longer kept: list again")))]
pub async fn list(
    State(s): State<Arc<ApiState>>,
    q: Result<Query<LeaseFilter>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(f) = q?;
    f.check()?;
    let own = s.agent.own_subnet();
    let current = table(&s).await?;
    if f.is_plain() {
        return full_list(&s, &current, own);
    }
    let (t, after) = match f.continue_.as_deref() {
        None => ((*current).clone(), None),
        Some(tok) => {
            let (version, last) = read_token(tok)
                .ok_or_else(|| ApiError::BadRequest(format!("{tok:?} is not a continue token of this API")))?;
            let t = if version == current.version() {
                (*current).clone()
            } else {
                s.agent.leases_at(version).ok_or_else(|| {
                    ApiError::Gone("the lease table moved on since that page: list again without continue".into())
                })?
            };
            (t, Some(last))
        }
    };
    let limit = f.limit.unwrap_or(MAX_LIMIT);
    let mut page = t.leases_after(after).filter(|l| f.matches(l));
    let views: Vec<LeaseView> = page
        .by_ref()
        .take(limit)
        .map(|l| LeaseView::of(l, Some(l.subnet) == own))
        .collect();
    let more = page.next().is_some();
    let mut r = Json(&views).into_response();
    if let (true, Some(last)) = (more, views.last()) {
        let last: Ipv4Net = last
            .subnet
            .parse()
            .map_err(|_| ApiError::Unavailable("bad subnet in view".into()))?;
        if let Ok(v) = HeaderValue::from_str(&token(t.version(), last)) {
            r.headers_mut().insert(CONTINUE_HEADER, v);
        }
    }
    Ok(r)
}

/// Every lease, in subnet order (for the node and stats views).
pub(super) async fn all(s: &ApiState) -> Result<Vec<Lease>, ApiError> {
    Ok(table(s).await?.leases().cloned().collect())
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
    let own = s.agent.own_subnet();
    table(&s)
        .await?
        .get(&net.trunc())
        .map(|l| Json(LeaseView::of(l, Some(l.subnet) == own)))
        .ok_or_else(|| ApiError::NotFound(format!("no lease on {}", net.trunc())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_junk_is_refused() {
        let net: Ipv4Net = "10.244.3.0/24".parse().unwrap();
        assert_eq!(read_token(&token(42, net)), Some((42, net)));
        for junk in [
            "",
            "zz",
            "MTA",
            &base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("x/10.0.0.0/8"),
        ] {
            assert_eq!(read_token(junk), None, "{junk}");
        }
    }

    #[test]
    fn bounds_are_checked() {
        let f = |w: Option<u64>, l: Option<usize>| LeaseFilter {
            expiring_within: w,
            limit: l,
            ..Default::default()
        };
        assert!(f(Some(MAX_EXPIRING_WITHIN), Some(1)).check().is_ok());
        assert!(f(Some(u64::MAX / 2), None).check().is_err());
        assert!(f(None, Some(0)).check().is_err());
        assert!(f(None, Some(MAX_LIMIT + 1)).check().is_err());
        assert!(f(None, None).is_plain());
    }
}
