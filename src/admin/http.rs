//! The admin HTTP server: a JSON API over the quarantine, the accounts and the policy,
//! Prometheus metrics, and a small web page, all on one listener (127.0.0.1:8025 by
//! default; anything else only with TLS, and a warning in the log).
//!
//! Safe by construction:
//!
//! * every route is listed in [`ROUTES`] and the router is built from that list alone;
//!   everything not listed is 404 and nothing is ever served from disk: the page's three
//!   files are compiled in, and a quarantine entry is named only by a parsed
//!   [`QuarantineId`](crate::quarantine::QuarantineId);
//! * every request except [`PUBLIC`] ones (health and the page's static shell, which holds
//!   no data) needs `Authorization: Bearer <token>`, checked before routing, so a route
//!   added later is protected by default. A token in the query string is never looked
//!   at. Failed attempts are limited per source (429 once over `auth_fail_limit` a
//!   minute);
//! * state changes are POST only (GET on them is 405); the token is sent in a header, never
//!   a cookie, so another site cannot make a browser act with it;
//! * every response carries `Cache-Control: no-store`, `X-Content-Type-Options: nosniff` and
//!   a Content-Security-Policy (`default-src 'none'; sandbox` for data, a `'self'`-only one
//!   with Trusted Types for the page, so the page cannot inject HTML even by mistake).
//!
//! The accept loop is our own (not `axum::serve`): it adds TLS, a bound on connections,
//! a handshake and header read timeout, and a graceful stop on the shutdown token.

mod api;
pub mod auth;
pub mod stats;
mod what_if;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::AdminState;
use crate::config::Config;
use crate::server::Server;
use auth::{Credential, FailLimiter, TokenHash};
use stats::VerdictHistory;

/// Every route the server answers: (method, path). The router is built from this list
/// and nothing else; `src/admin/openapi.json` describes exactly these (checked by
/// `tests/admin_api.rs`).
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/"),
    ("GET", "/app.js"),
    ("GET", "/style.css"),
    ("GET", "/healthz"),
    ("GET", "/metrics"),
    ("GET", "/api/quarantine"),
    ("GET", "/api/quarantine/{id}"),
    ("GET", "/api/quarantine/{id}/raw"),
    ("POST", "/api/quarantine/{id}/release"),
    ("POST", "/api/quarantine/{id}/delete"),
    ("GET", "/api/accounts"),
    ("GET", "/api/accounts/{name}"),
    ("POST", "/api/accounts/{name}/freeze"),
    ("POST", "/api/accounts/{name}/unfreeze"),
    ("GET", "/api/policy"),
    ("POST", "/api/policy/what-if"),
    ("GET", "/api/stats"),
];

/// Paths served without the token: liveness and the page's static shell (no data in it;
/// everything it shows comes from the API with the token the user types in).
pub const PUBLIC: &[&str] = &["/", "/app.js", "/style.css", "/healthz"];

/// The OpenAPI 3.1 description of the API, served nowhere, kept next to the code.
pub const OPENAPI: &str = include_str!("openapi.json");

const INDEX_HTML: &str = include_str!("web/index.html");
const APP_JS: &str = include_str!("web/app.js");
const STYLE_CSS: &str = include_str!("web/style.css");

/// For the page: its own scripts, styles and API only; no inline script or style, no
/// frames, no plugins, no forms posting elsewhere, and Trusted Types so that no string
/// can become HTML or script (assigning `innerHTML` throws).
const PAGE_CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; \
    connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'; require-trusted-types-for 'script'; trusted-types 'none'";
/// For everything else (JSON, metrics, raw messages): nothing may load or run, even if a
/// browser were tricked into rendering it.
const DATA_CSP: &str = "default-src 'none'; frame-ancestors 'none'; sandbox";

/// Concurrent admin connections; beyond this, new ones are closed at once.
const MAX_CONNECTIONS: usize = 64;

/// How long a wrong token from a blocked source waits for its 429 (see `require_token`).
const BLOCKED_DELAY: Duration = Duration::from_secs(1);
/// TLS handshake and request head must arrive within this.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Request bodies (release and freeze parameters) are small.
const MAX_BODY: usize = 64 * 1024;
/// How long open connections get to finish at shutdown.
const DRAIN: Duration = Duration::from_secs(5);

