//! The background controller's promises, checked in the simulator on a 20
//! Mbit/s bottleneck with a deep (bufferbloated) queue, each with a named seed:
//! solo utilisation, added queueing delay, yielding to a foreground flow, and
//! reclaiming the link when it leaves. Durations are simulated time, not wall time.

use std::net::SocketAddr;
use std::time::Duration;

use lowtide_engine::content::BlockTable;
use lowtide_engine::io::sim::{LinkSpec, Sim};
use lowtide_engine::ranges::BlockSet;
use lowtide_engine::session::fetch::{Fetch, FetchConfig};
use lowtide_engine::session::serve::ServerConfig;
use lowtide_engine::time::Time;
use lowtide_engine::wire::DeploymentKey;

const RATE: u64 = 2_500_000; // 20 Mbit/s
const ONE_WAY: Duration = Duration::from_millis(20);
const RTT: Duration = Duration::from_millis(40);

fn bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u32)
                .wrapping_mul(2654435761)
                .wrapping_add(seed as u32)
                .to_le_bytes()[2]
        })
        .collect()
}

struct Net {
    sim: Sim,
    bg: usize,
    fg: usize,
    rx: usize,
}

fn net(seed: u64) -> Net {
    net_with(seed, RATE, ONE_WAY, Duration::ZERO, 500_000)
}

/// A bottleneck of `rate` with `forward` delay toward the receiver and `back` on the way back.
fn net_with(seed: u64, rate: u64, forward: Duration, back: Duration, queue_bytes_max: u64) -> Net {
    let mut sim = Sim::new(seed, DeploymentKey::derive(b"bg"), LinkSpec::lan());
    let bg = sim.add_node(ServerConfig::default());
    let fg = sim.add_node(ServerConfig::default());
    let rx = sim.add_node(ServerConfig::default());
    sim.set_bottleneck(
        rx,
        LinkSpec {
            rate_bytes_per_s: rate,
            delay: forward,
            queue_bytes_max,
            ..LinkSpec::lan()
        },
    );
    if back > Duration::ZERO {
        for from in [bg, fg] {
            sim.set_link(
                rx,
                from,
                LinkSpec {
                    delay: back,
                    ..LinkSpec::lan()
                },
            );
        }
    }
    Net { sim, bg, fg, rx }
}

fn start(n: &mut Net, server: usize, data: Vec<u8>, background: bool, seed: u64) {
    let t = BlockTable::from_bytes(&data, 4);
    n.sim.nodes[server].library.insert_full(t.clone(), data);
    let count = t.geometry().block_count();
    n.sim.nodes[n.rx].library.insert_empty(t.clone());
    let key = n.sim.key().clone();
    let cfg = FetchConfig {
        background,
        ..FetchConfig::default()
    };
    let mut f = Fetch::new(key, t.root(), cfg, Some((t, BlockSet::new(count))), seed);
    f.add_source(n.sim.now, n.sim.nodes[server].addr);
    n.sim.nodes[n.rx].fetches.push(f);
}

/// Datagram bytes from `from` that left the bottleneck in `[a, b)`, as a fraction of its capacity.
fn share(sim: &Sim, from: SocketAddr, a: Duration, b: Duration) -> f64 {
    share_of(sim, from, a, b, RATE)
}

fn share_of(sim: &Sim, from: SocketAddr, a: Duration, b: Duration, rate: u64) -> f64 {
    share_where(sim, |r| r.from == from, a, b, rate)
}

/// Datagram bytes of the records `which` picks that left the bottleneck in `[a, b)`, as a
/// fraction of its capacity `rate`.
fn share_where(
    sim: &Sim,
    which: impl Fn(&lowtide_engine::io::sim::BottleneckRecord) -> bool,
    a: Duration,
    b: Duration,
    rate: u64,
) -> f64 {
    let (a, b) = (Time::ZERO + a, Time::ZERO + b);
    let sent: u64 = sim
        .bottleneck_log
        .iter()
        .filter(|r| which(r) && r.left >= a && r.left < b)
        .map(|r| r.bytes as u64)
        .sum();
    sent as f64 / (rate as f64 * b.since(a).as_secs_f64())
}

fn queue_delay_percentile(sim: &Sim, a: Duration, b: Duration, p: f64) -> Duration {
    let (a, b) = (Time::ZERO + a, Time::ZERO + b);
    let mut d: Vec<Duration> = sim
        .bottleneck_log
        .iter()
        .filter(|r| r.left >= a && r.left < b)
        .map(|r| r.queued)
        .collect();
    d.sort();
    d[((d.len() - 1) as f64 * p) as usize]
}

/// What a background controller hears at each step of the fluid models below: `acked`
/// bytes with a one-way delay of `owd_us` (any clock offset included), not application-limited.
fn fluid_ack(
    acked: u64,
    rtt: Duration,
    srtt: Duration,
    base_rtt: Duration,
    owd_us: i64,
    in_flight: u64,
) -> lowtide_engine::cc::AckSample {
    lowtide_engine::cc::AckSample {
        acked_bytes: acked,
        rtt: Some(rtt),
        srtt,
        min_rtt: base_rtt,
        one_way_delay_us: Some(owd_us),
        in_flight,
        app_limited: false,
    }
}

