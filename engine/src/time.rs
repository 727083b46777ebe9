//! Time as the sans-IO core sees it: microseconds since an arbitrary epoch,
//! handed in by whoever drives the state machine (a real clock in the drivers,
//! a virtual one in the simulator). Nothing in the core reads a clock.

use std::ops::{Add, Sub};
use std::time::Duration;

/// A point in time, in microseconds since the driver's epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Time(pub u64);

impl Time {
    pub const ZERO: Time = Time(0);
    pub const MAX: Time = Time(u64::MAX);

    pub fn from_micros(us: u64) -> Self {
        Time(us)
    }
    pub fn as_micros(self) -> u64 {
        self.0
    }
    /// The low 32 bits, as carried in packets (wraps every 71 minutes; only differences are used).
    pub fn wire_us(self) -> u32 {
        self.0 as u32
    }
    /// Time elapsed since `earlier`, zero if `earlier` is later.
    pub fn since(self, earlier: Time) -> Duration {
        Duration::from_micros(self.0.saturating_sub(earlier.0))
    }
}

impl Add<Duration> for Time {
    type Output = Time;
    fn add(self, d: Duration) -> Time {
        Time(self.0.saturating_add(d.as_micros() as u64))
    }
}

impl Sub<Duration> for Time {
    type Output = Time;
    fn sub(self, d: Duration) -> Time {
        Time(self.0.saturating_sub(d.as_micros() as u64))
    }
}

/// A clock for drivers: microseconds since the moment it was made.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    epoch: std::time::Instant,
}

impl Clock {
    #[expect(
        clippy::disallowed_methods,
        reason = "the driver's clock is the one place that reads real time"
    )]
    pub fn new() -> Self {
        Self {
            epoch: std::time::Instant::now(),
        }
    }
    pub fn now(&self) -> Time {
        Time(self.epoch.elapsed().as_micros() as u64)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}
