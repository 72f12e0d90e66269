//! The PostgreSQL backend of the quarantine: one store shared by every instance of a
//! cluster (`[quarantine] backend = "postgres"`, schema in
//! `src/store/migrations/0001_quarantine.sql`).
//!
//! - `store`: entry row and message bytes in one transaction with `synchronous_commit`
//!   on (set for the transaction, whatever the server's default), so the client hears
//!   250 only once the commit is durable on the server.
//! - A commit whose outcome is unknown (the connection died or the budget ran out after
//!   COMMIT was sent) answered 451 to the client, which will send the message again: the
//!   id is remembered and deleted as soon as the server answers again, so an entry the
//!   client was never told about does not stay (nothing unacknowledged is kept). Only a
//!   crash of this instance in that window can leave such an entry behind (listed, and
//!   purged by retention like any other).
//! - `transition` is one `UPDATE … WHERE id = $1 AND state = $2`: under READ COMMITTED,
//!   a concurrent second UPDATE waits for the first to commit, re-reads the row, no
//!   longer matches, and updates nothing. So with A, B and C releasing at the same
//!   moment exactly one moves the entry to `releasing` and sends it.
//! - Capacity counts and per-state counts are kept by a trigger (point reads).
//!   Admission is checked per instance before the insert: instances admitting at the
//!   same instant can overshoot a limit by at most one entry each.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio_postgres::Client;
use tokio_postgres::types::ToSql;

use super::capacity::{Capacity, Refusal, Usage, sender_domain};
use super::index::{Filter, Row};
use super::list_query::{self, Arg, Dialect};
use super::store::QuarantineStore;
use super::{FullAlert, Meta, QuarantineId, State, StoreError, printable};
use crate::store::postgres::{PgError, PgPool};

pub struct PgQuarantine {
    pool: Arc<PgPool>,
    /// Recorded with each entry this instance accepts, and with each state change.
    instance: String,
    capacity: Option<Capacity>,
    full_alert: Mutex<FullAlert>,
    /// Ids whose commit outcome is unknown and whose client was told 451: deleted when
    /// the server answers again.
    in_doubt: Mutex<Vec<String>>,
}

fn db(e: PgError) -> StoreError {
    StoreError::Database(e.message)
}

impl PgQuarantine {
    pub fn new(pool: Arc<PgPool>, instance: &str) -> PgQuarantine {
        PgQuarantine {
            pool,
            instance: instance.to_string(),
            capacity: None,
            full_alert: Mutex::new(FullAlert::default()),
            in_doubt: Mutex::new(Vec::new()),
        }
    }

    /// Applies capacity limits to every later `store`.
    pub fn with_capacity(mut self, capacity: Capacity) -> PgQuarantine {
        self.capacity = Some(capacity);
        self
    }

    pub fn pool(&self) -> &Arc<PgPool> {
        &self.pool
    }

