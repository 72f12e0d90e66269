//! The detector end to end on the memory backend, with a manual clock.

use std::net::IpAddr;
use std::path::Path;

use super::config::{AccountOverride, WindowLimit};
use super::*;

/// An exact hour (the baseline works in clock hours).
const T0: u64 = 1_700_002_800_000;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn cfg(dir: &Path) -> OutboundConfig {
    OutboundConfig {
        state_file: dir.join("state.json"),
        freeze_file: dir.join("freezes.json"),
        command_dir: dir.join("commands"),
        ..Default::default()
    }
}

async fn detector(cfg: &OutboundConfig) -> (Detector, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(T0));
    let d = Detector::with_clock(cfg, clock.clone()).await.unwrap();
    (d, clock)
}

/// `n` recipients, all in `domain`.
fn rcpts(n: usize, domain: &str) -> Vec<String> {
    (0..n).map(|i| format!("r{i}@{domain}")).collect()
}

const ALICE: &str = "alice@example.org";

#[tokio::test]
async fn a_burst_is_frozen_within_a_dozen_messages() {
    let dir = tempfile::tempdir().unwrap();
    let (d, clock) = detector(&cfg(dir.path())).await;
    let client = ip("203.0.113.9");
    let to = rcpts(30, "victims.example");
    let mut first_stop = None;
    for i in 0..1000 {
        clock.advance(Duration::from_millis(20));
        let a = d.assess(ALICE, client, ALICE, &to, 0).await;
        if a.action.is_some() {
            first_stop.get_or_insert(i);
            assert!(a.frozen, "{a:?}");
            assert_eq!(a.action, Some(OutboundAction::Freeze));
            assert_eq!(a.flags, [FLAG_BURST]);
        }
    }
    // 10 messages × 30 recipients = 300 is the 1-minute limit: the 11th is held.
    assert_eq!(first_stop, Some(10));
    assert_eq!(d.alerts_sent(), 1, "one alert, not one per message");
    let detail = d.account_detail(ALICE).await.unwrap();
    let f = detail.frozen.unwrap();
    assert_eq!(f.by, DETECTOR);
    assert!(f.why.contains("recipients in 1m: 330 > 300"), "{}", f.why);
    assert_eq!(detail.history.len(), 1);
    // Durable: the freeze is in the file already.
    let book = FreezeBook::load(&dir.path().join("freezes.json")).unwrap();
    assert!(book.frozen(ALICE, f.since).is_some());
    // Everyone else is unaffected.
    let b = d
        .assess(
            "bob@example.org",
            client,
            "bob@example.org",
            &rcpts(2, "x.example"),
            0,
        )
        .await;
    assert_eq!(b, AccountFindings::relay());
    // Unfrozen by an administrator: relayed again (the window has passed).
    d.unfreeze(ALICE, "admin", "password reset").await.unwrap();
    assert!(d.unfreeze(ALICE, "admin", "again").await.is_err());
    clock.advance(Duration::from_secs(24 * 3600));
    let a = d
        .assess(ALICE, client, ALICE, &rcpts(1, "x.example"), 0)
        .await;
    assert_eq!(a, AccountFindings::relay());
    let h = d.account_detail(ALICE).await.unwrap().history;
    assert_eq!(
        h.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(),
        ["freeze", "unfreeze"]
    );
    assert_eq!(h[1].by, "admin");
    assert_eq!(h[1].why, "password reset");
}

#[tokio::test]
async fn many_recipient_domains_stop_a_burst_sooner() {
    let dir = tempfile::tempdir().unwrap();
    let (d, clock) = detector(&cfg(dir.path())).await;
    let mut stop = None;
    for i in 0..20 {
        clock.advance(Duration::from_millis(20));
        let to: Vec<String> = (0..30).map(|j| format!("x@d{i}-{j}.example")).collect();
        if d.assess(ALICE, ip("192.0.2.1"), ALICE, &to, 0)
            .await
            .action
            .is_some()
        {
            stop = Some(i);
            break;
        }
    }
    // 4 × 30 distinct domains > 100.
    assert_eq!(stop, Some(3));
    let r = &d.account_detail(ALICE).await.unwrap().frozen.unwrap().why;
    assert!(r.contains("recipient domains in 1h: 101 > 100"), "{r}");
}

#[tokio::test]
async fn messages_and_recipients_are_counted_separately() {
    let dir = tempfile::tempdir().unwrap();
    let (d, clock) = detector(&cfg(dir.path())).await;
    d.assess(ALICE, ip("192.0.2.1"), ALICE, &rcpts(16, "example.net"), 0)
        .await;
    clock.advance(Duration::from_secs(1));
    d.assess(ALICE, ip("192.0.2.1"), ALICE, &rcpts(1, "example.net"), 0)
        .await;
    let detail = d.account_detail(ALICE).await.unwrap();
    let w = &detail.windows[0];
    assert_eq!((w.window.as_str(), w.messages, w.recipients), ("1m", 2, 17));
    assert_eq!(w.max_messages, Some(30));
    assert_eq!(detail.recipient_domains.domains, 1);
    assert_eq!(detail.messages_total, 2);
}

