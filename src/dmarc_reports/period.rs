//! The reporting cycle: close periods into reports, send what is due. The proxy runs
//! [`run`] in the background; `mailwarden dmarc reports send-now` calls [`close`] with
//! the current time as the period end and then [`send_due`] (the clock an operator, or a
//! test, controls).

use std::collections::BTreeMap;
use std::sync::Arc;

use hickory_resolver::TokioResolver;
use tokio_util::sync::CancellationToken;

use super::deliver::{self, Attempt, Sender};
use super::store::{NewReport, ReportState, ReportStore, STALE_SENDING, SqliteStore};
use super::xml::{self, Reporter};
use crate::config::Config;
use crate::config::dmarc_reports::DmarcReportsConfig;
use crate::relay::NextHop;

/// The end of the last complete period at `now`: a multiple of the interval since the
/// epoch (24 h: UTC midnight).
pub fn period_end(now: u64, interval: u64) -> u64 {
    let interval = interval.max(1);
    now - now % interval
}

/// A report id: unique (random part), and readable (domain-free, so it is safe in the
/// subject, the file name and a Message-ID).
fn report_id(end: u64) -> String {
    format!("{end}.{:016x}", rand::random::<u64>())
}

/// Closes the period ending at `end` (if not closed yet): one report per reporting
/// domain, stored `pending`. Returns how many reports were built.
pub fn close(
    store: &mut dyn ReportStore,
    cfg: &DmarcReportsConfig,
    end: u64,
) -> Result<usize, String> {
    let seen = store.period_mark()?;
    if seen.is_some_and(|m| end <= m) {
        return Ok(0);
    }
    let mut by_domain: BTreeMap<String, Vec<super::Evaluation>> = BTreeMap::new();
    for e in store.evaluations_before(end)? {
        by_domain
            .entry(e.published.domain.clone())
            .or_default()
            .push(e);
    }
    let reporter = Reporter {
        org_name: &cfg.org_name,
        email: &cfg.email,
        extra_contact_info: &cfg.extra_contact_info,
    };
    let mut reports = Vec::new();
    for (domain, evs) in by_domain {
        // Recorded before an opt-out was added: dropped with the period.
        if cfg.opted_out(&domain) {
            continue;
        }
        // The domain goes into a Subject, a file name and SQL keys: a DNS name with
        // bytes outside letters, digits, `-`, `_` and `.` (possible in DNS, never in a
        // host name) gets no report rather than a header it could break.
        if !plain_domain(&domain) {
            tracing::warn!(domain = %domain.escape_debug(), "DMARC report skipped: not a plain domain name");
            continue;
        }
        let first = evs.iter().map(|e| e.at).min().unwrap_or(end);
        // A late row (queued before the last close, written after) widens the range
        // rather than being lost.
        let begin = seen.map_or(first, |m| m.min(first));
        let id = report_id(end);
        let Some(built) = xml::build(&reporter, &id, begin, end, &evs, cfg.max_records) else {
            continue;
        };
        let rua = evs
            .iter()
            .max_by_key(|e| e.at)
            .map(|e| e.published.rua.clone())
            .unwrap_or_default();
        reports.push(NewReport {
            id,
            domain,
            begin,
            end,
            rua,
            rows: built.rows,
            messages: built.messages,
            xml_gz: xml::gzip(built.xml.as_bytes()),
        });
    }
    if store.close_period(seen, end, &reports)? {
        for r in &reports {
            tracing::info!(report = %r.id, domain = %r.domain, messages = r.messages, rows = r.rows, begin = r.begin, end = r.end, "DMARC aggregate report built");
        }
        Ok(reports.len())
    } else {
        Ok(0)
    }
}

