//! The DNS resolver every check uses: hickory, with the nameservers, per-query timeout,
//! attempts and cache size from `[dns]`. The cache is hickory's own: bounded and
//! TTL-respecting.

use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use mail_auth::MessageAuthenticator;

use crate::config::DnsConfig;

/// Builds the authenticator (mail-auth's wrapper around a hickory resolver).
pub fn authenticator(cfg: &DnsConfig) -> Result<MessageAuthenticator, String> {
    let mut opts = ResolverOpts::default();
    opts.timeout = Duration::from_millis(cfg.timeout_ms);
    opts.attempts = cfg.attempts;
    opts.cache_size = cfg.cache_entries;
    // Truncated UDP answers are retried over TCP (RFC 7766), and a failing server
    // is retried over TCP too before giving up.
    opts.try_tcp_on_error = true;
    // Names in mail are absolute: never try search domains.
    opts.ndots = 0;
    // With `only_zone_files` nothing is ever asked of a server: no system configuration
    // is needed either (a machine without /etc/resolv.conf still runs the demo).
    let config = if cfg.nameservers.is_empty() && !cfg.only_zone_files {
        let (config, system_opts) = hickory_resolver::system_conf::read_system_conf()
            .map_err(|e| format!("cannot read the system resolver configuration: {e}"))?;
        opts.edns0 = system_opts.edns0;
        config
    } else {
        let servers = cfg
            .nameservers
            .iter()
            .map(|addr| {
                let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
                for conn in &mut ns.connections {
                    conn.port = addr.port();
                }
                ns
            })
            .collect();
        ResolverConfig::from_parts(None, vec![], servers)
    };
    let resolver =
        hickory_resolver::Resolver::builder_with_config(config, TokioRuntimeProvider::default())
            .with_options(opts)
            .build()
            .map_err(|e| format!("cannot build the DNS resolver: {e}"))?;
    Ok(MessageAuthenticator(resolver))
}
