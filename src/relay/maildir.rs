//! The built-in Maildir next hop, for trials without an MTA: every accepted message
//! becomes one file in `new/`, written in `tmp/`, fsync'd, renamed and the directory
//! fsync'd before the client hears 250 (the same durability an MTA queue gives).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Makes `dir/{tmp,new,cur}` (0700) if missing.
pub fn prepare(dir: &Path) -> std::io::Result<()> {
    for sub in ["tmp", "new", "cur"] {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir.join(sub))?;
    }
    Ok(())
}

static SEQUENCE: AtomicU64 = AtomicU64::new(0);

/// A unique Maildir file name: time, sequence, pid and random bits, then our host name.
fn unique_name(hostname: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let host: String = hostname
        .chars()
        .map(|c| if c == '/' || c == ':' { '_' } else { c })
        .collect();
    format!(
        "{}.M{}Q{}P{}R{:016x}.{}",
        now.as_secs(),
        now.subsec_micros(),
        SEQUENCE.fetch_add(1, Ordering::Relaxed),
        std::process::id(),
        rand::random::<u64>(),
        host
    )
}

/// Stores `content` (already canonical CRLF text) durably and returns the final path.
pub fn deliver(dir: &Path, hostname: &str, content: &[u8]) -> std::io::Result<PathBuf> {
    let name = unique_name(hostname);
    let tmp = dir.join("tmp").join(&name);
    let new = dir.join("new").join(&name);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(content)?;
        f.sync_all()?;
        fs::rename(&tmp, &new)?;
        File::open(dir.join("new"))?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map(|()| new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivers_into_new() {
        let dir = tempfile::tempdir().unwrap();
        prepare(dir.path()).unwrap();
        let path = deliver(dir.path(), "mx", b"Subject: x\r\n\r\nbody\r\n").unwrap();
        assert!(path.starts_with(dir.path().join("new")));
        assert_eq!(fs::read(&path).unwrap(), b"Subject: x\r\n\r\nbody\r\n");
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn failure_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        // No tmp/ directory: the write fails and nothing appears in new/.
        assert!(deliver(dir.path(), "mx", b"x").is_err());
    }
}
