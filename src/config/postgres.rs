//! `[postgres]`: the PostgreSQL server a cluster of mailwarden instances shares. Used by
//! the quarantine when `[quarantine] backend = "postgres"`; kept apart from `[quarantine]`
//! because the pool and the schema migrations (`src/store/postgres.rs`) are not
//! quarantine-specific (the decision log and DMARC report data can use the same server).

use std::path::PathBuf;

use serde::Deserialize;

/// Where the quarantine lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum QuarantineBackend {
    /// Local directory + SQLite index (`[quarantine] dir`): one instance's own.
    #[default]
    Embedded,
    /// `[postgres]`: one quarantine shared by every instance pointing at it.
    Postgres,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// libpq-style URL or key=value string, e.g.
    /// `postgresql://mailwarden@db.example:5432/mailwarden`. A password is better given
    /// in `password_file` than here.
    pub url: String,
    /// A file whose first line is the password (0600, readable by mailwarden only).
    pub password_file: Option<PathBuf>,
    /// Connections kept per instance (sessions beyond it wait, within `timeout_ms`).
    pub pool_size: usize,
    /// TLS to the server: `off`, or `on` (server certificate verified against `ca_file`,
    /// or the system's roots without it; the name is the URL's host).
    pub tls: PgTls,
    pub ca_file: Option<PathBuf>,
    /// Budget of one store operation (connect, write, commit). Past it, held mail gets
    /// `451 4.3.0` and the client retries; the SMTP session is never left waiting longer.
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PgTls {
    #[default]
    Off,
    On,
}

pub const DEFAULT_POOL_SIZE: usize = 8;
pub const DEFAULT_TIMEOUT_MS: u64 = 5_000;

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            url: String::new(),
            password_file: None,
            pool_size: DEFAULT_POOL_SIZE,
            tls: PgTls::Off,
            ca_file: None,
            timeout_ms: DEFAULT_TIMEOUT_MS,
        }
    }
}

impl PostgresConfig {
    /// Checks the keys; `needed`: a backend uses this section (then `url` is required).
    /// Errors are `(key, reason)`.
    pub fn validate(&self, needed: bool) -> Result<(), (String, String)> {
        let err = |k: &str, r: &str| Err((k.to_string(), r.to_string()));
        if needed && self.url.trim().is_empty() {
            return err(
                "url",
                "required when [quarantine] backend = \"postgres\" (e.g. postgresql://mailwarden@db:5432/mailwarden)",
            );
        }
        if let Some(Err(e)) =
            (!self.url.is_empty()).then(|| self.url.parse::<tokio_postgres::Config>())
        {
            return Err((
                "url".into(),
                format!("not a PostgreSQL connection string: {e}"),
            ));
        }
        if self.pool_size == 0 || self.pool_size > 1000 {
            return err("pool_size", "1 to 1000");
        }
        if self.timeout_ms < 100 {
            return err("timeout_ms", "at least 100");
        }
        if self.tls == PgTls::Off && self.ca_file.is_some() {
            return err(
                "ca_file",
                "set, but tls = \"off\": set tls = \"on\" to use it",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_is_required_only_when_used_and_must_parse() {
        let c = PostgresConfig::default();
        assert!(c.validate(false).is_ok());
        assert_eq!(c.validate(true).unwrap_err().0, "url");
        let bad = PostgresConfig {
            url: "postgresql://h:notaport/db".into(),
            ..Default::default()
        };
        assert_eq!(bad.validate(true).unwrap_err().0, "url");
        let good = PostgresConfig {
            url: "postgresql://mw@127.0.0.1:5432/mw".into(),
            ..Default::default()
        };
        assert!(good.validate(true).is_ok());
        let zero = PostgresConfig {
            pool_size: 0,
            ..good.clone()
        };
        assert_eq!(zero.validate(true).unwrap_err().0, "pool_size");
        let ca_without_tls = PostgresConfig {
            ca_file: Some("/ca.pem".into()),
            ..good
        };
        assert_eq!(ca_without_tls.validate(true).unwrap_err().0, "ca_file");
    }
}
