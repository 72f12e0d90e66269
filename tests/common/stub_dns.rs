//! A loopback DNS server that answers every query with NXDOMAIN, for runs that need the
//! proxy's lookups answered fast and never sent off the machine: the Postfix end-to-end
//! test (`tests/postfix_e2e.rs`) and the relay load benchmark (`benches/relay_load.rs`),
//! which include this file with `#[path]`. Std threads only, no async runtime, so both
//! can use it as they are. (The scriptable server with real zones is `dns.rs`.)
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Answers every DNS query with NXDOMAIN (plus a root SOA, TTL 300, so the
/// negative answer is cacheable), over UDP and TCP on one 127.0.0.1 port, and
/// counts the queries.
pub struct StubDns {
    pub port: u16,
    queries: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl StubDns {
    pub fn start() -> StubDns {
        let (udp, tcp) = (0..20)
            .find_map(|_| {
                let udp = UdpSocket::bind("127.0.0.1:0").ok()?;
                let port = udp.local_addr().ok()?.port();
                let tcp = TcpListener::bind(("127.0.0.1", port)).ok()?;
                Some((udp, tcp))
            })
            .expect("bind a UDP+TCP port pair for the stub DNS server");
        let port = udp.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let queries = Arc::new(AtomicU64::new(0));
        udp.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        tcp.set_nonblocking(true).unwrap();
        let (udp_stop, udp_queries) = (stop.clone(), queries.clone());
        let udp_thread = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !udp_stop.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = udp.recv_from(&mut buf)
                    && let Some(reply) = dns_nxdomain(&buf[..n])
                {
                    udp_queries.fetch_add(1, Ordering::Relaxed);
                    let _ = udp.send_to(&reply, peer);
                }
            }
        });
        let (tcp_stop, tcp_queries) = (stop.clone(), queries.clone());
        let tcp_thread = std::thread::spawn(move || {
            while !tcp_stop.load(Ordering::Relaxed) {
                match tcp.accept() {
                    Ok((conn, _)) => {
                        let q = tcp_queries.clone();
                        std::thread::spawn(move || dns_tcp_session(conn, &q));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        StubDns {
            port,
            queries,
            stop,
            threads: vec![udp_thread, tcp_thread],
        }
    }

    pub fn queries(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }
}

impl Drop for StubDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn dns_tcp_session(mut conn: TcpStream, queries: &AtomicU64) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    loop {
        let mut len = [0u8; 2];
        if conn.read_exact(&mut len).is_err() {
            return;
        }
        let mut query = vec![0u8; u16::from_be_bytes(len) as usize];
        if conn.read_exact(&mut query).is_err() {
            return;
        }
        let Some(reply) = dns_nxdomain(&query) else {
            return;
        };
        queries.fetch_add(1, Ordering::Relaxed);
        let mut out = (reply.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(&reply);
        if conn.write_all(&out).is_err() {
            return;
        }
    }
}

/// NXDOMAIN reply to `query`: same id and question, AA+RA, root SOA (TTL 300).
fn dns_nxdomain(query: &[u8]) -> Option<Vec<u8>> {
    if query.len() < 12 || query[2] & 0x80 != 0 {
        return None;
    }
    let qdcount = u16::from_be_bytes([query[4], query[5]]).min(1);
    let mut end = 12;
    if qdcount == 1 {
        loop {
            let len = *query.get(end)? as usize;
            end += 1;
            if len == 0 {
                break;
            }
            if len & 0xc0 != 0 {
                return None;
            }
            end += len;
        }
        end += 4; // QTYPE, QCLASS
        if end > query.len() {
            return None;
        }
    }
    let mut r = Vec::with_capacity(end + 40);
    r.extend_from_slice(&query[..2]);
    r.push(0x80 | 0x04 | (query[2] & 0x79)); // QR, AA, opcode and RD copied
    r.push(0x80 | 3); // RA, NXDOMAIN
    r.extend_from_slice(&[0, qdcount as u8, 0, 0, 0, 1, 0, 0]);
    r.extend_from_slice(&query[12..end]);
    // authority: ". 300 IN SOA . . 1 3600 600 86400 300"
    r.push(0);
    r.extend_from_slice(&6u16.to_be_bytes());
    r.extend_from_slice(&1u16.to_be_bytes());
    r.extend_from_slice(&300u32.to_be_bytes());
    r.extend_from_slice(&22u16.to_be_bytes());
    r.extend_from_slice(&[0, 0]);
    for v in [1u32, 3600, 600, 86400, 300] {
        r.extend_from_slice(&v.to_be_bytes());
    }
    Some(r)
}
