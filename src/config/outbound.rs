//! `[outbound]`: the burst detector's settings as written in the config file, their
//! defaults (one documented `DEFAULT_*` constant each, like [`super::defaults`]) and their
//! validation. The detector (the `outbound` module) compiles them into its hot-path form
//! (`outbound::config::Settings`); this file imports nothing of `outbound`, which sits
//! above `config`.
//!
//! Every limit is the most that is allowed: `messages = 30` in a `1m` window lets 30
//! messages through and flags the 31st.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

/// Most windows an account is counted in (the per-account counters are sized by it).
pub const MAX_WINDOWS: usize = 8;
/// Shortest window: its bucket (window / 8) must be long enough for a `u32` bucket index.
pub const MIN_WINDOW: Duration = Duration::from_secs(10);
/// Longest window.
pub const MAX_WINDOW: Duration = Duration::from_secs(30 * 86_400);
/// Largest `max_recipient_domains`: the distinct domains seen are kept per account, up to
/// this limit plus one.
pub const MAX_RECIPIENT_DOMAINS: u32 = 10_000;
/// Buckets a sliding window is cut into (`outbound::window`): a window must be a whole
/// number of milliseconds per bucket.
pub const WINDOW_BUCKETS: u64 = 8;

// ---- Defaults -------------------------------------------------------------------------
// Volume limits are sized for a person's mailbox: a human rarely sends more than a few
// messages a minute or a few hundred a day, while a stolen password sending spam sends
// thousands an hour. Bulk senders get `[[outbound.account]] bulk = true`.

/// Static limits per window: (window, messages, recipients). One minute catches a fast
/// burst, one hour a steady campaign, a day a slow drip.
pub const DEFAULT_WINDOWS: [(Duration, u32, u32); 3] = [
    (Duration::from_secs(60), 30, 300),
    (Duration::from_secs(3600), 300, 3000),
    (Duration::from_secs(86_400), 1000, 10_000),
];
/// Distinct recipient domains per `recipient_domains_window`: spam goes to many domains,
/// a person's mail to few.
pub const DEFAULT_MAX_RECIPIENT_DOMAINS: u32 = 100;
pub const DEFAULT_RECIPIENT_DOMAINS_WINDOW: Duration = Duration::from_secs(3600);
/// Share of recipients the next hop refused above which the account is flagged: a bought
/// address list bounces far more than an address book.
pub const DEFAULT_MAX_REJECTED_SHARE: f64 = 0.5;
/// Recipients tried in the window before the share is judged (one refusal of two is noise).
pub const DEFAULT_REJECTED_MIN_RECIPIENTS: u32 = 20;
pub const DEFAULT_REJECTED_WINDOW: Duration = Duration::from_secs(3600);
/// A breach freezes the account: a compromised account must stop at once, and a false
/// positive costs one unfreeze (the held mail is released from quarantine).
pub const DEFAULT_ACTION: OutboundAction = OutboundAction::Freeze;
/// At most one alert per account per this long (a burst is one incident, not 1000).
pub const DEFAULT_ALERT_INTERVAL: Duration = Duration::from_secs(600);
/// Adaptive limit `max(floor, k × baseline)`: ten times the account's usual hourly rate.
pub const DEFAULT_ADAPTIVE_K: f64 = 10.0;
/// Messages per hour always allowed, whatever the baseline.
pub const DEFAULT_ADAPTIVE_FLOOR_MESSAGES: f64 = 100.0;
/// Recipients per hour always allowed, whatever the baseline.
pub const DEFAULT_ADAPTIVE_FLOOR_RECIPIENTS: f64 = 1000.0;
/// An hour's weight in the baseline halves after a week: a week has every weekday once.
pub const DEFAULT_ADAPTIVE_HALF_LIFE: Duration = Duration::from_secs(7 * 86_400);
/// Baseline of an account never seen before (conservative: a new account earns its rate).
pub const DEFAULT_NEW_ACCOUNT_MESSAGES: f64 = 5.0;
pub const DEFAULT_NEW_ACCOUNT_RECIPIENTS: f64 = 50.0;
/// How long limits stay tightened after a login from a new address (credential stuffing
/// sends within minutes of the first login).
pub const DEFAULT_NEW_IP_WINDOW: Duration = Duration::from_secs(3600);
/// Limits are halved meanwhile.
pub const DEFAULT_NEW_IP_FACTOR: f64 = 0.5;
/// Login addresses remembered per account (home, office, phone, a few networks).
pub const DEFAULT_NEW_IP_REMEMBER: usize = 8;
/// An account may use any From in its own domain (colleagues' shared addresses).
pub const DEFAULT_FROM_ALLOW: FromAllow = FromAllow::Domain;
/// A From outside the policy is held for a look, not refused (forwarders, aliases).
pub const DEFAULT_FROM_ACTION: OutboundAction = OutboundAction::Hold;
/// Distinct envelope senders one trusted client may use per `recipient_domains_window`.
pub const DEFAULT_CLIENT_MAX_SENDERS: u32 = 20;
/// AUTH failures are counted over ten minutes (Postfix anvil's rate window spirit).
pub const DEFAULT_AUTH_WINDOW: Duration = Duration::from_secs(600);
/// Failed AUTH exchanges allowed per client host per window.
pub const DEFAULT_AUTH_MAX_FAILURES: u32 = 10;
/// Distinct user names that may fail per client host per window (a spray tries many).
pub const DEFAULT_AUTH_MAX_USERNAMES: u32 = 5;
/// How long a breaching host is refused AUTH.
pub const DEFAULT_AUTH_BLOCK: Duration = Duration::from_secs(3600);
/// Failed AUTH exchanges allowed per user name per window, from all hosts together.
pub const DEFAULT_AUTH_MAX_FAILURES_PER_USER: u32 = 20;
/// How long a sprayed user name is locked for hosts it never logged in from (short: the
/// attacker chooses whom to lock).
pub const DEFAULT_AUTH_USER_BLOCK: Duration = Duration::from_secs(900);
/// Client hosts (and user names) whose failures are tracked (LRU bound on memory).
pub const DEFAULT_AUTH_TRACKED_CLIENTS: usize = 100_000;
/// Redis on this machine, database 0.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/";
pub const DEFAULT_REDIS_PREFIX: &str = "mailwarden:outbound:";
/// Redis answers in well under a millisecond on a LAN; past this it is treated as down
/// (the message is not kept waiting: the local counters answer).
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(500);
/// Reconnection attempts while Redis is unreachable.
pub const DEFAULT_REDIS_RETRY: Duration = Duration::from_secs(5);
pub const DEFAULT_STATE_FILE: &str = "var/outbound/state.json";
pub const DEFAULT_FREEZE_FILE: &str = "var/outbound/freezes.json";
pub const DEFAULT_COMMAND_DIR: &str = "var/outbound/commands";
/// Counters lost in a crash are at most this old.
pub const DEFAULT_SNAPSHOT_INTERVAL: Duration = Duration::from_secs(30);
/// Accounts whose counters are kept (a few hundred bytes each: some 50 MB at the bound).
pub const DEFAULT_TRACKED_ACCOUNTS: usize = 100_000;

