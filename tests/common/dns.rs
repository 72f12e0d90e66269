//! A real DNS server on loopback for the tests (built on `hickory-server`).
//!
//! It listens on `127.0.0.1:PORT` over UDP **and** TCP (same port) and answers from a
//! [`Zone`] built in the test:
//!
//! ```ignore
//! use common::dns::{DnsServer, Zone};
//! let zone = Zone::new()
//!     .txt("example.com", "v=spf1 ip4:192.0.2.0/24 -all")
//!     .txt_strings("multi.example.com", &["v=spf1 ", "-all"])
//!     .a("mx.example.com", "192.0.2.10")
//!     .mx("example.com", 10, "mx.example.com")
//!     .ptr_ip("192.0.2.10", "mx.example.com")
//!     .servfail("broken.example.com")
//!     .timeout("slow.example.com");
//! let dns = DnsServer::start(zone);
//! // config: [dns] nameservers = ["{dns.addr()}"]
//! assert!(dns.query_count() > 0);
//! ```
//!
//! Semantics (like a recursive resolver that knows only this zone):
//! * a name with records of the queried type: NOERROR with those records (owner name
//!   spelled as in the question, so 0x20 case randomisation is preserved);
//! * a name with a CNAME (and the query is not for CNAME): the CNAME chain is followed
//!   inside the zone and every step is put in the answer; a CNAME loop (or a chain longer
//!   than 16) gives SERVFAIL;
//! * a name that exists (has any record, a fault, or a descendant that does) but has no
//!   record of that type: NODATA (NOERROR, empty answer, SOA in the authority section);
//! * any other name: NXDOMAIN (SOA in the authority section);
//! * faults configured per name (and optionally per type): SERVFAIL, REFUSED, a timeout
//!   (the query is never answered), or an extra delay;
//! * server-wide: [`DnsServer::set_blackhole`] (no query is ever answered),
//!   [`DnsServer::set_delay`] (every answer is delayed), [`DnsServer::set_servfail_all`]
//!   (every answer is SERVFAIL), [`DnsServer::set_truncate_udp`] (every UDP answer is
//!   empty with the TC bit) and [`DnsServer::set_tcp_blackhole`] (nothing is answered
//!   over TCP).
//!
//! Large answers are truncated over UDP (TC bit; 512 octets without EDNS, up to 1232 with
//! it), so resolvers retry over TCP as in real life.
//!
//! The server runs on its own thread with its own tokio runtime, so it keeps answering
//! even when a test blocks its own thread (e.g. waiting for a child process), and it can
//! be started from sync and async tests alike. It stops when dropped.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::net::xfer::Protocol;
use hickory_server::proto::op::{Edns, Header, HeaderCounts, Metadata, ResponseCode};
use hickory_server::proto::rr::domain::Label;
use hickory_server::proto::rr::rdata::{self, NULL, SOA, TXT};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;

#[allow(unused_imports)] // not every test binary that includes `common` needs it
pub use hickory_server::proto::rr::RecordType as Rtype;

/// TTL of every served record.
pub const TTL: u32 = 60;
/// RR type code of the obsolete SPF record type (RFC 4408, discontinued by RFC 7208).
pub const SPF_TYPE: u16 = 99;

// ---------------------------------------------------------------------------
// Zone data
// ---------------------------------------------------------------------------

/// One record's data. Owner names live in the [`Zone`] map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rec {
    /// TXT with its character-strings exactly as given (each at most 255 octets).
    Txt(Vec<Vec<u8>>),
    /// The obsolete SPF RR type 99 (same wire format as TXT).
    Spf(Vec<Vec<u8>>),
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    /// preference, exchange
    Mx(u16, String),
    Ptr(String),
    Cname(String),
}

impl Rec {
    pub fn rtype(&self) -> RecordType {
        match self {
            Rec::Txt(_) => RecordType::TXT,
            Rec::Spf(_) => RecordType::from(SPF_TYPE),
            Rec::A(_) => RecordType::A,
            Rec::Aaaa(_) => RecordType::AAAA,
            Rec::Mx(..) => RecordType::MX,
            Rec::Ptr(_) => RecordType::PTR,
            Rec::Cname(_) => RecordType::CNAME,
        }
    }

