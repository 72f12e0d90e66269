//! Differential test: mailwarden's DKIM, ARC and DMARC results against an independent
//! implementation, message by message.
//!
//! `tests/differential/corpus.py` signs a corpus of several hundred messages with dkimpy
//! (RSA-2048 and Ed25519, all canonicalizations, ARC chains of one to three sets, `l=`,
//! header and body edits after signing, duplicate / missing / two-mailbox / folded /
//! encoded From fields, signatures whose `h=` leaves out From, DKIM key record variants
//! and DMARC record variants) and writes the DNS zone they need. This test serves that
//! zone from the loopback DNS server (tests/common/dns.rs), then runs, over the same DNS:
//!
//! - `tests/differential/oracle.py` once for the whole corpus: dkimpy (each signature,
//!   the ARC chain), authheaders (DMARC) and pyspf (SPF, DMARC's input);
//! - `mailwarden check --json` on every message with the same client IP, HELO and MAIL
//!   FROM, a few processes at a time;
//!
//! and compares SPF (MAIL FROM), each DKIM signature (result word, `d=`, `s=`), the ARC
//! chain result and DMARC (result; policy where both give one).
//!
//! Disagreements are not errors by themselves: `tests/differential/known_disagreements.txt`
//! lists each accepted one with the RFC text that justifies it. The test fails on any
//! disagreement that is not listed AND on any listed one that no longer occurs, so the
//! list cannot go stale. With `MAILWARDEN_DIFF_REPORT=path` it writes a table of every
//! case and check (and the disagreement lines ready to paste) to `path`.
//!
//! Needs `/usr/bin/python3` with python3-dkim, python3-nacl, python3-authheaders,
//! python3-spf, python3-dnspython and python3-pkg-resources (all from Debian; `.ci/run`
//! installs them; Debian's packages, not pip, so nothing can replace python3-dkim) and the
//! `openssl` command.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::dns::{DnsServer, Rec, Zone};
use serde_json::Value;

/// `mailwarden check` processes at a time (the machine has two cores; checks mostly wait
/// on process start-up and loopback DNS).
const WORKERS: usize = 4;
const CASE_DEADLINE: Duration = Duration::from_secs(60);
const ORACLE_DEADLINE: Duration = Duration::from_secs(300);
/// The corpus must stay at least this large (issue 11: at least 300 messages).
const MIN_CASES: usize = 300;

const PY_MODULES: &str = "import dkim, nacl.signing, authheaders, spf, dns.resolver";

/// One message of the corpus and the SMTP envelope it arrives with.
#[derive(Clone, Debug)]
struct Case {
    id: String,
    family: String,
    file: PathBuf,
    ip: String,
    helo: String,
    mail_from: String,
}

/// One compared check of one case.
#[derive(Clone, Debug)]
struct Row {
    case: String,
    family: String,
    check: String,
    mailwarden: String,
    oracle: String,
    /// Reasons both sides gave, for the report only (not compared).
    detail: String,
}

impl Row {
    fn agrees(&self) -> bool {
        self.mailwarden == self.oracle
    }
}

/// An accepted disagreement from known_disagreements.txt.
#[derive(Clone, Debug)]
struct Known {
    line: usize,
    mailwarden: String,
    oracle: String,
    reason: String,
}

fn python() -> &'static str {
    let p = "/usr/bin/python3";
    let ok = Command::new(p)
        .args(["-c", PY_MODULES])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "auth_differential needs {p} with dkimpy, PyNaCl, authheaders, pyspf and dnspython: \
         `apt-get install python3-dkim python3-nacl python3-authheaders python3-spf \
         python3-dnspython python3-pkg-resources` (.ci/run does this); and the openssl command"
    );
    p
}

fn differential_dir() -> PathBuf {
    common::repo_path("tests/differential")
}

