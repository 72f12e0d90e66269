//! The store boundary of the detector: everything it reads and writes about accounts and
//! clients, whatever keeps it. The [`Detector`](super::Detector) holds one
//! `Arc<dyn OutboundStore>` and never asks which backend is behind it:
//!
//! - [`LocalStore`]: the in-process counters ([`MemoryStore`]) with their files (the
//!   `state_file` snapshot, the `freeze_file` rewritten on every freeze change);
//!   `backend = "memory"`.
//! - [`FallbackStore`](super::fallback::FallbackStore): Redis ([`RedisStore`](super::redis_store::RedisStore),
//!   shared by every instance), with a `LocalStore` answering whenever Redis does not;
//!   `backend = "redis"`.
//!
//! Why Redis alone does not implement the trait: a call to Redis can fail, and the
//! detector must still answer every session at once (mail is never kept waiting on the
//! counters). Every method here therefore has an answer; the fallback wrapper is where a
//! failed Redis call turns into the local one, in one place.
//!
//! The account's state crosses this boundary as [`AccountStatus`]; strings (`"mailwarden"`,
//! the freeze JSON) exist only in the Redis values and the files.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::config::{Limits, Settings};
use super::freeze::{Freeze, FreezeBook};
use super::memory::MemoryStore;
use super::report::{AccountDetail, AccountSummary};
use super::state::{FailLimits, Observation, secs};

/// Whether an account may send: the state its messages are judged in.
#[derive(Debug, Clone, PartialEq)]
pub enum AccountStatus {
    /// Counted and judged against its limits.
    Active,
    /// Every message is held in quarantine until the freeze ends (who froze it, why,
    /// since and until when are in the [`Freeze`]).
    Frozen(Freeze),
}

impl AccountStatus {
    /// The freeze in force, if any.
    pub fn freeze(&self) -> Option<&Freeze> {
        match self {
            AccountStatus::Active => None,
            AccountStatus::Frozen(f) => Some(f),
        }
    }

    /// `Frozen` when `f` is a freeze still in force at `now` (seconds), else `Active`.
    pub fn from_freeze(f: Option<Freeze>, now: u64) -> AccountStatus {
        match f {
            Some(f) if f.active(now) => AccountStatus::Frozen(f),
            _ => AccountStatus::Active,
        }
    }
}

/// One message as the counters see it.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    pub now_ms: u64,
    pub ip: IpAddr,
    pub rcpts: u32,
    /// Recipients the next hop refused.
    pub rejected: u32,
    /// Hashes the key's distinct-count signal counts: recipient domains, or for a client
    /// key its envelope senders.
    pub distinct: &'a [u32],
}

/// What counting one message yields.
#[derive(Debug, Clone)]
pub struct Counted {
    pub obs: Observation,
    /// The counts are the shared ones (Redis), not this instance's alone: the alert rate
    /// limit is then shared too.
    pub shared: bool,
}

/// Which alert's rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertKind {
    Burst,
    From,
}

impl AlertKind {
    /// Its name in Redis keys.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::Burst => "burst",
            AlertKind::From => "from",
        }
    }
}

/// Whose AUTH failures are counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failing {
    /// A client host (an address, an IPv6 /64's network address); the other hashes are
    /// the user names it tried.
    Client(IpAddr),
    /// A user name (its hash), from every client; the other hashes are the hosts.
    User(u32),
}

#[async_trait]
pub trait OutboundStore: Send + Sync {
    /// `memory`, `redis`, or `redis-unavailable (local fallback)`.
    fn status(&self) -> &'static str;
    /// Accounts whose counters are kept in this process.
    fn tracked(&self) -> usize;
    /// Accounts frozen now, as this process knows them.
    fn frozen_count(&self) -> usize;

