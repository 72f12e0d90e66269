//! The DNS metrics: per-nameserver queries, latency and health, and serve-stale use.
//! Kept with the other metrics, so the registry imports nothing above it.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServerLabels {
    pub server: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServerOnly {
    pub server: String,
}

/// DNS metrics (registered in the process registry by [`crate::metrics`]; updated by `auth::servers`). Server
/// labels come from the configuration, never from traffic: a bounded set.
pub struct DnsMetrics {
    pub(crate) queries: Family<ServerLabels, Counter>,
    pub(crate) seconds: Family<ServerOnly, Histogram, fn() -> Histogram>,
    pub(crate) up: Family<ServerOnly, Gauge>,
    /// Checks that used a stale answer, by record type (`spf`, `dkim`, `dmarc`, `arc`).
    pub stale_answers: Family<super::Labels, Counter>,
    /// Entries and estimated bytes in the stale store.
    pub stale_entries: Gauge,
    pub stale_bytes: Gauge,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl DnsMetrics {
    pub fn new() -> DnsMetrics {
        DnsMetrics {
            queries: Family::default(),
            seconds: Family::new_with_constructor(latency_histogram),
            up: Family::default(),
            stale_answers: Family::default(),
            stale_entries: Gauge::default(),
            stale_bytes: Gauge::default(),
        }
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "dns_server_queries",
            "DNS queries per nameserver, by outcome (probe_* for background probes)",
            self.queries.clone(),
        );
        registry.register(
            "dns_server_seconds",
            "DNS query latency per nameserver",
            self.seconds.clone(),
        );
        registry.register(
            "dns_server_up",
            "1 while a nameserver answers, 0 while it is skipped (down)",
            self.up.clone(),
        );
        registry.register(
            "dns_stale_answers",
            "Checks decided with a stale DNS answer (serve-stale), by record type",
            self.stale_answers.clone(),
        );
        registry.register(
            "dns_stale_entries",
            "Answers kept for serve-stale",
            self.stale_entries.clone(),
        );
        registry.register(
            "dns_stale_bytes",
            "Estimated bytes of the answers kept for serve-stale",
            self.stale_bytes.clone(),
        );
    }
}

impl Default for DnsMetrics {
    fn default() -> Self {
        DnsMetrics::new()
    }
}
