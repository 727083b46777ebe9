//! Sessions and congestion control.
//!
//! - `controller/*`: one step of the foreground controller (`on_ack`, and a
//!   whole per-ack step: `on_sent` + `on_ack` + `window` + `pacing_rate`).
//! - `sim_transfer/lan_64MiB`: a 64 MiB fetch from one server through the
//!   deterministic simulator (`io::sim::Sim`, `LinkSpec::lan()`: 10 Gbit/s,
//!   50 µs, 4 MiB queue). Every protocol step runs for real (tags, block
//!   verification, acks, loss recovery, pacing); only the sockets are
//!   simulated. Only the run is timed (building the simulator and copying
//!   the content into the sender's library are not), so the throughput
//!   criterion prints is simulated content bytes per CPU second of sender +
//!   receiver + network model together, on one core. (The simulated
//!   goodput printed first can exceed the link's 10 Gbit/s: `Time` counts
//!   whole µs and `Time + Duration` truncates, so a 1472-byte datagram's
//!   1.18 µs on the wire becomes 1 µs.)
//!
//! As in every bench here, time is the thread's CPU time (see `common`).

use std::hint::black_box;
use std::time::Duration;

mod common;

use common::{thread_cpu, ThreadCpuTime};
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use lowtide_engine::cc::foreground::Foreground;
use lowtide_engine::cc::{AckSample, Controller, LossSample, MSS_BYTES};
use lowtide_engine::content::BlockTable;
use lowtide_engine::io::sim::{LinkSpec, Sim};
use lowtide_engine::session::fetch::{Fetch, FetchConfig};
use lowtide_engine::session::serve::ServerConfig;
use lowtide_engine::time::Time;
use lowtide_engine::wire::DeploymentKey;

fn ack(acked: u64) -> AckSample {
    AckSample {
        acked_bytes: acked,
        rtt: Some(Duration::from_micros(120)),
        srtt: Duration::from_micros(110),
        min_rtt: Duration::from_micros(90),
        one_way_delay_us: Some(60),
        in_flight: 256 * MSS_BYTES,
        app_limited: false,
    }
}

fn controller(c: &mut Criterion<ThreadCpuTime>) {
    let mut g = c.benchmark_group("controller");
    g.sample_size(30)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(300));
    // Congestion avoidance (after one loss), where a LAN transfer spends its time.
    let mut cc = Foreground::new();
    cc.on_loss(
        Time(1),
        &LossSample {
            lost_bytes: MSS_BYTES,
            largest_lost_sent: Time(1),
            timeout: false,
        },
    );
    let mut now = Time(1000);
    let sample = ack(8 * MSS_BYTES);
    g.bench_function("foreground_on_ack", |b| {
        b.iter(|| {
            now = Time(now.0 + 10);
            cc.on_ack(now, black_box(&sample));
        })
    });
    let mut cc = Foreground::new();
    g.bench_function("foreground_ack_step", |b| {
        b.iter(|| {
            now = Time(now.0 + 10);
            cc.on_sent(now, 8 * MSS_BYTES);
            cc.on_ack(now, black_box(&sample));
            (cc.window(), cc.pacing_rate(black_box(sample.srtt)))
        })
    });
    g.finish();
}

/// Build a simulator with one server holding `data` and one fetcher; run the fetch
/// to completion. Returns (CPU time of the run, simulated time it took).
fn sim_transfer(data: &[u8], table: &BlockTable) -> (Duration, Duration) {
    let key = DeploymentKey::derive(b"bench");
    let mut sim = Sim::new(1, key.clone(), LinkSpec::lan());
    let server = sim.add_node(ServerConfig::default());
    sim.nodes[server].library.insert_full(table.clone(), data.to_vec());
    let fetcher = sim.add_node(ServerConfig::default());
    let mut f = Fetch::new(key, table.root(), FetchConfig::default(), None, 7);
    let addr = sim.nodes[server].addr;
    assert!(f.add_source(sim.now, addr));
    sim.nodes[fetcher].fetches.push(f);
    let start = thread_cpu();
    let done = sim.run_until(Time::ZERO + Duration::from_secs(60), |s| {
        s.nodes[fetcher].fetches.iter().all(|f| f.is_complete())
    });
    let cpu = thread_cpu() - start;
    assert!(done, "simulated transfer did not complete");
    (cpu, sim.now.since(Time::ZERO))
}

fn simulated(c: &mut Criterion<ThreadCpuTime>) {
    const BYTES: usize = 64 << 20;
    let data = lowtide_benches::content(0x2545_F491_4F6C_DD1D, BYTES);
    let table = BlockTable::from_bytes(&data, 4);
    let (cpu, simulated) = sim_transfer(&data, &table);
    eprintln!(
        "sim_transfer/lan_64MiB: {:.1} ms simulated ({:.2} Gbit/s on the 10 Gbit/s link), {:.0} ms CPU",
        simulated.as_secs_f64() * 1e3,
        BYTES as f64 * 8.0 / simulated.as_secs_f64() / 1e9,
        cpu.as_secs_f64() * 1e3
    );
    let mut g = c.benchmark_group("sim_transfer");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .throughput(Throughput::Bytes(BYTES as u64));
    g.bench_function("lan_64MiB_cpu", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| sim_transfer(&data, &table).0).sum())
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = controller, simulated
}
criterion_main!(benches);
