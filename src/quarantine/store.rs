//! The store boundary of the quarantine: what the SMTP sessions, the retention task, the
//! admin CLI and API and `release` need, whatever keeps the entries. Two backends:
//!
//! - [`Embedded`]: today's directory of message files + SQLite index on local disk (the
//!   default; one instance's own). Its blocking file and SQLite work runs on tokio's
//!   blocking pool.
//! - [`PgQuarantine`](super::pg::PgQuarantine): one PostgreSQL database shared by every
//!   instance of a cluster (`[quarantine] backend = "postgres"`).
//!
//! Both give the same guarantees: `store` returns only once the entry is durable (the
//! client hears 250 after it), and `transition` is one guarded update, so an entry is
//! released once however many processes try at the same moment.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::capacity::{Refusal, Usage};
use super::index::{Filter, Row};
use super::{Meta, Quarantine, QuarantineId, State, StoreError};

#[async_trait]
pub trait QuarantineStore: Send + Sync {
    /// `embedded` or `postgres` (logs, `/healthz`).
    fn backend(&self) -> &'static str;

    /// Stores a held message durably; only after Ok may the client get 250. Refused
    /// with [`StoreError::Full`] before anything is written when it does not fit.
    async fn store(&self, meta: Meta, message: Vec<u8>) -> Result<QuarantineId, StoreError>;

    /// Stores an entry under its own id, time and state (`quarantine migrate`);
    /// [`StoreError::Exists`] when that id is already there.
    async fn import(&self, meta: Meta, message: Vec<u8>) -> Result<(), StoreError>;

    /// Parses user input into the id of an entry that exists.
    async fn lookup(&self, input: &str) -> Result<QuarantineId, StoreError>;

    async fn meta(&self, id: &QuarantineId) -> Result<Meta, StoreError>;

    /// The exact bytes received.
    async fn message(&self, id: &QuarantineId) -> Result<Vec<u8>, StoreError>;

    /// Entries matching `filter`, newest first (keyset pagination with `filter.before`).
    async fn list(&self, filter: &Filter) -> Result<Vec<Row>, StoreError>;

    /// Entries per state.
    async fn counts(&self) -> Result<Vec<(State, u64)>, StoreError>;

    /// Entries and message bytes in the store (capacity gauges).
    async fn usage(&self) -> Result<Usage, StoreError>;

    /// Moves `id` from `from` to `to` in one guarded update, or says which state it is
    /// in ([`StoreError::WrongState`]). The exactly-once guard of `release`.
    async fn transition(&self, id: &QuarantineId, from: State, to: State)
    -> Result<(), StoreError>;

    /// Removes an entry and its message for good.
    async fn delete(&self, id: &QuarantineId) -> Result<(), StoreError>;

    /// Deletes every entry received more than `age_secs` ago; returns how many.
    async fn purge_older_than(&self, age_secs: u64) -> Result<usize, StoreError>;

    /// The configured capacity limits, if any.
    fn capacity(&self) -> Option<super::capacity::Capacity>;

    /// Logs a refusal for lack of room, rate-limited (see [`Quarantine::alert_full`]).
    fn alert_full(&self, refusal: &Refusal, interval: Duration) -> bool;

    /// `None` when the store can take held mail now; else why not (`/healthz`).
    fn unavailable(&self) -> Option<String> {
        None
    }
}

/// The embedded backend: a [`Quarantine`] on local disk behind the trait.
pub struct Embedded(pub Arc<Quarantine>);

impl Embedded {
    /// Runs blocking store work (files, fsync, SQLite) off the async workers.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Quarantine) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let q = self.0.clone();
        tokio::task::spawn_blocking(move || f(&q))
            .await
            .map_err(|e| StoreError::Io(std::io::Error::other(format!("quarantine task: {e}"))))?
    }
}

/// An entry that exists as a plain directory with plain files. The store's own lookup
/// follows symlinks; here a symlink planted in `entries/` (or inside an entry) is not an
/// entry, so nothing outside the store is ever read or deleted through the CLI or API.
fn plain_entry(store: &Quarantine, input: &str) -> Result<QuarantineId, StoreError> {
    let id = store.lookup(input)?;
    let dir = store.entry_dir(&id);
    let plain = |p: &std::path::Path, want_dir: bool| {
        std::fs::symlink_metadata(p).is_ok_and(|m| {
            if want_dir {
                m.file_type().is_dir()
            } else {
                m.file_type().is_file()
            }
        })
    };
    if !plain(&dir, true)
        || !plain(&dir.join("message.eml"), false)
        || !plain(&dir.join("meta.json"), false)
    {
        tracing::warn!(target: "mailwarden::audit", id = %id,
            "quarantine entry is not a plain directory of plain files (symlink?); refused");
        return Err(StoreError::NotFound(id.to_string()));
    }
    Ok(id)
}

#[async_trait]
impl QuarantineStore for Embedded {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    async fn store(&self, mut meta: Meta, message: Vec<u8>) -> Result<QuarantineId, StoreError> {
        self.blocking(move |q| q.store(&mut meta, &[&message]))
            .await
    }

