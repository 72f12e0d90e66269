//! Verification cost of one message, against the bare RSA verification underneath it.
//!
//! Run with `cargo bench --bench verify`. In one run, on the same signature bytes:
//!
//! - (a) `floor`: one RSA-2048 PKCS#1 v1.5 SHA-256 signature verification with aws-lc-rs
//!   directly (`UnparsedPublicKey::verify`, the call and algorithm mail-auth makes), over
//!   the exact octets the DKIM signer signed (canonical headers + the `DKIM-Signature`
//!   header without `b=`);
//! - (b) `enforcer`: the whole verification of a 4 KB message with one RSA-2048 DKIM
//!   signature (relaxed/relaxed) through `Enforcer::evaluate`, as the proxy and `check`
//!   call it: SPF for MAIL FROM and HELO, DKIM, ARC, DMARC, the spoof checks and the
//!   built-in policy, with a warm DNS cache;
//! - (c) `dkim`: DKIM alone through mail-auth (`AuthenticatedMessage::parse` +
//!   `MessageAuthenticator::verify_dkim`, the same resolver settings), to show where the
//!   time goes.
//!
//! After Criterion's output it prints a markdown table: case, median, ratio to the
//! floor (the target is (b) ≤ 2 × (a)). The medians are Criterion's own statistic (the
//! median of the per-iteration times of the measured samples), taken from the samples
//! this process recorded. On a loaded machine the cases, measured one after the other,
//! do not see the same load, so the ratio of two medians can be far off; the table also
//! gives a paired ratio: after Criterion, ~1 ms batches of the floor and of the case
//! alternate `PAIRS` times and the median (and quartiles) of the per-pair ratios is
//! reported. The target verdict uses the paired ratio.
//!
//! DNS is a real authoritative server on 127.0.0.1 (`tests/common/dns.rs`) serving the
//! DKIM key, SPF and DMARC records; `[dns] nameservers` points at it. One verification
//! before each case warms hickory's cache (records have a 60 s TTL), and the queries the
//! server receives while a case is measured are counted and printed: they must be 0.
//!
//! The RSA key is generated in setup with aws-lc-rs (already in the tree through rustls
//! and mail-auth): no private key is committed, and the cost of verifying does not
//! depend on which 2048-bit key (e = 65537) it is.

#[path = "../tests/common/dns.rs"]
mod dns;

use std::cell::RefCell;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{
    KeyPair, RSA_PKCS1_1024_8192_SHA256_FOR_LEGACY_USE_ONLY, RsaKeyPair, UnparsedPublicKey,
};
use criterion::{Criterion, SamplingMode};
use mail_auth::common::crypto::{Algorithm, RsaKey, Sha256, SigningKey};
use mail_auth::common::headers::{HeaderWriter, Writable};
use mail_auth::dkim::{Canonicalization, DkimSigner};
use mail_auth::{AuthenticatedMessage, DkimResult, MessageAuthenticator};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use smtp_proto::{MailFrom, RcptTo};

use mailwarden::auth::AuthResult;
use mailwarden::config::{Config, Purpose, Role};
use mailwarden::policy::MessageContext;
use mailwarden::policy::engine::Enforcer;
use mailwarden::policy::message::ParsedMessage;

use dns::{DnsServer, Zone};

const SAMPLE_SIZE: usize = 30;
const MEASUREMENT_TIME: Duration = Duration::from_secs(5);
const WARM_UP_TIME: Duration = Duration::from_secs(2);
/// Size of the whole message, `DKIM-Signature` included.
const MESSAGE_SIZE: usize = 4096;

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const HELO: &str = "mx1.example.com";
const MAIL_FROM: &str = "alice@example.com";
const RCPT: &str = "bob@example.org";
const SELECTOR: &str = "s2026";
const DOMAIN: &str = "example.com";

/// A mail-auth signing key that is mail-auth's own `RsaKey` and also keeps the octets it
/// was asked to sign, so that (a) verifies exactly what the DKIM verifier verifies.
struct RecordingKey {
    inner: RsaKey<Sha256>,
    signed: Arc<Mutex<Vec<u8>>>,
}

impl SigningKey for RecordingKey {
    type Hasher = Sha256;

    fn sign(&self, input: impl Writable) -> mail_auth::Result<Vec<u8>> {
        let mut data = Vec::new();
        input.write(&mut data);
        let signature = self.inner.sign(data.as_slice())?;
        *self.signed.lock().unwrap() = data;
        Ok(signature)
    }

    fn algorithm(&self) -> Algorithm {
        self.inner.algorithm()
    }
}