/// Runs corpus.py into `dir`: the cases and the zone they need.
fn generate(dir: &Path) -> (Vec<Case>, Zone) {
    let out = Command::new(python())
        .arg(differential_dir().join("corpus.py"))
        .arg(dir)
        .output()
        .expect("run corpus.py");
    assert!(
        out.status.success(),
        "corpus.py failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("corpus: {}", String::from_utf8_lossy(&out.stdout).trim());
    let read = |name: &str| -> Value {
        serde_json::from_slice(&std::fs::read(dir.join(name)).expect(name)).expect(name)
    };
    let cases = read("cases.json")
        .as_array()
        .expect("cases array")
        .iter()
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap_or_else(|| panic!("{k} in {c}"));
            Case {
                id: s("id").into(),
                family: s("family").into(),
                file: PathBuf::from(s("file")),
                ip: s("ip").into(),
                helo: s("helo").into(),
                mail_from: s("mail_from").into(),
            }
        })
        .collect();
    let mut zone = Zone::new();
    for r in read("zone.json").as_array().expect("zone array") {
        let name = r["name"].as_str().expect("record name");
        match r["type"].as_str() {
            Some("TXT") => {
                let strings = r["strings"]
                    .as_array()
                    .expect("TXT strings")
                    .iter()
                    .map(|s| s.as_str().expect("string").as_bytes().to_vec())
                    .collect();
                zone.add(name, Rec::Txt(strings));
            }
            Some("A") => {
                let ip = r["ip"].as_str().expect("A ip").parse().expect("IPv4");
                zone.add(name, Rec::A(ip));
            }
            Some("SERVFAIL") => zone = zone.servfail(name),
            other => panic!("zone.json: record type {other:?} for {name}"),
        }
    }
    (cases, zone)
}