/// What a breach does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutboundAction {
    /// Relay, but log a WARN alert (and post the webhook).
    Alert,
    /// 451 4.7.1: the client retries later.
    Defer,
    /// This message to quarantine (reason `outbound-burst`).
    Hold,
    /// This and every further message of the account to quarantine, until unfrozen.
    Freeze,
    /// 550 5.7.1.
    Reject,
}

impl OutboundAction {
    pub fn as_str(self) -> &'static str {
        match self {
            OutboundAction::Alert => "alert",
            OutboundAction::Defer => "defer",
            OutboundAction::Hold => "hold",
            OutboundAction::Freeze => "freeze",
            OutboundAction::Reject => "reject",
        }
    }

    /// Which wins when two signals disagree: a freeze (the account's state) beats
    /// everything, then reject, hold, defer, alert.
    pub fn severity(self) -> u8 {
        match self {
            OutboundAction::Alert => 0,
            OutboundAction::Defer => 1,
            OutboundAction::Hold => 2,
            OutboundAction::Reject => 3,
            OutboundAction::Freeze => 4,
        }
    }

    /// The stricter of `a` (if any) and `b`.
    pub fn max(a: Option<OutboundAction>, b: OutboundAction) -> OutboundAction {
        match a {
            Some(a) if a.severity() >= b.severity() => a,
            _ => b,
        }
    }
}

/// The names a client host goes by in `[[outbound.account]]` and in the counters: what
/// a sender without AUTH cannot rotate. An IPv4 address is one host; an IPv6 host is
/// given at least a /64 and may use any address in it, so the /64 is the host. Here
/// (not in `outbound::client`) because validation normalises `client:...` names.
pub mod client_key {
    use super::*;

    /// Prefix of every client key: `client:192.0.2.7`, `client:2001:db8:1:2::/64`. A
    /// login or envelope sender never starts with it (no `@`), so the two cannot collide.
    pub const PREFIX: &str = "client:";

    /// The part of `ip` that identifies a host: itself (IPv4, IPv4-mapped IPv6 as IPv4)
    /// or its /64 (IPv6), shown as the network address.
    pub fn host_part(ip: IpAddr) -> String {
        match ip.to_canonical() {
            IpAddr::V4(v4) => v4.to_string(),
            v6 @ IpAddr::V6(_) => format!("{}/64", host_ip(v6)),
        }
    }

    /// The host of `ip` as an address: itself (IPv4) or its /64's network address (IPv6).
    pub fn host_ip(ip: IpAddr) -> IpAddr {
        match ip.to_canonical() {
            IpAddr::V4(v4) => IpAddr::V4(v4),
            IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        }
    }

    /// The accounting key of a client at `ip`.
    pub fn key(ip: IpAddr) -> String {
        format!("{PREFIX}{}", host_part(ip))
    }

