//! `mailwarden quarantine list|show|release|delete|purge`.

use super::clip;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;

use clap::Subcommand;

use crate::admin::release::{ReleaseError, release};
use crate::config::{Config, Purpose};
use crate::quarantine::index::{Filter, Row};
use crate::quarantine::{self, QuarantineStore};
use crate::relay::NextHops;

#[derive(Subcommand, Debug)]
pub enum QuarantineCommand {
    /// Held messages, newest first.
    List {
        /// Only entries from the last DUR (e.g. 2h, 7d).
        #[arg(long)]
        since: Option<String>,
        /// Substring of a reason or flag (e.g. dmarc, spoof).
        #[arg(long)]
        reason: Option<String>,
        /// Substring of the envelope sender or header From.
        #[arg(long)]
        from: Option<String>,
        /// Substring of a recipient.
        #[arg(long)]
        rcpt: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Include released entries.
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// One entry: metadata, authentication results, headers, a safe text preview.
    Show {
        id: String,
        /// The message bytes exactly as received, nothing else.
        #[arg(long)]
        raw: bool,
        #[arg(long)]
        json: bool,
    },
    /// Re-inject through the configured next hop with the original envelope.
    Release {
        #[arg(required_unless_present = "where_policy")]
        ids: Vec<String>,
        /// Instead of IDs: every held entry this policy file would accept, found by
        /// replaying the decision log (`mailwarden policy replay`).
        #[arg(long, value_name = "NEW.toml", conflicts_with = "ids")]
        where_policy: Option<std::path::PathBuf>,
        /// With --where-policy: only entries held in the last DUR (e.g. 24h).
        #[arg(long, requires = "where_policy")]
        since: Option<String>,
        /// With --where-policy: list what would be released, release nothing.
        #[arg(long, requires = "where_policy")]
        dry_run: bool,
        /// Deliver to these recipients instead of the original ones.
        #[arg(long)]
        to: Vec<String>,
        /// Send again an entry whose earlier release has an unknown outcome.
        #[arg(long)]
        force: bool,
    },
    /// Remove entries for good.
    Delete {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Remove entries older than DUR (any state).
    Purge {
        #[arg(long)]
        older_than: String,
    },
    /// Move every entry from the store of one configuration to the store of another
    /// (embedded to PostgreSQL or back). Resumable: run it again after an interruption;
    /// nothing is lost or copied twice.
    Migrate {
        /// The configuration whose [quarantine] is emptied.
        #[arg(long)]
        from: std::path::PathBuf,
        /// The configuration whose [quarantine] receives the entries.
        #[arg(long)]
        to: std::path::PathBuf,
    },
}

pub fn run(config_path: &Path, cmd: &QuarantineCommand) -> ExitCode {
    if let QuarantineCommand::Migrate { from, to } = cmd {
        return crate::admin::quarantine_migrate::run(from, to);
    }
    let config = match Config::load_for(config_path, Purpose::Offline) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    crate::telemetry::init("warn", config.log.format);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(e),
    };
    runtime.block_on(run_async(&config, cmd))
}

async fn run_async(config: &Config, cmd: &QuarantineCommand) -> ExitCode {
    let store = match quarantine::store::open(config, quarantine::store::Opener::Cli).await {
        Ok((s, _)) => s,
        Err(e) => return fail(e),
    };
    let store = store.as_ref();
    match cmd {
        QuarantineCommand::List {
            since,
            reason,
            from,
            rcpt,
            limit,
            all,
            json,
        } => {
            let since = match since
                .as_deref()
                .map(crate::config::parse_duration)
                .transpose()
            {
                Ok(d) => d.map(|d| quarantine::now().saturating_sub(d.as_secs())),
                Err(e) => return fail(format!("--since: {e}")),
            };
            let filter = Filter {
                since,
                reason: reason.clone(),
                from: from.clone(),
                rcpt: rcpt.clone(),
                all_states: *all,
                limit: *limit,
                before: None,
            };
            match store.list(&filter).await {
                Ok(rows) if *json => {
                    println!("{}", serde_json::to_string(&rows).unwrap_or_default())
                }
                Ok(rows) => print!("{}", table(&rows)),
                Err(e) => return fail(e),
            }
        }
        QuarantineCommand::Show { id, raw, json } => return show(store, id, *raw, *json).await,
        QuarantineCommand::Release {
            ids,
            to,
            force,
            where_policy: Some(policy),
            since,
            dry_run,
        } if ids.is_empty() => {
            let ids = match where_policy(config, store, policy, since.as_deref()).await {
                Ok(ids) => ids,
                Err(e) => return fail(e),
            };
            if *dry_run {
                for id in &ids {
                    println!("{id}: would be released");
                }
                println!("{} entries would be released", ids.len());
                return ExitCode::SUCCESS;
            }
            return release_all(config, store, &ids, to, *force).await;
        }
        QuarantineCommand::Release { ids, to, force, .. } => {
            return release_all(config, store, ids, to, *force).await;
        }
        QuarantineCommand::Delete { ids } => {
            let mut failed = false;
            for input in ids {
                let deleted = match store.lookup(input).await {
                    Ok(id) => store.delete(&id).await.map(|()| id),
                    Err(e) => Err(e),
                };
                match deleted {
                    Ok(id) => println!("{id}: deleted"),
                    Err(e) => {
                        eprintln!("{e}");
                        failed = true;
                    }
                }
            }
            return if failed {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            };
        }
        QuarantineCommand::Purge { older_than } => {
            let age = match crate::config::parse_duration(older_than) {
                Ok(d) => d,
                Err(e) => return fail(format!("--older-than: {e}")),
            };
            match store.purge_older_than(age.as_secs()).await {
                Ok(n) => println!("purged {n} entries older than {older_than}"),
                Err(e) => return fail(e),
            }
        }
        QuarantineCommand::Migrate { .. } => unreachable!("handled before the store is opened"),
    }
    ExitCode::SUCCESS
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("mailwarden quarantine: {e}");
    ExitCode::from(1)
}

fn table(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<26}  {:<19}  {:<9}  {:<28}  {:<28}  {}\n",
        "ID", "RECEIVED (UTC)", "STATE", "FROM", "TO", "REASON"
    );
    for r in rows {
        let date = crate::wire::trace::iso_date(r.received_at);
        let from = if r.header_from.is_empty() {
            &r.mail_from
        } else {
            &r.header_from
        };
        let reason = if r.flags.is_empty() {
            &r.reasons
        } else {
            &r.flags
        };
        out.push_str(&format!(
            "{:<26}  {:<19}  {:<9}  {:<28}  {:<28}  {}\n",
            r.id,
            date,
            r.state,
            clip(from, 28),
            clip(&r.rcpts, 28),
            clip(reason, 60)
        ));
    }
    out.push_str(&format!(
        "{} entr{}\n",
        rows.len(),
        if rows.len() == 1 { "y" } else { "ies" }
    ));
    out
}