fn plain_domain(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= 253
        && d.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// What the sender needs besides the store.
pub struct Outbox {
    pub resolver: TokioResolver,
    pub hop: Arc<NextHop>,
    pub hostname: String,
}

impl Outbox {
    pub fn from_config(config: &Config) -> Result<Outbox, String> {
        let hops = crate::relay::NextHops::from_config(config)?;
        Ok(Outbox {
            resolver: crate::auth::dns::authenticator(&config.dns)?.0,
            // Reports are outbound mail: they leave the way submissions do.
            hop: hops.for_role("submission"),
            hostname: config.hostname.clone(),
        })
    }
}

/// Counts of one sending round.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    pub sent: usize,
    pub deferred: usize,
    pub failed: usize,
    pub undeliverable: usize,
}

fn count(outcome: &'static str) {
    crate::metrics::global()
        .dmarc_reports
        .get_or_create(&crate::metrics::label("outcome", outcome))
        .inc();
}

/// Sends every pending report whose next attempt is due at `due_by` (`now`, or later to
/// send retries early). Each is claimed (`pending → sending`) first, so a concurrent
/// sender skips it.
pub async fn send_due(
    store: &mut dyn ReportStore,
    cfg: &DmarcReportsConfig,
    outbox: &Outbox,
    now: u64,
    due_by: u64,
) -> Result<Round, String> {
    let sender = Sender {
        org_name: &cfg.org_name,
        email: &cfg.email,
        hostname: &outbox.hostname,
    };
    let mut round = Round::default();
    for r in store.due(due_by)? {
        if !store.transition(&r.id, ReportState::Pending, ReportState::Sending, now)? {
            continue;
        }
        let attempt = deliver::send(&outbox.resolver, outbox.hop.clone(), &sender, &r, now).await;
        let retry_at = now + cfg.retry_interval.as_secs();
        let last = r.attempts + 1 >= cfg.max_attempts;
        let (state, next, to, error) = match &attempt {
            Attempt::Sent(to) => (ReportState::Sent, 0, to.join(", "), String::new()),
            Attempt::Deferred(e) if !last => {
                (ReportState::Pending, retry_at, String::new(), e.clone())
            }
            Attempt::Deferred(e) | Attempt::Refused(e) => {
                (ReportState::Failed, 0, String::new(), e.clone())
            }
            Attempt::Undeliverable(e) => (ReportState::Undeliverable, 0, String::new(), e.clone()),
        };
        store.settle(&r.id, state, next, &to, &error, super::now())?;
        let outcome = match state {
            ReportState::Sent => {
                round.sent += 1;
                "sent"
            }
            ReportState::Pending => {
                round.deferred += 1;
                "deferred"
            }
            ReportState::Undeliverable => {
                round.undeliverable += 1;
                "undeliverable"
            }
            _ => {
                round.failed += 1;
                "failed"
            }
        };
        count(outcome);
        tracing::info!(report = %r.id, domain = %r.domain, outcome, to = %to, error = %error, "DMARC aggregate report");
    }
    Ok(round)
}

