//! Deploy-safe in front of an MTA (issue 19), against the real `mailwarden` binary and
//! fake next hops on loopback (the same with a real Postfix: `tests/postfix_e2e.rs`):
//!
//! * submission means authenticated: `MAIL` without AUTH gets `530 5.7.0` (pipelined,
//!   after a failed AUTH, after STARTTLS, after RSET/EHLO), except from `[outbound]
//!   trusted_networks`, whose mail the outbound detector counts (live in `accounts show`);
//! * a next hop per listener (`[[listener]] next_hop = "NAME"`, `[next_hop.NAME]`), and a
//!   release goes back through the next hop of the role that accepted the entry, with the
//!   original client and login (XCLIENT `LOGIN=`); a 5xx there is a permanent refusal (the
//!   entry stays held, the CLI exits non-zero), a 4xx a retry later;
//! * `xclient = "auto"`: relays without XCLIENT only through a next hop that does not
//!   trust our address (probed), with one ERROR line; a trusting one gets nothing, 451;
//! * paths resolve against the config file's directory, from any working directory; a
//!   CLI command that cannot act exits non-zero, and `quarantine list` never creates a
//!   store;
//! * unfreeze resets the account's windows;
//! * `check-config` refuses what `run` refuses.
//!
//! Every test here failed before issue 19 (the named next hops and the listener key were
//! unknown fields; the rest behaved as the issue describes).

mod admin_common;
mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use base64::Engine;
use common::fake_mta::{Act, FakeMta, RelayRules, Script};
use common::smtp_client::{Client, simple_message};
use common::{Finished, Proxy, ProxyOptions, STEP, bin, bounded, free_addr, show};

const USER: &str = "alice@example.org";
const PASSWORD: &str = "Quokka-Zebra-4711-deploy";
const CLI_DEADLINE: Duration = Duration::from_secs(30);

fn plain(user: &str, pass: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{pass}"))
}

/// Connects from the loopback address `ip` (all of 127.0.0.0/8 is local).
async fn connect_from(ip: &str, addr: SocketAddr) -> Client {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind(format!("{ip}:0").parse().expect("ip"))
        .expect("bind a loopback source address");
    let tcp = tokio::time::timeout(STEP, sock.connect(addr))
        .await
        .expect("connect timed out")
        .expect("connect");
    let mut c = Client::from_tcp(tcp);
    assert_eq!(c.read_reply().await.code, 220);
    c
}

/// The quarantine id in mailwarden's own `250 2.0.0 Ok: queued as <ID>` (a message the
/// fake next hop took says `queued as FAKE1`: not held).
fn held_id(r: &common::smtp_client::Reply) -> Option<String> {
    let id = r.text().strip_prefix("2.0.0 Ok: queued as ")?;
    (r.code == 250 && id.len() == 26 && !id.starts_with("FAKE")).then(|| id.to_string())
}

/// `mailwarden ARGS...` run in `cwd`, bounded in time.
async fn cli(cwd: &Path, args: &[&str]) -> Finished {
    let mut command = Command::new(bin());
    command
        .args(args)
        .current_dir(cwd)
        .env_remove("SUDO_USER")
        .env("USER", "test-admin");
    let out = tempfile::tempdir().expect("tempdir");
    let done = common::run_bounded(command, out.path(), CLI_DEADLINE).await;
    assert!(
        done.status.is_some(),
        "`mailwarden {args:?}` did not finish within {CLI_DEADLINE:?}"
    );
    done
}

/// A next hop applying Postfix's relay rules (`mynetworks` given), with AUTH for USER.
async fn next_hop(mynetworks: &[&str], xclient: bool) -> FakeMta {
    let mut script = Script {
        relay_rules: Some(RelayRules {
            local_domains: vec!["example.org".into()],
            mynetworks: mynetworks.iter().map(|s| s.to_string()).collect(),
        }),
        ..Script::default()
    }
    .with_auth();
    if !xclient {
        script = script.without_cap("XCLIENT");
    }
    let mta = FakeMta::start(script).await;
    mta.set_auth_users(&[(USER, PASSWORD)]);
    mta
}

