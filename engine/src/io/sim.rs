//! A deterministic in-memory network for tests and simulation at scale.
//!
//! Nodes exchange datagrams over directed links, each with a rate, a
//! propagation delay, a tail-drop queue limit, random loss and random extra
//! delay (reordering). Everything random comes from one seed, and time is
//! virtual: a run is reproduced exactly from its seed.
//!
//! A [`Node`] is what an agent is to the engine: a [`Server`] over a
//! [`MemLibrary`] plus any number of [`Fetch`]es whose verified blocks land in
//! that library (so a node re-serves what it has fetched, as agents do).

use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use rand::{Rng, SeedableRng};

use crate::content::{BlockTable, ContentId, Geometry};
use crate::ranges::BlockSet;
use crate::session::fetch::{Event, Fetch};
use crate::session::serve::{Server, ServerConfig};
use crate::session::{Library, Transmit, GSO_SEGMENTS_MAX};
use crate::time::Time;
use crate::wire::{self, DeploymentKey, DropCounters, Packet, DATAGRAM_BYTES_MAX, DATA_HEADER_BYTES};

/// Content held in memory: the table, the bytes, and which blocks are verified.
#[derive(Default)]
pub struct MemLibrary {
    items: HashMap<ContentId, Item>,
}

struct Item {
    table: BlockTable,
    table_bytes: Vec<u8>,
    data: Vec<u8>,
    have: BlockSet,
}

impl MemLibrary {
    /// Hold all of `data`.
    pub fn insert_full(&mut self, table: BlockTable, data: Vec<u8>) {
        let count = table.geometry().block_count();
        let table_bytes = table.encode();
        self.items.insert(
            table.root(),
            Item {
                table,
                table_bytes,
                data,
                have: BlockSet::full(count),
            },
        );
    }

    /// Prepare to receive content described by `table`.
    pub fn insert_empty(&mut self, table: BlockTable) {
        let g = table.geometry();
        self.items.entry(table.root()).or_insert_with(|| Item {
            table_bytes: table.encode(),
            table,
            data: vec![0; g.size as usize],
            have: BlockSet::new(g.block_count()),
        });
    }

    pub fn put_block(&mut self, id: &ContentId, index: u64, data: &[u8]) {
        if let Some(it) = self.items.get_mut(id) {
            let r = it.table.geometry().block_range(index);
            it.data[r.start as usize..r.end as usize].copy_from_slice(data);
            it.have.insert(index);
        }
    }

    pub fn bytes(&self, id: &ContentId) -> Option<&[u8]> {
        self.items.get(id).map(|it| it.data.as_slice())
    }

    pub fn have(&self, id: &ContentId) -> Option<&BlockSet> {
        self.items.get(id).map(|it| &it.have)
    }
}

impl Library for MemLibrary {
    fn info(&self, id: &ContentId) -> Option<(Geometry, bool)> {
        let it = self.items.get(id)?;
        (!it.have.is_empty()).then(|| (it.table.geometry(), it.have.is_full()))
    }

    fn has_block(&self, id: &ContentId, block: u64) -> bool {
        self.items.get(id).is_some_and(|it| it.have.contains(block))
    }

