//! DNS for every check: [`DnsClient::lookup`] is the one function through which our SPF,
//! DKIM, DMARC and ARC-key lookups go. It asks the configured nameservers in order,
//! skipping the ones known to be down ([`super::servers`]: health, bounded backoff,
//! background probes, per-server metrics), and falls back on the last known answer
//! ([`super::stale`], RFC 8767 serve-stale) only when no server answered.
//!
//! [`authenticator`] builds the hickory resolver that mail-auth's `MessageAuthenticator`
//! wraps; mail-auth uses it only for what we did not already fetch for it (ARC keys are
//! fetched here first, see [`super::arc::prefetch_keys`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError, NoRecords};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use mail_auth::MessageAuthenticator;

use super::servers::{Outcome, Servers};
use super::spf::NEGATIVE_TTL_MAX;
use super::stale::{StaleStore, StoredAnswer};
use super::zones::ZoneSet;
use crate::config::DnsConfig;

/// Resolver options from `[dns]`.
fn options(cfg: &DnsConfig) -> ResolverOpts {
    let mut opts = ResolverOpts::default();
    opts.timeout = Duration::from_millis(cfg.timeout_ms);
    opts.attempts = cfg.attempts;
    opts.cache_size = cfg.cache_entries;
    // Truncated UDP answers are retried over TCP (RFC 7766), and a failing server
    // is retried over TCP too before giving up.
    opts.try_tcp_on_error = true;
    // Names in mail are absolute: never try search domains.
    opts.ndots = 0;
    opts
}

/// The nameservers of `[dns] nameservers`, or of the system configuration when empty.
fn nameservers(cfg: &DnsConfig, opts: &mut ResolverOpts) -> Result<Vec<NameServerConfig>, String> {
    // With `only_zone_files` nothing is ever asked of a server: no system configuration
    // is needed either (a machine without /etc/resolv.conf still runs the demo).
    if cfg.nameservers.is_empty() && cfg.only_zone_files {
        return Ok(Vec::new());
    }
    if cfg.nameservers.is_empty() {
        let (config, system_opts) = hickory_resolver::system_conf::read_system_conf()
            .map_err(|e| format!("cannot read the system resolver configuration: {e}"))?;
        opts.edns0 = system_opts.edns0;
        let (_, _, servers) = config.into_parts();
        return Ok(servers);
    }
    Ok(cfg
        .nameservers
        .iter()
        .map(|addr| {
            let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
            for conn in &mut ns.connections {
                conn.port = addr.port();
            }
            ns
        })
        .collect())
}

fn build(servers: Vec<NameServerConfig>, opts: ResolverOpts) -> Result<TokioResolver, String> {
    let config = ResolverConfig::from_parts(None, vec![], servers);
    hickory_resolver::Resolver::builder_with_config(config, TokioRuntimeProvider::default())
        .with_options(opts)
        .build()
        .map_err(|e| format!("cannot build the DNS resolver: {e}"))
}

/// Builds the authenticator (mail-auth's wrapper around a hickory resolver over all the
/// nameservers).
pub fn authenticator(cfg: &DnsConfig) -> Result<MessageAuthenticator, String> {
    let mut opts = options(cfg);
    let servers = nameservers(cfg, &mut opts)?;
    Ok(MessageAuthenticator(build(servers, opts)?))
}

/// A successful lookup: the records of the asked type (empty: NXDOMAIN or NODATA).
#[derive(Clone, Debug)]
pub struct Answer {
    pub records: Arc<[RData]>,
    /// Until when it may be cached as fresh; `None`: not at all (a stale answer, or a
    /// negative answer without an SOA).
    pub valid_until: Option<Instant>,
    /// Set when this is a stale answer: how long ago it was fetched.
    pub stale_age: Option<Duration>,
}

