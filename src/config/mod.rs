//! Configuration: TOML file → validated [`Config`].
//!
//! Every section and key is optional except `[[listener]]`'s `address`; each default lives
//! in [`defaults`]. Unknown keys are errors (a typo must not silently fall back to a default),
//! and every error names the file, the line and the key.

pub mod decision_log;
pub mod defaults;
pub mod dkim_sign;
pub mod dmarc_reports;
mod duration;
pub mod outbound;
pub mod postgres;
pub mod process;
pub mod relay_pool;
pub mod show;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use defaults::*;
pub use duration::{format_duration, parse_duration};

/// The whole running configuration, validated.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Our name: greeting, EHLO towards the next hop, `Received:` by-clause.
    #[serde(default = "default_hostname")]
    pub hostname: String,
    /// Domains inbound listeners accept recipients for (exact match, case-insensitive).
    #[serde(default)]
    pub local_domains: Vec<String>,
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    #[serde(default)]
    pub limits: Limits,
    /// `[next_hop]` (the default) and its named `[next_hop.NAME]` sections.
    #[serde(default)]
    pub next_hop: NextHops,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    #[serde(default)]
    pub dns: DnsConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub spoof: SpoofSettings,
    #[serde(default)]
    pub quarantine: QuarantineConfig,
    /// `[postgres]`: the server a cluster shares (quarantine `backend = "postgres"`).
    #[serde(default)]
    pub postgres: postgres::PostgresConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub outbound: outbound::OutboundConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub dmarc_reports: dmarc_reports::DmarcReportsConfig,
    /// `[[dkim.sign]]`: outbound DKIM signing keys (src/config/dkim_sign.rs).
    #[serde(default)]
    pub dkim: dkim_sign::DkimConfig,
    /// `[process]`: the pid file `mailwarden reload` signals.
    #[serde(default)]
    pub process: process::ProcessConfig,
    #[serde(default)]
    pub decision_log: decision_log::DecisionLogConfig,
}

/// What a configuration is loaded for: the proxy needs listeners; the offline commands
/// (`check`, `quarantine ...`) need only the sections they use, each with a default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Run,
    Offline,
}

fn default_hostname() -> String {
    DEFAULT_HOSTNAME.to_string()
}

/// What a listener is for: it decides which recipients a session may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Mail from the internet: recipients must be in `local_domains` (no open relay).
    Inbound,
    /// Mail from our own users: any recipient, the next hop decides who may relay.
    Submission,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub address: SocketAddr,
    #[serde(default = "default_role")]
    pub role: Role,
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// TLS from the first byte (port 465 style) instead of STARTTLS.
    #[serde(default)]
    pub implicit_tls: bool,
    /// Expect a HAProxy PROXY v1/v2 header from a trusted load balancer.
    #[serde(default)]
    pub proxy_protocol: bool,
    #[serde(default)]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    #[serde(default = "default_max_sessions")]
    pub max_sessions: usize,
    #[serde(default = "default_max_sessions_per_client")]
    pub max_sessions_per_client: usize,
    /// A named `[next_hop.NAME]` section this listener relays to; absent: `[next_hop]`.
    /// Lets inbound mail and submissions reach different smtpd instances of the MTA
    /// (Postfix can then require AUTH on the submission one only).
    #[serde(default)]
    pub next_hop: Option<String>,
}

fn default_role() -> Role {
    Role::Inbound
}
fn default_max_sessions() -> usize {
    DEFAULT_MAX_SESSIONS
}
fn default_max_sessions_per_client() -> usize {
    DEFAULT_MAX_SESSIONS_PER_CLIENT
}

impl ListenerConfig {
    /// Whether this listener can offer TLS (both files configured).
    pub fn has_tls(&self) -> bool {
        self.tls_cert.is_some() && self.tls_key.is_some()
    }

    /// Whether only this machine can reach the listener (a loopback address).
    pub fn is_loopback_only(&self) -> bool {
        self.address.ip().to_canonical().is_loopback()
    }
}

/// How bare LF line endings inside message content are handled. Either way only
/// `<CRLF>.<CRLF>` ends the data and the next hop receives canonical CRLF lines, so
/// SMTP smuggling (a second message hidden behind `<LF>.<LF>`) is impossible.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BareLf {
    /// Treat a bare LF as CRLF (Postfix 3.9 `smtpd_forbid_bare_newline = normalize`).
    Normalize,
    /// Refuse the message with `554 5.5.2`.
    Reject,
}

/// Session limits; every field is a client-controlled quantity that must be bounded.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_command_line: usize,
    pub message_size_limit: usize,
    pub message_memory: usize,
    pub max_recipients: usize,
    #[serde(with = "duration")]
    pub command_timeout: Duration,
    #[serde(with = "duration")]
    pub data_timeout: Duration,
    pub hard_error_limit: u32,
    pub soft_error_limit: u32,
    #[serde(with = "duration")]
    pub error_sleep: Duration,
    pub junk_command_limit: u32,
    pub max_transactions: u32,
    pub max_received_headers: usize,
    pub bare_lf: BareLf,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_command_line: DEFAULT_MAX_COMMAND_LINE,
            message_size_limit: DEFAULT_MESSAGE_SIZE_LIMIT,
            message_memory: DEFAULT_MESSAGE_MEMORY,
            max_recipients: DEFAULT_MAX_RECIPIENTS,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            data_timeout: DEFAULT_DATA_TIMEOUT,
            hard_error_limit: DEFAULT_HARD_ERROR_LIMIT,
            soft_error_limit: DEFAULT_SOFT_ERROR_LIMIT,
            error_sleep: DEFAULT_ERROR_SLEEP,
            junk_command_limit: DEFAULT_JUNK_COMMAND_LIMIT,
            max_transactions: DEFAULT_MAX_TRANSACTIONS,
            max_received_headers: DEFAULT_MAX_RECEIVED_HEADERS,
            bare_lf: BareLf::Normalize,
        }
    }
}

/// STARTTLS towards the next hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RelayTls {
    Off,
    /// Use STARTTLS when offered; go on in plain text when not.
    Opportunistic,
    /// Refuse to relay (451) through a next hop that does not offer STARTTLS.
    Require,
}