#[tokio::test]
async fn windows_slide() {
    let dir = tempfile::tempdir().unwrap();
    let c = OutboundConfig {
        windows: vec![WindowLimit {
            window: Duration::from_secs(60),
            messages: Some(5),
            recipients: None,
        }],
        action: OutboundAction::Defer,
        ..cfg(dir.path())
    };
    let (d, clock) = detector(&c).await;
    let to = rcpts(1, "example.net");
    for _ in 0..5 {
        assert_eq!(
            d.assess(ALICE, ip("192.0.2.1"), ALICE, &to, 0).await.action,
            None
        );
        clock.advance(Duration::from_secs(1));
    }
    let a = d.assess(ALICE, ip("192.0.2.1"), ALICE, &to, 0).await;
    assert_eq!(a.action, Some(OutboundAction::Defer));
    assert!(!a.frozen);
    assert_eq!(a.reasons, ["messages in 1m: 6 > 5"]);
    // A minute (plus one bucket) later the window is empty again.
    clock.advance(Duration::from_secs(60 + 8));
    for _ in 0..5 {
        assert_eq!(
            d.assess(ALICE, ip("192.0.2.1"), ALICE, &to, 0).await.action,
            None
        );
    }
}

#[tokio::test]
async fn bulk_senders_and_groups_have_their_own_limits() {
    let dir = tempfile::tempdir().unwrap();
    let c = OutboundConfig {
        accounts: vec![
            AccountOverride {
                name: Some("news@example.org".into()),
                bulk: true,
                ..Default::default()
            },
            AccountOverride {
                names: vec!["@sales.example.org".into()],
                windows: vec![WindowLimit {
                    window: Duration::from_secs(60),
                    messages: Some(3),
                    recipients: None,
                }],
                action: Some(OutboundAction::Hold),
                ..Default::default()
            },
        ],
        ..cfg(dir.path())
    };
    let (d, clock) = detector(&c).await;
    let to: Vec<String> = (0..100).map(|j| format!("x@d{j}.example")).collect();
    for _ in 0..200 {
        clock.advance(Duration::from_millis(5));
        let a = d
            .assess(
                "news@example.org",
                ip("192.0.2.1"),
                "news@example.org",
                &to,
                0,
            )
            .await;
        assert_eq!(a, AccountFindings::relay());
    }
    let to = rcpts(1, "example.net");
    let who = "joe@sales.example.org";
    for _ in 0..3 {
        assert_eq!(
            d.assess(who, ip("192.0.2.1"), who, &to, 0).await.action,
            None
        );
    }
    let a = d.assess(who, ip("192.0.2.1"), who, &to, 0).await;
    assert_eq!(a.action, Some(OutboundAction::Hold));
    assert!(!a.frozen);
    let list = d.accounts().await;
    let news = list
        .iter()
        .find(|s| s.account == "news@example.org")
        .unwrap();
    assert!(news.bulk);
    assert_eq!(news.windows[0].messages, 200);
    assert_eq!(
        list.iter()
            .find(|s| s.account == who)
            .unwrap()
            .policy
            .as_deref(),
        Some("@sales.example.org")
    );
}

#[tokio::test]
async fn from_policy() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path());
    c.from.aliases = vec!["noreply@example.com".into()];
    c.from.login_domain = Some("example.org".into());
    c.accounts = vec![
        AccountOverride {
            name: Some("ceo@example.org".into()),
            from_allow: Some(FromAllow::Address),
            from_aliases: vec!["@ceo-office.example".into()],
            ..Default::default()
        },
        AccountOverride {
            name: Some("app@example.org".into()),
            from_allow: Some(FromAllow::Any),
            ..Default::default()
        },
    ];
    let (d, _) = detector(&c).await;
    let to = rcpts(1, "example.net");
    let check = |account: &'static str, from: &'static str| {
        let d = &d;
        let to = to.clone();
        async move { d.assess(account, ip("192.0.2.1"), from, &to, 0).await }
    };
    assert_eq!(check(ALICE, "Alice <Alice@Example.org>").await.action, None);
    assert_eq!(
        check(ALICE, "sales@example.org").await.action,
        None,
        "own domain"
    );
    assert_eq!(
        check(ALICE, "noreply@example.com").await.action,
        None,
        "global alias"
    );
    let a = check(ALICE, "\"PayPal\" <service@paypal.example>").await;
    assert_eq!(a.action, Some(OutboundAction::Hold));
    assert_eq!(a.flags, [FLAG_FROM]);
    assert_eq!(
        a.reasons,
        ["header From service@paypal.example is not allowed for account alice@example.org"]
    );
    assert_eq!(
        check(ALICE, "").await.action,
        Some(OutboundAction::Hold),
        "no From at all"
    );
    // Address-only account: its own address and its aliases, not its domain.
    assert_eq!(
        check("ceo@example.org", "ceo@example.org").await.action,
        None
    );
    assert_eq!(
        check("ceo@example.org", "x@ceo-office.example")
            .await
            .action,
        None
    );
    assert_eq!(
        check("ceo@example.org", "hr@example.org").await.action,
        Some(OutboundAction::Hold)
    );
    assert_eq!(
        check("app@example.org", "anything@anywhere.example")
            .await
            .action,
        None
    );
    // Bare logins get `login_domain`.
    assert_eq!(check("bob", "bob@example.org").await.action, None);
    assert_eq!(
        check("bob", "bob@evil.example").await.action,
        Some(OutboundAction::Hold)
    );
    assert_eq!(
        d.alerts_sent(),
        3,
        "one From alert per account per interval"
    );
    // Without login_domain a bare login has no own address: not checked.
    let dir2 = tempfile::tempdir().unwrap();
    let (d2, _) = detector(&cfg(dir2.path())).await;
    assert_eq!(
        d2.assess("bob", ip("192.0.2.1"), "x@y.example", &to, 0)
            .await
            .action,
        None
    );
}

