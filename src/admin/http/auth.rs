//! Who may use the admin API: one bearer token, compared in constant time, and a per-source
//! limit on failed attempts.
//!
//! The token is never kept in memory as configured: only its SHA-256. A presented token is
//! hashed too and the two digests are compared with `CRYPTO_memcmp`, so neither the token's
//! length nor the position of the first wrong byte shows in the timing.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use aws_lc_rs::constant_time::verify_slices_are_equal;
use aws_lc_rs::digest::{SHA256, digest};

use crate::config::AdminConfig;

/// Tokens shorter than this are refused: the limiter slows guessing, it does not make a
/// short token safe.
pub const MIN_TOKEN_LEN: usize = 16;

/// The window of the failed-attempt limit.
pub const FAIL_WINDOW: Duration = Duration::from_secs(60);

/// At most this many sources are tracked; beyond, new failing sources are refused (429)
/// until old entries expire, so memory stays bounded whatever an attacker does.
const MAX_TRACKED_SOURCES: usize = 10_000;

/// The SHA-256 of the configured token.
pub struct TokenHash([u8; 32]);

impl TokenHash {
    /// From `[admin] token_file` (mode 0600 or stricter) or `token_sha256` (64 hex digits).
    pub fn load(admin: &AdminConfig) -> Result<TokenHash, String> {
        match (&admin.token_file, &admin.token_sha256) {
            (Some(path), None) => Self::from_file(path),
            (None, Some(hex)) => Self::from_hex(hex),
            _ => Err("[admin]: set exactly one of token_file and token_sha256".into()),
        }
    }

    fn from_file(path: &Path) -> Result<TokenHash, String> {
        use std::os::unix::fs::PermissionsExt;
        let shown = path.display();
        let meta =
            std::fs::metadata(path).map_err(|e| format!("[admin] token_file {shown}: {e}"))?;
        if !meta.is_file() {
            return Err(format!("[admin] token_file {shown}: not a regular file"));
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(format!(
                "[admin] token_file {shown}: mode {mode:04o} lets group or others read the token; chmod 600 it"
            ));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("[admin] token_file {shown}: {e}"))?;
        let token = text.trim();
        if token.len() < MIN_TOKEN_LEN {
            return Err(format!(
                "[admin] token_file {shown}: the token must be at least {MIN_TOKEN_LEN} characters"
            ));
        }
        if token.chars().any(|c| c.is_control() || c == ' ') {
            return Err(format!(
                "[admin] token_file {shown}: the token must be one line without spaces"
            ));
        }
        Ok(Self::of(token))
    }

    fn from_hex(hex: &str) -> Result<TokenHash, String> {
        let hex = hex.trim();
        let bad = || {
            "[admin] token_sha256: expected 64 hexadecimal digits (sha256sum of the token)"
                .to_string()
        };
        if hex.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
                .map_err(|_| bad())?;
        }
        Ok(TokenHash(out))
    }

    /// The hash of a token (also what `token_sha256` holds).
    pub fn of(token: &str) -> TokenHash {
        let d = digest(&SHA256, token.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        TokenHash(out)
    }

    /// Constant-time: both sides are 32-byte digests compared with `CRYPTO_memcmp`.
    pub fn matches(&self, presented: &str) -> bool {
        verify_slices_are_equal(Self::of(presented).0.as_slice(), self.0.as_slice()).is_ok()
    }
}

/// What the `Authorization` header holds: the token of a `Bearer` credential.
pub fn bearer(header: Option<&[u8]>) -> Credential<'_> {
    let Some(raw) = header else {
        return Credential::Missing;
    };
    let Ok(text) = std::str::from_utf8(raw) else {
        return Credential::Malformed;
    };
    match text.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => {
            let token = token.trim();
            if token.is_empty() {
                Credential::Malformed
            } else {
                Credential::Token(token)
            }
        }
        _ => Credential::Malformed,
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Credential<'a> {
    Missing,
    Malformed,
    Token(&'a str),
}

/// Failed attempts per source over the last minute. IPv6 sources are grouped by /64
/// (one host usually has a whole /64 to rotate through), IPv4 by address.
pub struct FailLimiter {
    limit: usize,
    sources: Mutex<HashMap<IpAddr, Vec<Instant>>>,
}

