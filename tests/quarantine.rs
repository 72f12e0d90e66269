//! The quarantine, end to end: the real `mailwarden run` holds messages (a policy file
//! whose rules quarantine everything), and the real `mailwarden quarantine` CLI lists,
//! shows, releases, deletes and purges them, each run as a child process.
//!
//! Every proxy here runs with `[auth] enabled = true` on an inbound listener for
//! `example.org`, the loopback DNS server of `tests/common/dns.rs` as its resolver (SPF
//! passes for the senders, so `Authentication-Results` says `spf=pass`), and a fake next
//! hop (`tests/common/fake_mta.rs`) that speaks XCLIENT. The policy file:
//!
//! * `hold-bulk`: header From in `bulk.example` → quarantine, reason "bulk sender";
//! * `hold-all`: everything else → quarantine, reason "test".
//!
//! What is covered: the CLI (list and its filters, show, --raw, release exactly once with
//! the original envelope, delete, purge), releases that fail or whose outcome is unknown,
//! 100 concurrent quarantining sessions, a SIGKILL of the proxy in the middle of writes,
//! ids that try to leave the store, and file permissions.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::dns::{DnsServer, Zone};
use common::fake_mta::{Act, FakeMta, Script};
use common::smtp_client::{Client, Reply, dot_stuff_and_terminate};
use common::{Proxy, ProxyOptions, bin, bounded, show};
use mailwarden::quarantine::{Meta, Quarantine};

/// The proxy's host name (harness default), hence the authserv-id.
const AUTHSERV_ID: &str = "mailwarden.test";
/// EHLO name of the test clients.
const HELO: &str = "mx.client.example";
/// Upper bound for one run of the CLI.
const CLI_DEADLINE: Duration = Duration::from_secs(60);

const POLICY: &str = r#"
[[rule]]
name = "hold-bulk"
from_domain = ["bulk.example"]
action = "quarantine"
reason = "bulk sender"

[[rule]]
name = "hold-all"
action = "quarantine"
reason = "test"
"#;

fn zone() -> Zone {
    Zone::new()
        .txt("sender.example", "v=spf1 ip4:127.0.0.1 -all")
        .txt("bulk.example", "v=spf1 ip4:127.0.0.1 -all")
}

// ---------------------------------------------------------------------------
// Environment
// ---------------------------------------------------------------------------

struct Env {
    _dns: DnsServer,
    mta: FakeMta,
    proxy: Proxy,
}

/// Proxy options: auth on, inbound for example.org, the policy file at `policy`.
fn options(mta: &FakeMta, dns: &DnsServer, policy: &Path) -> ProxyOptions {
    let mut o = ProxyOptions::smtp(mta.addr);
    o.auth = true;
    o.role = "inbound".into();
    o.local_domains = vec!["example.org".into()];
    o.dns_nameserver = Some(dns.nameserver());
    o.auth_extra = vec![format!(
        "policy_file = {:?}",
        policy.to_str().expect("utf-8 path")
    )];
    o
}

fn write_policy(dir: &Path) -> PathBuf {
    let path = dir.join("policy.toml");
    std::fs::write(&path, POLICY).expect("write policy");
    path
}

async fn start(script: Script, f: impl FnOnce(ProxyOptions) -> ProxyOptions) -> Env {
    let dns = DnsServer::start(zone());
    let mta = FakeMta::start(script).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = write_policy(dir.path());
    let proxy = Proxy::start_in(f(options(&mta, &dns, &policy)), dir).await;
    Env {
        _dns: dns,
        mta,
        proxy,
    }
}

/// The default store: `var/quarantine` under the proxy's working directory.
fn store_root(proxy: &Proxy) -> PathBuf {
    proxy.dir.path().join("var/quarantine")
}

fn message(from: &str, to: &str, subject: &str, marker: &str) -> Vec<u8> {
    format!(
        "From: {from}\r\nTo: {to}\r\nSubject: {subject}\r\n\
         Date: Tue, 25 Nov 2025 10:00:00 +0000\r\n\
         Message-ID: <{marker}@test.example>\r\n\
         Authentication-Results: mailwarden.test; dmarc=pass (forged by the sender)\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n\
         Hello {marker},\r\n.a line that starts with a dot\r\n..and one with two\r\n\
         caf\u{e9} \u{fc}n\u{ef}code \u{2603}\r\n\r\n-- \r\nsender\r\n"
    )
    .into_bytes()
}

/// The forged header every [`message`] carries (stripped at release).
const FORGED: &str =
    "Authentication-Results: mailwarden.test; dmarc=pass (forged by the sender)\r\n";

/// The id in `250 2.0.0 Ok: queued as <ID>`.
fn queued_id(r: &Reply) -> Option<String> {
    if r.code != 250 {
        return None;
    }
    r.text()
        .strip_prefix("2.0.0 Ok: queued as ")
        .filter(|id| id.len() == 26 && id.bytes().all(|b| b.is_ascii_alphanumeric()))
        .map(str::to_string)
}

/// Sends one message through the proxy; it must be quarantined. Returns its id.
async fn hold(proxy: &Proxy, from: &str, rcpts: &[&str], msg: &[u8]) -> String {
    let mut c = proxy.connect_ehlo(HELO).await;
    let r = c.send_mail(from, rcpts, msg).await;
    let id = queued_id(&r).unwrap_or_else(|| {
        panic!(
            "expected `250 2.0.0 Ok: queued as <ID>`, got {:?}\nproxy log:\n{}",
            show(&r.raw),
            proxy.log()
        )
    });
    let q = c.cmd("QUIT").await;
    assert_eq!(q.code, 221);
    id
}

// ---------------------------------------------------------------------------
// The CLI as a child process
// ---------------------------------------------------------------------------

struct Run {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: String,
    args: Vec<OsString>,
}

impl Run {
    fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    #[track_caller]
    fn ok(&self) -> &Self {
        assert!(
            self.status.success(),
            "mailwarden {:?} exited with {}\nstdout:\n{}\nstderr:\n{}",
            self.args,
            self.status,
            self.out(),
            self.stderr
        );
        self
    }
    #[track_caller]
    fn failed(&self) -> &Self {
        assert!(
            !self.status.success(),
            "mailwarden {:?} should have failed\nstdout:\n{}\nstderr:\n{}",
            self.args,
            self.out(),
            self.stderr
        );
        self
    }
}

/// Runs `mailwarden ARGS` in `dir`, output to files (no pipe can fill up), without
/// blocking the runtime (the fake MTA lives on it); killed after the deadline.
async fn run_bin(dir: &Path, args: Vec<OsString>) -> Run {
    run_bin_under(&[], dir, args).await
}

/// [`run_bin`] under `wrapper`, a program that execs its arguments (e.g. `nsenter`).
async fn run_bin_under(wrapper: &[&str], dir: &Path, args: Vec<OsString>) -> Run {
    let mut command = match wrapper.split_first() {
        None => Command::new(bin()),
        Some((program, rest)) => {
            let mut c = Command::new(program);
            c.args(rest).arg(bin());
            c
        }
    };
    command.args(&args).current_dir(dir);
    let done = common::run_bounded(command, dir, CLI_DEADLINE).await;
    let status = done.status.unwrap_or_else(|| {
        panic!(
            "mailwarden {args:?} did not exit within {CLI_DEADLINE:?}; stderr:\n{}",
            done.stderr
        )
    });
    Run {
        status,
        stdout: done.stdout,
        stderr: done.stderr,
        args,
    }
}

/// `mailwarden quarantine -c CONFIG ARGS`, run in `dir` (relative store paths resolve there).
async fn cli_with(dir: &Path, config: &Path, args: &[&str]) -> Run {
    let mut all: Vec<OsString> = vec!["quarantine".into(), "-c".into(), config.into()];
    all.extend(args.iter().map(OsString::from));
    run_bin(dir, all).await
}