/// XCLIENT towards the next hop (Postfix `smtpd_authorized_xclient_hosts`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum XclientMode {
    /// Never relay through a next hop that does not offer XCLIENT: without it the MTA sees
    /// our address, may trust it, and the pair becomes an open relay.
    Require,
    /// Send XCLIENT when offered.
    Auto,
    Off,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NextHopConfig {
    /// `smtp://HOST:PORT` or `maildir:PATH`.
    pub address: String,
    pub tls: RelayTls,
    /// Verify the next hop's certificate (against `tls_ca_file`, else the system roots).
    /// Unset: verify unless the address is loopback (see [`NextHopConfig::verifies_tls`]).
    pub tls_verify: Option<bool>,
    /// PEM file of the CA certificates that sign the next hop's certificate (a private
    /// CA). When set, only these are trusted (not the system roots).
    pub tls_ca_file: Option<PathBuf>,
    pub xclient: XclientMode,
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    #[serde(with = "duration")]
    pub greeting_timeout: Duration,
    #[serde(with = "duration")]
    pub command_timeout: Duration,
    #[serde(with = "duration")]
    pub data_timeout: Duration,
    #[serde(with = "duration")]
    pub end_of_data_timeout: Duration,
    /// Idle connections kept for reuse by later sessions (0: off); see [`relay_pool`].
    pub pool_size: usize,
    /// Idle time after which a pooled connection is closed (below the next hop's own).
    #[serde(with = "duration")]
    pub pool_idle_timeout: Duration,
}

impl Default for NextHopConfig {
    fn default() -> Self {
        NextHopConfig {
            address: "maildir:var/maildir".to_string(),
            tls: RelayTls::Opportunistic,
            tls_verify: None,
            tls_ca_file: None,
            xclient: XclientMode::Require,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            greeting_timeout: DEFAULT_GREETING_TIMEOUT,
            command_timeout: DEFAULT_RELAY_COMMAND_TIMEOUT,
            data_timeout: DEFAULT_RELAY_DATA_TIMEOUT,
            end_of_data_timeout: DEFAULT_END_OF_DATA_TIMEOUT,
            pool_size: relay_pool::DEFAULT_POOL_SIZE,
            pool_idle_timeout: relay_pool::DEFAULT_POOL_IDLE_TIMEOUT,
        }
    }
}

impl NextHopConfig {
    /// Whether the next hop's certificate is verified. An explicit `tls_verify` wins;
    /// unset, a private CA file implies verification, and otherwise only a loopback
    /// address (an IP literal or `localhost`) goes unverified: on a real network an
    /// active attacker could otherwise answer STARTTLS with any certificate and read
    /// every message and password. `tls_verify = false` stays allowed for a non-loopback
    /// next hop (a private link with a self-signed certificate), with a warning at start,
    /// but AUTH credentials are then never relayed there (see `relay::may_send_credentials`).
    pub fn verifies_tls(&self) -> bool {
        self.tls_verify
            .unwrap_or(self.tls_ca_file.is_some() || !self.is_loopback_address())
    }

    /// Whether the configured address names this machine: a loopback IP literal or
    /// `localhost`. A `maildir:` next hop counts as local.
    pub fn is_loopback_address(&self) -> bool {
        match NextHopAddress::parse(&self.address) {
            Ok(NextHopAddress::Smtp { host, .. }) => {
                host.eq_ignore_ascii_case("localhost")
                    || host
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.to_canonical().is_loopback())
            }
            Ok(NextHopAddress::Maildir(_)) => true,
            Err(_) => false,
        }
    }
}

/// `[next_hop]` and its named sections: `[next_hop.NAME]` tables inside it are further
/// next hops that a `[[listener]] next_hop = "NAME"` selects. A named section does not
/// inherit from `[next_hop]`: every key it leaves out has its default.
#[derive(Debug, Clone, Default)]
pub struct NextHops {
    /// `[next_hop]` itself: listeners without `next_hop = "NAME"` use it.
    pub default: NextHopConfig,
    pub named: std::collections::BTreeMap<String, NextHopConfig>,
}

/// Written back as it is read: `[next_hop]`'s own keys, then each named section.
impl serde::Serialize for NextHops {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(serde::Serialize)]
        struct Flat<'a> {
            #[serde(flatten)]
            default: &'a NextHopConfig,
            #[serde(flatten)]
            named: &'a std::collections::BTreeMap<String, NextHopConfig>,
        }
        Flat {
            default: &self.default,
            named: &self.named,
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for NextHops {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut table = toml::Table::deserialize(d)?;
        let names: Vec<String> = table
            .iter()
            .filter(|(_, v)| v.is_table())
            .map(|(k, _)| k.clone())
            .collect();
        let mut named = std::collections::BTreeMap::new();
        for name in names {
            let Some(section) = table.remove(&name) else {
                continue;
            };
            let hop: NextHopConfig = section.try_into().map_err(|e: toml::de::Error| {
                D::Error::custom(format!("[next_hop.{name}]: {}", e.message()))
            })?;
            named.insert(name, hop);
        }
        let default: NextHopConfig =
            toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| {
                    D::Error::custom(format!("[next_hop]: {}", e.message()))
                })?;
        Ok(NextHops { default, named })
    }
}

impl NextHops {
    /// The section called `name` (`None`: the default `[next_hop]`).
    pub fn get(&self, name: Option<&str>) -> Option<&NextHopConfig> {
        match name {
            None => Some(&self.default),
            Some(n) => self.named.get(n),
        }
    }
}

/// Where the next hop is, parsed from `next_hop.address`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NextHopAddress {
    Smtp { host: String, port: u16 },
    Maildir(PathBuf),
}

