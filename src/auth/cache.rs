//! Parsed DNS data kept between messages: the DKIM keys and DMARC records mail-auth looks
//! up (through its `ResolverCache` hooks), the A records of its RFC 8020 "does the domain
//! exist" check, and our own parsed SPF records ([`super::spf::SpfCache`]). Without it
//! every message goes through hickory's cache (a query-keyed message cache, cloned on
//! every hit) and parses the same records again.
//!
//! [`TtlCache`] policy:
//!
//! * **Expiry.** An entry lives until the `valid_until` it was inserted with: the
//!   answer's TTL as hickory computes it (`Lookup::valid_until`: the smallest TTL of the
//!   answer, already decremented when hickory served it from its own cache). `get` never
//!   returns an entry at or past it, and an answer that is already expired when it is
//!   inserted (TTL 0) is not stored at all. What is put in is only ever a successful
//!   answer (mail-auth inserts nothing on a DNS error; the SPF cache never stores a
//!   temporary error), so a timeout or SERVFAIL is retried on the next message.
//! * **Bound.** At most `capacity` entries (`[dns] cache_entries`; 0 caches nothing),
//!   split evenly over up to [`SHARDS`] shards, each a std `Mutex` around a `HashMap`, so
//!   that concurrent sessions rarely wait for each other. A lock is held for one map
//!   operation and a clone of the value (reference-counted: cheap).
//! * **Eviction.** Inserting a new key into a full shard first drops the shard's expired
//!   entries. If that frees less than an eighth of the shard, the live entries that
//!   expire soonest are dropped too, until an eighth is free. That is one O(n) sweep per
//!   n/8 inserts at most: O(1) amortised per insert, whatever the traffic (a flood of
//!   distinct names cannot make every insert scan the shard). Entries closest to expiry
//!   are the cheapest to lose: they would have to be fetched again soonest anyway. It is
//!   not an LRU: a popular record with a short TTL can go before an unpopular one with a
//!   long TTL, the price of keeping a hit a plain `get` with no bookkeeping.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use mail_auth::{ResolverCache, Txt};

/// Most shards a cache is split into.
pub const SHARDS: usize = 8;

/// A bounded map whose entries expire (policy: see the module documentation).
pub struct TtlCache<K, V> {
    shards: Box<[Mutex<Shard<K, V>>]>,
    hasher: RandomState,
}

struct Shard<K, V> {
    map: HashMap<K, Entry<V>>,
    capacity: usize,
}

struct Entry<V> {
    value: V,
    valid_until: Instant,
}

impl<K: Hash + Eq, V: Clone> TtlCache<K, V> {
    /// A cache of at most `capacity` entries; 0 stores nothing.
    pub fn new(capacity: usize) -> Self {
        let shards = capacity.clamp(1, SHARDS);
        let shards = (0..shards)
            .map(|i| {
                Mutex::new(Shard {
                    map: HashMap::new(),
                    // The remainder goes to the first shards: the total is `capacity`.
                    capacity: capacity / shards + usize::from(i < capacity % shards),
                })
            })
            .collect();
        TtlCache {
            shards,
            hasher: RandomState::new(),
        }
    }

