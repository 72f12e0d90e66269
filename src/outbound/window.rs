//! Sliding-window counters: two counts (messages and recipients, or recipients tried and
//! refused) per window, in a ring of `BUCKETS + 1` fixed-width buckets.
//!
//! A window of length `D` has buckets of `D / BUCKETS`. The count "in the last `D`" at
//! time `t` is every bucket that lies wholly inside `(t - D, t]` plus the share of the
//! oldest, partly covered bucket that still lies inside (events are assumed evenly spread
//! within a bucket). So a burst is counted in full for as long as it lies inside the
//! window, and it leaves the count smoothly rather than all at once.
//!
//! A ring is `RING_LEN` `u32`s: `[head, a[0..SLOTS], b[0..SLOTS]]`, `head` being the
//! absolute index (time / bucket width) of the newest bucket written, plus one (0: never
//! written). The same layout and arithmetic are used by the Redis script.

/// Buckets a window is cut into (config validation checks windows against it).
pub const BUCKETS: u64 = crate::config::outbound::WINDOW_BUCKETS;
/// Buckets kept: the window's buckets plus the partly covered oldest one.
pub const SLOTS: usize = BUCKETS as usize + 1;
/// `u32`s in one ring.
pub const RING_LEN: usize = 1 + 2 * SLOTS;

/// Adds `(a, b)` at time `now_ms` (milliseconds since the epoch).
pub fn add(ring: &mut [u32], bucket_ms: u64, now_ms: u64, a: u32, b: u32) {
    let n = (now_ms / bucket_ms) as u32;
    let cur = advance(ring, n);
    let slot = cur as usize % SLOTS;
    ring[1 + slot] = ring[1 + slot].saturating_add(a);
    ring[1 + SLOTS + slot] = ring[1 + SLOTS + slot].saturating_add(b);
}

/// Moves the ring forward to bucket `n`, clearing the buckets skipped; returns the
/// bucket to write to (the newest one when the clock went back).
fn advance(ring: &mut [u32], n: u32) -> u32 {
    let head = ring[0];
    if head == 0 {
        ring[1..RING_LEN].fill(0);
        ring[0] = n.wrapping_add(1);
        return n;
    }
    let h = head - 1;
    if n <= h {
        return h;
    }
    if n - h >= SLOTS as u32 {
        ring[1..RING_LEN].fill(0);
    } else {
        for k in h + 1..=n {
            let s = k as usize % SLOTS;
            ring[1 + s] = 0;
            ring[1 + SLOTS + s] = 0;
        }
    }
    ring[0] = n.wrapping_add(1);
    n
}

/// The two counts over the window ending at `now_ms`.
pub fn sums(ring: &[u32], bucket_ms: u64, now_ms: u64) -> (f64, f64) {
    let head = ring[0];
    if head == 0 {
        return (0.0, 0.0);
    }
    let h = head - 1;
    let mut n = (now_ms / bucket_ms) as u32;
    let mut frac = (now_ms % bucket_ms) as f64 / bucket_ms as f64;
    if n < h {
        // Another instance's clock is ahead: count from its newest bucket.
        n = h;
        frac = 0.0;
    }
    let oldest = n.saturating_sub(BUCKETS as u32);
    let (mut a, mut b) = (0.0, 0.0);
    for k in oldest..=n {
        // Present in the ring: written (≤ h) and not yet overwritten (> h - SLOTS).
        if k > h || h - k >= SLOTS as u32 {
            continue;
        }
        let w = if k + BUCKETS as u32 == n {
            1.0 - frac
        } else {
            1.0
        };
        let s = k as usize % SLOTS;
        a += f64::from(ring[1 + s]) * w;
        b += f64::from(ring[1 + SLOTS + s]) * w;
    }
    (a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60_000;
    /// 1-minute window: 7.5 s buckets.
    const B: u64 = MIN / BUCKETS;
    const T0: u64 = 1_700_000_000_000 / MIN * MIN;

    #[test]
    fn counts_inside_the_window() {
        let mut r = [0u32; RING_LEN];
        assert_eq!(sums(&r, B, T0), (0.0, 0.0));
        add(&mut r, B, T0, 1, 16);
        add(&mut r, B, T0 + 1000, 1, 1);
        add(&mut r, B, T0 + 30_000, 1, 2);
        assert_eq!(sums(&r, B, T0 + 30_000), (3.0, 19.0));
        // Still all inside one minute later minus a bit.
        assert_eq!(sums(&r, B, T0 + 59_000), (3.0, 19.0));
    }

    #[test]
    fn old_events_slide_out() {
        let mut r = [0u32; RING_LEN];
        add(&mut r, B, T0, 10, 10);
        add(&mut r, B, T0 + 40_000, 1, 1);
        // At T0 + 60 s + half a bucket, the first bucket is half outside.
        let (a, _) = sums(&r, B, T0 + MIN + B / 2);
        assert!((a - 6.0).abs() < 1e-9, "{a}");
        // One bucket later it is gone.
        assert_eq!(sums(&r, B, T0 + MIN + B).0, 1.0);
        // And after the second one left too, nothing.
        assert_eq!(sums(&r, B, T0 + 40_000 + MIN + B).0, 0.0);
    }

    #[test]
    fn long_gaps_clear_everything() {
        let mut r = [0u32; RING_LEN];
        add(&mut r, B, T0, 5, 5);
        add(&mut r, B, T0 + 10 * MIN, 1, 2);
        assert_eq!(sums(&r, B, T0 + 10 * MIN), (1.0, 2.0));
        // A gap shorter than the ring clears only the buckets skipped.
        add(&mut r, B, T0 + 10 * MIN + 3 * B, 1, 1);
        assert_eq!(sums(&r, B, T0 + 10 * MIN + 3 * B), (2.0, 3.0));
    }

    #[test]
    fn clock_going_back_counts_in_the_newest_bucket() {
        let mut r = [0u32; RING_LEN];
        add(&mut r, B, T0 + 20_000, 1, 1);
        add(&mut r, B, T0, 1, 1);
        assert_eq!(sums(&r, B, T0).0, 2.0);
        assert_eq!(sums(&r, B, T0 + 20_000).0, 2.0);
    }

    #[test]
    fn saturates() {
        let mut r = [0u32; RING_LEN];
        add(&mut r, B, T0, u32::MAX, 1);
        add(&mut r, B, T0, 5, 1);
        assert_eq!(sums(&r, B, T0).0, f64::from(u32::MAX));
    }
}
