//! HAProxy PROXY protocol (v1 text and v2 binary) header parsing.
//!
//! A load balancer in front of mailwarden prepends this header to every TCP
//! connection so that sender-authentication checks see the real client address
//! instead of the balancer's. Spec:
//! <https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>.
//!
//! The header must only be honoured for peers listed as trusted (see
//! [`is_trusted`]); otherwise any client could claim an arbitrary source address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

use ProxyHeaderError::{Malformed, Unsupported};

/// Longest legal v1 line, CRLF included (the spec's worst case for TCP6).
const V1_MAX_LEN: usize = 107;
/// The 12 bytes every v2 header starts with.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Our cap on the v2 `len` field (bytes after the 16-byte fixed header). The
/// spec allows up to 65535, but addresses plus the TLVs balancers actually send
/// fit easily, and the cap bounds what an unauthenticated connection can make us
/// buffer.
const V2_MAX_LEN: usize = 1024;

/// Address information a load balancer sent in its PROXY header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxiedAddrs {
    pub source: SocketAddr,
    pub destination: SocketAddr,
}

/// Why a PROXY header could not be read; the connection should be closed.
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("I/O error while reading PROXY header: {0}")]
    Io(#[from] std::io::Error),
    #[error("timed out waiting for PROXY header")]
    Timeout,
    /// Also used when the peer closes the stream in the middle of the header.
    #[error("malformed PROXY header: {0}")]
    Malformed(&'static str),
    /// Well-formed but outside what we accept (other version, non-TCP, too long).
    #[error("unsupported PROXY header: {0}")]
    Unsupported(&'static str),
}

type Result<T> = std::result::Result<T, ProxyHeaderError>;

/// Reads exactly one PROXY header (v1 or v2, detected from the first bytes) from `stream`,
/// consuming no byte beyond it, so the SMTP bytes that follow stay unread for the
/// session: v1 is read byte by byte (at most 107 bytes, up to CRLF), v2 as the
/// 16-byte fixed header and then exactly `len` bytes. No buffering reader is used
/// because it would swallow bytes the client sent ahead of the greeting.
///
/// Returns `Ok(None)` for `PROXY UNKNOWN` (v1) and for v2 LOCAL / AF_UNSPEC /
/// AF_UNIX, meaning: keep the TCP peer address. IPv4-mapped IPv6 addresses are
/// returned as sent.
///
/// `timeout` covers the whole header, so a peer that connects and sends nothing,
/// or trickles bytes, cannot hold the task open.
pub async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
    timeout: Duration,
) -> std::result::Result<Option<ProxiedAddrs>, ProxyHeaderError> {
    tokio::time::timeout(timeout, read_any(stream))
        .await
        .map_err(|_| ProxyHeaderError::Timeout)?
}

/// Whether `peer` is inside one of the trusted CIDRs.
///
/// Addresses are compared as given: an IPv4 peer accepted on a dual-stack `[::]`
/// socket appears as `::ffff:a.b.c.d` and only matches IPv6 CIDRs covering it.
/// Callers that want IPv4 CIDRs to match such peers should pass
/// `peer.to_canonical()`.
pub fn is_trusted(peer: IpAddr, trusted: &[ipnet::IpNet]) -> bool {
    trusted.iter().any(|net| net.contains(&peer))
}

/// `read_exact` that reports a premature end of stream as a malformed header.
async fn fill<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut [u8]) -> Result<()> {
    match stream.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err(Malformed("stream ended inside PROXY header"))
        }
        Err(e) => Err(e.into()),
    }
}

async fn read_any<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Option<ProxiedAddrs>> {
    let mut first = [0u8; 1];
    fill(stream, &mut first).await?;
    match first[0] {
        b'P' => read_v1(stream).await,
        b'\r' => read_v2(stream).await,
        _ => Err(Malformed("missing PROXY protocol signature")),
    }
}

