//! Where evaluations and reports are kept. [`ReportStore`] is the boundary (a PostgreSQL
//! store for a cluster can implement it later); [`SqliteStore`] is the embedded one, a
//! SQLite file beside the quarantine (WAL, like the quarantine index).
//!
//! Exactly-once rests on two guarded updates:
//! * closing a period moves the period mark and takes the period's evaluations out in
//!   the transaction that inserts its reports, and only if the mark is still where the
//!   caller saw it: two closers (the proxy's timer, `reports send-now`) cannot both
//!   build the same period;
//! * a report is claimed for sending by `pending → sending` in one UPDATE guarded by
//!   the state, so two senders can never both send it. A sender that dies after the
//!   next hop may have the report leaves it `sending`; after [`STALE_SENDING`] it
//!   becomes `unsettled` and is not sent again unless an operator says so (a duplicate
//!   report is worse than a late one: receivers count messages twice).

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use super::Evaluation;

/// A report claimed for sending longer ago than this is taken as abandoned.
pub const STALE_SENDING: u64 = 600;

pub type Result<T> = std::result::Result<T, String>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReportState {
    Pending,
    Sending,
    Sent,
    /// Given up after `max_attempts`.
    Failed,
    /// No verified destination within its size limit: nothing to send, ever.
    Undeliverable,
    /// The sender died while the next hop may have taken it (see module docs).
    Unsettled,
}

impl ReportState {
    pub fn as_str(self) -> &'static str {
        match self {
            ReportState::Pending => "pending",
            ReportState::Sending => "sending",
            ReportState::Sent => "sent",
            ReportState::Failed => "failed",
            ReportState::Undeliverable => "undeliverable",
            ReportState::Unsettled => "unsettled",
        }
    }

    fn parse(s: &str) -> ReportState {
        match s {
            "pending" => ReportState::Pending,
            "sending" => ReportState::Sending,
            "sent" => ReportState::Sent,
            "failed" => ReportState::Failed,
            "undeliverable" => ReportState::Undeliverable,
            _ => ReportState::Unsettled,
        }
    }
}