/// Turns on the admin API (for `/metrics`) on a free loopback port with a token file in
/// `dir`; returns its address.
fn with_admin(o: &mut ProxyOptions, dir: &Path) -> SocketAddr {
    let token = admin_common::write_token(dir);
    let admin = free_addr();
    o.extra_toml.push(format!(
        "[admin]\nenabled = true\nlisten = \"{admin}\"\ntoken_file = {:?}\n",
        token.to_str().unwrap()
    ));
    admin
}

/// One series of the proxy's `/metrics`.
async fn metric(admin: SocketAddr, series: &str) -> f64 {
    let auth = format!("Bearer {}", admin_common::TOKEN);
    let r =
        admin_common::request(admin, "GET", "/metrics", &[("Authorization", &auth)], None).await;
    admin_common::metric(&r.text(), series)
}

/// A submission listener (STARTTLS) relaying to `mta`, no trusted networks.
fn submission(mta: &FakeMta) -> ProxyOptions {
    let mut o = ProxyOptions::smtp(mta.addr);
    o.role = "submission".into();
    o.local_domains = vec!["example.org".into()];
    o.starttls = true;
    o.trusted_loopback = false;
    o
}

// ---------------------------------------------------------------------------
// Submission means authenticated
// ---------------------------------------------------------------------------

/// The report: an unsigned spoof of a `p=reject` domain from an outside address
/// to a local user, sent to the submission port, got 250 and was delivered unchecked.
/// Now MAIL is refused whatever the client tries first, and the next hop sees nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submission_without_auth_is_refused_every_way_round() {
    bounded(async {
        let mta = next_hop(&["127.0.0.1/32"], true).await;
        let proxy = Proxy::start(submission(&mta)).await;
        let spoof = simple_message("ceo@bank.example", "bob@example.org", "wire", "pay now");

        // Plain text, everything pipelined in one write.
        let mut c = connect_from("127.0.0.9", proxy.addr).await;
        c.ehlo("attacker.example").await;
        c.send_raw(b"MAIL FROM:<ceo@bank.example>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
            .await;
        let mail = c.read_reply().await;
        assert!(mail.is("530 5.7.0"), "MAIL: {}", show(&mail.raw));
        assert_eq!(c.read_reply().await.code, 503, "RCPT without a transaction");
        assert_eq!(c.read_reply().await.code, 503, "DATA without a transaction");

        // After STARTTLS, a failed AUTH, RSET and a new EHLO: still refused.
        c.starttls().await;
        c.ehlo("attacker.example").await;
        let a = c.cmd(&format!("AUTH PLAIN {}", plain(USER, "wrong"))).await;
        assert_eq!(a.code, 535, "{}", show(&a.raw));
        for step in ["RSET", "EHLO again.example", "NOOP"] {
            let r = c.cmd(step).await;
            assert_eq!(r.code, 250, "{step}: {}", show(&r.raw));
            let mail = c.cmd("MAIL FROM:<ceo@bank.example>").await;
            assert!(mail.is("530 5.7.0"), "after {step}: {}", show(&mail.raw));
        }
        // HELO (no ESMTP, so no AUTH at all) and the null sender: the same.
        let r = c.cmd("HELO old.example").await;
        assert_eq!(r.code, 250);
        let mail = c.cmd("MAIL FROM:<>").await;
        assert!(mail.is("530 5.7.0"), "null sender: {}", show(&mail.raw));
        let _ = c.cmd("QUIT").await;

        // The same client after a successful AUTH: accepted and relayed.
        let mut c = connect_from("127.0.0.9", proxy.addr).await;
        c.ehlo("laptop.example.org").await;
        c.starttls().await;
        c.ehlo("laptop.example.org").await;
        let a = c
            .cmd(&format!("AUTH PLAIN {}", plain(USER, PASSWORD)))
            .await;
        assert_eq!(a.code, 235, "{}", show(&a.raw));
        let fin = c
            .send_mail(
                USER,
                &["y@other.example"],
                &simple_message(USER, "y@other.example", "ok", "hi"),
            )
            .await;
        assert_eq!(fin.code, 250, "{}", show(&fin.raw));
        let _ = c.cmd("QUIT").await;

        let accepted = mta.accepted();
        assert_eq!(accepted.len(), 1, "{}", mta.transcripts_debug());
        assert!(!accepted[0].raw.windows(7).any(|w| w == b"pay now"));
        let commands = mta.all_commands();
        assert!(
            !commands.iter().any(|l| l.contains("bank.example")),
            "the refused sender reached the next hop: {commands:?}"
        );
        drop(spoof);
        assert!(proxy.log().contains("submission without AUTH refused"));
    })
    .await
}

