//! The admin HTTP API over real HTTP against the real `mailwarden run` (RELIABILITY.md
//! S8–S10): the token is required everywhere but `/healthz` and the page shell, never
//! taken from the query string, and failed attempts are limited; nothing is listed or
//! served from disk; ids that look like paths are refused; release and delete act exactly
//! once; `/metrics` moves when mail flows; GET on a mutation is 405; the OpenAPI document
//! describes exactly the router's routes; the token file must be private; TLS works.

mod admin_common;
mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use admin_common::{
    AdminOptions, TOKEN, message, request, request_raw_target, run_must_fail, start,
};
use common::{bin, bounded, count, free_addr};
use mailwarden::admin::http::{OPENAPI, PUBLIC, ROUTES};

/// Every response, whatever its status, carries these.
#[track_caller]
fn assert_security_headers(r: &admin_common::HttpResponse, what: &str) {
    assert_eq!(r.header("cache-control"), Some("no-store"), "{what}: {r:?}");
    assert_eq!(
        r.header("x-content-type-options"),
        Some("nosniff"),
        "{what}: {r:?}"
    );
    let csp = r
        .header("content-security-policy")
        .unwrap_or_else(|| panic!("{what}: no CSP: {r:?}"));
    assert!(
        csp.contains("default-src 'self'") || csp.contains("default-src 'none'"),
        "{what}: {csp}"
    );
    assert!(csp.contains("frame-ancestors 'none'"), "{what}: {csp}");
}

// ===========================================================================
// S8: authentication
// ===========================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_is_required_never_taken_from_the_query_and_failures_are_limited() {
    bounded(async {
        let env = start(AdminOptions {
            auth_fail_limit: 5,
            ..Default::default()
        })
        .await;
        let a = env.admin;

        // Public: liveness and the page shell (which holds no data).
        let h = request(a, "GET", "/healthz", &[], None).await;
        assert_eq!(h.status, 200);
        assert_security_headers(&h, "/healthz");
        let page = request(a, "GET", "/", &[], None).await;
        assert_eq!(page.status, 200);
        assert!(
            page.header("content-type")
                .unwrap()
                .starts_with("text/html")
        );
        let csp = page.header("content-security-policy").unwrap();
        assert!(csp.contains("default-src 'self'"), "{csp}");
        assert!(csp.contains("require-trusted-types-for 'script'"), "{csp}");
        for asset in ["/app.js", "/style.css"] {
            assert_eq!(request(a, "GET", asset, &[], None).await.status, 200);
        }

        // No token: 401 everywhere else, with a Bearer challenge; not counted as a guess.
        for (method, path) in [
            ("GET", "/metrics"),
            ("GET", "/api/quarantine"),
            ("GET", "/api/policy"),
            ("GET", "/api/stats"),
            ("GET", "/api/accounts"),
            ("GET", "/api/quarantine/00000000000000000000000000"),
            ("POST", "/api/quarantine/00000000000000000000000000/release"),
            ("POST", "/api/quarantine/00000000000000000000000000/delete"),
            ("GET", "/api/"),
            ("GET", "/nothing-here"),
        ] {
            let r = request(a, method, path, &[], None).await;
            assert_eq!(r.status, 401, "{method} {path}: {r:?}");
            assert!(
                r.header("www-authenticate")
                    .is_some_and(|v| v.starts_with("Bearer")),
                "{r:?}"
            );
            assert_security_headers(&r, path);
        }

        // The right token in the query string is not a credential.
        for target in [
            format!("/api/quarantine?token={TOKEN}"),
            format!("/api/quarantine?access_token={TOKEN}"),
            format!("/metrics?token={TOKEN}"),
        ] {
            let r = request(a, "GET", &target, &[], None).await;
            assert_eq!(r.status, 401, "{target}: {r:?}");
        }
        // With the header, an unknown query parameter (such as a token) is a 400.
        let r = env.get(&format!("/api/quarantine?token={TOKEN}")).await;
        assert_eq!(r.status, 400, "{r:?}");

        // Other schemes and near misses are refused.
        let near_miss = format!("Bearer {}X", TOKEN);
        let basic = "Basic dXNlcjpwYXNz".to_string();
        let truncated = format!("Bearer {}", &TOKEN[..TOKEN.len() - 1]);
        let good = format!("Bearer {TOKEN}");
        assert_eq!(
            request(a, "GET", "/api/policy", &[("Authorization", &good)], None)
                .await
                .status,
            200
        );
        let started = Instant::now();
        for auth in [&near_miss, &basic, &truncated, &near_miss, &basic] {
            let r = request(a, "GET", "/api/policy", &[("Authorization", auth)], None).await;
            assert_eq!(r.status, 401, "{auth}: {r:?}");
        }
        // The 6th failure within the minute, and even the right token now: 429.
        let r = request(
            a,
            "GET",
            "/api/policy",
            &[("Authorization", &near_miss)],
            None,
        )
        .await;
        assert_eq!(r.status, 429, "{r:?}");
        let retry: u64 = r
            .header("retry-after")
            .and_then(|v| v.parse().ok())
            .expect("Retry-After");
        assert!((1..=60).contains(&retry), "{retry}");
        assert_security_headers(&r, "429");
        // The right token is never locked out (issue: any local process shares
        // 127.0.0.1), while wrong ones stay blocked and are slowed down.
        let r = request(a, "GET", "/api/policy", &[("Authorization", &good)], None).await;
        assert_eq!(
            r.status, 200,
            "the right token works while the source is blocked"
        );
        let before = Instant::now();
        let r = request(
            a,
            "GET",
            "/api/policy",
            &[("Authorization", &near_miss)],
            None,
        )
        .await;
        assert_eq!(r.status, 429, "{r:?}");
        assert!(
            before.elapsed() >= Duration::from_millis(900),
            "a wrong token from a blocked source is delayed"
        );
        // /healthz stays up.
        assert_eq!(request(a, "GET", "/healthz", &[], None).await.status, 200);
        assert!(
            started.elapsed() < Duration::from_secs(50),
            "test too slow for the window"
        );

        let log = env.proxy.log();
        assert!(
            log.contains("authentication failed"),
            "failed attempts are audited: {log}"
        );
        assert!(
            !log.contains(TOKEN),
            "the token must never appear in the log"
        );
    })
    .await;
}

