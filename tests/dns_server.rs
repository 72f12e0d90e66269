//! Unit tests of the loopback test DNS server (tests/common/dns.rs), queried with
//! hickory-resolver over UDP and TCP.

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use common::dns::{DnsServer, Fault, Rtype, Types, Zone, reverse_name};
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::{Resolver, TokioResolver};

struct Opts {
    timeout: Duration,
    edns0: bool,
    udp: bool,
    case_randomization: bool,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            timeout: Duration::from_secs(5),
            edns0: true,
            udp: true,
            case_randomization: false,
        }
    }
}

fn resolver(dns: &DnsServer, o: Opts) -> TokioResolver {
    let mut ns = if o.udp {
        NameServerConfig::udp_and_tcp(dns.addr().ip())
    } else {
        NameServerConfig::tcp(dns.addr().ip())
    };
    for c in &mut ns.connections {
        c.port = dns.addr().port();
    }
    let cfg = ResolverConfig::from_parts(None, vec![], vec![ns]);
    let mut b = Resolver::builder_with_config(cfg, TokioRuntimeProvider::default());
    let opts = b.options_mut();
    opts.timeout = o.timeout;
    opts.attempts = 1;
    opts.cache_size = 0;
    opts.edns0 = o.edns0;
    opts.case_randomization = o.case_randomization;
    b.build().expect("build resolver")
}

fn txt_strings(l: &hickory_resolver::lookup::Lookup) -> Vec<Vec<Vec<u8>>> {
    l.answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::TXT(t) => Some(t.txt_data.iter().map(|s| s.to_vec()).collect()),
            _ => None,
        })
        .collect()
}

fn sample_zone() -> Zone {
    Zone::new()
        .txt("example.com", "v=spf1 ip4:192.0.2.0/24 -all")
        .txt("example.com", "google-site-verification=abc")
        .txt_strings("multi.example.com", &["v=spf1 ", "ip4:192.0.2.1", " -all"])
        .a("mx.example.com", "192.0.2.10")
        .a("mx.example.com", "192.0.2.11")
        .aaaa("mx.example.com", "2001:db8::10")
        .mx("example.com", 10, "mx.example.com")
        .mx("example.com", 20, "backup.example.net")
        .ptr_ip("192.0.2.10", "mx.example.com")
        .ptr_ip("2001:db8::10", "mx.example.com")
        .cname("alias.example.com", "alias2.example.com.")
        .cname("alias2.example.com", "MX.example.com")
        .cname("loop1.example.com", "loop2.example.com")
        .cname("loop2.example.com", "loop1.example.com")
        .cname("dangling.example.com", "nowhere.example.com")
        .txt("deep.sub.example.org", "x")
        .servfail("broken.example.com")
        .servfail_type("halfbroken.example.com", Rtype::TXT)
        .a("halfbroken.example.com", "192.0.2.99")
        .timeout("slow.example.com")
}

#[tokio::test]
async fn txt_a_aaaa_mx_ptr_cname() {
    let dns = DnsServer::start(sample_zone());
    let r = resolver(&dns, Opts::default());

    let l = r.txt_lookup("example.com.").await.expect("TXT example.com");
    let mut got = txt_strings(&l);
    got.sort();
    assert_eq!(
        got,
        vec![
            vec![b"google-site-verification=abc".to_vec()],
            vec![b"v=spf1 ip4:192.0.2.0/24 -all".to_vec()]
        ]
    );

    // Multi-string TXT: the strings arrive separately, unjoined.
    let l = r.txt_lookup("Multi.Example.COM.").await.expect("TXT multi");
    assert_eq!(
        txt_strings(&l),
        vec![vec![
            b"v=spf1 ".to_vec(),
            b"ip4:192.0.2.1".to_vec(),
            b" -all".to_vec()
        ]]
    );

    let l = r.ipv4_lookup("mx.example.com.").await.expect("A");
    let mut v4: Vec<Ipv4Addr> = l
        .answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect();
    v4.sort();
    assert_eq!(
        v4,
        vec![
            "192.0.2.10".parse::<Ipv4Addr>().unwrap(),
            "192.0.2.11".parse().unwrap()
        ]
    );

    let l = r.ipv6_lookup("mx.example.com.").await.expect("AAAA");
    let v6: Vec<Ipv6Addr> = l
        .answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::AAAA(a) => Some(a.0),
            _ => None,
        })
        .collect();
    assert_eq!(v6, vec!["2001:db8::10".parse::<Ipv6Addr>().unwrap()]);

    let l = r.mx_lookup("example.com.").await.expect("MX");
    let mut mx: Vec<(u16, String)> = l
        .answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::MX(m) => Some((m.preference, m.exchange.to_ascii())),
            _ => None,
        })
        .collect();
    mx.sort();
    assert_eq!(
        mx,
        vec![
            (10, "mx.example.com.".to_string()),
            (20, "backup.example.net.".to_string())
        ]
    );

    for ip in ["192.0.2.10", "2001:db8::10"] {
        let ip: IpAddr = ip.parse().unwrap();
        let l = r
            .reverse_lookup(format!("{}.", reverse_name(ip)).as_str())
            .await
            .expect("PTR");
        let ptr: Vec<String> = l
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::PTR(p) => Some(p.0.to_ascii()),
                _ => None,
            })
            .collect();
        assert_eq!(ptr, vec!["mx.example.com.".to_string()], "PTR of {ip}");
    }

    // CNAME chain of two hops, followed inside the zone.
    let l = r
        .ipv4_lookup("alias.example.com.")
        .await
        .expect("A via CNAME");
    let a: Vec<Ipv4Addr> = l
        .answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect();
    assert_eq!(a.len(), 2, "A records through the CNAME chain: {l:?}");
    let cnames = l
        .answers()
        .iter()
        .filter(|r| r.record_type() == Rtype::CNAME)
        .count();
    assert_eq!(cnames, 2, "both CNAME steps in the answer: {l:?}");

    assert!(dns.query_count() >= 8, "count {}", dns.query_count());
    assert!(dns.queries_for("mx.example.com") >= 2);
    assert!(
        dns.queries()
            .iter()
            .any(|q| q.name == "multi.example.com" && q.rtype == Rtype::TXT),
        "query log: {:?}",
        dns.queries()
    );
}