/// The CLI with the proxy's own configuration, in the proxy's working directory.
async fn cli(proxy: &Proxy, args: &[&str]) -> Run {
    cli_with(proxy.dir.path(), &proxy.config_path, args).await
}

/// `list --json ARGS` → the rows.
async fn list_json(proxy: &Proxy, args: &[&str]) -> Vec<serde_json::Value> {
    let mut a = vec!["list", "--json"];
    a.extend_from_slice(args);
    list_json_at(&cli(proxy, &a).await)
}

/// The rows of a successful `list --json` run.
fn list_json_at(run: &Run) -> Vec<serde_json::Value> {
    run.ok();
    let v: serde_json::Value = serde_json::from_slice(&run.stdout)
        .unwrap_or_else(|e| panic!("list --json is not JSON ({e}): {}", run.out()));
    v.as_array()
        .unwrap_or_else(|| panic!("list --json is not an array: {v}"))
        .clone()
}

fn ids_of(rows: &[serde_json::Value]) -> Vec<String> {
    rows.iter()
        .map(|r| r["id"].as_str().expect("row id").to_string())
        .collect()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// `show --json ID` → `{meta, headers, preview}`.
async fn show_json(proxy: &Proxy, id: &str) -> serde_json::Value {
    let run = cli(proxy, &["show", "--json", id]).await;
    run.ok();
    serde_json::from_slice(&run.stdout)
        .unwrap_or_else(|e| panic!("show --json is not JSON ({e}): {}", run.out()))
}

async fn state_of(proxy: &Proxy, id: &str) -> String {
    show_json(proxy, id).await["meta"]["state"]
        .as_str()
        .expect("meta.state")
        .to_string()
}

/// A copy of the proxy's configuration with `edits` applied, for the CLI.
fn edited_config(proxy: &Proxy, name: &str, edits: &[(&str, &str)]) -> PathBuf {
    let mut text = proxy.config_text.clone();
    for (from, to) in edits {
        assert!(text.contains(from), "config has no {from:?}:\n{text}");
        text = text.replace(from, to);
    }
    let path = proxy.dir.path().join(name);
    std::fs::write(&path, text).expect("write config");
    path
}

// ---------------------------------------------------------------------------
// Store inspection
// ---------------------------------------------------------------------------

/// What is wrong with each entry directory that is not whole (empty: all are whole).
fn entry_problems(root: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(root.join("entries")).expect("read entries/") {
        let e = e.expect("dirent");
        let id = e.file_name().to_string_lossy().into_owned();
        let names: BTreeSet<String> = std::fs::read_dir(e.path())
            .map(|rd| {
                rd.map(|f| f.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        if names != BTreeSet::from(["message.eml".to_string(), "meta.json".to_string()]) {
            out.push((id, format!("holds {names:?}")));
        }
    }
    out
}

/// Every entry directory of the store, each checked to be whole: both files present,
/// meta.json parses, names its own directory and the size of message.eml.
fn whole_entries(root: &Path) -> BTreeMap<String, (Vec<u8>, Meta)> {
    let problems = entry_problems(root);
    assert!(problems.is_empty(), "half-written entries: {problems:?}");
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(root.join("entries")).expect("read entries/") {
        let e = e.expect("dirent");
        let id = e.file_name().to_string_lossy().into_owned();
        let dir = e.path();
        let eml = std::fs::read(dir.join("message.eml"))
            .unwrap_or_else(|err| panic!("entry {id}: message.eml: {err}"));
        let raw = std::fs::read(dir.join("meta.json"))
            .unwrap_or_else(|err| panic!("entry {id}: meta.json: {err}"));
        let meta: Meta = serde_json::from_slice(&raw).unwrap_or_else(|err| {
            panic!(
                "entry {id}: meta.json does not parse ({err}): {}",
                show(&raw)
            )
        });
        assert_eq!(meta.id, id, "entry {id}: meta.json names another id");
        assert_eq!(
            meta.size,
            eml.len(),
            "entry {id}: size in meta vs message.eml"
        );
        out.insert(id, (eml, meta));
    }
    out
}

fn tmp_names(root: &Path) -> Vec<String> {
    std::fs::read_dir(root.join("tmp"))
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

#[track_caller]
fn assert_mode(p: &Path, want: u32) {
    assert_eq!(
        mode(p),
        want,
        "{} has mode {:o}, want {want:o}",
        p.display(),
        mode(p)
    );
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

// ===========================================================================
// 1. The CLI on messages held by the live proxy
// ===========================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_messages_are_listed_shown_released_once_deleted_and_purged() {
    bounded(async {
        let env = start(Script::default(), |o| o).await;
        let (proxy, mta) = (&env.proxy, &env.mta);
        let root = store_root(proxy);

        let rcpts_a = [
            "user1@example.org",
            "user2@example.org",
            "user3@example.org",
        ];
        let msg_a = message(
            "Alice <alice@sender.example>",
            "user1@example.org",
            "held A \x1b[31mred\x1b[0m",
            "marker-a",
        );
        let id_a = hold(proxy, "alice@sender.example", &rcpts_a, &msg_a).await;
        let msg_b = message(
            "News <news@bulk.example>",
            "bob@example.org",
            "bulk B",
            "marker-b",
        );
        let id_b = hold(proxy, "news@bulk.example", &["bob@example.org"], &msg_b).await;
        let msg_c = message(
            "Carol <carol@sender.example>",
            "dave@example.org",
            "held C",
            "marker-c",
        );
        let id_c = hold(proxy, "carol@sender.example", &["dave@example.org"], &msg_c).await;
        assert!(
            mta.messages().is_empty(),
            "a quarantined message reached the next hop"
        );

        // An old entry, stored through the library with a received_at 3 days ago.
        let msg_d = message(
            "Old <old@old.example>",
            "eve@example.org",
            "old D",
            "marker-d",
        );
        let id_d = {
            let q = Quarantine::open(&root).expect("open store");
            let mut meta = Meta {
                id: String::new(),
                received_at: now() - 3 * 86_400,
                session: "OLD".into(),
                listener: "inbound".into(),
                client: "192.0.2.9:2525".into(),
                helo: "old.example".into(),
                login: None,
                mail_from: "old@old.example".into(),
                rcpts: vec!["eve@example.org".into()],
                header_from: "Old <old@old.example>".into(),
                subject: "old D".into(),
                size: msg_d.len(),
                authentication_results: format!("{AUTHSERV_ID}; spf=fail"),
                flags: vec![],
                verdict: "quarantine".into(),
                reasons: vec!["aged".into()],
                state: mailwarden::quarantine::State::Held,
                instance: String::new(),
            };
            q.store(&mut meta, &[&msg_d]).expect("store").to_string()
        };

        // --- list: table ---
        let run = cli(proxy, &["list"]).await;
        run.ok();
        let table = run.out();
        let header = table.lines().next().unwrap_or("");
        for col in ["ID", "RECEIVED (UTC)", "STATE", "FROM", "TO", "REASON"] {
            assert!(header.contains(col), "table header lacks {col}: {table}");
        }
        for id in [&id_a, &id_b, &id_c, &id_d] {
            let line = table
                .lines()
                .find(|l| l.starts_with(id.as_str()))
                .unwrap_or_else(|| panic!("{id} not in the table:\n{table}"));
            assert!(line.contains("held"), "{line}");
        }
        assert!(
            table
                .lines()
                .any(|l| l.starts_with(&id_b) && l.contains("bulk sender")),
            "{table}"
        );
        assert!(table.trim_end().ends_with("4 entries"), "{table}");
        assert!(!table.contains('\x1b'), "terminal escape in the table");

        // --- list: JSON, newest first ---
        let rows = list_json(proxy, &[]).await;
        assert_eq!(rows.len(), 4, "{rows:?}");
        assert_eq!(ids_of(&rows)[3], id_d, "the old entry comes last: {rows:?}");
        let row = |id: &str| rows.iter().find(|r| r["id"] == id).unwrap().clone();
        let a = row(&id_a);
        assert_eq!(a["state"], "held");
        assert_eq!(a["mail_from"], "alice@sender.example");
        assert_eq!(a["header_from"], "Alice <alice@sender.example>");
        assert_eq!(a["rcpts"], rcpts_a.join(","));
        assert_eq!(a["reasons"], "test");
        assert_eq!(a["size"], msg_a.len());
        assert_eq!(row(&id_b)["reasons"], "bulk sender");

        // --- list: filters ---
        let f = |args: &'static [&'static str]| async move {
            sorted(ids_of(&list_json(proxy, args).await))
        };
        let live = sorted(vec![id_a.clone(), id_b.clone(), id_c.clone()]);
        assert_eq!(f(&["--since", "1h"]).await, live, "--since 1h");
        assert_eq!(f(&["--since", "4d"]).await.len(), 4, "--since 4d");
        assert_eq!(
            f(&["--reason", "bulk"]).await,
            vec![id_b.clone()],
            "--reason bulk"
        );
        assert_eq!(
            f(&["--reason", "test"]).await,
            sorted(vec![id_a.clone(), id_c.clone()]),
            "--reason test"
        );
        assert_eq!(
            f(&["--reason", "AGED"]).await,
            vec![id_d.clone()],
            "--reason is case-insensitive"
        );
        assert_eq!(
            f(&["--from", "bulk.example"]).await,
            vec![id_b.clone()],
            "--from"
        );
        assert_eq!(
            f(&["--from", "Alice"]).await,
            vec![id_a.clone()],
            "--from header From"
        );
        assert_eq!(f(&["--rcpt", "user2@"]).await, vec![id_a.clone()], "--rcpt");
        assert_eq!(
            f(&["--rcpt", "dave@example.org"]).await,
            vec![id_c.clone()],
            "--rcpt"
        );
        assert_eq!(
            f(&[
                "--from",
                "sender.example",
                "--rcpt",
                "dave",
                "--since",
                "1h"
            ])
            .await,
            vec![id_c.clone()],
            "filters combined"
        );
        assert!(f(&["--from", "nobody.example"]).await.is_empty());
        assert!(
            f(&["--reason", "%"]).await.is_empty(),
            "% is literal, not a wildcard"
        );
        let two = ids_of(&list_json(proxy, &["--limit", "2"]).await);
        assert_eq!(two.len(), 2, "--limit 2");
        assert!(!two.contains(&id_d), "--limit keeps the newest: {two:?}");
        assert_eq!(
            list_json(proxy, &["--limit", "1", "--reason", "test"])
                .await
                .len(),
            1
        );
        let bad = cli(proxy, &["list", "--since", "yesterday"]).await;
        bad.failed();
        assert!(bad.stderr.contains("--since"), "{}", bad.stderr);

        // --- show ---
        let run = cli(proxy, &["show", &id_a]).await;
        run.ok();
        let text = run.out();
        for needle in [
            format!("ID               {id_a}"),
            "State            held".to_string(),
            "Envelope from    alice@sender.example".to_string(),
            format!("Envelope to      {}", rcpts_a.join(", ")),
            format!("Size             {}", msg_a.len()),
            "Verdict          quarantine".to_string(),
            "Reasons          test".to_string(),
            format!("Auth results     {AUTHSERV_ID}; spf=pass"),
            "Client           127.0.0.1:".to_string(),
            format!("(HELO {HELO})"),
            "-- headers --".to_string(),
            "From: Alice <alice@sender.example>".to_string(),
            "Subject: held A [31mred[0m".to_string(),
            "Message-ID: <marker-a@test.example>".to_string(),
            "-- text preview".to_string(),
            "Hello marker-a,".to_string(),
            "caf\u{e9} \u{fc}n\u{ef}code \u{2603}".to_string(),
        ] {
            assert!(text.contains(&needle), "show lacks {needle:?}:\n{text}");
        }
        assert!(
            !text.contains('\x1b'),
            "show printed a terminal escape:\n{text}"
        );

        let v = show_json(proxy, &id_a).await;
        assert_eq!(v["meta"]["id"], id_a.as_str());
        assert_eq!(v["meta"]["state"], "held");
        assert_eq!(v["meta"]["rcpts"], serde_json::json!(rcpts_a));
        assert_eq!(v["meta"]["mail_from"], "alice@sender.example");
        assert_eq!(
            v["meta"]["client"].as_str().unwrap().split(':').next(),
            Some("127.0.0.1")
        );
        let ar = v["meta"]["authentication_results"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(ar.starts_with(&format!("{AUTHSERV_ID}; spf=pass")), "{ar}");
        assert!(
            v["preview"].as_str().unwrap().contains("Hello marker-a"),
            "{v}"
        );
        assert!(
            v["headers"].to_string().contains("marker-a@test.example"),
            "{v}"
        );

        for (id, msg) in [
            (&id_a, &msg_a),
            (&id_b, &msg_b),
            (&id_c, &msg_c),
            (&id_d, &msg_d),
        ] {
            let raw = cli(proxy, &["show", "--raw", id]).await;
            raw.ok();
            assert!(
                raw.stdout == *msg,
                "show --raw {id} is not the bytes received:\n{}\n---- sent ----\n{}",
                show(&raw.stdout),
                show(msg)
            );
        }

        // --- release: once, original envelope, Authentication-Results on top ---
        let conns_before = mta.connection_count();
        let run = cli(proxy, &["release", &id_a]).await;
        run.ok();
        assert!(
            run.out().contains(&format!("{id_a}: released (250")),
            "{}",
            run.out()
        );
        let got = mta.accepted();
        assert_eq!(got.len(), 1, "{}", mta.transcripts_debug());
        let m = &got[0];
        assert_eq!(m.sender(), "alice@sender.example");
        assert_eq!(m.rcpt_addrs(), rcpts_a.to_vec(), "all original recipients");
        assert_eq!(
            m.xclient
                .as_ref()
                .and_then(|x| x.iter().find(|(k, _)| k == "ADDR"))
                .map(|(_, v)| v.clone()),
            Some("127.0.0.1".to_string()),
            "XCLIENT names the original client"
        );
        let expected = format!(
            "Authentication-Results: {ar}\r\n{}",
            show(&msg_a).replacen(FORGED, "", 1)
        );
        assert_eq!(
            m.data_str(),
            expected,
            "released content: our Authentication-Results on top, the forged one gone, \
             the rest as received"
        );
        assert_eq!(
            common::count(&m.data, format!("{AUTHSERV_ID};").as_bytes()),
            1,
            "one Authentication-Results of ours"
        );
        common::assert_next_hop_canonical(mta);
        assert_eq!(state_of(proxy, &id_a).await, "released");
        assert!(!ids_of(&list_json(proxy, &[]).await).contains(&id_a));
        let all = list_json(proxy, &["--all"]).await;
        let ra = all
            .iter()
            .find(|r| r["id"] == id_a.as_str())
            .expect("--all shows released");
        assert_eq!(ra["state"], "released");

        // Releasing again: nothing sent, not even a connection.
        let conns = mta.connection_count();
        assert!(conns > conns_before);
        let run = cli(proxy, &["release", &id_a]).await;
        run.ok();
        assert!(run.out().contains("already released"), "{}", run.out());
        assert_eq!(mta.accepted().len(), 1, "released twice");
        assert_eq!(mta.connection_count(), conns, "a second release connected");
        let run = cli(proxy, &["release", "--force", &id_a]).await;
        run.ok();
        assert!(run.out().contains("already released"), "{}", run.out());
        assert_eq!(mta.accepted().len(), 1, "--force re-sent a released entry");

        // Two releases of the same entry at the same time: one delivery.
        let args = ["release", id_c.as_str()];
        let (r1, r2) = tokio::join!(cli(proxy, &args), cli(proxy, &args));
        let delivered_c = mta
            .accepted()
            .iter()
            .filter(|m| common::contains(&m.data, b"marker-c"))
            .count();
        assert_eq!(
            delivered_c,
            1,
            "concurrent releases: {delivered_c} deliveries\n1: {} {}\n2: {} {}",
            r1.out(),
            r1.stderr,
            r2.out(),
            r2.stderr
        );
        assert!(r1.status.success() || r2.status.success());
        assert_eq!(state_of(proxy, &id_c).await, "released");

        // --- delete ---
        let run = cli(proxy, &["delete", &id_b]).await;
        run.ok();
        assert_eq!(run.out().trim(), format!("{id_b}: deleted"));
        assert!(!root.join("entries").join(&id_b).exists());
        let run = cli(proxy, &["show", &id_b]).await;
        run.failed();
        assert!(run.stderr.contains("no quarantine entry"), "{}", run.stderr);
        assert!(!ids_of(&list_json(proxy, &["--all"]).await).contains(&id_b));
        let run = cli(proxy, &["delete", &id_b]).await;
        run.failed();
        assert!(run.stderr.contains("no quarantine entry"), "{}", run.stderr);
        assert!(
            tmp_names(&root).is_empty(),
            "delete left {:?} in tmp/",
            tmp_names(&root)
        );

        // --- purge ---
        let run = cli(proxy, &["purge", "--older-than", "1d"]).await;
        run.ok();
        assert_eq!(run.out().trim(), "purged 1 entries older than 1d");
        assert!(!root.join("entries").join(&id_d).exists());
        assert_eq!(
            sorted(ids_of(&list_json(proxy, &["--all"]).await)),
            sorted(vec![id_a.clone(), id_c.clone()]),
            "purge --older-than 1d keeps the fresh entries (released ones included)"
        );
        let run = cli(proxy, &["purge", "--older-than", "soon"]).await;
        run.failed();
        assert!(run.stderr.contains("--older-than"), "{}", run.stderr);
        assert_eq!(whole_entries(&root).len(), 2);
        assert_eq!(mta.accepted().len(), 2, "nothing else was delivered");
    })
    .await;
}

// ===========================================================================
// 2. Releases that fail, and releases whose outcome is unknown
// ===========================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_to_a_down_next_hop_fails_cleanly_and_succeeds_on_retry() {
    bounded(async {
        let env = start(Script::default(), |o| o).await;
        let proxy = &env.proxy;
        let msg = message(
            "Alice <alice@sender.example>",
            "u@example.org",
            "down",
            "marker-down",
        );
        let rcpts = ["u@example.org", "v@example.org"];
        let id = hold(proxy, "alice@sender.example", &rcpts, &msg).await;

        let dead = FakeMta::refused_addr();
        let config = edited_config(
            proxy,
            "down.toml",
            &[(&env.mta.url(), &format!("smtp://{dead}"))],
        );
        let started = Instant::now();
        let run = cli_with(proxy.dir.path(), &config, &["release", &id]).await;
        run.failed();
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "took {:?}",
            started.elapsed()
        );
        assert!(
            run.stderr.contains("next hop unavailable") && run.stderr.contains("held again"),
            "{}",
            run.stderr
        );
        assert!(run.stdout.is_empty(), "{}", run.out());
        assert_eq!(state_of(proxy, &id).await, "held");
        let rows = list_json(proxy, &[]).await;
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0]["state"], "held");

        // The next hop comes up on that address: the retry delivers it, once.
        let up = FakeMta::start_at(dead, Script::default()).await;
        let run = cli_with(proxy.dir.path(), &config, &["release", &id]).await;
        run.ok();
        assert!(run.out().contains("released (250"), "{}", run.out());
        let got = up.accepted();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].sender(), "alice@sender.example");
        assert_eq!(got[0].rcpt_addrs(), rcpts.to_vec());
        assert!(got[0].data_str().contains("marker-down"));
        assert_eq!(state_of(proxy, &id).await, "released");
        assert!(env.mta.messages().is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_refused_by_the_next_hop_keeps_the_entry_held() {
    bounded(async {
        let env = start(Script::default(), |o| o).await;
        let proxy = &env.proxy;
        let msg = message(
            "Alice <alice@sender.example>",
            "u@example.org",
            "refused",
            "marker-ref",
        );
        let id = hold(proxy, "alice@sender.example", &["u@example.org"], &msg).await;
        env.mta.update(|s| s.eod = Act::reply("554 5.7.1 Go away"));
        let run = cli(proxy, &["release", &id]).await;
        run.failed();
        assert!(
            run.stderr.contains("refused") && run.stderr.contains("554"),
            "{}",
            run.stderr
        );
        assert_eq!(state_of(proxy, &id).await, "held");
        env.mta
            .update(|s| s.eod = Act::reply("250 2.0.0 Ok: queued as LATER"));
        cli(proxy, &["release", &id]).await.ok();
        assert_eq!(env.mta.accepted().len(), 1);
        assert_eq!(state_of(proxy, &id).await, "released");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_with_unknown_outcome_stays_releasing_until_forced() {
    bounded(async {
        let env = start(Script::default(), |o| {
            o.next_hop_opt("end_of_data_timeout = \"2s\"")
        })
        .await;
        let proxy = &env.proxy;
        assert!(proxy.config_text.contains("end_of_data_timeout = \"2s\""));
        let msg = message(
            "Alice <alice@sender.example>",
            "u@example.org",
            "hang",
            "marker-hang",
        );
        let id = hold(proxy, "alice@sender.example", &["u@example.org"], &msg).await;

        // A next hop that takes the whole message and never answers the final dot.
        let hang = FakeMta::start(Script {
            eod: Act::Hang,
            ..Script::default()
        })
        .await;
        let config = edited_config(proxy, "hang.toml", &[(&env.mta.url(), &hang.url())]);
        let started = Instant::now();
        let run = cli_with(proxy.dir.path(), &config, &["release", &id]).await;
        run.failed();
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(15),
            "end_of_data_timeout 2s, took {took:?}"
        );
        assert!(run.stderr.contains("outcome unknown"), "{}", run.stderr);
        assert!(run.stderr.contains("--force"), "{}", run.stderr);
        assert_eq!(hang.messages().len(), 1, "the message was sent once");
        assert!(!hang.messages()[0].accepted);
        assert_eq!(state_of(proxy, &id).await, "releasing");
        let rows = list_json(proxy, &[]).await;
        assert_eq!(rows.len(), 1, "a releasing entry is still listed");
        assert_eq!(rows[0]["state"], "releasing");
        let shown = cli(proxy, &["show", &id]).await;
        shown.ok();
        assert!(
            shown.out().contains("State            releasing"),
            "{}",
            shown.out()
        );

        // A plain retry refuses, without connecting.
        let conns = hang.connection_count();
        let run = cli_with(proxy.dir.path(), &config, &["release", &id]).await;
        run.failed();
        assert!(run.stderr.contains("releasing"), "{}", run.stderr);
        assert_eq!(hang.connection_count(), conns, "a plain retry connected");
        assert_eq!(hang.messages().len(), 1);
        assert_eq!(state_of(proxy, &id).await, "releasing");

        // --force sends it (the next hop answers now).
        hang.update(|s| s.eod = Act::reply("250 2.0.0 Ok: queued as FORCED"));
        let run = cli_with(proxy.dir.path(), &config, &["release", "--force", &id]).await;
        run.ok();
        assert!(
            run.out()
                .contains("released (250 2.0.0 Ok: queued as FORCED"),
            "{}",
            run.out()
        );
        let msgs = hang.messages();
        assert_eq!(msgs.len(), 2);
        assert_eq!(hang.accepted().len(), 1);
        assert_eq!(msgs[1].sender(), "alice@sender.example");
        assert_eq!(msgs[1].rcpt_addrs(), vec!["u@example.org".to_string()]);
        assert_eq!(state_of(proxy, &id).await, "released");
        let run = cli_with(proxy.dir.path(), &config, &["release", "--force", &id]).await;
        run.ok();
        assert!(run.out().contains("already released"), "{}", run.out());
        assert_eq!(hang.messages().len(), 2);
    })
    .await;
}

// ===========================================================================
// 3. 100 concurrent sessions quarantining at once
// ===========================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_sessions_each_get_their_own_entry() {
    bounded(async {
        const N: usize = 100;
        let env = start(Script::default(), |mut o| {
            o.max_sessions_per_client = Some(2 * N as u32);
            o
        })
        .await;
        let root = store_root(&env.proxy);
        let addr = env.proxy.addr;
        let barrier = Arc::new(tokio::sync::Barrier::new(N));
        let mut tasks = Vec::new();
        for i in 0..N {
            let barrier = barrier.clone();
            tasks.push(tokio::spawn(async move {
                let msg = message(
                    "Alice <alice@sender.example>",
                    "u@example.org",
                    &format!("concurrent {i}"),
                    &format!("marker-{i:03}"),
                );
                let mut c = Client::connect(addr).await;
                assert_eq!(c.read_reply().await.code, 220);
                c.ehlo(HELO).await;
                assert_eq!(c.cmd("MAIL FROM:<alice@sender.example>").await.code, 250);
                assert_eq!(
                    c.cmd(&format!("RCPT TO:<u{i}@example.org>")).await.code,
                    250
                );
                assert_eq!(c.cmd("DATA").await.code, 354);
                let wire = dot_stuff_and_terminate(&msg);
                c.send_raw(&wire[..wire.len() - 3]).await;
                // Everyone sends the final dot at the same moment.
                barrier.wait().await;
                c.send_raw(b".\r\n").await;
                let r = c.read_reply().await;
                let _ = c.cmd("QUIT").await;
                (i, msg, r)
            }));
        }
        let mut acked: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut refused = Vec::new();
        for t in tasks {
            let (i, msg, r) = t.await.expect("client task");
            match queued_id(&r) {
                Some(id) => assert!(
                    acked.insert(id.clone(), msg).is_none(),
                    "id {id} given twice"
                ),
                None => refused.push((i, show(&r.raw))),
            }
        }
        assert!(
            refused.is_empty(),
            "not quarantined: {refused:?}\nlog:\n{}",
            env.proxy.log()
        );
        assert_eq!(acked.len(), N);

        let entries = whole_entries(&root);
        for (id, msg) in &acked {
            let (eml, meta) = entries
                .get(id)
                .unwrap_or_else(|| panic!("250 for {id} but no entry"));
            assert!(eml == msg, "entry {id} holds another message");
            assert_eq!(meta.state.as_str(), "held");
        }
        assert_eq!(entries.len(), N, "entries without a 250");
        let rows = list_json(&env.proxy, &["--limit", "1000"]).await;
        let listed = ids_of(&rows);
        let unique: BTreeSet<&String> = listed.iter().collect();
        assert_eq!(unique.len(), listed.len(), "duplicates in list");
        assert_eq!(
            unique.into_iter().cloned().collect::<Vec<_>>(),
            acked.keys().cloned().collect::<Vec<_>>(),
            "list vs acknowledged ids"
        );
        assert!(
            tmp_names(&root).is_empty(),
            "tmp/ not empty: {:?}",
            tmp_names(&root)
        );
        assert!(env.mta.messages().is_empty());
    })
    .await;
}

// ===========================================================================
// 3b. The CLI used while the proxy writes
// ===========================================================================

/// An administrator runs `quarantine list` while mail is being quarantined. Every CLI
/// command opens the store, and opening it removes everything in `tmp/` ("half-written
/// entries left by a crash"), including the entries the running proxy is writing at
/// that moment: those sessions must still get their 250 and their entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_use_while_the_proxy_writes_does_not_disturb_writes() {
    bounded(async {
        const SESSIONS: usize = 30;
        const PER_SESSION: usize = 8;
        let env = start(Script::default(), |mut o| {
            o.max_sessions_per_client = Some(200);
            o
        })
        .await;
        let root = store_root(&env.proxy);
        let addr = env.proxy.addr;
        let done = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for s in 0..SESSIONS {
            tasks.push(tokio::spawn(async move {
                let mut out = Vec::new();
                let mut c = Client::connect(addr).await;
                assert_eq!(c.read_reply().await.code, 220);
                c.ehlo(HELO).await;
                for k in 0..PER_SESSION {
                    let msg = message(
                        "Alice <alice@sender.example>",
                        "u@example.org",
                        "during cli",
                        &format!("marker-{s}-{k}"),
                    );
                    let r = c
                        .send_mail("alice@sender.example", &["u@example.org"], &msg)
                        .await;
                    out.push((msg, r));
                }
                let _ = c.cmd("QUIT").await;
                out
            }));
        }
        let cli_loop = {
            let done = done.clone();
            let dir = env.proxy.dir.path().to_path_buf();
            let config = env.proxy.config_path.clone();
            async move {
                let mut runs = 0;
                while !done.load(Ordering::SeqCst) {
                    cli_with(&dir, &config, &["list", "--limit", "5"])
                        .await
                        .ok();
                    runs += 1;
                }
                runs
            }
        };
        let senders = async {
            let mut all = Vec::new();
            for t in tasks {
                all.extend(t.await.expect("client task"));
            }
            done.store(true, Ordering::SeqCst);
            all
        };
        let (all, runs) = tokio::join!(senders, cli_loop);
        let mut failed = Vec::new();
        let mut acked = BTreeMap::new();
        for (msg, r) in all {
            match queued_id(&r) {
                Some(id) => {
                    acked.insert(id, msg);
                }
                None => failed.push(show(&r.raw)),
            }
        }
        let broken: Vec<String> = entry_problems(&root)
            .into_iter()
            .map(|(id, what)| {
                let acked = if acked.contains_key(&id) {
                    "ACKNOWLEDGED with 250"
                } else {
                    "not acknowledged"
                };
                format!("{id} ({acked}) {what}")
            })
            .collect();
        let missing: Vec<&String> = acked
            .keys()
            .filter(|id| {
                !root
                    .join("entries")
                    .join(id.as_str())
                    .join("message.eml")
                    .is_file()
            })
            .collect();
        let log = env.proxy.log();
        let write_errors: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("quarantine write failed"))
            .collect();
        assert!(
            failed.is_empty() && missing.is_empty() && broken.is_empty(),
            "{runs} `quarantine list` runs during {} writes: {} sessions got no 250 (e.g. {:?}); \
             {} acknowledged ids have no message.eml; \
             half-written entries in entries/: {broken:?}; \
             proxy logged {} `quarantine write failed`, e.g.:\n{}",
            SESSIONS * PER_SESSION,
            failed.len(),
            failed.first(),
            missing.len(),
            write_errors.len(),
            write_errors
                .iter()
                .take(3)
                .copied()
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert_eq!(acked.len(), SESSIONS * PER_SESSION);
        whole_entries(&root);
    })
    .await;
}

// ===========================================================================
// 4. SIGKILL in the middle of writes
// ===========================================================================

/// One transaction that tolerates the proxy vanishing: None when the connection ended.
async fn try_deliver(c: &mut Client, from: &str, rcpt: &str, msg: &[u8]) -> Option<Reply> {
    async fn cmd(c: &mut Client, line: &str) -> Option<Reply> {
        c.try_send_raw(format!("{line}\r\n").as_bytes())
            .await
            .ok()?;
        c.try_read_reply().await
    }
    let r = cmd(c, &format!("MAIL FROM:<{from}>")).await?;
    if r.code != 250 {
        return Some(r);
    }
    let r = cmd(c, &format!("RCPT TO:<{rcpt}>")).await?;
    if r.code != 250 {
        return Some(r);
    }
    let r = cmd(c, "DATA").await?;
    if r.code != 354 {
        return Some(r);
    }
    c.try_send_raw(&dot_stuff_and_terminate(msg)).await.ok()?;
    c.try_read_reply().await
}

type Acked = Arc<Mutex<BTreeMap<String, Vec<u8>>>>;

/// Sends messages over and over (new session every 20) until the proxy is gone.
async fn sender_loop(
    addr: std::net::SocketAddr,
    worker: usize,
    acked: Acked,
    attempts: Arc<AtomicUsize>,
) {
    let mut n = 0;
    loop {
        let Ok(mut c) = Client::try_connect(addr).await else {
            return;
        };
        c.timeout = Duration::from_secs(30);
        match c.try_read_reply().await {
            Some(r) if r.code == 220 => {}
            _ => return,
        }
        if c.try_send_raw(format!("EHLO {HELO}\r\n").as_bytes())
            .await
            .is_err()
        {
            return;
        }
        match c.try_read_reply().await {
            Some(r) if r.code == 250 => {}
            _ => return,
        }
        for _ in 0..20 {
            n += 1;
            let msg = message(
                "Alice <alice@sender.example>",
                "u@example.org",
                "crash",
                &format!("marker-w{worker}-{n}"),
            );
            attempts.fetch_add(1, Ordering::SeqCst);
            match try_deliver(&mut c, "alice@sender.example", "u@example.org", &msg).await {
                None => return,
                Some(r) => {
                    if let Some(id) = queued_id(&r) {
                        acked.lock().unwrap().insert(id, msg);
                    }
                }
            }
        }
        let _ = c.try_send_raw(b"QUIT\r\n").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_write_loses_no_acknowledged_message() {
    bounded(async {
        const WORKERS: usize = 24;
        const KILL_AFTER: usize = 60;
        const ROUNDS: usize = 3;
        let dns = DnsServer::start(zone());
        let mta = FakeMta::start(Script::default()).await;
        let base = tempfile::tempdir().expect("tempdir");
        let policy = write_policy(base.path());
        let root = base.path().join("store");
        let opts = || {
            let mut o = options(&mta, &dns, &policy);
            o.max_sessions_per_client = Some(200);
            o.extra_toml = vec![
                "[quarantine]".into(),
                format!("dir = {:?}", root.to_str().unwrap()),
            ];
            o
        };

        // Three rounds: start the proxy on the store, let the senders run, kill -9 it
        // while sessions are in the middle of writes.
        let acked: Acked = Arc::default();
        let mut before = BTreeMap::new();
        for round in 1..=ROUNDS {
            let mut proxy = Proxy::start(opts()).await;
            assert!(
                tmp_names(&root).is_empty(),
                "round {round}: tmp/ not cleaned at start: {:?}",
                tmp_names(&root)
            );
            if round > 1 {
                // Entries written before the kill whose index row may be missing.
                let entries = whole_entries(&root);
                assert_eq!(
                    entries.keys().collect::<Vec<_>>(),
                    before.keys().collect::<Vec<_>>(),
                    "round {round}: entries changed across the restart"
                );
            }
            let target = acked.lock().unwrap().len() + KILL_AFTER;
            let attempts = Arc::new(AtomicUsize::new(0));
            let workers: Vec<_> = (0..WORKERS)
                .map(|w| {
                    tokio::spawn(sender_loop(
                        proxy.addr,
                        round * 1000 + w,
                        acked.clone(),
                        attempts.clone(),
                    ))
                })
                .collect();
            let deadline = Instant::now() + Duration::from_secs(60);
            while acked.lock().unwrap().len() < target {
                assert!(
                    Instant::now() < deadline,
                    "round {round}: only {} acknowledged\n{}",
                    acked.lock().unwrap().len(),
                    proxy.log()
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let st = Command::new("kill")
                .args(["-KILL", &proxy.pid().to_string()])
                .status()
                .expect("kill -KILL");
            assert!(st.success());
            let status = proxy.wait_exit(Duration::from_secs(10)).await;
            assert!(!status.success(), "killed proxy exited with {status}");
            for w in workers {
                w.await.expect("sender task");
            }
            let acked = acked.lock().unwrap().clone();
            let in_tmp = tmp_names(&root);
            before = whole_entries(&root);
            eprintln!(
                "SIGKILL round {round}: {} transactions started, {} acknowledged in all, \
                 {} entries on disk, {} half-written in tmp/",
                attempts.load(Ordering::SeqCst),
                acked.len(),
                before.len(),
                in_tmp.len()
            );
            for (id, msg) in &acked {
                let (eml, meta) = before
                    .get(id)
                    .unwrap_or_else(|| panic!("round {round}: acknowledged {id} lost"));
                assert!(eml == msg, "entry {id} holds another message");
                assert_eq!(meta.state.as_str(), "held");
            }
        }

        // Restart on the same store.
        let second = Proxy::start(opts()).await;
        assert!(
            tmp_names(&root).is_empty(),
            "tmp/ not cleaned at start: {:?}",
            tmp_names(&root)
        );
        let after = whole_entries(&root);
        assert_eq!(
            after.keys().collect::<Vec<_>>(),
            before.keys().collect::<Vec<_>>(),
            "entries changed across the restart"
        );
        if let Some(line) = second.log().lines().find(|l| l.contains("re-indexed")) {
            eprintln!("restart: {line}");
        }
        let cli_config = base.path().join("cli.toml");
        std::fs::write(&cli_config, &second.config_text).unwrap();
        let listed = {
            let run = cli_with(
                base.path(),
                &cli_config,
                &["list", "--json", "--all", "--limit", "100000"],
            )
            .await;
            run.ok();
            let v: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
            ids_of(v.as_array().unwrap())
        };
        assert_eq!(
            sorted(listed.clone()),
            after.keys().cloned().collect::<Vec<_>>(),
            "list vs entries on disk after the restart"
        );
        // The restarted proxy quarantines again.
        let id = hold(
            &second,
            "alice@sender.example",
            &["u@example.org"],
            &message(
                "A <alice@sender.example>",
                "u@example.org",
                "after",
                "marker-after",
            ),
        )
        .await;
        assert!(root.join("entries").join(&id).join("message.eml").is_file());
        drop(second);

        // And without any index at all, the CLI rebuilds it from meta.json.
        for f in ["index.sqlite", "index.sqlite-wal", "index.sqlite-shm"] {
            let _ = std::fs::remove_file(root.join(f));
        }
        let run = cli_with(
            base.path(),
            &cli_config,
            &["list", "--json", "--all", "--limit", "100000"],
        )
        .await;
        run.ok();
        let v: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
        let rebuilt = sorted(ids_of(v.as_array().unwrap()));
        let mut want: Vec<String> = after.keys().cloned().collect();
        want.push(id);
        assert_eq!(rebuilt, sorted(want), "rebuilt index");
        assert!(mta.messages().is_empty());
    })
    .await;
}

/// A crash in the middle of `delete` (the entry directory already renamed to
/// `tmp/<ID>.deleting`, its index row not yet removed), reproduced by doing that rename
/// by hand: the next open cleans `tmp/`, and must not leave the index listing an entry
/// that no longer exists (a ghost nobody can show, release, delete or purge).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_during_delete_leaves_no_ghost_in_the_index() {
    bounded(async {
        let env = start(Script::default(), |o| o).await;
        let proxy = &env.proxy;
        let root = store_root(proxy);
        let msg = message(
            "Alice <alice@sender.example>",
            "u@example.org",
            "ghost",
            "marker-ghost",
        );
        let id = hold(proxy, "alice@sender.example", &["u@example.org"], &msg).await;
        let keep = hold(proxy, "alice@sender.example", &["u@example.org"], &msg).await;
        std::fs::rename(
            root.join("entries").join(&id),
            root.join("tmp").join(format!("{id}.deleting")),
        )
        .unwrap();

        let listed = ids_of(&list_json(proxy, &["--all"]).await);
        assert!(
            !tmp_names(&root).is_empty(),
            "the CLI never touches tmp/ (a running proxy writes there); the proxy cleans it at start"
        );
        let show = cli(proxy, &["show", &id]).await;
        let delete = cli(proxy, &["delete", &id]).await;
        // `--older-than 0s` takes what was received before this second.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let purge = cli(proxy, &["purge", "--older-than", "0s"]).await;
        purge.ok();
        let after_purge = ids_of(&list_json(proxy, &["--all"]).await);
        assert!(
            !listed.contains(&id) && !after_purge.contains(&id),
            "entry {id} is gone from disk but still listed (list after the crash: {listed:?}; \
             show: {:?}; delete: {:?}; after `purge --older-than 0s` ({}): {after_purge:?})",
            show.stderr.trim(),
            delete.stderr.trim(),
            purge.out().trim()
        );
        assert!(!after_purge.contains(&keep), "purge 0s purges everything");
    })
    .await;
}

// ===========================================================================
// 5. Ids that are malformed, unknown or paths
// ===========================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_unknown_and_path_like_ids_are_refused() {
    bounded(async {
        let env = start(Script::default(), |o| o).await;
        let proxy = &env.proxy;
        let root = store_root(proxy);
        let msg = message(
            "Alice <alice@sender.example>",
            "u@example.org",
            "ids",
            "marker-ids",
        );
        let id = hold(proxy, "alice@sender.example", &["u@example.org"], &msg).await;

        // Sentinels where a path built from the input would land: `var/SENTINEL` next to
        // the store, `var/etc/passwd` (entries/../../etc/passwd), each shaped like an entry.
        let var = root.parent().unwrap().to_path_buf();
        let mut sentinels = Vec::new();
        for dir in [
            var.join("SENTINEL"),
            var.join("etc/passwd"),
            root.join("SENTINEL"),
        ] {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("message.eml"), b"sentinel message\r\n").unwrap();
            std::fs::write(dir.join("meta.json"), b"{\"sentinel\": true}").unwrap();
            sentinels.push(dir);
        }
        let entry_abs = root.join("entries").join(&id);
        let long = "A".repeat(1024);
        let unknown = "01ARZ3NDEKTSV4RRFFQ69G5FAV";
        assert_ne!(unknown, id);
        let path_like: Vec<String> = vec![
            "../../etc/passwd".into(),
            "..%2f..".into(),
            "..%2f..%2fSENTINEL".into(),
            "../SENTINEL".into(),
            "../../SENTINEL".into(),
            var.join("SENTINEL").to_string_lossy().into_owned(),
            entry_abs.to_string_lossy().into_owned(),
            format!("{id}/../../SENTINEL"),
            format!("./{id}"),
            format!("{id} "),
            String::new(),
            long.clone(),
            id.replacen(&id[..1], "U", 1).replace('0', "O"),
        ];
        for bad in &path_like {
            for cmd in ["show", "release", "delete"] {
                let run = cli(proxy, &[cmd, bad]).await;
                run.failed();
                assert!(
                    run.stderr.contains("is not a quarantine id"),
                    "{cmd} {bad:?}: {}",
                    run.stderr
                );
                assert!(run.stdout.is_empty(), "{cmd} {bad:?} printed {}", run.out());
            }
        }
        for cmd in ["show", "release", "delete"] {
            let run = cli(proxy, &[cmd, unknown]).await;
            run.failed();
            assert!(
                run.stderr
                    .contains(&format!("no quarantine entry {unknown}")),
                "{cmd} unknown: {}",
                run.stderr
            );
        }
        assert!(env.mta.messages().is_empty(), "something was released");

        // Nothing outside the store was touched, and the entry is intact.
        for dir in &sentinels {
            assert_eq!(
                std::fs::read(dir.join("message.eml")).unwrap(),
                b"sentinel message\r\n"
            );
            assert_eq!(
                std::fs::read(dir.join("meta.json")).unwrap(),
                b"{\"sentinel\": true}"
            );
        }
        let entries = whole_entries(&root);
        assert_eq!(entries.len(), 1);
        assert!(entries[&id].0 == msg);
        assert_eq!(
            ids_of(&list_json(proxy, &["--all"]).await),
            vec![id.clone()]
        );

        // The id in lower case is the same id.
        let lower = id.to_lowercase();
        let run = cli(proxy, &["show", &lower]).await;
        run.ok();
        assert!(
            run.out().contains(&format!("ID               {id}")),
            "{}",
            run.out()
        );
        let raw = cli(proxy, &["show", "--raw", &lower]).await;
        raw.ok();
        assert!(raw.stdout == msg);
        let run = cli(proxy, &["release", &lower]).await;
        run.ok();
        assert_eq!(env.mta.accepted().len(), 1);
        let run = cli(proxy, &["delete", &lower]).await;
        run.ok();
        assert!(!entry_abs.exists());
        for dir in &sentinels {
            assert!(dir.join("message.eml").is_file());
        }
    })
    .await;
}

/// The errors for refused ids are bounded and terminal-safe: the id is echoed through
/// the store's `printable` (64 printable ASCII characters at most), never raw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_ids_are_not_echoed_raw() {
    bounded(async {
        let env = start(Script::default(), |o| o).await;
        let proxy = &env.proxy;
        let long = "A".repeat(1024);
        let escape = "\x1b]0;pwned\x07\x1b[2J";
        let mut bad = Vec::new();
        for cmd in ["show", "release", "delete"] {
            let run = cli(proxy, &[cmd, &long]).await;
            run.failed();
            if run.stderr.len() >= 400 {
                bad.push(format!(
                    "`{cmd} <1 KB id>`: {} bytes on stderr: {:?}",
                    run.stderr.len(),
                    run.stderr
                        .chars()
                        .take(40)
                        .chain(
                            run.stderr
                                .chars()
                                .rev()
                                .take(60)
                                .collect::<Vec<_>>()
                                .into_iter()
                                .rev()
                        )
                        .collect::<String>()
                ));
            }
            let run = cli(proxy, &[cmd, escape]).await;
            run.failed();
            if run.stderr.contains('\x1b') || run.stderr.contains('\x07') {
                bad.push(format!(
                    "`{cmd} <ESC id>` echoed control characters: {:?}",
                    run.stderr
                ));
            }
        }
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    })
    .await;
}

// ===========================================================================
// 6. File permissions
// ===========================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_directories_are_0700_and_files_0600() {
    bounded(async {
        let env = start(Script::default(), |o| o).await;
        let proxy = &env.proxy;
        let root = store_root(proxy);
        let msg = message(
            "Alice <alice@sender.example>",
            "u@example.org",
            "perm",
            "marker-perm",
        );
        let id = hold(proxy, "alice@sender.example", &["u@example.org"], &msg).await;
        let id2 = hold(proxy, "alice@sender.example", &["u@example.org"], &msg).await;

        let check = |root: &Path| {
            for d in [root.to_path_buf(), root.join("entries"), root.join("tmp")] {
                assert_mode(&d, 0o700);
            }
            for e in std::fs::read_dir(root.join("entries")).unwrap() {
                let e = e.unwrap().path();
                assert_mode(&e, 0o700);
                for f in std::fs::read_dir(&e).unwrap() {
                    assert_mode(&f.unwrap().path(), 0o600);
                }
            }
            for f in ["index.sqlite", "index.sqlite-wal", "index.sqlite-shm"] {
                let p = root.join(f);
                if f == "index.sqlite" || p.exists() {
                    assert_mode(&p, 0o600);
                }
            }
        };
        check(&root);
        // meta.json is rewritten on every state change.
        cli(proxy, &["release", &id]).await.ok();
        cli(proxy, &["delete", &id2]).await.ok();
        check(&root);
        assert_mode(&root.join("entries").join(&id).join("meta.json"), 0o600);

        // The CLI under umask 000: what it creates in the store (SQLite's -wal/-shm) is
        // private. Issue 19: it no longer creates a missing store (that hid a wrong
        // `dir` behind "0 entries"): `list` there fails and creates nothing.
        let dir = tempfile::tempdir().unwrap();
        let cli_umask_000 = |store: &Path| {
            let config = dir.path().join("cli.toml");
            std::fs::write(
                &config,
                format!("[quarantine]\ndir = {:?}\n", store.to_str().unwrap()),
            )
            .unwrap();
            Command::new("sh")
                .args(["-c", "umask 000 && exec \"$0\" quarantine -c \"$1\" list"])
                .arg(bin())
                .arg(&config)
                .current_dir(dir.path())
                .output()
                .expect("sh")
        };
        let out = cli_umask_000(&root);
        assert!(out.status.success(), "{}", show(&out.stderr));
        check(&root);
        let missing = dir.path().join("q");
        let out = cli_umask_000(&missing);
        assert!(!out.status.success(), "{}", show(&out.stdout));
        assert!(!missing.exists(), "the CLI created a store");
    })
    .await;
}

/// Policy for the disk-full test: only mail from `bulk.example` is held; the rest is
/// relayed, so the proxy can be seen to keep serving while the store is full.
const POLICY_HOLD_BULK: &str = r#"
[[rule]]
name = "hold-bulk"
from_domain = ["bulk.example"]
action = "quarantine"
reason = "bulk sender"
"#;

/// The quarantine's filesystem fills up (RELIABILITY: disk full → 452 4.3.1). The proxy
/// runs in a mount namespace of its own with its store on a 512 KiB tmpfs that only it
/// sees (we look in through `/proc/<pid>/root`), and 24 KiB messages are held until the
/// writes fail for want of space (ENOSPC, not a permission error):
/// - every end-of-data reply is `250 … queued as <id>` or `452 4.3.1`, and 452s come;
/// - every acknowledged message is a whole entry, listed by the CLI; nothing else is
///   stored and nothing is left in `tmp/`; the log names the failure;
/// - mail that is not held is still relayed while the store is full;
/// - once entries are deleted (the CLI, freeing space), holding works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_quarantine_disk_answers_452_and_loses_nothing() {
    bounded(async {
        let dns = DnsServer::start(zone());
        let mta = FakeMta::start(Script::default()).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let policy = dir.path().join("policy.toml");
        std::fs::write(&policy, POLICY_HOLD_BULK).expect("write policy");
        std::fs::create_dir_all(dir.path().join("var/quarantine")).expect("mkdir store");
        let proxy = Proxy::start_in_own_mounts(
            options(&mta, &dns, &policy),
            dir,
            "mount -t tmpfs -o size=512k,mode=0700 mailwarden-full var/quarantine",
        )
        .await;
        // The store as the proxy sees it (for reading files; SQLite resolves the
        // /proc/<pid>/root link, so the CLI runs inside the proxy's mounts instead).
        let root = PathBuf::from(format!("/proc/{}/root", proxy.pid()))
            .join(
                proxy
                    .dir
                    .path()
                    .strip_prefix("/")
                    .expect("absolute tempdir"),
            )
            .join("var/quarantine");
        let pid = proxy.pid().to_string();
        // -w: the proxy's working directory as seen inside (ours would still be outside).
        let nsenter = ["nsenter", "--target", pid.as_str(), "--mount", "-w", "--"];
        let cli_full = |args: &[&str]| {
            let mut all: Vec<OsString> = vec![
                "quarantine".into(),
                "-c".into(),
                proxy.config_path.clone().into(),
            ];
            all.extend(args.iter().map(OsString::from));
            run_bin_under(&nsenter, proxy.dir.path(), all)
        };

        let filler = format!("{}\r\n", "0123456789abcdef".repeat(4)).repeat(370);
        let big = |n: usize| {
            let mut m = message(
                "Bulk <news@bulk.example>",
                "u@example.org",
                "full",
                &format!("full-{n}"),
            );
            m.extend_from_slice(filler.as_bytes());
            m
        };
        let (mut acked, mut refused) = (Vec::new(), 0);
        for n in 0..100 {
            let mut c = proxy.connect_ehlo(HELO).await;
            let r = c
                .send_mail("news@bulk.example", &["u@example.org"], &big(n))
                .await;
            if let Some(id) = queued_id(&r) {
                assert_eq!(
                    refused,
                    0,
                    "250 after a 452 with nothing freed: {:?}",
                    show(&r.raw)
                );
                acked.push(id);
            } else {
                assert!(
                    r.code == 452 && r.text().starts_with("4.3.1"),
                    "neither 250 queued nor 452 4.3.1: {:?}\nlog:\n{}",
                    show(&r.raw),
                    proxy.log()
                );
                refused += 1;
            }
            assert_eq!(c.cmd("QUIT").await.code, 221);
            if refused == 3 {
                break;
            }
        }
        assert_eq!(
            refused,
            3,
            "the store never filled up; {} held",
            acked.len()
        );
        assert!(
            acked.len() >= 5,
            "only {} held before the store was full",
            acked.len()
        );
        proxy
            .wait_log("No space left on device", Duration::from_secs(10))
            .await;

        let stored: Vec<String> = whole_entries(&root).into_keys().collect();
        assert_eq!(sorted(stored), sorted(acked.clone()), "entries vs 250s");
        assert!(
            tmp_names(&root).is_empty(),
            "left in tmp/: {:?}",
            tmp_names(&root)
        );
        let run = cli_full(&["list", "--json"]).await;
        let listed = list_json_at(&run);
        assert_eq!(
            sorted(ids_of(&listed)),
            sorted(acked.clone()),
            "CLI list vs 250s\nCLI stderr: {}\nproxy log:\n{}",
            run.stderr,
            proxy.log()
        );

        // Mail that is not held still flows while the store is full.
        let mut c = proxy.connect_ehlo(HELO).await;
        let ok = message(
            "Alice <alice@sender.example>",
            "u@example.org",
            "ok",
            "full-ok",
        );
        let r = c
            .send_mail("alice@sender.example", &["u@example.org"], &ok)
            .await;
        assert_eq!(
            r.code,
            250,
            "relayed mail while the store is full: {:?}",
            show(&r.raw)
        );
        assert_eq!(mta.messages().len(), 1);

        // Free space: delete the first half; holding works again.
        for id in &acked[..acked.len() / 2] {
            cli_full(&["delete", id]).await.ok();
        }
        let id = hold(&proxy, "news@bulk.example", &["u@example.org"], &big(1000)).await;
        let mut expected = acked[acked.len() / 2..].to_vec();
        expected.push(id);
        let stored: Vec<String> = whole_entries(&root).into_keys().collect();
        assert_eq!(
            sorted(stored),
            sorted(expected.clone()),
            "entries after freeing space"
        );
        let listed = list_json_at(&cli_full(&["list", "--json"]).await);
        assert_eq!(
            sorted(ids_of(&listed)),
            sorted(expected),
            "CLI list after freeing space\nproxy log:\n{}",
            proxy.log()
        );
    })
    .await;
}
