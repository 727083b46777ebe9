//! The flow-level model: every transfer is a flow with a rate, in fixed steps.
//!
//! Each step shares capacities among the flows (an approximate max-min fair
//! share by repeated water-filling):
//! - each WAN link (parent site to child site): its rate times the calibrated
//!   goodput efficiency of the engine's background protocol at that rate and
//!   1 % loss; foreground flows on the link (origin fallbacks) go first and the
//!   background flows get what is left (the background protocol yields);
//! - each agent's NIC, up and down (LAN rate times the calibrated LAN efficiency);
//! - the origin's uplink.
//!
//! Blocks are fetched lowest-missing-first (as `Fetch::schedule` does), so a
//! holding is a prefix: a flow can only carry what its source holds and the
//! receiver lacks, plus what the source receives meanwhile (pipelining down
//! the tree). A flow starts after the calibrated start-up time on its path.
//! A source that goes away is dropped by the receiver after the engine's stall
//! detection (3 s). Bytes on a WAN link are the payload carried times the
//! calibrated wire overhead (headers, retransmissions at 1 % loss).

use crate::calibrate::Calibration;
use crate::control::{Src, Transport};
use crate::topo::Topology;

/// The engine drops a source after `stall_timeout` x `stall_strikes_max` without data.
const STALL_DROP_S: f64 = 3.0;

struct Flow {
    src: Src,
    dst: usize,
    /// WAN links crossed (named by their child site).
    path: Vec<usize>,
    background: bool,
    start: f64,
    rate: f64,
    /// Each resource this flow uses: index into the capacity table.
    res: Vec<usize>,
}

pub struct Model<'a> {
    topo: &'a Topology,
    calib: &'a Calibration,
    size: f64,
    dt: f64,
    now: f64,
    held: Vec<f64>,
    in_rate: Vec<f64>,
    up: Vec<bool>,
    down_since: Vec<f64>,
    flows: Vec<Flow>,
    /// Flows into each agent.
    live: Vec<usize>,
    /// Payload and wire bytes carried by each site's WAN link (index = child site).
    pub link_payload: Vec<f64>,
    pub link_wire: Vec<f64>,
    pub origin_bytes: f64,
    /// Per link: goodput capacities (bytes/s) of the background and foreground protocols, and wire overheads.
    link_bg: Vec<f64>,
    link_fg: Vec<f64>,
    link_wire_bg: Vec<f64>,
    link_wire_fg: Vec<f64>,
    link_start: Vec<f64>,
    nic: f64,
    origin_up: f64,
}

impl<'a> Model<'a> {
    /// `holders`: agents that hold the whole package at the start.
    pub fn new(topo: &'a Topology, calib: &'a Calibration, size: u64, dt: f64) -> Self {
        let n = topo.agents.len();
        let s = topo.sites.len();
        let mut link_bg = vec![0.0; s];
        let mut link_fg = vec![0.0; s];
        let mut link_wire_bg = vec![1.0; s];
        let mut link_wire_fg = vec![1.0; s];
        let mut link_start = vec![0.0; s];
        for (i, site) in topo.sites.iter().enumerate() {
            if let Some(w) = site.wan {
                let rate = w.rate_bytes_per_s as f64;
                let bg = calib.wan_bg(w.rate_bytes_per_s, w.delay_s);
                let fg = calib.wan_fg(w.rate_bytes_per_s, w.delay_s);
                link_bg[i] = rate * bg.efficiency;
                link_fg[i] = rate * fg.efficiency;
                link_wire_bg[i] = bg.wire_ratio;
                link_wire_fg[i] = fg.wire_ratio;
                link_start[i] = bg.startup_rtts * 2.0 * w.delay_s;
            }
        }
        Self {
            topo,
            calib,
            size: size as f64,
            dt,
            now: 0.0,
            held: vec![0.0; n],
            in_rate: vec![0.0; n],
            up: vec![true; n],
            down_since: vec![f64::INFINITY; n],
            flows: Vec::new(),
            live: vec![0; n],
            link_payload: vec![0.0; s],
            link_wire: vec![0.0; s],
            origin_bytes: 0.0,
            link_bg,
            link_fg,
            link_wire_bg,
            link_wire_fg,
            link_start,
            nic: topo.lan_rate_bytes_per_s as f64 * calib.lan.efficiency,
            origin_up: topo.origin_rate_bytes_per_s as f64 * calib.lan.efficiency,
        }
    }

