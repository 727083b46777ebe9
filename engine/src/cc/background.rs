//! Background (WAN scavenger) controller.
//!
//! # Goal
//!
//! Use the capacity nobody else uses and give it back at once: keep the
//! bottleneck's standing queue at [`BackgroundConfig::queue_delay_target`]
//! (a few milliseconds, where LEDBAT aims at 100 ms), drop to a minimal window
//! within about two round trips when foreground traffic appears, and climb
//! back within a few round trips when it leaves.
//!
//! # Signals
//!
//! - **One-way delay** from every acknowledgement: receiver clock minus
//!   sender clock of the newest packet. It contains an unknown clock offset,
//!   so only its excess over a **base** (the minimum over a sliding window of
//!   [`BASE_SLOTS`] slots of [`BASE_SLOT`]) means anything: that excess is the
//!   queueing delay. Noise is removed by taking the minimum of the last
//!   [`CURRENT_FILTER`] samples.
//! - **The local egress queue and competing traffic** ([`PathSignal`], from
//!   the eBPF monitor when the agent has it): backlog bytes on our own
//!   interface are queueing delay we can see directly (the minimum over the
//!   last [`CURRENT_FILTER`] samples, drained at the link's rate: a burst
//!   handed to the qdisc at once is not a standing queue); bytes of *other*
//!   traffic leaving the interface mean foreground traffic is present.
//!   Without this signal the controller runs on delay alone.
//!
//! # Control
//!
//! - Queue below target: the window grows by `acked × (target − q)/target`,
//!   exponentially when the queue is empty and not at all at the target, but
//!   only up to the link's bandwidth-delay product plus the target queue once
//!   that is known (the delay signal lags a round trip, and blind doubling
//!   overshoots by a window); past that it probes by one segment per round
//!   trip. The capacity is unknown until a queue first stands; from then on it
//!   is the highest delivery rate measured while the sender had more to send
//!   than its window allowed (a rate is a lower bound of the link's capacity:
//!   any higher one raises it, so a low first estimate, taken while the rate
//!   samples still lagged a ramp-up, does not cap the window for good).
//!   Once the queue has set the window (a cut on queue, or a yield that ended
//!   by regrowing), growth is gentle: a round trip adds at most
//!   [`GENTLE_GROWTH`] × (target − q) of queue, whatever the number of flows
//!   through the bottleneck (each grows by its own rate × that); it is fast
//!   again after a yield until the yield ends, and after a loss back to the
//!   window before it.
//! - Queue above target: once per round trip, the window loses what stands
//!   above the target, `(q − target) × delivery rate` (at least a segment, at
//!   most half the window).
//! - Queue above [`YIELD_FACTOR`] × target, or competing traffic on the local
//!   interface: someone else is sending; the window drops to its minimum at
//!   once (the yield), remembering the delivery rate it had. It grows again
//!   as below while the queue stays under target; back at half the link's
//!   bandwidth-delay product, the yield is over (so a false yield to a delay
//!   spike costs a few round trips, and the next yield starts afresh).
//! - A queue that rose more than our own window explains, by more than the
//!   target: a competing flow at a bottleneck further along (which no local
//!   monitor sees), in its slow start; yield then (a round trip or two after
//!   its data reaches the bottleneck), not when the whole queue reaches
//!   [`YIELD_FACTOR`] × target: the cuts above take out only the excess, so
//!   they keep giving way to a TCP slow start and the whole queue gets there
//!   late (430 ms after a CUBIC flow started, at 50 Mbit/s 80 ms). The
//!   reference is the queue level while it was at or below target and the
//!   least window then; what our window grew since (the most of the last two
//!   round trips) is ours, what it shrank by should have left the queue. The
//!   hold-off after such a yield is four times the base (the flow is still
//!   ramping up and leaves gaps), and the rule waits 2 s after a reclaim (the
//!   regrowing window's own queue, and the last of the foreground's). A yield that ends by regrowing (the queue fell back below
//!   target: another background flow that gave way, or a delay spike) was a
//!   false alarm and silences the rule for 2 s, doubling up to 32 s (two
//!   background flows otherwise yield to each other in turn).
//! - After a yield to competing traffic the monitor saw on this host, the
//!   monitor also sees it stop: once it has, and the local queue has stayed
//!   below target for a propagation round trip (checked at every monitor
//!   sample, not only at acks), the window goes straight back to the
//!   remembered bandwidth-delay product.
//! - Queue empty again after a yield on delay, and staying empty for a
//!   hold-off (two propagation round trips, at least 100 ms; doubled up to 4 s
//!   each time a yield follows a reclaim within 2 s, because then the
//!   foreground flow had not left, its early gaps had only drained the queue;
//!   back to two round trips once the queue stood for 2 s): the window jumps
//!   back to half of the remembered bandwidth-delay product and grows from
//!   there (the reclaim), so regaining the link takes a few round trips, not
//!   hundreds. A reclaim restarts the slowdown interval below (the yield
//!   drained the queue as a slowdown does).
//! - Loss (a bottleneck that drops instead of queueing): halve, once per round trip.
//!
//! # What breaks LEDBAT, and what this does about it
//!
//! - *Clock offset*: cancels out (only differences to the base are used).
//! - *Clock drift*: the base is a sliding minimum over
//!   `BASE_SLOTS × BASE_SLOT` (20 s), so drift can inflate the measured queue
//!   by at most drift × 20 s (2 ms at 100 ppm); the periodic slowdown below
//!   refreshes the base.
//! - *Base delay that changes with the route*: a shorter route is adopted at
//!   once (it is a new minimum); a longer one after the window slides past
//!   (20 s), during which the controller is more timid, never more aggressive.
//! - *Latecomers* (a second flow that arrives into our standing queue and
//!   takes it for base): every [`SLOWDOWN_INTERVAL`] the window drops to its
//!   minimum for two round trips, the queue drains, and every flow sees the
//!   true base (LEDBAT++'s slowdowns); the window is then restored.
//! - *A bottleneck that drops instead of queueing*: loss halves the window.

