//! Sender authentication: SPF (MAIL FROM and HELO, [`spf`]), DKIM ([`dkim`]), ARC and
//! DMARC ([`dmarc`]) for one message, each inside a time budget, and all together within
//! a DNS lookup budget ([`budget`]). DKIM uses mail-auth's parsing and crypto, ARC
//! chains are verified by mail-auth and what their most recent set recorded is read here
//! ([`arc`]).
//!
//! [`Verifier::verify`] is the only way to build an [`AuthReport`]; the proxy and the
//! offline `check` command both go through it. Whatever DNS does, it returns within the
//! budget: a check that runs out of time is `temperror`, never a hang.
//!
//! Parsed DNS data is kept between messages, for its TTL and bounded by `[dns]
//! cache_entries` (see [`cache`]): mail-auth's ARC keys and A records, and our SPF,
//! DKIM key and DMARC records.

pub mod arc;
pub mod arc_keys;
pub mod budget;
pub mod cache;
pub mod dkim;
pub mod dmarc;
pub mod dns;
pub mod headers;
pub mod servers;
pub mod spf;
pub mod stale;
pub mod zones;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use mail_auth::{
    AuthenticatedMessage, DkimResult, MessageAuthenticator, Parameters, RecordSet, SpfResult,
};
use serde::Serialize;
use tokio::time::Instant;

use crate::config::AuthConfig;
/// Domain syntax lives with the wire format (the configuration checks it too).
pub use crate::wire::domain::looks_like_domain;

use budget::{DnsBudget, MessageIpv4, MessageTxt};
use cache::{TtlCache, TxtCache};
use stale::StaleMark;

/// RFC 8601 result words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthResult {
    Pass,
    Fail,
    SoftFail,
    Neutral,
    None,
    TempError,
    PermError,
    Policy,
}

impl AuthResult {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthResult::Pass => "pass",
            AuthResult::Fail => "fail",
            AuthResult::SoftFail => "softfail",
            AuthResult::Neutral => "neutral",
            AuthResult::None => "none",
            AuthResult::TempError => "temperror",
            AuthResult::PermError => "permerror",
            AuthResult::Policy => "policy",
        }
    }
}

impl From<SpfResult> for AuthResult {
    fn from(r: SpfResult) -> Self {
        match r {
            SpfResult::Pass => AuthResult::Pass,
            SpfResult::Fail => AuthResult::Fail,
            SpfResult::SoftFail => AuthResult::SoftFail,
            SpfResult::Neutral => AuthResult::Neutral,
            SpfResult::TempError => AuthResult::TempError,
            SpfResult::PermError => AuthResult::PermError,
            SpfResult::None => AuthResult::None,
        }
    }
}