    /// Deletes the entries whose commit was in doubt (see the module doc). Called before
    /// each store and by the health probe; a failure keeps them for the next try.
    pub async fn settle_in_doubt(&self) {
        let ids: Vec<String> = self
            .in_doubt
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if ids.is_empty() {
            return;
        }
        let Ok(mut conn) = self.pool.get().await else {
            return;
        };
        let out = self
            .pool
            .budget(async {
                conn.client()
                    .execute("DELETE FROM quarantine_entries WHERE id = ANY($1)", &[&ids])
                    .await
            })
            .await;
        if let Ok(n) = self.pool.settle(conn, out) {
            self.in_doubt
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|id| !ids.contains(id));
            tracing::warn!(
                ids = ?ids,
                removed = n,
                "quarantine: entries whose commit was in doubt (client told 451) removed"
            );
        }
    }

    async fn insert(&self, meta: &Meta, message: &[u8], admit: bool) -> Result<bool, StoreError> {
        let domain = sender_domain(&meta.mail_from, &meta.header_from);
        let json = serde_json::to_string(meta).map_err(std::io::Error::other)?;
        let slot: i16 = (rand::random::<u8>() % 16) as i16;
        let state = meta.state;
        let committing = std::sync::atomic::AtomicBool::new(false);
        let mut conn = self.pool.get().await.map_err(db)?;
        let capacity = if admit { self.capacity } else { None };
        let out = self
            .pool
            .budget(insert_entry(
                conn.client(),
                InsertArgs {
                    meta,
                    message,
                    json: &json,
                    domain: &domain,
                    slot,
                    state,
                    instance: &self.instance,
                    capacity,
                },
                &committing,
            ))
            .await;
        let in_doubt =
            committing.load(std::sync::atomic::Ordering::Relaxed) && !matches!(out, Ok(Ok(_)));
        match self.pool.settle(conn, out) {
            Ok(Ok(inserted)) => Ok(inserted),
            Ok(Err(refusal)) => Err(StoreError::Full(refusal)),
            Err(e) => {
                if in_doubt && admit {
                    self.in_doubt
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(meta.id.clone());
                }
                Err(db(e))
            }
        }
    }

    /// One read-only statement on a pooled connection, within the budget.
    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        let mut conn = self.pool.get().await.map_err(db)?;
        let out = self.pool.budget(conn.client().query(sql, params)).await;
        self.pool.settle(conn, out).map_err(db)
    }

    async fn execute(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, StoreError> {
        let mut conn = self.pool.get().await.map_err(db)?;
        let out = self.pool.budget(conn.client().execute(sql, params)).await;
        self.pool.settle(conn, out).map_err(db)
    }

    async fn state_of(&self, id: &QuarantineId) -> Result<Option<State>, StoreError> {
        let rows = self
            .query(
                "SELECT state FROM quarantine_entries WHERE id = $1",
                &[&id.as_str()],
            )
            .await?;
        rows.first().map(|r| state_column(r, 0)).transpose()
    }
}

/// The state column of `row`: the one place its text becomes a [`State`]. A spelling
/// this version does not know (a newer writer, a hand edit) is an error, not a guess.
fn state_column(row: &tokio_postgres::Row, idx: usize) -> Result<State, StoreError> {
    let text: &str = row.get(idx);
    State::parse(text).ok_or_else(|| {
        StoreError::Database(format!("unknown quarantine state {:?}", printable(text)))
    })
}

struct InsertArgs<'a> {
    meta: &'a Meta,
    message: &'a [u8],
    json: &'a str,
    domain: &'a str,
    slot: i16,
    state: State,
    instance: &'a str,
    capacity: Option<Capacity>,
}

/// The insert transaction. `Ok(Err(_))`: refused for capacity (nothing written);
/// `Ok(Ok(false))`: the id exists already (import).
async fn insert_entry(
    client: &mut Client,
    a: InsertArgs<'_>,
    committing: &std::sync::atomic::AtomicBool,
) -> Result<Result<bool, Refusal>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    // The durability contract holds whatever the server or role default is.
    tx.batch_execute("SET LOCAL synchronous_commit = on")
        .await?;
    if let Some(cap) = a.capacity {
        let total = usage_of(
            &tx.query_one(
                "SELECT COALESCE(SUM(entries), 0)::bigint, COALESCE(SUM(bytes), 0)::bigint FROM quarantine_counts",
                &[],
            )
            .await?,
        );
        let by_domain = usage_of(
            &tx.query_one(
                "SELECT COALESCE(SUM(entries), 0)::bigint, COALESCE(SUM(bytes), 0)::bigint
                 FROM quarantine_domain_usage WHERE domain = $1",
                &[&a.domain],
            )
            .await?,
        );
        if let Err(refusal) = cap.admit(total, a.domain, by_domain, a.meta.size as u64) {
            return Ok(Err(refusal));
        }
    }
    let m = a.meta;
    // An imported entry keeps the instance that accepted it; a new one is ours.
    let instance = if m.instance.is_empty() {
        a.instance
    } else {
        m.instance.as_str()
    };
    let n = tx
        .execute(
            "INSERT INTO quarantine_entries
             (id, received_at, state, state_at, state_by, instance, mail_from, header_from, rcpts,
              subject, reasons, flags, size, sender_domain, usage_slot, meta)
             VALUES ($1, $2, $3, $2, $4, $15, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14::text::jsonb)
             ON CONFLICT (id) DO NOTHING",
            &[
                &m.id,
                &(m.received_at as i64),
                &a.state.as_str(),
                &a.instance,
                &m.mail_from,
                &m.header_from,
                &m.rcpts.join(","),
                &m.subject,
                &m.reasons.join("; "),
                &m.flags.join(","),
                &(m.size as i64),
                &a.domain,
                &a.slot,
                &a.json,
                &instance,
            ],
        )
        .await?;
    if n == 0 {
        return Ok(Ok(false));
    }
    tx.execute(
        "INSERT INTO quarantine_messages (id, bytes) VALUES ($1, $2)",
        &[&m.id, &a.message],
    )
    .await?;
    committing.store(true, std::sync::atomic::Ordering::Relaxed);
    tx.commit().await?;
    Ok(Ok(true))
}

