//! Sender authentication: SPF (MAIL FROM and HELO, [`spf`]), DKIM ([`dkim`]), ARC and
//! DMARC (mail-auth) for one message, each inside a time budget, and all together within
//! a DNS lookup budget ([`budget`]).
//!
//! [`Verifier::verify`] is the only way to build an [`AuthReport`]; the proxy and the
//! offline `check` command both go through it. Whatever DNS does, it returns within the
//! budget: a check that runs out of time is `temperror`, never a hang.
//!
//! Parsed DNS data is kept between messages, for its TTL and bounded by `[dns]
//! cache_entries` (see [`cache`]): mail-auth's DMARC records, ARC keys and A records, and
//! our SPF and DKIM key records.

pub mod budget;
pub mod cache;
pub mod dkim;
pub mod dns;
pub mod headers;
pub mod spf;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use mail_auth::dmarc::Policy as DmarcRecordPolicy;
use mail_auth::{
    AuthenticatedMessage, DkimOutput, DkimResult, DmarcResult, MessageAuthenticator, Parameters,
    RecordSet, SpfResult,
};
use serde::Serialize;
use tokio::time::Instant;

use crate::config::AuthConfig;

use budget::{DnsBudget, MessageIpv4, MessageTxt};
use cache::{TtlCache, TxtCache};

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

