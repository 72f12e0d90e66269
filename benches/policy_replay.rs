//! Issue 15 figures: how fast `policy replay` goes, and what the decision log costs on
//! the relay path.
//!
//! Run with `cargo bench --bench policy_replay` (optimised build). Two parts:
//!
//! 1. **Replay speed**: 200,000 realistic records (every kind of result, lists, flags,
//!    sanity problems) written through the log's own store into a temporary directory,
//!    then replayed through `config/policy.example.toml` on one thread (one core), as
//!    `mailwarden policy replay` does: read, parse, evaluate, count. Target ≥ 100,000
//!    transactions/s.
//! 2. **Log cost**: two mailwarden processes side by side, identical but for
//!    `[decision_log] enabled`, each with an inbound listener (SPF, DKIM, DMARC against a
//!    stub DNS on loopback answering NXDOMAIN) relaying to Postfix's `smtp-sink`. The
//!    same client sends the same 4 KB messages to each, interleaved in rounds; the
//!    figure is each process's CPU time (utime+stime, /proc/PID/stat) per message.
//!    Target: the log adds ≤ 5 %.
//!
//! Knobs: `REPLAY_BENCH_RECORDS` (200000), `LOG_COST_MESSAGES` per round and process
//! (2000), `LOG_COST_ROUNDS` (3), `MAILWARDEN_BIN`.

#[path = "../tests/common/stub_dns.rs"]
mod stub_dns;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mailwarden::auth::AuthResult;
use mailwarden::decision_log::store::{DecisionStore, FileStore};
use mailwarden::decision_log::{LoggedHeaders, Record, Stage, digest, replay};
use mailwarden::policy::inputs::{LoggedAuth, LoggedDkim, LoggedSanity, LoggedSpf, PolicyInputs};
use mailwarden::policy::rules::{ActionKind, Policy};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const RESULTS: [AuthResult; 5] = [
    AuthResult::Pass,
    AuthResult::Fail,
    AuthResult::None,
    AuthResult::SoftFail,
    AuthResult::TempError,
];

fn record(n: usize, t: u64) -> Record {
    let r = |k: usize| RESULTS[(n / k) % RESULTS.len()];
    let domain = format!("sender{}.example", n % 500);
    let inputs = PolicyInputs {
        auth: Some(LoggedAuth {
            spf: LoggedSpf {
                result: r(1),
                domain: domain.clone(),
            },
            spf_helo: LoggedSpf {
                result: r(3),
                domain: format!("mx.{domain}"),
            },
            dkim: vec![LoggedDkim {
                result: r(7),
                domain: if n.is_multiple_of(9) {
                    "lists.example.net".into()
                } else {
                    domain.clone()
                },
                selector: "s1".into(),
                stale_secs: None,
            }],
            arc: r(11),
            arc_vouching_sealer: n.is_multiple_of(13).then(|| "google.com".into()),
            dmarc: r(5),
            dmarc_policy: Some(["none", "quarantine", "reject"][n % 3].into()),
            dmarc_published_policy: Some(["none", "quarantine", "reject"][n % 3].into()),
            dmarc_domain: domain.clone(),
            stale: Default::default(),
        }),
        flags: if n.is_multiple_of(17) {
            vec!["lookalike-domain".into()]
        } else {
            vec![]
        },
        from_domain: domain.clone(),
        mail_from_domain: domain.clone(),
        rcpt_domains: vec!["example.org".into()],
        list_id: n.is_multiple_of(9).then(|| "news.lists.example.net".into()),
        client_ip: std::net::IpAddr::from([198, 51, 100, (n % 250) as u8]),
        sanity: n.is_multiple_of(101).then(|| LoggedSanity {
            problem: "several-from-fields".into(),
            text: "Message has several From fields".into(),
            action: ActionKind::Quarantine,
        }),
        // Inbound mail: the outbound stage does not run.
        outbound: None,
    };
    let e = inputs.evaluate(&Policy::builtin());
    Record {
        t,
        session: format!("S{n:012}"),
        listener: "inbound".into(),
        client: format!("198.51.100.{}:{}", n % 250, 40000 + n % 20000),
        helo: format!("mx.{domain}"),
        login: None,
        mail_from: format!("user{n}@{domain}"),
        rcpts: vec!["someone@example.org".into()],
        headers: LoggedHeaders {
            from: Some(format!("\"User {n}\" <user{n}@{domain}>")),
            list_id: inputs.list_id.as_ref().map(|l| format!("<{l}>")),
            message_id: Some(format!("<{n}.{t}@{domain}>")),
        },
        digest: digest(format!("message {n}").as_bytes()),
        size: 4096 + n % 10_000,
        stage: Stage::Policy,
        action: e.action,
        rule: e.rule,
        trace: mailwarden::decision_log::compact_trace(&e.trace),
        inputs: Some(inputs),
        outbound: None,
        reply: 250,
        quarantine_id: None,
    }
}

