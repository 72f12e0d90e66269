//! Quarantine store throughput and `list` latency.
//!
//! Run with `cargo bench --bench quarantine`. In one run, in a temporary directory under
//! `target/tmp` (the disk /work is on; the file system type is printed and a tmpfs is
//! refused):
//!
//! - (a) writes per second of 4 KB messages through `Quarantine::store` (entry written in
//!   `tmp/`, both files and the directory fsync'd, renamed into `entries/`, `entries/`
//!   fsync'd, then the SQLite row), with one writer and with 8 writer threads sharing one
//!   `Quarantine`; against two baselines measured the same way in the same run:
//!   `bare`: create a new file, write 4 KB, fsync it (one fsync); and `fs-replica`: the
//!   store's own file system steps (mkdir, two synced files, directory fsync, rename,
//!   parent fsync) without the index, to split the cost between the disk and SQLite.
//! - (b) `list` latency with `--limit 50` and filters at 100,000 entries, p50/p99 over
//!   many runs, through the library (`Quarantine::list`, `index::Filter`) and through
//!   the real CLI (`mailwarden quarantine list`, a fresh process each time, which also
//!   opens the store), plus the cost of `Quarantine::open` on that store, split into its
//!   parts, because every CLI command pays it.
//!
//! The 100,000 entries are created fast and not durably: each `entries/<ID>/` gets its
//! `message.eml` (4 KB) and `meta.json` written without fsync, and the index rows are
//! inserted in one SQLite transaction with the library's `Index` (exactly the rows
//! `store` would write). `list` reads only the index; `open` walks `entries/`.
//!
//! - (c) the cost capacity accounting (`[quarantine] max_bytes`, `max_entries`,
//!   `domain_share`) adds to each store at 100,000 entries, index only (no files): the
//!   admission check (two point reads of the trigger-kept totals, p50/p99) against the
//!   aggregate queries it replaces, and an index row insert with the usage triggers
//!   against the same insert with them dropped.
//!
//! Knobs (environment): `QBENCH_ONLY_CAPACITY` (run only (c)), `QBENCH_ENTRIES` (default 100000), `QBENCH_WRITES` (writes per
//! write case, default 1600), `QBENCH_LIST_RUNS` (library runs per filter, default 200),
//! `QBENCH_CLI_RUNS` (default 20), `QBENCH_ROUNDS` (interleaved rounds of the write
//! cases, default 4), `QBENCH_KEEP` (keep the directory).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mailwarden::quarantine::QuarantineId;
use mailwarden::quarantine::index::{Filter, Index};
use mailwarden::quarantine::{Meta, Quarantine};

const MESSAGE_SIZE: usize = 4096;
const THREADS: usize = 8;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A 4 KB message: realistic headers, padded text body, CRLF lines.
fn message(i: usize) -> Vec<u8> {
    let mut m = format!(
        "From: Sender {i} <user{i}@d{}.example>\r\nTo: <r{}@example.org>\r\n\
         Subject: benchmark message {i}\r\nDate: Tue, 25 Nov 2025 10:00:00 +0000\r\n\
         Message-ID: <{i}@bench.example>\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\r\n",
        domain(i),
        i % 200
    )
    .into_bytes();
    let line =
        b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\r\n";
    while m.len() + line.len() <= MESSAGE_SIZE {
        m.extend_from_slice(line);
    }
    m.resize(MESSAGE_SIZE - 2, b'x');
    m.extend_from_slice(b"\r\n");
    m
}

const REASONS: [&str; 5] = [
    "Held by the sender domain's DMARC policy",
    "Held as a likely spoof",
    "test",
    "bulk sender",
    "Held by rule attachments",
];
const FLAGS: [&str; 5] = [
    "",
    "own-domain-spoof",
    "",
    "",
    "display-name-spoof,lookalike-domain",
];

/// The sender domain number of entry `i`: 1000 domains, independent of the reason
/// (`i % 5`), so a combined filter matches the product of the two fractions.
fn domain(i: usize) -> usize {
    (i / REASONS.len()) % 1000
}

