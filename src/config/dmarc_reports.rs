//! `[dmarc_reports]`: DMARC aggregate reports (RFC 7489 §7.2) about the mail we received.
//! Off by default: sending reports tells other domains which IPs sent us mail in their
//! name, which a site must decide to do.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::duration;

/// One report per reporting domain per day (RFC 7489 §7.2: "at least daily"; RFC 9990
/// §2.1 asks for UTC day boundaries, which a 24 h period aligned to the epoch gives).
pub const DEFAULT_REPORT_INTERVAL: Duration = Duration::from_secs(86_400);
/// Evaluations waiting for the recording thread. Past it they are dropped (and
/// counted): recording must never slow down or fail a mail transaction.
pub const DEFAULT_REPORT_QUEUE: usize = 10_000;
/// Wait before sending a report again after the next hop deferred or was unreachable.
pub const DEFAULT_REPORT_RETRY_INTERVAL: Duration = Duration::from_secs(3_600);
/// Attempts before a report is given up (`failed`): about half a day at the default
/// retry interval, well inside the next period.
pub const DEFAULT_REPORT_MAX_ATTEMPTS: u32 = 12;
/// Largest report (XML before compression) we build; a domain with more distinct rows
/// gets the first rows and an `<error>` saying the rest was cut.
pub const DEFAULT_REPORT_MAX_RECORDS: usize = 10_000;

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DmarcReportsConfig {
    pub enabled: bool,
    /// Length of one reporting period; periods are aligned to multiples of it since
    /// the Unix epoch (24 h: UTC midnight to midnight).
    #[serde(with = "duration")]
    pub interval: Duration,
    /// `report_metadata/org_name`: who we are (required when enabled).
    pub org_name: String,
    /// `report_metadata/email`, and the From address of the report mails (required
    /// when enabled).
    pub email: String,
    /// `report_metadata/extra_contact_info` (a URL or text), left out when empty.
    pub extra_contact_info: String,
    /// The SQLite file of recorded evaluations and built reports.
    pub db: PathBuf,
    /// Reporting domains (the `_dmarc` record's domain) that never get a report,
    /// exact and case-insensitive; evaluations for them are not even recorded.
    pub opt_out: Vec<String>,
    /// Evaluations waiting to be written (see [`DEFAULT_REPORT_QUEUE`]).
    pub queue: usize,
    #[serde(with = "duration")]
    pub retry_interval: Duration,
    pub max_attempts: u32,
    pub max_records: usize,
}

impl Default for DmarcReportsConfig {
    fn default() -> Self {
        DmarcReportsConfig {
            enabled: false,
            interval: DEFAULT_REPORT_INTERVAL,
            org_name: String::new(),
            email: String::new(),
            extra_contact_info: String::new(),
            db: PathBuf::from("var/dmarc-reports.sqlite"),
            opt_out: Vec::new(),
            queue: DEFAULT_REPORT_QUEUE,
            retry_interval: DEFAULT_REPORT_RETRY_INTERVAL,
            max_attempts: DEFAULT_REPORT_MAX_ATTEMPTS,
            max_records: DEFAULT_REPORT_MAX_RECORDS,
        }
    }
}

impl DmarcReportsConfig {
    /// Whether `domain` asked (through us) not to get reports.
    pub fn opted_out(&self, domain: &str) -> bool {
        let domain = domain.trim_end_matches('.');
        self.opt_out
            .iter()
            .any(|d| d.trim_end_matches('.').eq_ignore_ascii_case(domain))
    }

    /// Checks serde cannot express: (key, reason). `auth_enabled`: `[auth] enabled`,
    /// without which there is no DMARC evaluation to report.
    pub fn validate(&self, auth_enabled: bool) -> Result<(), (String, String)> {
        let err = |k: &str, r: &str| Err((k.to_string(), r.to_string()));
        if self.interval < Duration::from_secs(1) {
            return err("interval", "must be at least 1s");
        }
        if self.queue == 0 {
            return err("queue", "must be at least 1");
        }
        if self.max_attempts == 0 {
            return err("max_attempts", "must be at least 1");
        }
        if self.max_records == 0 {
            return err("max_records", "must be at least 1");
        }
        if !self.enabled {
            return Ok(());
        }
        if !auth_enabled {
            return err(
                "enabled",
                "needs [auth] enabled = true: without verification there is nothing to report",
            );
        }
        if self.org_name.trim().is_empty() {
            return err(
                "org_name",
                "required when enabled (report_metadata/org_name)",
            );
        }
        let valid_email = self.email.split_once('@').is_some_and(|(l, d)| {
            !l.is_empty()
                && d.contains('.')
                && !self.email.contains(|c: char| {
                    c.is_whitespace() || c.is_control() || matches!(c, '<' | '>' | '"' | ',')
                })
        });
        if !valid_email {
            return err(
                "email",
                "required when enabled: a plain address such as dmarc-reports@example.org",
            );
        }
        if self.extra_contact_info.contains(|c: char| c.is_control()) {
            return err("extra_contact_info", "must be one line");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enabled_needs_org_name_and_a_plain_address() {
        let mut c = DmarcReportsConfig {
            enabled: true,
            ..Default::default()
        };
        assert_eq!(c.validate(false).unwrap_err().0, "enabled");
        assert_eq!(c.validate(true).unwrap_err().0, "org_name");
        c.org_name = "Example".into();
        for bad in [
            "",
            "nobody",
            "a@b",
            "x <a@b.example>",
            "a@b.example\r\nBcc: v@x.test",
        ] {
            c.email = bad.into();
            assert_eq!(c.validate(true).unwrap_err().0, "email", "{bad:?}");
        }
        c.email = "dmarc@example.org".into();
        assert!(c.validate(true).is_ok());
        // Off: nothing is required.
        assert!(DmarcReportsConfig::default().validate(false).is_ok());
    }

    #[test]
    fn opt_out_is_exact_and_case_insensitive() {
        let c = DmarcReportsConfig {
            opt_out: vec!["Example.COM.".into()],
            ..Default::default()
        };
        assert!(c.opted_out("example.com"));
        assert!(!c.opted_out("sub.example.com"));
        assert!(!c.opted_out("example.co"));
    }
}