impl NextHopAddress {
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("maildir:") {
            if path.is_empty() {
                return Err("maildir: needs a directory path".into());
            }
            return Ok(NextHopAddress::Maildir(PathBuf::from(path)));
        }
        let Some(rest) = s.strip_prefix("smtp://") else {
            return Err(format!(
                "`{s}` is neither smtp://HOST:PORT nor maildir:PATH"
            ));
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| format!("`{s}` has no port (smtp://HOST:PORT)"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("`{port}` is not a port number"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || port == 0 {
            return Err(format!("`{s}` needs a host and a non-zero port"));
        }
        Ok(NextHopAddress::Smtp {
            host: host.to_string(),
            port,
        })
    }
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    #[serde(with = "duration")]
    pub grace_period: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            grace_period: DEFAULT_SHUTDOWN_GRACE,
        }
    }
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Resolvers as `IP:PORT`; empty means the system resolver (`/etc/resolv.conf`).
    pub nameservers: Vec<SocketAddr>,
    /// Per-query timeout.
    pub timeout_ms: u64,
    /// Tries per query (per nameserver).
    pub attempts: usize,
    /// Cached answers (bounded; TTLs respected).
    pub cache_entries: u64,
    /// Local zone files (RFC 1035 master format subset, see `auth::zones`), answered
    /// before the resolver for the names under their `$ORIGIN`s; relative to the config
    /// file. Default: none.
    pub zone_files: Vec<PathBuf>,
    /// Answer from `zone_files` only: every other name is "no such name", and nothing is
    /// asked of any DNS server. Default `false`.
    pub only_zone_files: bool,
    /// Serve-stale (RFC 8767, `src/auth/stale.rs`): how long past its TTL the last known
    /// answer may stand in when no nameserver answers; 0 turns serve-stale off.
    #[serde(with = "duration")]
    pub stale_max: Duration,
    /// Bounds of the serve-stale store: entries, and estimated bytes.
    pub stale_max_entries: usize,
    pub stale_max_bytes: usize,
    /// Where the serve-stale store is written (every `stale_cache_interval`) and read at start, so a
    /// restart during an outage keeps the known records. None: memory only.
    pub stale_cache_file: Option<PathBuf>,
    /// How often `stale_cache_file` is written (a restart loses what was learnt since).
    #[serde(with = "duration")]
    pub stale_cache_interval: Duration,
    /// Longest wait between two probes of a nameserver that is down (`src/auth/servers.rs`).
    #[serde(with = "duration")]
    pub server_backoff_max: Duration,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            nameservers: Vec::new(),
            timeout_ms: DEFAULT_DNS_TIMEOUT_MS,
            attempts: DEFAULT_DNS_ATTEMPTS,
            cache_entries: DEFAULT_DNS_CACHE_ENTRIES,
            zone_files: Vec::new(),
            only_zone_files: false,
            stale_max: DEFAULT_DNS_STALE_MAX,
            stale_max_entries: DEFAULT_DNS_STALE_MAX_ENTRIES,
            stale_max_bytes: DEFAULT_DNS_STALE_MAX_BYTES,
            stale_cache_file: None,
            stale_cache_interval: DEFAULT_DNS_STALE_CACHE_INTERVAL,
            server_backoff_max: DEFAULT_DNS_SERVER_BACKOFF_MAX,
        }
    }
}

/// Sender authentication settings.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Verify sender authentication and apply the policy. Off: every message is relayed
    /// as is (forged results for our authserv-id are still never trusted downstream,
    /// because nothing downstream sees one of ours).
    pub enabled: bool,
    /// Our name in `Authentication-Results`; empty means `hostname`.
    pub authserv_id: String,
    /// Also verify mail on submission listeners (our own users' mail).
    pub verify_submission: bool,
    #[serde(with = "duration")]
    pub time_budget: Duration,
    #[serde(with = "duration")]
    pub spf_time_budget: Duration,
    pub dkim_max_signatures: usize,
    /// ARC sealers (domains; subdomains match) trusted to vouch for a message whose DMARC
    /// fails (RFC 8617 §7.2): when the chain validates, its most recent set is sealed by
    /// one of them and that set recorded a DMARC pass (or an aligned DKIM/SPF pass) for
    /// the same From domain, the applied DMARC policy becomes `none`.
    pub trusted_arc_sealers: Vec<String>,
    /// ARC sets looked at; a chain with more is `arc=permerror` without verifying.
    pub arc_max_sets: usize,
    /// DNS lookups per message, over SPF, DKIM keys, ARC keys and DMARC together;
    /// past it, the check that wanted one more is `permerror` (`auth::budget`).
    pub max_dns_lookups: u32,
    pub verdict_header: String,
    pub subject_prefix: String,
    /// Policy file; empty means the built-in default policy.
    pub policy_file: Option<PathBuf>,
    /// Reject at MAIL FROM when SPF for the MAIL FROM domain fails.
    pub spf_early_reject: bool,
    /// What happens to a message whose author is ambiguous: no From field, several, one
    /// naming several domains, an unparseable one, or several Subject fields (header
    /// sanity, `src/policy/sanity.rs`).
    pub malformed_from: SanityAction,
}

/// The action for a message that fails header sanity. There is no `accept`: DMARC cannot
/// protect a message whose author is ambiguous, so the mildest choice still marks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SanityAction {
    /// Relay, with the verdict header saying why.
    Tag,
    /// Hold in quarantine.
    Quarantine,
    /// `550 5.7.1` with the reason.
    Reject,
    /// `451 4.7.1` (for a trial period: senders retry, nothing is lost).
    Defer,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            enabled: true,
            authserv_id: String::new(),
            verify_submission: false,
            time_budget: DEFAULT_CHECKS_TIME_BUDGET,
            spf_time_budget: DEFAULT_SPF_TIME_BUDGET,
            dkim_max_signatures: DEFAULT_DKIM_MAX_SIGNATURES,
            trusted_arc_sealers: DEFAULT_TRUSTED_ARC_SEALERS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            arc_max_sets: DEFAULT_ARC_MAX_SETS,
            max_dns_lookups: DEFAULT_MAX_DNS_LOOKUPS,
            verdict_header: "X-Mailwarden-Verdict".into(),
            subject_prefix: String::new(),
            policy_file: None,
            spf_early_reject: false,
            malformed_from: DEFAULT_MALFORMED_FROM,
        }
    }
}

/// Spoofing heuristics beyond DMARC.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoofSettings {
    /// Domains whose name must not be used from outside; empty means `local_domains`.
    pub protected_domains: Vec<String>,
    /// Display names of people whose name must not appear on outside addresses.
    pub protected_names: Vec<String>,
    /// Edit distance at which a domain counts as a typo look-alike.
    pub lookalike_distance: usize,
}