    /// The shard of `key`. `K: Borrow<Q>` guarantees that a key and its borrowed form
    /// hash alike, so both find the same shard.
    fn shard<Q: Hash + ?Sized>(&self, key: &Q) -> MutexGuard<'_, Shard<K, V>> {
        let i = self.hasher.hash_one(key) as usize % self.shards.len();
        // Every operation leaves the map consistent: a panic elsewhere while the lock was
        // held cannot have left it half-updated.
        self.shards[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The value of `key` if it has not expired.
    pub fn get<Q>(&self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let now = Instant::now();
        let mut shard = self.shard(key);
        match shard.map.get(key) {
            Some(entry) if entry.valid_until > now => Some(entry.value.clone()),
            Some(_) => {
                shard.map.remove(key);
                None
            }
            None => None,
        }
    }

    /// Removes `key`, returning its value if it had not expired.
    pub fn remove<Q>(&self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let now = Instant::now();
        let entry = self.shard(key).map.remove(key)?;
        (entry.valid_until > now).then_some(entry.value)
    }

    /// Stores `value` under `key` until `valid_until`; nothing when that is not in the
    /// future (a TTL of 0) or the capacity is 0.
    pub fn insert(&self, key: K, value: V, valid_until: Instant) {
        let now = Instant::now();
        if valid_until <= now {
            return;
        }
        let mut shard = self.shard(&key);
        if shard.capacity == 0 {
            return;
        }
        if shard.map.len() >= shard.capacity && !shard.map.contains_key(&key) {
            shard.make_room(now);
        }
        shard.map.insert(key, Entry { value, valid_until });
    }

    /// Entries currently stored, expired ones included.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).map.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<K: Hash + Eq, V> Shard<K, V> {
    /// Frees at least an eighth of the shard (at least one entry): the expired entries,
    /// then the live ones that expire soonest.
    fn make_room(&mut self, now: Instant) {
        self.map.retain(|_, e| e.valid_until > now);
        let keep = self.capacity - self.capacity.div_ceil(8);
        let Some(excess) = self.map.len().checked_sub(keep).filter(|&n| n > 0) else {
            return;
        };
        let mut expiries: Vec<Instant> = self.map.values().map(|e| e.valid_until).collect();
        let (_, &mut cutoff, _) = expiries.select_nth_unstable(excess - 1);
        // Everything expiring before the cutoff goes (fewer than `excess` entries), then
        // entries expiring exactly at it until `excess` are gone.
        self.map.retain(|_, e| e.valid_until >= cutoff);
        let mut at_cutoff = excess - (expiries.len() - self.map.len());
        self.map.retain(|_, e| {
            if at_cutoff > 0 && e.valid_until == cutoff {
                at_cutoff -= 1;
                false
            } else {
                true
            }
        });
    }
}

impl<K: Hash + Eq, V: Clone> ResolverCache<K, V> for TtlCache<K, V> {
    fn get<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        TtlCache::get(self, name)
    }

    fn remove<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        TtlCache::remove(self, name)
    }

    fn insert(&self, key: K, value: V, valid_until: Instant) {
        TtlCache::insert(self, key, value, valid_until)
    }
}

/// mail-auth's TXT cache: ARC keys (`s._domainkey.d`; DKIM's own are in
/// `dkim::KeyCache`), ATPS records (`h._atps.d`), DKIM
/// report records (`_report._domainkey.d`) and DMARC records (`_dmarc.d`), parsed, keyed
/// by the name alone. Without a cache, the same name looked up as two of these would be
/// parsed as each; from a shared cache, the second lookup would get the first one's
/// record (or parse error) and fail. Such names only come from crafted selectors or
/// domains (a From domain of `_domainkey.example.com` and a DKIM selector `_dmarc` both
/// give `_dmarc._domainkey.example.com`), but to keep every result as it was, a name is
/// only cached when it holds exactly one of the labels `_dmarc`, `_domainkey`, `_atps`,
/// `_report`: every one of the lookups above has its own label in its name, so two
/// different kinds of lookup never share a cached name.
pub struct TxtCache(TtlCache<Box<str>, Txt>);

impl TxtCache {
    pub fn new(capacity: usize) -> Self {
        TxtCache(TtlCache::new(capacity))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Whether `name` holds exactly one of the labels that mark what kind of TXT record is
/// looked up under it (see [`TxtCache`]).
fn one_record_kind(name: &str) -> bool {
    const KIND_LABELS: [&str; 4] = ["_dmarc", "_domainkey", "_atps", "_report"];
    name.split('.')
        .filter(|label| KIND_LABELS.iter().any(|k| label.eq_ignore_ascii_case(k)))
        .count()
        == 1
}

impl ResolverCache<Box<str>, Txt> for TxtCache {
    fn get<Q>(&self, name: &Q) -> Option<Txt>
    where
        Box<str>: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.get(name)
    }

    fn remove<Q>(&self, name: &Q) -> Option<Txt>
    where
        Box<str>: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.remove(name)
    }