impl From<&DkimResult> for AuthResult {
    fn from(r: &DkimResult) -> Self {
        match r {
            DkimResult::Pass => AuthResult::Pass,
            // mail-auth reports a body hash mismatch as neutral; RFC 6376 §6.1.3 makes it
            // a failed verification.
            DkimResult::Neutral(mail_auth::Error::Dkim(
                mail_auth::dkim::DkimError::FailedBodyHashMatch,
            )) => AuthResult::Fail,
            DkimResult::Neutral(_) => AuthResult::Neutral,
            DkimResult::Fail(_) => AuthResult::Fail,
            DkimResult::PermError(_) => AuthResult::PermError,
            DkimResult::TempError(_) => AuthResult::TempError,
            DkimResult::None => AuthResult::None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SpfCheck {
    pub result: AuthResult,
    pub domain: String,
}

/// One DKIM-Signature's final result (see [`dkim`] for how each word is reached).
/// `domain` and `selector` are kept whenever the signature's `d=` and `s=` parse, also
/// on permerror. Only `result == Pass` may count for DMARC alignment.
#[derive(Debug, Clone, Serialize)]
pub struct DkimCheck {
    pub result: AuthResult,
    pub domain: String,
    pub selector: String,
    pub algorithm: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Set when the key came from a stale DNS answer (serve-stale): its age in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stale_secs: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ArcCheck {
    pub result: AuthResult,
    /// Domains that sealed the chain (outermost first), when it validated.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sealers: Vec<String>,
    /// The sealer of the most recent set, when the chain validated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latest_sealer: Option<String>,
    /// The sealer of the most recent set when the chain validated **and** that set's
    /// ARC-Authentication-Results recorded a pass for our From domain (see
    /// [`dmarc`]): the only sealer the `arc_sealer` policy condition matches.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vouching_sealer: Option<String>,
}

impl ArcCheck {
    /// No ARC sets (or none looked at).
    pub fn none(result: AuthResult) -> ArcCheck {
        ArcCheck {
            result,
            sealers: Vec::new(),
            latest_sealer: None,
            vouching_sealer: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DmarcCheck {
    pub result: AuthResult,
    /// The **applied** policy: the published one after `pct`, `t=y` and a trusted ARC
    /// override (what rules and `policy.dmarc` see, RFC 7489 §11.2).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<&'static str>,
    /// The published policy that applies to the From domain (`p`, `sp` or `np`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub published_policy: Option<&'static str>,
    pub header_from: String,
    /// Where the policy record was found, when not at the From domain itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_domain: Option<String>,
    /// `pct=` of the record, when under 100 and the message failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pct: Option<u8>,
    /// With `pct`: whether the message was in the sample (the published policy applies)
    /// or not (the next lower one does).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pct_sampled: Option<bool>,
    /// `t=y` (testing mode) on a failed message.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub testing: bool,
    /// The trusted ARC sealer whose most recent set vouched for the message: DMARC stays
    /// `fail`, the applied policy is `none` (RFC 8617 §7.2).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arc_override: Option<String>,
    /// Why the result or the policy is what it is, when not obvious.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// For aggregate reports (`policy_evaluated`): whether SPF, and a DKIM signature,
    /// gave an aligned pass. Not in the JSON output: `result` already says it.
    #[serde(skip)]
    pub spf_aligned: bool,
    #[serde(skip)]
    pub dkim_aligned: bool,
    /// The record the policy came from, and where it was found (`policy_published`).
    #[serde(skip)]
    pub record: Option<std::sync::Arc<dmarc::Record>>,
    #[serde(skip)]
    pub record_domain: Option<String>,
}

impl DmarcCheck {
    /// A result without a record (none, or an error before one was found).
    pub fn without_record(result: AuthResult, header_from: String) -> DmarcCheck {
        DmarcCheck {
            result,
            policy: None,
            published_policy: None,
            header_from,
            policy_domain: None,
            pct: None,
            pct_sampled: None,
            testing: false,
            arc_override: None,
            reason: None,
            spf_aligned: false,
            dkim_aligned: false,
            record: None,
            record_domain: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SpfPair {
    pub mail_from: SpfCheck,
    pub helo: SpfCheck,
}

/// The work one message made us do, against its caps (`[auth] max_dns_lookups`,
/// `[auth] arc_max_sets`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct WorkCounts {
    /// DNS lookups made (cache hits are free).
    pub dns_lookups: u32,
    /// Lookups wanted past the limit; each made its check `permerror`.
    pub dns_lookups_refused: u32,
    /// ARC sets the message carries.
    pub arc_sets: usize,
}

impl WorkCounts {
    fn of(budget: &DnsBudget, arc_sets: usize) -> WorkCounts {
        WorkCounts {
            dns_lookups: budget.used(),
            dns_lookups_refused: budget.refused(),
            arc_sets,
        }
    }
}

/// Which results rest on a stale DNS answer (serve-stale, [`stale`]): the age in seconds
/// of the oldest stale answer each check used. DKIM's is on each [`DkimCheck`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct StaleUse {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spf: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spf_helo: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arc: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dmarc: Option<u64>,
}

impl StaleUse {
    pub fn is_empty(&self) -> bool {
        *self == StaleUse::default()
    }
}

/// Every authentication result for one message.
#[derive(Debug, Clone, Serialize)]
pub struct AuthReport {
    pub spf: SpfPair,
    pub dkim: Vec<DkimCheck>,
    pub arc: ArcCheck,
    pub dmarc: DmarcCheck,
    pub work: WorkCounts,
    #[serde(skip_serializing_if = "StaleUse::is_empty")]
    pub stale: StaleUse,
}

impl AuthReport {
    /// Whether a check that could change the outcome did not finish for a temporary
    /// reason (DNS): the policy's `temperror` condition.
    ///
    /// Once DMARC reached `pass` or `fail`, nothing else can change it: a temporary error
    /// of an identifier that could align already makes DMARC itself `temperror` (see
    /// [`dmarc`]). So a DKIM signature of an attacker's own domain whose key lookup
    /// times out cannot turn a DMARC reject into a deferral. Without a DMARC verdict
    /// (no record, no From domain), any temporary error counts, as before.
    pub fn any_temperror(&self) -> bool {
        match self.dmarc.result {
            AuthResult::TempError => true,
            AuthResult::Pass | AuthResult::Fail => false,
            _ => {
                self.spf.mail_from.result == AuthResult::TempError
                    || self.dkim.iter().any(|d| d.result == AuthResult::TempError)
                    || self.arc.result == AuthResult::TempError
            }
        }
    }

    /// Whether a result that counts for the verdict (SPF of MAIL FROM, DKIM, ARC, DMARC)
    /// rests on a stale DNS answer: the policy's `stale` condition. HELO's SPF is left
    /// out, as it is from `temperror`: no rule of the built-in policy reads it.
    pub fn any_stale(&self) -> bool {
        self.stale.spf.is_some()
            || self.stale.arc.is_some()
            || self.stale.dmarc.is_some()
            || self.dkim.iter().any(|d| d.stale_secs.is_some())
    }

    /// One DKIM word for the message: pass if any signature passed, else fail if any
    /// failed, else the first other result, else none.
    pub fn dkim_aggregate(&self) -> AuthResult {
        if self.dkim.iter().any(|d| d.result == AuthResult::Pass) {
            AuthResult::Pass
        } else if self.dkim.iter().any(|d| d.result == AuthResult::Fail) {
            AuthResult::Fail
        } else {
            self.dkim.first().map_or(AuthResult::None, |d| d.result)
        }
    }
}

/// What verification needs from the SMTP session.
pub struct VerifyInput<'a> {
    pub ip: IpAddr,
    pub helo: &'a str,
    /// MAIL FROM address, "" for the null sender.
    pub mail_from: &'a str,
    pub message: &'a [u8],
    /// The one From domain header sanity found (`src/policy/sanity.rs`): the domain DMARC
    /// evaluates. `None` when the header has no single author domain.
    pub author_domain: Option<&'a str>,
}

/// Runs the checks. Cheap to share: one per process.
pub struct Verifier {
    authenticator: MessageAuthenticator,
    /// The one lookup path of our own checks (failover, serve-stale): [`dns::DnsClient`].
    dns: dns::DnsClient,
    /// mail-auth's parsed TXT records (DKIM keys, DMARC records) and the A records of its
    /// RFC 8020 check: the only caches `verify_dkim`, `verify_arc` and `verify_dmarc`
    /// consult (mail-auth 0.13: they look up no MX, AAAA or PTR records).
    txt_cache: TxtCache,
    ipv4_cache: TtlCache<Box<str>, RecordSet<Ipv4Addr>>,
    spf_cache: spf::SpfCache,
    /// What is published at `_dmarc` names, parsed (see [`dmarc`]).
    dmarc_cache: std::sync::Arc<dmarc::DmarcCache>,
    /// `[auth] trusted_arc_sealers`.
    trusted_arc_sealers: Vec<String>,
    /// Our DKIM key records ([`dkim::KeyCache`]).
    key_cache: dkim::KeyCache,
    /// Our host name, the `%{r}` SPF macro.
    hostname: String,
    time_budget: Duration,
    spf_time_budget: Duration,
    max_signatures: usize,
    arc_max_sets: usize,
    max_dns_lookups: u32,
}

impl Verifier {
    /// The caches hold at most `[dns] cache_entries` entries each: the resolver's cache
    /// size, which [`dns::authenticator`] sets from it.
    pub fn new(
        authenticator: MessageAuthenticator,
        dns: dns::DnsClient,
        hostname: &str,
        cfg: &AuthConfig,
    ) -> Verifier {
        let entries = usize::try_from(authenticator.0.options().cache_size).unwrap_or(usize::MAX);
        Verifier {
            authenticator,
            dns,
            txt_cache: TxtCache::new(entries),
            ipv4_cache: TtlCache::new(entries),
            spf_cache: spf::SpfCache::new(entries),
            dmarc_cache: std::sync::Arc::new(dmarc::DmarcCache::new(entries)),
            trusted_arc_sealers: cfg.trusted_arc_sealers.clone(),
            key_cache: dkim::KeyCache::new(entries),
            hostname: hostname.to_string(),
            time_budget: cfg.time_budget,
            spf_time_budget: cfg.spf_time_budget,
            max_signatures: cfg.dkim_max_signatures,
            arc_max_sets: cfg.arc_max_sets,
            max_dns_lookups: cfg.max_dns_lookups,
        }
    }

    /// SPF for the MAIL FROM identity alone (the early-reject option at MAIL FROM).
    /// Not counted against a message's DNS lookups: there is no message yet.
    pub async fn spf_mail_from(&self, ip: IpAddr, helo: &str, mail_from: &str) -> SpfCheck {
        let deadline = Instant::now() + self.spf_time_budget.min(self.time_budget);
        self.spf(ip, helo, mail_from, deadline, None, &StaleMark::default())
            .await
    }

    /// The DNS client every check of this verifier uses.
    pub fn dns(&self) -> &dns::DnsClient {
        &self.dns
    }

    pub async fn verify(&self, input: &VerifyInput<'_>) -> AuthReport {
        let deadline = Instant::now() + self.time_budget;
        let spf_deadline = Instant::now() + self.spf_time_budget.min(self.time_budget);
        // Shared with the DMARC discovery task, which runs on its own.
        let budget = std::sync::Arc::new(DnsBudget::new(self.max_dns_lookups));
        let (spf_stale, helo_stale) = (StaleMark::default(), StaleMark::default());
        let (mail_from, helo) = tokio::join!(
            self.spf(
                input.ip,
                input.helo,
                input.mail_from,
                spf_deadline,
                Some(&budget),
                &spf_stale,
            ),
            self.spf_helo(
                input.ip,
                input.helo,
                spf_deadline,
                Some(&budget),
                &helo_stale
            ),
        );
        let mut stale = StaleUse {
            spf: spf_stale.age_secs(),
            spf_helo: helo_stale.age_secs(),
            ..StaleUse::default()
        };
        let Some(message) = AuthenticatedMessage::parse(input.message) else {
            // Not parseable as a message at all: nothing to verify beyond the envelope.
            return AuthReport {
                spf: SpfPair { mail_from, helo },
                dkim: Vec::new(),
                arc: ArcCheck::none(AuthResult::None),
                dmarc: DmarcCheck::without_record(AuthResult::PermError, String::new()),
                work: WorkCounts::of(&budget, 0),
                stale,
            };
        };
        let header_from = match input.author_domain {
            Some(d) => d.to_string(),
            None => message
                .from()
                .rsplit_once('@')
                .map(|(_, d)| d.to_ascii_lowercase())
                .unwrap_or_default(),
        };

        // DMARC policy discovery needs nothing from DKIM or ARC: it is polled beside them
        // (one task, no spawn: a task per message cost more than the whole of DMARC), so
        // that signatures whose key lookups eat the time budget cannot leave DMARC
        // without its record (and a spoof with a temperror instead of a fail). Past the
        // deadline `within` gives up on it; `decide` keeps to the deadline itself.
        let dmarc_dns = dmarc::Dns {
            resolver: self.dns.clone(),
            stale: std::sync::Arc::default(),
            cache: std::sync::Arc::clone(&self.dmarc_cache),
            budget: Some(std::sync::Arc::clone(&budget)),
        };
        let signatures = async {
            let dkim = dkim::verify(
                &dkim::Context {
                    dns: &self.dns,
                    keys: &self.key_cache,
                    budget: &budget,
                    deadline,
                    max_signatures: self.max_signatures,
                },
                &message,
            )
            .await;
            let arc_stale = StaleMark::default();
            let arc = self.arc(&message, &budget, deadline, &arc_stale).await;
            (dkim, (arc, arc_stale.age_secs()))
        };
        // Polled in this order: DKIM's first key lookup comes before DMARC's first
        // record lookup, so a message over its DNS budget loses DMARC, not its signature.
        let ((dkim, ((mut arc, arc_latest, arc_sets), arc_stale)), found) = tokio::join!(
            signatures,
            within(deadline, dmarc::discover(&dmarc_dns, &header_from)),
        );
        // DMARC aligns with the SPF result of the MAIL FROM identity (HELO's for <>).
        let input = dmarc::DmarcInput {
            spf: &mail_from,
            dkim: &dkim,
            arc: arc_latest.as_ref(),
            trusted_sealers: &self.trusted_arc_sealers,
        };
        let mut dmarc = match found {
            Some(found) => {
                let out = dmarc::decide(&dmarc_dns, found, &input, Some(deadline)).await;
                arc.vouching_sealer = out.vouching_sealer;
                out.check
            }
            None => DmarcCheck::without_record(AuthResult::TempError, header_from),
        };
        // DMARC's lookups were refused past `[auth] max_dns_lookups` (they run beside DKIM
        // and ARC, so the refusal shows as a failed lookup): permanent for this message.
        if dmarc.result == AuthResult::TempError && budget.refused() > 0 {
            dmarc.result = AuthResult::PermError;
            dmarc.reason = Some("DNS lookup limit per message reached".into());
        }
        stale.dmarc = dmarc_dns.stale.age_secs();
        // Only a chain that got as far as a result rests on its keys.
        if arc.result != AuthResult::None {
            stale.arc = arc_stale;
        }
        AuthReport {
            spf: SpfPair { mail_from, helo },
            dkim,
            arc,
            dmarc,
            work: WorkCounts::of(&budget, arc_sets),
            stale,
        }
    }

    /// ARC (RFC 8617) within the deadline, with the ARC-set cap: a chain of more sets
    /// than `[auth] arc_max_sets` is `permerror` without any lookup. Also returns how
    /// many sets the message carries.
    async fn arc(
        &self,
        message: &AuthenticatedMessage<'_>,
        budget: &DnsBudget,
        deadline: Instant,
        stale: &StaleMark,
    ) -> (ArcCheck, Option<arc::ArcLatest>, usize) {
        let sets = arc_set_count(message);
        if sets > self.arc_max_sets {
            return (ArcCheck::none(AuthResult::PermError), None, sets);
        }
        let refused_before = budget.refused();
        let prefetched =
            arc_keys::prefetch(&self.dns, message, &self.txt_cache, budget, deadline, stale).await;
        let txt = MessageTxt {
            shared: &self.txt_cache,
            budget,
            prefetched: Some(&prefetched),
        };
        let ipv4 = MessageIpv4 {
            shared: &self.ipv4_cache,
            budget,
        };
        let out = within(
            deadline,
            self.authenticator.verify_arc(
                Parameters::new(message)
                    .with_txt_cache(&txt)
                    .with_ipv4_cache(&ipv4),
            ),
        )
        .await;
        match out {
            Some(_) if budget.refused() > refused_before => {
                (ArcCheck::none(AuthResult::PermError), None, sets)
            }
            Some(out) => {
                let (check, latest) = arc::check(&out);
                (check, latest, sets)
            }
            None => (ArcCheck::none(AuthResult::TempError), None, sets),
        }
    }

    /// SPF for MAIL FROM; for the null sender, postmaster@HELO (RFC 7208 §2.4).
    async fn spf(
        &self,
        ip: IpAddr,
        helo: &str,
        mail_from: &str,
        deadline: Instant,
        budget: Option<&DnsBudget>,
        stale: &StaleMark,
    ) -> SpfCheck {
        let domain = match mail_from.rsplit_once('@') {
            Some((_, d)) => d.to_ascii_lowercase(),
            None => helo.to_ascii_lowercase(),
        };
        if mail_from.is_empty() {
            return self.spf_helo(ip, helo, deadline, budget, stale).await;
        }
        // check_host() itself gives `none` for a domain that is not a valid domain name (RFC 7208 §4.3).
        self.check_host(ip, domain, mail_from, helo, deadline, budget, stale)
            .await
    }

    /// SPF for the HELO identity. A HELO that is not a domain name (an address literal,
    /// a bare word) has no SPF record to look up: `none` (RFC 7208 §2.3).
    async fn spf_helo(
        &self,
        ip: IpAddr,
        helo: &str,
        deadline: Instant,
        budget: Option<&DnsBudget>,
        stale: &StaleMark,
    ) -> SpfCheck {
        let domain = helo.to_ascii_lowercase();
        if !looks_like_domain(&domain) {
            return SpfCheck {
                result: AuthResult::None,
                domain,
            };
        }
        let sender = format!("postmaster@{helo}");
        self.check_host(ip, domain, &sender, helo, deadline, budget, stale)
            .await
    }

    /// One SPF evaluation within `deadline`; running out of time is `temperror`.
    #[allow(clippy::too_many_arguments)]
    async fn check_host(
        &self,
        ip: IpAddr,
        domain: String,
        sender: &str,
        helo: &str,
        deadline: Instant,
        budget: Option<&DnsBudget>,
        stale: &StaleMark,
    ) -> SpfCheck {
        let req = spf::SpfRequest {
            ip,
            domain: &domain,
            sender,
            helo,
            receiver: &self.hostname,
            budget,
        };
        let result = within(
            deadline,
            spf::check_host_marked(&self.dns, &self.spf_cache, &req, stale),
        )
        .await
        .unwrap_or(AuthResult::TempError);
        SpfCheck { result, domain }
    }
}

/// Runs `fut` until `deadline`; `None` when time ran out.
async fn within<F: std::future::Future>(deadline: Instant, fut: F) -> Option<F::Output> {
    tokio::time::timeout_at(deadline, fut).await.ok()
}

/// ARC sets a message carries: its most numerous kind of ARC header field, counted
/// before parsing (a malformed field still counts).
fn arc_set_count(message: &AuthenticatedMessage<'_>) -> usize {
    [
        "ARC-Seal",
        "ARC-Message-Signature",
        "ARC-Authentication-Results",
    ]
    .iter()
    .map(|kind| {
        message
            .headers
            .iter()
            .filter(|(name, _)| name.trim_ascii().eq_ignore_ascii_case(kind.as_bytes()))
            .count()
    })
    .max()
    .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(dmarc: AuthResult, dkim: AuthResult, spf: AuthResult) -> AuthReport {
        AuthReport {
            spf: SpfPair {
                mail_from: SpfCheck {
                    result: spf,
                    domain: "attacker.example".into(),
                },
                helo: SpfCheck {
                    result: AuthResult::None,
                    domain: String::new(),
                },
            },
            dkim: vec![DkimCheck {
                result: dkim,
                domain: "attacker.example".into(),
                selector: "s".into(),
                algorithm: "rsa-sha256".into(),
                reason: None,
                stale_secs: None,
            }],
            arc: ArcCheck::none(AuthResult::None),
            dmarc: DmarcCheck::without_record(dmarc, "bank.example".into()),
            work: WorkCounts::default(),
            stale: StaleUse::default(),
        }
    }

    #[test]
    fn temperror_only_when_it_could_change_the_outcome() {
        use AuthResult::*;
        // DMARC reached fail (or pass): an unrelated temperror changes nothing.
        assert!(!report(Fail, TempError, Pass).any_temperror());
        assert!(!report(Pass, TempError, TempError).any_temperror());
        assert!(report(TempError, Pass, Pass).any_temperror());
        // Without a DMARC verdict every check counts.
        assert!(report(None, TempError, Pass).any_temperror());
        assert!(report(None, Pass, TempError).any_temperror());
        assert!(!report(None, Pass, Pass).any_temperror());
    }
}
