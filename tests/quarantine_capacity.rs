//! Quarantine capacity through the real proxy (issue 13): `[quarantine] max_entries`,
//! `max_bytes` and `domain_share`. Past them held mail gets `451 4.3.1` (the client keeps
//! it; nothing is written, nothing relayed), one rate-limited WARN is logged, the
//! refusals are counted, and `/metrics` shows use versus capacity. An entry deleted by
//! the CLI, another process, frees room for the running proxy at once.
//!
//! The proxy: inbound for example.org, `[auth]` on with a policy that holds everything,
//! the loopback DNS server, a fake next hop, and the admin API for `/metrics`.

mod admin_common;
mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::dns::{DnsServer, Zone};
use common::fake_mta::{FakeMta, Script};
use common::smtp_client::Reply;
use common::{Proxy, ProxyOptions, bin, bounded, free_addr, show};

const HELO: &str = "mx.client.example";
const POLICY: &str = r#"
[[rule]]
name = "hold-all"
action = "quarantine"
reason = "test"
"#;

fn zone() -> Zone {
    [
        "flood.example",
        "other.example",
        "third.example",
        "fourth.example",
    ]
    .iter()
    .fold(Zone::new(), |z, d| z.txt(d, "v=spf1 ip4:127.0.0.1 -all"))
}

struct Env {
    _dns: DnsServer,
    mta: FakeMta,
    proxy: Proxy,
    admin: SocketAddr,
}

/// `capacity`: the `[quarantine]` lines under test.
async fn start(capacity: &str) -> Env {
    let dns = DnsServer::start(zone());
    let mta = FakeMta::start(Script::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, POLICY).unwrap();
    let token = admin_common::write_token(dir.path());
    let admin = free_addr();
    let mut o = ProxyOptions::smtp(mta.addr);
    o.auth = true;
    o.role = "inbound".into();
    o.local_domains = vec!["example.org".into()];
    o.dns_nameserver = Some(dns.nameserver());
    o.auth_extra = vec![format!("policy_file = {:?}", policy.to_str().unwrap())];
    o.extra_toml = vec![
        format!(
            "[admin]\nenabled = true\nlisten = \"{admin}\"\ntoken_file = {:?}\n",
            token.to_str().unwrap()
        ),
        format!("[quarantine]\n{capacity}\n"),
    ];
    let proxy = Proxy::start_in(o, dir).await;
    Env {
        _dns: dns,
        mta,
        proxy,
        admin,
    }
}

fn message(from: &str, marker: &str) -> Vec<u8> {
    format!(
        "From: {from}\r\nTo: bob@example.org\r\nSubject: {marker}\r\n\
         Date: Tue, 25 Nov 2025 10:00:00 +0000\r\nMessage-ID: <{marker}@test.example>\r\n\r\n\
         body {marker}\r\n"
    )
    .into_bytes()
}

/// One message from envelope sender `mail_from` with header From `from`; the final reply.
async fn send(proxy: &Proxy, mail_from: &str, from: &str, marker: &str) -> Reply {
    let mut c = proxy.connect_ehlo(HELO).await;
    let r = c
        .send_mail(mail_from, &["bob@example.org"], &message(from, marker))
        .await;
    let _ = c.cmd("QUIT").await;
    r
}

fn queued(r: &Reply) -> Option<String> {
    r.text()
        .strip_prefix("2.0.0 Ok: queued as ")
        .map(str::to_string)
        .filter(|_| r.code == 250)
}

#[track_caller]
fn assert_held(r: &Reply, what: &str) -> String {
    queued(r).unwrap_or_else(|| panic!("{what}: expected queued as ID, got {}", show(&r.raw)))
}

#[track_caller]
fn assert_deferred(r: &Reply, what: &str) {
    assert!(
        r.is("451 4.3.1"),
        "{what}: expected 451 4.3.1, got {}",
        show(&r.raw)
    );
}

fn entries(root: &Path) -> usize {
    std::fs::read_dir(root.join("entries")).unwrap().count()
}

async fn metric(admin: SocketAddr, series: &str) -> f64 {
    let auth = format!("Bearer {}", admin_common::TOKEN);
    let r =
        admin_common::request(admin, "GET", "/metrics", &[("Authorization", &auth)], None).await;
    admin_common::metric(&r.text(), series)
}

