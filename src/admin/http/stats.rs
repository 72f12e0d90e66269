//! Verdicts over the last hours, for the dashboard chart: a ring of per-minute counts by
//! action, fed by sampling the process-wide `mailwarden_verdicts` counters (no hook in the
//! session path). Each sample adds what the counters gained since the previous one to the
//! current minute; a day of minutes is kept.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use serde::Serialize;

/// Minutes kept: 24 hours.
pub const RING_MINUTES: usize = 24 * 60;
/// How often the sampler runs (the API also samples when asked).
pub const SAMPLE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
/// The chart never gets more bars than this; buckets widen with the time span.
const MAX_BUCKETS: u64 = 72;

/// The verdict actions, in chart order.
pub const ACTIONS: [&str; 5] = ["accept", "tag", "quarantine", "defer", "reject"];

#[derive(Default)]
struct Ring {
    /// (minute since the epoch, counts by action), oldest first, minutes increasing.
    minutes: VecDeque<(u64, BTreeMap<String, u64>)>,
    /// Counter totals at the last sample.
    last: Option<BTreeMap<String, u64>>,
}

#[derive(Default)]
pub struct VerdictHistory {
    ring: Mutex<Ring>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Bucket {
    /// Seconds since the epoch at the start of the bucket.
    pub start: u64,
    pub counts: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize)]
pub struct Series {
    pub hours: u64,
    pub bucket_seconds: u64,
    pub actions: Vec<String>,
    pub buckets: Vec<Bucket>,
    /// Counter totals since the proxy started, by action.
    pub totals: BTreeMap<String, u64>,
}

/// Sums `mailwarden_verdicts_total{action="...",...} N` lines of the text exposition.
pub fn verdict_totals(exposition: &str) -> BTreeMap<String, u64> {
    let mut totals = BTreeMap::new();
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix("mailwarden_verdicts_total{") else {
            continue;
        };
        let Some(action) = rest
            .split_once("action=\"")
            .and_then(|(_, a)| a.split_once('"'))
            .map(|(a, _)| a)
        else {
            continue;
        };
        let Some(value) = rest
            .rsplit_once("} ")
            .and_then(|(_, v)| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        *totals.entry(action.to_string()).or_insert(0) += value.max(0.0) as u64;
    }
    totals
}

impl VerdictHistory {
    fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the counters now and books the increase into the current minute.
    pub fn sample(&self, now_secs: u64) {
        let totals = verdict_totals(&crate::metrics::global().render());
        self.record(now_secs, totals);
    }

    /// Books `totals` (counter values) at `now_secs`.
    pub fn record(&self, now_secs: u64, totals: BTreeMap<String, u64>) {
        let minute = now_secs / 60;
        let mut ring = self.ring();
        let delta: BTreeMap<String, u64> = match &ring.last {
            // Counters only grow; the first sample is the baseline (the admin server
            // starts with the proxy, so that is nearly always zero anyway).
            None => totals
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .filter(|(_, v)| *v > 0)
                .collect(),
            Some(last) => totals
                .iter()
                .map(|(k, v)| (k.clone(), v.saturating_sub(*last.get(k).unwrap_or(&0))))
                .filter(|(_, v)| *v > 0)
                .collect(),
        };
        ring.last = Some(totals);
        if ring.minutes.back().is_none_or(|(m, _)| *m < minute) {
            ring.minutes.push_back((minute, BTreeMap::new()));
        }
        if let Some((_, counts)) = ring.minutes.back_mut() {
            for (action, n) in delta {
                *counts.entry(action).or_insert(0) += n;
            }
        }
        while ring.minutes.len() > RING_MINUTES
            || ring
                .minutes
                .front()
                .is_some_and(|(m, _)| *m + RING_MINUTES as u64 <= minute)
        {
            ring.minutes.pop_front();
        }
    }

    /// The last `hours` (1 to 24) in at most 72 equal buckets, oldest first, empty ones
    /// included.
    pub fn series(&self, now_secs: u64, hours: u64) -> Series {
        let hours = hours.clamp(1, 24);
        let span_minutes = hours * 60;
        let bucket_minutes = span_minutes.div_ceil(MAX_BUCKETS).max(1);
        let n = span_minutes / bucket_minutes;
        let now_minute = now_secs / 60;
        // Buckets end with the current minute's bucket.
        let last_start = now_minute - now_minute % bucket_minutes;
        let first_start = last_start.saturating_sub((n - 1) * bucket_minutes);
        let mut buckets: Vec<Bucket> = (0..n)
            .map(|i| Bucket {
                start: (first_start + i * bucket_minutes) * 60,
                counts: BTreeMap::new(),
            })
            .collect();
        let ring = self.ring();
        for (minute, counts) in &ring.minutes {
            if *minute < first_start {
                continue;
            }
            let i = ((minute - first_start) / bucket_minutes) as usize;
            if let Some(b) = buckets.get_mut(i) {
                for (action, v) in counts {
                    *b.counts.entry(action.clone()).or_insert(0) += v;
                }
            }
        }
        let totals = ring.last.clone().unwrap_or_default();
        let mut actions: Vec<String> = ACTIONS.iter().map(|a| a.to_string()).collect();
        for a in totals.keys() {
            if !actions.contains(a) {
                actions.push(a.clone());
            }
        }
        Series {
            hours,
            bucket_seconds: bucket_minutes * 60,
            actions,
            buckets,
            totals,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn parses_the_exposition() {
        let text = "# TYPE mailwarden_verdicts counter\n\
            mailwarden_verdicts_total{action=\"accept\",rule=\"default\"} 3\n\
            mailwarden_verdicts_total{action=\"accept\",rule=\"x\"} 2\n\
            mailwarden_verdicts_total{rule=\"hold\",action=\"quarantine\"} 7\n\
            mailwarden_verdicts_created{action=\"accept\"} 1.7e9\n\
            # EOF\n";
        assert_eq!(
            verdict_totals(text),
            totals(&[("accept", 5), ("quarantine", 7)])
        );
    }

    #[test]
    fn books_increases_per_minute() {
        let h = VerdictHistory::default();
        let t0 = 1_700_000_000 / 60 * 60;
        h.record(t0, totals(&[("accept", 2)]));
        h.record(t0 + 30, totals(&[("accept", 3), ("reject", 1)]));
        h.record(t0 + 60, totals(&[("accept", 10), ("reject", 1)]));
        let s = h.series(t0 + 60, 1);
        assert_eq!(s.bucket_seconds, 60);
        assert_eq!(s.buckets.len(), 60);
        let last = &s.buckets[59];
        assert_eq!(last.start, t0 + 60);
        assert_eq!(last.counts, totals(&[("accept", 7)]));
        assert_eq!(
            s.buckets[58].counts,
            totals(&[("accept", 3), ("reject", 1)])
        );
        assert_eq!(s.totals, totals(&[("accept", 10), ("reject", 1)]));
        let wide = h.series(t0 + 60, 6);
        assert_eq!(wide.bucket_seconds, 300);
        assert_eq!(wide.buckets.len(), 72);
        let sum: u64 = wide.buckets.iter().flat_map(|b| b.counts.values()).sum();
        assert_eq!(sum, 11);
    }

    #[test]
    fn keeps_a_day() {
        let h = VerdictHistory::default();
        let t0 = 1_700_000_000;
        for i in 0..(RING_MINUTES as u64 + 100) {
            h.record(t0 + i * 60, totals(&[("accept", i)]));
        }
        assert!(h.ring().minutes.len() <= RING_MINUTES);
    }
}
