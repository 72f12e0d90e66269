//! Quarantine capacity: a total size and entry count, and a share of each per sender
//! domain, so one flood of held spoofs cannot take the disk (or the whole quarantine)
//! for the retention period.
//!
//! The usage is read from the index, where SQLite triggers keep per-store and
//! per-domain totals in the same transaction as each row insert and delete (see
//! `index.rs`). So entries deleted or purged by the CLI, another process, free capacity
//! for the running proxy at once, and a check costs two point reads, not a scan.

/// The limits applied to each new entry (`[quarantine] max_bytes`, `max_entries`,
/// `domain_share`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Capacity {
    pub max_bytes: u64,
    pub max_entries: u64,
    /// 0 < share <= 1.
    pub domain_share: f64,
}

impl Capacity {
    /// The limits `[quarantine]` configures, applied to every new entry.
    pub fn of(q: &crate::config::QuarantineConfig) -> Capacity {
        Capacity {
            max_bytes: q.max_bytes,
            max_entries: q.max_entries,
            domain_share: q.domain_share,
        }
    }
}

/// Entries and bytes in use (the whole store, or one sender domain's entries).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub entries: u64,
    pub bytes: u64,
}

impl Usage {
    pub fn plus(self, other: Usage) -> Usage {
        Usage {
            entries: self.entries.saturating_add(other.entries),
            bytes: self.bytes.saturating_add(other.bytes),
        }
    }
}

/// Why a new entry does not fit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "quarantine full: {} entries / {} bytes in use, limits {} entries / {} bytes",
        used.entries, used.bytes, limit.entries, limit.bytes
    )]
    Full { used: Usage, limit: Usage },
    #[error(
        "sender domain {domain:?} holds its share of the quarantine: {} entries / {} bytes, limits {} entries / {} bytes",
        used.entries, used.bytes, limit.entries, limit.bytes
    )]
    DomainShare {
        domain: String,
        used: Usage,
        limit: Usage,
    },
}

impl Refusal {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::Full { .. } => "full",
            Refusal::DomainShare { .. } => "domain_share",
        }
    }
}

impl Capacity {
    /// What one sender domain may use: `domain_share` of each limit, at least one entry
    /// and one byte (a tiny share still lets a domain hold something).
    pub fn domain_limit(&self) -> Usage {
        let share = |n: u64| ((n as f64 * self.domain_share).floor() as u64).clamp(1, n.max(1));
        Usage {
            entries: share(self.max_entries),
            bytes: share(self.max_bytes),
        }
    }

    /// Whether an entry of `size` bytes from `domain` fits, given what the store and the
    /// domain use now. The global limit is checked first: when the store is full, that is
    /// what the operator must hear about.
    pub fn admit(
        &self,
        total: Usage,
        domain: &str,
        by_domain: Usage,
        size: u64,
    ) -> Result<(), Refusal> {
        let limit = Usage {
            entries: self.max_entries,
            bytes: self.max_bytes,
        };
        if total.entries.saturating_add(1) > limit.entries
            || total.bytes.saturating_add(size) > limit.bytes
        {
            return Err(Refusal::Full { used: total, limit });
        }
        let limit = self.domain_limit();
        if by_domain.entries.saturating_add(1) > limit.entries
            || by_domain.bytes.saturating_add(size) > limit.bytes
        {
            return Err(Refusal::DomainShare {
                domain: domain.to_string(),
                used: by_domain,
                limit,
            });
        }
        Ok(())
    }
}

/// The domain an entry is accounted to: the envelope sender's, or for the null sender
/// (bounces, which carry no envelope domain) the domain of the first header From
/// address. Lower case, without a trailing dot; `""` when there is none (all such
/// entries share one pool, which has its share like any domain).
///
/// The envelope domain is what the sender chose for the transaction and what SPF
/// checked; a spoof flood rotating envelope domains spreads over many shares, and the
/// global limits still bound it all.
pub fn sender_domain(mail_from: &str, header_from: &str) -> String {
    let address = if mail_from.is_empty() {
        first_header_address(header_from)
    } else {
        mail_from
    };
    address
        .rsplit_once('@')
        .map(|(_, d)| d.trim().trim_end_matches('.').to_ascii_lowercase())
        .unwrap_or_default()
}

