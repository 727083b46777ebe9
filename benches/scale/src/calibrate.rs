//! Packet-level calibration of the flow-level model: the engine's sessions on
//! one WAN link (background and foreground protocols, 1 % loss) at a few rates,
//! and one LAN fan-out (one agent serving several peers at once).
//!
//! Each run is fitted to `time = startup + bytes / (efficiency x rate)`: the
//! efficiency from the second half of the transfer (past the controller's
//! ramp), the start-up as what the first half took beyond that.

use std::time::Duration;

use lowtide_engine::content::BlockTable;
use lowtide_engine::io::sim::{LinkSpec, Sim};
use lowtide_engine::ranges::BlockSet;
use lowtide_engine::session::fetch::{Fetch, FetchConfig};
use lowtide_engine::session::serve::ServerConfig;
use lowtide_engine::time::Time;
use lowtide_engine::wire::DeploymentKey;

use crate::packet::{at, nic_spec, wan_spec};
use crate::topo::wan_class;

/// One calibrated WAN link.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Point {
    pub rate_bytes_per_s: u64,
    pub delay_s: f64,
    pub loss: f64,
    pub background: bool,
    pub bytes: u64,
    /// Goodput over the link rate, past the ramp.
    pub efficiency: f64,
    pub startup_s: f64,
    /// Start-up in round trips.
    pub startup_rtts: f64,
    /// Datagram bytes on the link over payload bytes (headers, retransmissions).
    pub wire_ratio: f64,
    /// Simulated time of the whole transfer (or until it was cut off).
    pub time_s: f64,
    /// Whether it finished in 4x its ideal time.
    pub complete: bool,
    /// Finished and byte-exact.
    pub verified: bool,
}

/// One agent serving several peers on the LAN.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Lan {
    pub receivers: usize,
    pub bytes_each: u64,
    pub rate_bytes_per_s: u64,
    /// Goodput over the serving NIC's rate.
    pub efficiency: f64,
    pub startup_s: f64,
    pub time_s: f64,
    pub verified: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Calibration {
    pub wan: Vec<Point>,
    pub lan: Lan,
}

impl Calibration {
    fn nearest(&self, rate: u64, delay_s: f64, background: bool) -> &Point {
        self.wan
            .iter()
            .filter(|p| p.background == background)
            .min_by(|a, b| {
                let d = |p: &Point| {
                    let r = (p.rate_bytes_per_s as f64 / rate as f64).ln();
                    let t = (p.delay_s / delay_s).ln();
                    r * r + t * t
                };
                d(a).total_cmp(&d(b))
            })
            .expect("calibrated at least one link")
    }

    /// The calibrated background-protocol link nearest (in log rate and log delay) to this one.
    pub fn wan_bg(&self, rate: u64, delay_s: f64) -> &Point {
        self.nearest(rate, delay_s, true)
    }

    pub fn wan_fg(&self, rate: u64, delay_s: f64) -> &Point {
        self.nearest(rate, delay_s, false)
    }

    /// Calibrate the background protocol on a grid over each WAN class of the
    /// generator (lowest, middle and highest rate, each with the lowest, middle
    /// and highest delay; with `grid` false only the middle), the foreground
    /// protocol at each class's middle, transfers of `seconds` at the link rate
    /// (at most 256 MiB), and a LAN fan-out to `receivers`.
    pub fn measure(loss: f64, seconds: f64, lan_rate: u64, receivers: usize, seed: u64, grid: bool) -> Self {
        let mut wan = Vec::new();
        for depth in 1..=3 {
            let ((r_lo, r_hi), (d_lo, d_hi)) = wan_class(depth);
            let rates = [r_lo, (r_lo * r_hi).sqrt(), r_hi];
            let delays = [d_lo, (d_lo * d_hi).sqrt(), d_hi];
            for (i, r) in rates.iter().enumerate() {
                for (j, d) in delays.iter().enumerate() {
                    if !grid && (i, j) != (1, 1) {
                        continue;
                    }
                    let rate = (r * 125_000.0) as u64;
                    let delay = d / 1000.0;
                    let seed = seed + (depth * 100 + i as u32 * 10 + j as u32) as u64;
                    wan.push(wan_point(rate, delay, loss, true, seconds, seed));
                    if i == 1 && j == 1 {
                        wan.push(wan_point(rate, delay, loss, false, seconds, seed));
                    }
                }
            }
        }
        let lan = lan_fanout(lan_rate, receivers, seconds, seed);
        Self { wan, lan }
    }
}

fn fit(bytes: u64, rate: u64, t_half: f64, t_done: f64) -> (f64, f64) {
    let half = bytes as f64 / 2.0;
    let eff = (half / (rate as f64 * (t_done - t_half).max(1e-6))).min(1.0);
    let startup = (t_done - bytes as f64 / (eff * rate as f64)).max(0.0);
    (eff, startup)
}

fn held(sim: &Sim, node: usize, t: &BlockTable) -> u64 {
    sim.nodes[node]
        .library
        .have(&t.root())
        .map_or(0, |h| h.count() * t.geometry().block_bytes())
}

