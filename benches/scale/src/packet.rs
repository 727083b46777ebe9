//! The packet level: the engine's sessions over the deterministic network.
//!
//! Every agent is a `lowtide_engine::io::sim` node: a real `Server` serving
//! from its in-memory library and real `Fetch`es (block tables, requests,
//! acknowledgements, the background and foreground controllers, BLAKE3
//! verification of every block) whose verified blocks land in that library.
//! Each agent has a NIC (a shared uplink and a bottleneck in front of it at
//! the LAN rate); a site's RVP has its WAN link (rate, delay, queue, loss) in
//! front of it instead, and its acknowledgements go back with the same delay.
//! The origin is a node at the top site holding the package, reached with the
//! engine's foreground protocol (standing in for HTTP).
//!
//! Paths are one hop: a transfer between sites that are not parent and child
//! (an origin fallback below the top, an RVP whose parent site has no active
//! agent left) is not routed through the links in
//! between, so the cross-check runs without churn, where the control never
//! asks for one.

use std::net::SocketAddr;
use std::time::Duration;

use lowtide_engine::content::{BlockTable, ContentId};
use lowtide_engine::io::sim::{LinkSpec, Sim};
use lowtide_engine::ranges::BlockSet;
use lowtide_engine::session::fetch::{Event, Fetch, FetchConfig};
use lowtide_engine::session::serve::{Server, ServerConfig};
use lowtide_engine::time::Time;
use lowtide_engine::wire::DeploymentKey;

use crate::control::{Src, Transport};
use crate::topo::Topology;

/// Bottleneck queue of a WAN link, as time at its rate (a moderately bloated router).
pub const WAN_QUEUE: Duration = Duration::from_millis(100);
/// A NIC's queue.
pub const NIC_QUEUE_BYTES: u64 = 4 << 20;

pub fn at(t: f64) -> Time {
    Time::from_micros((t * 1e6).round() as u64)
}

pub fn wan_spec(rate: u64, delay_s: f64, loss: f64) -> LinkSpec {
    LinkSpec {
        rate_bytes_per_s: rate,
        delay: Duration::from_secs_f64(delay_s),
        queue_bytes_max: (rate as f64 * WAN_QUEUE.as_secs_f64()) as u64,
        loss,
        reorder: 0.0,
        reorder_delay: Duration::ZERO,
    }
}

pub fn nic_spec(rate: u64) -> LinkSpec {
    LinkSpec {
        rate_bytes_per_s: rate,
        delay: Duration::from_micros(25),
        queue_bytes_max: NIC_QUEUE_BYTES,
        ..LinkSpec::lan()
    }
}

/// The best-ranked agent of each site: its RVP when nobody holds anything yet
/// and nobody leaves (the server's ranking code decides).
pub fn first_rvps(topo: &Topology) -> Vec<usize> {
    topo.sites
        .iter()
        .map(|s| {
            s.agents
                .iter()
                .copied()
                .min_by(|&x, &y| {
                    let (a, b) = (&topo.agents[x], &topo.agents[y]);
                    lowtide_server::ranking::rank_cmp(&a.facts, &a.id, &b.facts, &b.id)
                })
                .expect("every site has an agent")
        })
        .collect()
}

pub struct PacketNet {
    pub sim: Sim,
    table: BlockTable,
    id: ContentId,
    size: u64,
    node: Vec<usize>,
    origin: usize,
    seed: u64,
    /// Nodes of each site's RVP (where its WAN link ends) and its parent's addresses.
    wan_end: Vec<Option<SocketAddr>>,
}

