//! The handlers of the JSON API and `/metrics`. Store work (SQLite, files) runs on the
//! blocking pool; ids from the request are parsed into a [`QuarantineId`] before anything
//! else, and the store is only ever given that.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{App, Peer, printable};
use crate::admin::release::ReleaseError;
use crate::quarantine::State as QState;
use crate::quarantine::index::Filter;
use crate::quarantine::{QuarantineId, QuarantineStore, StoreError};

/// Characters of text preview in an entry view.
const PREVIEW_CHARS: usize = 4000;
/// Bounds on list filters and release recipients.
const MAX_LIST: usize = 1000;
const DEFAULT_LIST: usize = 50;
const MAX_FILTER_LEN: usize = 256;
const MAX_RELEASE_RCPTS: usize = 100;
const MAX_ADDRESS_LEN: usize = 320;
const MAX_REASON_LEN: usize = 500;

/// An error as JSON: `{"error": "<code>", "message": "<text>"}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    fn bad_request(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    fn internal(what: &str, e: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %e, "admin API: {what} failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("{what} failed; see the proxy's log"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"error": self.code, "message": self.message})),
        )
            .into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::BadId(_) => Self::new(
                StatusCode::BAD_REQUEST,
                "bad_id",
                "not a quarantine id (26 characters of 0-9 A-Z without I L O U)",
            ),
            StoreError::NotFound(id) => Self::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no quarantine entry {id}"),
            ),
            StoreError::WrongState { .. } => {
                Self::new(StatusCode::CONFLICT, "wrong_state", e.to_string())
            }
            StoreError::Database(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                e.to_string(),
            ),
            other => Self::internal("quarantine access", other),
        }
    }
}

type ApiResult<T> = Result<T, ApiError>;

fn store(app: &App) -> ApiResult<Arc<dyn QuarantineStore>> {
    app.state.quarantine.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "quarantine_off",
            "there is no quarantine: checks are off ([auth] enabled = false)",
        )
    })
}

/// The id in the path: malformed → 400 (and an audit line), unknown → 404.
fn parse_id(
    peer: Option<&Peer>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<QuarantineId> {
    let input = match path {
        Ok(Path(s)) => s,
        Err(_) => {
            audit_bad_id(peer, "(undecodable)");
            return Err(StoreError::BadId(String::new()).into());
        }
    };
    let Some(id) = QuarantineId::parse(&input) else {
        audit_bad_id(peer, &input);
        return Err(StoreError::BadId(String::new()).into());
    };
    Ok(id)
}

fn audit_bad_id(peer: Option<&Peer>, input: &str) {
    tracing::warn!(target: "mailwarden::audit",
        client = %peer.map(|p| p.0.to_string()).unwrap_or_default(),
        id = %printable(input), len = input.len(),
        "admin API: malformed quarantine id refused");
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> ApiResult<T> {
    q.map(|Query(v)| v)
        .map_err(|e| ApiError::bad_request(format!("query: {}", e.body_text())))
}

fn json_body<T: for<'de> Deserialize<'de> + Default>(body: &Bytes) -> ApiResult<T> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("body: {e}")))
}

// ---------------------------------------------------------------------------

/// `ok` (200), or 503 with the reason when the quarantine cannot take held mail now
/// (its PostgreSQL server is unreachable: held mail is being deferred with 451 4.3.0).
/// Public, so a load balancer can probe it without the token; the reason names no
/// address or credential.
/// `/healthz`: 503 when the quarantine store (PostgreSQL) is unreachable, since held
/// mail is deferred; 200 `degraded: dns: …` when nameservers are down but serve-stale
/// and the others keep mail flowing (a load balancer that pulled every instance during
/// a DNS outage would turn it into a mail outage); 200 `ok` otherwise.
pub async fn healthz(State(app): State<Arc<App>>) -> Response {
    if let Some(why) = app.state.quarantine.as_ref().and_then(|q| q.unavailable()) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("quarantine store unavailable: {why}\n"),
        )
            .into_response();
    }
    match crate::auth::dns::degraded() {
        None => "ok\n".into_response(),
        Some(why) => format!("degraded: {why}\n").into_response(),
    }
}

pub async fn metrics(State(app): State<Arc<App>>) -> Response {
    // The quarantine gauge is refreshed at each scrape (cheap: one GROUP BY).
    if let Some(q) = app.state.quarantine.clone() {
        crate::server::update_held_gauge(q.as_ref()).await;
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        crate::metrics::global().render(),
    )
        .into_response()
}

