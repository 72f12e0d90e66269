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
//! State lives in memory ([`memory`], snapshot to disk) or in Redis ([`redis_store`],
//! shared by instances; when unreachable the local counters take over and the log says
//! so). Freezes are durable before the message that caused them is answered.
//!
//! ```text
//! session ─ account() / auth_allowed() / auth_result() / assess()
//!             └▶ Detector ─▶ store (memory | redis, memory as fallback) ─▶ Observation
//!                   └▶ limits (evaluate) + From check ─▶ Assessment ─▶ freeze / alert
//! ```

pub(crate) mod alert;
pub(crate) mod baseline;
pub mod client;
pub mod config;
pub(crate) mod freeze;
mod lru;
pub(crate) mod memory;
pub(crate) mod redis_store;
pub mod report;
pub(crate) mod state;
pub(crate) mod window;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub use config::{Backend, OutboundAction, OutboundConfig};
pub use freeze::{Freeze, FreezeEvent};
pub use report::{AccountDetail, AccountSummary};

use alert::{AlertBody, Alerter};
use config::{FromAllow, Limits, Settings};
use freeze::{Command, CommandResult, FreezeBook, Op};
use memory::MemoryStore;
use redis_store::{RedisFailure, RedisStore};
use state::{FailLimits, Observation, domain_hashes, fnv32, secs};

/// How often the freezes in force are read back from Redis (and expiries recorded).
const REDIS_SYNC_INTERVAL: Duration = Duration::from_secs(5);
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
pub struct Assessment {
    /// `None`: relay normally.
    pub action: Option<OutboundAction>,
    /// Human-readable, one per signal over its limit (for logs and the quarantine entry).
    pub reasons: Vec<String>,
    /// The account is frozen (now or already): hold the message in quarantine.
    pub frozen: bool,
    /// [`FLAG_BURST`] and/or [`FLAG_FROM`].
    pub flags: Vec<&'static str>,
}

impl Assessment {
    pub fn relay() -> Assessment {
        Assessment {
            action: None,
            reasons: Vec::new(),
            frozen: false,
            flags: Vec::new(),
        }
    }

