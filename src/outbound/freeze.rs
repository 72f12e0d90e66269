//! Frozen accounts: who froze them, why, until when, and every freeze and unfreeze
//! since, kept in `freeze_file` (memory backend; rewritten atomically on every change)
//! or in Redis.
//!
//! Also the command spool through which `mailwarden accounts freeze|unfreeze` reaches a
//! running proxy that keeps its state in memory: the CLI leaves one JSON file per command
//! in `command_dir` (written under a dot-name, fsync'd, renamed: a reader never sees half
//! a command); the proxy applies pending commands at start and then every second, writes
//! `NAME.result` next to it and removes `NAME.json`. A command survives a proxy that is
//! down: it is applied when the proxy starts.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Freeze events kept per account.
pub const HISTORY: usize = 50;
/// Accounts with a freeze history kept; beyond it the unfrozen ones with the oldest last
/// event are forgotten.
pub const MAX_RECORDS: usize = 10_000;
/// Largest command file read.
const MAX_COMMAND: u64 = 64 * 1024;

/// An account's current freeze.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Freeze {
    /// Seconds since the epoch.
    pub since: u64,
    /// When it ends by itself; `None`: when an administrator unfreezes the account.
    pub until: Option<u64>,
    pub by: String,
    pub why: String,
}

/// One freeze, unfreeze or expiry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FreezeEvent {
    /// Seconds since the epoch.
    pub at: u64,
    /// `freeze`, `unfreeze` or `expire`.
    pub action: String,
    pub by: String,
    pub why: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FreezeRecord {
    pub current: Option<Freeze>,
    /// Oldest first.
    pub history: Vec<FreezeEvent>,
}

/// Every account's freeze state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FreezeBook {
    #[serde(default)]
    pub version: u32,
    pub accounts: BTreeMap<String, FreezeRecord>,
}

impl Freeze {
    pub fn active(&self, now: u64) -> bool {
        self.until.is_none_or(|u| u > now)
    }
}

impl FreezeRecord {
    pub fn push(&mut self, e: FreezeEvent) {
        self.history.push(e);
        if self.history.len() > HISTORY {
            let excess = self.history.len() - HISTORY;
            self.history.drain(..excess);
        }
    }
}

impl FreezeBook {
    /// The account's freeze when it is in force at `now`.
    pub fn frozen(&self, account: &str, now: u64) -> Option<&Freeze> {
        self.accounts
            .get(account)?
            .current
            .as_ref()
            .filter(|f| f.active(now))
    }

    /// Freezes `account`; false when it already was.
    pub fn freeze(&mut self, account: &str, f: Freeze) -> bool {
        let now = f.since;
        if self.frozen(account, now).is_some() {
            return false;
        }
        let rec = self.accounts.entry(account.to_string()).or_default();
        rec.push(FreezeEvent {
            at: f.since,
            action: "freeze".into(),
            by: f.by.clone(),
            why: f.why.clone(),
            until: f.until,
        });
        rec.current = Some(f);
        self.bound();
        true
    }

    /// Unfreezes `account`; the freeze that was in force, if any.
    pub fn unfreeze(&mut self, account: &str, at: u64, by: &str, why: &str) -> Option<Freeze> {
        let rec = self.accounts.get_mut(account)?;
        let f = rec.current.take().filter(|f| f.active(at))?;
        rec.push(FreezeEvent {
            at,
            action: "unfreeze".into(),
            by: by.into(),
            why: why.into(),
            until: None,
        });
        Some(f)
    }

    /// Ends the freezes whose time ran out, recording it; returns them.
    pub fn expire(&mut self, now: u64) -> Vec<(String, Freeze)> {
        let mut out = Vec::new();
        for (account, rec) in self.accounts.iter_mut() {
            if let Some(f) = rec.current.take_if(|f| !f.active(now)) {
                rec.push(FreezeEvent {
                    at: f.until.unwrap_or(now),
                    action: "expire".into(),
                    by: super::DETECTOR.into(),
                    why: "freeze expired".into(),
                    until: None,
                });
                out.push((account.clone(), f));
            }
        }
        out
    }