    fn read(&self, id: &ContentId, stream: u8, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let it = self.items.get(id).ok_or(std::io::ErrorKind::NotFound)?;
        let src = if stream == wire::STREAM_TABLE {
            &it.table_bytes
        } else {
            &it.data
        };
        let end = offset as usize + buf.len();
        if end > src.len() {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.copy_from_slice(&src[offset as usize..end]);
        Ok(())
    }
}

/// A directed link's properties.
#[derive(Debug, Clone, Copy)]
pub struct LinkSpec {
    pub rate_bytes_per_s: u64,
    pub delay: Duration,
    /// Tail-drop queue limit in bytes.
    pub queue_bytes_max: u64,
    /// Probability that a datagram is lost.
    pub loss: f64,
    /// Probability that a datagram gets up to `reorder_delay` extra delay.
    pub reorder: f64,
    pub reorder_delay: Duration,
}

impl LinkSpec {
    /// A 10 Gbit/s LAN with 50 µs delay and a 4 MiB queue.
    pub fn lan() -> Self {
        Self {
            rate_bytes_per_s: 1_250_000_000,
            delay: Duration::from_micros(50),
            queue_bytes_max: 4 << 20,
            loss: 0.0,
            reorder: 0.0,
            reorder_delay: Duration::ZERO,
        }
    }
}

#[derive(Debug, Default, Clone)]
struct Link {
    /// When the link is free again, in nanoseconds: transmission times of one
    /// datagram on a fast link are fractions of a microsecond, and rounding
    /// them to whole microseconds would make links run up to ~20 % fast.
    busy_until_ns: u64,
}

/// One datagram that crossed a bottleneck: when it left, who sent it to whom,
/// its size, and how long it waited in the bottleneck's queue.
#[derive(Debug, Clone, Copy)]
pub struct BottleneckRecord {
    pub left: Time,
    pub from: SocketAddr,
    pub to: SocketAddr,
    pub bytes: u32,
    pub queued: Duration,
}

/// Counters of the whole network.
#[derive(Debug, Clone, Default)]
pub struct NetStats {
    pub datagrams_sent: u64,
    pub datagrams_lost: u64,
    pub datagrams_dropped_queue: u64,
    pub bytes_delivered: u64,
}

/// One simulated host.
pub struct Node {
    pub addr: SocketAddr,
    pub server: Server,
    pub library: MemLibrary,
    pub fetches: Vec<Fetch>,
    /// Events of the node's fetches, in order, for the test to inspect.
    pub events: Vec<(ContentId, Event)>,
    /// Test hook: flip a bit in the payload of every data datagram this node sends.
    pub corrupt_data: bool,
    /// A node that is down neither sends nor receives.
    pub down: bool,
    pub drops: DropCounters,
}

struct InFlight {
    at: Time,
    seq: u64,
    from: SocketAddr,
    to: SocketAddr,
    bytes: Vec<u8>,
}

impl PartialEq for InFlight {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for InFlight {}
impl PartialOrd for InFlight {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for InFlight {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq)) // min-heap
    }
}

/// The simulated network.
pub struct Sim {
    pub now: Time,
    pub nodes: Vec<Node>,
    key: DeploymentKey,
    links: HashMap<(SocketAddr, SocketAddr), (LinkSpec, Link)>,
    default_link: LinkSpec,
    queue: BinaryHeap<InFlight>,
    seq: u64,
    rng: rand::rngs::SmallRng,
    pub stats: NetStats,
    buf: Vec<u8>,
    /// Shared bottlenecks, by destination: every datagram to that node queues in the link
    /// at that index of `bottleneck_links` (one link may sit in front of several nodes).
    bottlenecks: HashMap<SocketAddr, usize>,
    bottleneck_links: Vec<(LinkSpec, Link)>,
    /// Every datagram that crossed a bottleneck, in order.
    pub bottleneck_log: Vec<BottleneckRecord>,
    /// Shared uplinks, by source: every datagram from that node queues here
    /// first (a host's NIC), then on the link or bottleneck toward its destination.
    uplinks: HashMap<SocketAddr, (LinkSpec, Link)>,
}

impl Sim {
    pub fn new(seed: u64, key: DeploymentKey, default_link: LinkSpec) -> Self {
        Self {
            now: Time::ZERO,
            nodes: Vec::new(),
            key,
            links: HashMap::new(),
            default_link,
            queue: BinaryHeap::new(),
            seq: 0,
            rng: rand::rngs::SmallRng::seed_from_u64(seed),
            stats: NetStats::default(),
            buf: vec![0; GSO_SEGMENTS_MAX * DATAGRAM_BYTES_MAX],
            bottlenecks: HashMap::new(),
            bottleneck_links: Vec::new(),
            bottleneck_log: Vec::new(),
            uplinks: HashMap::new(),
        }
    }

    pub fn key(&self) -> &DeploymentKey {
        &self.key
    }

    /// Add a node at `10.x.y.z:4000` (from its index); returns its index.
    pub fn add_node(&mut self, config: ServerConfig) -> usize {
        let i = self.nodes.len();
        let addr: SocketAddr = format!("10.{}.{}.{}:4000", (i >> 16) & 0xff, (i >> 8) & 0xff, i & 0xff)
            .parse()
            .expect("valid");
        self.add_node_at(addr, config)
    }

    /// Add a node at `addr` (a sender groups background sessions by the peer's subnet, so
    /// a topology of sites gives each site its own); returns its index.
    pub fn add_node_at(&mut self, addr: SocketAddr, config: ServerConfig) -> usize {
        assert!(self.index_of(addr).is_none(), "two simulated nodes at {addr}");
        let i = self.nodes.len();
        let seed = self.rng.gen();
        self.nodes.push(Node {
            addr,
            server: Server::new(self.key.clone(), config, seed),
            library: MemLibrary::default(),
            fetches: Vec::new(),
            events: Vec::new(),
            corrupt_data: false,
            down: false,
            drops: DropCounters::default(),
        });
        i
    }

