//! The adaptive limit: an exponentially weighted moving average of the account's hourly
//! messages and recipients. The current rate (this clock hour plus the still-covered part
//! of the previous one) is flagged when it exceeds `max(floor, k × baseline)`.
//!
//! Each completed hour is folded into the average with weight `alpha` (derived from the
//! configured half-life); hours without mail fold in as zeros. An hour is folded in at
//! most at the threshold that applied to it, so a burst (or a slow attacker just under
//! the limit) does not teach the baseline that bursts are normal: the limit can grow by
//! at most `k` per folded hour's weight. New accounts start from a conservative default.

use serde::{Deserialize, Serialize};

/// What the baseline needs from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Params {
    pub alpha: f64,
    pub k: f64,
    pub floor_messages: f64,
    pub floor_recipients: f64,
}

impl Params {
    pub fn from_settings(s: &super::config::Settings) -> Params {
        Params {
            alpha: s.alpha,
            k: s.cfg.adaptive.k,
            floor_messages: s.cfg.adaptive.floor_messages,
            floor_recipients: s.cfg.adaptive.floor_recipients,
        }
    }
}

/// One account's hourly counts and learned averages.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    /// Clock hour (hours since the epoch) of `cur_*`.
    pub hour: u32,
    pub cur_messages: u32,
    pub cur_recipients: u32,
    pub prev_messages: u32,
    pub prev_recipients: u32,
    /// Learned messages per hour.
    pub messages: f32,
    /// Learned recipients per hour.
    pub recipients: f32,
}

pub const HOUR_MS: u64 = 3_600_000;

impl Baseline {
    pub fn new(now_ms: u64, messages: f64, recipients: f64) -> Baseline {
        Baseline {
            hour: (now_ms / HOUR_MS) as u32,
            cur_messages: 0,
            cur_recipients: 0,
            prev_messages: 0,
            prev_recipients: 0,
            messages: messages as f32,
            recipients: recipients as f32,
        }
    }

    /// `(messages, recipients)` per hour above which the account is flagged.
    pub fn threshold(&self, p: &Params) -> (f64, f64) {
        (
            p.floor_messages.max(p.k * f64::from(self.messages)),
            p.floor_recipients.max(p.k * f64::from(self.recipients)),
        )
    }

    /// Moves to the clock hour of `now_ms`, folding the hours that ended.
    pub fn roll(&mut self, now_ms: u64, p: &Params) {
        let hour = (now_ms / HOUR_MS) as u32;
        if hour <= self.hour {
            return;
        }
        let (tm, tr) = self.threshold(p);
        let keep = 1.0 - p.alpha;
        let m = p.alpha * f64::from(self.cur_messages).min(tm) + keep * f64::from(self.messages);
        let r =
            p.alpha * f64::from(self.cur_recipients).min(tr) + keep * f64::from(self.recipients);
        // Hours with no mail at all since then.
        let idle = (hour - self.hour - 1).min(100_000) as i32;
        let decay = keep.powi(idle);
        self.messages = (m * decay) as f32;
        self.recipients = (r * decay) as f32;
        if idle == 0 {
            self.prev_messages = self.cur_messages;
            self.prev_recipients = self.cur_recipients;
        } else {
            self.prev_messages = 0;
            self.prev_recipients = 0;
        }
        self.cur_messages = 0;
        self.cur_recipients = 0;
        self.hour = hour;
    }

    pub fn add(&mut self, messages: u32, recipients: u32) {
        self.cur_messages = self.cur_messages.saturating_add(messages);
        self.cur_recipients = self.cur_recipients.saturating_add(recipients);
    }