/// A report built from one period, before it is stored.
#[derive(Debug, Clone)]
pub struct NewReport {
    pub id: String,
    pub domain: String,
    pub begin: u64,
    pub end: u64,
    /// `rua=` of the reporting domain's record, as published.
    pub rua: String,
    /// Rows (`<record>` elements) and messages counted.
    pub rows: u64,
    pub messages: u64,
    pub xml_gz: Vec<u8>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StoredReport {
    pub id: String,
    pub domain: String,
    pub begin: u64,
    pub end: u64,
    pub created_at: u64,
    pub state: ReportState,
    pub attempts: u32,
    pub next_attempt: u64,
    pub rua: String,
    pub rows: u64,
    pub messages: u64,
    /// The destinations the report went to (when sent).
    pub sent_to: String,
    pub last_error: String,
    #[serde(skip)]
    pub xml_gz: Vec<u8>,
}

pub trait ReportStore: Send {
    /// Adds evaluations (one batch, one transaction).
    fn record(&mut self, batch: &[Evaluation]) -> Result<()>;
    /// The end of the last closed period (`None` before the first).
    fn period_mark(&self) -> Result<Option<u64>>;
    /// The evaluations recorded before `end` (the next period to close).
    fn evaluations_before(&self, end: u64) -> Result<Vec<Evaluation>>;
    /// Atomically: if the mark is still `seen`, stores `reports`, deletes evaluations
    /// before `end`, and moves the mark to `end`. `false` when someone else closed it.
    fn close_period(&mut self, seen: Option<u64>, end: u64, reports: &[NewReport]) -> Result<bool>;
    fn list(&self) -> Result<Vec<StoredReport>>;
    fn get(&self, id: &str) -> Result<Option<StoredReport>>;
    /// Pending reports whose next attempt is due.
    fn due(&self, now: u64) -> Result<Vec<StoredReport>>;
    /// `from → to` when the report is in `from`; `false` when it was not.
    fn transition(
        &mut self,
        id: &str,
        from: ReportState,
        to: ReportState,
        now: u64,
    ) -> Result<bool>;
    /// The outcome of one attempt (the report must be `sending`).
    fn settle(
        &mut self,
        id: &str,
        state: ReportState,
        next_attempt: u64,
        sent_to: &str,
        error: &str,
        now: u64,
    ) -> Result<()>;
    /// Reports left `sending` since before `older_than` become `unsettled`; returns how many.
    fn abandon_stale(&mut self, older_than: u64) -> Result<usize>;
}

pub struct SqliteStore {
    conn: Connection,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS evaluations (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    domain TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS evaluations_at ON evaluations (at);
CREATE TABLE IF NOT EXISTS mark (
    k INTEGER PRIMARY KEY CHECK (k = 0),
    period_end INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS reports (
    id TEXT PRIMARY KEY,
    domain TEXT NOT NULL,
    begin_at INTEGER NOT NULL,
    end_at INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt INTEGER NOT NULL DEFAULT 0,
    updated_at INTEGER NOT NULL,
    rua TEXT NOT NULL,
    rows_n INTEGER NOT NULL,
    messages INTEGER NOT NULL,
    sent_to TEXT NOT NULL DEFAULT '',
    last_error TEXT NOT NULL DEFAULT '',
    xml_gz BLOB NOT NULL,
    UNIQUE (domain, begin_at, end_at)
);
CREATE INDEX IF NOT EXISTS reports_state ON reports (state, next_attempt);
";

fn db(e: rusqlite::Error) -> String {
    format!("DMARC report store: {e}")
}

impl SqliteStore {
    /// Opens (creating the file, 0600 in a 0700 directory like the quarantine, when
    /// missing): it holds who sent us mail.
    pub fn open(path: &std::path::Path) -> Result<SqliteStore> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
            && !dir.exists()
        {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            restrict(dir, 0o700);
        }
        let fresh = !path.exists();
        let conn = Connection::open(path).map_err(db)?;
        if fresh {
            restrict(path, 0o600);
        }
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(db)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(db)?;
        conn.execute_batch(SCHEMA).map_err(db)?;
        Ok(SqliteStore { conn })
    }

    fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredReport> {
        Ok(StoredReport {
            id: r.get(0)?,
            domain: r.get(1)?,
            begin: r.get::<_, i64>(2)? as u64,
            end: r.get::<_, i64>(3)? as u64,
            created_at: r.get::<_, i64>(4)? as u64,
            state: ReportState::parse(&r.get::<_, String>(5)?),
            attempts: r.get::<_, i64>(6)? as u32,
            next_attempt: r.get::<_, i64>(7)? as u64,
            rua: r.get(8)?,
            rows: r.get::<_, i64>(9)? as u64,
            messages: r.get::<_, i64>(10)? as u64,
            sent_to: r.get(11)?,
            last_error: r.get(12)?,
            xml_gz: r.get(13)?,
        })
    }

    fn select(&self, filter: &str, args: impl rusqlite::Params) -> Result<Vec<StoredReport>> {
        let sql = format!(
            "SELECT id, domain, begin_at, end_at, created_at, state, attempts, next_attempt,
                    rua, rows_n, messages, sent_to, last_error, xml_gz
             FROM reports {filter}"
        );
        let mut stmt = self.conn.prepare(&sql).map_err(db)?;
        let rows = stmt.query_map(args, Self::row).map_err(db)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db)
    }
}

#[cfg(unix)]
fn restrict(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode));
}

#[cfg(not(unix))]
fn restrict(_: &std::path::Path, _: u32) {}

impl ReportStore for SqliteStore {
    fn record(&mut self, batch: &[Evaluation]) -> Result<()> {
        let tx = self.conn.transaction().map_err(db)?;
        {
            let mut stmt = tx
                .prepare_cached("INSERT INTO evaluations (at, domain, data) VALUES (?1, ?2, ?3)")
                .map_err(db)?;
            for e in batch {
                let data = serde_json::to_string(e).map_err(|e| e.to_string())?;
                stmt.execute(params![e.at as i64, e.published.domain, data])
                    .map_err(db)?;
            }
        }
        tx.commit().map_err(db)
    }

    fn period_mark(&self) -> Result<Option<u64>> {
        self.conn
            .query_row("SELECT period_end FROM mark WHERE k = 0", [], |r| {
                r.get::<_, i64>(0)
            })
            .optional()
            .map(|v| v.map(|v| v as u64))
            .map_err(db)
    }

