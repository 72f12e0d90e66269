//! `mailwarden accounts list|show|freeze|unfreeze`: the outbound detector's accounts.
//!
//! With `backend = "redis"` the command works on Redis directly; every proxy sees a
//! freeze at its next message from the account (and logs it within 5 seconds).
//!
//! With `backend = "memory"` the running proxy owns the state, so the CLI never writes
//! it:
//! - `show` asks the running proxy for the account's live counters through the command
//!   spool; when the proxy does not answer, it falls back to the files and says how old
//!   the counters are;
//! - `list` reads the counters snapshot (`state_file`, at most `snapshot_interval` old;
//!   its age is shown) and the freeze file (`freeze_file`, rewritten by the proxy on
//!   every change, so current);
//! - `freeze` and `unfreeze` leave a command file in `command_dir` (written atomically);
//!   the proxy applies it within a second, records who and why, and answers with a
//!   result file the CLI waits for (`--wait`). When no answer comes (the proxy is not
//!   running), the CLI takes the command back and exits non-zero: nothing was done, and
//!   nothing happens later behind the administrator's back.

use super::clip;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Subcommand;

use crate::config::{Config, Purpose};
use crate::outbound::config::{Backend, OutboundConfig, Settings};
use crate::outbound::freeze::{self, Command, Freeze, FreezeBook, Op};
use crate::outbound::redis_store::RedisStore;
use crate::outbound::report::{self, AccountDetail, AccountSummary};
use crate::outbound::{memory, normalize};
use crate::wire::trace::iso_date;

