//! Bounded work per message: one count of DNS lookups shared by every check of one
//! message (`[auth] max_dns_lookups`), and the per-message cache wrappers through which
//! mail-auth's lookups are counted.
//!
//! Where the count is taken. Every DNS query made for a message goes through one of
//! three places, and each asks [`DnsBudget::take`] just before it queries:
//!
//! * our SPF evaluator ([`super::spf`]), in its one `query` function (its own RFC 7208
//!   limits of 10 DNS terms and 2 void lookups still apply, inside this one);
//! * our DKIM key fetch ([`super::dkim`]), on a key-cache miss;
//! * mail-auth (ARC keys, DMARC records, the RFC 8020 A lookup of its DMARC check). It
//!   asks the `ResolverCache` it is given before every TXT or A lookup and queries only
//!   on a miss, so [`MessageTxt`] and [`MessageIpv4`] wrap the shared caches for one
//!   message: a miss is exactly one query about to be made. Past the limit they answer
//!   with a stand-in (an error record, an empty address set) instead of `None`, so
//!   mail-auth makes no query, and the check that wanted it is made a `permerror` by the
//!   caller, who sees [`DnsBudget::refused`] grow during that check.
//!
//! This is the narrowest seam mail-auth offers: wrapping its resolver would mean
//! forking it, and counting after the fact could not stop the lookup. A cached answer
//! costs nothing and is not counted: the limit bounds the work a message can make us
//! and the DNS servers do, not how many names it mentions.

use std::borrow::Borrow;
use std::hash::Hash;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use mail_auth::{DnsError, DnssecStatus, Error, RecordSet, ResolverCache, Txt};

use super::cache::{TtlCache, TxtCache};

/// The DNS lookups one message may still make.
#[derive(Debug)]
pub struct DnsBudget {
    limit: u32,
    used: AtomicU32,
    refused: AtomicU32,
}

impl DnsBudget {
    pub fn new(limit: u32) -> DnsBudget {
        DnsBudget {
            limit,
            used: AtomicU32::new(0),
            refused: AtomicU32::new(0),
        }
    }

    /// Takes one lookup: `true` if it may be made, `false` (counted as refused) once
    /// `limit` lookups were made.
    pub fn take(&self) -> bool {
        let ok = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.limit).then_some(n + 1)
            })
            .is_ok();
        if !ok {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// Lookups made so far.
    pub fn used(&self) -> u32 {
        self.used.load(Ordering::Relaxed)
    }

    /// Lookups refused so far (wanted past the limit).
    pub fn refused(&self) -> u32 {
        self.refused.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> u32 {
        self.limit
    }
}

/// The reason given for a check cut short by the limit.
pub const LIMIT_REASON: &str = "DNS lookup limit per message reached";

/// mail-auth's TXT cache for one message: the shared [`TxtCache`], with every miss
/// counted against the message's [`DnsBudget`].
pub struct MessageTxt<'a> {
    pub shared: &'a TxtCache,
    pub budget: &'a DnsBudget,
    /// ARC keys already fetched for this message through our DNS path (stale ones
    /// included): asked first ([`super::arc_keys`]).
    pub prefetched: Option<&'a super::arc_keys::Prefetched>,
}

impl ResolverCache<Box<str>, Txt> for MessageTxt<'_> {
    fn get<Q>(&self, name: &Q) -> Option<Txt>
    where
        Box<str>: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if let Some(hit) = self.prefetched.and_then(|p| p.0.get(name)) {
            return Some(hit.clone());
        }
        if let Some(hit) = self.shared.get(name) {
            return Some(hit);
        }
        // A miss: mail-auth queries next, unless we answer for it. The stand-in is a
        // permanent error, never cached (`insert` is not called for it).
        (!self.budget.take()).then(|| Txt::Error(Error::Dns(DnsError::InvalidRecordType)))
    }

    fn remove<Q>(&self, name: &Q) -> Option<Txt>
    where
        Box<str>: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.shared.remove(name)
    }

    fn insert(&self, key: Box<str>, value: Txt, valid_until: Instant) {
        self.shared.insert(key, value, valid_until)
    }
}

/// mail-auth's A-record cache for one message, counted like [`MessageTxt`]. Past the
/// limit the stand-in is an empty address set.
pub struct MessageIpv4<'a> {
    pub shared: &'a TtlCache<Box<str>, RecordSet<Ipv4Addr>>,
    pub budget: &'a DnsBudget,
}

impl ResolverCache<Box<str>, RecordSet<Ipv4Addr>> for MessageIpv4<'_> {
    fn get<Q>(&self, name: &Q) -> Option<RecordSet<Ipv4Addr>>
    where
        Box<str>: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if let Some(hit) = self.shared.get(name) {
            return Some(hit);
        }
        (!self.budget.take()).then(|| RecordSet {
            rrset: Arc::from(Vec::new()),
            dnssec_status: DnssecStatus::Indeterminate,
        })
    }

    fn remove<Q>(&self, name: &Q) -> Option<RecordSet<Ipv4Addr>>
    where
        Box<str>: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.shared.remove(name)
    }

    fn insert(&self, key: Box<str>, value: RecordSet<Ipv4Addr>, valid_until: Instant) {
        self.shared.insert(key, value, valid_until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn budget_counts_and_refuses_past_the_limit() {
        let b = DnsBudget::new(2);
        assert!(b.take());
        assert!(b.take());
        assert!(!b.take());
        assert!(!b.take());
        assert_eq!((b.used(), b.refused()), (2, 2));
        let none = DnsBudget::new(0);
        assert!(!none.take());
        assert_eq!((none.used(), none.refused()), (0, 1));
    }

    #[test]
    fn wrappers_count_misses_only_and_stand_in_past_the_limit() {
        let shared = TxtCache::new(100);
        let later = Instant::now() + Duration::from_secs(60);
        shared.insert(
            "_dmarc.example.com.".into(),
            Txt::Error(Error::Dns(DnsError::InvalidRecordType)),
            later,
        );
        let budget = DnsBudget::new(1);
        let txt = MessageTxt {
            shared: &shared,
            budget: &budget,
            prefetched: None,
        };
        // A hit costs nothing.
        assert!(txt.get("_dmarc.example.com.").is_some());
        assert_eq!(budget.used(), 0);
        // A miss takes one lookup and lets mail-auth query.
        assert!(txt.get("_dmarc.example.net.").is_none());
        assert_eq!(budget.used(), 1);
        // Past the limit: a stand-in error, so no query is made.
        assert!(matches!(
            txt.get("_dmarc.example.org."),
            Some(Txt::Error(Error::Dns(DnsError::InvalidRecordType)))
        ));
        assert_eq!(budget.refused(), 1);

        let a: TtlCache<Box<str>, RecordSet<Ipv4Addr>> = TtlCache::new(10);
        let v4 = MessageIpv4 {
            shared: &a,
            budget: &budget,
        };
        let stand_in = v4.get("example.org.").expect("past the limit");
        assert!(stand_in.rrset.is_empty());
        assert_eq!(budget.refused(), 2);
    }
}
