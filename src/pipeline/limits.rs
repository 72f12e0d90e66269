//! The first stage: what the session's reader found about the message as a whole (size,
//! the memory budget, bare LF) and the hop count. A refusal here ends the pipeline: the
//! content may not even have been kept, and nothing later needs to read it.

use super::{Context, DecidedBy, Services, Verdict};
use crate::config::BareLf;
use crate::policy::Action;
use crate::wire::codec::DataStats;
use crate::wire::reply::Reply;
use crate::wire::trace;

/// The refusal, if a limit says no, with the reply the client gets.
pub fn check(
    s: &Services<'_>,
    cx: &Context<'_>,
    message: &[u8],
    stats: &DataStats,
) -> Option<(Verdict, Reply)> {
    let limits = &s.config.limits;
    let (rule, reply) = if stats.too_big {
        ("size", Reply::message_too_big())
    } else if stats.over_budget {
        tracing::warn!(session = %cx.session_id, size = stats.size, in_use = s.memory.in_use(),
            "message memory budget ([limits] message_memory) full: message deferred");
        ("memory", Reply::insufficient_resources())
    } else if stats.bare_lf > 0 && limits.bare_lf == BareLf::Reject {
        ("bare-lf", Reply::bare_lf_refused())
    } else if trace::count_received(message) > limits.max_received_headers {
        ("loop", Reply::mail_loop())
    } else {
        return None;
    };
    let action = if reply.code < 500 {
        Action::Defer(reply.clone())
    } else {
        Action::Reject(reply.clone())
    };
    Some((Verdict::early(action, DecidedBy::Limits, rule), reply))
}