    fn insert(&self, key: Box<str>, value: Txt, valid_until: Instant) {
        if one_record_kind(&key) {
            self.0.insert(key, value, valid_until);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::time::Duration;

    fn later(secs: u64) -> Instant {
        Instant::now() + Duration::from_secs(secs)
    }

    #[test]
    fn expiry_and_ttl_zero() {
        let c: TtlCache<Box<str>, u32> = TtlCache::new(1000);
        c.insert("a".into(), 1, later(60));
        assert_eq!(c.get("a"), Some(1));
        // TTL 0: valid until "now", already past when it is inserted.
        c.insert("zero".into(), 2, Instant::now());
        assert_eq!(c.get("zero"), None);
        assert_eq!(c.len(), 1);
        c.insert(
            "short".into(),
            3,
            Instant::now() + Duration::from_millis(20),
        );
        assert_eq!(c.get("short"), Some(3));
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(c.get("short"), None, "an expired entry is never returned");
        assert_eq!(c.len(), 1, "and is dropped when seen");
        assert_eq!(c.remove("a"), Some(1));
        assert!(c.is_empty());
    }

    #[test]
    fn capacity_zero_caches_nothing() {
        let c: TtlCache<u32, u32> = TtlCache::new(0);
        c.insert(1, 1, later(60));
        assert_eq!(c.get(&1), None);
        assert!(c.is_empty());
    }

    #[test]
    fn bounded_and_evicts_soonest_expiring() {
        for capacity in [1, 3, 8, 9, 100, 1000] {
            let c: TtlCache<u32, u32> = TtlCache::new(capacity);
            let total: usize = c.shards.iter().map(|s| s.lock().unwrap().capacity).sum();
            assert_eq!(total, capacity);
            // Long-lived entries first, then many short-lived ones: never over capacity.
            for k in 0..(3 * capacity as u32) {
                let ttl = if k < capacity as u32 / 2 {
                    3600
                } else {
                    60 + u64::from(k)
                };
                c.insert(k, k, later(ttl));
                assert!(c.len() <= capacity, "capacity {capacity}: {}", c.len());
            }
            // The newest entry is in (it was just inserted into room made for it).
            let last = 3 * capacity as u32 - 1;
            assert_eq!(c.get(&last), Some(last));
            // Replacing an existing key never evicts.
            let before = c.len();
            let present = (0..3 * capacity as u32)
                .find(|k| c.get(k).is_some())
                .unwrap();
            c.insert(present, 0, later(10));
            assert_eq!(c.len(), before);
            assert_eq!(c.get(&present), Some(0));
        }
    }

    #[test]
    fn eviction_prefers_expired_then_soonest() {
        let mut shard: Shard<u32, u32> = Shard {
            map: HashMap::new(),
            capacity: 16,
        };
        let now = Instant::now();
        for k in 0..16u32 {
            let valid_until = if k < 3 {
                now - Duration::from_secs(1)
            } else {
                now + Duration::from_secs(u64::from(k))
            };
            shard.map.insert(
                k,
                Entry {
                    value: k,
                    valid_until,
                },
            );
        }
        // Three expired: more than an eighth (2), only they go.
        shard.make_room(now);
        let mut keys: Vec<u32> = shard.map.keys().copied().collect();
        keys.sort();
        assert_eq!(keys, (3..16).collect::<Vec<_>>());
        // Fill again with live entries: the two expiring soonest go.
        for k in 16..19u32 {
            shard.map.insert(
                k,
                Entry {
                    value: k,
                    valid_until: now + Duration::from_secs(100),
                },
            );
        }
        shard.make_room(now);
        let mut keys: Vec<u32> = shard.map.keys().copied().collect();
        keys.sort();
        assert_eq!(keys, (5..19).collect::<Vec<_>>());
        // Equal expiries: exactly an eighth goes.
        let mut shard: Shard<u32, u32> = Shard {
            map: (0..16)
                .map(|k| {
                    (
                        k,
                        Entry {
                            value: k,
                            valid_until: now + Duration::from_secs(5),
                        },
                    )
                })
                .collect(),
            capacity: 16,
        };
        shard.make_room(now);
        assert_eq!(shard.map.len(), 14);
    }

    #[test]
    fn txt_names_of_one_kind_only() {
        assert!(one_record_kind("s2026._domainkey.example.com."));
        assert!(one_record_kind("_dmarc.example.com."));
        assert!(one_record_kind("abc._atps.example.net."));
        assert!(one_record_kind("sel.with.dots._domainkey.Example.COM."));
        assert!(!one_record_kind("_dmarc._domainkey.example.com."));
        assert!(!one_record_kind("_report._domainkey.example.com."));
        assert!(!one_record_kind("x._atps.y._domainkey.example.com."));
        assert!(!one_record_kind("www.example.com."));
    }
}