fn usage_of(r: &tokio_postgres::Row) -> Usage {
    Usage {
        entries: r.get::<_, i64>(0).max(0) as u64,
        bytes: r.get::<_, i64>(1).max(0) as u64,
    }
}

/// The `list` query for `f`, with its parameters as PostgreSQL values.
fn list_sql(f: &Filter) -> (String, Vec<Box<dyn ToSql + Sync + Send>>) {
    let (sql, args) = list_query::build(f, Dialect::Postgres);
    let args = args
        .into_iter()
        .map(|a| -> Box<dyn ToSql + Sync + Send> {
            match a {
                Arg::Int(n) => Box::new(n),
                Arg::Text(t) => Box::new(t),
            }
        })
        .collect();
    (sql, args)
}

#[async_trait]
impl QuarantineStore for PgQuarantine {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn store(&self, mut meta: Meta, message: Vec<u8>) -> Result<QuarantineId, StoreError> {
        self.settle_in_doubt().await;
        let id = QuarantineId::generate();
        meta.id = id.to_string();
        meta.state = State::Held;
        meta.instance = self.instance.clone();
        match self.insert(&meta, &message, true).await? {
            true => Ok(id),
            // 128 random bits: a collision is a broken random source, not bad luck.
            false => Err(StoreError::Exists(id.to_string())),
        }
    }

    async fn import(&self, meta: Meta, message: Vec<u8>) -> Result<(), StoreError> {
        QuarantineId::parse(&meta.id).ok_or_else(|| StoreError::BadId(printable(&meta.id)))?;
        match self.insert(&meta, &message, false).await? {
            true => Ok(()),
            false => Err(StoreError::Exists(meta.id.clone())),
        }
    }

    async fn lookup(&self, input: &str) -> Result<QuarantineId, StoreError> {
        let id = QuarantineId::parse(input).ok_or_else(|| StoreError::BadId(printable(input)))?;
        match self.state_of(&id).await? {
            Some(_) => Ok(id),
            None => Err(StoreError::NotFound(id.to_string())),
        }
    }

    async fn meta(&self, id: &QuarantineId) -> Result<Meta, StoreError> {
        let rows = self
            .query(
                "SELECT meta::text, state, instance FROM quarantine_entries WHERE id = $1",
                &[&id.as_str()],
            )
            .await?;
        let row = rows
            .first()
            .ok_or_else(|| StoreError::NotFound(id.to_string()))?;
        let mut meta: Meta =
            serde_json::from_str(row.get::<_, &str>(0)).map_err(std::io::Error::other)?;
        // The column is where state changes happen.
        meta.state = state_column(row, 1)?;
        meta.instance = row.get(2);
        Ok(meta)
    }

    async fn message(&self, id: &QuarantineId) -> Result<Vec<u8>, StoreError> {
        let rows = self
            .query(
                "SELECT bytes FROM quarantine_messages WHERE id = $1",
                &[&id.as_str()],
            )
            .await?;
        rows.first()
            .map(|r| r.get::<_, Vec<u8>>(0))
            .ok_or_else(|| StoreError::NotFound(id.to_string()))
    }