/// The metadata of entry `i` (received `age` seconds ago).
fn meta(i: usize, age: u64) -> Meta {
    let k = i % REASONS.len();
    let d = domain(i);
    Meta {
        id: String::new(),
        received_at: now().saturating_sub(age),
        session: format!("{:024X}", i),
        listener: "inbound".into(),
        client: format!("192.0.2.{}:{}", i % 250, 1024 + i % 60000),
        helo: format!("mx{}.d{d}.example", i % 7),
        login: None,
        mail_from: format!("user{}@d{d}.example", i % 5000),
        rcpts: vec![format!("r{}@example.org", i % 200)],
        header_from: format!("Sender {} <user{}@d{d}.example>", i, i % 5000),
        subject: format!("benchmark message {i}"),
        size: MESSAGE_SIZE,
        authentication_results: format!(
            "mx.example.org; spf=pass smtp.mailfrom=d{d}.example; dkim=none; \
             dmarc=fail header.from=d{d}.example"
        ),
        flags: if FLAGS[k].is_empty() {
            vec![]
        } else {
            FLAGS[k].split(',').map(str::to_string).collect()
        },
        verdict: "quarantine".into(),
        reasons: vec![REASONS[k].to_string()],
        // One in ten already released.
        state: if i % 10 == 9 {
            mailwarden::quarantine::State::Released
        } else {
            mailwarden::quarantine::State::Held
        },
        instance: String::new(),
    }
}

fn pct(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

// ---------------------------------------------------------------------------
// (a) writes
// ---------------------------------------------------------------------------

type Op = Arc<dyn Fn(usize, usize) + Send + Sync>;

/// One write case, measured over several rounds interleaved with the other cases, so a
/// noisy neighbour on the shared disk weighs on every case alike.
struct WriteCase {
    name: &'static str,
    threads: usize,
    op: Op,
    /// Writes per second of each round.
    rounds: Vec<f64>,
    /// Per-write latency, all rounds.
    lat: Vec<Duration>,
    ops: usize,
}

impl WriteCase {
    fn new(name: &'static str, threads: usize, op: Op) -> WriteCase {
        // Warm up (directories, SQLite pages, page cache).
        for i in 0..20 {
            op(threads + 1, 1_000_000 + i);
        }
        WriteCase {
            name,
            threads,
            op,
            rounds: Vec::new(),
            lat: Vec::new(),
            ops: 0,
        }
    }

    /// One round of `total` writes split over the case's threads.
    fn round(&mut self, total: usize) {
        let per = total / self.threads;
        let base = self.ops / self.threads;
        let start = Instant::now();
        let handles: Vec<_> = (0..self.threads)
            .map(|t| {
                let op = self.op.clone();
                std::thread::spawn(move || {
                    let mut lat = Vec::with_capacity(per);
                    for i in 0..per {
                        let s = Instant::now();
                        op(t, base + i);
                        lat.push(s.elapsed());
                    }
                    lat
                })
            })
            .collect();
        for h in handles {
            self.lat.extend(h.join().expect("writer thread"));
        }
        let wall = start.elapsed();
        self.ops += per * self.threads;
        self.rounds
            .push((per * self.threads) as f64 / wall.as_secs_f64());
    }

    /// Median writes/s over the rounds.
    fn per_sec(&self) -> f64 {
        let mut r = self.rounds.clone();
        r.sort_by(f64::total_cmp);
        r[r.len() / 2]
    }

    fn spread(&self) -> (f64, f64) {
        let min = self.rounds.iter().copied().fold(f64::INFINITY, f64::min);
        let max = self.rounds.iter().copied().fold(0.0, f64::max);
        (min, max)
    }
}

fn write_synced(path: &Path, bytes: &[u8]) {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .expect("create");
    f.write_all(bytes).expect("write");
    f.sync_all().expect("fsync");
}

fn bench_writes(base: &Path, writes: usize, rounds: usize) -> Vec<WriteCase> {
    let msg = Arc::new(message(1));
    let mut cases = Vec::new();
    for threads in [1, THREADS] {
        // bare: one new file, 4 KB, fsync.
        let dir = base.join(format!("bare-{threads}"));
        fs::create_dir_all(&dir).unwrap();
        let m = msg.clone();
        cases.push(WriteCase::new(
            "bare write+fsync 4 KB",
            threads,
            Arc::new(move |t, i| write_synced(&dir.join(format!("{t}-{i}")), &m)),
        ));

        // The store's file-system steps, no index.
        let root = base.join(format!("replica-{threads}"));
        for d in ["tmp", "entries"] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(root.join(d))
                .unwrap();
        }
        let m = msg.clone();
        let json = serde_json::to_vec_pretty(&meta(1, 0)).unwrap();
        cases.push(WriteCase::new(
            "fs-replica (store's fs steps, no index)",
            threads,
            Arc::new(move |_, _| {
                let id = QuarantineId::generate();
                let tmp = root.join("tmp").join(id.as_str());
                fs::DirBuilder::new().mode(0o700).create(&tmp).unwrap();
                write_synced(&tmp.join("message.eml"), &m);
                write_synced(&tmp.join("meta.json"), &json);
                File::open(&tmp).unwrap().sync_all().unwrap();
                let entries = root.join("entries");
                fs::rename(&tmp, entries.join(id.as_str())).unwrap();
                File::open(&entries).unwrap().sync_all().unwrap();
            }),
        ));

        // The real thing.
        let q = Arc::new(Quarantine::open(&base.join(format!("store-{threads}"))).unwrap());
        let m = msg.clone();
        cases.push(WriteCase::new(
            "Quarantine::store 4 KB",
            threads,
            Arc::new(move |t, i| {
                let mut meta = meta(t * 10_000_000 + i, 0);
                q.store(&mut meta, &[&m]).expect("store");
            }),
        ));
    }
    for _ in 0..rounds {
        for c in cases.iter_mut() {
            c.round(writes / rounds);
        }
    }
    for c in cases.iter_mut() {
        c.lat.sort();
    }
    cases
}