    /// Set the link from node `a` to node `b` (one direction).
    pub fn set_link(&mut self, a: usize, b: usize, spec: LinkSpec) {
        let key = (self.nodes[a].addr, self.nodes[b].addr);
        self.links.insert(key, (spec, Link::default()));
    }

    /// Put a shared bottleneck in front of node `to`: every datagram to it, from
    /// anyone, waits in one queue with `spec`'s rate, delay and limit.
    pub fn set_bottleneck(&mut self, to: usize, spec: LinkSpec) {
        self.set_shared_bottleneck(&[to], spec);
    }

    /// Put one bottleneck in front of all of `to` (a site behind one WAN link): every
    /// datagram to any of them, from anyone, waits in one queue with `spec`'s rate, delay
    /// and limit.
    pub fn set_shared_bottleneck(&mut self, to: &[usize], spec: LinkSpec) {
        let link = self.bottleneck_links.len();
        self.bottleneck_links.push((spec, Link::default()));
        for &n in to {
            self.bottlenecks.insert(self.nodes[n].addr, link);
        }
    }

    /// Put a shared uplink behind node `from`: every datagram it sends, to anyone,
    /// first waits in one queue with `spec`'s rate and limit (its delay and loss
    /// apply too), then goes on as usual.
    pub fn set_uplink(&mut self, from: usize, spec: LinkSpec) {
        self.uplinks.insert(self.nodes[from].addr, (spec, Link::default()));
    }

    fn index_of(&self, addr: SocketAddr) -> Option<usize> {
        self.nodes.iter().position(|n| n.addr == addr)
    }

    /// Run until `deadline` or until `done` holds (checked after every step). Returns true if `done` held.
    pub fn run_until(&mut self, deadline: Time, mut done: impl FnMut(&Sim) -> bool) -> bool {
        loop {
            self.flush_all();
            if done(self) {
                return true;
            }
            let next = self.next_wakeup();
            match next {
                Some(t) if t <= deadline => self.step(t),
                _ => {
                    self.now = deadline;
                    return done(self);
                }
            }
        }
    }