/// No answer: no server answered and nothing usable was known (temperror for the check).
#[derive(Clone, Debug)]
pub struct LookupFailed(pub &'static str);

impl std::fmt::Display for LookupFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// The DNS every check uses. Cheap to clone (shared state).
#[derive(Clone)]
pub struct DnsClient {
    servers: Arc<Servers>,
    stale: Arc<StaleStore>,
    /// `[dns] zone_files`: answered before any server for the names under their origins
    /// (never remembered for serve-stale: they are always there).
    zones: Option<Arc<ZoneSet>>,
    /// `[dns] only_zone_files`: every other name is "no such name", no server is asked.
    only_zones: bool,
}

impl DnsClient {
    /// One resolver per nameserver (so that each is health-tracked on its own), and the
    /// stale store, loaded from `[dns] stale_cache_file` when set.
    pub fn new(cfg: &DnsConfig) -> Result<DnsClient, String> {
        let mut opts = options(cfg);
        let configs = nameservers(cfg, &mut opts)?;
        let mut servers = Vec::with_capacity(configs.len());
        for ns in configs {
            let label = match ns.connections.first() {
                Some(c) => std::net::SocketAddr::new(ns.ip, c.port).to_string(),
                None => ns.ip.to_string(),
            };
            servers.push((label, build(vec![ns], opts.clone())?));
        }
        let stale = Arc::new(StaleStore::new(
            cfg.stale_max_entries,
            cfg.stale_max_bytes,
            cfg.stale_max,
        ));
        if let Some(path) = &cfg.stale_cache_file {
            match stale.load(path) {
                Ok(n) => {
                    tracing::info!(file = %path.display(), entries = n, "stale DNS cache loaded")
                }
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "stale DNS cache not loaded")
                }
            }
        }
        Ok(DnsClient {
            servers: Servers::new(servers, cfg.server_backoff_max),
            stale,
            zones: None,
            only_zones: false,
        })
    }

    /// Answers from local zone files first (`[dns] zone_files`); with `only`, from them
    /// alone.
    pub fn with_zones(mut self, zones: Option<Arc<ZoneSet>>, only: bool) -> DnsClient {
        self.zones = zones;
        self.only_zones = only;
        self
    }

    /// The zone files' answer, when they are authoritative for `name` (or `only_zones`).
    fn local(&self, name: &Name, rtype: RecordType) -> Option<Result<Answer, LookupFailed>> {
        if let Some(result) = self.zones.as_ref().and_then(|z| z.answer(name, rtype)) {
            return Some(
                classify(result, rtype)
                    .1
                    .unwrap_or(Err(LookupFailed("unusable zone file answer"))),
            );
        }
        self.only_zones.then(|| {
            Ok(Answer {
                records: Vec::new().into(),
                valid_until: None,
                stale_age: None,
            })
        })
    }

    /// The stale store (for persisting it and for the metrics).
    pub fn stale_store(&self) -> &Arc<StaleStore> {
        &self.stale
    }

    /// Writes the stale store to `path` every `every`, for as long as the runtime runs.
    pub fn persist_every(&self, path: std::path::PathBuf, every: Duration) {
        let stale = Arc::downgrade(&self.stale);
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(stale) = stale.upgrade() else { return };
                let path = path.clone();
                let written = tokio::task::spawn_blocking(move || stale.save(&path)).await;
                if let Ok(Err(e)) = written {
                    tracing::warn!(error = %e, "stale DNS cache not written");
                }
            }
        });
    }

    /// The lookup every check makes. Fresh answers (records, NXDOMAIN, NODATA) are
    /// remembered for serve-stale; when no server answers (timeout, SERVFAIL, REFUSED,
    /// unreachable, or every server known down), the last known answer is served with
    /// its age, for at most `[dns] stale_max` past its TTL.
    pub async fn lookup(&self, name: Name, rtype: RecordType) -> Result<Answer, LookupFailed> {
        if let Some(answer) = self.local(&name, rtype) {
            return answer;
        }
        let key = name.to_ascii();
        let mut servers = self.servers.available();
        if servers.is_empty() {
            // Every server is known down. What we know stands in at once (no message
            // waits for a dead server); a name we know nothing of is still asked of every
            // server, as before failover: "down" may be wrong (one slow zone behind a
            // healthy resolver), and a never-seen sender must not be deferred faster than
            // DNS can answer it.
            self.servers.ensure_probing(&name, rtype);
            if let Some(known) = self.known(&key, rtype) {
                return Ok(known);
            }
            servers = self.servers.all();
        }
        for server in servers {
            let started = Instant::now();
            let result = server.resolver.lookup(name.clone(), rtype).await;
            let (outcome, answer) = classify(result, rtype);
            server.record(outcome, started.elapsed(), &self.servers, (&name, rtype));
            match answer {
                Some(Ok(answer)) => {
                    if outcome == Outcome::Answered && server.is_down() {
                        server.mark_up();
                    }
                    self.remember(&name, &key, rtype, &answer);
                    return Ok(answer);
                }
                // An answer that is an error (FORMERR, NOTIMP, undecodable): the server
                // answered, so nothing stale stands in for it.
                Some(Err(e)) => return Err(e),
                None => {}
            }
        }
        self.servers.ensure_probing(&name, rtype);
        self.known(&key, rtype)
            .ok_or(LookupFailed("no nameserver answered"))
    }

    /// Keeps a fresh answer for serve-stale.
    fn remember(&self, name: &Name, key: &str, rtype: RecordType, answer: &Answer) {
        self.servers.remember_good(name, rtype);
        self.stale.put(
            key,
            rtype,
            StoredAnswer {
                records: Arc::clone(&answer.records),
                fetched: Instant::now(),
                expires: answer.valid_until.unwrap_or_else(Instant::now),
            },
        );
        let (entries, bytes) = self.stale.usage();
        let m = &crate::metrics::global().dns;
        m.stale_entries
            .set(i64::try_from(entries).unwrap_or(i64::MAX));
        m.stale_bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// The last known answer, when no server answered: stale (with its age) once past
    /// its TTL, within `stale_max`.
    fn known(&self, key: &str, rtype: RecordType) -> Option<Answer> {
        let known = self.stale.get(key, rtype)?;
        let now = Instant::now();
        let past_ttl = known.expires <= now;
        Some(Answer {
            records: known.records,
            valid_until: (!past_ttl).then_some(known.expires),
            stale_age: past_ttl.then(|| now.saturating_duration_since(known.fetched)),
        })
    }
}

