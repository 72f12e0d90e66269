//! What is kept per account and per client address, and what one message's counting
//! yields ([`Observation`]) for the limits to judge. The same arithmetic runs in the
//! memory store and, in Lua, in Redis (`redis_store.rs`).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::baseline::{Baseline, Params};
use super::config::{MAX_WINDOWS, Settings};
use super::store::AccountStatus;
use super::window::{self, RING_LEN};

/// FNV-1a of the ASCII-lower-cased text: recipient domains and failed user names are kept
/// only as this hash (a password typed into the user name field must not be stored).
pub fn fnv32(s: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in s.bytes() {
        h ^= u32::from(b.to_ascii_lowercase());
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// The distinct recipient domains of a message, hashed.
pub fn domain_hashes(rcpts: &[String]) -> Vec<u32> {
    let mut v: Vec<u32> = rcpts
        .iter()
        .map(|r| {
            let r = r.trim().trim_start_matches('<').trim_end_matches('>');
            let d = r.rsplit_once('@').map_or(r, |(_, d)| d);
            fnv32(d.trim_end_matches('.'))
        })
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// A client address the account logged in from.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct KnownIp {
    pub ip: IpAddr,
    /// Seconds since the epoch.
    pub first: u32,
    pub last: u32,
    /// Never seen before for an account that had logged in from elsewhere.
    pub new: bool,
}

/// One account's counters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccountState {
    /// Seconds since the epoch.
    pub created: u32,
    pub last_seen: u32,
    /// Messages counted since the account was first seen.
    pub messages: u64,
    /// One ring per configured window (messages, recipients), then the rejected-share
    /// ring (recipients tried, refused): see `window.rs`.
    pub rings: Box<[u32]>,
    pub baseline: Baseline,
    /// Recipient domains seen recently: (hash, last seen).
    #[serde(default)]
    pub domains: Vec<(u32, u32)>,
    #[serde(default)]
    pub ips: Vec<KnownIp>,
    /// When the last burst alert for this account was emitted (seconds; 0: never).
    #[serde(default)]
    pub last_alert: u32,
    /// When the last From alert was emitted.
    #[serde(default)]
    pub last_from_alert: u32,
}

/// One message's counting: everything the limits look at.
#[derive(Debug, Clone)]
pub struct Observation {
    /// (messages, recipients) per configured window.
    pub windows: [(f64, f64); MAX_WINDOWS],
    /// Recipients tried and refused by the next hop in the rejected-share window.
    pub rejected: (f64, f64),
    /// Distinct recipient domains in the domains window.
    pub domains: u32,
    /// Messages and recipients in the last hour.
    pub rate: (f64, f64),
    /// The learned baseline (messages, recipients per hour).
    pub baseline: (f64, f64),
    /// Seconds since the first login from this client address, when it is a new one.
    pub new_ip_age: Option<u32>,
    /// Active, or frozen (by whom, why, until when).
    pub status: AccountStatus,
}

impl Observation {
    pub fn empty() -> Observation {
        Observation {
            windows: [(0.0, 0.0); MAX_WINDOWS],
            rejected: (0.0, 0.0),
            domains: 0,
            rate: (0.0, 0.0),
            baseline: (0.0, 0.0),
            new_ip_age: None,
            status: AccountStatus::Active,
        }
    }
}

pub fn secs(now_ms: u64) -> u32 {
    (now_ms / 1000) as u32
}

impl AccountState {
    pub fn new(s: &Settings, now_ms: u64) -> AccountState {
        AccountState {
            created: secs(now_ms),
            last_seen: secs(now_ms),
            messages: 0,
            rings: vec![0; s.rings.len() * RING_LEN].into_boxed_slice(),
            baseline: Baseline::new(
                now_ms,
                s.cfg.adaptive.new_account_messages,
                s.cfg.adaptive.new_account_recipients,
            ),
            domains: Vec::new(),
            ips: Vec::new(),
            last_alert: 0,
            last_from_alert: 0,
        }
    }

    /// Counters saved under another window layout are dropped (the rest is kept).
    pub fn fit_layout(&mut self, s: &Settings) {
        if self.rings.len() != s.rings.len() * RING_LEN {
            self.rings = vec![0; s.rings.len() * RING_LEN].into_boxed_slice();
        }
    }

    /// Counts one message with `rcpts` accepted and `rejected` refused recipients.
    /// `domain_cap` bounds the recipient domains kept (the limit plus one; 0: none).
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &mut self,
        s: &Settings,
        p: &Params,
        now_ms: u64,
        rcpts: u32,
        rejected: u32,
        domains: &[u32],
        domain_cap: usize,
    ) {
        let nw = s.windows();
        for (i, w) in s.rings.iter().enumerate() {
            let ring = &mut self.rings[i * RING_LEN..(i + 1) * RING_LEN];
            if i < nw {
                window::add(ring, w.bucket_ms, now_ms, 1, rcpts);
            } else {
                window::add(
                    ring,
                    w.bucket_ms,
                    now_ms,
                    rcpts.saturating_add(rejected),
                    rejected,
                );
            }
        }
        self.baseline.roll(now_ms, p);
        self.baseline.add(1, rcpts);
        let now = secs(now_ms);
        let cutoff = now.saturating_sub(s.domains_window_secs);
        self.domains.retain(|&(_, t)| t > cutoff);
        for &d in domains {
            if let Some(e) = self.domains.iter_mut().find(|e| e.0 == d) {
                e.1 = now;
            } else if self.domains.len() < domain_cap {
                self.domains.push((d, now));
            }
        }
        self.last_seen = now;
        self.messages += 1;
    }

    /// The counts at `now_ms`, as seen by a message from `ip`.
    pub fn observe(
        &self,
        s: &Settings,
        p: &Params,
        now_ms: u64,
        ip: Option<IpAddr>,
    ) -> Observation {
        let mut o = Observation::empty();
        let nw = s.windows();
        for (i, w) in s.rings.iter().enumerate() {
            let ring = &self.rings[i * RING_LEN..(i + 1) * RING_LEN];
            let sums = window::sums(ring, w.bucket_ms, now_ms);
            if i < nw {
                o.windows[i] = sums;
            } else {
                o.rejected = sums;
            }
        }
        let now = secs(now_ms);
        let cutoff = now.saturating_sub(s.domains_window_secs);
        o.domains = self.domains.iter().filter(|&&(_, t)| t > cutoff).count() as u32;
        let mut b = self.baseline;
        b.roll(now_ms, p);
        o.rate = b.rate(now_ms);
        o.baseline = (f64::from(b.messages), f64::from(b.recipients));
        if let Some(ip) = ip {
            o.new_ip_age = self.new_ip_age(ip, now, s.cfg.new_ip.window.as_secs() as u32);
        }
        o
    }

    fn new_ip_age(&self, ip: IpAddr, now: u32, window: u32) -> Option<u32> {
        let k = self.ips.iter().find(|k| k.ip == ip)?;
        let age = now.saturating_sub(k.first);
        (k.new && age <= window).then_some(age)
    }

    /// A successful login from `ip`.
    pub fn login(&mut self, ip: IpAddr, now: u32, remember: usize) {
        self.last_seen = self.last_seen.max(now);
        if let Some(k) = self.ips.iter_mut().find(|k| k.ip == ip) {
            k.last = now;
            return;
        }
        let new = !self.ips.is_empty();
        if self.ips.len() >= remember
            && let Some(oldest) = self
                .ips
                .iter()
                .enumerate()
                .min_by_key(|(_, k)| k.last)
                .map(|(i, _)| i)
        {
            self.ips.swap_remove(oldest);
        }
        if self.ips.len() == self.ips.capacity() {
            // Most accounts log in from one to three addresses: grow one at a time.
            self.ips.reserve_exact(1);
        }
        self.ips.push(KnownIp {
            ip,
            first: now,
            last: now,
            new,
        });
    }
}

