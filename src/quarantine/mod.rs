//! The quarantine store: messages held by policy, kept durably before the client hears
//! 250.
//!
//! Each entry is a directory `entries/<ID>/` holding `message.eml` (the exact bytes
//! received) and `meta.json`. It is written under `tmp/`, every file and the directory
//! fsync'd, then renamed into `entries/` in one step and `entries/` fsync'd: a crash at
//! any moment leaves either no entry or a whole one. Directories are 0700, files 0600,
//! and no path is ever built from anything but a [`QuarantineId`].
//!
//! `index.sqlite` makes the store queryable; it is written after the entry and rebuilt
//! from the entries' `meta.json` when a row is missing (a crash between the two).

pub mod capacity;
pub mod id;
pub mod index;
pub mod list_query;
pub mod pg;
pub mod state;
pub mod store;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

use capacity::{Capacity, Refusal, Usage};
pub use id::QuarantineId;
use index::{Filter, Index, Row};
pub use state::State;
pub use store::QuarantineStore;

/// What is kept about a held message besides its bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    pub id: String,
    /// Seconds since the Unix epoch.
    pub received_at: u64,
    pub session: String,
    pub listener: String,
    pub client: String,
    pub helo: String,
    /// The SASL login of a submission session (sent as XCLIENT LOGIN= on release, so
    /// the next hop relays the released message as the authenticated user's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login: Option<String>,
    pub mail_from: String,
    pub rcpts: Vec<String>,
    pub header_from: String,
    pub subject: String,
    pub size: usize,
    pub authentication_results: String,
    pub flags: Vec<String>,
    pub verdict: String,
    pub reasons: Vec<String>,
    /// Spelled as [`State::as_str`] in `meta.json` and the admin API's JSON.
    pub state: State,
    /// The mailwarden instance that accepted the message (`[quarantine] instance`): in a
    /// cluster sharing one PostgreSQL quarantine, where to look for its logs.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub instance: String,
}

pub struct Quarantine {
    root: PathBuf,
    index: Mutex<Index>,
    /// An index write failed after its entry was stored (e.g. the disk filled up
    /// between the two): the next store re-indexes, so the entry becomes visible to
    /// `list` without waiting for a restart.
    reindex_pending: AtomicBool,
    /// Limits for new entries (the proxy's `[quarantine]`); `None`: unlimited (the CLI,
    /// which never stores).
    capacity: Option<Capacity>,
    /// Entries admitted but not yet in the index (being written): counted against the
    /// capacity too, so concurrent sessions cannot all squeeze into the last free slot.
    /// Taken and released under the index lock.
    pending: Mutex<Pending>,
    /// Rate limit of the "quarantine full" WARN.
    full_alert: Mutex<FullAlert>,
}

#[derive(Default)]
struct Pending {
    total: Usage,
    by_domain: std::collections::HashMap<String, Usage>,
}

impl Pending {
    fn add(&mut self, domain: &str, u: Usage) {
        self.total = self.total.plus(u);
        let d = self.by_domain.entry(domain.to_string()).or_default();
        *d = d.plus(u);
    }

    fn remove(&mut self, domain: &str, u: Usage) {
        let minus = |a: Usage| Usage {
            entries: a.entries.saturating_sub(u.entries),
            bytes: a.bytes.saturating_sub(u.bytes),
        };
        self.total = minus(self.total);
        if let Some(d) = self.by_domain.get_mut(domain) {
            *d = minus(*d);
            if d.entries == 0 {
                self.by_domain.remove(domain);
            }
        }
    }
}