#[tokio::test]
async fn auth_failures_block_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path());
    c.auth_failures.max_failures = 5;
    c.auth_failures.max_usernames = 3;
    c.auth_failures.exempt_networks = vec!["10.0.0.0/8".parse().unwrap()];
    let (d, clock) = detector(&c).await;
    let attacker = ip("198.51.100.7");
    // Same user, wrong password, five times: allowed; the sixth failure blocks.
    for _ in 0..5 {
        assert!(d.auth_allowed(attacker).await.is_ok());
        d.auth_result(attacker, "alice", false).await;
    }
    assert!(d.auth_allowed(attacker).await.is_ok());
    d.auth_result(attacker, "alice", false).await;
    let e = d.auth_allowed(attacker).await.unwrap_err();
    assert!(e.contains("try again in 60 minutes"), "{e}");
    assert_eq!(d.alerts_sent(), 1);
    // Other clients are not affected; the block ends after an hour.
    assert!(d.auth_allowed(ip("198.51.100.8")).await.is_ok());
    clock.advance(Duration::from_secs(3600));
    assert!(d.auth_allowed(attacker).await.is_ok());
    // Credential stuffing: many user names, few tries each.
    let stuffer = ip("198.51.100.9");
    for user in ["a", "b", "c"] {
        d.auth_result(stuffer, user, false).await;
    }
    assert!(d.auth_allowed(stuffer).await.is_ok());
    d.auth_result(stuffer, "d", false).await;
    assert!(d.auth_allowed(stuffer).await.is_err());
    // Exempt networks are never blocked.
    for i in 0..50 {
        d.auth_result(ip("10.1.1.1"), &format!("u{i}"), false).await;
    }
    assert!(d.auth_allowed(ip("10.1.1.1")).await.is_ok());
}

#[tokio::test]
async fn a_login_from_a_new_address_tightens_the_limits() {
    let dir = tempfile::tempdir().unwrap();
    let (d, clock) = detector(&cfg(dir.path())).await;
    let home = ip("192.0.2.10");
    let attacker = ip("203.0.113.66");
    d.auth_result(home, ALICE, true).await;
    clock.advance(Duration::from_secs(86_400));
    d.auth_result(attacker, ALICE, true).await;
    clock.advance(Duration::from_secs(60));
    let to = rcpts(30, "victims.example");
    let mut stop = None;
    for i in 0..20 {
        clock.advance(Duration::from_millis(50));
        if d.assess(ALICE, attacker, ALICE, &to, 0)
            .await
            .action
            .is_some()
        {
            stop = Some(i);
            break;
        }
    }
    // Limits halved: 150 recipients a minute, so the 6th message stops.
    assert_eq!(stop, Some(5));
    let detail = d.account_detail(ALICE).await.unwrap();
    let why = detail.frozen.unwrap().why;
    assert!(why.contains("recipients in 1m: 180 > 150"), "{why}");
    assert!(why.contains("new address 1 min ago"), "{why}");
    assert_eq!(detail.login_ips.len(), 2);
    assert!(
        detail
            .login_ips
            .iter()
            .any(|l| l.ip == "203.0.113.66" && l.new)
    );
    // The same volume from the usual address would have passed.
    let bob = "bob@example.org";
    d.auth_result(home, bob, true).await;
    for _ in 0..10 {
        clock.advance(Duration::from_millis(50));
        assert_eq!(d.assess(bob, home, bob, &to, 0).await.action, None);
    }
}

