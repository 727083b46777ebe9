//! `lowtide-scale`: distribute one package to thousands of agents in hundreds
//! of sites, in the flow-level model calibrated by the engine at packet level.
//! See the crate documentation and README.md.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use lowtide_scale::calibrate::Calibration;
use lowtide_scale::control::{Fallback, Policy};
use lowtide_scale::run;
use lowtide_scale::topo::{generate, Spec};

#[derive(Parser, Debug)]
#[command(about = "Lowtide distribution at scale: flow-level model calibrated and cross-checked at packet level")]
struct Args {
    #[arg(long, default_value_t = 10_000)]
    agents: usize,
    #[arg(long, default_value_t = 500)]
    sites: usize,
    /// Deepest site, in WAN hops below the top site.
    #[arg(long, default_value_t = 4)]
    depth: u32,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Package size in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Random loss on every WAN link.
    #[arg(long, default_value_t = 0.01)]
    loss: f64,
    /// Fraction of agents that leave during the distribution (half come back).
    #[arg(long, default_value_t = 0.03)]
    leave: f64,
    /// Fraction of sites whose RVP-to-be leaves during the distribution.
    #[arg(long, default_value_t = 0.05)]
    rvp_leave: f64,
    /// Fraction of agents that start only after publication.
    #[arg(long, default_value_t = 0.02)]
    late: f64,
    /// When peers make no progress and the server names no new one: `upstream` (what the
    /// agent does: wait for a live upstream RVP up to --rvp-wait-s, then the origin), `origin`
    /// (the origin after 5 s, the agent before it waited for its RVP) or `wait` (never the origin).
    #[arg(long, default_value = "upstream")]
    fallback: String,
    /// `--fallback upstream`: how long a waiting agent gives an upstream RVP that makes no
    /// progress (the agent's `rvp_wait_secs`).
    #[arg(long, default_value_t = 600.0)]
    rvp_wait_s: f64,
    /// The server replaces a recorded RVP that stopped polling for its assignments this long
    /// ago (server/src/store.rs RVP_POLL_GRACE_MS); 0: only when its heartbeats stop (the server
    /// before migration 0003).
    #[arg(long, default_value_t = lowtide_server::store::RVP_POLL_GRACE_MS as f64 / 1000.0)]
    rvp_poll_grace_s: f64,
    /// Length of each packet-level calibration transfer, in seconds at the link's rate.
    #[arg(long, default_value_t = 6.0)]
    calibration_seconds: f64,
    /// Also run the packet-level cross-check on a small organisation without churn
    /// (by default one agent per site: the WAN tree; more agents than sites add LAN fan-out).
    #[arg(long)]
    crosscheck: bool,
    #[arg(long, default_value_t = 6)]
    crosscheck_agents: usize,
    #[arg(long, default_value_t = 6)]
    crosscheck_sites: usize,
    #[arg(long, default_value_t = 3)]
    crosscheck_depth: u32,
    #[arg(long, default_value_t = 64)]
    crosscheck_mib: u64,
    /// Stop the model after this much simulated time (seconds).
    #[arg(long, default_value_t = 6.0 * 3600.0)]
    limit_s: f64,
    /// Write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[expect(
    clippy::disallowed_methods,
    reason = "a binary: it reports its own wall time; simulated time never reads the clock"
)]
fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let wall = Instant::now();
    let fallback = match args.fallback.as_str() {
        "upstream" => Fallback::Upstream,
        "origin" => Fallback::Origin,
        "wait" => Fallback::Wait,
        other => anyhow::bail!("--fallback {other:?}: use `upstream` (what the agent does), `origin` or `wait`"),
    };
    anyhow::ensure!((0.0..1.0).contains(&args.loss), "--loss must be in [0, 1)");
    let spec = Spec {
        depth_max: args.depth,
        loss: args.loss,
        leave_fraction: args.leave,
        rvp_leave_fraction: args.rvp_leave,
        late_fraction: args.late,
        package_bytes: args.size_mib << 20,
        ..Spec::new(args.agents, args.sites)
    };
    let topo = generate(&spec, args.seed)?;
    let size = args.size_mib << 20;

    eprintln!(
        "calibrating at packet level (engine sessions, {:.0} % loss on the WAN)...",
        args.loss * 100.0
    );
    let t = Instant::now();
    let calib = Calibration::measure(
        args.loss,
        args.calibration_seconds,
        topo.lan_rate_bytes_per_s,
        8,
        args.seed,
        true,
    );
    let calibration_wall_s = t.elapsed().as_secs_f64();
    println!("packet-level calibration ({calibration_wall_s:.1} s wall):");
    for p in &calib.wan {
        println!(
            "  WAN {:>6.1} Mbit/s {:>5.1} ms {:>4.1}% loss {}: efficiency {:.3}, start-up {:.2} s ({:.1} RTT), wire/payload {:.4}, {}",
            p.rate_bytes_per_s as f64 * 8e-6,
            p.delay_s * 1e3,
            p.loss * 100.0,
            if p.background { "background" } else { "foreground" },
            p.efficiency,
            p.startup_s,
            p.startup_rtts,
            p.wire_ratio,
            if p.verified {
                "complete, verified"
            } else if p.complete {
                "complete, NOT verified"
            } else {
                "cut off at 4x its ideal time"
            }
        );
    }
    println!(
        "  LAN fan-out, 1 agent to {} peers at {:.0} Mbit/s: efficiency {:.3}, start-up {:.3} s, verified {}",
        calib.lan.receivers,
        calib.lan.rate_bytes_per_s as f64 * 8e-6,
        calib.lan.efficiency,
        calib.lan.startup_s,
        calib.lan.verified
    );
    anyhow::ensure!(
        calib.wan.iter().all(|p| p.verified || (!p.complete && !p.background)) && calib.lan.verified,
        "a calibration transfer did not complete: see above"
    );

    let crosscheck = if args.crosscheck {
        let small = run::small_topology(
            args.crosscheck_agents,
            args.crosscheck_sites,
            args.crosscheck_depth,
            args.seed,
        )?;
        let t = Instant::now();
        let c = run::crosscheck(&small, &calib, args.crosscheck_mib << 20, args.seed, 3600.0);
        for (s, site) in small.sites.iter().enumerate() {
            if let Some(w) = site.wan {
                println!(
                    "  cross-check site {s}: parent {:?}, {:.1} Mbit/s, {:.1} ms, {} agents",
                    site.parent,
                    w.rate_bytes_per_s as f64 * 8e-6,
                    w.delay_s * 1e3,
                    site.agents.len()
                );
            }
        }
        println!("  per agent (model s, packet s): {:?}", c.per_agent_s);
        println!(
            "cross-check, {} agents in {} sites, {} MiB ({:.1} s wall): time to last agent model {:.1} s, packet {:.1} s; max WAN payload ratio model {:.3}, packet {:.3}; all copies verified {}",
            args.crosscheck_agents,
            args.crosscheck_sites,
            args.crosscheck_mib,
            t.elapsed().as_secs_f64(),
            c.model.time_to_last_s,
            c.packet.time_to_last_s,
            c.model.wan.max_payload_ratio,
            c.packet.wan.max_payload_ratio,
            c.all_verified
        );
        Some(c)
    } else {
        None
    };

    let policy = Policy {
        fallback,
        rvp_wait_s: args.rvp_wait_s,
        rvp_poll_grace_s: (args.rvp_poll_grace_s > 0.0).then_some(args.rvp_poll_grace_s),
        ..Policy::default()
    };
    let t = Instant::now();
    let f = run::model(&topo, &calib, size, &policy, args.seed, args.limit_s);
    let model_wall_s = t.elapsed().as_secs_f64();
    let depth_counts: Vec<usize> = (0..=args.depth)
        .map(|d| topo.sites.iter().filter(|s| s.depth == d).count())
        .collect();
    println!(
        "model: {} agents in {} sites (sites per depth {:?}), {} MiB, seed {}, fallback {} ({model_wall_s:.1} s wall)",
        f.agents, f.sites, depth_counts, args.size_mib, args.seed, args.fallback
    );
    println!(
        "  time to last agent {:.0} s; lower bound (slowest path: size / slowest link + propagation) {:.0} s; ratio {:.3}; p50 {:.0} s, p90 {:.0} s",
        f.time_to_last_s, f.lower_bound_s, f.time_over_bound, f.time_p50_s, f.time_p90_s
    );
    println!(
        "  agents done {}, gone for good {}; {} late or returning agents done at most {:.0} s after (re)joining",
        f.agents_done, f.agents_gone, f.churned_agents, f.churned_max_after_join_s
    );
    println!(
        "  WAN bytes per link / package: max {:.3} (payload {:.3}, site {}), mean {:.3}; links over 1.05: {} of {}; origin egress / package {:.3}",
        f.wan.max_wire_ratio,
        f.wan.max_payload_ratio,
        f.wan.worst_site,
        f.wan.mean_wire_ratio,
        f.wan.links_over_1_05,
        f.wan.links,
        f.origin_bytes_ratio
    );
    println!(
        "  churn: {} leaves ({} of them RVPs), {} rejoins, {} late joins, {} RVP changes, {} origin fallbacks ({} with their upstream RVP gone, {} with nobody upstream, {} with every source dropped)",
        f.churn.leaves,
        f.churn.rvp_leaves,
        f.churn.rejoins,
        f.churn.late_joins,
        f.churn.rvp_changes,
        f.churn.origin_fallbacks,
        f.churn.origin_fallbacks_upstream_gone,
        f.churn.origin_fallbacks_nobody_upstream,
        f.churn.origin_fallbacks_sources_dropped
    );
    println!(
        "  server: {} calls ({} heartbeat, {} sources, {} inventory, {} manifest, {} table); mean {:.0}/s, peak {}/s (heartbeats alone {:.0}/s)",
        f.server.calls.total(),
        f.server.calls.heartbeat,
        f.server.calls.sources,
        f.server.calls.inventory,
        f.server.calls.manifest,
        f.server.calls.table,
        f.server.mean_per_s,
        f.server.peak_per_s,
        f.server.heartbeat_baseline_per_s
    );
    let wall_s = wall.elapsed().as_secs_f64();
    println!("wall time {wall_s:.1} s");
    if let Some(path) = &args.json {
        let j = serde_json::json!({
            "seed": args.seed,
            "package_bytes": size,
            "policy": policy,
            "calibration": calib,
            "figures": f,
            "crosscheck": crosscheck,
            "wall_s": wall_s,
            "calibration_wall_s": calibration_wall_s,
            "model_wall_s": model_wall_s,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&j)?).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