    pub fn frozen_count(&self) -> usize {
        self.accounts
            .values()
            .filter(|r| r.current.is_some())
            .count()
    }

    fn bound(&mut self) {
        if self.accounts.len() <= MAX_RECORDS {
            return;
        }
        let mut idle: Vec<(u64, String)> = self
            .accounts
            .iter()
            .filter(|(_, r)| r.current.is_none())
            .map(|(a, r)| (r.history.last().map_or(0, |e| e.at), a.clone()))
            .collect();
        idle.sort();
        let excess = self.accounts.len() - MAX_RECORDS;
        for (_, a) in idle.into_iter().take(excess) {
            self.accounts.remove(&a);
        }
    }

    /// Reads `path`; a missing file is an empty book.
    pub fn load(path: &Path) -> Result<FreezeBook, String> {
        match fs::read(path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FreezeBook::default()),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        write_atomic(path, |w| {
            serde_json::to_writer_pretty(&mut *w, self).map_err(std::io::Error::other)?;
            w.write_all(b"\n")
        })
    }
}

/// Creates `dir` (and its parents) with mode 0700 when missing.
pub fn mkdir_private(dir: &Path) -> std::io::Result<()> {
    if dir.as_os_str().is_empty() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Writes `path` so that a reader (or a crash) sees either the old or the new content:
/// a dot-file in the same directory, fsync'd, renamed over `path`, directory fsync'd.
/// Mode 0600 (account names are people's addresses).
pub fn write_atomic(
    path: &Path,
    fill: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    mkdir_private(dir)?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("state");
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    let mut w = BufWriter::with_capacity(256 * 1024, file);
    let result = fill(&mut w)
        .and_then(|()| w.flush())
        .and_then(|()| w.get_ref().sync_all());
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    drop(w);
    fs::rename(&tmp, path)?;
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(dir)?.sync_all()
}

/// A freeze or unfreeze requested through the spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Freeze,
    Unfreeze,
    /// Asks for the account's live counters (`accounts show`): the answer's message is
    /// the account detail as JSON.
    Show,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Command {
    pub op: Op,
    pub account: String,
    pub by: String,
    pub why: String,
    /// Freeze only: ends by itself after this many seconds.
    #[serde(default)]
    pub expires_after: Option<u64>,
    /// When the command was written, seconds since the epoch.
    pub at: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommandResult {
    pub ok: bool,
    pub message: String,
}

/// Leaves `cmd` in the spool; returns its name (without extension).
pub fn submit(dir: &Path, cmd: &Command) -> std::io::Result<String> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static SEQ: AtomicU32 = AtomicU32::new(0);
    mkdir_private(dir)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    // Every numeric part is zero-padded: names sort in submission order (an unpadded
    // sequence put command 10 before command 9 of the same millisecond).
    let name = format!(
        "{:013}-{:010}-{:010}-{:09}",
        now.as_millis(),
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed),
        now.subsec_nanos()
    );
    write_atomic(&dir.join(format!("{name}.json")), |w| {
        serde_json::to_writer(&mut *w, cmd).map_err(std::io::Error::other)
    })?;
    Ok(name)
}

/// Commands waiting in the spool, oldest first: (name, the command or why it is unreadable).
pub fn pending(dir: &Path) -> Vec<(String, Result<Command, String>)> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.'))
        .filter_map(|n| n.strip_suffix(".json").map(str::to_string))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let path = dir.join(format!("{n}.json"));
            let cmd = File::open(&path)
                .and_then(|f| {
                    let mut s = String::new();
                    f.take(MAX_COMMAND).read_to_string(&mut s)?;
                    Ok(s)
                })
                .map_err(|e| e.to_string())
                .and_then(|s| serde_json::from_str::<Command>(&s).map_err(|e| e.to_string()));
            (n, cmd)
        })
        .collect()
}

/// Records the outcome of command `name` and removes it from the spool.
pub fn complete(dir: &Path, name: &str, result: &CommandResult) -> std::io::Result<()> {
    write_atomic(&dir.join(format!("{name}.result")), |w| {
        serde_json::to_writer(&mut *w, result).map_err(std::io::Error::other)
    })?;
    fs::remove_file(dir.join(format!("{name}.json")))
}