/// Standard base64 with padding (for the `p=` tag).
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | (u32::from(b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The message as the sender's outbound MTA hands it over, before signing: a
/// submission `Received:` line, the usual headers, a plain-text body. The body is
/// padded so that the signed message is `MESSAGE_SIZE` octets.
fn unsigned_message(body_len: usize) -> Vec<u8> {
    let headers = "Received: from [198.51.100.23] (dyn-23.client.example.net [198.51.100.23])\r\n\
        \tby smtp-out.example.com (Postfix) with ESMTPSA id 4XbQ7n0kz2z9sWb\r\n\
        \tfor <bob@example.org>; Tue, 14 Apr 2026 09:12:44 +0000 (UTC)\r\n\
        MIME-Version: 1.0\r\n\
        From: \"Alice Example\" <alice@example.com>\r\n\
        Date: Tue, 14 Apr 2026 11:12:41 +0200\r\n\
        Message-ID: <CAF7x2kLq9RZ+3mWn0pYtV8d@mail.example.com>\r\n\
        Subject: Re: Q2 supplier contract - revised delivery schedule\r\n\
        To: Bob Recipient <bob@example.org>\r\n\
        Cc: procurement@example.org\r\n\
        Content-Type: text/plain; charset=\"UTF-8\"\r\n\
        Content-Transfer-Encoding: 7bit\r\n\
        \r\n";
    let lines = [
        "Hi Bob,",
        "",
        "thanks for the quick turnaround on the draft. I went through the revised",
        "delivery schedule with our logistics team this morning and we can live with",
        "most of it. Two points remain open on our side:",
        "",
        "1. The first partial shipment moves from week 18 to week 20. That is fine as",
        "   long as the penalty clause in section 7.2 moves with it; otherwise we would",
        "   be in breach of our own commitments towards the Hamburg site.",
        "2. The payment terms still say 30 days net. We agreed on 45 days in the call",
        "   on the 2nd; could you ask legal to update section 9 accordingly?",
        "",
        "If both are acceptable, I will send the signed copy back by Friday.",
        "",
        "> On Mon, 13 Apr 2026 at 17:03, Bob Recipient <bob@example.org> wrote:",
        "> please find attached the revised schedule. We moved the first partial",
        "> shipment by two weeks because of the supplier audit; everything else stays",
        "> as discussed.",
        "",
        "Best regards,",
        "Alice",
        "",
    ];
    // Whole lines while they fit, then one filler line to reach `body_len` (±1).
    let mut body = String::new();
    for line in lines.iter().cycle() {
        if body.len() + line.len() + 2 > body_len {
            break;
        }
        body.push_str(line);
        body.push_str("\r\n");
    }
    if body_len >= body.len() + 3 {
        body.push_str(&"-".repeat(body_len - body.len() - 2));
        body.push_str("\r\n");
    }
    format!("{headers}{body}").into_bytes()
}

/// Everything a run needs: the signed message, the key, the DNS server.
struct Fixture {
    message: Vec<u8>,
    /// The octets signed by RSA (canonical headers, then the signature header without b=).
    signed: Vec<u8>,
    signature: Vec<u8>,
    /// RSAPublicKey DER: what mail-auth hands aws-lc-rs after stripping the SPKI prefix.
    public_key_pkcs1: Vec<u8>,
    dns: DnsServer,
}

fn fixture() -> Fixture {
    let pair = RsaKeyPair::generate(KeySize::Rsa2048).expect("generate an RSA-2048 key");
    let pkcs8 = pair.as_der().expect("PKCS#8 of the key");
    let spki = pair.public_key().as_der().expect("SPKI of the public key");
    let public_key_pkcs1 = pair.public_key().as_ref().to_vec();
    let inner = RsaKey::<Sha256>::from_key_der(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        pkcs8.as_ref().to_vec(),
    )))
    .expect("mail-auth takes the key");
    let signed = Arc::new(Mutex::new(Vec::new()));
    let signer = DkimSigner::from_key(RecordingKey {
        inner,
        signed: signed.clone(),
    })
    .domain(DOMAIN)
    .selector(SELECTOR)
    .headers([
        "From",
        "To",
        "Cc",
        "Subject",
        "Date",
        "Message-ID",
        "MIME-Version",
        "Content-Type",
        "Content-Transfer-Encoding",
    ])
    .header_canonicalization(Canonicalization::Relaxed)
    .body_canonicalization(Canonicalization::Relaxed);

    // Size the body so that the signed message is MESSAGE_SIZE octets.
    let probe = unsigned_message(3000);
    let header_len = signer.sign(&probe).expect("sign").to_header().len();
    let unsigned_len = unsigned_message(0).len();
    let mut unsigned = unsigned_message(MESSAGE_SIZE - header_len - unsigned_len);
    let mut signature = signer.sign(&unsigned).expect("sign");
    let mut message = signature.to_header().into_bytes();
    message.append(&mut unsigned);
    let message = mailwarden::wire::codec::canonicalize(&message);
    let signed = std::mem::take(&mut *signed.lock().unwrap());
    let signature = std::mem::take(&mut signature.b);
    UnparsedPublicKey::new(
        &RSA_PKCS1_1024_8192_SHA256_FOR_LEGACY_USE_ONLY,
        &public_key_pkcs1,
    )
    .verify(&signed, &signature)
    .expect("the recorded octets verify");

    let zone = Zone::new()
        .txt(
            &format!("{SELECTOR}._domainkey.{DOMAIN}"),
            &format!("v=DKIM1; k=rsa; p={}", base64(spki.as_ref())),
        )
        .txt(
            DOMAIN,
            "v=spf1 ip4:198.51.100.0/24 ip4:192.0.2.0/24 include:_spf.mailhost.example.net -all",
        )
        .txt(
            DOMAIN,
            "google-site-verification=rXOxyZounnZasA8Z7oaD3c14JdjS9aKSWvsR1EbUSIQ",
        )
        .txt(
            "_spf.mailhost.example.net",
            "v=spf1 ip4:203.0.113.0/24 -all",
        )
        .txt(HELO, "v=spf1 a -all")
        .a(HELO, &CLIENT_IP.to_string())
        .txt(
            &format!("_dmarc.{DOMAIN}"),
            "v=DMARC1; p=reject; rua=mailto:dmarc-reports@example.com; adkim=r; aspf=r",
        );
    let dns = DnsServer::start(zone);
    Fixture {
        message,
        signed,
        signature,
        public_key_pkcs1,
        dns,
    }
}

