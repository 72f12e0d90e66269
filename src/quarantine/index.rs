//! The queryable index of the quarantine (SQLite, WAL). The entry files are the truth;
//! the index can always be rebuilt from their `meta.json` (see `Quarantine::open`). It is
//! also where the state of an entry changes atomically: `held → releasing → released`
//! happens in one UPDATE guarded by the current state, so two releases of the same entry
//! can never both proceed.

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSqlOutput, ValueRef};
use rusqlite::{Connection, OptionalExtension, params};

use super::capacity::{Usage, sender_domain};
use super::list_query::{self, Arg, Dialect};
use super::{Meta, State};

/// The state column holds [`State::as_str`]; these two are the only places it is text.
impl rusqlite::ToSql for State {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.as_str()))
    }
}

/// A spelling this version does not know (a newer writer, a hand edit) is an error,
/// not a guess.
impl FromSql for State {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        let text = value.as_str()?;
        State::parse(text)
            .ok_or_else(|| FromSqlError::Other(format!("unknown quarantine state {text:?}").into()))
    }
}

pub struct Index {
    conn: Connection,
}

/// Filters of `quarantine list`.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    /// Only entries received at or after this time (seconds since the epoch).
    pub since: Option<u64>,
    /// Substring of a reason or a flag.
    pub reason: Option<String>,
    /// Substring of the envelope sender or the header From.
    pub from: Option<String>,
    /// Substring of a recipient.
    pub rcpt: Option<String>,
    /// Include released and deleted entries too.
    pub all_states: bool,
    pub limit: usize,
    /// Keyset pagination: only entries after this one in list order (newest first), given
    /// as its `(received_at, id)`, the last row of the previous page. A page costs the
    /// same at any depth (no OFFSET that reads and drops every earlier row).
    pub before: Option<(u64, String)>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS entries (
    id TEXT PRIMARY KEY,
    received_at INTEGER NOT NULL,
    state TEXT NOT NULL,
    mail_from TEXT NOT NULL,
    rcpts TEXT NOT NULL,
    header_from TEXT NOT NULL,
    subject TEXT NOT NULL,
    size INTEGER NOT NULL,
    verdict TEXT NOT NULL,
    reasons TEXT NOT NULL,
    flags TEXT NOT NULL,
    client TEXT NOT NULL,
    sender_domain TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS entries_received ON entries (received_at DESC);
CREATE INDEX IF NOT EXISTS entries_state ON entries (state, received_at DESC);
";

/// Capacity accounting (schema version 1): totals kept by triggers in the same
/// transaction as every row insert and delete, by any process (the proxy, the CLI's
/// delete and purge), so reading the usage is two point lookups however large the store
/// is. `INSERT OR REPLACE` deletes the replaced row first; with `recursive_triggers` on
/// (set at every open) that fires the delete trigger, so a replaced row is not counted
/// twice. A state change (an UPDATE) changes neither size nor domain.
const USAGE_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS usage_total (
    k INTEGER PRIMARY KEY CHECK (k = 0),
    entries INTEGER NOT NULL,
    bytes INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS usage_by_domain (
    domain TEXT PRIMARY KEY,
    entries INTEGER NOT NULL,
    bytes INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS entries_usage_insert AFTER INSERT ON entries BEGIN
    UPDATE usage_total SET entries = entries + 1, bytes = bytes + NEW.size WHERE k = 0;
    INSERT INTO usage_by_domain (domain, entries, bytes) VALUES (NEW.sender_domain, 1, NEW.size)
        ON CONFLICT (domain) DO UPDATE SET entries = entries + 1, bytes = bytes + excluded.bytes;
END;
CREATE TRIGGER IF NOT EXISTS entries_usage_delete AFTER DELETE ON entries BEGIN
    UPDATE usage_total SET entries = entries - 1, bytes = bytes - OLD.size WHERE k = 0;
    UPDATE usage_by_domain SET entries = entries - 1, bytes = bytes - OLD.size
        WHERE domain = OLD.sender_domain;
    DELETE FROM usage_by_domain WHERE domain = OLD.sender_domain AND entries <= 0;
END;
DELETE FROM usage_total;
INSERT INTO usage_total (k, entries, bytes)
    SELECT 0, COUNT(*), COALESCE(SUM(size), 0) FROM entries;
DELETE FROM usage_by_domain;
INSERT INTO usage_by_domain (domain, entries, bytes)
    SELECT sender_domain, COUNT(*), SUM(size) FROM entries GROUP BY sender_domain;
";

/// `PRAGMA user_version` of a store with capacity accounting.
const SCHEMA_VERSION: i64 = 1;

impl Index {
    pub fn open(path: &std::path::Path) -> rusqlite::Result<Index> {
        let conn = Connection::open(path)?;
        // First: even the pragmas below may meet a lock held by the proxy's writes
        // (a CLI run during a busy moment would otherwise fail with "database is locked").
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        // WAL: readers (the CLI, the admin API) never block the writers (sessions).
        // synchronous=NORMAL: a crash may lose the last index rows, never the entries,
        // which are fsync'd before this is written and re-indexed at the next open.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "recursive_triggers", "ON")?;
        conn.execute_batch(SCHEMA)?;
        migrate(&conn)?;
        // Keep the planner's statistics current, so filtered lists use the time index
        // instead of sorting every held row (cheap: it only analyzes what changed).
        conn.execute_batch("PRAGMA optimize=0x10002")?;
        Ok(Index { conn })
    }

    pub fn insert(&self, m: &Meta) -> rusqlite::Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO entries
             (id, received_at, state, mail_from, rcpts, header_from, subject, size, verdict, reasons, flags, client, sender_domain)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            params![
                m.id,
                m.received_at as i64,
                m.state,
                m.mail_from,
                m.rcpts.join(","),
                m.header_from,
                m.subject,
                m.size as i64,
                m.verdict,
                m.reasons.join("; "),
                m.flags.join(","),
                m.client,
                sender_domain(&m.mail_from, &m.header_from)
            ],
        )?;
        Ok(())
    }

    /// Every id in the index (one query: opening a store of 100,000 entries must stay fast).
    pub fn all_ids(&self) -> rusqlite::Result<Vec<String>> {
        let mut stmt = self.conn.prepare("SELECT id FROM entries")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        rows.collect()
    }

    pub fn contains(&self, id: &str) -> rusqlite::Result<bool> {
        Ok(self
            .conn
            .query_row("SELECT 1 FROM entries WHERE id = ?1", [id], |_| Ok(()))
            .optional()?
            .is_some())
    }

    pub fn state(&self, id: &str) -> rusqlite::Result<Option<State>> {
        self.conn
            .query_row("SELECT state FROM entries WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()
    }

    /// Moves `id` from `from` to `to`; false when it was not in state `from`.
    pub fn transition(&self, id: &str, from: State, to: State) -> rusqlite::Result<bool> {
        let n = self.conn.execute(
            "UPDATE entries SET state = ?3 WHERE id = ?1 AND state = ?2",
            params![id, from, to],
        )?;
        Ok(n == 1)
    }

    pub fn remove(&self, id: &str) -> rusqlite::Result<()> {
        self.conn
            .execute("DELETE FROM entries WHERE id = ?1", [id])?;
        Ok(())
    }

    /// Ids received before `before` (seconds since the epoch), oldest first.
    pub fn older_than(&self, before: u64) -> rusqlite::Result<Vec<String>> {
        let mut stmt = self
            .conn
            .prepare("SELECT id FROM entries WHERE received_at < ?1 ORDER BY received_at")?;
        let rows = stmt.query_map([before as i64], |r| r.get(0))?;
        rows.collect()
    }

    /// Newest first, filtered; `(id, received_at, state, mail_from, rcpts, subject, reasons, flags, size)`.
    pub fn list(&self, f: &Filter) -> rusqlite::Result<Vec<Row>> {
        let (sql, args) = list_query::build(f, Dialect::Sqlite);
        let args: Vec<Box<dyn rusqlite::ToSql>> = args
            .into_iter()
            .map(|a| -> Box<dyn rusqlite::ToSql> {
                match a {
                    Arg::Int(n) => Box::new(n),
                    Arg::Text(t) => Box::new(t),
                }
            })
            .collect();
        let mut stmt = self.conn.prepare(&sql)?;
        let rows = stmt.query_map(rusqlite::params_from_iter(args.iter()), |r| {
            Ok(Row {
                id: r.get(0)?,
                received_at: r.get::<_, i64>(1)? as u64,
                state: r.get(2)?,
                mail_from: r.get(3)?,
                header_from: r.get(4)?,
                rcpts: r.get(5)?,
                subject: r.get(6)?,
                reasons: r.get(7)?,
                flags: r.get(8)?,
                size: r.get::<_, i64>(9)? as u64,
                instance: String::new(),
            })
        })?;
        rows.collect()
    }

    /// Copies the write-ahead log into the database and truncates it to zero. The WAL
    /// only grows between automatic checkpoints (every 1000 pages); on a full disk that
    /// growth can eat the room a delete just freed, so a write that failed for lack of
    /// room gives it back this way before its one retry. Best effort.
    pub fn reclaim_wal(&self) {
        let _ = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
    }

    /// Entries and message bytes in the whole store (kept by triggers; a point read).
    pub fn usage(&self) -> rusqlite::Result<Usage> {
        self.conn.query_row(
            "SELECT entries, bytes FROM usage_total WHERE k = 0",
            [],
            |r| {
                Ok(Usage {
                    entries: r.get::<_, i64>(0)?.max(0) as u64,
                    bytes: r.get::<_, i64>(1)?.max(0) as u64,
                })
            },
        )
    }

    /// Entries and bytes accounted to one sender domain (a point read).
    pub fn domain_usage(&self, domain: &str) -> rusqlite::Result<Usage> {
        Ok(self
            .conn
            .query_row(
                "SELECT entries, bytes FROM usage_by_domain WHERE domain = ?1",
                [domain],
                |r| {
                    Ok(Usage {
                        entries: r.get::<_, i64>(0)?.max(0) as u64,
                        bytes: r.get::<_, i64>(1)?.max(0) as u64,
                    })
                },
            )
            .optional()?
            .unwrap_or_default())
    }

    /// Number of entries per state (a spelling this version does not know is left out
    /// of the counts rather than failing them).
    pub fn counts(&self) -> rusqlite::Result<Vec<(State, u64)>> {
        let mut stmt = self
            .conn
            .prepare("SELECT state, COUNT(*) FROM entries GROUP BY state ORDER BY state")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
        })?;
        let counted: Vec<(String, u64)> = rows.collect::<rusqlite::Result<_>>()?;
        Ok(counted
            .into_iter()
            .filter_map(|(s, n)| State::parse(&s).map(|s| (s, n)))
            .collect())
    }

    /// Runs `f` in one transaction (bulk inserts when rebuilding).
    pub fn batch<T>(
        &mut self,
        f: impl FnOnce(&Index) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        self.conn.execute_batch("BEGIN")?;
        match f(self) {
            Ok(v) => {
                self.conn.execute_batch("COMMIT")?;
                Ok(v)
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }
}

/// Brings an index of an older version up to [`SCHEMA_VERSION`]: adds and fills the
/// `sender_domain` column, then creates the usage tables and triggers and counts what is
/// there. One IMMEDIATE transaction, version re-read inside it, so two processes opening
/// an old store at once migrate it once.
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let version = |c: &Connection| c.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0));
    if version(conn)? >= SCHEMA_VERSION {
        return Ok(());
    }
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let result = (|| {
        if version(conn)? >= SCHEMA_VERSION {
            return Ok(());
        }
        let has_column = conn
            .prepare("SELECT 1 FROM pragma_table_info('entries') WHERE name = 'sender_domain'")?
            .exists([])?;
        if !has_column {
            conn.execute_batch(
                "ALTER TABLE entries ADD COLUMN sender_domain TEXT NOT NULL DEFAULT ''",
            )?;
        }
        let rows: Vec<(String, String, String)> = conn
            .prepare("SELECT id, mail_from, header_from FROM entries WHERE sender_domain = ''")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let mut update = conn.prepare("UPDATE entries SET sender_domain = ?2 WHERE id = ?1")?;
        for (id, mail_from, header_from) in rows {
            let domain = sender_domain(&mail_from, &header_from);
            if !domain.is_empty() {
                update.execute(params![id, domain])?;
            }
        }
        conn.execute_batch(USAGE_SCHEMA)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)
    })();
    match result {
        Ok(()) => conn.execute_batch("COMMIT"),
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

/// One line of `quarantine list`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub id: String,
    pub received_at: u64,
    pub state: State,
    pub mail_from: String,
    pub header_from: String,
    pub rcpts: String,
    pub subject: String,
    pub reasons: String,
    pub flags: String,
    pub size: u64,
    /// The instance that accepted it (PostgreSQL backend; the embedded store is one
    /// instance's own, and leaves it out).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub instance: String,
}