    /// Counts one message for `key` (an account or a client key) in every window and
    /// returns what the limits look at, the account's status included.
    async fn record(&self, key: &str, m: &Message<'_>, limits: &Limits) -> Counted;
    /// A successful login of `account` from `ip`.
    async fn login(&self, account: &str, ip: IpAddr, now_ms: u64);
    /// Whether an alert of `kind` for `key` is due (none in the last `alert_interval`);
    /// if so, records it as sent. `shared`: the message was counted in the shared store.
    async fn alert_due(&self, key: &str, kind: AlertKind, now_ms: u64, shared: bool) -> bool;

    /// Until when (ms) the client host is blocked, if it is.
    async fn client_blocked(&self, host: IpAddr, now_ms: u64) -> Option<u64>;
    /// Until when (ms) the user name hashed `user` is locked, if it is.
    async fn user_locked(&self, user: u32, now_ms: u64) -> Option<u64>;
    /// Whether `account` logged in from the host of `ip` before.
    async fn known_login(&self, account: &str, ip: IpAddr, now_ms: u64) -> bool;
    /// One AUTH failure of `who` (with `other` the user name or host hash):
    /// `Some((failures, distinct others))` when it blocks the client or locks the name.
    async fn failure(
        &self,
        who: Failing,
        other: u32,
        now_ms: u64,
        l: FailLimits,
    ) -> Option<(u32, u32)>;

    /// Freezes `account` durably (before returning); true when it was not frozen.
    async fn freeze(&self, account: &str, f: &Freeze) -> bool;
    /// Unfreezes `account` (and empties its windows, which still hold the burst that
    /// froze it): the freeze that was in force, if any.
    async fn unfreeze(&self, account: &str, at: u64, by: &str, why: &str) -> Option<Freeze>;

    /// Every tracked or frozen account, frozen first, then most recently active first.
    async fn summaries(&self, now_ms: u64) -> Vec<AccountSummary>;
    /// One account's counters, freeze and history.
    async fn detail(&self, account: &str, now_ms: u64) -> Option<AccountDetail>;

    /// Periodic work (freeze expiry, reconnection, sync); returns the freezes that ran
    /// out here and are to be announced.
    async fn maintain(&self, now_ms: u64) -> Vec<(String, Freeze)>;
    /// Writes the counters snapshot if anything changed since the last one.
    async fn snapshot(&self, now_ms: u64);
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The in-process store and its files: `backend = "memory"`, and the fallback (and
/// local mirror of the freezes) under Redis.
pub struct LocalStore {
    pub(crate) mem: Arc<MemoryStore>,
    s: Arc<Settings>,
    /// Serialises `freeze_file` writes; the freeze-book version last written.
    written: Arc<Mutex<u64>>,
    /// Bumped on every change of the freeze book.
    version: AtomicU64,
}

impl LocalStore {
    pub fn new(s: Arc<Settings>) -> LocalStore {
        LocalStore {
            mem: Arc::new(MemoryStore::new(s.clone())),
            s,
            written: Arc::new(Mutex::new(0)),
            version: AtomicU64::new(0),
        }
    }

    /// Loads `freeze_file` (unreadable: an error) and the counters snapshot (unreadable:
    /// set aside, counters start from zero).
    pub async fn load(&self) -> Result<(), String> {
        let cfg = &self.s.cfg;
        let book = FreezeBook::load(&cfg.freeze_file)?;
        self.mem.with_freezes(|b| *b = book);
        let (path, mem) = (cfg.state_file.clone(), self.mem.clone());
        let loaded = tokio::task::spawn_blocking(move || mem.load_snapshot(&path))
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
        Ok(())
    }

    /// Changes the freeze book and writes `freeze_file` before returning.
    pub async fn change_freezes<R>(&self, f: impl FnOnce(&mut FreezeBook) -> R) -> R {
        let r = self.mem.with_freezes(f);
        self.version.fetch_add(1, Ordering::SeqCst);
        self.persist_freezes().await;
        r
    }

    /// Freezes `account` here; true when it was not frozen.
    pub async fn freeze_here(&self, account: &str, f: &Freeze) -> bool {
        self.change_freezes(|b| b.freeze(account, f.clone())).await
    }

    /// Unfreezes `account` in the book (its windows are left as they are).
    pub async fn unfreeze_here(
        &self,
        account: &str,
        at: u64,
        by: &str,
        why: &str,
    ) -> Option<Freeze> {
        self.change_freezes(|b| b.unfreeze(account, at, by, why))
            .await
    }

    /// Ends the freezes that ran out; returns them.
    pub async fn expire(&self, now_ms: u64) -> Vec<(String, Freeze)> {
        let expired = self.mem.with_freezes(|b| b.expire(u64::from(secs(now_ms))));
        if !expired.is_empty() {
            self.version.fetch_add(1, Ordering::SeqCst);
            self.persist_freezes().await;
        }
        expired
    }

    /// Writes `freeze_file` (atomically) if the book changed since the last write.
    async fn persist_freezes(&self) {
        let version = self.version.load(Ordering::SeqCst);
        let (mem, written, path) = (
            self.mem.clone(),
            self.written.clone(),
            self.s.cfg.freeze_file.clone(),
        );
        let result = tokio::task::spawn_blocking(move || {
            let mut last = lock(&written);
            if *last >= version {
                return Ok(());
            }
            mem.freeze_book().save(&path)?;
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
}

#[async_trait]
impl OutboundStore for LocalStore {
    fn status(&self) -> &'static str {
        "memory"
    }

    fn tracked(&self) -> usize {
        self.mem.tracked()
    }

    fn frozen_count(&self) -> usize {
        self.mem.frozen_count()
    }

    async fn record(&self, key: &str, m: &Message<'_>, limits: &Limits) -> Counted {
        Counted {
            obs: self.mem.count(key, m, limits),
            shared: false,
        }
    }

    async fn login(&self, account: &str, ip: IpAddr, now_ms: u64) {
        self.mem.login(account, ip, now_ms);
    }

    async fn alert_due(&self, key: &str, kind: AlertKind, now_ms: u64, _shared: bool) -> bool {
        let interval = self.s.cfg.alert_interval.as_secs() as u32;
        self.mem
            .alert_due(key, kind == AlertKind::From, now_ms, interval)
    }

    async fn client_blocked(&self, host: IpAddr, now_ms: u64) -> Option<u64> {
        self.mem.blocked(host, now_ms).map(|s| u64::from(s) * 1000)
    }

    async fn user_locked(&self, user: u32, now_ms: u64) -> Option<u64> {
        self.mem
            .user_locked(user, now_ms)
            .map(|s| u64::from(s) * 1000)
    }

    async fn known_login(&self, account: &str, ip: IpAddr, _now_ms: u64) -> bool {
        self.mem.known_login(account, ip)
    }

    async fn failure(
        &self,
        who: Failing,
        other: u32,
        now_ms: u64,
        l: FailLimits,
    ) -> Option<(u32, u32)> {
        self.mem.failure(who, other, now_ms, l)
    }

    async fn freeze(&self, account: &str, f: &Freeze) -> bool {
        self.freeze_here(account, f).await
    }

    async fn unfreeze(&self, account: &str, at: u64, by: &str, why: &str) -> Option<Freeze> {
        let was = self.unfreeze_here(account, at, by, why).await;
        if was.is_some() {
            self.mem.reset_windows(account);
        }
        was
    }

    async fn summaries(&self, now_ms: u64) -> Vec<AccountSummary> {
        self.mem.summaries(now_ms)
    }

    async fn detail(&self, account: &str, now_ms: u64) -> Option<AccountDetail> {
        self.mem.detail(account, now_ms)
    }

    async fn maintain(&self, now_ms: u64) -> Vec<(String, Freeze)> {
        self.expire(now_ms).await
    }

    async fn snapshot(&self, now_ms: u64) {
        if !self.mem.take_dirty() {
            return;
        }
        let (mem, path) = (self.mem.clone(), self.s.cfg.state_file.clone());
        let started = std::time::Instant::now();
        match tokio::task::spawn_blocking(move || mem.write_snapshot(&path, now_ms)).await {
            Ok(Ok(n)) => tracing::debug!(
                accounts = n,
                ms = started.elapsed().as_millis() as u64,
                "outbound: snapshot written"
            ),
            Ok(Err(e)) => {
                self.mem.mark_dirty();
                tracing::error!(file = %self.s.cfg.state_file.display(), error = %e, "outbound: cannot write snapshot");
            }
            Err(e) => {
                self.mem.mark_dirty();
                tracing::error!(error = %e, "outbound: cannot write snapshot");
            }
        }
    }
}
