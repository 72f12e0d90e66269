//! Replay: the logged inputs of past transactions through another policy, offline (no
//! DNS, no network), as a matrix old action × new action with the rules responsible
//! and examples per cell. The new verdict comes from [`PolicyInputs::evaluate`], the
//! proxy's own decision function.

use std::collections::BTreeMap;

use serde::Serialize;

use super::store::{DecisionSource, ScanStats};
use super::{Record, Stage};
use crate::policy::rules::{ActionKind, Policy};

/// Examples kept per cell.
pub const EXAMPLES_PER_CELL: usize = 3;

/// One transaction, short, to show in a cell or in the changed list.
#[derive(Debug, Clone, Serialize)]
pub struct Example {
    pub t: u64,
    pub session: String,
    pub client: String,
    pub mail_from: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    pub old: ActionKind,
    pub old_rule: String,
    pub new: ActionKind,
    pub new_rule: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quarantine_id: Option<String>,
}

/// One cell of the matrix.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Cell {
    pub count: u64,
    /// "old rule → new rule" with counts: who is responsible for the move.
    pub rules: BTreeMap<String, u64>,
    pub examples: Vec<Example>,
}

/// The outcome of one replay.
#[derive(Debug, Default, Serialize)]
pub struct Replay {
    pub from_ms: u64,
    pub to_ms: u64,
    pub total: u64,
    pub changed: u64,
    /// Keyed "old→new" (for JSON); see [`Replay::cell`].
    pub matrix: BTreeMap<String, Cell>,
    /// Every changed transaction, when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub changed_list: Option<Vec<Example>>,
    pub scan: ScanStatsOut,
}

#[derive(Debug, Default, Serialize)]
pub struct ScanStatsOut {
    pub files: usize,
    pub bad_lines: u64,
}

/// The actions in matrix order.
pub const ACTIONS: [ActionKind; 5] = [
    ActionKind::Accept,
    ActionKind::Tag,
    ActionKind::Quarantine,
    ActionKind::Defer,
    ActionKind::Reject,
];

fn key(old: ActionKind, new: ActionKind) -> String {
    format!("{}→{}", old.as_str(), new.as_str())
}

/// What `policy` decides for one logged transaction: the action and the rule. Only the
/// policy stage can change; the outbound stage decided before any rule ran.
pub fn replay_one(record: &Record, policy: &Policy) -> (ActionKind, String) {
    match (&record.stage, &record.inputs) {
        (Stage::Policy, Some(inputs)) => {
            let e = inputs.evaluate(policy);
            (e.action, e.rule)
        }
        _ => (record.action, record.rule.clone()),
    }
}

impl Replay {
    pub fn cell(&self, old: ActionKind, new: ActionKind) -> u64 {
        self.matrix.get(&key(old, new)).map_or(0, |c| c.count)
    }

    /// Counts one record.
    /// Counts one record; keeps it in the changed list while that has fewer than
    /// `keep_changed` entries.
    pub fn add(&mut self, record: &Record, policy: &Policy, keep_changed: usize) {
        let (new, new_rule) = replay_one(record, policy);
        self.total += 1;
        let cell = self.matrix.entry(key(record.action, new)).or_default();
        cell.count += 1;
        let responsible = if record.rule == new_rule {
            new_rule.clone()
        } else {
            format!("{} → {}", record.rule, new_rule)
        };
        *cell.rules.entry(responsible).or_default() += 1;
        let changed = record.action != new;
        let keep = changed
            && self
                .changed_list
                .as_ref()
                .is_some_and(|l| l.len() < keep_changed);
        if cell.examples.len() < EXAMPLES_PER_CELL || keep {
            let example = Example {
                t: record.t,
                session: record.session.clone(),
                client: record.client.clone(),
                mail_from: record.mail_from.clone(),
                from: record.headers.from.clone(),
                message_id: record.headers.message_id.clone(),
                old: record.action,
                old_rule: record.rule.clone(),
                new,
                new_rule,
                quarantine_id: record.quarantine_id.clone(),
            };
            if keep {
                self.changed_list
                    .get_or_insert_with(Vec::new)
                    .push(example.clone());
            }
            if cell.examples.len() < EXAMPLES_PER_CELL {
                cell.examples.push(example);
            }
        }
        if changed {
            self.changed += 1;
        }
    }
}