// ---------------------------------------------------------------------------
// Quarantine
// ---------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    since: Option<String>,
    reason: Option<String>,
    from: Option<String>,
    rcpt: Option<String>,
    limit: Option<usize>,
    all: Option<bool>,
}

fn filter_text(name: &str, v: Option<String>) -> ApiResult<Option<String>> {
    match v {
        Some(s) if s.len() > MAX_FILTER_LEN => Err(ApiError::bad_request(format!(
            "{name}: at most {MAX_FILTER_LEN} bytes"
        ))),
        Some(s) if s.is_empty() => Ok(None),
        other => Ok(other),
    }
}

pub async fn list(
    State(app): State<Arc<App>>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let q = query(q)?;
    let store = store(&app)?;
    let since = match q.since.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => {
            let d = crate::config::parse_duration(s)
                .map_err(|e| ApiError::bad_request(format!("since: {e}")))?;
            Some(crate::quarantine::now().saturating_sub(d.as_secs()))
        }
    };
    let limit = q.limit.unwrap_or(DEFAULT_LIST);
    if limit == 0 || limit > MAX_LIST {
        return Err(ApiError::bad_request(format!("limit: 1 to {MAX_LIST}")));
    }
    let filter = Filter {
        since,
        reason: filter_text("reason", q.reason)?,
        from: filter_text("from", q.from)?,
        rcpt: filter_text("rcpt", q.rcpt)?,
        all_states: q.all.unwrap_or(false),
        limit,
        before: None,
    };
    let rows = store.list(&filter).await?;
    let counts: BTreeMap<String, u64> = store
        .counts()
        .await?
        .into_iter()
        .map(|(s, n)| (s.as_str().to_string(), n))
        .collect();
    Ok(Json(json!({"entries": rows, "counts": counts})))
}

#[derive(Serialize)]
struct HeaderLine {
    name: String,
    value: String,
}

pub async fn entry(
    State(app): State<Arc<App>>,
    path: Result<Path<String>, PathRejection>,
    req: Request,
) -> ApiResult<Json<Value>> {
    let id = parse_id(req.extensions().get::<Peer>(), path)?;
    let store = store(&app)?;
    let id = store.lookup(id.as_str()).await?;
    let meta = store.meta(&id).await?;
    let message = store.message(&id).await?;
    let headers: Vec<HeaderLine> = crate::admin::preview::header_summary(&message)
        .into_iter()
        .map(|(name, value)| HeaderLine { name, value })
        .collect();
    let preview = crate::admin::preview::text_preview(&message, PREVIEW_CHARS);
    Ok(Json(
        json!({"meta": meta, "headers": headers, "preview": preview}),
    ))
}

pub async fn raw(
    State(app): State<Arc<App>>,
    path: Result<Path<String>, PathRejection>,
    req: Request,
) -> ApiResult<Response> {
    let id = parse_id(req.extensions().get::<Peer>(), path)?;
    let store = store(&app)?;
    let id = store.lookup(id.as_str()).await?;
    let bytes = store.message(&id).await?;
    tracing::info!(target: "mailwarden::audit", id = %id, client = %peer_str(&req),
        "admin API: raw message downloaded");
    let disposition = HeaderValue::from_str(&format!("attachment; filename=\"{id}.eml\""))
        .map_err(|e| ApiError::internal("header", e))?;
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            ),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        bytes,
    )
        .into_response())
}

fn peer_str(req: &Request) -> String {
    req.extensions()
        .get::<Peer>()
        .map(|p| p.0.to_string())
        .unwrap_or_default()
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseBody {
    #[serde(default)]
    to: Vec<String>,
    #[serde(default)]
    force: bool,
}

/// A recipient given to release: one address, nothing that could end or extend an SMTP
/// command.
fn valid_address(a: &str) -> bool {
    !a.is_empty()
        && a.len() <= MAX_ADDRESS_LEN
        && a.contains('@')
        && !a
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || matches!(c, '<' | '>' | '"' | ','))
}