#[tokio::test]
async fn many_refused_recipients_are_flagged() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path());
    c.action = OutboundAction::Alert;
    let (d, clock) = detector(&c).await;
    // 10 accepted, 9 refused: 19 tried, under the minimum sample.
    let a = d
        .assess(ALICE, ip("192.0.2.1"), ALICE, &rcpts(1, "x.example"), 9)
        .await;
    assert_eq!(a.action, None);
    clock.advance(Duration::from_secs(10));
    let a = d
        .assess(ALICE, ip("192.0.2.1"), ALICE, &rcpts(1, "x.example"), 9)
        .await;
    assert_eq!(a.action, Some(OutboundAction::Alert));
    assert!(!a.frozen);
    assert_eq!(
        a.reasons,
        ["recipients refused by the next hop in 1h: 90% > 50% (18 of 20)"]
    );
}

#[tokio::test]
async fn the_adaptive_limit_follows_the_account_history() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path());
    c.windows = vec![];
    c.max_recipient_domains = 0;
    c.action = OutboundAction::Alert;
    c.alert_interval = Duration::from_secs(1);
    c.adaptive.k = 4.0;
    c.adaptive.floor_messages = 20.0;
    c.adaptive.new_account_messages = 2.0;
    c.adaptive.half_life = Duration::from_secs(24 * 3600);
    let (d, clock) = detector(&c).await;
    let to = rcpts(1, "x.example");
    let burst = |n: usize, who: &'static str| {
        let (d, to, clock) = (&d, to.clone(), clock.clone());
        async move {
            for i in 0..n {
                clock.advance(Duration::from_millis(100));
                if d.assess(who, ip("192.0.2.1"), who, &to, 0)
                    .await
                    .action
                    .is_some()
                {
                    return Some(i);
                }
            }
            None
        }
    };
    // New account: max(20, 4 × 2) = 20 messages an hour.
    assert_eq!(burst(25, "new@example.org").await, Some(20));
    // An account that has sent 15 an hour, evenly, for two weeks: max(20, 4 × 15) = 60.
    let steady = "steady@example.org";
    for _ in 0..14 * 24 * 15 {
        clock.advance(Duration::from_secs(240));
        assert_eq!(
            d.assess(steady, ip("192.0.2.1"), steady, &to, 0)
                .await
                .action,
            None
        );
    }
    let b = d.account_detail(steady).await.unwrap().baseline;
    assert!((b.messages_per_hour - 15.0).abs() < 0.5, "{b:?}");
    // Two quiet hours later (one idle hour folded in), a burst stops at the learned limit.
    clock.advance(Duration::from_secs(7200));
    let max = d
        .account_detail(steady)
        .await
        .unwrap()
        .baseline
        .max_messages;
    assert!((55.0..=61.0).contains(&max), "{max}");
    assert_eq!(burst(70, steady).await, Some(max.floor() as usize));
}

#[tokio::test]
async fn alerts_are_rate_limited_per_account() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path());
    c.action = OutboundAction::Alert;
    c.windows = vec![WindowLimit {
        window: Duration::from_secs(60),
        messages: Some(1),
        recipients: None,
    }];
    let (d, clock) = detector(&c).await;
    let to = rcpts(1, "x.example");
    for _ in 0..20 {
        d.assess(ALICE, ip("192.0.2.1"), ALICE, &to, 0).await;
        d.assess(
            "bob@example.org",
            ip("192.0.2.1"),
            "bob@example.org",
            &to,
            0,
        )
        .await;
    }
    assert_eq!(d.alerts_sent(), 2);
    clock.advance(Duration::from_secs(600));
    d.assess(ALICE, ip("192.0.2.1"), ALICE, &to, 0).await;
    d.assess(ALICE, ip("192.0.2.1"), ALICE, &to, 0).await;
    assert_eq!(d.alerts_sent(), 3);
}

#[tokio::test]
async fn freezes_expire_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path());
    c.freeze_expiry = Some(Duration::from_secs(3600));
    let (d, clock) = detector(&c).await;
    let to = rcpts(301, "x.example");
    assert!(d.assess(ALICE, ip("192.0.2.1"), ALICE, &to, 0).await.frozen);
    clock.advance(Duration::from_secs(1800));
    assert!(
        d.assess(ALICE, ip("192.0.2.1"), ALICE, &rcpts(1, "x.example"), 0)
            .await
            .frozen
    );
    clock.advance(Duration::from_secs(1801));
    d.maintain_once().await;
    let a = d
        .assess(ALICE, ip("192.0.2.1"), ALICE, &rcpts(1, "x.example"), 0)
        .await;
    assert!(!a.frozen, "{a:?}");
    let h = d.account_detail(ALICE).await.unwrap().history;
    assert_eq!(
        h.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(),
        ["freeze", "expire"]
    );
    assert_eq!(h[0].until, Some(T0 / 1000 + 3600));
    // A manual freeze with no duration does not expire.
    d.freeze(ALICE, "admin", "investigating").await.unwrap();
    assert!(d.freeze(ALICE, "admin", "twice").await.is_err());
    clock.advance(Duration::from_secs(30 * 86_400));
    d.maintain_once().await;
    assert!(d.account_detail(ALICE).await.unwrap().frozen.is_some());
}