    /// Messages and recipients in the last hour: this clock hour plus the part of the
    /// previous one still inside the hour (assumed evenly spread).
    pub fn rate(&self, now_ms: u64) -> (f64, f64) {
        let hour = (now_ms / HOUR_MS) as u32;
        let frac = (now_ms % HOUR_MS) as f64 / HOUR_MS as f64;
        if hour == self.hour {
            (
                f64::from(self.cur_messages) + f64::from(self.prev_messages) * (1.0 - frac),
                f64::from(self.cur_recipients) + f64::from(self.prev_recipients) * (1.0 - frac),
            )
        } else if hour == self.hour + 1 {
            (
                f64::from(self.cur_messages) * (1.0 - frac),
                f64::from(self.cur_recipients) * (1.0 - frac),
            )
        } else if hour < self.hour {
            (f64::from(self.cur_messages), f64::from(self.cur_recipients))
        } else {
            (0.0, 0.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(half_life_hours: f64) -> Params {
        Params {
            alpha: 1.0 - 0.5f64.powf(1.0 / half_life_hours),
            k: 10.0,
            floor_messages: 100.0,
            floor_recipients: 1000.0,
        }
    }

    const T0: u64 = 1_700_000_000 / 3600 * HOUR_MS;

    #[test]
    fn new_accounts_start_from_the_default() {
        let p = params(168.0);
        let b = Baseline::new(T0, 5.0, 50.0);
        assert_eq!(b.threshold(&p), (100.0, 1000.0));
        let b = Baseline::new(T0, 20.0, 50.0);
        assert_eq!(b.threshold(&p), (200.0, 1000.0));
    }

    #[test]
    fn learns_a_steady_rate() {
        let p = params(24.0);
        let mut b = Baseline::new(T0, 0.0, 0.0);
        for h in 0..24 * 14 {
            b.roll(T0 + h * HOUR_MS, &p);
            b.add(20, 40);
        }
        b.roll(T0 + 24 * 14 * HOUR_MS, &p);
        assert!((b.messages - 20.0).abs() < 0.1, "{}", b.messages);
        assert!((b.recipients - 40.0).abs() < 0.2, "{}", b.recipients);
        let (tm, tr) = b.threshold(&p);
        assert!((tm - 200.0).abs() < 1.0 && tr == 1000.0, "{tm} {tr}");
    }

    #[test]
    fn idle_hours_decay_with_the_half_life() {
        let p = params(24.0);
        let mut b = Baseline::new(T0, 40.0, 80.0);
        // One empty hour folded, then 23 idle ones: 24 hours in all.
        b.roll(T0 + 24 * HOUR_MS, &p);
        assert!((b.messages - 20.0).abs() < 0.01, "{}", b.messages);
        assert!((b.recipients - 40.0).abs() < 0.01, "{}", b.recipients);
    }

    #[test]
    fn bursts_are_learned_only_up_to_the_threshold() {
        let p = params(1.0); // alpha = 0.5
        let mut b = Baseline::new(T0, 5.0, 50.0);
        b.add(30_000, 900_000);
        b.roll(T0 + HOUR_MS, &p);
        // Folded at most the threshold (100, 1000): 0.5·100 + 0.5·5.
        assert!((b.messages - 52.5).abs() < 1e-3, "{}", b.messages);
        assert!((b.recipients - 525.0).abs() < 1e-3, "{}", b.recipients);
    }

    #[test]
    fn rate_covers_the_last_hour() {
        let p = params(168.0);
        let mut b = Baseline::new(T0, 5.0, 50.0);
        b.add(10, 20);
        b.roll(T0 + HOUR_MS, &p);
        b.add(3, 3);
        // A quarter into the next hour: 3 + 10 · 0.75.
        assert_eq!(b.rate(T0 + HOUR_MS + HOUR_MS / 4), (10.5, 18.0));
        // Read (not rolled) an hour later: the current hour is now the previous one.
        assert_eq!(b.rate(T0 + 2 * HOUR_MS + HOUR_MS / 2), (1.5, 1.5));
        assert_eq!(b.rate(T0 + 5 * HOUR_MS), (0.0, 0.0));
    }
}
