//! What the server and the agents decide, the same for both simulators.
//!
//! The server side is the server's own ranking code ([`lowtide_server::ranking`]:
//! `sort_candidates`, `elect`, `serving_and_bench`) over what the server knows:
//! agents' facts, their last heartbeat, and the holdings from their last
//! inventory report. The agent side follows `agent/src/daemon.rs` (heartbeat,
//! inventory, sources refresh, "no progress: use the origin"), with the
//! design's flow (property 2 of DESIGN.md): a site's RVP pulls from the parent
//! site's RVP over the WAN with the background protocol, the top site's RVP
//! from the origin, everyone else from their own site's serving peers. An agent
//! with nobody to fetch from yet asks again every `wait_poll_s`.
//!
//! The transfers themselves are the [`Transport`]'s: the packet-level
//! simulator (the engine's sessions) or the flow-level model.

use std::collections::HashSet;

use lowtide_server::ranking::{self, Candidate};

use crate::topo::Topology;

/// Agents asking within this many seconds of publication were already running
/// (heartbeating) when it was published; later ones start when they ask.
pub const RUNNING_BEFORE_S: f64 = 60.0;

/// Where bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Src {
    /// The origin's HTTP server at the top site.
    Origin,
    Agent(usize),
}

/// Moves the bytes.
pub trait Transport {
    /// Verified bytes `a` holds.
    fn held(&self, a: usize) -> u64;
    fn complete(&self, a: usize) -> bool;
    /// Sources of `a`'s transfer that have not been dropped.
    fn live_sources(&self, a: usize) -> usize;
    /// Start fetching from `srcs` (or add them to the running fetch).
    fn add_sources(&mut self, a: usize, srcs: &[Src], background: bool);
    /// The agent goes away (`false`: nothing sent or received, its transfers end)
    /// or comes back (`true`: its cache kept, no transfer running).
    fn set_up(&mut self, a: usize, up: bool);
    /// Run the transfers until `t` (seconds).
    fn advance(&mut self, t: f64);
}

/// What the agent does when its peers make no progress and the server names no new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Fallback {
    /// What agent/src/daemon.rs does: while its upstream (the site's RVP; for an RVP, the
    /// parent site's) is alive in the server's answer and still getting the package, wait
    /// up to `rvp_wait_s` without progress, asking the server every `wait_refresh_s`; with
    /// no upstream getting it, `peer_stall_s`; then fetch the rest from the origin.
    Upstream,
    /// The agent before it waited for its RVP: the origin after `peer_stall_s` without progress.
    Origin,
    /// Keep asking the server until it names a live source.
    Wait,
}

/// Agent and server settings (the defaults of agent/src/config.rs and server/src/config.rs).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Policy {
    pub tick_s: f64,
    pub heartbeat_s: f64,
    pub inactive_after_s: f64,
    pub sources_refresh_s: f64,
    pub inventory_s: f64,
    pub peer_stall_s: f64,
    /// [`Fallback::Upstream`]: how long to wait for an upstream RVP that makes no progress.
    pub rvp_wait_s: f64,
    /// [`Fallback::Upstream`]: how often to ask the server while nothing arrives at first
    /// (doubling up to `sources_refresh_s` while it goes on).
    pub wait_refresh_s: f64,
    /// The server replaces a recorded RVP that stopped polling for its assignments this long
    /// ago, whether or not it holds the package whole: `RVP_POLL_GRACE_MS`. `None`: only once its
    /// heartbeats stop making it active (`inactive_after_s`), as before.
    pub rvp_poll_grace_s: Option<f64>,
    pub wait_poll_s: f64,
    pub peers_active_max: usize,
    pub fallback: Fallback,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            tick_s: 0.25,
            heartbeat_s: 60.0,
            inactive_after_s: 300.0,
            sources_refresh_s: 10.0,
            inventory_s: 2.0,
            peer_stall_s: 5.0,
            rvp_wait_s: 600.0,
            wait_refresh_s: 1.0,
            rvp_poll_grace_s: Some(lowtide_server::store::RVP_POLL_GRACE_MS as f64 / 1000.0),
            wait_poll_s: 10.0,
            peers_active_max: 8,
            fallback: Fallback::Upstream,
        }
    }
}

