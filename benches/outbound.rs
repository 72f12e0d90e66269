//! Outbound detector: the cost of one decision (`Detector::assess`) with 100,000 tracked
//! accounts, and the memory each tracked account takes, on the memory and Redis backends.
//! Targets: ≤ 5 µs per decision in memory, ≤ 1 KB per account.
//!
//! `cargo bench --bench outbound` (the Redis part starts /usr/bin/redis-server on a free
//! loopback port and is skipped when it is not installed). `OUTBOUND_BENCH_ACCOUNTS`
//! changes the number of accounts.
//!
//! The "trusted clients" row (issue 13): messages from `trusted_networks` without AUTH,
//! each counted twice, as its envelope sender and as its host (`client:ADDR`), one host per
//! five senders: the accounts plus a fifth more host keys are tracked. It runs in a child
//! process of its own so that its memory figure is not blurred by the first run's heap.

use std::net::IpAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mailwarden::outbound::config::Backend;
use mailwarden::outbound::{Detector, OutboundConfig};

const DECISIONS: usize = 1_000_000;
const REDIS_DECISIONS: usize = 20_000;
const TASKS: usize = 8;

/// Resident set size of this process, bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// xorshift64*: cheap, deterministic account picks.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn accounts(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("user{i:06}@example.org")).collect()
}

/// Default settings, except static limits high enough that the random picks (≈ 20
/// messages per account within a minute) never breach: what is measured is the common
/// case, a message that is counted, judged and relayed.
fn config(dir: &Path, accounts: usize) -> OutboundConfig {
    let mut windows = OutboundConfig::default().windows;
    for w in &mut windows {
        w.messages = w.messages.map(|m| m * 10);
    }
    OutboundConfig {
        windows,
        tracked_accounts: accounts,
        state_file: dir.join("state.json"),
        freeze_file: dir.join("freezes.json"),
        command_dir: dir.join("commands"),
        ..Default::default()
    }
}

fn rcpts() -> Vec<String> {
    vec![
        "a@customer-one.example".to_string(),
        "b@customer-two.example".to_string(),
        "c@customer-two.example".to_string(),
    ]
}

/// Sequential decisions: mean, p50, p99 (µs).
async fn latency(d: &Detector, names: &[String], n: usize) -> (f64, f64, f64) {
    let to = rcpts();
    let ip: IpAddr = "192.0.2.1".parse().unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut samples = Vec::with_capacity(n);
    let all = Instant::now();
    for _ in 0..n {
        let who = &names[(rng.next() % names.len() as u64) as usize];
        let t = Instant::now();
        let a = d.assess(who, ip, who, &to, 0).await;
        samples.push(t.elapsed());
        std::hint::black_box(a);
    }
    let mean = all.elapsed().as_secs_f64() * 1e6 / n as f64;
    samples.sort_unstable();
    let pct = |p: f64| {
        samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)].as_secs_f64() * 1e6
    };
    (mean, pct(0.50), pct(0.99))
}

