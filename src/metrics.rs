//! Prometheus metrics: one process-wide registry, typed handles for each place that
//! counts something, and the text exposition served by the admin API at `/metrics`.
//!
//! Label values are always from small fixed sets (actions, result words, error kinds,
//! rule names from the operator's own policy), never from message content, so the
//! number of series stays bounded.

pub mod dns;

use std::sync::OnceLock;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::borrow::Cow;

/// Label sets; a value that is one of our own names is borrowed, so counting a message
/// copies only what came from it.
pub(crate) type Labels = Vec<(&'static str, Cow<'static, str>)>;

pub struct Metrics {
    registry: Registry,
    /// Sessions accepted, by listener role.
    pub sessions: Family<Labels, Counter>,
    /// Sessions open now.
    pub sessions_active: Gauge,
    /// Connections refused by limits (`max_sessions`, per client).
    pub sessions_refused: Family<Labels, Counter>,
    /// Transactions that reached end of data, by outcome (`accepted`, `refused`, `deferred`, `failed`).
    pub transactions: Family<Labels, Counter>,
    /// Verdicts, by action and deciding rule.
    pub verdicts: Family<Labels, Counter>,
    /// Authentication results, by check (`spf`, `dkim`, `arc`, `dmarc`) and result word.
    pub auth_results: Family<Labels, Counter>,
    /// Spoof and burst flags raised, by flag.
    pub flags: Family<Labels, Counter>,
    /// Shadow rules that matched, by rule.
    pub shadow_hits: Family<Labels, Counter>,
    /// Messages whose header failed the sanity stage, by problem (`several-from-fields`, …).
    pub header_problems: Family<Labels, Counter>,
    /// Recipients answered 452 because another recipient's policy already applies to
    /// the transaction (per-recipient policy).
    pub recipient_policy_splits: Counter,
    /// Time spent verifying one message (all checks).
    pub verify_seconds: Histogram,
    /// DNS-dependent checks that ended in temperror, by check.
    pub dns_temperrors: Family<Labels, Counter>,
    /// Next hop: end-of-data round trip.
    pub next_hop_seconds: Histogram,
    /// Next hop failures, by kind (`connect`, `timeout`, `protocol`, `closed`, `refused`).
    pub next_hop_errors: Family<Labels, Counter>,
    /// Messages put in quarantine; entries held now.
    pub quarantined: Counter,
    pub quarantine_held: Gauge,
    /// Quarantine use versus capacity (`[quarantine] max_bytes`, `max_entries`): every
    /// entry on disk, whatever its state.
    pub quarantine_bytes: Gauge,
    pub quarantine_entries: Gauge,
    pub quarantine_max_bytes: Gauge,
    pub quarantine_max_entries: Gauge,
    /// Held messages deferred for lack of room, by reason (`full`, `domain_share`).
    pub quarantine_refused: Family<Labels, Counter>,
    /// Outbound burst alerts, accounts frozen now, Redis fallback (1 = using local counters).
    pub burst_alerts: Counter,
    pub frozen_accounts: Gauge,
    pub redis_fallback: Gauge,
    /// Messages the outbound detector assessed, by `action` (`relay`, `alert`, `defer`,
    /// `hold`, `freeze`, `reject`: the stricter of the sender's and the client's).
    pub outbound_messages: Family<Labels, Counter>,
    /// Accounts (or client keys) frozen, automatically or by an administrator.
    pub outbound_accounts_frozen: Counter,
    /// Outbound alerts posted, by `event` (`outbound-burst`, `from-mismatch`,
    /// `account-frozen`, `account-unfrozen`, `freeze-expired`, `auth-failures`,
    /// `auth-user-locked`).
    pub outbound_alerts: Family<Labels, Counter>,
    /// Outbound store calls answered by the local counters because Redis was down or
    /// the call failed (`backend = "redis"`).
    pub outbound_store_fallbacks: Counter,
    /// 1 when the last use of PostgreSQL (`[quarantine] backend = "postgres"`) succeeded.
    pub postgres_up: Gauge,
    /// AUTH failure limits reached, by `kind`: `client` (an address or IPv6 /64 blocked)
    /// or `user` (a user name locked: a password spray from many addresses).
    pub auth_failure_blocks: Family<Labels, Counter>,
    /// AUTH exchanges refused with 454 4.7.0 before the next hop was asked, by `reason`
    /// (`client`, `user`).
    pub auth_refused: Family<Labels, Counter>,
    /// Policy reloads, by result (`ok`, `error`).
    pub policy_reloads: Family<Labels, Counter>,
    /// Bytes of message content reserved by all sessions (`[limits] message_memory`).
    pub message_memory: Gauge,
    /// Next-hop connections used without XCLIENT (`xclient = "auto"`, not offered).
    pub relay_without_xclient: Counter,
    /// Next-hop connections refused because the next hop offers no XCLIENT and would
    /// relay for our address (an open relay through us).
    pub relay_unsafe_next_hop: Counter,
    /// AUTH refused because the next hop is neither loopback nor reached over verified
    /// TLS (or its certificate failed verification): credentials were not sent.
    pub auth_relay_insecure: Counter,
    /// DMARC aggregate reports by outcome: `sent`, `failed` (given up), `deferred`
    /// (will be retried), `undeliverable` (no verified rua, or all over their size).
    pub dmarc_reports: Family<Labels, Counter>,
    /// DMARC evaluations not recorded because the recording queue was full.
    pub dmarc_records_dropped: Counter,
    /// Outbound DKIM signing, by result (`signed`, `no_key`, `no_from_domain`, `failed`).
    pub dkim_signing: Family<Labels, Counter>,
    /// Nameserver health and serve-stale (`src/auth/servers.rs`).
    pub dns: dns::DnsMetrics,
    /// Decision-log records dropped (queue full, or the store failed to write).
    pub decision_log_dropped: Counter,
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("mailwarden");
        let m = Metrics {
            sessions: Family::default(),
            sessions_active: Gauge::default(),
            sessions_refused: Family::default(),
            transactions: Family::default(),
            verdicts: Family::default(),
            auth_results: Family::default(),
            flags: Family::default(),
            shadow_hits: Family::default(),
            header_problems: Family::default(),
            recipient_policy_splits: Counter::default(),
            verify_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            dns_temperrors: Family::default(),
            next_hop_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 18)),
            next_hop_errors: Family::default(),
            quarantined: Counter::default(),
            quarantine_held: Gauge::default(),
            quarantine_bytes: Gauge::default(),
            quarantine_entries: Gauge::default(),
            quarantine_max_bytes: Gauge::default(),
            quarantine_max_entries: Gauge::default(),
            quarantine_refused: Family::default(),
            burst_alerts: Counter::default(),
            frozen_accounts: Gauge::default(),
            redis_fallback: Gauge::default(),
            outbound_messages: Family::default(),
            outbound_accounts_frozen: Counter::default(),
            outbound_alerts: Family::default(),
            outbound_store_fallbacks: Counter::default(),
            postgres_up: Gauge::default(),
            auth_failure_blocks: Family::default(),
            auth_refused: Family::default(),
            policy_reloads: Family::default(),
            message_memory: Gauge::default(),
            relay_without_xclient: Counter::default(),
            relay_unsafe_next_hop: Counter::default(),
            auth_relay_insecure: Counter::default(),
            dmarc_reports: Family::default(),
            dmarc_records_dropped: Counter::default(),
            dkim_signing: Family::default(),
            dns: dns::DnsMetrics::new(),
            decision_log_dropped: Counter::default(),
            registry: Registry::default(),
        };
        registry.register("sessions", "SMTP sessions accepted", m.sessions.clone());
        registry.register(
            "sessions_active",
            "SMTP sessions open now",
            m.sessions_active.clone(),
        );
        registry.register(
            "sessions_refused",
            "Connections refused by limits",
            m.sessions_refused.clone(),
        );
        registry.register(
            "transactions",
            "Transactions that reached end of data",
            m.transactions.clone(),
        );
        registry.register("verdicts", "Policy verdicts", m.verdicts.clone());
        registry.register(
            "auth_results",
            "Authentication check results",
            m.auth_results.clone(),
        );
        registry.register("flags", "Spoof and burst flags raised", m.flags.clone());
        registry.register(
            "shadow_rule_hits",
            "Shadow rules that matched",
            m.shadow_hits.clone(),
        );
        registry.register(
            "header_problems",
            "Messages refused or marked by header sanity",
            m.header_problems.clone(),
        );
        registry.register(
            "recipient_policy_splits",
            "Recipients deferred to another transaction because their policy differs",
            m.recipient_policy_splits.clone(),
        );
        registry.register(
            "verify_seconds",
            "Time to verify one message",
            m.verify_seconds.clone(),
        );
        registry.register(
            "dns_temperrors",
            "Checks that ended in temperror",
            m.dns_temperrors.clone(),
        );
        registry.register(
            "next_hop_seconds",
            "Next hop end-of-data round trip",
            m.next_hop_seconds.clone(),
        );
        registry.register(
            "next_hop_errors",
            "Next hop failures",
            m.next_hop_errors.clone(),
        );
        registry.register(
            "message_memory_bytes",
            "Message content held in memory by all sessions (bytes reserved)",
            m.message_memory.clone(),
        );
        registry.register(
            "relay_without_xclient",
            "Next-hop connections used without XCLIENT (xclient = auto)",
            m.relay_without_xclient.clone(),
        );
        registry.register(
            "dmarc_reports",
            "DMARC aggregate reports by outcome (sent, deferred, failed, undeliverable)",
            m.dmarc_reports.clone(),
        );
        registry.register(
            "dmarc_records_dropped",
            "DMARC evaluations not recorded for reports (recording queue full)",
            m.dmarc_records_dropped.clone(),
        );
        registry.register(
            "decision_log_dropped",
            "Decision-log records not written (queue full or store error)",
            m.decision_log_dropped.clone(),
        );
        registry.register(
            "relay_unsafe_next_hop",
            "Next-hop connections refused: no XCLIENT and the next hop trusts our address",
            m.relay_unsafe_next_hop.clone(),
        );
        registry.register(
            "dkim_signing",
            "Outbound messages by DKIM signing result (unsigned: no key for the From domain, ...)",
            m.dkim_signing.clone(),
        );
        registry.register(
            "auth_relay_insecure",
            "AUTH refused: next hop neither loopback nor verified TLS (credentials not sent)",
            m.auth_relay_insecure.clone(),
        );
        registry.register(
            "quarantined",
            "Messages put in quarantine",
            m.quarantined.clone(),
        );
        registry.register(
            "quarantine_held",
            "Quarantine entries held",
            m.quarantine_held.clone(),
        );
        registry.register(
            "quarantine_bytes",
            "Message bytes in the quarantine (all entries on disk)",
            m.quarantine_bytes.clone(),
        );
        registry.register(
            "quarantine_entries",
            "Entries in the quarantine (all states)",
            m.quarantine_entries.clone(),
        );
        registry.register(
            "quarantine_max_bytes",
            "Quarantine capacity in bytes ([quarantine] max_bytes)",
            m.quarantine_max_bytes.clone(),
        );
        registry.register(
            "quarantine_max_entries",
            "Quarantine capacity in entries ([quarantine] max_entries)",
            m.quarantine_max_entries.clone(),
        );
        registry.register(
            "quarantine_refused",
            "Held messages deferred (451 4.3.1) for lack of quarantine room",
            m.quarantine_refused.clone(),
        );
        registry.register(
            "burst_alerts",
            "Outbound burst alerts",
            m.burst_alerts.clone(),
        );
        registry.register(
            "frozen_accounts",
            "Accounts frozen now",
            m.frozen_accounts.clone(),
        );
        registry.register(
            "redis_fallback",
            "1 when Redis is unreachable and local counters are used",
            m.redis_fallback.clone(),
        );
        registry.register(
            "outbound_messages",
            "Messages assessed by the outbound detector, by action",
            m.outbound_messages.clone(),
        );
        registry.register(
            "outbound_accounts_frozen",
            "Accounts frozen, automatically or by an administrator",
            m.outbound_accounts_frozen.clone(),
        );
        registry.register(
            "outbound_alerts",
            "Outbound alerts posted, by event",
            m.outbound_alerts.clone(),
        );
        registry.register(
            "outbound_store_fallbacks",
            "Outbound store calls answered by local counters because Redis did not",
            m.outbound_store_fallbacks.clone(),
        );
        registry.register(
            "postgres_up",
            "1 when PostgreSQL answered the last use (shared quarantine); 0: held mail is deferred",
            m.postgres_up.clone(),
        );
        registry.register(
            "auth_failure_blocks",
            "AUTH failure limits reached (client blocked, user name locked)",
            m.auth_failure_blocks.clone(),
        );
        registry.register(
            "auth_refused",
            "AUTH refused with 454 before the next hop was asked",
            m.auth_refused.clone(),
        );
        registry.register("policy_reloads", "Policy reloads", m.policy_reloads.clone());
        m.dns.register(&mut registry);
        Metrics { registry, ..m }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// The process-wide metrics.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// Sets the quarantine use gauges from `(bytes, entries)` when the store could count
