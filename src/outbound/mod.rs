//! Outbound burst and compromised-account detection, for submission listeners.
//!
//! A leaked password shows only in the account's behaviour: SPF, DKIM and DMARC all pass
//! for the attacker's mail. So every message an account submits is counted, at the end
//! of DATA and before it is relayed, and judged against:
//!
//! - static limits per sliding window (messages and recipients counted separately),
//!   per account or group (`[[outbound.account]]`, bulk senders exempt);
//! - distinct recipient domains and the share of recipients the next hop refused;
//! - an adaptive limit, `max(floor, k × baseline)`, the baseline being the account's
//!   exponentially weighted hourly rate (new accounts start from a conservative value);
//! - tightened limits shortly after a login from an address never seen for the account;
//! - the header From the account may use (own address, own domain, aliases).
//!
//! A breach does what the policy says: alert, defer, hold, freeze (the account's mail is
//! held in quarantine from then on, until unfrozen or the freeze expires) or reject, and
//! raises one WARN `outbound burst` line (+ webhook) per account per `alert_interval`.
//! AUTH failures are counted per client (address, IPv6 /64) and per user name across
//! clients; too many block the client, or lock the name for addresses it never logged in
//! from, for a while.
//!
//! State lives behind one trait, [`store::OutboundStore`]: in memory
//! ([`store::LocalStore`] over [`memory`], snapshot to disk) or in Redis
//! ([`fallback::FallbackStore`] over [`redis_store`], shared by instances; when Redis
//! does not answer, the local counters do, and the log says so). The detector never
//! asks which. Freezes are durable before the message that caused them is answered.
//!
//! Judging is computed, then done: [`assess::judge_counts`] turns the counts into the
//! [`AccountFindings`] and a list of effects (a pure function, unit-tested without a store);
//! the detector then applies the effects (freeze, alerts) in order. The configuration is
//! `crate::config::outbound` (this module imports `config`, never the reverse).
//! Counters: `outbound_messages` by action, `outbound_accounts_frozen`,
//! `outbound_alerts` by event, `outbound_store_fallbacks`.
//!
//! ```text
//! session ─ account() / auth_allowed() / auth_result() / assess()
//!             └▶ Detector ─▶ dyn OutboundStore ─▶ Counted (Observation + AccountStatus)
//!                   │          (LocalStore | FallbackStore = Redis, else LocalStore)
//!                   └▶ judge_counts (limits + From check, pure) ─▶ AccountFindings + effects
//!                         └▶ apply: freeze (store) / alert (rate-limited by the store)
//! ```

pub(crate) mod alert;
pub(crate) mod assess;
pub(crate) mod baseline;
pub mod client;
pub mod config;
pub(crate) mod fallback;
pub(crate) mod freeze;
mod lru;
pub(crate) mod memory;
pub(crate) mod redis_store;
pub mod report;
pub(crate) mod state;
pub(crate) mod store;
pub(crate) mod window;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub use config::{Backend, OutboundAction, OutboundConfig};
pub use freeze::{Freeze, FreezeEvent};
pub use report::{AccountDetail, AccountSummary};

pub use assess::Count;
pub use store::AccountStatus;

use alert::{AlertBody, Alerter};
use assess::{Breach, Effect, bare_address, judge_counts, num};
use config::{Limits, Settings};
use fallback::FallbackStore;
use freeze::{Command, CommandResult, Op};
use state::{FailLimits, Observation, domain_hashes, fnv32, secs};
use store::{AlertKind, Failing, LocalStore, Message, OutboundStore};
#[cfg(test)]
use {assess::split_addresses, config::FromAllow, freeze::FreezeBook};

/// Command results nobody collected are removed after this long.
const RESULT_RETENTION: Duration = Duration::from_secs(3600);
/// Who freezes automatically.
pub const DETECTOR: &str = "mailwarden";

