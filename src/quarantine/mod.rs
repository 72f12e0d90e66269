//! The quarantine store: messages held by policy, kept durably before the client hears
//! 250.
//!
//! Each entry is a directory `entries/<ID>/` holding `message.eml` (the exact bytes
//! received) and `meta.json`. It is written under `tmp/`, every file and the directory
//! fsync'd, then renamed into `entries/` in one step and `entries/` fsync'd: a crash at
//! any moment leaves either no entry or a whole one. Directories are 0700, files 0600,
//! and no path is ever built from anything but a [`QuarantineId`].

pub mod id;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use id::QuarantineId;

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
    pub mail_from: String,
    pub rcpts: Vec<String>,
    pub header_from: String,
    pub subject: String,
    pub size: usize,
    pub authentication_results: String,
    pub flags: Vec<String>,
    pub verdict: String,
    pub reasons: Vec<String>,
    /// held | released | deleted
    pub state: String,
}

pub struct Quarantine {
    root: PathBuf,
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
    /// Opens (creating if needed) the store at `root`, and removes half-written entries
    /// left in `tmp/` by a crash: they were never acknowledged.
    pub fn open(root: &Path) -> std::io::Result<Quarantine> {
        mkdir_private(&root.join("entries"))?;
        mkdir_private(&root.join("tmp"))?;
        for leftover in fs::read_dir(root.join("tmp"))? {
            let path = leftover?.path();
            let _ = fs::remove_dir_all(&path).or_else(|_| fs::remove_file(&path));
        }
        Ok(Quarantine {
            root: root.to_path_buf(),
        })
    }

    /// Stores a message durably; only after this returns Ok may the client get 250.
    /// `parts` are concatenated (the message may be held as pieces).
    pub fn store(&self, meta: &mut Meta, parts: &[&[u8]]) -> std::io::Result<QuarantineId> {
        let id = QuarantineId::generate();
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
        if result.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        result.map(|()| id)
    }

    /// The directory of an entry. Only a parsed id can name one.
    pub fn entry_dir(&self, id: &QuarantineId) -> PathBuf {
        self.root.join("entries").join(id.as_str())
    }
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
            mail_from: "a@b".into(),
            rcpts: vec!["c@d".into()],
            header_from: "a@b".into(),
            subject: "s".into(),
            size: 3,
            authentication_results: String::new(),
            flags: vec![],
            verdict: "quarantine".into(),
            reasons: vec![],
            state: "held".into(),
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
    }

    #[test]
    fn open_cleans_half_written_entries() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("tmp/HALF")).unwrap();
        Quarantine::open(dir.path()).unwrap();
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }
}
