//! DMARC aggregate reports through the real proxy: a day of traffic from four domains
//! (aligned pass, fail under p=reject, fail under p=quarantine, an opted-out domain),
//! then `mailwarden dmarc reports send-now` closes the period (the clock the test
//! controls). Each report mail at the next hop is checked: sent once, only to verified
//! `rua` destinations; its XML valid against tests/fixtures/dmarc/rua.xsd (`xmllint
//! --schema`, Debian libxml2-utils) and read by an independent parser (Python
//! `parsedmarc`, in the venv `.ci/run` makes under target/), whose counts, dispositions
//! and results must equal what the proxy logged for each message.

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::dns::{DnsServer, Zone};
use common::fake_mta::{Act, FakeMta, Script};
use common::smtp_client::assert_reply;
use common::{Proxy, ProxyOptions, bin, repo_path};

const RCPT: &str = "user@example.org";
const DEADLINE: Duration = Duration::from_secs(60);
/// A period of ten years (boundaries at multiples of it since the epoch: 2019, 2029).
const YEARS: &str = "3650d";

fn zone() -> Zone {
    Zone::new()
        // Aligned SPF pass; one internal and one verified external destination.
        .txt("sender.example", "v=spf1 ip4:127.0.0.1 -all")
        .txt(
            "_dmarc.sender.example",
            "v=DMARC1; p=reject; rua=mailto:agg@sender.example,mailto:ext@reports.test!10m",
        )
        .txt("sender.example._report._dmarc.reports.test", "v=DMARC1")
        // DMARC fail, p=reject; the external destination never agreed to get reports.
        .txt("spoof.example", "v=spf1 -all")
        .txt(
            "_dmarc.spoof.example",
            "v=DMARC1; p=reject; rua=mailto:dmarc@spoof.example,mailto:victim@unverified.test",
        )
        // The victim publishes a verification record for someone else only.
        .txt("other.example._report._dmarc.unverified.test", "v=DMARC1")
        // DMARC fail, p=quarantine: held.
        .txt("quar.example", "v=spf1 -all")
        .txt(
            "_dmarc.quar.example",
            "v=DMARC1; p=quarantine; rua=mailto:r@quar.example",
        )
        // Opted out in [dmarc_reports].
        .txt("optout.example", "v=spf1 ip4:127.0.0.1 -all")
        .txt(
            "_dmarc.optout.example",
            "v=DMARC1; p=none; rua=mailto:r@optout.example",
        )
}

/// Proxy options with reports on; `interval`: the period. Tests that close periods with
/// `send-now` use a period whose boundary cannot fall within the test (years), so the
/// proxy's own timer never races them.
fn options(mta: &FakeMta, dns: &DnsServer, interval: &str) -> ProxyOptions {
    let mut o = ProxyOptions::smtp(mta.addr);
    o.auth = true;
    o.role = "inbound".into();
    o.local_domains = vec!["example.org".into()];
    o.dns_nameserver = Some(dns.nameserver());
    o.xclient = "require".into();
    o.extra_toml.push(
        format!("[dmarc_reports]\nenabled = true\ninterval = \"{interval}\"\norg_name = \"Mailwarden Test\"\nemail = \"dmarc-reports@mailwarden.test\"\nopt_out = [\"optout.example\"]\n"),
    );
    o
}

fn message(from_domain: &str, n: usize) -> Vec<u8> {
    format!(
        "From: <a@{from_domain}>\r\nTo: <{RCPT}>\r\nSubject: m{n}\r\nDate: Tue, 25 Nov 2025 10:00:00 +0000\r\nMessage-ID: <m{n}.{from_domain}@client.example>\r\n\r\nhello\r\n"
    )
    .into_bytes()
}

/// The venv's python with parsedmarc (made by .ci/run), or a clear failure.
fn parsedmarc_python() -> PathBuf {
    let py = repo_path("target/parsedmarc-venv/bin/python");
    let ok = Command::new(&py)
        .args(["-c", "import parsedmarc"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{} with parsedmarc is needed: python3 -m venv target/parsedmarc-venv && target/parsedmarc-venv/bin/pip install parsedmarc (.ci/run does it)",
        py.display()
    );
    py
}

/// The gzip attachment of a report mail, decoded (base64) and uncompressed.
fn attachment_xml(raw: &[u8]) -> (String, String) {
    use base64::Engine;
    let text = String::from_utf8_lossy(raw).replace("\r\n", "\n");
    let at = text
        .find("Content-Type: application/gzip")
        .expect("gzip part");
    let part = &text[at..];
    let name = part
        .split("filename=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("filename")
        .to_string();
    let body_start = part.find("\n\n").expect("part body") + 2;
    let b64: String = part[body_start..]
        .lines()
        .take_while(|l| !l.starts_with("--"))
        .collect();
    let gz = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .expect("base64");
    let mut xml = String::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_string(&mut xml)
        .expect("gzip");
    (name, xml)
}

fn header<'a>(raw: &'a str, name: &str) -> &'a str {
    raw.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .unwrap_or("")
}