#[derive(Default)]
pub(crate) struct FullAlert {
    last: Option<std::time::Instant>,
    suppressed: u64,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("quarantine I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The entry does not fit in `[quarantine]` capacity; nothing was written.
    #[error("{0}")]
    Full(Refusal),
    #[error("quarantine index error: {0}")]
    Index(#[from] rusqlite::Error),
    /// The PostgreSQL backend could not be reached or answered an error (the text says
    /// which); held mail gets 451 4.3.0 and is retried by the client.
    #[error("quarantine database: {0}")]
    Database(String),
    /// An entry with this id is already in the store (`quarantine migrate`, resumed).
    #[error("quarantine entry {0} already exists")]
    Exists(String),
    #[error("no quarantine entry {0}")]
    NotFound(String),
    #[error("no quarantine store at {} (check [quarantine] dir; the proxy creates the store when it starts)", .0.display())]
    Missing(PathBuf),
    #[error("`{0}` is not a quarantine id (26 characters of 0-9 A-Z without I L O U)")]
    BadId(String),
    #[error("entry {id} is {state}, not {wanted}{hint}", hint = if *state == State::Releasing { " (an earlier release has an unknown outcome: check the next hop, then use --force)" } else { "" })]
    WrongState {
        id: String,
        state: State,
        wanted: State,
    },
}

fn mkdir_private(path: &Path) -> std::io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
}

fn write_synced(path: &Path, bytes: &[&[u8]]) -> std::io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    for b in bytes {
        f.write_all(b)?;
    }
    f.sync_all()
}

impl Quarantine {
    /// Opens (creating if needed) the store at `root` for reading and administration
    /// (the CLI). It never touches `tmp/` (a running proxy may be writing there) and
    /// does not scan `entries/`: only a crash of the writer can leave the index behind,
    /// and the writer repairs it when it starts ([`Quarantine::open_as_writer`]).
    pub fn open(root: &Path) -> Result<Quarantine, StoreError> {
        Self::open_with(root, false)
    }

    /// Opens an existing store and never creates one: for the CLI, where a wrong `dir`
    /// (a relative path read from another working directory, a typo) must be an error,
    /// not an empty quarantine.
    pub fn open_existing(root: &Path) -> Result<Quarantine, StoreError> {
        if !root.join("entries").is_dir() {
            return Err(StoreError::Missing(root.to_path_buf()));
        }
        Self::open(root)
    }

    fn open_with(root: &Path, repair: bool) -> Result<Quarantine, StoreError> {
        use std::os::unix::fs::PermissionsExt;
        mkdir_private(&root.join("entries"))?;
        mkdir_private(&root.join("tmp"))?;
        fs::set_permissions(root, fs::Permissions::from_mode(0o700))?;
        // A store whose index is gone (deleted, or a fresh copy) is re-indexed by anyone.
        let fresh_index = !root.join("index.sqlite").exists();
        let mut index = Index::open(&root.join("index.sqlite"))?;
        for f in ["index.sqlite", "index.sqlite-wal", "index.sqlite-shm"] {
            let _ = fs::set_permissions(root.join(f), fs::Permissions::from_mode(0o600));
        }
        if repair || fresh_index {
            Self::reindex(root, &mut index)?;
        }
        Ok(Quarantine {
            root: root.to_path_buf(),
            index: Mutex::new(index),
            reindex_pending: AtomicBool::new(false),
            capacity: None,
            pending: Mutex::new(Pending::default()),
            full_alert: Mutex::new(FullAlert::default()),
        })
    }

    /// Applies capacity limits to every later [`Quarantine::store`].
    pub fn with_capacity(mut self, capacity: Capacity) -> Quarantine {
        self.capacity = Some(capacity);
        self
    }

    /// The configured capacity, if any.
    pub fn capacity(&self) -> Option<Capacity> {
        self.capacity
    }

    /// Entries and message bytes in the store now, from the index (so entries another
    /// process deleted are already gone from it).
    pub fn usage(&self) -> Result<Usage, StoreError> {
        Ok(self.index().usage()?)
    }

    /// Reserves room for an entry of `size` bytes from `domain`, or says why it does
    /// not fit. The usage is read from the index (two point reads of trigger-kept
    /// totals) plus the entries this process is still writing.
    fn reserve(&self, domain: &str, size: u64) -> Result<(), StoreError> {
        let Some(cap) = self.capacity else {
            return Ok(());
        };
        let index = self.index();
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let total = index.usage()?.plus(pending.total);
        let by_domain = index
            .domain_usage(domain)?
            .plus(pending.by_domain.get(domain).copied().unwrap_or_default());
        cap.admit(total, domain, by_domain, size)
            .map_err(StoreError::Full)?;
        pending.add(
            domain,
            Usage {
                entries: 1,
                bytes: size,
            },
        );
        Ok(())
    }

