//! The one place the server reads the wall clock.
//!
//! Everything below the HTTP handlers and the CLI takes `now_ms` (unix
//! milliseconds) as an argument, so tests drive time by hand with
//! [`Clock::manual`] instead of sleeping.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

/// Source of "now" for the server: the system clock, or a hand-set one in tests.
#[derive(Clone, Debug)]
pub enum Clock {
    System,
    Manual(Arc<AtomicI64>),
}

impl Clock {
    /// A clock that starts at `start_ms` and moves only when told to.
    pub fn manual(start_ms: i64) -> Self {
        Self::Manual(Arc::new(AtomicI64::new(start_ms)))
    }

    /// Unix time in milliseconds.
    pub fn now_ms(&self) -> i64 {
        match self {
            Self::System => system_now_ms(),
            Self::Manual(t) => t.load(Ordering::SeqCst),
        }
    }

    /// Move a manual clock forward; does nothing to the system clock.
    pub fn advance_ms(&self, ms: i64) {
        if let Self::Manual(t) = self {
            t.fetch_add(ms, Ordering::SeqCst);
        }
    }
}

#[expect(
    clippy::disallowed_methods,
    reason = "the server's single wall-clock read; everything else takes now_ms"
)]
fn system_now_ms() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A monotonic stopwatch for request latency metrics and the load generator.
#[derive(Clone, Copy, Debug)]
pub struct Stopwatch(std::time::Instant);

impl Stopwatch {
    #[expect(
        clippy::disallowed_methods,
        reason = "latency measurement in the binary, not protocol logic"
    )]
    pub fn start() -> Self {
        Self(std::time::Instant::now())
    }

    pub fn elapsed_us(&self) -> u64 {
        u64::try_from(self.0.elapsed().as_micros()).unwrap_or(u64::MAX)
    }
}