fn replay_speed() -> (usize, f64, f64) {
    let n = env_usize("REPLAY_BENCH_RECORDS", 200_000);
    let dir = tempfile::tempdir().unwrap();
    let cfg = mailwarden::config::decision_log::DecisionLogConfig {
        dir: dir.path().to_path_buf(),
        ..Default::default()
    };
    let mut store = FileStore::new(&cfg);
    let t0 = mailwarden::decision_log::now_ms() - 3_600_000;
    let batch: Vec<Record> = (0..n).map(|i| record(i, t0 + i as u64 / 100)).collect();
    for chunk in batch.chunks(512) {
        store.append(chunk).unwrap();
    }
    drop(store);
    let bytes: u64 = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    let policy =
        Policy::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("config/policy.example.toml"))
            .unwrap();
    let mut best = f64::MAX;
    for _ in 0..3 {
        let started = Instant::now();
        let r = replay::run(
            &FileStore::reader(dir.path()),
            &policy,
            0,
            u64::MAX,
            0,
            &mut |_, _| {},
        )
        .unwrap();
        best = best.min(started.elapsed().as_secs_f64());
        assert_eq!(r.total as usize, n);
    }
    (n, n as f64 / best, bytes as f64 / n as f64)
}

// ---------------------------------------------------------------------------
// Log cost on the relay path

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn mailwarden_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MAILWARDEN_BIN") {
        return p.into();
    }
    option_env!("CARGO_BIN_EXE_mailwarden")
        .map_or("target/release/mailwarden".into(), PathBuf::from)
}

fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / clk_tck()
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_greeting(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(s) = TcpStream::connect(("127.0.0.1", port)) {
            let mut line = String::new();
            s.set_read_timeout(Some(Duration::from_secs(5))).ok();
            let _ = BufReader::new(&s).read_line(&mut line);
            let _ = (&s).write_all(b"QUIT\r\n");
            if line.starts_with("220") {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing greets on {port}");
}

fn start_proxy(dir: &Path, name: &str, port: u16, sink: u16, dns: u16, log: bool) -> Proc {
    let config = dir.join(format!("{name}.toml"));
    fs::write(
        &config,
        format!(
            "hostname = \"mailwarden.bench\"\nlocal_domains = [\"bench.test\"]\n\n\
             [[listener]]\naddress = \"127.0.0.1:{port}\"\nrole = \"inbound\"\n\n\
             [next_hop]\naddress = \"smtp://127.0.0.1:{sink}\"\nxclient = \"off\"\ntls = \"off\"\n\n\
             [dns]\nnameservers = [\"127.0.0.1:{dns}\"]\ntimeout_ms = 2000\nattempts = 1\n\n\
             [log]\nlevel = \"warn\"\n\n\
             [decision_log]\nenabled = {log}\ndir = \"{name}-log\"\n"
        ),
    )
    .unwrap();
    let child = Command::new(mailwarden_bin())
        .arg("run")
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.join(format!("{name}.stderr"))).unwrap())
        .spawn()
        .expect("spawn mailwarden");
    wait_greeting(port);
    Proc(child)
}