fn run_to(n: &mut Net, t: Duration) {
    n.sim.run_until(Time::ZERO + t, |_| false);
}

#[test]
fn background_alone_fills_the_link_with_a_short_queue() {
    for seed in [101, 102] {
        let mut n = net(seed);
        let (bg, rx) = (n.bg, n.rx);
        start(&mut n, bg, bytes(40 << 20, 1), true, seed);
        run_to(&mut n, Duration::from_secs(12));
        let addr = n.sim.nodes[bg].addr;
        let util = share(&n.sim, addr, Duration::from_secs(4), Duration::from_secs(12));
        assert!(util >= 0.95, "seed {seed}: solo utilisation {util:.3}");
        let p95 = queue_delay_percentile(&n.sim, Duration::from_secs(4), Duration::from_secs(12), 0.95);
        let p99 = queue_delay_percentile(&n.sim, Duration::from_secs(4), Duration::from_secs(12), 0.99);
        assert!(
            p95 <= Duration::from_millis(5),
            "seed {seed}: p95 queueing delay {p95:?}"
        );
        assert!(
            p99 <= Duration::from_millis(10),
            "seed {seed}: p99 queueing delay {p99:?}"
        );
        assert!(!n.sim.nodes[rx].fetches[0].is_complete());
        eprintln!("seed {seed}: solo utilisation {util:.3}, queueing delay p95 {p95:?} p99 {p99:?}");
    }
}

#[test]
fn background_yields_to_foreground_and_reclaims_when_it_leaves() {
    yield_and_reclaim(201, RATE, ONE_WAY, Duration::ZERO, 500_000, Duration::from_millis(500));
}

/// The same at 50 Mbit/s over an 80 ms round trip (40 ms each way, 200 ms
/// queue). The yield is timed from the foreground's first data at the
/// bottleneck (its fetcher's handshake takes a round trip before that, which
/// no sender can see): 120 ms, within 2 RTT + 100 ms (210 ms before the
/// background yielded on a queue its window does not explain); reclaim 410 ms.
#[test]
fn background_yields_and_reclaims_a_long_fat_link() {
    for seed in [211, 212] {
        let rate = 6_250_000;
        yield_and_reclaim(
            seed,
            rate,
            Duration::from_millis(40),
            Duration::from_millis(40),
            rate / 5,
            Duration::from_millis(500),
        );
    }
}

fn yield_and_reclaim(seed: u64, rate: u64, forward: Duration, back: Duration, queue: u64, reclaim_max: Duration) {
    let rtt = (forward + back).max(RTT);
    let share = |sim: &Sim, from: SocketAddr, a: Duration, b: Duration| share_of(sim, from, a, b, rate);
    // The foreground flow alone, for its solo throughput (3 s of the link).
    let fg_data = bytes((rate * 3) as usize, 2);
    let mut solo = net_with(seed, rate, forward, back, queue);
    let fg = solo.fg;
    start(&mut solo, fg, fg_data.clone(), false, seed);
    run_to(&mut solo, Duration::from_secs(4));
    let fg_addr = solo.sim.nodes[fg].addr;
    let fg_solo = share(&solo.sim, fg_addr, Duration::from_secs(1), Duration::from_secs(2));

    // Background alone for 4 s, then the same foreground flow joins.
    let mut n = net_with(seed, rate, forward, back, queue);
    let (bg, fg, rx) = (n.bg, n.fg, n.rx);
    start(&mut n, bg, bytes((rate * 16) as usize, 1), true, seed);
    run_to(&mut n, Duration::from_secs(4));
    start(&mut n, fg, fg_data, false, seed + 1);
    let fg_start = Duration::from_secs(4);
    let fg_done = n.sim.run_until(Time::ZERO + Duration::from_secs(12), |sim| {
        sim.nodes[rx].fetches[1].is_complete()
    });
    assert!(fg_done, "seed {seed}: the foreground transfer did not finish");
    let fg_end = n.sim.now.since(Time::ZERO);
    run_to(&mut n, fg_end + Duration::from_secs(2));
    let bg_addr = n.sim.nodes[bg].addr;

    let fg_with_bg = share(
        &n.sim,
        fg_addr,
        fg_start + Duration::from_secs(1),
        fg_start + Duration::from_secs(2),
    );
    assert!(
        fg_with_bg >= 0.95 * fg_solo,
        "seed {seed}: foreground kept {fg_with_bg:.3} of the link, {fg_solo:.3} alone"
    );

    let first = |from: Duration, to: Duration, pred: &dyn Fn(f64) -> bool| {
        let step = Duration::from_millis(10);
        let mut t = from;
        while t < to {
            if pred(share(&n.sim, bg_addr, t, t + Duration::from_millis(100))) {
                return Some(t - from);
            }
            t += step;
        }
        None
    };
    // Foreground traffic appears when its first data reaches the bottleneck (its fetcher's
    // handshake takes a round trip before that, which no sender can see).
    let fg_seen = n
        .sim
        .bottleneck_log
        .iter()
        .find(|r| r.from == fg_addr && r.left >= Time::ZERO + fg_start && r.bytes >= 1000)
        .map(|r| r.left.since(Time::ZERO) - r.queued)
        .expect("no foreground data at the bottleneck");
    let yield_time = first(fg_seen, fg_end, &|s| s < 0.10).expect("background never yielded");
    assert!(
        yield_time <= 2 * rtt + Duration::from_millis(100),
        "seed {seed}: yielded after {yield_time:?}"
    );
    let reclaim = first(fg_end, fg_end + Duration::from_secs(2), &|s| s >= 0.90).expect("never reclaimed");
    eprintln!(
        "seed {seed}: {} Mbit/s {rtt:?}: foreground kept {:.3} of its solo share, its data at the bottleneck {:?} after its start, background yielded {yield_time:?} after that, reclaimed 90% in {reclaim:?}",
        rate * 8 / 1_000_000,
        fg_with_bg / fg_solo,
        fg_seen - fg_start,
    );
    assert!(reclaim <= reclaim_max, "seed {seed}: reclaimed after {reclaim:?}");
}

