//! The assessment of one message, computed: a pure function of the key's counts (an
//! [`Observation`], from whichever store), its limits and the message's header From.
//! [`judge_counts`] returns the [`AccountFindings`] and the [`Effect`]s it calls for (freeze,
//! alerts); the [`Detector`](super::Detector) applies those afterwards, in order. So the
//! whole decision is unit-testable without a store, a clock or a network.

use super::config::{self, FromAllow, Limits, Settings};
use super::state::Observation;
use super::store::AccountStatus;
use super::{AccountFindings, FLAG_BURST, FLAG_FROM, OutboundAction};

/// One counter the limits read for a key, as counted with this message: what the
/// outbound stage saw, whether or not it acted (for the trace and the decision log).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Count {
    /// The account, or the client key.
    pub key: String,
    /// `messages_1m`, `recipients_1m`, … per window; `domains_1h` (`senders_1h` for a
    /// client key); `tried_1h` and `refused_1h` (recipients the next hop was asked for
    /// and refused); `messages_rate_1h`, `recipients_rate_1h`; `baseline_messages`,
    /// `baseline_recipients` (per hour); `new_login_age` (seconds, after a login from a
    /// new address); `frozen` (1) for a frozen account.
    pub name: String,
    pub value: f64,
}

/// Adds the counters of `obs` (one key's counts) to `out`.
pub(crate) fn counts(
    s: &Settings,
    limits: &Limits,
    key: &str,
    obs: &Observation,
    out: &mut Vec<Count>,
) {
    let mut add = |name: String, value: f64| {
        out.push(Count {
            key: key.to_string(),
            name,
            value,
        })
    };
    for (ring, &(m, r)) in s.rings[..s.windows()].iter().zip(&obs.windows) {
        add(format!("messages_{}", ring.label), m);
        add(format!("recipients_{}", ring.label), r);
    }
    let what = if limits.client { "senders" } else { "domains" };
    let label = config::label(s.cfg.recipient_domains_window);
    add(format!("{what}_{label}"), f64::from(obs.domains));
    let label = &s.rings[s.windows()].label;
    add(format!("tried_{label}"), obs.rejected.0);
    add(format!("refused_{label}"), obs.rejected.1);
    add("messages_rate_1h".into(), obs.rate.0);
    add("recipients_rate_1h".into(), obs.rate.1);
    add("baseline_messages".into(), obs.baseline.0);
    add("baseline_recipients".into(), obs.baseline.1);
    if let Some(age) = obs.new_ip_age {
        add("new_login_age".into(), f64::from(age));
    }
    if obs.status.freeze().is_some() {
        add("frozen".into(), 1.0);
    }
}

/// What an assessment calls for besides its verdict, applied after it in this order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Effect {
    /// Freeze the key (the detector's own, automatic freeze) for this reason.
    Freeze { why: String },
    /// Post the burst alert, unless one went out within `alert_interval`.
    BurstAlert {
        action: OutboundAction,
        breaches: Vec<Breach>,
    },
    /// Post the From-mismatch alert, unless one went out within `alert_interval`.
    FromAlert { action: OutboundAction, why: String },
}

/// One key's assessment and what follows from it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Findings {
    pub assessment: AccountFindings,
    pub effects: Vec<Effect>,
}

