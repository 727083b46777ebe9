//! Whole runs: the model at scale, and the cross-check of model against packets.

use crate::calibrate::Calibration;
use crate::control::{Calls, Churn, Control, Outcome, Policy};
use crate::model::Model;
use crate::packet::PacketNet;
use crate::topo::{Spec, Topology};

/// WAN bytes over the package size, per link.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WanFigures {
    pub links: usize,
    /// Largest payload carried by one link, over the package size.
    pub max_payload_ratio: f64,
    /// Largest datagram bytes on one link (headers, retransmissions), over the package size.
    pub max_wire_ratio: f64,
    pub mean_wire_ratio: f64,
    /// Links that carried more than 1.05 x the package (wire bytes).
    pub links_over_1_05: usize,
    /// The child site of the link with the most bytes.
    pub worst_site: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ServerLoad {
    pub calls: Calls,
    /// Calls per second over the distribution (publication to last agent).
    pub mean_per_s: f64,
    /// Most calls in one second.
    pub peak_per_s: u32,
    /// Heartbeats alone, every agent at the configured interval.
    pub heartbeat_baseline_per_s: f64,
}

/// What one distribution gave.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Figures {
    pub agents: usize,
    pub sites: usize,
    pub package_bytes: u64,
    pub agents_done: usize,
    /// Agents that left and did not come back before the end.
    pub agents_gone: usize,
    /// Last completion among the agents that asked at publication and never left.
    pub time_to_last_s: f64,
    pub time_p50_s: f64,
    pub time_p90_s: f64,
    /// Agents that joined late or came back: most time from (re)joining to done.
    pub churned_agents: usize,
    pub churned_max_after_join_s: f64,
    /// Slowest path from the origin to a site with an agent: size / slowest link + propagation.
    pub lower_bound_s: f64,
    pub time_over_bound: f64,
    pub wan: WanFigures,
    pub origin_bytes_ratio: f64,
    pub churn: Churn,
    pub server: ServerLoad,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Figures from an outcome and the bytes carried per link (payload, wire; index = child site).
pub fn figures(
    topo: &Topology,
    size: u64,
    out: &Outcome,
    links: &[(f64, f64)],
    origin_bytes: f64,
    policy: &Policy,
) -> Figures {
    let steady = |a: usize| {
        let ag = &topo.agents[a];
        ag.request_at <= crate::control::RUNNING_BEFORE_S && ag.leave_at.is_none()
    };
    let mut done: Vec<f64> = (0..topo.agents.len())
        .filter(|&a| steady(a))
        .filter_map(|a| out.done_at[a])
        .collect();
    done.sort_by(f64::total_cmp);
    let churned: Vec<f64> = (0..topo.agents.len())
        .filter(|&a| !steady(a))
        .filter_map(|a| {
            let ag = &topo.agents[a];
            let joined = ag.request_at.max(ag.rejoin_at.unwrap_or(0.0));
            out.done_at[a].map(|d| d - joined.min(d))
        })
        .collect();
    let last = done.last().copied().unwrap_or(f64::NAN);
    let lower_bound_s = topo
        .sites
        .iter()
        .enumerate()
        .filter(|(_, s)| s.agents.iter().any(|&a| out.done_at[a].is_some()))
        .map(|(i, _)| topo.lower_bound_s(i, size))
        .fold(0.0, f64::max);
    let wan_links: Vec<(usize, f64, f64)> = topo
        .sites
        .iter()
        .enumerate()
        .filter(|(_, s)| s.wan.is_some())
        .map(|(i, _)| (i, links[i].0 / size as f64, links[i].1 / size as f64))
        .collect();
    let worst = wan_links
        .iter()
        .max_by(|a, b| a.2.total_cmp(&b.2))
        .copied()
        .unwrap_or((0, 0.0, 0.0));
    let secs = (last.ceil() as usize).max(1);
    let calls_in = |v: &[u32]| v.iter().take(secs).map(|&c| c as u64).sum::<u64>();
    Figures {
        agents: topo.agents.len(),
        sites: topo.sites.len(),
        package_bytes: size,
        agents_done: out.done_at.iter().flatten().count(),
        agents_gone: out.done_at.iter().filter(|d| d.is_none()).count(),
        time_to_last_s: last,
        time_p50_s: percentile(&done, 0.5),
        time_p90_s: percentile(&done, 0.9),
        churned_agents: churned.len(),
        churned_max_after_join_s: churned.iter().copied().fold(0.0, f64::max),
        lower_bound_s,
        time_over_bound: last / lower_bound_s,
        wan: WanFigures {
            links: wan_links.len(),
            max_payload_ratio: wan_links.iter().map(|l| l.1).fold(0.0, f64::max),
            max_wire_ratio: worst.2,
            mean_wire_ratio: wan_links.iter().map(|l| l.2).sum::<f64>() / wan_links.len().max(1) as f64,
            links_over_1_05: wan_links.iter().filter(|l| l.2 > 1.05).count(),
            worst_site: worst.0,
        },
        origin_bytes_ratio: origin_bytes / size as f64,
        churn: out.churn.clone(),
        server: ServerLoad {
            calls: out.calls,
            mean_per_s: calls_in(&out.calls_per_s) as f64 / secs as f64,
            peak_per_s: out.calls_per_s.iter().copied().max().unwrap_or(0),
            heartbeat_baseline_per_s: topo.agents.len() as f64 / policy.heartbeat_s,
        },
    }
}

