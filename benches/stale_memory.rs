//! Memory of the serve-stale store (`[dns] stale_max_*`, `src/auth/stale.rs`): 100,000
//! cached records, bytes per record, measured and as the store estimates them.
//!
//! Run with `cargo bench --bench stale_memory`. The heap is measured by a counting
//! global allocator (bytes allocated minus freed) around filling a `StaleStore` with
//! 100,000 answers in the proportions of mail traffic: 40 % DKIM keys (RSA-2048 TXT,
//! 410 bytes), 30 % SPF records (~110 bytes), 30 % DMARC records (~80 bytes); every name
//! distinct. The store's own estimate ([`mailwarden::auth::stale::entry_bytes`], the
//! figure `stale_max_bytes` bounds) is printed beside the measurement, so that the bound
//! can be trusted to hold the real heap: the estimate must not be below it. Then the
//! byte bound is checked: a store limited to 10 MiB (estimated) filled with the same
//! 100,000 records stays under it, measured.

use std::time::{Duration, Instant};

use hickory_resolver::proto::rr::rdata::TXT;
use hickory_resolver::proto::rr::{RData, RecordType};
use mailwarden::auth::stale::{StaleStore, StoredAnswer, entry_bytes};

/// Resident memory of this process in bytes (`/proc/self/statm`, pages × 4 KiB).
fn rss() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("resident pages");
    pages * 4096
}

const RECORDS: usize = 100_000;

/// The i-th record: (name, TXT text).
fn record(i: usize) -> (String, String) {
    match i % 10 {
        0..4 => (
            format!("s{i}._domainkey.sender{i}.example."),
            format!("v=DKIM1; k=rsa; p={}", "A".repeat(392)),
        ),
        4..7 => (
            format!("sender{i}.example."),
            format!(
                "v=spf1 ip4:192.0.2.0/24 ip4:198.51.100.0/24 include:_spf.mail{i}.example include:relay.example ~all"
            ),
        ),
        _ => (
            format!("_dmarc.sender{i}.example."),
            format!("v=DMARC1; p=reject; rua=mailto:dmarc@sender{i}.example; adkim=r"),
        ),
    }
}

fn answer(text: &str) -> StoredAnswer {
    let now = Instant::now();
    StoredAnswer {
        records: vec![RData::TXT(TXT::new(vec![text.to_string()]))].into(),
        fetched: now,
        expires: now + Duration::from_secs(300),
    }
}

fn main() {
    let estimated: usize = (0..RECORDS)
        .map(|i| {
            let (name, text) = record(i);
            entry_bytes(&name, &answer(&text).records)
        })
        .sum();
    let data: usize = (0..RECORDS)
        .map(|i| {
            let (n, t) = record(i);
            n.len() + t.len()
        })
        .sum();

    // What filling the store adds to the resident set: the entries, the map and the
    // allocator's own overhead (the transient strings of each step are freed and reused).
    let before = rss();
    let store = StaleStore::new(RECORDS, usize::MAX / 2, Duration::from_secs(86_400));
    for i in 0..RECORDS {
        let (name, text) = record(i);
        store.put(&name, RecordType::TXT, answer(&text));
    }
    let measured = (rss() - before) as f64;
    let (entries, store_estimate) = store.usage();
    assert_eq!(entries, RECORDS);
    assert_eq!(store_estimate, estimated);
    let per = |b: f64| b / RECORDS as f64;
    let mib = |b: f64| b / 1_048_576.0;
    println!("serve-stale store, {RECORDS} records (40 % DKIM RSA-2048, 30 % SPF, 30 % DMARC)");
    println!(
        "  record data (names + TXT text): {:>6.0} bytes/record",
        per(data as f64)
    );
    println!(
        "  measured (RSS growth):          {:>6.0} bytes/record ({:.1} MiB)",
        per(measured),
        mib(measured)
    );
    println!(
        "  store's estimate:               {:>6.0} bytes/record ({:.1} MiB)",
        per(estimated as f64),
        mib(estimated as f64)
    );
    println!(
        "  estimate / measured:            {:>6.2}",
        estimated as f64 / measured
    );
    drop(store);

    // The byte bound, measured the same way (after the first store was freed, the
    // allocator reuses its memory: growth is measured from here).
    let bound = 10 << 20;
    let before = rss();
    let store = StaleStore::new(RECORDS, bound, Duration::from_secs(86_400));
    for i in 0..RECORDS {
        let (name, text) = record(i);
        store.put(&name, RecordType::TXT, answer(&text));
    }
    let (entries, est) = store.usage();
    println!(
        "  bounded to {} MiB (estimated): {entries} entries kept, estimate {:.1} MiB, RSS growth {:.1} MiB (memory freed by the first store is reused)",
        bound >> 20,
        mib(est as f64),
        mib(rss().saturating_sub(before) as f64)
    );
    assert!(est <= bound);
}