/// The engine over one WAN link: `seconds` of data at `rate`.
pub fn wan_point(rate: u64, delay_s: f64, loss: f64, background: bool, seconds: f64, seed: u64) -> Point {
    let bytes = ((rate as f64 * seconds) as u64).clamp(1 << 20, 256 << 20) & !0xffff;
    let data = lowtide_benches::content(seed | 1, bytes as usize);
    let table = BlockTable::from_bytes(&data, lowtide_engine::content::BLOCK_CHUNKS_LOG_DEFAULT);
    let mut sim = Sim::new(seed, DeploymentKey::derive(b"lowtide-scale-cal"), LinkSpec::lan());
    let tx = sim.add_node(ServerConfig::default());
    let rx = sim.add_node(ServerConfig::default());
    sim.nodes[tx].library.insert_full(table.clone(), data.clone());
    sim.nodes[rx].library.insert_empty(table.clone());
    sim.set_uplink(tx, nic_spec(125_000_000.max(rate * 2)));
    sim.set_bottleneck(rx, wan_spec(rate, delay_s, loss));
    sim.set_link(
        rx,
        tx,
        LinkSpec {
            delay: Duration::from_secs_f64(delay_s),
            ..LinkSpec::lan()
        },
    );
    let cfg = FetchConfig {
        background,
        ..FetchConfig::default()
    };
    let count = table.geometry().block_count();
    let mut f = Fetch::new(
        sim.key().clone(),
        table.root(),
        cfg,
        Some((table.clone(), BlockSet::new(count))),
        seed,
    );
    f.add_source(sim.now, sim.nodes[tx].addr);
    sim.nodes[rx].fetches.push(f);
    // A transfer that cannot finish in 4x its ideal time (loss-based control at 1 % loss)
    // is measured by what it moved in that time.
    let limit = at(4.0 * seconds + 10.0);
    sim.run_until(limit, |s| held(s, rx, &table) * 2 >= bytes);
    let t_half = sim.now.since(Time::ZERO).as_secs_f64();
    let done = sim.run_until(limit, |s| s.nodes[rx].fetches[0].is_complete());
    let t_done = sim.now.since(Time::ZERO).as_secs_f64();
    let (efficiency, startup_s) = if done {
        fit(bytes, rate, t_half, t_done)
    } else {
        (held(&sim, rx, &table) as f64 / (rate as f64 * t_done), 0.0)
    };
    let tx_addr = sim.nodes[tx].addr;
    let wire: u64 = sim
        .bottleneck_log
        .iter()
        .filter(|r| r.from == tx_addr)
        .map(|r| r.bytes as u64)
        .sum();
    let got = held(&sim, rx, &table);
    let verified = done && sim.nodes[rx].library.bytes(&table.root()) == Some(data.as_slice());
    Point {
        rate_bytes_per_s: rate,
        delay_s,
        loss,
        background,
        bytes,
        efficiency,
        startup_s,
        startup_rtts: startup_s / (2.0 * delay_s),
        wire_ratio: wire as f64 / got.max(1) as f64,
        time_s: t_done,
        complete: done,
        verified,
    }
}

/// One agent serving `receivers` peers at once, each fetching `seconds / receivers` of the NIC's rate.
pub fn lan_fanout(rate: u64, receivers: usize, seconds: f64, seed: u64) -> Lan {
    let bytes_each = (((rate as f64 * seconds) as u64 / receivers as u64).max(1 << 20)) & !0xffff;
    let data = lowtide_benches::content((seed ^ 0x1a4) | 1, bytes_each as usize);
    let table = BlockTable::from_bytes(&data, lowtide_engine::content::BLOCK_CHUNKS_LOG_DEFAULT);
    let mut sim = Sim::new(seed, DeploymentKey::derive(b"lowtide-scale-cal"), LinkSpec::lan());
    let tx = sim.add_node(ServerConfig::default());
    sim.nodes[tx].library.insert_full(table.clone(), data.clone());
    sim.set_uplink(tx, nic_spec(rate));
    let count = table.geometry().block_count();
    let rx: Vec<usize> = (0..receivers)
        .map(|i| {
            let n = sim.add_node(ServerConfig::default());
            sim.nodes[n].library.insert_empty(table.clone());
            sim.set_uplink(n, nic_spec(rate));
            sim.set_bottleneck(n, nic_spec(rate));
            let mut f = Fetch::new(
                sim.key().clone(),
                table.root(),
                FetchConfig::default(),
                Some((table.clone(), BlockSet::new(count))),
                seed + i as u64,
            );
            f.add_source(sim.now, sim.nodes[tx].addr);
            sim.nodes[n].fetches.push(f);
            n
        })
        .collect();
    let total = bytes_each * receivers as u64;
    let limit = at(20.0 * seconds + 60.0);
    let sum = |s: &Sim| rx.iter().map(|&n| held(s, n, &table)).sum::<u64>();
    sim.run_until(limit, |s| sum(s) * 2 >= total);
    let t_half = sim.now.since(Time::ZERO).as_secs_f64();
    let done = sim.run_until(limit, |s| rx.iter().all(|&n| s.nodes[n].fetches[0].is_complete()));
    let t_done = sim.now.since(Time::ZERO).as_secs_f64();
    let (efficiency, startup_s) = if done {
        fit(total, rate, t_half, t_done)
    } else {
        (0.0, t_done)
    };
    let verified = done
        && rx
            .iter()
            .all(|&n| sim.nodes[n].library.bytes(&table.root()) == Some(data.as_slice()));
    Lan {
        receivers,
        bytes_each,
        rate_bytes_per_s: rate,
        efficiency,
        startup_s,
        time_s: t_done,
        verified,
    }
}
