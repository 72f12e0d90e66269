//! Every default limit and timeout, one documented constant each.
//!
//! The values follow Postfix's long-tested defaults unless a comment says otherwise;
//! `../shared/RELIABILITY.md` lists where each one comes from.

use std::time::Duration;

/// Greeting and EHLO name when `hostname` is not configured.
pub const DEFAULT_HOSTNAME: &str = "localhost";

/// Concurrent sessions per listener (Postfix `SMTPD_PROXY_README` bounded capacity).
pub const DEFAULT_MAX_SESSIONS: usize = 1000;
/// Concurrent sessions from one client address (anvil, tightened).
pub const DEFAULT_MAX_SESSIONS_PER_CLIENT: usize = 20;

/// Longest command line, CRLF included. RFC 5321 §4.5.3.1.4 asks for at least 512;
/// ESMTP parameters make real lines longer (smtp-proto's `MAX_LINE_LENGTH`).
pub const DEFAULT_MAX_COMMAND_LINE: usize = 4096;
/// Largest message accepted, advertised with SIZE (Postfix `message_size_limit`).
pub const DEFAULT_MESSAGE_SIZE_LIMIT: usize = 10_240_000;
/// Message content held in memory by all sessions together (`wire::memory`): 1 GiB,
/// some sixty messages of the default size limit at once (a buffer can grow to twice
/// its message's size, and what it reserves is counted).
pub const DEFAULT_MESSAGE_MEMORY: usize = 1 << 30;
/// Recipients per transaction (Postfix `smtpd_recipient_limit`; RFC 5321 §4.5.3.1.8 asks ≥ 100).
pub const DEFAULT_MAX_RECIPIENTS: usize = 1000;
/// Lowest value accepted for `max_recipients` (RFC 5321 §4.5.3.1.8).
pub const MIN_MAX_RECIPIENTS: usize = 100;
/// Client idle timeout between commands (Postfix `smtpd_timeout`, RFC 5321 §4.5.3.2.7).
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest wait for the next chunk of message content (RFC 5321 §4.5.3.2.6: 3 minutes per block;
/// we allow the whole command timeout).
pub const DEFAULT_DATA_TIMEOUT: Duration = Duration::from_secs(300);
/// Errors after which the session is closed with 421 (Postfix `smtpd_hard_error_limit`).
pub const DEFAULT_HARD_ERROR_LIMIT: u32 = 20;
/// Errors after which every error reply is delayed (Postfix `smtpd_soft_error_limit`).
pub const DEFAULT_SOFT_ERROR_LIMIT: u32 = 10;
/// The delay applied past the soft error limit (Postfix `smtpd_error_sleep_time`).
pub const DEFAULT_ERROR_SLEEP: Duration = Duration::from_secs(1);
/// `Received:` headers beyond which a message is a mail loop (Postfix `hopcount_limit`).
pub const DEFAULT_MAX_RECEIVED_HEADERS: usize = 50;
/// Commands that do nothing useful (NOOP, VRFY, RSET, HELP...) allowed per session before
/// each further one counts as an error (Postfix `smtpd_junk_command_limit`).
pub const DEFAULT_JUNK_COMMAND_LIMIT: u32 = 100;
/// Transactions per session (Postfix `max_use` spirit): bounds what one connection can hold.
pub const DEFAULT_MAX_TRANSACTIONS: u32 = 100;

/// Next hop: at most this many connections to one next hop being opened at once (TCP
/// connect, greeting, EHLO, STARTTLS, XCLIENT); further sessions wait their turn, within
/// the connect timeout. A burst of client sessions (1,000 at once after a restart) would
/// otherwise open as many connections in the same instant and overflow the next hop's
/// listen queue (Postfix's is 100; a Tokio or mio listener's 128): the overflowed ones
/// hang until a timeout instead of being refused. The pool makes most sessions skip the
/// opening anyway.
pub const NEXT_HOP_MAX_OPENING: usize = 32;
/// Next hop: TCP connect timeout (Postfix `smtp_connect_timeout`).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Next hop: wait for the 220 greeting (Postfix `smtp_helo_timeout` spirit).
pub const DEFAULT_GREETING_TIMEOUT: Duration = Duration::from_secs(30);
/// Next hop: reply to EHLO, XCLIENT, MAIL, RCPT, RSET, DATA (Postfix `smtpd_proxy_timeout`).
pub const DEFAULT_RELAY_COMMAND_TIMEOUT: Duration = Duration::from_secs(100);
/// Next hop: writing the message content (Postfix `smtp_data_xfer_timeout`).
pub const DEFAULT_RELAY_DATA_TIMEOUT: Duration = Duration::from_secs(180);
/// Next hop: reply to the final dot. Must stay well under the client's own 10-minute
/// wait (RFC 5321 §4.5.3.2.6) so the client hears a 451 rather than timing out.
pub const DEFAULT_END_OF_DATA_TIMEOUT: Duration = Duration::from_secs(100);

/// In-flight transactions get this long to finish after SIGTERM (Haraka `force_shutdown_timeout`).
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Longest reply line accepted from the next hop (RFC 5321 §4.5.3.1.5 says 512; be lenient).
pub const MAX_RELAY_REPLY_LINE: usize = 4096;
/// Most lines in one multi-line reply from the next hop (an EHLO reply has ~15).
pub const MAX_RELAY_REPLY_LINES: usize = 100;
/// A PROXY protocol header must arrive within this time after connect.
pub const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshake timeout (Postfix `smtpd_starttls_timeout` is 300 s; a handshake needs far less).
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

/// DNS: per-query timeout (hickory's default of 5 s is too long for mail).
pub const DEFAULT_DNS_TIMEOUT_MS: u64 = 2000;
/// DNS: tries per query.
pub const DEFAULT_DNS_ATTEMPTS: usize = 2;
/// DNS: cached answers (rspamd and Stalwart keep a few thousand to tens of thousands).
pub const DEFAULT_DNS_CACHE_ENTRIES: u64 = 10_000;
/// DNS serve-stale: how long past its TTL a known answer may be used while no server
/// answers (RFC 8767 §5 suggests 1 to 3 days; a day bounds how long a key revoked
/// during an outage can still be honoured).
pub const DEFAULT_DNS_STALE_MAX: Duration = Duration::from_secs(24 * 3600);
/// DNS serve-stale: entries kept (100 000 take ~60 MiB, see `benches/stale_memory.rs`).
pub const DEFAULT_DNS_STALE_MAX_ENTRIES: usize = 100_000;
/// DNS serve-stale: estimated bytes kept at most.
pub const DEFAULT_DNS_STALE_MAX_BYTES: usize = 128 << 20;
/// DNS serve-stale: how often `stale_cache_file` is written (each write is one pass over
/// the store: a few milliseconds per 10 000 entries).
pub const DEFAULT_DNS_STALE_CACHE_INTERVAL: Duration = Duration::from_secs(60);
/// DNS failover: longest wait between probes of a down nameserver. Probes run in the
/// background (no message waits for them), so a short wait costs one query per server
/// per period and lets a recovered server be used within seconds.
pub const DEFAULT_DNS_SERVER_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// All checks of one message together (RELIABILITY `checks_time_budget`).
pub const DEFAULT_CHECKS_TIME_BUDGET: Duration = Duration::from_secs(30);
/// SPF alone (RFC 7208 §4.6.4 suggests at least 20 s; mail-auth's own timer then says
/// permerror, ours temperror, which is what a timeout is).
pub const DEFAULT_SPF_TIME_BUDGET: Duration = Duration::from_secs(20);
/// DKIM signatures verified per message; more is a resource attack, not mail.
pub const DEFAULT_DKIM_MAX_SIGNATURES: usize = 10;
/// A message without exactly one author domain is refused: RFC 5322 §3.6 allows one From
/// field, and DMARC (RFC 7489 §6.6.1, DMARCbis) can only protect one author domain.
pub const DEFAULT_MALFORMED_FROM: super::SanityAction = super::SanityAction::Reject;
/// ARC sealers whose vouching may override a DMARC fail (RFC 8617 §7.2): none. Trust is
/// the operator's decision about specific forwarders; nothing is trusted by default.
pub const DEFAULT_TRUSTED_ARC_SEALERS: &[&str] = &[];
/// ARC sets looked at per message: RFC 8617 §4.2.1's limit of 50 instances.
pub const DEFAULT_ARC_MAX_SETS: usize = 50;
/// DNS lookups per message over SPF, DKIM keys, ARC keys and DMARC (rspamd's
/// `dns_max_requests` default). Real mail needs a handful to a few dozen (an SPF record
/// with its includes, one key per signature, one or two DMARC records); SPF's own
/// RFC 7208 limits still allow over 100 (10 `mx` terms of 10 names each), which is what
/// this bounds.
pub const DEFAULT_MAX_DNS_LOOKUPS: u32 = 64;
/// Quarantined messages are purged after this long (RELIABILITY `quarantine_retention`).
pub const DEFAULT_QUARANTINE_RETENTION: Duration = Duration::from_secs(30 * 86_400);
/// Total size of the quarantined messages (RELIABILITY `quarantine_max_bytes`): past it,
/// held mail is deferred with `451 4.3.1` (the client keeps it).
pub const DEFAULT_QUARANTINE_MAX_BYTES: u64 = 10 * 1024 * 1024 * 1024;
/// Number of quarantine entries. 200,000 entries of the ~50 KB a typical held message
/// weighs fill the default 10 GiB; `list` stays fast at this size (benches/quarantine.rs).
pub const DEFAULT_QUARANTINE_MAX_ENTRIES: u64 = 200_000;
/// The share of `max_bytes` and of `max_entries` one sender domain may take, so one
/// flood of held spoofs cannot fill the quarantine for everyone else.
pub const DEFAULT_QUARANTINE_DOMAIN_SHARE: f64 = 0.25;
/// At most one "quarantine full" WARN per this interval (the rest are counted in it).
pub const QUARANTINE_FULL_ALERT_INTERVAL: Duration = Duration::from_secs(60);
/// How often the running proxy applies the quarantine retention.
pub const QUARANTINE_PURGE_INTERVAL: Duration = Duration::from_secs(3600);