/// Reads the rest of a v1 line one byte at a time: the line length is unknown
/// up front, and a larger read could swallow the client's first SMTP command.
async fn read_v1<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Option<ProxiedAddrs>> {
    const PREFIX: &[u8] = b"PROXY ";
    let mut line = [0u8; V1_MAX_LEN];
    line[0] = b'P';
    let mut n = 1;
    while line[n - 1] != b'\n' {
        if n == V1_MAX_LEN {
            return Err(Malformed("v1 header longer than 107 bytes"));
        }
        fill(stream, &mut line[n..=n]).await?;
        // Fail fast on non-PROXY traffic instead of waiting for 107 bytes.
        if n < PREFIX.len() && line[n] != PREFIX[n] {
            return Err(Malformed("missing PROXY protocol signature"));
        }
        n += 1;
    }
    parse_v1(&line[..n])
}

/// Parses a complete v1 line (starting with `PROXY ` and ending with LF).
fn parse_v1(line: &[u8]) -> Result<Option<ProxiedAddrs>> {
    let body = line
        .strip_suffix(b"\r\n")
        .ok_or(Malformed("v1 header not terminated by CRLF"))?;
    let text = std::str::from_utf8(body).map_err(|_| Malformed("v1 header is not valid text"))?;
    // Split on single spaces: a doubled space yields an empty field, which then
    // fails to parse.
    let fields: Vec<&str> = text.split(' ').collect();
    let (v6, [src, dst, sport, dport]) = match fields[..] {
        // The spec tells receivers to ignore whatever follows UNKNOWN.
        ["PROXY", "UNKNOWN", ..] => return Ok(None),
        ["PROXY", "TCP4", a, b, c, d] => (false, [a, b, c, d]),
        ["PROXY", "TCP6", a, b, c, d] => (true, [a, b, c, d]),
        ["PROXY", "TCP4" | "TCP6", ..] => return Err(Malformed("v1 header needs six fields")),
        _ => return Err(Malformed("v1 protocol is not TCP4, TCP6 or UNKNOWN")),
    };
    // std's parsers reject IPv4 octets with leading zeros and IPv6 zone ids.
    let ip = |s: &str| -> Result<IpAddr> {
        let ip = if v6 {
            s.parse::<Ipv6Addr>().map(IpAddr::V6)
        } else {
            s.parse::<Ipv4Addr>().map(IpAddr::V4)
        };
        ip.map_err(|_| Malformed("v1 address invalid for the announced family"))
    };
    Ok(Some(ProxiedAddrs {
        source: SocketAddr::new(ip(src)?, parse_port(sport)?),
        destination: SocketAddr::new(ip(dst)?, parse_port(dport)?),
    }))
}

/// Decimal 0-65535, digits only: `u16::from_str` alone would also accept `+25`.
fn parse_port(s: &str) -> Result<u16> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Malformed("v1 port is not a decimal number"));
    }
    s.parse().map_err(|_| Malformed("v1 port out of range"))
}