/// `mailwarden quarantine -c CONFIG ARGS` in the proxy's directory: another process.
async fn cli(proxy: &Proxy, args: &[&str]) -> common::Finished {
    let mut command = Command::new(bin());
    command
        .args(["quarantine", "-c"])
        .arg(&proxy.config_path)
        .args(args)
        .current_dir(proxy.dir.path());
    common::run_bounded(command, proxy.dir.path(), Duration::from_secs(60)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_takes_only_its_share_and_a_full_quarantine_defers_without_loss() {
    bounded(async {
        let env = start("max_entries = 4\nmax_bytes = 1000000\ndomain_share = 0.5").await;
        let (proxy, root) = (&env.proxy, env.proxy.dir.path().join("var/quarantine"));

        // One domain floods: it gets half of max_entries, then 451 4.3.1.
        assert_held(
            &send(proxy, "a@flood.example", "a@flood.example", "f1").await,
            "f1",
        );
        assert_held(
            &send(proxy, "b@flood.example", "b@flood.example", "f2").await,
            "f2",
        );
        assert_deferred(
            &send(proxy, "c@flood.example", "c@flood.example", "f3").await,
            "f3",
        );
        // A bounce (null sender) is accounted to its From domain: the same share.
        assert_deferred(
            &send(proxy, "", "no-reply@Flood.Example", "f4").await,
            "bounce",
        );
        // Another domain still gets in, up to the whole capacity.
        assert_held(
            &send(proxy, "x@other.example", "x@other.example", "o1").await,
            "o1",
        );
        let third = assert_held(
            &send(proxy, "y@third.example", "y@third.example", "t1").await,
            "t1",
        );
        // Full: every domain is deferred now.
        assert_deferred(
            &send(proxy, "z@fourth.example", "z@fourth.example", "z1").await,
            "full",
        );

        // Deferred means nothing written and nothing relayed: the client keeps it.
        assert_eq!(entries(&root), 4);
        assert!(
            env.mta.messages().is_empty(),
            "{} relayed",
            env.mta.messages().len()
        );

        // One WARN for the three refusals (rate-limited), each counted by reason.
        let log = proxy
            .wait_log("quarantine full", Duration::from_secs(30))
            .await;
        let warns = log
            .lines()
            .filter(|l| l.contains("WARN") && l.contains("quarantine full"))
            .count();
        assert_eq!(warns, 1, "{log}");
        let refused =
            |reason: &str| format!("mailwarden_quarantine_refused_total{{reason=\"{reason}\"}}");
        assert_eq!(metric(env.admin, &refused("domain_share")).await, 2.0);
        assert_eq!(metric(env.admin, &refused("full")).await, 1.0);
        assert_eq!(
            metric(env.admin, "mailwarden_quarantine_entries").await,
            4.0
        );
        assert_eq!(
            metric(env.admin, "mailwarden_quarantine_max_entries").await,
            4.0
        );
        assert_eq!(
            metric(env.admin, "mailwarden_quarantine_max_bytes").await,
            1_000_000.0
        );
        let bytes = metric(env.admin, "mailwarden_quarantine_bytes").await;
        assert!(bytes > 0.0 && bytes < 4000.0, "{bytes}");

        // The CLI (another process) deletes an entry: the running proxy has room again.
        let run = cli(proxy, &["delete", &third]).await;
        assert!(run.success(), "delete: {}", run.stderr);
        assert_held(
            &send(proxy, "z@fourth.example", "z@fourth.example", "z2").await,
            "after a CLI delete",
        );
        assert_eq!(entries(&root), 4);
        assert_eq!(
            metric(env.admin, "mailwarden_quarantine_entries").await,
            4.0
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_big_message_cannot_take_more_than_the_byte_share() {
    bounded(async {
        let env = start("max_bytes = 4000\ndomain_share = 0.25").await;
        let proxy = &env.proxy;
        let mut big = message("a@flood.example", "big");
        big.extend(std::iter::repeat_n(b'x', 1200));
        big.extend_from_slice(b"\r\n");
        let mut c = proxy.connect_ehlo(HELO).await;
        let r = c
            .send_mail("a@flood.example", &["bob@example.org"], &big)
            .await;
        assert_deferred(&r, "a message larger than a quarter of max_bytes");
        assert_held(
            &send(proxy, "b@flood.example", "b@flood.example", "small").await,
            "a small one from the same domain",
        );
    })
    .await;
}