#[tokio::test]
async fn state_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(dir.path());
    let (d, clock) = detector(&c).await;
    for _ in 0..3 {
        d.assess(ALICE, ip("192.0.2.1"), ALICE, &rcpts(5, "x.example"), 0)
            .await;
    }
    d.auth_result(ip("192.0.2.1"), ALICE, true).await;
    d.freeze("mallory@example.org", "admin", "phished")
        .await
        .unwrap();
    clock.advance(Duration::from_secs(31));
    d.maintain_once().await; // the snapshot is due
    assert!(dir.path().join("state.json").exists());
    drop(d);

    let (d, _) = detector(&c).await;
    let detail = d.account_detail(ALICE).await.unwrap();
    assert_eq!(detail.messages_total, 3);
    assert_eq!(detail.windows[1].recipients, 15);
    assert_eq!(detail.login_ips.len(), 1);
    let m = d
        .assess(
            "mallory@example.org",
            ip("192.0.2.1"),
            "mallory@example.org",
            &rcpts(1, "x.example"),
            0,
        )
        .await;
    assert!(m.frozen);
    assert!(
        m.reasons[0].contains("by admin: phished"),
        "{:?}",
        m.reasons
    );
    let list = d.accounts().await;
    assert_eq!(list[0].account, "mallory@example.org", "frozen first");
    assert_eq!(list.len(), 2);
}

#[tokio::test]
async fn a_corrupt_snapshot_is_set_aside() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("state.json"), "{not json\n").unwrap();
    let (d, _) = detector(&cfg(dir.path())).await;
    assert!(d.accounts().await.is_empty());
    assert!(dir.path().join("state.corrupt").exists());
    // A corrupt freeze file is fatal: frozen accounts must not silently thaw.
    std::fs::write(dir.path().join("freezes.json"), "{").unwrap();
    assert!(Detector::new(&cfg(dir.path())).await.is_err());
}

#[tokio::test]
async fn cli_commands_are_applied_from_the_spool() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(dir.path());
    let cmd = Command {
        op: Op::Freeze,
        account: "Alice@Example.org".into(),
        by: "cli:root".into(),
        why: "phished".into(),
        expires_after: None,
        at: 0,
    };
    // Written while the proxy is down: applied at start.
    let first = freeze::submit(&c.command_dir, &cmd).unwrap();
    let (d, _) = detector(&c).await;
    let r = freeze::wait_result(&c.command_dir, &first, Duration::from_millis(10)).unwrap();
    assert!(r.ok, "{r:?}");
    assert!(
        d.assess(ALICE, ip("192.0.2.1"), ALICE, &rcpts(1, "x.example"), 0)
            .await
            .frozen
    );
    // While it runs: applied by the next maintenance round.
    let again = freeze::submit(&c.command_dir, &cmd).unwrap();
    let unfreeze = freeze::submit(
        &c.command_dir,
        &Command {
            op: Op::Unfreeze,
            ..cmd.clone()
        },
    )
    .unwrap();
    d.maintain_once().await;
    let r = freeze::wait_result(&c.command_dir, &again, Duration::from_millis(10)).unwrap();
    assert!(!r.ok && r.message.contains("already frozen"), "{r:?}");
    assert!(
        freeze::wait_result(&c.command_dir, &unfreeze, Duration::from_millis(10))
            .unwrap()
            .ok
    );
    assert!(
        !d.assess(ALICE, ip("192.0.2.1"), ALICE, &rcpts(1, "x.example"), 0)
            .await
            .frozen
    );
    let h = d.account_detail(ALICE).await.unwrap().history;
    assert_eq!(h[0].by, "cli:root");
    assert!(freeze::pending(&c.command_dir).is_empty());
}

#[tokio::test]
async fn accounts_are_logins_or_trusted_senders() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path());
    c.trusted_networks = vec!["10.0.0.0/8".parse().unwrap()];
    let (d, _) = detector(&c).await;
    assert_eq!(
        d.account(Some("Alice@Example.ORG"), ip("192.0.2.1"), "x@y"),
        Some(ALICE.into())
    );
    assert_eq!(
        d.account(None, ip("10.2.3.4"), "<App@Example.org>"),
        Some("app@example.org".into())
    );
    assert_eq!(d.account(None, ip("10.2.3.4"), ""), Some("<>".into()));
    assert_eq!(d.account(None, ip("192.0.2.1"), "app@example.org"), None);
    assert_eq!(d.backend_status(), "memory");

    c.enabled = false;
    let (d, _) = detector(&c).await;
    assert_eq!(d.account(Some("alice"), ip("192.0.2.1"), ""), None);
    assert_eq!(
        d.assess(ALICE, ip("192.0.2.1"), "x@evil", &rcpts(5000, "x"), 0)
            .await,
        AccountFindings::relay()
    );
    assert!(d.auth_allowed(ip("192.0.2.1")).await.is_ok());
}