/// Judges one key (an account, or a client key) from its counts: a frozen account is
/// held whatever its counts; otherwise every volume limit `obs` exceeds (none for a bulk
/// sender) takes the limits' action, and a header From the account may not use (checked
/// when `header_from` is given) its From action; the stricter wins.
pub(crate) fn judge_counts(
    s: &Settings,
    limits: &Limits,
    key: &str,
    obs: &Observation,
    header_from: Option<&str>,
) -> Findings {
    if let AccountStatus::Frozen(f) = &obs.status {
        return Findings {
            assessment: AccountFindings {
                action: Some(OutboundAction::Freeze),
                reasons: vec![format!(
                    "account {key} frozen since {} by {}: {}",
                    crate::wire::trace::iso_date(f.since),
                    f.by,
                    f.why
                )],
                frozen: true,
                flags: vec![FLAG_BURST],
            },
            effects: Vec::new(),
        };
    }
    let mut out = AccountFindings::relay();
    let mut effects = Vec::new();
    let breaches = if limits.bulk {
        Vec::new()
    } else {
        evaluate(s, limits, obs)
    };
    if !breaches.is_empty() {
        out.action = Some(limits.action);
        out.flags.push(FLAG_BURST);
        out.reasons.extend(breaches.iter().map(|b| {
            if limits.client {
                format!("{key}: {}", b.text)
            } else {
                b.text.clone()
            }
        }));
        if limits.action == OutboundAction::Freeze {
            effects.push(Effect::Freeze {
                why: out.reasons.join("; "),
            });
        }
        effects.push(Effect::BurstAlert {
            action: limits.action,
            breaches,
        });
    }
    if let Some(why) = header_from.and_then(|h| from_mismatch(s, limits, key, h)) {
        let action = limits.from_action;
        out.action = Some(OutboundAction::max(out.action, action));
        out.flags.push(FLAG_FROM);
        if action == OutboundAction::Freeze {
            effects.push(Effect::Freeze { why: why.clone() });
        }
        effects.push(Effect::FromAlert {
            action,
            why: why.clone(),
        });
        out.reasons.push(why);
    }
    out.frozen = out.action == Some(OutboundAction::Freeze);
    Findings {
        assessment: out,
        effects,
    }
}

/// One signal over its limit.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Breach {
    /// `recipients_1m`, `messages_rate_1h`, `domains_1h`, `rejected_share_1h`.
    pub signal: String,
    pub value: f64,
    pub limit: f64,
    pub text: String,
}

/// Shows a count or limit without noise: integers as such, others with one decimal.
pub(crate) fn num(x: f64) -> String {
    if (x - x.round()).abs() < 0.05 {
        format!("{}", x.round() as i64)
    } else {
        format!("{x:.1}")
    }
}

/// The volume limits `obs` exceeds. Texts are built only for a breach: this runs for
/// every message.
pub(crate) fn evaluate(s: &Settings, limits: &Limits, obs: &Observation) -> Vec<Breach> {
    let mut out = Vec::new();
    let factor = match obs.new_ip_age {
        Some(_) if s.cfg.new_ip.enabled => s.cfg.new_ip.factor,
        _ => 1.0,
    };
    fn over(
        out: &mut Vec<Breach>,
        value: f64,
        limit: f64,
        name: impl FnOnce() -> (String, String),
    ) {
        if value > limit + 1e-9 {
            let (signal, text) = name();
            out.push(Breach {
                text: format!("{text}: {} > {}", num(value), num(limit)),
                signal,
                value,
                limit,
            });
        }
    }
    for (i, &(max_m, max_r)) in limits.windows.iter().enumerate() {
        let (m, r) = obs.windows[i];
        if let Some(max) = max_m {
            over(&mut out, m, f64::from(max) * factor, || {
                let label = &s.rings[i].label;
                (format!("messages_{label}"), format!("messages in {label}"))
            });
        }
        if let Some(max) = max_r {
            over(&mut out, r, f64::from(max) * factor, || {
                let label = &s.rings[i].label;
                (
                    format!("recipients_{label}"),
                    format!("recipients in {label}"),
                )
            });
        }
    }
    if limits.max_domains > 0 {
        over(
            &mut out,
            f64::from(obs.domains),
            f64::from(limits.max_domains) * factor,
            || {
                let label = config::label(s.cfg.recipient_domains_window);
                if limits.client {
                    (
                        format!("senders_{label}"),
                        format!("distinct envelope senders in {label}"),
                    )
                } else {
                    (
                        format!("domains_{label}"),
                        format!("recipient domains in {label}"),
                    )
                }
            },
        );
    }
    let (tried, refused) = obs.rejected;
    if tried >= f64::from(s.cfg.rejected_min_recipients) && tried > 0.0 {
        let share = refused / tried;
        if share > limits.max_rejected_share + 1e-9 {
            let label = &s.rings[s.windows()].label;
            out.push(Breach {
                signal: format!("rejected_share_{label}"),
                value: share,
                limit: limits.max_rejected_share,
                text: format!(
                    "recipients refused by the next hop in {label}: {:.0}% > {:.0}% ({} of {})",
                    share * 100.0,
                    limits.max_rejected_share * 100.0,
                    num(refused),
                    num(tried)
                ),
            });
        }
    }
    if limits.adaptive {
        let a = &s.cfg.adaptive;
        let (bm, br) = obs.baseline;
        let (rm, rr) = obs.rate;
        let how = |floor: f64, base: f64| {
            format!(
                " (max of floor {} and {} × baseline {base:.1}/h)",
                num(floor),
                num(a.k)
            )
        };
        over(
            &mut out,
            rm,
            a.floor_messages.max(a.k * bm) * factor,
            || {
                (
                    "messages_rate_1h".into(),
                    "messages in the last hour".into(),
                )
            },
        );
        if let Some(b) = out.last_mut().filter(|b| b.signal == "messages_rate_1h") {
            b.text.push_str(&how(a.floor_messages, bm));
        }
        over(
            &mut out,
            rr,
            a.floor_recipients.max(a.k * br) * factor,
            || {
                (
                    "recipients_rate_1h".into(),
                    "recipients in the last hour".into(),
                )
            },
        );
        if let Some(b) = out.last_mut().filter(|b| b.signal == "recipients_rate_1h") {
            b.text.push_str(&how(a.floor_recipients, br));
        }
    }
    if factor < 1.0
        && !out.is_empty()
        && let Some(age) = obs.new_ip_age
    {
        out.push(Breach {
            signal: "new_login_address".into(),
            value: f64::from(age),
            limit: s.cfg.new_ip.window.as_secs_f64(),
            text: format!(
                "limits × {} after a login from a new address {} min ago",
                s.cfg.new_ip.factor,
                age / 60
            ),
        });
    }
    out
}

