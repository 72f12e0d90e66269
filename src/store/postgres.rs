//! The PostgreSQL connection pool and schema migrations shared by every feature that
//! keeps cluster-wide state there (the quarantine today).
//!
//! - **Pool**: at most `pool_size` connections; a connection that failed in any way is
//!   dropped, never handed out again, and the next caller connects anew. So the proxy
//!   reconnects by itself after the server restarts, without a restart of its own.
//! - **Budget**: every use is bounded by `timeout_ms` (waiting for a connection,
//!   connecting, the statements, the commit), so an unreachable or stalled server turns
//!   into an error in bounded time (held mail: 451 4.3.0), never a hung SMTP session.
//! - **Health**: the outcome of the last use (and of a probe every few seconds while
//!   down) is kept for `/healthz` and the `postgres_up` metric.
//! - **Migrations**: numbered SQL files (`src/store/migrations/NNNN_name.sql`) applied
//!   in order at start, each in the same transaction as its row in
//!   `mailwarden_schema_migrations`, under a transaction-scoped advisory lock, so
//!   instances starting at the same moment apply each file exactly once. A database
//!   migrated by a newer mailwarden (a version this one does not know) is refused.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_postgres::{Client, NoTls};

use crate::config::postgres::{PgTls, PostgresConfig};

/// One numbered schema change.
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration, in order. Append only: a released file is never edited.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "quarantine",
    sql: include_str!("migrations/0001_quarantine.sql"),
}];

/// `pg_advisory_xact_lock` key of the migration step ("mailwarden" in ASCII, cut to 8
/// bytes): one value for every instance of every version.
const MIGRATION_LOCK: i64 = 0x6d61_696c_7761_7264;

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct PgError {
    pub message: String,
    /// The server answered with this error (SQLSTATE): it is up, the request was wrong
    /// or refused. False: no answer (unreachable, connection lost, budget spent).
    pub answered: bool,
}

impl PgError {
    pub fn new(message: impl Into<String>) -> PgError {
        PgError {
            message: message.into(),
            answered: false,
        }
    }

    /// The server's own words (SQLSTATE and message) when it sent any; tokio-postgres'
    /// Display alone says only "db error".
    pub fn from_pg(e: &tokio_postgres::Error) -> PgError {
        match e.as_db_error() {
            Some(db) => PgError {
                message: format!("{} (SQLSTATE {})", db.message(), db.code().code()),
                answered: true,
            },
            None => PgError::new(e.to_string()),
        }
    }
}

pub struct PgPool {
    config: tokio_postgres::Config,
    tls: Option<crate::store::pg_tls::RustlsConnect>,
    idle: Mutex<Vec<Client>>,
    permits: Semaphore,
    timeout: Duration,
    up: AtomicBool,
    /// The migrations were applied by this process (at start, or by the probe when the
    /// server was down at start).
    migrated: AtomicBool,
    last_error: Mutex<String>,
}

/// A connection lent by the pool; back to it on drop unless [`PgConn::discard`]ed or
/// closed.
pub struct PgConn<'a> {
    client: Option<Client>,
    pool: &'a PgPool,
    _permit: SemaphorePermit<'a>,
}

impl PgConn<'_> {
    pub fn client(&mut self) -> &mut Client {
        self.client.as_mut().expect("present until drop")
    }

    /// Never reuse this connection (it failed, or a transaction on it ended in doubt).
    pub fn discard(mut self) {
        self.client = None;
    }
}

impl Drop for PgConn<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.client.take().filter(|c| !c.is_closed()) {
            self.pool
                .idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(c);
        }
    }
}