async fn show(store: &dyn QuarantineStore, input: &str, raw: bool, json: bool) -> ExitCode {
    let id = match store.lookup(input).await {
        Ok(id) => id,
        Err(e) => return fail(e),
    };
    let (meta, message) = match (store.meta(&id).await, store.message(&id).await) {
        (Ok(m), Ok(b)) => (m, b),
        (Err(e), _) | (_, Err(e)) => return fail(e),
    };
    if raw {
        let _ = std::io::stdout().write_all(&message);
        return ExitCode::SUCCESS;
    }
    let preview = crate::admin::preview::text_preview(&message, 2000);
    let headers = crate::admin::preview::header_summary(&message);
    if json {
        let v = serde_json::json!({"meta": meta, "headers": headers, "preview": preview});
        println!("{v}");
        return ExitCode::SUCCESS;
    }
    let mut out = String::new();
    let mut row = |k: &str, v: &str| out.push_str(&format!("{k:<16} {}\n", clip(v, 200)));
    row("ID", &meta.id);
    row("State", meta.state.as_str());
    if !meta.instance.is_empty() {
        row("Instance", &meta.instance);
    }
    row("Received", &crate::wire::trace::iso_date(meta.received_at));
    row("Client", &format!("{} (HELO {})", meta.client, meta.helo));
    row("Envelope from", &meta.mail_from);
    row("Envelope to", &meta.rcpts.join(", "));
    row("Size", &meta.size.to_string());
    row("Verdict", &meta.verdict);
    row("Flags", &meta.flags.join(", "));
    row("Reasons", &meta.reasons.join("; "));
    row("Auth results", &meta.authentication_results);
    out.push_str("\n-- headers --\n");
    for (name, value) in &headers {
        out.push_str(&format!("{name}: {}\n", clip(value, 200)));
    }
    out.push_str("\n-- text preview (not rendered, links not followed) --\n");
    out.push_str(&preview);
    out.push('\n');
    print!("{out}");
    ExitCode::SUCCESS
}