pub async fn release(
    State(app): State<Arc<App>>,
    path: Result<Path<String>, PathRejection>,
    req: Request,
) -> ApiResult<Json<Value>> {
    let peer = peer_str(&req);
    let id = parse_id(req.extensions().get::<Peer>(), path)?;
    let body = axum::body::to_bytes(req.into_body(), super::MAX_BODY)
        .await
        .map_err(|_| ApiError::bad_request("body too large"))?;
    let body: ReleaseBody = json_body(&body)?;
    if body.to.len() > MAX_RELEASE_RCPTS {
        return Err(ApiError::bad_request(format!(
            "to: at most {MAX_RELEASE_RCPTS} recipients"
        )));
    }
    if let Some(bad) = body.to.iter().find(|a| !valid_address(a)) {
        return Err(ApiError::bad_request(format!(
            "to: `{}` is not an address",
            printable(bad)
        )));
    }
    let store = store(&app)?;
    let id = store.lookup(id.as_str()).await?;
    let config = app.state.config();
    let result = crate::admin::release::release(
        store.as_ref(),
        &app.state.next_hops(),
        &id,
        &body.to,
        body.force,
        crate::admin::release::Outgoing {
            authserv_id: config.authserv_id(),
            verdict_header: &config.auth.verdict_header,
            signer: app.state.signer().as_deref(),
        },
    )
    .await;
    let outcome = match &result {
        Ok(_) => QState::Released.to_string(),
        Err(e) => e.to_string(),
    };
    tracing::info!(target: "mailwarden::audit", id = %id, client = %peer,
        to = ?body.to.iter().map(|s| printable(s)).collect::<Vec<_>>(), force = body.force,
        outcome = %outcome, "admin API: release");
    match result {
        Ok(reply) => Ok(Json(json!({
            "id": id.to_string(),
            "state": QState::Released,
            "reply": reply.to_string().trim_end(),
        }))),
        Err(ReleaseError::AlreadyReleased) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "already_released",
            "entry is already released",
        )),
        Err(ReleaseError::Store(e)) => Err(e.into()),
        Err(e @ ReleaseError::Refused(_)) => Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "next_hop_refused",
            e.to_string(),
        )),
        Err(e @ ReleaseError::Deferred(_)) => Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "next_hop_deferred",
            e.to_string(),
        )),
        Err(e @ ReleaseError::Failed(_)) => Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "next_hop_unavailable",
            e.to_string(),
        )),
        Err(e @ ReleaseError::Unsettled(_)) => Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "outcome_unknown",
            e.to_string(),
        )),
    }
}

pub async fn delete(
    State(app): State<Arc<App>>,
    path: Result<Path<String>, PathRejection>,
    req: Request,
) -> ApiResult<Json<Value>> {
    let peer = peer_str(&req);
    let id = parse_id(req.extensions().get::<Peer>(), path)?;
    let store = store(&app)?;
    let id = store.lookup(id.as_str()).await?;
    store.delete(&id).await?;
    tracing::info!(target: "mailwarden::audit", id = %id, client = %peer, "admin API: deleted");
    Ok(Json(
        json!({"id": id.to_string(), "state": QState::Deleted}),
    ))
}

// ---------------------------------------------------------------------------
// Accounts (outbound burst detector)
// ---------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FreezeBody {
    #[serde(default)]
    reason: String,
}

fn detector(app: &App) -> ApiResult<Arc<crate::outbound::Detector>> {
    app.state.detector().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "accounts_unavailable",
            "outbound burst detection is off ([outbound] enabled = false)",
        )
    })
}

pub async fn accounts(State(app): State<Arc<App>>) -> ApiResult<Json<Value>> {
    let Some(d) = app.state.detector() else {
        return Ok(Json(json!({
            "available": false,
            "backend": null,
            "accounts": [],
        })));
    };
    let accounts = d.accounts().await;
    Ok(Json(json!({
        "available": true,
        "backend": d.backend_status(),
        "accounts": accounts,
    })))
}

/// An account name from the path: printable, bounded, no separators.
fn account_name(path: Result<Path<String>, PathRejection>) -> ApiResult<String> {
    let Ok(Path(name)) = path else {
        return Err(ApiError::bad_request("account: not decodable"));
    };
    let name = name.trim();
    if name.is_empty()
        || name.len() > MAX_ADDRESS_LEN
        || name
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || matches!(c, '/' | '\\'))
    {
        return Err(ApiError::bad_request("account: not an account name"));
    }
    Ok(name.to_string())
}