    fn next_wakeup(&self) -> Option<Time> {
        let mut t = self.queue.peek().map(|f| f.at);
        for n in self.nodes.iter().filter(|n| !n.down) {
            let timers = n
                .fetches
                .iter()
                .filter_map(|f| f.poll_timeout())
                .chain(n.server.poll_timeout());
            for x in timers {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        }
        t.map(|t| t.max(self.now))
    }

    fn step(&mut self, t: Time) {
        self.now = t;
        while self.queue.peek().is_some_and(|f| f.at <= t) {
            let f = self.queue.pop().expect("peeked");
            self.deliver(f);
        }
        let now = self.now;
        for n in self.nodes.iter_mut().filter(|n| !n.down) {
            if n.server.poll_timeout().is_some_and(|x| x <= now) {
                n.server.handle_timeout(now);
            }
            for f in n.fetches.iter_mut() {
                if f.poll_timeout().is_some_and(|x| x <= now) {
                    f.handle_timeout(now);
                }
            }
            drain_events(n);
        }
    }

    fn deliver(&mut self, f: InFlight) {
        let Some(i) = self.index_of(f.to) else { return };
        let now = self.now;
        let key = self.key.clone();
        let n = &mut self.nodes[i];
        if n.down {
            return;
        }
        self.stats.bytes_delivered += f.bytes.len() as u64;
        let packet = match wire::decode(&key, &f.bytes) {
            Ok(p) => p,
            Err(e) => {
                n.drops.count(&e);
                return;
            }
        };
        match packet {
            Packet::Request { .. } | Packet::Ack { .. } | Packet::Cancel { .. } => {
                n.server.handle(now, f.from, &packet, &n.library)
            }
            Packet::Close { .. } => {
                n.server.handle(now, f.from, &packet, &n.library);
                for fe in n.fetches.iter_mut() {
                    fe.handle(now, f.from, &packet);
                }
            }
            _ => {
                for fe in n.fetches.iter_mut() {
                    fe.handle(now, f.from, &packet);
                }
            }
        }
        drain_events(n);
    }

    /// Inject a raw datagram (for malformed-packet tests).
    pub fn inject(&mut self, from: SocketAddr, to: usize, bytes: Vec<u8>) {
        let to = self.nodes[to].addr;
        self.seq += 1;
        self.queue.push(InFlight {
            at: self.now,
            seq: self.seq,
            from,
            to,
            bytes,
        });
    }

    fn flush_all(&mut self) {
        for i in 0..self.nodes.len() {
            if self.nodes[i].down {
                continue;
            }
            loop {
                let now = self.now;
                let n = &mut self.nodes[i];
                let mut sent: Option<Transmit> = None;
                for f in n.fetches.iter_mut() {
                    if let Some(t) = f.poll_transmit(now, &mut self.buf) {
                        sent = Some(t);
                        break;
                    }
                }
                if sent.is_none() {
                    sent = n.server.poll_transmit(now, &n.library, &mut self.buf);
                }
                let Some(t) = sent else { break };
                let from = n.addr;
                let corrupt = n.corrupt_data;
                self.send(from, t, corrupt);
            }
        }
    }

    fn send(&mut self, from: SocketAddr, t: Transmit, corrupt: bool) {
        let seg = t.segment_size.unwrap_or(t.len);
        let mut at = 0;
        while at < t.len {
            let end = (at + seg).min(t.len);
            let mut bytes = self.buf[at..end].to_vec();
            if corrupt && bytes.len() > DATA_HEADER_BYTES && bytes[3] == wire::Kind::Data as u8 {
                let i = DATA_HEADER_BYTES + self.rng.gen_range(0..bytes.len() - DATA_HEADER_BYTES);
                bytes[i] ^= 0x10;
            }
            self.enqueue(from, t.dst, bytes);
            at = end;
        }
    }

    fn enqueue(&mut self, from: SocketAddr, to: SocketAddr, bytes: Vec<u8>) {
        self.stats.datagrams_sent += 1;
        // Through the sender's uplink first, if it has one: the datagram reaches
        // the next link when the uplink is done with it.
        let mut ready_ns = self.now.as_micros() * 1000;
        if let Some((spec, link)) = self.uplinks.get_mut(&from) {
            let spec = *spec;
            let start_ns = link.busy_until_ns.max(ready_ns);
            let queued = (start_ns - ready_ns) as f64 * 1e-9 * spec.rate_bytes_per_s as f64;
            if queued > spec.queue_bytes_max as f64 {
                self.stats.datagrams_dropped_queue += 1;
                return;
            }
            link.busy_until_ns = start_ns + (bytes.len() as f64 * 1e9 / spec.rate_bytes_per_s as f64).round() as u64;
            if self.rng.gen_bool(spec.loss) {
                self.stats.datagrams_lost += 1;
                return;
            }
            ready_ns = link.busy_until_ns + spec.delay.as_nanos() as u64;
        }
        let default = self.default_link;
        let shared = self.bottlenecks.get(&to).copied();
        let (spec, link) = match shared {
            Some(b) => &mut self.bottleneck_links[b],
            None => self.links.entry((from, to)).or_insert((default, Link::default())),
        };
        let spec = *spec;
        let now_ns = ready_ns;
        let start_ns = link.busy_until_ns.max(now_ns);
        let queued = (start_ns - now_ns) as f64 * 1e-9 * spec.rate_bytes_per_s as f64;
        if queued > spec.queue_bytes_max as f64 {
            self.stats.datagrams_dropped_queue += 1;
            return;
        }
        let tx_ns = (bytes.len() as f64 * 1e9 / spec.rate_bytes_per_s as f64).round() as u64;
        link.busy_until_ns = start_ns + tx_ns;
        // Leaves the link at the microsecond it is done (rounded up: never early).
        let done = Time::from_micros(link.busy_until_ns.div_ceil(1000));
        if shared.is_some() {
            self.bottleneck_log.push(BottleneckRecord {
                left: done,
                from,
                to,
                bytes: bytes.len() as u32,
                queued: Duration::from_nanos(start_ns - now_ns),
            });
        }
        if self.rng.gen_bool(spec.loss) {
            self.stats.datagrams_lost += 1;
            return;
        }
        let mut at = done + spec.delay;
        if spec.reorder > 0.0 && self.rng.gen_bool(spec.reorder) {
            at = at + spec.reorder_delay.mul_f64(self.rng.gen::<f64>());
        }
        self.seq += 1;
        self.queue.push(InFlight {
            at,
            seq: self.seq,
            from,
            to,
            bytes,
        });
    }
}

/// Move verified blocks of a node's fetches into its library, and keep the events.
fn drain_events(n: &mut Node) {
    for f in n.fetches.iter_mut() {
        let id = f.content();
        while let Some(e) = f.poll_event() {
            match e {
                Event::TableVerified(t) => {
                    n.library.insert_empty(t.clone());
                    n.events.push((id, Event::TableVerified(t)));
                }
                Event::Block { index, data, from } => {
                    n.library.put_block(&id, index, &data);
                    f.recycle(data);
                    n.events.push((
                        id,
                        Event::Block {
                            index,
                            data: Vec::new(),
                            from,
                        },
                    ));
                }
                other => n.events.push((id, other)),
            }
        }
    }
}