    fn evaluations_before(&self, end: u64) -> Result<Vec<Evaluation>> {
        let mut stmt = self
            .conn
            .prepare("SELECT data FROM evaluations WHERE at < ?1 ORDER BY seq")
            .map_err(db)?;
        let rows = stmt
            .query_map([end as i64], |r| r.get::<_, String>(0))
            .map_err(db)?;
        let mut out = Vec::new();
        for data in rows {
            let data = data.map_err(db)?;
            // A row this version cannot read (written by a newer one) is skipped, not
            // fatal: one bad row must not stop every report.
            match serde_json::from_str(&data) {
                Ok(e) => out.push(e),
                Err(e) => tracing::warn!(error = %e, "unreadable DMARC evaluation skipped"),
            }
        }
        Ok(out)
    }

    fn close_period(&mut self, seen: Option<u64>, end: u64, reports: &[NewReport]) -> Result<bool> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(db)?;
        let mark: Option<i64> = tx
            .query_row("SELECT period_end FROM mark WHERE k = 0", [], |r| r.get(0))
            .optional()
            .map_err(db)?;
        if mark.map(|m| m as u64) != seen {
            return Ok(false);
        }
        let now = super::now() as i64;
        for r in reports {
            tx.execute(
                "INSERT INTO reports (id, domain, begin_at, end_at, created_at, state, updated_at,
                                      rua, rows_n, messages, xml_gz)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?5, ?6, ?7, ?8, ?9)",
                params![
                    r.id,
                    r.domain,
                    r.begin as i64,
                    r.end as i64,
                    now,
                    r.rua,
                    r.rows as i64,
                    r.messages as i64,
                    r.xml_gz
                ],
            )
            .map_err(db)?;
        }
        tx.execute("DELETE FROM evaluations WHERE at < ?1", [end as i64])
            .map_err(db)?;
        tx.execute(
            "INSERT INTO mark (k, period_end) VALUES (0, ?1)
             ON CONFLICT (k) DO UPDATE SET period_end = excluded.period_end",
            [end as i64],
        )
        .map_err(db)?;
        tx.commit().map_err(db)?;
        Ok(true)
    }

    fn list(&self) -> Result<Vec<StoredReport>> {
        self.select("ORDER BY end_at DESC, domain", [])
    }

    fn get(&self, id: &str) -> Result<Option<StoredReport>> {
        Ok(self.select("WHERE id = ?1", [id])?.pop())
    }

    fn due(&self, now: u64) -> Result<Vec<StoredReport>> {
        self.select(
            "WHERE state = 'pending' AND next_attempt <= ?1 ORDER BY end_at, domain",
            [now as i64],
        )
    }

    fn transition(
        &mut self,
        id: &str,
        from: ReportState,
        to: ReportState,
        now: u64,
    ) -> Result<bool> {
        let n = self
            .conn
            .execute(
                "UPDATE reports SET state = ?1, updated_at = ?2 WHERE id = ?3 AND state = ?4",
                params![to.as_str(), now as i64, id, from.as_str()],
            )
            .map_err(db)?;
        Ok(n == 1)
    }

    fn settle(
        &mut self,
        id: &str,
        state: ReportState,
        next_attempt: u64,
        sent_to: &str,
        error: &str,
        now: u64,
    ) -> Result<()> {
        self.conn
            .execute(
                "UPDATE reports SET state = ?1, attempts = attempts + 1, next_attempt = ?2,
                        sent_to = ?3, last_error = ?4, updated_at = ?5
                 WHERE id = ?6 AND state = 'sending'",
                params![
                    state.as_str(),
                    next_attempt as i64,
                    sent_to,
                    error,
                    now as i64,
                    id
                ],
            )
            .map_err(db)?;
        Ok(())
    }

    fn abandon_stale(&mut self, older_than: u64) -> Result<usize> {
        self.conn
            .execute(
                "UPDATE reports SET state = 'unsettled',
                        last_error = 'sender stopped while sending: may have been delivered'
                 WHERE state = 'sending' AND updated_at < ?1",
                [older_than as i64],
            )
            .map_err(db)
    }
}