impl Default for SpoofSettings {
    fn default() -> Self {
        SpoofSettings {
            protected_domains: Vec::new(),
            protected_names: Vec::new(),
            lookalike_distance: 1,
        }
    }
}

/// The admin HTTP API and web page.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Off unless configured.
    pub enabled: bool,
    /// Loopback by default; any other address requires `tls_cert`/`tls_key`.
    pub listen: SocketAddr,
    /// File holding the bearer token (must be mode 0600 or stricter).
    pub token_file: Option<PathBuf>,
    /// Or: the SHA-256 of the token, hex (so the config file holds no secret).
    pub token_sha256: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Failed authentications per source address per minute before 429.
    pub auth_fail_limit: u32,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: false,
            listen: SocketAddr::from(([127, 0, 0, 1], 8025)),
            token_file: None,
            token_sha256: None,
            tls_cert: None,
            tls_key: None,
            auth_fail_limit: 10,
        }
    }
}

/// Where quarantined messages are kept, and for how long.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuarantineConfig {
    pub dir: PathBuf,
    /// Entries older than this are purged automatically while the proxy runs.
    #[serde(with = "duration")]
    pub retention: Duration,
    /// Capacity: the sum of the entries' message sizes, and their number (every entry on
    /// disk counts, whatever its state). Past either, held mail gets `451 4.3.1`.
    pub max_bytes: u64,
    pub max_entries: u64,
    /// The share (0 < x <= 1) of each of `max_bytes` and `max_entries` that the entries of
    /// one sender domain may take (the envelope sender's domain; for the null sender,
    /// the header From domain).
    pub domain_share: f64,
    /// `embedded` (`dir`, the default) or `postgres` (`[postgres]`, shared by a cluster).
    pub backend: postgres::QuarantineBackend,
    /// This instance's name, recorded with each entry it accepts (default: `hostname`).
    pub instance: String,
}

impl Default for QuarantineConfig {
    fn default() -> Self {
        QuarantineConfig {
            dir: PathBuf::from("var/quarantine"),
            retention: DEFAULT_QUARANTINE_RETENTION,
            max_bytes: DEFAULT_QUARANTINE_MAX_BYTES,
            max_entries: DEFAULT_QUARANTINE_MAX_ENTRIES,
            domain_share: DEFAULT_QUARANTINE_DOMAIN_SHARE,
            backend: postgres::QuarantineBackend::Embedded,
            instance: String::new(),
        }
    }
}