    /// A `client:...` name from the config, normalised to the key [`key`] yields for
    /// that host (`client:2001:DB8:1:2::9` and `client:2001:db8:1:2::/64` are the same
    /// host); `None` when what follows `client:` is neither an address nor an IPv6 /64.
    pub fn parse_key(name: &str) -> Option<String> {
        let rest = name.trim().strip_prefix(PREFIX)?;
        if let Ok(ip) = rest.parse::<IpAddr>() {
            return Some(key(ip));
        }
        match rest.parse::<ipnet::IpNet>().ok()? {
            ipnet::IpNet::V6(n) if n.prefix_len() == 64 => Some(key(IpAddr::V6(n.addr()))),
            ipnet::IpNet::V4(n) if n.prefix_len() == 32 => Some(key(IpAddr::V4(n.addr()))),
            _ => None,
        }
    }

    /// Whether `account` is a client key rather than a login or sender.
    pub fn is_key(account: &str) -> bool {
        account.starts_with(PREFIX)
    }
}

/// Where alerts are POSTed (`webhook_url`, parsed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookTarget {
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl WebhookTarget {
    pub fn parse(url: &str) -> Result<WebhookTarget, String> {
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            "only http:// URLs (put a local relay in front of an https endpoint)".to_string()
        })?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.contains('@') {
            return Err("credentials in the URL are not supported".into());
        }
        if path.contains(|c: char| c.is_control() || c == ' ') {
            return Err("the path must not contain spaces or control characters".into());
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or("unclosed [ in the host")?;
            let port = match after.strip_prefix(':') {
                Some(p) => p
                    .parse::<u16>()
                    .map_err(|_| format!("`{p}` is not a port"))?,
                None if after.is_empty() => 80,
                None => return Err("garbage after the host".into()),
            };
            (h.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (
                    h.to_string(),
                    p.parse::<u16>()
                        .map_err(|_| format!("`{p}` is not a port"))?,
                ),
                None => (authority.to_string(), 80),
            }
        };
        if host.is_empty()
            || port == 0
            || host.contains(|c: char| c.is_whitespace() || c.is_control())
        {
            return Err("needs a host (and a non-zero port)".into());
        }
        Ok(WebhookTarget {
            host,
            port,
            path: path.to_string(),
        })
    }
}

/// Human-readable durations ("10s", "1h", "7d") through the config module's parser.
mod dur {
    use super::*;

    pub fn de<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        crate::config::parse_duration(&s).map_err(serde::de::Error::custom)
    }

    pub fn ser<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::config::format_duration(*d))
    }

    pub fn ser_opt<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => ser(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn de_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s = String::deserialize(d)?;
        if s.trim().is_empty() || s.trim() == "never" {
            return Ok(None);
        }
        crate::config::parse_duration(&s)
            .map(Some)
            .map_err(serde::de::Error::custom)
    }
}

/// Where counters, baselines and freezes live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// In this process; survives restarts through `state_file` and `freeze_file`.
    Memory,
    /// Shared by every instance using the same `redis_url` and `redis_prefix`.
    Redis,
}

/// Which header From addresses an account may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FromAllow {
    /// Only the account's own address (and the aliases).
    Address,
    /// Any address in the account's own domain (and the aliases).
    Domain,
    /// No From check.
    Any,
}

/// `[outbound]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboundConfig {
    /// Track submission accounts at all. Default `true`.
    pub enabled: bool,
    /// Clients allowed to submit without AUTH (CIDRs); for them the envelope sender is the
    /// account (`<>` for the null sender). Default `[]`.
    pub trusted_networks: Vec<ipnet::IpNet>,
    /// Sliding windows with their static limits. Default
    /// `[{window="1m", messages=30, recipients=300}, {window="1h", messages=300,
    /// recipients=3000}, {window="24h", messages=1000, recipients=10000}]`.
    pub windows: Vec<WindowLimit>,
    /// Distinct recipient domains allowed per `recipient_domains_window`; 0 turns the
    /// signal off. Default `100`.
    pub max_recipient_domains: u32,
    /// Default `"1h"`.
    #[serde(deserialize_with = "dur::de", serialize_with = "dur::ser")]
    pub recipient_domains_window: Duration,
    /// Share of recipients the next hop refused above which the account is flagged
    /// (0 < share ≤ 1). Default `0.5`.
    pub max_rejected_share: f64,
    /// The share is judged only once this many recipients were tried in the window.
    /// Default `20`.
    pub rejected_min_recipients: u32,
    /// Default `"1h"`.
    #[serde(deserialize_with = "dur::de", serialize_with = "dur::ser")]
    pub rejected_window: Duration,
    pub adaptive: AdaptiveConfig,
    pub new_ip: NewIpConfig,
    /// What a breach of a volume limit does: `alert`, `defer`, `hold`, `freeze`, `reject`.
    /// Default `"freeze"`.
    pub action: OutboundAction,
    /// Automatic freezes end by themselves after this long; absent (or `"never"`): they
    /// last until an administrator unfreezes the account. Default: absent.
    #[serde(deserialize_with = "dur::de_opt", serialize_with = "dur::ser_opt")]
    pub freeze_expiry: Option<Duration>,
    /// At most one `outbound burst` alert (log line and webhook) per account per interval.
    /// Default `"10m"`.
    #[serde(deserialize_with = "dur::de", serialize_with = "dur::ser")]
    pub alert_interval: Duration,
    /// `http://HOST[:PORT]/PATH` receiving every alert as a JSON POST (plain HTTP only:
    /// put a local relay in front of an https endpoint). Default: absent.
    pub webhook_url: Option<String>,
    pub from: FromConfig,
    pub client: ClientConfig,
    pub auth_failures: AuthFailureConfig,
    /// `[[outbound.account]]` overrides, for known bulk senders or stricter groups.
    #[serde(rename = "account")]
    pub accounts: Vec<AccountOverride>,
    /// `"memory"` or `"redis"`. Default `"memory"`.
    pub backend: Backend,
    /// Default `"redis://127.0.0.1:6379/"` (`redis://[:PASSWORD@]HOST:PORT/DB`; no TLS).
    pub redis_url: String,
    /// Prefix of every Redis key. Default `"mailwarden:outbound:"`.
    pub redis_prefix: String,
    /// Connect and reply timeout for Redis. Default `"500ms"`.
    #[serde(deserialize_with = "dur::de", serialize_with = "dur::ser")]
    pub redis_timeout: Duration,
    /// While Redis is unreachable, try to reconnect this often. Default `"5s"`.
    #[serde(deserialize_with = "dur::de", serialize_with = "dur::ser")]
    pub redis_retry: Duration,
    /// Snapshot of the in-memory counters. Default `"var/outbound/state.json"`.
    pub state_file: PathBuf,
    /// Freezes and their history, rewritten (atomically) on every change.
    /// Default `"var/outbound/freezes.json"`.
    pub freeze_file: PathBuf,
    /// Spool where `mailwarden accounts freeze|unfreeze` leaves commands for the running
    /// proxy (memory backend). Default `"var/outbound/commands"`.
    pub command_dir: PathBuf,
    /// How often the counters snapshot is written. Default `"30s"`.
    #[serde(deserialize_with = "dur::de", serialize_with = "dur::ser")]
    pub snapshot_interval: Duration,
    /// Most accounts whose counters are kept; the least recently active are forgotten
    /// first (frozen accounts stay frozen). Default `100000`.
    pub tracked_accounts: usize,
}

