//! Where decision-log records live. The embedded store is a directory of append-only
//! JSON-lines files, one record a line, named after the time of their first record
//! (`decisions-<unix ms>.jsonl`): a window of time is a run of files, read in order.
//! Files rotate by size and age; closed files go by age (`retention`) and, oldest
//! first, when all together pass `max_bytes`.
//!
//! No fsync: the log is the policy's memory, not a promise to a client (the mail itself
//! is relayed or quarantined durably elsewhere); a crash costs at most the last lines,
//! and a torn last line is skipped (and counted) by the reader.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::Record;
use crate::config::decision_log::DecisionLogConfig;

/// Appends records. Implementations may batch but must keep order.
pub trait DecisionStore: Send {
    fn append(&mut self, batch: &[Record]) -> io::Result<()>;
}

/// Reads records back, oldest first, within `[from_ms, to_ms)`.
pub trait DecisionSource {
    /// `progress(done, total)` in store units (bytes for files) as reading goes.
    fn scan(
        &self,
        from_ms: u64,
        to_ms: u64,
        each: &mut dyn FnMut(Record),
        progress: &mut dyn FnMut(u64, u64),
    ) -> io::Result<ScanStats>;
}

/// What a scan met besides records.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct ScanStats {
    /// Lines that did not parse (a torn last line after a crash, a foreign edit).
    pub bad_lines: u64,
    pub files: usize,
}

const PREFIX: &str = "decisions-";
/// How far out of time order two records may be written (a session's decision time
/// against the queue's order): far more than a queue of [`super::DecisionLog`] holds.
const ORDER_SLACK_MS: u64 = 60_000;
const SUFFIX: &str = ".jsonl";

/// The embedded store: JSON lines under `[decision_log] dir`.
pub struct FileStore {
    dir: PathBuf,
    max_file_bytes: u64,
    max_file_age: Duration,
    retention: Duration,
    max_bytes: u64,
    current: Option<Current>,
}

struct Current {
    out: BufWriter<File>,
    bytes: u64,
    opened: Instant,
}

impl FileStore {
    pub fn new(cfg: &DecisionLogConfig) -> FileStore {
        FileStore {
            dir: cfg.dir.clone(),
            max_file_bytes: cfg.max_file_bytes,
            max_file_age: cfg.max_file_age,
            retention: cfg.retention,
            max_bytes: cfg.max_bytes,
            current: None,
        }
    }

    /// A reader over `dir` (the offline commands).
    pub fn reader(dir: &Path) -> FileReader {
        FileReader {
            dir: dir.to_path_buf(),
        }
    }

    fn open_new(&mut self, first_ms: u64) -> io::Result<()> {
        create_private_dir(&self.dir)?;
        let mut ms = first_ms;
        // Two files in one millisecond (rotation by size): the next free name.
        let file = loop {
            let path = self.dir.join(format!("{PREFIX}{ms:013}{SUFFIX}"));
            match open_private(&path) {
                Ok(f) => break f,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => ms += 1,
                Err(e) => return Err(e),
            }
        };
        self.current = Some(Current {
            out: BufWriter::with_capacity(256 * 1024, file),
            bytes: 0,
            opened: Instant::now(),
        });
        self.enforce_retention();
        Ok(())
    }

    /// Deletes closed files past `retention`, then the oldest ones while the total is
    /// over `max_bytes`. The newest file (the one being written) always stays.
    fn enforce_retention(&self) {
        let Ok(mut files) = list_files(&self.dir) else {
            return;
        };
        let Some(_newest) = files.pop() else { return };
        let now = super::now_ms();
        let keep_ms = self.retention.as_millis() as u64;
        let mut total: u64 = files.iter().map(|f| f.bytes).sum();
        for f in &files {
            // A closed file's last record is as old as its last write.
            if now.saturating_sub(f.modified_ms) > keep_ms || total > self.max_bytes {
                if let Err(e) = fs::remove_file(&f.path) {
                    tracing::warn!(file = %f.path.display(), error = %e, "decision log: cannot delete an old file");
                    continue;
                }
                total -= f.bytes;
            }
        }
    }
}

impl DecisionStore for FileStore {
    fn append(&mut self, batch: &[Record]) -> io::Result<()> {
        let Some(first) = batch.first() else {
            return Ok(());
        };
        let rotate = self.current.as_ref().is_none_or(|c| {
            c.bytes >= self.max_file_bytes || c.opened.elapsed() >= self.max_file_age
        });
        if rotate {
            if let Some(mut c) = self.current.take() {
                c.out.flush()?;
            }
            self.open_new(first.t)?;
        }
        let Some(c) = self.current.as_mut() else {
            return Ok(());
        };
        let mut line = Vec::with_capacity(1024);
        for r in batch {
            line.clear();
            serde_json::to_writer(&mut line, r).map_err(io::Error::other)?;
            line.push(b'\n');
            c.out.write_all(&line)?;
            c.bytes += line.len() as u64;
        }
        // Readers (replay, the What-if page) see each batch at once.
        c.out.flush()
    }
}

/// Reads the files of a decision-log directory.
pub struct FileReader {
    dir: PathBuf,
}

struct LogFile {
    path: PathBuf,
    first_ms: u64,
    bytes: u64,
    modified_ms: u64,
}