/// What the handlers share.
pub(crate) struct App {
    pub(crate) state: AdminState,
    token: TokenHash,
    limiter: FailLimiter,
    pub(crate) history: VerdictHistory,
    tls: bool,
}

/// The connection's peer, put into each request by the accept loop.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Peer(pub SocketAddr);

/// Bound and ready; [`AdminServer::run`] serves until the shutdown token is cancelled.
pub struct AdminServer {
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    app: Arc<App>,
    shutdown: CancellationToken,
}

/// Starts the admin API beside a bound proxy (`[admin] enabled`): bound here, before
/// anything is served, so a bad token file or a busy port stops the start; served from
/// [`Server::run`] on. The server is below the admin API and never imports it: `main`
/// calls this.
pub async fn start(server: &mut Server, shutdown: CancellationToken) -> Result<(), String> {
    let live = server.live();
    if !live.current().shared.config.admin.enabled {
        return Ok(());
    }
    let api = bind(AdminState::of(live), shutdown).await?;
    server.serve_beside(api.run());
    Ok(())
}

/// What [`bind`] would refuse in the admin API's files (token file and mode, TLS
/// certificate), without binding: `check-config` runs it beside `server::preflight`.
pub fn preflight(config: &Config) -> Result<(), String> {
    let admin = &config.admin;
    if admin.enabled {
        TokenHash::load(admin)?;
        if let (Some(cert), Some(key)) = (&admin.tls_cert, &admin.tls_key) {
            crate::tls::acceptor(cert, key).map_err(|e| format!("[admin] tls: {e}"))?;
        }
    }
    Ok(())
}

/// Loads the token, prepares TLS and binds `[admin] listen`. Every error here (token file
/// readable by others, bad certificate, address in use) stops the proxy's start.
pub async fn bind(state: AdminState, shutdown: CancellationToken) -> Result<AdminServer, String> {
    let admin = state.config.admin.clone();
    if !admin.enabled {
        return Err("[admin] is not enabled".into());
    }
    let token = TokenHash::load(&admin)?;
    let loopback = admin.listen.ip().is_loopback();
    let tls = match (&admin.tls_cert, &admin.tls_key) {
        (Some(cert), Some(key)) => {
            Some(crate::tls::acceptor(cert, key).map_err(|e| format!("[admin] tls: {e}"))?)
        }
        (None, None) if !loopback => {
            return Err(format!(
                "[admin] listen {} is not loopback: configure tls_cert and tls_key",
                admin.listen
            ));
        }
        (None, None) => None,
        _ => return Err("[admin] tls_cert and tls_key go together".into()),
    };
    let listener = TcpListener::bind(admin.listen)
        .await
        .map_err(|e| format!("[admin] cannot listen on {}: {e}", admin.listen))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    if !loopback {
        tracing::warn!(address = %local, tls = true,
            "admin API listens on a non-loopback address: anyone who can reach it and has the token can read and release quarantined mail");
    }
    tracing::info!(address = %local, tls = tls.is_some(), "admin API listening");
    let app = Arc::new(App {
        limiter: FailLimiter::new(admin.auth_fail_limit),
        tls: tls.is_some(),
        state,
        token,
        history: VerdictHistory::default(),
    });
    Ok(AdminServer {
        listener,
        tls,
        app,
        shutdown,
    })
}

/// [`bind`] then [`AdminServer::run`]. Bind errors are returned before anything is served.
pub async fn serve(state: AdminState, shutdown: CancellationToken) -> Result<(), String> {
    bind(state, shutdown).await?.run().await;
    Ok(())
}