/// One sliding window and its static limits.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WindowLimit {
    /// Length, e.g. `"1m"`, `"1h"`, `"24h"` (10 s to 30 d).
    #[serde(deserialize_with = "dur::de", serialize_with = "dur::ser")]
    pub window: Duration,
    /// Messages allowed in the window; absent: not limited.
    #[serde(default)]
    pub messages: Option<u32>,
    /// Recipients allowed in the window (a message to 16 people counts 16); absent: not limited.
    #[serde(default)]
    pub recipients: Option<u32>,
}

/// `[outbound.adaptive]`: flag when the hourly rate exceeds `max(floor, k × baseline)`,
/// the baseline being an exponentially weighted average of the account's past hours.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdaptiveConfig {
    /// Default `true`.
    pub enabled: bool,
    /// Default `10.0`.
    pub k: f64,
    /// Messages per hour always allowed. Default `100`.
    pub floor_messages: f64,
    /// Recipients per hour always allowed. Default `1000`.
    pub floor_recipients: f64,
    /// An hour's weight in the baseline halves after this long. Default `"7d"`.
    #[serde(deserialize_with = "dur::de", serialize_with = "dur::ser")]
    pub half_life: Duration,
    /// Baseline of an account never seen before, messages per hour. Default `5`.
    pub new_account_messages: f64,
    /// Baseline of an account never seen before, recipients per hour. Default `50`.
    pub new_account_recipients: f64,
}

/// `[outbound.new_ip]`: a successful login from an address never seen for the account
/// (which has logged in from elsewhere before) tightens its limits for a while: the
/// credential-stuffing pattern.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NewIpConfig {
    /// Default `true`.
    pub enabled: bool,
    /// How long after such a login the limits stay tightened. Default `"1h"`.
    #[serde(deserialize_with = "dur::de", serialize_with = "dur::ser")]
    pub window: Duration,
    /// Every volume limit is multiplied by this meanwhile (0 < factor ≤ 1). Default `0.5`.
    pub factor: f64,
    /// Login addresses remembered per account. Default `8`.
    pub remember: usize,
}

/// `[outbound.from]`: which header From addresses an account may use.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FromConfig {
    /// `"address"`, `"domain"` or `"any"`. Default `"domain"`.
    pub allow: FromAllow,
    /// Domain appended to logins without `@` to make the account's own address; absent:
    /// such accounts have no own address and only their aliases are checked (no aliases:
    /// not checked). Default: absent.
    pub login_domain: Option<String>,
    /// Addresses (`user@domain`) or whole domains (`@domain`) every account may use.
    /// Default `[]`.
    pub aliases: Vec<String>,
    /// What a From outside the policy does. Default `"hold"`.
    pub action: OutboundAction,
}