    async fn list(&self, filter: &Filter) -> Result<Vec<Row>, StoreError> {
        let (sql, args) = list_sql(filter);
        let params: Vec<&(dyn ToSql + Sync)> = args
            .iter()
            .map(|a| a.as_ref() as &(dyn ToSql + Sync))
            .collect();
        let rows = self.query(&sql, &params).await?;
        rows.iter()
            .map(|r| {
                Ok(Row {
                    id: r.get(0),
                    received_at: r.get::<_, i64>(1).max(0) as u64,
                    state: state_column(r, 2)?,
                    mail_from: r.get(3),
                    header_from: r.get(4),
                    rcpts: r.get(5),
                    subject: r.get(6),
                    reasons: r.get(7),
                    flags: r.get(8),
                    size: r.get::<_, i64>(9).max(0) as u64,
                    instance: r.get(10),
                })
            })
            .collect()
    }

    async fn counts(&self) -> Result<Vec<(State, u64)>, StoreError> {
        let rows = self
            .query(
                "SELECT state, SUM(entries)::bigint FROM quarantine_counts GROUP BY state HAVING SUM(entries) > 0 ORDER BY state",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                State::parse(r.get::<_, &str>(0)).map(|s| (s, r.get::<_, i64>(1).max(0) as u64))
            })
            .collect())
    }

    async fn usage(&self) -> Result<Usage, StoreError> {
        let rows = self
            .query(
                "SELECT COALESCE(SUM(entries), 0)::bigint, COALESCE(SUM(bytes), 0)::bigint FROM quarantine_counts",
                &[],
            )
            .await?;
        Ok(rows.first().map(usage_of).unwrap_or_default())
    }

    async fn transition(
        &self,
        id: &QuarantineId,
        from: State,
        to: State,
    ) -> Result<(), StoreError> {
        let n = self
            .execute(
                "UPDATE quarantine_entries SET state = $3, state_at = $4, state_by = $5
                 WHERE id = $1 AND state = $2",
                &[
                    &id.as_str(),
                    &from.as_str(),
                    &to.as_str(),
                    &(super::now() as i64),
                    &self.instance,
                ],
            )
            .await?;
        if n == 1 {
            return Ok(());
        }
        // Gone between the update and this read (deleted meanwhile): not found.
        let state = self
            .state_of(id)
            .await?
            .ok_or_else(|| StoreError::NotFound(id.to_string()))?;
        Err(StoreError::WrongState {
            id: id.to_string(),
            state,
            wanted: from,
        })
    }

    async fn delete(&self, id: &QuarantineId) -> Result<(), StoreError> {
        let n = self
            .execute(
                "DELETE FROM quarantine_entries WHERE id = $1",
                &[&id.as_str()],
            )
            .await?;
        if n == 0 {
            return Err(StoreError::NotFound(id.to_string()));
        }
        Ok(())
    }

    async fn purge_older_than(&self, age_secs: u64) -> Result<usize, StoreError> {
        let before = super::now().saturating_sub(age_secs) as i64;
        let mut total = 0usize;
        // In batches: each a short transaction (no long lock on a million rows, and each
        // within the operation budget).
        loop {
            let n = self
                .execute(
                    "DELETE FROM quarantine_entries WHERE id IN
                     (SELECT id FROM quarantine_entries WHERE received_at < $1 LIMIT 1000)",
                    &[&before],
                )
                .await?;
            total += n as usize;
            if n == 0 {
                return Ok(total);
            }
        }
    }

    fn capacity(&self) -> Option<Capacity> {
        self.capacity
    }

    fn alert_full(&self, refusal: &Refusal, interval: Duration) -> bool {
        super::alert_full(&self.full_alert, refusal, interval)
    }

    fn unavailable(&self) -> Option<String> {
        self.pool.unavailable()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_query_uses_the_partial_index_and_keyset_pagination() {
        let (sql, args) = list_sql(&Filter {
            limit: 50,
            before: Some((100, "ID".into())),
            from: Some("50%_off".into()),
            ..Default::default()
        });
        assert!(sql.contains("state IN ('held', 'releasing')"), "{sql}");
        assert!(sql.contains("(received_at, id) < ($2, $3)"), "{sql}");
        assert!(
            sql.ends_with("ORDER BY received_at DESC, id DESC LIMIT $4"),
            "{sql}"
        );
        assert!(!sql.contains("OFFSET"));
        assert_eq!(args.len(), 4);
        let (all, _) = list_sql(&Filter {
            all_states: true,
            limit: 0,
            ..Default::default()
        });
        assert!(!all.contains("state IN"), "{all}");
    }
}
