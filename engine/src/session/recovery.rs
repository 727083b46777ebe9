//! Loss detection and round-trip estimation for one sending session
//! (after RFC 9002, QUIC loss recovery, simplified to what a bulk sender needs).
//!
//! Every data packet gets the next packet number and is remembered until it is
//! acknowledged or declared lost. A packet is lost when a packet sent
//! [`PACKET_THRESHOLD`] numbers later has been acknowledged, or when it is
//! older than 9/8 of the round trip and something sent after it was
//! acknowledged. When nothing is acknowledged for a probe timeout (PTO), the
//! oldest outstanding packet is sent again as a probe (and may go out past the
//! congestion window) and the timeout doubles until an acknowledgement
//! arrives. A late acknowledgement — a receiver that was descheduled for a
//! few milliseconds — thus costs one duplicate packet, not a window.
//! Only [`PERSISTENT_PTO_COUNT`] timeouts in a row count as congestion.

use std::collections::VecDeque;
use std::ops::Range;
use std::time::Duration;

use crate::time::Time;

/// Reordering tolerated before a packet counts as lost.
pub const PACKET_THRESHOLD: u64 = 3;
/// Timer granularity for loss and probe timers.
pub const GRANULARITY: Duration = Duration::from_millis(1);
/// Round trip assumed before the first sample.
pub const RTT_INITIAL: Duration = Duration::from_millis(100);
/// Longest a fetcher may delay an acknowledgement, with room for a receiver
/// that is busy hashing and storing a batch.
pub const ACK_DELAY_MAX: Duration = Duration::from_millis(5);
/// Consecutive probe timeouts that count as persistent congestion (the controller is told).
pub const PERSISTENT_PTO_COUNT: u32 = 3;
/// Most packets remembered in flight (bounds memory: 256 Ki × 40 B = 10 MiB).
pub const SENT_PACKETS_MAX: usize = 1 << 18;

/// A data packet in flight: which bytes of which stream it carried.
#[derive(Debug, Clone)]
struct Sent {
    time: Time,
    stream: u8,
    offset: u64,
    len: u32,
    /// Datagram bytes counted in flight.
    bytes: u32,
    state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    InFlight,
    Acked,
    Lost,
}

/// What one acknowledgement changed.
#[derive(Debug, Default)]
pub struct AckOutcome {
    pub acked_bytes: u64,
    pub rtt: Option<Duration>,
    /// Byte ranges to send again, by stream.
    pub lost: Vec<(u8, Range<u64>)>,
    pub lost_bytes: u64,
    pub largest_lost_sent: Time,
}

#[derive(Debug)]
pub struct Recovery {
    /// Packets from `first_pn` on, in packet-number order.
    sent: VecDeque<Sent>,
    first_pn: u64,
    next_pn: u64,
    largest_acked: Option<u64>,
    pub srtt: Duration,
    rttvar: Duration,
    pub min_rtt: Duration,
    latest_rtt: Duration,
    has_rtt: bool,
    in_flight: u64,
    pto_count: u32,
    /// Last time a packet was sent or an ack arrived: the PTO runs from here.
    pto_base: Time,
}

impl Default for Recovery {
    fn default() -> Self {
        Self::new()
    }
}

impl Recovery {
    pub fn new() -> Self {
        Self {
            sent: VecDeque::new(),
            first_pn: 0,
            next_pn: 0,
            largest_acked: None,
            srtt: RTT_INITIAL,
            rttvar: RTT_INITIAL / 2,
            min_rtt: Duration::MAX,
            latest_rtt: RTT_INITIAL,
            has_rtt: false,
            in_flight: 0,
            pto_count: 0,
            pto_base: Time::ZERO,
        }
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight
    }

    /// True if no more packets may be remembered.
    pub fn is_full(&self) -> bool {
        self.sent.len() >= SENT_PACKETS_MAX
    }

    /// Record a sent packet; returns its packet number.
    pub fn on_sent(&mut self, now: Time, stream: u8, offset: u64, len: u32, bytes: u32) -> u64 {
        let pn = self.next_pn;
        self.next_pn += 1;
        self.sent.push_back(Sent {
            time: now,
            stream,
            offset,
            len,
            bytes,
            state: State::InFlight,
        });
        self.in_flight += bytes as u64;
        if self.in_flight == bytes as u64 {
            self.pto_base = now;
        }
        pn
    }

    /// Process an acknowledgement of `ranges` (packet numbers), the largest being `largest`.
    pub fn on_ack(
        &mut self,
        now: Time,
        largest: u64,
        ack_delay: Duration,
        ranges: impl Iterator<Item = Range<u64>>,
    ) -> AckOutcome {
        let mut out = AckOutcome::default();
        if largest >= self.next_pn {
            return out; // acknowledges something never sent: ignore
        }
        let mut largest_newly_acked = None;
        for r in ranges {
            let start = r.start.max(self.first_pn);
            let end = r.end.min(self.next_pn);
            for pn in start..end {
                let p = &mut self.sent[(pn - self.first_pn) as usize];
                if p.state == State::InFlight {
                    p.state = State::Acked;
                    self.in_flight -= p.bytes as u64;
                    out.acked_bytes += p.bytes as u64;
                    largest_newly_acked = largest_newly_acked.max(Some(pn));
                } else if p.state == State::Lost {
                    // Spurious loss: the data was resent already; count it as delivered now.
                    p.state = State::Acked;
                }
            }
        }
        if self.largest_acked.is_none_or(|l| largest > l) {
            self.largest_acked = Some(largest);
        }
        if let Some(pn) = largest_newly_acked {
            if pn == largest {
                let sent_at = self.sent[(pn - self.first_pn) as usize].time;
                let rtt = now.since(sent_at);
                self.update_rtt(rtt, ack_delay);
                out.rtt = Some(rtt);
            }
            self.pto_count = 0;
            self.pto_base = now;
        }
        self.detect_lost(now, &mut out);
        self.trim();
        out
    }