/// Issue 13: a trusted client is counted by host (IPv4 address, IPv6 /64) besides its
/// envelope sender; a login is not.
#[tokio::test]
async fn trusted_clients_are_keyed_by_host() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path());
    c.trusted_networks = vec![
        "10.0.0.0/8".parse().unwrap(),
        "2001:db8::/32".parse().unwrap(),
    ];
    let (d, _) = detector(&c).await;
    assert_eq!(
        d.client_account(None, ip("10.2.3.4")).as_deref(),
        Some("client:10.2.3.4")
    );
    assert_eq!(
        d.client_account(None, ip("::ffff:10.2.3.4")).as_deref(),
        Some("client:10.2.3.4")
    );
    assert_eq!(
        d.client_account(None, ip("2001:db8:5:6::99")).as_deref(),
        Some("client:2001:db8:5:6::/64")
    );
    assert_eq!(d.client_account(Some("alice"), ip("10.2.3.4")), None);
    // Any address of the /64 names the host (for the admin API and the CLI).
    assert_eq!(
        normalize("Client:2001:DB8:5:6::1"),
        "client:2001:db8:5:6::/64"
    );
    assert_eq!(d.client_account(None, ip("192.0.2.1")), None);
    // An IPv4 client on a dual-stack listener is a trusted sender too (not untracked).
    assert_eq!(
        d.account(None, ip("::ffff:10.2.3.4"), "app@example.org"),
        Some("app@example.org".into())
    );
    c.client.enabled = false;
    let (d, _) = detector(&c).await;
    assert_eq!(d.client_account(None, ip("10.2.3.4")), None);
}

/// An IPv6 host rotating its address inside its /64 and its envelope sender on every
/// message is still one client: stopped at the client limit.
#[tokio::test]
async fn a_client_rotating_addresses_in_its_64_and_senders_is_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path());
    c.trusted_networks = vec!["2001:db8::/32".parse().unwrap()];
    c.client.windows = vec![WindowLimit {
        window: Duration::from_secs(60),
        messages: Some(3),
        recipients: None,
    }];
    c.client.action = Some(OutboundAction::Defer);
    let (d, clock) = detector(&c).await;
    let mut stopped = Vec::new();
    for i in 0..8u16 {
        clock.advance(Duration::from_millis(50));
        let addr = IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 7, 7, i, 1, 2, 3));
        let sender = format!("s{i}@example.org");
        let key = d.client_account(None, addr).unwrap();
        let a = d
            .assess_as(
                &sender,
                Some(&key),
                addr,
                &sender,
                &rcpts(1, "x.example"),
                0,
            )
            .await;
        if a.action.is_some() {
            assert_eq!(a.action, Some(OutboundAction::Defer), "{a:?}");
            assert!(a.reasons[0].contains("client:2001:db8:7:7::/64"), "{a:?}");
            stopped.push(i);
        }
    }
    assert_eq!(stopped, [3, 4, 5, 6, 7]);
    // Another host of the same network is not affected.
    let other = ip("2001:db8:7:8::1");
    let key = d.client_account(None, other).unwrap();
    let a = d
        .assess_as(
            "s0@example.org",
            Some(&key),
            other,
            "s0@example.org",
            &rcpts(1, "x"),
            0,
        )
        .await;
    assert_eq!(a.action, None, "{a:?}");
}

/// The distinct-senders signal: a host within its volume limits that suddenly sends as
/// more senders than `max_senders` breaches; one sender many times does not.
#[tokio::test]
async fn many_senders_from_one_client_breach() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path());
    c.trusted_networks = vec!["10.0.0.0/8".parse().unwrap()];
    c.client.max_senders = 5;
    c.client.action = Some(OutboundAction::Hold);
    let (d, clock) = detector(&c).await;
    let web = ip("10.0.0.7");
    let key = d.client_account(None, web).unwrap();
    for _ in 0..10 {
        clock.advance(Duration::from_secs(1));
        let a = d
            .assess_as(
                "app@example.org",
                Some(&key),
                web,
                "app@example.org",
                &rcpts(1, "x"),
                0,
            )
            .await;
        assert_eq!(a.action, None, "one sender, ten messages: {a:?}");
    }
    let mut first = None;
    for i in 0..8 {
        clock.advance(Duration::from_secs(1));
        let s = format!("u{i}@example.org");
        let a = d
            .assess_as(&s, Some(&key), web, &s, &rcpts(1, "x"), 0)
            .await;
        if a.action.is_some() {
            first.get_or_insert(i);
            assert_eq!(a.action, Some(OutboundAction::Hold));
            assert!(
                a.reasons
                    .iter()
                    .any(|r| r.contains("distinct envelope senders in 1h: 6 > 5")),
                "{a:?}"
            );
        }
    }
    // app@ and u0..u3 are five senders; u4 is the sixth.
    assert_eq!(first, Some(4));
}

