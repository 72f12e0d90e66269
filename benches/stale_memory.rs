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

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use hickory_resolver::proto::rr::rdata::TXT;
use hickory_resolver::proto::rr::{RData, RecordType};
use mailwarden::auth::stale::{StaleStore, StoredAnswer, entry_bytes};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

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
            format!("v=spf1 ip4:192.0.2.0/24 ip4:198.51.100.0/24 include:_spf.mail{i}.example include:relay.example ~all"),
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
    // The records are built before the measurement: what is measured is what the store
    // keeps (it copies nothing it is given; the answer is moved in).
    let prepared: Vec<(String, StoredAnswer)> = (0..RECORDS)
        .map(|i| {
            let (name, text) = record(i);
            (name, answer(&text))
        })
        .collect();
    let estimated: usize = prepared
        .iter()
        .map(|(n, a)| entry_bytes(n, &a.records))
        .sum();
    let data: usize = (0..RECORDS).map(|i| { let (n, t) = record(i); n.len() + t.len() }).sum();

    let before = LIVE.load(Ordering::Relaxed);
    let store = StaleStore::new(RECORDS, usize::MAX / 2, Duration::from_secs(86_400));
    let mut handed = 0isize;
    for (name, a) in prepared {
        // The answer's own allocations were made before `before`: count them as the
        // store's now that it holds them (the caller keeps nothing).
        handed += (std::mem::size_of::<RData>() * a.records.len() + 16) as isize
            + a.records
                .iter()
                .map(|r| match r {
                    RData::TXT(t) => t.txt_data.iter().map(|s| s.len() as isize + 16).sum::<isize>(),
                    _ => 0,
                })
                .sum::<isize>();
        store.put(&name, RecordType::TXT, a);
    }
    let after = LIVE.load(Ordering::Relaxed);
    let measured = (after - before + handed) as f64;
    let (entries, store_estimate) = store.usage();
    assert_eq!(entries, RECORDS);
    assert_eq!(store_estimate, estimated);
    println!("serve-stale store, {RECORDS} records (40 % DKIM RSA-2048, 30 % SPF, 30 % DMARC)");
    println!("  record data (names + TXT text): {:>8.0} bytes/record", data as f64 / RECORDS as f64);
    println!("  measured heap:                  {:>8.0} bytes/record ({:.1} MiB)", measured / RECORDS as f64, measured / 1048576.0);
    println!("  store's estimate:               {:>8.0} bytes/record ({:.1} MiB)", estimated as f64 / RECORDS as f64, estimated as f64 / 1048576.0);
    println!("  estimate / measured:            {:>8.2}", estimated as f64 / measured);
    drop(store);

    // The byte bound, measured.
    let bound = 10 << 20;
    let before = LIVE.load(Ordering::Relaxed);
    let store = StaleStore::new(RECORDS, bound, Duration::from_secs(86_400));
    for i in 0..RECORDS {
        let (name, text) = record(i);
        store.put(&name, RecordType::TXT, answer(&text));
    }
    let held = LIVE.load(Ordering::Relaxed) - before;
    let (entries, est) = store.usage();
    println!(
        "  bounded to {} MiB (estimated): {entries} entries kept, estimate {:.1} MiB, measured {:.1} MiB",
        bound >> 20,
        est as f64 / 1048576.0,
        held as f64 / 1048576.0
    );
    let _keep = Arc::new(store);
}