impl AdminServer {
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until the shutdown token is cancelled, then lets open requests finish
    /// (a few seconds at most).
    pub async fn run(self) {
        let router = router(self.app.clone());
        let tracker = TaskTracker::new();
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        tracker.spawn(sample_verdicts(self.app.clone(), self.shutdown.clone()));
        loop {
            let (tcp, peer) = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "admin API: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::warn!(client = %peer, "admin API: too many connections, closing one");
                continue;
            };
            let router = router.clone();
            let tls = self.tls.clone();
            let shutdown = self.shutdown.clone();
            tracker.spawn(async move {
                let _slot = slot;
                let _ = tcp.set_nodelay(true);
                match tls {
                    None => serve_connection(tcp, peer, router, shutdown).await,
                    Some(acceptor) => {
                        match tokio::time::timeout(HEAD_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(stream)) => {
                                serve_connection(stream, peer, router, shutdown).await
                            }
                            Ok(Err(e)) => {
                                tracing::debug!(client = %peer, error = %e, "admin API: TLS handshake failed")
                            }
                            Err(_) => {
                                tracing::debug!(client = %peer, "admin API: TLS handshake timed out")
                            }
                        }
                    }
                }
            });
        }
        drop(self.listener);
        tracker.close();
        if tokio::time::timeout(DRAIN, tracker.wait()).await.is_err() {
            tracing::warn!("admin API: connections still open after the drain period");
        }
        tracing::info!("admin API stopped");
    }
}

/// Fills the verdict history every few seconds.
async fn sample_verdicts(app: Arc<App>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(stats::SAMPLE_EVERY);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => app.history.sample(crate::quarantine::now()),
        }
    }
}

/// HTTP/1.1 on one connection, with the peer address attached to each request.
async fn serve_connection<IO>(io: IO, peer: SocketAddr, router: Router, shutdown: CancellationToken)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use tower::Service as _;
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let mut router = router.clone();
        let mut req = req.map(Body::new);
        req.extensions_mut().insert(Peer(peer));
        async move { router.call(req).await }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(64 * 1024)
        .keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(client = %peer, error = %e, "admin API: connection error");
            }
            return;
        }
        _ = shutdown.cancelled() => conn.as_mut().graceful_shutdown(),
    }
    let _ = conn.await;
}

/// The router: [`ROUTES`] and nothing else, behind the token check and the header layer.
pub(crate) fn router(app: Arc<App>) -> Router {
    let mut r = Router::new();
    let mut by_path: Vec<(&str, MethodRouter<Arc<App>>)> = Vec::new();
    for (method, path) in ROUTES {
        let handler = handler(method, path);
        match by_path.iter_mut().find(|(p, _)| p == path) {
            Some((_, m)) => *m = std::mem::take(m).merge(handler),
            None => by_path.push((path, handler)),
        }
    }
    for (path, m) in by_path {
        r = r.route(path, m);
    }
    r.fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(app.clone(), require_token))
        .layer(middleware::from_fn_with_state(
            app.clone(),
            security_headers,
        ))
        .with_state(app)
}

/// The handler of one [`ROUTES`] entry. A route without a handler is a programming
/// error caught by the unit test that builds the router.
fn handler(method: &str, path: &str) -> MethodRouter<Arc<App>> {
    match (method, path) {
        ("GET", "/") => get(|| async { page(INDEX_HTML, "text/html; charset=utf-8") }),
        ("GET", "/app.js") => get(|| async { page(APP_JS, "text/javascript; charset=utf-8") }),
        ("GET", "/style.css") => get(|| async { page(STYLE_CSS, "text/css; charset=utf-8") }),
        ("GET", "/healthz") => get(api::healthz),
        ("GET", "/metrics") => get(api::metrics),
        ("GET", "/api/quarantine") => get(api::list),
        ("GET", "/api/quarantine/{id}") => get(api::entry),
        ("GET", "/api/quarantine/{id}/raw") => get(api::raw),
        ("POST", "/api/quarantine/{id}/release") => post(api::release),
        ("POST", "/api/quarantine/{id}/delete") => post(api::delete),
        ("GET", "/api/accounts") => get(api::accounts),
        ("GET", "/api/accounts/{name}") => get(api::account),
        ("POST", "/api/accounts/{name}/freeze") => post(api::freeze),
        ("POST", "/api/accounts/{name}/unfreeze") => post(api::unfreeze),
        ("GET", "/api/policy") => get(api::policy),
        ("POST", "/api/policy/what-if") => post(what_if::what_if),
        ("GET", "/api/stats") => get(api::stats),
        other => panic!("admin route {other:?} has no handler"),
    }
}

