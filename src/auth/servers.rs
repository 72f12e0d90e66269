//! Nameserver failover: each configured nameserver has its own resolver and health. A
//! server that did not answer (timeout, unreachable, REFUSED; or SERVFAIL
//! [`SERVFAILS_TO_DOWN`] times in a row) is **down**: lookups skip it instead of paying
//! its timeout again. A background task probes down servers, with a backoff that starts
//! at [`BACKOFF_START`] and doubles up to `[dns] server_backoff_max`; the first probe
//! that gets an answer puts the server back. Probes ask for the last name a server
//! answered (a name known to resolve), else the name that failed, so the "fresh lookup
//! retried in the background" of serve-stale is these probes: a recovered server is
//! noticed within `server_backoff_max` plus one query timeout, whatever the traffic.
//!
//! Per-server metrics: `dns_server_queries{server,outcome}`, `dns_server_seconds{server}`
//! and `dns_server_up{server}`; `/healthz` reports the servers that are down.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use hickory_resolver::proto::rr::{Name, RecordType};
use prometheus_client::metrics::gauge::Gauge;

use crate::metrics::dns::{DnsMetrics, ServerLabels, ServerOnly};

/// First wait before a down server is probed.
pub const BACKOFF_START: Duration = Duration::from_millis(250);
/// Consecutive SERVFAILs that make a server down: one SERVFAIL may be one broken zone
/// behind a healthy recursive resolver; a run of them is a resolver that cannot resolve.
pub const SERVFAILS_TO_DOWN: u32 = 3;
/// How often the prober looks for down servers whose backoff ended.
const PROBE_TICK: Duration = Duration::from_millis(100);

/// What one query to one server ended in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An answer, NXDOMAIN or an error code other than SERVFAIL/REFUSED.
    Answered,
    ServFail,
    Refused,
    Timeout,
    Unreachable,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Answered => "answered",
            Outcome::ServFail => "servfail",
            Outcome::Refused => "refused",
            Outcome::Timeout => "timeout",
            Outcome::Unreachable => "unreachable",
        }
    }
}

#[derive(Default)]
struct Health {
    down_since: Option<Instant>,
    /// When the next probe may go (while down).
    next_probe: Option<Instant>,
    backoff: Duration,
    servfails: u32,
}

pub struct Server {
    pub label: String,
    pub resolver: TokioResolver,
    health: Mutex<Health>,
}

impl Server {
    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn is_down(&self) -> bool {
        self.health().down_since.is_some()
    }

    /// Counts one query's outcome and updates the server's health.
    pub fn record(
        &self,
        outcome: Outcome,
        took: Duration,
        all: &Arc<Servers>,
        asked: (&Name, RecordType),
    ) {
        let m = metrics();
        m.queries
            .get_or_create(&ServerLabels {
                server: self.label.clone(),
                outcome: outcome.as_str().into(),
            })
            .inc();
        m.seconds
            .get_or_create(&ServerOnly {
                server: self.label.clone(),
            })
            .observe(took.as_secs_f64());
        let went_down = {
            let mut h = self.health();
            match outcome {
                Outcome::Answered => {
                    h.servfails = 0;
                    false
                }
                Outcome::ServFail => {
                    h.servfails += 1;
                    h.servfails >= SERVFAILS_TO_DOWN && h.down_since.is_none()
                }
                _ => h.down_since.is_none(),
            }
        };
        if went_down {
            self.mark_down(all.backoff_max);
            all.ensure_probing(asked.0, asked.1);
        }
    }

    fn mark_down(&self, backoff_max: Duration) {
        let now = Instant::now();
        let mut h = self.health();
        let backoff = if h.down_since.is_some() {
            (h.backoff * 2).min(backoff_max)
        } else {
            BACKOFF_START.min(backoff_max)
        };
        h.down_since.get_or_insert(now);
        h.backoff = backoff;
        h.next_probe = Some(now + backoff);
        drop(h);
        tracing::warn!(server = %self.label, retry_in_ms = backoff.as_millis() as u64, "DNS server down");
        up_gauge(&self.label).set(0);
    }

    pub fn mark_up(&self) {
        let was_down = {
            let mut h = self.health();
            let was = h.down_since.take();
            *h = Health::default();
            was
        };
        if let Some(since) = was_down {
            tracing::info!(server = %self.label, down_for_ms = since.elapsed().as_millis() as u64, "DNS server back");
        }
        up_gauge(&self.label).set(1);
    }
}

/// Every configured nameserver, in configuration order.
pub struct Servers {
    list: Vec<Arc<Server>>,
    backoff_max: Duration,
    probing: AtomicBool,
    /// A name a server answered lately: what probes ask.
    last_good: Mutex<Option<(Name, RecordType)>>,
    /// The name that failed, asked when no name is known to resolve.
    last_failed: Mutex<Option<(Name, RecordType)>>,
}