fn start_sink(dir: &Path, port: u16) -> Proc {
    let mut cmd = Command::new("smtp-sink");
    let root = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|r| r.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    if root {
        cmd.args(["-u", "nobody"]);
    }
    cmd.args(["-4", "-m", "1024"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("1024");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.join("sink.stderr")).unwrap())
        .spawn()
        .expect("smtp-sink (Debian's postfix package) is needed for the log-cost part");
    wait_greeting(port);
    Proc(child)
}

/// Sends `count` 4 KB messages (50 per connection) and checks each got 250.
fn send(port: u16, count: usize, salt: usize) {
    let body = "x".repeat(76);
    let mut sent = 0;
    while sent < count {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_nodelay(true).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut w = s;
        let mut reply = || {
            let mut code = String::new();
            loop {
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                assert!(line.len() >= 4, "short reply {line:?}");
                if line.as_bytes()[3] != b'-' {
                    code.push_str(&line[..3]);
                    return code;
                }
            }
        };
        assert_eq!(reply(), "220");
        w.write_all(b"EHLO client.bench.test\r\n").unwrap();
        assert_eq!(reply(), "250");
        for _ in 0..50.min(count - sent) {
            let n = salt + sent;
            w.write_all(format!("MAIL FROM:<a{n}@sender.example>\r\n").as_bytes())
                .unwrap();
            assert_eq!(reply(), "250");
            w.write_all(b"RCPT TO:<u@bench.test>\r\n").unwrap();
            assert_eq!(reply(), "250");
            w.write_all(b"DATA\r\n").unwrap();
            assert_eq!(reply(), "354");
            let mut m = format!(
                "From: <a{n}@sender.example>\r\nTo: <u@bench.test>\r\nSubject: bench {n}\r\nMessage-ID: <{n}@sender.example>\r\n\r\n"
            );
            for _ in 0..52 {
                m.push_str(&body);
                m.push_str("\r\n");
            }
            m.push_str(".\r\n");
            w.write_all(m.as_bytes()).unwrap();
            assert_eq!(reply(), "250", "message {n}");
            sent += 1;
        }
        w.write_all(b"QUIT\r\n").unwrap();
        let _ = reply();
    }
}

fn log_cost() -> Vec<(f64, f64)> {
    let per_round = env_usize("LOG_COST_MESSAGES", 2000);
    let rounds = env_usize("LOG_COST_ROUNDS", 3);
    let dir = tempfile::tempdir().unwrap();
    let dns = stub_dns::StubDns::start();
    let sink_port = free_port();
    let _sink = start_sink(dir.path(), sink_port);
    let (on_port, off_port) = (free_port(), free_port());
    let on = start_proxy(dir.path(), "log-on", on_port, sink_port, dns.port, true);
    let off = start_proxy(dir.path(), "log-off", off_port, sink_port, dns.port, false);
    // Warm-up: caches, allocator, files.
    send(on_port, 200, 0);
    send(off_port, 200, 0);
    let mut out = Vec::new();
    for round in 0..rounds {
        let salt = (round + 1) * 1_000_000;
        let mut per = [0.0f64; 2];
        // Alternate which goes first, so neither always meets a warmer machine.
        let order: [(usize, u16, u32); 2] = if round % 2 == 0 {
            [(0, on_port, on.0.id()), (1, off_port, off.0.id())]
        } else {
            [(1, off_port, off.0.id()), (0, on_port, on.0.id())]
        };
        for (slot, port, pid) in order {
            let before = cpu_seconds(pid);
            send(port, per_round, salt);
            per[slot] = (cpu_seconds(pid) - before) / per_round as f64 * 1e3;
        }
        out.push((per[0], per[1]));
    }
    let logged: usize = fs::read_dir(dir.path().join("log-on-log"))
        .unwrap()
        .map(|e| {
            fs::read_to_string(e.unwrap().path())
                .unwrap()
                .lines()
                .count()
        })
        .sum();
    assert!(
        logged >= per_round * rounds,
        "the log-on proxy logged {logged}"
    );
    out
}