impl FailLimiter {
    pub fn new(limit: u32) -> FailLimiter {
        FailLimiter {
            limit: (limit as usize).max(1),
            sources: Mutex::new(HashMap::new()),
        }
    }

    fn key(ip: IpAddr) -> IpAddr {
        match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let mut seg = v6.segments();
                seg[4..].fill(0);
                IpAddr::from(seg)
            }
            v4 => v4,
        }
    }

    fn sources(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Vec<Instant>>> {
        self.sources.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `ip` has used up its failures for now; then every request that needs the
    /// token is answered 429 without looking at the token (so a guess that happens to be
    /// right cannot be told from a wrong one). Returns the seconds until it may retry.
    pub fn blocked(&self, ip: IpAddr, now: Instant) -> Option<u64> {
        let mut sources = self.sources();
        let times = sources.get_mut(&Self::key(ip))?;
        times.retain(|t| now.duration_since(*t) < FAIL_WINDOW);
        if times.len() < self.limit {
            return None;
        }
        let oldest = times.first().copied().unwrap_or(now);
        let wait = FAIL_WINDOW.saturating_sub(now.duration_since(oldest));
        Some(wait.as_secs().max(1))
    }

    /// Counts a failed attempt. Returns false when the table is full of other sources
    /// (the caller then answers 429 too).
    pub fn record_failure(&self, ip: IpAddr, now: Instant) -> bool {
        let mut sources = self.sources();
        let key = Self::key(ip);
        if !sources.contains_key(&key) && sources.len() >= MAX_TRACKED_SOURCES {
            sources.retain(|_, times| {
                times.retain(|t| now.duration_since(*t) < FAIL_WINDOW);
                !times.is_empty()
            });
            if sources.len() >= MAX_TRACKED_SOURCES {
                return false;
            }
        }
        let times = sources.entry(key).or_default();
        times.retain(|t| now.duration_since(*t) < FAIL_WINDOW);
        times.push(now);
        // Only the newest `limit` matter for the decision.
        if times.len() > self.limit {
            let excess = times.len() - self.limit;
            times.drain(..excess);
        }
        true
    }

    /// Sources tracked now (tests).
    pub fn tracked(&self) -> usize {
        self.sources().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_hash_and_compare() {
        let t = TokenHash::of("correct horse battery staple");
        assert!(t.matches("correct horse battery staple"));
        assert!(!t.matches("correct horse battery stapl"));
        assert!(!t.matches(""));
        let hex = "c4bbcb1fbec99d65bf59d85c8cb62ee2db963f0fe106f483d9afa73bd4e39a8a";
        let h = TokenHash::from_hex(hex).unwrap();
        assert!(h.matches("correct horse battery staple"));
        assert!(TokenHash::from_hex("abc").is_err());
        assert!(TokenHash::from_hex(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn token_file_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "0123456789abcdef0123\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = TokenHash::from_file(&path).err().unwrap();
        assert!(err.contains("0644"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(
            TokenHash::from_file(&path)
                .unwrap()
                .matches("0123456789abcdef0123")
        );
        std::fs::write(&path, "short\n").unwrap();
        assert!(TokenHash::from_file(&path).is_err());
    }

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer(None), Credential::Missing);
        assert_eq!(bearer(Some(b"Bearer abc")), Credential::Token("abc"));
        assert_eq!(bearer(Some(b"bearer  abc ")), Credential::Token("abc"));
        assert_eq!(bearer(Some(b"Basic abc")), Credential::Malformed);
        assert_eq!(bearer(Some(b"Bearer ")), Credential::Malformed);
        assert_eq!(bearer(Some(b"Bearer \xff")), Credential::Malformed);
    }

    #[test]
    fn limiter_blocks_after_limit_and_forgets() {
        let l = FailLimiter::new(3);
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.blocked(ip, t0).is_none());
            assert!(l.record_failure(ip, t0));
        }
        assert!(l.blocked(ip, t0).is_some());
        assert!(l.blocked("192.0.2.8".parse().unwrap(), t0).is_none());
        assert!(l.blocked(ip, t0 + FAIL_WINDOW).is_none());
        // One /64 is one source.
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let b: IpAddr = "2001:db8::2:3".parse().unwrap();
        for _ in 0..3 {
            l.record_failure(a, t0);
        }
        assert!(l.blocked(b, t0).is_some());
    }
}
