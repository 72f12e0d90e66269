//! `mailwarden quarantine migrate --from CONFIG_A --to CONFIG_B`: moves every entry of
//! one quarantine store into another (embedded → PostgreSQL when a site becomes a
//! cluster, or back).
//!
//! Each entry is copied with its id, time, state and instance, the copy committed (the
//! destination's own durability: fsync'd files, or a PostgreSQL commit), and only then
//! deleted from the source. Interrupted at any point, a second run finds each entry
//! either still only in the source (copied now), in both (the copy is checked byte for
//! byte and the source's deleted), or only in the destination (done): nothing is lost
//! and nothing ends up twice. Run it with the proxies of the source stopped (or not
//! holding mail), so no entry arrives or is released behind it.

use std::path::Path;
use std::process::ExitCode;

use crate::config::{Config, Purpose};
use crate::quarantine::index::Filter;
use crate::quarantine::store::{Opener, QuarantineStore};
use crate::quarantine::{QuarantineId, StoreError};

/// Entries read from the source per page.
const PAGE: usize = 500;

pub fn run(from: &Path, to: &Path) -> ExitCode {
    let load = |p: &Path| Config::load_for(p, Purpose::Offline).map_err(|e| e.to_string());
    let (source_cfg, dest_cfg) = match (load(from), load(to)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return fail(e),
    };
    crate::telemetry::init("warn", source_cfg.log.format);
    if same_store(&source_cfg, &dest_cfg) {
        return fail("--from and --to name the same quarantine store");
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(e),
    };
    runtime.block_on(async {
        let source = match crate::quarantine::store::open(&source_cfg, Opener::Cli).await {
            Ok((s, _)) => s,
            Err(e) => return fail(format!("--from: {e}")),
        };
        let dest = match crate::quarantine::store::open(&dest_cfg, Opener::Create).await {
            Ok((s, _)) => s,
            Err(e) => return fail(format!("--to: {e}")),
        };
        match migrate(source.as_ref(), dest.as_ref()).await {
            Ok(m) => {
                println!(
                    "moved {} entries from {} to {} ({} were already there)",
                    m.copied + m.already,
                    source.backend(),
                    dest.backend(),
                    m.already
                );
                ExitCode::SUCCESS
            }
            Err(e) => fail(format!("{e} (run the same command again to resume)")),
        }
    })
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("mailwarden quarantine migrate: {e}");
    ExitCode::from(1)
}

/// Both configurations point at one store (moving it onto itself would delete it).
fn same_store(a: &Config, b: &Config) -> bool {
    use crate::config::postgres::QuarantineBackend::*;
    match (a.quarantine.backend, b.quarantine.backend) {
        (Embedded, Embedded) => {
            let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
            canon(&a.quarantine.dir) == canon(&b.quarantine.dir)
        }
        (Postgres, Postgres) => a.postgres.url.trim() == b.postgres.url.trim(),
        _ => false,
    }
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Moved {
    /// Copied by this run.
    pub copied: usize,
    /// Already in the destination (an earlier, interrupted run): verified, then removed
    /// from the source.
    pub already: usize,
}

/// Moves every entry of `source` into `dest` (see the module doc).
pub async fn migrate(
    source: &dyn QuarantineStore,
    dest: &dyn QuarantineStore,
) -> Result<Moved, StoreError> {
    let mut moved = Moved::default();
    let mut before: Option<(u64, String)> = None;
    loop {
        let page = source
            .list(&Filter {
                all_states: true,
                limit: PAGE,
                before: before.clone(),
                ..Default::default()
            })
            .await?;
        let Some(last) = page.last() else {
            return Ok(moved);
        };
        before = Some((last.received_at, last.id.clone()));
        for row in &page {
            let Some(id) = QuarantineId::parse(&row.id) else {
                continue;
            };
            move_one(source, dest, &id, &mut moved).await?;
        }
    }
}

async fn move_one(
    source: &dyn QuarantineStore,
    dest: &dyn QuarantineStore,
    id: &QuarantineId,
    moved: &mut Moved,
) -> Result<(), StoreError> {
    let meta = source.meta(id).await?;
    let message = source.message(id).await?;
    match dest.import(meta, message.clone()).await {
        Ok(()) => moved.copied += 1,
        Err(StoreError::Exists(_)) => {
            // Copied by an interrupted run: delete the source's only if the copy is whole.
            if dest.message(id).await? != message {
                return Err(StoreError::Exists(format!(
                    "{id} with different bytes in the destination: left in both, check by hand"
                )));
            }
            moved.already += 1;
        }
        Err(e) => return Err(e),
    }
    match source.delete(id).await {
        Ok(()) | Err(StoreError::NotFound(_)) => Ok(()),
        Err(e) => Err(e),
    }
}