/// A latecomer: a second background flow from another host joins a standing
/// background flow 4 s in (shares 0.813 + 0.176, p99 7.3 ms; 0.732 + 0.250, p99
/// 9.6 ms before growth turned gentle after a yield that ended by regrowing;
/// 0.803 + 0.196, p99 6.9 ms before the yield on an unexplained queue, which
/// without its silencing after a false alarm made them yield to each other in
/// turn: 0.747). Each sees the other's queue as one its own window does not
/// explain and may yield to it; together they must still fill the link with a
/// short queue (no ping-pong of yields that leaves it idle), and neither starves.
#[test]
fn two_background_flows_share_the_link_with_a_short_queue() {
    for seed in [221, 222] {
        let mut n = net(seed);
        let (a, b) = (n.bg, n.fg);
        start(&mut n, a, bytes(40 << 20, 1), true, seed);
        run_to(&mut n, Duration::from_secs(4));
        start(&mut n, b, bytes(40 << 20, 2), true, seed + 1);
        run_to(&mut n, Duration::from_secs(14));
        let (from, to) = (Duration::from_secs(6), Duration::from_secs(14));
        let share_a = share(&n.sim, n.sim.nodes[a].addr, from, to);
        let share_b = share(&n.sim, n.sim.nodes[b].addr, from, to);
        let p99 = queue_delay_percentile(&n.sim, from, to, 0.99);
        eprintln!("seed {seed}: two background flows: shares {share_a:.3} + {share_b:.3}, queueing delay p99 {p99:?}");
        assert!(
            share_a + share_b >= 0.90,
            "seed {seed}: together {:.3} of the link",
            share_a + share_b
        );
        assert!(
            share_a.min(share_b) >= 0.10,
            "seed {seed}: one flow starves: {share_a:.3} / {share_b:.3}"
        );
        assert!(
            p99 <= Duration::from_millis(8),
            "seed {seed}: p99 queueing delay {p99:?}"
        );
    }
}

#[test]
fn background_fills_a_long_fat_link() {
    // 50 Mbit/s, 80 ms round trip (40 ms each way), 200 ms queue: the bench's hardest case.
    for seed in [301, 302] {
        let rate = 6_250_000;
        let mut n = net_with(
            seed,
            rate,
            Duration::from_millis(40),
            Duration::from_millis(40),
            rate / 5,
        );
        let bg = n.bg;
        start(&mut n, bg, bytes(160 << 20, 3), true, seed);
        run_to(&mut n, Duration::from_secs(16));
        let addr = n.sim.nodes[bg].addr;
        let (a, b) = (Duration::from_secs(8), Duration::from_secs(16));
        let util = share_of(&n.sim, addr, a, b, rate);
        let p99 = queue_delay_percentile(&n.sim, a, b, 0.99);
        eprintln!("seed {seed}: 50 Mbit/s 80 ms: solo utilisation {util:.3}, queueing delay p99 {p99:?}");
        assert!(util >= 0.95, "seed {seed}: solo utilisation {util:.3}");
        assert!(
            p99 <= Duration::from_millis(10),
            "seed {seed}: p99 queueing delay {p99:?}"
        );
    }
}

/// A package crosses the WAN link once: everything a background transfer puts
/// on the link in both directions (data with its headers, retransmissions,
/// acknowledgements, requests) stays within 5 % of the package (issue 6's
/// per-link budget). Headers alone are ~3.4 % (48 bytes per 1,424), so
/// acknowledging nearly every datagram at WAN rates would not fit.
#[test]
fn background_transfer_crosses_the_link_once() {
    for seed in [301, 302] {
        let size = 16usize << 20;
        let mut n = net(seed);
        let (bg, rx) = (n.bg, n.rx);
        start(&mut n, bg, bytes(size, 3), true, seed);
        let done = n.sim.run_until(Time::ZERO + Duration::from_secs(60), |s| {
            s.nodes[rx].fetches[0].is_complete()
        });
        assert!(done, "seed {seed}: the transfer did not complete");
        let addr = n.sim.nodes[bg].addr;
        let down: u64 = n
            .sim
            .bottleneck_log
            .iter()
            .filter(|r| r.from == addr)
            .map(|r| r.bytes as u64)
            .sum();
        let total = n.sim.stats.bytes_delivered;
        let up = total - down;
        let ratio = total as f64 / size as f64;
        eprintln!(
            "seed {seed}: toward the receiver {:.4} x, back {:.4} x, both {ratio:.4} x of the package",
            down as f64 / size as f64,
            up as f64 / size as f64
        );
        assert!(ratio <= 1.05, "seed {seed}: the link carried {ratio:.4} x the package");
    }
}