/// `[outbound] trusted_networks` may submit without AUTH, and is counted: the envelope
/// sender is the account, shown live by `accounts show` (from the running proxy, not a
/// snapshot). A neighbour outside the network is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_network_submissions_are_accounted() {
    bounded(async {
        let mta = next_hop(&["127.0.0.1/32"], true).await;
        let mut o = submission(&mta);
        o.extra_toml = vec![
            "[outbound]".into(),
            "trusted_networks = [\"127.0.0.1/32\"]".into(),
            // A snapshot far in the future: only a live answer can show the count.
            "snapshot_interval = \"1h\"".into(),
        ];
        let proxy = Proxy::start(o).await;

        let mut c = connect_from("127.0.0.1", proxy.addr).await;
        c.ehlo("app.example.org").await;
        let from = "app@example.org";
        let fin = c
            .send_mail(
                from,
                &["y@other.example"],
                &simple_message(from, "y@other.example", "t", "x"),
            )
            .await;
        assert_eq!(fin.code, 250, "{}", show(&fin.raw));
        let _ = c.cmd("QUIT").await;

        let mut c = connect_from("127.0.0.2", proxy.addr).await;
        c.ehlo("neighbour.example").await;
        let mail = c.cmd(&format!("MAIL FROM:<{from}>")).await;
        assert!(mail.is("530 5.7.0"), "{}", show(&mail.raw));
        let _ = c.cmd("QUIT").await;
        assert_eq!(mta.accepted().len(), 1);

        let config = proxy.config_path.to_str().unwrap().to_string();
        let elsewhere = tempfile::tempdir().expect("tempdir");
        let shown = cli(
            elsewhere.path(),
            &["accounts", "-c", &config, "show", from, "--json"],
        )
        .await;
        assert!(shown.success(), "{}", shown.stderr);
        let v: serde_json::Value = serde_json::from_slice(&shown.stdout).expect("json");
        assert_eq!(v["messages_total"], 1, "{v}");
        assert!(
            v.get("counters_as_of").is_none(),
            "live figures carry no snapshot time: {v}"
        );
    })
    .await
}

// ---------------------------------------------------------------------------
// A next hop per listener; release through the accepting role's next hop
// ---------------------------------------------------------------------------

struct TwoRoles {
    inbound_mta: FakeMta,
    submission_mta: FakeMta,
    proxy: Proxy,
    submission_addr: SocketAddr,
}

/// An inbound listener relaying to `[next_hop]` and a submission listener (STARTTLS,
/// outbound detector on) relaying to `[next_hop.submission]`.
async fn two_roles() -> TwoRoles {
    let inbound_mta = next_hop(&[], true).await;
    let submission_mta = next_hop(&[], true).await;
    let mut o = ProxyOptions::smtp(inbound_mta.addr);
    o.role = "inbound".into();
    o.local_domains = vec!["example.org".into()];
    let submission_addr = free_addr();
    let cert = common::cert_path();
    let key = common::key_path();
    o.extra_toml = vec![format!(
        "[[listener]]\naddress = \"{submission_addr}\"\nrole = \"submission\"\n\
         next_hop = \"submission\"\ntls_cert = {cert:?}\ntls_key = {key:?}\n\n\
         [next_hop.submission]\naddress = \"smtp://{}\"\ntls = \"off\"\n",
        submission_mta.addr
    )];
    let proxy = Proxy::start(o).await;
    TwoRoles {
        inbound_mta,
        submission_mta,
        proxy,
        submission_addr,
    }
}