#[derive(Subcommand, Debug)]
pub enum AccountsCommand {
    /// Tracked and frozen accounts: frozen first, then the most recently active.
    List {
        /// Only frozen accounts.
        #[arg(long)]
        frozen: bool,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// One account: counts per window, baseline, freeze and its history, login addresses.
    Show {
        account: String,
        #[arg(long)]
        json: bool,
    },
    /// Hold all further mail of ACCOUNT in quarantine until it is unfrozen.
    Freeze {
        account: String,
        #[arg(long)]
        reason: Option<String>,
        /// End the freeze by itself after DUR (e.g. 12h); default: until unfrozen.
        #[arg(long = "for", value_name = "DUR")]
        duration: Option<String>,
        /// How long to wait for the running proxy to confirm (memory backend).
        #[arg(long, default_value = "5s", value_name = "DUR")]
        wait: String,
    },
    /// Relay ACCOUNT's mail again.
    Unfreeze {
        account: String,
        #[arg(long)]
        reason: Option<String>,
        #[arg(long, default_value = "5s", value_name = "DUR")]
        wait: String,
    },
}

pub fn run(config_path: &Path, cmd: &AccountsCommand) -> ExitCode {
    let config = match Config::load_for(config_path, Purpose::Offline) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    crate::telemetry::init("warn", config.log.format);
    run_with(&config.outbound, cmd)
}

/// [`run`] on an already loaded `[outbound]` section.
pub fn run_with(cfg: &OutboundConfig, cmd: &AccountsCommand) -> ExitCode {
    let settings = match Settings::new(cfg) {
        Ok(s) => Arc::new(s),
        Err(e) => return fail(e),
    };
    match cfg.backend {
        Backend::Memory => memory_backend(&settings, cmd),
        Backend::Redis => redis_backend(settings, cmd),
    }
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("mailwarden accounts: {e}");
    ExitCode::from(1)
}

/// Who is acting, for the freeze history: `cli:` and the login name.
fn operator() -> String {
    let user = ["SUDO_USER", "USER", "LOGNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata("/proc/self")
                .map(|m| format!("uid {}", m.uid()))
                .unwrap_or_else(|_| "unknown".into())
        });
    format!("cli:{user}")
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn account_arg(a: &str) -> Result<String, String> {
    let a = normalize(a);
    if a.is_empty() || a.chars().any(char::is_control) {
        return Err("ACCOUNT must be a login or an address".into());
    }
    Ok(a)
}

fn duration_arg(flag: &str, v: &str) -> Result<Duration, String> {
    crate::config::parse_duration(v).map_err(|e| format!("{flag}: {e}"))
}

fn memory_backend(s: &Settings, cmd: &AccountsCommand) -> ExitCode {
    let cfg = &s.cfg;
    let now = now_ms();
    match cmd {
        AccountsCommand::List {
            frozen,
            limit,
            json,
        } => {
            let (snapshot, book) = match load_files(cfg) {
                Ok(v) => v,
                Err(e) => return fail(e),
            };
            let nows = now / 1000;
            let mut out: Vec<AccountSummary> = Vec::new();
            let accounts = snapshot
                .as_ref()
                .map(|(_, a)| a.as_slice())
                .unwrap_or_default();
            for (name, st) in accounts {
                out.push(report::summary(
                    s,
                    name,
                    Some(st),
                    book.frozen(name, nows),
                    now,
                ));
            }
            for (name, rec) in &book.accounts {
                if let Some(f) = rec.current.as_ref().filter(|f| f.active(nows))
                    && !accounts.iter().any(|(n, _)| n == name)
                {
                    out.push(report::summary(s, name, None, Some(f), now));
                }
            }
            memory::sort_summaries(&mut out);
            print_list(
                out,
                *frozen,
                *limit,
                *json,
                snapshot.as_ref().map(|(h, _)| h.written_at),
            );
            ExitCode::SUCCESS
        }
        AccountsCommand::Show { account, json } => {
            let account = match account_arg(account) {
                Ok(a) => a,
                Err(e) => return fail(e),
            };
            match live_detail(cfg, &account) {
                Live::Detail(d) => {
                    print_detail(&d, *json, None, &[]);
                    return ExitCode::SUCCESS;
                }
                Live::Refused(e) => return fail(e),
                Live::NoAnswer => {}
            }
            eprintln!(
                "mailwarden accounts: the proxy did not answer (not running?): showing the files it left"
            );
            let (snapshot, book) = match load_files(cfg) {
                Ok(v) => v,
                Err(e) => return fail(e),
            };
            let st = snapshot
                .as_ref()
                .and_then(|(_, a)| a.iter().find(|(n, _)| *n == account))
                .map(|(_, st)| st.clone());
            let rec = book.accounts.get(&account);
            if st.is_none() && rec.is_none() {
                return fail(format!(
                    "no account {account} (not seen since the last snapshot, never frozen)"
                ));
            }
            let d = report::detail(s, &account, st.as_ref(), rec, now);
            let pending: Vec<String> = freeze::pending(&cfg.command_dir)
                .into_iter()
                .filter_map(|(_, c)| c.ok())
                .filter(|c| normalize(&c.account) == account)
                .map(|c| format!("{:?} by {}: {}", c.op, c.by, c.why).to_lowercase())
                .collect();
            print_detail(
                &d,
                *json,
                snapshot.as_ref().map(|(h, _)| h.written_at),
                &pending,
            );
            ExitCode::SUCCESS
        }
        AccountsCommand::Freeze {
            account,
            reason,
            duration,
            wait,
        } => {
            let expires = match duration
                .as_deref()
                .map(|d| duration_arg("--for", d))
                .transpose()
            {
                Ok(d) => d.map(|d| d.as_secs()),
                Err(e) => return fail(e),
            };
            spool(cfg, Op::Freeze, account, reason.as_deref(), expires, wait)
        }
        AccountsCommand::Unfreeze {
            account,
            reason,
            wait,
        } => spool(cfg, Op::Unfreeze, account, reason.as_deref(), None, wait),
    }
}

/// How long `show` waits for the running proxy's live answer before using the files.
const LIVE_WAIT: Duration = Duration::from_secs(3);

enum Live {
    Detail(Box<AccountDetail>),
    /// The proxy answered with an error (e.g. no such account).
    Refused(String),
    NoAnswer,
}

/// The account's counters as the running proxy holds them now (memory backend).
fn live_detail(cfg: &OutboundConfig, account: &str) -> Live {
    let cmd = Command {
        op: Op::Show,
        account: account.to_string(),
        by: operator(),
        why: "show".into(),
        expires_after: None,
        at: now_ms() / 1000,
    };
    let Ok(name) = freeze::submit(&cfg.command_dir, &cmd) else {
        return Live::NoAnswer;
    };
    let result = match freeze::wait_result(&cfg.command_dir, &name, LIVE_WAIT) {
        Some(r) => r,
        None if freeze::withdraw(&cfg.command_dir, &name) => return Live::NoAnswer,
        // Taken by the proxy just now: its answer is on the way.
        None => match freeze::wait_result(&cfg.command_dir, &name, LIVE_WAIT) {
            Some(r) => r,
            None => return Live::NoAnswer,
        },
    };
    if !result.ok {
        return Live::Refused(result.message);
    }
    match serde_json::from_str::<AccountDetail>(&result.message) {
        Ok(d) => Live::Detail(Box::new(d)),
        Err(e) => Live::Refused(format!("unreadable answer from the proxy: {e}")),
    }
}

type Snapshot = Option<memory::SnapshotAccounts>;

fn load_files(cfg: &OutboundConfig) -> Result<(Snapshot, FreezeBook), String> {
    let snapshot = memory::read_accounts(&cfg.state_file)?;
    let book = FreezeBook::load(&cfg.freeze_file)?;
    Ok((snapshot, book))
}

/// Leaves a command for the running proxy and waits for its answer.
fn spool(
    cfg: &OutboundConfig,
    op: Op,
    account: &str,
    reason: Option<&str>,
    expires_after: Option<u64>,
    wait: &str,
) -> ExitCode {
    let account = match account_arg(account) {
        Ok(a) => a,
        Err(e) => return fail(e),
    };
    let wait = match duration_arg("--wait", wait) {
        Ok(w) => w,
        Err(e) => return fail(e),
    };
    let cmd = Command {
        op,
        account: account.clone(),
        by: operator(),
        why: reason.unwrap_or("no reason given").to_string(),
        expires_after,
        at: now_ms() / 1000,
    };
    let name = match freeze::submit(&cfg.command_dir, &cmd) {
        Ok(n) => n,
        Err(e) => return fail(format!("{}: {e}", cfg.command_dir.display())),
    };
    let mut answer = freeze::wait_result(&cfg.command_dir, &name, wait);
    if answer.is_none() && !freeze::withdraw(&cfg.command_dir, &name) {
        // The proxy took the command at the last moment: its answer follows shortly.
        answer = freeze::wait_result(&cfg.command_dir, &name, wait);
    }
    let what = if op == Op::Freeze {
        "freeze"
    } else {
        "unfreeze"
    };
    match answer {
        Some(r) if r.ok => {
            println!("{}", r.message);
            ExitCode::SUCCESS
        }
        Some(r) => fail(r.message),
        None => fail(format!(
            "the proxy did not answer within {}s (is it running with this configuration? command spool {}): {what} of {account} NOT done",
            wait.as_secs_f64(),
            cfg.command_dir.display()
        )),
    }
}

fn redis_backend(s: Arc<Settings>, cmd: &AccountsCommand) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(e),
    };
    rt.block_on(async move {
        let r = match RedisStore::new(s.clone()) {
            Ok(r) => r,
            Err(e) => return fail(e),
        };
        if let Err(e) = r.connect().await {
            return fail(format!("{}: {e}", r.url()));
        }
        let now = now_ms();
        match cmd {
            AccountsCommand::List {
                frozen,
                limit,
                json,
            } => match r.summaries(now).await {
                Ok(v) => {
                    print_list(v, *frozen, *limit, *json, None);
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            },
            AccountsCommand::Show { account, json } => {
                let account = match account_arg(account) {
                    Ok(a) => a,
                    Err(e) => return fail(e),
                };
                match r.detail(&account, now).await {
                    Ok(Some(d)) => {
                        print_detail(&d, *json, None, &[]);
                        ExitCode::SUCCESS
                    }
                    Ok(None) => fail(format!("no account {account}")),
                    Err(e) => fail(e),
                }
            }
            AccountsCommand::Freeze {
                account,
                reason,
                duration,
                ..
            } => {
                let account = match account_arg(account) {
                    Ok(a) => a,
                    Err(e) => return fail(e),
                };
                let until = match duration
                    .as_deref()
                    .map(|d| duration_arg("--for", d))
                    .transpose()
                {
                    Ok(d) => d.map(|d| now / 1000 + d.as_secs()),
                    Err(e) => return fail(e),
                };
                let f = Freeze {
                    since: now / 1000,
                    until,
                    by: operator(),
                    why: reason.clone().unwrap_or_else(|| "no reason given".into()),
                };
                match r.freeze(&account, &f).await {
                    Ok(true) => {
                        println!("account {account} frozen");
                        ExitCode::SUCCESS
                    }
                    Ok(false) => fail(format!("account {account} is already frozen")),
                    Err(e) => fail(e),
                }
            }
            AccountsCommand::Unfreeze {
                account, reason, ..
            } => {
                let account = match account_arg(account) {
                    Ok(a) => a,
                    Err(e) => return fail(e),
                };
                let why = reason.clone().unwrap_or_else(|| "no reason given".into());
                match r.unfreeze(&account, now / 1000, &operator(), &why).await {
                    Ok(Some(_)) => {
                        println!("account {account} unfrozen");
                        ExitCode::SUCCESS
                    }
                    Ok(None) => fail(format!("account {account} is not frozen")),
                    Err(e) => fail(e),
                }
            }
        }
    })
}