use std::time::Duration;

use super::{AckSample, Controller, LossSample, MSS_BYTES};
use crate::time::Time;

/// Length of one slot of the base-delay history.
pub const BASE_SLOT: Duration = Duration::from_secs(2);
/// Number of slots: the base is the minimum over `BASE_SLOTS × BASE_SLOT`.
pub const BASE_SLOTS: usize = 10;
/// One-way delay samples whose minimum is the current delay.
pub const CURRENT_FILTER: usize = 4;
/// A queue this many times the target means competing traffic: yield at once.
pub const YIELD_FACTOR: i64 = 4;
/// A rise of the one-way queue this many times the target that our own window does
/// not explain means competing traffic at a bottleneck further along: yield.
pub const UNEXPLAINED_FACTOR: i64 = 1;
/// How long a false alarm of that rule (the queue fell back below target within the
/// yield, so the competing flow was not a foreground one that stays, but another
/// background flow, or a delay spike) silences it; doubled with every false alarm.
pub const UNEXPLAINED_QUIET_MIN: Duration = Duration::from_secs(2);
const UNEXPLAINED_QUIET_MAX: Duration = Duration::from_secs(32);
/// How often the window drops to its minimum so every flow can see the true base.
pub const SLOWDOWN_INTERVAL: Duration = Duration::from_secs(20);
/// Least time the queue must stay empty after a yield before the link is reclaimed.
pub const RECLAIM_HOLDOFF_MIN: Duration = Duration::from_millis(100);
/// Least hold-off after a yield to competing traffic the monitor saw on this host.
pub const LOCAL_RECLAIM_HOLDOFF_MIN: Duration = Duration::from_millis(20);
/// Longest hold-off, after repeated yields shortly after reclaiming.
pub const RECLAIM_HOLDOFF_MAX: Duration = Duration::from_secs(4);
/// A yield this soon after a reclaim means the foreground never left.
const RECLAIM_REGRET: Duration = Duration::from_secs(2);
/// Shortest interval of one delivery-rate sample. Acks are handled in batches (the
/// endpoint polls every few ms), so over a 20 ms round trip a sample was up to 28 %
/// high, and the maximum of such samples set a cap 1.5 x the bandwidth-delay product.
const RATE_INTERVAL_MIN: Duration = Duration::from_millis(100);
/// Rate samples kept for the delivery-rate maximum.
const RATE_SAMPLES: usize = 16;
/// Once the queue has set the window (a cut on queue), a round trip of growth adds at most
/// this many times (target − queue) of queue, summed over all flows through the bottleneck.
const GENTLE_GROWTH: f64 = 2.0;

/// What the eBPF monitor (or the netlink fallback) says about the local egress path.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PathSignal {
    /// Bytes queued on the local egress qdisc right now.
    pub backlog_bytes: u64,
    /// Rate of traffic other than Lowtide's leaving the interface, bytes/s (the eBPF
    /// monitor leaves out other traffic in small packets, such as a download's TCP ACKs).
    pub other_bytes_per_s: u64,
    /// Rate of all traffic (ours and others') handed to the interface, bytes/s; 0 when
    /// unknown. While a queue stands, the qdisc drains at about this rate, so it turns the
    /// backlog into a delay (our own rate would overstate it while we are a small share).
    pub egress_bytes_per_s: u64,
}

#[derive(Debug, Clone)]
pub struct BackgroundConfig {
    /// Standing queue to aim at.
    pub queue_delay_target: Duration,
    pub window_bytes_min: u64,
    /// Absolute ceiling on the sending rate (bytes/s), if any.
    pub rate_max: Option<u64>,
    /// Ceiling as a share of the measured capacity (the highest delivery rate seen), if any.
    pub capacity_share_max: Option<f64>,
    /// Competing traffic above this rate on the local interface means "yield".
    pub other_bytes_per_s_yield: u64,
}

