//! `[process]`: how other programs find the running proxy.
//!
//! `pid_file` is what `mailwarden reload` signals (SIGHUP); the proxy also writes the
//! outcome of every reload next to it (`PID_FILE.reload`, JSON), which is how
//! `mailwarden reload` learns whether the file it asked for was applied, and why not.
//! Empty (the default): no pid file, and reloads are by `kill -HUP` (or systemd's
//! `ExecReload`) only, with the outcome in the log.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessConfig {
    /// Where the running proxy writes its process id; relative to the config file.
    pub pid_file: Option<PathBuf>,
}

impl ProcessConfig {
    /// The reload status file that goes with the pid file.
    pub fn reload_status_file(&self) -> Option<PathBuf> {
        self.pid_file.as_deref().map(status_file_of)
    }
}

fn status_file_of(pid_file: &Path) -> PathBuf {
    let mut name = pid_file.as_os_str().to_owned();
    name.push(".reload");
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_file_sits_beside_the_pid_file() {
        let p = ProcessConfig {
            pid_file: Some("/run/mailwarden/mailwarden.pid".into()),
        };
        assert_eq!(
            p.reload_status_file().unwrap(),
            PathBuf::from("/run/mailwarden/mailwarden.pid.reload")
        );
        assert_eq!(ProcessConfig::default().reload_status_file(), None);
    }
}