fn when(t: Option<u64>) -> String {
    t.map_or_else(|| "-".into(), iso_date)
}

fn print_list(
    mut v: Vec<AccountSummary>,
    frozen_only: bool,
    limit: usize,
    json: bool,
    snapshot_at: Option<u64>,
) {
    if frozen_only {
        v.retain(|s| s.frozen);
    }
    let total = v.len();
    v.truncate(limit);
    if json {
        println!("{}", serde_json::to_string(&v).unwrap_or_default());
        return;
    }
    let windows: Vec<String> = v
        .first()
        .map(|s| s.windows.iter().map(|w| w.window.clone()).collect())
        .unwrap_or_default();
    let mut out = format!("{:<36}  {:<19}", "ACCOUNT", "LAST SEEN (UTC)");
    for w in &windows {
        out.push_str(&format!("  {:>13}", format!("{w} MSG/RCPT")));
    }
    out.push_str(&format!("  {:>8}  {}\n", "BASE/H", "STATE"));
    for s in &v {
        out.push_str(&format!(
            "{:<36}  {:<19}",
            clip(&s.account, 36),
            when(s.last_seen)
        ));
        for w in &s.windows {
            out.push_str(&format!(
                "  {:>13}",
                format!("{}/{}", w.messages, w.recipients)
            ));
        }
        let state = if s.frozen {
            match s.frozen_until {
                Some(u) => format!("frozen until {}", iso_date(u)),
                None => "frozen".into(),
            }
        } else if s.bulk {
            "bulk".into()
        } else {
            String::new()
        };
        let base = s
            .baseline_messages_per_hour
            .map_or_else(|| "-".into(), |b| format!("{b:.1}"));
        out.push_str(&format!("  {base:>8}  {state}\n"));
    }
    out.push_str(&format!(
        "{} of {total} account{}",
        v.len(),
        if total == 1 { "" } else { "s" }
    ));
    if let Some(at) = snapshot_at {
        out.push_str(&format!(" (counters as of {} UTC)", iso_date(at)));
    }
    println!("{out}");
}

