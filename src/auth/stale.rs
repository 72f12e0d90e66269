//! Serve-stale (RFC 8767) for authentication records: the last answer the DNS gave for
//! every name our checks looked up (SPF, DKIM keys, DMARC records, ARC keys, and the A/MX
//! lookups of SPF mechanisms), positive and negative, kept past its TTL for
//! `[dns] stale_max`.
//!
//! Policy (enforced by [`super::dns::DnsClient::lookup`], the one function every lookup
//! goes through):
//!
//! * **Only for outages.** A stale answer stands in for a fresh one only when the fresh
//!   lookup failed with a timeout, SERVFAIL, REFUSED or an unreachable server (or when
//!   every nameserver is known to be down, see [`super::servers`]). An answer from a
//!   server, NXDOMAIN included, replaces the stored one at once: a changed or removed
//!   record wins the moment any server answers.
//! * **Bounded.** At most `stale_max_entries` entries and `stale_max_bytes` bytes (an
//!   estimate of the heap an entry holds, see [`entry_bytes`]; `benches/stale_memory.rs`
//!   measures the real figure). A full store first drops the entries past their stale
//!   window, then the ones whose TTL ran out earliest, until an eighth is free.
//! * **Never beyond `stale_max`.** An entry is served until `expires + stale_max`, where
//!   `expires` is the end of its TTL; the persisted file keeps the same wall-clock times,
//!   so a restart cannot stretch it.
//! * **Visible.** A stale answer carries its age (time since it was fetched): the checks
//!   put it in their results, the Authentication-Results comment and the metrics.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hickory_resolver::proto::rr::rdata::{A, AAAA, MX, PTR, TXT};
use hickory_resolver::proto::rr::{Name, RData, RecordType};

/// The oldest stale answer one check used (shared by its lookups, which may run
/// concurrently): 0 when none, else the age in seconds plus one.
#[derive(Debug, Default)]
pub struct StaleMark(std::sync::atomic::AtomicU64);