/// them, and the capacity gauges from `(max_bytes, max_entries)` when limits are
/// configured. Plain values: the quarantine reads its own counters
/// ([`crate::quarantine::export_usage`]).
pub fn quarantine_usage(used: Option<(u64, u64)>, capacity: Option<(u64, u64)>) {
    let m = global();
    let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    if let Some((bytes, entries)) = used {
        m.quarantine_bytes.set(gauge(bytes));
        m.quarantine_entries.set(gauge(entries));
    }
    if let Some((max_bytes, max_entries)) = capacity {
        m.quarantine_max_bytes.set(gauge(max_bytes));
        m.quarantine_max_entries.set(gauge(max_entries));
    }
}

/// Shorthand for a one-label set.
pub fn label(name: &'static str, value: impl Into<Cow<'static, str>>) -> Labels {
    vec![(name, value.into())]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters() {
        let m = global();
        m.verdicts
            .get_or_create(&vec![
                ("action", "accept".into()),
                ("rule", "default".into()),
            ])
            .inc();
        m.sessions_active.inc();
        let text = m.render();
        assert!(
            text.contains("mailwarden_verdicts_total{action=\"accept\",rule=\"default\"}"),
            "{text}"
        );
        assert!(text.contains("mailwarden_sessions_active"), "{text}");
    }
}