pub async fn account(
    State(app): State<Arc<App>>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<Value>> {
    let account = account_name(path)?;
    let d = detector(&app)?;
    match d.account_detail(&account).await {
        Some(detail) => Ok(Json(json!(detail))),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no account {}", printable(&account)),
        )),
    }
}

async fn set_frozen(
    app: Arc<App>,
    path: Result<Path<String>, PathRejection>,
    req: Request,
    freeze: bool,
) -> ApiResult<Json<Value>> {
    let peer = peer_str(&req);
    let account = account_name(path)?;
    let body = axum::body::to_bytes(req.into_body(), super::MAX_BODY)
        .await
        .map_err(|_| ApiError::bad_request("body too large"))?;
    let body: FreezeBody = json_body(&body)?;
    let reason = body.reason.trim();
    if reason.len() > MAX_REASON_LEN || reason.chars().any(char::is_control) {
        return Err(ApiError::bad_request(format!(
            "reason: one line, at most {MAX_REASON_LEN} bytes"
        )));
    }
    let d = detector(&app)?;
    let ip = req_ip(&peer);
    let by = format!("admin API ({ip})");
    let why = if reason.is_empty() {
        if freeze {
            "frozen from the admin API"
        } else {
            "unfrozen from the admin API"
        }
    } else {
        reason
    };
    let result = if freeze {
        d.freeze(&account, &by, why).await
    } else {
        d.unfreeze(&account, &by, why).await
    };
    tracing::info!(target: "mailwarden::audit", account = %printable(&account), client = %peer,
        freeze, outcome = %result.as_ref().err().map_or("ok", String::as_str),
        "admin API: account freeze change");
    match result {
        Ok(()) => Ok(Json(json!({
            "account": crate::outbound::normalize(&account),
            "frozen": freeze,
        }))),
        Err(e) => Err(ApiError::new(StatusCode::CONFLICT, "wrong_state", e)),
    }
}

/// The address part of `ip:port` (for the freeze record's "by").
fn req_ip(peer: &str) -> &str {
    peer.rsplit_once(':').map_or(peer, |(ip, _)| ip)
}

pub async fn freeze(
    State(app): State<Arc<App>>,
    path: Result<Path<String>, PathRejection>,
    req: Request,
) -> ApiResult<Json<Value>> {
    set_frozen(app, path, req, true).await
}

pub async fn unfreeze(
    State(app): State<Arc<App>>,
    path: Result<Path<String>, PathRejection>,
    req: Request,
) -> ApiResult<Json<Value>> {
    set_frozen(app, path, req, false).await
}

// ---------------------------------------------------------------------------
// Policy and stats
// ---------------------------------------------------------------------------

pub async fn policy(State(app): State<Arc<App>>) -> Json<Value> {
    let status = app.state.inspector().policy_status();
    let last_reload = match status.last_reload {
        None => Value::Null,
        Some(Ok(v)) => json!({"ok": true, "message": v}),
        Some(Err(e)) => json!({"ok": false, "message": e}),
    };
    Json(json!({"version": status.version, "last_reload": last_reload}))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatsQuery {
    hours: Option<u64>,
}

pub async fn stats(
    State(app): State<Arc<App>>,
    q: Result<Query<StatsQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let q = query(q)?;
    let hours = q.hours.unwrap_or(6);
    if !(1..=24).contains(&hours) {
        return Err(ApiError::bad_request("hours: 1 to 24"));
    }
    let now = crate::quarantine::now();
    app.history.sample(now);
    let series = app.history.series(now, hours);
    let quarantine = match app.state.quarantine.clone() {
        None => Value::Null,
        Some(q) => {
            let counts = q.counts().await?;
            json!(
                counts
                    .into_iter()
                    .map(|(s, n)| (s.as_str().to_string(), n))
                    .collect::<BTreeMap<String, u64>>()
            )
        }
    };
    Ok(Json(json!({
        "now": now,
        "verdicts": series,
        "quarantine": quarantine,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_addresses() {
        assert!(valid_address("a@b.example"));
        for bad in [
            "",
            "a",
            "a@b\r\nRCPT TO:<x@y>",
            "a@b> NOTIFY=NEVER",
            "a b@c",
            "a@b,c@d",
        ] {
            assert!(!valid_address(bad), "{bad:?}");
        }
        assert!(!valid_address(&format!("{}@b", "a".repeat(400))));
    }
}
