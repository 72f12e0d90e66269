//! Sender authentication: SPF (MAIL FROM and HELO), DKIM, ARC and DMARC for one message,
//! each inside a time budget. DKIM and ARC signatures are verified by mail-auth; SPF
//! ([`spf`]) and DMARC ([`dmarc`]) are evaluated here, and so is what an ARC chain's
//! most recent set recorded ([`arc`]).
//!
//! [`Verifier::verify`] is the only way to build an [`AuthReport`]; the proxy and the
//! offline `check` command both go through it. Whatever DNS does, it returns within the
//! budget: a check that runs out of time is `temperror`, never a hang.
//!
//! Parsed DNS data is kept between messages, for its TTL and bounded by `[dns]
//! cache_entries` (see [`cache`]): mail-auth's DKIM keys and A records, and our SPF and
//! DMARC records.

pub mod arc;
pub mod cache;
pub mod dmarc;
pub mod dns;
pub mod headers;
pub mod spf;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use mail_auth::{
    AuthenticatedMessage, DkimOutput, DkimResult, MessageAuthenticator, Parameters, RecordSet,
    SpfResult,
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
        }
    }
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
    /// What is published at `_dmarc` names, parsed (see [`dmarc`]).
    dmarc_cache: std::sync::Arc<dmarc::DmarcCache>,
    /// `[auth] trusted_arc_sealers`.
    trusted_arc_sealers: Vec<String>,
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
            dmarc_cache: std::sync::Arc::new(dmarc::DmarcCache::new(entries)),
            trusted_arc_sealers: cfg.trusted_arc_sealers.clone(),
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
                arc: ArcCheck::none(AuthResult::None),
                dmarc: DmarcCheck::without_record(AuthResult::PermError, String::new()),
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

        // DMARC policy discovery needs nothing from DKIM or ARC: it runs beside them, so
        // that signatures whose key lookups eat the time budget cannot leave DMARC
        // without its record (and a spoof with a temperror instead of a fail).
        let dmarc_dns = dmarc::Dns {
            resolver: self.authenticator.0.clone(),
            cache: std::sync::Arc::clone(&self.dmarc_cache),
        };
        let mut discovery = AbortOnDrop(tokio::spawn({
            let (dns, from) = (dmarc_dns.clone(), header_from.clone());
            async move { dmarc::discover(&dns, &from).await }
        }));

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
        let (mut arc, arc_latest) = match &arc {
            Some(out) => arc::check(out),
            None => (ArcCheck::none(AuthResult::TempError), None),
        };
        // DMARC aligns with the SPF result of the MAIL FROM identity (HELO's for <>).
        let input = dmarc::DmarcInput {
            spf: &mail_from,
            dkim: &dkim,
            arc: arc_latest.as_ref(),
            trusted_sealers: &self.trusted_arc_sealers,
        };
        // Past the deadline `within` still polls once: a discovery that has finished is
        // used. `decide` keeps to the deadline itself (see there).
        let found = within(deadline, &mut discovery.0)
            .await
            .and_then(Result::ok);
        let dmarc = match found {
            Some(found) => {
                let out = dmarc::decide(&dmarc_dns, found, &input, Some(deadline)).await;
                arc.vouching_sealer = out.vouching_sealer;
                out.check
            }
            None => DmarcCheck::without_record(AuthResult::TempError, header_from),
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

/// A spawned task that is aborted when its handle goes (a message whose verification
/// ended or was dropped leaves no lookups behind).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
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
            }],
            arc: ArcCheck::none(AuthResult::None),
            dmarc: DmarcCheck::without_record(dmarc, "bank.example".into()),
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
