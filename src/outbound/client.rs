//! The accounting key of a client that sends without AUTH (`trusted_networks`): what
//! the sender cannot rotate. An IPv4 address is one host; an IPv6 host is given at least
//! a /64 and may use any address in it, so the /64 is the host.

use std::net::{IpAddr, Ipv6Addr};

/// Prefix of every client key: `client:192.0.2.7`, `client:2001:db8:1:2::/64`. A login or
/// envelope sender never starts with it (no `@`), so the two cannot collide.
pub const PREFIX: &str = "client:";

/// The part of `ip` that identifies a host: itself (IPv4, IPv4-mapped IPv6 as IPv4) or
/// its /64 (IPv6), shown as the network address.
pub fn host_part(ip: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.to_string(),
        v6 @ IpAddr::V6(_) => format!("{}/64", host_ip(v6)),
    }
}

/// The host of `ip` as an address: itself (IPv4) or its /64's network address (IPv6).
/// AUTH failures are counted and blocked per this.
pub fn host_ip(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
    }
}

/// Whether `a` and `b` are the same host.
pub fn same_host(a: IpAddr, b: IpAddr) -> bool {
    host_ip(a) == host_ip(b)
}

/// The accounting key of a client at `ip`.
pub fn key(ip: IpAddr) -> String {
    format!("{PREFIX}{}", host_part(ip))
}

/// A `client:...` name from the config, normalised to the key [`key`] yields for that
/// host (`client:2001:DB8:1:2::9` and `client:2001:db8:1:2::/64` are the same host);
/// `None` when what follows `client:` is neither an address nor an IPv6 /64.
pub fn parse_key(name: &str) -> Option<String> {
    let rest = name.trim().strip_prefix(PREFIX)?;
    if let Ok(ip) = rest.parse::<IpAddr>() {
        return Some(key(ip));
    }
    match rest.parse::<ipnet::IpNet>().ok()? {
        ipnet::IpNet::V6(n) if n.prefix_len() == 64 => Some(key(IpAddr::V6(n.addr()))),
        ipnet::IpNet::V4(n) if n.prefix_len() == 32 => Some(key(IpAddr::V4(n.addr()))),
        _ => None,
    }
}

/// Whether `account` is a client key rather than a login or sender.
pub fn is_key(account: &str) -> bool {
    account.starts_with(PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

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