/// The flow-level model of a whole distribution.
pub fn model(topo: &Topology, calib: &Calibration, size: u64, policy: &Policy, seed: u64, limit_s: f64) -> Figures {
    let mut m = Model::new(topo, calib, size, policy.tick_s);
    let out = Control::new(topo, policy.clone(), seed).run(&mut m, limit_s);
    let links: Vec<(f64, f64)> = m
        .link_payload
        .iter()
        .copied()
        .zip(m.link_wire.iter().copied())
        .collect();
    figures(topo, size, &out, &links, m.origin_bytes, policy)
}

/// Model and packet level side by side on one small organisation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Crosscheck {
    pub model: Figures,
    pub packet: Figures,
    /// Per agent: (model, packet) completion time.
    pub per_agent_s: Vec<(f64, f64)>,
    /// Per WAN link (child site): (model, packet) payload bytes.
    pub per_link_payload: Vec<(usize, f64, f64)>,
    pub all_verified: bool,
}

/// A small organisation without churn (see [`crate::packet`]): `agents` in `sites`.
pub fn small_topology(agents: usize, sites: usize, depth: u32, seed: u64) -> anyhow::Result<Topology> {
    let spec = Spec {
        depth_max: depth,
        request_spread_s: 2.0,
        leave_fraction: 0.0,
        late_fraction: 0.0,
        rvp_leave_fraction: 0.0,
        ..Spec::new(agents, sites)
    };
    crate::topo::generate(&spec, seed)
}

/// The policy of the cross-check: agents waiting for a source ask every second, so
/// the transfers, not the waits, make up most of the time compared.
pub fn crosscheck_policy() -> Policy {
    Policy {
        wait_poll_s: 1.0,
        ..Policy::default()
    }
}

pub fn crosscheck(topo: &Topology, calib: &Calibration, size: u64, seed: u64, limit_s: f64) -> Crosscheck {
    let policy = crosscheck_policy();
    let mut mm = Model::new(topo, calib, size, policy.tick_s);
    let m_out = Control::new(topo, policy.clone(), seed).run(&mut mm, limit_s);

    let data = lowtide_benches::content(seed | 1, size as usize);
    let mut net = PacketNet::new(topo, data, seed);
    let p_out = Control::new(topo, policy.clone(), seed).run(&mut net, limit_s);
    let wan = net.wan_bytes(topo);
    let links: Vec<(f64, f64)> = wan.iter().map(|&(p, w)| (p as f64, w as f64)).collect();
    let p = figures(topo, size, &p_out, &links, net.origin_bytes() as f64, &policy);
    let m_links: Vec<(f64, f64)> = mm
        .link_payload
        .iter()
        .copied()
        .zip(mm.link_wire.iter().copied())
        .collect();
    let m = figures(topo, size, &m_out, &m_links, mm.origin_bytes, &policy);
    let all_verified = (0..topo.agents.len()).all(|a| net.verify(a));
    let per_agent_s = m_out
        .done_at
        .iter()
        .zip(&p_out.done_at)
        .map(|(a, b)| (a.unwrap_or(f64::NAN), b.unwrap_or(f64::NAN)))
        .collect();
    let per_link_payload = topo
        .sites
        .iter()
        .enumerate()
        .filter(|(_, s)| s.wan.is_some())
        .map(|(i, _)| (i, mm.link_payload[i], links[i].0))
        .collect();
    Crosscheck {
        model: m,
        packet: p,
        per_agent_s,
        per_link_payload,
        all_verified,
    }
}