    fn update_rtt(&mut self, rtt: Duration, ack_delay: Duration) {
        self.latest_rtt = rtt;
        self.min_rtt = self.min_rtt.min(rtt);
        let adjusted = if rtt >= self.min_rtt + ack_delay {
            rtt - ack_delay
        } else {
            rtt
        };
        if !self.has_rtt {
            self.has_rtt = true;
            self.srtt = adjusted;
            self.rttvar = adjusted / 2;
        } else {
            let diff = self.srtt.abs_diff(adjusted);
            self.rttvar = (self.rttvar * 3 + diff) / 4;
            self.srtt = (self.srtt * 7 + adjusted) / 8;
        }
    }

    fn loss_delay(&self) -> Duration {
        (self.srtt.max(self.latest_rtt) * 9 / 8).max(GRANULARITY)
    }

    fn detect_lost(&mut self, now: Time, out: &mut AckOutcome) {
        let Some(largest) = self.largest_acked else { return };
        let loss_delay = self.loss_delay();
        let end = (largest + 1).min(self.next_pn);
        for pn in self.first_pn..end {
            let p = &mut self.sent[(pn - self.first_pn) as usize];
            if p.state != State::InFlight {
                continue;
            }
            if largest - pn >= PACKET_THRESHOLD || now.since(p.time) >= loss_delay {
                Self::mark_lost(p, &mut self.in_flight, out);
            } else {
                break;
            }
        }
    }

    fn mark_lost(p: &mut Sent, in_flight: &mut u64, out: &mut AckOutcome) {
        p.state = State::Lost;
        *in_flight -= p.bytes as u64;
        out.lost_bytes += p.bytes as u64;
        out.largest_lost_sent = out.largest_lost_sent.max(p.time);
        let r = p.offset..p.offset + p.len as u64;
        match out.lost.last_mut() {
            Some((s, last)) if *s == p.stream && last.end == r.start => last.end = r.end,
            _ => out.lost.push((p.stream, r)),
        }
    }

    fn trim(&mut self) {
        while self.sent.front().is_some_and(|p| p.state != State::InFlight) {
            self.sent.pop_front();
            self.first_pn += 1;
        }
    }

    /// Probe timeout duration for the current backoff.
    pub fn pto(&self) -> Duration {
        let base = self.srtt + (self.rttvar * 4).max(GRANULARITY) + ACK_DELAY_MAX;
        base * 2u32.saturating_pow(self.pto_count.min(16))
    }

    /// When the probe timer fires, if anything is in flight.
    pub fn timeout(&self) -> Option<Time> {
        (self.in_flight > 0).then(|| self.pto_base + self.pto())
    }

    /// The probe timer fired: the oldest packet in flight is declared lost, to be sent again as a probe.
    pub fn on_timeout(&mut self, now: Time) -> AckOutcome {
        let mut out = AckOutcome::default();
        if let Some(p) = self.sent.iter_mut().find(|p| p.state == State::InFlight) {
            Self::mark_lost(p, &mut self.in_flight, &mut out);
        }
        self.pto_count += 1;
        self.pto_base = now;
        self.trim();
        out
    }

    /// Consecutive probe timeouts without an acknowledgement.
    pub fn pto_count(&self) -> u32 {
        self.pto_count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_detects_loss_by_packet_threshold() {
        let mut r = Recovery::new();
        for i in 0..10 {
            r.on_sent(Time(i), 0, i * 100, 100, 150);
        }
        // Ack 0..2 and 5..10: 2,3,4 missing; 2,3,4 are >= 3 below 9 so lost.
        let out = r.on_ack(Time(1000), 9, Duration::ZERO, [5..10, 0..2].into_iter());
        assert_eq!(out.acked_bytes, 7 * 150);
        assert_eq!(out.lost, vec![(0, 200..500)]);
        assert_eq!(r.in_flight(), 0);
        assert!(out.rtt.is_some());
    }

    #[test]
    fn recovery_timeout_probes_the_oldest_packet_and_backs_off() {
        let mut r = Recovery::new();
        r.on_sent(Time(0), 1, 0, 50, 80);
        r.on_sent(Time(1), 1, 50, 50, 80);
        let t = r.timeout().unwrap();
        let pto0 = r.pto();
        let out = r.on_timeout(t);
        assert_eq!(out.lost, vec![(1, 0..50)]);
        assert_eq!(r.in_flight(), 80, "the second packet is still in flight");
        assert_eq!(r.pto(), pto0 * 2);
        let out = r.on_timeout(r.timeout().unwrap());
        assert_eq!(out.lost, vec![(1, 50..100)]);
        assert_eq!(r.timeout(), None);
    }

    #[test]
    fn recovery_ignores_acks_for_unsent_packets() {
        let mut r = Recovery::new();
        r.on_sent(Time(0), 0, 0, 10, 10);
        let out = r.on_ack(Time(5), 7, Duration::ZERO, std::iter::once(0..8));
        assert_eq!(out.acked_bytes, 0);
        assert_eq!(r.in_flight(), 10);
    }
}