/// The log's own work per message, in process (CPU, not wall, is what it costs the
/// proxy; on one thread the two are the same): the session side (header fields, SHA-256
/// of a 4 KB message, the record) and the writer side (JSON, buffered append).
fn record_cost_us() -> (f64, f64) {
    let n = 20_000;
    let mut message = String::from(
        "From: <a@sender.example>\r\nTo: <u@bench.test>\r\nSubject: bench\r\nMessage-ID: <1@sender.example>\r\n\r\n",
    );
    while message.len() < 4096 {
        message.push_str(&"x".repeat(76));
        message.push_str("\r\n");
    }
    let template = record(7, mailwarden::decision_log::now_ms());
    let started = Instant::now();
    let mut records = Vec::with_capacity(n);
    for i in 0..n {
        let fields = mailwarden::auth::headers::fields(message.as_bytes());
        let one = |name: &str| {
            mailwarden::auth::headers::first(&fields, name).map(|f| f.value.trim().to_string())
        };
        let mut r = template.clone();
        r.headers.from = one("From");
        r.headers.message_id = one("Message-ID");
        r.digest = digest(message.as_bytes());
        r.t += i as u64;
        records.push(r);
    }
    let session = started.elapsed().as_secs_f64() / n as f64 * 1e6;
    let dir = tempfile::tempdir().unwrap();
    let cfg = mailwarden::config::decision_log::DecisionLogConfig {
        dir: dir.path().to_path_buf(),
        ..Default::default()
    };
    let mut store = FileStore::new(&cfg);
    let started = Instant::now();
    for chunk in records.chunks(512) {
        store.append(chunk).unwrap();
    }
    let writer = started.elapsed().as_secs_f64() / n as f64 * 1e6;
    (session, writer)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let (n, rate, bytes) = replay_speed();
    println!("## policy replay");
    println!();
    println!("| records | bytes/record | transactions/s (one thread, best of 3) | target |");
    println!("|---:|---:|---:|---|");
    println!(
        "| {n} | {bytes:.0} | {rate:.0} | ≥ 100000: {} |",
        if rate >= 100_000.0 { "met" } else { "NOT met" }
    );
    println!();
    let rounds = log_cost();
    println!("## decision log cost (inbound listener, 4 KB messages, smtp-sink next hop)");
    println!();
    println!("| round | CPU ms/msg log on | CPU ms/msg log off | added |");
    println!("|---:|---:|---:|---:|");
    let mut ratios = Vec::new();
    for (i, (on, off)) in rounds.iter().enumerate() {
        let added = (on / off - 1.0) * 100.0;
        ratios.push(added);
        println!("| {} | {on:.3} | {off:.3} | {added:+.1} % |", i + 1);
    }
    ratios.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = ratios[ratios.len() / 2];
    println!();
    println!("median added CPU per message, process against process: {median:+.1} %");
    // The process figures move by more than the log costs on a shared machine (CLK_TCK
    // ticks, other load): the log's own work, measured in process, is the steady figure.
    let (session_us, writer_us) = record_cost_us();
    let mut offs: Vec<f64> = rounds.iter().map(|r| r.1).collect();
    offs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let off_us = offs[offs.len() / 2] * 1e3;
    let share = (session_us + writer_us) / off_us * 100.0;
    println!(
        "the log's own work: {session_us:.1} µs in the session + {writer_us:.1} µs in the writer \
         per message = {share:.1} % of the {off_us:.0} µs a message costs with the log off \
         (target ≤ 5 %: {})",
        if share <= 5.0 { "met" } else { "NOT met" }
    );
}