/// Where the time of one store goes: the store's file-system steps, timed one by one
/// (single thread), plus one index row insert as `store` does it.
fn write_breakdown(base: &Path, n: usize) -> Vec<(&'static str, Duration)> {
    let root = base.join("breakdown");
    for d in ["tmp", "entries"] {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root.join(d))
            .unwrap();
    }
    let msg = message(1);
    let json = serde_json::to_vec_pretty(&meta(1, 0)).unwrap();
    let index = Index::open(&root.join("index.sqlite")).unwrap();
    let names = [
        "mkdir tmp/<ID>",
        "message.eml: create+write",
        "message.eml: fsync",
        "meta.json: create+write",
        "meta.json: fsync",
        "fsync tmp/<ID>",
        "rename into entries/",
        "fsync entries/",
        "index row (SQLite WAL, synchronous=NORMAL)",
    ];
    let mut sum = [Duration::ZERO; 9];
    for i in 0..n {
        let mut t = Instant::now();
        let mut lap = |k: usize, sum: &mut [Duration; 9]| {
            sum[k] += t.elapsed();
            t = Instant::now();
        };
        let id = QuarantineId::generate();
        let tmp = root.join("tmp").join(id.as_str());
        fs::DirBuilder::new().mode(0o700).create(&tmp).unwrap();
        lap(0, &mut sum);
        for (k, (name, bytes)) in [("message.eml", &msg), ("meta.json", &json)]
            .into_iter()
            .enumerate()
        {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(tmp.join(name))
                .unwrap();
            f.write_all(bytes).unwrap();
            lap(1 + 2 * k, &mut sum);
            f.sync_all().unwrap();
            lap(2 + 2 * k, &mut sum);
        }
        File::open(&tmp).unwrap().sync_all().unwrap();
        lap(5, &mut sum);
        let entries = root.join("entries");
        fs::rename(&tmp, entries.join(id.as_str())).unwrap();
        lap(6, &mut sum);
        File::open(&entries).unwrap().sync_all().unwrap();
        lap(7, &mut sum);
        let mut m = meta(i, 0);
        m.id = id.to_string();
        index.insert(&m).unwrap();
        lap(8, &mut sum);
    }
    names
        .into_iter()
        .zip(sum)
        .map(|(name, d)| (name, d / n as u32))
        .collect()
}

// ---------------------------------------------------------------------------
// (b) list at 100k
// ---------------------------------------------------------------------------

