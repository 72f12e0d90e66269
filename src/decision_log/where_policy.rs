//! Which held quarantine entries a new policy would have accepted, from the decision
//! log (`mailwarden quarantine release --where-policy`). Only entries the policy stage
//! held can change: an outbound hold (burst, frozen account) is not the policy's.

use super::replay::replay_one;
use super::store::DecisionSource;
use super::{Record, Stage};
use crate::policy::rules::{ActionKind, Policy};

/// One held entry and what the new policy does with it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Candidate {
    pub quarantine_id: String,
    pub old_rule: String,
    pub new: ActionKind,
    pub new_rule: String,
}

/// Held entries (by the policy stage) in `[from_ms, to_ms)` of the log, each with the
/// new policy's verdict, oldest first. The caller releases those it wants (`accept`).
pub fn candidates(
    source: &dyn DecisionSource,
    policy: &Policy,
    from_ms: u64,
    to_ms: u64,
) -> std::io::Result<Vec<Candidate>> {
    let mut out = Vec::new();
    source.scan(
        from_ms,
        to_ms,
        &mut |r: Record| {
            let Some(id) = r.quarantine_id.clone() else {
                return;
            };
            if r.stage != Stage::Policy || r.action != ActionKind::Quarantine {
                return;
            }
            let (new, new_rule) = replay_one(&r, policy);
            out.push(Candidate {
                quarantine_id: id,
                old_rule: r.rule,
                new,
                new_rule,
            });
        },
        &mut |_, _| {},
    )?;
    Ok(out)
}