    /// The wire record under `owner`; `None` if a target name is not a valid DNS name.
    fn to_record(&self, owner: &Name) -> Option<Record> {
        let rdata = match self {
            // RFC 1035 3.3.14: TXT-DATA is one or more character-strings. A record given
            // with none (the openspf suite has one) is served as one empty string, which
            // is the closest legal record (joined, both are "").
            Rec::Txt(strings) if strings.is_empty() => RData::TXT(TXT::from_bytes(vec![b""])),
            Rec::Txt(strings) => {
                RData::TXT(TXT::from_bytes(strings.iter().map(Vec::as_slice).collect()))
            }
            Rec::Spf(strings) => {
                let mut wire = Vec::new();
                if strings.is_empty() {
                    wire.push(0);
                }
                for s in strings {
                    wire.push(s.len() as u8);
                    wire.extend_from_slice(s);
                }
                RData::Unknown {
                    code: RecordType::from(SPF_TYPE),
                    rdata: NULL::with(wire),
                }
            }
            Rec::A(ip) => RData::A(rdata::A(*ip)),
            Rec::Aaaa(ip) => RData::AAAA(rdata::AAAA(*ip)),
            Rec::Mx(pref, exchange) => RData::MX(rdata::MX::new(*pref, dns_name(exchange)?)),
            Rec::Ptr(target) => RData::PTR(rdata::PTR(dns_name(target)?)),
            Rec::Cname(target) => RData::CNAME(rdata::CNAME(dns_name(target)?)),
        };
        Some(Record::from_rdata(owner.clone(), TTL, rdata))
    }
}

/// What to do instead of (or before) answering normally.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answer SERVFAIL.
    ServFail,
    /// Answer REFUSED.
    Refused,
    /// Never answer (over UDP and TCP): the client times out.
    Timeout,
    /// Answer normally, but only after this delay.
    Delay(Duration),
}

/// Which query types a [`Fault`] applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Types {
    All,
    Only(Vec<RecordType>),
    AllExcept(Vec<RecordType>),
}

impl Types {
    fn matches(&self, t: RecordType) -> bool {
        match self {
            Types::All => true,
            Types::Only(v) => v.contains(&t),
            Types::AllExcept(v) => !v.contains(&t),
        }
    }
}

#[derive(Clone, Debug)]
struct FaultRule {
    fault: Fault,
    types: Types,
}

/// Normalised key of a domain name: ASCII-lowercased, without the trailing dot.
pub fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Normalised key of a wire name: its raw labels, ASCII-lowercased, joined by dots (no
/// escaping, so names with unusual octets such as `foo:bar/baz` or spaces, which the
/// openspf suite uses, match the zone's spelling).
pub fn key_of(name: &Name) -> String {
    name.iter()
        .map(|l| String::from_utf8_lossy(l).to_ascii_lowercase())
        .collect::<Vec<_>>()
        .join(".")
}

/// A wire name from the zone's spelling (labels taken verbatim, split at dots); `None` if
/// it is not a valid DNS name (empty or over-long label).
fn dns_name(name: &str) -> Option<Name> {
    let n = name.trim_end_matches('.');
    if n.is_empty() {
        return Some(Name::root());
    }
    let labels = n
        .split('.')
        .map(|l| Label::from_raw_bytes(l.as_bytes()))
        .collect::<Result<Vec<_>, _>>()
        .ok()?;
    Name::from_labels(labels).ok()
}

/// The reverse-lookup name of an IP (`4.3.2.1.in-addr.arpa`, nibbles for IPv6).
pub fn reverse_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut s = String::new();
            for b in v6.octets().iter().rev() {
                s.push_str(&format!("{:x}.{:x}.", b & 0xf, b >> 4));
            }
            s.push_str("ip6.arpa");
            s
        }
    }
}

/// Split `data` into DNS character-strings of at most 255 octets (one empty string for
/// empty data).
pub fn split_255(data: &[u8]) -> Vec<Vec<u8>> {
    if data.is_empty() {
        return vec![Vec::new()];
    }
    data.chunks(255).map(<[u8]>::to_vec).collect()
}

/// The data the server answers from. Cheap to clone; built with the chaining methods.
#[derive(Clone, Debug, Default)]
pub struct Zone {
    records: BTreeMap<String, Vec<Rec>>,
    faults: BTreeMap<String, Vec<FaultRule>>,
}