impl PacketNet {
    /// An organisation whose origin holds `data`.
    pub fn new(topo: &Topology, data: Vec<u8>, seed: u64) -> Self {
        let mut sim = Sim::new(seed, DeploymentKey::derive(b"lowtide-scale"), LinkSpec::lan());
        let table = BlockTable::from_bytes(&data, lowtide_engine::content::BLOCK_CHUNKS_LOG_DEFAULT);
        let id = table.root();
        let size = data.len() as u64;
        // Every site is a LAN of its own (a sender shares one background controller among its
        // sessions toward one subnet): site s is 10.(1 + s / 256).(s % 256).0/24, the origin
        // 10.0.0.1.
        let origin = sim.add_node_at(SocketAddr::from(([10, 0, 0, 1], 4000)), ServerConfig::default());
        sim.nodes[origin].library.insert_full(table.clone(), data);
        sim.set_uplink(origin, nic_spec(topo.origin_rate_bytes_per_s));
        let node: Vec<usize> = topo
            .agents
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let host = topo.sites[a.site].agents.iter().position(|&x| x == i).unwrap_or(0) + 1;
                assert!(
                    host < 255,
                    "the packet model puts a site on one /24: at most 254 agents a site"
                );
                let addr = SocketAddr::from(([10, 1 + (a.site >> 8) as u8, a.site as u8, host as u8], 4000));
                let n = sim.add_node_at(addr, ServerConfig::default());
                sim.nodes[n].library.insert_empty(table.clone());
                sim.set_uplink(n, nic_spec(topo.lan_rate_bytes_per_s));
                n
            })
            .collect();
        let rvps = first_rvps(topo);
        let mut wan_end = vec![None; topo.sites.len()];
        for (s, site) in topo.sites.iter().enumerate() {
            for &a in &site.agents {
                sim.set_bottleneck(node[a], nic_spec(topo.lan_rate_bytes_per_s));
            }
            if let (Some(p), Some(w)) = (site.parent, site.wan) {
                let (child, parent) = (node[rvps[s]], node[rvps[p]]);
                sim.set_bottleneck(child, wan_spec(w.rate_bytes_per_s, w.delay_s, w.loss));
                sim.set_link(
                    child,
                    parent,
                    LinkSpec {
                        delay: Duration::from_secs_f64(w.delay_s),
                        ..LinkSpec::lan()
                    },
                );
                wan_end[s] = Some(sim.nodes[child].addr);
            }
        }
        Self {
            sim,
            table,
            id,
            size,
            node,
            origin,
            seed,
            wan_end,
        }
    }

    fn addr(&self, s: Src) -> SocketAddr {
        match s {
            Src::Origin => self.sim.nodes[self.origin].addr,
            Src::Agent(a) => self.sim.nodes[self.node[a]].addr,
        }
    }

    /// Bytes that crossed each site's WAN link toward it: (payload of verified
    /// blocks its RVP got from the parent site, datagram bytes on the link).
    pub fn wan_bytes(&self, topo: &Topology) -> Vec<(u64, u64)> {
        let rvps = first_rvps(topo);
        let block = self.table.geometry().block_bytes();
        topo.sites
            .iter()
            .enumerate()
            .map(|(s, site)| {
                let Some(end) = self.wan_end[s] else { return (0, 0) };
                let parent = site.parent.expect("has a WAN link");
                let parent_addrs: Vec<SocketAddr> = topo.sites[parent]
                    .agents
                    .iter()
                    .map(|&a| self.addr(Src::Agent(a)))
                    .chain((parent == 0).then(|| self.addr(Src::Origin)))
                    .collect();
                let blocks = self.sim.nodes[self.node[rvps[s]]]
                    .events
                    .iter()
                    .filter(|(_, e)| matches!(e, Event::Block { from, .. } if parent_addrs.contains(from)))
                    .count() as u64;
                let payload = blocks * block;
                // Only the parent site's datagrams: site peers' acknowledgements to the RVP do not cross the WAN.
                let from_parent: u64 = self
                    .sim
                    .bottleneck_log
                    .iter()
                    .filter(|r| r.to == end && parent_addrs.contains(&r.from))
                    .map(|r| r.bytes as u64)
                    .sum();
                (payload, from_parent)
            })
            .collect()
    }

    /// Payload bytes the origin sent.
    pub fn origin_bytes(&self) -> u64 {
        self.sim.nodes[self.origin].server.stats().payload_bytes_sent
    }

    /// Whether every agent's copy is byte-exact (each block was verified on arrival; this checks the whole).
    pub fn verify(&self, a: usize) -> bool {
        self.sim.nodes[self.node[a]]
            .library
            .bytes(&self.id)
            .is_some_and(|b| ContentId::of(b) == self.id)
    }
}

impl Transport for PacketNet {
    fn held(&self, a: usize) -> u64 {
        let n = &self.sim.nodes[self.node[a]];
        let have = n.library.have(&self.id).map_or(0, BlockSet::count);
        if have == self.table.geometry().block_count() {
            self.size
        } else {
            have * self.table.geometry().block_bytes()
        }
    }

    fn complete(&self, a: usize) -> bool {
        self.sim.nodes[self.node[a]]
            .library
            .have(&self.id)
            .is_some_and(BlockSet::is_full)
    }

    fn live_sources(&self, a: usize) -> usize {
        self.sim.nodes[self.node[a]]
            .fetches
            .iter()
            .map(Fetch::live_sources)
            .sum()
    }

    fn add_sources(&mut self, a: usize, srcs: &[Src], background: bool) {
        let addrs: Vec<SocketAddr> = srcs.iter().map(|&s| self.addr(s)).collect();
        let now = self.sim.now;
        let i = self.node[a];
        if let Some(f) = self.sim.nodes[i].fetches.iter_mut().find(|f| f.live_sources() > 0) {
            for addr in addrs {
                f.add_source_with(now, addr, background);
            }
            return;
        }
        let have = self.sim.nodes[i]
            .library
            .have(&self.id)
            .cloned()
            .unwrap_or_else(|| BlockSet::new(self.table.geometry().block_count()));
        let cfg = FetchConfig {
            background,
            ..FetchConfig::default()
        };
        self.seed += 1;
        let mut f = Fetch::new(
            self.sim.key().clone(),
            self.id,
            cfg,
            Some((self.table.clone(), have)),
            self.seed,
        );
        for addr in addrs {
            f.add_source(now, addr);
        }
        self.sim.nodes[i].fetches.push(f);
    }

    fn set_up(&mut self, a: usize, up: bool) {
        let i = self.node[a];
        self.sim.nodes[i].down = !up;
        if up {
            // The process starts again: its cache is kept, its sessions are not.
            self.seed += 1;
            let key = self.sim.key().clone();
            let n = &mut self.sim.nodes[i];
            n.fetches.clear();
            n.server = Server::new(key, ServerConfig::default(), self.seed);
        }
    }

    fn advance(&mut self, t: f64) {
        self.sim.run_until(at(t), |_| false);
    }
}