/// What the proxy logged per message: (header.from, dmarc result, verdict).
fn logged(log: &str) -> Vec<(String, String, String)> {
    log.lines()
        .filter(|l| l.contains("verdict=") && l.contains("dmarc="))
        .map(|l| {
            let word = |key: &str| {
                l.split(key)
                    .nth(1)
                    .map(|s| {
                        s.trim_start_matches('"')
                            .chars()
                            .take_while(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '-')
                            .collect::<String>()
                    })
                    .unwrap_or_default()
            };
            (word("header.from="), word("dmarc="), word("verdict="))
        })
        .collect()
}

/// `mailwarden dmarc -c CONFIG reports ARGS…`: (exit code, stdout, stderr).
fn reports_cli(dir: &Path, config: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin())
        .args(["dmarc", "-c"])
        .arg(config)
        .arg("reports")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run mailwarden");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn send_now(dir: &Path, config: &Path) -> String {
    let (code, stdout, stderr) = reports_cli(dir, config, &["send-now"]);
    assert_eq!(code, 0, "send-now failed: {stdout}{stderr}");
    stdout
}

/// One session sending one message from `domain`; asserts the end-of-data reply code.
async fn send_one(proxy: &Proxy, domain: &str, n: usize, code: &str) {
    let mut c = proxy.connect_ehlo("mx.client.example").await;
    let r = c.cmd(&format!("MAIL FROM:<b@{domain}>")).await;
    assert_reply(&r, "250", "MAIL");
    let r = c.cmd(&format!("RCPT TO:<{RCPT}>")).await;
    assert_reply(&r, "250", "RCPT");
    let r = c.data(&message(domain, n)).await;
    assert_reply(&r, code, &format!("end of data from {domain}"));
    c.cmd("QUIT").await;
}