impl Zone {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add any record.
    pub fn add(&mut self, name: &str, rec: Rec) -> &mut Self {
        if let Rec::Txt(s) | Rec::Spf(s) = &rec {
            for part in s {
                assert!(
                    part.len() <= 255,
                    "TXT character-string longer than 255 octets for {name}"
                );
            }
        }
        self.records.entry(key(name)).or_default().push(rec);
        self
    }

    /// Declare that a name exists without giving it records (NODATA for every type).
    pub fn touch(&mut self, name: &str) -> &mut Self {
        self.records.entry(key(name)).or_default();
        self
    }

    /// Add a fault rule for a name (the first matching rule applies).
    pub fn add_fault(&mut self, name: &str, fault: Fault, types: Types) -> &mut Self {
        self.faults
            .entry(key(name))
            .or_default()
            .push(FaultRule { fault, types });
        self
    }

    /// TXT record; data longer than 255 octets is split into several character-strings
    /// (as zone files do for long DKIM keys).
    pub fn txt(mut self, name: &str, data: &str) -> Self {
        self.add(name, Rec::Txt(split_255(data.as_bytes())));
        self
    }

    /// TXT record from raw octets (split at 255 octets).
    pub fn txt_bytes(mut self, name: &str, data: &[u8]) -> Self {
        self.add(name, Rec::Txt(split_255(data)));
        self
    }

    /// TXT record with exactly these character-strings (each at most 255 octets).
    pub fn txt_strings(mut self, name: &str, strings: &[&str]) -> Self {
        self.add(
            name,
            Rec::Txt(strings.iter().map(|s| s.as_bytes().to_vec()).collect()),
        );
        self
    }

    /// Record of the obsolete SPF type 99 with exactly these character-strings.
    pub fn spf_rr(mut self, name: &str, strings: &[&str]) -> Self {
        self.add(
            name,
            Rec::Spf(strings.iter().map(|s| s.as_bytes().to_vec()).collect()),
        );
        self
    }

    pub fn a(mut self, name: &str, ip: &str) -> Self {
        let ip: Ipv4Addr = ip.parse().expect("IPv4 address");
        self.add(name, Rec::A(ip));
        self
    }

    pub fn aaaa(mut self, name: &str, ip: &str) -> Self {
        let ip: Ipv6Addr = ip.parse().expect("IPv6 address");
        self.add(name, Rec::Aaaa(ip));
        self
    }

    pub fn mx(mut self, name: &str, preference: u16, exchange: &str) -> Self {
        self.add(name, Rec::Mx(preference, exchange.to_string()));
        self
    }

    /// PTR record at an explicit owner name (e.g. `4.3.2.1.in-addr.arpa`).
    pub fn ptr(mut self, name: &str, target: &str) -> Self {
        self.add(name, Rec::Ptr(target.to_string()));
        self
    }

    /// PTR record for an IP address (the reverse name is computed).
    pub fn ptr_ip(self, ip: &str, target: &str) -> Self {
        let ip: IpAddr = ip.parse().expect("IP address");
        self.ptr(&reverse_name(ip), target)
    }

    pub fn cname(mut self, name: &str, target: &str) -> Self {
        self.add(name, Rec::Cname(target.to_string()));
        self
    }

    /// Every query for `name` gets SERVFAIL.
    pub fn servfail(mut self, name: &str) -> Self {
        self.add_fault(name, Fault::ServFail, Types::All);
        self
    }

    /// Queries for `name` of type `t` get SERVFAIL.
    pub fn servfail_type(mut self, name: &str, t: RecordType) -> Self {
        self.add_fault(name, Fault::ServFail, Types::Only(vec![t]));
        self
    }

    /// Queries for `name` are never answered.
    pub fn timeout(mut self, name: &str) -> Self {
        self.add_fault(name, Fault::Timeout, Types::All);
        self
    }

    /// Queries for `name` of type `t` are never answered.
    pub fn timeout_type(mut self, name: &str, t: RecordType) -> Self {
        self.add_fault(name, Fault::Timeout, Types::Only(vec![t]));
        self
    }

