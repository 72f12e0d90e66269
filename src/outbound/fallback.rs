//! `backend = "redis"`: Redis, shared by every instance, with the local store answering
//! whenever Redis does not.
//!
//! The local store is kept warm: every message and login is counted there too, so when
//! Redis becomes unreachable the limits go on from this instance's own counts (the log
//! says so once, `redis_fallback` shows it). A failed call never delays the session:
//! the local answer is used for that call, and while Redis is down it is not asked at
//! all until [`maintain`](OutboundStore::maintain) reconnects (every `redis_retry`).
//!
//! Freezes are also written to the local book (and `freeze_file`); those made while
//! Redis was unreachable are replayed to it when it is back. The freezes in force in
//! Redis are mirrored into the local book every few seconds, so a fallback still holds
//! the mail of accounts other instances froze.

use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use super::Clock;
use super::client;
use super::config::{Limits, Settings};
use super::freeze::Freeze;
use super::redis_store::{RedisFailure, RedisStore};
use super::report::{AccountDetail, AccountSummary};
use super::state::{FailLimits, secs};
use super::store::{AlertKind, Counted, Failing, LocalStore, Message, OutboundStore};

/// How often the freezes in force are read back from Redis (and expiries recorded).
const REDIS_SYNC_INTERVAL: Duration = Duration::from_secs(5);

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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct FallbackStore {
    shared: RedisStore,
    local: LocalStore,
    s: Arc<Settings>,
    clock: Arc<dyn Clock>,
    pending: Mutex<Vec<PendingOp>>,
    last_try: AtomicU64,
    last_sync: AtomicU64,
}

impl FallbackStore {
    /// Connects (an unreachable Redis is a WARN, not an error: the local store answers
    /// until it is back) and mirrors the freezes in force.
    pub async fn connect(
        s: Arc<Settings>,
        local: LocalStore,
        clock: Arc<dyn Clock>,
    ) -> Result<FallbackStore, String> {
        let shared = RedisStore::new(s.clone())?;
        match shared.connect().await {
            Ok(()) => tracing::info!(redis = %shared.url(), "outbound: shared state in redis"),
            Err(e) => {
                tracing::warn!(redis = %shared.url(), error = %e, "outbound: redis unreachable, using local counters until it is back")
            }
        }
        let store = FallbackStore {
            shared,
            local,
            s,
            last_try: AtomicU64::new(clock.now_ms()),
            clock,
            pending: Mutex::new(Vec::new()),
            last_sync: AtomicU64::new(0),
        };
        store.sync().await;
        Ok(store)
    }

    /// Redis's answer, or `None` when it is down or the call failed (the caller answers
    /// from the local store; counted in `outbound_store_fallbacks`). While Redis is down
    /// the call is not even tried: `fut` is dropped unpolled.
    async fn ask<T>(&self, fut: impl Future<Output = Result<T, RedisFailure>> + Send) -> Option<T> {
        let answer = if self.shared.is_up() {
            match fut.await {
                Ok(v) => Some(v),
                Err(e) => {
                    self.failed(&e);
                    None
                }
            }
        } else {
            None
        };
        if answer.is_none() {
            crate::metrics::global().outbound_store_fallbacks.inc();
        }
        answer
    }

    /// Redis failed (the store logged the outage when it began): reconnection is tried
    /// from `maintain` after `redis_retry`.
    fn failed(&self, e: &RedisFailure) {
        match e {
            RedisFailure::Down(_) => self.last_try.store(self.clock.now_ms(), Ordering::SeqCst),
            RedisFailure::Failed(_) => tracing::warn!(
                redis = %self.shared.url(),
                error = %e,
                "outbound: redis command failed, local counters used for this message"
            ),
        }
    }