impl QuarantineConfig {
    /// The name recorded with each entry this instance accepts: `instance`, else `hostname`.
    pub fn instance_name(&self, hostname: &str) -> String {
        if self.instance.is_empty() {
            hostname.to_string()
        } else {
            self.instance.clone()
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter: `info`, `debug`, `mailwarden=debug,info`...
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// A configuration error that points at the file, line and key.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {key}: {reason}", file = .file.display(), line = .line.map(|l| l.to_string()).unwrap_or_else(|| "-".into()))]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub key: String,
    pub reason: String,
}

impl ConfigError {
    /// A TOML syntax or type error in `source` (read from `path`), with the line and the
    /// key it points at. Shared by the config, policy and policy-test files.
    pub fn from_toml(path: &Path, source: &str, e: &toml::de::Error) -> ConfigError {
        let offset = e.span().map(|s| s.start.min(source.len()));
        ConfigError {
            file: path.to_path_buf(),
            line: offset.map(|o| source[..o].matches('\n').count() + 1),
            key: key_at(source, offset).unwrap_or_else(|| "-".into()),
            reason: e.message().trim().to_string(),
        }
    }
}

impl Config {
    /// Reads, parses and validates `path` for running the proxy.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_for(path, Purpose::Run)
    }

    /// Reads, parses and validates `path` for `purpose`.
    ///
    /// Every relative path in the file (and every default path) is taken relative to the
    /// file's own directory, never to the working directory: the proxy and the CLI run
    /// from anywhere and must find the same quarantine, spool and certificates.
    pub fn load_for(path: &Path, purpose: Purpose) -> Result<Config, ConfigError> {
        let cannot = |e: std::io::Error| ConfigError {
            file: path.to_path_buf(),
            line: None,
            key: "-".into(),
            reason: format!("cannot read: {e}"),
        };
        let source = std::fs::read_to_string(path).map_err(cannot)?;
        let absolute = std::path::absolute(path).map_err(cannot)?;
        let base = absolute.parent().unwrap_or(Path::new("/"));
        Self::parse_in(&source, path, Some(base), purpose)
    }

    /// Parses and validates `source` for running; `path` is only used in error messages.
    pub fn parse(source: &str, path: &Path) -> Result<Config, ConfigError> {
        Self::parse_for(source, path, Purpose::Run)
    }

    pub fn parse_for(source: &str, path: &Path, purpose: Purpose) -> Result<Config, ConfigError> {
        Self::parse_in(source, path, None, purpose)
    }

    /// Parses, resolves relative paths against `base` (when given) and validates.
    fn parse_in(
        source: &str,
        path: &Path,
        base: Option<&Path>,
        purpose: Purpose,
    ) -> Result<Config, ConfigError> {
        let mut config: Config =
            toml::from_str(source).map_err(|e| ConfigError::from_toml(path, source, &e))?;
        if let Some(base) = base {
            config.resolve_paths(base);
        }
        config
            .validate(purpose)
            .map_err(|(table, key, reason)| ConfigError {
                file: path.to_path_buf(),
                line: locate(source, &table, &key),
                key: if table.is_empty() {
                    key
                } else {
                    format!("{table}.{key}")
                },
                reason,
            })?;
        Ok(config)
    }

    /// Makes every relative path absolute against `base` (the config file's directory).
    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() && !p.as_os_str().is_empty() {
                *p = base.join(&*p);
            }
        };
        let fix_opt = |p: &mut Option<PathBuf>| {
            if let Some(p) = p {
                fix(p)
            }
        };
        for l in &mut self.listeners {
            fix_opt(&mut l.tls_cert);
            fix_opt(&mut l.tls_key);
        }
        let hops =
            std::iter::once(&mut self.next_hop.default).chain(self.next_hop.named.values_mut());
        for hop in hops {
            if let Ok(NextHopAddress::Maildir(mut dir)) = NextHopAddress::parse(&hop.address) {
                fix(&mut dir);
                hop.address = format!("maildir:{}", dir.display());
            }
            fix_opt(&mut hop.tls_ca_file);
        }
        fix_opt(&mut self.auth.policy_file);
        fix(&mut self.quarantine.dir);
        fix_opt(&mut self.postgres.password_file);
        fix_opt(&mut self.postgres.ca_file);
        fix_opt(&mut self.admin.token_file);
        fix_opt(&mut self.admin.tls_cert);
        fix_opt(&mut self.admin.tls_key);
        fix(&mut self.outbound.state_file);
        fix(&mut self.outbound.freeze_file);
        fix(&mut self.outbound.command_dir);
        fix(&mut self.dmarc_reports.db);
        for s in &mut self.dkim.sign {
            fix(&mut s.key_file);
        }
        fix_opt(&mut self.process.pid_file);
        self.dns.zone_files.iter_mut().for_each(fix);
        fix(&mut self.decision_log.dir);
    }

    /// Semantic checks serde cannot express. Errors are (table, key, reason); `table`
    /// is `listener[N]` for the N-th `[[listener]]`.
    fn validate(&self, purpose: Purpose) -> Result<(), (String, String, String)> {
        let err = |t: &str, k: &str, r: String| Err((t.to_string(), k.to_string(), r));
        self.validate_checks()?;
        self.dmarc_reports
            .validate(self.auth.enabled)
            .map_err(|(k, r)| ("dmarc_reports".to_string(), k, r))?;
        self.decision_log
            .validate()
            .map_err(|(k, r)| ("decision_log".to_string(), k, r))?;
        if purpose == Purpose::Offline {
            return Ok(());
        }
        // Keys are read at start (and by check-config), not at the first message.
        self.dkim.validate()?;
        if self.listeners.is_empty() {
            return err(
                "",
                "listener",
                "at least one [[listener]] is required".into(),
            );
        }
        if self.hostname.is_empty() || self.hostname.contains(|c: char| c.is_whitespace()) {
            return err("", "hostname", "must be a non-empty host name".into());
        }
        for (i, l) in self.listeners.iter().enumerate() {
            let t = format!("listener[{i}]");
            if l.tls_cert.is_some() != l.tls_key.is_some() {
                return err(&t, "tls_cert", "tls_cert and tls_key go together".into());
            }
            if l.implicit_tls && !l.has_tls() {
                return err(&t, "implicit_tls", "needs tls_cert and tls_key".into());
            }
            for (key, path) in [("tls_cert", &l.tls_cert), ("tls_key", &l.tls_key)] {
                if let Some(p) = path
                    && !p.is_file()
                {
                    return err(&t, key, format!("{} is not a readable file", p.display()));
                }
            }
            if l.proxy_protocol && l.trusted_proxies.is_empty() {
                return err(
                    &t,
                    "trusted_proxies",
                    "proxy_protocol needs the load balancers' addresses".into(),
                );
            }
            if l.max_sessions == 0 || l.max_sessions_per_client == 0 {
                return err(&t, "max_sessions", "must be at least 1".into());
            }
            if self.listeners[..i].iter().any(|o| o.address == l.address) {
                return err(
                    &t,
                    "address",
                    format!("{} is already used by another [[listener]]", l.address),
                );
            }
            if let Some(name) = &l.next_hop
                && !self.next_hop.named.contains_key(name)
            {
                return err(&t, "next_hop", format!("no [next_hop.{name}] section"));
            }
            // RFC 6409: submission means AUTH, and AUTH is only offered over TLS. Without
            // a certificate nobody could ever authenticate, so only `trusted_networks`
            // could submit: allowed only where nobody else can connect.
            if l.role == Role::Submission && !l.has_tls() && !l.is_loopback_only() {
                return err(
                    &t,
                    "tls_cert",
                    format!(
                        "submission listener {} needs tls_cert and tls_key: AUTH is offered over TLS only (or listen on loopback)",
                        l.address
                    ),
                );
            }
            if l.role == Role::Inbound && self.local_domains.is_empty() {
                return err(
                    "",
                    "local_domains",
                    format!(
                        "listener {} is inbound: list the domains it receives mail for",
                        l.address
                    ),
                );
            }
        }
        if let Err((key, reason)) = self.outbound.validate() {
            return err("outbound", &key, reason);
        }
        let admin = &self.admin;
        if admin.enabled {
            if admin.token_file.is_none() == admin.token_sha256.is_none() {
                return err(
                    "admin",
                    "token_file",
                    "set exactly one of token_file and token_sha256".into(),
                );
            }
            if admin.tls_cert.is_some() != admin.tls_key.is_some() {
                return err(
                    "admin",
                    "tls_cert",
                    "tls_cert and tls_key go together".into(),
                );
            }
            if !admin.listen.ip().is_loopback() && admin.tls_cert.is_none() {
                return err(
                    "admin",
                    "listen",
                    format!(
                        "{} is not loopback: configure tls_cert and tls_key",
                        admin.listen
                    ),
                );
            }
        }
        let lim = &self.limits;
        if lim.max_command_line < 512 {
            return err(
                "limits",
                "max_command_line",
                "RFC 5321 requires at least 512".into(),
            );
        }
        if lim.max_recipients < MIN_MAX_RECIPIENTS {
            return err(
                "limits",
                "max_recipients",
                "RFC 5321 requires at least 100".into(),
            );
        }
        if lim.message_size_limit < 1024 {
            return err(
                "limits",
                "message_size_limit",
                "must be at least 1024".into(),
            );
        }
        if lim.message_memory < lim.message_size_limit.saturating_mul(2) {
            return err(
                "limits",
                "message_memory",
                format!(
                    "must be at least twice message_size_limit ({}): a buffer can grow to twice a message's size, and a message of the largest size must fit",
                    lim.message_size_limit
                ),
            );
        }
        if lim.hard_error_limit == 0 {
            return err("limits", "hard_error_limit", "must be at least 1".into());
        }
        self.validate_quarantine()?;
        let hops = std::iter::once(("next_hop".to_string(), &self.next_hop.default)).chain(
            self.next_hop
                .named
                .iter()
                .map(|(name, hop)| (format!("next_hop.{name}"), hop)),
        );
        for (table, hop) in hops {
            if let Err(e) = NextHopAddress::parse(&hop.address) {
                return err(&table, "address", e);
            }
            if let Err((key, e)) = relay_pool::validate(hop) {
                return err(&table, key, e);
            }
            if let Some(ca) = &hop.tls_ca_file {
                if hop.tls_verify == Some(false) {
                    return err(
                        &table,
                        "tls_ca_file",
                        "a CA file is only used to verify: remove tls_verify = false".into(),
                    );
                }
                if let Err(e) = crate::tls::load_ca_file(ca) {
                    return err(&table, "tls_ca_file", e);
                }
            }
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return err("log", "level", e.to_string());
        }
        Ok(())
    }

    /// `[quarantine]` capacity keys.
    fn validate_quarantine(&self) -> Result<(), (String, String, String)> {
        let err = |k: &str, r: String| Err(("quarantine".to_string(), k.to_string(), r));
        let q = &self.quarantine;
        if q.max_bytes == 0 {
            return err("max_bytes", "must be at least 1".into());
        }
        if q.max_entries == 0 {
            return err("max_entries", "must be at least 1".into());
        }
        if !(q.domain_share > 0.0 && q.domain_share <= 1.0) {
            return err(
                "domain_share",
                format!(
                    "{} is not a share: use a number above 0 and at most 1 (1: no per-domain limit)",
                    q.domain_share
                ),
            );
        }
        let needed = q.backend == postgres::QuarantineBackend::Postgres;
        if let Err((k, r)) = self.postgres.validate(needed) {
            return Err(("postgres".to_string(), k, r));
        }
        Ok(())
    }

    /// Settings used by verification, shared by `run` and `check`.
    fn validate_checks(&self) -> Result<(), (String, String, String)> {
        let err = |t: &str, k: &str, r: String| Err((t.to_string(), k.to_string(), r));
        if self.dns.timeout_ms == 0 || self.dns.attempts == 0 {
            return err(
                "dns",
                "timeout_ms",
                "timeout_ms and attempts must be at least 1".into(),
            );
        }
        if self.dns.only_zone_files && self.dns.zone_files.is_empty() {
            return err(
                "dns",
                "only_zone_files",
                "needs zone_files (without any, every lookup would find nothing)".into(),
            );
        }
        if self.dns.stale_cache_interval.is_zero() {
            return err("dns", "stale_cache_interval", "must be more than 0".into());
        }
        if self.dns.server_backoff_max.is_zero() {
            return err("dns", "server_backoff_max", "must be more than 0".into());
        }
        if self.auth.max_dns_lookups == 0 {
            return err("auth", "max_dns_lookups", "must be at least 1".into());
        }
        if self.auth.arc_max_sets == 0 {
            return err("auth", "arc_max_sets", "must be at least 1".into());
        }
        if self.auth.time_budget.is_zero() {
            return err("auth", "time_budget", "must be more than zero".into());
        }
        if let Some(bad) = self
            .auth
            .trusted_arc_sealers
            .iter()
            .find(|d| !crate::wire::domain::looks_like_domain(d))
        {
            return err(
                "auth",
                "trusted_arc_sealers",
                format!("{bad:?} is not a domain name"),
            );
        }
        if self.auth.verdict_header.is_empty()
            || !self
                .auth
                .verdict_header
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return err(
                "auth",
                "verdict_header",
                "must be a header name (letters, digits, '-')".into(),
            );
        }
        if let Some(p) = &self.auth.policy_file
            && !p.as_os_str().is_empty()
            && !p.is_file()
        {
            return err(
                "auth",
                "policy_file",
                format!("{} is not a readable file", p.display()),
            );
        }
        if self.auth.subject_prefix.contains(['\r', '\n']) {
            return err("auth", "subject_prefix", "must be one line".into());
        }
        Ok(())
    }

    /// Our `Authentication-Results` authserv-id.
    pub fn authserv_id(&self) -> &str {
        if self.auth.authserv_id.is_empty() {
            &self.hostname
        } else {
            &self.auth.authserv_id
        }
    }

    /// The policy file, when one is configured.
    pub fn policy_file(&self) -> Option<&Path> {
        self.auth
            .policy_file
            .as_deref()
            .filter(|p| !p.as_os_str().is_empty())
    }

    /// The parsed default next hop (validated at load, so this cannot fail afterwards).
    pub fn next_hop_address(&self) -> NextHopAddress {
        NextHopAddress::parse(&self.next_hop.default.address).expect("validated at load")
    }

    /// Whether `domain` is one of ours (case-insensitive, exact).
    pub fn is_local_domain(&self, domain: &str) -> bool {
        let domain = domain.trim_end_matches('.');
        self.local_domains
            .iter()
            .any(|d| d.trim_end_matches('.').eq_ignore_ascii_case(domain))
    }
}