    /// Answers for `name` are delayed by `d`.
    pub fn delay(mut self, name: &str, d: Duration) -> Self {
        self.add_fault(name, Fault::Delay(d), Types::All);
        self
    }

    /// Records of `name` (normalised key), for inspection.
    pub fn records(&self, name: &str) -> &[Rec] {
        self.records.get(&key(name)).map_or(&[], Vec::as_slice)
    }

    /// Every owner name with records, normalised.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.records.keys().map(String::as_str)
    }

    /// Does the name exist: records, faults, or a descendant that has some
    /// (an "empty non-terminal" exists too: NODATA, not NXDOMAIN).
    pub fn exists(&self, k: &str) -> bool {
        if self.records.contains_key(k) || self.faults.contains_key(k) {
            return true;
        }
        let suffix = format!(".{k}");
        self.records
            .keys()
            .chain(self.faults.keys())
            .any(|n| n.ends_with(&suffix))
    }

    fn fault_for(&self, k: &str, t: RecordType) -> Option<&Fault> {
        self.faults
            .get(k)?
            .iter()
            .find(|r| r.types.matches(t))
            .map(|r| &r.fault)
    }

    /// Compute the answer to one question (pure function of the zone; no I/O).
    pub fn resolve(&self, qname: &Name, qtype: RecordType) -> Answer {
        let mut answers = Vec::new();
        let mut delay = Duration::ZERO;
        let mut owner = qname.clone();
        let mut seen = BTreeSet::new();
        loop {
            let k = key_of(&owner);
            if !seen.insert(k.clone()) || seen.len() > 16 {
                // CNAME loop or absurd chain: what a recursive resolver reports.
                return Answer::reply(ResponseCode::ServFail, vec![], delay);
            }
            match self.fault_for(&k, qtype) {
                Some(Fault::ServFail) => {
                    return Answer::reply(ResponseCode::ServFail, vec![], delay);
                }
                Some(Fault::Refused) => {
                    return Answer::reply(ResponseCode::Refused, vec![], delay);
                }
                Some(Fault::Timeout) => return Answer::NoReply,
                Some(Fault::Delay(d)) => delay += *d,
                None => {}
            }
            let recs = self.records.get(&k).map_or(&[][..], Vec::as_slice);
            let matching: Vec<Record> = recs
                .iter()
                .filter(|r| r.rtype() == qtype)
                .filter_map(|r| r.to_record(&owner))
                .collect();
            if !matching.is_empty() {
                answers.extend(matching);
                return Answer::reply(ResponseCode::NoError, answers, delay);
            }
            let cname = recs.iter().find_map(|r| match r {
                Rec::Cname(t) if qtype != RecordType::CNAME => Some(t.clone()),
                _ => None,
            });
            if let Some(target) = cname {
                let Some(target_name) = dns_name(&target) else {
                    return Answer::reply(ResponseCode::ServFail, answers, delay);
                };
                if let Some(r) = Rec::Cname(target).to_record(&owner) {
                    answers.push(r);
                }
                owner = target_name;
                continue;
            }
            let mut soa_owner = owner.clone();
            while soa_owner.num_labels() > 2 {
                soa_owner = soa_owner.base_name();
            }
            let soa = soa_record(&soa_owner);
            let code = if self.exists(&k) {
                ResponseCode::NoError
            } else {
                ResponseCode::NXDomain
            };
            return Answer::Reply {
                code,
                answers,
                authority: vec![soa],
                delay,
            };
        }
    }
}

fn soa_record(zone: &Name) -> Record {
    let mname = Name::from_ascii("ns.test-dns.invalid.").expect("mname");
    let rname = Name::from_ascii("hostmaster.test-dns.invalid.").expect("rname");
    Record::from_rdata(
        zone.clone(),
        TTL,
        RData::SOA(SOA::new(mname, rname, 1, 3600, 600, 86400, TTL)),
    )
}

/// Outcome for one question.
#[derive(Clone, Debug)]
pub enum Answer {
    /// The query is dropped (the client times out).
    NoReply,
    Reply {
        code: ResponseCode,
        answers: Vec<Record>,
        authority: Vec<Record>,
        delay: Duration,
    },
}