    async fn replay_pending(&self) {
        let ops = std::mem::take(&mut *lock(&self.pending));
        for (i, op) in ops.iter().enumerate() {
            let result = match op {
                PendingOp::Freeze(account, f) => self.shared.freeze(account, f).await.map(|_| ()),
                PendingOp::Unfreeze {
                    account,
                    at,
                    by,
                    why,
                } => self
                    .shared
                    .unfreeze(account, *at, by, why)
                    .await
                    .map(|_| ()),
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
    async fn sync(&self) {
        if !self.shared.is_up() {
            return;
        }
        let now = self.clock.now_ms();
        self.last_sync.store(now, Ordering::SeqCst);
        let (active, expired) = match self.shared.sync_freezes(now).await {
            Ok(v) => v,
            Err(e) => return self.failed(&e),
        };
        for account in &expired {
            tracing::warn!(account = %account, "outbound freeze expired");
        }
        let nows = u64::from(secs(now));
        let (frozen, thawed) = self.local.mem.with_freezes(|b| {
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
            self.local.change_freezes(|_| ()).await;
        }
    }
}

#[async_trait]
impl OutboundStore for FallbackStore {
    fn status(&self) -> &'static str {
        if self.shared.is_up() {
            "redis"
        } else {
            "redis-unavailable (local fallback)"
        }
    }

    fn tracked(&self) -> usize {
        self.local.tracked()
    }

    fn frozen_count(&self) -> usize {
        self.local.frozen_count()
    }

    async fn record(&self, key: &str, m: &Message<'_>, limits: &Limits) -> Counted {
        let local = self.local.record(key, m, limits).await;
        match self.ask(self.shared.record(key, m, limits)).await {
            Some(obs) => Counted { obs, shared: true },
            None => local,
        }
    }

    async fn login(&self, account: &str, ip: IpAddr, now_ms: u64) {
        self.local.login(account, ip, now_ms).await;
        self.ask(self.shared.login(account, ip, now_ms)).await;
    }

    async fn alert_due(&self, key: &str, kind: AlertKind, now_ms: u64, shared: bool) -> bool {
        // Counted locally only: the local rate limit, or this instance would alert for
        // counts Redis never saw and again once it is back.
        if shared
            && let Some(due) = self
                .ask(self.shared.alert_due(key, kind, self.s.cfg.alert_interval))
                .await
        {
            return due;
        }
        self.local.alert_due(key, kind, now_ms, false).await
    }

    async fn client_blocked(&self, host: IpAddr, now_ms: u64) -> Option<u64> {
        match self.ask(self.shared.blocked(host, now_ms)).await {
            Some(until) => until,
            None => self.local.client_blocked(host, now_ms).await,
        }
    }

    async fn user_locked(&self, user: u32, now_ms: u64) -> Option<u64> {
        match self.ask(self.shared.user_locked(user, now_ms)).await {
            Some(until) => until,
            None => self.local.user_locked(user, now_ms).await,
        }
    }

    async fn known_login(&self, account: &str, ip: IpAddr, now_ms: u64) -> bool {
        if self.local.known_login(account, ip, now_ms).await {
            return true;
        }
        match self.ask(self.shared.detail(account, now_ms)).await {
            Some(Some(d)) => d.login_ips.iter().any(|k| {
                k.ip.parse::<IpAddr>()
                    .is_ok_and(|known| client::same_host(known, ip))
            }),
            _ => false,
        }
    }

    async fn failure(
        &self,
        who: Failing,
        other: u32,
        now_ms: u64,
        l: FailLimits,
    ) -> Option<(u32, u32)> {
        let local = self.local.failure(who, other, now_ms, l).await;
        match self.ask(self.shared.failure(who, other, now_ms, l)).await {
            Some(blocked) => {
                // Another instance's failures may have made the block: mirror it, so the
                // fallback keeps it should Redis go away.
                if blocked.is_some() {
                    self.local
                        .mem
                        .block_failing(who, secs(now_ms).saturating_add(l.block));
                }
                blocked
            }
            None => local,
        }
    }

    async fn freeze(&self, account: &str, f: &Freeze) -> bool {
        let changed = self.ask(self.shared.freeze(account, f)).await;
        if changed.is_none() {
            lock(&self.pending).push(PendingOp::Freeze(account.to_string(), f.clone()));
        }
        let local_changed = self.local.freeze_here(account, f).await;
        changed.unwrap_or(local_changed)
    }

    async fn unfreeze(&self, account: &str, at: u64, by: &str, why: &str) -> Option<Freeze> {
        // Redis clears its copy of the windows in the unfreeze script.
        let reached = self.ask(self.shared.unfreeze(account, at, by, why)).await;
        if reached.is_none() {
            lock(&self.pending).push(PendingOp::Unfreeze {
                account: account.to_string(),
                at,
                by: by.to_string(),
                why: why.to_string(),
            });
        }
        let local_was = self.local.unfreeze_here(account, at, by, why).await;
        let was = reached.unwrap_or(local_was);
        if was.is_some() {
            self.local.mem.reset_windows(account);
        }
        was
    }

    async fn summaries(&self, now_ms: u64) -> Vec<AccountSummary> {
        match self.ask(self.shared.summaries(now_ms)).await {
            Some(v) => v,
            None => self.local.summaries(now_ms).await,
        }
    }

    async fn detail(&self, account: &str, now_ms: u64) -> Option<AccountDetail> {
        match self.ask(self.shared.detail(account, now_ms)).await {
            Some(v) => v,
            None => self.local.detail(account, now_ms).await,
        }
    }

    async fn maintain(&self, now_ms: u64) -> Vec<(String, Freeze)> {
        // Expiries are announced from Redis's record (`sync`), once for all instances,
        // not from this mirror.
        self.local.expire(now_ms).await;
        let retry = self.s.cfg.redis_retry.as_millis() as u64;
        if !self.shared.is_up()
            && now_ms.saturating_sub(self.last_try.load(Ordering::SeqCst)) >= retry
        {
            self.last_try.store(now_ms, Ordering::SeqCst);
            match self.shared.connect().await {
                Ok(()) => {
                    tracing::warn!(redis = %self.shared.url(), "outbound: redis reachable again, shared counters resumed");
                    self.replay_pending().await;
                    self.last_sync.store(0, Ordering::SeqCst);
                }
                Err(e) => tracing::debug!(error = %e, "outbound: redis still unreachable"),
            }
        }
        let since_sync = now_ms.saturating_sub(self.last_sync.load(Ordering::SeqCst));
        if self.shared.is_up() && since_sync >= REDIS_SYNC_INTERVAL.as_millis() as u64 {
            self.sync().await;
        }
        Vec::new()
    }

    async fn snapshot(&self, now_ms: u64) {
        self.local.snapshot(now_ms).await;
    }
}
