//! `[outbound]`: the burst detector's settings as written in the config file, their
//! validation, and [`Settings`], the same compiled into what the hot path needs (window
//! bucket widths, per-account limits resolved, EWMA factor).
//!
//! Every limit is the most that is allowed: `messages = 30` in a `1m` window lets 30
//! messages through and flags the 31st.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::OutboundAction;
use super::window::BUCKETS;

/// Most windows an account is counted in (the per-account counters are sized by it).
pub const MAX_WINDOWS: usize = 8;
/// Shortest window: its bucket (window / 8) must be long enough for a `u32` bucket index.
pub const MIN_WINDOW: Duration = Duration::from_secs(10);
/// Longest window.
pub const MAX_WINDOW: Duration = Duration::from_secs(30 * 86_400);
/// Largest `max_recipient_domains`: the distinct domains seen are kept per account, up to
/// this limit plus one.
pub const MAX_RECIPIENT_DOMAINS: u32 = 10_000;

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// In this process; survives restarts through `state_file` and `freeze_file`.
    Memory,
    /// Shared by every instance using the same `redis_url` and `redis_prefix`.
    Redis,
}

/// Which header From addresses an account may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
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
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
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
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
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
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
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
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
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
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
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
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
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
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
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
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
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
        let w = |secs, messages, recipients| WindowLimit {
            window: Duration::from_secs(secs),
            messages: Some(messages),
            recipients: Some(recipients),
        };
        OutboundConfig {
            enabled: true,
            trusted_networks: Vec::new(),
            windows: vec![w(60, 30, 300), w(3600, 300, 3000), w(86_400, 1000, 10_000)],
            max_recipient_domains: 100,
            recipient_domains_window: Duration::from_secs(3600),
            max_rejected_share: 0.5,
            rejected_min_recipients: 20,
            rejected_window: Duration::from_secs(3600),
            adaptive: AdaptiveConfig::default(),
            new_ip: NewIpConfig::default(),
            action: OutboundAction::Freeze,
            freeze_expiry: None,
            alert_interval: Duration::from_secs(600),
            webhook_url: None,
            from: FromConfig::default(),
            client: ClientConfig::default(),
            auth_failures: AuthFailureConfig::default(),
            accounts: Vec::new(),
            backend: Backend::Memory,
            redis_url: "redis://127.0.0.1:6379/".into(),
            redis_prefix: "mailwarden:outbound:".into(),
            redis_timeout: Duration::from_millis(500),
            redis_retry: Duration::from_secs(5),
            state_file: PathBuf::from("var/outbound/state.json"),
            freeze_file: PathBuf::from("var/outbound/freezes.json"),
            command_dir: PathBuf::from("var/outbound/commands"),
            snapshot_interval: Duration::from_secs(30),
            tracked_accounts: 100_000,
        }
    }
}

impl Default for AdaptiveConfig {
    fn default() -> Self {
        AdaptiveConfig {
            enabled: true,
            k: 10.0,
            floor_messages: 100.0,
            floor_recipients: 1000.0,
            half_life: Duration::from_secs(7 * 86_400),
            new_account_messages: 5.0,
            new_account_recipients: 50.0,
        }
    }
}

impl Default for NewIpConfig {
    fn default() -> Self {
        NewIpConfig {
            enabled: true,
            window: Duration::from_secs(3600),
            factor: 0.5,
            remember: 8,
        }
    }
}

impl Default for FromConfig {
    fn default() -> Self {
        FromConfig {
            allow: FromAllow::Domain,
            login_domain: None,
            aliases: Vec::new(),
            action: OutboundAction::Hold,
        }
    }
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            enabled: true,
            windows: Vec::new(),
            max_senders: 20,
            action: None,
        }
    }
}