/// AUTH failures from one client address.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClientState {
    /// (when, hash of the user name) of recent failures, oldest first.
    pub fails: Vec<(u32, u32)>,
    /// Seconds since the epoch; 0: not blocked.
    pub blocked_until: u32,
}

/// Thresholds for AUTH failures, in seconds.
#[derive(Debug, Clone, Copy)]
pub struct FailLimits {
    pub window: u32,
    pub max_failures: u32,
    pub max_usernames: u32,
    pub block: u32,
}

impl ClientState {
    /// Records one failure; `Some((failures, distinct user names))` when it blocks the
    /// client (the failures are then forgotten: the block is the consequence).
    pub fn fail(&mut self, now: u32, user: u32, l: FailLimits) -> Option<(u32, u32)> {
        let cutoff = now.saturating_sub(l.window);
        self.fails.retain(|&(t, _)| t > cutoff);
        self.fails.push((now, user));
        let keep = l.max_failures as usize + 1;
        if self.fails.len() > keep {
            let excess = self.fails.len() - keep;
            self.fails.drain(..excess);
        }
        let failures = self.fails.len() as u32;
        let mut users: Vec<u32> = self.fails.iter().map(|&(_, u)| u).collect();
        users.sort_unstable();
        users.dedup();
        let users = users.len() as u32;
        if failures > l.max_failures || users > l.max_usernames {
            self.blocked_until = now.saturating_add(l.block);
            self.fails.clear();
            return Some((failures, users));
        }
        None
    }