/// `[outbound.client]`: a client in `trusted_networks` (no AUTH) is counted twice: as
/// its envelope sender (which it chooses freely, so rotating it walks around every
/// per-sender limit) and as itself, `client:ADDRESS` (IPv4) or `client:PREFIX/64` (IPv6:
/// a host owns at least a /64 and picks any address in it). The stricter action wins.
/// One host (`[[outbound.account]] name = "client:192.0.2.7"`) can get its own limits.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientConfig {
    /// Count trusted clients by address too. Default `true`.
    pub enabled: bool,
    /// Limits replacing those of the `[outbound]` windows of the same length; a window
    /// not listed keeps the `[outbound]` limits (a host may send as much as one account
    /// unless configured otherwise). Default `[]`.
    pub windows: Vec<WindowLimit>,
    /// Distinct envelope senders one client may use per `recipient_domains_window`: a web
    /// server that suddenly sends as dozens of senders is compromised or abused. 0 turns
    /// the signal off. Default `20`.
    pub max_senders: u32,
    /// What a breach of the client's limits does; absent: `[outbound] action`. A freeze
    /// holds every message of the host (the key `client:...`) until it is unfrozen.
    pub action: Option<OutboundAction>,
}

/// `[outbound.auth_failures]`: AUTH failures per client (an IPv4 address, an IPv6 /64: a
/// host rotating addresses inside its prefix is one client) and per user name across all
/// clients (a password spray from many addresses against one account).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthFailureConfig {
    /// Default `true`.
    pub enabled: bool,
    /// Default `"10m"`.
    #[serde(deserialize_with = "dur::de", serialize_with = "dur::ser")]
    pub window: Duration,
    /// Failed AUTH exchanges allowed per address per window. Default `10`.
    pub max_failures: u32,
    /// Distinct user names that may fail per address per window. Default `5`.
    pub max_usernames: u32,
    /// How long a breaching address is refused AUTH (454 4.7.0). Default `"1h"`.
    #[serde(deserialize_with = "dur::de", serialize_with = "dur::ser")]
    pub block: Duration,
    /// Failed AUTH exchanges allowed per user name per window, from all clients together;
    /// past it the user name is locked for `user_block`: AUTH as that name is refused
    /// (454 4.7.0, the next hop is not asked) from every address it never logged in
    /// from, while its known login addresses still get through. 0 turns it off.
    /// Default `20`.
    pub max_failures_per_user: u32,
    /// Default `"15m"`.
    #[serde(deserialize_with = "dur::de", serialize_with = "dur::ser")]
    pub user_block: Duration,
    /// Never blocked (e.g. a webmail front end logging in for many users). Default `[]`.
    pub exempt_networks: Vec<ipnet::IpNet>,
    /// Most clients tracked, and most user names (least recently failing forgotten
    /// first). Default `100000`.
    pub tracked_clients: usize,
}

/// `[[outbound.account]]`: limits for one account or a group. Absent keys keep the
/// `[outbound]` values.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AccountOverride {
    /// An account (login or envelope sender, case-insensitive) or `@domain` for every
    /// account of a domain. An exact name wins over `@domain`.
    pub name: Option<String>,
    /// Several names sharing these settings.
    #[serde(default)]
    pub names: Vec<String>,
    /// A known bulk sender: no volume limits at all (the From check still applies).
    #[serde(default)]
    pub bulk: bool,
    /// Limits replacing those of the `[outbound]` windows of the same length.
    #[serde(default)]
    pub windows: Vec<WindowLimit>,
    pub max_recipient_domains: Option<u32>,
    pub max_rejected_share: Option<f64>,
    /// Use the adaptive baseline limit.
    pub adaptive: Option<bool>,
    /// Action on a volume breach.
    pub action: Option<OutboundAction>,
    pub from_allow: Option<FromAllow>,
    /// Extra From addresses (`user@domain`) or domains (`@domain`) this account may use.
    #[serde(default)]
    pub from_aliases: Vec<String>,
    /// Action on a From outside the policy.
    pub from_action: Option<OutboundAction>,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        OutboundConfig {
            enabled: true,
            trusted_networks: Vec::new(),
            windows: DEFAULT_WINDOWS
                .iter()
                .map(|&(window, messages, recipients)| WindowLimit {
                    window,
                    messages: Some(messages),
                    recipients: Some(recipients),
                })
                .collect(),
            max_recipient_domains: DEFAULT_MAX_RECIPIENT_DOMAINS,
            recipient_domains_window: DEFAULT_RECIPIENT_DOMAINS_WINDOW,
            max_rejected_share: DEFAULT_MAX_REJECTED_SHARE,
            rejected_min_recipients: DEFAULT_REJECTED_MIN_RECIPIENTS,
            rejected_window: DEFAULT_REJECTED_WINDOW,
            adaptive: AdaptiveConfig::default(),
            new_ip: NewIpConfig::default(),
            action: DEFAULT_ACTION,
            freeze_expiry: None,
            alert_interval: DEFAULT_ALERT_INTERVAL,
            webhook_url: None,
            from: FromConfig::default(),
            client: ClientConfig::default(),
            auth_failures: AuthFailureConfig::default(),
            accounts: Vec::new(),
            backend: Backend::Memory,
            redis_url: DEFAULT_REDIS_URL.into(),
            redis_prefix: DEFAULT_REDIS_PREFIX.into(),
            redis_timeout: DEFAULT_REDIS_TIMEOUT,
            redis_retry: DEFAULT_REDIS_RETRY,
            state_file: PathBuf::from(DEFAULT_STATE_FILE),
            freeze_file: PathBuf::from(DEFAULT_FREEZE_FILE),
            command_dir: PathBuf::from(DEFAULT_COMMAND_DIR),
            snapshot_interval: DEFAULT_SNAPSHOT_INTERVAL,
            tracked_accounts: DEFAULT_TRACKED_ACCOUNTS,
        }
    }
}