/// The proxy's reporting task: at each period end, close it and send; in between,
/// retry what is due. Store errors are logged and retried at the next tick.
pub async fn run(config: Arc<Config>, outbox: Outbox, shutdown: CancellationToken) {
    let cfg = &config.dmarc_reports;
    let interval = cfg.interval.as_secs().max(1);
    // Retries are looked at more often than periods end, but not busily.
    let tick =
        std::time::Duration::from_secs(interval.min(cfg.retry_interval.as_secs().max(1)).min(300));
    let mut store = match SqliteStore::open(&cfg.db) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "DMARC reports: store unavailable, no reports will be sent");
            return;
        }
    };
    loop {
        let now = super::now();
        let cycle = async {
            store.abandon_stale(now.saturating_sub(STALE_SENDING))?;
            close(&mut store, cfg, period_end(now, interval))?;
            send_due(&mut store, cfg, &outbox, now, now).await
        };
        if let Err(e) = cycle.await {
            tracing::error!(error = %e, "DMARC reports: cycle failed; retrying at the next tick");
        }
        let next_end = period_end(super::now(), interval) + interval;
        let until_end = next_end.saturating_sub(super::now());
        let wait = tick.min(std::time::Duration::from_secs(until_end.max(1)));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dmarc_reports::recorder::tests::sample;

    fn cfg() -> DmarcReportsConfig {
        DmarcReportsConfig {
            enabled: true,
            org_name: "Org".into(),
            email: "dmarc@mx.test".into(),
            opt_out: vec!["quiet.example".into()],
            ..Default::default()
        }
    }

    #[test]
    fn only_plain_domains_get_reports() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SqliteStore::open(&dir.path().join("r.sqlite")).unwrap();
        s.record(&[
            sample("ok.example"),
            sample("x.example\r\nBcc: v@x.test"),
            sample("a b.example"),
        ])
        .unwrap();
        assert_eq!(close(&mut s, &cfg(), 100).unwrap(), 1);
        assert_eq!(s.list().unwrap()[0].domain, "ok.example");
    }

    #[test]
    fn periods_align_to_the_interval() {
        assert_eq!(period_end(86_400 * 3 + 5, 86_400), 86_400 * 3);
        assert_eq!(period_end(59, 60), 0);
    }

    #[test]
    fn a_period_is_reported_once_per_domain_even_with_two_closers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.sqlite");
        let mut a = SqliteStore::open(&path).unwrap();
        let mut b = SqliteStore::open(&path).unwrap();
        let mut evs = vec![
            sample("a.example"),
            sample("a.example"),
            sample("b.example"),
            sample("quiet.example"),
        ];
        evs[1].at = 20;
        a.record(&evs).unwrap();
        assert_eq!(close(&mut a, &cfg(), 100).unwrap(), 2);
        // The second closer sees the mark moved: nothing more.
        assert_eq!(close(&mut b, &cfg(), 100).unwrap(), 0);
        assert_eq!(close(&mut b, &cfg(), 50).unwrap(), 0);
        let list = b.list().unwrap();
        assert_eq!(list.len(), 2);
        let ra = list.iter().find(|r| r.domain == "a.example").unwrap();
        assert_eq!(
            (ra.begin, ra.end, ra.messages, ra.state),
            (10, 100, 2, ReportState::Pending)
        );
        assert!(
            xml::gunzip(&ra.xml_gz)
                .unwrap()
                .contains("<domain>a.example</domain>")
        );
        // Evaluations of the closed period are gone; a later one goes to the next period.
        assert!(a.evaluations_before(100).unwrap().is_empty());
        let mut late = sample("a.example");
        late.at = 150;
        a.record(&[late]).unwrap();
        assert_eq!(close(&mut a, &cfg(), 200).unwrap(), 1);
        let next = a
            .list()
            .unwrap()
            .into_iter()
            .find(|r| r.end == 200)
            .unwrap();
        assert_eq!((next.begin, next.messages), (100, 1));
    }

    #[test]
    fn a_claimed_report_cannot_be_claimed_again_and_stale_claims_become_unsettled() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SqliteStore::open(&dir.path().join("r.sqlite")).unwrap();
        s.record(&[sample("a.example")]).unwrap();
        close(&mut s, &cfg(), 100).unwrap();
        let id = s.due(1000).unwrap()[0].id.clone();
        assert!(
            s.transition(&id, ReportState::Pending, ReportState::Sending, 1000)
                .unwrap()
        );
        assert!(
            !s.transition(&id, ReportState::Pending, ReportState::Sending, 1000)
                .unwrap()
        );
        assert!(s.due(1000).unwrap().is_empty());
        assert_eq!(s.abandon_stale(super::super::now() + 1).unwrap(), 1);
        assert_eq!(s.get(&id).unwrap().unwrap().state, ReportState::Unsettled);
        assert!(s.due(u64::MAX / 2).unwrap().is_empty());
    }
}