impl Servers {
    pub fn new(list: Vec<(String, TokioResolver)>, backoff_max: Duration) -> Arc<Servers> {
        let servers = Arc::new(Servers {
            list: list
                .into_iter()
                .map(|(label, resolver)| {
                    up_gauge(&label).set(1);
                    Arc::new(Server {
                        label,
                        resolver,
                        health: Mutex::new(Health::default()),
                    })
                })
                .collect(),
            backoff_max,
            probing: AtomicBool::new(false),
            last_good: Mutex::new(None),
            last_failed: Mutex::new(None),
        });
        *current().lock().unwrap_or_else(PoisonError::into_inner) = Arc::downgrade(&servers);
        servers
    }

    /// The servers up now, in order: what a lookup asks.
    pub fn available(&self) -> Vec<Arc<Server>> {
        self.list.iter().filter(|s| !s.is_down()).cloned().collect()
    }

    /// Every server, in order (the last resort when all are down).
    pub fn all(&self) -> Vec<Arc<Server>> {
        self.list.clone()
    }

    pub fn remember_good(&self, name: &Name, rtype: RecordType) {
        *self
            .last_good
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some((name.clone(), rtype));
    }

    /// Starts the prober when a server is down and none runs (needs a tokio runtime;
    /// without one, e.g. a synchronous test, servers stay as they are).
    pub fn ensure_probing(self: &Arc<Servers>, name: &Name, rtype: RecordType) {
        *self
            .last_failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some((name.clone(), rtype));
        if !self.list.iter().any(|s| s.is_down()) || self.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.probing.store(false, Ordering::Release);
            return;
        };
        rt.spawn(probe_loop(Arc::clone(self)));
    }

    fn probe_question(&self) -> Option<(Name, RecordType)> {
        let good = self
            .last_good
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        good.or_else(|| {
            self.last_failed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
        })
    }

    /// `None` when every server is up; else which are down.
    pub fn degraded(&self) -> Option<String> {
        let down: Vec<&str> = self
            .list
            .iter()
            .filter(|s| s.is_down())
            .map(|s| s.label.as_str())
            .collect();
        (!down.is_empty()).then(|| {
            format!(
                "dns: {} of {} nameservers down ({}){}",
                down.len(),
                self.list.len(),
                down.join(", "),
                if down.len() == self.list.len() {
                    "; serving stale answers where known"
                } else {
                    ""
                }
            )
        })
    }
}

/// Probes each down server when its backoff ends, until none is down. One query per
/// probe, never from a message's lookup: no message waits for a dead server.
async fn probe_loop(servers: Arc<Servers>) {
    loop {
        let down: Vec<Arc<Server>> = servers
            .list
            .iter()
            .filter(|s| s.is_down())
            .cloned()
            .collect();
        if down.is_empty() {
            servers.probing.store(false, Ordering::Release);
            // A server may have gone down between the check and the store.
            if servers.list.iter().any(|s| s.is_down())
                && !servers.probing.swap(true, Ordering::AcqRel)
            {
                continue;
            }
            return;
        }
        let now = Instant::now();
        for server in down {
            let due = server.health().next_probe.is_none_or(|t| t <= now);
            if !due {
                continue;
            }
            let Some((name, rtype)) = servers.probe_question() else {
                continue;
            };
            let started = Instant::now();
            let result = server.resolver.lookup(name, rtype).await;
            let (outcome, _) = super::dns::classify(result, rtype);
            let m = metrics();
            m.queries
                .get_or_create(&ServerLabels {
                    server: server.label.clone(),
                    outcome: format!("probe_{}", outcome.as_str()),
                })
                .inc();
            m.seconds
                .get_or_create(&ServerOnly {
                    server: server.label.clone(),
                })
                .observe(started.elapsed().as_secs_f64());
            if outcome == Outcome::Answered {
                server.mark_up();
            } else {
                server.mark_down(servers.backoff_max);
            }
        }
        tokio::time::sleep(PROBE_TICK).await;
    }
}

fn current() -> &'static Mutex<Weak<Servers>> {
    static CURRENT: OnceLock<Mutex<Weak<Servers>>> = OnceLock::new();
    CURRENT.get_or_init(|| Mutex::new(Weak::new()))
}

/// The DNS part of `/healthz`: the most recently built client's servers.
pub fn degraded() -> Option<String> {
    current()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .upgrade()
        .and_then(|s| s.degraded())
}

fn metrics() -> &'static DnsMetrics {
    &crate::metrics::global().dns
}

fn up_gauge(label: &str) -> Gauge {
    metrics()
        .up
        .get_or_create(&ServerOnly {
            server: label.to_string(),
        })
        .clone()
}
