//! What every Lowtide criterion bench shares: time is the benchmark thread's
//! CPU time, not wall time.
//!
//! The benches run on a machine whose two cores are shared with other work;
//! wall time then counts whatever else was scheduled in between. CPU time of
//! the measuring thread (`CLOCK_THREAD_CPUTIME_ID`, nanosecond resolution)
//! leaves that out (cache and memory-bandwidth contention remain). Criterion
//! reads it once per sample, not per iteration, so the ~0.1 µs the call costs
//! is spread over the sample.

use std::time::Duration;

use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::Criterion;

/// Criterion measurement: CPU time of the calling thread.
pub struct ThreadCpuTime {
    /// Only for its formatter: values are durations, printed the same way.
    wall: WallTime,
}

/// CPU time consumed by the calling thread so far.
pub fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

impl Measurement for ThreadCpuTime {
    type Intermediate = Duration;
    type Value = Duration;

    fn start(&self) -> Duration {
        thread_cpu()
    }
    fn end(&self, start: Duration) -> Duration {
        thread_cpu().saturating_sub(start)
    }
    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }
    fn zero(&self) -> Duration {
        Duration::ZERO
    }
    fn to_f64(&self, v: &Duration) -> f64 {
        v.as_nanos() as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        self.wall.formatter()
    }
}

/// The configuration every bench group starts from.
pub fn criterion() -> Criterion<ThreadCpuTime> {
    Criterion::default().with_measurement(ThreadCpuTime { wall: WallTime })
}