/// The per-iteration times of the samples Criterion measured. `iter_custom` is called
/// for the warm-up (1, 2, 4, ... iterations) and then once per sample (d, 2d, ... nd
/// iterations, linear sampling): the measured samples are the longest trailing run of
/// calls whose iteration counts are 1, 2, 3... times the first one's.
#[derive(Default)]
struct Calls(RefCell<Vec<(u64, Duration)>>);

impl Calls {
    fn record(&self, iters: u64, elapsed: Duration) -> Duration {
        self.0.borrow_mut().push((iters, elapsed));
        elapsed
    }

    /// Median time per iteration, nanoseconds, and the number of samples.
    fn median_ns(&self) -> Option<(f64, usize)> {
        let calls = self.0.borrow();
        // Fewer than 2 samples: --test or --profile-time, nothing was measured.
        let n = (2..=calls.len()).rev().find(|&n| {
            let tail = &calls[calls.len() - n..];
            let d = tail[0].0;
            tail.iter()
                .enumerate()
                .all(|(i, &(iters, _))| iters == d * (i as u64 + 1))
        })?;
        let mut per_iter: Vec<f64> = calls[calls.len() - n..]
            .iter()
            .map(|&(iters, t)| t.as_nanos() as f64 / iters as f64)
            .collect();
        per_iter.sort_by(f64::total_cmp);
        let mid = per_iter.len() / 2;
        let median = if per_iter.len().is_multiple_of(2) {
            (per_iter[mid - 1] + per_iter[mid]) / 2.0
        } else {
            per_iter[mid]
        };
        Some((median, n))
    }
}

fn format_ns(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.3} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