#[tokio::test]
async fn nxdomain_nodata_servfail_loop() {
    let dns = DnsServer::start(sample_zone());
    let r = resolver(&dns, Opts::default());

    let e = r
        .txt_lookup("nonexistent.example.com.")
        .await
        .expect_err("NXDOMAIN");
    assert!(e.is_nx_domain(), "expected NXDOMAIN, got {e:?}");

    // mx.example.com exists (A records) but has no TXT: NODATA, not NXDOMAIN.
    let e = r.txt_lookup("mx.example.com.").await.expect_err("NODATA");
    assert!(
        e.is_no_records_found() && !e.is_nx_domain(),
        "expected NODATA, got {e:?}"
    );

    // Empty non-terminal: sub.example.org has no records but a descendant does.
    let e = r.txt_lookup("sub.example.org.").await.expect_err("ENT");
    assert!(
        e.is_no_records_found() && !e.is_nx_domain(),
        "expected NODATA for an empty non-terminal, got {e:?}"
    );

    // CNAME to a missing name: NXDOMAIN for the target (with the CNAME in the answer).
    let res = r.txt_lookup("dangling.example.com.").await;
    match res {
        Err(e) => assert!(e.is_nx_domain(), "dangling CNAME: {e:?}"),
        Ok(l) => assert!(
            txt_strings(&l).is_empty(),
            "dangling CNAME gave TXT data: {l:?}"
        ),
    }

    for name in ["broken.example.com.", "loop1.example.com."] {
        let e = r.txt_lookup(name).await.expect_err("SERVFAIL");
        assert!(
            !e.is_no_records_found(),
            "{name}: SERVFAIL must not look like NXDOMAIN/NODATA: {e:?}"
        );
        assert!(
            format!("{e:?} {e}").contains("ServFail") || format!("{e}").contains("SERVFAIL"),
            "{name}: expected SERVFAIL, got {e:?}"
        );
    }

    // Per-type fault: TXT fails, A works.
    assert!(r.txt_lookup("halfbroken.example.com.").await.is_err());
    r.ipv4_lookup("halfbroken.example.com.")
        .await
        .expect("A of halfbroken");

    // Pure zone logic, without the network.
    let z = sample_zone();
    let name = hickory_server::proto::rr::Name::from_ascii("loop1.example.com.").unwrap();
    match z.resolve(&name, Rtype::A) {
        common::dns::Answer::Reply { code, .. } => assert_eq!(code, ResponseCode::ServFail),
        other => panic!("loop: {other:?}"),
    }
}

#[tokio::test]
async fn long_txt_goes_over_tcp() {
    // A 4096-bit RSA DKIM key is ~740 octets of base64; make it larger than any UDP limit
    // we allow (1232), so even EDNS clients must retry over TCP.
    let long: String = "v=DKIM1; k=rsa; p="
        .chars()
        .chain((0..2000).map(|i| (b'A' + (i % 26) as u8) as char))
        .collect();
    let dns = DnsServer::start(
        Zone::new()
            .txt("s._domainkey.example.com", &long)
            .txt("mid._domainkey.example.com", &long[..700]),
    );

    for edns0 in [true, false] {
        dns.reset_queries();
        let r = resolver(
            &dns,
            Opts {
                edns0,
                ..Opts::default()
            },
        );
        let l = r
            .txt_lookup("s._domainkey.example.com.")
            .await
            .expect("long TXT");
        let strings = txt_strings(&l);
        assert_eq!(strings.len(), 1);
        assert_eq!(strings[0].len(), 8, "2018 octets in 255-octet strings");
        assert!(strings[0].iter().all(|s| s.len() <= 255));
        assert_eq!(strings[0].concat(), long.as_bytes());
        let protos: Vec<&str> = dns.queries().iter().map(|q| q.protocol).collect();
        assert!(
            protos.contains(&"udp") && protos.contains(&"tcp"),
            "edns0={edns0}: expected a truncated UDP answer then TCP, saw {protos:?}"
        );

        // 700 octets: fits with EDNS (1232), truncated without it (512).
        dns.reset_queries();
        let l = r
            .txt_lookup("mid._domainkey.example.com.")
            .await
            .expect("mid TXT");
        assert_eq!(txt_strings(&l)[0].concat(), &long.as_bytes()[..700]);
        let used_tcp = dns.queries().iter().any(|q| q.protocol == "tcp");
        assert_eq!(used_tcp, !edns0, "edns0={edns0}: {:?}", dns.queries());
    }

    // TCP-only client.
    let r = resolver(
        &dns,
        Opts {
            udp: false,
            ..Opts::default()
        },
    );
    let l = r
        .txt_lookup("s._domainkey.example.com.")
        .await
        .expect("TCP");
    assert_eq!(txt_strings(&l)[0].concat(), long.as_bytes());
}

