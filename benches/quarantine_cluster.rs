//! The shared (PostgreSQL) quarantine against the embedded one, in one run.
//!
//! Run with `cargo bench --bench quarantine_cluster` (needs Debian's `postgresql`; a
//! private server is started on a loopback port, data under a tempdir on the same disk
//! as the embedded store, `fsync` and `synchronous_commit` on as in production).
//!
//! - (a) held-message writes per second, 4 KB messages, 8 writers, through the store
//!   boundary (`QuarantineStore::store`, what an SMTP session calls): the embedded store
//!   (files fsync'd + SQLite row) and the PostgreSQL store (one transaction, entry row +
//!   bytea, durable commit) side by side, interleaved rounds; the ratio is the figure.
//! - (b) `list --limit 50` at 1,000,000 entries in PostgreSQL: through the library
//!   (`QuarantineStore::list`, p50/p95/max) for the default view (held), `--all`, a page
//!   deep in the list (keyset: `before` = the 500,000th row), and a `--from` substring
//!   filter; and through the real CLI (`mailwarden quarantine list --limit 50`, a fresh
//!   process each time: start, connect, list). The million rows are made by one SQL
//!   statement (rows as `store` writes them, without message bytes, which `list` never
//!   reads; the count trigger off during the load and the counters rebuilt after).
//!
//! Knobs: `PGBENCH_WRITES` (per store, default 2000), `PGBENCH_ENTRIES` (default
//! 1000000), `PGBENCH_LIST_RUNS` (default 50), `PGBENCH_CLI_RUNS` (default 10).

#[path = "../tests/pg_server/mod.rs"]
mod pg_server;

use std::sync::Arc;
use std::time::{Duration, Instant};

use mailwarden::config::postgres::PostgresConfig;
use mailwarden::quarantine::index::Filter;
use mailwarden::quarantine::pg::PgQuarantine;
use mailwarden::quarantine::store::{Embedded, QuarantineStore};
use mailwarden::quarantine::{Meta, Quarantine};
use mailwarden::store::postgres::PgPool;

const WRITERS: usize = 8;
const MESSAGE_SIZE: usize = 4096;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn meta(i: usize) -> Meta {
    Meta {
        id: String::new(),
        received_at: mailwarden::quarantine::now(),
        session: format!("S{i}"),
        listener: "inbound".into(),
        client: format!("192.0.2.{}:25", i % 250),
        helo: "mx.example".into(),
        login: None,
        mail_from: format!("user{}@d{}.example", i % 500, i % 97),
        rcpts: vec![format!("r{}@example.org", i % 200)],
        header_from: format!("Sender <user{}@d{}.example>", i % 500, i % 97),
        subject: format!("benchmark message {i}"),
        size: MESSAGE_SIZE,
        authentication_results: "mx.example.org; spf=pass; dkim=none; dmarc=fail".into(),
        flags: vec!["dmarc_fail".into()],
        verdict: "quarantine".into(),
        reasons: vec!["dmarc=fail p=reject".into()],
        state: mailwarden::quarantine::State::Held,
        instance: String::new(),
    }
}

