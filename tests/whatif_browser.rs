//! The admin page's "What if" view (issue 15) in headless Chromium (Debian's
//! `/usr/bin/chromium`, driven by `playwright-core` from `tests/browser/whatif.mjs`), and
//! its API, `POST /api/policy/what-if`.
//!
//! Mail goes through the real proxy under the admin tests' policy (accept.example
//! accepted, everything else held), filling the decision log. In the page, a broken
//! policy shows its line and key; an uploaded policy that accepts signed-off senders is
//! replayed: the matrix shows the held messages moving to accept, the rule responsible,
//! and lists exactly those messages.
//!
//! Needs `node`, `/usr/bin/chromium` and `npm ci --prefix tests/browser` (`.ci/run` does
//! all three). `MAILWARDEN_SKIP_BROWSER=1` skips the browser half.

mod admin_common;
mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use admin_common::{AdminEnv, AdminOptions, TOKEN, message, start};
use common::{bounded, repo_path};

const NEW_POLICY: &str = r#"
[[rule]]
name = "signed"
spf = ["pass"]
action = "accept"
"#;

/// Three accepted, two held; returns the held ones' Message-IDs.
async fn traffic(env: &AdminEnv) -> Vec<String> {
    for i in 0..3 {
        let m = message(
            "partner@accept.example",
            "bob@example.org",
            "weekly",
            &format!("ok-{i}"),
        );
        let r = env
            .send("partner@accept.example", &["bob@example.org"], &m)
            .await;
        assert!(r.starts_with(b"250"), "{}", common::show(&r));
    }
    let mut held = Vec::new();
    for i in 0..2 {
        let marker = format!("held-{i}");
        let m = message("alice@sender.example", "bob@example.org", "report", &marker);
        env.hold("alice@sender.example", &["bob@example.org"], &m)
            .await;
        held.push(format!("<{marker}@test.example>"));
    }
    held
}

/// The decision log is written by its own thread: wait until all five are replayable.
async fn what_if(env: &AdminEnv, policy: &str) -> serde_json::Value {
    let body = serde_json::json!({ "policy": policy }).to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = env.post("/api/policy/what-if", Some(body.as_bytes())).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        if v["total"] == 5 || Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_if_api_replays_the_log_and_refuses_bad_input() {
    bounded(async {
        let env = start(AdminOptions::default()).await;
        let held = traffic(&env).await;
        let v = what_if(&env, NEW_POLICY).await;
        assert_eq!(v["total"], 5, "{v}");
        assert_eq!(v["matrix"]["quarantine→accept"]["count"], 2, "{v}");
        assert_eq!(v["matrix"]["accept→accept"]["count"], 3, "{v}");
        assert_eq!(v["changed"], 2);
        let listed: Vec<&str> = v["changed_list"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["message_id"].as_str().unwrap())
            .collect();
        assert_eq!(listed, held);
        // The running policy replayed against itself changes nothing.
        let same = what_if(&env, admin_common::POLICY).await;
        assert_eq!(same["changed"], 0, "{same}");
        // A broken policy: 400 naming the line and key; no token: 401; no path is read.
        let r = env
            .post(
                "/api/policy/what-if",
                Some(br#"{"policy": "[[rule]]\nname = \"x\"\naction = \"explode\"\n"}"#),
            )
            .await;
        assert_eq!(r.status, 400);
        assert_eq!(r.error_code(), "bad_policy");
        assert!(r.text().contains("what-if.toml:3"), "{}", r.text());
        let r = env
            .post(
                "/api/policy/what-if",
                Some(br#"{"policy": "", "path": "/etc/passwd"}"#),
            )
            .await;
        assert_eq!(r.status, 400, "unknown fields are refused: {}", r.text());
        let r = env
            .post(
                "/api/policy/what-if",
                Some(br#"{"policy": "", "hours": 100000}"#),
            )
            .await;
        assert_eq!(r.status, 400);
        let r = admin_common::request(
            env.admin,
            "POST",
            "/api/policy/what-if",
            &[],
            Some(br#"{"policy": ""}"#),
        )
        .await;
        assert_eq!(r.status, 401);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_if_view_in_headless_chromium() {
    if std::env::var_os("MAILWARDEN_SKIP_BROWSER").is_some() {
        eprintln!("MAILWARDEN_SKIP_BROWSER is set: browser test skipped");
        return;
    }
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).exists()
            && repo_path("tests/browser/node_modules/playwright-core").exists(),
        "needs {chromium}, node and `npm ci --prefix tests/browser` (or MAILWARDEN_SKIP_BROWSER=1)"
    );
    bounded(async {
        let env = start(AdminOptions::default()).await;
        let held = traffic(&env).await;
        assert_eq!(what_if(&env, NEW_POLICY).await["total"], 5);
        let policy_file = env.proxy.dir.path().join("new-policy.toml");
        std::fs::write(&policy_file, NEW_POLICY).unwrap();
        let target_dir = repo_path("target");
        std::fs::create_dir_all(&target_dir).unwrap();
        let profile = tempfile::tempdir().unwrap();
        let out_path = env.proxy.dir.path().join("whatif.stdout");
        let err_path = env.proxy.dir.path().join("whatif.stderr");
        let mut child = Command::new("node")
            .arg(repo_path("tests/browser/whatif.mjs"))
            .env("ADMIN_URL", env.url())
            .env("ADMIN_TOKEN", TOKEN)
            .env("POLICY_FILE", &policy_file)
            .env("EXPECT_HELD_TO_ACCEPT", "2")
            .env("EXPECT_UNCHANGED_ACCEPT", "3")
            .env("EXPECT_CHANGED_IDS", held.join(","))
            .env("SCREENSHOT", target_dir.join("admin-whatif.png"))
            .env("USER_DATA_DIR", profile.path())
            .env("CHROMIUM", &chromium)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out_path).unwrap())
            .stderr(std::fs::File::create(&err_path).unwrap())
            .spawn()
            .expect("spawn node");
        let deadline = Instant::now() + Duration::from_secs(180);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the browser test did not finish in time");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
        let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
        assert!(status.success(), "browser: {stdout}\n{stderr}");
        let report: serde_json::Value =
            serde_json::from_str(stdout.lines().last().unwrap_or("")).expect("JSON line");
        assert_eq!(report["ok"], true, "{report}");
    })
    .await;
}