/// Creates `n` entries (files not fsync'd) and their index rows; returns the timings.
fn fill(root: &Path, n: usize) -> (Duration, Duration) {
    let entries = root.join("entries");
    for d in [root.to_path_buf(), entries.clone(), root.join("tmp")] {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&d)
            .unwrap();
    }
    let t = Instant::now();
    let mut metas = Vec::with_capacity(n);
    for i in 0..n {
        // Spread over the last 30 days, newest last.
        let mut m = meta(i, ((n - i) as u64 * 30 * 86_400) / n as u64);
        let id = QuarantineId::generate();
        m.id = id.to_string();
        let dir = entries.join(id.as_str());
        fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dir.join("message.eml"))
            .unwrap();
        f.write_all(&message(i)).unwrap();
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dir.join("meta.json"))
            .unwrap();
        f.write_all(&serde_json::to_vec_pretty(&m).unwrap())
            .unwrap();
        metas.push(m);
    }
    let files = t.elapsed();
    let t = Instant::now();
    let mut index = Index::open(&root.join("index.sqlite")).unwrap();
    index
        .batch(|ix| {
            for m in &metas {
                ix.insert(m)?;
            }
            Ok(())
        })
        .unwrap();
    drop(index);
    (files, t.elapsed())
}

struct Case {
    name: &'static str,
    cli: &'static [&'static str],
    filter: Filter,
}

fn cases() -> Vec<Case> {
    let f =
        |since: Option<u64>, reason: Option<&str>, from: Option<&str>, rcpt: Option<&str>| Filter {
            since: since.map(|s| now() - s),
            reason: reason.map(str::to_string),
            from: from.map(str::to_string),
            rcpt: rcpt.map(str::to_string),
            all_states: false,
            limit: 50,
            before: None,
        };
    vec![
        Case {
            name: "no filter",
            cli: &[],
            filter: f(None, None, None, None),
        },
        Case {
            name: "--reason dmarc (20% match)",
            cli: &["--reason", "dmarc"],
            filter: f(None, Some("dmarc"), None, None),
        },
        Case {
            name: "--from d7.example (0.1% match)",
            cli: &["--from", "d7.example"],
            filter: f(None, None, Some("d7.example"), None),
        },
        Case {
            name: "--reason spoof --from d7.example (0.02%)",
            cli: &["--reason", "spoof", "--from", "d7.example"],
            filter: f(None, Some("spoof"), Some("d7.example"), None),
        },
        Case {
            name: "--rcpt nobody@ (no match: full scan)",
            cli: &["--rcpt", "nobody@"],
            filter: f(None, None, None, Some("nobody@")),
        },
        Case {
            name: "--since 1d --reason dmarc",
            cli: &["--since", "1d", "--reason", "dmarc"],
            filter: f(Some(86_400), Some("dmarc"), None, None),
        },
    ]
}

/// `runs` calls of `Quarantine::list`: rows returned and the sorted latencies.
fn measure_list(q: &Quarantine, filter: &Filter, runs: usize) -> (usize, Vec<Duration>) {
    let mut lat = Vec::with_capacity(runs);
    let mut rows = 0;
    for _ in 0..runs {
        let t = Instant::now();
        rows = q.list(filter).unwrap().len();
        lat.push(t.elapsed());
    }
    lat.sort();
    (rows, lat)
}

/// Times `f` `runs` times; sorted durations.
fn timed(runs: usize, mut f: impl FnMut(usize)) -> Vec<Duration> {
    let mut lat: Vec<Duration> = (0..runs)
        .map(|i| {
            let t = Instant::now();
            f(i);
            t.elapsed()
        })
        .collect();
    lat.sort();
    lat
}

fn mean(lat: &[Duration]) -> Duration {
    lat.iter().sum::<Duration>() / lat.len().max(1) as u32
}

