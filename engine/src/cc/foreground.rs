//! Foreground (LAN) controller.
//!
//! Slow start doubles the window every round trip until the first loss; then
//! the window is cut to 0.7× (CUBIC's β, gentler than Reno's 0.5 so a LAN
//! link stays full through a receiver-buffer hiccup) and grows by one segment
//! per window acknowledged (Reno-style additive increase). At LAN round trips
//! of tens to hundreds of microseconds this regains the window within
//! milliseconds, so nothing smarter is needed for line rate. One reduction per
//! round trip: losses of packets sent before the last reduction are ignored.

use std::time::Duration;

use super::{AckSample, Controller, LossSample, MSS_BYTES};
use crate::time::Time;

/// Initial window: 32 segments.
pub const WINDOW_BYTES_INITIAL: u64 = 32 * MSS_BYTES;
/// Floor after losses.
pub const WINDOW_BYTES_MIN: u64 = 4 * MSS_BYTES;
/// Ceiling: 64 MiB, far above any LAN bandwidth-delay product.
pub const WINDOW_BYTES_MAX: u64 = 64 << 20;
/// Multiplicative decrease on loss.
const BETA: f64 = 0.7;

#[derive(Debug, Clone)]
pub struct Foreground {
    window: u64,
    ssthresh: u64,
    /// Bytes acknowledged toward the next additive increase.
    acked_accum: u64,
    /// Packets sent before this time do not trigger another reduction.
    recovery_start: Time,
}

impl Default for Foreground {
    fn default() -> Self {
        Self::new()
    }
}

impl Foreground {
    pub fn new() -> Self {
        Self {
            window: WINDOW_BYTES_INITIAL,
            ssthresh: u64::MAX,
            acked_accum: 0,
            recovery_start: Time::ZERO,
        }
    }
}

impl Controller for Foreground {
    fn name(&self) -> &'static str {
        "foreground"
    }

    fn on_sent(&mut self, _now: Time, _bytes: u64) {}

    fn on_ack(&mut self, _now: Time, ack: &AckSample) {
        if ack.app_limited {
            return;
        }
        if self.window < self.ssthresh {
            self.window = (self.window + ack.acked_bytes).min(WINDOW_BYTES_MAX);
        } else {
            self.acked_accum += ack.acked_bytes;
            while self.acked_accum >= self.window {
                self.acked_accum -= self.window;
                self.window = (self.window + MSS_BYTES).min(WINDOW_BYTES_MAX);
            }
        }
    }

    fn on_loss(&mut self, now: Time, loss: &LossSample) {
        if loss.largest_lost_sent < self.recovery_start {
            return;
        }
        self.recovery_start = now;
        let cut = if loss.timeout { 0.5 } else { BETA };
        self.window = ((self.window as f64 * cut) as u64).max(WINDOW_BYTES_MIN);
        self.ssthresh = self.window;
        self.acked_accum = 0;
    }

    fn window(&self) -> u64 {
        self.window
    }

    fn pacing_rate(&self, srtt: Duration) -> Option<u64> {
        let srtt_us = srtt.as_micros().max(1) as u64;
        let gain = if self.window < self.ssthresh { 2.0 } else { 1.25 };
        Some((self.window as f64 * 1e6 / srtt_us as f64 * gain) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(bytes: u64) -> AckSample {
        AckSample {
            acked_bytes: bytes,
            rtt: Some(Duration::from_micros(100)),
            srtt: Duration::from_micros(100),
            min_rtt: Duration::from_micros(100),
            one_way_delay_us: None,
            in_flight: 0,
            app_limited: false,
        }
    }

    #[test]
    fn foreground_slow_start_doubles_then_cuts_once_per_round_trip() {
        let mut c = Foreground::new();
        let w0 = c.window();
        c.on_ack(Time(100), &ack(w0));
        assert_eq!(c.window(), 2 * w0);
        let loss = LossSample {
            lost_bytes: MSS_BYTES,
            largest_lost_sent: Time(150),
            timeout: false,
        };
        c.on_loss(Time(200), &loss);
        let after = c.window();
        assert_eq!(after, (2.0 * w0 as f64 * BETA) as u64);
        // A second loss of a packet sent before the reduction does not cut again.
        c.on_loss(
            Time(210),
            &LossSample {
                largest_lost_sent: Time(190),
                ..loss
            },
        );
        assert_eq!(c.window(), after);
        // Congestion avoidance: one MSS per window acknowledged.
        c.on_ack(Time(300), &ack(after));
        assert_eq!(c.window(), after + MSS_BYTES);
    }

    #[test]
    fn foreground_window_never_below_floor() {
        let mut c = Foreground::new();
        for i in 0..100 {
            c.on_loss(
                Time(i * 1000 + 1),
                &LossSample {
                    lost_bytes: 1,
                    largest_lost_sent: Time(i * 1000 + 1),
                    timeout: true,
                },
            );
        }
        assert_eq!(c.window(), WINDOW_BYTES_MIN);
    }
}
