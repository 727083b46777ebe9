//! A user-space delay line for the WAN testbed (`scripts/testbed/wan.sh`).
//!
//! The test kernel has no netem, so propagation delay comes from here: a
//! transparent L2 bridge between two interfaces (normally two veth ends in a
//! namespace of their own) that holds every frame for a fixed time before
//! writing it out on the other side, with one thread per direction, a bounded
//! queue per direction (drops counted) and a monotonic clock. Precision is a
//! few tens of microseconds, plenty for 10–80 ms delays.
//!
//! Not a rate limiter (the testbed uses TBF for that) and not an emulator of
//! loss, jitter or reordering.
//!
//! - [`queue::DelayQueue`]: the sans-IO queue (bounded FIFO with release times).
//! - [`bridge::run`]: one direction's AF_PACKET receive/hold/send loop.

pub mod bridge;
pub mod queue;
