//! The in-process store: accounts in independently locked LRU maps (64 shards; one for
//! small bounds), `tracked_accounts` in all: an account that is new when the store is
//! full evicts its shard's least recently active account, which approximates one global
//! LRU. Client addresses' AUTH failures are in one more LRU map, then the freeze book. With the Redis backend it is the local fallback, kept warm by counting
//! every message here too.
//!
//! Snapshot (`state_file`), JSON lines: a header `{"version","written_at","layout"}`,
//! then `{"account", "state"}` per account (least recently active first, per shard) and
//! `{"client", "state"}` per client address with recent failures or a block. Written
//! atomically (dot-file, fsync, rename). Freezes are not in it: they are in
//! `freeze_file`, rewritten on every change.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::io::{BufRead, Write};
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use serde::{Deserialize, Serialize};

use super::baseline::Params;
use super::config::{Limits, Settings};
use super::freeze::{Freeze, FreezeBook, FreezeRecord};
use super::lru::Lru;
use super::report::{self, AccountDetail, AccountSummary};
use super::state::{AccountState, ClientState, FailLimits, Observation, secs};
use super::store::{AccountStatus, Failing, Message};

pub const SNAPSHOT_VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotHeader {
    pub version: u32,
    pub written_at: u64,
    pub layout: String,
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum SnapshotLine {
    Account {
        account: String,
        state: AccountState,
    },
    Client {
        client: IpAddr,
        state: ClientState,
    },
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One shard of the accounts.
type Shard = Mutex<Lru<Arc<str>, AccountState>>;

/// A snapshot as read back: its header and every account's state.
pub type SnapshotAccounts = (SnapshotHeader, Vec<(String, AccountState)>);

pub struct MemoryStore {
    s: Arc<Settings>,
    p: Params,
    shards: Box<[Shard]>,
    hasher: std::hash::RandomState,
    clients: Mutex<Lru<IpAddr, ClientState>>,
    /// AUTH failures per user name (its hash), from all clients: the "user names" of a
    /// [`ClientState`] are the hosts here. Not in the snapshot (a restart forgets them).
    users: Mutex<Lru<u32, ClientState>>,
    freezes: RwLock<FreezeBook>,
    /// Accounts with a freeze record in force (a fast path: usually 0).
    frozen: AtomicUsize,
    /// Accounts tracked, all shards together.
    count: AtomicUsize,
    dirty: AtomicBool,
}

impl MemoryStore {
    pub fn new(s: Arc<Settings>) -> MemoryStore {
        let tracked = s.cfg.tracked_accounts;
        // Small bounds get one shard so that the bound is an exact LRU.
        let n = if tracked >= 64 * 64 { 64 } else { 1 };
        let shards = (0..n).map(|_| Mutex::new(Lru::new(usize::MAX))).collect();
        MemoryStore {
            p: Params::from_settings(&s),
            clients: Mutex::new(Lru::new(s.cfg.auth_failures.tracked_clients)),
            users: Mutex::new(Lru::new(s.cfg.auth_failures.tracked_clients)),
            s,
            shards,
            hasher: std::hash::RandomState::new(),
            freezes: RwLock::new(FreezeBook::default()),
            frozen: AtomicUsize::new(0),
            count: AtomicUsize::new(0),
            dirty: AtomicBool::new(false),
        }
    }

    fn shard(&self, account: &str) -> &Shard {
        let i = self.hasher.hash_one(account) as usize % self.shards.len();
        &self.shards[i]
    }

    /// Makes room for `account` in its (locked) shard when it is new and the store is full.
    fn admit(&self, shard: &mut Lru<Arc<str>, AccountState>, account: &str) {
        if shard.peek(account).is_some() {
            return;
        }
        if self.count.fetch_add(1, Ordering::SeqCst) >= self.s.cfg.tracked_accounts
            && shard.pop_oldest().is_some()
        {
            self.count.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// [`count`](Self::count) with the message's parts given one by one.
    #[cfg(test)]
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        account: &str,
        now_ms: u64,
        ip: IpAddr,
        rcpts: u32,
        rejected: u32,
        distinct: &[u32],
        limits: &Limits,
    ) -> Observation {
        let m = Message {
            now_ms,
            ip,
            rcpts,
            rejected,
            distinct,
        };
        self.count(account, &m, limits)
    }

    /// Counts one message and returns what the limits look at.
    pub fn count(&self, account: &str, m: &Message<'_>, limits: &Limits) -> Observation {
        let mut o = {
            let mut shard = lock(self.shard(account));
            self.admit(&mut shard, account);
            let st = shard.get_or_insert_with(account, || {
                (Arc::from(account), AccountState::new(&self.s, m.now_ms))
            });
            st.record(
                &self.s,
                &self.p,
                m.now_ms,
                m.rcpts,
                m.rejected,
                m.distinct,
                limits.distinct_cap() as usize,
            );
            st.observe(&self.s, &self.p, m.now_ms, Some(m.ip))
        };
        o.status =
            AccountStatus::from_freeze(self.frozen(account, m.now_ms), u64::from(secs(m.now_ms)));
        self.dirty.store(true, Ordering::Relaxed);
        o
    }

    /// A successful login of `account` from `ip`.
    pub fn login(&self, account: &str, ip: IpAddr, now_ms: u64) {
        let mut shard = lock(self.shard(account));
        self.admit(&mut shard, account);
        let st = shard.get_or_insert_with(account, || {
            (Arc::from(account), AccountState::new(&self.s, now_ms))
        });
        st.login(ip, secs(now_ms), self.s.cfg.new_ip.remember);
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// Whether an alert (a From alert when `from`, else a burst alert) for `account` is
    /// due (none in the last `interval` seconds); if so, records it as sent.
    pub fn alert_due(&self, account: &str, from: bool, now_ms: u64, interval: u32) -> bool {
        let now = secs(now_ms);
        let mut shard = lock(self.shard(account));
        let Some(st) = shard.get_mut(account) else {
            return true;
        };
        let last = if from {
            &mut st.last_from_alert
        } else {
            &mut st.last_alert
        };
        if *last != 0 && now.saturating_sub(*last) < interval {
            return false;
        }
        *last = now.max(1);
        true
    }

    /// One AUTH failure of `who` (`other`: the user name's hash for a client, the host's
    /// for a user name): `Some((failures, distinct others))` when it blocks the client or
    /// locks the name.
    pub fn failure(
        &self,
        who: Failing,
        other: u32,
        now_ms: u64,
        l: FailLimits,
    ) -> Option<(u32, u32)> {
        self.dirty.store(true, Ordering::Relaxed);
        match who {
            Failing::Client(ip) => fail_in(&self.clients, ip, other, now_ms, l),
            Failing::User(user) => fail_in(&self.users, user, other, now_ms, l),
        }
    }

    /// Blocks the client or locks the user name until `until` (seconds), as another
    /// instance decided.
    pub fn block_failing(&self, who: Failing, until: u32) {
        match who {
            Failing::Client(ip) => entry(&self.clients, ip, |c| c.blocked_until = until),
            Failing::User(user) => entry(&self.users, user, |c| c.blocked_until = until),
        }
    }

    #[cfg(test)]
    pub fn auth_failure(
        &self,
        ip: IpAddr,
        user: u32,
        now_ms: u64,
        l: FailLimits,
    ) -> Option<(u32, u32)> {
        self.failure(Failing::Client(ip), user, now_ms, l)
    }

    /// Until when the user name hashed `user` is locked, if it is.
    pub fn user_locked(&self, user: u32, now_ms: u64) -> Option<u32> {
        lock(&self.users).peek(&user)?.blocked(secs(now_ms))
    }

    /// Whether `account` has logged in from the host of `ip` before (its remembered
    /// login addresses).
    pub fn known_login(&self, account: &str, ip: IpAddr) -> bool {
        let shard = lock(self.shard(account));
        shard
            .peek(account)
            .is_some_and(|st| st.ips.iter().any(|k| super::client::same_host(k.ip, ip)))
    }

    /// Until when `ip` is blocked, if it is.
    pub fn blocked(&self, ip: IpAddr, now_ms: u64) -> Option<u32> {
        lock(&self.clients).peek(&ip)?.blocked(secs(now_ms))
    }

    /// Accounts frozen now (as of the last freeze change).
    pub fn frozen_count(&self) -> usize {
        self.frozen.load(Ordering::Relaxed)
    }

    pub fn frozen(&self, account: &str, now_ms: u64) -> Option<Freeze> {
        if self.frozen.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let book = self.freezes.read().unwrap_or_else(|e| e.into_inner());
        book.frozen(account, u64::from(secs(now_ms))).cloned()
    }

    /// Changes the freeze book; the closure's result is returned.
    pub fn with_freezes<R>(&self, f: impl FnOnce(&mut FreezeBook) -> R) -> R {
        let mut book = self.freezes.write().unwrap_or_else(|e| e.into_inner());
        let r = f(&mut book);
        self.frozen.store(book.frozen_count(), Ordering::Relaxed);
        r
    }

    pub fn freeze_book(&self) -> FreezeBook {
        self.freezes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn freeze_record(&self, account: &str) -> Option<FreezeRecord> {
        self.freezes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .accounts
            .get(account)
            .cloned()
    }

    /// Empties `account`'s window counters (at unfreeze: they still hold the burst that
    /// froze it). Baseline, totals and login addresses stay.
    pub fn reset_windows(&self, account: &str) {
        if let Some(st) = lock(self.shard(account)).get_mut(account) {
            st.rings.fill(0);
            st.domains.clear();
            self.dirty.store(true, Ordering::Relaxed);
        }
    }

    pub fn state(&self, account: &str) -> Option<AccountState> {
        lock(self.shard(account)).peek(account).cloned()
    }

    pub fn tracked(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Every tracked or frozen account, most recently active first.
    pub fn summaries(&self, now_ms: u64) -> Vec<AccountSummary> {
        let book = self.freeze_book();
        let now = u64::from(secs(now_ms));
        let mut out = Vec::new();
        let mut seen: HashMap<String, ()> = HashMap::new();
        for shard in self.shards.iter() {
            let entries: Vec<(Arc<str>, AccountState)> = lock(shard)
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            for (k, st) in entries {
                out.push(report::summary(
                    &self.s,
                    &k,
                    Some(&st),
                    book.frozen(&k, now),
                    now_ms,
                ));
                seen.insert(k.to_string(), ());
            }
        }
        for (account, rec) in &book.accounts {
            if !seen.contains_key(account)
                && let Some(f) = rec.current.as_ref().filter(|f| f.active(now))
            {
                out.push(report::summary(&self.s, account, None, Some(f), now_ms));
            }
        }
        sort_summaries(&mut out);
        out
    }

    pub fn detail(&self, account: &str, now_ms: u64) -> Option<AccountDetail> {
        let st = self.state(account);
        let rec = self.freeze_record(account);
        if st.is_none() && rec.is_none() {
            return None;
        }
        Some(report::detail(
            &self.s,
            account,
            st.as_ref(),
            rec.as_ref(),
            now_ms,
        ))
    }

    /// Whether anything was counted since the last snapshot (and clears the flag).
    pub fn take_dirty(&self) -> bool {
        self.dirty.swap(false, Ordering::Relaxed)
    }

    /// The snapshot failed: write it again next time.
    pub fn mark_dirty(&self) {
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// Writes the counters snapshot; returns the number of accounts written.
    pub fn write_snapshot(&self, path: &Path, now_ms: u64) -> std::io::Result<usize> {
        let mut n = 0;
        super::freeze::write_atomic(path, |w| {
            let header = SnapshotHeader {
                version: SNAPSHOT_VERSION,
                written_at: u64::from(secs(now_ms)),
                layout: self.s.layout.clone(),
            };
            serde_json::to_writer(&mut *w, &header).map_err(std::io::Error::other)?;
            w.write_all(b"\n")?;
            for shard in self.shards.iter() {
                // Copy under the lock, write without it.
                let entries: Vec<(Arc<str>, AccountState)> = lock(shard)
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                for (account, state) in entries {
                    let line = SnapshotLine::Account {
                        account: account.to_string(),
                        state,
                    };
                    serde_json::to_writer(&mut *w, &line).map_err(std::io::Error::other)?;
                    w.write_all(b"\n")?;
                    n += 1;
                }
            }
            let now = secs(now_ms);
            let window = self.s.cfg.auth_failures.window.as_secs() as u32;
            let clients: Vec<(IpAddr, ClientState)> = lock(&self.clients)
                .iter()
                .filter(|(_, c)| {
                    c.blocked_until > now || c.fails.iter().any(|&(t, _)| t + window > now)
                })
                .map(|(k, v)| (*k, v.clone()))
                .collect();
            for (client, state) in clients {
                serde_json::to_writer(&mut *w, &SnapshotLine::Client { client, state })
                    .map_err(std::io::Error::other)?;
                w.write_all(b"\n")?;
            }
            Ok(())
        })?;
        Ok(n)
    }

    /// Loads a snapshot written by [`write_snapshot`](Self::write_snapshot); returns the
    /// number of accounts loaded. A missing file loads nothing.
    pub fn load_snapshot(&self, path: &Path) -> Result<usize, String> {
        let mut n = 0;
        let layout_ok = read_snapshot(
            path,
            |header| header.layout == self.s.layout,
            |line| match line {
                SnapshotLine::Account { account, mut state } => {
                    state.fit_layout(&self.s);
                    let mut shard = lock(self.shard(&account));
                    self.admit(&mut shard, &account);
                    shard.insert(Arc::from(account.as_str()), state);
                    n += 1;
                }
                SnapshotLine::Client { client, state } => lock(&self.clients).insert(client, state),
            },
        )?;
        if layout_ok == Some(false) {
            tracing::info!(file = %path.display(), "outbound: windows changed since the snapshot; window counters restart from zero");
        }
        Ok(n)
    }
}

/// `f` on the entry of `k` (created when new).
fn entry<K: Copy + std::hash::Hash + Eq>(
    lru: &Mutex<Lru<K, ClientState>>,
    k: K,
    f: impl FnOnce(&mut ClientState),
) {
    f(lock(lru).get_or_insert_with(&k, || (k, ClientState::default())));
}

/// One failure of `k` with `other` in `lru`; see [`MemoryStore::failure`].
fn fail_in<K: Copy + std::hash::Hash + Eq>(
    lru: &Mutex<Lru<K, ClientState>>,
    k: K,
    other: u32,
    now_ms: u64,
    l: FailLimits,
) -> Option<(u32, u32)> {
    let mut lru = lock(lru);
    lru.get_or_insert_with(&k, || (k, ClientState::default()))
        .fail(secs(now_ms), other, l)
}

/// Frozen first, then most recently active first.
pub fn sort_summaries(v: &mut [AccountSummary]) {
    v.sort_by(|a, b| {
        b.frozen
            .cmp(&a.frozen)
            .then(b.last_seen.cmp(&a.last_seen))
            .then(a.account.cmp(&b.account))
    });
}

/// Reads a snapshot line by line. `Ok(None)`: no file; `Ok(Some(layout matches))`.
fn read_snapshot(
    path: &Path,
    check: impl FnOnce(&SnapshotHeader) -> bool,
    mut each: impl FnMut(SnapshotLine),
) -> Result<Option<bool>, String> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let mut lines = std::io::BufReader::new(file).lines();
    let header: SnapshotHeader = match lines.next() {
        Some(Ok(l)) => {
            serde_json::from_str(&l).map_err(|e| format!("{}: header: {e}", path.display()))?
        }
        Some(Err(e)) => return Err(format!("{}: {e}", path.display())),
        None => return Ok(None),
    };
    if header.version != SNAPSHOT_VERSION {
        return Err(format!(
            "{}: snapshot version {} (expected {SNAPSHOT_VERSION})",
            path.display(),
            header.version
        ));
    }
    let ok = check(&header);
    for (i, line) in lines.enumerate() {
        let line = line.map_err(|e| format!("{}: {e}", path.display()))?;
        let parsed: SnapshotLine = serde_json::from_str(&line)
            .map_err(|e| format!("{}: line {}: {e}", path.display(), i + 2))?;
        each(parsed);
    }
    Ok(Some(ok))
}

/// The snapshot as the CLI reads it: its header and every account's state.
pub fn read_accounts(path: &Path) -> Result<Option<SnapshotAccounts>, String> {
    let mut header = None;
    let mut accounts = Vec::new();
    let found = read_snapshot(
        path,
        |h| {
            header = Some(SnapshotHeader {
                version: h.version,
                written_at: h.written_at,
                layout: h.layout.clone(),
            });
            true
        },
        |line| {
            if let SnapshotLine::Account { account, state } = line {
                accounts.push((account, state));
            }
        },
    )?;
    Ok(found.and(header).map(|h| (h, accounts)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::config::OutboundConfig;
    use crate::outbound::state::domain_hashes;

    const T0: u64 = 1_700_000_000_000;

    fn store(cfg: OutboundConfig) -> MemoryStore {
        MemoryStore::new(Arc::new(Settings::new(&cfg).unwrap()))
    }

    #[test]
    fn lru_bound_holds() {
        let s = store(OutboundConfig {
            tracked_accounts: 10,
            ..Default::default()
        });
        let limits = s.s.limits_for("x").clone();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for i in 0..25 {
            s.record(
                &format!("user{i}@example.org"),
                T0 + i,
                ip,
                1,
                0,
                &[],
                &limits,
            );
        }
        assert_eq!(s.tracked(), 10);
        assert!(s.state("user24@example.org").is_some());
        assert!(s.state("user14@example.org").is_none());
        assert!(s.state("user15@example.org").is_some());
        // A big bound is sharded but still exact in total.
        let s = store(OutboundConfig {
            tracked_accounts: 5000,
            ..Default::default()
        });
        assert_eq!(s.shards.len(), 64);
        for i in 0..5000 {
            s.record(&format!("u{i}"), T0, ip, 1, 0, &[], &limits);
        }
        assert_eq!(
            s.tracked(),
            5000,
            "nobody evicted before the bound is reached"
        );
        for i in 5000..20_000 {
            s.record(&format!("u{i}"), T0, ip, 1, 0, &[], &limits);
        }
        assert_eq!(s.tracked(), 5000);
        assert_eq!(
            s.shards.iter().map(|sh| lock(sh).len()).sum::<usize>(),
            5000
        );
        assert!(s.state("u19999").is_some());
    }

    #[test]
    fn snapshot_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let cfg = OutboundConfig::default();
        let a = store(cfg.clone());
        let limits = a.s.limits_for("x").clone();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let rcpts = vec!["a@one.example".to_string(), "b@two.example".to_string()];
        for i in 0..5 {
            a.record(
                "alice@example.org",
                T0 + i * 1000,
                ip,
                2,
                1,
                &domain_hashes(&rcpts),
                &limits,
            );
        }
        a.login("alice@example.org", ip, T0);
        let fl = FailLimits {
            window: 600,
            max_failures: 1,
            max_usernames: 5,
            block: 3600,
        };
        a.auth_failure("198.51.100.7".parse().unwrap(), 1, T0, fl);
        assert!(
            a.auth_failure("198.51.100.7".parse().unwrap(), 1, T0, fl)
                .is_some()
        );
        assert_eq!(a.write_snapshot(&path, T0 + 5000).unwrap(), 1);

        let b = store(cfg.clone());
        assert_eq!(b.load_snapshot(&path).unwrap(), 1);
        let now = T0 + 6000;
        let oa = a
            .state("alice@example.org")
            .unwrap()
            .observe(&a.s, &a.p, now, Some(ip));
        let ob = b
            .state("alice@example.org")
            .unwrap()
            .observe(&b.s, &b.p, now, Some(ip));
        assert_eq!(oa.windows, ob.windows);
        assert_eq!(ob.windows[0], (5.0, 10.0));
        assert_eq!(ob.rejected, (15.0, 5.0));
        assert_eq!(ob.domains, 2);
        assert_eq!(b.state("alice@example.org").unwrap().ips.len(), 1);
        assert!(b.blocked("198.51.100.7".parse().unwrap(), now).is_some());

        // Other windows: the counters restart, the rest stays.
        let c = store(OutboundConfig {
            windows: vec![],
            ..cfg
        });
        assert_eq!(c.load_snapshot(&path).unwrap(), 1);
        let st = c.state("alice@example.org").unwrap();
        assert_eq!(st.messages, 5);
        assert_eq!(st.rings.len(), crate::outbound::window::RING_LEN);
        assert_eq!(st.observe(&c.s, &c.p, now, None).rejected, (0.0, 0.0));

        let (header, accounts) = read_accounts(&path).unwrap().unwrap();
        assert_eq!(header.written_at, (T0 + 5000) / 1000);
        assert_eq!(accounts.len(), 1);
        assert!(
            read_accounts(&dir.path().join("none.json"))
                .unwrap()
                .is_none()
        );
        assert_eq!(
            store(OutboundConfig::default())
                .load_snapshot(&dir.path().join("none.json"))
                .unwrap(),
            0
        );
    }
}