impl PgPool {
    /// A pool for `[postgres]` (nothing is connected yet).
    pub fn new(cfg: &PostgresConfig) -> Result<PgPool, PgError> {
        let mut config: tokio_postgres::Config = cfg
            .url
            .parse()
            .map_err(|e| PgError::new(format!("[postgres] url: {e}")))?;
        if let Some(path) = &cfg.password_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                PgError::new(format!("[postgres] password_file {}: {e}", path.display()))
            })?;
            config.password(text.lines().next().unwrap_or("").as_bytes());
        }
        if config.get_application_name().is_none() {
            config.application_name("mailwarden");
        }
        let timeout = Duration::from_millis(cfg.timeout_ms);
        config.connect_timeout(timeout);
        let tls = match cfg.tls {
            PgTls::Off => None,
            PgTls::On => {
                config.ssl_mode(tokio_postgres::config::SslMode::Require);
                let client = crate::tls::connector(true, cfg.ca_file.as_deref())
                    .map_err(|e| PgError::new(format!("[postgres] tls: {e}")))?;
                Some(crate::store::pg_tls::RustlsConnect {
                    connector: client.connector,
                })
            }
        };
        Ok(PgPool {
            config,
            tls,
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(cfg.pool_size),
            timeout,
            up: AtomicBool::new(false),
            migrated: AtomicBool::new(false),
            last_error: Mutex::new("not connected yet".into()),
        })
    }

    /// The pool, connected once and migrated (the CLI: an unreachable server is an
    /// error it reports at once).
    pub async fn open(cfg: &PostgresConfig) -> Result<Arc<PgPool>, PgError> {
        let pool = Arc::new(PgPool::new(cfg)?);
        pool.migrate().await?;
        Ok(pool)
    }

    /// The pool for the proxy: migrated now if the server answers; if not, the proxy
    /// still starts (mail that is not held keeps flowing, held mail gets 451 4.3.0) and
    /// [`PgPool::watch`] migrates and marks it up once the server is back.
    pub async fn open_lenient(cfg: &PostgresConfig) -> Result<Arc<PgPool>, PgError> {
        let pool = Arc::new(PgPool::new(cfg)?);
        if let Err(e) = pool.migrate().await {
            if !e.answered {
                tracing::error!(error = %e, "postgres: unreachable at start; held mail is deferred (451 4.3.0) until it answers");
            } else {
                // The server answered with an error (rights, a newer schema): a
                // configuration problem the operator must fix before starting.
                return Err(e);
            }
        }
        Ok(pool)
    }

    /// The budget of one operation.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A connection: an idle one, else a new one; within the budget.
    pub async fn get(&self) -> Result<PgConn<'_>, PgError> {
        let result = tokio::time::timeout(self.timeout, async {
            let permit = self
                .permits
                .acquire()
                .await
                .map_err(|_| PgError::new("pool closed"))?;
            let idle = {
                let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
                idle.retain(|c| !c.is_closed());
                idle.pop()
            };
            let client = match idle {
                Some(c) => c,
                None => self.connect().await?,
            };
            Ok(PgConn {
                client: Some(client),
                pool: self,
                _permit: permit,
            })
        })
        .await
        .unwrap_or_else(|_| Err(PgError::new("no connection within the time budget")));
        if let Err(e) = &result {
            self.mark_down(e);
        }
        result
    }

    async fn connect(&self) -> Result<Client, PgError> {
        let client = match &self.tls {
            None => {
                let (client, conn) = self
                    .config
                    .connect(NoTls)
                    .await
                    .map_err(|e| PgError::from_pg(&e))?;
                drive(conn);
                client
            }
            Some(tls) => {
                let (client, conn) = self
                    .config
                    .connect(tls.clone())
                    .await
                    .map_err(|e| PgError::from_pg(&e))?;
                drive(conn);
                client
            }
        };
        Ok(client)
    }

    /// Settles one use of a pooled connection: `outcome` is the operation run on it
    /// under [`PgPool::budget`]. Success marks the server up; a failure discards the
    /// connection (it may be mid-transaction or dead) and, when the connection itself
    /// failed rather than the server answering an error, marks the server down.
    ///
    /// Usage: `let out = pool.budget(op(conn.client())).await; pool.settle(conn, out)`.
    pub fn settle<T>(
        &self,
        conn: PgConn<'_>,
        outcome: Result<Result<T, tokio_postgres::Error>, tokio::time::error::Elapsed>,
    ) -> Result<T, PgError> {
        match outcome {
            Ok(Ok(v)) => {
                self.mark_up();
                Ok(v)
            }
            Ok(Err(e)) => {
                let err = PgError::from_pg(&e);
                if err.answered {
                    // The server is there: it said no to this request.
                    self.mark_up();
                } else {
                    // Not an answer from the server: the connection broke.
                    self.mark_down(&err);
                }
                conn.discard();
                Err(err)
            }
            Err(_) => {
                let err = PgError::new(format!("no answer within {} ms", self.timeout.as_millis()));
                self.mark_down(&err);
                conn.discard();
                Err(err)
            }
        }
    }

    /// `fut` bounded by the operation budget.
    pub async fn budget<F: std::future::Future>(
        &self,
        fut: F,
    ) -> Result<F::Output, tokio::time::error::Elapsed> {
        tokio::time::timeout(self.timeout, fut).await
    }

    /// `SELECT 1` on a pooled connection (health probe); the migrations instead while
    /// they have not been applied (the server was down when this process started).
    pub async fn ping(&self) -> Result<(), PgError> {
        if !self.migrated.load(Ordering::Relaxed) {
            return self.migrate().await.map(|_| ());
        }
        let mut conn = self.get().await?;
        let out = self
            .budget(async { conn.client().simple_query("SELECT 1").await.map(|_| ()) })
            .await;
        self.settle(conn, out)
    }

    fn mark_up(&self) {
        if !self.up.swap(true, Ordering::Relaxed) {
            tracing::info!("postgres: connected");
        }
        crate::metrics::global().postgres_up.set(1);
    }

    fn mark_down(&self, e: &PgError) {
        if self.up.swap(false, Ordering::Relaxed) {
            tracing::error!(error = %e, "postgres: unavailable; held mail is deferred (451 4.3.0) until it is back");
        }
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = e.message.clone();
        crate::metrics::global().postgres_up.set(0);
    }

    /// `None` when the last use succeeded; else the last error (`/healthz`).
    pub fn unavailable(&self) -> Option<String> {
        if self.up.load(Ordering::Relaxed) {
            None
        } else {
            Some(
                self.last_error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone(),
            )
        }
    }

    /// Probes the server every `every` while it is marked down (and once a minute while
    /// up), so `/healthz` turns green again without waiting for the next held message.
    pub async fn watch(
        self: Arc<Self>,
        every: Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let mut since_probe = Duration::ZERO;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.cancelled() => return,
            }
            since_probe += every;
            if self.unavailable().is_some() || since_probe >= Duration::from_secs(60) {
                since_probe = Duration::ZERO;
                let _ = self.ping().await;
            }
        }
    }

    /// Applies the migrations this database lacks (see the module doc).
    pub async fn migrate(&self) -> Result<Vec<i32>, PgError> {
        let mut conn = self.get().await?;
        let out = self.budget(apply_migrations(conn.client())).await;
        let done = self.settle(conn, out)?;
        self.migrated.store(true, Ordering::Relaxed);
        Ok(done)
    }
}