async fn login(addr: SocketAddr) -> Client {
    let mut c = connect_from("127.0.0.1", addr).await;
    c.ehlo("laptop.example.org").await;
    c.starttls().await;
    c.ehlo("laptop.example.org").await;
    let a = c
        .cmd(&format!("AUTH PLAIN {}", plain(USER, PASSWORD)))
        .await;
    assert_eq!(a.code, 235, "{}", show(&a.raw));
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_listener_relays_to_its_own_next_hop_and_release_follows_the_role() {
    bounded(async {
        let env = two_roles().await;
        let config = env.proxy.config_path.to_str().unwrap().to_string();

        // Inbound mail to the inbound next hop.
        let mut c = connect_from("127.0.0.5", env.proxy.addr).await;
        c.ehlo("mx.other.example").await;
        let m = simple_message("x@other.example", "bob@example.org", "in", "inbound");
        assert_eq!(
            c.send_mail("x@other.example", &["bob@example.org"], &m)
                .await
                .code,
            250
        );
        let _ = c.cmd("QUIT").await;
        assert_eq!(env.inbound_mta.accepted().len(), 1);
        assert_eq!(env.submission_mta.accepted().len(), 0);

        // A submission to the submission next hop, as the logged-in user.
        let mut c = login(env.submission_addr).await;
        let m = simple_message(USER, "y@other.example", "out", "submission");
        assert_eq!(c.send_mail(USER, &["y@other.example"], &m).await.code, 250);
        let _ = c.cmd("QUIT").await;
        assert_eq!(env.inbound_mta.accepted().len(), 1);
        assert_eq!(env.submission_mta.accepted().len(), 1);

        // Freeze the account: its next message is held.
        let f = cli(
            env.proxy.dir.path(),
            &[
                "accounts", "-c", &config, "freeze", USER, "--reason", "test",
            ],
        )
        .await;
        assert!(f.success(), "{}", f.stderr);
        let mut c = login(env.submission_addr).await;
        let m = simple_message(USER, "y@other.example", "held", "frozen-marker");
        let fin = c.send_mail(USER, &["y@other.example"], &m).await;
        let id = held_id(&fin).unwrap_or_else(|| panic!("not held: {}", show(&fin.raw)));
        let _ = c.cmd("QUIT").await;

        // The next hop refuses for good: a permanent refusal, held, non-zero exit.
        env.submission_mta
            .update(|s| s.rcpt = Act::reply("554 5.7.1 <y@other.example>: Relay access denied"));
        let r = cli(
            env.proxy.dir.path(),
            &["quarantine", "-c", &config, "release", &id],
        )
        .await;
        assert!(
            !r.success(),
            "release reported success: {}",
            r.stdout_text()
        );
        assert!(r.stderr.contains("permanent refusal"), "{}", r.stderr);
        assert!(!r.stderr.contains("retry later"), "{}", r.stderr);
        let listed = cli(
            env.proxy.dir.path(),
            &["quarantine", "-c", &config, "list", "--json"],
        )
        .await;
        let rows: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("list json");
        assert_eq!(rows[0]["state"], "held", "{rows}");

        // A temporary refusal: retry later, still held.
        env.submission_mta
            .update(|s| s.rcpt = Act::reply("451 4.3.0 try again"));
        let r = cli(
            env.proxy.dir.path(),
            &["quarantine", "-c", &config, "release", &id],
        )
        .await;
        assert!(!r.success());
        assert!(r.stderr.contains("retry later"), "{}", r.stderr);

        // Accepted: through the submission next hop, told the client and the login.
        env.submission_mta
            .update(|s| s.rcpt = Act::reply("250 2.1.5 Ok"));
        let r = cli(
            env.proxy.dir.path(),
            &["quarantine", "-c", &config, "release", &id],
        )
        .await;
        assert!(r.success(), "{}", r.stderr);
        assert_eq!(
            env.inbound_mta.accepted().len(),
            1,
            "released to the inbound next hop"
        );
        let released = env.submission_mta.accepted();
        assert_eq!(released.len(), 2);
        let conn = &env.submission_mta.conns()[released[1].conn];
        assert_eq!(
            conn.xclient_attr("LOGIN").as_deref(),
            Some(USER),
            "{conn:?}"
        );
        assert_eq!(conn.xclient_attr("ADDR").as_deref(), Some("127.0.0.1"));
        assert!(released[1].data_str().contains("frozen-marker"));
    })
    .await
}

// ---------------------------------------------------------------------------
// xclient = "auto"
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xclient_auto_never_relays_through_a_next_hop_that_trusts_us() {
    bounded(async {
        // Postfix with `mynetworks = 127.0.0.0/8` that does not authorize XCLIENT for us:
        // every client would look like 127.0.0.1 and be relayed.
        let mta = next_hop(&["127.0.0.0/8"], false).await;
        let mut o = submission(&mta);
        o.xclient = "auto".into();
        o.trusted_loopback = true;
        let dir = tempfile::tempdir().expect("tempdir");
        let admin = with_admin(&mut o, dir.path());
        let proxy = Proxy::start_in(o, dir).await;
        let mut c = connect_from("127.0.0.1", proxy.addr).await;
        c.ehlo("app.example.org").await;
        c.expect("MAIL FROM:<app@example.org>", "250").await;
        let r = c.cmd("RCPT TO:<y@other.example>").await;
        assert_eq!(r.code / 100, 4, "RCPT: {}", show(&r.raw));
        let _ = c.cmd("QUIT").await;
        assert!(mta.accepted().is_empty(), "{}", mta.transcripts_debug());
        let commands = mta.all_commands();
        assert!(
            !commands.iter().any(|l| l.contains("y@other.example")),
            "the recipient reached a next hop that would relay it: {commands:?}"
        );
        proxy
            .wait_log(
                "trusts our address: refusing to relay",
                Duration::from_secs(10),
            )
            .await;
        assert_eq!(
            metric(admin, "mailwarden_relay_unsafe_next_hop_total").await,
            1.0
        );
        assert_eq!(
            metric(admin, "mailwarden_relay_without_xclient_total").await,
            0.0
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xclient_auto_relays_through_a_next_hop_that_does_not_trust_us_with_one_error() {
    bounded(async {
        // Postfix without XCLIENT for us and without us in mynetworks: it applies its
        // rules to us as to any outside client, so AUTH is what makes it relay.
        let mta = next_hop(&[], false).await;
        let mut o = submission(&mta);
        o.xclient = "auto".into();
        let dir = tempfile::tempdir().expect("tempdir");
        let admin = with_admin(&mut o, dir.path());
        let proxy = Proxy::start_in(o, dir).await;
        for n in 0..2 {
            let mut c = login(proxy.addr).await;
            let m = simple_message(USER, "y@other.example", "auto", &format!("auto-{n}"));
            let fin = c.send_mail(USER, &["y@other.example"], &m).await;
            assert_eq!(fin.code, 250, "{}", show(&fin.raw));
            let _ = c.cmd("QUIT").await;
        }
        assert_eq!(mta.accepted().len(), 2);
        // Each connection was probed (MAIL FROM:<>, a foreign RCPT, RSET) before use.
        for conn in mta.conns().iter().filter(|c| !c.commands.is_empty()) {
            assert!(
                conn.commands
                    .iter()
                    .any(|l| l.contains("mailwarden-relay-probe.invalid")),
                "{:?}",
                conn.commands
            );
        }
        let log = proxy.log();
        assert_eq!(
            log.matches("relaying without XCLIENT").count(),
            1,
            "one ERROR for the first such session:\n{log}"
        );
        assert!(log.contains("ERROR"), "{log}");
        assert_eq!(
            metric(admin, "mailwarden_relay_without_xclient_total").await,
            2.0
        );
    })
    .await
}

// ---------------------------------------------------------------------------
// Paths, CLI exit codes
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_follow_the_config_file_and_cli_failures_are_errors() {
    bounded(async {
        let mta = next_hop(&["127.0.0.1/32"], true).await;
        let dir = tempfile::tempdir().expect("tempdir");
        // A relative policy file that holds everything: relative to the config file.
        std::fs::write(
            dir.path().join("hold.toml"),
            "[[rule]]\nname = \"hold-all\"\naction = \"quarantine\"\n",
        )
        .expect("policy");
        let mut o = ProxyOptions::smtp(mta.addr);
        o.role = "inbound".into();
        o.local_domains = vec!["example.org".into()];
        o.auth = true;
        o.auth_extra = vec!["policy_file = \"hold.toml\"".into()];
        let proxy = Proxy::start_in(o, dir).await;
        let config = proxy.config_path.to_str().unwrap().to_string();
        for n in 0..3 {
            let mut c = proxy.connect_ehlo("mx.other.example").await;
            let m = simple_message(
                "x@other.example",
                "bob@example.org",
                "held",
                &format!("h{n}"),
            );
            let fin = c
                .send_mail("x@other.example", &["bob@example.org"], &m)
                .await;
            assert!(held_id(&fin).is_some(), "{}", show(&fin.raw));
            let _ = c.cmd("QUIT").await;
        }

        // From another working directory, with an absolute -c: the same store.
        let elsewhere = tempfile::tempdir().expect("tempdir");
        let listed = cli(elsewhere.path(), &["quarantine", "-c", &config, "list"]).await;
        assert!(listed.success(), "{}", listed.stderr);
        assert!(
            listed.stdout_text().contains("3 entries"),
            "{}",
            listed.stdout_text()
        );
        let checked = cli(elsewhere.path(), &["check-config", "-c", &config]).await;
        assert!(
            checked.success(),
            "relative policy_file: {}",
            checked.stderr
        );
        assert!(
            std::fs::read_dir(elsewhere.path())
                .unwrap()
                .next()
                .is_none(),
            "the CLI created files in its working directory"
        );

        // A store that does not exist: an error, and nothing created.
        let empty = tempfile::tempdir().expect("tempdir");
        let other = empty.path().join("other.toml");
        std::fs::write(&other, "[quarantine]\ndir = \"nowhere\"\n").expect("config");
        let other = other.to_str().unwrap();
        let listed = cli(empty.path(), &["quarantine", "-c", other, "list"]).await;
        assert!(!listed.success(), "{}", listed.stdout_text());
        assert!(
            listed.stderr.contains("no quarantine store"),
            "{}",
            listed.stderr
        );
        assert!(
            !empty.path().join("nowhere").exists(),
            "list created a store"
        );

        // No proxy reads this spool: freeze fails, and leaves no command behind that a
        // later start would apply.
        let frozen = cli(
            empty.path(),
            &["accounts", "-c", other, "freeze", USER, "--wait", "1s"],
        )
        .await;
        assert!(!frozen.success(), "{}", frozen.stdout_text());
        assert!(frozen.stderr.contains("NOT done"), "{}", frozen.stderr);
        let spool = empty.path().join("var/outbound/commands");
        let left: Vec<_> = std::fs::read_dir(&spool)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "commands left in the spool: {left:?}");
    })
    .await
}

// ---------------------------------------------------------------------------
// Unfreeze resets the windows
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfreeze_resets_the_windows() {
    bounded(async {
        let mta = next_hop(&["127.0.0.1/32"], true).await;
        let mut o = submission(&mta);
        o.extra_toml = vec![
            "[outbound]".into(),
            "trusted_networks = [\"127.0.0.1/32\"]".into(),
            "windows = [{ window = \"1h\", messages = 2, recipients = 100 }]".into(),
            "[outbound.adaptive]".into(),
            "enabled = false".into(),
            // The host is counted too (issue 13) and would be frozen by the same burst;
            // unfreezing the sender does not unfreeze the host. This test is about the
            // sender's windows: the host gets room.
            "[outbound.client]".into(),
            "windows = [{ window = \"1h\", messages = 100 }]".into(),
        ];
        let proxy = Proxy::start(o).await;
        let config = proxy.config_path.to_str().unwrap().to_string();
        let from = "app@example.org";
        let send = |n: u32| {
            let addr = proxy.addr;
            async move {
                let mut c = connect_from("127.0.0.1", addr).await;
                c.ehlo("app.example.org").await;
                let m = simple_message(from, "y@other.example", "w", &format!("w{n}"));
                let fin = c.send_mail(from, &["y@other.example"], &m).await;
                let _ = c.cmd("QUIT").await;
                fin
            }
        };
        for n in 0..2 {
            assert_eq!(send(n).await.code, 250);
        }
        let third = send(2).await;
        assert!(
            held_id(&third).is_some(),
            "the third is held: {}",
            show(&third.raw)
        );
        assert_eq!(mta.accepted().len(), 2);

        let u = cli(
            proxy.dir.path(),
            &[
                "accounts", "-c", &config, "unfreeze", from, "--reason", "checked",
            ],
        )
        .await;
        assert!(u.success(), "{}", u.stderr);
        let next = send(3).await;
        assert!(
            next.code == 250 && held_id(&next).is_none(),
            "re-frozen right after unfreeze: {}",
            show(&next.raw)
        );
        assert_eq!(mta.accepted().len(), 3);

        let shown = cli(proxy.dir.path(), &["accounts", "-c", &config, "show", from]).await;
        let text = shown.stdout_text();
        assert!(text.contains("by cli:test-admin: checked"), "{text}");
        assert!(text.contains("state:        relaying"), "{text}");
    })
    .await
}

// ---------------------------------------------------------------------------
// check-config runs what run runs
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_refuses_what_run_refuses() {
    bounded(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = free_addr();
        let b = free_addr();
        let cert = common::cert_path();
        let key = common::key_path();
        let open_token = dir.path().join("open.token");
        std::fs::write(&open_token, "0123456789abcdef0123456789abcdef\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&open_token, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::write(dir.path().join("broken-freezes.json"), "not json").unwrap();
        let base = "local_domains = [\"example.org\"]\n[next_hop]\naddress = \"maildir:md\"\n";
        let cases: Vec<(&str, String, &str)> = vec![
            (
                "duplicate listener addresses",
                format!("{base}[[listener]]\naddress = \"{a}\"\n[[listener]]\naddress = \"{a}\"\n"),
                "listener[1].address",
            ),
            (
                "submission listener off loopback without TLS material",
                format!("{base}[[listener]]\naddress = \"192.0.2.1:587\"\nrole = \"submission\"\n"),
                "listener[0].tls_cert",
            ),
            (
                "unknown named next hop",
                format!("{base}[[listener]]\naddress = \"{a}\"\nnext_hop = \"nope\"\n"),
                "listener[0].next_hop",
            ),
            (
                "missing admin token file",
                format!(
                    "{base}[[listener]]\naddress = \"{a}\"\n[admin]\nenabled = true\nlisten = \"{b}\"\ntoken_file = \"missing.token\"\n"
                ),
                "token_file",
            ),
            (
                "unreadable outbound freeze file",
                format!(
                    "{base}[[listener]]\naddress = \"{a}\"\nrole = \"submission\"\n[outbound]\nfreeze_file = \"broken-freezes.json\"\n"
                ),
                "broken-freezes.json",
            ),
            (
                "admin token file readable by others",
                format!(
                    "{base}[[listener]]\naddress = \"{a}\"\n[admin]\nenabled = true\nlisten = \"{b}\"\ntoken_file = \"open.token\"\n"
                ),
                "0644",
            ),
        ];
        for (what, text, needle) in cases {
            let path = dir.path().join("bad.toml");
            std::fs::write(&path, &text).unwrap();
            let p = path.to_str().unwrap();
            let checked = cli(dir.path(), &["check-config", "-c", p]).await;
            assert!(!checked.success(), "check-config said ok to {what}:\n{text}");
            assert!(checked.stderr.contains(needle), "{what}: {}", checked.stderr);
            let mut run = Command::new(bin());
            run.args(["run", "-c", p]).current_dir(dir.path());
            let ran = common::run_bounded(run, dir.path(), CLI_DEADLINE).await;
            let status = ran.status.expect("run kept running");
            assert!(!status.success(), "run started with {what}");
        }
        // And a good two-role file with a named next hop: ok, relative paths included.
        let good = format!(
            "{base}[[listener]]\naddress = \"{a}\"\n[[listener]]\naddress = \"{b}\"\nrole = \"submission\"\nnext_hop = \"submission\"\ntls_cert = {cert:?}\ntls_key = {key:?}\n[next_hop.submission]\naddress = \"smtp://127.0.0.1:10587\"\n"
        );
        let path = dir.path().join("good.toml");
        std::fs::write(&path, &good).unwrap();
        let elsewhere = tempfile::tempdir().expect("tempdir");
        let checked = cli(elsewhere.path(), &["check-config", "-c", path.to_str().unwrap()]).await;
        assert!(checked.success(), "{}\n{good}", checked.stderr);
    })
    .await
}
