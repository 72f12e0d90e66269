//! `[outbound]` compiled for the hot path: [`Settings`] (window bucket widths,
//! per-account limits resolved, EWMA factor). The configuration itself, its defaults and
//! validation are in `crate::config::outbound` (re-exported here, so
//! `outbound::config::OutboundConfig` and friends keep their names).

use std::collections::HashMap;
use std::net::IpAddr;

pub use crate::config::outbound::*;

use super::window::BUCKETS;

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

impl Limits {
    /// How many distinct hashes (recipient domains, a client's senders) are kept per
    /// key: one past the limit is enough to see it exceeded; none when not judged.
    pub fn distinct_cap(&self) -> u32 {
        if self.bulk || self.max_domains == 0 {
            0
        } else {
            self.max_domains + 1
        }
    }
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
                .map(|n| client_key::parse_key(&n).unwrap_or(n))
                .collect();
            // validate() keeps client keys and accounts in separate groups.
            let mut l = if names.first().is_some_and(|n| client_key::is_key(n)) {
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
    /// [`client_key::key`] makes it).
    pub fn limits_for(&self, account: &str) -> &Limits {
        if let Some(&i) = self.by_name.get(account) {
            return &self.overrides[i];
        }
        if client_key::is_key(account) {
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
    use serde::Deserialize;
    use std::path::PathBuf;
    use std::time::Duration;

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