/// Flag for mail over a volume limit or from a frozen account (the quarantine reason).
pub const FLAG_BURST: &str = "outbound-burst";
/// Flag for a header From the account may not use.
pub const FLAG_FROM: &str = "outbound-from-mismatch";

/// The verdict on one submitted message.
#[derive(Debug, Clone, PartialEq)]
pub struct AccountFindings {
    /// `None`: relay normally.
    pub action: Option<OutboundAction>,
    /// Human-readable, one per signal over its limit (for logs and the quarantine entry).
    pub reasons: Vec<String>,
    /// The account is frozen (now or already): hold the message in quarantine.
    pub frozen: bool,
    /// [`FLAG_BURST`] and/or [`FLAG_FROM`].
    pub flags: Vec<&'static str>,
}

impl AccountFindings {
    pub fn relay() -> AccountFindings {
        AccountFindings {
            action: None,
            reasons: Vec::new(),
            frozen: false,
            flags: Vec::new(),
        }
    }

    /// Both verdicts on one message (sender and client): the stricter action, every
    /// reason and flag.
    fn merge(&mut self, other: AccountFindings) {
        if let Some(a) = other.action {
            self.action = Some(OutboundAction::max(self.action, a));
        }
        self.frozen |= other.frozen;
        self.reasons.extend(other.reasons);
        for f in other.flags {
            if !self.flags.contains(&f) {
                self.flags.push(f);
            }
        }
    }
}

/// Time as the detector sees it (tests drive their own).
pub trait Clock: Send + Sync {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }
}