#[tokio::test]
async fn case_randomization_is_preserved() {
    let dns = DnsServer::start(sample_zone());
    let r = resolver(
        &dns,
        Opts {
            case_randomization: true,
            ..Opts::default()
        },
    );
    for _ in 0..5 {
        r.txt_lookup("multi.example.com.").await.expect("TXT 0x20");
        r.ipv4_lookup("alias.example.com.")
            .await
            .expect("A via CNAME 0x20");
    }
}

#[tokio::test]
async fn timeouts_blackhole_and_delay() {
    let dns =
        DnsServer::start(sample_zone().delay("laggy.example.com", Duration::from_millis(300)));
    let quick = Opts {
        timeout: Duration::from_millis(400),
        ..Opts::default()
    };
    let r = resolver(&dns, quick);

    // Per-name timeout: never answered, over UDP or TCP.
    let before = dns.queries_for("slow.example.com");
    let t = Instant::now();
    let e = r
        .txt_lookup("slow.example.com.")
        .await
        .expect_err("timeout");
    assert!(!e.is_no_records_found(), "{e:?}");
    assert!(t.elapsed() >= Duration::from_millis(350), "{e:?}");
    assert!(dns.queries_for("slow.example.com") > before);

    // Per-name delay below the client timeout: answered (NXDOMAIN here, the name has
    // only a fault rule so it exists: NODATA), after the delay.
    let t = Instant::now();
    let e = r
        .txt_lookup("laggy.example.com.")
        .await
        .expect_err("NODATA");
    assert!(e.is_no_records_found() && !e.is_nx_domain(), "{e:?}");
    assert!(t.elapsed() >= Duration::from_millis(290));

    // Server-wide delay.
    dns.set_delay(Duration::from_millis(200));
    let t = Instant::now();
    r.txt_lookup("example.com.").await.expect("delayed TXT");
    assert!(t.elapsed() >= Duration::from_millis(190));
    dns.set_delay(Duration::ZERO);

    // Blackhole: nothing is answered, but queries are counted.
    dns.set_blackhole(true);
    let n = dns.query_count();
    let e = r
        .txt_lookup("multi.example.com.")
        .await
        .expect_err("blackhole");
    assert!(!e.is_no_records_found(), "{e:?}");
    assert!(dns.query_count() > n);
    dns.set_blackhole(false);
    r.txt_lookup("multi.example.com.")
        .await
        .expect("answers again after the blackhole");

    // Type-selective faults, as used for the openspf TIMEOUT entries.
    dns.update_zone(|z| {
        z.add_fault(
            "partial.example.com",
            Fault::Timeout,
            Types::AllExcept(vec![Rtype::A]),
        );
    });
    dns.update_zone(|z| {
        z.add(
            "partial.example.com",
            common::dns::Rec::A(Ipv4Addr::new(192, 0, 2, 7)),
        );
    });
    r.ipv4_lookup("partial.example.com.")
        .await
        .expect("A answered");
    assert!(r.txt_lookup("partial.example.com.").await.is_err());
}

#[test]
fn sync_start_and_stop() {
    // Usable from a plain #[test] (own runtime thread) and frees the port on drop.
    let dns = DnsServer::start(Zone::new().a("x.test", "192.0.2.1"));
    let addr = dns.addr();
    assert_eq!(addr.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
    assert_ne!(addr.port(), 0);
    assert_eq!(dns.nameserver(), format!("127.0.0.1:{}", addr.port()));
    drop(dns);
    std::net::UdpSocket::bind(addr).expect("UDP port free after drop");
}

#[tokio::test]
async fn drop_is_quick_with_open_tcp_connections() {
    let long = "x".repeat(3000);
    let dns = DnsServer::start(
        Zone::new()
            .txt("big.example", &long)
            .timeout("hang.example"),
    );
    let r = resolver(
        &dns,
        Opts {
            timeout: Duration::from_millis(300),
            udp: false,
            ..Opts::default()
        },
    );
    r.txt_lookup("big.example.").await.expect("TCP lookup");
    let _ = r.txt_lookup("hang.example.").await; // a TCP query left unanswered
    let addr = dns.addr();
    let t = Instant::now();
    drop(dns);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "drop took {:?}",
        t.elapsed()
    );
    std::net::TcpListener::bind(addr).expect("TCP port free after drop");
}