    /// Gives back a reservation (called under the index lock once the row is in, or
    /// when the write failed).
    fn release(&self, domain: &str, size: u64) {
        if self.capacity.is_some() {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            pending.remove(
                domain,
                Usage {
                    entries: 1,
                    bytes: size,
                },
            );
        }
    }

    /// Logs a refusal for lack of room as a WARN, at most once per `interval`; the
    /// refusals in between are counted in the next line. Returns whether it logged.
    pub fn alert_full(&self, refusal: &Refusal, interval: std::time::Duration) -> bool {
        alert_full(&self.full_alert, refusal, interval)
    }

    /// Opens the store as its one writer (the proxy, at start): also removes what a
    /// crash left in `tmp/` (entries never acknowledged, deletions half done).
    pub fn open_as_writer(root: &Path) -> Result<Quarantine, StoreError> {
        let store = Self::open_with(root, true)?;
        for leftover in fs::read_dir(root.join("tmp"))? {
            let path = leftover?.path();
            let _ = fs::remove_dir_all(&path).or_else(|_| fs::remove_file(&path));
        }
        Ok(store)
    }

    /// Brings the index in line with `entries/`: rows for entries written just before a
    /// crash are added (from their `meta.json`), rows whose entry is gone are dropped.
    fn reindex(root: &Path, index: &mut Index) -> Result<usize, StoreError> {
        let mut on_disk = std::collections::HashSet::new();
        for dirent in fs::read_dir(root.join("entries"))? {
            let name = dirent?.file_name();
            if let Some(id) = name.to_str().and_then(QuarantineId::parse) {
                on_disk.insert(id.to_string());
            }
        }
        let indexed: std::collections::HashSet<String> = index.all_ids()?.into_iter().collect();
        let missing: Vec<&String> = on_disk.difference(&indexed).collect();
        let ghosts: Vec<&String> = indexed.difference(&on_disk).collect();
        if missing.is_empty() && ghosts.is_empty() {
            return Ok(0);
        }
        index.batch(|ix| {
            for id in &missing {
                let path = root.join("entries").join(id.as_str()).join("meta.json");
                let meta = fs::read(&path)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Meta>(&b).ok());
                if let Some(meta) = meta {
                    ix.insert(&meta)?;
                }
            }
            for id in &ghosts {
                ix.remove(id)?;
            }
            Ok(())
        })?;
        tracing::warn!(
            added = missing.len(),
            dropped = ghosts.len(),
            "quarantine: index repaired after a crash"
        );
        Ok(missing.len() + ghosts.len())
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores a message durably; only after this returns Ok may the client get 250.
    /// `parts` are concatenated (the message may be held as pieces).
    /// With a capacity set, an entry that does not fit is refused with
    /// [`StoreError::Full`] before anything is written.
    pub fn store(&self, meta: &mut Meta, parts: &[&[u8]]) -> Result<QuarantineId, StoreError> {
        let domain = capacity::sender_domain(&meta.mail_from, &meta.header_from);
        let size = meta.size as u64;
        self.reserve(&domain, size)?;
        let result = self.store_reserved(QuarantineId::generate(), meta, parts);
        if result.is_err() {
            self.release(&domain, size);
        }
        result
    }

    /// Stores an entry under its own id, state and time (`quarantine migrate` from
    /// another store): refused with [`StoreError::Exists`] when the id is already here, so
    /// a resumed migration never makes a second copy. No capacity check: moving entries
    /// between stores must not lose any.
    pub fn import(&self, meta: &Meta, message: &[u8]) -> Result<QuarantineId, StoreError> {
        let id =
            QuarantineId::parse(&meta.id).ok_or_else(|| StoreError::BadId(printable(&meta.id)))?;
        if fs::symlink_metadata(self.entry_dir(&id)).is_ok() {
            return Err(StoreError::Exists(id.to_string()));
        }
        let mut meta = meta.clone();
        self.store_reserved(id, &mut meta, &[message])
    }