fn main() {
    let fx = fixture();
    let config_source = format!(
        r#"
hostname = "mx.example.org"
local_domains = ["example.org"]

[dns]
nameservers = ["{}"]

[spoof]
protected_names = ["Carol Director"]
"#,
        fx.dns.nameserver()
    );
    let config = Config::parse_for(
        &config_source,
        Path::new("benches/verify.rs"),
        Purpose::Offline,
    )
    .expect("bench configuration");
    // Like `mailwarden check`: one current-thread runtime.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let (enforcer, authenticator): (Enforcer, MessageAuthenticator) = rt.block_on(async {
        (
            Enforcer::from_config(&config).expect("enforcer"),
            mailwarden::auth::dns::authenticator(&config.dns).expect("authenticator"),
        )
    });

    let mail_from = MailFrom {
        address: MAIL_FROM.to_string(),
        ..Default::default()
    };
    let rcpts = [RcptTo {
        address: RCPT.to_string(),
        ..Default::default()
    }];
    // Parsed once, outside the timed loop, as the pipeline hands it to the rules stage.
    let parsed = ParsedMessage::parse(&fx.message);
    let ctx = MessageContext {
        session_id: "bench",
        client: SocketAddr::new(IpAddr::V4(CLIENT_IP), 40123),
        helo: HELO,
        role: Role::Inbound,
        tls: true,
        mail_from: &mail_from,
        rcpts: &rcpts,
        message: &parsed,
        outbound: None,
    };

    // One verification: warms the caches and checks that everything passes.
    let warm_enforcer = || {
        let verdict = rt.block_on(enforcer.evaluate(&ctx));
        let report = verdict.report.as_ref().expect("inbound mail is verified");
        assert_eq!(
            report.spf.mail_from.result,
            AuthResult::Pass,
            "SPF mail from"
        );
        assert_eq!(report.spf.helo.result, AuthResult::Pass, "SPF helo");
        assert_eq!(report.dkim.len(), 1, "one DKIM signature");
        assert_eq!(
            report.dkim[0].result,
            AuthResult::Pass,
            "DKIM: {:?}",
            report.dkim[0].reason
        );
        assert_eq!(report.arc.result, AuthResult::None, "ARC");
        assert_eq!(report.dmarc.result, AuthResult::Pass, "DMARC");
        assert!(verdict.flags.is_empty(), "no spoof flags");
        verdict
    };
    let warm_dkim = || {
        rt.block_on(async {
            let msg = AuthenticatedMessage::parse(&fx.message).expect("parse");
            let out = authenticator.verify_dkim(&msg).await;
            assert_eq!(out.len(), 1);
            assert_eq!(*out[0].result(), DkimResult::Pass);
        })
    };
    let verdict = warm_enforcer();
    warm_dkim();

    eprintln!(
        "message: {} octets, {} header fields; signed octets: {}; verdict: {} (rule {}); \
         Authentication-Results: {}",
        fx.message.len(),
        parsed.fields().len(),
        fx.signed.len(),
        verdict.rule_match.action.as_str(),
        verdict.rule_match.rule,
        verdict.authentication_results.as_deref().unwrap_or("-")
    );

    let mut c = Criterion::default()
        .sample_size(SAMPLE_SIZE)
        .measurement_time(MEASUREMENT_TIME)
        .warm_up_time(WARM_UP_TIME)
        .without_plots()
        .configure_from_args();
    let mut group = c.benchmark_group("verify");
    group.sampling_mode(SamplingMode::Linear);

    // One batch of `iters` iterations of each case, timed; shared by Criterion and the
    // paired phase.
    let key = UnparsedPublicKey::new(
        &RSA_PKCS1_1024_8192_SHA256_FOR_LEGACY_USE_ONLY,
        fx.public_key_pkcs1.as_slice(),
    );
    let run_floor = |iters: u64| {
        let start = Instant::now();
        for _ in 0..iters {
            let ok = black_box(&key)
                .verify(black_box(&fx.signed), black_box(&fx.signature))
                .is_ok();
            black_box(ok);
        }
        start.elapsed()
    };
    let run_enforcer = |iters: u64| {
        rt.block_on(async {
            let start = Instant::now();
            for _ in 0..iters {
                black_box(enforcer.evaluate(black_box(&ctx)).await);
            }
            start.elapsed()
        })
    };
    let run_dkim = |iters: u64| {
        rt.block_on(async {
            let start = Instant::now();
            for _ in 0..iters {
                let msg = AuthenticatedMessage::parse(black_box(&fx.message)).expect("parse");
                let out = authenticator.verify_dkim(&msg).await;
                black_box(matches!(out[0].result(), DkimResult::Pass));
            }
            start.elapsed()
        })
    };

    let floor = Calls::default();
    let whole = Calls::default();
    let dkim = Calls::default();
    // DNS queries received while (b) and (c) ran (Criterion, then the paired phase),
    // each after a warm-up verification.
    let mut queries = [None; 3];

    group.bench_function("a_rsa2048_verify_floor", |b| {
        b.iter_custom(|iters| floor.record(iters, run_floor(iters)))
    });
    warm_enforcer();
    fx.dns.reset_queries();
    group.bench_function("b_enforcer_evaluate", |b| {
        b.iter_custom(|iters| whole.record(iters, run_enforcer(iters)))
    });
    queries[1] = Some(fx.dns.query_count());
    warm_dkim();
    fx.dns.reset_queries();
    group.bench_function("c_mail_auth_verify_dkim", |b| {
        b.iter_custom(|iters| dkim.record(iters, run_dkim(iters)))
    });
    queries[2] = Some(fx.dns.query_count());
    group.finish();
    c.final_summary();

    // Paired ratios: short batches of the floor and of the case, alternating, so that
    // both see the same load; the median of the per-pair ratios.
    let floor_ns = floor.median_ns().map(|(ns, _)| ns);
    let mut paired_b = None;
    let mut paired_c = None;
    if let Some(f) = floor_ns {
        if let Some((ns, _)) = whole.median_ns() {
            warm_enforcer();
            fx.dns.reset_queries();
            paired_b = Some(paired(&run_floor, f, &run_enforcer, ns));
            queries[1] = queries[1].map(|q| q + fx.dns.query_count());
        }
        if let Some((ns, _)) = dkim.median_ns() {
            warm_dkim();
            fx.dns.reset_queries();
            paired_c = Some(paired(&run_floor, f, &run_dkim, ns));
            queries[2] = queries[2].map(|q| q + fx.dns.query_count());
        }
    }

    let rows = [
        (
            "(a) RSA-2048 verify, aws-lc-rs (floor)",
            &floor,
            None,
            queries[0],
        ),
        (
            "(b) Enforcer::evaluate: SPF×2, DKIM, ARC, DMARC, spoof, policy",
            &whole,
            paired_b,
            queries[1],
        ),
        (
            "(c) mail-auth parse + verify_dkim",
            &dkim,
            paired_c,
            queries[2],
        ),
    ];
    println!();
    println!(
        "{} octets, 1 × rsa-sha256 relaxed/relaxed, warm DNS cache. \"× floor\": ratio of \
         Criterion's medians; \"paired\": median [quartiles] of {PAIRS} interleaved \
         ~{}-ms batch pairs.",
        fx.message.len(),
        PAIR_BATCH.as_millis()
    );
    println!();
    println!("| case | median | × floor | × floor, paired | samples | DNS queries |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (name, calls, pair, q) in rows {
        let q = q.map_or("-".to_string(), |q: u64| q.to_string());
        let pair = pair.map_or("-".to_string(), |(m, q1, q3): (f64, f64, f64)| {
            format!("{m:.2} [{q1:.2}–{q3:.2}]")
        });
        match (calls.median_ns(), floor_ns) {
            (Some((ns, n)), Some(f)) => println!(
                "| {name} | {} | {:.2} | {pair} | {n} | {q} |",
                format_ns(ns),
                ns / f
            ),
            (Some((ns, n)), None) => {
                println!("| {name} | {} | - | - | {n} | {q} |", format_ns(ns))
            }
            (None, _) => println!("| {name} | not measured | - | - | - | - |"),
        }
    }
    if let Some((ratio, _, _)) = paired_b {
        println!();
        println!(
            "target (b) <= 2 x (a), paired: {} ({ratio:.2} x)",
            if ratio <= 2.0 { "met" } else { "NOT met" },
        );
    }
    if queries.iter().flatten().any(|&q| q > 0) {
        println!("warning: DNS queries during measurement: the cache was not warm throughout");
    }
}