/// Calls to the server, by kind.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Calls {
    pub heartbeat: u64,
    pub manifest: u64,
    pub table: u64,
    pub sources: u64,
    pub inventory: u64,
}

impl Calls {
    pub fn total(&self) -> u64 {
        self.heartbeat + self.manifest + self.table + self.sources + self.inventory
    }
}

#[derive(Debug, Clone, Default)]
struct AgentState {
    up: bool,
    ever_up: bool,
    started: bool,
    done_at: Option<f64>,
    last_seen: f64,
    next_heartbeat: f64,
    reported: u64,
    next_inventory: f64,
    tried: HashSet<Src>,
    fetching: bool,
    on_origin: bool,
    last_held: u64,
    last_progress: f64,
    next_ask: f64,
    next_stall_ask: f64,
    /// What the agent last heard from the server about its upstream (site RVP, or parent RVP).
    upstream: Option<usize>,
    /// Whether the agent has had one answer from the server for this package.
    asked: bool,
    /// The upstream and its held bytes in the server's last answer, and when that last grew.
    up_seen: Option<(usize, u64)>,
    up_progress: f64,
    /// Answers in a row with nothing arriving (the waiting agent's polling backs off).
    wait_streak: u32,
    /// When it last went away.
    left_at: f64,
}

/// Counts of what happened.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Churn {
    pub leaves: u64,
    pub rejoins: u64,
    pub late_joins: u64,
    pub rvp_leaves: u64,
    pub rvp_changes: u64,
    pub origin_fallbacks: u64,
    /// Of those, agents whose upstream RVP had left (still named by the server: it counts
    /// an agent active until `inactive_after_s` after its last heartbeat).
    pub origin_fallbacks_upstream_gone: u64,
    /// Of those, agents with nobody upstream and no peer holding the package.
    pub origin_fallbacks_nobody_upstream: u64,
    /// Of those, agents whose sources were all dropped and whose upstream was not getting it.
    pub origin_fallbacks_sources_dropped: u64,
}

/// The outcome of one distribution.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Outcome {
    /// Completion time of each agent that finished (None: left and never came back).
    #[serde(skip)]
    pub done_at: Vec<Option<f64>>,
    pub calls: Calls,
    /// Server calls in each second.
    #[serde(skip)]
    pub calls_per_s: Vec<u32>,
    pub churn: Churn,
    pub end_s: f64,
}

pub struct Control<'a> {
    topo: &'a Topology,
    policy: Policy,
    st: Vec<AgentState>,
    rvp: Vec<Option<usize>>,
    calls: Calls,
    calls_per_s: Vec<u32>,
    churn: Churn,
    now: f64,
    /// Per site: the tick its answer was computed at, RVP, serving peers (holders) in order.
    answers: Vec<(f64, Option<usize>, Vec<usize>)>,
}