/// Waits until the proxy's store holds `n` evaluations (the recorder writes in the
/// background).
async fn wait_evaluations(proxy: &Proxy, n: i64) {
    let db = proxy.dir.path().join("var/dmarc-reports.sqlite");
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let rows: i64 = rusqlite::Connection::open(&db)
            .and_then(|c| c.query_row("SELECT COUNT(*) FROM evaluations", [], |r| r.get(0)))
            .unwrap_or(0);
        if rows == n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "evaluations recorded: {rows}, want {n}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Report mails the fake next hop accepted (their subject names the report domain).
fn report_mails(mta: &FakeMta) -> Vec<common::fake_mta::Message> {
    mta.accepted()
        .into_iter()
        .filter(|m| String::from_utf8_lossy(&m.data).contains("Subject: Report Domain: "))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_day_of_traffic_gives_valid_reports_sent_once_to_verified_rua_only() {
    let python = parsedmarc_python();
    let dns = DnsServer::start(zone());
    let mta = FakeMta::start(Script::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start_in(options(&mta, &dns, YEARS), dir).await;
    let traffic = [
        ("sender.example", 3, "250"),
        ("spoof.example", 2, "550"),
        ("quar.example", 2, "250"),
        ("optout.example", 1, "250"),
    ];
    let mut n = 0;
    for (domain, count, code) in traffic {
        for _ in 0..count {
            n += 1;
            send_one(&proxy, domain, n, code).await;
        }
    }
    // What the proxy decided, from its own log.
    let log = proxy.wait_log("header.from=optout.example", DEADLINE).await;
    let mut expected: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for (from, dmarc, verdict) in logged(&log) {
        let disposition = match verdict.as_str() {
            "accept" => "none",
            "tag" | "quarantine" => "quarantine",
            "reject" => "reject",
            other => panic!("unexpected verdict {other:?} in\n{log}"),
        };
        expected
            .entry(from)
            .or_default()
            .push((dmarc, disposition.to_string()));
    }
    assert_eq!(expected.values().map(Vec::len).sum::<usize>(), 8, "{log}");

    // The opted-out message is never recorded: 7 evaluations.
    wait_evaluations(&proxy, 7).await;

    let config = proxy.config_path.clone();
    let out = send_now(proxy.dir.path(), &config);
    assert!(out.contains("built 3, sent 3"), "{out}");
    // A second run finds nothing to build or send: exactly once.
    let again = send_now(proxy.dir.path(), &config);
    assert!(again.contains("built 0, sent 0"), "{again}");

    let reports = report_mails(&mta);
    assert_eq!(reports.len(), 3, "one mail per reporting domain");
    let mut seen_domains = Vec::new();
    for m in &reports {
        let raw = String::from_utf8_lossy(&m.data).replace("\r\n", "\n");
        let subject = header(&raw, "Subject");
        let domain = subject
            .strip_prefix("Report Domain: ")
            .and_then(|s| s.split(' ').next())
            .expect("RFC 7489 subject")
            .to_string();
        assert!(
            subject.contains(" Submitter: mailwarden.test Report-ID: <"),
            "{subject}"
        );
        assert!(
            m.mail.contains("<dmarc-reports@mailwarden.test>"),
            "{}",
            m.mail
        );
        let mut rcpts: Vec<String> = m.rcpts.iter().map(|r| r.to_ascii_lowercase()).collect();
        rcpts.sort();
        let want: Vec<&str> = match domain.as_str() {
            "sender.example" => vec!["rcpt to:<agg@sender.example>", "rcpt to:<ext@reports.test>"],
            "spoof.example" => vec!["rcpt to:<dmarc@spoof.example>"],
            "quar.example" => vec!["rcpt to:<r@quar.example>"],
            other => panic!("report for {other}"),
        };
        assert_eq!(rcpts, want, "destinations of the {domain} report");
        seen_domains.push(domain.clone());

        let (filename, xml) = attachment_xml(&m.data);
        assert!(
            filename.starts_with(&format!("mailwarden.test!{domain}!"))
                && filename.ends_with(".xml.gz"),
            "{filename}"
        );
        let work = tempfile::tempdir().unwrap();
        let xml_path = work.path().join("report.xml");
        std::fs::write(&xml_path, &xml).unwrap();
        let lint = Command::new("xmllint")
            .arg("--noout")
            .arg("--schema")
            .arg(repo_path("tests/fixtures/dmarc/rua.xsd"))
            .arg(&xml_path)
            .output()
            .expect("xmllint (Debian libxml2-utils)");
        assert!(
            lint.status.success(),
            "{domain} report not valid:\n{}\n{xml}",
            String::from_utf8_lossy(&lint.stderr)
        );

        // The independent parser reads the whole report mail, as a domain owner would.
        let eml = work.path().join("report.eml");
        std::fs::write(&eml, &m.data).unwrap();
        let script = r#"
import json, sys, parsedmarc
parsed = parsedmarc.parse_report_file(sys.argv[1], offline=True, always_use_local_files=True)
report = parsed["report"]
out = {"org": report["report_metadata"]["org_name"],
       "domain": report["policy_published"]["domain"],
       "p": report["policy_published"]["p"],
       "records": [{"count": r["count"], "header_from": r["identifiers"]["header_from"],
                    "disposition": r["policy_evaluated"]["disposition"],
                    "dkim": r["policy_evaluated"]["dkim"], "spf": r["policy_evaluated"]["spf"],
                    "spf_results": [s["result"] for s in r["auth_results"]["spf"]]}
                   for r in report["records"]]}
print(json.dumps(out))
"#;
        let parsed = Command::new(&python)
            .args(["-c", script])
            .arg(&eml)
            .output()
            .expect("python");
        assert!(
            parsed.status.success(),
            "parsedmarc: {}",
            String::from_utf8_lossy(&parsed.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&parsed.stdout).unwrap();
        assert_eq!(v["org"], "Mailwarden Test");
        assert_eq!(v["domain"], domain.as_str());
        // Per (dmarc result, disposition): the report's counts equal the log's.
        let mut from_report: BTreeMap<(String, String), u64> = BTreeMap::new();
        for r in v["records"].as_array().unwrap() {
            assert_eq!(r["header_from"], domain.as_str());
            let aligned = r["dkim"] == "pass" || r["spf"] == "pass";
            let dmarc = if aligned { "pass" } else { "fail" };
            *from_report
                .entry((dmarc.into(), r["disposition"].as_str().unwrap().into()))
                .or_default() += r["count"].as_u64().unwrap();
            let spf_expected = if domain == "sender.example" {
                "pass"
            } else {
                "fail"
            };
            assert_eq!(r["spf_results"][0], spf_expected);
        }
        let mut from_log: BTreeMap<(String, String), u64> = BTreeMap::new();
        for (dmarc, disposition) in &expected[&domain] {
            *from_log
                .entry((dmarc.clone(), disposition.clone()))
                .or_default() += 1;
        }
        assert_eq!(
            from_report, from_log,
            "{domain}: report vs proxy log\n{xml}"
        );
    }
    seen_domains.sort();
    assert_eq!(
        seen_domains,
        ["quar.example", "sender.example", "spoof.example"]
    );

    // `reports list` shows them sent, to the verified destinations only.
    let list = Command::new(bin())
        .args(["dmarc", "-c"])
        .arg(&config)
        .args(["reports", "list"])
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    assert_eq!(list.matches(" sent ").count(), 3, "{list}");
    assert!(
        !list.contains("victim@unverified.test,") && !list.contains("optout.example"),
        "{list}"
    );
}

/// A report the next hop defers is sent again later, once; a destination whose `!size`
/// is smaller than the report gets nothing; `reports show` gives the stored XML.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferred_report_is_retried_and_delivered_once_and_size_limits_hold() {
    let dns = DnsServer::start(zone().txt("tiny.example", "v=spf1 ip4:127.0.0.1 -all").txt(
        "_dmarc.tiny.example",
        "v=DMARC1; p=none; rua=mailto:r@tiny.example!1k",
    ));
    let mta = FakeMta::start(Script::default()).await;
    let proxy = Proxy::start_in(options(&mta, &dns, YEARS), tempfile::tempdir().unwrap()).await;
    send_one(&proxy, "sender.example", 1, "250").await;
    send_one(&proxy, "tiny.example", 2, "250").await;
    wait_evaluations(&proxy, 2).await;
    mta.update(|s| {
        s.eod_by_content.push((
            "Report Domain: sender.example".into(),
            Act::reply("451 4.3.0 try later"),
        ))
    });
    let (dir, config) = (proxy.dir.path(), proxy.config_path.clone());
    let (code, out, err) = reports_cli(dir, &config, &["send-now"]);
    assert_eq!(code, 2, "a deferral is exit code 2: {out}{err}");
    assert!(
        out.contains("built 2, sent 0, deferred 1, failed 0, undeliverable 1"),
        "{out}"
    );
    assert!(report_mails(&mta).is_empty());
    let (_, list, _) = reports_cli(dir, &config, &["list", "--json"]);
    let rows: Vec<serde_json::Value> = list
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let by = |d: &str| rows.iter().find(|r| r["domain"] == d).unwrap().clone();
    assert_eq!(by("sender.example")["state"], "pending");
    assert!(
        by("sender.example")["last_error"]
            .as_str()
            .unwrap()
            .contains("451")
    );
    assert_eq!(by("tiny.example")["state"], "undeliverable");
    assert!(
        by("tiny.example")["last_error"]
            .as_str()
            .unwrap()
            .contains("over its limit")
    );

    // The next hop takes it now: sent, once, however often send-now runs.
    mta.update(|s| s.eod_by_content.clear());
    let out = send_now(dir, &config);
    assert!(out.contains("built 0, sent 1"), "{out}");
    let out = send_now(dir, &config);
    assert!(out.contains("built 0, sent 0, deferred 0"), "{out}");
    let mails = report_mails(&mta);
    assert_eq!(mails.len(), 1);
    assert!(String::from_utf8_lossy(&mails[0].data).contains("Report Domain: sender.example"));

    let id = by("sender.example")["id"].as_str().unwrap().to_string();
    let (code, show, _) = reports_cli(dir, &config, &["show", &id]);
    assert_eq!(code, 0);
    assert!(show.contains("state:     sent (attempts 2)"), "{show}");
    assert!(show.contains("<report_id>") && show.contains(&id), "{show}");
    let (code, _, err) = reports_cli(dir, &config, &["show", "no-such-report"]);
    assert_eq!(code, 1, "{err}");
}

/// Without send-now: the proxy's own timer closes the period and sends the report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_sends_reports_when_a_period_ends() {
    let dns = DnsServer::start(zone());
    let mta = FakeMta::start(Script::default()).await;
    let proxy = Proxy::start_in(options(&mta, &dns, "2s"), tempfile::tempdir().unwrap()).await;
    send_one(&proxy, "spoof.example", 1, "550").await;
    let deadline = std::time::Instant::now() + DEADLINE;
    while report_mails(&mta).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "no report from the timer\n{}",
            proxy.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, xml) = attachment_xml(&report_mails(&mta)[0].data);
    assert!(xml.contains("<disposition>reject</disposition>"), "{xml}");
    assert!(xml.contains("<count>1</count>"), "{xml}");
    // Nothing is left to send: the timer's report is not sent a second time.
    let out = send_now(proxy.dir.path(), &proxy.config_path);
    assert!(out.contains("sent 0"), "{out}");
    assert_eq!(report_mails(&mta).len(), 1);
}
