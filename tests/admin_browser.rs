//! The admin web page in headless Chromium (Debian's `/usr/bin/chromium`, driven by
//! `playwright-core` from `tests/browser/run.mjs`): sign in with the token, see a held
//! message, open it, release it (checked here at the fake next hop), save a dashboard
//! screenshot to `target/admin-dashboard.png`, and open a message whose HTML carries a
//! script and remote content: nothing runs, nothing is fetched (checked in the browser
//! and here, by a "remote" listener that must see no connection).
//!
//! Needs `node`, `/usr/bin/chromium` and `npm ci --prefix tests/browser` (`.ci/run` does
//! all three). Set `MAILWARDEN_SKIP_BROWSER=1` to skip it on a machine without them.

mod admin_common;
mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use admin_common::{AdminOptions, TOKEN, message, start};
use common::{bounded, count, repo_path};

const NODE_DEADLINE: Duration = Duration::from_secs(180);

fn chromium() -> String {
    std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into())
}

/// Why the browser test cannot run here, if it cannot.
fn missing_tools() -> Option<String> {
    if Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .map(|s| !s.success())
        .unwrap_or(true)
    {
        return Some("node is not installed (apt-get install nodejs npm)".into());
    }
    if !std::path::Path::new(&chromium()).exists() {
        return Some(format!(
            "{} is missing (apt-get install chromium)",
            chromium()
        ));
    }
    if !repo_path("tests/browser/node_modules/playwright-core").exists() {
        return Some("playwright-core is not installed (npm ci --prefix tests/browser)".into());
    }
    None
}