/// The bottleneck on the sender's own egress (50 Mbit/s, 20 ms round trip), a
/// foreground TCP flow from the same host from 3 s to 6 s. TCP small queues keep
/// the local qdisc short (the bench saw 4–7 ms, below the 4 × target at which the
/// delay signal calls it competition); here it is held at 2 ms, under the 3 ms
/// target, where the delay signal carries nothing at all, so only the monitor's
/// other-traffic figure can make the background yield.
/// A fluid model on a 1 ms tick drives the controller through its public API
/// with synthetic acks and synthetic monitor samples (every 5 ms, as
/// `PathWatch` samples), with seeded jitter on the one-way delay.
mod sender_bottleneck {
    use std::time::Duration;

    use lowtide_engine::cc::background::{Background, BackgroundConfig, PathSignal};
    use lowtide_engine::cc::{Controller, MSS_BYTES};

    use super::fluid_ack;
    use lowtide_engine::time::Time;
    use rand::{Rng, SeedableRng};

    const LINK: f64 = 6_250_000.0; // 50 Mbit/s, bytes/s
    const BASE_RTT: Duration = Duration::from_millis(20);
    const FG_START_MS: u64 = 3_000;
    const FG_END_MS: u64 = 6_000;
    const END_MS: u64 = 8_000;
    /// What TCP small queues leave standing in the sender's qdisc while a TCP flow sends.
    const TSQ_QUEUE_MS: f64 = 2.0;

    /// Background delivery rate (bytes/s) per 1 ms tick.
    fn run(seed: u64, monitor: bool) -> Vec<f64> {
        run_with(seed, monitor, true, 0, BASE_RTT)
    }

    /// `fg`: the foreground flow runs from 3 s to 6 s; `spike_ms`: every second from
    /// 0.5 s, the one-way delay jumps by 60 ms for this long (a stalled hop, such as a
    /// user-space delay line on a loaded machine: no queue at the bottleneck).
    fn run_with(seed: u64, monitor: bool, with_fg: bool, spike_ms: u64, base_rtt: Duration) -> Vec<f64> {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let mut c = Background::new(BackgroundConfig::default());
        let clock_offset_us: i64 = rng.gen_range(-1_000_000_000..1_000_000_000);
        let mut rates = Vec::new();
        let mut srtt = base_rtt;
        for t in 1..END_MS {
            let now = Time(t * 1000);
            let fg = with_fg && (FG_START_MS..FG_END_MS).contains(&t);
            let spike_us: i64 = if t >= 500 && (t - 500) % 1000 < spike_ms {
                60_000
            } else {
                0
            };
            let bdp = LINK * base_rtt.as_secs_f64();
            // Queueing delay: what the background's excess window stands in the queue when
            // alone; what TCP small queues keep there while the foreground sends.
            let q_s = if fg {
                TSQ_QUEUE_MS / 1000.0
            } else {
                ((c.window() as f64 - bdp).max(0.0)) / LINK
            };
            let rtt = base_rtt + Duration::from_secs_f64(q_s);
            srtt = (srtt * 7 + rtt) / 8;
            // Two flows sharing the qdisc split it at best evenly (the bench saw the
            // foreground at 42-48 % of its solo throughput while the background kept sending).
            let bg_max = if fg { LINK / 2.0 } else { LINK };
            let bg_rate = (c.window() as f64 / rtt.as_secs_f64()).min(bg_max);
            rates.push(bg_rate);
            if monitor && t % 5 == 0 {
                // The eBPF classifier: the foreground takes whatever the background leaves.
                let other = if fg { LINK - bg_rate } else { 0.0 };
                let backlog = if fg { TSQ_QUEUE_MS / 1000.0 * LINK } else { q_s * LINK };
                c.on_path(
                    now,
                    &PathSignal {
                        backlog_bytes: backlog as u64,
                        other_bytes_per_s: other as u64,
                        egress_bytes_per_s: (other + bg_rate) as u64,
                    },
                );
            }
            let acked = (bg_rate / 1000.0) as u64;
            c.on_sent(now, acked);
            let jitter_us: i64 = rng.gen_range(0..300);
            c.on_ack(
                now,
                &fluid_ack(
                    acked,
                    rtt,
                    srtt,
                    base_rtt,
                    clock_offset_us + base_rtt.as_micros() as i64 / 2 + (q_s * 1e6) as i64 + jitter_us + spike_us,
                    c.window(),
                ),
            );
        }
        rates
    }

    /// Mean share of the link over ticks [a, b) ms.
    fn share(rates: &[f64], a: u64, b: u64) -> f64 {
        let r = &rates[(a - 1) as usize..(b - 1) as usize];
        r.iter().sum::<f64>() / r.len() as f64 / LINK
    }