/// Takes command `name` back out of the spool if the proxy has not picked it up yet.
/// True when withdrawn: then it will never be applied.
pub fn withdraw(dir: &Path, name: &str) -> bool {
    fs::remove_file(dir.join(format!("{name}.json"))).is_ok()
}

/// Waits up to `timeout` for the outcome of command `name`, and removes it.
pub fn wait_result(dir: &Path, name: &str, timeout: Duration) -> Option<CommandResult> {
    let path = dir.join(format!("{name}.result"));
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(bytes) = fs::read(&path)
            && let Ok(r) = serde_json::from_slice::<CommandResult>(&bytes)
        {
            let _ = fs::remove_file(&path);
            return Some(r);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Removes results nobody collected, older than `age`.
pub fn clean_results(dir: &Path, age: Duration) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.filter_map(|e| e.ok()) {
        let is_result = e
            .file_name()
            .to_str()
            .is_some_and(|n| n.ends_with(".result"));
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|el| el > age);
        if is_result && old {
            let _ = fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(since: u64, until: Option<u64>) -> Freeze {
        Freeze {
            since,
            until,
            by: "admin".into(),
            why: "test".into(),
        }
    }

    #[test]
    fn freeze_unfreeze_expire_with_history() {
        let mut b = FreezeBook::default();
        assert!(b.freeze("a@x", f(100, None)));
        assert!(!b.freeze("a@x", f(101, None)), "already frozen");
        assert!(b.frozen("a@x", 5000).is_some());
        assert!(b.unfreeze("a@x", 200, "root", "false alarm").is_some());
        assert!(b.unfreeze("a@x", 201, "root", "again").is_none());
        assert!(b.freeze("a@x", f(300, Some(400))));
        assert!(b.frozen("a@x", 399).is_some());
        assert!(
            b.frozen("a@x", 400).is_none(),
            "expired even before expire() ran"
        );
        assert_eq!(b.expire(399).len(), 0);
        let gone = b.expire(401);
        assert_eq!(gone.len(), 1);
        let actions: Vec<&str> = b.accounts["a@x"]
            .history
            .iter()
            .map(|e| e.action.as_str())
            .collect();
        assert_eq!(actions, ["freeze", "unfreeze", "freeze", "expire"]);
        assert_eq!(b.accounts["a@x"].history[1].by, "root");
        assert_eq!(b.frozen_count(), 0);
    }

    #[test]
    fn file_round_trip_and_spool() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/freezes.json");
        let mut b = FreezeBook::default();
        b.freeze("a@x", f(100, Some(1000)));
        b.save(&path).unwrap();
        let back = FreezeBook::load(&path).unwrap();
        assert_eq!(back.accounts["a@x"].current, Some(f(100, Some(1000))));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(
            FreezeBook::load(&dir.path().join("missing.json"))
                .unwrap()
                .accounts
                .is_empty()
        );

        let spool = dir.path().join("commands");
        let cmd = Command {
            op: Op::Freeze,
            account: "a@x".into(),
            by: "cli:root".into(),
            why: "test".into(),
            expires_after: None,
            at: 1,
        };
        let n1 = submit(&spool, &cmd).unwrap();
        let n2 = submit(
            &spool,
            &Command {
                op: Op::Unfreeze,
                ..cmd.clone()
            },
        )
        .unwrap();
        fs::write(spool.join("junk.json"), "{").unwrap();
        let p = pending(&spool);
        assert_eq!(p.len(), 3);
        assert_eq!(p[0].0, n1);
        assert_eq!(p[1].1.as_ref().unwrap().op, Op::Unfreeze);
        assert!(p[2].1.is_err());
        complete(
            &spool,
            &n1,
            &CommandResult {
                ok: true,
                message: "frozen".into(),
            },
        )
        .unwrap();
        assert_eq!(pending(&spool).len(), 2);
        let r = wait_result(&spool, &n1, Duration::from_millis(10)).unwrap();
        assert!(r.ok);
        assert!(wait_result(&spool, &n2, Duration::from_millis(10)).is_none());
    }
}