/// The message whose HTML tries to run script and load remote content.
fn hostile_message(remote: &str) -> Vec<u8> {
    format!(
        "From: Mallory <mallory@sender.example>\r\nTo: bob@example.org\r\n\
         Subject: <img src=\"{remote}/subject.png\" onerror=\"window.__mw_pwned='subject'\"> invoice\r\n\
         Date: Tue, 25 Nov 2025 10:00:00 +0000\r\nMessage-ID: <evil@test.example>\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n\
         <html><head><script>window.__mw_pwned='script';alert('pwned')</script>\r\n\
         <link rel=\"stylesheet\" href=\"{remote}/style.css\">\r\n\
         <meta http-equiv=\"refresh\" content=\"0;url={remote}/refresh\"></head>\r\n\
         <body onload=\"window.__mw_pwned='onload'\"><p>EVIL-VISIBLE-TEXT</p>\r\n\
         <img src=\"{remote}/track.png\" onerror=\"window.__mw_pwned='img'\">\r\n\
         <iframe src=\"{remote}/frame\"></iframe>\r\n\
         <svg onload=\"window.__mw_pwned='svg'\"></svg>\r\n\
         </body></html>\r\n"
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_page_in_headless_chromium() {
    if std::env::var_os("MAILWARDEN_SKIP_BROWSER").is_some() {
        eprintln!("MAILWARDEN_SKIP_BROWSER is set: browser test skipped");
        return;
    }
    if let Some(why) = missing_tools() {
        panic!("the admin browser test cannot run: {why} (or set MAILWARDEN_SKIP_BROWSER=1)");
    }
    bounded(async {
        // The "remote" host the hostile message points at: counts every connection.
        let remote = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let remote_origin = format!("http://{}", remote.local_addr().unwrap());
        let remote_hits = Arc::new(AtomicUsize::new(0));
        let hits = remote_hits.clone();
        let remote_task = tokio::spawn(async move {
            while let Ok((s, _)) = remote.accept().await {
                hits.fetch_add(1, Ordering::SeqCst);
                drop(s);
            }
        });

        let env = start(AdminOptions::default()).await;
        // Some accepted mail for the chart, then the two held messages.
        for i in 0..4 {
            let r = env
                .send(
                    "partner@accept.example",
                    &["bob@example.org"],
                    &message(
                        "partner@accept.example",
                        "bob@example.org",
                        "weekly",
                        &format!("ok-{i}"),
                    ),
                )
                .await;
            assert!(r.starts_with(b"250"), "{}", common::show(&r));
        }
        let plain_marker = "browser-release-marker";
        let plain_id = env
            .hold(
                "alice@sender.example",
                &["bob@example.org"],
                &message(
                    "Alice <alice@sender.example>",
                    "bob@example.org",
                    "Quarterly report",
                    plain_marker,
                ),
            )
            .await;
        let evil_id = env
            .hold(
                "mallory@sender.example",
                &["bob@example.org"],
                &hostile_message(&remote_origin),
            )
            .await;
        let relayed_before = env.mta.accepted().len();

        let target_dir = repo_path("target");
        std::fs::create_dir_all(&target_dir).unwrap();
        let screenshot: PathBuf = target_dir.join("admin-dashboard.png");
        let _ = std::fs::remove_file(&screenshot);
        let profile = tempfile::tempdir().unwrap();
        let out_path = env.proxy.dir.path().join("browser.stdout");
        let err_path = env.proxy.dir.path().join("browser.stderr");
        let mut child = Command::new("node")
            .arg(repo_path("tests/browser/run.mjs"))
            .env("ADMIN_URL", env.url())
            .env("ADMIN_TOKEN", TOKEN)
            .env("PLAIN_ID", &plain_id)
            .env("PLAIN_MARKER", plain_marker)
            .env("EVIL_ID", &evil_id)
            .env("REMOTE_ORIGIN", &remote_origin)
            .env("SCREENSHOT", &screenshot)
            .env("ENTRY_SCREENSHOT", target_dir.join("admin-entry.png"))
            .env("USER_DATA_DIR", profile.path())
            .env("CHROMIUM", chromium())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out_path).unwrap())
            .stderr(std::fs::File::create(&err_path).unwrap())
            .spawn()
            .expect("spawn node");
        let deadline = Instant::now() + NODE_DEADLINE;
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the browser test did not finish within {NODE_DEADLINE:?}\nstderr:\n{}",
                    std::fs::read_to_string(&err_path).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
        let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
        assert!(
            status.success(),
            "browser test failed ({status})\nstdout:\n{stdout}\nstderr:\n{stderr}\nproxy log:\n{}",
            env.proxy.log()
        );
        let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or(""))
            .unwrap_or_else(|e| panic!("browser output is not JSON ({e}): {stdout}"));
        assert_eq!(report["ok"], true, "{report}");

        // The release made in the page reached the next hop exactly once, and only it.
        let arrived: Vec<_> = env
            .mta
            .accepted()
            .into_iter()
            .filter(|m| count(&m.data, plain_marker.as_bytes()) > 0)
            .collect();
        assert_eq!(arrived.len(), 1, "released message at the next hop");
        assert_eq!(arrived[0].rcpt_addrs(), vec!["bob@example.org"]);
        assert_eq!(env.mta.accepted().len(), relayed_before + 1);
        assert!(
            env.mta
                .accepted()
                .iter()
                .all(|m| count(&m.data, b"EVIL-VISIBLE-TEXT") == 0),
            "the hostile message was never relayed"
        );
        // Deleted from the page.
        assert_eq!(
            env.get(&format!("/api/quarantine/{evil_id}")).await.status,
            404
        );
        // Nothing ever connected to the remote host.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            remote_hits.load(Ordering::SeqCst),
            0,
            "the page fetched remote content"
        );
        remote_task.abort();

        let png = std::fs::read(&screenshot).expect("dashboard screenshot saved");
        assert!(png.starts_with(b"\x89PNG"), "screenshot is a PNG");
        assert!(
            png.len() > 10_000,
            "screenshot looks empty ({} bytes)",
            png.len()
        );
        eprintln!("dashboard screenshot: {}", screenshot.display());
    })
    .await;
}
