//! Several mailwarden instances sharing one quarantine in a real PostgreSQL (issue 14).
//!
//! Each test starts its own PostgreSQL server (Debian `postgresql`: `initdb` and
//! `pg_ctl` from /usr/lib/postgresql/*/bin, installed by `.ci/run`) on a free loopback
//! port with its data directory under a tempdir, as the unprivileged `nobody` when the
//! tests run as root (PostgreSQL refuses to run as root). The mailwarden instances are
//! the real binary; the admin commands are the real CLI, each run with the
//! configuration of one instance.

mod common;

use std::ffi::OsString;

use std::process::Command;
use std::time::Duration;

use common::dns::{DnsServer, Zone};
use common::fake_mta::{FakeMta, Script};
use common::{Proxy, ProxyOptions, bin};

const HELO: &str = "mx.client.example";
const CLI_DEADLINE: Duration = Duration::from_secs(60);

/// Bulk mail is held; everything else is relayed (to show that mail which is not held
/// keeps flowing while PostgreSQL is down).
const POLICY: &str = r#"
[[rule]]
name = "hold-bulk"
from_domain = ["bulk.example"]
action = "quarantine"
reason = "bulk sender"
"#;

#[path = "pg_server/mod.rs"]
mod pg_server;

/// A private `redis-server` on a free loopback port (Debian `redis-server`), no
/// persistence; killed on drop.
struct Redis {
    child: std::process::Child,
    port: u16,
}

