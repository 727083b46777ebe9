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

    /// This clock and the wall clock (`CLOCK_REALTIME`, nanoseconds since the Unix epoch)
    /// read together, to place the kernel's receive timestamps on this clock with
    /// [`arrival_from_realtime`]. The wall clock is `None` if it is set before 1970.
    #[expect(
        clippy::disallowed_methods,
        reason = "the driver's clock is the one place that reads real time"
    )]
    pub fn now_with_realtime(&self) -> (Time, Option<u64>) {
        let realtime_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .and_then(|d| u64::try_from(d.as_nanos()).ok());
        (self.now(), realtime_ns)
    }
}

/// A kernel receive timestamp older than this is not believed (the wall clock was
/// stepped, or the stamp is on another clock): the datagram then counts as arrived
/// when the endpoint handled it. A datagram that really waited this long in the socket
/// buffer belongs to an endpoint that was not running, not to a queue on the path.
pub const RX_STAMP_AGE_MAX: Duration = Duration::from_secs(1);

/// When a datagram arrived, on the driver's clock, from the kernel's receive timestamp
/// `stamp_ns` (`CLOCK_REALTIME`, as `SO_TIMESTAMPNS` gives it) and both clocks read together
/// just after the receive: `now` on the driver's clock and `now_realtime_ns` on the wall
/// clock. The stamp's age on the wall clock is taken off `now`, so the two clocks' epochs
/// never meet. A stamp later than `now_realtime_ns` (the wall clock was stepped back) gives
/// `now`: an arrival is never later than the time it was read. One older than
/// [`RX_STAMP_AGE_MAX`] gives `None` (not believed).
pub fn arrival_from_realtime(now: Time, now_realtime_ns: u64, stamp_ns: u64) -> Option<Time> {
    let age_ns = now_realtime_ns.saturating_sub(stamp_ns);
    if age_ns > RX_STAMP_AGE_MAX.as_nanos() as u64 {
        return None;
    }
    Some(now - Duration::from_nanos(age_ns))
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC_NS: u64 = 1_000_000_000;
    /// A wall clock in 2026 and a driver clock 10 s after its epoch.
    const WALL: u64 = 1_790_000_000 * SEC_NS;
    const NOW: Time = Time(10_000_000);

    #[test]
    fn arrival_from_realtime_takes_the_stamps_age_off_now() {
        assert_eq!(
            arrival_from_realtime(NOW, WALL, WALL - 100_000_000),
            Some(Time(9_900_000))
        );
        assert_eq!(
            arrival_from_realtime(NOW, WALL, WALL - 1_500),
            Some(Time(9_999_999)),
            "age in whole µs"
        );
        assert_eq!(arrival_from_realtime(NOW, WALL, WALL), Some(NOW));
    }

    #[test]
    fn arrival_from_realtime_is_never_later_than_now() {
        // The wall clock was stepped back between the stamp and the read.
        assert_eq!(arrival_from_realtime(NOW, WALL, WALL + 5 * SEC_NS), Some(NOW));
        assert_eq!(arrival_from_realtime(NOW, 0, u64::MAX), Some(NOW));
    }

    #[test]
    fn arrival_from_realtime_does_not_believe_absurdly_old_stamps() {
        let max = RX_STAMP_AGE_MAX.as_nanos() as u64;
        assert_eq!(
            arrival_from_realtime(NOW, WALL, WALL - max),
            Some(NOW - RX_STAMP_AGE_MAX)
        );
        assert_eq!(arrival_from_realtime(NOW, WALL, WALL - max - 1), None);
        // Stepped forward by an hour, or a stamp on the boot-time clock read as wall-clock time.
        assert_eq!(arrival_from_realtime(NOW, WALL, WALL - 3600 * SEC_NS), None);
        assert_eq!(arrival_from_realtime(NOW, WALL, 86_400 * SEC_NS), None);
    }

    #[test]
    fn arrival_from_realtime_stops_at_the_clocks_epoch() {
        // A datagram the kernel stamped before the driver's clock started (the socket was bound first).
        assert_eq!(arrival_from_realtime(Time(200), WALL, WALL - 900_000), Some(Time::ZERO));
    }
}
