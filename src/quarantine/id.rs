//! Quarantine ids: 128 random bits as 26 Crockford base32 characters. The only way to
//! name an entry on disk; parsing rejects anything else, so no request can reach a path
//! outside the store (`../`, `%2e`, NUL, absolute paths all fail here).

use std::fmt;

const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
const LEN: usize = 26;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QuarantineId(String);

impl QuarantineId {
    /// A new unguessable id.
    pub fn generate() -> QuarantineId {
        let mut bits: u128 = rand::random();
        let mut out = [0u8; LEN];
        // 26 × 5 = 130 bits: the top character carries only 3 bits.
        for slot in out.iter_mut().rev() {
            *slot = ALPHABET[(bits & 31) as usize];
            bits >>= 5;
        }
        QuarantineId(String::from_utf8(out.to_vec()).expect("ASCII alphabet"))
    }

    /// Accepts exactly 26 characters of the alphabet (case-insensitive).
    pub fn parse(s: &str) -> Option<QuarantineId> {
        let up = s.to_ascii_uppercase();
        (up.len() == LEN && up.bytes().all(|b| ALPHABET.contains(&b)) && up.as_bytes()[0] <= b'7')
            .then_some(QuarantineId(up))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for QuarantineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let id = QuarantineId::generate();
        assert_eq!(QuarantineId::parse(id.as_str()), Some(id.clone()));
        assert_eq!(QuarantineId::parse(&id.as_str().to_lowercase()), Some(id));
        for bad in [
            "",
            "../../etc/passwd",
            "..%2f",
            "0123456789ABCDEFGHJKMNPQR/",
            "0123456789ABCDEFGHJKMNPQRSTV",
            "0123456789ABCDEFGHJKMNPQRU",
            "0123456789ABCDEFGHJKMNPQR\0",
            "Z123456789ABCDEFGHJKMNPQRS",
        ] {
            assert_eq!(QuarantineId::parse(bad), None, "{bad:?}");
        }
    }
}