/// Reads the rest of the 16-byte v2 fixed header, then exactly `len` more bytes.
async fn read_v2<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Option<ProxiedAddrs>> {
    let mut hdr = [0u8; 16];
    hdr[0] = b'\r';
    fill(stream, &mut hdr[1..]).await?;
    if hdr[..12] != V2_SIGNATURE {
        return Err(Malformed("bad v2 signature"));
    }
    if hdr[12] >> 4 != 2 {
        return Err(Unsupported("v2 header with version other than 2"));
    }
    let local = match hdr[12] & 0x0f {
        0 => true,
        1 => false,
        _ => return Err(Malformed("v2 command is neither LOCAL nor PROXY")),
    };
    let (family, transport) = (hdr[13] >> 4, hdr[13] & 0x0f);
    if family > 3 || transport > 2 {
        return Err(Malformed("unknown v2 address family or transport"));
    }
    let len = usize::from(u16::from_be_bytes([hdr[14], hdr[15]]));
    if len > V2_MAX_LEN {
        return Err(Unsupported("v2 header longer than 1024 bytes"));
    }
    let mut body = vec![0u8; len];
    fill(stream, &mut body).await?;

    // LOCAL: the balancer's own connection (e.g. a health check); the spec says
    // to use the real endpoints and ignore the family and address block.
    // AF_UNSPEC and AF_UNIX carry no IP address we could use either.
    if local || family == 0 || family == 3 {
        return Ok(None);
    }
    if transport != 1 {
        return Err(Unsupported("v2 transport is not STREAM"));
    }
    let ip_len = if family == 1 { 4 } else { 16 };
    let addr_len = 2 * ip_len + 4;
    if len < addr_len {
        return Err(Malformed("v2 length shorter than the address block"));
    }
    let ip = |at: usize| -> IpAddr {
        if family == 1 {
            IpAddr::from(std::array::from_fn::<u8, 4, _>(|k| body[at + k]))
        } else {
            IpAddr::from(std::array::from_fn::<u8, 16, _>(|k| body[at + k]))
        }
    };
    let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
    let addrs = ProxiedAddrs {
        source: SocketAddr::new(ip(0), port(2 * ip_len)),
        destination: SocketAddr::new(ip(ip_len), port(2 * ip_len + 2)),
    };

    // TLVs are not used, but must tile the remainder exactly: a sender whose
    // TLVs overrun `len` is broken and its addresses are not to be trusted.
    let mut tlvs = &body[addr_len..];
    while !tlvs.is_empty() {
        let [_, hi, lo, ..] = *tlvs else {
            return Err(Malformed("truncated v2 TLV header"));
        };
        let value_len = usize::from(u16::from_be_bytes([hi, lo]));
        tlvs = tlvs
            .get(3 + value_len..)
            .ok_or(Malformed("v2 TLV overruns the header length"))?;
    }
    Ok(Some(addrs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(src: &str, dst: &str) -> Option<ProxiedAddrs> {
        let (source, destination) = (src.parse().unwrap(), dst.parse().unwrap());
        Some(ProxiedAddrs {
            source,
            destination,
        })
    }

    /// Runs `read_header` over `input` and returns the result and unread bytes.
    async fn run(input: &[u8]) -> (Result<Option<ProxiedAddrs>>, Vec<u8>) {
        let mut r = input;
        let res = read_header(&mut r, Duration::from_secs(5)).await;
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).await.unwrap();
        (res, rest)
    }

    /// Asserts that every input fails with the given variant (`Debug` prefix).
    async fn assert_fail(inputs: &[impl AsRef<[u8]>], variant: &str) {
        for input in inputs.iter().map(AsRef::as_ref) {
            let res = run(input).await.0;
            let dbg = format!("{res:?}");
            assert!(
                dbg.starts_with(&format!("Err({variant}")),
                "{input:?}: {dbg}"
            );
        }
    }

    fn v2(ver_cmd: u8, fam: u8, body: &[u8], len: u16) -> Vec<u8> {
        let mut v = V2_SIGNATURE.to_vec();
        v.extend([ver_cmd, fam]);
        v.extend(len.to_be_bytes());
        v.extend(body);
        v
    }

    #[tokio::test]
    async fn v1_valid() {
        let (res, rest) = run(b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\nEHLO x\r\n").await;
        assert_eq!(res.unwrap(), addrs("192.0.2.1:56324", "198.51.100.2:25"));
        assert_eq!(rest, b"EHLO x\r\n");
        let (res, rest) = run(b"PROXY TCP6 2001:db8::1 ::ffff:10.0.0.1 0 65535\r\nQUIT").await;
        let expected = addrs("[2001:db8::1]:0", "[::ffff:10.0.0.1]:65535");
        assert_eq!((res.unwrap(), &rest[..]), (expected, &b"QUIT"[..]));
        let unknown: [&[u8]; 2] = [
            b"PROXY UNKNOWN\r\nQUIT",
            b"PROXY UNKNOWN ::1 ::2 1 2\r\nQUIT",
        ];
        for input in unknown {
            let (res, rest) = run(input).await;
            assert_eq!((res.unwrap(), &rest[..]), (None, &b"QUIT"[..]));
        }
    }

    #[tokio::test]
    async fn v1_malformed() {
        let too_long = format!("PROXY TCP6 {} ", "f".repeat(V1_MAX_LEN));
        let inputs: &[&[u8]] = &[
            b"HELO example.org\r\n",
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n",
            b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.008 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 -2\r\n",
            b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
            b"PROXY TCP4 1.2.3.4",
            too_long.as_bytes(),
        ];
        assert_fail(inputs, "Malformed").await;
        // Overlong lines are rejected after reading exactly 107 bytes.
        let (_, rest) = run(too_long.as_bytes()).await;
        assert_eq!(rest.len(), too_long.len() - V1_MAX_LEN);
    }

    #[tokio::test]
    async fn v2_proxy_with_tlvs() {
        let mut body = vec![192, 0, 2, 1, 198, 51, 100, 2, 0xdc, 0x04, 0, 25];
        body.extend([0x04, 0, 2, 0, 0, 0xea, 0, 1, 7]); // NOOP padding, AWS VPC endpoint
        let mut input = v2(0x21, 0x11, &body, body.len() as u16);
        input.extend(b"EHLO x\r\n");
        let (res, rest) = run(&input).await;
        assert_eq!(res.unwrap(), addrs("192.0.2.1:56324", "198.51.100.2:25"));
        assert_eq!(rest, b"EHLO x\r\n");

        let mut body = [0u8; 36 + 4];
        body[15] = 1; // ::1
        body[16..18].copy_from_slice(&[0x20, 0x01]);
        body[32..36].copy_from_slice(&[0x01, 0xbb, 0, 25]);
        body[36..].copy_from_slice(&[0x01, 0, 1, b'h']); // ALPN "h"
        let (res, rest) = run(&v2(0x21, 0x21, &body, 40)).await;
        assert_eq!(res.unwrap(), addrs("[::1]:443", "[2001::]:25"));
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn v2_without_addresses() {
        // LOCAL (its block is skipped unparsed), PROXY over AF_UNSPEC, AF_UNIX.
        let cases = [
            (0x20, 0x11, vec![9; 5]),
            (0x21, 0x00, vec![]),
            (0x21, 0x31, vec![0; 216]),
        ];
        for (cmd, fam, body) in cases {
            let mut input = v2(cmd, fam, &body, body.len() as u16);
            input.extend(b"QUIT");
            let (res, rest) = run(&input).await;
            assert_eq!((res.unwrap(), &rest[..]), (None, &b"QUIT"[..]));
        }
    }

    #[tokio::test]
    async fn v2_invalid() {
        let a4 = [1u8, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0, 2];
        let mut bad_sig = v2(0x21, 0x11, &a4, 12);
        bad_sig[7] = b'X';
        let overrun: Vec<u8> = a4.iter().chain(&[1, 0, 5, 0]).copied().collect();
        let malformed = [
            bad_sig,
            v2(0x22, 0x11, &a4, 12),      // unknown command
            v2(0x21, 0x41, &a4, 12),      // unknown family
            v2(0x21, 0x11, &a4[..8], 8),  // len < address block
            v2(0x21, 0x11, &a4, 13),      // truncated body
            v2(0x21, 0x11, &[0; 14], 14), // truncated TLV header
            v2(0x21, 0x11, &overrun, 16), // TLV value overruns len
            V2_SIGNATURE[..10].to_vec(),  // truncated fixed header
        ];
        assert_fail(&malformed, "Malformed").await;
        let unsupported = [
            v2(0x11, 0x11, &a4, 12),     // version 1 in binary form
            v2(0x21, 0x12, &a4, 12),     // DGRAM
            v2(0x21, 0x11, &a4, 0xffff), // huge length
        ];
        assert_fail(&unsupported, "Unsupported").await;
    }

    #[tokio::test]
    async fn times_out_on_silent_peer() {
        let (mut server, _client) = tokio::io::duplex(64);
        let res = read_header(&mut server, Duration::from_millis(50)).await;
        assert!(matches!(res, Err(ProxyHeaderError::Timeout)), "{res:?}");
    }

    #[test]
    fn trusted_cidrs() {
        let nets = ["10.0.0.0/8", "2001:db8::/32"].map(|n| n.parse::<ipnet::IpNet>().unwrap());
        let trusted = |s: &str| is_trusted(s.parse().unwrap(), &nets);
        assert!(trusted("10.1.2.3") && trusted("2001:db8::5"));
        assert!(!trusted("11.0.0.1") && !trusted("::ffff:10.1.2.3")); // not canonicalised
        assert!(!is_trusted("10.1.2.3".parse().unwrap(), &[]));
    }
}
