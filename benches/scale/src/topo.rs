//! The organisation being simulated: a random tree of sites with WAN links,
//! agents with the hardware facts the server ranks them by, and who leaves or
//! joins when. Everything comes from one seed.

use lowtide_server::ranking::{Chassis, OsType, RankFacts};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// A site's link to its parent site (one direction: parent to child carries the package).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Wan {
    pub rate_bytes_per_s: u64,
    /// One-way propagation delay.
    pub delay_s: f64,
    pub loss: f64,
}

#[derive(Debug, Clone)]
pub struct Site {
    pub parent: Option<usize>,
    pub depth: u32,
    /// The link from the parent (None for the top site).
    pub wan: Option<Wan>,
    pub agents: Vec<usize>,
}

#[derive(Debug, Clone)]
pub struct Agent {
    pub id: String,
    pub site: usize,
    pub facts: RankFacts,
    /// When it asks for the package (seconds after publication).
    pub request_at: f64,
    /// When it leaves, and when (if ever) it comes back.
    pub leave_at: Option<f64>,
    pub rejoin_at: Option<f64>,
}

/// A whole organisation.
#[derive(Debug, Clone)]
pub struct Topology {
    pub sites: Vec<Site>,
    pub agents: Vec<Agent>,
    /// Every agent's NIC, both directions (bytes/s).
    pub lan_rate_bytes_per_s: u64,
    /// The origin (HTTP at the top site): its uplink.
    pub origin_rate_bytes_per_s: u64,
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct Spec {
    pub agents: usize,
    pub sites: usize,
    /// Deepest site: this many WAN hops below the top site.
    pub depth_max: u32,
    pub loss: f64,
    /// Agents ask for the package within this many seconds of publication.
    pub request_spread_s: f64,
    /// Fraction of agents that leave during the distribution.
    pub leave_fraction: f64,
    /// Fraction of those that come back (and resume).
    pub rejoin_fraction: f64,
    /// Fraction of agents that join only later (they were off when it was published).
    pub late_fraction: f64,
    /// Fraction of sites whose first-ranked agent (the RVP to be) is among the leavers.
    pub rvp_leave_fraction: f64,
    /// Leaves happen within this window after an agent asks (None: the time the
    /// package needs over the slowest path, so they happen during the distribution).
    pub churn_window_s: Option<f64>,
    pub package_bytes: u64,
}

impl Spec {
    pub fn new(agents: usize, sites: usize) -> Self {
        Self {
            agents,
            sites,
            depth_max: 4,
            loss: 0.01,
            request_spread_s: 30.0,
            leave_fraction: 0.03,
            rejoin_fraction: 0.5,
            late_fraction: 0.02,
            rvp_leave_fraction: 0.05,
            churn_window_s: None,
            package_bytes: 1 << 30,
        }
    }
}

fn log_uniform(rng: &mut SmallRng, lo: f64, hi: f64) -> f64 {
    (lo.ln() + rng.gen::<f64>() * (hi / lo).ln()).exp()
}

/// WAN rate (Mbit/s) and one-way delay (ms) ranges by the child's depth: regional
/// offices on fast links, branches and small offices on slower, nearer ones.
pub fn wan_class(depth: u32) -> ((f64, f64), (f64, f64)) {
    match depth {
        1 => ((100.0, 1000.0), (10.0, 80.0)),
        2 => ((20.0, 200.0), (5.0, 40.0)),
        _ => ((5.0, 50.0), (2.0, 25.0)),
    }
}

/// A random organisation from `seed`.
pub fn generate(spec: &Spec, seed: u64) -> anyhow::Result<Topology> {
    anyhow::ensure!(spec.sites >= 1, "--sites must be at least 1");
    anyhow::ensure!(
        spec.agents >= spec.sites,
        "--agents ({}) must be at least --sites ({}): every site has an agent",
        spec.agents,
        spec.sites
    );
    anyhow::ensure!(spec.depth_max >= 1, "--depth must be at least 1");
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut sites = vec![Site {
        parent: None,
        depth: 0,
        wan: None,
        agents: Vec::new(),
    }];
    for _ in 1..spec.sites {
        // A random recursive tree, capped at depth_max.
        let parent = loop {
            let p = rng.gen_range(0..sites.len());
            if sites[p].depth < spec.depth_max {
                break p;
            }
        };
        let depth = sites[parent].depth + 1;
        let ((r_lo, r_hi), (d_lo, d_hi)) = wan_class(depth);
        let mbit = log_uniform(&mut rng, r_lo, r_hi);
        let delay_ms = log_uniform(&mut rng, d_lo, d_hi);
        sites.push(Site {
            parent: Some(parent),
            depth,
            wan: Some(Wan {
                rate_bytes_per_s: (mbit * 125_000.0) as u64,
                delay_s: delay_ms / 1000.0,
                loss: spec.loss,
            }),
            agents: Vec::new(),
        });
    }
    // One agent per site, the rest spread by random weights (sites differ ~7x in size).
    let weights: Vec<f64> = (0..spec.sites).map(|_| (2.0 * rng.gen::<f64>()).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut site_of: Vec<usize> = (0..spec.sites).collect();
    for _ in spec.sites..spec.agents {
        let mut x = rng.gen::<f64>() * total;
        let mut s = 0;
        while s + 1 < spec.sites && x >= weights[s] {
            x -= weights[s];
            s += 1;
        }
        site_of.push(s);
    }
    let chassis = [
        Chassis::Desktop,
        Chassis::Laptop,
        Chassis::Laptop,
        Chassis::Vm,
        Chassis::Server,
    ];
    let agents: Vec<Agent> = site_of
        .iter()
        .enumerate()
        .map(|(i, &site)| {
            let c = chassis[rng.gen_range(0..chassis.len())];
            Agent {
                id: format!("agent-{i:05}"),
                site,
                facts: RankFacts {
                    disk_free_bytes: rng.gen_range(20u64..500) << 30,
                    preferred: rng.gen_bool(0.02),
                    chassis: c,
                    os_type: if c == Chassis::Server {
                        OsType::Server
                    } else {
                        OsType::Workstation
                    },
                    uptime_secs: rng.gen_range(60..30 * 86_400),
                    disk_usable_bytes: rng.gen_range(10u64..400) << 30,
                },
                request_at: rng.gen::<f64>() * spec.request_spread_s,
                leave_at: None,
                rejoin_at: None,
            }
        })
        .collect();
    for (i, a) in agents.iter().enumerate() {
        sites[a.site].agents.push(i);
    }
    let mut topo = Topology {
        sites,
        agents,
        lan_rate_bytes_per_s: 125_000_000,
        origin_rate_bytes_per_s: 1_250_000_000,
    };
    let window = spec.churn_window_s.unwrap_or_else(|| {
        (0..topo.sites.len())
            .map(|s| topo.lower_bound_s(s, spec.package_bytes))
            .fold(0.0, f64::max)
    });
    let Topology { sites, agents, .. } = &mut topo;
    // Churn: late joiners, leavers (some come back), and some sites' best-ranked agent leaving.
    let n = agents.len();
    for _ in 0..(spec.late_fraction * n as f64).round() as usize {
        let a = rng.gen_range(0..n);
        // Off when it was published: it starts (and asks) later.
        agents[a].request_at = 120.0 + rng.gen::<f64>() * window;
    }
    let leave = |a: &mut Agent, rng: &mut SmallRng| {
        let at = a.request_at + rng.gen::<f64>() * window;
        a.leave_at = Some(at);
        if rng.gen_bool(spec.rejoin_fraction) {
            a.rejoin_at = Some(at + rng.gen_range(60.0..600.0));
        }
    };
    for _ in 0..(spec.leave_fraction * n as f64).round() as usize {
        let a = rng.gen_range(0..n);
        leave(&mut agents[a], &mut rng);
    }
    for site in sites.iter() {
        if !rng.gen_bool(spec.rvp_leave_fraction) {
            continue;
        }
        let best = site
            .agents
            .iter()
            .copied()
            .min_by(|&x, &y| {
                lowtide_server::ranking::rank_cmp(&agents[x].facts, &agents[x].id, &agents[y].facts, &agents[y].id)
            })
            .expect("every site has an agent");
        leave(&mut agents[best], &mut rng);
    }
    Ok(topo)
}

impl Topology {
    /// Sites from `s` up to the top, `s` first.
    pub fn ancestors(&self, s: usize) -> Vec<usize> {
        let mut out = vec![s];
        let mut at = s;
        while let Some(p) = self.sites[at].parent {
            out.push(p);
            at = p;
        }
        out
    }

    /// The WAN links (named by their child site) between sites `a` and `b`.
    pub fn path(&self, a: usize, b: usize) -> Vec<usize> {
        let up_a = self.ancestors(a);
        let up_b = self.ancestors(b);
        let common = *up_a.iter().find(|s| up_b.contains(s)).expect("one tree");
        up_a.iter()
            .take_while(|&&s| s != common)
            .chain(up_b.iter().take_while(|&&s| s != common))
            .copied()
            .collect()
    }

    /// Lower bound on the time for the package to reach site `s`: its size over
    /// the slowest link on the way from the origin, plus the propagation delays.
    pub fn lower_bound_s(&self, s: usize, size: u64) -> f64 {
        let mut rate = self.origin_rate_bytes_per_s.min(self.lan_rate_bytes_per_s) as f64;
        let mut delay = 0.0;
        for &l in self.path(0, s).iter() {
            let w = self.sites[l].wan.expect("below the top");
            rate = rate.min(w.rate_bytes_per_s as f64);
            delay += w.delay_s;
        }
        size as f64 / rate + delay
    }
}