    pub fn blocked(&self, now: u32) -> Option<u32> {
        (self.blocked_until > now).then_some(self.blocked_until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_are_deduplicated_case_insensitively() {
        let d = domain_hashes(&[
            "a@Example.org".into(),
            "b@example.ORG".into(),
            "<c@other.net>".into(),
        ]);
        assert_eq!(d.len(), 2);
        assert!(d.contains(&fnv32("example.org")));
        assert!(d.contains(&fnv32("other.net")));
    }

    #[test]
    fn logins_mark_new_addresses() {
        let mut a = AccountState {
            created: 0,
            last_seen: 0,
            messages: 0,
            rings: Box::new([]),
            baseline: Baseline::new(0, 0.0, 0.0),
            domains: vec![],
            ips: vec![],
            last_alert: 0,
            last_from_alert: 0,
        };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        a.login(ip("192.0.2.1"), 100, 2);
        assert!(!a.ips[0].new, "the first address ever is not 'new'");
        a.login(ip("192.0.2.2"), 200, 2);
        assert!(a.ips[1].new);
        assert_eq!(a.new_ip_age(ip("192.0.2.2"), 260, 3600), Some(60));
        assert_eq!(a.new_ip_age(ip("192.0.2.2"), 200 + 3601, 3600), None);
        assert_eq!(a.new_ip_age(ip("192.0.2.1"), 260, 3600), None);
        a.login(ip("192.0.2.1"), 300, 2);
        a.login(ip("192.0.2.3"), 400, 2);
        assert_eq!(a.ips.len(), 2, "bounded by `remember`");
        assert!(
            a.ips.iter().all(|k| k.ip != ip("192.0.2.2")),
            "least recently seen dropped"
        );
    }

    #[test]
    fn failures_block_by_count_or_usernames() {
        let l = FailLimits {
            window: 600,
            max_failures: 3,
            max_usernames: 2,
            block: 3600,
        };
        let mut c = ClientState::default();
        assert_eq!(c.fail(1000, 1, l), None);
        assert_eq!(c.fail(1001, 1, l), None);
        assert_eq!(c.fail(1002, 1, l), None);
        assert_eq!(c.fail(1003, 1, l), Some((4, 1)));
        assert_eq!(c.blocked(1004), Some(4603));
        assert_eq!(c.blocked(4603), None);
        let mut c = ClientState::default();
        assert_eq!(c.fail(1000, 1, l), None);
        assert_eq!(c.fail(1001, 2, l), None);
        assert_eq!(c.fail(1002, 3, l), Some((3, 3)));
        // Failures older than the window do not count.
        let mut c = ClientState::default();
        for t in 0..10 {
            assert_eq!(c.fail(1000 + t * 601, 7, l), None);
        }
    }
}