fn us(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

/// (c): capacity accounting at `n` entries, index only.
fn bench_capacity(base: &Path, n: usize) {
    let path = base.join("capacity.sqlite");
    let mut index = Index::open(&path).unwrap();
    index
        .batch(|ix| {
            for i in 0..n {
                let mut m = meta(i, ((n - i) as u64 * 30 * 86_400) / n as u64);
                m.id = QuarantineId::generate().to_string();
                ix.insert(&m)?;
            }
            Ok(())
        })
        .unwrap();
    let usage = index.usage().unwrap();
    assert_eq!(usage.entries, n as u64, "trigger-kept count");
    println!(
        "
### (c) capacity accounting at {n} entries (index only)
"
    );
    println!("| operation | p50 µs | p99 µs | mean µs |");
    println!("|---|---:|---:|---:|");
    let runs = 10_000;
    let check = timed(runs, |i| {
        let d = format!("d{}.example", i % 1000);
        std::hint::black_box(index.usage().unwrap());
        std::hint::black_box(index.domain_usage(&d).unwrap());
    });
    println!(
        "| admission check: usage() + domain_usage() (trigger-kept totals) | {} | {} | {} |",
        us(pct(&check, 0.5)),
        us(pct(&check, 0.99)),
        us(mean(&check))
    );
    // What the check would cost without the totals: aggregates over the rows.
    let raw = rusqlite::Connection::open(&path).unwrap();
    let scan = timed(50, |i| {
        let d = format!("d{}.example", i % 1000);
        let total: (i64, i64) = raw
            .query_row(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM entries",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        let dom: (i64, i64) = raw
            .query_row(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM entries WHERE sender_domain = ?1",
                [&d],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        std::hint::black_box((total, dom));
    });
    println!(
        "| the same by aggregate queries over the rows (no totals) | {} | {} | {} |",
        us(pct(&scan, 0.5)),
        us(pct(&scan, 0.99)),
        us(mean(&scan))
    );
    // One row insert (autocommit, like `store`) with and without the usage triggers.
    let inserts = 2_000;
    let insert_rows = |ix: &Index, offset: usize| {
        timed(inserts, |i| {
            let mut m = meta(n + offset + i, 0);
            m.id = QuarantineId::generate().to_string();
            ix.insert(&m).unwrap();
        })
    };
    // Each series starts from a checkpointed WAL, so neither pays for the bulk fill's.
    let checkpoint = |c: &rusqlite::Connection| {
        c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap()
    };
    checkpoint(&raw);
    let with = insert_rows(&index, 0);
    raw.execute_batch("DROP TRIGGER entries_usage_insert; DROP TRIGGER entries_usage_delete;")
        .unwrap();
    drop(index);
    let plain = Index::open(&path).unwrap();
    checkpoint(&raw);
    let without = insert_rows(&plain, inserts);
    println!(
        "| index row insert with the usage triggers | {} | {} | {} |",
        us(pct(&with, 0.5)),
        us(pct(&with, 0.99)),
        us(mean(&with))
    );
    println!(
        "| index row insert without them | {} | {} | {} |",
        us(pct(&without, 0.5)),
        us(pct(&without, 0.99)),
        us(mean(&without))
    );
    let added = mean(&check) + mean(&with).saturating_sub(mean(&without));
    println!(
        "\nadded per store (mean check + mean trigger overhead, WAL checkpoints included): {} µs",
        us(added)
    );
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken from the command line.
    if std::env::var_os("QBENCH_ONLY_CAPACITY").is_some() {
        let base = tempfile::Builder::new()
            .prefix("quarantine-bench-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .expect("tempdir under target/tmp");
        bench_capacity(base.path(), env_usize("QBENCH_ENTRIES", 100_000));
        return;
    }
    let entries_n = env_usize("QBENCH_ENTRIES", 100_000);
    let writes = env_usize("QBENCH_WRITES", 1600);
    let list_runs = env_usize("QBENCH_LIST_RUNS", 200);
    let cli_runs = env_usize("QBENCH_CLI_RUNS", 20);
    let rounds = env_usize("QBENCH_ROUNDS", 4).max(1);

    let base = tempfile::Builder::new()
        .prefix("quarantine-bench-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("tempdir under target/tmp");
    let fstype = Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(base.path())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let df = Command::new("df")
        .arg("-P")
        .arg(base.path())
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .nth(1)
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default();
    println!("bench dir: {} ({fstype}; df: {df})", base.path().display());
    assert!(
        fstype != "tmpfs" && fstype != "ramfs",
        "the bench directory is on {fstype}; fsync would be free"
    );
    println!(
        "cores: {}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    // (a)
    let results = bench_writes(base.path(), writes, rounds);
    let bare = |threads: usize| {
        results
            .iter()
            .find(|r| r.threads == threads && r.name.starts_with("bare"))
            .map(WriteCase::per_sec)
            .unwrap()
    };
    println!("\n### (a) quarantine writes, 4 KB messages, fsync included\n");
    println!(
        "{rounds} interleaved rounds per case; writes/s is the median round (min–max); \
         latencies pooled over all rounds\n"
    );
    println!(
        "| case | threads | writes | writes/s (min–max) | p50 ms | p99 ms | time per write vs bare |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in &results {
        let (min, max) = r.spread();
        println!(
            "| {} | {} | {} | {:.0} ({:.0}–{:.0}) | {} | {} | {:.2}× |",
            r.name,
            r.threads,
            r.ops,
            r.per_sec(),
            min,
            max,
            ms(pct(&r.lat, 0.50)),
            ms(pct(&r.lat, 0.99)),
            bare(r.threads) / r.per_sec(),
        );
    }
    for threads in [1, THREADS] {
        let store = results
            .iter()
            .find(|r| r.threads == threads && r.name.starts_with("Quarantine"))
            .unwrap();
        println!(
            "\ntarget ≥ 500 writes/s, {threads} writer(s): {:.0}/s → {}",
            store.per_sec(),
            if store.per_sec() >= 500.0 {
                "met"
            } else {
                "MISSED"
            }
        );
    }
    let breakdown = write_breakdown(base.path(), writes.min(400));
    let total: Duration = breakdown.iter().map(|(_, d)| *d).sum();
    println!(
        "\nwhere one single-writer store goes (mean over {} writes):\n",
        writes.min(400)
    );
    println!("| step | mean ms | share |");
    println!("|---|---:|---:|");
    for (name, d) in &breakdown {
        println!(
            "| {name} | {} | {:.0}% |",
            ms(*d),
            100.0 * d.as_secs_f64() / total.as_secs_f64()
        );
    }
    println!("| total | {} | |", ms(total));

    // (b)
    let empty = base.path().join("empty");
    let empty_config = base.path().join("empty.toml");
    fs::write(
        &empty_config,
        format!("[quarantine]\ndir = {:?}\n", empty.to_str().unwrap()),
    )
    .unwrap();
    let mut floor = Vec::new();
    for _ in 0..cli_runs {
        let t = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_mailwarden"))
            .arg("quarantine")
            .arg("-c")
            .arg(&empty_config)
            .args(["list", "--limit", "50"])
            .output()
            .expect("run the CLI");
        floor.push(t.elapsed());
        assert!(out.status.success());
    }
    floor.sort();
    let root = base.path().join("big");
    let (files, rows) = fill(&root, entries_n);
    println!(
        "\n### (b) list at {entries_n} entries\n\nfill (not durable): entry dirs+files {:.1} s, index rows (one transaction) {:.1} s",
        files.as_secs_f64(),
        rows.as_secs_f64()
    );
    let mut opens = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        drop(Quarantine::open(&root).unwrap());
        opens.push(t.elapsed());
    }
    opens.sort();
    // The parts of open: walking entries/, and one index lookup per entry.
    let t = Instant::now();
    let names: Vec<String> = fs::read_dir(root.join("entries"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let walk = t.elapsed();
    let index = Index::open(&root.join("index.sqlite")).unwrap();
    let t = Instant::now();
    let mut present = 0;
    for n in &names {
        let id = QuarantineId::parse(n).unwrap();
        if index.contains(id.as_str()).unwrap() {
            present += 1;
        }
    }
    let lookups = t.elapsed();
    assert_eq!(present, entries_n);
    drop(index);
    // What one query for all ids would cost instead of one lookup per entry.
    let conn = rusqlite::Connection::open(root.join("index.sqlite")).unwrap();
    let t = Instant::now();
    let all: std::collections::HashSet<String> = conn
        .prepare("SELECT id FROM entries")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let missing = names.iter().filter(|n| !all.contains(*n)).count();
    let one_query = t.elapsed();
    assert_eq!(missing, 0);
    drop(conn);
    println!(
        "Quarantine::open (paid by every CLI command): p50 {} ms, max {} ms over {} opens; \
         of which read_dir(entries/) {} ms and {} index lookups (one `SELECT 1 … WHERE id = ?` each) {} ms; \
         one `SELECT id FROM entries` into a set + the same comparison: {} ms",
        ms(pct(&opens, 0.5)),
        ms(pct(&opens, 1.0)),
        opens.len(),
        ms(walk),
        names.len(),
        ms(lookups),
        ms(one_query)
    );
    println!(
        "CLI floor (`quarantine list` on an empty store: process start, config, open): p50 {} ms, p99 {} ms",
        ms(pct(&floor, 0.5)),
        ms(pct(&floor, 0.99))
    );

    let q = Quarantine::open(&root).unwrap();
    let config = base.path().join("cli.toml");
    fs::write(
        &config,
        format!("[quarantine]\ndir = {:?}\n", root.to_str().unwrap()),
    )
    .unwrap();
    println!(
        "\n| filter (limit 50) | rows | library p50 ms | library p99 ms | CLI p50 ms | CLI p99 ms | target < 50 ms |"
    );
    println!("|---|---:|---:|---:|---:|---:|---|");
    for case in cases() {
        let (rows, lat) = measure_list(&q, &case.filter, list_runs);
        let mut cli = Vec::with_capacity(cli_runs);
        for _ in 0..cli_runs {
            let t = Instant::now();
            let out = Command::new(env!("CARGO_BIN_EXE_mailwarden"))
                .arg("quarantine")
                .arg("-c")
                .arg(&config)
                .args(["list", "--limit", "50"])
                .args(case.cli)
                .output()
                .expect("run the CLI");
            cli.push(t.elapsed());
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        cli.sort();
        let lib_ok = pct(&lat, 0.99) < Duration::from_millis(50);
        let cli_ok = pct(&cli, 0.99) < Duration::from_millis(50);
        println!(
            "| {} | {rows} | {} | {} | {} | {} | library {}, CLI {} |",
            case.name,
            ms(pct(&lat, 0.5)),
            ms(pct(&lat, 0.99)),
            ms(pct(&cli, 0.5)),
            ms(pct(&cli, 0.99)),
            if lib_ok { "met" } else { "MISSED" },
            if cli_ok { "met" } else { "MISSED" },
        );
    }
    println!(
        "\n(library: {list_runs} runs per filter; CLI: {cli_runs} runs, each a new `mailwarden quarantine list` process)"
    );
    drop(q);

    // Why: the plan SQLite picks for `list` without statistics, and with them.
    let plan = |conn: &rusqlite::Connection| -> String {
        conn.prepare(
            "EXPLAIN QUERY PLAN SELECT id FROM entries WHERE 1=1 AND state IN ('held', 'releasing') \
             ORDER BY received_at DESC, id LIMIT 50",
        )
        .unwrap()
        .query_map([], |r| r.get::<_, String>(3))
        .unwrap()
        .map(Result::unwrap)
        .collect::<Vec<_>>()
        .join("; ")
    };
    let conn = rusqlite::Connection::open(root.join("index.sqlite")).unwrap();
    println!(
        "\nquery plan of `list` (as shipped, no statistics): {}",
        plan(&conn)
    );
    let t = Instant::now();
    conn.execute_batch("ANALYZE").unwrap();
    println!(
        "what-if: `ANALYZE` on the index ({} ms once) → plan: {}",
        ms(t.elapsed()),
        plan(&conn)
    );
    drop(conn);
    let q = Quarantine::open(&root).unwrap();
    println!(
        "\n| filter (limit 50), library, after ANALYZE | rows | p50 ms | p99 ms | target < 50 ms |"
    );
    println!("|---|---:|---:|---:|---|");
    for case in cases() {
        let (rows, lat) = measure_list(&q, &case.filter, list_runs);
        println!(
            "| {} | {rows} | {} | {} | {} |",
            case.name,
            ms(pct(&lat, 0.5)),
            ms(pct(&lat, 0.99)),
            if pct(&lat, 0.99) < Duration::from_millis(50) {
                "met"
            } else {
                "MISSED"
            }
        );
    }
    drop(q);
    // (c)
    bench_capacity(base.path(), entries_n);
    let _: PathBuf = base.keep_or_remove();
}

/// Removes the bench directory unless `QBENCH_KEEP` is set (then prints where it is).
trait KeepOrRemove {
    fn keep_or_remove(self) -> PathBuf;
}

impl KeepOrRemove for tempfile::TempDir {
    fn keep_or_remove(self) -> PathBuf {
        if std::env::var_os("QBENCH_KEEP").is_some() {
            let p = self.keep();
            println!("kept {}", p.display());
            p
        } else {
            let p = self.path().to_path_buf();
            drop(self);
            p
        }
    }
}