/// Decisions per second with `TASKS` sessions at once.
async fn throughput(d: Arc<Detector>, names: Arc<Vec<String>>, per_task: usize) -> f64 {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (d, names) = (d.clone(), names.clone());
        tasks.push(tokio::spawn(async move {
            let to = rcpts();
            let ip: IpAddr = "192.0.2.1".parse().unwrap();
            let mut rng = Rng(0x1234_5678 + t as u64);
            for _ in 0..per_task {
                let who = &names[(rng.next() % names.len() as u64) as usize];
                std::hint::black_box(d.assess(who, ip, who, &to, 0).await);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    (TASKS * per_task) as f64 / started.elapsed().as_secs_f64()
}

/// Gives every account some history: a login and two messages.
async fn populate(d: Arc<Detector>, names: Arc<Vec<String>>, tasks: usize) {
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (d, names) = (d.clone(), names.clone());
        handles.push(tokio::spawn(async move {
            let to = rcpts();
            for (i, who) in names.iter().enumerate().skip(t).step_by(tasks) {
                let ip = IpAddr::from([10, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
                d.auth_result(ip, who, true).await;
                d.assess(who, ip, who, &to, 0).await;
                d.assess(who, ip, who, &to[..1], 0).await;
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
}

fn main() {
    let n: usize = std::env::var("OUTBOUND_BENCH_ACCOUNTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(TASKS)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "outbound detector, {n} tracked accounts (each: 1 login address, 2 messages, 2 recipient domains)"
    );
    println!();
    println!(
        "| backend | decision mean | p50 | p99 | {TASKS} sessions at once | memory per account |"
    );
    println!("|---|---|---|---|---|---|");
    if std::env::var_os(TRUSTED_ONLY).is_some() {
        rt.block_on(trusted_bench(n));
        return;
    }
    rt.block_on(memory_bench(n));
    let exe = std::env::current_exe().unwrap();
    let status = Command::new(exe)
        .env(TRUSTED_ONLY, "1")
        .status()
        .expect("run the trusted-client bench");
    assert!(status.success(), "trusted-client bench: {status}");
    rt.block_on(redis_bench(n));
}

/// Set in the child that runs only [`trusted_bench`].
const TRUSTED_ONLY: &str = "OUTBOUND_BENCH_TRUSTED_ONLY";
/// Senders per host in the trusted-client row. Each sender sends about a dozen messages
/// here within the hour: five per host stay below the host's adaptive floor (100 per
/// hour), so the measured decisions relay, as the per-account rows' do.
const SENDERS_PER_HOST: usize = 5;

/// The host of sender `i` (a fixed mapping: a host keeps its few senders).
fn host_of(i: usize) -> IpAddr {
    let h = i / SENDERS_PER_HOST;
    IpAddr::from([10, (h >> 16) as u8, (h >> 8) as u8, h as u8])
}

/// Sequential trusted-client decisions (sender + host keys): mean, p50, p99 (µs).
async fn trusted_latency(d: &Detector, names: &[String], n: usize) -> (f64, f64, f64) {
    let to = rcpts();
    let mut rng = Rng(0x5eed_1234_9876_5432);
    let mut samples = Vec::with_capacity(n);
    let all = Instant::now();
    for _ in 0..n {
        let i = (rng.next() % names.len() as u64) as usize;
        let (who, ip) = (&names[i], host_of(i));
        let t = Instant::now();
        let client = d.client_account(None, ip);
        let a = d.assess_as(who, client.as_deref(), ip, who, &to, 0).await;
        samples.push(t.elapsed());
        std::hint::black_box(a);
    }
    let mean = all.elapsed().as_secs_f64() * 1e6 / n as f64;
    samples.sort_unstable();
    let pct = |p: f64| {
        samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)].as_secs_f64() * 1e6
    };
    (mean, pct(0.50), pct(0.99))
}

async fn trusted_bench(n: usize) {
    let dir = tempfile::tempdir().unwrap();
    let names = accounts(n);
    let hosts = n.div_ceil(SENDERS_PER_HOST);
    let mut c = config(dir.path(), n + hosts);
    c.trusted_networks = vec!["10.0.0.0/8".parse().unwrap()];
    let before = rss();
    let d = Detector::new(&c).await.unwrap();
    let to = rcpts();
    for (i, who) in names.iter().enumerate() {
        let ip = host_of(i);
        let client = d.client_account(None, ip);
        d.assess_as(who, client.as_deref(), ip, who, &to, 0).await;
        d.assess_as(who, client.as_deref(), ip, who, &to[..1], 0)
            .await;
    }
    let per_key = rss().saturating_sub(before) as f64 / (n + hosts) as f64;
    assert_eq!(d.tracked_accounts(), n + hosts);
    trusted_latency(&d, &names, 10_000).await;
    let (mean, p50, p99) = trusted_latency(&d, &names, DECISIONS).await;
    assert_eq!(d.alerts_sent(), 0, "the measured decisions must not breach");
    println!(
        "| memory, trusted clients (sender + host keys, {} keys) | {mean:.2} µs | {p50:.2} µs | {p99:.2} µs | – | {per_key:.0} B per key (RSS delta) |",
        n + hosts
    );
}

async fn memory_bench(n: usize) {
    let dir = tempfile::tempdir().unwrap();
    let names = Arc::new(accounts(n));
    let before = rss();
    let d = Arc::new(Detector::new(&config(dir.path(), n)).await.unwrap());
    populate(d.clone(), names.clone(), TASKS).await;
    let per_account = rss().saturating_sub(before) as f64 / n as f64;
    assert_eq!(d.tracked_accounts(), n);
    // Warm up, then measure.
    latency(&d, &names, 10_000).await;
    let (mean, p50, p99) = latency(&d, &names, DECISIONS).await;
    let tput = throughput(d.clone(), names.clone(), DECISIONS / TASKS).await;
    assert_eq!(d.alerts_sent(), 0, "the measured decisions must not breach");
    println!(
        "| memory | {mean:.2} µs | {p50:.2} µs | {p99:.2} µs | {:.0} decisions/s | {per_account:.0} B (RSS delta) |",
        tput
    );
    let started = Instant::now();
    d.snapshot().await;
    let size = std::fs::metadata(dir.path().join("state.json"))
        .map(|m| m.len())
        .unwrap_or(0);
    eprintln!(
        "  snapshot of {n} accounts: {:.0} ms, {:.1} MB ({:.0} B per account)",
        started.elapsed().as_secs_f64() * 1e3,
        size as f64 / 1e6,
        size as f64 / n as f64
    );
    let started = Instant::now();
    let again = Detector::new(&config(dir.path(), n)).await.unwrap();
    eprintln!(
        "  restart from the snapshot: {:.0} ms, {} accounts",
        started.elapsed().as_secs_f64() * 1e3,
        again.tracked_accounts()
    );
}

async fn redis_bench(n: usize) {
    const REDIS: &str = "/usr/bin/redis-server";
    if !Path::new(REDIS).exists() {
        println!(
            "| redis | skipped: {REDIS} not installed (apt-get install -y redis-server) | | | | |"
        );
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = Command::new(REDIS)
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
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = OutboundConfig {
        backend: Backend::Redis,
        redis_url: format!("redis://127.0.0.1:{port}/"),
        ..config(dir.path(), n)
    };
    let used = || redis_used_memory(port);
    let before = used();
    let d = Arc::new(Detector::new(&cfg).await.unwrap());
    let names = Arc::new(accounts(n));
    populate(d.clone(), names.clone(), 64).await;
    let per_account = used().saturating_sub(before) as f64 / n as f64;
    assert_eq!(d.backend_status(), "redis");
    latency(&d, &names, 1000).await;
    let (mean, p50, p99) = latency(&d, &names, REDIS_DECISIONS).await;
    let tput = throughput(d.clone(), names.clone(), REDIS_DECISIONS / TASKS).await;
    assert_eq!(d.alerts_sent(), 0, "the measured decisions must not breach");
    println!(
        "| redis (loopback) | {mean:.1} µs | {p50:.1} µs | {p99:.1} µs | {tput:.0} decisions/s | {per_account:.0} B (Redis used_memory delta) |"
    );
    assert_eq!(d.backend_status(), "redis");
    let _ = server.kill();
    let _ = server.wait();
}

/// `used_memory` from `INFO memory`, over a raw RESP exchange.
fn redis_used_memory(port: u16) -> u64 {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return 0;
    };
    let _ = s.write_all(b"*2\r\n$4\r\nINFO\r\n$6\r\nmemory\r\n");
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut buf = vec![0u8; 16 * 1024];
    let mut got = Vec::new();
    while let Ok(k) = s.read(&mut buf) {
        if k == 0 {
            break;
        }
        got.extend_from_slice(&buf[..k]);
        if String::from_utf8_lossy(&got).contains("used_memory_peak:") {
            break;
        }
    }
    String::from_utf8_lossy(&got)
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}