    /// First tick at or after `from` whose 20 ms mean share satisfies `pred`, as time since `from`.
    fn first(rates: &[f64], from: u64, pred: impl Fn(f64) -> bool) -> Option<Duration> {
        (from..END_MS - 20)
            .find(|&t| pred(share(rates, t, t + 20)))
            .map(|t| Duration::from_millis(t - from))
    }

    #[test]
    fn background_yields_to_local_tcp_the_delay_signal_misses_with_monitor_samples() {
        for seed in [401, 402, 403] {
            let rates = run(seed, true);
            let solo = share(&rates, 1_000, FG_START_MS);
            assert!(solo >= 0.95, "seed {seed}: solo utilisation {solo:.3}");
            let yield_time = first(&rates, FG_START_MS, |s| s < 0.10).expect("never yielded");
            assert!(
                yield_time <= 2 * BASE_RTT + Duration::from_millis(100),
                "seed {seed}: yielded after {yield_time:?}"
            );
            // The foreground keeps >= 95 % of the link once the background has yielded.
            let during = share(&rates, FG_START_MS + 200, FG_END_MS);
            assert!(
                during <= 0.05,
                "seed {seed}: background kept {during:.3} of the link under the foreground"
            );
            let reclaim = first(&rates, FG_END_MS, |s| s >= 0.90).expect("never reclaimed");
            assert!(
                reclaim <= Duration::from_millis(500),
                "seed {seed}: reclaimed after {reclaim:?}"
            );
            eprintln!(
                "seed {seed}: sender bottleneck with monitor: solo {solo:.3}, yield {yield_time:?}, \
                 share under foreground {during:.3}, reclaim {reclaim:?}"
            );
        }
    }

    /// A delay spike that is not a queue (a stalled hop) looks like competing traffic
    /// and makes the background yield; it must cost about the spike and a few round
    /// trips, not a hold-off that doubles with every spike. 30 ms spikes every second
    /// are 3 % of the time.
    #[test]
    fn background_recovers_from_delay_spikes_that_are_not_a_queue() {
        for seed in [411, 412] {
            // At 80 ms the same spikes cost 37 % (utilisation 0.63): regrowing from the
            // minimum window takes 7-8 round trips each time. Not solved yet.
            let rates = run_with(seed, true, false, 30, BASE_RTT);
            let util = share(&rates, 1_000, END_MS - 20);
            eprintln!("seed {seed}: 30 ms delay spikes every second: utilisation {util:.3}");
            assert!(util >= 0.90, "seed {seed}: utilisation {util:.3} with delay spikes");
        }
    }

    /// The bench's sender-bottleneck case at 80 ms: a foreground CUBIC flow from the
    /// same host fills the whole 200 ms TBF queue on the sender's egress (TCP small
    /// queues allow 1 MB per socket there, more than 200 ms at these rates), then
    /// stops; its queue drains, and the reclaim is timed from the drain's end (the
    /// foreground's last data at the receiver, as `scripts/bench-wan.sh` times it).
    /// Acks come per two datagrams delivered, each with the round trip of its
    /// moment, so while yielded (a two-datagram window) the smoothed RTT is
    /// updated once a round trip and still holds the foreground's queue long
    /// after it drained. The foreground runs from `fg_ms.0` to `fg_ms.1`, the run ends at `fg_ms.2`.
    fn run_deep_queue(seed: u64, base_rtt: Duration, fg_queue_ms: u64, fg_ms: (u64, u64, u64)) -> Vec<f64> {
        let (fg_start_ms, fg_end_ms, end_ms) = fg_ms;
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let mut c = Background::new(BackgroundConfig::default());
        let clock_offset_us: i64 = rng.gen_range(-1_000_000_000..1_000_000_000);
        let mut rates = Vec::new();
        let mut srtt = base_rtt;
        let mut pending = 0.0f64;
        let bdp = LINK * base_rtt.as_secs_f64();
        for t in 1..end_ms {
            let now = Time(t * 1000);
            let fg = (fg_start_ms..fg_end_ms).contains(&t);
            // The foreground's queue: full while it sends, draining at the link's rate after.
            let fg_q_s = if fg {
                fg_queue_ms as f64 / 1000.0
            } else if t >= fg_end_ms {
                ((fg_queue_ms as f64 - (t - fg_end_ms) as f64) / 1000.0).max(0.0)
            } else {
                0.0
            };
            let own_q_s = ((c.window() as f64 - bdp).max(0.0)) / LINK;
            let q_s = fg_q_s + own_q_s;
            let rtt = base_rtt + Duration::from_secs_f64(q_s);
            // While the foreground's queue stands, the background gets at most its window per RTT.
            let bg_max = if fg_q_s > 0.0 { LINK / 2.0 } else { LINK };
            let bg_rate = (c.window() as f64 / rtt.as_secs_f64()).min(bg_max);
            rates.push(bg_rate);
            if t % 5 == 0 {
                let other = if fg { LINK - bg_rate } else { 0.0 };
                c.on_path(
                    now,
                    &PathSignal {
                        backlog_bytes: (q_s * LINK) as u64,
                        other_bytes_per_s: other as u64,
                        egress_bytes_per_s: (other + bg_rate) as u64,
                    },
                );
            }
            c.on_sent(now, (bg_rate / 1000.0) as u64);
            pending += bg_rate / 1000.0;
            while pending >= (2 * MSS_BYTES) as f64 {
                pending -= (2 * MSS_BYTES) as f64;
                srtt = (srtt * 7 + rtt) / 8;
                let jitter_us: i64 = rng.gen_range(0..300);
                c.on_ack(
                    now,
                    &fluid_ack(
                        2 * MSS_BYTES,
                        rtt,
                        srtt,
                        base_rtt,
                        clock_offset_us + base_rtt.as_micros() as i64 / 2 + (q_s * 1e6) as i64 + jitter_us,
                        c.window(),
                    ),
                );
            }
        }
        rates
    }

