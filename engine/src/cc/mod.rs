//! Congestion control: one [`Controller`] trait, one file per controller.
//!
//! A controller is told what the session sent, what was acknowledged (with a
//! round-trip sample and a one-way delay sample), and what was lost; it
//! answers how many bytes may be in flight and how fast to pace them. It never
//! reads a clock or touches a socket: every call carries `now`.
//!
//! - [`foreground::Foreground`]: for transfers inside a site (LAN). Aims at
//!   line rate: fast start, multiplicative decrease of 0.7 on loss (CUBIC's
//!   β), additive increase scaled to the window, pacing at 1.25× the window
//!   per round trip.
//! - [`background::Background`]: for transfers across a WAN: keeps the
//!   bottleneck queue at a few milliseconds and yields to anyone else.
//! - [`group::Member`]: a background session's share of one [`background::Background`]
//!   shared by a sender's sessions toward one LAN (one bottleneck).

pub mod background;
pub mod foreground;
pub mod group;
pub mod schedule;

use std::time::Duration;

use crate::time::Time;

/// One acknowledgement as the controller sees it.
#[derive(Debug, Clone, Copy)]
pub struct AckSample {
    /// Bytes newly acknowledged by this ack.
    pub acked_bytes: u64,
    /// Round-trip time of the largest newly acknowledged packet, if it was newly acknowledged.
    pub rtt: Option<Duration>,
    /// Smoothed round-trip time after this sample.
    pub srtt: Duration,
    /// Smallest round-trip time seen.
    pub min_rtt: Duration,
    /// Receiver clock minus sender clock for the largest acknowledged packet, in µs
    /// (includes an unknown, drifting clock offset; only its changes mean something).
    pub one_way_delay_us: Option<i64>,
    /// Bytes in flight after this ack.
    pub in_flight: u64,
    /// True if the sender had less data to send than the window allowed (then the window should not grow).
    pub app_limited: bool,
}

/// One loss event (all packets declared lost by one ack or timeout).
#[derive(Debug, Clone, Copy)]
pub struct LossSample {
    pub lost_bytes: u64,
    /// When the most recently sent of the lost packets was sent: losses of packets sent
    /// before the last reduction do not reduce again.
    pub largest_lost_sent: Time,
    /// True when it came from a retransmission timeout rather than reordering evidence.
    pub timeout: bool,
}

/// A congestion controller.
pub trait Controller: Send + std::fmt::Debug {
    /// Short name for logs and metrics.
    fn name(&self) -> &'static str;
    fn on_sent(&mut self, now: Time, bytes: u64);
    fn on_ack(&mut self, now: Time, ack: &AckSample);
    fn on_loss(&mut self, now: Time, loss: &LossSample);
    /// What the egress monitor sees on the local interface. Controllers that do not use it ignore it.
    fn on_path(&mut self, _now: Time, _signal: &background::PathSignal) {}
    /// Bytes allowed in flight.
    fn window(&self) -> u64;
    /// Pacing rate in bytes per second; `None` means "send the window as fast as allowed".
    fn pacing_rate(&self, srtt: Duration) -> Option<u64>;
}

/// Maximum segment size assumed by controllers for their window arithmetic.
pub const MSS_BYTES: u64 = 1424;