/// `n` stores spread over 8 writer tasks; returns the wall time.
async fn write_round(store: Arc<dyn QuarantineStore>, n: usize, offset: usize) -> Duration {
    let message = vec![b'x'; MESSAGE_SIZE];
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let store = store.clone();
        let message = message.clone();
        tasks.push(tokio::spawn(async move {
            for i in (w..n).step_by(WRITERS) {
                store
                    .store(meta(offset + i), message.clone())
                    .await
                    .expect("store");
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    started.elapsed()
}

fn pg_config(url: &str, pool: usize) -> PostgresConfig {
    PostgresConfig {
        url: url.into(),
        pool_size: pool,
        timeout_ms: 30_000,
        ..Default::default()
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

async fn bench_writes(pg: &pg_server::Postgres) {
    let writes = env_usize("PGBENCH_WRITES", 2000);
    let dir = tempfile::tempdir().expect("tempdir");
    let embedded: Arc<dyn QuarantineStore> = Arc::new(Embedded(Arc::new(
        Quarantine::open_as_writer(&dir.path().join("q")).expect("open"),
    )));
    let pool = PgPool::open(&pg_config(&pg.url(), WRITERS))
        .await
        .expect("postgres");
    let shared: Arc<dyn QuarantineStore> = Arc::new(PgQuarantine::new(pool, "bench"));
    // Warm-up, then interleaved rounds so both see the same disk and machine load.
    write_round(embedded.clone(), 80, 0).await;
    write_round(shared.clone(), 80, 0).await;
    let rounds = 4;
    let (mut te, mut tp) = (Duration::ZERO, Duration::ZERO);
    for r in 0..rounds {
        te += write_round(embedded.clone(), writes / rounds, 1000 + r * writes).await;
        tp += write_round(shared.clone(), writes / rounds, 1000 + r * writes).await;
    }
    let n = (writes / rounds * rounds) as f64;
    let (re, rp) = (n / te.as_secs_f64(), n / tp.as_secs_f64());
    println!("(a) held writes, 4 KB, {WRITERS} writers, {n} each, {rounds} interleaved rounds:");
    println!("    embedded (files fsync'd + SQLite): {re:8.0} writes/s");
    println!("    postgres (row + bytea, durable commit): {rp:8.0} writes/s");
    println!("    postgres / embedded: {:.2}x", rp / re);
}

async fn fill(pool: &PgPool, entries: usize) {
    let mut conn = pool.get().await.expect("conn");
    let c = conn.client();
    let started = Instant::now();
    c.batch_execute("ALTER TABLE quarantine_entries DISABLE TRIGGER quarantine_entries_count")
        .await
        .expect("trigger off");
    c.execute(
        "INSERT INTO quarantine_entries
         (id, received_at, state, state_at, state_by, instance, mail_from, header_from, rcpts,
          subject, reasons, flags, size, sender_domain, usage_slot, meta)
         SELECT upper(lpad(to_hex(g), 26, '0')), 1700000000 + g / 10,
                CASE WHEN g % 10 = 9 THEN 'released' ELSE 'held' END, 1700000000 + g / 10, 'bench',
                'mx' || (g % 3), 'user' || (g % 5000) || '@d' || (g % 997) || '.example',
                'Sender <user' || (g % 5000) || '@d' || (g % 997) || '.example>',
                'r' || (g % 200) || '@example.org', 'benchmark message ' || g,
                'dmarc=fail p=reject', 'dmarc_fail', 4096, 'd' || (g % 997) || '.example',
                g % 16, '{}'::jsonb
         FROM generate_series(1, $1::bigint) AS g",
        &[&(entries as i64)],
    )
    .await
    .expect("fill");
    c.batch_execute(
        "ALTER TABLE quarantine_entries ENABLE TRIGGER quarantine_entries_count;
         UPDATE quarantine_counts SET entries = 0, bytes = 0;
         UPDATE quarantine_counts k SET entries = s.n, bytes = s.b FROM
           (SELECT state, usage_slot, count(*) AS n, sum(size) AS b FROM quarantine_entries
            GROUP BY state, usage_slot) s
           WHERE k.state = s.state AND k.slot = s.usage_slot;",
    )
    .await
    .expect("counters");
    // Alone: VACUUM cannot run in the implicit transaction of a multi-statement batch.
    c.batch_execute("VACUUM ANALYZE quarantine_entries")
        .await
        .expect("vacuum");
    println!(
        "(b) {entries} entries made in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

async fn bench_list(pg: &pg_server::Postgres) {
    let entries = env_usize("PGBENCH_ENTRIES", 1_000_000);
    let runs = env_usize("PGBENCH_LIST_RUNS", 50);
    let pool = PgPool::open(&pg_config(&pg.url(), 2))
        .await
        .expect("postgres");
    // A fresh table: the writes of (a) are removed first.
    {
        let mut conn = pool.get().await.expect("conn");
        conn.client()
            .batch_execute("DELETE FROM quarantine_entries")
            .await
            .expect("empty");
    }
    fill(&pool, entries).await;
    let store = PgQuarantine::new(pool, "bench");
    let deep = store
        .list(&Filter {
            all_states: true,
            limit: 1,
            before: Some((1_700_000_000 + entries as u64 / 20, "Z".into())),
            ..Default::default()
        })
        .await
        .expect("deep row")
        .pop()
        .map(|r| (r.received_at, r.id));
    let cases: Vec<(&str, Filter)> = vec![
        (
            "held (default view)",
            Filter {
                limit: 50,
                ..Default::default()
            },
        ),
        (
            "--all",
            Filter {
                limit: 50,
                all_states: true,
                ..Default::default()
            },
        ),
        (
            "page at the middle (keyset)",
            Filter {
                limit: 50,
                all_states: true,
                before: deep,
                ..Default::default()
            },
        ),
        (
            "--from d996.example",
            Filter {
                limit: 50,
                from: Some("d996.example".into()),
                ..Default::default()
            },
        ),
    ];
    for (name, filter) in cases {
        let mut lat = Vec::new();
        let mut rows = 0;
        for _ in 0..runs {
            let t = Instant::now();
            rows = store.list(&filter).await.expect("list").len();
            lat.push(t.elapsed());
        }
        lat.sort();
        println!(
            "    list --limit 50, {name}: {rows} rows, p50 {} p95 {} max {}",
            ms(pct(&lat, 0.5)),
            ms(pct(&lat, 0.95)),
            ms(*lat.last().unwrap())
        );
    }
    // The real CLI, a fresh process each time.
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("mailwarden.toml");
    std::fs::write(
        &config,
        format!(
            "[quarantine]\nbackend = \"postgres\"\n\n[postgres]\nurl = \"{}\"\n",
            pg.url()
        ),
    )
    .expect("config");
    let mut lat = Vec::new();
    for _ in 0..env_usize("PGBENCH_CLI_RUNS", 10) {
        let t = Instant::now();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_mailwarden"))
            .args(["quarantine", "-c"])
            .arg(&config)
            .args(["list", "--limit", "50", "--json"])
            .output()
            .expect("cli");
        lat.push(t.elapsed());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    lat.sort();
    println!(
        "    `mailwarden quarantine list --limit 50` (process start, connect, list): p50 {} max {}",
        ms(pct(&lat, 0.5)),
        ms(*lat.last().unwrap())
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list`: nothing to enumerate.
    }
    let pg = pg_server::Postgres::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        bench_writes(&pg).await;
        bench_list(&pg).await;
    });
}