/// What one server's reply means: for its health, and for the lookup (`None`: try the
/// next server, then the stale store).
pub(crate) fn classify(
    result: Result<hickory_resolver::lookup::Lookup, NetError>,
    rtype: RecordType,
) -> (Outcome, Option<Result<Answer, LookupFailed>>) {
    match result {
        Ok(lookup) => {
            let records: Vec<RData> = lookup
                .answers()
                .iter()
                .filter(|r| r.record_type() == rtype)
                .map(|r| r.data.clone())
                .collect();
            let answer = Answer {
                records: records.into(),
                valid_until: Some(lookup.valid_until()),
                stale_age: None,
            };
            (Outcome::Answered, Some(Ok(answer)))
        }
        Err(NetError::Dns(DnsError::NoRecordsFound(NoRecords { negative_ttl, .. }))) => {
            let valid_until = negative_ttl
                .map(|ttl| Instant::now() + Duration::from_secs(ttl.into()).min(NEGATIVE_TTL_MAX));
            let answer = Answer {
                records: Vec::new().into(),
                valid_until,
                stale_age: None,
            };
            (Outcome::Answered, Some(Ok(answer)))
        }
        Err(NetError::Dns(DnsError::ResponseCode(ResponseCode::ServFail))) => {
            (Outcome::ServFail, None)
        }
        Err(NetError::Dns(DnsError::ResponseCode(ResponseCode::Refused))) => {
            (Outcome::Refused, None)
        }
        // Any other response code is an answer (FORMERR, NOTIMP…): the server is up and
        // said no, so nothing stale stands in for it.
        Err(NetError::Dns(DnsError::ResponseCode(code))) => {
            tracing::debug!(%code, "DNS answer unusable");
            (
                Outcome::Answered,
                Some(Err(LookupFailed("unusable DNS answer"))),
            )
        }
        Err(NetError::Timeout) => (Outcome::Timeout, None),
        // No answer came back at all (I/O, no connection, malformed reply): unreachable.
        Err(e) => {
            tracing::debug!(error = %e, "DNS server unreachable");
            (Outcome::Unreachable, None)
        }
    }
}

/// The DNS part of `/healthz`: `None` when every nameserver of the running client answers.
pub fn degraded() -> Option<String> {
    super::servers::degraded()
}