impl Answer {
    fn reply(code: ResponseCode, answers: Vec<Record>, delay: Duration) -> Answer {
        Answer::Reply {
            code,
            answers,
            authority: vec![],
            delay,
        }
    }
}

// ---------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------

/// One query seen by the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueryLog {
    /// Query name, normalised (lowercase, no trailing dot).
    pub name: String,
    pub rtype: RecordType,
    /// "udp" or "tcp".
    pub protocol: &'static str,
}

impl fmt::Display for QueryLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} ({})", self.name, self.rtype, self.protocol)
    }
}

struct State {
    zone: RwLock<Zone>,
    delay: RwLock<Duration>,
    blackhole: std::sync::atomic::AtomicBool,
    /// Server-wide faults (see [`DnsServer::set_servfail_all`] and friends).
    servfail_all: std::sync::atomic::AtomicBool,
    refuse_all: std::sync::atomic::AtomicBool,
    /// TTL given to every record served, when not 0 (else [`TTL`]).
    ttl: std::sync::atomic::AtomicU32,
    truncate_udp: std::sync::atomic::AtomicBool,
    tcp_blackhole: std::sync::atomic::AtomicBool,
    count: AtomicU64,
    log: Mutex<Vec<QueryLog>>,
}

struct Handler {
    state: Arc<State>,
}

fn info_without_reply(request: &Request) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.response_code = ResponseCode::ServFail;
    ResponseInfo::from(Header {
        metadata,
        counts: HeaderCounts::default(),
    })
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let st = &self.state;
        st.count.fetch_add(1, Ordering::SeqCst);
        let Some(query) = request.queries.queries().first() else {
            return info_without_reply(request);
        };
        let qname = query.original().name().clone();
        let qtype = query.query_type();
        st.log.lock().unwrap().push(QueryLog {
            name: key_of(&qname),
            rtype: qtype,
            protocol: match request.protocol() {
                Protocol::Udp => "udp",
                Protocol::Tcp => "tcp",
                _ => "other",
            },
        });
        if st.blackhole.load(Ordering::SeqCst) {
            return info_without_reply(request);
        }
        let over_tcp = request.protocol() == Protocol::Tcp;
        if over_tcp && st.tcp_blackhole.load(Ordering::SeqCst) {
            return info_without_reply(request);
        }
        let global_delay = *st.delay.read().unwrap();
        let mut answer = st.zone.read().unwrap().resolve(&qname, qtype);
        if st.servfail_all.load(Ordering::SeqCst) {
            answer = Answer::reply(ResponseCode::ServFail, vec![], Duration::ZERO);
        }
        if st.refuse_all.load(Ordering::SeqCst) {
            answer = Answer::reply(ResponseCode::Refused, vec![], Duration::ZERO);
        }
        let ttl = st.ttl.load(Ordering::SeqCst);
        if ttl != 0
            && let Answer::Reply {
                answers, authority, ..
            } = &mut answer
        {
            for r in answers.iter_mut().chain(authority.iter_mut()) {
                r.ttl = ttl;
                if let RData::SOA(soa) = &mut r.data {
                    soa.minimum = ttl;
                }
            }
        }
        // A truncated UDP answer: TC set, every section empty (RFC 2181 9: the client
        // must retry over TCP rather than use a partial answer).
        let truncate = !over_tcp && st.truncate_udp.load(Ordering::SeqCst);
        if truncate && let Answer::Reply { code, delay, .. } = answer {
            answer = Answer::reply(code, vec![], delay);
        }
        let Answer::Reply {
            code,
            answers,
            authority,
            delay,
        } = answer
        else {
            return info_without_reply(request);
        };
        let total_delay = global_delay + delay;
        if !total_delay.is_zero() {
            tokio::time::sleep(total_delay).await;
        }
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.response_code = code;
        metadata.truncation = truncate;
        metadata.authoritative = true;
        metadata.recursion_available = true;
        // An OPT record in the request requires one in the response (RFC 6891 6.1.1);
        // it also sets the UDP size limit the response is truncated to.
        let edns = request.edns.as_ref().map(|req| {
            let mut e = Edns::new();
            e.set_max_payload(req.max_payload().clamp(512, 1232));
            e
        });
        let builder = MessageResponseBuilder::new(&request.queries, edns.as_ref());
        let response = builder.build(
            metadata,
            answers.iter(),
            authority.iter(),
            std::iter::empty(),
            std::iter::empty(),
        );
        match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(e) => {
                eprintln!("test dns server: sending the response failed: {e}");
                info_without_reply(request)
            }
        }
    }
}