    fn store_reserved(
        &self,
        id: QuarantineId,
        meta: &mut Meta,
        parts: &[&[u8]],
    ) -> Result<QuarantineId, StoreError> {
        meta.id = id.to_string();
        let json = serde_json::to_vec_pretty(meta).map_err(std::io::Error::other)?;
        let tmp = self.root.join("tmp").join(id.as_str());
        let result = (|| {
            mkdir_private(&tmp)?;
            write_synced(&tmp.join("message.eml"), parts)?;
            write_synced(&tmp.join("meta.json"), &[&json])?;
            File::open(&tmp)?.sync_all()?;
            let entries = self.root.join("entries");
            fs::rename(&tmp, entries.join(id.as_str()))?;
            File::open(&entries)?.sync_all()
        })();
        if let Err(e) = result {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e.into());
        }
        // The entry is durable now. A failed index write is retried (a full re-index,
        // which also picks up this entry) by the next store, list or delete of this
        // process, and at the next start.
        let mut index = self.index();
        let indexed = if self.catch_up(&mut index) {
            match index.insert(meta) {
                // No room for the row (the WAL may hold what deletes freed): reclaim
                // the log and try once more.
                Err(e) if is_disk_full(&e) => {
                    index.reclaim_wal();
                    index.insert(meta).map_err(StoreError::from)
                }
                other => other.map_err(StoreError::from),
            }
        } else {
            Err(StoreError::Io(std::io::Error::other("re-index failed")))
        };
        // In the index now (or re-indexed later, still on disk): the reservation ends,
        // under the same lock, so the entry is never counted twice or not at all.
        self.release(
            &capacity::sender_domain(&meta.mail_from, &meta.header_from),
            meta.size as u64,
        );
        if let Err(e) = indexed {
            // Set under the index lock, like every read and write of the flag: another
            // store cannot clear it without having re-indexed.
            self.reindex_pending.store(true, Ordering::Relaxed);
            tracing::error!(id = %id, error = %e, "quarantine index write failed (entry is stored; re-indexed at the next write or start)");
        }
        Ok(id)
    }

    /// Re-indexes if an earlier index write failed; true when the index is complete.
    /// Called with the index lock held (`index`), which guards `reindex_pending` too.
    fn catch_up(&self, index: &mut Index) -> bool {
        if !self.reindex_pending.load(Ordering::Relaxed) {
            return true;
        }
        match Self::reindex(&self.root, index) {
            Ok(_) => {
                self.reindex_pending.store(false, Ordering::Relaxed);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "quarantine re-index failed; retried at the next write");
                false
            }
        }
    }

    /// Parses user input into an id that exists.
    pub fn lookup(&self, input: &str) -> Result<QuarantineId, StoreError> {
        let id = QuarantineId::parse(input).ok_or_else(|| StoreError::BadId(printable(input)))?;
        // A real directory, not a symlink someone planted: never follow one out of the store.
        let real_dir =
            fs::symlink_metadata(self.entry_dir(&id)).is_ok_and(|m| m.file_type().is_dir());
        if !real_dir {
            return Err(StoreError::NotFound(id.to_string()));
        }
        Ok(id)
    }

    pub fn meta(&self, id: &QuarantineId) -> Result<Meta, StoreError> {
        let bytes = fs::read(self.entry_dir(id).join("meta.json"))
            .map_err(|_| StoreError::NotFound(id.to_string()))?;
        let mut meta: Meta = serde_json::from_slice(&bytes).map_err(std::io::Error::other)?;
        if let Some(state) = self.index().state(id.as_str())? {
            meta.state = state; // the index is where state changes happen
        }
        Ok(meta)
    }

    pub fn message(&self, id: &QuarantineId) -> Result<Vec<u8>, StoreError> {
        fs::read(self.entry_dir(id).join("message.eml"))
            .map_err(|_| StoreError::NotFound(id.to_string()))
    }

    /// Entries matching `filter`, newest first. A row whose entry is gone from disk (the
    /// entry is always written before its row, so this is never a write in progress) is
    /// dropped from the index rather than shown.
    pub fn list(&self, filter: &Filter) -> Result<Vec<Row>, StoreError> {
        let mut index = self.index();
        self.catch_up(&mut index);
        let mut rows = index.list(filter)?;
        let exists = |id: &str| {
            QuarantineId::parse(id).is_some_and(|id| {
                fs::symlink_metadata(self.entry_dir(&id)).is_ok_and(|m| m.file_type().is_dir())
            })
        };
        let ghosts: Vec<String> = rows
            .iter()
            .filter(|r| !exists(&r.id))
            .map(|r| r.id.clone())
            .collect();
        for id in &ghosts {
            // Best effort (no room on a full disk): they are filtered out either way.
            let _ = index.remove(id);
        }
        rows.retain(|r| !ghosts.contains(&r.id));
        Ok(rows)
    }

    pub fn counts(&self) -> Result<Vec<(State, u64)>, StoreError> {
        Ok(self.index().counts()?)
    }

    /// Atomically moves an entry between states (the release guard).
    pub fn transition(&self, id: &QuarantineId, from: State, to: State) -> Result<(), StoreError> {
        let index = self.index();
        if index.transition(id.as_str(), from, to)? {
            drop(index);
            self.persist_state(id, to)?;
            return Ok(());
        }
        // Gone between the update and this read (deleted meanwhile): not found.
        let state = index
            .state(id.as_str())?
            .ok_or_else(|| StoreError::NotFound(id.to_string()))?;
        Err(StoreError::WrongState {
            id: id.to_string(),
            state,
            wanted: from,
        })
    }

    /// Mirrors a state change into `meta.json` (so a rebuilt index keeps it).
    fn persist_state(&self, id: &QuarantineId, state: State) -> Result<(), StoreError> {
        let dir = self.entry_dir(id);
        let mut meta: Meta = serde_json::from_slice(&fs::read(dir.join("meta.json"))?)
            .map_err(std::io::Error::other)?;
        meta.state = state;
        let tmp = dir.join("meta.json.tmp");
        let _ = fs::remove_file(&tmp);
        write_synced(
            &tmp,
            &[&serde_json::to_vec_pretty(&meta).map_err(std::io::Error::other)?],
        )?;
        fs::rename(&tmp, dir.join("meta.json"))?;
        File::open(&dir)?.sync_all()?;
        Ok(())
    }

    /// Removes an entry's index row and files. The row goes first: a crash after it
    /// leaves the entry on disk, re-indexed at the next open, rather than a listed row
    /// whose entry is gone. Except on a full disk, where the row cannot be removed (SQLite
    /// needs room to delete) and deleting is how the operator makes room: there the files
    /// go first and the row after them.
    pub fn delete(&self, id: &QuarantineId) -> Result<(), StoreError> {
        let dir = self.entry_dir(id);
        let real_dir = fs::symlink_metadata(&dir).is_ok_and(|m| m.file_type().is_dir());
        // Bound first: the index lock must be released before the fallback takes it again.
        let removed = {
            let mut index = self.index();
            self.catch_up(&mut index);
            index.remove(id.as_str())
        };
        match removed {
            Err(e) if real_dir && is_disk_full(&e) => {
                self.remove_entry_files(id)?;
                // The entry is gone, which is what was asked. A row still left (no room
                // yet) is skipped by `list` and dropped by the next re-index.
                let index = self.index();
                index.reclaim_wal();
                if let Err(e) = index.remove(id.as_str()) {
                    tracing::warn!(id = %id, error = %e, "quarantine: entry deleted, its index row stays until the next re-index");
                }
                return Ok(());
            }
            result => result?,
        }
        if !real_dir {
            return Err(StoreError::NotFound(id.to_string()));
        }
        self.remove_entry_files(id)
    }

    /// Takes an entry's directory out of `entries/` (atomically) and removes it.
    fn remove_entry_files(&self, id: &QuarantineId) -> Result<(), StoreError> {
        let dir = self.entry_dir(id);
        // Move it out of entries/ first (atomic), then remove: never half visible.
        let doomed = self
            .root
            .join("tmp")
            .join(format!("{}.deleting", id.as_str()));
        fs::rename(&dir, &doomed).map_err(|_| StoreError::NotFound(id.to_string()))?;
        File::open(self.root.join("entries"))?.sync_all()?;
        fs::remove_dir_all(&doomed)?;
        Ok(())
    }

    /// Deletes every entry received more than `age_secs` ago; `on_each` is called after
    /// each deletion (progress). Returns how many were deleted.
    pub fn purge_older_than(
        &self,
        age_secs: u64,
        mut on_each: impl FnMut(usize, usize),
    ) -> Result<usize, StoreError> {
        let ids = self.older_than(now().saturating_sub(age_secs))?;
        for (i, id) in ids.iter().enumerate() {
            match self.delete(id) {
                Ok(()) | Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
            on_each(i + 1, ids.len());
        }
        Ok(ids.len())
    }

    /// Ids of entries received before `before` (seconds since the epoch).
    pub fn older_than(&self, before: u64) -> Result<Vec<QuarantineId>, StoreError> {
        Ok(self
            .index()
            .older_than(before)?
            .iter()
            .filter_map(|s| QuarantineId::parse(s))
            .collect())
    }

    /// The directory of an entry. Only a parsed id can name one.
    pub fn entry_dir(&self, id: &QuarantineId) -> PathBuf {
        self.root.join("entries").join(id.as_str())
    }
}