/// The address inside `Name <addr>` (or the text itself), lower-cased.
pub(crate) fn bare_address(s: &str) -> String {
    let s = s.trim();
    let inner = match (s.rfind('<'), s.rfind('>')) {
        (Some(a), Some(b)) if a < b => &s[a + 1..b],
        _ => s,
    };
    inner.trim().to_lowercase()
}

/// The mailboxes of an address list: split at commas outside quotes and `<>`.
pub(crate) fn split_addresses(s: &str) -> Vec<&str> {
    let (mut out, mut start, mut quoted, mut angle) = (Vec::new(), 0, false, false);
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '<' if !quoted => angle = true,
            '>' if !quoted => angle = false,
            ',' if !quoted && !angle => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn domain_of(addr: &str) -> Option<&str> {
    addr.rsplit_once('@')
        .map(|(_, d)| d.trim_end_matches('.'))
        .filter(|d| !d.is_empty())
}

/// Why `header_from` is not allowed for `account`, if it is not.
pub(crate) fn from_mismatch(
    s: &Settings,
    limits: &Limits,
    account: &str,
    header_from: &str,
) -> Option<String> {
    if limits.from_allow == FromAllow::Any {
        return None;
    }
    let own = if account.contains('@') {
        account.to_string()
    } else {
        // No own address, nothing to compare with: not checked.
        format!(
            "{account}@{}",
            s.cfg.from.login_domain.as_deref()?.to_lowercase()
        )
    };
    let own_domain = domain_of(&own)?;
    let addresses: Vec<String> = split_addresses(header_from)
        .into_iter()
        .map(bare_address)
        .filter(|a| !a.is_empty())
        .collect();
    if addresses.is_empty() {
        return Some(format!(
            "message has no header From address (account {account})"
        ));
    }
    for from in &addresses {
        let from_domain = domain_of(from).unwrap_or("");
        let ok = *from == own
            || (limits.from_allow == FromAllow::Domain
                && from_domain.eq_ignore_ascii_case(own_domain))
            || limits
                .from_aliases
                .iter()
                .any(|a| match a.strip_prefix('@') {
                    Some(d) => from_domain == d,
                    None => a == from,
                });
        if !ok {
            return Some(format!(
                "header From {from} is not allowed for account {account}"
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    //! The pure assessment: counts in, verdict and effects out; no store, no clock.

    use super::*;
    use crate::outbound::Freeze;
    use crate::outbound::config::{AccountOverride, OutboundConfig};

    fn settings(cfg: OutboundConfig) -> Settings {
        Settings::new(&cfg).unwrap()
    }

    /// Counts with `messages` messages (one recipient each) in the 1-minute window.
    fn counts(messages: f64) -> Observation {
        let mut o = Observation::empty();
        o.windows[0] = (messages, messages);
        o
    }

    const ALICE: &str = "alice@example.org";

    #[test]
    fn within_every_limit_relays_and_does_nothing() {
        let s = settings(OutboundConfig::default());
        let f = judge_counts(&s, s.limits_for(ALICE), ALICE, &counts(30.0), Some(ALICE));
        assert_eq!(f.assessment, AccountFindings::relay());
        assert!(f.effects.is_empty());
    }

    #[test]
    fn one_over_the_limit_freezes_then_alerts() {
        let s = settings(OutboundConfig::default());
        let f = judge_counts(&s, s.limits_for(ALICE), ALICE, &counts(31.0), Some(ALICE));
        assert_eq!(f.assessment.action, Some(OutboundAction::Freeze));
        assert!(f.assessment.frozen);
        assert_eq!(f.assessment.flags, [FLAG_BURST]);
        assert_eq!(f.assessment.reasons, ["messages in 1m: 31 > 30"]);
        match &f.effects[..] {
            [
                Effect::Freeze { why },
                Effect::BurstAlert { action, breaches },
            ] => {
                assert_eq!(why, "messages in 1m: 31 > 30");
                assert_eq!(*action, OutboundAction::Freeze);
                assert_eq!(breaches[0].signal, "messages_1m");
                assert_eq!((breaches[0].value, breaches[0].limit), (31.0, 30.0));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_frozen_account_is_held_whatever_its_counts_and_not_frozen_again() {
        let s = settings(OutboundConfig::default());
        let mut o = counts(5000.0);
        o.status = AccountStatus::Frozen(Freeze {
            since: 1_700_000_000,
            until: None,
            by: "admin".into(),
            why: "phished".into(),
        });
        let f = judge_counts(
            &s,
            s.limits_for(ALICE),
            ALICE,
            &o,
            Some("mallory@evil.example"),
        );
        assert_eq!(f.assessment.action, Some(OutboundAction::Freeze));
        assert!(f.assessment.frozen);
        assert_eq!(f.assessment.flags, [FLAG_BURST]);
        assert_eq!(
            f.assessment.reasons,
            ["account alice@example.org frozen since 2023-11-14 22:13:20 by admin: phished"]
        );
        assert!(
            f.effects.is_empty(),
            "no second freeze, no alert per held message"
        );
    }

    #[test]
    fn an_expired_freeze_is_not_a_status() {
        let f = Freeze {
            since: 100,
            until: Some(200),
            by: "mailwarden".into(),
            why: "burst".into(),
        };
        assert_eq!(
            AccountStatus::from_freeze(Some(f.clone()), 199).freeze(),
            Some(&f)
        );
        assert_eq!(
            AccountStatus::from_freeze(Some(f), 200),
            AccountStatus::Active
        );
        assert_eq!(AccountStatus::from_freeze(None, 0), AccountStatus::Active);
    }

    #[test]
    fn a_bulk_sender_has_no_volume_limits_but_keeps_the_from_check() {
        let s = settings(OutboundConfig {
            accounts: vec![AccountOverride {
                name: Some("news@example.org".into()),
                bulk: true,
                ..Default::default()
            }],
            ..Default::default()
        });
        let news = "news@example.org";
        let f = judge_counts(&s, s.limits_for(news), news, &counts(1e6), Some(news));
        assert_eq!(f.assessment, AccountFindings::relay());
        let f = judge_counts(
            &s,
            s.limits_for(news),
            news,
            &counts(1e6),
            Some("ceo@other.example"),
        );
        assert_eq!(f.assessment.action, Some(OutboundAction::Hold));
        assert_eq!(f.assessment.flags, [FLAG_FROM]);
    }

    #[test]
    fn the_stricter_action_wins_and_each_signal_alerts() {
        let s = settings(OutboundConfig {
            action: OutboundAction::Defer,
            ..Default::default()
        });
        // A burst (defer) and a forged From (hold): hold, both flags, both alerts, no
        // freeze (neither action is one).
        let f = judge_counts(
            &s,
            s.limits_for(ALICE),
            ALICE,
            &counts(40.0),
            Some("Boss <boss@bank.example>"),
        );
        assert_eq!(f.assessment.action, Some(OutboundAction::Hold));
        assert!(!f.assessment.frozen);
        assert_eq!(f.assessment.flags, [FLAG_BURST, FLAG_FROM]);
        assert_eq!(f.assessment.reasons.len(), 2);
        assert!(
            matches!(
                &f.effects[..],
                [
                    Effect::BurstAlert {
                        action: OutboundAction::Defer,
                        ..
                    },
                    Effect::FromAlert {
                        action: OutboundAction::Hold,
                        ..
                    }
                ]
            ),
            "{:?}",
            f.effects
        );
    }

    #[test]
    fn a_second_from_mailbox_cannot_hide_behind_an_allowed_first() {
        let s = settings(OutboundConfig::default());
        let from = "alice@example.org, ceo@bank.example";
        let f = judge_counts(&s, s.limits_for(ALICE), ALICE, &counts(1.0), Some(from));
        assert_eq!(f.assessment.flags, [FLAG_FROM]);
        assert_eq!(
            f.assessment.reasons,
            ["header From ceo@bank.example is not allowed for account alice@example.org"]
        );
    }

    #[test]
    fn a_login_from_a_new_address_halves_the_limits() {
        let s = settings(OutboundConfig::default());
        let mut o = counts(16.0);
        let f = judge_counts(&s, s.limits_for(ALICE), ALICE, &o, None);
        assert_eq!(f.assessment.action, None, "16 of 30");
        o.new_ip_age = Some(120);
        let f = judge_counts(&s, s.limits_for(ALICE), ALICE, &o, None);
        assert_eq!(f.assessment.action, Some(OutboundAction::Freeze));
        assert_eq!(
            f.assessment.reasons,
            [
                "messages in 1m: 16 > 15",
                "limits × 0.5 after a login from a new address 2 min ago"
            ]
        );
    }

    #[test]
    fn the_counts_read_are_listed_whatever_the_verdict() {
        let s = settings(OutboundConfig::default());
        let mut o = counts(3.0);
        o.windows[1] = (40.0, 41.0);
        o.rejected = (20.0, 2.0);
        o.domains = 4;
        let mut out = Vec::new();
        super::counts(&s, s.limits_for(ALICE), ALICE, &o, &mut out);
        let seen: Vec<(&str, f64)> = out.iter().map(|c| (c.name.as_str(), c.value)).collect();
        assert_eq!(
            seen,
            [
                ("messages_1m", 3.0),
                ("recipients_1m", 3.0),
                ("messages_1h", 40.0),
                ("recipients_1h", 41.0),
                ("messages_24h", 0.0),
                ("recipients_24h", 0.0),
                ("domains_1h", 4.0),
                ("tried_1h", 20.0),
                ("refused_1h", 2.0),
                ("messages_rate_1h", 0.0),
                ("recipients_rate_1h", 0.0),
                ("baseline_messages", 0.0),
                ("baseline_recipients", 0.0),
            ]
        );
        assert!(out.iter().all(|c| c.key == ALICE));
        // A client key counts senders; a frozen one says so.
        o.status = AccountStatus::Frozen(Freeze {
            since: 1,
            until: None,
            by: "admin".into(),
            why: "x".into(),
        });
        let key = "client:192.0.2.7";
        let mut out = Vec::new();
        super::counts(&s, s.limits_for(key), key, &o, &mut out);
        assert!(out.iter().any(|c| c.name == "senders_1h" && c.value == 4.0));
        assert_eq!(
            out.last().map(|c| (c.name.as_str(), c.value)),
            Some(("frozen", 1.0))
        );
    }

    #[test]
    fn a_client_key_names_itself_and_skips_the_from_check() {
        let s = settings(OutboundConfig::default());
        let key = "client:192.0.2.7";
        let limits = s.limits_for(key);
        assert!(limits.client);
        let mut o = counts(31.0);
        o.domains = 21;
        let f = judge_counts(&s, limits, key, &o, Some("anyone@anywhere.example"));
        assert_eq!(
            f.assessment.reasons,
            [
                "client:192.0.2.7: messages in 1m: 31 > 30",
                "client:192.0.2.7: distinct envelope senders in 1h: 21 > 20"
            ]
        );
        assert_eq!(f.assessment.flags, [FLAG_BURST]);
    }
}