fn list_files(dir: &Path) -> io::Result<Vec<LogFile>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(ms) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|n| n.strip_suffix(SUFFIX))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        let meta = entry.metadata()?;
        let modified_ms = meta
            .modified()
            .ok()
            .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as u64);
        out.push(LogFile {
            path: entry.path(),
            first_ms: ms,
            bytes: meta.len(),
            modified_ms,
        });
    }
    out.sort_by_key(|f| f.first_ms);
    Ok(out)
}

impl DecisionSource for FileReader {
    fn scan(
        &self,
        from_ms: u64,
        to_ms: u64,
        each: &mut dyn FnMut(Record),
        progress: &mut dyn FnMut(u64, u64),
    ) -> io::Result<ScanStats> {
        let files = match list_files(&self.dir) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        // Files that can hold records of the window: those starting before its end
        // whose successor does not start before its beginning. Sessions queue records
        // in nearly, not exactly, time order, so a file may hold records a little newer
        // than its successor's first: [`ORDER_SLACK_MS`] of margin (records are still
        // filtered one by one).
        let wanted: Vec<&LogFile> = files
            .iter()
            .enumerate()
            .filter(|(i, f)| {
                f.first_ms < to_ms.saturating_add(ORDER_SLACK_MS)
                    && files
                        .get(i + 1)
                        .is_none_or(|n| n.first_ms > from_ms.saturating_sub(ORDER_SLACK_MS))
            })
            .map(|(_, f)| f)
            .collect();
        let total: u64 = wanted.iter().map(|f| f.bytes).sum();
        let mut stats = ScanStats {
            files: wanted.len(),
            ..ScanStats::default()
        };
        let mut done = 0u64;
        for f in wanted {
            let text = match fs::read(&f.path) {
                Ok(t) => t,
                // Deleted by retention between listing and reading.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let mut since_progress = 0usize;
            for line in text.split(|&b| b == b'\n') {
                done += line.len() as u64 + 1;
                if line.is_empty() {
                    continue;
                }
                match serde_json::from_slice::<Record>(line) {
                    Ok(r) if r.t >= from_ms && r.t < to_ms => each(r),
                    Ok(_) => {}
                    Err(_) => stats.bad_lines += 1,
                }
                since_progress += 1;
                if since_progress == 4096 {
                    since_progress = 0;
                    progress(done.min(total), total);
                }
            }
        }
        progress(total, total);
        Ok(stats)
    }
}

fn create_private_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
    }
    #[cfg(not(unix))]
    fs::create_dir_all(dir)
}

fn open_private(path: &Path) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.append(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    o.open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision_log::tests::sample;

    fn cfg(dir: &Path) -> DecisionLogConfig {
        DecisionLogConfig {
            dir: dir.to_path_buf(),
            max_file_bytes: 4096,
            max_bytes: 3 * 4096,
            ..DecisionLogConfig::default()
        }
    }

    fn all(dir: &Path, from: u64, to: u64) -> (Vec<Record>, ScanStats) {
        let mut out = Vec::new();
        let stats = FileStore::reader(dir)
            .scan(from, to, &mut |r| out.push(r), &mut |_, _| {})
            .unwrap();
        (out, stats)
    }

    /// Records come back in order, a window selects by time, files rotate by size and
    /// the oldest go once the total passes `max_bytes`.
    #[test]
    fn append_rotate_read_back_and_retain() {
        let dir = tempfile::tempdir().unwrap();
        let now = crate::decision_log::now_ms();
        let mut store = FileStore::new(&cfg(dir.path()));
        for n in 0..10 {
            store.append(&[sample(now + n as u64, n)]).unwrap();
        }
        let (got, _) = all(dir.path(), 0, u64::MAX);
        assert_eq!(got.len(), 10);
        assert_eq!(got[3], sample(now + 3, 3));
        let (window, _) = all(dir.path(), now + 2, now + 5);
        assert_eq!(
            window.iter().map(|r| r.t - now).collect::<Vec<_>>(),
            vec![2, 3, 4]
        );
        // ~700 bytes a record: many files, and never more than max_bytes + one file.
        for n in 10..200 {
            store.append(&[sample(now + n as u64, n)]).unwrap();
        }
        let files = list_files(dir.path()).unwrap();
        assert!(files.len() > 2, "rotated: {}", files.len());
        let total: u64 = files.iter().map(|f| f.bytes).sum();
        assert!(total <= 4 * 4096 + 1024, "retained {total} bytes");
        let (got, stats) = all(dir.path(), 0, u64::MAX);
        assert_eq!(got.last().unwrap().t, now + 199);
        assert!(got.len() < 200, "the oldest were deleted");
        assert_eq!(stats.bad_lines, 0);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&files[0].path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    /// Files past `retention` go; a torn last line is skipped and counted.
    #[test]
    fn old_files_expire_and_torn_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join(format!("{PREFIX}{:013}{SUFFIX}", 1_000));
        let mut line = serde_json::to_vec(&sample(1_000, 0)).unwrap();
        line.extend_from_slice(b"\n{\"t\":12");
        fs::write(&old, &line).unwrap();
        let eight_days_ago = std::time::SystemTime::now() - Duration::from_secs(8 * 86_400);
        File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(eight_days_ago)
            .unwrap();
        let (got, stats) = all(dir.path(), 0, u64::MAX);
        assert_eq!((got.len(), stats.bad_lines), (1, 1));
        let mut store = FileStore::new(&cfg(dir.path()));
        store
            .append(&[sample(crate::decision_log::now_ms(), 1)])
            .unwrap();
        assert!(
            !old.exists(),
            "a file last written 8 days ago is past a week's retention"
        );
    }
}