/// Batch pairs in the paired phase.
const PAIRS: usize = 1000;
/// Approximate length of one batch in the paired phase.
const PAIR_BATCH: Duration = Duration::from_millis(1);

/// Median and quartiles of the ratio case/floor (time per iteration) over `PAIRS`
/// interleaved batch pairs, the order inside a pair alternating. The batch sizes come
/// from Criterion's medians.
fn paired(
    floor: &dyn Fn(u64) -> Duration,
    floor_ns: f64,
    case: &dyn Fn(u64) -> Duration,
    case_ns: f64,
) -> (f64, f64, f64) {
    let batch = |ns: f64| ((PAIR_BATCH.as_nanos() as f64 / ns).ceil() as u64).max(1);
    let (nf, nc) = (batch(floor_ns), batch(case_ns));
    let per_iter = |d: Duration, n: u64| d.as_nanos() as f64 / n as f64;
    let mut ratios: Vec<f64> = (0..PAIRS)
        .map(|i| {
            let (tf, tc) = if i % 2 == 0 {
                let tf = floor(nf);
                (tf, case(nc))
            } else {
                let tc = case(nc);
                (floor(nf), tc)
            };
            per_iter(tc, nc) / per_iter(tf, nf)
        })
        .collect();
    ratios.sort_by(f64::total_cmp);
    let at = |q: f64| ratios[((ratios.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.25), at(0.75))
}