/// The held entries `policy` would accept, from the decision log. Entries it would
/// only tag stay held (a release cannot add the tag): they are counted on stderr.
async fn where_policy(
    config: &Config,
    store: &dyn QuarantineStore,
    policy: &Path,
    since: Option<&str>,
) -> Result<Vec<String>, String> {
    use crate::decision_log::where_policy::candidates;
    use crate::policy::rules::ActionKind;
    let policy = crate::policy::rules::Policy::load(policy).map_err(|e| e.to_string())?;
    let (from, to) = crate::admin::policy_cli::window(since, None, None)?;
    let reader = crate::decision_log::store::FileStore::reader(&config.decision_log.dir);
    let found = candidates(&reader, &policy, from, to)
        .map_err(|e| format!("{}: {e}", config.decision_log.dir.display()))?;
    let mut ids = Vec::new();
    let mut tagged = 0;
    for c in found {
        // Still held? (released, deleted or purged since: nothing to do.)
        let held = match store.lookup(&c.quarantine_id).await {
            Ok(id) => store
                .meta(&id)
                .await
                .is_ok_and(|m| m.state == crate::quarantine::state::State::Held),
            Err(_) => false,
        };
        match c.new {
            ActionKind::Accept if held => ids.push(c.quarantine_id),
            ActionKind::Tag if held => tagged += 1,
            _ => {}
        }
    }
    if tagged > 0 {
        eprintln!("{tagged} held entries would only be tagged: left held (release them by id)");
    }
    Ok(ids)
}

async fn release_all(
    config: &Config,
    store: &dyn QuarantineStore,
    ids: &[String],
    to: &[String],
    force: bool,
) -> ExitCode {
    let hops = match NextHops::from_config(config) {
        Ok(h) => h,
        Err(e) => return fail(e),
    };
    // A submission entry is released signed, as the proxy would have sent it: a key
    // this user cannot read stops the release rather than sending it unsigned.
    let signer = match crate::signing::Signer::from_config(&config.dkim) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let mut failed = false;
    let mut progress = Progress::new("releasing", ids.len());
    for input in ids {
        let result = match store.lookup(input).await {
            Ok(id) => release(
                store,
                &hops,
                &id,
                to,
                force,
                crate::admin::release::Outgoing {
                    authserv_id: config.authserv_id(),
                    verdict_header: &config.auth.verdict_header,
                    signer: signer.as_deref(),
                },
            )
            .await
            .map(|reply| format!("{id}: released ({reply})")),
            Err(e) => Err(ReleaseError::Store(e)),
        };
        progress.clear();
        match result {
            Ok(line) => println!("{line}"),
            Err(ReleaseError::AlreadyReleased) => println!("{}: already released", clip(input, 40)),
            Err(e) => {
                eprintln!("{}: {e}", clip(input, 40));
                failed = true;
            }
        }
        progress.step();
    }
    progress.done();
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// A one-line progress counter on stderr, only when it is a terminal and the job is long.
struct Progress {
    label: &'static str,
    total: usize,
    done: usize,
    show: bool,
}

impl Progress {
    fn new(label: &'static str, total: usize) -> Progress {
        Progress {
            label,
            total,
            done: 0,
            show: total > 5 && std::io::stderr().is_terminal(),
        }
    }
    fn step(&mut self) {
        self.done += 1;
        if self.show {
            eprint!("\r{} {}/{}", self.label, self.done, self.total);
        }
    }
    fn clear(&self) {
        if self.show {
            eprint!("\r\x1b[K");
        }
    }
    fn done(&self) {
        if self.show {
            eprintln!();
        }
    }
}