/// Logs a refusal for lack of room as a WARN, at most once per `interval` per store; the
/// refusals in between are counted in the next line. Returns whether it logged.
pub(crate) fn alert_full(
    gate: &Mutex<FullAlert>,
    refusal: &Refusal,
    interval: std::time::Duration,
) -> bool {
    let mut gate = gate.lock().unwrap_or_else(|e| e.into_inner());
    let now = std::time::Instant::now();
    if gate.last.is_some_and(|t| now.duration_since(t) < interval) {
        gate.suppressed += 1;
        return false;
    }
    tracing::warn!(reason = refusal.kind(), detail = %refusal, suppressed_since_last = gate.suppressed,
        "quarantine full: held mail is deferred (451 4.3.1) until entries are released, deleted or purged");
    gate.last = Some(now);
    gate.suppressed = 0;
    true
}

/// SQLite's "database or disk is full" (SQLITE_FULL).
fn is_disk_full(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
}

/// User input shown back in an error: printable ASCII only, bounded.
pub(crate) fn printable(s: &str) -> String {
    s.chars()
        .take(64)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect()
}

/// Seconds since the Unix epoch.
/// Sets the quarantine use and capacity gauges from the store's counters (point reads).
pub async fn export_usage(store: &dyn QuarantineStore) {
    let used = store.usage().await.ok().map(|u| (u.bytes, u.entries));
    let capacity = store.capacity().map(|c| (c.max_bytes, c.max_entries));
    crate::metrics::quarantine_usage(used, capacity);
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn meta() -> Meta {
        Meta {
            id: String::new(),
            received_at: 0,
            session: "S".into(),
            listener: "inbound".into(),
            client: "192.0.2.1:1".into(),
            helo: "h".into(),
            login: None,
            mail_from: "a@b".into(),
            rcpts: vec!["c@d".into()],
            header_from: "a@b".into(),
            subject: "s".into(),
            size: 3,
            authentication_results: String::new(),
            flags: vec![],
            verdict: "quarantine".into(),
            reasons: vec![],
            state: State::Held,
            instance: String::new(),
        }
    }

    #[test]
    fn stores_whole_private_entries() {
        let dir = tempfile::tempdir().unwrap();
        let q = Quarantine::open(dir.path()).unwrap();
        let mut m = meta();
        let id = q.store(&mut m, &[b"ab", b"c"]).unwrap();
        let entry = q.entry_dir(&id);
        assert_eq!(fs::read(entry.join("message.eml")).unwrap(), b"abc");
        let back: Meta =
            serde_json::from_slice(&fs::read(entry.join("meta.json")).unwrap()).unwrap();
        assert_eq!(back.id, id.to_string());
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&entry), 0o700);
        assert_eq!(mode(&entry.join("message.eml")), 0o600);
        assert_eq!(mode(&dir.path().join("entries")), 0o700);
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        let rows = q
            .list(&Filter {
                limit: 10,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(rows.len(), 1);
        q.transition(&id, State::Held, State::Releasing).unwrap();
        assert!(
            q.transition(&id, State::Held, State::Releasing).is_err(),
            "a second release cannot start"
        );
        assert_eq!(q.meta(&id).unwrap().state, State::Releasing);
        q.delete(&id).unwrap();
        assert!(q.lookup(id.as_str()).is_err());
        assert!(matches!(
            q.lookup("../../etc/passwd"),
            Err(StoreError::BadId(_))
        ));
    }

    #[test]
    fn a_failed_index_write_is_caught_up_by_the_next_store() {
        let dir = tempfile::tempdir().unwrap();
        let q = Quarantine::open_as_writer(dir.path()).unwrap();
        let all = Filter {
            limit: 10,
            ..Default::default()
        };
        let first = q.store(&mut meta(), &[b"x"]).unwrap();
        // As after an index write that failed (disk full): row missing, flag set.
        q.index().remove(first.as_str()).unwrap();
        q.reindex_pending.store(true, Ordering::Relaxed);
        let second = q.store(&mut meta(), &[b"y"]).unwrap();
        let mut ids: Vec<String> = q.list(&all).unwrap().into_iter().map(|r| r.id).collect();
        ids.sort();
        let mut want = vec![first.to_string(), second.to_string()];
        want.sort();
        assert_eq!(ids, want);
        assert!(!q.reindex_pending.load(Ordering::Relaxed));
    }

    #[test]
    fn missing_index_rows_are_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let id = {
            let q = Quarantine::open(dir.path()).unwrap();
            q.store(&mut meta(), &[b"x"]).unwrap()
        };
        fs::remove_file(dir.path().join("index.sqlite")).unwrap();
        let _ = fs::remove_file(dir.path().join("index.sqlite-wal"));
        let q = Quarantine::open_as_writer(dir.path()).unwrap();
        let rows = q
            .list(&Filter {
                limit: 10,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].id, id.to_string());
    }

    #[test]
    fn open_cleans_half_written_entries() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("tmp/HALF")).unwrap();
        Quarantine::open(dir.path()).unwrap();
        assert_eq!(
            fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            1,
            "readers never touch tmp/"
        );
        Quarantine::open_as_writer(dir.path()).unwrap();
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    fn from(mail_from: &str, header_from: &str, size: usize) -> Meta {
        Meta {
            mail_from: mail_from.into(),
            header_from: header_from.into(),
            size,
            ..meta()
        }
    }

    fn u(entries: u64, bytes: u64) -> Usage {
        Usage { entries, bytes }
    }

    #[test]
    fn capacity_refuses_before_writing_and_another_process_frees_it() {
        let dir = tempfile::tempdir().unwrap();
        let cap = Capacity {
            max_bytes: 1_000,
            max_entries: 4,
            domain_share: 0.5,
        };
        let q = Quarantine::open_as_writer(dir.path())
            .unwrap()
            .with_capacity(cap);
        let body = [b'x'; 100];
        let a1 = q
            .store(&mut from("s@flood.example", "", 100), &[&body])
            .unwrap();
        q.store(&mut from("t@FLOOD.example", "", 100), &[&body])
            .unwrap();
        // flood.example has its half of the entries: refused, and nothing written.
        let e = q
            .store(&mut from("u@flood.example", "", 100), &[&body])
            .unwrap_err();
        assert!(
            matches!(&e, StoreError::Full(Refusal::DomainShare { domain, .. }) if domain == "flood.example"),
            "{e}"
        );
        assert_eq!(fs::read_dir(dir.path().join("entries")).unwrap().count(), 2);
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        // Bounces count against their From domain.
        q.store(
            &mut from("", "\"Bank\" <no-reply@bank.example>", 100),
            &[&body],
        )
        .unwrap();
        q.store(&mut from("x@other.example", "", 100), &[&body])
            .unwrap();
        assert_eq!(q.usage().unwrap(), u(4, 400));
        let e = q
            .store(&mut from("y@third.example", "", 10), &[&body[..10]])
            .unwrap_err();
        assert!(matches!(e, StoreError::Full(Refusal::Full { .. })), "{e}");

        // The CLI is another process with its own connection: its delete frees room
        // for the running proxy at once (the totals live in the index, not in memory).
        let cli = Quarantine::open_existing(dir.path()).unwrap();
        cli.delete(&a1).unwrap();
        assert_eq!(q.usage().unwrap(), u(3, 300));
        q.store(&mut from("y@third.example", "", 10), &[&body[..10]])
            .unwrap();
        // And flood.example is below its share again.
        cli.purge_older_than(0, |_, _| {}).unwrap();
        assert_eq!(q.usage().unwrap(), u(0, 0));
        q.store(&mut from("u@flood.example", "", 100), &[&body])
            .unwrap();
    }

    #[test]
    fn usage_survives_replace_reindex_and_state_changes() {
        let dir = tempfile::tempdir().unwrap();
        let q = Quarantine::open_as_writer(dir.path()).unwrap();
        let id = q
            .store(&mut from("a@one.example", "", 7), &[b"1234567"])
            .unwrap();
        q.store(&mut from("b@two.example", "", 5), &[b"12345"])
            .unwrap();
        assert_eq!(q.usage().unwrap(), u(2, 12));
        // The same row written again (INSERT OR REPLACE) is not counted twice.
        let m = q.meta(&id).unwrap();
        q.index().insert(&m).unwrap();
        assert_eq!(q.usage().unwrap(), u(2, 12));
        assert_eq!(q.index().domain_usage("one.example").unwrap(), u(1, 7));
        // A state change keeps the entry counted (it is still on disk).
        q.transition(&id, State::Held, State::Releasing).unwrap();
        assert_eq!(q.usage().unwrap(), u(2, 12));
        // An index rebuilt from the entries counts the same.
        drop(q);
        for f in ["index.sqlite", "index.sqlite-wal", "index.sqlite-shm"] {
            let _ = fs::remove_file(dir.path().join(f));
        }
        let q = Quarantine::open_as_writer(dir.path()).unwrap();
        assert_eq!(q.usage().unwrap(), u(2, 12));
        assert_eq!(q.index().domain_usage("two.example").unwrap(), u(1, 5));
    }

    #[test]
    fn an_index_from_before_capacity_is_migrated_once() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("entries")).unwrap();
        {
            // The schema as it was: no sender_domain, no usage tables, user_version 0.
            let c = rusqlite::Connection::open(dir.path().join("index.sqlite")).unwrap();
            c.execute_batch(
                "CREATE TABLE entries (id TEXT PRIMARY KEY, received_at INTEGER NOT NULL,
                 state TEXT NOT NULL, mail_from TEXT NOT NULL, rcpts TEXT NOT NULL,
                 header_from TEXT NOT NULL, subject TEXT NOT NULL, size INTEGER NOT NULL,
                 verdict TEXT NOT NULL, reasons TEXT NOT NULL, flags TEXT NOT NULL,
                 client TEXT NOT NULL);
                 INSERT INTO entries VALUES ('A', 1, 'held', 'x@Old.example', '', '', '', 10, '', '', '', '');
                 INSERT INTO entries VALUES ('B', 1, 'released', '', '', 'Z <z@bounce.example>', '', 20, '', '', '', '');",
            )
            .unwrap();
        }
        let q = Quarantine::open(dir.path()).unwrap();
        assert_eq!(q.usage().unwrap(), u(2, 30));
        assert_eq!(q.index().domain_usage("old.example").unwrap(), u(1, 10));
        assert_eq!(q.index().domain_usage("bounce.example").unwrap(), u(1, 20));
        drop(q);
        // Opening again changes nothing (the version is recorded).
        let q = Quarantine::open(dir.path()).unwrap();
        assert_eq!(q.usage().unwrap(), u(2, 30));
    }
}