impl From<&DmarcResult> for AuthResult {
    fn from(r: &DmarcResult) -> Self {
        match r {
            DmarcResult::Pass => AuthResult::Pass,
            DmarcResult::Fail(_) => AuthResult::Fail,
            DmarcResult::TempError(_) => AuthResult::TempError,
            DmarcResult::PermError(_) => AuthResult::PermError,
            DmarcResult::None => AuthResult::None,
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
}

#[derive(Debug, Clone, Serialize)]
pub struct ArcCheck {
    pub result: AuthResult,
    /// Domains that sealed the chain (outermost first), when it validated.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sealers: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DmarcCheck {
    pub result: AuthResult,
    /// The published policy that applies (`sp`/`np` already resolved by mail-auth), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<&'static str>,
    pub header_from: String,
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

/// Every authentication result for one message.
#[derive(Debug, Clone, Serialize)]
pub struct AuthReport {
    pub spf: SpfPair,
    pub dkim: Vec<DkimCheck>,
    pub arc: ArcCheck,
    pub dmarc: DmarcCheck,
    pub work: WorkCounts,
}

impl AuthReport {
    /// Whether any check could not finish for a temporary reason (DNS).
    pub fn any_temperror(&self) -> bool {
        self.spf.mail_from.result == AuthResult::TempError
            || self.dkim.iter().any(|d| d.result == AuthResult::TempError)
            || self.arc.result == AuthResult::TempError
            || self.dmarc.result == AuthResult::TempError
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
}

/// Runs the checks. Cheap to share: one per process.
pub struct Verifier {
    authenticator: MessageAuthenticator,
    /// mail-auth's parsed TXT records (DKIM keys, DMARC records) and the A records of its
    /// RFC 8020 check: the only caches `verify_dkim`, `verify_arc` and `verify_dmarc`
    /// consult (mail-auth 0.13: they look up no MX, AAAA or PTR records).
    txt_cache: TxtCache,
    ipv4_cache: TtlCache<Box<str>, RecordSet<Ipv4Addr>>,
    spf_cache: spf::SpfCache,
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
    pub fn new(authenticator: MessageAuthenticator, hostname: &str, cfg: &AuthConfig) -> Verifier {
        let entries = usize::try_from(authenticator.0.options().cache_size).unwrap_or(usize::MAX);
        Verifier {
            authenticator,
            txt_cache: TxtCache::new(entries),
            ipv4_cache: TtlCache::new(entries),
            spf_cache: spf::SpfCache::new(entries),
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
        self.spf(ip, helo, mail_from, deadline, None).await
    }

    pub async fn verify(&self, input: &VerifyInput<'_>) -> AuthReport {
        let deadline = Instant::now() + self.time_budget;
        let spf_deadline = Instant::now() + self.spf_time_budget.min(self.time_budget);
        let budget = DnsBudget::new(self.max_dns_lookups);
        let (mail_from, helo) = tokio::join!(
            self.spf(
                input.ip,
                input.helo,
                input.mail_from,
                spf_deadline,
                Some(&budget)
            ),
            self.spf_helo(input.ip, input.helo, spf_deadline, Some(&budget)),
        );
        let Some(message) = AuthenticatedMessage::parse(input.message) else {
            // Not parseable as a message at all: nothing to verify beyond the envelope.
            return AuthReport {
                spf: SpfPair { mail_from, helo },
                dkim: Vec::new(),
                arc: ArcCheck {
                    result: AuthResult::None,
                    sealers: Vec::new(),
                },
                dmarc: DmarcCheck {
                    result: AuthResult::PermError,
                    policy: None,
                    header_from: String::new(),
                },
                work: WorkCounts::of(&budget, 0),
            };
        };
        let header_from = message
            .from()
            .rsplit_once('@')
            .map(|(_, d)| d.to_ascii_lowercase())
            .unwrap_or_default();

        let dkim = dkim::verify(
            &dkim::Context {
                resolver: &self.authenticator.0,
                keys: &self.key_cache,
                budget: &budget,
                deadline,
                max_signatures: self.max_signatures,
            },
            &message,
        )
        .await;
        let (arc, arc_sets) = self.arc(&message, &budget, deadline).await;

        // DMARC aligns with the SPF result of the MAIL FROM identity (HELO's for <>),
        // and with our DKIM results: mail-auth's DMARC gets them as outputs that pass
        // exactly where ours pass (policy, permerror, a refused rsa-sha1 never do).
        let spf_domain = mail_from.domain.clone();
        let spf_for_dmarc = mail_auth::SpfOutput::new(spf_domain.clone())
            .with_result(to_spf_result(mail_from.result));
        let dkim_signatures = dmarc_signatures(&dkim);
        let dkim_outputs = dmarc_outputs(&dkim, &dkim_signatures);
        let refused_before = budget.refused();
        let dmarc = within(
            deadline,
            self.authenticator.verify_dmarc(
                Parameters::new(mail_auth::dmarc::verify::DmarcParameters::new(
                    &message,
                    &dkim_outputs,
                    &spf_domain,
                    &spf_for_dmarc,
                ))
                .with_txt_cache(&MessageTxt {
                    shared: &self.txt_cache,
                    budget: &budget,
                })
                .with_ipv4_cache(&MessageIpv4 {
                    shared: &self.ipv4_cache,
                    budget: &budget,
                }),
            ),
        )
        .await;
        let dmarc_over_limit = budget.refused() > refused_before;

        let dmarc = match dmarc {
            Some(_) if dmarc_over_limit => DmarcCheck {
                result: AuthResult::PermError,
                policy: None,
                header_from,
            },
            Some(out) => {
                let mut result = AuthResult::from(&out.result());
                // A verdict reached with a temporary SPF or DKIM error is not a real
                // fail.
                if result == AuthResult::Fail
                    && (mail_from.result == AuthResult::TempError
                        || dkim
                            .iter()
                            .any(|d: &DkimCheck| d.result == AuthResult::TempError))
                {
                    result = AuthResult::TempError;
                }
                let has_record = out.dmarc_record().is_some();
                DmarcCheck {
                    result,
                    policy: has_record.then(|| policy_name(out.policy())),
                    header_from: if out.domain().is_empty() {
                        header_from
                    } else {
                        out.domain().to_string()
                    },
                }
            }
            None => DmarcCheck {
                result: AuthResult::TempError,
                policy: None,
                header_from,
            },
        };
        AuthReport {
            spf: SpfPair { mail_from, helo },
            dkim,
            arc,
            dmarc,
            work: WorkCounts::of(&budget, arc_sets),
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
    ) -> (ArcCheck, usize) {
        let sets = arc_set_count(message);
        let failed = |result| ArcCheck {
            result,
            sealers: Vec::new(),
        };
        if sets > self.arc_max_sets {
            return (failed(AuthResult::PermError), sets);
        }
        let refused_before = budget.refused();
        let txt = MessageTxt {
            shared: &self.txt_cache,
            budget,
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
        let check = match out {
            Some(_) if budget.refused() > refused_before => failed(AuthResult::PermError),
            Some(out) => ArcCheck {
                result: AuthResult::from(out.result()),
                sealers: if matches!(out.result(), DkimResult::Pass) {
                    out.sets()
                        .iter()
                        .rev()
                        .map(|s| s.seal.header.d.to_ascii_lowercase())
                        .collect()
                } else {
                    Vec::new()
                },
            },
            None => failed(AuthResult::TempError),
        };
        (check, sets)
    }

    /// SPF for MAIL FROM; for the null sender, postmaster@HELO (RFC 7208 §2.4).
    async fn spf(
        &self,
        ip: IpAddr,
        helo: &str,
        mail_from: &str,
        deadline: Instant,
        budget: Option<&DnsBudget>,
    ) -> SpfCheck {
        let domain = match mail_from.rsplit_once('@') {
            Some((_, d)) => d.to_ascii_lowercase(),
            None => helo.to_ascii_lowercase(),
        };
        if mail_from.is_empty() {
            return self.spf_helo(ip, helo, deadline, budget).await;
        }
        // check_host() itself gives `none` for a domain that is not a valid domain name (RFC 7208 §4.3).
        self.check_host(ip, domain, mail_from, helo, deadline, budget)
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
    ) -> SpfCheck {
        let domain = helo.to_ascii_lowercase();
        if !looks_like_domain(&domain) {
            return SpfCheck {
                result: AuthResult::None,
                domain,
            };
        }
        let sender = format!("postmaster@{helo}");
        self.check_host(ip, domain, &sender, helo, deadline, budget)
            .await
    }

    /// One SPF evaluation within `deadline`; running out of time is `temperror`.
    async fn check_host(
        &self,
        ip: IpAddr,
        domain: String,
        sender: &str,
        helo: &str,
        deadline: Instant,
        budget: Option<&DnsBudget>,
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
            spf::check_host(&self.authenticator.0, &self.spf_cache, &req),
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

/// Stand-in signatures for mail-auth's DMARC evaluation, one per DKIM result: it
/// reads only `d=` (and the result, see [`dmarc_outputs`]).
fn dmarc_signatures(dkim: &[DkimCheck]) -> Vec<mail_auth::dkim::Signature> {
    dkim.iter()
        .map(|c| mail_auth::dkim::Signature {
            d: c.domain.clone(),
            s: c.selector.clone(),
            ..Default::default()
        })
        .collect()
}

/// Our DKIM results as mail-auth outputs: pass only where ours is pass; temperror kept
/// (mail-auth's DMARC looks at it); everything else a fail.
fn dmarc_outputs<'x>(
    dkim: &[DkimCheck],
    signatures: &'x [mail_auth::dkim::Signature],
) -> Vec<DkimOutput<'x>> {
    dkim.iter()
        .zip(signatures)
        .map(|(c, sig)| {
            let out = match c.result {
                AuthResult::Pass => DkimOutput::pass(),
                AuthResult::TempError => DkimOutput::temp_err(mail_auth::Error::Dns(
                    mail_auth::DnsError::Resolver("DKIM key lookup".into()),
                )),
                _ => DkimOutput::fail(mail_auth::Error::NotAligned),
            };
            out.with_signature(sig)
        })
        .collect()
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

fn policy_name(p: DmarcRecordPolicy) -> &'static str {
    match p {
        DmarcRecordPolicy::Reject => "reject",
        DmarcRecordPolicy::Quarantine => "quarantine",
        DmarcRecordPolicy::None | DmarcRecordPolicy::Unspecified => "none",
    }
}

fn to_spf_result(r: AuthResult) -> SpfResult {
    match r {
        AuthResult::Pass => SpfResult::Pass,
        AuthResult::Fail => SpfResult::Fail,
        AuthResult::SoftFail => SpfResult::SoftFail,
        AuthResult::Neutral => SpfResult::Neutral,
        AuthResult::TempError => SpfResult::TempError,
        AuthResult::PermError => SpfResult::PermError,
        AuthResult::None | AuthResult::Policy => SpfResult::None,
    }
}

/// A syntactically plausible domain name: dotted labels of letters, digits, hyphens.
pub fn looks_like_domain(s: &str) -> bool {
    let s = s.trim_end_matches('.');
    s.contains('.')
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b >= 0x80)
        })
}