impl StaleMark {
    /// Notes the age of a stale answer (`None`: a fresh one, nothing to note).
    pub fn note(&self, age: Option<Duration>) {
        if let Some(age) = age {
            self.0
                .fetch_max(age.as_secs() + 1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Age in seconds of the oldest stale answer used, if any.
    pub fn age_secs(&self) -> Option<u64> {
        self.0
            .load(std::sync::atomic::Ordering::Relaxed)
            .checked_sub(1)
    }
}

/// One remembered answer: the records of the asked type (none: NXDOMAIN or NODATA).
#[derive(Clone, Debug)]
pub struct StoredAnswer {
    pub records: Arc<[RData]>,
    /// When it was fetched from a server.
    pub fetched: Instant,
    /// The end of its TTL (the negative TTL for an empty answer).
    pub expires: Instant,
}

/// A bounded store of last-known answers, keyed by (lowercase name, type).
pub struct StaleStore {
    inner: Mutex<Inner>,
    max_entries: usize,
    max_bytes: usize,
    stale_max: Duration,
}

struct Inner {
    map: HashMap<(Box<str>, u16), StoredAnswer>,
    bytes: usize,
}

/// Fixed bytes counted per entry besides its name and data: the map slot (with the
/// spare capacity of a growing table), the key and value headers, the `Arc` header and
/// the allocator's own overhead. Set from `benches/stale_memory.rs` so that the estimate
/// is not below the measured resident memory (at 96 it was 0.88 of it).
const ENTRY_OVERHEAD: usize = 192;

/// The heap an entry holds, estimated: the name, the records (each `RData` inline plus
/// what it points to) and [`ENTRY_OVERHEAD`].
pub fn entry_bytes(name: &str, records: &[RData]) -> usize {
    let data: usize = records
        .iter()
        .map(|r| {
            std::mem::size_of::<RData>()
                + match r {
                    RData::TXT(t) => t.txt_data.iter().map(|s| s.len() + 16).sum::<usize>(),
                    RData::MX(mx) => mx.exchange.len() + 32,
                    RData::PTR(p) => p.0.len() + 32,
                    _ => 0,
                }
        })
        .sum();
    ENTRY_OVERHEAD + name.len() + data
}

impl StaleStore {
    /// `stale_max` zero keeps nothing (serve-stale off).
    pub fn new(max_entries: usize, max_bytes: usize, stale_max: Duration) -> StaleStore {
        StaleStore {
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                bytes: 0,
            }),
            max_entries,
            max_bytes,
            stale_max,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every operation leaves the map and byte count consistent.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn enabled(&self) -> bool {
        !self.stale_max.is_zero() && self.max_entries > 0 && self.max_bytes > 0
    }

    /// Remembers a fresh answer (replacing whatever was known for the name).
    pub fn put(&self, name: &str, rtype: RecordType, answer: StoredAnswer) {
        if !self.enabled() {
            return;
        }
        let size = entry_bytes(name, &answer.records);
        if size > self.max_bytes / 8 {
            return; // one huge answer may not push out an eighth of the store
        }
        let key = (name.to_ascii_lowercase().into_boxed_str(), u16::from(rtype));
        let mut inner = self.lock();
        if let Some(old) = inner.map.remove(&key) {
            inner.bytes -= entry_bytes(&key.0, &old.records);
        }
        if inner.map.len() >= self.max_entries || inner.bytes + size > self.max_bytes {
            self.make_room(&mut inner, Instant::now());
        }
        inner.bytes += size;
        inner.map.insert(key, answer);
    }

    /// The remembered answer for the name, if it is still within its stale window
    /// (`expires + stale_max`); whether it is past its TTL is for the caller to see.
    pub fn get(&self, name: &str, rtype: RecordType) -> Option<StoredAnswer> {
        if !self.enabled() {
            return None;
        }
        let key = (name.to_ascii_lowercase().into_boxed_str(), u16::from(rtype));
        let now = Instant::now();
        let mut inner = self.lock();
        let found = inner.map.get(&key)?;
        if found.expires + self.stale_max > now {
            return Some(found.clone());
        }
        let old = inner.map.remove(&key)?;
        inner.bytes -= entry_bytes(&key.0, &old.records);
        None
    }

    /// Entries and estimated bytes held now.
    pub fn usage(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.map.len(), inner.bytes)
    }

    /// Frees at least an eighth of the entry and byte bounds: entries past their stale
    /// window first, then those whose TTL ran out earliest (the least current data).
    fn make_room(&self, inner: &mut Inner, now: Instant) {
        let stale_max = self.stale_max;
        let keep_entries = self.max_entries - self.max_entries.div_ceil(8);
        let keep_bytes = self.max_bytes - self.max_bytes / 8;
        inner.map.retain(|_, a| a.expires + stale_max > now);
        let mut order: Vec<(Instant, (Box<str>, u16), usize)> = inner
            .map
            .iter()
            .map(|(k, a)| (a.expires, k.clone(), entry_bytes(&k.0, &a.records)))
            .collect();
        inner.bytes = order.iter().map(|e| e.2).sum();
        order.sort_unstable_by_key(|e| e.0);
        for (_, key, size) in order {
            if inner.map.len() <= keep_entries && inner.bytes <= keep_bytes {
                break;
            }
            inner.map.remove(&key);
            inner.bytes -= size;
        }
    }

    /// Writes every entry still within its stale window to `path` (temp file, fsync,
    /// rename): one JSON object a line, times as Unix seconds.
    pub fn save(&self, path: &Path) -> std::io::Result<usize> {
        let now_i = Instant::now();
        let now_s = SystemTime::now();
        let wall = |t: Instant| -> u64 {
            let at = if t >= now_i {
                now_s + (t - now_i)
            } else {
                now_s - (now_i - t)
            };
            at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
        };
        let mut out = Vec::new();
        let mut n = 0;
        {
            let inner = self.lock();
            for ((name, rtype), a) in &inner.map {
                if a.expires + self.stale_max <= now_i {
                    continue;
                }
                let data: Vec<String> = a.records.iter().filter_map(encode_rdata).collect();
                let line = serde_json::json!({
                    "name": name, "type": rtype, "fetched": wall(a.fetched),
                    "expires": wall(a.expires), "data": data,
                });
                out.extend_from_slice(line.to_string().as_bytes());
                out.push(b'\n');
                n += 1;
            }
        }
        let tmp = path.with_extension("tmp");
        {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            f.write_all(&out)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        Ok(n)
    }

    /// Reads a file written by [`Self::save`]. Entries whose stale window ended (by the
    /// wall clock) are skipped, and so are lines that do not parse: a damaged file loses
    /// entries, never starts the proxy with wrong data. A missing file is no error.
    pub fn load(&self, path: &Path) -> std::io::Result<usize> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let now_s = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let now_i = Instant::now();
        // Wall-clock seconds to an Instant (never later than now for `fetched`).
        let instant = |secs: u64| -> Option<Instant> {
            if secs >= now_s {
                now_i.checked_add(Duration::from_secs(secs - now_s))
            } else {
                now_i.checked_sub(Duration::from_secs(now_s - secs))
            }
        };
        let mut n = 0;
        for line in text.lines() {
            let Some((name, rtype, answer)) = parse_line(line, &instant) else {
                continue;
            };
            if answer.fetched > now_i || answer.expires + self.stale_max <= now_i {
                continue;
            }
            self.put(&name, rtype, answer);
            n += 1;
        }
        Ok(n)
    }
}

fn parse_line(
    line: &str,
    instant: &dyn Fn(u64) -> Option<Instant>,
) -> Option<(String, RecordType, StoredAnswer)> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let name = v["name"].as_str()?.to_string();
    let rtype = RecordType::from(u16::try_from(v["type"].as_u64()?).ok()?);
    let fetched = instant(v["fetched"].as_u64()?)?;
    let expires = instant(v["expires"].as_u64()?)?;
    let records = v["data"]
        .as_array()?
        .iter()
        .map(|d| decode_rdata(rtype, d.as_str()?))
        .collect::<Option<Vec<_>>>()?;
    Some((
        name,
        rtype,
        StoredAnswer {
            records: records.into(),
            fetched,
            expires,
        },
    ))
}

/// The stored form of one record: hex for TXT (its strings concatenated, as every check
/// reads them), the presentation form for the others.
fn encode_rdata(r: &RData) -> Option<String> {
    Some(match r {
        RData::TXT(t) => t
            .txt_data
            .iter()
            .flatten()
            .map(|b| format!("{b:02x}"))
            .collect(),
        RData::A(a) => a.0.to_string(),
        RData::AAAA(a) => a.0.to_string(),
        RData::MX(mx) => format!("{} {}", mx.preference, mx.exchange),
        RData::PTR(p) => p.0.to_string(),
        _ => return None,
    })
}

fn decode_rdata(rtype: RecordType, s: &str) -> Option<RData> {
    Some(match rtype {
        RecordType::TXT => {
            if !s.len().is_multiple_of(2) {
                return None;
            }
            let bytes = (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
                .collect::<Option<Vec<u8>>>()?;
            // Strings of at most 255 octets (RFC 1035 §3.3.14); readers concatenate them.
            RData::TXT(TXT::from_bytes(bytes.chunks(255).collect()))
        }
        RecordType::A => RData::A(A(s.parse().ok()?)),
        RecordType::AAAA => RData::AAAA(AAAA(s.parse().ok()?)),
        RecordType::MX => {
            let (pref, name) = s.split_once(' ')?;
            RData::MX(MX::new(pref.parse().ok()?, Name::from_ascii(name).ok()?))
        }
        RecordType::PTR => RData::PTR(PTR(Name::from_ascii(s).ok()?)),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn txt(s: &str) -> Arc<[RData]> {
        vec![RData::TXT(TXT::new(vec![s.to_string()]))].into()
    }

    fn answer(records: Arc<[RData]>, ttl_secs: i64) -> StoredAnswer {
        let now = Instant::now();
        let expires = if ttl_secs >= 0 {
            now + Duration::from_secs(ttl_secs as u64)
        } else {
            now - Duration::from_secs((-ttl_secs) as u64)
        };
        StoredAnswer {
            records,
            fetched: now - Duration::from_secs(1),
            expires,
        }
    }

    #[test]
    fn served_within_stale_max_only() {
        let s = StaleStore::new(100, 1 << 20, Duration::from_secs(3600));
        s.put(
            "a.example.",
            RecordType::TXT,
            answer(txt("v=spf1 -all"), -10),
        );
        s.put("b.example.", RecordType::TXT, answer(txt("x"), -3601));
        assert!(
            s.get("A.Example.", RecordType::TXT).is_some(),
            "case-insensitive"
        );
        assert!(s.get("a.example.", RecordType::A).is_none(), "by type");
        assert!(
            s.get("b.example.", RecordType::TXT).is_none(),
            "past expires + stale_max"
        );
        assert_eq!(s.usage().0, 1, "and dropped when seen");
        // Off: nothing kept.
        let off = StaleStore::new(100, 1 << 20, Duration::ZERO);
        off.put("a.example.", RecordType::TXT, answer(txt("x"), 10));
        assert!(off.get("a.example.", RecordType::TXT).is_none());
    }

    #[test]
    fn bounded_in_entries_and_bytes() {
        let s = StaleStore::new(64, 1 << 30, Duration::from_secs(3600));
        for i in 0..1000 {
            s.put(
                &format!("n{i}.example."),
                RecordType::TXT,
                answer(txt("v"), i),
            );
            assert!(s.usage().0 <= 64);
        }
        // The newest (latest TTL end) survive; the earliest-expiring went first.
        assert!(s.get("n999.example.", RecordType::TXT).is_some());
        assert!(s.get("n0.example.", RecordType::TXT).is_none());

        let one = entry_bytes("n000.example.", &txt(&"k".repeat(400)));
        let s = StaleStore::new(1 << 20, one * 20, Duration::from_secs(3600));
        for i in 0..200 {
            s.put(
                &format!("n{i:03}.example."),
                RecordType::TXT,
                answer(txt(&"k".repeat(400)), 100 + i),
            );
            assert!(s.usage().1 <= one * 20, "bytes bound");
        }
        // Replacing an entry keeps the byte count exact.
        let (n, b) = s.usage();
        s.put(
            "n199.example.",
            RecordType::TXT,
            answer(txt(&"k".repeat(400)), 500),
        );
        assert_eq!(s.usage(), (n, b));
    }

    #[test]
    fn persisted_and_never_trusted_beyond_stale_max() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stale.jsonl");
        let s = StaleStore::new(100, 1 << 20, Duration::from_secs(3600));
        let long = "p=".to_string() + &"A".repeat(600); // over 255: several strings
        s.put(
            "k._domainkey.a.example.",
            RecordType::TXT,
            answer(txt(&long), -5),
        );
        s.put(
            "a.example.",
            RecordType::A,
            answer(vec![RData::A(A([127, 0, 0, 9].into()))].into(), 60),
        );
        s.put(
            "nx.example.",
            RecordType::TXT,
            answer(Vec::new().into(), 60),
        );
        s.put("gone.example.", RecordType::TXT, answer(txt("old"), -4000));
        assert_eq!(s.save(&path).unwrap(), 3);

        let t = StaleStore::new(100, 1 << 20, Duration::from_secs(3600));
        // A damaged line is skipped, not fatal.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{not json\n")
            .unwrap();
        assert_eq!(t.load(&path).unwrap(), 3);
        let k = t.get("k._domainkey.a.example.", RecordType::TXT).unwrap();
        let RData::TXT(got) = &k.records[0] else {
            panic!()
        };
        let joined: Vec<u8> = got.txt_data.iter().flatten().copied().collect();
        assert_eq!(joined, long.as_bytes());
        assert!(
            t.get("nx.example.", RecordType::TXT)
                .unwrap()
                .records
                .is_empty()
        );
        assert!(t.get("gone.example.", RecordType::TXT).is_none());
        // A shorter stale_max at the next start cuts the loaded entries too.
        let u = StaleStore::new(100, 1 << 20, Duration::from_secs(2));
        assert_eq!(u.load(&path).unwrap(), 2, "the key expired 5 s ago is out");
        assert_eq!(
            StaleStore::new(1, 1, Duration::from_secs(1))
                .load(&dir.path().join("none"))
                .unwrap(),
            0
        );
    }
}
