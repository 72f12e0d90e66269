//! The accounting key of a client that sends without AUTH (`trusted_networks`): what
//! the sender cannot rotate. An IPv4 address is one host; an IPv6 host is given at least
//! a /64 and may use any address in it, so the /64 is the host.

//!
//! The functions live with the configuration (`config::outbound::client_key`), which
//! validates `client:...` names with them; they are this module's as well.

pub use crate::config::outbound::client_key::{PREFIX, host_ip, host_part, is_key, key, parse_key};

/// Whether `a` and `b` are the same host.
pub fn same_host(a: std::net::IpAddr, b: std::net::IpAddr) -> bool {
    host_ip(a) == host_ip(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    #[test]
    fn ipv6_hosts_are_their_64() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff:1:2:3".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(key(a), "client:2001:db8:1:2::/64");
        assert_eq!(key(a), key(b), "rotating inside the /64 is the same host");
        assert_ne!(key(a), key(c));
        assert_eq!(key("192.0.2.7".parse().unwrap()), "client:192.0.2.7");
        assert_eq!(
            key("::ffff:192.0.2.7".parse().unwrap()),
            "client:192.0.2.7",
            "an IPv4-mapped address is the IPv4 host"
        );
    }

    #[test]
    fn config_names_are_normalised() {
        assert_eq!(
            parse_key("client:2001:DB8:1:2::9").as_deref(),
            Some("client:2001:db8:1:2::/64")
        );
        assert_eq!(
            parse_key("client:2001:db8:1:2::/64").as_deref(),
            Some("client:2001:db8:1:2::/64")
        );
        assert_eq!(
            parse_key("client:192.0.2.7").as_deref(),
            Some("client:192.0.2.7")
        );
        assert_eq!(
            parse_key("client:192.0.2.0/24"),
            None,
            "one host, not a network"
        );
        assert_eq!(parse_key("client:2001:db8::/48"), None);
        assert_eq!(parse_key("client:web1"), None);
        assert_eq!(parse_key("alice@example.org"), None);
    }
}