impl Default for AdaptiveConfig {
    fn default() -> Self {
        AdaptiveConfig {
            enabled: true,
            k: DEFAULT_ADAPTIVE_K,
            floor_messages: DEFAULT_ADAPTIVE_FLOOR_MESSAGES,
            floor_recipients: DEFAULT_ADAPTIVE_FLOOR_RECIPIENTS,
            half_life: DEFAULT_ADAPTIVE_HALF_LIFE,
            new_account_messages: DEFAULT_NEW_ACCOUNT_MESSAGES,
            new_account_recipients: DEFAULT_NEW_ACCOUNT_RECIPIENTS,
        }
    }
}

impl Default for NewIpConfig {
    fn default() -> Self {
        NewIpConfig {
            enabled: true,
            window: DEFAULT_NEW_IP_WINDOW,
            factor: DEFAULT_NEW_IP_FACTOR,
            remember: DEFAULT_NEW_IP_REMEMBER,
        }
    }
}

impl Default for FromConfig {
    fn default() -> Self {
        FromConfig {
            allow: DEFAULT_FROM_ALLOW,
            login_domain: None,
            aliases: Vec::new(),
            action: DEFAULT_FROM_ACTION,
        }
    }
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            enabled: true,
            windows: Vec::new(),
            max_senders: DEFAULT_CLIENT_MAX_SENDERS,
            action: None,
        }
    }
}

impl Default for AuthFailureConfig {
    fn default() -> Self {
        AuthFailureConfig {
            enabled: true,
            window: DEFAULT_AUTH_WINDOW,
            max_failures: DEFAULT_AUTH_MAX_FAILURES,
            max_usernames: DEFAULT_AUTH_MAX_USERNAMES,
            block: DEFAULT_AUTH_BLOCK,
            max_failures_per_user: DEFAULT_AUTH_MAX_FAILURES_PER_USER,
            user_block: DEFAULT_AUTH_USER_BLOCK,
            exempt_networks: Vec::new(),
            tracked_clients: DEFAULT_AUTH_TRACKED_CLIENTS,
        }
    }
}