impl DnsClient {
    /// `None` when every nameserver of this client answers; else which are down.
    pub fn health(&self) -> Option<String> {
        self.servers.degraded()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::spf::test_dns::{DnsServer, Zone};

    fn config(servers: &[&DnsServer]) -> DnsConfig {
        DnsConfig {
            nameservers: servers.iter().map(|s| s.addr()).collect(),
            timeout_ms: 300,
            attempts: 1,
            cache_entries: 0,
            server_backoff_max: Duration::from_millis(200),
            ..DnsConfig::default()
        }
    }

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    async fn txt(client: &DnsClient, n: &str) -> Result<(usize, bool), LookupFailed> {
        client
            .lookup(name(n), RecordType::TXT)
            .await
            .map(|a| (a.records.len(), a.stale_age.is_some()))
    }

    /// Polls (bounded: 5 s) until `f` holds.
    async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) {
        for _ in 0..50 {
            if f().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("not within 5 s: {what}");
    }

    /// REFUSED and SERVFAIL are outages (stale stands in); NXDOMAIN is an answer.
    #[tokio::test]
    async fn stale_for_refused_and_servfail_never_over_an_answer() {
        let dns = DnsServer::start(Zone::new().txt("k.example", "v=DKIM1; p=AAAA"));
        dns.set_ttl(1);
        let client = DnsClient::new(&config(&[&dns])).unwrap();
        assert_eq!(txt(&client, "k.example.").await.unwrap(), (1, false));
        // Within its TTL an entry is not stale, even when it stands in.
        dns.set_servfail_all(true);
        assert_eq!(txt(&client, "k.example.").await.unwrap(), (1, false));
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(
            txt(&client, "k.example.").await.unwrap(),
            (1, true),
            "SERVFAIL"
        );
        dns.set_servfail_all(false);
        dns.set_refuse_all(true);
        assert_eq!(
            txt(&client, "k.example.").await.unwrap(),
            (1, true),
            "REFUSED"
        );
        assert!(client.health().is_some(), "a refusing server is down");
        assert!(
            txt(&client, "never.example.").await.is_err(),
            "nothing known"
        );
        dns.set_refuse_all(false);
        // The probe brings the server back; then the record's removal wins at once.
        eventually("server back", async || client.health().is_none()).await;
        dns.set_zone(Zone::new());
        assert_eq!(txt(&client, "k.example.").await.unwrap(), (0, false));
        dns.set_servfail_all(true);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(
            txt(&client, "k.example.").await.unwrap(),
            (0, true),
            "the removal is what is remembered"
        );
    }

    /// Serve-stale off: an outage is an error, as before.
    #[tokio::test]
    async fn stale_max_zero_serves_nothing_stale() {
        let dns = DnsServer::start(Zone::new().txt("k.example", "x"));
        dns.set_ttl(1);
        let client = DnsClient::new(&DnsConfig {
            stale_max: Duration::ZERO,
            ..config(&[&dns])
        })
        .unwrap();
        assert!(txt(&client, "k.example.").await.is_ok());
        dns.set_servfail_all(true);
        assert!(txt(&client, "k.example.").await.is_err());
    }

    /// Failover: a dead first server is asked once, then skipped (its lookups go to the
    /// second at once) and reported down until a probe gets an answer.
    #[tokio::test]
    async fn dead_server_skipped_and_reported_until_it_answers() {
        let dead = DnsServer::start(Zone::new().txt("a.example", "x"));
        dead.set_blackhole(true);
        let live = DnsServer::start(Zone::new().txt("a.example", "x"));
        let client = DnsClient::new(&config(&[&dead, &live])).unwrap();
        assert_eq!(txt(&client, "a.example.").await.unwrap(), (1, false));
        let health = client.health().expect("degraded");
        assert!(health.contains(&dead.addr().to_string()), "{health}");
        assert!(health.contains("1 of 2"), "{health}");
        let asked = dead.queries_for("b.example");
        for _ in 0..5 {
            let _ = txt(&client, "b.example.").await;
        }
        assert_eq!(dead.queries_for("b.example"), asked, "skipped while down");
        dead.set_blackhole(false);
        eventually("dead server back", async || client.health().is_none()).await;
    }
}