    fn src_site(&self, s: Src) -> usize {
        match s {
            Src::Origin => 0,
            Src::Agent(a) => self.topo.agents[a].site,
        }
    }

    /// Resource indices: [0, S) WAN links (background), [S, 2S) WAN links (foreground),
    /// then NIC up per agent, NIC down per agent, then the origin's uplink.
    fn resources(&self, src: Src, dst: usize, path: &[usize], background: bool) -> Vec<usize> {
        let s = self.topo.sites.len();
        let n = self.topo.agents.len();
        let mut r: Vec<usize> = path.iter().map(|&l| if background { l } else { s + l }).collect();
        r.push(match src {
            Src::Agent(a) => 2 * s + a,
            Src::Origin => 2 * s + 2 * n,
        });
        r.push(2 * s + n + dst);
        r
    }

    fn step(&mut self) {
        let dt = self.dt;
        let now = self.now;
        // Drop flows whose source has been away long enough for the engine to notice.
        let (up, down_since, held, size) = (&self.up, &self.down_since, &self.held, self.size);
        self.flows.retain(|f| {
            let src_ok = match f.src {
                Src::Origin => true,
                Src::Agent(a) => up[a] || now - down_since[a] < STALL_DROP_S,
            };
            src_ok && up[f.dst] && held[f.dst] < size
        });
        self.count_live();
        let s = self.topo.sites.len();
        let n = self.topo.agents.len();
        // Capacities: foreground first, background gets what foreground leaves.
        let mut cap = vec![0.0; 2 * s + 2 * n + 1];
        cap[s..2 * s].copy_from_slice(&self.link_fg);
        for c in &mut cap[2 * s..2 * s + 2 * n] {
            *c = self.nic;
        }
        cap[2 * s + 2 * n] = self.origin_up;
        let demand: Vec<f64> = self
            .flows
            .iter()
            .map(|f| {
                if now < f.start {
                    return 0.0;
                }
                match f.src {
                    Src::Origin => f64::INFINITY,
                    Src::Agent(a) if !self.up[a] => 0.0,
                    Src::Agent(a) if self.held[a] >= self.size => f64::INFINITY,
                    Src::Agent(a) => (self.held[a] - self.held[f.dst]).max(0.0) / dt + self.in_rate[a],
                }
            })
            .collect();
        for f in &mut self.flows {
            f.rate = 0.0;
        }
        let fg: Vec<usize> = (0..self.flows.len()).filter(|&i| !self.flows[i].background).collect();
        water_fill(&mut self.flows, &fg, &demand, &mut cap);
        for l in 0..s {
            let fg_used = self.link_fg[l] - cap[s + l];
            cap[l] = (self.link_bg[l] - fg_used).max(0.0);
        }
        let bg: Vec<usize> = (0..self.flows.len()).filter(|&i| self.flows[i].background).collect();
        water_fill(&mut self.flows, &bg, &demand, &mut cap);
        // Deliver: what the rates carry, no more than the sources' prefixes allow.
        let mut offered = vec![0.0; n];
        let mut reach = vec![0.0f64; n];
        for f in &self.flows {
            offered[f.dst] += f.rate * dt;
            let r = match f.src {
                Src::Origin => self.size,
                Src::Agent(a) => (self.held[a] + self.in_rate[a] * dt).min(self.size),
            };
            reach[f.dst] = reach[f.dst].max(r);
        }
        let mut gain = vec![0.0; n];
        for a in 0..n {
            if offered[a] > 0.0 {
                gain[a] = offered[a].min((reach[a] - self.held[a]).max(0.0));
            }
        }
        for f in &self.flows {
            if offered[f.dst] <= 0.0 {
                continue;
            }
            let bytes = f.rate * dt * gain[f.dst] / offered[f.dst];
            let overhead = |l: usize| {
                if f.background {
                    self.link_wire_bg[l]
                } else {
                    self.link_wire_fg[l]
                }
            };
            for &l in &f.path {
                self.link_payload[l] += bytes;
                self.link_wire[l] += bytes * overhead(l);
            }
            if f.src == Src::Origin {
                self.origin_bytes += bytes;
            }
        }
        for ((h, r), g) in self.held.iter_mut().zip(self.in_rate.iter_mut()).zip(&gain) {
            *h = (*h + g).min(self.size);
            if self.size - *h < 1.0 {
                *h = self.size;
            }
            *r = g / dt;
        }
        self.now += dt;
    }
}