fn print_detail(d: &AccountDetail, json: bool, snapshot_at: Option<u64>, pending: &[String]) {
    if json {
        let mut v = serde_json::to_value(d).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.insert("pending_commands".into(), serde_json::json!(pending));
            if let Some(at) = snapshot_at {
                o.insert("counters_as_of".into(), serde_json::json!(at));
            }
        }
        println!("{v}");
        return;
    }
    let mut out = format!("account:      {}\n", clip(&d.account, 200));
    if let Some(p) = &d.policy {
        out.push_str(&format!(
            "policy:       [[outbound.account]] {}{}\n",
            clip(p, 100),
            if d.bulk { " (bulk)" } else { "" }
        ));
    }
    match &d.frozen {
        Some(f) => out.push_str(&format!(
            "state:        FROZEN since {} by {}{}: {}\n",
            iso_date(f.since),
            clip(&f.by, 60),
            f.until
                .map(|u| format!(" until {}", iso_date(u)))
                .unwrap_or_default(),
            clip(&f.why, 300)
        )),
        None => out.push_str("state:        relaying\n"),
    }
    for p in pending {
        out.push_str(&format!("pending:      {}\n", clip(p, 200)));
    }
    if d.tracked {
        out.push_str(&format!(
            "seen:         first {}, last {}, {} messages\n",
            when(d.created),
            when(d.last_seen),
            d.messages_total
        ));
        if let Some(at) = snapshot_at {
            let age = (now_ms() / 1000).saturating_sub(at);
            out.push_str(&format!(
                "counters as of {} UTC (snapshot, {age} s old, not live)\n",
                iso_date(at)
            ));
        }
        let lim = |v: Option<u32>| v.map_or_else(|| "-".into(), |v| v.to_string());
        for w in &d.windows {
            out.push_str(&format!(
                "  {:>4}:  {} messages (max {}), {} recipients (max {})\n",
                w.window,
                w.messages,
                lim(w.max_messages),
                w.recipients,
                lim(w.max_recipients)
            ));
        }
        out.push_str(&format!(
            "  recipient domains in {}: {} (max {})\n",
            d.recipient_domains.window,
            d.recipient_domains.domains,
            if d.recipient_domains.max == 0 {
                "-".to_string()
            } else {
                d.recipient_domains.max.to_string()
            }
        ));
        out.push_str(&format!(
            "  refused recipients in {}: {} of {} (max share {:.0}% from {} tried)\n",
            d.rejected.window,
            d.rejected.refused,
            d.rejected.tried,
            d.rejected.max_share * 100.0,
            d.rejected.min_recipients
        ));
        let b = &d.baseline;
        out.push_str(&format!(
            "  baseline: {:.1} messages/h, {:.1} recipients/h; last hour {:.0}/{:.0} (max {:.0}/{:.0}){}\n",
            b.messages_per_hour,
            b.recipients_per_hour,
            b.current_messages,
            b.current_recipients,
            b.max_messages,
            b.max_recipients,
            if b.enabled { "" } else { ", not applied" }
        ));
        for ip in &d.login_ips {
            out.push_str(&format!(
                "  login from {} first {} last {}{}\n",
                ip.ip,
                iso_date(ip.first_seen),
                iso_date(ip.last_seen),
                if ip.new { " (new address)" } else { "" }
            ));
        }
    } else {
        out.push_str("seen:         no counters (not seen recently)\n");
    }
    if !d.history.is_empty() {
        out.push_str("history:\n");
        for e in &d.history {
            out.push_str(&format!(
                "  {}  {:<8}  by {}: {}{}\n",
                iso_date(e.at),
                e.action,
                clip(&e.by, 60),
                clip(&e.why, 300),
                e.until
                    .map(|u| format!(" (until {})", iso_date(u)))
                    .unwrap_or_default()
            ));
        }
    }
    print!("{out}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::{Detector, ManualClock};
    use std::net::IpAddr;

    fn cfg(dir: &Path) -> OutboundConfig {
        OutboundConfig {
            state_file: dir.join("state.json"),
            freeze_file: dir.join("freezes.json"),
            command_dir: dir.join("commands"),
            ..Default::default()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn freeze_and_unfreeze_through_a_running_proxy() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path());
        let clock = Arc::new(ManualClock::new(now_ms()));
        let d = Arc::new(Detector::with_clock(&c, clock.clone()).await.unwrap());
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let rcpt = vec!["x@example.net".to_string()];
        d.assess("alice@example.org", ip, "alice@example.org", &rcpt, 0)
            .await;
        d.snapshot().await;
        let token = tokio_util::sync::CancellationToken::new();
        let maint = tokio::spawn(d.clone().maintain(token.clone()));

        let cli = |cmd: AccountsCommand| {
            let c = c.clone();
            tokio::task::spawn_blocking(move || run_with(&c, &cmd))
        };
        let code = cli(AccountsCommand::Freeze {
            account: "Alice@example.org".into(),
            reason: Some("phished".into()),
            duration: None,
            wait: "5s".into(),
        })
        .await
        .unwrap();
        assert_eq!(code, ExitCode::SUCCESS);
        let a = d
            .assess("alice@example.org", ip, "alice@example.org", &rcpt, 0)
            .await;
        assert!(a.frozen, "{a:?}");
        // Freezing twice is an error the CLI reports.
        let code = cli(AccountsCommand::Freeze {
            account: "alice@example.org".into(),
            reason: None,
            duration: None,
            wait: "5s".into(),
        })
        .await
        .unwrap();
        assert_eq!(code, ExitCode::from(1));
        // show/list read the files the proxy keeps current.
        let code = cli(AccountsCommand::Show {
            account: "alice@example.org".into(),
            json: true,
        })
        .await
        .unwrap();
        assert_eq!(code, ExitCode::SUCCESS);
        let book = FreezeBook::load(&c.freeze_file).unwrap();
        let f = book.frozen("alice@example.org", now_ms() / 1000).unwrap();
        assert!(f.by.starts_with("cli:"), "{}", f.by);
        assert_eq!(f.why, "phished");
        assert_eq!(
            cli(AccountsCommand::Unfreeze {
                account: "alice@example.org".into(),
                reason: Some("reset".into()),
                wait: "5s".into(),
            })
            .await
            .unwrap(),
            ExitCode::SUCCESS
        );
        assert!(
            !d.assess("alice@example.org", ip, "alice@example.org", &rcpt, 0)
                .await
                .frozen
        );
        token.cancel();
        maint.await.unwrap();
    }

    /// Issue 19: a freeze nobody applies is an error (exit 1), and it is taken back so
    /// that a later start does not apply it behind the administrator's back.
    #[test]
    fn commands_are_withdrawn_when_the_proxy_is_down() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path());
        let code = run_with(
            &c,
            &AccountsCommand::Freeze {
                account: "bob@example.org".into(),
                reason: None,
                duration: Some("2h".into()),
                wait: "100ms".into(),
            },
        );
        assert_eq!(code, ExitCode::from(1));
        assert!(freeze::pending(&c.command_dir).is_empty());
        // Nothing to show, and bad input is refused.
        let show = AccountsCommand::Show {
            account: "bob@example.org".into(),
            json: false,
        };
        assert_eq!(run_with(&c, &show), ExitCode::from(1));
        let bad = AccountsCommand::Freeze {
            account: " ".into(),
            reason: None,
            duration: None,
            wait: "1s".into(),
        };
        assert_eq!(run_with(&c, &bad), ExitCode::from(1));
        let list = AccountsCommand::List {
            frozen: false,
            limit: 10,
            json: false,
        };
        assert_eq!(run_with(&c, &list), ExitCode::SUCCESS);
    }
}