/// Line (1-based) of `key` inside `table` (`""` = top level, `listener[N]` = N-th array entry).
pub(crate) fn locate(source: &str, table: &str, key: &str) -> Option<usize> {
    let (want_table, want_index) = match table.split_once('[') {
        Some((name, idx)) => (name, idx.trim_end_matches(']').parse::<usize>().ok()),
        None => (table, None),
    };
    let mut current = String::new();
    let mut seen_of_array = 0usize;
    let mut current_index = None;
    let mut header_line = None;
    for (n, raw) in source.lines().enumerate() {
        let line = raw.trim();
        if let Some(name) = line.strip_prefix("[[").and_then(|l| l.split("]]").next()) {
            current = name.trim().to_string();
            if current == want_table {
                current_index = Some(seen_of_array);
                seen_of_array += 1;
            }
        } else if let Some(name) = line.strip_prefix('[').and_then(|l| l.split(']').next()) {
            current = name.trim().to_string();
            current_index = None;
        } else if current == want_table && (want_index.is_none() || current_index == want_index) {
            if let Some((k, _)) = line.split_once('=')
                && k.trim() == key
            {
                return Some(n + 1);
            }
            continue;
        } else {
            continue;
        }
        if current == want_table && (want_index.is_none() || current_index == want_index) {
            header_line = Some(n + 1);
        }
    }
    header_line
}