/// `[[outbound.account]] name = "client:..."` gives one host its own limits (here: a
/// known bulk relay), normalised like the key (any address of the /64 names it).
#[tokio::test]
async fn one_host_can_have_its_own_client_limits() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path());
    c.trusted_networks = vec!["2001:db8::/32".parse().unwrap()];
    c.client.max_senders = 2;
    c.accounts = vec![AccountOverride {
        name: Some("client:2001:DB8:1:1::25".into()),
        bulk: true,
        ..Default::default()
    }];
    let (d, _) = detector(&c).await;
    let relay = ip("2001:db8:1:1::77");
    let key = d.client_account(None, relay).unwrap();
    for i in 0..6 {
        let s = format!("u{i}@example.org");
        let a = d
            .assess_as(&s, Some(&key), relay, &s, &rcpts(1, "x"), 0)
            .await;
        assert_eq!(a.action, None, "{a:?}");
    }
    let other = ip("2001:db8:1:2::77");
    let key = d.client_account(None, other).unwrap();
    let mut actions = Vec::new();
    for i in 0..3 {
        let s = format!("u{i}@example.org");
        actions.push(
            d.assess_as(&s, Some(&key), other, &s, &rcpts(1, "x"), 0)
                .await
                .action,
        );
    }
    assert_eq!(actions, [None, None, Some(OutboundAction::Freeze)]);
}

/// Issue 13: an IPv6 client rotating its address inside its /64 is one client for the
/// AUTH failure limit; the next /64 is another.
#[tokio::test]
async fn auth_failures_count_per_ipv6_64() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path());
    c.auth_failures.max_failures = 3;
    let (d, clock) = detector(&c).await;
    for i in 0..4u16 {
        clock.advance(Duration::from_secs(1));
        let a = IpAddr::V6(std::net::Ipv6Addr::new(
            0x2001,
            0xdb8,
            1,
            2,
            0,
            0,
            0,
            100 + i,
        ));
        assert!(d.auth_allowed(a).await.is_ok(), "attempt {i}");
        d.auth_result(a, ALICE, false).await;
    }
    let fresh = ip("2001:db8:1:2:ffff::1");
    assert!(
        d.auth_allowed(fresh).await.is_err(),
        "a new address of the /64 is blocked"
    );
    assert!(d.auth_allowed(ip("2001:db8:1:3::1")).await.is_ok());
    assert_eq!(d.alerts_sent(), 1);
}

/// Issue 13: a password spray against one user name from many addresses, each below the
/// client limit, locks the name — for addresses it never logged in from. The real user's
/// known address still gets through (locking them out would be the attacker's win).
#[tokio::test]
async fn a_spray_against_one_user_name_locks_it_for_unknown_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path());
    c.auth_failures.max_failures_per_user = 5;
    let (d, clock) = detector(&c).await;
    let home = ip("198.51.100.20");
    d.auth_result(home, "CEO@example.org", true).await;
    let mut locked_at = None;
    for i in 0..8u8 {
        clock.advance(Duration::from_secs(1));
        let attacker = IpAddr::V4(std::net::Ipv4Addr::new(203, 0, 113, i));
        assert!(d.auth_allowed(attacker).await.is_ok(), "client {i} blocked");
        if d.auth_user_allowed(attacker, "ceo@example.org")
            .await
            .is_err()
        {
            locked_at.get_or_insert(i);
            continue;
        }
        d.auth_result(attacker, "ceo@example.org", false).await;
    }
    assert_eq!(
        locked_at,
        Some(6),
        "the 6th failure locks, the 7th try is refused"
    );
    assert_eq!(d.alerts_sent(), 1);
    let metrics = crate::metrics::global().render();
    for line in [
        "mailwarden_auth_failure_blocks_total{kind=\"user\"}",
        "mailwarden_auth_refused_total{reason=\"user\"}",
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
    let err = d
        .auth_user_allowed(ip("192.0.2.99"), " ceo@example.org")
        .await
        .unwrap_err();
    assert!(err.contains("15 minutes"), "{err}");
    assert!(
        d.auth_user_allowed(home, "ceo@example.org").await.is_ok(),
        "known address"
    );
    assert!(
        d.auth_user_allowed(ip("192.0.2.99"), "bob@example.org")
            .await
            .is_ok()
    );
    clock.advance(Duration::from_secs(15 * 60));
    assert!(
        d.auth_user_allowed(ip("192.0.2.99"), "ceo@example.org")
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn tracked_accounts_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path());
    c.tracked_accounts = 50;
    let (d, _) = detector(&c).await;
    for i in 0..500 {
        d.assess(
            &format!("u{i}@example.org"),
            ip("192.0.2.1"),
            "",
            &rcpts(1, "x"),
            0,
        )
        .await;
    }
    d.freeze("u0@example.org", "admin", "test").await.unwrap();
    let list = d.accounts().await;
    assert_eq!(list.len(), 51, "50 tracked + 1 frozen without counters");
    assert!(list[0].frozen && list[0].last_seen.is_none());
}