/// The first address of a From field value: inside the first `<...>` when there is
/// one (`"Name" <a@b>`), else the first comma-separated item (`a@b, c@d`).
fn first_header_address(value: &str) -> &str {
    if let Some(start) = value.find('<') {
        let rest = &value[start + 1..];
        return rest.split('>').next().unwrap_or("").trim();
    }
    value.split(',').next().unwrap_or("").trim()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap() -> Capacity {
        Capacity {
            max_bytes: 1000,
            max_entries: 8,
            domain_share: 0.25,
        }
    }

    fn u(entries: u64, bytes: u64) -> Usage {
        Usage { entries, bytes }
    }

    #[test]
    fn global_limits_then_domain_share() {
        let c = cap();
        assert_eq!(c.domain_limit(), u(2, 250));
        assert!(c.admit(u(0, 0), "a.example", u(0, 0), 100).is_ok());
        // The last entry and the last byte fit; one more does not.
        assert!(c.admit(u(7, 900), "a.example", u(0, 0), 100).is_ok());
        assert_eq!(
            c.admit(u(8, 900), "a.example", u(0, 0), 1)
                .unwrap_err()
                .kind(),
            "full"
        );
        assert_eq!(
            c.admit(u(7, 901), "a.example", u(0, 0), 100)
                .unwrap_err()
                .kind(),
            "full"
        );
        // A domain at its share is refused while others still fit.
        let e = c.admit(u(2, 200), "a.example", u(2, 200), 10).unwrap_err();
        assert_eq!(e.kind(), "domain_share");
        assert!(e.to_string().contains("a.example"), "{e}");
        assert!(c.admit(u(2, 200), "b.example", u(0, 0), 10).is_ok());
        // By bytes too: one big message cannot take more than the share.
        assert_eq!(
            c.admit(u(0, 0), "a.example", u(0, 0), 251)
                .unwrap_err()
                .kind(),
            "domain_share"
        );
        // When both are exceeded, the store being full is what is reported.
        assert_eq!(
            c.admit(u(8, 1000), "a.example", u(2, 250), 1)
                .unwrap_err()
                .kind(),
            "full"
        );
    }

    #[test]
    fn tiny_shares_still_admit_one_entry_and_share_one_is_no_limit() {
        let mut c = cap();
        c.domain_share = 0.001;
        assert_eq!(c.domain_limit(), u(1, 1));
        c.domain_share = 1.0;
        assert_eq!(c.domain_limit(), u(8, 1000));
        assert!(c.admit(u(7, 0), "a.example", u(7, 0), 0).is_ok());
    }

    #[test]
    fn sender_domain_is_the_envelope_domain_or_the_from_domain_for_bounces() {
        assert_eq!(
            sender_domain("User@Example.COM", "x@other.org"),
            "example.com"
        );
        assert_eq!(sender_domain("a@example.com.", ""), "example.com");
        // A quoted local part with an @ in it: the domain is after the last @.
        assert_eq!(sender_domain("\"a@b\"@example.net", ""), "example.net");
        assert_eq!(
            sender_domain("", "\"PayPal\" <service@PayPal.com>"),
            "paypal.com"
        );
        assert_eq!(
            sender_domain("", "a@one.example, b@two.example"),
            "one.example"
        );
        assert_eq!(
            sender_domain("", "\"x@decoy.example\" <real@target.example>"),
            "target.example",
            "an @ in the display name is not the address"
        );
        assert_eq!(sender_domain("", ""), "");
        assert_eq!(sender_domain("", "undisclosed"), "");
    }
}