/// Runs oracle.py over the whole corpus: case id -> its results.
fn run_oracle(dir: &Path, dns: &DnsServer) -> BTreeMap<String, Value> {
    let out_file = dir.join("oracle.json");
    let mut command = Command::new(python());
    command
        .arg(differential_dir().join("oracle.py"))
        .arg(dir.join("cases.json"))
        .arg(dns.addr().ip().to_string())
        .arg(dns.addr().port().to_string())
        .arg(&out_file);
    let done = common::run_bounded_blocking(command, dir, ORACLE_DEADLINE);
    assert!(
        done.success(),
        "oracle.py failed ({:?}):\n{}\n{}",
        done.status,
        done.stdout_text(),
        done.stderr
    );
    let v: Value = serde_json::from_slice(&std::fs::read(&out_file).expect("oracle.json"))
        .expect("oracle JSON");
    v.as_object()
        .expect("oracle map")
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// `mailwarden check --json` for one case: its JSON, or why there is none.
fn run_check(config: &Path, case: &Case, scratch: &Path) -> Result<Value, String> {
    let mut command = Command::new(common::bin());
    command
        .arg("check")
        .arg("--config")
        .arg(config)
        .args(["--ip", &case.ip, "--helo", &case.helo])
        .args([
            "--mail-from",
            &case.mail_from,
            "--rcpt",
            "bob@receiver.example",
        ])
        .arg("--json")
        .arg(&case.file);
    let done = common::run_bounded_blocking(command, scratch, CASE_DEADLINE);
    let stdout = done.stdout_text();
    match done.status {
        Some(st) if st.success() => serde_json::from_str(stdout.trim())
            .map_err(|e| format!("not JSON ({e}): {}", stdout.trim())),
        st => Err(format!("exit {st:?}: {}", done.stderr.trim())),
    }
}

/// Every case through `mailwarden check`, WORKERS at a time; results in case order.
fn run_checks(config: &Path, cases: &[Case], scratch: &Path) -> Vec<Result<Value, String>> {
    let next = Mutex::new(0usize);
    let out: Mutex<BTreeMap<usize, Result<Value, String>>> = Mutex::new(BTreeMap::new());
    std::thread::scope(|s| {
        for _ in 0..WORKERS {
            s.spawn(|| {
                loop {
                    let i = {
                        let mut n = next.lock().unwrap();
                        *n += 1;
                        *n - 1
                    };
                    let Some(case) = cases.get(i) else { break };
                    let r = run_check(config, case, scratch);
                    out.lock().unwrap().insert(i, r);
                }
            });
        }
    });
    out.into_inner().unwrap().into_values().collect()
}

fn word(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// A DKIM entry as compared: result word, d=, s=.
fn dkim_text(e: Option<&Value>) -> String {
    match e {
        None => "-".into(),
        Some(e) => format!(
            "{} d={} s={}",
            word(&e["result"]),
            word(&e["domain"]).to_ascii_lowercase(),
            word(&e["selector"])
        ),
    }
}

/// The compared checks of one case.
fn compare(case: &Case, mw: &Result<Value, String>, oracle: &Value) -> Vec<Row> {
    let row = |check: &str, m: String, o: String| Row {
        case: case.id.clone(),
        family: case.family.clone(),
        check: check.into(),
        mailwarden: m,
        oracle: o,
        detail: String::new(),
    };
    let why = |m: &Value, o: &Value| format!("mailwarden: {} | oracle: {}", word(m), word(o));
    let mw = match mw {
        Ok(v) => v,
        Err(e) => return vec![row("check", format!("no result: {e}"), "result".into())],
    };
    let mut rows = vec![row(
        "spf",
        word(&mw["spf"]["mail_from"]["result"]),
        word(&oracle["spf"]["result"]),
    )];
    let empty = Vec::new();
    let mw_dkim = mw["dkim"].as_array().unwrap_or(&empty);
    let or_dkim = oracle["dkim"].as_array().unwrap_or(&empty);
    for i in 0..mw_dkim.len().max(or_dkim.len()) {
        let mut r = row(
            &format!("dkim[{i}]"),
            dkim_text(mw_dkim.get(i)),
            dkim_text(or_dkim.get(i)),
        );
        r.detail = why(
            mw_dkim.get(i).map_or(&Value::Null, |e| &e["reason"]),
            or_dkim.get(i).map_or(&Value::Null, |e| &e["reason"]),
        );
        rows.push(r);
    }
    let mut r = row(
        "arc",
        word(&mw["arc"]["result"]),
        word(&oracle["arc"]["result"]),
    );
    r.detail = why(&Value::Null, &oracle["arc"]["reason"]);
    rows.push(r);
    let mut r = row(
        "dmarc",
        word(&mw["dmarc"]["result"]),
        word(&oracle["dmarc"]["result"]),
    );
    r.detail = format!(
        "header.from mailwarden: {} oracle: {} | oracle: {}",
        word(&mw["dmarc"]["header_from"]),
        word(&oracle["dmarc"]["header_from"]),
        word(&oracle["dmarc"]["reason"])
    );
    rows.push(r);
    let mw_policy = word(&mw["dmarc"]["policy"]);
    let or_policy = word(&oracle["dmarc"]["policy"]);
    if mw_policy != "-" && !or_policy.is_empty() {
        rows.push(row("dmarc.policy", mw_policy, or_policy));
    }
    rows
}

/// known_disagreements.txt: `[reasons]` (KEY: text) and `[disagreements]`
/// (case TAB check TAB mailwarden TAB oracle TAB KEY).
fn load_known(path: &Path) -> (BTreeMap<(String, String), Known>, BTreeMap<String, String>) {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut section = "";
    let mut known = BTreeMap::new();
    let mut reasons = BTreeMap::new();
    let mut last_reason: Option<String> = None;
    for (n, line) in text.lines().enumerate() {
        let n = n + 1;
        if line.trim_start().starts_with('#') || line.trim().is_empty() {
            continue;
        }
        if line.starts_with('[') {
            section = if line.trim() == "[reasons]" {
                "reasons"
            } else if line.trim() == "[disagreements]" {
                "disagreements"
            } else {
                panic!("{}:{n}: unknown section {line}", path.display())
            };
            continue;
        }
        match section {
            "reasons" => {
                // A line starting with white space continues the previous reason.
                if line.starts_with([' ', '\t']) {
                    let key = last_reason
                        .clone()
                        .unwrap_or_else(|| panic!("{}:{n}: continuation first", path.display()));
                    let r: &mut String = reasons.get_mut(&key).expect("reason");
                    r.push(' ');
                    r.push_str(line.trim());
                    continue;
                }
                let (key, text) = line
                    .split_once(':')
                    .unwrap_or_else(|| panic!("{}:{n}: expected `KEY: text`", path.display()));
                let key = key.trim().to_string();
                assert!(
                    reasons
                        .insert(key.clone(), text.trim().to_string())
                        .is_none(),
                    "{}:{n}: reason {key} given twice",
                    path.display()
                );
                last_reason = Some(key);
            }
            "disagreements" => {
                let f: Vec<&str> = line.split('\t').collect();
                assert!(
                    f.len() == 5,
                    "{}:{n}: expected 5 tab-separated fields (case, check, mailwarden, oracle, \
                     reason), got {}",
                    path.display(),
                    f.len()
                );
                let prev = known.insert(
                    (f[0].to_string(), f[1].to_string()),
                    Known {
                        line: n,
                        mailwarden: f[2].to_string(),
                        oracle: f[3].to_string(),
                        reason: f[4].to_string(),
                    },
                );
                assert!(
                    prev.is_none(),
                    "{}:{n}: {} {} listed twice",
                    path.display(),
                    f[0],
                    f[1]
                );
            }
            _ => panic!("{}:{n}: line outside a section", path.display()),
        }
    }
    for (k, v) in &known {
        assert!(
            reasons.contains_key(&v.reason),
            "{}:{}: {} {}: reason {} is not under [reasons]",
            path.display(),
            v.line,
            k.0,
            k.1,
            v.reason
        );
    }
    (known, reasons)
}

/// The table written when MAILWARDEN_DIFF_REPORT is set.
fn write_report(
    path: &Path,
    versions: &str,
    rows: &[Row],
    known: &BTreeMap<(String, String), Known>,
) {
    let mut out = format!("# oracle packages: {versions}\n");
    out.push_str(
        "# Every compared check of every case: case, family, check, mailwarden, oracle, status, \
         reasons\n",
    );
    for r in rows {
        let key = (r.case.clone(), r.check.clone());
        let status = match (r.agrees(), known.get(&key)) {
            (true, None) => "agree".to_string(),
            (true, Some(_)) => "agree (listed: stale)".to_string(),
            (false, Some(k)) if k.mailwarden == r.mailwarden && k.oracle == r.oracle => {
                format!("listed {}", k.reason)
            }
            (false, _) => "NEW".to_string(),
        };
        out.push_str(&format!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\n",
            r.case, r.family, r.check, r.mailwarden, r.oracle, status, r.detail
        ));
    }
    out.push_str(
        "\n# [disagreements] lines for known_disagreements.txt (reason ? = to classify)\n",
    );
    for r in rows.iter().filter(|r| !r.agrees()) {
        let reason = known
            .get(&(r.case.clone(), r.check.clone()))
            .map_or("?", |k| k.reason.as_str());
        out.push_str(&format!(
            "{}\t{}\t{}\t{}\t{}\n",
            r.case, r.check, r.mailwarden, r.oracle, reason
        ));
    }
    std::fs::write(path, out).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    eprintln!("report written to {}", path.display());
}

/// mailwarden and the independent implementation agree on every check of every case,
/// except the disagreements listed (with their RFC justification) in
/// tests/differential/known_disagreements.txt, each of which must still occur.
#[test]
fn mailwarden_agrees_with_an_independent_implementation() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let (cases, zone) = generate(dir.path());
    assert!(
        cases.len() >= MIN_CASES,
        "the corpus has {} cases, fewer than {MIN_CASES}",
        cases.len()
    );
    let dns = DnsServer::start(zone);
    let config = dir.path().join("mailwarden.toml");
    std::fs::write(
        &config,
        format!(
            // Generous DNS timeouts: a loaded machine must not turn an answer into a
            // temperror, which would be a disagreement that says nothing.
            "[dns]\nnameservers = [\"{}\"]\ntimeout_ms = 10000\nattempts = 1\n",
            dns.nameserver()
        ),
    )
    .expect("write config");
    let scratch = dir.path().join("scratch");
    std::fs::create_dir(&scratch).expect("scratch dir");

    // The oracle (one Python process) runs while mailwarden checks the same messages.
    let ((oracle, oracle_time), (checks, checks_time)) = std::thread::scope(|s| {
        let oracle = s.spawn(|| {
            let t = Instant::now();
            (run_oracle(dir.path(), &dns), t.elapsed())
        });
        let t = Instant::now();
        let checks = run_checks(&config, &cases, &scratch);
        let checks_time = t.elapsed();
        (oracle.join().expect("oracle thread"), (checks, checks_time))
    });
    let elapsed = started.elapsed();
    let versions = oracle
        .get("_versions")
        .map(Value::to_string)
        .unwrap_or_default();
    eprintln!("oracle packages: {versions}");
    eprintln!(
        "oracle {:.1} s, mailwarden checks {:.1} s ({WORKERS} at a time)",
        oracle_time.as_secs_f64(),
        checks_time.as_secs_f64()
    );

    let mut rows = Vec::new();
    for (case, mw) in cases.iter().zip(&checks) {
        let o = oracle
            .get(&case.id)
            .unwrap_or_else(|| panic!("the oracle gave no result for {}", case.id));
        rows.extend(compare(case, mw, o));
    }
    // A comparison that compared nothing would pass vacuously.
    let dkim_rows = rows.iter().filter(|r| r.check.starts_with("dkim[")).count();
    let arc_pass = rows
        .iter()
        .filter(|r| r.check == "arc" && r.agrees() && r.oracle == "pass")
        .count();
    let dmarc_pass = rows
        .iter()
        .filter(|r| r.check == "dmarc" && r.agrees() && r.oracle == "pass")
        .count();
    assert!(
        dkim_rows >= cases.len() / 2 && arc_pass >= 10 && dmarc_pass >= 50,
        "too little was compared: {dkim_rows} DKIM rows, {arc_pass} agreed ARC passes, \
         {dmarc_pass} agreed DMARC passes"
    );

    let known_path = differential_dir().join("known_disagreements.txt");
    let (known, _reasons) = load_known(&known_path);
    if let Ok(path) = std::env::var("MAILWARDEN_DIFF_REPORT") {
        write_report(Path::new(&path), &versions, &rows, &known);
    }

    let mut new = Vec::new();
    let mut seen: BTreeSet<(String, String)> = BTreeSet::new();
    for r in rows.iter().filter(|r| !r.agrees()) {
        let key = (r.case.clone(), r.check.clone());
        match known.get(&key) {
            Some(k) if k.mailwarden == r.mailwarden && k.oracle == r.oracle => {
                seen.insert(key);
            }
            Some(k) => new.push(format!(
                "{}\t{}\t{}\t{}\t(listed at line {} as mailwarden `{}`, oracle `{}`)",
                r.case, r.check, r.mailwarden, r.oracle, k.line, k.mailwarden, k.oracle
            )),
            None => new.push(format!(
                "{}\t{}\t{}\t{}",
                r.case, r.check, r.mailwarden, r.oracle
            )),
        }
    }
    let stale: Vec<String> = known
        .iter()
        .filter(|(k, _)| !seen.contains(*k))
        .map(|(k, v)| {
            format!(
                "line {}: {}\t{}\t{}\t{}",
                v.line, k.0, k.1, v.mailwarden, v.oracle
            )
        })
        .collect();
    let disagreements = rows.iter().filter(|r| !r.agrees()).count();
    eprintln!(
        "{} cases, {} checks compared, {} disagreements ({} listed), {:.1} s",
        cases.len(),
        rows.len(),
        disagreements,
        seen.len(),
        elapsed.as_secs_f64()
    );
    assert!(
        new.is_empty() && stale.is_empty(),
        "differential test against dkimpy/authheaders/pyspf ({versions}):\n\
         {} disagreement(s) not in {}:\n{}\n\
         {} listed disagreement(s) that no longer occur (remove them):\n{}\n\
         (MAILWARDEN_DIFF_REPORT=path writes the full table and the lines to paste)",
        new.len(),
        known_path.display(),
        new.join("\n"),
        stale.len(),
        stale.join("\n")
    );
}