fn page(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, PAGE_CSP),
        ],
        body,
    )
        .into_response()
}

async fn not_found() -> Response {
    api::ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such resource").into_response()
}

fn peer_of(req: &Request) -> SocketAddr {
    req.extensions()
        .get::<Peer>()
        .map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |p| p.0)
}

/// The bearer-token gate in front of everything but [`PUBLIC`] paths.
async fn require_token(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if PUBLIC.contains(&path) {
        return next.run(req).await;
    }
    let peer = peer_of(&req);
    let now = Instant::now();
    let credential = auth::bearer(
        req.headers()
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes),
    );
    // The right token always gets in, blocked source or not: every local process shares
    // 127.0.0.1, so blocking a source before looking at the token let any local user lock
    // the administrator out with ten wrong guesses. Guessing stays slow: a wrong token
    // from a blocked source waits `BLOCKED_DELAY` before its 429, and the admin listener
    // serves at most `MAX_CONNECTIONS` at once, so at most 64 guesses a second are
    // possible against a token of at least 16 characters.
    if let Credential::Token(t) = credential
        && app.token.matches(t)
    {
        return next.run(req).await;
    }
    if let Some(retry) = app.limiter.blocked(peer.ip(), now) {
        if matches!(credential, Credential::Token(_)) {
            tokio::time::sleep(BLOCKED_DELAY).await;
        }
        return too_many(retry);
    }
    let why = match credential {
        Credential::Token(t) if app.token.matches(t) => return next.run(req).await,
        Credential::Token(_) => "wrong token",
        Credential::Malformed => "malformed Authorization header",
        // Not a guess: not counted, so a scraper without its token cannot lock the
        // administrator out.
        Credential::Missing => return unauthorized(),
    };
    tracing::warn!(target: "mailwarden::audit", client = %peer, path = %printable(path), reason = why,
        "admin API: authentication failed");
    if !app.limiter.record_failure(peer.ip(), now) {
        return too_many(60);
    }
    unauthorized()
}

fn unauthorized() -> Response {
    let mut r = api::ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "send the admin token as `Authorization: Bearer <token>`",
    )
    .into_response();
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"mailwarden admin\""),
    );
    r
}

fn too_many(retry_after: u64) -> Response {
    let mut r = api::ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_failures",
        "too many failed authentications from this address; wait and retry",
    )
    .into_response();
    if let Ok(v) = HeaderValue::from_str(&retry_after.to_string()) {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

/// Headers on every response, errors included.
async fn security_headers(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if !h.contains_key(header::CONTENT_SECURITY_POLICY) {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(DATA_CSP),
        );
    }
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        HeaderName::from_static("cross-origin-opener-policy"),
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        HeaderName::from_static("cross-origin-resource-policy"),
        HeaderValue::from_static("same-origin"),
    );
    if app.tls {
        h.insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=31536000"),
        );
    }
    r
}

/// User input shown in a log line: printable ASCII only, bounded.
pub(crate) fn printable(s: &str) -> String {
    s.chars()
        .take(80)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_has_a_handler_and_public_paths_are_routes() {
        for (m, p) in ROUTES {
            let _ = handler(m, p);
        }
        for p in PUBLIC {
            assert!(
                ROUTES.iter().any(|(m, r)| m == &"GET" && r == p),
                "{p} is public but not a GET route"
            );
        }
    }

    #[test]
    fn the_page_has_no_html_sinks() {
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
            "new Function",
            "srcdoc",
        ] {
            assert!(!APP_JS.contains(sink), "app.js uses {sink}");
        }
        assert!(
            !INDEX_HTML.contains("<script>"),
            "inline script in index.html"
        );
        assert!(!INDEX_HTML.contains("style="), "inline style in index.html");
        assert!(!INDEX_HTML.contains("http://") && !INDEX_HTML.contains("https://"));
    }
}