// ===========================================================================
// S9/S10: no listing, no paths from input
// ===========================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_listed_and_path_like_ids_are_refused() {
    bounded(async {
        let env = start(AdminOptions::default()).await;
        let id = env
            .hold(
                "alice@sender.example",
                &["bob@example.org"],
                &message(
                    "alice@sender.example",
                    "bob@example.org",
                    "held",
                    "marker-s9",
                ),
            )
            .await;

        // A sentinel outside the store, and a planted symlink with a well-formed id that
        // points at a directory holding it.
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("message.eml"), b"SENTINEL-BYTES").unwrap();
        std::fs::write(outside.path().join("meta.json"), b"{}").unwrap();
        let entries = env.proxy.dir.path().join("var/quarantine/entries");
        let planted = "7ZZZZZZZZZZZZZZZZZZZZZZZZZ";
        std::os::unix::fs::symlink(outside.path(), entries.join(planted)).unwrap();

        // No listing anywhere, with the token.
        for path in [
            "/api/",
            "/api/quarantine/",
            "/quarantine/",
            "/static/",
            "/web/",
            "/entries/",
            "/var/quarantine/",
            "/var/quarantine/entries/",
            &format!("/entries/{id}/message.eml"),
            "/../",
            "/..",
            "/api/quarantine/../",
            "/api/../metrics",
            "/%2e%2e/",
            "/index.html",
            "/openapi.json",
        ] {
            let r = env.get(path).await;
            assert!(
                r.status == 404 || r.status == 400,
                "{path}: expected 404/400, got {r:?}"
            );
            assert!(
                !r.text().contains(&id),
                "{path} shows an entry: {}",
                r.text()
            );
            assert!(!r.text().contains("SENTINEL"), "{path}: {}", r.text());
            assert_security_headers(&r, path);
        }
        // The page shell has no data in it.
        let page = env.get("/").await;
        assert!(!page.text().contains(&id));

        let long = "A".repeat(1024);
        let bad_ids = [
            "..",
            "..%2f..",
            "..%2F..%2Fetc%2Fpasswd",
            "%2e%2e",
            "%2e%2e%2f",
            "..%5c..",
            "%5c",
            "%2Fetc%2Fpasswd",
            "%00",
            &format!("{id}%00"),
            &format!("{id}%2f..%2f"),
            "%E2%80%A4%E2%80%A4",
            "%EF%BC%8E%EF%BC%8E",
            "%ff%fe",
            &long,
            &format!("{}U", &id[..25]),
            "ZZZZZZZZZZZZZZZZZZZZZZZZZZ",
        ];
        for bad in bad_ids {
            for (method, suffix) in [
                ("GET", ""),
                ("GET", "/raw"),
                ("POST", "/release"),
                ("POST", "/delete"),
            ] {
                let target = format!("/api/quarantine/{bad}{suffix}");
                let r = env.call(method, &target, None).await;
                assert!(
                    r.status == 400 || r.status == 404,
                    "{method} {target}: {r:?}"
                );
                assert!(!r.text().contains("SENTINEL"), "{target}: {}", r.text());
            }
        }
        // Malformed ids are 400 with a code; a well-formed unknown one is 404.
        let r = env.get("/api/quarantine/..%2f..").await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (400, "bad_id"),
            "{r:?}"
        );
        let r = env.get(&format!("/api/quarantine/{long}")).await;
        assert_eq!(r.status, 400);
        let r = env.get("/api/quarantine/00000000000000000000000000").await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (404, "not_found"),
            "{r:?}"
        );
        // The planted symlink is not an entry.
        for suffix in ["", "/raw"] {
            let r = env.get(&format!("/api/quarantine/{planted}{suffix}")).await;
            assert_eq!(r.status, 404, "{r:?}");
            assert!(!r.text().contains("SENTINEL"));
        }
        let r = env
            .post(&format!("/api/quarantine/{planted}/delete"), None)
            .await;
        assert_eq!(r.status, 404, "{r:?}");
        assert_eq!(
            std::fs::read(outside.path().join("message.eml")).unwrap(),
            b"SENTINEL-BYTES"
        );
        // Raw bytes in the request target (NUL, backslash, non-UTF-8) never reach a handler
        // as a path.
        for raw in [
            b"/api/quarantine/\0".as_slice(),
            b"/api/quarantine/..\\..\\etc\\passwd",
            b"/api/quarantine/\xff\xfe",
        ] {
            if let Ok(r) = request_raw_target(env.admin, raw).await {
                assert!(r.status == 400 || r.status == 404, "{raw:?}: {r:?}");
            }
        }
        // The held entry is untouched by all of that, and nothing was relayed.
        let r = env.get(&format!("/api/quarantine/{id}")).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.json()["meta"]["state"], "held");
        assert!(env.mta.messages().is_empty());
        // The lower-case form of an id is the same id.
        assert_eq!(
            env.get(&format!("/api/quarantine/{}", id.to_lowercase()))
                .await
                .status,
            200
        );
        let log = env.proxy.log();
        assert!(
            log.contains("malformed quarantine id refused"),
            "attempts are audited: {log}"
        );
        // File permissions of the store.
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let root = env.proxy.dir.path().join("var/quarantine");
        assert_eq!(mode(&root), 0o700);
        assert_eq!(
            mode(&root.join("entries").join(&id).join("message.eml")),
            0o600
        );
    })
    .await;
}