impl Default for AuthFailureConfig {
    fn default() -> Self {
        AuthFailureConfig {
            enabled: true,
            window: Duration::from_secs(600),
            max_failures: 10,
            max_usernames: 5,
            block: Duration::from_secs(3600),
            max_failures_per_user: 20,
            user_block: Duration::from_secs(900),
            exempt_networks: Vec::new(),
            tracked_clients: 100_000,
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
fn alias_pattern(s: &str) -> Option<String> {
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
            super::alert::WebhookTarget::parse(url).map_err(|e| ("webhook_url".to_string(), e))?;
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
                .filter(|n| super::client::is_key(n.trim()))
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
                if super::client::is_key(&n) {
                    n = super::client::parse_key(&n).ok_or_else(|| {
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

/// The limits of a client key: the account defaults with `[outbound.client]` over them.
fn client_limits(cfg: &OutboundConfig, defaults: &Limits) -> Limits {
    let mut l = defaults.clone();
    l.client = true;
    for w in &cfg.client.windows {
        if let Some(i) = cfg.windows.iter().position(|g| g.window == w.window) {
            l.windows[i] = (
                w.messages.or(l.windows[i].0),
                w.recipients.or(l.windows[i].1),
            );
        }
    }
    l.max_domains = cfg.client.max_senders;
    l.action = cfg.client.action.unwrap_or(cfg.action);
    // The From policy is about who the message claims to be from: judged for the
    // envelope sender's account, not for the host.
    l.from_allow = FromAllow::Any;
    l
}

fn check_window(key: &str, d: Duration) -> Result<(), (String, String)> {
    if d < MIN_WINDOW || d > MAX_WINDOW {
        return Err((key.into(), "must be from 10s to 30d".into()));
    }
    if !d.as_millis().is_multiple_of(u128::from(BUCKETS)) {
        return Err((key.into(), format!("must be a multiple of {BUCKETS} ms")));
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

/// One window as the counters see it.
#[derive(Debug, Clone)]
pub(crate) struct WindowSpec {
    pub label: String,
    pub bucket_ms: u64,
}

/// Limits for one account (the defaults, or an override merged over them).
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    /// Which `[[outbound.account]]` (its first name), or `None` for the defaults.
    pub name: Option<String>,
    pub bulk: bool,
    /// Per configured window: (messages, recipients).
    pub windows: Vec<(Option<u32>, Option<u32>)>,
    pub max_domains: u32,
    pub max_rejected_share: f64,
    pub adaptive: bool,
    pub action: OutboundAction,
    pub from_allow: FromAllow,
    pub from_aliases: Vec<String>,
    pub from_action: OutboundAction,
    /// The limits of a client key (`client:...`): `max_domains` counts distinct envelope
    /// senders, not recipient domains, and there is no From check.
    pub client: bool,
}

/// The validated configuration compiled for the hot path.
#[derive(Debug)]
pub(crate) struct Settings {
    pub cfg: OutboundConfig,
    /// The configured windows, then the rejected-share window (always last).
    pub rings: Vec<WindowSpec>,
    pub domains_window_secs: u32,
    /// EWMA weight of one hour: `1 - 2^(-1/half_life_hours)`.
    pub alpha: f64,
    /// Identifies the counter layout; counters saved under another layout are dropped.
    pub layout: String,
    defaults: Limits,
    /// Limits of every client key without its own `[[outbound.account]]`.
    client_defaults: Limits,
    overrides: Vec<Limits>,
    by_name: HashMap<String, usize>,
    by_domain: HashMap<String, usize>,
}

impl Settings {
    pub fn new(cfg: &OutboundConfig) -> Result<Settings, String> {
        cfg.validate()
            .map_err(|(k, r)| format!("outbound.{k}: {r}"))?;
        let mut rings: Vec<WindowSpec> = cfg
            .windows
            .iter()
            .map(|w| WindowSpec {
                label: label(w.window),
                bucket_ms: w.window.as_millis() as u64 / BUCKETS,
            })
            .collect();
        rings.push(WindowSpec {
            label: label(cfg.rejected_window),
            bucket_ms: cfg.rejected_window.as_millis() as u64 / BUCKETS,
        });
        let layout = rings
            .iter()
            .map(|r| r.bucket_ms.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let half_life_hours = cfg.adaptive.half_life.as_secs_f64() / 3600.0;
        let alpha = 1.0 - 0.5f64.powf(1.0 / half_life_hours);
        let mut global_aliases: Vec<String> = cfg
            .from
            .aliases
            .iter()
            .filter_map(|s| alias_pattern(s))
            .collect();
        global_aliases.sort();
        let defaults = Limits {
            name: None,
            bulk: false,
            windows: cfg
                .windows
                .iter()
                .map(|w| (w.messages, w.recipients))
                .collect(),
            max_domains: cfg.max_recipient_domains,
            max_rejected_share: cfg.max_rejected_share,
            adaptive: cfg.adaptive.enabled,
            action: cfg.action,
            from_allow: cfg.from.allow,
            from_aliases: global_aliases.clone(),
            from_action: cfg.from.action,
            client: false,
        };
        let client_defaults = client_limits(cfg, &defaults);
        let mut overrides = Vec::new();
        let mut by_name = HashMap::new();
        let mut by_domain = HashMap::new();
        for o in &cfg.accounts {
            let names: Vec<String> = o
                .name
                .iter()
                .chain(o.names.iter())
                .map(|n| n.trim().to_lowercase())
                .map(|n| super::client::parse_key(&n).unwrap_or(n))
                .collect();
            // validate() keeps client keys and accounts in separate groups.
            let mut l = if names.first().is_some_and(|n| super::client::is_key(n)) {
                client_defaults.clone()
            } else {
                defaults.clone()
            };
            l.name = names.first().cloned();
            l.bulk = o.bulk;
            for w in &o.windows {
                if let Some(i) = cfg.windows.iter().position(|g| g.window == w.window) {
                    l.windows[i] = (
                        w.messages.or(l.windows[i].0),
                        w.recipients.or(l.windows[i].1),
                    );
                }
            }
            l.max_domains = o.max_recipient_domains.unwrap_or(l.max_domains);
            l.max_rejected_share = o.max_rejected_share.unwrap_or(l.max_rejected_share);
            l.adaptive = o.adaptive.unwrap_or(l.adaptive);
            l.action = o.action.unwrap_or(l.action);
            l.from_allow = o.from_allow.unwrap_or(l.from_allow);
            l.from_aliases
                .extend(o.from_aliases.iter().filter_map(|s| alias_pattern(s)));
            l.from_action = o.from_action.unwrap_or(l.from_action);
            let idx = overrides.len();
            overrides.push(l);
            for n in names {
                match n.strip_prefix('@') {
                    Some(domain) => by_domain.insert(domain.to_string(), idx),
                    None => by_name.insert(n, idx),
                };
            }
        }
        Ok(Settings {
            cfg: cfg.clone(),
            rings,
            domains_window_secs: cfg.recipient_domains_window.as_secs() as u32,
            alpha,
            layout,
            defaults,
            client_defaults,
            overrides,
            by_name,
            by_domain,
        })
    }

    /// Number of configured windows (the rejected-share ring comes after them).
    pub fn windows(&self) -> usize {
        self.rings.len() - 1
    }

    /// The limits that apply to `account` (already normalised; a client key as
    /// [`super::client::key`] makes it).
    pub fn limits_for(&self, account: &str) -> &Limits {
        if let Some(&i) = self.by_name.get(account) {
            return &self.overrides[i];
        }
        if super::client::is_key(account) {
            return &self.client_defaults;
        }
        if self.by_domain.is_empty() {
            return &self.defaults;
        }
        if let Some((_, domain)) = account.rsplit_once('@')
            && let Some(&i) = self.by_domain.get(domain)
        {
            return &self.overrides[i];
        }
        &self.defaults
    }

    /// Whether `ip` may submit without AUTH.
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        // As the session's `may_submit` sees it: an IPv4 client on a dual-stack listener
        // arrives as ::ffff:a.b.c.d and must be counted, not let through untracked.
        let ip = ip.to_canonical();
        self.cfg.trusted_networks.iter().any(|n| n.contains(&ip))
    }

    /// Whether `ip` is never blocked for AUTH failures.
    pub fn is_auth_exempt(&self, ip: IpAddr) -> bool {
        self.cfg
            .auth_failures
            .exempt_networks
            .iter()
            .any(|n| n.contains(&ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize, serde::Serialize)]
    struct Wrapper {
        #[serde(default)]
        outbound: OutboundConfig,
    }

    fn parse(s: &str) -> Result<OutboundConfig, String> {
        let w: Wrapper = toml::from_str(s).map_err(|e| e.to_string())?;
        w.outbound
            .validate()
            .map_err(|(k, r)| format!("{k}: {r}"))?;
        Ok(w.outbound)
    }

    #[test]
    fn defaults_are_valid() {
        let c = parse("").unwrap();
        assert!(c.enabled);
        assert_eq!(c.windows.len(), 3);
        assert_eq!(c.action, OutboundAction::Freeze);
        assert_eq!(c.tracked_accounts, 100_000);
        assert_eq!(c.state_file, PathBuf::from("var/outbound/state.json"));
        let s = Settings::new(&c).unwrap();
        assert_eq!(s.rings.len(), 4);
        assert_eq!(s.rings[0].label, "1m");
        assert_eq!(s.rings[2].label, "24h");
        // Half-life of 7 days: after 168 hourly steps a weight is halved.
        assert!(((1.0 - s.alpha).powi(168) - 0.5).abs() < 1e-9);
    }

    #[test]
    fn full_config_parses() {
        let c = parse(
            r#"
[outbound]
trusted_networks = ["10.0.0.0/8"]
windows = [{window = "1m", messages = 10, recipients = 100}, {window = "1h", recipients = 1000}]
max_recipient_domains = 20
action = "defer"
freeze_expiry = "2h"
webhook_url = "http://127.0.0.1:9000/hook"
backend = "redis"
redis_url = "redis://:secret@127.0.0.1:6379/0"
[outbound.adaptive]
k = 5.0
half_life = "3d"
[outbound.from]
allow = "address"
aliases = ["@lists.example.org", "noreply@example.org"]
action = "reject"
[outbound.auth_failures]
max_failures = 3
block = "15m"
[[outbound.account]]
name = "news@example.org"
bulk = true
[[outbound.account]]
names = ["@sales.example.org", "boss@example.org"]
windows = [{window = "1h", messages = 50}]
from_aliases = ["@example.com"]
"#,
        )
        .unwrap();
        assert_eq!(c.freeze_expiry, Some(Duration::from_secs(7200)));
        assert_eq!(c.windows[1].messages, None);
        let s = Settings::new(&c).unwrap();
        assert!(s.limits_for("news@example.org").bulk);
        assert_eq!(
            s.limits_for("joe@sales.example.org").windows[1],
            (Some(50), Some(1000))
        );
        assert_eq!(
            s.limits_for("boss@example.org").windows[0],
            (Some(10), Some(100))
        );
        assert_eq!(s.limits_for("other@example.org").name, None);
        assert!(s.is_trusted("10.1.2.3".parse().unwrap()));
        assert!(!s.is_trusted("192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse("[outbound]\nwindow = []\n").unwrap_err();
        assert!(e.contains("window"), "{e}");
        let e = parse("[outbound]\nwindows = [{window = \"1s\", messages = 1}]\n").unwrap_err();
        assert!(e.starts_with("windows[0].window"), "{e}");
        let e = parse("[outbound]\nmax_rejected_share = 1.5\n").unwrap_err();
        assert!(e.starts_with("max_rejected_share"), "{e}");
        let e = parse("[outbound]\nwebhook_url = \"https://x.example/\"\n").unwrap_err();
        assert!(e.starts_with("webhook_url"), "{e}");
        let e = parse("[[outbound.account]]\nbulk = true\n").unwrap_err();
        assert!(e.starts_with("account[0].name"), "{e}");
        let e = parse(
            "[[outbound.account]]\nname = \"a\"\nwindows = [{window = \"5m\", messages = 1}]\n",
        )
        .unwrap_err();
        assert!(e.starts_with("account[0].windows[0].window"), "{e}");
        let e = parse("[[outbound.account]]\nname = \"a\"\n[[outbound.account]]\nname = \"A\"\n")
            .unwrap_err();
        assert!(e.starts_with("account[1].name"), "{e}");
        let e =
            parse("[outbound]\nbackend = \"redis\"\nredis_url = \"rediss://h/\"\n").unwrap_err();
        assert!(e.starts_with("redis_url"), "{e}");
        let e = parse("[[outbound.account]]\nname = \"client:10.0.0.0/8\"\n").unwrap_err();
        assert!(e.starts_with("account[0].name"), "{e}");
        let e =
            parse("[[outbound.account]]\nnames = [\"client:10.0.0.1\", \"a@b\"]\n").unwrap_err();
        assert!(e.starts_with("account[0].names"), "{e}");
        let e = parse(
            "[[outbound.account]]\nname = \"client:2001:db8::1\"\n\
             [[outbound.account]]\nname = \"client:2001:db8::/64\"\n",
        )
        .unwrap_err();
        assert!(e.starts_with("account[1].name"), "the same /64 twice: {e}");
        let e =
            parse("[outbound.client]\nwindows = [{window = \"5m\", messages = 1}]\n").unwrap_err();
        assert!(e.starts_with("client.windows[0].window"), "{e}");
        let e = parse("[outbound.from]\naliases = [\"nobody\"]\n").unwrap_err();
        assert!(e.starts_with("from.aliases[0]"), "{e}");
    }

    #[test]
    fn labels_and_redaction() {
        assert_eq!(label(Duration::from_secs(60)), "1m");
        assert_eq!(label(Duration::from_secs(86_400)), "24h");
        assert_eq!(label(Duration::from_secs(90)), "90s");
        assert_eq!(redact_url("redis://:pw@h:6379/0"), "redis://:***@h:6379/0");
        assert_eq!(redact_url("redis://u:pw@h/"), "redis://u:***@h/");
        assert_eq!(redact_url("redis://h:6379/"), "redis://h:6379/");
    }
}
