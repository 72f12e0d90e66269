//! `[next_hop]` connection pool keys: `pool_size` and `pool_idle_timeout` (see
//! `crate::relay::pool` for what the pool does with them).

use std::time::Duration;

use super::NextHopConfig;

/// Idle next-hop connections kept per next hop for later client sessions. Each one holds
/// an `smtpd` process at a Postfix next hop (`default_process_limit` is 100), so the pool
/// keeps well under a third of that; at 32 a proxy under steady load of a few dozen
/// concurrent sessions almost never opens a connection. 0 turns pooling off: every
/// client session opens its own connection and ends it with QUIT.
pub const DEFAULT_POOL_SIZE: usize = 32;
/// How long a connection may sit idle in the pool before it is closed with QUIT. It must
/// stay below the next hop's own idle timeout, or the next hop closes first and logs a
/// timeout: Postfix's `smtpd_timeout` is 300 s normally but 10 s under stress
/// (`${stress?10}`), and smtp-sink's is configurable; 5 s is below both.
pub const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest `pool_idle_timeout` accepted: an idle SMTP session held longer than this is
/// a resource taken from the next hop for no measurable gain.
pub const MAX_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest `pool_size` accepted (each idle connection is a socket here and a process or
/// session slot at the next hop).
pub const MAX_POOL_SIZE: usize = 1000;

/// Checks the pool keys of one next-hop section: `Err((key, reason))`.
pub fn validate(hop: &NextHopConfig) -> Result<(), (&'static str, String)> {
    if hop.pool_size > MAX_POOL_SIZE {
        return Err((
            "pool_size",
            format!("{} is above the maximum {MAX_POOL_SIZE}", hop.pool_size),
        ));
    }
    if hop.pool_size > 0 && hop.pool_idle_timeout.is_zero() {
        return Err((
            "pool_idle_timeout",
            "must be above 0 (set pool_size = 0 to turn pooling off)".into(),
        ));
    }
    if hop.pool_idle_timeout > MAX_POOL_IDLE_TIMEOUT {
        return Err((
            "pool_idle_timeout",
            format!(
                "must be at most {}s, and below the next hop's own idle timeout (Postfix: 10 s under stress)",
                MAX_POOL_IDLE_TIMEOUT.as_secs()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bounds_are_enforced() {
        let mut hop = NextHopConfig::default();
        assert_eq!(hop.pool_size, DEFAULT_POOL_SIZE);
        assert_eq!(hop.pool_idle_timeout, DEFAULT_POOL_IDLE_TIMEOUT);
        assert!(validate(&hop).is_ok());
        hop.pool_idle_timeout = Duration::ZERO;
        assert_eq!(validate(&hop).unwrap_err().0, "pool_idle_timeout");
        hop.pool_size = 0; // pooling off: the timeout is not used
        assert!(validate(&hop).is_ok());
        hop.pool_idle_timeout = Duration::from_secs(61);
        assert_eq!(validate(&hop).unwrap_err().0, "pool_idle_timeout");
        hop.pool_idle_timeout = DEFAULT_POOL_IDLE_TIMEOUT;
        hop.pool_size = MAX_POOL_SIZE + 1;
        assert_eq!(validate(&hop).unwrap_err().0, "pool_size");
    }

    #[test]
    fn keys_parse_from_toml() {
        let hop: NextHopConfig = toml::from_str(
            "address = \"smtp://127.0.0.1:25\"\npool_size = 4\npool_idle_timeout = \"2s\"\n",
        )
        .unwrap();
        assert_eq!(hop.pool_size, 4);
        assert_eq!(hop.pool_idle_timeout, Duration::from_secs(2));
    }
}