    /// Both verdicts on one message (sender and client): the stricter action, every
    /// reason and flag.
    fn merge(&mut self, other: Assessment) {
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

/// A freeze or unfreeze made while Redis was unreachable, replayed when it is back.
#[derive(Debug, Clone)]
enum PendingOp {
    Freeze(String, Freeze),
    Unfreeze {
        account: String,
        at: u64,
        by: String,
        why: String,
    },
}

/// One signal over its limit.
#[derive(Debug, Clone)]
struct Breach {
    /// `recipients_1m`, `messages_rate_1h`, `domains_1h`, `rejected_share_1h`.
    signal: String,
    value: f64,
    limit: f64,
    text: String,
}

/// Shows a count or limit without noise: integers as such, others with one decimal.
fn num(x: f64) -> String {
    if (x - x.round()).abs() < 0.05 {
        format!("{}", x.round() as i64)
    } else {
        format!("{x:.1}")
    }
}

/// The volume limits `obs` exceeds. Texts are built only for a breach: this runs for
/// every message.
fn evaluate(s: &Settings, limits: &Limits, obs: &Observation) -> Vec<Breach> {
    let mut out = Vec::new();
    let factor = match obs.new_ip_age {
        Some(_) if s.cfg.new_ip.enabled => s.cfg.new_ip.factor,
        _ => 1.0,
    };
    fn over(
        out: &mut Vec<Breach>,
        value: f64,
        limit: f64,
        name: impl FnOnce() -> (String, String),
    ) {
        if value > limit + 1e-9 {
            let (signal, text) = name();
            out.push(Breach {
                text: format!("{text}: {} > {}", num(value), num(limit)),
                signal,
                value,
                limit,
            });
        }
    }
    for (i, &(max_m, max_r)) in limits.windows.iter().enumerate() {
        let (m, r) = obs.windows[i];
        if let Some(max) = max_m {
            over(&mut out, m, f64::from(max) * factor, || {
                let label = &s.rings[i].label;
                (format!("messages_{label}"), format!("messages in {label}"))
            });
        }
        if let Some(max) = max_r {
            over(&mut out, r, f64::from(max) * factor, || {
                let label = &s.rings[i].label;
                (
                    format!("recipients_{label}"),
                    format!("recipients in {label}"),
                )
            });
        }
    }
    if limits.max_domains > 0 {
        over(
            &mut out,
            f64::from(obs.domains),
            f64::from(limits.max_domains) * factor,
            || {
                let label = config::label(s.cfg.recipient_domains_window);
                if limits.client {
                    (
                        format!("senders_{label}"),
                        format!("distinct envelope senders in {label}"),
                    )
                } else {
                    (
                        format!("domains_{label}"),
                        format!("recipient domains in {label}"),
                    )
                }
            },
        );
    }
    let (tried, refused) = obs.rejected;
    if tried >= f64::from(s.cfg.rejected_min_recipients) && tried > 0.0 {
        let share = refused / tried;
        if share > limits.max_rejected_share + 1e-9 {
            let label = &s.rings[s.windows()].label;
            out.push(Breach {
                signal: format!("rejected_share_{label}"),
                value: share,
                limit: limits.max_rejected_share,
                text: format!(
                    "recipients refused by the next hop in {label}: {:.0}% > {:.0}% ({} of {})",
                    share * 100.0,
                    limits.max_rejected_share * 100.0,
                    num(refused),
                    num(tried)
                ),
            });
        }
    }
    if limits.adaptive {
        let a = &s.cfg.adaptive;
        let (bm, br) = obs.baseline;
        let (rm, rr) = obs.rate;
        let how = |floor: f64, base: f64| {
            format!(
                " (max of floor {} and {} × baseline {base:.1}/h)",
                num(floor),
                num(a.k)
            )
        };
        over(
            &mut out,
            rm,
            a.floor_messages.max(a.k * bm) * factor,
            || {
                (
                    "messages_rate_1h".into(),
                    "messages in the last hour".into(),
                )
            },
        );
        if let Some(b) = out.last_mut().filter(|b| b.signal == "messages_rate_1h") {
            b.text.push_str(&how(a.floor_messages, bm));
        }
        over(
            &mut out,
            rr,
            a.floor_recipients.max(a.k * br) * factor,
            || {
                (
                    "recipients_rate_1h".into(),
                    "recipients in the last hour".into(),
                )
            },
        );
        if let Some(b) = out.last_mut().filter(|b| b.signal == "recipients_rate_1h") {
            b.text.push_str(&how(a.floor_recipients, br));
        }
    }
    if factor < 1.0
        && !out.is_empty()
        && let Some(age) = obs.new_ip_age
    {
        out.push(Breach {
            signal: "new_login_address".into(),
            value: f64::from(age),
            limit: s.cfg.new_ip.window.as_secs_f64(),
            text: format!(
                "limits × {} after a login from a new address {} min ago",
                s.cfg.new_ip.factor,
                age / 60
            ),
        });
    }
    out
}

/// The address inside `Name <addr>` (or the text itself), lower-cased.
fn bare_address(s: &str) -> String {
    let s = s.trim();
    let inner = match (s.rfind('<'), s.rfind('>')) {
        (Some(a), Some(b)) if a < b => &s[a + 1..b],
        _ => s,
    };
    inner.trim().to_lowercase()
}

/// The mailboxes of an address list: split at commas outside quotes and `<>`.
fn split_addresses(s: &str) -> Vec<&str> {
    let (mut out, mut start, mut quoted, mut angle) = (Vec::new(), 0, false, false);
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '<' if !quoted => angle = true,
            '>' if !quoted => angle = false,
            ',' if !quoted && !angle => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn domain_of(addr: &str) -> Option<&str> {
    addr.rsplit_once('@')
        .map(|(_, d)| d.trim_end_matches('.'))
        .filter(|d| !d.is_empty())
}

/// Why `header_from` is not allowed for `account`, if it is not.
fn from_mismatch(
    s: &Settings,
    limits: &Limits,
    account: &str,
    header_from: &str,
) -> Option<String> {
    if limits.from_allow == FromAllow::Any {
        return None;
    }
    let own = if account.contains('@') {
        account.to_string()
    } else {
        // No own address, nothing to compare with: not checked.
        format!(
            "{account}@{}",
            s.cfg.from.login_domain.as_deref()?.to_lowercase()
        )
    };
    let own_domain = domain_of(&own)?;
    let addresses: Vec<String> = split_addresses(header_from)
        .into_iter()
        .map(bare_address)
        .filter(|a| !a.is_empty())
        .collect();
    if addresses.is_empty() {
        return Some(format!(
            "message has no header From address (account {account})"
        ));
    }
    for from in &addresses {
        let from_domain = domain_of(from).unwrap_or("");
        let ok = *from == own
            || (limits.from_allow == FromAllow::Domain
                && from_domain.eq_ignore_ascii_case(own_domain))
            || limits
                .from_aliases
                .iter()
                .any(|a| match a.strip_prefix('@') {
                    Some(d) => from_domain == d,
                    None => a == from,
                });
        if !ok {
            return Some(format!(
                "header From {from} is not allowed for account {account}"
            ));
        }
    }
    None
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The outbound detector, shared by every session.
pub struct Detector {
    s: Arc<Settings>,
    clock: Arc<dyn Clock>,
    local: Arc<MemoryStore>,
    redis: Option<RedisStore>,
    alerter: Alerter,
    pending: Mutex<Vec<PendingOp>>,
    /// Serialises `freeze_file` writes; the freeze-book version last written.
    written: Arc<Mutex<u64>>,
    /// Bumped on every change of the local freeze book.
    version: AtomicU64,
    last_snapshot: AtomicU64,
    last_redis_try: AtomicU64,
    last_redis_sync: AtomicU64,
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
        let local = Arc::new(MemoryStore::new(s.clone()));
        let now = clock.now_ms();
        let mut d = Detector {
            alerter: Alerter::new(cfg.webhook_url.as_deref()),
            local,
            redis: None,
            clock,
            pending: Mutex::new(Vec::new()),
            written: Arc::new(Mutex::new(0)),
            version: AtomicU64::new(0),
            last_snapshot: AtomicU64::new(now),
            last_redis_try: AtomicU64::new(now),
            last_redis_sync: AtomicU64::new(0),
            alerts: AtomicU64::new(0),
            s,
        };
        if !cfg.enabled {
            return Ok(d);
        }
        let book = FreezeBook::load(&cfg.freeze_file)?;
        d.local.with_freezes(|b| *b = book);
        let (path, local) = (cfg.state_file.clone(), d.local.clone());
        let loaded = tokio::task::spawn_blocking(move || local.load_snapshot(&path))
            .await
            .map_err(|e| e.to_string())?;
        match loaded {
            Ok(n) if n > 0 => {
                tracing::info!(accounts = n, file = %cfg.state_file.display(), "outbound: counters restored")
            }
            Ok(_) => {}
            Err(e) => {
                let aside = cfg.state_file.with_extension("corrupt");
                let _ = std::fs::rename(&cfg.state_file, &aside);
                tracing::warn!(error = %e, moved_to = %aside.display(), "outbound: unreadable snapshot set aside; counters start from zero");
            }
        }
        if cfg.backend == Backend::Redis {
            let r = RedisStore::new(d.s.clone())?;
            match r.connect().await {
                Ok(()) => tracing::info!(redis = %r.url(), "outbound: shared state in redis"),
                Err(e) => {
                    tracing::warn!(redis = %r.url(), error = %e, "outbound: redis unreachable, using local counters until it is back")
                }
            }
            d.redis = Some(r);
            d.sync_redis().await;
        } else {
            // Ours (0700, this user), before a CLI run by someone else creates it.
            if let Err(e) = freeze::mkdir_private(&cfg.command_dir) {
                tracing::warn!(dir = %cfg.command_dir.display(), error = %e, "outbound: cannot create the command spool");
            }
            d.apply_commands().await;
        }
        Ok(d)
    }

    fn now(&self) -> u64 {
        self.clock.now_ms()
    }

    /// `memory`, `redis`, or `redis-unavailable (local fallback)`.
    pub fn backend_status(&self) -> &'static str {
        match &self.redis {
            None => "memory",
            Some(r) if r.is_up() => "redis",
            Some(_) => "redis-unavailable (local fallback)",
        }
    }

    /// Accounts whose counters are kept in this process (bounded by `tracked_accounts`).
    pub fn tracked_accounts(&self) -> usize {
        self.local.tracked()
    }

    /// Accounts frozen now (Redis freezes are mirrored here every few seconds).
    pub fn frozen_accounts(&self) -> usize {
        self.local.frozen_count()
    }

    /// Alerts emitted since start: `outbound burst`, `outbound from mismatch` and
    /// `auth failures` lines (each also posted to the webhook).
    pub fn alerts_sent(&self) -> u64 {
        self.alerts.load(Ordering::Relaxed)
    }

    /// Redis failed (the store logged the outage when it began): the caller falls back;
    /// reconnection is tried from `maintain` after `redis_retry`.
    fn redis_failed(&self, e: &RedisFailure) {
        let Some(r) = &self.redis else { return };
        match e {
            RedisFailure::Down(_) => self.last_redis_try.store(self.now(), Ordering::SeqCst),
            RedisFailure::Failed(_) => tracing::warn!(
                redis = %r.url(),
                error = %e,
                "outbound: redis command failed, local counters used for this message"
            ),
        }
    }

    fn redis_up(&self) -> Option<&RedisStore> {
        self.redis.as_ref().filter(|r| r.is_up())
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
        let host = client::host_ip(ip);
        let now = self.now();
        let until_ms = match self.redis_up() {
            Some(r) => match r.blocked(host, now).await {
                Ok(u) => u,
                Err(e) => {
                    self.redis_failed(&e);
                    self.local.blocked(host, now).map(|s| u64::from(s) * 1000)
                }
            },
            None => self.local.blocked(host, now).map(|s| u64::from(s) * 1000),
        };
        match until_ms {
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
        let user = fnv32(username.trim());
        let local = self
            .local
            .user_locked(user, now)
            .map(|s| u64::from(s) * 1000);
        let until_ms = match self.redis_up() {
            Some(r) => match r.user_locked(user, now).await {
                Ok(u) => u,
                Err(e) => {
                    self.redis_failed(&e);
                    local
                }
            },
            None => local,
        };
        let Some(until) = until_ms else {
            return Ok(());
        };
        let account = normalize(username);
        if self.known_login(&account, ip, now).await {
            return Ok(());
        }
        refused("user");
        Err(format!(
            "Too many failed authentications for this user name from other addresses, try again in {}",
            minutes(until.saturating_sub(now))
        ))
    }

    /// Whether `account` logged in from the host of `ip` before (here, or for Redis on
    /// any instance).
    async fn known_login(&self, account: &str, ip: IpAddr, now: u64) -> bool {
        if self.local.known_login(account, ip) {
            return true;
        }
        let Some(r) = self.redis_up() else {
            return false;
        };
        match r.detail(account, now).await {
            Ok(Some(d)) => d.login_ips.iter().any(|k| {
                k.ip.parse::<IpAddr>()
                    .is_ok_and(|known| client::same_host(known, ip))
            }),
            Ok(None) => false,
            Err(e) => {
                self.redis_failed(&e);
                false
            }
        }
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
            if account.is_empty() {
                return;
            }
            self.local.login(&account, ip, now);
            if let Some(r) = self.redis_up()
                && let Err(e) = r.login(&account, ip, now).await
            {
                self.redis_failed(&e);
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

    /// One failure from `host` (blocks it past the client limits).
    async fn client_failure(&self, host: IpAddr, user: u32, now: u64) {
        let f = &self.s.cfg.auth_failures;
        let l = FailLimits {
            window: f.window.as_secs() as u32,
            max_failures: f.max_failures,
            max_usernames: f.max_usernames,
            block: f.block.as_secs() as u32,
        };
        let local = self.local.auth_failure(host, user, now, l);
        let blocked = match self.redis_up() {
            Some(r) => match r.auth_failure(host, user, now, l).await {
                Ok(b) => {
                    if b.is_some() {
                        self.local.block(host, secs(now).saturating_add(l.block));
                    }
                    b
                }
                Err(e) => {
                    self.redis_failed(&e);
                    local
                }
            },
            None => local,
        };
        let Some((failures, usernames)) = blocked else {
            return;
        };
        self.alerts.fetch_add(1, Ordering::Relaxed);
        crate::metrics::global()
            .auth_failure_blocks
            .get_or_create(&crate::metrics::label("kind", "client"))
            .inc();
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
        self.alerter.post(&AlertBody {
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
        let local = self.local.user_failure(user, host_hash, now, l);
        let locked = match self.redis_up() {
            Some(r) => match r.user_failure(user, host_hash, now, l).await {
                Ok(b) => {
                    if b.is_some() {
                        self.local
                            .lock_user(user, secs(now).saturating_add(l.block));
                    }
                    b
                }
                Err(e) => {
                    self.redis_failed(&e);
                    local
                }
            },
            None => local,
        };
        let Some((failures, hosts)) = locked else {
            return;
        };
        self.alerts.fetch_add(1, Ordering::Relaxed);
        crate::metrics::global()
            .auth_failure_blocks
            .get_or_create(&crate::metrics::label("kind", "user"))
            .inc();
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
        self.alerter.post(&AlertBody {
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
    ) -> Assessment {
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
    ) -> Assessment {
        if !self.s.cfg.enabled {
            return Assessment::relay();
        }
        let account = normalize(account);
        let limits = self.s.limits_for(&account);
        let domains = if limits.bulk || limits.max_domains == 0 {
            Vec::new()
        } else {
            domain_hashes(rcpts)
        };
        let mut out = self
            .judge(
                &account,
                ip,
                Some(header_from),
                &domains,
                rcpts.len(),
                rejected_rcpts,
                limits,
            )
            .await;
        if let Some(client) = client {
            // Already in key form (`client_account`): not normalised again, this runs
            // for every message of a trusted client.
            let client = client.trim();
            let limits = self.s.limits_for(client);
            let senders = [fnv32(&account)];
            let senders: &[u32] = if limits.bulk || limits.max_domains == 0 {
                &[]
            } else {
                &senders
            };
            let c = self
                .judge(
                    client,
                    ip,
                    None,
                    senders,
                    rcpts.len(),
                    rejected_rcpts,
                    limits,
                )
                .await;
            out.merge(c);
        }
        out
    }

    /// Counts one message for one key (an account or a client) and judges it against
    /// `limits`; `header_from` is checked when given. `distinct` are the hashes the key's
    /// distinct-count signal counts: recipient domains, or for a client its senders.
    #[allow(clippy::too_many_arguments)]
    async fn judge(
        &self,
        account: &str,
        ip: IpAddr,
        header_from: Option<&str>,
        distinct: &[u32],
        rcpts: usize,
        rejected_rcpts: usize,
        limits: &Limits,
    ) -> Assessment {
        let now = self.now();
        let n = u32::try_from(rcpts).unwrap_or(u32::MAX);
        let rejected = u32::try_from(rejected_rcpts).unwrap_or(u32::MAX);
        let local = self
            .local
            .record(account, now, ip, n, rejected, distinct, limits);
        let (obs, shared) = match self.redis_up() {
            Some(r) => match r
                .record(account, now, ip, n, rejected, distinct, limits)
                .await
            {
                Ok(o) => (o, true),
                Err(e) => {
                    self.redis_failed(&e);
                    (local, false)
                }
            },
            None => (local, false),
        };
        if let Some(f) = &obs.frozen {
            return Assessment {
                action: Some(OutboundAction::Freeze),
                reasons: vec![format!(
                    "account {account} frozen since {} by {}: {}",
                    crate::wire::trace::iso_date(f.since),
                    f.by,
                    f.why
                )],
                frozen: true,
                flags: vec![FLAG_BURST],
            };
        }
        let mut out = Assessment::relay();
        let breaches = if limits.bulk {
            Vec::new()
        } else {
            evaluate(&self.s, limits, &obs)
        };
        if !breaches.is_empty() {
            out.action = Some(limits.action);
            out.flags.push(FLAG_BURST);
            out.reasons.extend(breaches.iter().map(|b| {
                if limits.client {
                    format!("{account}: {}", b.text)
                } else {
                    b.text.clone()
                }
            }));
            if limits.action == OutboundAction::Freeze {
                let why = out.reasons.join("; ");
                let _ = self.freeze_auto(account, &why).await;
            }
            if self.alert_due(account, "burst", now, shared).await {
                self.burst_alert(account, ip, limits.action, &breaches, now);
            }
        }
        let mismatch = header_from.and_then(|h| from_mismatch(&self.s, limits, account, h));
        if let Some(why) = mismatch {
            let action = limits.from_action;
            out.action = Some(OutboundAction::max(out.action, action));
            out.flags.push(FLAG_FROM);
            if action == OutboundAction::Freeze {
                let _ = self.freeze_auto(account, &why).await;
            }
            if self.alert_due(account, "from", now, shared).await {
                self.alerts.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(account = %account, client = %ip, action = action.as_str(), reason = %why, "outbound from mismatch");
                self.alerter.post(&AlertBody {
                    event: "from-mismatch",
                    at: u64::from(secs(now)),
                    account: Some(account.to_string()),
                    client: Some(ip.to_string()),
                    action: Some(action.as_str()),
                    signals: vec![],
                    thresholds: vec![],
                    reasons: vec![why.clone()],
                });
            }
            out.reasons.push(why);
        }
        out.frozen = out.action == Some(OutboundAction::Freeze);
        out
    }

    /// Whether an alert of `kind` for `account` is due (rate limit), across instances
    /// when Redis is in use.
    async fn alert_due(&self, account: &str, kind: &str, now: u64, shared: bool) -> bool {
        let interval = self.s.cfg.alert_interval;
        if shared && let Some(r) = self.redis_up() {
            match r.alert_due(&format!("{kind}:{account}"), interval).await {
                Ok(due) => return due,
                Err(e) => self.redis_failed(&e),
            }
        }
        self.local
            .alert_due(account, kind == "from", now, interval.as_secs() as u32)
    }

    fn burst_alert(
        &self,
        account: &str,
        ip: IpAddr,
        action: OutboundAction,
        breaches: &[Breach],
        now: u64,
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
            client = %ip,
            action = action.as_str(),
            signals = %signals.join(" "),
            thresholds = %thresholds.join(" "),
            backend = self.backend_status(),
            "outbound burst"
        );
        self.alerter.post(&AlertBody {
            event: "outbound-burst",
            at: u64::from(secs(now)),
            account: Some(account.to_string()),
            client: Some(ip.to_string()),
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
        let mut changed = None;
        if let Some(r) = self.redis_up() {
            match r.freeze(account, &f).await {
                Ok(c) => changed = Some(c),
                Err(e) => self.redis_failed(&e),
            }
        }
        let local_changed = self.local.with_freezes(|b| b.freeze(account, f.clone()));
        self.version.fetch_add(1, Ordering::SeqCst);
        if changed.is_none() && self.redis.is_some() {
            lock(&self.pending).push(PendingOp::Freeze(account.to_string(), f.clone()));
        }
        let changed = changed.unwrap_or(local_changed);
        self.persist_freezes().await;
        if changed {
            tracing::warn!(
                account = %account,
                by = %f.by,
                why = %f.why,
                until = %f.until.map(crate::wire::trace::iso_date).unwrap_or_else(|| "unfrozen".into()),
                "outbound account frozen"
            );
            self.alerter.post(&AlertBody {
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
        let mut was = None;
        let mut reached = false;
        if let Some(r) = self.redis_up() {
            match r.unfreeze(&account, at, by, why).await {
                Ok(f) => {
                    was = f;
                    reached = true;
                }
                Err(e) => self.redis_failed(&e),
            }
        }
        let local_was = self
            .local
            .with_freezes(|b| b.unfreeze(&account, at, by, why));
        self.version.fetch_add(1, Ordering::SeqCst);
        if !reached && self.redis.is_some() {
            lock(&self.pending).push(PendingOp::Unfreeze {
                account: account.clone(),
                at,
                by: by.to_string(),
                why: why.to_string(),
            });
        }
        let was = if reached { was } else { local_was };
        self.persist_freezes().await;
        let Some(f) = was else {
            return Err(format!("account {account} is not frozen"));
        };
        // The windows still hold the burst that caused the freeze: left as they are,
        // the account's next message would freeze it again. (Redis cleared its copy in
        // the unfreeze script.)
        self.local.reset_windows(&account);
        tracing::warn!(account = %account, by = %by, why = %why, frozen_by = %f.by, "outbound account unfrozen");
        self.alerter.post(&AlertBody {
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

    /// Writes `freeze_file` (atomically) if the book changed since the last write.
    async fn persist_freezes(&self) {
        let version = self.version.load(Ordering::SeqCst);
        let (local, written, path) = (
            self.local.clone(),
            self.written.clone(),
            self.s.cfg.freeze_file.clone(),
        );
        let result = tokio::task::spawn_blocking(move || {
            let mut last = lock(&written);
            if *last >= version {
                return Ok(());
            }
            local.freeze_book().save(&path)?;
            *last = version;
            Ok::<(), std::io::Error>(())
        })
        .await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(file = %self.s.cfg.freeze_file.display(), error = %e, "outbound: cannot save freezes")
            }
            Err(e) => tracing::error!(error = %e, "outbound: cannot save freezes"),
        }
    }

    /// Every tracked or frozen account, frozen first, then most recently active first.
    pub async fn accounts(&self) -> Vec<AccountSummary> {
        let now = self.now();
        if let Some(r) = self.redis_up() {
            match r.summaries(now).await {
                Ok(v) => return v,
                Err(e) => self.redis_failed(&e),
            }
        }
        self.local.summaries(now)
    }

    /// Counters per window, baseline, freeze and its history, recent login addresses.
    pub async fn account_detail(&self, account: &str) -> Option<AccountDetail> {
        let account = normalize(account);
        let now = self.now();
        if let Some(r) = self.redis_up() {
            match r.detail(&account, now).await {
                Ok(v) => return v,
                Err(e) => self.redis_failed(&e),
            }
        }
        self.local.detail(&account, now)
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
        if self.redis.is_none() {
            self.apply_commands().await;
        }
        let expired = self.local.with_freezes(|b| b.expire(u64::from(secs(now))));
        if !expired.is_empty() {
            self.version.fetch_add(1, Ordering::SeqCst);
            self.persist_freezes().await;
            if self.redis.is_none() {
                for (account, f) in expired {
                    self.expiry_alert(&account, &f);
                }
            }
        }
        if let Some(r) = &self.redis {
            let retry = self.s.cfg.redis_retry.as_millis() as u64;
            if !r.is_up() && now.saturating_sub(self.last_redis_try.load(Ordering::SeqCst)) >= retry
            {
                self.last_redis_try.store(now, Ordering::SeqCst);
                match r.connect().await {
                    Ok(()) => {
                        tracing::warn!(redis = %r.url(), "outbound: redis reachable again, shared counters resumed");
                        self.replay_pending().await;
                        self.last_redis_sync.store(0, Ordering::SeqCst);
                    }
                    Err(e) => tracing::debug!(error = %e, "outbound: redis still unreachable"),
                }
            }
            let since_sync = now.saturating_sub(self.last_redis_sync.load(Ordering::SeqCst));
            if r.is_up() && since_sync >= REDIS_SYNC_INTERVAL.as_millis() as u64 {
                self.sync_redis().await;
            }
        }
        let interval = self.s.cfg.snapshot_interval.as_millis() as u64;
        if now.saturating_sub(self.last_snapshot.load(Ordering::SeqCst)) >= interval {
            self.snapshot().await;
        }
    }

    fn expiry_alert(&self, account: &str, f: &Freeze) {
        tracing::warn!(account = %account, by = %f.by, why = %f.why, "outbound freeze expired");
        self.alerter.post(&AlertBody {
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
        if !self.s.cfg.enabled || !self.local.take_dirty() {
            return;
        }
        let (local, path) = (self.local.clone(), self.s.cfg.state_file.clone());
        let started = std::time::Instant::now();
        match tokio::task::spawn_blocking(move || local.write_snapshot(&path, now)).await {
            Ok(Ok(n)) => tracing::debug!(
                accounts = n,
                ms = started.elapsed().as_millis() as u64,
                "outbound: snapshot written"
            ),
            Ok(Err(e)) => {
                self.local.mark_dirty();
                tracing::error!(file = %self.s.cfg.state_file.display(), error = %e, "outbound: cannot write snapshot");
            }
            Err(e) => {
                self.local.mark_dirty();
                tracing::error!(error = %e, "outbound: cannot write snapshot");
            }
        }
    }

    async fn replay_pending(&self) {
        let ops = std::mem::take(&mut *lock(&self.pending));
        let Some(r) = &self.redis else { return };
        for (i, op) in ops.iter().enumerate() {
            let result = match op {
                PendingOp::Freeze(account, f) => r.freeze(account, f).await.map(|_| ()),
                PendingOp::Unfreeze {
                    account,
                    at,
                    by,
                    why,
                } => r.unfreeze(account, *at, by, why).await.map(|_| ()),
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, "outbound: cannot replay freezes to redis yet");
                lock(&self.pending).splice(0..0, ops[i..].iter().cloned());
                return;
            }
        }
        if !ops.is_empty() {
            tracing::info!(
                operations = ops.len(),
                "outbound: freezes made during the redis outage replayed"
            );
        }
    }

    /// Mirrors the freezes in force from Redis into the local book (the fallback needs
    /// them) and reports those that expired.
    async fn sync_redis(&self) {
        let Some(r) = self.redis_up() else { return };
        let now = self.now();
        self.last_redis_sync.store(now, Ordering::SeqCst);
        match r.sync_freezes(now).await {
            Ok((active, expired)) => {
                for account in &expired {
                    tracing::warn!(account = %account, "outbound freeze expired");
                }
                let nows = u64::from(secs(now));
                let (frozen, thawed) = self.local.with_freezes(|b| {
                    let before: Vec<String> = b
                        .accounts
                        .iter()
                        .filter(|(_, r)| r.current.as_ref().is_some_and(|f| f.active(nows)))
                        .map(|(a, _)| a.clone())
                        .collect();
                    let frozen: Vec<(String, Freeze)> = active
                        .iter()
                        .filter(|(a, _)| !before.contains(a))
                        .cloned()
                        .collect();
                    let thawed: Vec<String> = before
                        .into_iter()
                        .filter(|a| !active.iter().any(|(x, _)| x == a))
                        .collect();
                    for rec in b.accounts.values_mut() {
                        rec.current = None;
                    }
                    for (a, f) in &active {
                        b.accounts.entry(a.clone()).or_default().current = Some(f.clone());
                    }
                    (frozen, thawed)
                });
                // Changes made by other instances or the CLI, seen here for the first time.
                for (account, f) in &frozen {
                    tracing::warn!(account = %account, by = %f.by, why = %f.why, "outbound account frozen (shared state)");
                }
                for account in thawed.iter().filter(|a| !expired.contains(a)) {
                    tracing::warn!(account = %account, "outbound account unfrozen (shared state)");
                }
                if !frozen.is_empty() || !thawed.is_empty() {
                    self.version.fetch_add(1, Ordering::SeqCst);
                    self.persist_freezes().await;
                }
            }
            Err(e) => self.redis_failed(&e),
        }
    }

    /// Applies the CLI's commands waiting in `command_dir` (memory backend).
    async fn apply_commands(&self) {
        let dir = self.s.cfg.command_dir.clone();
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