/// `"1m"`, `"1h"`, `"24h"`, `"90s"`: the shortest exact spelling of a window.
pub fn label(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 && s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s >= 60 && s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

/// A `user@domain` or `@domain` pattern, lower-cased; `None` when malformed.
pub fn alias_pattern(s: &str) -> Option<String> {
    let s = s.trim().to_ascii_lowercase();
    let (local, domain) = s.rsplit_once('@')?;
    if domain.is_empty()
        || domain.contains(char::is_whitespace)
        || local.contains(char::is_whitespace)
    {
        return None;
    }
    Some(s)
}

impl OutboundConfig {
    /// Semantic checks serde cannot express. Errors are (key inside `[outbound]`, reason);
    /// `windows[N]`/`account[N]` name the N-th array entry.
    pub fn validate(&self) -> Result<(), (String, String)> {
        fn err<T>(
            key: impl Into<String>,
            reason: impl Into<String>,
        ) -> Result<T, (String, String)> {
            Err((key.into(), reason.into()))
        }
        if self.windows.len() > MAX_WINDOWS {
            return err("windows", format!("at most {MAX_WINDOWS} windows"));
        }
        for (i, w) in self.windows.iter().enumerate() {
            check_window(&format!("windows[{i}].window"), w.window)?;
            if self.windows[..i].iter().any(|o| o.window == w.window) {
                return err(format!("windows[{i}].window"), "the same window twice");
            }
        }
        check_window("recipient_domains_window", self.recipient_domains_window)?;
        check_window("rejected_window", self.rejected_window)?;
        if self.max_recipient_domains > MAX_RECIPIENT_DOMAINS {
            return err(
                "max_recipient_domains",
                format!("at most {MAX_RECIPIENT_DOMAINS}"),
            );
        }
        if !(self.max_rejected_share > 0.0 && self.max_rejected_share <= 1.0) {
            return err("max_rejected_share", "must be more than 0 and at most 1");
        }
        let a = &self.adaptive;
        if !(a.k.is_finite() && a.k > 0.0) {
            return err("adaptive.k", "must be more than 0");
        }
        for (key, v) in [
            ("adaptive.floor_messages", a.floor_messages),
            ("adaptive.floor_recipients", a.floor_recipients),
            ("adaptive.new_account_messages", a.new_account_messages),
            ("adaptive.new_account_recipients", a.new_account_recipients),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return err(key, "must be a number of at least 0");
            }
        }
        if a.half_life < Duration::from_secs(3600) {
            return err(
                "adaptive.half_life",
                "must be at least 1h (the baseline is hourly)",
            );
        }
        if !(self.new_ip.factor > 0.0 && self.new_ip.factor <= 1.0) {
            return err("new_ip.factor", "must be more than 0 and at most 1");
        }
        if self.new_ip.remember == 0 || self.new_ip.remember > 64 {
            return err("new_ip.remember", "must be 1 to 64");
        }
        if self.new_ip.window.is_zero() {
            return err("new_ip.window", "must be more than zero");
        }
        if let Some(e) = self.freeze_expiry
            && e.is_zero()
        {
            return err(
                "freeze_expiry",
                "must be more than zero (omit it for freezes that never expire)",
            );
        }
        if self.alert_interval.is_zero() {
            return err("alert_interval", "must be more than zero");
        }
        if let Some(url) = &self.webhook_url {
            WebhookTarget::parse(url).map_err(|e| ("webhook_url".to_string(), e))?;
        }
        if let Some(d) = &self.from.login_domain
            && (d.is_empty() || d.contains(['@', ' ']))
        {
            return err("from.login_domain", "must be a domain name");
        }
        for (i, s) in self.from.aliases.iter().enumerate() {
            if alias_pattern(s).is_none() {
                return err(
                    format!("from.aliases[{i}]"),
                    format!("`{s}` is neither user@domain nor @domain"),
                );
            }
        }
        for (j, w) in self.client.windows.iter().enumerate() {
            if !self.windows.iter().any(|g| g.window == w.window) {
                return err(
                    format!("client.windows[{j}].window"),
                    format!("{} is not one of [outbound] windows", label(w.window)),
                );
            }
        }
        if self.client.max_senders > MAX_RECIPIENT_DOMAINS {
            return err(
                "client.max_senders",
                format!("at most {MAX_RECIPIENT_DOMAINS}"),
            );
        }
        let f = &self.auth_failures;
        if f.window.is_zero() || f.block.is_zero() {
            return err(
                "auth_failures.window",
                "window and block must be more than zero",
            );
        }
        if f.max_failures == 0 || f.max_usernames == 0 {
            return err(
                "auth_failures.max_failures",
                "max_failures and max_usernames must be at least 1",
            );
        }
        if f.max_failures_per_user > 10_000 {
            return err("auth_failures.max_failures_per_user", "at most 10000");
        }
        if f.user_block.is_zero() {
            return err("auth_failures.user_block", "must be more than zero");
        }
        if f.max_failures > 10_000 {
            return err("auth_failures.max_failures", "at most 10000");
        }
        if f.tracked_clients == 0 {
            return err("auth_failures.tracked_clients", "must be at least 1");
        }
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (i, o) in self.accounts.iter().enumerate() {
            let t = format!("account[{i}]");
            let names: Vec<&String> = o.name.iter().chain(o.names.iter()).collect();
            if names.is_empty() {
                return err(format!("{t}.name"), "name (or names) is required");
            }
            let clients = names
                .iter()
                .filter(|n| client_key::is_key(n.trim()))
                .count();
            if clients != 0 && clients != names.len() {
                return err(
                    format!("{t}.names"),
                    "client:... names and accounts cannot share one group (their defaults differ)",
                );
            }
            for n in names {
                let mut n = n.trim().to_lowercase();
                if n.is_empty() || n == "@" {
                    return err(format!("{t}.name"), "must be an account or @domain");
                }
                if client_key::is_key(&n) {
                    n = client_key::parse_key(&n).ok_or_else(|| {
                        (
                            format!("{t}.name"),
                            format!("`{n}` is not client:IPV4 or client:IPV6/64"),
                        )
                    })?;
                }
                if let Some(j) = seen.insert(n.clone(), i) {
                    return err(
                        format!("{t}.name"),
                        format!("`{n}` is already configured in account[{j}]"),
                    );
                }
            }
            for (j, w) in o.windows.iter().enumerate() {
                if !self.windows.iter().any(|g| g.window == w.window) {
                    return err(
                        format!("{t}.windows[{j}].window"),
                        format!("{} is not one of [outbound] windows", label(w.window)),
                    );
                }
            }
            if let Some(m) = o.max_recipient_domains
                && m > MAX_RECIPIENT_DOMAINS
            {
                return err(
                    format!("{t}.max_recipient_domains"),
                    format!("at most {MAX_RECIPIENT_DOMAINS}"),
                );
            }
            if let Some(s) = o.max_rejected_share
                && !(s > 0.0 && s <= 1.0)
            {
                return err(
                    format!("{t}.max_rejected_share"),
                    "must be more than 0 and at most 1",
                );
            }
            for (j, s) in o.from_aliases.iter().enumerate() {
                if alias_pattern(s).is_none() {
                    return err(
                        format!("{t}.from_aliases[{j}]"),
                        format!("`{s}` is neither user@domain nor @domain"),
                    );
                }
            }
        }
        if self.backend == Backend::Redis {
            if !self.redis_url.starts_with("redis://") && !self.redis_url.starts_with("unix://") {
                return err(
                    "redis_url",
                    "must be redis://HOST:PORT/DB or unix://PATH (no TLS)",
                );
            }
            if redis::Client::open(self.redis_url.as_str()).is_err() {
                return err(
                    "redis_url",
                    format!("`{}` is not a Redis URL", redact_url(&self.redis_url)),
                );
            }
            if self.redis_timeout.is_zero() || self.redis_retry.is_zero() {
                return err(
                    "redis_timeout",
                    "redis_timeout and redis_retry must be more than zero",
                );
            }
        }
        if self.snapshot_interval.is_zero() {
            return err("snapshot_interval", "must be more than zero");
        }
        for (key, p) in [
            ("state_file", &self.state_file),
            ("freeze_file", &self.freeze_file),
            ("command_dir", &self.command_dir),
        ] {
            if p.as_os_str().is_empty() {
                return err(key, "must be a path");
            }
        }
        if self.tracked_accounts == 0 {
            return err("tracked_accounts", "must be at least 1");
        }
        Ok(())
    }
}