/// The running server. Stops (and frees its port) when dropped.
pub struct DnsServer {
    addr: SocketAddr,
    state: Arc<State>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DnsServer {
    /// Start serving `zone` on 127.0.0.1 (UDP and TCP on the same, free port).
    pub fn start(zone: Zone) -> DnsServer {
        Self::start_on(zone, None).expect("bind the test DNS server")
    }

    /// Start serving `zone` at `at` (UDP and TCP), or on 127.0.0.1 at a free port. For
    /// programs that only ask port 53 of the addresses in /etc/resolv.conf (libresolv:
    /// OpenDKIM's tools), pass a 127.x.y.z address and port 53.
    pub fn start_on(zone: Zone, at: Option<SocketAddr>) -> std::io::Result<DnsServer> {
        let state = Arc::new(State {
            zone: RwLock::new(zone),
            delay: RwLock::new(Duration::ZERO),
            blackhole: std::sync::atomic::AtomicBool::new(false),
            servfail_all: std::sync::atomic::AtomicBool::new(false),
            refuse_all: std::sync::atomic::AtomicBool::new(false),
            ttl: std::sync::atomic::AtomicU32::new(0),
            truncate_udp: std::sync::atomic::AtomicBool::new(false),
            tcp_blackhole: std::sync::atomic::AtomicBool::new(false),
            count: AtomicU64::new(0),
            log: Mutex::new(Vec::new()),
        });
        let bind = match at {
            Some(addr) => Bind::Once(addr),
            None => Bind::Free,
        };
        let (addr, stop, thread) = Self::serve(state.clone(), bind)?;
        Ok(DnsServer {
            addr,
            state,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Runs the server on its own thread, where `bind` says.
    fn serve(
        state: Arc<State>,
        bind: Bind,
    ) -> std::io::Result<(
        SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        std::thread::JoinHandle<()>,
    )> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<std::io::Result<SocketAddr>>();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("test-dns-server".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("dns server runtime");
                rt.block_on(async move {
                    let (udp, tcp) = match bind {
                        Bind::Free => bind_same_port().await,
                        Bind::Again(addr) => bind_at(addr).await,
                        Bind::Once(addr) => match bind_once(addr).await {
                            Ok(pair) => pair,
                            Err(e) => {
                                let _ = ready_tx.send(Err(e));
                                return;
                            }
                        },
                    };
                    let addr = udp.local_addr().expect("udp local_addr");
                    let mut server = Server::new(Handler { state });
                    server.register_socket(udp);
                    server.register_listener(tcp, Duration::from_secs(30), 64);
                    ready_tx.send(Ok(addr)).expect("report dns server address");
                    let _ = stop_rx.await;
                    let _ =
                        tokio::time::timeout(Duration::from_secs(2), server.shutdown_gracefully())
                            .await;
                });
                rt.shutdown_timeout(Duration::from_secs(1));
            })
            .expect("spawn dns server thread");
        let addr = ready_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("dns server did not start")?;
        Ok((addr, stop_tx, thread))
    }

    /// Stops serving: the port is closed (queries get ICMP port unreachable over UDP
    /// and a refused connection over TCP) until [`Self::restart`].
    pub fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Serves again on the same address, with the zone as it is now (it may have been
    /// changed while stopped: a key rotated during the outage).
    pub fn restart(&mut self) {
        self.stop();
        let (addr, stop, thread) = Self::serve(self.state.clone(), Bind::Again(self.addr))
            .expect("serve the test DNS server again");
        assert_eq!(addr, self.addr);
        self.stop = Some(stop);
        self.thread = Some(thread);
    }

    /// When on, every query is answered REFUSED.
    pub fn set_refuse_all(&self, on: bool) {
        self.state.refuse_all.store(on, Ordering::SeqCst);
    }

    /// TTL of every record served from now on (and the negative TTL of its SOA); 0
    /// goes back to [`TTL`].
    pub fn set_ttl(&self, ttl: u32) {
        self.state.ttl.store(ttl, Ordering::SeqCst);
    }

    /// The address (same port for UDP and TCP).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `"127.0.0.1:PORT"`, as written in `[dns] nameservers`.
    pub fn nameserver(&self) -> String {
        self.addr.to_string()
    }

    /// Number of queries received so far (answered or not).
    pub fn query_count(&self) -> u64 {
        self.state.count.load(Ordering::SeqCst)
    }

    /// Every query received so far, in arrival order.
    pub fn queries(&self) -> Vec<QueryLog> {
        self.state.log.lock().unwrap().clone()
    }

    /// Number of queries received for `name` (any type, any protocol).
    pub fn queries_for(&self, name: &str) -> usize {
        let k = key(name);
        self.state
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|q| q.name == k)
            .count()
    }

    /// Forget the query log and reset the counter.
    pub fn reset_queries(&self) {
        self.state.log.lock().unwrap().clear();
        self.state.count.store(0, Ordering::SeqCst);
    }

    /// Replace the zone (takes effect for the next query).
    pub fn set_zone(&self, zone: Zone) {
        *self.state.zone.write().unwrap() = zone;
    }

    /// Change the zone in place.
    pub fn update_zone(&self, f: impl FnOnce(&mut Zone)) {
        f(&mut self.state.zone.write().unwrap());
    }

    /// Delay every answer by `d` (zero: no delay).
    pub fn set_delay(&self, d: Duration) {
        *self.state.delay.write().unwrap() = d;
    }

    /// When on, no query is answered at all (the server still counts them).
    pub fn set_blackhole(&self, on: bool) {
        self.state.blackhole.store(on, Ordering::SeqCst);
    }

    /// When on, every query is answered SERVFAIL, whatever the zone says.
    pub fn set_servfail_all(&self, on: bool) {
        self.state.servfail_all.store(on, Ordering::SeqCst);
    }

    /// When on, every UDP answer is truncated: TC bit set, no records (TCP answers are
    /// whole), so a resolver must retry over TCP.
    pub fn set_truncate_udp(&self, on: bool) {
        self.state.truncate_udp.store(on, Ordering::SeqCst);
    }

    /// When on, queries over TCP are never answered (the connection stays open).
    pub fn set_tcp_blackhole(&self, on: bool) {
        self.state.tcp_blackhole.store(on, Ordering::SeqCst);
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Where the test DNS server listens.
enum Bind {
    /// 127.0.0.1, a free port.
    Free,
    /// This address, or the error (the caller tries another).
    Once(SocketAddr),
    /// This address again after a stop: retried while the old sockets close.
    Again(SocketAddr),
}

/// Bind UDP and TCP on `at`, once.
async fn bind_once(
    at: SocketAddr,
) -> std::io::Result<(tokio::net::UdpSocket, tokio::net::TcpListener)> {
    let udp = tokio::net::UdpSocket::bind(at).await?;
    let tcp = tokio::net::TcpListener::bind(at).await?;
    Ok((udp, tcp))
}

/// Bind UDP and TCP on `addr` again (after a stop), retrying while the old sockets
/// are being closed.
async fn bind_at(addr: SocketAddr) -> (tokio::net::UdpSocket, tokio::net::TcpListener) {
    let mut last_err = None;
    for _ in 0..100 {
        match tokio::net::UdpSocket::bind(addr).await {
            Ok(udp) => match tokio::net::TcpListener::bind(addr).await {
                Ok(tcp) => return (udp, tcp),
                Err(e) => last_err = Some(e),
            },
            Err(e) => last_err = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("could not bind {addr} again: {last_err:?}");
}

/// Bind UDP on 127.0.0.1:0 and TCP on the same port (retrying if another process
/// happens to hold that TCP port).
async fn bind_same_port() -> (tokio::net::UdpSocket, tokio::net::TcpListener) {
    let mut last_err = None;
    for _ in 0..50 {
        let udp = tokio::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind udp 127.0.0.1:0");
        let port = udp.local_addr().expect("udp local_addr").port();
        match tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await {
            Ok(tcp) => return (udp, tcp),
            Err(e) => last_err = Some(e),
        }
    }
    panic!("could not bind UDP and TCP on one loopback port: {last_err:?}");
}