    async fn import(&self, meta: Meta, message: Vec<u8>) -> Result<(), StoreError> {
        self.blocking(move |q| q.import(&meta, &message).map(|_| ()))
            .await
    }

    async fn lookup(&self, input: &str) -> Result<QuarantineId, StoreError> {
        let input = input.to_string();
        self.blocking(move |q| plain_entry(q, &input)).await
    }

    async fn meta(&self, id: &QuarantineId) -> Result<Meta, StoreError> {
        let id = id.clone();
        self.blocking(move |q| q.meta(&id)).await
    }

    async fn message(&self, id: &QuarantineId) -> Result<Vec<u8>, StoreError> {
        let id = id.clone();
        self.blocking(move |q| q.message(&id)).await
    }

    async fn list(&self, filter: &Filter) -> Result<Vec<Row>, StoreError> {
        let filter = filter.clone();
        self.blocking(move |q| q.list(&filter)).await
    }

    async fn counts(&self) -> Result<Vec<(State, u64)>, StoreError> {
        self.blocking(|q| q.counts()).await
    }

    async fn usage(&self) -> Result<Usage, StoreError> {
        self.blocking(|q| q.usage()).await
    }

    async fn transition(
        &self,
        id: &QuarantineId,
        from: State,
        to: State,
    ) -> Result<(), StoreError> {
        let id = id.clone();
        self.blocking(move |q| q.transition(&id, from, to)).await
    }

    async fn delete(&self, id: &QuarantineId) -> Result<(), StoreError> {
        let id = id.clone();
        self.blocking(move |q| q.delete(&id)).await
    }

    async fn purge_older_than(&self, age_secs: u64) -> Result<usize, StoreError> {
        self.blocking(move |q| q.purge_older_than(age_secs, |_, _| {}))
            .await
    }

    fn capacity(&self) -> Option<super::capacity::Capacity> {
        self.0.capacity()
    }

    fn alert_full(&self, refusal: &Refusal, interval: Duration) -> bool {
        self.0.alert_full(refusal, interval)
    }
}

/// Who opens the store: the proxy (writer: repairs the embedded store, applies the
/// capacity; a PostgreSQL server down at start is survived) or a CLI command (the store
/// must exist / answer now).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opener {
    Proxy,
    Cli,
    /// The destination of `quarantine migrate`: an embedded store is created if missing.
    Create,
}

/// Opens the quarantine `config` names (`[quarantine] backend`). For PostgreSQL, also
/// returns the pool (the proxy watches its health).
pub async fn open(
    config: &crate::config::Config,
    opener: Opener,
) -> Result<
    (
        Arc<dyn QuarantineStore>,
        Option<Arc<crate::store::postgres::PgPool>>,
    ),
    String,
> {
    use crate::config::postgres::QuarantineBackend;
    let q = &config.quarantine;
    match q.backend {
        QuarantineBackend::Embedded => {
            let store = match opener {
                Opener::Proxy => Quarantine::open_as_writer(&q.dir)
                    .map(|s| s.with_capacity(super::capacity::Capacity::of(q)))
                    .map_err(|e| format!("quarantine {}: {e}", q.dir.display()))?,
                Opener::Cli => Quarantine::open_existing(&q.dir).map_err(|e| match e {
                    StoreError::Missing(_) => e.to_string(),
                    e => format!("{}: {e}", q.dir.display()),
                })?,
                Opener::Create => Quarantine::open(&q.dir)
                    .map_err(|e| format!("quarantine {}: {e}", q.dir.display()))?,
            };
            Ok((Arc::new(Embedded(Arc::new(store))), None))
        }
        QuarantineBackend::Postgres => {
            let pool = match opener {
                Opener::Proxy => {
                    crate::store::postgres::PgPool::open_lenient(&config.postgres).await
                }
                Opener::Cli | Opener::Create => {
                    crate::store::postgres::PgPool::open(&config.postgres).await
                }
            }
            .map_err(|e| format!("[postgres] {}: {e}", redacted_url(&config.postgres.url)))?;
            let mut store =
                super::pg::PgQuarantine::new(pool.clone(), &q.instance_name(&config.hostname));
            if opener == Opener::Proxy {
                store = store.with_capacity(super::capacity::Capacity::of(q));
            }
            Ok((Arc::new(store), Some(pool)))
        }
    }
}

/// A connection URL for messages: any password replaced by `***`.
pub fn redacted_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url
            .split_whitespace()
            .map(|kv| {
                if kv.starts_with("password=") {
                    "password=***"
                } else {
                    kv
                }
            })
            .collect::<Vec<_>>()
            .join(" "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            redacted_url("postgresql://mw:s3cret@db:5432/mw"),
            "postgresql://mw:***@db:5432/mw"
        );
        assert_eq!(
            redacted_url("postgresql://mw@db/mw"),
            "postgresql://mw@db/mw"
        );
        assert_eq!(
            redacted_url("host=db user=mw password=s3cret"),
            "host=db user=mw password=***"
        );
    }
}