/// The key whose value starts at or around byte `offset`, for parse errors.
pub(crate) fn key_at(source: &str, offset: Option<usize>) -> Option<String> {
    let offset = offset?.min(source.len());
    let line_start = source[..offset].rfind('\n').map(|i| i + 1).unwrap_or(0);
    let line = source[line_start..].lines().next()?;
    let (k, _) = line.split_once('=')?;
    Some(k.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str =
        "local_domains = [\"example.org\"]\n[[listener]]\naddress = \"127.0.0.1:2525\"\n";

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("test.toml"))
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.listeners[0].role, Role::Inbound);
        assert_eq!(c.limits.max_command_line, 4096);
        assert_eq!(
            c.next_hop_address(),
            NextHopAddress::Maildir("var/maildir".into())
        );
        assert!(c.is_local_domain("EXAMPLE.org"));
        assert!(!c.is_local_domain("other.org"));
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let e = parse(&format!("{MINIMAL}max_sesions = 3\n")).unwrap_err();
        assert_eq!(e.line, Some(4), "{e}");
        assert!(e.to_string().contains("max_sesions"), "{e}");
    }

    #[test]
    fn validation_error_names_line_and_key() {
        let src = format!("{MINIMAL}[limits]\nmax_recipients = 5\n");
        let e = parse(&src).unwrap_err();
        assert_eq!(e.key, "limits.max_recipients");
        assert_eq!(e.line, Some(5));
        let src =
            format!("{MINIMAL}[[listener]]\naddress = \"127.0.0.1:2526\"\nmax_sessions = 0\n");
        let e = parse(&src).unwrap_err();
        assert_eq!(e.key, "listener[1].max_sessions");
        assert_eq!(e.line, Some(6));
    }

    #[test]
    fn bad_duration_is_an_error() {
        let e = parse(&format!(
            "{MINIMAL}[limits]\ncommand_timeout = \"5 parsecs\"\n"
        ))
        .unwrap_err();
        assert_eq!(e.line, Some(5), "{e}");
        assert!(e.to_string().contains("command_timeout"), "{e}");
    }

    #[test]
    fn message_memory_must_hold_a_largest_message() {
        let e = parse(&format!(
            "{MINIMAL}[limits]\nmessage_size_limit = 2000000\nmessage_memory = 3000000\n"
        ))
        .unwrap_err();
        assert_eq!(e.key, "limits.message_memory", "{e}");
        assert_eq!(e.line, Some(6), "{e}");
        assert!(parse(&format!("{MINIMAL}[limits]\nmessage_memory = 20480000\n")).is_ok());
    }

    #[test]
    fn trusted_arc_sealers_are_domains() {
        let c = parse(&format!(
            "{MINIMAL}[auth]\ntrusted_arc_sealers = [\"sealer.example\"]\n"
        ))
        .unwrap();
        assert_eq!(c.auth.trusted_arc_sealers, ["sealer.example"]);
        assert!(parse(MINIMAL).unwrap().auth.trusted_arc_sealers.is_empty());
        let e = parse(&format!(
            "{MINIMAL}[auth]\ntrusted_arc_sealers = [\"sealer.example\", \"not a domain\"]\n"
        ))
        .unwrap_err();
        assert_eq!(e.key, "auth.trusted_arc_sealers", "{e}");
        assert_eq!(e.line, Some(5), "{e}");
    }

    #[test]
    fn next_hop_addresses() {
        assert_eq!(
            NextHopAddress::parse("smtp://127.0.0.1:10025").unwrap(),
            NextHopAddress::Smtp {
                host: "127.0.0.1".into(),
                port: 10025
            }
        );
        assert_eq!(
            NextHopAddress::parse("smtp://[::1]:25").unwrap(),
            NextHopAddress::Smtp {
                host: "::1".into(),
                port: 25
            }
        );
        assert!(NextHopAddress::parse("smtp://host").is_err());
        assert!(NextHopAddress::parse("lmtp://host:24").is_err());
        assert!(NextHopAddress::parse("maildir:").is_err());
    }

    #[test]
    fn check_needs_only_dns() {
        let c = Config::parse_for(
            "[dns]\nnameservers = [\"127.0.0.1:5353\"]\n",
            Path::new("c.toml"),
            Purpose::Offline,
        )
        .unwrap();
        assert_eq!(c.dns.nameservers.len(), 1);
        assert!(
            parse("[dns]\nnameservers = []\n").is_err(),
            "run needs a listener"
        );
    }

    #[test]
    fn named_next_hops_per_listener() {
        let src = format!(
            "{MINIMAL}next_hop = \"sub\"\n[next_hop]\naddress = \"smtp://127.0.0.1:10025\"\n\
             [next_hop.sub]\naddress = \"smtp://127.0.0.1:10587\"\nxclient = \"auto\"\n"
        );
        let c = parse(&src).unwrap();
        assert_eq!(c.listeners[0].next_hop.as_deref(), Some("sub"));
        assert_eq!(c.next_hop.default.address, "smtp://127.0.0.1:10025");
        let sub = c.next_hop.get(Some("sub")).unwrap();
        assert_eq!(sub.address, "smtp://127.0.0.1:10587");
        assert_eq!(sub.xclient, XclientMode::Auto);
        // A named section does not inherit: its other keys have their defaults.
        assert_eq!(c.next_hop.default.xclient, XclientMode::Require);
        let e = parse(&format!("{MINIMAL}next_hop = \"nope\"\n")).unwrap_err();
        assert_eq!(e.key, "listener[0].next_hop", "{e}");
        assert_eq!(e.line, Some(4), "{e}");
        let e = parse(&format!("{MINIMAL}[next_hop.sub]\nadress = \"x\"\n")).unwrap_err();
        assert!(e.to_string().contains("adress"), "{e}");
        let e = parse(&format!(
            "{MINIMAL}[next_hop.sub]\naddress = \"lmtp://x:1\"\n"
        ))
        .unwrap_err();
        assert_eq!(e.key, "next_hop.sub.address", "{e}");
    }

    #[test]
    fn submission_needs_tls_off_loopback_and_listeners_are_unique() {
        let e = parse("[[listener]]\naddress = \"192.0.2.1:587\"\nrole = \"submission\"\n")
            .unwrap_err();
        assert_eq!(e.key, "listener[0].tls_cert", "{e}");
        assert!(
            parse("[[listener]]\naddress = \"127.0.0.1:587\"\nrole = \"submission\"\n").is_ok()
        );
        assert!(parse("[[listener]]\naddress = \"[::1]:587\"\nrole = \"submission\"\n").is_ok());
        let e = parse(&format!(
            "{MINIMAL}[[listener]]\naddress = \"127.0.0.1:2525\"\n"
        ))
        .unwrap_err();
        assert_eq!(e.key, "listener[1].address", "{e}");
    }

    #[test]
    fn relative_paths_resolve_against_the_config_directory() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("etc");
        std::fs::create_dir(&sub).unwrap();
        std::fs::write(sub.join("policy.toml"), "").unwrap();
        let path = sub.join("mailwarden.toml");
        std::fs::write(
            &path,
            format!(
                "{MINIMAL}[next_hop]\naddress = \"maildir:md\"\n[auth]\npolicy_file = \"policy.toml\"\n\
                 [quarantine]\ndir = \"/abs/q\"\n"
            ),
        )
        .unwrap();
        let c = Config::load(&path).unwrap();
        assert_eq!(c.policy_file(), Some(sub.join("policy.toml").as_path()));
        assert_eq!(
            c.next_hop_address(),
            NextHopAddress::Maildir(sub.join("md"))
        );
        assert_eq!(c.quarantine.dir, PathBuf::from("/abs/q"));
        assert_eq!(c.outbound.command_dir, sub.join("var/outbound/commands"));
    }

    #[test]
    fn inbound_needs_local_domains() {
        let e = parse("[[listener]]\naddress = \"127.0.0.1:2525\"\n").unwrap_err();
        assert_eq!(e.key, "local_domains");
    }

    #[test]
    fn tls_verify_defaults_to_true_off_loopback() {
        let hop = |extra: &str| {
            let c = parse(&format!("{MINIMAL}[next_hop]\n{extra}")).unwrap();
            c.next_hop.default.verifies_tls()
        };
        // Loopback (IP literal in both families, or `localhost`): unverified by default.
        assert!(!hop("address = \"smtp://127.0.0.1:10025\"\n"));
        assert!(!hop("address = \"smtp://[::1]:10025\"\n"));
        assert!(!hop("address = \"smtp://[::ffff:127.0.0.1]:10025\"\n"));
        assert!(!hop("address = \"smtp://LocalHost:10025\"\n"));
        // Anything else (a name could resolve anywhere): verified by default.
        assert!(hop("address = \"smtp://mx.example.net:25\"\n"));
        assert!(hop("address = \"smtp://10.0.0.5:25\"\n"));
        assert!(hop("address = \"smtp://localhost.example.net:25\"\n"));
        // Explicit values win both ways.
        assert!(!hop(
            "address = \"smtp://10.0.0.5:25\"\ntls_verify = false\n"
        ));
        assert!(hop(
            "address = \"smtp://127.0.0.1:25\"\ntls_verify = true\n"
        ));
        // A named section has its own default, from its own address.
        let c = parse(&format!(
            "{MINIMAL}[next_hop]\naddress = \"smtp://127.0.0.1:25\"\n[next_hop.out]\naddress = \"smtp://relay.example.net:587\"\n"
        ))
        .unwrap();
        assert!(!c.next_hop.default.verifies_tls());
        assert!(c.next_hop.named["out"].verifies_tls());
    }

    #[test]
    fn tls_ca_file_is_checked_at_load_and_implies_verification() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let issuer = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&issuer)
            .unwrap();
        std::fs::write(&ca, cert.pem()).unwrap();
        let with = |extra: &str| {
            parse(&format!(
                "{MINIMAL}[next_hop]\naddress = \"smtp://127.0.0.1:25\"\n{extra}"
            ))
        };
        let c = with(&format!("tls_ca_file = {:?}\n", ca.display().to_string())).unwrap();
        assert!(c.next_hop.default.verifies_tls(), "a CA file means verify");
        let e = with(&format!(
            "tls_ca_file = {:?}\ntls_verify = false\n",
            ca.display().to_string()
        ))
        .unwrap_err();
        assert_eq!(e.key, "next_hop.tls_ca_file", "{e}");
        let missing = dir.path().join("nope.pem");
        let e = with(&format!(
            "tls_ca_file = {:?}\n",
            missing.display().to_string()
        ))
        .unwrap_err();
        assert_eq!(e.key, "next_hop.tls_ca_file", "{e}");
        assert!(e.to_string().contains("nope.pem"), "{e}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = with(&format!(
            "tls_ca_file = {:?}\n",
            empty.display().to_string()
        ))
        .unwrap_err();
        assert!(e.to_string().contains("no PEM certificate"), "{e}");
    }

    #[test]
    fn quarantine_capacity_defaults_and_checks() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.quarantine.max_bytes, 10 * 1024 * 1024 * 1024);
        assert_eq!(c.quarantine.max_entries, 200_000);
        assert_eq!(c.quarantine.domain_share, 0.25);
        for (line, key) in [
            ("max_bytes = 0", "quarantine.max_bytes"),
            ("max_entries = 0", "quarantine.max_entries"),
            ("domain_share = 0.0", "quarantine.domain_share"),
            ("domain_share = 1.5", "quarantine.domain_share"),
            ("domain_share = nan", "quarantine.domain_share"),
        ] {
            let e = parse(&format!("{MINIMAL}[quarantine]\n{line}\n")).unwrap_err();
            assert_eq!(e.key, key, "{line}: {e}");
            assert_eq!(e.line, Some(5), "{line}: {e}");
        }
        // `1` (an integer) is accepted as 1.0: no per-domain limit.
        let c = parse(&format!("{MINIMAL}[quarantine]\ndomain_share = 1\n")).unwrap();
        assert_eq!(
            crate::quarantine::capacity::Capacity::of(&c.quarantine)
                .domain_limit()
                .entries,
            200_000
        );
    }
}
