//! Token-bucket pacer: spreads a window over the round trip instead of
//! sending it in one burst. The bucket holds at most `burst` bytes, so a
//! session that was idle does not dump a window at once.

use std::time::Duration;

use crate::time::Time;

#[derive(Debug, Clone)]
pub struct Pacer {
    tokens: f64,
    last: Time,
}

impl Default for Pacer {
    fn default() -> Self {
        Self::new()
    }
}

impl Pacer {
    pub fn new() -> Self {
        Self {
            tokens: 0.0,
            last: Time::ZERO,
        }
    }

    /// Bytes that may be sent now at `rate` bytes/s with a bucket of `burst` bytes.
    pub fn available(&mut self, now: Time, rate: u64, burst: u64) -> u64 {
        let dt = now.since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * rate as f64).min(burst as f64);
        self.tokens.max(0.0) as u64
    }

    /// Bytes in the bucket at the last [`available`](Self::available) (negative after an overdraft).
    pub fn tokens(&self) -> f64 {
        self.tokens
    }

    pub fn consume(&mut self, bytes: u64) {
        self.tokens -= bytes as f64;
    }

    /// When `bytes` will be available at `rate`.
    pub fn next_send(&self, bytes: u64, rate: u64) -> Time {
        let missing = bytes as f64 - self.tokens;
        if missing <= 0.0 || rate == 0 {
            return self.last;
        }
        // Round up: a wake-up before the tokens are there would find nothing to send.
        let us = (missing * 1e6 / rate as f64).ceil().max(1.0) as u64;
        self.last + Duration::from_micros(us)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacer_refills_at_rate_up_to_burst() {
        let mut p = Pacer::new();
        assert_eq!(p.available(Time(0), 1_000_000, 10_000), 0);
        assert_eq!(p.available(Time(5_000), 1_000_000, 10_000), 5_000);
        p.consume(5_000);
        assert_eq!(p.next_send(2_000, 1_000_000), Time(7_000));
        assert_eq!(p.available(Time(1_000_000), 1_000_000, 10_000), 10_000);
    }
}