impl<'a> Control<'a> {
    pub fn new(topo: &'a Topology, policy: Policy, seed: u64) -> Self {
        // Agents asking at publication were running before it: heartbeats spread over the interval.
        let mut x = seed | 1;
        let st = topo
            .agents
            .iter()
            .map(|a| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let phase = (x % 1_000_000) as f64 / 1e6 * policy.heartbeat_s;
                let running = a.request_at <= RUNNING_BEFORE_S;
                AgentState {
                    up: running,
                    ever_up: running,
                    last_seen: if running { -phase } else { f64::NEG_INFINITY },
                    next_heartbeat: if running {
                        policy.heartbeat_s - phase
                    } else {
                        a.request_at
                    },
                    ..Default::default()
                }
            })
            .collect();
        Self {
            topo,
            policy,
            st,
            rvp: vec![None; topo.sites.len()],
            calls: Calls::default(),
            calls_per_s: Vec::new(),
            churn: Churn::default(),
            now: 0.0,
            answers: vec![(-1.0, None, Vec::new()); topo.sites.len()],
        }
    }

    fn count(&mut self, n: u32) {
        let s = self.now.max(0.0) as usize;
        if self.calls_per_s.len() <= s {
            self.calls_per_s.resize(s + 1, 0);
        }
        self.calls_per_s[s] += n;
    }

    /// The server's view of site `s` now: its RVP and serving peers (the server's ranking code).
    fn site_answer(&mut self, s: usize) -> (Option<usize>, Vec<usize>) {
        if self.answers[s].0 == self.now {
            return (self.answers[s].1, self.answers[s].2.clone());
        }
        let active_since = self.now - self.policy.inactive_after_s;
        let size_known = |st: &AgentState| st.reported;
        let mut cands: Vec<Candidate> = self.topo.sites[s]
            .agents
            .iter()
            .filter(|&&a| self.st[a].last_seen >= active_since)
            .map(|&a| Candidate {
                agent_id: self.topo.agents[a].id.clone(),
                addresses: Vec::new(),
                port: 0,
                facts: self.topo.agents[a].facts.clone(),
                held_bytes: size_known(&self.st[a]),
                ranges: Vec::new(),
                // Simulated agents all serve (no uploads_max = 0, no battery).
                serves: true,
            })
            .collect();
        ranking::sort_candidates(&mut cands);
        let index = |id: &str| -> usize { id[6..].parse().expect("agent-NNNNN") };
        // A recorded RVP that stopped polling for its assignments is replaced, whole or not
        // (and not elected again while it is away).
        if let (Some(r), Some(grace)) = (self.rvp[s], self.policy.rvp_poll_grace_s) {
            let st = &self.st[r];
            if !st.up && self.now - st.left_at >= grace {
                let id = &self.topo.agents[r].id;
                cands.retain(|c| &c.agent_id != id);
                self.rvp[s] = None;
                self.churn.rvp_changes += 1;
            }
        }
        let current = self.rvp[s].map(|a| self.topo.agents[a].id.clone());
        let rvp = ranking::elect(&cands, current.as_deref()).map(|c| index(&c.agent_id));
        if rvp != self.rvp[s] {
            if self.rvp[s].is_some() {
                self.churn.rvp_changes += 1;
            }
            self.rvp[s] = rvp;
        }
        let rvp_id = rvp.map(|a| self.topo.agents[a].id.clone());
        let (serving, _bench) = ranking::serving_and_bench(&cands, rvp_id.as_deref(), self.policy.peers_active_max);
        let serving: Vec<usize> = serving.iter().map(|c| index(&c.agent_id)).collect();
        self.answers[s] = (self.now, rvp, serving.clone());
        (rvp, serving)
    }

    /// One `sources` call by agent `a`: what it may fetch from, and with which protocol.
    fn ask(&mut self, a: usize) -> (Vec<Src>, bool) {
        self.calls.sources += 1;
        self.count(1);
        let s = self.topo.agents[a].site;
        let (rvp, serving) = self.site_answer(s);
        self.st[a].upstream = rvp.filter(|&r| r != a);
        if rvp == Some(a) {
            match self.topo.sites[s].parent {
                None => (vec![Src::Origin], false),
                Some(p) => {
                    // The nearest ancestor site whose RVP serves peers, as the server answers:
                    // one with no active agent, or whose RVP serves nobody, is skipped (the
                    // simulated agents all serve, so only the first happens here).
                    let (mut up, mut prvp) = (Some(p), None);
                    while let Some(p) = up {
                        prvp = self.site_answer(p).0;
                        if prvp.is_some() {
                            break;
                        }
                        up = self.topo.sites[p].parent;
                    }
                    self.st[a].upstream = prvp;
                    let srcs = prvp
                        .filter(|&r| self.st[r].reported > 0)
                        .map(Src::Agent)
                        .into_iter()
                        .collect();
                    (srcs, true)
                }
            }
        } else {
            let srcs = serving
                .into_iter()
                .filter(|&x| x != a && self.st[x].reported > 0)
                .map(Src::Agent)
                .collect();
            (srcs, false)
        }
    }

    /// Add the sources of an answer that agent `a` has not tried yet to its fetch (which
    /// starts it if none runs); false when the answer holds none.
    fn add_new_sources(&mut self, net: &mut dyn Transport, a: usize, srcs: Vec<Src>, background: bool, t: f64) -> bool {
        let new: Vec<Src> = srcs.into_iter().filter(|s| !self.st[a].tried.contains(s)).collect();
        if new.is_empty() {
            return false;
        }
        net.add_sources(a, &new, background);
        let st = &mut self.st[a];
        st.tried.extend(new);
        st.fetching = true;
        st.last_progress = t;
        true
    }

    /// Run the distribution to the end (every agent done or gone for good) or `limit_s`.
    pub fn run(mut self, net: &mut dyn Transport, limit_s: f64) -> Outcome {
        let n = self.topo.agents.len();
        for a in 0..n {
            if !self.st[a].up {
                net.set_up(a, false);
            }
        }
        let p = self.policy.clone();
        loop {
            let t = self.now;
            for a in 0..n {
                self.agent_tick(net, a, t, &p);
            }
            let pending = (0..n).any(|a| {
                let ag = &self.topo.agents[a];
                let st = &self.st[a];
                (st.up && st.done_at.is_none())
                    || ag.request_at > t
                    || ag.leave_at.is_some_and(|x| x > t)
                    || ag.rejoin_at.is_some_and(|x| x > t)
            });
            if !pending || t >= limit_s {
                break;
            }
            self.now = t + p.tick_s;
            net.advance(self.now);
        }
        Outcome {
            done_at: self.st.iter().map(|s| s.done_at).collect(),
            calls: self.calls,
            calls_per_s: self.calls_per_s,
            churn: self.churn,
            end_s: self.now,
        }
    }

    fn agent_tick(&mut self, net: &mut dyn Transport, a: usize, t: f64, p: &Policy) {
        let ag = &self.topo.agents[a];
        // Leaving and coming back.
        let joined = ag.request_at <= RUNNING_BEFORE_S || ag.request_at <= t;
        let away = ag.leave_at.is_some_and(|l| l <= t) && ag.rejoin_at.is_none_or(|r| r > t);
        let present = joined && !away;
        if present != self.st[a].up {
            if present {
                if self.st[a].ever_up {
                    self.churn.rejoins += 1;
                } else {
                    self.churn.late_joins += 1;
                }
                // The process starts (again): its cache is kept, its transfers are not.
                let st = &mut self.st[a];
                st.up = true;
                st.ever_up = true;
                st.started = false;
                st.fetching = false;
                st.on_origin = false;
                st.tried.clear();
                st.asked = false;
                st.upstream = None;
                st.up_seen = None;
                st.next_heartbeat = t;
                net.set_up(a, true);
            } else {
                self.st[a].up = false;
                self.st[a].left_at = t;
                net.set_up(a, false);
                self.churn.leaves += 1;
                if self.rvp[ag.site] == Some(a) {
                    self.churn.rvp_leaves += 1;
                }
            }
        }
        if !present {
            return;
        }
        // Heartbeat.
        if self.st[a].next_heartbeat <= t {
            self.calls.heartbeat += 1;
            self.count(1);
            self.st[a].last_seen = t;
            self.st[a].next_heartbeat = t + p.heartbeat_s;
        }
        if ag.request_at > t {
            return;
        }
        let held = net.held(a);
        // Inventory: reported every few seconds when it changed.
        if self.st[a].started && self.st[a].next_inventory <= t {
            if held != self.st[a].reported {
                self.calls.inventory += 1;
                self.count(1);
                self.st[a].reported = held;
            }
            self.st[a].next_inventory = t + p.inventory_s;
        }
        if self.st[a].done_at.is_some() {
            return;
        }
        if net.complete(a) {
            self.st[a].done_at = Some(t);
            self.calls.inventory += 1;
            self.count(1);
            self.st[a].reported = held;
            return;
        }
        if !self.st[a].started {
            self.st[a].started = true;
            self.calls.manifest += 1;
            self.calls.table += 1;
            self.count(2);
            self.st[a].next_inventory = t + p.inventory_s;
            self.st[a].next_ask = t;
            self.st[a].last_held = held;
            self.st[a].last_progress = t;
            self.st[a].up_progress = t;
        }
        if self.st[a].on_origin {
            return;
        }
        if p.fallback == Fallback::Upstream {
            self.upstream_tick(net, a, t, held, p);
            return;
        }
        if !self.st[a].fetching {
            if self.st[a].next_ask <= t {
                let (srcs, bg) = self.ask(a);
                self.st[a].next_ask = t + p.wait_poll_s;
                if self.add_new_sources(net, a, srcs, bg, t) {
                    self.st[a].next_ask = t + p.sources_refresh_s;
                }
            }
            return;
        }
        if held > self.st[a].last_held {
            self.st[a].last_held = held;
            self.st[a].last_progress = t;
        }
        let stalled = net.live_sources(a) == 0 || t - self.st[a].last_progress >= p.peer_stall_s;
        if t >= self.st[a].next_ask || (stalled && t >= self.st[a].next_stall_ask) {
            let (srcs, bg) = self.ask(a);
            self.st[a].next_ask = t + p.sources_refresh_s;
            self.st[a].next_stall_ask = t + p.wait_poll_s;
            if !self.add_new_sources(net, a, srcs, bg, t) && stalled {
                if p.fallback == Fallback::Origin {
                    self.churn.origin_fallbacks += 1;
                    self.st[a].on_origin = true;
                    net.add_sources(a, &[Src::Origin], false);
                } else if net.live_sources(a) == 0 {
                    // Waiting: a fetch with no live source starts over on the next answer.
                    self.st[a].tried.clear();
                }
            }
        }
    }

    /// The agent's loop as agent/src/daemon.rs runs it ([`Fallback::Upstream`]).
    fn upstream_tick(&mut self, net: &mut dyn Transport, a: usize, t: f64, held: u64, p: &Policy) {
        let progressed = held > self.st[a].last_held;
        if progressed {
            self.st[a].last_held = held;
            self.st[a].last_progress = t;
        }
        let live = if self.st[a].fetching { net.live_sources(a) } else { 0 };
        // The upstream as the server last named it.
        let upstream = self.st[a].upstream;
        // A named upstream that drops out is asked again (the agent's `retry_at`) until the
        // server names another: while there is one, the budget is `rvp_wait_s`, and the agent
        // never counts "every peer was dropped".
        let budget = if upstream.is_some() {
            p.rvp_wait_s
        } else {
            p.peer_stall_s
        };
        let idle_s = t - self.st[a].last_progress;
        let up_idle_s = t - self.st[a].up_progress;
        let dropped = self.st[a].fetching && live == 0 && upstream.is_none();
        // Nobody upstream of this agent and no peer holds it; every peer was dropped; or no
        // progress from it nor from its upstream for the budget.
        let nobody = upstream.is_none() && !self.st[a].fetching && self.st[a].asked;
        let give_up = nobody || dropped || (idle_s >= budget && up_idle_s >= budget);
        // Ask every `wait_refresh_s` while nothing arrives, every `sources_refresh_s` while
        // it does, and once more before giving up.
        let cadence = if !progressed || live == 0 {
            (p.wait_refresh_s * f64::from(1u32 << self.st[a].wait_streak.min(16))).min(p.sources_refresh_s)
        } else {
            p.sources_refresh_s
        };
        if t >= self.st[a].next_ask || give_up {
            let (srcs, bg) = self.ask(a);
            self.st[a].asked = true;
            self.st[a].next_ask = t + cadence;
            // The upstream's progress as the server reports it (its inventory).
            let seen = self.st[a].upstream.map(|u| (u, self.st[u].reported));
            let up_progressed = match (self.st[a].up_seen, seen) {
                (Some((u0, h0)), Some((u1, h1))) => u0 != u1 || h1 > h0,
                (None, Some(_)) => true,
                _ => false,
            };
            if up_progressed {
                self.st[a].up_progress = t;
            }
            if progressed || up_progressed {
                self.st[a].wait_streak = 0;
            } else {
                self.st[a].wait_streak += 1;
            }
            self.st[a].up_seen = seen;
            if self.add_new_sources(net, a, srcs, bg, t) {
                return;
            }
            if !give_up || up_progressed {
                return;
            }
        }
        if give_up {
            self.churn.origin_fallbacks += 1;
            match self.st[a].upstream {
                None => self.churn.origin_fallbacks_nobody_upstream += 1,
                Some(u) if !self.st[u].up => self.churn.origin_fallbacks_upstream_gone += 1,
                Some(_) if dropped => self.churn.origin_fallbacks_sources_dropped += 1,
                Some(_) => {}
            }
            self.st[a].on_origin = true;
            net.add_sources(a, &[Src::Origin], false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topo::{Agent, Site, Wan};

    /// Holds what it is told, records what it is asked to fetch from.
    struct Recorder {
        holds: Vec<bool>,
        added: Vec<(usize, Vec<Src>, bool)>,
    }

    impl Transport for Recorder {
        fn held(&self, a: usize) -> u64 {
            if self.holds[a] {
                1000
            } else {
                0
            }
        }
        fn complete(&self, a: usize) -> bool {
            self.holds[a]
        }
        fn live_sources(&self, a: usize) -> usize {
            self.added.iter().filter(|x| x.0 == a).map(|x| x.1.len()).sum()
        }
        fn add_sources(&mut self, a: usize, srcs: &[Src], background: bool) {
            self.added.push((a, srcs.to_vec(), background));
        }
        fn set_up(&mut self, _: usize, _: bool) {}
        fn advance(&mut self, _: f64) {}
    }

    /// The server skips an ancestor site with no active agent for the next one up: so does
    /// the model. hq -> b -> c; b's only agent is off; c's RVP fetches from hq's RVP.
    #[test]
    fn control_skips_a_parent_site_without_an_active_agent() {
        let wan = Some(Wan {
            rate_bytes_per_s: 1_000_000,
            delay_s: 0.01,
            loss: 0.0,
        });
        let site = |parent, depth, a| Site {
            parent,
            depth,
            wan: parent.and(wan),
            agents: vec![a],
        };
        let agent = |i: usize, request_at| Agent {
            id: format!("agent-{i:05}"),
            site: i,
            facts: Default::default(),
            request_at,
            leave_at: None,
            rejoin_at: None,
        };
        let topo = Topology {
            sites: vec![site(None, 0, 0), site(Some(0), 1, 1), site(Some(1), 2, 2)],
            // b's agent joins long after the run ends.
            agents: vec![agent(0, 0.0), agent(1, 1e6), agent(2, 0.0)],
            lan_rate_bytes_per_s: 1_000_000,
            origin_rate_bytes_per_s: 1_000_000,
        };
        let mut net = Recorder {
            holds: vec![true, false, false],
            added: Vec::new(),
        };
        let out = Control::new(&topo, Policy::default(), 1).run(&mut net, 5.0);
        let c: Vec<&(usize, Vec<Src>, bool)> = net.added.iter().filter(|x| x.0 == 2).collect();
        assert_eq!(
            c.first().map(|x| (x.1.as_slice(), x.2)),
            Some((&[Src::Agent(0)][..], true)),
            "{c:?}"
        );
        assert_eq!(out.churn.origin_fallbacks, 0, "{:?}", out.churn);
    }
}
