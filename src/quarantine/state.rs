//! The states of a quarantine entry. Strings exist only where the state is stored
//! (`meta.json`, the SQLite index, the PostgreSQL column) and in JSON answers; every
//! transition through a [`QuarantineStore`](super::store::QuarantineStore) names an enum.
//!
//! `held → releasing → released`; `releasing → held` when the next hop refused or was
//! unreachable; `releasing → releasing` is `release --force` of an unknown outcome.
//! `deleted` is what an entry removed by `delete`/`purge` is reported as (the entry itself
//! is gone from every backend).

use std::fmt;

/// Serialized as its [`State::as_str`] spelling (`meta.json`, JSON answers); an unknown
/// spelling fails to load rather than being guessed at.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Held,
    Releasing,
    Released,
    Deleted,
}

impl State {
    pub const ALL: [State; 4] = [
        State::Held,
        State::Releasing,
        State::Released,
        State::Deleted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Held => "held",
            State::Releasing => "releasing",
            State::Released => "released",
            State::Deleted => "deleted",
        }
    }

    /// The stored spelling back into a state; `None` for anything else (a row written by
    /// a newer version, or edited by hand, is reported, not guessed at).
    pub fn parse(s: &str) -> Option<State> {
        State::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Entries `list` shows without `--all`, and the `quarantine_held` gauge counts.
    pub fn is_pending(self) -> bool {
        matches!(self, State::Held | State::Releasing)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad`, so `{:<9}` in `quarantine list` aligns as the string did.
        f.pad(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_unknown_spellings() {
        for s in State::ALL {
            assert_eq!(State::parse(s.as_str()), Some(s));
        }
        for bad in ["", "HELD", "held ", "purged"] {
            assert_eq!(State::parse(bad), None, "{bad:?}");
        }
        assert!(State::Releasing.is_pending() && !State::Released.is_pending());
        // The JSON spelling is the stored one, both ways.
        for s in State::ALL {
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{}\"", s.as_str()));
            assert_eq!(serde_json::from_str::<State>(&json).unwrap(), s);
        }
        assert!(serde_json::from_str::<State>("\"purged\"").is_err());
        // Column alignment in `quarantine list` works as it did with the string.
        assert_eq!(format!("{:<9}|", State::Held), "held     |");
    }
}