#[test]
fn breach_texts() {
    assert_eq!(num(300.0), "300");
    assert_eq!(num(150.0000001), "150");
    assert_eq!(num(12.25), "12.2");
    assert_eq!(bare_address("\"A, B\" <A@B.example>"), "a@b.example");
    assert_eq!(
        split_addresses("\"A, B\" <a@b>, c@d"),
        ["\"A, B\" <a@b>", " c@d"]
    );
    assert_eq!(
        OutboundAction::max(Some(OutboundAction::Hold), OutboundAction::Alert),
        OutboundAction::Hold
    );
    assert_eq!(
        OutboundAction::max(Some(OutboundAction::Reject), OutboundAction::Freeze),
        OutboundAction::Freeze
    );
}

#[tokio::test]
async fn assess_counted_shows_what_each_key_was_counted_at() {
    let dir = tempfile::tempdir().unwrap();
    let c = OutboundConfig {
        trusted_networks: vec!["192.0.2.0/24".parse().unwrap()],
        ..cfg(dir.path())
    };
    let (d, clock) = detector(&c).await;
    let host = ip("192.0.2.60");
    let client = d.client_account(None, host).unwrap();
    let to = rcpts(2, "example.net");
    let mut last = None;
    for sender in ["a@example.org", "b@example.org", "a@example.org"] {
        clock.advance(Duration::from_millis(100));
        last = Some(
            d.assess_counted(sender, Some(&client), host, sender, &to, 0)
                .await,
        );
    }
    let (a, counts) = last.unwrap();
    assert_eq!(a, AccountFindings::relay(), "relayed, and still counted");
    let value = |key: &str, name: &str| {
        counts
            .iter()
            .find(|c| c.key == key && c.name == name)
            .map(|c| c.value)
    };
    assert_eq!(value("a@example.org", "messages_1m"), Some(2.0));
    assert_eq!(value("a@example.org", "recipients_1m"), Some(4.0));
    assert_eq!(value("a@example.org", "domains_1h"), Some(1.0));
    assert_eq!(value(&client, "messages_1m"), Some(3.0));
    assert_eq!(value(&client, "senders_1h"), Some(2.0));
    assert_eq!(
        value("b@example.org", "messages_1m"),
        None,
        "only this message's keys"
    );
}

/// The detector's counters (`outbound_*` in `/metrics`). The registry is global and the
/// tests run in parallel, so each check is "moved by at least this much".
mod counters {
    use super::*;
    use crate::metrics::{global, label};

    fn messages(action: &'static str) -> u64 {
        global()
            .outbound_messages
            .get_or_create(&label("action", action))
            .get()
    }

    fn alerts(event: &'static str) -> u64 {
        global()
            .outbound_alerts
            .get_or_create(&label("event", event))
            .get()
    }

    #[tokio::test]
    async fn assessments_freezes_and_alerts_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let (d, clock) = detector(&cfg(dir.path())).await;
        let (relayed, frozen_msgs) = (messages("relay"), messages("freeze"));
        let (frozen, bursts) = (
            global().outbound_accounts_frozen.get(),
            alerts("outbound-burst"),
        );
        let to = rcpts(1, "example.net");
        for _ in 0..31 {
            clock.advance(Duration::from_millis(100));
            d.assess(
                "counted@example.org",
                ip("192.0.2.50"),
                "counted@example.org",
                &to,
                0,
            )
            .await;
        }
        assert!(messages("relay") >= relayed + 30);
        assert!(messages("freeze") > frozen_msgs);
        assert!(global().outbound_accounts_frozen.get() > frozen);
        assert!(alerts("outbound-burst") > bursts);
        let unfrozen = alerts("account-unfrozen");
        d.unfreeze("counted@example.org", "admin", "test")
            .await
            .unwrap();
        assert!(alerts("account-unfrozen") > unfrozen);
    }

    #[tokio::test]
    async fn an_unreachable_redis_falls_back_and_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        // Port 1 on loopback: nothing listens, the connection is refused at once.
        let cfg = OutboundConfig {
            backend: Backend::Redis,
            redis_url: "redis://127.0.0.1:1/".into(),
            ..cfg(dir.path())
        };
        let (d, clock) = detector(&cfg).await;
        assert_eq!(d.backend_status(), "redis-unavailable (local fallback)");
        let before = global().outbound_store_fallbacks.get();
        let to = rcpts(1, "example.net");
        let mut actions = Vec::new();
        for _ in 0..31 {
            clock.advance(Duration::from_millis(100));
            let a = d
                .assess(
                    "fallback@example.org",
                    ip("192.0.2.51"),
                    "fallback@example.org",
                    &to,
                    0,
                )
                .await;
            actions.push(a.action);
        }
        // Every message counted locally: the limits still hold without Redis.
        assert!(actions[..30].iter().all(Option::is_none), "{actions:?}");
        assert_eq!(actions[30], Some(OutboundAction::Freeze));
        assert!(global().outbound_store_fallbacks.get() >= before + 31);
        assert_eq!(d.frozen_accounts(), 1, "the freeze is in the local book");
    }
}
