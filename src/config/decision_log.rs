//! `[decision_log]`: what the policy saw and decided for every transaction, kept so a
//! changed policy can be replayed over past mail (`mailwarden policy replay`). On by
//! default: a policy cannot be tuned on mail nobody remembers. The log holds envelopes,
//! results and header fields the rules read (never a body) under `var/`.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::duration;

/// Records waiting for the writer thread. Past it they are dropped, counted
/// (`mailwarden_decision_log_dropped_total`) and logged: the log never slows a transaction.
pub const DEFAULT_DECISION_LOG_QUEUE: usize = 10_000;
/// A file is closed and a new one started past this size...
pub const DEFAULT_DECISION_LOG_FILE_BYTES: u64 = 64 * 1024 * 1024;
/// ...or past this age, so old mail leaves the log in small steps.
pub const DEFAULT_DECISION_LOG_FILE_AGE: Duration = Duration::from_secs(3_600);
/// Closed files older than this are deleted (a week of mail to replay against).
pub const DEFAULT_DECISION_LOG_RETENTION: Duration = Duration::from_secs(7 * 86_400);
/// And the oldest closed files go first when all files together pass this size.
pub const DEFAULT_DECISION_LOG_MAX_BYTES: u64 = 2 * 1024 * 1024 * 1024;

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DecisionLogConfig {
    pub enabled: bool,
    /// Directory of the append-only JSON-lines files (0700; files 0600).
    pub dir: PathBuf,
    pub queue: usize,
    pub max_file_bytes: u64,
    #[serde(with = "duration")]
    pub max_file_age: Duration,
    #[serde(with = "duration")]
    pub retention: Duration,
    pub max_bytes: u64,
}

impl Default for DecisionLogConfig {
    fn default() -> Self {
        DecisionLogConfig {
            enabled: true,
            dir: PathBuf::from("var/decision-log"),
            queue: DEFAULT_DECISION_LOG_QUEUE,
            max_file_bytes: DEFAULT_DECISION_LOG_FILE_BYTES,
            max_file_age: DEFAULT_DECISION_LOG_FILE_AGE,
            retention: DEFAULT_DECISION_LOG_RETENTION,
            max_bytes: DEFAULT_DECISION_LOG_MAX_BYTES,
        }
    }
}

impl DecisionLogConfig {
    /// Checks serde cannot express: (key, reason).
    pub fn validate(&self) -> Result<(), (String, String)> {
        let err = |k: &str, r: &str| Err((k.to_string(), r.to_string()));
        if self.queue == 0 {
            return err("queue", "must be at least 1");
        }
        if self.max_file_bytes < 4096 {
            return err("max_file_bytes", "must be at least 4096");
        }
        if self.max_file_age < Duration::from_secs(1) {
            return err("max_file_age", "must be at least 1s");
        }
        if self.retention < self.max_file_age {
            return err("retention", "must be at least max_file_age");
        }
        if self.max_bytes < self.max_file_bytes {
            return err("max_bytes", "must be at least max_file_bytes");
        }
        Ok(())
    }
}
