//! `POST /api/policy/what-if`: the admin page's "What if" view. The body carries a
//! policy file's text; the answer is the replay of the decision log's last hours
//! through it (`crate::decision_log::replay`, the proxy's own decision function), with
//! the changed transactions listed. Nothing is written and nothing is loaded from a
//! path the request names: the text is parsed in memory.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::App;
use super::api::ApiError;
use crate::decision_log::replay;
use crate::decision_log::store::FileStore;
use crate::policy::rules::Policy;

/// Default and largest window, in hours.
const DEFAULT_HOURS: u64 = 24;
const MAX_HOURS: u64 = 24 * 7;
/// Changed transactions listed in one answer (the matrix counts them all).
const MAX_CHANGED: usize = 500;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WhatIfBody {
    /// The policy file's text (TOML).
    policy: String,
    hours: Option<u64>,
}

fn bad(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, code, message)
}

pub async fn what_if(State(app): State<Arc<App>>, req: Request) -> Result<Json<Value>, ApiError> {
    let body = axum::body::to_bytes(req.into_body(), super::MAX_BODY)
        .await
        .map_err(|_| bad("bad_request", "body too large"))?;
    let body: WhatIfBody =
        serde_json::from_slice(&body).map_err(|e| bad("bad_request", format!("body: {e}")))?;
    let hours = body.hours.unwrap_or(DEFAULT_HOURS);
    if !(1..=MAX_HOURS).contains(&hours) {
        return Err(bad("bad_request", format!("hours: 1 to {MAX_HOURS}")));
    }
    // Errors name the line and key, as `check-config` does, of the pasted text.
    let policy = Policy::parse(&body.policy, std::path::Path::new("what-if.toml"))
        .map_err(|e| bad("bad_policy", e.to_string()))?;
    let config = &app.state.config;
    if !config.decision_log.enabled {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "no_decision_log",
            "[decision_log] is off: there is no past mail to replay",
        ));
    }
    let dir = config.decision_log.dir.clone();
    let to = crate::decision_log::now_ms();
    let from = to.saturating_sub(hours * 3_600_000);
    let warnings = policy.warnings.clone();
    let result = tokio::task::spawn_blocking(move || {
        replay::run(
            &FileStore::reader(&dir),
            &policy,
            from,
            u64::MAX,
            MAX_CHANGED,
            &mut |_, _| {},
        )
    })
    .await;
    let r = match result {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "admin API: what-if replay failed");
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "reading the decision log failed; see the proxy's log",
            ));
        }
        Err(e) => {
            tracing::error!(error = %e, "admin API: what-if task failed");
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "what-if task failed; see the proxy's log",
            ));
        }
    };
    let mut out = serde_json::to_value(&r).unwrap_or(Value::Null);
    out["hours"] = json!(hours);
    out["warnings"] = json!(warnings);
    out["actions"] = json!(
        replay::ACTIONS
            .iter()
            .map(|a| a.as_str())
            .collect::<Vec<_>>()
    );
    Ok(Json(out))
}