    /// The foreground runs from 16 s to 22 s, across the first periodic slowdown
    /// (due 20 s after the start): a yield drains the queue as a slowdown would,
    /// so the reclaim must not be followed by an overdue slowdown (549 ms before that
    /// was fixed); and the monitor sees the foreground stop, so the reclaim follows one
    /// round trip after the queue drained, not a smoothed RTT still holding the
    /// foreground's queue and the next ack (261-332 ms before that was fixed).
    #[test]
    fn background_reclaims_a_sender_bottleneck_soon_after_a_deep_foreground_queue_drains() {
        for seed in [421, 422] {
            let (rtt, fg_queue_ms, fg_ms) = (Duration::from_millis(80), 200, (16_000, 22_000, 25_000));
            let rates = run_deep_queue(seed, rtt, fg_queue_ms, fg_ms);
            let solo = share(&rates, 4_000, fg_ms.0);
            let during = share(&rates, fg_ms.0 + 200, fg_ms.1);
            let drained = fg_ms.1 + fg_queue_ms;
            let reclaim = (drained..fg_ms.2 - 20)
                .find(|&t| share(&rates, t, t + 20) >= 0.90)
                .map(|t| Duration::from_millis(t - drained))
                .expect("never reclaimed");
            eprintln!(
                "seed {seed}: sender bottleneck, 80 ms, 200 ms foreground queue: solo {solo:.3}, \
                 share under foreground {during:.3}, reclaim {reclaim:?} after the queue drained"
            );
            assert!(solo >= 0.95, "seed {seed}: solo utilisation {solo:.3}");
            assert!(
                during <= 0.05,
                "seed {seed}: background kept {during:.3} under the foreground"
            );
            assert!(reclaim <= 2 * rtt, "seed {seed}: reclaimed after {reclaim:?}");
        }
    }

    #[test]
    fn background_on_delay_alone_does_not_see_local_tcp_under_tsq() {
        // Why the monitor is needed: the same path without its samples keeps sending
        // into TCP's share, as the WAN bench measured (foreground at 42-48 % of solo).
        for seed in [401, 402, 403] {
            let rates = run(seed, false);
            let during = share(&rates, FG_START_MS + 200, FG_END_MS);
            assert!(
                during >= 0.4,
                "seed {seed}: the delay signal alone yielded ({during:.3}): the scenario no longer needs the monitor"
            );
        }
    }
}

/// The bottleneck on a router further along (50 Mbit/s, 80 ms round trip, 200 ms
/// TBF queue), a foreground TCP flow from a second host behind it: the local
/// monitor sees nothing, only the one-way delay tells. The foreground is a TCP
/// slow start from an initial window of 10 segments (Linux), doubling each round
/// trip, so the queue it adds grows by ~2.3, 4.6, 9.3 ms... per round trip, and a
/// background that only takes out the queue above target after each round trip
/// keeps the queue below the 4 × target at which it yields until the fourth or
/// fifth doubling (the bench: 430 ms at 50 Mbit/s 80 ms, limit 2 RTT + 100 ms;
/// this model: 400 ms before the background yielded on a queue its window does
/// not explain, 190-210 ms with it).
/// A fluid model on a 1 ms tick: a FIFO of per-tick chunks at the router, data
/// reaches the receiver 40 ms after leaving it and its ack the sender 40 ms later;
/// the TCP flow is ack-clocked and paced as Linux paces it.
mod router_bottleneck {
    use std::collections::VecDeque;
    use std::time::Duration;

    use lowtide_engine::cc::background::{Background, BackgroundConfig};
    use lowtide_engine::cc::{Controller, MSS_BYTES};

    use super::fluid_ack;
    use lowtide_engine::time::Time;
    use rand::{Rng, SeedableRng};

    const LINK: f64 = 6_250_000.0; // 50 Mbit/s, bytes/s
    const BASE_RTT_MS: u64 = 80;
    const QUEUE_MAX: f64 = LINK * 0.2;
    const FG_START_MS: u64 = 6_000;
    const FG_END_MS: u64 = 9_000;
    const END_MS: u64 = 11_000;

    struct Chunk {
        bg: f64,
        fg: f64,
        at: u64,
    }