async fn apply_migrations(client: &mut Client) -> Result<Vec<i32>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS mailwarden_schema_migrations (
             version    integer PRIMARY KEY,
             name       text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await?;
    let applied: Vec<i32> = tx
        .query("SELECT version FROM mailwarden_schema_migrations", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let newest_known = MIGRATIONS.last().map_or(0, |m| m.version);
    if let Some(v) = applied.iter().find(|v| **v > newest_known) {
        // Raised by the server so it reaches the caller as a database error with text.
        tx.batch_execute(&format!(
            "DO $$ BEGIN RAISE EXCEPTION 'schema version {v} is newer than this mailwarden knows ({newest_known}): upgrade mailwarden'; END $$"
        ))
        .await?;
    }
    let mut done = Vec::new();
    for m in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
        tx.batch_execute(m.sql).await?;
        tx.execute(
            "INSERT INTO mailwarden_schema_migrations (version, name) VALUES ($1, $2)",
            &[&m.version, &m.name],
        )
        .await?;
        done.push(m.version);
    }
    tx.commit().await?;
    if !done.is_empty() {
        tracing::info!(versions = ?done, "postgres: schema migrated");
    }
    Ok(done)
}

/// Runs a connection's I/O in its own task until the client is dropped or the link ends.
fn drive<S, T>(conn: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio_postgres::tls::TlsStream + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "postgres connection ended");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_in_order_from_one() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i32 + 1, "{}", m.name);
            assert!(!m.sql.trim().is_empty());
        }
    }
}