fn check_window(key: &str, d: Duration) -> Result<(), (String, String)> {
    if d < MIN_WINDOW || d > MAX_WINDOW {
        return Err((key.into(), "must be from 10s to 30d".into()));
    }
    if !d.as_millis().is_multiple_of(u128::from(WINDOW_BUCKETS)) {
        return Err((
            key.into(),
            format!("must be a multiple of {WINDOW_BUCKETS} ms"),
        ));
    }
    Ok(())
}

/// `redis://user:secret@host/` → `redis://user:***@host/`: URLs are logged only like this.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{}", &rest[at + 1..])
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The defaults as they were before they became named constants (the values the
    /// README and the reference config document): moving them must not change one.
    #[test]
    fn the_defaults_are_those_documented() {
        let c: OutboundConfig = toml::from_str("").unwrap();
        let windows: Vec<(u64, Option<u32>, Option<u32>)> = c
            .windows
            .iter()
            .map(|w| (w.window.as_secs(), w.messages, w.recipients))
            .collect();
        assert_eq!(
            windows,
            [
                (60, Some(30), Some(300)),
                (3600, Some(300), Some(3000)),
                (86_400, Some(1000), Some(10_000))
            ]
        );
        assert_eq!(
            (
                c.max_recipient_domains,
                c.recipient_domains_window.as_secs()
            ),
            (100, 3600)
        );
        assert_eq!(
            (
                c.max_rejected_share,
                c.rejected_min_recipients,
                c.rejected_window.as_secs()
            ),
            (0.5, 20, 3600)
        );
        let a = &c.adaptive;
        assert_eq!(
            (
                a.enabled,
                a.k,
                a.floor_messages,
                a.floor_recipients,
                a.half_life.as_secs()
            ),
            (true, 10.0, 100.0, 1000.0, 7 * 86_400)
        );
        assert_eq!(
            (a.new_account_messages, a.new_account_recipients),
            (5.0, 50.0)
        );
        let n = &c.new_ip;
        assert_eq!(
            (n.enabled, n.window.as_secs(), n.factor, n.remember),
            (true, 3600, 0.5, 8)
        );
        assert_eq!(
            (c.action, c.freeze_expiry, c.alert_interval.as_secs()),
            (OutboundAction::Freeze, None, 600)
        );
        assert_eq!(
            (c.from.allow, c.from.action),
            (FromAllow::Domain, OutboundAction::Hold)
        );
        assert_eq!(
            (c.client.enabled, c.client.max_senders, c.client.action),
            (true, 20, None)
        );
        let f = &c.auth_failures;
        assert_eq!(
            (
                f.enabled,
                f.window.as_secs(),
                f.max_failures,
                f.max_usernames,
                f.block.as_secs()
            ),
            (true, 600, 10, 5, 3600)
        );
        assert_eq!(
            (
                f.max_failures_per_user,
                f.user_block.as_secs(),
                f.tracked_clients
            ),
            (20, 900, 100_000)
        );
        assert_eq!(c.backend, Backend::Memory);
        assert_eq!(
            (c.redis_url.as_str(), c.redis_prefix.as_str()),
            ("redis://127.0.0.1:6379/", "mailwarden:outbound:")
        );
        assert_eq!(
            (c.redis_timeout.as_millis(), c.redis_retry.as_secs()),
            (500, 5)
        );
        assert_eq!(
            (&c.state_file, &c.freeze_file, &c.command_dir),
            (
                &PathBuf::from("var/outbound/state.json"),
                &PathBuf::from("var/outbound/freezes.json"),
                &PathBuf::from("var/outbound/commands")
            )
        );
        assert_eq!(
            (c.snapshot_interval.as_secs(), c.tracked_accounts),
            (30, 100_000)
        );
        assert!(c.enabled && c.trusted_networks.is_empty() && c.accounts.is_empty());
        assert!(c.validate().is_ok());
    }

    #[test]
    fn client_names_are_checked_here_without_the_detector() {
        let c: OutboundConfig = toml::from_str(
            "[[account]]\nname = \"client:2001:DB8:1:2::9\"\n\
             [[account]]\nname = \"client:2001:db8:1:2::/64\"\n",
        )
        .unwrap();
        let (key, reason) = c.validate().unwrap_err();
        assert_eq!(key, "account[1].name");
        assert_eq!(
            reason,
            "`client:2001:db8:1:2::/64` is already configured in account[0]"
        );
    }
}