/// Replays `[from_ms, to_ms)` of `source` through `policy`, listing at most
/// `keep_changed` changed transactions (0: no list).
pub fn run(
    source: &dyn DecisionSource,
    policy: &Policy,
    from_ms: u64,
    to_ms: u64,
    keep_changed: usize,
    progress: &mut dyn FnMut(u64, u64),
) -> std::io::Result<Replay> {
    let mut replay = Replay {
        from_ms,
        to_ms,
        changed_list: (keep_changed > 0).then(Vec::new),
        ..Replay::default()
    };
    let stats: ScanStats = source.scan(
        from_ms,
        to_ms,
        &mut |r| replay.add(&r, policy, keep_changed),
        progress,
    )?;
    replay.scan = ScanStatsOut {
        files: stats.files,
        bad_lines: stats.bad_lines,
    };
    Ok(replay)
}

/// The human-readable report: the matrix, then each changed cell's rules and examples,
/// then (with `--changed`) every changed transaction.
pub fn render_text(r: &Replay) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} transactions replayed, {} change action ({} files{})",
        r.total,
        r.changed,
        r.scan.files,
        if r.scan.bad_lines > 0 {
            format!(", {} unreadable lines skipped", r.scan.bad_lines)
        } else {
            String::new()
        }
    );
    let _ = writeln!(s);
    let _ = write!(s, "{:<12}", "old \\ new");
    for a in ACTIONS {
        let _ = write!(s, "{:>12}", a.as_str());
    }
    let _ = writeln!(s);
    for old in ACTIONS {
        let _ = write!(s, "{:<12}", old.as_str());
        for new in ACTIONS {
            let _ = write!(s, "{:>12}", r.cell(old, new));
        }
        let _ = writeln!(s);
    }
    for old in ACTIONS {
        for new in ACTIONS {
            let Some(cell) = r.matrix.get(&key(old, new)) else {
                continue;
            };
            let _ = writeln!(s);
            let _ = writeln!(
                s,
                "{} → {}: {}{}",
                old.as_str(),
                new.as_str(),
                cell.count,
                if old == new { "" } else { "  (changed)" }
            );
            for (rule, n) in &cell.rules {
                let _ = writeln!(s, "  rule {rule}: {n}");
            }
            for e in &cell.examples {
                let _ = writeln!(s, "  e.g. {}", example_line(e));
            }
        }
    }
    if let Some(list) = &r.changed_list {
        let _ = writeln!(s);
        let _ = writeln!(s, "changed transactions ({}):", list.len());
        for e in list {
            let _ = writeln!(
                s,
                "  {} → {}  {}",
                e.old.as_str(),
                e.new.as_str(),
                example_line(e)
            );
        }
    }
    s
}

fn example_line(e: &Example) -> String {
    format!(
        "{} session {} client {} mail from <{}> from {} id {} rule {} → {}{}",
        crate::decision_log::replay::rfc3339(e.t),
        e.session,
        e.client,
        e.mail_from,
        e.from.as_deref().unwrap_or("-"),
        e.message_id.as_deref().unwrap_or("-"),
        e.old_rule,
        e.new_rule,
        e.quarantine_id
            .as_deref()
            .map_or(String::new(), |q| format!(" quarantine {q}"))
    )
}

/// `2026-12-03T15:04:05Z` for Unix milliseconds (UTC; civil-from-days, H. Hinnant).
pub fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let (y, m, d) = crate::wire::trace::civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Unix milliseconds of `YYYY-MM-DDTHH:MM:SSZ` (or `YYYY-MM-DD`, or Unix seconds).
pub fn parse_time(s: &str) -> Result<u64, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(secs * 1000);
    }
    let bad = || format!("`{s}`: expected YYYY-MM-DD, YYYY-MM-DDTHH:MM:SSZ or Unix seconds");
    let (date, time) = match s.split_once(['T', ' ']) {
        Some((d, t)) => (d, t.trim_end_matches('Z')),
        None => (s, "00:00:00"),
    };
    let num = |v: &str| v.parse::<i64>().map_err(|_| bad());
    let dp: Vec<&str> = date.split('-').collect();
    let tp: Vec<&str> = time.split(':').collect();
    if dp.len() != 3 || tp.len() != 3 {
        return Err(bad());
    }
    let (y, m, d) = (num(dp[0])?, num(dp[1])?, num(dp[2])?);
    let (hh, mm, ss) = (num(tp[0])?, num(tp[1])?, num(tp[2])?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return Err(bad());
    }
    // days-from-civil (H. Hinnant).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    u64::try_from(secs).map(|s| s * 1000).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip() {
        let ms = parse_time("2026-12-03T15:04:05Z").unwrap();
        assert_eq!(rfc3339(ms), "2026-12-03T15:04:05Z");
        assert_eq!(parse_time("1970-01-02").unwrap(), 86_400_000);
        assert_eq!(parse_time("2000-03-01").unwrap(), 951_868_800_000);
        assert!(parse_time("2026-13-01").is_err());
        assert!(parse_time("yesterday").is_err());
    }
}