impl Default for BackgroundConfig {
    fn default() -> Self {
        Self {
            queue_delay_target: Duration::from_millis(3),
            window_bytes_min: 2 * MSS_BYTES,
            rate_max: None,
            capacity_share_max: None,
            other_bytes_per_s_yield: 50_000,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    start: Time,
    min_us: i64,
}

/// The base of a one-way delay: its minimum over [`BASE_SLOTS`] slots of [`BASE_SLOT`].
#[derive(Debug, Clone, Default)]
pub(crate) struct BaseDelay {
    /// Slot minima, newest last.
    slots: Vec<Slot>,
}

impl BaseDelay {
    pub(crate) fn record(&mut self, now: Time, owd_us: i64) {
        match self.slots.last_mut() {
            Some(s) if now.since(s.start) < BASE_SLOT => s.min_us = s.min_us.min(owd_us),
            _ => {
                if self.slots.len() == BASE_SLOTS {
                    self.slots.remove(0);
                }
                self.slots.push(Slot {
                    start: now,
                    min_us: owd_us,
                });
            }
        }
    }

    pub(crate) fn base_us(&self) -> Option<i64> {
        self.slots.iter().map(|s| s.min_us).min()
    }
}

#[derive(Debug, Clone)]
pub struct Background {
    cfg: BackgroundConfig,
    window: u64,
    /// Base delay history.
    base: BaseDelay,
    recent: [i64; CURRENT_FILTER],
    recent_len: usize,
    /// Latest queueing delay estimate, µs.
    queue_us: i64,
    /// Its one-way-delay part (the queue wherever the bottleneck is), µs.
    queue_owd_us: i64,
    last_cut: Time,
    srtt: Duration,
    min_rtt: Duration,
    // Delivery rate: bytes acknowledged per interval, and recent maxima.
    interval_start: Time,
    interval_bytes: u64,
    /// Some acknowledgement of the interval came while the sender had less to send than
    /// its window allowed.
    interval_app_limited: bool,
    rates: [u64; RATE_SAMPLES],
    /// Which of `rates` were measured while the sender was application-limited.
    rates_app_limited: [bool; RATE_SAMPLES],
    rate_next: usize,
    /// Delivery rate remembered from before a yield.
    remembered_rate: u64,
    /// The link's capacity: zero until a queue of half the target has stood (before, the
    /// delivery rate is only the ramping window's); then the highest delivery rate measured
    /// while the sender had more to send than its window allowed. A rate measured while the
    /// sender was application-limited (a pipelined source sending blocks as they reach it)
    /// says nothing of the link, even with a queue standing (someone else's): taken as the
    /// capacity, it capped the window there for good once the source caught up.
    capacity_rate: u64,
    yielded: bool,
    /// Since when the queue has been empty while yielded.
    low_since: Option<Time>,
    /// How long the queue must stay empty before reclaiming; doubles when a yield follows a
    /// reclaim closely (the foreground flow was still there, its sawtooth had drained the queue).
    holdoff: Duration,
    /// The hold-off without doubling, and when the current yield began.
    holdoff_base: Duration,
    yield_start: Time,
    last_reclaim: Time,
    slowdown_until: Option<Time>,
    saved_window: u64,
    /// Below this window, growth toward the cap is exponential; at or above it, gentle (see
    /// [`GENTLE_GROWTH`]). Unbounded at the start and after a yield (the link is empty: fill
    /// it fast), the window before the cut after a loss (regain it fast), zero after a cut on
    /// queue (the window is where the queue says it should be).
    fast_below: u64,
    next_slowdown: Time,
    path: Option<PathSignal>,
    /// The last yield was to competing traffic the monitor saw on this host.
    yield_local: bool,
    /// Local backlog of the last [`CURRENT_FILTER`] monitor samples: the standing queue is
    /// their minimum (a GSO burst handed to the qdisc at once is not a standing queue).
    path_backlog: [u64; CURRENT_FILTER],
    path_len: usize,
    started: bool,
    /// Least and greatest window over the current and the previous round trip (two
    /// buckets of one smoothed RTT each), and when the current bucket began.
    win_min: [u64; 2],
    win_max: [u64; 2],
    win_bucket_start: Time,
    /// The one-way queue and the least window of the last two round trips at the last
    /// ack that saw the queue at or below target: what the queue is when it comes from
    /// our window alone (whatever error the bandwidth-delay product has).
    calm: Option<(i64, u64)>,
    /// The current yield was to a queue our window did not explain.
    yield_unexplained: bool,
    /// No yields on an unexplained queue before this (after one that was a false alarm),
    /// and how long the next false alarm silences them.
    unexplained_quiet_until: Time,
    unexplained_quiet: Duration,
}

impl Background {
    pub fn new(cfg: BackgroundConfig) -> Self {
        Self {
            window: 4 * MSS_BYTES,
            cfg,
            base: BaseDelay::default(),
            recent: [i64::MAX; CURRENT_FILTER],
            recent_len: 0,
            queue_us: 0,
            queue_owd_us: 0,
            last_cut: Time::ZERO,
            srtt: Duration::from_millis(100),
            min_rtt: Duration::MAX,
            interval_start: Time::ZERO,
            interval_bytes: 0,
            interval_app_limited: false,
            rates: [0; RATE_SAMPLES],
            rates_app_limited: [false; RATE_SAMPLES],
            rate_next: 0,
            remembered_rate: 0,
            capacity_rate: 0,
            yielded: false,
            low_since: None,
            holdoff: RECLAIM_HOLDOFF_MIN,
            holdoff_base: RECLAIM_HOLDOFF_MIN,
            yield_start: Time::ZERO,
            last_reclaim: Time::ZERO,
            slowdown_until: None,
            saved_window: 0,
            fast_below: u64::MAX,
            next_slowdown: Time::ZERO,
            path: None,
            yield_local: false,
            path_backlog: [0; CURRENT_FILTER],
            path_len: 0,
            started: false,
            win_min: [u64::MAX; 2],
            win_max: [0; 2],
            win_bucket_start: Time::ZERO,
            calm: None,
            yield_unexplained: false,
            unexplained_quiet_until: Time::ZERO,
            unexplained_quiet: UNEXPLAINED_QUIET_MIN,
        }
    }

    /// Queueing delay the controller currently believes in.
    pub fn queue_delay(&self) -> Duration {
        Duration::from_micros(self.queue_us.max(0) as u64)
    }

    /// True while yielding to competing traffic.
    pub fn is_yielding(&self) -> bool {
        self.yielded
    }

    fn base_us(&self) -> Option<i64> {
        self.base.base_us()
    }

    fn record_delay(&mut self, now: Time, owd_us: i64) {
        self.base.record(now, owd_us);
        self.recent[self.recent_len % CURRENT_FILTER] = owd_us;
        self.recent_len += 1;
    }

    fn current_us(&self) -> i64 {
        self.recent.iter().copied().min().unwrap_or(0)
    }

    fn delivery_rate(&self) -> u64 {
        self.rates.iter().copied().max().unwrap_or(0)
    }

    /// Highest recent delivery rate measured while the sender was not application-limited.
    fn full_delivery_rate(&self) -> u64 {
        self.rates
            .iter()
            .zip(&self.rates_app_limited)
            .filter(|(_, &limited)| !limited)
            .map(|(&r, _)| r)
            .max()
            .unwrap_or(0)
    }

    fn record_delivery(&mut self, now: Time, bytes: u64, app_limited: bool) {
        self.interval_bytes += bytes;
        self.interval_app_limited |= app_limited;
        let interval = self.min_rtt.max(RATE_INTERVAL_MIN);
        let dt = now.since(self.interval_start);
        if dt >= interval {
            if self.interval_start != Time::ZERO {
                let i = self.rate_next % RATE_SAMPLES;
                self.rates[i] = (self.interval_bytes as f64 / dt.as_secs_f64()) as u64;
                self.rates_app_limited[i] = self.interval_app_limited;
                self.rate_next += 1;
            }
            self.interval_start = now;
            self.interval_bytes = 0;
            self.interval_app_limited = false;
        }
    }

    fn bdp(&self, rate: u64) -> u64 {
        let rtt = if self.min_rtt == Duration::MAX {
            self.srtt
        } else {
            self.min_rtt
        };
        (rate as f64 * rtt.as_secs_f64()) as u64
    }

    /// `local`: the monitor saw the competing traffic leave this host (so it will also see it stop).
    fn yield_now(&mut self, now: Time, local: bool) {
        self.yield_local = local;
        if !self.yielded {
            self.yield_unexplained = false;
            tracing::debug!(
                now_us = now.as_micros(),
                queue_us = self.queue_us,
                other_bytes_per_s = self.path.map_or(0, |p| p.other_bytes_per_s),
                local,
                "background: yield"
            );
            // What the link carried just now; a yield soon after a reclaim keeps what was
            // remembered before (the window had not regrown yet). Not the maximum of all
            // time, which only ever grows with the noise of the samples.
            let regret = self.last_reclaim != Time::ZERO && now.since(self.last_reclaim) < RECLAIM_REGRET;
            self.remembered_rate = if regret {
                self.delivery_rate().max(self.remembered_rate)
            } else {
                self.delivery_rate()
            };
            self.yielded = true;
            // Two propagation round trips (the smoothed RTT already holds the competing queue).
            let rtt = if self.min_rtt == Duration::MAX {
                self.srtt
            } else {
                self.min_rtt
            };
            let base = RECLAIM_HOLDOFF_MIN.max(rtt * 2);
            self.holdoff_base = base;
            self.yield_start = now;
            self.holdoff = if self.last_reclaim != Time::ZERO && now.since(self.last_reclaim) < RECLAIM_REGRET {
                (self.holdoff * 2).clamp(base, RECLAIM_HOLDOFF_MAX)
            } else {
                base
            };
        }
        self.low_since = None;
        self.window = self.cfg.window_bytes_min;
        self.last_cut = now;
        self.fast_below = u64::MAX;
    }

    fn track_window(&mut self, now: Time) {
        if now.since(self.win_bucket_start) >= self.srtt {
            self.win_min = [self.win_min[1], self.window];
            self.win_max = [self.win_max[1], self.window];
            self.win_bucket_start = now;
        } else {
            self.win_min[1] = self.win_min[1].min(self.window);
            self.win_max[1] = self.win_max[1].max(self.window);
        }
    }

    /// Queue (µs, one-way delay) that our own window cannot have put there: its rise
    /// since the queue was last at target, less what our window grew since (the most
    /// it can have added, from the least window before to the greatest since). A
    /// competing flow in slow start makes this grow each round trip while our cuts
    /// keep our own share of the queue at target, so it is seen a round trip or two
    /// before the whole queue reaches [`YIELD_FACTOR`] × the target. None until the
    /// link's capacity is known (during the first ramp-up the window grows blindly).
    fn unexplained_queue_us(&self, q_owd: i64) -> Option<i64> {
        let (calm_q, calm_win) = self.calm?;
        let rate = self.capacity_rate.max(self.delivery_rate());
        if self.capacity_rate == 0 || rate == 0 {
            return None;
        }
        let peak = self.win_max[0].max(self.win_max[1]);
        // Negative when our window is smaller than it was then: our cuts gave the competing
        // flow room, and the queue should have fallen by as much.
        let own_us = ((peak as f64 - calm_win as f64) / rate as f64 * 1e6) as i64;
        Some(q_owd - calm_q - own_us)
    }

    /// The standing queue on the local egress qdisc, µs (0 without the monitor).
    fn local_queue_us(&self) -> i64 {
        // The local qdisc drains at the link's rate, not at ours.
        let drain_rate = self
            .delivery_rate()
            .max(self.capacity_rate)
            .max(self.path.map_or(0, |p| p.egress_bytes_per_s));
        match self.path_len {
            n if n > 0 && drain_rate > 0 => {
                let standing = self.path_backlog[..n.min(CURRENT_FILTER)]
                    .iter()
                    .copied()
                    .min()
                    .unwrap_or(0);
                (standing as f64 / drain_rate as f64 * 1e6) as i64
            }
            _ => 0,
        }
    }

    /// After a yield to competing traffic the monitor saw leave this host, its absence is
    /// known first-hand, at every monitor sample: once it has been gone, with the local
    /// queue below target, for a round trip of the path (the propagation round trip, not the
    /// smoothed one, which still holds the foreground's queue; a TCP flow in slow start sends
    /// at least once a round trip), the link is free. The one-way delay is not waited for:
    /// sampled once a round trip while yielded, it shows the drained queue a round trip or
    /// two late, but while its last sample still shows a queue of [`YIELD_FACTOR`] × the
    /// target (the foreground's queue at a bottleneck further along, still draining),
    /// the link is not free yet. The window goes straight back to the bandwidth-delay
    /// product it had.
    fn try_local_reclaim(&mut self, now: Time) {
        if !(self.yielded && self.yield_local) {
            return;
        }
        let target_us = self.cfg.queue_delay_target.as_micros() as i64;
        let competing = self
            .path
            .is_some_and(|p| p.other_bytes_per_s > self.cfg.other_bytes_per_s_yield);
        if competing || self.local_queue_us() >= target_us {
            self.low_since = None;
            return;
        }
        if self.queue_owd_us > YIELD_FACTOR * target_us {
            return;
        }
        let since = *self.low_since.get_or_insert(now);
        let rtt = if self.min_rtt == Duration::MAX {
            self.srtt
        } else {
            self.min_rtt
        };
        let holdoff = rtt.max(LOCAL_RECLAIM_HOLDOFF_MIN);
        if now.since(since) >= holdoff {
            tracing::debug!(
                now_us = now.as_micros(),
                low_since_us = since.as_micros(),
                holdoff_ms = holdoff.as_millis() as u64,
                local = true,
                "background: reclaim"
            );
            self.yielded = false;
            self.low_since = None;
            self.last_reclaim = now;
            self.next_slowdown = now + SLOWDOWN_INTERVAL;
            self.window = self.window.max(self.bdp(self.remembered_rate));
            self.clamp();
        }
    }

    /// The rate ceiling in force, bytes/s.
    fn ceiling(&self) -> Option<u64> {
        let share = self.cfg.capacity_share_max.and_then(|f| {
            let capacity = self.delivery_rate().max(self.remembered_rate);
            (capacity > 0).then_some((capacity as f64 * f) as u64)
        });
        match (self.cfg.rate_max, share) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Change the ceilings (from the schedule or the administrator) while running.
    pub fn set_ceiling(&mut self, rate_max: Option<u64>, capacity_share_max: Option<f64>) {
        self.cfg.rate_max = rate_max;
        self.cfg.capacity_share_max = capacity_share_max;
    }

    fn clamp(&mut self) {
        let mut max = super::foreground::WINDOW_BYTES_MAX;
        if let Some(r) = self.ceiling() {
            max = max.min(self.bdp(r).max(self.cfg.window_bytes_min));
        }
        self.window = self.window.clamp(self.cfg.window_bytes_min, max);
    }
}

impl Controller for Background {
    fn name(&self) -> &'static str {
        "background"
    }

    fn on_sent(&mut self, now: Time, _bytes: u64) {
        if !self.started {
            self.started = true;
            self.next_slowdown = now + SLOWDOWN_INTERVAL;
            self.interval_start = now;
        }
    }

    fn on_ack(&mut self, now: Time, ack: &AckSample) {
        self.srtt = ack.srtt;
        self.min_rtt = self.min_rtt.min(ack.min_rtt);
        self.record_delivery(now, ack.acked_bytes, ack.app_limited);
        if let Some(owd) = ack.one_way_delay_us {
            self.record_delay(now, owd);
        }
        let target_us = self.cfg.queue_delay_target.as_micros() as i64;
        let q_owd = self.base_us().map_or(0, |b| self.current_us() - b);
        let q_local = self.local_queue_us();
        let q = q_owd.max(q_local);
        self.queue_us = q;
        self.queue_owd_us = q_owd;
        tracing::trace!(
            now_us = now.as_micros(),
            acked = ack.acked_bytes,
            window = self.window,
            q_owd,
            q_local,
            srtt_us = self.srtt.as_micros() as u64,
            rate = self.delivery_rate(),
            yielded = self.yielded,
            other = self.path.map_or(0, |p| p.other_bytes_per_s),
            "background: ack"
        );
        if q >= target_us / 2 || self.capacity_rate > 0 {
            self.capacity_rate = self.capacity_rate.max(self.full_delivery_rate());
        }

        // Periodic slowdown: drain the queue so every flow sees the true base delay.
        if let Some(until) = self.slowdown_until {
            if now < until {
                self.window = self.cfg.window_bytes_min;
                return;
            }
            self.slowdown_until = None;
            self.window = self.saved_window;
            self.next_slowdown = now + SLOWDOWN_INTERVAL;
        } else if self.started && now >= self.next_slowdown && !self.yielded {
            self.saved_window = self.window;
            self.slowdown_until = Some(now + self.srtt * 2);
            self.window = self.cfg.window_bytes_min;
            return;
        }

        self.try_local_reclaim(now);
        self.track_window(now);
        let competing = self
            .path
            .is_some_and(|p| p.other_bytes_per_s > self.cfg.other_bytes_per_s_yield);
        if competing || (q > YIELD_FACTOR * target_us && !(self.yielded && self.yield_local)) {
            self.yield_now(now, competing);
            return;
        }
        if !self.yielded {
            if q_owd <= target_us {
                // The level our window alone keeps, smoothed: the last such sample may be
                // anywhere from the trough of our sawtooth to the target.
                let level = self.calm.map_or(q_owd, |(c, _)| (7 * c + q_owd) / 8);
                self.calm = Some((level, self.win_min[0].min(self.win_min[1])));
            } else if now >= self.unexplained_quiet_until
                && now.since(self.last_reclaim) >= RECLAIM_REGRET
                && self
                    .unexplained_queue_us(q_owd)
                    .is_some_and(|u| u > UNEXPLAINED_FACTOR * target_us)
            {
                tracing::debug!(
                    now_us = now.as_micros(),
                    q_owd,
                    calm = ?self.calm,
                    window = self.window,
                    "background: the queue grew more than our window explains"
                );
                self.yield_now(now, false);
                self.yield_unexplained = true;
                // Seen this early, the competing flow is still in its slow start (or, after a
                // HyStart exit, growing slowly below the link's rate): the queue drains for a
                // while as it grows. Not a sign it left.
                self.holdoff = (self.holdoff_base * 4).max(self.holdoff).min(RECLAIM_HOLDOFF_MAX);
                return;
            }
        }
        if q > target_us {
            if now.since(self.last_cut) >= self.srtt {
                // The queue above target is this flow's excess over the pipe (the window
                // beyond the bandwidth-delay product): take that out, not a share of the whole
                // window (multiplying by target/q halved an 80 ms window for 3 ms too many).
                let excess = ((q - target_us) as f64 / 1e6 * self.delivery_rate() as f64) as u64;
                self.window = self.window.saturating_sub(excess).clamp(
                    self.window / 2,
                    self.window.saturating_sub(MSS_BYTES).max(self.window / 2),
                );
                self.last_cut = now;
                self.fast_below = 0;
            }
        } else {
            if self.yielded && !self.yield_local {
                // After a yield on delay alone, a drained queue may only be the foreground's
                // sawtooth: it must stay drained for the hold-off.
                if q < target_us / 4 {
                    let since = *self.low_since.get_or_insert(now);
                    // The doubled hold-off guards against the foreground's early gaps (a
                    // slow start that overshot and recovers); a queue that stood through
                    // the whole regret interval was a foreground established by then, and
                    // its queue draining now means it left.
                    let holdoff = if since.since(self.yield_start) >= RECLAIM_REGRET {
                        self.holdoff_base
                    } else {
                        self.holdoff
                    };
                    if now.since(since) >= holdoff {
                        // The link has stayed free: jump back toward what it carried before the yield.
                        tracing::debug!(
                            now_us = now.as_micros(),
                            low_since_us = since.as_micros(),
                            holdoff_ms = holdoff.as_millis() as u64,
                            local = false,
                            "background: reclaim"
                        );
                        self.yielded = false;
                        self.low_since = None;
                        self.last_reclaim = now;
                        if self.yield_unexplained {
                            // The competing flow stayed until the queue drained for good.
                            self.unexplained_quiet = UNEXPLAINED_QUIET_MIN;
                        }
                        // The yield was a slowdown: the queue drained and the base was seen.
                        self.next_slowdown = now + SLOWDOWN_INTERVAL;
                        self.window = self.window.max(self.bdp(self.remembered_rate) / 2);
                    }
                } else {
                    self.low_since = None;
                }
            }
            if !ack.app_limited {
                // Exponential growth up to the link's bandwidth-delay product plus the target
                // queue (the delay signal lags a round trip, so growing past it blindly would
                // overshoot by a whole window); beyond that, probe for more by one segment per
                // round trip. The capacity is the delivery rate seen while a queue stood, so
                // the cap is known only once the link has been full: during the first ramp-up
                // the delivery rate is just the current window, and capping at it would make
                // growth linear (a 50 Mbit/s, 80 ms link then takes minutes to fill).
                let gain = (target_us - q.max(0)) as f64 / target_us as f64;
                let rate = self.capacity_rate.max(self.remembered_rate);
                let cap = if rate > 0 {
                    self.bdp(rate) + (rate as f64 * self.cfg.queue_delay_target.as_secs_f64()) as u64
                } else {
                    u64::MAX
                };
                if self.window < cap {
                    // Near the queue target, growth adds at most GENTLE_GROWTH × (target − q) of
                    // queue per round trip, whatever the number of flows sharing the bottleneck
                    // (each grows by its own rate × that): exponential growth by every flow up
                    // to its own cap overshot the target by the flows' sum (three background
                    // flows through one VPN link held 6-10 ms).
                    let step = if self.window < self.fast_below {
                        gain
                    } else {
                        let srtt = self.srtt.as_secs_f64().max(1e-3);
                        gain * (GENTLE_GROWTH * self.cfg.queue_delay_target.as_secs_f64() / srtt).min(1.0)
                    };
                    self.window = (self.window + (ack.acked_bytes as f64 * step) as u64).min(cap.max(self.window));
                } else {
                    self.window += (MSS_BYTES as f64 * ack.acked_bytes as f64 / self.window as f64 * gain) as u64;
                }
                // Yielded, the window still grows while the queue stays below target (a yield to
                // a delay spike that was not competing traffic, such as a stalled hop, costs a
                // few round trips, not a hold-off). Once it is back to half of what the link
                // carried, the yield is over: counted as a reclaim, so that the next yield
                // remembers the rate and sets its hold-off afresh.
                if self.yielded && !self.yield_local && self.window >= self.bdp(self.remembered_rate) / 2 {
                    tracing::debug!(
                        now_us = now.as_micros(),
                        window = self.window,
                        "background: regrown after a yield"
                    );
                    // The yield was to nothing that stayed (another background flow's growth, a
                    // spike): from here the window grows gently, or every flow that regrew at
                    // once doubles toward its own cap together (three flows through one VPN link
                    // yielded together every 0.37 s, at 12 ms).
                    self.fast_below = 0;
                    self.yielded = false;
                    self.low_since = None;
                    self.last_reclaim = now;
                    self.next_slowdown = now + SLOWDOWN_INTERVAL;
                    if self.yield_unexplained {
                        // A false alarm: whatever raised the queue gave way or went by.
                        self.unexplained_quiet_until = now + self.unexplained_quiet;
                        self.unexplained_quiet = (self.unexplained_quiet * 2).min(UNEXPLAINED_QUIET_MAX);
                    }
                }
            }
        }
        self.clamp();
    }

    fn on_loss(&mut self, now: Time, loss: &LossSample) {
        if now.since(self.last_cut) < self.srtt && loss.largest_lost_sent < self.last_cut {
            return;
        }
        // Back to the window before the loss fast, and never lower than a loss before it set:
        // with random loss on a long fat link (1 %, 1 Gbit/s, 80 ms: a loss every round trip),
        // each loss during the regrowth lowered the mark, the window ratcheted down to where
        // losses are rare, and past the mark it grew gently (the scale model's calibration
        // transfer at 0.036 of the link, was 0.438).
        self.fast_below = self.fast_below.max(self.window);
        self.window /= 2;
        self.last_cut = now;
        self.clamp();
    }

    fn on_path(&mut self, now: Time, signal: &PathSignal) {
        self.path = Some(*signal);
        self.path_backlog[self.path_len % CURRENT_FILTER] = signal.backlog_bytes;
        self.path_len += 1;
        self.try_local_reclaim(now);
    }

    fn window(&self) -> u64 {
        self.window
    }

    fn pacing_rate(&self, srtt: Duration) -> Option<u64> {
        let rtt_us = srtt.as_micros().max(1) as f64;
        let mut rate = (self.window as f64 * 1e6 / rtt_us * 1.2) as u64;
        if let Some(max) = self.ceiling() {
            rate = rate.min(max);
        }
        Some(rate.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(owd_us: i64, bytes: u64) -> AckSample {
        AckSample {
            acked_bytes: bytes,
            rtt: Some(Duration::from_millis(40)),
            srtt: Duration::from_millis(40),
            min_rtt: Duration::from_millis(40),
            one_way_delay_us: Some(owd_us),
            in_flight: 0,
            app_limited: false,
        }
    }

    /// Feed acks every 1 ms with a given one-way delay; the clock offset is arbitrary.
    fn feed(c: &mut Background, from_ms: u64, to_ms: u64, owd: impl Fn(u64) -> i64) {
        feed_with(c, from_ms, to_ms, owd, MSS_BYTES, false);
    }

    /// As [`feed`], with `bytes` acknowledged each ms, the sender application-limited or not.
    fn feed_with(
        c: &mut Background,
        from_ms: u64,
        to_ms: u64,
        owd: impl Fn(u64) -> i64,
        bytes: u64,
        app_limited: bool,
    ) {
        for t in from_ms..to_ms {
            let now = Time(t * 1000);
            c.on_sent(now, bytes);
            c.on_ack(
                now,
                &AckSample {
                    app_limited,
                    ..ack(owd(t), bytes)
                },
            );
        }
    }

    #[test]
    fn capacity_rises_to_what_the_link_delivers_after_a_low_first_estimate() {
        // A queue of 2 ms (half the target and more) stands while one segment a ms gets
        // through: the link looks full at 1.4 MB/s. Then it delivers four a ms with no
        // queue (the queue was a ramp-up burst, or the competing flow left): the capacity
        // is at least that, and the window grows to its bandwidth-delay product at once.
        // A capacity set once and for all capped the window at the first estimate, where
        // it grew a segment a round trip (and random loss kept halving it).
        let mut c = Background::new(BackgroundConfig::default());
        feed(&mut c, 1, 200, |_| 20_000);
        feed(&mut c, 200, 700, |_| 22_000);
        let low = c.capacity_rate;
        assert!(low > 1_000_000 && low < 2_000_000, "first estimate {low}");
        feed_with(&mut c, 700, 1_500, |_| 20_000, 4 * MSS_BYTES, false);
        assert!(c.capacity_rate > 3 * low, "capacity {} after {low}", c.capacity_rate);
        let bdp = c.bdp(4 * MSS_BYTES * 1000);
        assert!(c.window() >= bdp * 9 / 10, "window {} for a BDP of {bdp}", c.window());
    }

    #[test]
    fn capacity_is_not_measured_while_the_sender_is_application_limited() {
        // A pipelined source sends blocks as they reach it: one segment a ms, with
        // someone else's 2 ms queue standing. That is not the link's capacity.
        let mut c = Background::new(BackgroundConfig::default());
        feed_with(&mut c, 1, 200, |_| 20_000, MSS_BYTES, true);
        feed_with(&mut c, 200, 700, |_| 22_000, MSS_BYTES, true);
        assert_eq!(c.capacity_rate, 0);
        assert!(c.delivery_rate() > 1_000_000, "{}", c.delivery_rate());
    }

    #[test]
    fn background_grows_on_an_empty_queue_whatever_the_clock_offset() {
        for offset in [-5_000_000_000i64, 0, 123_456_789] {
            let mut c = Background::new(BackgroundConfig::default());
            let w0 = c.window();
            feed(&mut c, 1, 200, |_| offset + 20_000);
            assert!(
                c.window() > 10 * w0,
                "offset {offset}: window {} did not grow",
                c.window()
            );
            assert_eq!(c.queue_delay(), Duration::ZERO);
        }
    }

    #[test]
    fn background_yields_to_a_queue_far_above_target_and_reclaims_after() {
        let mut c = Background::new(BackgroundConfig::default());
        // One segment acknowledged per ms over a 40 ms round trip: 1.424 MB/s, BDP 57 KB.
        feed(&mut c, 1, 300, |_| 20_000);
        let bdp = c.bdp(c.delivery_rate());
        assert!(bdp > 50_000, "{bdp}");
        // Foreground traffic builds a 30 ms queue.
        feed(&mut c, 300, 310, |_| 50_000);
        assert!(c.is_yielding());
        assert_eq!(c.window(), BackgroundConfig::default().window_bytes_min);
        // It leaves: the queue drains and the window is back to the link's BDP within a few round trips.
        feed(&mut c, 310, 310 + 4 * 40, |_| 20_000);
        assert!(!c.is_yielding());
        assert!(
            c.window() as f64 >= 0.9 * bdp as f64,
            "window {} after reclaim, BDP {bdp}",
            c.window()
        );
    }

    #[test]
    fn background_yield_ends_when_the_window_has_regrown_and_the_next_yield_starts_afresh() {
        let min = BackgroundConfig::default().window_bytes_min;
        let mut c = Background::new(BackgroundConfig::default());
        feed(&mut c, 1, 300, |_| 20_000);
        let bdp = c.bdp(c.delivery_rate());
        feed(&mut c, 300, 310, |_| 50_000);
        assert!(c.is_yielding());
        assert_eq!(c.window(), min);
        // A 30 ms spike, then an empty queue: the window grows back; at half the BDP the
        // yield is over (it used to stay "yielded" at full rate).
        feed(&mut c, 310, 330, |_| 20_000);
        assert!(c.window() > min, "no growth on an empty queue after the yield");
        feed(&mut c, 330, 380, |_| 20_000);
        assert!(c.window() >= bdp / 2, "window {} of BDP {bdp}", c.window());
        assert!(!c.is_yielding(), "still yielding with the window regrown");
        // The next yield is a yield of its own: back to the minimum.
        feed(&mut c, 380, 390, |_| 50_000);
        assert!(c.is_yielding());
        assert_eq!(c.window(), min);
    }

    #[test]
    fn background_cuts_gently_just_above_target() {
        let mut c = Background::new(BackgroundConfig::default());
        feed(&mut c, 1, 300, |_| 20_000);
        feed(&mut c, 300, 303, |_| 24_000); // 4 ms > 3 ms target (the filter needs 4 samples)
        let w = c.window();
        feed(&mut c, 303, 310, |_| 24_000);
        assert!(
            c.window() < w && c.window() as f64 >= w as f64 * 0.7,
            "{} vs {}",
            c.window(),
            w
        );
        assert!(!c.is_yielding());
    }

    #[test]
    fn delivery_rate_is_not_inflated_by_acks_handled_in_batches() {
        // 6 MB/s over a 20 ms round trip; the acks of each 5 ms are handled together,
        // 0-4 ms late (the endpoint's poll), so the time between two handlings is not
        // the time the bytes took.
        let mut c = Background::new(BackgroundConfig::default());
        let rate = 6_000_000u64;
        let rtt = Duration::from_millis(20);
        let mut seed = 12345u64;
        for k in 1..400u64 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let late_us = (seed >> 33) % 4_000;
            let now = Time(k * 5_000 + late_us);
            c.on_sent(now, 0);
            c.record_delivery(now, rate / 200, false);
            c.min_rtt = rtt;
        }
        let measured = c.delivery_rate();
        assert!(
            measured <= rate * 108 / 100 && measured >= rate * 92 / 100,
            "delivery rate {measured} for {rate}"
        );
    }

    #[test]
    fn background_cuts_only_the_excess_queue() {
        let mut c = Background::new(BackgroundConfig::default());
        feed(&mut c, 1, 300, |_| 20_000);
        // 6 ms: 3 ms above target; the current delay is the least of the last 4 samples.
        feed(&mut c, 300, 303, |_| 26_000);
        let w = c.window();
        feed(&mut c, 303, 304, |_| 26_000);
        // 3 ms at the delivery rate of one segment per ms.
        let excess = 3 * MSS_BYTES;
        assert!(
            c.window() + excess * 9 / 10 <= w && c.window() + excess * 11 / 10 >= w,
            "{} vs {w}: {excess} too many",
            c.window(),
        );
    }

    #[test]
    fn background_yields_to_competing_local_traffic_from_the_monitor() {
        let mut c = Background::new(BackgroundConfig::default());
        feed(&mut c, 1, 100, |_| 20_000);
        c.on_path(
            Time(100_000),
            &PathSignal {
                backlog_bytes: 0,
                other_bytes_per_s: 1_000_000,
                egress_bytes_per_s: 2_000_000,
            },
        );
        feed(&mut c, 100, 101, |_| 20_000);
        assert!(c.is_yielding());
    }

    #[test]
    fn background_reclaims_within_a_round_trip_once_local_competing_traffic_stops() {
        let mut c = Background::new(BackgroundConfig::default());
        feed(&mut c, 1, 300, |_| 20_000);
        let bdp = c.bdp(c.delivery_rate());
        let busy = PathSignal {
            backlog_bytes: 0,
            other_bytes_per_s: 1_000_000,
            egress_bytes_per_s: 2_000_000,
        };
        c.on_path(Time(300_000), &busy);
        feed(&mut c, 300, 400, |_| 20_000);
        assert!(c.is_yielding());
        assert_eq!(c.window(), BackgroundConfig::default().window_bytes_min);
        // Still there 100 ms later: still yielding, even though the queue is empty.
        feed(&mut c, 400, 500, |_| 20_000);
        assert!(c.is_yielding());
        c.on_path(Time(500_000), &PathSignal::default());
        // One round trip (40 ms) without it, then the window jumps back toward the BDP.
        feed(&mut c, 500, 500 + 45, |_| 20_000);
        assert!(!c.is_yielding());
        assert!(
            c.window() >= bdp / 2,
            "window {} after the reclaim, BDP {bdp}",
            c.window()
        );
    }

    #[test]
    fn background_slows_down_periodically_to_refresh_the_base() {
        let mut c = Background::new(BackgroundConfig::default());
        feed(&mut c, 1, 20_000, |_| 20_000);
        let w = c.window();
        feed(&mut c, 20_000, 20_010, |_| 20_000);
        assert_eq!(
            c.window(),
            BackgroundConfig::default().window_bytes_min,
            "in the slowdown"
        );
        feed(&mut c, 20_010, 20_200, |_| 20_000);
        assert!(c.window() >= w, "restored after the slowdown");
    }

    #[test]
    fn losses_during_the_regrowth_do_not_lower_the_window_to_regain_fast() {
        // Random loss on a long fat link: a loss, then another before the window is back. The
        // window regains what it had before the first one fast; when each loss set the mark
        // to the window at that moment, the window ratcheted down and grew gently past the
        // lowered mark (the scale model's 1 Gbit/s, 80 ms, 1 % loss calibration at 0.036).
        let mut c = Background::new(BackgroundConfig::default());
        feed_with(&mut c, 1, 200, |_| 20_000, 8 * MSS_BYTES, false);
        let w0 = c.window();
        let loss = |t_ms: u64| LossSample {
            lost_bytes: MSS_BYTES,
            largest_lost_sent: Time(t_ms * 1000),
            timeout: false,
        };
        c.on_loss(Time(200_000), &loss(200));
        c.on_ack(Time(201_000), &ack(20_000, w0 / 4));
        c.on_loss(Time(250_000), &loss(250));
        assert!(c.window() < w0 / 2);
        feed_with(&mut c, 260, 360, |_| 20_000, w0 / 100, false);
        assert!(
            c.window() >= w0 * 95 / 100,
            "window {} of {w0} before the losses",
            c.window()
        );
    }

    #[test]
    fn background_respects_a_share_of_measured_capacity() {
        let mut c = Background::new(BackgroundConfig::default());
        // ~1.4 MB/s delivered (one MSS per ms), then capped at half of it.
        feed(&mut c, 1, 2000, |_| 20_000);
        let capacity = c.delivery_rate();
        assert!(capacity > 1_000_000, "{capacity}");
        c.set_ceiling(None, Some(0.5));
        feed(&mut c, 2000, 2100, |_| 20_000);
        let rate = c.pacing_rate(Duration::from_millis(40)).unwrap();
        assert!(rate <= capacity / 2 + 1, "{rate} > half of {capacity}");
    }

    #[test]
    fn background_respects_the_rate_ceiling() {
        let cfg = BackgroundConfig {
            rate_max: Some(125_000),
            ..Default::default()
        };
        let mut c = Background::new(cfg);
        feed(&mut c, 1, 2000, |_| 20_000);
        assert!(c.pacing_rate(Duration::from_millis(40)).unwrap() <= 125_000);
    }
}
