//! `mailwarden dmarc reports list|show|send-now`: the DMARC aggregate reports the proxy
//! built and sent (`[dmarc_reports]`, `crate::dmarc_reports`).

use std::path::Path;
use std::process::ExitCode;

use clap::Subcommand;

use crate::config::{Config, Purpose};
use crate::dmarc_reports::period::{self, Outbox};
use crate::dmarc_reports::store::{ReportState, ReportStore, SqliteStore};

#[derive(Subcommand, Debug)]
pub enum DmarcCommand {
    /// Aggregate reports (RFC 7489 §7.2) built for other domains.
    Reports {
        #[command(subcommand)]
        command: ReportsCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum ReportsCommand {
    /// Reports, newest period first, with their state (pending, sent, failed,
    /// undeliverable, unsettled).
    List {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// One report: its state and destinations, then its XML.
    Show { id: String },
    /// Closes the current period now (its evaluations become reports) and sends every
    /// pending report, without waiting for the interval or the retry time.
    SendNow {
        /// Send this `unsettled` report again (the sender stopped while sending it:
        /// check first that it did not arrive).
        #[arg(long, value_name = "ID")]
        force: Option<String>,
    },
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("dmarc reports: {e}");
    ExitCode::from(1)
}

pub fn run(config_path: &Path, cmd: &DmarcCommand) -> ExitCode {
    let config = match Config::load_for(config_path, Purpose::Offline) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    crate::telemetry::init("warn", config.log.format);
    let DmarcCommand::Reports { command } = cmd;
    let cfg = &config.dmarc_reports;
    if !cfg.db.exists() && !matches!(command, ReportsCommand::SendNow { .. }) {
        return fail(format!(
            "{} does not exist (no report recorded yet)",
            cfg.db.display()
        ));
    }
    let mut store = match SqliteStore::open(&cfg.db) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    match command {
        ReportsCommand::List { json } => list(&store, *json),
        ReportsCommand::Show { id } => show(&store, id),
        ReportsCommand::SendNow { force } => {
            if !cfg.enabled {
                return fail("[dmarc_reports] enabled = false: nothing is sent");
            }
            send_now(&config, &mut store, force.as_deref())
        }
    }
}

fn list(store: &SqliteStore, json: bool) -> ExitCode {
    let reports = match store.list() {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    if json {
        for r in &reports {
            println!("{}", serde_json::to_string(r).unwrap_or_default());
        }
        return ExitCode::SUCCESS;
    }
    println!(
        "{:<28} {:<28} {:>10} {:>10} {:>8} {:<13} to / error",
        "ID", "DOMAIN", "BEGIN", "END", "MESSAGES", "STATE"
    );
    for r in &reports {
        let note = if r.sent_to.is_empty() {
            &r.last_error
        } else {
            &r.sent_to
        };
        println!(
            "{:<28} {:<28} {:>10} {:>10} {:>8} {:<13} {note}",
            r.id,
            r.domain,
            r.begin,
            r.end,
            r.messages,
            r.state.as_str()
        );
    }
    ExitCode::SUCCESS
}

fn show(store: &SqliteStore, id: &str) -> ExitCode {
    let report = match store.get(id) {
        Ok(Some(r)) => r,
        Ok(None) => return fail(format!("no report {id}")),
        Err(e) => return fail(e),
    };
    println!("id:        {}", report.id);
    println!("domain:    {}", report.domain);
    println!("period:    {} .. {}", report.begin, report.end);
    println!(
        "state:     {} (attempts {})",
        report.state.as_str(),
        report.attempts
    );
    println!("rua:       {}", report.rua);
    println!("sent to:   {}", report.sent_to);
    println!("error:     {}", report.last_error);
    println!("messages:  {} in {} rows", report.messages, report.rows);
    match crate::dmarc_reports::xml::gunzip(&report.xml_gz) {
        Ok(xml) => {
            println!();
            print!("{xml}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(format!("stored report unreadable: {e}")),
    }
}

fn send_now(config: &Config, store: &mut SqliteStore, force: Option<&str>) -> ExitCode {
    let cfg = &config.dmarc_reports;
    let now = crate::dmarc_reports::now();
    if let Some(id) = force {
        match store.transition(id, ReportState::Unsettled, ReportState::Pending, now) {
            Ok(true) => {}
            Ok(false) => return fail(format!("{id} is not unsettled")),
            Err(e) => return fail(e),
        }
    }
    // The period ends after the current second: what was recorded so far is in it.
    let built = match period::close(store, cfg, now + 1) {
        Ok(n) => n,
        Err(e) => return fail(e),
    };
    let outbox = match Outbox::from_config(config) {
        Ok(o) => o,
        Err(e) => return fail(e),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(e),
    };
    // What waits for its retry time goes now too.
    let due_by = i64::MAX as u64;
    match runtime.block_on(period::send_due(store, cfg, &outbox, now, due_by)) {
        Ok(round) => {
            println!(
                "built {built}, sent {}, deferred {}, failed {}, undeliverable {}",
                round.sent, round.deferred, round.failed, round.undeliverable
            );
            if round.deferred + round.failed > 0 {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => fail(e),
    }
}
