//! The `quarantine list` query, built once for both backends: the same filters, the same
//! keyset pagination, the same order. Only the spelling differs ([`Dialect`]): SQLite
//! numbers its parameters `?N` and needs `ESCAPE '\'` for a backslash escape in `LIKE`
//! (already case-insensitive for ASCII); PostgreSQL numbers them `$N` and matches case-
//! insensitively with `ILIKE` (whose default escape is the backslash).

use super::State;
use super::index::Filter;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// One bound parameter; each backend turns these into its own driver's values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arg {
    Int(i64),
    Text(String),
}

/// Most rows one PostgreSQL `list` returns: its statement runs within the shared
/// database's operation budget. The embedded store is the instance's own and has no cap.
const PG_MAX_LIMIT: usize = 100_000;

impl Dialect {
    fn head(self) -> &'static str {
        match self {
            Dialect::Sqlite => {
                "SELECT id, received_at, state, mail_from, header_from, rcpts, subject, reasons, flags, size FROM entries WHERE 1=1"
            }
            Dialect::Postgres => {
                "SELECT id, received_at, state, mail_from, header_from, rcpts, subject, reasons, flags, size, instance
         FROM quarantine_entries WHERE true"
            }
        }
    }

    fn param(self, n: usize) -> String {
        match self {
            Dialect::Sqlite => format!("?{n}"),
            Dialect::Postgres => format!("${n}"),
        }
    }

    /// `column` matches the pattern in parameter `n` (case-insensitively, wildcards of
    /// the user's text escaped by [`like`]).
    fn like(self, column: &str, n: usize) -> String {
        match self {
            Dialect::Sqlite => format!("{column} LIKE ?{n} ESCAPE '\\'"),
            Dialect::Postgres => format!("{column} ILIKE ${n}"),
        }
    }

    fn limit(self, limit: usize) -> usize {
        match self {
            Dialect::Sqlite => limit.max(1),
            Dialect::Postgres => limit.clamp(1, PG_MAX_LIMIT),
        }
    }
}

/// `%s%` for a LIKE pattern, with the wildcards (and the escape) of `s` taken literally.
pub fn like(s: &str) -> String {
    let escaped = s
        .replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_");
    format!("%{escaped}%")
}

/// `state IN ('held', 'releasing')`: the pending states, spelled as PostgreSQL's partial
/// index predicate is (so the planner uses it) and as SQLite's `entries_state` index.
fn pending_states() -> String {
    let states: Vec<String> = State::ALL
        .into_iter()
        .filter(|s| s.is_pending())
        .map(|s| format!("'{}'", s.as_str()))
        .collect();
    format!("state IN ({})", states.join(", "))
}

/// The `list` query for `f`: text and parameters (kept apart so a test can read it).
pub fn build(f: &Filter, d: Dialect) -> (String, Vec<Arg>) {
    let mut sql = String::from(d.head());
    let mut args = Vec::new();
    let bind = |args: &mut Vec<Arg>, a: Arg| {
        args.push(a);
        args.len()
    };
    if !f.all_states {
        sql.push_str(&format!(" AND {}", pending_states()));
    }
    if let Some(since) = f.since {
        let n = bind(&mut args, Arg::Int(since as i64));
        sql.push_str(&format!(" AND received_at >= {}", d.param(n)));
    }
    for (text, columns) in [
        (&f.reason, &["reasons", "flags"][..]),
        (&f.from, &["mail_from", "header_from"][..]),
        (&f.rcpt, &["rcpts"][..]),
    ] {
        if let Some(text) = text {
            let n = bind(&mut args, Arg::Text(like(text)));
            let matches: Vec<String> = columns.iter().map(|c| d.like(c, n)).collect();
            match matches.as_slice() {
                [one] => sql.push_str(&format!(" AND {one}")),
                _ => sql.push_str(&format!(" AND ({})", matches.join(" OR "))),
            }
        }
    }
    if let Some((at, id)) = &f.before {
        let at = bind(&mut args, Arg::Int(*at as i64));
        let id = bind(&mut args, Arg::Text(id.clone()));
        // Row values compare like the ORDER BY below (received_at DESC, id DESC).
        sql.push_str(&format!(
            " AND (received_at, id) < ({}, {})",
            d.param(at),
            d.param(id)
        ));
    }
    let n = bind(&mut args, Arg::Int(d.limit(f.limit) as i64));
    sql.push_str(&format!(
        " ORDER BY received_at DESC, id DESC LIMIT {}",
        d.param(n)
    ));
    (sql, args)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter() -> Filter {
        Filter {
            limit: 50,
            since: Some(7),
            reason: Some("dmarc".into()),
            before: Some((100, "ID".into())),
            from: Some("50%_off".into()),
            rcpt: Some("bob".into()),
            ..Default::default()
        }
    }

    #[test]
    fn both_dialects_filter_alike() {
        let (lite, lite_args) = build(&filter(), Dialect::Sqlite);
        let (pg, pg_args) = build(&filter(), Dialect::Postgres);
        assert_eq!(lite_args, pg_args);
        assert_eq!(lite_args[2], Arg::Text("%50\\%\\_off%".into()));
        assert!(
            lite.contains(
                " AND (mail_from LIKE ?3 ESCAPE '\\' OR header_from LIKE ?3 ESCAPE '\\')"
            ),
            "{lite}"
        );
        assert!(lite.contains(" AND rcpts LIKE ?4 ESCAPE '\\'"), "{lite}");
        assert!(lite.contains(" AND (received_at, id) < (?5, ?6)"), "{lite}");
        assert!(lite.ends_with("LIMIT ?7"), "{lite}");
        assert!(
            pg.contains(" AND (reasons ILIKE $2 OR flags ILIKE $2)"),
            "{pg}"
        );
        assert!(
            pg.ends_with("ORDER BY received_at DESC, id DESC LIMIT $7"),
            "{pg}"
        );
        // The same query, spelled twice: nothing but the spelling differs.
        let respelled = pg
            .replace(" ILIKE $", " LIKE ?")
            .replace('$', "?")
            .replace("LIKE ?2", "LIKE ?2 ESCAPE '\\'")
            .replace("LIKE ?3", "LIKE ?3 ESCAPE '\\'")
            .replace("LIKE ?4", "LIKE ?4 ESCAPE '\\'");
        let tail = |s: &str| s[s.find("AND").unwrap()..].to_string();
        assert_eq!(tail(&respelled), tail(&lite));
    }

    #[test]
    fn pending_states_and_limits() {
        let (sql, _) = build(&Filter::default(), Dialect::Sqlite);
        assert!(sql.contains("state IN ('held', 'releasing')"), "{sql}");
        let all = Filter {
            all_states: true,
            limit: 1_000_000,
            ..Default::default()
        };
        let (sql, args) = build(&all, Dialect::Postgres);
        assert!(!sql.contains("state IN"), "{sql}");
        assert_eq!(args, [Arg::Int(PG_MAX_LIMIT as i64)]);
        assert_eq!(build(&all, Dialect::Sqlite).1, [Arg::Int(1_000_000)]);
    }
}