// ===========================================================================
// Release and delete round trips; 405 on GET
// ===========================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_and_delete_round_trips() {
    bounded(async {
        let env = start(AdminOptions::default()).await;
        let msg_a = message(
            "Alice <alice@sender.example>",
            "bob@example.org",
            "release me",
            "marker-release-a",
        );
        let id_a = env
            .hold(
                "alice@sender.example",
                &["bob@example.org", "carol@example.org"],
                &msg_a,
            )
            .await;
        let msg_b = message(
            "Mallory <mallory@sender.example>",
            "dave@example.org",
            "delete me",
            "marker-delete-b",
        );
        let id_b = env
            .hold("mallory@sender.example", &["dave@example.org"], &msg_b)
            .await;
        let msg_c = message(
            "Carol <carol@sender.example>",
            "erin@example.org",
            "redirect me",
            "marker-redirect-c",
        );
        let id_c = env
            .hold("carol@sender.example", &["erin@example.org"], &msg_c)
            .await;
        assert!(
            env.mta.messages().is_empty(),
            "held mail reached the next hop"
        );

        // List and its filters.
        let list = env.get("/api/quarantine").await;
        assert_eq!(list.status, 200, "{list:?}");
        assert_security_headers(&list, "list");
        assert!(
            list.header("content-type")
                .unwrap()
                .starts_with("application/json")
        );
        let ids = |r: &admin_common::HttpResponse| -> BTreeSet<String> {
            r.json()["entries"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["id"].as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(
            ids(&list),
            BTreeSet::from([id_a.clone(), id_b.clone(), id_c.clone()])
        );
        assert_eq!(list.json()["counts"]["held"], 3);
        assert_eq!(
            ids(&env.get("/api/quarantine?from=mallory").await),
            BTreeSet::from([id_b.clone()])
        );
        assert_eq!(
            ids(&env.get("/api/quarantine?rcpt=carol%40example.org").await),
            BTreeSet::from([id_a.clone()])
        );
        assert_eq!(
            ids(&env.get("/api/quarantine?reason=review&since=1h").await).len(),
            3
        );
        assert_eq!(
            ids(&env.get("/api/quarantine?reason=nothing-like-this").await).len(),
            0
        );
        assert_eq!(ids(&env.get("/api/quarantine?limit=1").await).len(), 1);
        for bad in [
            "limit=0",
            "limit=100000",
            "since=yesterday",
            "all=maybe",
            "x=1",
        ] {
            let r = env.get(&format!("/api/quarantine?{bad}")).await;
            assert_eq!(r.status, 400, "{bad}: {r:?}");
        }

        // One entry: metadata, headers, a text preview.
        let e = env.get(&format!("/api/quarantine/{id_a}")).await;
        assert_eq!(e.status, 200, "{e:?}");
        let v = e.json();
        assert_eq!(v["meta"]["id"], id_a.as_str());
        assert_eq!(v["meta"]["mail_from"], "alice@sender.example");
        assert_eq!(v["meta"]["state"], "held");
        assert!(
            v["preview"].as_str().unwrap().contains("marker-release-a"),
            "{v}"
        );
        assert!(
            v["headers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|h| h["name"] == "Subject" && h["value"] == "release me"),
            "{v}"
        );

        // Raw download: the stored bytes, as an attachment.
        let raw = env.get(&format!("/api/quarantine/{id_a}/raw")).await;
        assert_eq!(raw.status, 200);
        assert_eq!(raw.header("content-type"), Some("application/octet-stream"));
        assert_eq!(
            raw.header("content-disposition"),
            Some(format!("attachment; filename=\"{id_a}.eml\"").as_str())
        );
        assert_security_headers(&raw, "raw");
        let stored = std::fs::read(
            env.proxy
                .dir
                .path()
                .join("var/quarantine/entries")
                .join(&id_a)
                .join("message.eml"),
        )
        .unwrap();
        assert_eq!(raw.body, stored);

        // GET on a mutation is 405 and does nothing; so is a POST on a read.
        for path in [
            format!("/api/quarantine/{id_a}/release"),
            format!("/api/quarantine/{id_b}/delete"),
            "/api/accounts/someone%40example.org/freeze".to_string(),
            "/api/accounts/someone%40example.org/unfreeze".to_string(),
        ] {
            let r = env.get(&path).await;
            assert_eq!(r.status, 405, "GET {path}: {r:?}");
            assert_security_headers(&r, "405");
        }
        for path in [
            "/api/quarantine".to_string(),
            format!("/api/quarantine/{id_a}"),
            format!("/api/quarantine/{id_a}/raw"),
            "/metrics".to_string(),
            "/api/policy".to_string(),
        ] {
            assert_eq!(env.post(&path, None).await.status, 405, "POST {path}");
        }
        assert_eq!(
            env.call("DELETE", &format!("/api/quarantine/{id_b}"), None)
                .await
                .status,
            405
        );
        assert!(env.mta.messages().is_empty(), "a GET released something");

        // Bad release bodies change nothing.
        for body in [
            &b"{not json"[..],
            br#"{"to": ["x@y\r\nRCPT TO:<evil@example.net>"]}"#,
            br#"{"to": ["not-an-address"]}"#,
            br#"{"unknown": 1}"#,
        ] {
            let r = env
                .post(&format!("/api/quarantine/{id_a}/release"), Some(body))
                .await;
            assert_eq!(r.status, 400, "{}: {r:?}", common::show(body));
        }
        assert!(env.mta.messages().is_empty());

        // Release A (no body): original envelope, exactly once.
        let r = env
            .post(&format!("/api/quarantine/{id_a}/release"), None)
            .await;
        assert_eq!(r.status, 200, "{r:?}\nlog:\n{}", env.proxy.log());
        assert_eq!(r.json()["state"], "released");
        assert!(
            r.json()["reply"].as_str().unwrap().starts_with("250"),
            "{r:?}"
        );
        let arrived = |marker: &str| {
            env.mta
                .accepted()
                .iter()
                .filter(|m| count(&m.data, marker.as_bytes()) > 0)
                .count()
        };
        assert_eq!(arrived("marker-release-a"), 1);
        let m = env
            .mta
            .accepted()
            .into_iter()
            .find(|m| count(&m.data, b"marker-release-a") > 0)
            .unwrap();
        assert_eq!(m.sender(), "alice@sender.example");
        assert_eq!(m.rcpt_addrs(), vec!["bob@example.org", "carol@example.org"]);
        // Again: 409, still exactly once.
        let again = env
            .post(&format!("/api/quarantine/{id_a}/release"), Some(b"{}"))
            .await;
        assert_eq!(again.status, 409, "{again:?}");
        assert_eq!(again.error_code(), "already_released");
        assert_eq!(arrived("marker-release-a"), 1);
        // Released entries leave the default list, stay in `all`.
        assert!(!ids(&env.get("/api/quarantine").await).contains(&id_a));
        assert!(ids(&env.get("/api/quarantine?all=true").await).contains(&id_a));
        assert_eq!(
            env.get(&format!("/api/quarantine/{id_a}")).await.json()["meta"]["state"],
            "released"
        );

        // Release C to another recipient.
        let r = env
            .post(
                &format!("/api/quarantine/{id_c}/release"),
                Some(br#"{"to": ["postmaster@example.org"], "force": false}"#),
            )
            .await;
        assert_eq!(r.status, 200, "{r:?}");
        let m = env
            .mta
            .accepted()
            .into_iter()
            .find(|m| count(&m.data, b"marker-redirect-c") > 0)
            .expect("C arrived");
        assert_eq!(m.rcpt_addrs(), vec!["postmaster@example.org"]);

        // Delete B: gone for good, never relayed.
        let d = env
            .post(&format!("/api/quarantine/{id_b}/delete"), None)
            .await;
        assert_eq!(d.status, 200, "{d:?}");
        assert_eq!(d.json()["state"], "deleted");
        assert_eq!(
            env.get(&format!("/api/quarantine/{id_b}")).await.status,
            404
        );
        assert_eq!(
            env.get(&format!("/api/quarantine/{id_b}/raw")).await.status,
            404
        );
        assert_eq!(
            env.post(&format!("/api/quarantine/{id_b}/delete"), None)
                .await
                .status,
            404
        );
        assert_eq!(
            env.post(&format!("/api/quarantine/{id_b}/release"), None)
                .await
                .status,
            404
        );
        assert!(
            !env.proxy
                .dir
                .path()
                .join("var/quarantine/entries")
                .join(&id_b)
                .exists()
        );
        assert_eq!(arrived("marker-delete-b"), 0);
        assert_eq!(
            env.mta.accepted().len(),
            2,
            "exactly A and C reached the next hop"
        );

        let log = env.proxy.log();
        assert!(log.contains("admin API: release"), "{log}");
        assert!(log.contains("admin API: deleted"), "{log}");
    })
    .await;
}

// ===========================================================================
// Metrics, stats, policy
// ===========================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_when_mail_flows() {
    bounded(async {
        let env = start(AdminOptions::default()).await;
        let scrape = || async {
            let r = env.get("/metrics").await;
            assert_eq!(r.status, 200, "{r:?}");
            assert!(
                r.header("content-type")
                    .unwrap()
                    .starts_with("application/openmetrics-text"),
                "{r:?}"
            );
            r.text()
        };
        let before = scrape().await;
        let m = admin_common::metric;
        let sessions = "mailwarden_sessions_total{role=\"inbound\"}";
        let held = "mailwarden_verdicts_total{action=\"quarantine\",rule=\"hold-all\"}";
        let passed = "mailwarden_verdicts_total{action=\"accept\",rule=\"pass-partner\"}";
        let quarantined = "mailwarden_quarantined_total";
        let spf_pass = "mailwarden_auth_results_total{check=\"spf\",result=\"pass\"}";

        for i in 0..3 {
            env.hold(
                "alice@sender.example",
                &["bob@example.org"],
                &message(
                    "alice@sender.example",
                    "bob@example.org",
                    "m",
                    &format!("mm-{i}"),
                ),
            )
            .await;
        }
        for i in 0..2 {
            let r = env
                .send(
                    "partner@accept.example",
                    &["bob@example.org"],
                    &message(
                        "partner@accept.example",
                        "bob@example.org",
                        "p",
                        &format!("pp-{i}"),
                    ),
                )
                .await;
            assert!(r.starts_with(b"250"), "{}", common::show(&r));
        }
        let after = scrape().await;
        assert!(m(&after, sessions) >= m(&before, sessions) + 5.0, "{after}");
        assert_eq!(m(&after, held) - m(&before, held), 3.0, "{after}");
        assert_eq!(m(&after, passed) - m(&before, passed), 2.0, "{after}");
        assert_eq!(
            m(&after, quarantined) - m(&before, quarantined),
            3.0,
            "{after}"
        );
        assert!(m(&after, spf_pass) >= m(&before, spf_pass) + 5.0, "{after}");
        assert_eq!(m(&after, "mailwarden_quarantine_held"), 3.0, "{after}");
        assert!(
            m(&after, "mailwarden_next_hop_seconds_count") >= 2.0,
            "{after}"
        );
        assert!(after.trim_end().ends_with("# EOF"));

        // The dashboard's series has them too.
        let s = env.get("/api/stats?hours=1").await;
        assert_eq!(s.status, 200, "{s:?}");
        let v = s.json();
        assert_eq!(v["verdicts"]["totals"]["quarantine"], 3, "{v}");
        assert_eq!(v["verdicts"]["totals"]["accept"], 2, "{v}");
        let in_buckets: u64 = v["verdicts"]["buckets"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|b| b["counts"].as_object().unwrap().values())
            .map(|n| n.as_u64().unwrap())
            .sum();
        assert_eq!(in_buckets, 5, "{v}");
        assert_eq!(v["quarantine"]["held"], 3, "{v}");
        assert_eq!(env.get("/api/stats?hours=0").await.status, 400);
        assert_eq!(env.get("/api/stats?hours=25").await.status, 400);

        let p = env.get("/api/policy").await;
        assert_eq!(p.status, 200);
        let p = p.json();
        assert!(!p["version"].as_str().unwrap().is_empty(), "{p}");
        assert!(p["last_reload"].is_null(), "{p}");

        // No submission listener: no burst detector.
        let a = env.get("/api/accounts").await;
        assert_eq!(a.status, 200, "{a:?}");
        assert_eq!(a.json()["available"], false);
        assert!(a.json()["accounts"].is_array());
        let f = env.post("/api/accounts/x%40example.org/freeze", None).await;
        assert_eq!(
            (f.status, f.error_code().as_str()),
            (503, "accounts_unavailable"),
            "{f:?}"
        );
    })
    .await;
}

// ===========================================================================
// Accounts (outbound burst detector)
// ===========================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_are_listed_frozen_and_unfrozen() {
    bounded(async {
        let env = start(AdminOptions {
            submission: true,
            ..Default::default()
        })
        .await;
        let r = env
            .send(
                "alice@sender.example",
                &["bob@example.org"],
                &message("alice@sender.example", "bob@example.org", "hi", "acct-1"),
            )
            .await;
        assert!(r.starts_with(b"250"), "{}", common::show(&r));
        let account = |list: &serde_json::Value, name: &str| -> serde_json::Value {
            list["accounts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|a| a["account"] == name)
                .cloned()
                .unwrap_or_else(|| panic!("no account {name} in {list}"))
        };
        let list = env.get("/api/accounts").await;
        assert_eq!(list.status, 200, "{list:?}");
        let v = list.json();
        assert_eq!(v["available"], true, "{v}");
        assert_eq!(v["backend"], "memory", "{v}");
        let alice = account(&v, "alice@sender.example");
        assert_eq!(alice["frozen"], false);
        assert_eq!(alice["windows"][0]["messages"], 1, "{alice}");

        let d = env.get("/api/accounts/alice%40sender.example").await;
        assert_eq!(d.status, 200, "{d:?}");
        assert_eq!(d.json()["messages_total"], 1, "{d:?}");
        assert_eq!(
            env.get("/api/accounts/nobody%40nowhere.example")
                .await
                .status,
            404
        );

        // Freeze, with a reason; a second freeze is a conflict.
        let f = env
            .post(
                "/api/accounts/Alice%40Sender.example/freeze",
                Some(br#"{"reason": "phishing burst reported"}"#),
            )
            .await;
        assert_eq!(f.status, 200, "{f:?}\nlog:\n{}", env.proxy.log());
        assert_eq!(f.json()["frozen"], true);
        assert_eq!(f.json()["account"], "alice@sender.example");
        let again = env
            .post("/api/accounts/alice%40sender.example/freeze", None)
            .await;
        assert_eq!(again.status, 409, "{again:?}");
        let alice = account(
            &env.get("/api/accounts").await.json(),
            "alice@sender.example",
        );
        assert_eq!(alice["frozen"], true, "{alice}");
        let d = env.get("/api/accounts/alice%40sender.example").await.json();
        assert_eq!(d["frozen"]["why"], "phishing burst reported", "{d}");
        assert!(
            d["frozen"]["by"].as_str().unwrap().starts_with("admin API"),
            "{d}"
        );

        // Refused input changes nothing.
        for (path, body) in [
            ("/api/accounts/a%2Fb/freeze", None),
            ("/api/accounts/a%0Ab/unfreeze", None),
            ("/api/accounts/%20/unfreeze", None),
            (
                "/api/accounts/alice%40sender.example/unfreeze",
                Some(&b"{\"reason\": \"line\\nbreak\"}"[..]),
            ),
            (
                "/api/accounts/alice%40sender.example/unfreeze",
                Some(&b"{\"why\": 1}"[..]),
            ),
        ] {
            let r = env.post(path, body).await;
            assert_eq!(r.status, 400, "{path}: {r:?}");
        }
        let alice = account(
            &env.get("/api/accounts").await.json(),
            "alice@sender.example",
        );
        assert_eq!(alice["frozen"], true);

        // Unfreeze; a second unfreeze is a conflict.
        let u = env
            .post("/api/accounts/alice%40sender.example/unfreeze", Some(b"{}"))
            .await;
        assert_eq!(u.status, 200, "{u:?}");
        assert_eq!(u.json()["frozen"], false);
        assert_eq!(
            env.post("/api/accounts/alice%40sender.example/unfreeze", None)
                .await
                .status,
            409
        );
        let d = env.get("/api/accounts/alice%40sender.example").await.json();
        assert!(d["frozen"].is_null(), "{d}");
        let actions: Vec<&str> = d["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["action"].as_str().unwrap())
            .collect();
        assert_eq!(actions, ["freeze", "unfreeze"], "{d}");
        assert!(env.proxy.log().contains("admin API: account freeze change"));
    })
    .await;
}

// ===========================================================================
// The OpenAPI document and the router
// ===========================================================================

#[test]
fn openapi_lists_exactly_the_routes() {
    let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("openapi.json parses");
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if ["get", "post", "put", "delete", "patch", "head", "options"]
                .contains(&method.as_str())
            {
                documented.insert((method.to_uppercase(), path.clone()));
                // Public ones say so; everything else inherits the bearer requirement.
                let public = op["security"].as_array().is_some_and(|s| s.is_empty());
                assert_eq!(public, PUBLIC.contains(&path.as_str()), "{method} {path}");
                for p in path.split('/').filter(|s| s.starts_with('{')) {
                    let name = p.trim_matches(|c| c == '{' || c == '}');
                    assert!(
                        op["parameters"].as_array().is_some_and(|ps| ps
                            .iter()
                            .any(|x| x["name"] == name && x["in"] == "path")),
                        "{method} {path}: path parameter {name} not described"
                    );
                }
            }
        }
    }
    let routed: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, routed, "openapi.json and ROUTES differ");
    assert!(doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_listed_route_is_served_and_nothing_else() {
    bounded(async {
        let env = start(AdminOptions::default()).await;
        let unknown = "00000000000000000000000000";
        for (method, path) in ROUTES {
            let target = path
                .replace("{id}", unknown)
                .replace("{name}", "someone%40example.org");
            let r = env.call(method, &target, None).await;
            assert_ne!(r.status, 405, "{method} {target}: {r:?}");
            // The fallback's 404 says "no such resource"; a route's own 404 names the id.
            assert!(
                !r.text().contains("no such resource"),
                "{method} {target} is not routed: {r:?}"
            );
            assert_security_headers(&r, &target);
        }
        for (method, path) in [
            ("GET", "/api/quarantine/x/y"),
            ("GET", "/api/quarantines"),
            (
                "GET",
                "/api/quarantine/00000000000000000000000000/release/x",
            ),
            ("POST", "/api/accounts"),
            ("GET", "/api"),
            ("GET", "/metrics/"),
        ] {
            let r = env.call(method, path, None).await;
            assert!(r.status == 404 || r.status == 405, "{method} {path}: {r:?}");
        }
    })
    .await;
}

// ===========================================================================
// Start-up refusals and TLS
// ===========================================================================

/// A minimal config with `[admin]` enabled; `admin_lines` complete the section.
fn config_with_admin(dir: &std::path::Path, admin_lines: &[String]) -> std::path::PathBuf {
    let listen = free_addr();
    let mut text = format!(
        "local_domains = [\"example.org\"]\n\n[[listener]]\naddress = \"{listen}\"\n\n\
         [next_hop]\naddress = \"maildir:{}\"\n\n[admin]\nenabled = true\n",
        dir.join("maildir").display()
    );
    for l in admin_lines {
        text.push_str(l);
        text.push('\n');
    }
    let path = dir.join("mailwarden.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn refuses_to_start_with_a_readable_token_file_a_public_plaintext_bind_or_a_busy_port() {
    let dir = tempfile::tempdir().unwrap();
    let token = admin_common::write_token(dir.path());
    let listen = free_addr();

    // Token readable by others.
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cfg = config_with_admin(
        dir.path(),
        &[
            format!("listen = \"{listen}\""),
            format!("token_file = {:?}", token.to_str().unwrap()),
        ],
    );
    let err = run_must_fail(dir.path(), &cfg);
    assert!(err.contains("token_file") && err.contains("0644"), "{err}");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();

    // A non-loopback address without TLS: check-config and run both refuse.
    let cfg = config_with_admin(
        dir.path(),
        &[
            "listen = \"0.0.0.0:0\"".to_string(),
            format!("token_file = {:?}", token.to_str().unwrap()),
        ],
    );
    let out = Command::new(bin())
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not loopback"),
        "{out:?}"
    );
    let err = run_must_fail(dir.path(), &cfg);
    assert!(err.contains("not loopback"), "{err}");

    // No token at all.
    let cfg = config_with_admin(dir.path(), &[format!("listen = \"{listen}\"")]);
    let err = run_must_fail(dir.path(), &cfg);
    assert!(err.contains("token"), "{err}");

    // A malformed token hash.
    let cfg = config_with_admin(
        dir.path(),
        &[
            format!("listen = \"{listen}\""),
            "token_sha256 = \"abc\"".to_string(),
        ],
    );
    let err = run_must_fail(dir.path(), &cfg);
    assert!(err.contains("token_sha256"), "{err}");

    // The admin port is taken: the start fails loudly instead of running without it.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let cfg = config_with_admin(
        dir.path(),
        &[
            format!("listen = \"{}\"", busy.local_addr().unwrap()),
            format!("token_file = {:?}", token.to_str().unwrap()),
        ],
    );
    let err = run_must_fail(dir.path(), &cfg);
    assert!(err.contains("cannot listen"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_and_token_hash() {
    bounded(async {
        // token_sha256 instead of a file, and TLS on loopback.
        let hash = {
            use aws_lc_rs::digest::{SHA256, digest};
            digest(&SHA256, TOKEN.as_bytes())
                .as_ref()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        };
        let env = start(AdminOptions {
            tls: true,
            admin_extra: vec![],
            ..Default::default()
        })
        .await;
        let a = env.admin;
        let good = format!("Bearer {TOKEN}");
        let r =
            admin_common::request_tls(a, "GET", "/api/policy", &[("Authorization", &good)], None)
                .await;
        assert_eq!(r.status, 200, "{r:?}");
        assert!(r.header("strict-transport-security").is_some(), "{r:?}");
        let r = admin_common::request_tls(a, "GET", "/api/policy", &[], None).await;
        assert_eq!(r.status, 401);
        // Plain HTTP to the TLS port gets no HTTP answer.
        let plain = admin_common::try_request(a, "GET", "/healthz", &[], None).await;
        assert!(plain.is_err() || plain.unwrap().status != 200);
        drop(env);

        let dir = tempfile::tempdir().unwrap();
        let listen = free_addr();
        let cfg = config_with_admin(
            dir.path(),
            &[
                format!("listen = \"{listen}\""),
                format!("token_sha256 = \"{hash}\""),
            ],
        );
        let mut child = Command::new(bin())
            .args(["run", "--config"])
            .arg(&cfg)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut status = 0;
        while Instant::now() < deadline {
            if let Ok(r) = admin_common::try_request(
                listen,
                "GET",
                "/api/policy",
                &[("Authorization", &good)],
                None,
            )
            .await
            {
                status = r.status;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(status, 200, "token_sha256 accepts the token");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_server_stops_with_the_proxy() {
    bounded(async {
        let mut env = start(AdminOptions::default()).await;
        // An idle connection (no request yet) and a kept-alive one must not hold the stop.
        let _idle = tokio::net::TcpStream::connect(env.admin).await.unwrap();
        let mut kept = tokio::net::TcpStream::connect(env.admin).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = kept.read(&mut buf).await.unwrap();
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "{}",
            common::show(&buf[..n])
        );
        let started = Instant::now();
        env.proxy.sigterm();
        let status = env.proxy.wait_exit(Duration::from_secs(30)).await;
        assert!(status.success(), "{status}\n{}", env.proxy.log());
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{:?}",
            started.elapsed()
        );
        assert!(env.proxy.log().contains("admin API stopped"));
        // And the port is closed.
        assert!(tokio::net::TcpStream::connect(env.admin).await.is_err());
    })
    .await;
}
