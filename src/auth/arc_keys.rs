//! ARC keys through our DNS path. mail-auth's `verify_arc` looks its keys up with its
//! own resolver, past our failover and serve-stale; but it asks the TXT cache it is given
//! first. So before it runs, the keys of every ARC-Seal and ARC-Message-Signature are
//! fetched here with [`DnsClient::lookup`] and parsed as mail-auth would
//! (`DomainKey::parse` of each TXT record, the first that parses): fresh answers go to
//! the shared TXT cache for their TTL (as mail-auth would have put them), and every
//! answer, stale ones included, to a per-message overlay that [`super::budget::MessageTxt`]
//! consults first. A stale key is used only for this message and marks the ARC result
//! stale. A lookup that fails with nothing known leaves the name to mail-auth, which
//! queries (and fails) as before: temperror.

use std::collections::HashMap;
use std::sync::Arc;

use hickory_resolver::proto::rr::{Name, RData, RecordType};
use mail_auth::common::parse::TxtRecordParser;
use mail_auth::common::verify::{DomainKey, VerifySignature};
use mail_auth::{AuthenticatedMessage, Txt};
use tokio::time::Instant;

use super::budget::DnsBudget;
use super::cache::TxtCache;
use super::dns::DnsClient;
use super::stale::StaleMark;

/// Keys fetched for one message, by the name mail-auth asks for (`s._domainkey.d.`,
/// lowercase).
#[derive(Default)]
pub struct Prefetched(pub HashMap<Box<str>, Txt>);

/// The key names of the message's ARC sets, as mail-auth will ask for them.
fn key_names(message: &AuthenticatedMessage<'_>) -> Vec<String> {
    let mut names: Vec<String> = message
        .as_headers
        .iter()
        .map(|h| h.header.domain_key())
        .chain(message.ams_headers.iter().map(|h| h.header.domain_key()))
        .map(|n| n.to_ascii_lowercase())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Fetches the ARC keys of `message` (see the module documentation). Lookups count
/// against the message's budget; none is made past it or past `deadline`.
pub async fn prefetch(
    dns: &DnsClient,
    message: &AuthenticatedMessage<'_>,
    shared: &TxtCache,
    budget: &DnsBudget,
    deadline: Instant,
    stale: &StaleMark,
) -> Prefetched {
    use mail_auth::ResolverCache;
    let mut out = Prefetched::default();
    for name in key_names(message) {
        if shared.get(name.as_str()).is_some() || Instant::now() >= deadline {
            continue;
        }
        let Ok(qname) = Name::from_ascii(&name) else {
            continue;
        };
        if !budget.take() {
            break;
        }
        let lookup = tokio::time::timeout_at(deadline, dns.lookup(qname, RecordType::TXT));
        let Ok(Ok(answer)) = lookup.await else {
            continue;
        };
        stale.note(answer.stale_age);
        let txt = parse_key(&answer.records);
        if let Some(until) = answer.valid_until {
            shared.insert(name.clone().into_boxed_str(), txt.clone(), until);
        }
        out.0.insert(name.into_boxed_str(), txt);
    }
    out
}

/// The key as mail-auth's `txt_lookup::<DomainKey>` would have made it: the first TXT
/// record that parses, else the last error (none at all: "invalid record type").
fn parse_key(records: &Arc<[RData]>) -> Txt {
    let mut result: mail_auth::Result<DomainKey> = Err(mail_auth::Error::Dns(
        mail_auth::DnsError::InvalidRecordType,
    ));
    for r in records.iter() {
        let RData::TXT(txt) = r else { continue };
        let text: Vec<u8> = txt.txt_data.iter().flatten().copied().collect();
        result = DomainKey::parse(&text);
        if result.is_ok() {
            break;
        }
    }
    result.into()
}
