//! What `accounts list` / `accounts show` (and the admin API) see of an account, built
//! from its counters and freeze record whichever store they came from.

use serde::{Deserialize, Serialize};

use super::baseline::Params;
use super::config::Settings;
use super::freeze::FreezeRecord;
pub use super::freeze::{Freeze, FreezeEvent};
use super::state::{AccountState, secs};

/// Messages and recipients in one window, with the limits that apply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WindowCount {
    pub window: String,
    pub messages: u64,
    pub recipients: u64,
    pub max_messages: Option<u32>,
    pub max_recipients: Option<u32>,
}

/// One line of `accounts list`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccountSummary {
    pub account: String,
    /// Seconds since the epoch; `None` for a frozen account with no counters.
    pub last_seen: Option<u64>,
    pub windows: Vec<WindowCount>,
    /// Learned messages per hour.
    pub baseline_messages_per_hour: Option<f64>,
    pub frozen: bool,
    pub frozen_until: Option<u64>,
    /// The `[[outbound.account]]` override that applies (its first name), if any.
    pub policy: Option<String>,
    pub bulk: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DomainCount {
    pub window: String,
    pub domains: u32,
    pub max: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RejectedShare {
    pub window: String,
    pub tried: u64,
    pub refused: u64,
    pub share: f64,
    pub max_share: f64,
    pub min_recipients: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BaselineDetail {
    pub enabled: bool,
    /// Learned per hour.
    pub messages_per_hour: f64,
    pub recipients_per_hour: f64,
    /// In the last hour.
    pub current_messages: f64,
    pub current_recipients: f64,
    /// `max(floor, k × baseline)`.
    pub max_messages: f64,
    pub max_recipients: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoginIp {
    pub ip: String,
    pub first_seen: u64,
    pub last_seen: u64,
    /// First seen after the account had logged in from elsewhere.
    pub new: bool,
}

/// `accounts show ACCOUNT`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccountDetail {
    pub account: String,
    /// Whether counters are kept for it (false: only a freeze record).
    pub tracked: bool,
    pub created: Option<u64>,
    pub last_seen: Option<u64>,
    pub messages_total: u64,
    pub policy: Option<String>,
    pub bulk: bool,
    pub windows: Vec<WindowCount>,
    pub recipient_domains: DomainCount,
    pub rejected: RejectedShare,
    pub baseline: BaselineDetail,
    pub frozen: Option<Freeze>,
    pub history: Vec<FreezeEvent>,
    pub login_ips: Vec<LoginIp>,
}

fn windows(
    s: &Settings,
    account: &str,
    st: Option<&AccountState>,
    now_ms: u64,
) -> Vec<WindowCount> {
    let limits = s.limits_for(account);
    let obs = st.map(|st| st.observe(s, &Params::from_settings(s), now_ms, None));
    (0..s.windows())
        .map(|i| {
            let (m, r) = obs.as_ref().map_or((0.0, 0.0), |o| o.windows[i]);
            WindowCount {
                window: s.rings[i].label.clone(),
                messages: m.round() as u64,
                recipients: r.round() as u64,
                max_messages: if limits.bulk {
                    None
                } else {
                    limits.windows[i].0
                },
                max_recipients: if limits.bulk {
                    None
                } else {
                    limits.windows[i].1
                },
            }
        })
        .collect()
}

pub(crate) fn summary(
    s: &Settings,
    account: &str,
    st: Option<&AccountState>,
    frozen: Option<&Freeze>,
    now_ms: u64,
) -> AccountSummary {
    let limits = s.limits_for(account);
    AccountSummary {
        account: account.to_string(),
        last_seen: st.map(|st| u64::from(st.last_seen)),
        windows: windows(s, account, st, now_ms),
        baseline_messages_per_hour: st.map(|st| {
            let mut b = st.baseline;
            b.roll(now_ms, &Params::from_settings(s));
            (f64::from(b.messages) * 100.0).round() / 100.0
        }),
        frozen: frozen.is_some(),
        frozen_until: frozen.and_then(|f| f.until),
        policy: limits.name.clone(),
        bulk: limits.bulk,
    }
}

pub(crate) fn detail(
    s: &Settings,
    account: &str,
    st: Option<&AccountState>,
    rec: Option<&FreezeRecord>,
    now_ms: u64,
) -> AccountDetail {
    let limits = s.limits_for(account);
    let p = Params::from_settings(s);
    let obs = st.map(|st| st.observe(s, &p, now_ms, None));
    let (tried, refused) = obs.as_ref().map_or((0.0, 0.0), |o| o.rejected);
    let mut b = st.map(|st| st.baseline).unwrap_or_else(|| {
        super::baseline::Baseline::new(
            now_ms,
            s.cfg.adaptive.new_account_messages,
            s.cfg.adaptive.new_account_recipients,
        )
    });
    b.roll(now_ms, &p);
    let (cur_m, cur_r) = b.rate(now_ms);
    let (max_m, max_r) = b.threshold(&p);
    let round2 = |x: f64| (x * 100.0).round() / 100.0;
    let now = u64::from(secs(now_ms));
    AccountDetail {
        account: account.to_string(),
        tracked: st.is_some(),
        created: st.map(|st| u64::from(st.created)),
        last_seen: st.map(|st| u64::from(st.last_seen)),
        messages_total: st.map_or(0, |st| st.messages),
        policy: limits.name.clone(),
        bulk: limits.bulk,
        windows: windows(s, account, st, now_ms),
        recipient_domains: DomainCount {
            window: super::config::label(s.cfg.recipient_domains_window),
            domains: obs.as_ref().map_or(0, |o| o.domains),
            max: limits.max_domains,
        },
        rejected: RejectedShare {
            window: s.rings[s.windows()].label.clone(),
            tried: tried.round() as u64,
            refused: refused.round() as u64,
            share: if tried > 0.0 {
                round2(refused / tried)
            } else {
                0.0
            },
            max_share: limits.max_rejected_share,
            min_recipients: s.cfg.rejected_min_recipients,
        },
        baseline: BaselineDetail {
            enabled: limits.adaptive && !limits.bulk,
            messages_per_hour: round2(f64::from(b.messages)),
            recipients_per_hour: round2(f64::from(b.recipients)),
            current_messages: round2(cur_m),
            current_recipients: round2(cur_r),
            max_messages: round2(max_m),
            max_recipients: round2(max_r),
        },
        frozen: rec
            .and_then(|r| r.current.clone())
            .filter(|f| f.active(now)),
        history: rec.map(|r| r.history.clone()).unwrap_or_default(),
        login_ips: st
            .map(|st| {
                st.ips
                    .iter()
                    .map(|k| LoginIp {
                        ip: k.ip.to_string(),
                        first_seen: u64::from(k.first),
                        last_seen: u64::from(k.last),
                        new: k.new,
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}
