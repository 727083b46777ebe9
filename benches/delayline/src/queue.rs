//! The delay queue: frames wait here until their release time. Sans-IO: the
//! caller passes the arrival time in and asks what is due at a given time.
//!
//! With one fixed delay per direction, release order is arrival order, so a
//! FIFO is the whole data structure. It is bounded in frames and in bytes;
//! a frame that would exceed either bound is dropped and counted, like a
//! drop-tail queue on a router.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Bounds of one direction's queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueLimits {
    pub frames_max: usize,
    pub bytes_max: usize,
}

impl Default for QueueLimits {
    /// Enough for 1 Gbit/s of full-size frames held for 200 ms.
    fn default() -> Self {
        Self {
            frames_max: 20_000,
            bytes_max: 32 * 1024 * 1024,
        }
    }
}

/// Frames in flight in one direction.
#[derive(Debug)]
pub struct DelayQueue {
    delay: Duration,
    limits: QueueLimits,
    frames: VecDeque<(Instant, Vec<u8>)>,
    bytes: usize,
    /// Frames refused because a bound was reached.
    pub dropped_full: u64,
}

impl DelayQueue {
    pub fn new(delay: Duration, limits: QueueLimits) -> Self {
        Self {
            delay,
            limits,
            frames: VecDeque::new(),
            bytes: 0,
            dropped_full: 0,
        }
    }

    /// Queues `frame`, received at `arrived`, for release at `arrived + delay`,
    /// or with the frame before it if that one is due later (arrival stamps
    /// from the kernel may be a little out of order; frames never are).
    /// Returns false (and counts a drop) when the queue is full.
    pub fn push(&mut self, arrived: Instant, frame: Vec<u8>) -> bool {
        if self.frames.len() >= self.limits.frames_max || self.bytes + frame.len() > self.limits.bytes_max {
            self.dropped_full += 1;
            return false;
        }
        self.bytes += frame.len();
        let mut at = arrived + self.delay;
        if let Some(&(last, _)) = self.frames.back() {
            at = at.max(last);
        }
        self.frames.push_back((at, frame));
        true
    }

    /// The next frame whose release time is at or before `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<Vec<u8>> {
        if self.frames.front()?.0 > now {
            return None;
        }
        let (_, frame) = self.frames.pop_front()?;
        self.bytes -= frame.len();
        Some(frame)
    }

    /// When the oldest frame is due, if any is queued.
    pub fn next_release(&self) -> Option<Instant> {
        self.frames.front().map(|(at, _)| *at)
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[expect(
        clippy::disallowed_methods,
        reason = "an arbitrary origin for hand-advanced test time"
    )]
    fn origin() -> Instant {
        Instant::now()
    }

    #[test]
    fn queue_releases_each_frame_exactly_after_the_delay() {
        let t0 = origin();
        let delay = Duration::from_millis(10);
        let mut q = DelayQueue::new(delay, QueueLimits::default());
        assert!(q.push(t0, vec![1]));
        assert!(q.push(t0 + Duration::from_millis(3), vec![2]));
        assert_eq!(q.next_release(), Some(t0 + delay));
        assert_eq!(q.pop_due(t0 + delay - Duration::from_nanos(1)), None);
        assert_eq!(q.pop_due(t0 + delay), Some(vec![1]));
        assert_eq!(q.pop_due(t0 + delay), None);
        assert_eq!(q.next_release(), Some(t0 + Duration::from_millis(13)));
        assert_eq!(q.pop_due(t0 + Duration::from_secs(1)), Some(vec![2]));
        assert!(q.is_empty());
        assert_eq!(q.bytes(), 0);
    }

    #[test]
    fn queue_never_reorders_frames_stamped_out_of_order() {
        let t0 = origin();
        let delay = Duration::from_millis(10);
        let mut q = DelayQueue::new(delay, QueueLimits::default());
        assert!(q.push(t0 + Duration::from_millis(2), vec![1]));
        assert!(q.push(t0 + Duration::from_millis(1), vec![2]));
        assert_eq!(q.pop_due(t0 + Duration::from_millis(11)), None);
        assert_eq!(q.pop_due(t0 + Duration::from_millis(12)), Some(vec![1]));
        assert_eq!(q.pop_due(t0 + Duration::from_millis(12)), Some(vec![2]));
    }

    #[test]
    fn queue_drops_beyond_frame_and_byte_limits() {
        let t0 = origin();
        let limits = QueueLimits {
            frames_max: 3,
            bytes_max: 250,
        };
        let mut q = DelayQueue::new(Duration::from_millis(1), limits);
        assert!(q.push(t0, vec![0; 100]));
        assert!(q.push(t0, vec![0; 100]));
        assert!(!q.push(t0, vec![0; 100]), "byte bound");
        assert!(q.push(t0, vec![0; 50]));
        assert!(!q.push(t0, vec![0; 1]), "frame bound");
        assert_eq!(q.dropped_full, 2);
        assert_eq!((q.len(), q.bytes()), (3, 250));
        // Room again once frames leave.
        assert!(q.pop_due(t0 + Duration::from_millis(1)).is_some());
        assert!(q.push(t0, vec![0; 100]));
    }
}