    /// Per tick: bytes of the background and of the foreground leaving the router.
    /// `bg`: run the background at all; `fg`: run the foreground from 6 s to 9 s.
    fn run(seed: u64, bg: bool, fg: bool) -> (Vec<f64>, Vec<f64>) {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let mut c = Background::new(BackgroundConfig::default());
        let clock_offset_us: i64 = rng.gen_range(-1_000_000_000..1_000_000_000);
        let base_rtt = Duration::from_millis(BASE_RTT_MS);
        let mut queue: VecDeque<Chunk> = VecDeque::new();
        let mut queued = 0.0f64;
        // Departures per tick, and the queueing delay (ms) of the last byte that left.
        let (mut bg_out, mut fg_out, mut delay_out) = (Vec::new(), Vec::new(), Vec::new());
        let mut srtt = base_rtt;
        let mut fg_cwnd = 10.0 * MSS_BYTES as f64;
        let mut fg_ssthresh = f64::MAX;
        let mut fg_inflight = 0.0f64;
        for t in 1..END_MS {
            let now = Time(t * 1000);
            let q_s = queued / LINK;
            let rtt_s = base_rtt.as_secs_f64() + q_s;
            // Arrivals (the senders are next to the router): window per round trip.
            let bg_in = if bg { c.window() as f64 / rtt_s / 1000.0 } else { 0.0 };
            let fg_on = fg && (FG_START_MS..FG_END_MS).contains(&t);
            // Linux TCP: what its window allows beyond the bytes in flight (the ack clock),
            // paced at 2 x cwnd / RTT in slow start and 1.2 x after (so a slow start sends
            // its window in half a round trip).
            let pacing = if fg_cwnd < fg_ssthresh { 2.0 } else { 1.2 } * fg_cwnd / rtt_s / 1000.0;
            let mut fg_in = if fg_on {
                (fg_cwnd - fg_inflight).clamp(0.0, pacing)
            } else {
                0.0
            };
            if queued + bg_in + fg_in > QUEUE_MAX + LINK / 1000.0 && fg_on {
                // The TBF queue is full: the foreground loses, CUBIC backs off by 30 %.
                fg_ssthresh = fg_cwnd * 0.7;
                fg_cwnd = fg_ssthresh;
                fg_in = 0.0;
            }
            fg_inflight += fg_in;
            if bg {
                c.on_sent(now, bg_in as u64);
            }
            queue.push_back(Chunk {
                bg: bg_in,
                fg: fg_in,
                at: t,
            });
            queued += bg_in + fg_in;
            // The router sends a tick's worth of the link, first in first out.
            let mut budget = LINK / 1000.0;
            let (mut b, mut f, mut d) = (0.0, 0.0, 0u64);
            while budget > 0.0 {
                let Some(head) = queue.front_mut() else { break };
                let total = head.bg + head.fg;
                let take = total.min(budget);
                if total > 0.0 {
                    b += head.bg * take / total;
                    f += head.fg * take / total;
                    head.bg -= head.bg * take / total;
                    head.fg -= head.fg * take / total;
                    d = t - head.at;
                }
                budget -= take;
                queued -= take;
                if head.bg + head.fg <= 1e-9 {
                    queue.pop_front();
                }
            }
            bg_out.push(b);
            fg_out.push(f);
            delay_out.push(d);
            // Acks of what left the router a base round trip ago.
            if t > BASE_RTT_MS {
                let k = (t - BASE_RTT_MS - 1) as usize;
                fg_inflight = (fg_inflight - fg_out[k]).max(0.0);
                if fg_on {
                    let acked = fg_out[k];
                    fg_cwnd += if fg_cwnd < fg_ssthresh {
                        acked
                    } else {
                        MSS_BYTES as f64 * acked / fg_cwnd
                    };
                }
                let acked = bg_out[k] as u64;
                if bg && acked > 0 {
                    let rtt = base_rtt + Duration::from_millis(delay_out[k]);
                    srtt = (srtt * 7 + rtt) / 8;
                    let jitter_us: i64 = rng.gen_range(0..300);
                    c.on_ack(
                        now,
                        &fluid_ack(
                            acked,
                            rtt,
                            srtt,
                            base_rtt,
                            clock_offset_us + 40_000 + delay_out[k] as i64 * 1000 + jitter_us,
                            c.window(),
                        ),
                    );
                }
            }
        }
        (bg_out, fg_out)
    }

    /// Share of the link over ticks [a, b) ms.
    fn share(out: &[f64], a: u64, b: u64) -> f64 {
        let r = &out[(a - 1) as usize..(b - 1) as usize];
        r.iter().sum::<f64>() * 1000.0 / r.len() as f64 / LINK
    }

    /// First tick at or after `from` whose 100 ms share satisfies `pred` (the bench's and
    /// the packet simulator's window), as time since `from`.
    fn first(out: &[f64], from: u64, pred: impl Fn(f64) -> bool) -> Option<Duration> {
        (from..END_MS - 100)
            .step_by(10)
            .find(|&t| pred(share(out, t, t + 100)))
            .map(|t| Duration::from_millis(t - from))
    }