/// Approximate max-min fair share: each round gives every unsatisfied flow an equal
/// part of the spare capacity of its tightest resource; never exceeds a capacity.
fn water_fill(flows: &mut [Flow], which: &[usize], demand: &[f64], cap: &mut [f64]) {
    let mut count = vec![0u32; cap.len()];
    for _round in 0..4 {
        count.iter_mut().for_each(|c| *c = 0);
        let mut any = false;
        for &i in which {
            if flows[i].rate < demand[i] - 1e-9 {
                any = true;
                for &r in &flows[i].res {
                    count[r] += 1;
                }
            }
        }
        if !any {
            break;
        }
        let mut inc = vec![0.0; which.len()];
        for (k, &i) in which.iter().enumerate() {
            let f = &flows[i];
            if f.rate >= demand[i] - 1e-9 {
                continue;
            }
            let mut x = demand[i] - f.rate;
            for &r in &f.res {
                x = x.min(cap[r].max(0.0) / count[r] as f64);
            }
            inc[k] = x;
        }
        for (k, &i) in which.iter().enumerate() {
            if inc[k] > 0.0 {
                flows[i].rate += inc[k];
                for &r in &flows[i].res {
                    cap[r] -= inc[k];
                }
            }
        }
    }
}

impl Model<'_> {
    fn count_live(&mut self) {
        self.live.iter_mut().for_each(|l| *l = 0);
        for f in &self.flows {
            self.live[f.dst] += 1;
        }
    }
}

impl Transport for Model<'_> {
    fn held(&self, a: usize) -> u64 {
        self.held[a] as u64
    }

    fn complete(&self, a: usize) -> bool {
        self.held[a] >= self.size
    }

    fn live_sources(&self, a: usize) -> usize {
        self.live[a]
    }

    /// The control never names a source twice to one running fetch (it keeps a tried set).
    fn add_sources(&mut self, a: usize, srcs: &[Src], background: bool) {
        let dst_site = self.topo.agents[a].site;
        for &src in srcs {
            let path = self.topo.path(self.src_site(src), dst_site);
            let start = self.now
                + if path.is_empty() {
                    self.calib.lan.startup_s
                } else {
                    path.iter().map(|&l| self.link_start[l]).sum::<f64>()
                };
            let res = self.resources(src, a, &path, background);
            self.flows.push(Flow {
                src,
                dst: a,
                path,
                background,
                start,
                rate: 0.0,
                res,
            });
            self.live[a] += 1;
        }
    }

    fn set_up(&mut self, a: usize, up: bool) {
        self.up[a] = up;
        if up {
            self.down_since[a] = f64::INFINITY;
        } else {
            self.down_since[a] = self.now;
            self.in_rate[a] = 0.0;
            self.flows.retain(|f| f.dst != a);
            self.count_live();
        }
    }

    fn advance(&mut self, t: f64) {
        while self.now + self.dt / 2.0 < t {
            self.step();
        }
    }
}