impl Redis {
    fn start() -> Redis {
        let port = free_port();
        let child = Command::new("/usr/bin/redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install -y redis-server)");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Redis { child, port }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
use pg_server::{Postgres, free_port};

// ---------------------------------------------------------------------------
// Instances and the CLI
// ---------------------------------------------------------------------------

async fn instance(name: &str, pg: &Postgres, mta: &FakeMta, dns: &DnsServer) -> Proxy {
    instance_with(name, pg, mta, dns, None).await
}

/// An instance; with `redis`, its `[outbound]` accounts live in that Redis (port).
async fn instance_with(
    name: &str,
    pg: &Postgres,
    mta: &FakeMta,
    dns: &DnsServer,
    redis: Option<u16>,
) -> Proxy {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, POLICY).expect("write policy");
    let mut o = ProxyOptions::smtp(mta.addr);
    o.auth = true;
    o.role = "inbound".into();
    o.local_domains = vec!["example.org".into()];
    o.dns_nameserver = Some(dns.nameserver());
    o.auth_extra = vec![format!(
        "policy_file = {:?}",
        policy.to_str().expect("utf-8")
    )];
    let token = dir.path().join("admin.token");
    std::fs::write(&token, format!("{ADMIN_TOKEN}\n")).expect("token");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    let admin = format!("127.0.0.1:{}", free_port());
    o.extra_toml = vec![format!(
        "[quarantine]\nbackend = \"postgres\"\ninstance = \"{name}\"\n\n\
         [postgres]\nurl = \"{}\"\npool_size = 4\ntimeout_ms = 3000\n\n\
         [admin]\nenabled = true\nlisten = \"{admin}\"\ntoken_file = {:?}\n",
        pg.url(),
        token.to_str().expect("utf-8")
    )];
    if let Some(port) = redis {
        o.extra_toml.push(format!(
            "[outbound]\nbackend = \"redis\"\nredis_url = \"redis://127.0.0.1:{port}/\"\n\
             redis_prefix = \"cluster-test:\"\n"
        ));
    }
    Proxy::start_in(o, dir).await
}

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

async fn cli(proxy: &Proxy, args: &[&str]) -> Run {
    cli_of("quarantine", proxy, args).await
}

/// `mailwarden GROUP -c <the instance's config> ARGS`.
async fn cli_of(group: &str, proxy: &Proxy, args: &[&str]) -> Run {
    let mut command = Command::new(bin());
    command
        .arg(group)
        .arg("-c")
        .arg(&proxy.config_path)
        .args(args.iter().map(OsString::from));
    let done = common::run_bounded(command, proxy.dir.path(), CLI_DEADLINE).await;
    let status = done.status.expect("CLI finished in time");
    Run {
        ok: status.success(),
        stdout: String::from_utf8_lossy(&done.stdout).into_owned(),
        stderr: done.stderr,
    }
}

async fn list(proxy: &Proxy, all: bool) -> Vec<serde_json::Value> {
    let mut args = vec!["list", "--json"];
    if all {
        args.push("--all");
    }
    let run = cli(proxy, &args).await;
    assert!(run.ok, "list: {}", run.stderr);
    serde_json::from_str::<serde_json::Value>(&run.stdout)
        .expect("list --json")
        .as_array()
        .expect("array")
        .clone()
}

fn message(from: &str, marker: &str) -> Vec<u8> {
    format!(
        "From: {from}\r\nTo: user@example.org\r\nSubject: {marker}\r\n\
         Message-ID: <{marker}@test.example>\r\n\r\nbody {marker}\r\n"
    )
    .into_bytes()
}

/// Sends one message through `proxy`; returns the final reply (code, text).
async fn send(proxy: &Proxy, from: &str, marker: &str) -> (u16, String) {
    let mut c = proxy.connect_ehlo(HELO).await;
    let r = c
        .send_mail(from, &["user@example.org"], &message(from, marker))
        .await;
    let _ = c.cmd("QUIT").await;
    (r.code, r.text().to_string())
}

fn queued_id(text: &str) -> String {
    text.strip_prefix("2.0.0 Ok: queued as ")
        .unwrap_or_else(|| panic!("not a quarantine id reply: {text}"))
        .to_string()
}

fn zone() -> Zone {
    Zone::new()
        .txt("sender.example", "v=spf1 ip4:127.0.0.1 -all")
        .txt("bulk.example", "v=spf1 ip4:127.0.0.1 -all")
}

const ADMIN_TOKEN: &str = "a-test-token-of-enough-length-0123456789";

/// `GET /healthz` on the instance's admin listener: status code and whole response.
async fn healthz(proxy: &Proxy) -> (u16, String) {
    http(proxy, "GET", "/healthz", false).await
}

/// One HTTP/1.1 request to the instance's admin listener (with the bearer token when
/// `auth`): status code and the whole response.
async fn http(proxy: &Proxy, method: &str, path: &str, auth: bool) -> (u16, String) {
    let text = &proxy.config_text;
    let at = text.find("[admin]").expect("[admin] in the config");
    let addr = text[at..]
        .lines()
        .find(|l| l.trim_start().starts_with("listen"))
        .and_then(|l| l.split('"').nth(1))
        .expect("admin listen address")
        .to_string();
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("admin connect");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let auth = if auth {
        format!("Authorization: Bearer {ADMIN_TOKEN}\r\n")
    } else {
        String::new()
    };
    let body = if method == "POST" {
        "Content-Length: 0\r\n"
    } else {
        ""
    };
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}{body}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    (code, out)
}

// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_share_one_quarantine_and_release_exactly_once() {
    let pg = Postgres::start();
    let redis = Redis::start();
    let dns = DnsServer::start(zone());
    let mta = FakeMta::start(Script::default()).await;
    // Three instances starting at the same moment: the migrations run once (advisory
    // lock), none of them fails on a half-created schema.
    let r = Some(redis.port);
    let (a, b, c) = tokio::join!(
        instance_with("a", &pg, &mta, &dns, r),
        instance_with("b", &pg, &mta, &dns, r),
        instance_with("c", &pg, &mta, &dns, r)
    );

    // Accounts are cluster-wide too (Redis): frozen from A, seen and ended from B and C.
    let frozen = cli_of(
        "accounts",
        &a,
        &["freeze", "dave@example.org", "--reason", "phished"],
    )
    .await;
    assert!(frozen.ok, "{}{}", frozen.stdout, frozen.stderr);
    let seen = cli_of("accounts", &c, &["list", "--frozen", "--json"]).await;
    assert!(
        seen.ok && seen.stdout.contains("dave@example.org"),
        "{}{}",
        seen.stdout,
        seen.stderr
    );
    let ended = cli_of("accounts", &b, &["unfreeze", "dave@example.org"]).await;
    assert!(ended.ok, "{}{}", ended.stdout, ended.stderr);
    let seen = cli_of("accounts", &c, &["list", "--frozen", "--json"]).await;
    assert!(
        seen.ok && !seen.stdout.contains("dave@example.org"),
        "{}",
        seen.stdout
    );

    // Held by A, seen by B with the instance that accepted it.
    let (code, text) = send(&a, "news@bulk.example", "one").await;
    assert_eq!(code, 250, "{text}\n{}", a.log());
    let id = queued_id(&text);
    let rows = list(&b, false).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["id"], id.as_str());
    assert_eq!(rows[0]["instance"], "a");
    assert_eq!(rows[0]["state"], "held");
    let shown = cli(&c, &["show", "--json", &id]).await;
    assert!(
        shown.ok && shown.stdout.contains("\"instance\":\"a\""),
        "{}",
        shown.stdout
    );
    let raw = cli(&b, &["show", "--raw", &id]).await;
    assert_eq!(raw.stdout.as_bytes(), message("news@bulk.example", "one"));
    // The admin API of any instance sees it too.
    let (code, body) = http(&c, "GET", "/api/quarantine", true).await;
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains(&id) && body.contains("\"instance\":\"a\""),
        "{body}"
    );
    let (code, body) = http(&b, "GET", &format!("/api/quarantine/{id}"), true).await;
    assert!(code == 200 && body.contains("\"instance\":\"a\""), "{body}");

    // A, B and C release it at the same moment: the next hop gets it once.
    let before = mta.accepted().len();
    let args = ["release", id.as_str()];
    let (ra, rb, rc) = tokio::join!(cli(&a, &args), cli(&b, &args), cli(&c, &args));
    let outcomes = [&ra, &rb, &rc];
    let released = outcomes
        .iter()
        .filter(|r| r.ok && r.stdout.contains(": released ("))
        .count();
    assert_eq!(
        released,
        1,
        "exactly one release sends: {:?}",
        outcomes
            .iter()
            .map(|r| (&r.stdout, &r.stderr))
            .collect::<Vec<_>>()
    );
    for r in outcomes {
        // The others were told why: already released, or a release in progress.
        assert!(
            r.stdout.contains("released") || r.stderr.contains("releasing"),
            "{} / {}",
            r.stdout,
            r.stderr
        );
    }
    assert_eq!(
        mta.accepted().len() - before,
        1,
        "{}",
        mta.transcripts_debug()
    );
    let rows = list(&c, true).await;
    assert_eq!(rows[0]["state"], "released");
    let (code, body) = http(&b, "POST", &format!("/api/quarantine/{id}/release"), true).await;
    assert_eq!(
        code, 409,
        "the API of another instance knows it is released: {body}"
    );
    assert_eq!(mta.accepted().len() - before, 1);
    assert!(
        list(&a, false).await.is_empty(),
        "released entries leave the default view"
    );

    // A purge from C removes held entries of every instance, everywhere.
    let (_, t1) = send(&a, "x@bulk.example", "two").await;
    let (_, t2) = send(&b, "y@bulk.example", "three").await;
    let (id2, id3) = (queued_id(&t1), queued_id(&t2));
    assert_eq!(list(&c, false).await.len(), 2);
    tokio::time::sleep(Duration::from_millis(1100)).await; // received_at has 1 s steps
    let purged = cli(&c, &["purge", "--older-than", "0s"]).await;
    assert!(
        purged.ok && purged.stdout.contains("purged 3 entries"),
        "{}{}",
        purged.stdout,
        purged.stderr
    );
    for p in [&a, &b, &c] {
        assert!(list(p, true).await.is_empty());
        for id in [&id2, &id3] {
            let gone = cli(p, &["show", id]).await;
            assert!(
                !gone.ok && gone.stderr.contains("no quarantine entry"),
                "{}",
                gone.stderr
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_down_defers_held_mail_only_and_the_proxy_recovers_by_itself() {
    let pg = Postgres::start();
    let dns = DnsServer::start(zone());
    let mta = FakeMta::start(Script::default()).await;
    let a = instance("a", &pg, &mta, &dns).await;

    let (code, text) = send(&a, "news@bulk.example", "before").await;
    assert_eq!(code, 250, "{text}");
    let acknowledged = vec![queued_id(&text)];
    assert_eq!(healthz(&a).await.0, 200);

    pg.stop();
    // Held mail: 451 4.3.0 within the budget (3 s), the client keeps it.
    let (code, text) = send(&a, "news@bulk.example", "during").await;
    assert_eq!(code, 451, "{text}\n{}", a.log());
    assert!(text.starts_with("4.3.0"), "{text}");
    // Mail that is not held keeps flowing.
    let relayed_before = mta.accepted().len();
    let (code, text) = send(&a, "alice@sender.example", "flowing").await;
    assert_eq!(code, 250, "{text}");
    assert_eq!(mta.accepted().len(), relayed_before + 1);
    let (code, body) = healthz(&a).await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("quarantine store unavailable"), "{body}");

    pg.pg_ctl_start();
    // Recovers without a restart: the next held message is stored.
    let mut stored = None;
    for _ in 0..20 {
        let (code, text) = send(&a, "news@bulk.example", "after").await;
        if code == 250 {
            stored = Some(queued_id(&text));
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let after = stored.unwrap_or_else(|| panic!("never recovered:\n{}", a.log()));
    assert_eq!(healthz(&a).await.0, 200, "healthy again");
    // Exactly the acknowledged messages are in the store: nothing acknowledged lost,
    // the deferred one not stored.
    let mut ids: Vec<String> = list(&a, true)
        .await
        .iter()
        .map(|r| r["id"].as_str().unwrap_or_default().to_string())
        .collect();
    ids.sort();
    let mut want = acknowledged;
    want.push(after);
    want.sort();
    assert_eq!(ids, want);
    let subjects: Vec<String> = list(&a, true)
        .await
        .iter()
        .map(|r| r["subject"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(!subjects.contains(&"during".to_string()), "{subjects:?}");
}

// ---------------------------------------------------------------------------
// Faults under load
// ---------------------------------------------------------------------------

/// What a load of held messages was told: markers answered 250 (with their id) and
/// markers answered anything else (451, or a dropped connection).
#[derive(Default)]
struct Outcomes {
    acknowledged: Vec<(String, String)>,
    not_acknowledged: Vec<String>,
}

/// `senders` clients, each sending `per` held messages one after the other to `addr`.
/// A session that breaks (the instance killed) counts as not acknowledged.
async fn load(
    addr: std::net::SocketAddr,
    tag: &str,
    senders: usize,
    per: usize,
    out: std::sync::Arc<std::sync::Mutex<Outcomes>>,
) {
    let mut tasks = Vec::new();
    for s in 0..senders {
        let out = out.clone();
        let tag = tag.to_string();
        tasks.push(tokio::spawn(async move {
            for i in 0..per {
                let marker = format!("{tag}-{s}-{i}");
                let reply = one_held(addr, &marker).await;
                let mut o = out.lock().unwrap();
                match reply {
                    Some((250, text)) => o.acknowledged.push((marker, queued_id(&text))),
                    _ => o.not_acknowledged.push(marker),
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// One held message over a fresh session; `None` when the session broke.
async fn one_held(addr: std::net::SocketAddr, marker: &str) -> Option<(u16, String)> {
    let stream = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .ok()?
    .ok()?;
    let mut c = common::smtp_client::Client::from_tcp(stream);
    let step = |r: Option<common::smtp_client::Reply>, want: u16| r.filter(|r| r.code == want);
    step(c.try_read_reply().await, 220)?;
    for (line, want) in [
        (format!("EHLO {HELO}"), 250),
        ("MAIL FROM:<news@bulk.example>".to_string(), 250),
        ("RCPT TO:<user@example.org>".to_string(), 250),
        ("DATA".to_string(), 354),
    ] {
        c.try_send_raw(format!("{line}\r\n").as_bytes())
            .await
            .ok()?;
        step(c.try_read_reply().await, want)?;
    }
    let mut body = message("news@bulk.example", marker);
    body.extend_from_slice(b".\r\n");
    c.try_send_raw(&body).await.ok()?;
    let r = c.try_read_reply().await?;
    let _ = c.try_send_raw(b"QUIT\r\n").await;
    Some((r.code, r.text().to_string()))
}

/// Every entry in the store: subject (the marker) → id, with `list --all`.
async fn stored(proxy: &Proxy) -> std::collections::BTreeMap<String, String> {
    let run = cli(proxy, &["list", "--json", "--all", "--limit", "10000"]).await;
    assert!(run.ok, "{}", run.stderr);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&run.stdout).expect("json");
    rows.iter()
        .map(|r| {
            (
                r["subject"].as_str().unwrap_or_default().to_string(),
                r["id"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_stopped_during_a_load_keeps_exactly_what_was_acknowledged() {
    let pg = Postgres::start();
    let dns = DnsServer::start(zone());
    let mta = FakeMta::start(Script::default()).await;
    let a = instance("a", &pg, &mta, &dns).await;
    let out = std::sync::Arc::new(std::sync::Mutex::new(Outcomes::default()));
    let running = tokio::spawn(load(a.addr, "load", 8, 12, out.clone()));
    // Stop the server once some of the load is in, while the rest is still being sent.
    for _ in 0..600 {
        if out.lock().unwrap().acknowledged.len() >= 16 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pg.stop();
    running.await.expect("load");
    pg.pg_ctl_start();
    // The proxy reconnects by itself: held mail is stored again.
    let mut after = None;
    for _ in 0..20 {
        if let Some((250, text)) = one_held(a.addr, "after").await {
            after = Some(queued_id(&text));
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let after = after.unwrap_or_else(|| panic!("never recovered:\n{}", a.log()));

    let o = std::mem::take(&mut *out.lock().unwrap());
    assert!(o.acknowledged.len() >= 16, "the load ran before the stop");
    assert!(
        !o.not_acknowledged.is_empty(),
        "the stop came before the end of the load"
    );
    let mut want: std::collections::BTreeMap<String, String> =
        o.acknowledged.iter().cloned().collect();
    want.insert("after".into(), after);
    // Nothing acknowledged is lost, nothing deferred is stored, nothing is there twice.
    let got = stored(&a).await;
    eprintln!(
        "postgres stopped during a load: sent {}, acknowledged {}, deferred {}, stored {} (+1 after the restart)",
        o.acknowledged.len() + o.not_acknowledged.len(),
        o.acknowledged.len(),
        o.not_acknowledged.len(),
        got.len() - 1
    );
    assert_eq!(got, want, "deferred: {:?}", o.not_acknowledged);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_an_instance_mid_write_loses_nothing_acknowledged_and_leaves_no_torn_entry() {
    let pg = Postgres::start();
    let dns = DnsServer::start(zone());
    let mta = FakeMta::start(Script::default()).await;
    let a = instance("a", &pg, &mta, &dns).await;
    let b = instance("b", &pg, &mta, &dns).await;
    let out = std::sync::Arc::new(std::sync::Mutex::new(Outcomes::default()));
    let running = tokio::spawn(load(b.addr, "kill", 8, 12, out.clone()));
    for _ in 0..600 {
        if out.lock().unwrap().acknowledged.len() >= 16 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let killed = Command::new("kill")
        .args(["-9", &b.pid().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    running.await.expect("load");

    let o = std::mem::take(&mut *out.lock().unwrap());
    assert!(
        !o.not_acknowledged.is_empty(),
        "the kill came before the end of the load"
    );
    let entries = stored(&a).await;
    for (marker, id) in &o.acknowledged {
        assert_eq!(entries.get(marker), Some(id), "acknowledged {marker} lost");
    }
    // A message committed in the instant between the commit and the 250 may be there
    // unacknowledged (its client sends it again); it is whole, like every entry: row
    // and bytes are one transaction, a killed writer's open one is rolled back.
    for (marker, id) in &entries {
        let raw = cli(&a, &["show", "--raw", id]).await;
        assert!(raw.ok, "{}", raw.stderr);
        assert_eq!(
            raw.stdout.as_bytes(),
            message("news@bulk.example", marker),
            "{marker}"
        );
    }
    let unacked_stored = entries
        .keys()
        .filter(|m| o.not_acknowledged.contains(m))
        .count();
    assert!(
        unacked_stored <= 8,
        "at most one in-flight commit per sender: {unacked_stored}"
    );
    eprintln!(
        "kill -9 mid-write: sent {}, acknowledged {}, not acknowledged {}, stored {} ({unacked_stored} of them unacknowledged)",
        o.acknowledged.len() + o.not_acknowledged.len(),
        o.acknowledged.len(),
        o.not_acknowledged.len(),
        entries.len()
    );
    // The surviving instance keeps holding mail in the shared store.
    assert_eq!(one_held(a.addr, "survivor").await.map(|r| r.0), Some(250));
}

// ---------------------------------------------------------------------------
// quarantine migrate
// ---------------------------------------------------------------------------

fn embedded_meta(i: usize, state: &str) -> mailwarden::quarantine::Meta {
    mailwarden::quarantine::Meta {
        id: String::new(),
        received_at: 1_700_000_000 + (i as u64 % 7), // ties on received_at on purpose
        session: format!("S{i}"),
        listener: "inbound".into(),
        client: "192.0.2.1:25".into(),
        helo: HELO.into(),
        login: None,
        mail_from: format!("n{i}@bulk.example"),
        rcpts: vec!["user@example.org".into()],
        header_from: format!("n{i}@bulk.example"),
        subject: format!("m{i}"),
        size: 0,
        authentication_results: "mx; spf=pass".into(),
        flags: vec![],
        verdict: "quarantine".into(),
        reasons: vec!["bulk sender".into()],
        state: mailwarden::quarantine::State::parse(state).expect("a quarantine state"),
        instance: "old".into(),
    }
}

async fn migrate(dir: &std::path::Path, from: &std::path::Path, to: &std::path::Path) -> Run {
    let mut command = Command::new(bin());
    command
        .args(["quarantine", "migrate", "--from"])
        .arg(from)
        .arg("--to")
        .arg(to);
    let done = common::run_bounded(command, dir, CLI_DEADLINE).await;
    Run {
        ok: done.status.expect("finished").success(),
        stdout: String::from_utf8_lossy(&done.stdout).into_owned(),
        stderr: done.stderr,
    }
}

/// Everything a store holds: id → (state, instance, bytes).
async fn contents(
    store: &dyn mailwarden::quarantine::QuarantineStore,
) -> std::collections::BTreeMap<String, (String, String, Vec<u8>)> {
    let rows = store
        .list(&mailwarden::quarantine::index::Filter {
            all_states: true,
            limit: 100_000,
            ..Default::default()
        })
        .await
        .expect("list");
    let mut out = std::collections::BTreeMap::new();
    for r in rows {
        let id = mailwarden::quarantine::QuarantineId::parse(&r.id).expect("id");
        let meta = store.meta(&id).await.expect("meta");
        let bytes = store.message(&id).await.expect("message");
        out.insert(r.id, (meta.state.to_string(), meta.instance, bytes));
    }
    out
}

type Contents = std::collections::BTreeMap<String, (String, String, Vec<u8>)>;

/// Same ids with the same state, instance and bytes; a difference is shown briefly.
#[track_caller]
fn same(got: &Contents, want: &Contents) {
    let differ: Vec<String> = want
        .iter()
        .filter(|(id, v)| got.get(*id) != Some(v))
        .map(|(id, (state, instance, bytes))| {
            let g = got
                .get(id)
                .map(|(s, i, b)| (s.as_str(), i.as_str(), b.len()));
            format!(
                "{id}: want ({state}, {instance}, {} bytes), got {g:?}",
                bytes.len()
            )
        })
        .take(5)
        .collect();
    assert!(
        differ.is_empty() && got.len() == want.len(),
        "{} vs {} entries; {differ:?}",
        got.len(),
        want.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrate_moves_embedded_to_postgres_and_back_resumably() {
    use mailwarden::config::{Config, Purpose};
    use mailwarden::quarantine::store::{Opener, open};
    let pg = Postgres::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = |name: &str, text: String| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).expect("write config");
        p
    };
    let embedded = cfg("embedded.toml", "[quarantine]\ndir = \"q1\"\n".into());
    let back = cfg("back.toml", "[quarantine]\ndir = \"q2\"\n".into());
    let shared = cfg(
        "shared.toml",
        format!(
            "[quarantine]\nbackend = \"postgres\"\n\n[postgres]\nurl = \"{}\"\n",
            pg.url()
        ),
    );
    // 600 entries (more than one page of 500), in every state, with ties on time.
    let source = mailwarden::quarantine::Quarantine::open(&dir.path().join("q1")).expect("open");
    for i in 0..600 {
        let state = ["held", "releasing", "released"][i % 3];
        let body = format!("Subject: m{i}\r\n\r\n{}\r\n", "x".repeat(i % 50));
        let mut m = embedded_meta(i, state);
        m.size = body.len();
        source.store(&mut m, &[body.as_bytes()]).expect("store");
    }
    drop(source);
    let load = |p: &std::path::Path| Config::load_for(p, Purpose::Offline).expect("config");
    let (src, _) = open(&load(&embedded), Opener::Cli).await.expect("open q1");
    let before = contents(src.as_ref()).await;
    assert_eq!(before.len(), 600);

    // As if an earlier run was interrupted after copying some entries but before
    // deleting them from the source.
    let (dest, _) = open(&load(&shared), Opener::Cli)
        .await
        .expect("open postgres");
    for id in before.keys().take(300) {
        let id = mailwarden::quarantine::QuarantineId::parse(id).unwrap();
        let meta = src.meta(&id).await.unwrap();
        dest.import(meta, src.message(&id).await.unwrap())
            .await
            .unwrap();
    }

    let run = migrate(dir.path(), &embedded, &shared).await;
    assert!(run.ok, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("moved 600 entries") && run.stdout.contains("300 were already there"),
        "{}",
        run.stdout
    );
    assert!(
        contents(src.as_ref()).await.is_empty(),
        "the source is emptied"
    );
    same(&contents(dest.as_ref()).await, &before);
    // Running it again changes nothing.
    let again = migrate(dir.path(), &embedded, &shared).await;
    assert!(
        again.ok && again.stdout.contains("moved 0 entries"),
        "{}",
        again.stdout
    );

    // And back into a new embedded store.
    let run = migrate(dir.path(), &shared, &back).await;
    assert!(run.ok, "{}{}", run.stdout, run.stderr);
    assert!(contents(dest.as_ref()).await.is_empty());
    let (q2, _) = open(&load(&back), Opener::Cli).await.expect("open q2");
    same(&contents(q2.as_ref()).await, &before);

    // A store onto itself is refused (it would delete what it copies).
    let same = migrate(dir.path(), &back, &back).await;
    assert!(
        !same.ok && same.stderr.contains("same quarantine store"),
        "{}",
        same.stderr
    );
}