    #[test]
    fn background_yields_to_a_remote_tcp_slow_start_seen_by_delay_alone() {
        for seed in [501, 502, 503] {
            let (_, fg_solo) = run(seed, false, true);
            let (bg_out, fg_out) = run(seed, true, true);
            let solo = share(&bg_out, 3_000, FG_START_MS);
            let yield_time = first(&bg_out, FG_START_MS, |s| s < 0.10).expect("never yielded");
            let kept =
                share(&fg_out, FG_START_MS, FG_START_MS + 2_000) / share(&fg_solo, FG_START_MS, FG_START_MS + 2_000);
            // Timed from the foreground's last data at the bottleneck (its queue drains after it stops).
            let fg_last = fg_out.iter().rposition(|&b| b > 0.0).unwrap() as u64 + 1;
            let reclaim = first(&bg_out, fg_last, |s| s >= 0.90).expect("never reclaimed");
            eprintln!(
                "seed {seed}: router 50 Mbit/s 80 ms, remote TCP: solo {solo:.3}, yield {yield_time:?}, \
                 foreground kept {kept:.3} over its first 2 s, reclaim {reclaim:?}"
            );
            assert!(solo >= 0.95, "seed {seed}: solo utilisation {solo:.3}");
            assert!(
                yield_time <= Duration::from_millis(2 * BASE_RTT_MS + 100),
                "seed {seed}: yielded after {yield_time:?}"
            );
            assert!(
                kept >= 0.95,
                "seed {seed}: foreground kept {kept:.3} of its solo throughput"
            );
            assert!(
                reclaim <= Duration::from_millis(500),
                "seed {seed}: reclaimed after {reclaim:?}"
            );
        }
    }
}

/// Three agents of one site (the VPN site of the distribution benchmark: 100 Mbit/s,
/// 30 ms round trip) each fetch their own copy from one sender, starting a few hundred
/// ms to seconds apart. The sender's sessions toward that LAN share one window
/// (`cc::group`): together they fill the link with the queue of one flow, in equal
/// shares (utilisation 1.000, shares 0.333 each, p95 2.9-3.0 ms, p99 3.0-3.1 ms). With
/// a controller each, every newcomer's growth was a queue the others' windows did not
/// explain, and they yielded to each other in turn: utilisation 0.915-0.999, the
/// newcomer down to 0.098 of the link, p95 4.0-4.6 ms, p99 4.3-5.1 ms (and 5.6-12 ms
/// before growth turned gentle after a yield that ended by regrowing).
#[test]
fn background_flows_from_one_sender_to_one_site_keep_a_short_queue() {
    const VPN_RATE: u64 = 12_500_000;
    let one_way = Duration::from_millis(15);
    for seed in [241u64, 242, 243, 244] {
        let mut sim = Sim::new(seed, DeploymentKey::derive(b"bg"), LinkSpec::lan());
        let tx = sim.add_node(ServerConfig::default());
        let rx: Vec<usize> = (0..3).map(|_| sim.add_node(ServerConfig::default())).collect();
        sim.set_shared_bottleneck(
            &rx,
            LinkSpec {
                rate_bytes_per_s: VPN_RATE,
                delay: one_way,
                queue_bytes_max: 1_000_000,
                ..LinkSpec::lan()
            },
        );
        for &r in &rx {
            sim.set_link(
                r,
                tx,
                LinkSpec {
                    delay: one_way,
                    ..LinkSpec::lan()
                },
            );
        }
        let data = bytes(64 << 20, seed as u8);
        let t = BlockTable::from_bytes(&data, 4);
        sim.nodes[tx].library.insert_full(t.clone(), data);
        // Starts 0, then 0.3-1.3 s and 1.3-2.8 s in, from the seed.
        let starts = [0, 300 + (seed * 397) % 1000, 1300 + (seed * 711) % 1500];
        let mut started = 0;
        for (i, &r) in rx.iter().enumerate() {
            sim.run_until(Time::ZERO + Duration::from_millis(starts[i]), |_| false);
            let count = t.geometry().block_count();
            sim.nodes[r].library.insert_empty(t.clone());
            let cfg = FetchConfig {
                background: true,
                ..FetchConfig::default()
            };
            let mut f = Fetch::new(
                sim.key().clone(),
                t.root(),
                cfg,
                Some((t.clone(), BlockSet::new(count))),
                seed + i as u64,
            );
            f.add_source(sim.now, sim.nodes[tx].addr);
            sim.nodes[r].fetches.push(f);
            started = starts[i];
        }
        let (from, to) = (Duration::from_millis(started + 1000), Duration::from_secs(14));
        sim.run_until(Time::ZERO + to, |_| false);
        let tx_addr = sim.nodes[tx].addr;
        let util = share_of(&sim, tx_addr, from, to, VPN_RATE);
        let shares: Vec<f64> = rx
            .iter()
            .map(|&r| {
                let to_addr = sim.nodes[r].addr;
                share_where(&sim, |x| x.to == to_addr, from, to, VPN_RATE)
            })
            .collect();
        let p95 = queue_delay_percentile(&sim, from, to, 0.95);
        let p99 = queue_delay_percentile(&sim, from, to, 0.99);
        eprintln!(
            "seed {seed}: starts {starts:?} ms: utilisation {util:.3}, shares {shares:.3?}, queueing delay p95 {p95:?} p99 {p99:?}"
        );
        assert!(util >= 0.97, "seed {seed}: utilisation {util:.3}");
        // The target is 3 ms: the queue of one flow.
        assert!(
            p95 <= Duration::from_micros(3_600),
            "seed {seed}: p95 queueing delay {p95:?}"
        );
        assert!(
            shares.iter().all(|&s| s >= 0.25),
            "seed {seed}: a flow starves: {shares:.3?}"
        );
    }
}
