//! Sender authentication: SPF (MAIL FROM and HELO), DKIM, ARC and DMARC for one message,
//! through mail-auth, each inside a time budget.
//!
//! [`Verifier::verify`] is the only way to build an [`AuthReport`]; the proxy and the
//! offline `check` command both go through it. Whatever DNS does, it returns within the
//! budget: a check that runs out of time is `temperror`, never a hang.
//!
//! Parsed DNS data is kept between messages, for its TTL and bounded by `[dns]
//! cache_entries` (see [`cache`]): mail-auth's DKIM keys, DMARC records and A records,
//! and our SPF records.

pub mod cache;
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

/// Every authentication result for one message.
#[derive(Debug, Clone, Serialize)]
pub struct AuthReport {
    pub spf: SpfPair,
    pub dkim: Vec<DkimCheck>,
    pub arc: ArcCheck,
    pub dmarc: DmarcCheck,
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
    /// The one From domain header sanity found (`src/policy/sanity.rs`): the domain DMARC
    /// evaluates. `None` when the header has no single author domain.
    pub author_domain: Option<&'a str>,
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
    /// Our host name, the `%{r}` SPF macro.
    hostname: String,
    time_budget: Duration,
    spf_time_budget: Duration,
    max_signatures: usize,
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
            hostname: hostname.to_string(),
            time_budget: cfg.time_budget,
            spf_time_budget: cfg.spf_time_budget,
            max_signatures: cfg.dkim_max_signatures,
        }
    }

    /// SPF for the MAIL FROM identity alone (the early-reject option at MAIL FROM).
    pub async fn spf_mail_from(&self, ip: IpAddr, helo: &str, mail_from: &str) -> SpfCheck {
        let deadline = Instant::now() + self.spf_time_budget.min(self.time_budget);
        self.spf(ip, helo, mail_from, deadline).await
    }

    pub async fn verify(&self, input: &VerifyInput<'_>) -> AuthReport {
        let deadline = Instant::now() + self.time_budget;
        let spf_deadline = Instant::now() + self.spf_time_budget.min(self.time_budget);
        let (mail_from, helo) = tokio::join!(
            self.spf(input.ip, input.helo, input.mail_from, spf_deadline),
            self.spf_helo(input.ip, input.helo, spf_deadline),
        );
        let Some(mut message) = AuthenticatedMessage::parse(input.message) else {
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
            };
        };
        // Bounded work per message: signatures past the cap are not looked at.
        message.dkim_headers.truncate(self.max_signatures);
        let header_from = match input.author_domain {
            Some(d) => d.to_string(),
            None => message
                .from()
                .rsplit_once('@')
                .map(|(_, d)| d.to_ascii_lowercase())
                .unwrap_or_default(),
        };

        let dkim_outputs = within(
            deadline,
            self.authenticator.verify_dkim(
                Parameters::new(&message)
                    .with_txt_cache(&self.txt_cache)
                    .with_ipv4_cache(&self.ipv4_cache),
            ),
        )
        .await;
        let dkim_outputs: Option<Vec<DkimOutput<'_>>> =
            dkim_outputs.map(|v| v.into_iter().map(|o| refuse_sha1(o, &message)).collect());
        let arc = within(
            deadline,
            self.authenticator.verify_arc(
                Parameters::new(&message)
                    .with_txt_cache(&self.txt_cache)
                    .with_ipv4_cache(&self.ipv4_cache),
            ),
        )
        .await;

        // DMARC aligns with the SPF result of the MAIL FROM identity (HELO's for <>).
        let spf_domain = mail_from.domain.clone();
        let spf_for_dmarc = mail_auth::SpfOutput::new(spf_domain.clone())
            .with_result(to_spf_result(mail_from.result));
        let dkim_slice: &[DkimOutput<'_>] = dkim_outputs.as_deref().unwrap_or(&[]);
        let dmarc = within(
            deadline,
            self.authenticator.verify_dmarc(
                Parameters::new(mail_auth::dmarc::verify::DmarcParameters::new(
                    &message,
                    dkim_slice,
                    &spf_domain,
                    &spf_for_dmarc,
                ))
                .with_txt_cache(&self.txt_cache)
                .with_ipv4_cache(&self.ipv4_cache),
            ),
        )
        .await;

        let dkim: Vec<DkimCheck> = match &dkim_outputs {
            Some(outputs) => outputs.iter().map(dkim_check).collect(),
            None => message
                .dkim_headers
                .iter()
                .map(|h| DkimCheck {
                    result: AuthResult::TempError,
                    domain: h.header.d.clone(),
                    selector: h.header.s.clone(),
                    algorithm: algorithm_name(h.header.a).into(),
                    reason: Some("time budget exhausted".into()),
                })
                .collect(),
        };
        // mail-auth reports DKIM-Signature fields it could not parse only when the error
        // is a DKIM one; a signature missing b=, bh= or d= would vanish and the message
        // look unsigned. Each is a permerror (RFC 6376 §6.1.1).
        let mut dkim = dkim;
        for bad in message.errors.iter().filter(|h| {
            h.name.eq_ignore_ascii_case(b"DKIM-Signature")
                && !matches!(h.header, mail_auth::Error::Dkim(_))
        }) {
            dkim.push(DkimCheck {
                result: AuthResult::PermError,
                domain: String::new(),
                selector: String::new(),
                algorithm: String::new(),
                reason: Some(format!("malformed signature: {}", bad.header)),
            });
        }
        let arc = match arc {
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
            None => ArcCheck {
                result: AuthResult::TempError,
                sealers: Vec::new(),
            },
        };
        let dkim_timed_out = dkim_outputs.is_none();
        let dmarc = match dmarc {
            Some(out) => {
                let mut result = AuthResult::from(&out.result());
                // A verdict reached without DKIM (it ran out of time) or with a
                // temporary SPF error is not a real fail.
                if result == AuthResult::Fail
                    && (dkim_timed_out
                        || mail_from.result == AuthResult::TempError
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
        }
    }

    /// SPF for MAIL FROM; for the null sender, postmaster@HELO (RFC 7208 §2.4).
    async fn spf(&self, ip: IpAddr, helo: &str, mail_from: &str, deadline: Instant) -> SpfCheck {
        let domain = match mail_from.rsplit_once('@') {
            Some((_, d)) => d.to_ascii_lowercase(),
            None => helo.to_ascii_lowercase(),
        };
        if mail_from.is_empty() {
            return self.spf_helo(ip, helo, deadline).await;
        }
        // check_host() itself gives `none` for a domain that is not a valid domain name (RFC 7208 §4.3).
        self.check_host(ip, domain, mail_from, helo, deadline).await
    }

    /// SPF for the HELO identity. A HELO that is not a domain name (an address literal,
    /// a bare word) has no SPF record to look up: `none` (RFC 7208 §2.3).
    async fn spf_helo(&self, ip: IpAddr, helo: &str, deadline: Instant) -> SpfCheck {
        let domain = helo.to_ascii_lowercase();
        if !looks_like_domain(&domain) {
            return SpfCheck {
                result: AuthResult::None,
                domain,
            };
        }
        let sender = format!("postmaster@{helo}");
        self.check_host(ip, domain, &sender, helo, deadline).await
    }

    /// One SPF evaluation within `deadline`; running out of time is `temperror`.
    async fn check_host(
        &self,
        ip: IpAddr,
        domain: String,
        sender: &str,
        helo: &str,
        deadline: Instant,
    ) -> SpfCheck {
        let req = spf::SpfRequest {
            ip,
            domain: &domain,
            sender,
            helo,
            receiver: &self.hostname,
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

/// RFC 8301 §3.1: verifiers must not consider rsa-sha1 signatures valid. mail-auth
/// still passes them, so a passing rsa-sha1 result becomes a fail here, before DMARC
/// sees it.
fn refuse_sha1<'x>(out: DkimOutput<'x>, message: &'x AuthenticatedMessage<'x>) -> DkimOutput<'x> {
    use mail_auth::common::crypto::Algorithm;
    let Some(sig) = out.signature() else {
        return out;
    };
    if sig.a != Algorithm::RsaSha1 || !matches!(out.result(), DkimResult::Pass) {
        return out;
    }
    let insecure = mail_auth::Error::Dkim(mail_auth::dkim::DkimError::UnsupportedAlgorithm);
    // Find the same signature with the message's lifetime to keep it in the output.
    match message
        .dkim_headers
        .iter()
        .find(|h| std::ptr::eq(&h.header, sig))
    {
        Some(h) => DkimOutput::fail(insecure).with_signature(&h.header),
        None => DkimOutput::fail(insecure),
    }
}

fn dkim_check(out: &DkimOutput<'_>) -> DkimCheck {
    let (domain, selector, algorithm) = match out.signature() {
        Some(sig) => (
            sig.d.to_ascii_lowercase(),
            sig.s.clone(),
            algorithm_name(sig.a).to_string(),
        ),
        None => (String::new(), String::new(), String::new()),
    };
    let reason = match out.result() {
        DkimResult::Pass | DkimResult::None => None,
        DkimResult::Neutral(e)
        | DkimResult::Fail(e)
        | DkimResult::PermError(e)
        | DkimResult::TempError(e) => Some(e.to_string()),
    };
    DkimCheck {
        result: out.result().into(),
        domain,
        selector,
        algorithm,
        reason,
    }
}

fn algorithm_name(a: mail_auth::common::crypto::Algorithm) -> &'static str {
    use mail_auth::common::crypto::Algorithm;
    match a {
        Algorithm::RsaSha1 => "rsa-sha1",
        Algorithm::RsaSha256 => "rsa-sha256",
        Algorithm::Ed25519Sha256 => "ed25519-sha256",
    }
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
