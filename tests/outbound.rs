//! The outbound detector against a real `redis-server` (started here on a free loopback
//! port: `apt-get install -y redis-server` provides /usr/bin/redis-server): two
//! instances sharing counters and freezes, the CLI acting on Redis, the fallback to
//! local counters when Redis dies and the reconnection when it is back; and the
//! compromised-account scenario, on the memory backend and on two instances sharing Redis.

use std::net::{IpAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mailwarden::admin::accounts_cli::{AccountsCommand, run_with};
use mailwarden::outbound::config::Backend;
use mailwarden::outbound::{Detector, ManualClock, OutboundAction, OutboundConfig};

const REDIS: &str = "/usr/bin/redis-server";

struct RedisServer {
    child: Child,
    port: u16,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl RedisServer {
    fn start(port: u16) -> RedisServer {
        assert!(
            Path::new(REDIS).exists(),
            "{REDIS} is missing: apt-get install -y --no-install-recommends redis-server"
        );
        let child = Command::new(REDIS)
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
            .expect("start redis-server");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on port {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        RedisServer { child, port }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn config(dir: &Path, port: u16, prefix: &str) -> OutboundConfig {
    OutboundConfig {
        backend: Backend::Redis,
        redis_url: format!("redis://127.0.0.1:{port}/"),
        redis_prefix: format!("test:{prefix}:"),
        redis_timeout: Duration::from_millis(300),
        redis_retry: Duration::from_millis(100),
        state_file: dir.join("state.json"),
        freeze_file: dir.join("freezes.json"),
        command_dir: dir.join("commands"),
        ..Default::default()
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn rcpts(n: usize, domain: &str) -> Vec<String> {
    (0..n).map(|i| format!("r{i}@{domain}")).collect()
}

async fn pair(
    cfg_a: &OutboundConfig,
    cfg_b: &OutboundConfig,
) -> (Detector, Detector, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(now_ms()));
    let a = Detector::with_clock(cfg_a, clock.clone()).await.unwrap();
    let b = Detector::with_clock(cfg_b, clock.clone()).await.unwrap();
    (a, b, clock)
}

const ALICE: &str = "alice@example.org";

#[tokio::test]
async fn two_instances_share_counters_and_freezes() {
    let server = RedisServer::start(free_port());
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (ca, cb) = (
        config(da.path(), server.port, "share"),
        config(db.path(), server.port, "share"),
    );
    let (a, b, clock) = pair(&ca, &cb).await;
    assert_eq!((a.backend_status(), b.backend_status()), ("redis", "redis"));

    // One burst split across both instances: stopped at the 11th message overall.
    let to = rcpts(30, "victims.example");
    let mut stop = None;
    for i in 0..40 {
        clock.advance(Duration::from_millis(10));
        let d = if i % 2 == 0 { &a } else { &b };
        let r = d.assess(ALICE, ip("203.0.113.9"), ALICE, &to, 0).await;
        if r.action.is_some() {
            assert!(r.frozen);
            stop.get_or_insert(i);
        }
    }
    assert_eq!(stop, Some(10));
    assert_eq!(
        a.alerts_sent() + b.alerts_sent(),
        1,
        "one alert across instances"
    );
    let (da_, db_) = (
        a.account_detail(ALICE).await.unwrap(),
        b.account_detail(ALICE).await.unwrap(),
    );
    assert_eq!(da_.windows[0].messages, 40);
    assert_eq!(da_.windows[0].recipients, 1200);
    assert_eq!(db_.windows[0].messages, 40);
    assert!(da_.frozen.is_some() && db_.frozen.is_some());
    assert_eq!(db_.history.len(), 1);

    // Unfrozen on one, relayed by the other.
    b.unfreeze(ALICE, "admin", "password reset").await.unwrap();
    clock.advance(Duration::from_secs(86_400 + 60));
    let r = a
        .assess(ALICE, ip("192.0.2.1"), ALICE, &rcpts(1, "x.example"), 0)
        .await;
    assert_eq!(r.action, None, "{r:?}");
    // A manual freeze on one holds mail on the other.
    a.freeze("bob@example.org", "admin", "suspicious")
        .await
        .unwrap();
    let r = b
        .assess(
            "bob@example.org",
            ip("192.0.2.1"),
            "bob@example.org",
            &rcpts(1, "x.example"),
            0,
        )
        .await;
    assert!(r.frozen);
    assert!(
        r.reasons[0].contains("by admin: suspicious"),
        "{:?}",
        r.reasons
    );

    // AUTH failures from one address, spread over both: blocked on both.
    let stuffer = ip("198.51.100.7");
    for i in 0..6 {
        let d = if i % 2 == 0 { &a } else { &b };
        d.auth_result(stuffer, &format!("user{i}"), false).await;
    }
    assert!(a.auth_allowed(stuffer).await.is_err());
    assert!(b.auth_allowed(stuffer).await.is_err());
    assert!(a.auth_allowed(ip("198.51.100.8")).await.is_ok());

    // A login seen by one instance marks the address as known for both.
    a.auth_result(ip("192.0.2.10"), "carol@example.org", true)
        .await;
    b.auth_result(ip("192.0.2.11"), "carol@example.org", true)
        .await;
    let ips = a
        .account_detail("carol@example.org")
        .await
        .unwrap()
        .login_ips;
    assert_eq!(ips.len(), 2);
    assert!(ips.iter().any(|l| l.ip == "192.0.2.11" && l.new));

    let list = b.accounts().await;
    assert_eq!(list[0].account, "bob@example.org", "frozen first");
    assert!(list.iter().any(|s| s.account == ALICE));
}

#[tokio::test]
async fn the_cli_acts_on_redis_directly() {
    let server = RedisServer::start(free_port());
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), server.port, "cli");
    let d = Detector::new(&cfg).await.unwrap();
    let cli = |cmd: AccountsCommand| {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || run_with(&cfg, &cmd))
    };
    let freeze = AccountsCommand::Freeze {
        account: "Dave@Example.org".into(),
        reason: Some("phished".into()),
        duration: Some("1h".into()),
        wait: "1s".into(),
    };
    assert_eq!(cli(freeze).await.unwrap(), ExitCode::SUCCESS);
    let r = d
        .assess(
            "dave@example.org",
            ip("192.0.2.1"),
            "dave@example.org",
            &rcpts(1, "x.example"),
            0,
        )
        .await;
    assert!(r.frozen, "{r:?}");
    let detail = d.account_detail("dave@example.org").await.unwrap();
    let f = detail.frozen.unwrap();
    assert!(f.by.starts_with("cli:"), "{}", f.by);
    assert_eq!(f.until.map(|u| u - f.since), Some(3600));
    let show = AccountsCommand::Show {
        account: "dave@example.org".into(),
        json: false,
    };
    assert_eq!(cli(show).await.unwrap(), ExitCode::SUCCESS);
    let list = AccountsCommand::List {
        frozen: true,
        limit: 10,
        json: true,
    };
    assert_eq!(cli(list).await.unwrap(), ExitCode::SUCCESS);
    let unfreeze = AccountsCommand::Unfreeze {
        account: "dave@example.org".into(),
        reason: Some("reset".into()),
        wait: "1s".into(),
    };
    assert_eq!(cli(unfreeze).await.unwrap(), ExitCode::SUCCESS);
    let r = d
        .assess(
            "dave@example.org",
            ip("192.0.2.1"),
            "dave@example.org",
            &rcpts(1, "x.example"),
            0,
        )
        .await;
    assert!(!r.frozen);
    let again = AccountsCommand::Unfreeze {
        account: "dave@example.org".into(),
        reason: None,
        wait: "1s".into(),
    };
    assert_eq!(
        cli(again).await.unwrap(),
        ExitCode::from(1),
        "not frozen any more"
    );
}

#[tokio::test]
async fn falls_back_to_local_counters_when_redis_dies_and_reconnects() {
    let port = free_port();
    let mut server = RedisServer::start(port);
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (ca, cb) = (
        config(da.path(), port, "outage"),
        config(db.path(), port, "outage"),
    );
    let (a, b, clock) = pair(&ca, &cb).await;
    let to = rcpts(30, "victims.example");
    for _ in 0..5 {
        clock.advance(Duration::from_millis(10));
        assert_eq!(
            a.assess(ALICE, ip("203.0.113.9"), ALICE, &to, 0)
                .await
                .action,
            None
        );
    }

    server.stop();
    // Still answering, from local counters (which saw the first five messages too).
    let started = Instant::now();
    let mut stop = None;
    for i in 0..10 {
        clock.advance(Duration::from_millis(10));
        let r = a.assess(ALICE, ip("203.0.113.9"), ALICE, &to, 0).await;
        if r.action.is_some() {
            assert!(r.frozen);
            stop.get_or_insert(i);
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "no hanging on a dead Redis: {:?}",
        started.elapsed()
    );
    assert_eq!(stop, Some(5), "the 11th message overall is held");
    assert_eq!(a.backend_status(), "redis-unavailable (local fallback)");
    assert!(a.auth_allowed(ip("192.0.2.1")).await.is_ok());
    assert!(a.account_detail(ALICE).await.unwrap().frozen.is_some());

    // Redis is back (empty: it kept nothing): reconnect, replay the freeze made meanwhile.
    let _server = RedisServer::start(port);
    clock.advance(Duration::from_secs(1));
    a.maintain_once().await;
    assert_eq!(a.backend_status(), "redis");
    // The other instance noticed nothing yet: its connection died too.
    let r = b
        .assess(ALICE, ip("203.0.113.9"), ALICE, &rcpts(1, "x.example"), 0)
        .await;
    assert_eq!(b.backend_status(), "redis-unavailable (local fallback)");
    assert!(
        !r.frozen,
        "b never saw the freeze: its local counters are its own"
    );
    clock.advance(Duration::from_secs(1));
    b.maintain_once().await;
    assert_eq!(b.backend_status(), "redis");
    let r = b
        .assess(ALICE, ip("203.0.113.9"), ALICE, &rcpts(1, "x.example"), 0)
        .await;
    assert!(
        r.frozen,
        "the freeze made during the outage reached Redis: {r:?}"
    );
}

/// The incident: 50 accounts send a few messages an hour; one compromised account sends
/// 1,000 messages of 30 recipients as fast as it can.
struct Outcome {
    burst_relayed: usize,
    legit_stopped: usize,
    legit_sent: usize,
    detection: Duration,
    messages_to_detect: usize,
}

async fn scenario(instances: &[&Detector], clock: &ManualClock) -> Outcome {
    let domains = [
        "gmail.example",
        "outlook.example",
        "yahoo.example",
        "gmx.example",
        "web.example",
    ];
    let legit: Vec<String> = (0..50).map(|i| format!("staff{i}@example.org")).collect();
    let mut legit_sent = 0;
    let mut legit_stopped = 0;
    // Two days of normal traffic: each account 0–4 messages an hour, 1–3 recipients.
    for hour in 0..48u64 {
        for (i, who) in legit.iter().enumerate() {
            for m in 0..((i as u64 + hour) % 5) {
                clock.advance(Duration::from_millis(500));
                let to: Vec<String> = (0..1 + (m as usize + i) % 3)
                    .map(|k| format!("c{k}@{}", domains[(i + k) % domains.len()]))
                    .collect();
                let d = instances[(i + m as usize) % instances.len()];
                legit_sent += 1;
                if d.assess(who, ip("192.0.2.20"), who, &to, 0)
                    .await
                    .action
                    .is_some()
                {
                    legit_stopped += 1;
                }
            }
        }
        clock.advance(Duration::from_secs(3000));
    }
    // The burst, interleaved with the others' mail.
    let victims: Vec<String> = (0..30)
        .map(|k| format!("v{k}@{}", domains[k % domains.len()]))
        .collect();
    let attacker = "staff7@example.org";
    let mut burst_relayed = 0;
    let mut first_stop = None;
    let started = Instant::now();
    let mut detection = Duration::ZERO;
    for n in 0..1000 {
        clock.advance(Duration::from_millis(5));
        let d = instances[n % instances.len()];
        let r = d
            .assess(attacker, ip("203.0.113.66"), attacker, &victims, 0)
            .await;
        if r.action.is_none() {
            burst_relayed += 1;
        } else if first_stop.is_none() {
            first_stop = Some(n + 1);
            detection = started.elapsed();
        }
        if n % 20 == 0 {
            let who = &legit[(n / 20) % legit.len()];
            if who != attacker {
                legit_sent += 1;
                let to = vec![format!("c@{}", domains[n % domains.len()])];
                if d.assess(who, ip("192.0.2.20"), who, &to, 0)
                    .await
                    .action
                    .is_some()
                {
                    legit_stopped += 1;
                }
            }
        }
    }
    Outcome {
        burst_relayed,
        legit_stopped,
        legit_sent,
        detection,
        messages_to_detect: first_stop.unwrap_or(0),
    }
}

fn report(name: &str, o: &Outcome) {
    println!(
        "scenario {name}: burst messages relayed before the stop {} (target ≤ 100), stopped at message {}, \
         legitimate messages deferred/held {} of {} (target 0), detection {:?} after the burst began",
        o.burst_relayed, o.messages_to_detect, o.legit_stopped, o.legit_sent, o.detection
    );
}

#[tokio::test]
async fn scenario_compromised_account_memory() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = OutboundConfig {
        state_file: dir.path().join("state.json"),
        freeze_file: dir.path().join("freezes.json"),
        command_dir: dir.path().join("commands"),
        ..Default::default()
    };
    let clock = Arc::new(ManualClock::new(now_ms()));
    let d = Detector::with_clock(&cfg, clock.clone()).await.unwrap();
    let o = scenario(&[&d], &clock).await;
    report("memory", &o);
    assert!(o.burst_relayed <= 100);
    assert_eq!(o.burst_relayed, 10);
    assert_eq!(o.legit_stopped, 0);
    let detail = d.account_detail("staff7@example.org").await.unwrap();
    assert!(detail.frozen.is_some());
    assert_eq!(d.alerts_sent(), 1);
}

#[tokio::test]
async fn scenario_compromised_account_two_instances_sharing_redis() {
    let server = RedisServer::start(free_port());
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (ca, cb) = (
        config(da.path(), server.port, "scenario"),
        config(db.path(), server.port, "scenario"),
    );
    let (a, b, clock) = pair(&ca, &cb).await;
    let o = scenario(&[&a, &b], &clock).await;
    report("two instances + redis", &o);
    assert_eq!(o.burst_relayed, 10);
    assert_eq!(o.legit_stopped, 0);
    assert_eq!(a.alerts_sent() + b.alerts_sent(), 1);
    assert_eq!((a.backend_status(), b.backend_status()), ("redis", "redis"));
    let action = b
        .assess(
            "staff7@example.org",
            ip("203.0.113.66"),
            "staff7@example.org",
            &rcpts(1, "x.example"),
            0,
        )
        .await
        .action;
    assert_eq!(action, Some(OutboundAction::Freeze));
}

/// Issue 19: unfreezing clears the account's windows in Redis too (the unfreeze script),
/// so the next message is not frozen again by the burst that caused the freeze; both
/// instances see it at once.
#[tokio::test]
async fn unfreeze_resets_the_windows_in_redis() {
    let server = RedisServer::start(free_port());
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (ca, cb) = (
        config(da.path(), server.port, "reset"),
        config(db.path(), server.port, "reset"),
    );
    let (a, b, clock) = pair(&ca, &cb).await;
    let to = rcpts(30, "victims.example");
    let mut frozen_at = None;
    for i in 0..20 {
        clock.advance(Duration::from_millis(10));
        if a.assess(ALICE, ip("203.0.113.9"), ALICE, &to, 0)
            .await
            .frozen
        {
            frozen_at = Some(i);
            break;
        }
    }
    assert!(frozen_at.is_some(), "the burst never froze the account");
    let before = b.account_detail(ALICE).await.unwrap();
    assert!(before.windows.iter().any(|w| w.messages > 0), "{before:?}");

    a.unfreeze(ALICE, "test", "checked").await.unwrap();
    let after = b.account_detail(ALICE).await.unwrap();
    assert!(
        after
            .windows
            .iter()
            .all(|w| w.messages == 0 && w.recipients == 0),
        "windows kept after unfreeze: {after:?}"
    );
    assert_eq!(after.messages_total, before.messages_total, "totals stay");
    clock.advance(Duration::from_millis(10));
    let next = b.assess(ALICE, ip("203.0.113.9"), ALICE, &to, 0).await;
    assert!(!next.frozen && next.action.is_none(), "{next:?}");
    let history = after.history;
    assert_eq!(history.last().map(|e| e.action.as_str()), Some("unfreeze"));
    assert_eq!(history.last().map(|e| e.why.as_str()), Some("checked"));
}