/// A clock that moves only when told to.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    pub fn new(now_ms: u64) -> ManualClock {
        ManualClock(AtomicU64::new(now_ms))
    }
    pub fn set(&self, now_ms: u64) {
        self.0.store(now_ms, Ordering::SeqCst);
    }
    pub fn advance(&self, d: Duration) {
        self.0.fetch_add(d.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Accounts are compared case-insensitively; a client key is the host's key whichever of
/// its addresses names it (`client:2001:db8:1:2::5` is `client:2001:db8:1:2::/64`, so
/// the admin API, whose paths cannot carry a `/`, can name an IPv6 host).
pub fn normalize(account: &str) -> String {
    let a = account.trim().to_lowercase();
    match client::is_key(&a).then(|| client::parse_key(&a)).flatten() {
        Some(key) => key,
        None => a,
    }
}

/// "5 minutes", "1 minute": how long until `ms` from now, rounded up.
fn minutes(ms: u64) -> String {
    let m = ms.div_ceil(60_000).max(1);
    format!("{m} minute{}", if m == 1 { "" } else { "s" })
}

/// Counts an AUTH refused before the next hop was asked.
fn refused(reason: &'static str) {
    crate::metrics::global()
        .auth_refused
        .get_or_create(&crate::metrics::label("reason", reason))
        .inc();
}

/// The outbound detector, shared by every session. It holds one store and never asks
/// which backend is behind it (see [`store`]); each message is counted, judged from
/// its counts ([`assess::judge_counts`], pure), and only then are the effects applied.
pub struct Detector {
    s: Arc<Settings>,
    clock: Arc<dyn Clock>,
    store: Arc<dyn OutboundStore>,
    alerter: Alerter,
    /// The CLI's command spool, read by the running proxy (memory backend; with Redis
    /// the CLI works on Redis directly).
    command_dir: Option<PathBuf>,
    last_snapshot: AtomicU64,
    alerts: AtomicU64,
}

impl Detector {
    /// Loads the saved state (memory) or connects (Redis; falls back to local counters,
    /// with a WARN, when it is unreachable, and retries from [`maintain`](Self::maintain)).
    pub async fn new(cfg: &OutboundConfig) -> Result<Detector, String> {
        Self::with_clock(cfg, Arc::new(SystemClock)).await
    }

    pub async fn with_clock(
        cfg: &OutboundConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Detector, String> {
        let s = Arc::new(Settings::new(cfg)?);
        let local = LocalStore::new(s.clone());
        let mut command_dir = None;
        // The one place the backend is chosen.
        let store: Arc<dyn OutboundStore> = if !cfg.enabled {
            Arc::new(local)
        } else {
            local.load().await?;
            match cfg.backend {
                Backend::Redis => {
                    Arc::new(FallbackStore::connect(s.clone(), local, clock.clone()).await?)
                }
                Backend::Memory => {
                    // Ours (0700, this user), before a CLI run by someone else creates it.
                    if let Err(e) = freeze::mkdir_private(&cfg.command_dir) {
                        tracing::warn!(dir = %cfg.command_dir.display(), error = %e, "outbound: cannot create the command spool");
                    }
                    command_dir = Some(cfg.command_dir.clone());
                    Arc::new(local)
                }
            }
        };
        let now = clock.now_ms();
        let d = Detector {
            alerter: Alerter::new(cfg.webhook_url.as_deref()),
            store,
            clock,
            command_dir,
            last_snapshot: AtomicU64::new(now),
            alerts: AtomicU64::new(0),
            s,
        };
        d.apply_commands().await;
        Ok(d)
    }

    fn now(&self) -> u64 {
        self.clock.now_ms()
    }

    /// `memory`, `redis`, or `redis-unavailable (local fallback)`.
    pub fn backend_status(&self) -> &'static str {
        self.store.status()
    }

    /// Accounts whose counters are kept in this process (bounded by `tracked_accounts`).
    pub fn tracked_accounts(&self) -> usize {
        self.store.tracked()
    }

    /// Accounts frozen now (Redis freezes are mirrored here every few seconds).
    pub fn frozen_accounts(&self) -> usize {
        self.store.frozen_count()
    }

    /// Alerts emitted since start: `outbound burst`, `outbound from mismatch` and
    /// `auth failures` lines (each also posted to the webhook).
    pub fn alerts_sent(&self) -> u64 {
        self.alerts.load(Ordering::Relaxed)
    }

    /// Posts an alert to the webhook (and counts it by event in `outbound_alerts`).
    fn alert(&self, body: &AlertBody) {
        crate::metrics::global()
            .outbound_alerts
            .get_or_create(&crate::metrics::label("event", body.event))
            .inc();
        self.alerter.post(body);
    }

    /// The account for a submission session: the login when authenticated, else the
    /// envelope sender (`<>` for the null sender) when `ip` is in `trusted_networks`,
    /// else `None` (not tracked).
    pub fn account(&self, login: Option<&str>, ip: IpAddr, mail_from: &str) -> Option<String> {
        if !self.s.cfg.enabled {
            return None;
        }
        if let Some(l) = login.map(normalize).filter(|l| !l.is_empty()) {
            return Some(l);
        }
        if !self.s.is_trusted(ip) {
            return None;
        }
        let sender = bare_address(mail_from);
        Some(if sender.is_empty() {
            "<>".into()
        } else {
            sender
        })
    }

    /// Before accepting AUTH from `ip`: `Err(reply text)` while its host (the address,
    /// an IPv6 /64) is blocked for repeated failures (the session answers 454 4.7.0).
    pub async fn auth_allowed(&self, ip: IpAddr) -> Result<(), String> {
        let cfg = &self.s.cfg;
        if !cfg.enabled || !cfg.auth_failures.enabled || self.s.is_auth_exempt(ip) {
            return Ok(());
        }
        let now = self.now();
        match self.store.client_blocked(client::host_ip(ip), now).await {
            Some(until) => {
                refused("client");
                Err(format!(
                    "Too many failed authentications from your address, try again in {}",
                    minutes(until.saturating_sub(now))
                ))
            }
            None => Ok(()),
        }
    }

    /// Once the user name is known, before the next hop is asked: `Err(reply text)` while
    /// `username` is locked (a spray against it from many addresses) and `ip` is not one
    /// of the account's known login hosts.
    ///
    /// Why not lock the name everywhere: the attacker chooses whom to spray, so a lock
    /// that refuses the real user hands them a denial of service against any account.
    /// The account's own login addresses (remembered per `new_ip.remember`) keep working;
    /// a real user on a new network waits `user_block`, or logs in from a known one.
    pub async fn auth_user_allowed(&self, ip: IpAddr, username: &str) -> Result<(), String> {
        let cfg = &self.s.cfg;
        let f = &cfg.auth_failures;
        if !cfg.enabled || !f.enabled || f.max_failures_per_user == 0 || self.s.is_auth_exempt(ip) {
            return Ok(());
        }
        let now = self.now();
        let Some(until) = self.store.user_locked(fnv32(username.trim()), now).await else {
            return Ok(());
        };
        if self.store.known_login(&normalize(username), ip, now).await {
            return Ok(());
        }
        refused("user");
        Err(format!(
            "Too many failed authentications for this user name from other addresses, try again in {}",
            minutes(until.saturating_sub(now))
        ))
    }

    /// After an AUTH exchange (`success`: the next hop said 235). Failures count per
    /// client host and per user name (both only as hashes of the name); a breach blocks
    /// the host, or locks the name (see [`auth_user_allowed`](Self::auth_user_allowed)),
    /// and raises one alert. A success records the login address for the account.
    pub async fn auth_result(&self, ip: IpAddr, username: &str, success: bool) {
        let cfg = &self.s.cfg;
        if !cfg.enabled {
            return;
        }
        let now = self.now();
        if success {
            let account = normalize(username);
            if !account.is_empty() {
                self.store.login(&account, ip, now).await;
            }
            return;
        }
        let f = &cfg.auth_failures;
        if !f.enabled || self.s.is_auth_exempt(ip) {
            return;
        }
        let host = client::host_ip(ip);
        let user = fnv32(username.trim());
        self.client_failure(host, user, now).await;
        if f.max_failures_per_user > 0 {
            self.user_failure(username, user, host, now).await;
        }
    }

    /// Counts one AUTH failure of `who`; when it blocks the client or locks the name,
    /// counts that (`alerts_sent`, `auth_failure_blocks{kind}`) and returns
    /// (failures, distinct others) for the alert.
    async fn count_failure(
        &self,
        who: Failing,
        other: u32,
        now: u64,
        l: FailLimits,
    ) -> Option<(u32, u32)> {
        let hit = self.store.failure(who, other, now, l).await?;
        self.alerts.fetch_add(1, Ordering::Relaxed);
        let kind = match who {
            Failing::Client(_) => "client",
            Failing::User(_) => "user",
        };
        crate::metrics::global()
            .auth_failure_blocks
            .get_or_create(&crate::metrics::label("kind", kind))
            .inc();
        Some(hit)
    }

    /// One failure from `host` (blocks it past the client limits).
    async fn client_failure(&self, host: IpAddr, user: u32, now: u64) {
        let f = &self.s.cfg.auth_failures;
        let l = FailLimits {
            window: f.window.as_secs() as u32,
            max_failures: f.max_failures,
            max_usernames: f.max_usernames,
            block: f.block.as_secs() as u32,
        };
        let blocked = self.count_failure(Failing::Client(host), user, now, l);
        let Some((failures, usernames)) = blocked.await else {
            return;
        };
        tracing::warn!(
            client = %client::host_part(host),
            failures,
            usernames,
            window = %config::label(f.window),
            max_failures = f.max_failures,
            max_usernames = f.max_usernames,
            block = %config::label(f.block),
            "auth failures: client blocked"
        );
        self.alert(&AlertBody {
            event: "auth-failures",
            at: u64::from(secs(now)),
            account: None,
            client: Some(client::host_part(host)),
            action: Some("block"),
            signals: vec![
                format!("failures={failures}"),
                format!("usernames={usernames}"),
            ],
            thresholds: vec![
                format!("failures={}", f.max_failures),
                format!("usernames={}", f.max_usernames),
            ],
            reasons: vec![format!("blocked for {}", config::label(f.block))],
        });
    }

    /// One failure for `username` (hashed `user`) from `host`, whatever the host: locks
    /// the name past `max_failures_per_user`.
    async fn user_failure(&self, username: &str, user: u32, host: IpAddr, now: u64) {
        let f = &self.s.cfg.auth_failures;
        let l = FailLimits {
            window: f.window.as_secs() as u32,
            max_failures: f.max_failures_per_user,
            // The "user names" of this count are the hosts: not limited, reported.
            max_usernames: u32::MAX,
            block: f.user_block.as_secs() as u32,
        };
        let host_hash = fnv32(&client::host_part(host));
        let locked = self.count_failure(Failing::User(user), host_hash, now, l);
        let Some((failures, hosts)) = locked.await else {
            return;
        };
        // The name as typed is logged (the session's own line already shows it): the
        // administrator needs to know which account is under attack.
        let account = normalize(username);
        tracing::warn!(
            user = %account,
            failures,
            clients = hosts,
            window = %config::label(f.window),
            max_failures_per_user = f.max_failures_per_user,
            block = %config::label(f.user_block),
            "auth failures: user name locked"
        );
        self.alert(&AlertBody {
            event: "auth-user-locked",
            at: u64::from(secs(now)),
            account: Some(account),
            client: None,
            action: Some("lock"),
            signals: vec![format!("failures={failures}"), format!("clients={hosts}")],
            thresholds: vec![format!("failures={}", f.max_failures_per_user)],
            reasons: vec![format!(
                "AUTH as this name refused from addresses it never logged in from, for {}",
                config::label(f.user_block)
            )],
        });
    }

    /// One message at the end of DATA, before relaying: counts it in every window and
    /// judges the static and adaptive limits and the From policy.
    pub async fn assess(
        &self,
        account: &str,
        ip: IpAddr,
        header_from: &str,
        rcpts: &[String],
        rejected_rcpts: usize,
    ) -> AccountFindings {
        self.assess_as(account, None, ip, header_from, rcpts, rejected_rcpts)
            .await
    }

    /// The client key (`client:ADDRESS`, `client:PREFIX/64`) a session without AUTH is
    /// counted under besides its envelope sender; `None` for a login (the login is what
    /// the attacker cannot rotate) or when `[outbound.client]` is off.
    pub fn client_account(&self, login: Option<&str>, ip: IpAddr) -> Option<String> {
        let c = &self.s.cfg;
        if !c.enabled || !c.client.enabled || !self.s.is_trusted(ip) {
            return None;
        }
        if login.is_some_and(|l| !normalize(l).is_empty()) {
            return None;
        }
        Some(client::key(ip))
    }

    /// [`assess`](Self::assess), the message also counted for `client` (the key of
    /// [`client_account`](Self::client_account)) under the client limits, the envelope
    /// sender `account` being one of the client's distinct senders. The stricter of the
    /// two verdicts wins: a host rotating senders trips its own limits, a sender spread
    /// over many hosts trips the sender's.
    pub async fn assess_as(
        &self,
        account: &str,
        client: Option<&str>,
        ip: IpAddr,
        header_from: &str,
        rcpts: &[String],
        rejected_rcpts: usize,
    ) -> AccountFindings {
        let message = (header_from, rcpts, rejected_rcpts);
        self.assess_keys(account, client, ip, message, None).await
    }

    /// [`assess_as`](Self::assess_as), with the counters the limits read for each key
    /// (the account, then the client), whatever the verdict: what the outbound stage
    /// saw, for the trace and the decision log. (Building them costs a few allocations,
    /// which `assess_as` does not pay.)
    pub async fn assess_counted(
        &self,
        account: &str,
        client: Option<&str>,
        ip: IpAddr,
        header_from: &str,
        rcpts: &[String],
        rejected_rcpts: usize,
    ) -> (AccountFindings, Vec<Count>) {
        let mut counts = Vec::new();
        let message = (header_from, rcpts, rejected_rcpts);
        let a = self
            .assess_keys(account, client, ip, message, Some(&mut counts))
            .await;
        (a, counts)
    }

    /// The work of [`assess_as`](Self::assess_as); the counters read are added to
    /// `counts` when given.
    async fn assess_keys(
        &self,
        account: &str,
        client: Option<&str>,
        ip: IpAddr,
        (header_from, rcpts, rejected_rcpts): (&str, &[String], usize),
        mut counts: Option<&mut Vec<Count>>,
    ) -> AccountFindings {
        if !self.s.cfg.enabled {
            return AccountFindings::relay();
        }
        let account = normalize(account);
        let limits = self.s.limits_for(&account);
        let domains = if limits.distinct_cap() == 0 {
            Vec::new()
        } else {
            domain_hashes(rcpts)
        };
        let mut m = Message {
            now_ms: self.now(),
            ip,
            rcpts: u32::try_from(rcpts.len()).unwrap_or(u32::MAX),
            rejected: u32::try_from(rejected_rcpts).unwrap_or(u32::MAX),
            distinct: &domains,
        };
        let (mut out, obs) = self.judge(&account, &m, Some(header_from), limits).await;
        if let Some(c) = counts.as_deref_mut() {
            assess::counts(&self.s, limits, &account, &obs, c);
        }
        if let Some(client) = client {
            // Already in key form (`client_account`): not normalised again, this runs
            // for every message of a trusted client.
            let client = client.trim();
            let limits = self.s.limits_for(client);
            let senders = [fnv32(&account)];
            m.distinct = if limits.distinct_cap() == 0 {
                &[]
            } else {
                &senders
            };
            m.now_ms = self.now();
            let (c, obs) = self.judge(client, &m, None, limits).await;
            out.merge(c);
            if let Some(c) = counts {
                assess::counts(&self.s, limits, client, &obs, c);
            }
        }
        crate::metrics::global()
            .outbound_messages
            .get_or_create(&crate::metrics::label(
                "action",
                out.action.map_or("relay", OutboundAction::as_str),
            ))
            .inc();
        out
    }

    /// Counts one message for one key (an account or a client) and judges it against
    /// `limits` (`header_from` is checked when given); then applies what the judgement
    /// calls for.
    async fn judge(
        &self,
        key: &str,
        m: &Message<'_>,
        header_from: Option<&str>,
        limits: &Limits,
    ) -> (AccountFindings, Observation) {
        let counted = self.store.record(key, m, limits).await;
        let findings = judge_counts(&self.s, limits, key, &counted.obs, header_from);
        for effect in findings.effects {
            self.apply(key, m, counted.shared, effect).await;
        }
        (findings.assessment, counted.obs)
    }

    /// One effect of an assessment: the automatic freeze (durable before the message is
    /// answered), or an alert (at most one per kind and key per `alert_interval`).
    async fn apply(&self, key: &str, m: &Message<'_>, shared: bool, effect: Effect) {
        match effect {
            Effect::Freeze { why } => {
                let _ = self.freeze_auto(key, &why).await;
            }
            Effect::BurstAlert { action, breaches } => {
                if self
                    .store
                    .alert_due(key, AlertKind::Burst, m.now_ms, shared)
                    .await
                {
                    self.burst_alert(key, m, action, &breaches);
                }
            }
            Effect::FromAlert { action, why } => {
                if self
                    .store
                    .alert_due(key, AlertKind::From, m.now_ms, shared)
                    .await
                {
                    self.alerts.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(account = %key, client = %m.ip, action = action.as_str(), reason = %why, "outbound from mismatch");
                    self.alert(&AlertBody {
                        event: "from-mismatch",
                        at: u64::from(secs(m.now_ms)),
                        account: Some(key.to_string()),
                        client: Some(m.ip.to_string()),
                        action: Some(action.as_str()),
                        signals: vec![],
                        thresholds: vec![],
                        reasons: vec![why],
                    });
                }
            }
        }
    }

    fn burst_alert(
        &self,
        account: &str,
        m: &Message<'_>,
        action: OutboundAction,
        breaches: &[Breach],
    ) {
        self.alerts.fetch_add(1, Ordering::Relaxed);
        let signals: Vec<String> = breaches
            .iter()
            .map(|b| format!("{}={}", b.signal, num(b.value)))
            .collect();
        let thresholds: Vec<String> = breaches
            .iter()
            .map(|b| format!("{}={}", b.signal, num(b.limit)))
            .collect();
        tracing::warn!(
            account = %account,
            client = %m.ip,
            action = action.as_str(),
            signals = %signals.join(" "),
            thresholds = %thresholds.join(" "),
            backend = self.backend_status(),
            "outbound burst"
        );
        self.alert(&AlertBody {
            event: "outbound-burst",
            at: u64::from(secs(m.now_ms)),
            account: Some(account.to_string()),
            client: Some(m.ip.to_string()),
            action: Some(action.as_str()),
            signals,
            thresholds,
            reasons: breaches.iter().map(|b| b.text.clone()).collect(),
        });
    }

    async fn freeze_auto(&self, account: &str, why: &str) -> Result<bool, String> {
        let until = self
            .s
            .cfg
            .freeze_expiry
            .map(|d| u64::from(secs(self.now())) + d.as_secs());
        self.freeze_until(account, DETECTOR, why, until).await
    }

    /// Freezes `account` until an administrator unfreezes it. `Err` when it already is
    /// frozen.
    pub async fn freeze(&self, account: &str, by: &str, why: &str) -> Result<(), String> {
        self.freeze_for(account, by, why, None).await
    }

    /// Freezes `account`, for `duration` or (`None`) until unfrozen.
    pub async fn freeze_for(
        &self,
        account: &str,
        by: &str,
        why: &str,
        duration: Option<Duration>,
    ) -> Result<(), String> {
        let account = normalize(account);
        if account.is_empty() {
            return Err("no account given".into());
        }
        let until = duration.map(|d| u64::from(secs(self.now())) + d.as_secs());
        match self.freeze_until(&account, by, why, until).await? {
            true => Ok(()),
            false => Err(format!("account {account} is already frozen")),
        }
    }

    /// Freezes (durably, before returning); true when the account was not frozen.
    async fn freeze_until(
        &self,
        account: &str,
        by: &str,
        why: &str,
        until: Option<u64>,
    ) -> Result<bool, String> {
        let f = Freeze {
            since: u64::from(secs(self.now())),
            until,
            by: by.to_string(),
            why: why.to_string(),
        };
        let changed = self.store.freeze(account, &f).await;
        if changed {
            crate::metrics::global().outbound_accounts_frozen.inc();
            tracing::warn!(
                account = %account,
                by = %f.by,
                why = %f.why,
                until = %f.until.map(crate::wire::trace::iso_date).unwrap_or_else(|| "unfrozen".into()),
                "outbound account frozen"
            );
            self.alert(&AlertBody {
                event: "account-frozen",
                at: f.since,
                account: Some(account.to_string()),
                client: None,
                action: Some("freeze"),
                signals: vec![],
                thresholds: vec![],
                reasons: vec![format!("by {}: {}", f.by, f.why)],
            });
        }
        Ok(changed)
    }

    /// Unfreezes `account`. `Err` when it is not frozen.
    pub async fn unfreeze(&self, account: &str, by: &str, why: &str) -> Result<(), String> {
        let account = normalize(account);
        let at = u64::from(secs(self.now()));
        let Some(f) = self.store.unfreeze(&account, at, by, why).await else {
            return Err(format!("account {account} is not frozen"));
        };
        tracing::warn!(account = %account, by = %by, why = %why, frozen_by = %f.by, "outbound account unfrozen");
        self.alert(&AlertBody {
            event: "account-unfrozen",
            at,
            account: Some(account.clone()),
            client: None,
            action: Some("unfreeze"),
            signals: vec![],
            thresholds: vec![],
            reasons: vec![format!("by {by}: {why}")],
        });
        Ok(())
    }

    /// Every tracked or frozen account, frozen first, then most recently active first.
    pub async fn accounts(&self) -> Vec<AccountSummary> {
        self.store.summaries(self.now()).await
    }

    /// Counters per window, baseline, freeze and its history, recent login addresses.
    pub async fn account_detail(&self, account: &str) -> Option<AccountDetail> {
        self.store.detail(&normalize(account), self.now()).await
    }

    /// Periodic work until `shutdown`: commands from the CLI, freeze expiry, Redis
    /// reconnection and freeze sync, the counters snapshot (also written at the end).
    pub async fn maintain(self: Arc<Self>, shutdown: CancellationToken) {
        if !self.s.cfg.enabled {
            return;
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            self.maintain_once().await;
        }
        self.snapshot().await;
    }

    /// One round of [`maintain`](Self::maintain)'s work.
    pub async fn maintain_once(&self) {
        let now = self.now();
        self.apply_commands().await;
        for (account, f) in self.store.maintain(now).await {
            self.expiry_alert(&account, &f);
        }
        let interval = self.s.cfg.snapshot_interval.as_millis() as u64;
        if now.saturating_sub(self.last_snapshot.load(Ordering::SeqCst)) >= interval {
            self.snapshot().await;
        }
    }

    fn expiry_alert(&self, account: &str, f: &Freeze) {
        tracing::warn!(account = %account, by = %f.by, why = %f.why, "outbound freeze expired");
        self.alert(&AlertBody {
            event: "freeze-expired",
            at: f.until.unwrap_or_default(),
            account: Some(account.to_string()),
            client: None,
            action: None,
            signals: vec![],
            thresholds: vec![],
            reasons: vec![format!("frozen by {}: {}", f.by, f.why)],
        });
    }

    /// Writes the counters snapshot now, if anything changed since the last one.
    pub async fn snapshot(&self) {
        let now = self.now();
        self.last_snapshot.store(now, Ordering::SeqCst);
        if self.s.cfg.enabled {
            self.store.snapshot(now).await;
        }
    }

    /// Applies the CLI's commands waiting in `command_dir` (memory backend).
    async fn apply_commands(&self) {
        let Some(dir) = self.command_dir.clone() else {
            return;
        };
        let pending = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || {
                freeze::clean_results(&dir, RESULT_RETENTION);
                freeze::pending(&dir)
            })
            .await
            .unwrap_or_default()
        };
        for (name, cmd) in pending {
            let result = match cmd {
                Ok(cmd) => self.apply_command(&cmd).await,
                Err(e) => CommandResult {
                    ok: false,
                    message: format!("unreadable command: {e}"),
                },
            };
            if let Err(e) = freeze::complete(&dir, &name, &result) {
                tracing::error!(dir = %dir.display(), command = %name, error = %e, "outbound: cannot complete command");
            }
        }
    }

    async fn apply_command(&self, cmd: &Command) -> CommandResult {
        let account = normalize(&cmd.account);
        let r = match cmd.op {
            Op::Freeze => self
                .freeze_for(
                    &account,
                    &cmd.by,
                    &cmd.why,
                    cmd.expires_after.map(Duration::from_secs),
                )
                .await
                .map(|()| format!("account {account} frozen")),
            Op::Unfreeze => self
                .unfreeze(&account, &cmd.by, &cmd.why)
                .await
                .map(|()| format!("account {account} unfrozen")),
            Op::Show => match self.account_detail(&account).await {
                Some(d) => serde_json::to_string(&d).map_err(|e| e.to_string()),
                None => Err(format!("no account {account}")),
            },
        };
        match r {
            Ok(message) => CommandResult { ok: true, message },
            Err(message) => CommandResult { ok: false, message },
        }
    }
}

#[cfg(test)]
mod tests;
