//! An endpoint: one UDP socket, one driver, a [`Server`] over a [`Store`],
//! and any number of [`Fetch`]es whose verified blocks go into that store.
//! This is what the agent and the `lowtide-xfer` command run.
//!
//! [`Endpoint::poll`] is one turn of the loop: send what the sessions have,
//! wait for datagrams or the next timer, hand datagrams to the sessions,
//! store verified blocks, commit them to disk in batches, run timers.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::mpsc;
use std::time::Duration;

use crate::content::{BlockTable, ContentId};
use crate::io::portable::Portable;
use crate::io::udp::{Driver, Socket};
use crate::io::uring::{self, Uring, ZeroCopy};
use crate::session::fetch::{DropReason, Event, Fetch, FetchConfig, SourceStats};
use crate::session::serve::{Server, ServerConfig};
use crate::session::Transmit;
use crate::store::{CommitJob, Store, StoreError};
use crate::time::{Clock, Time};
use crate::wire::{DeploymentKey, DropCounters, Keys, Packet};

/// Which driver to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverChoice {
    /// io_uring when available, else portable.
    Auto,
    Uring,
    Portable,
}

impl std::str::FromStr for DriverChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "uring" | "io_uring" => Ok(Self::Uring),
            "portable" => Ok(Self::Portable),
            _ => Err(format!("unknown driver {s:?}: use auto, uring or portable")),
        }
    }
}

#[derive(Clone, Debug)]
pub struct EndpointConfig {
    pub driver: DriverChoice,
    pub zero_copy: ZeroCopy,
    pub server: ServerConfig,
    /// Commit written blocks to disk after this many...
    pub commit_blocks: usize,
    /// ...or after this long, whichever comes first.
    pub commit_interval: Duration,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        Self {
            driver: DriverChoice::Auto,
            zero_copy: ZeroCopy::Auto,
            server: ServerConfig::default(),
            commit_blocks: 2048,
            commit_interval: Duration::from_millis(500),
        }
    }
}

// An endpoint can be built on one thread and handed to the thread that runs it.
const _: fn() = || {
    fn assert_send<T: Send>() {}
    assert_send::<Endpoint>();
};

/// What happened to a fetch, for the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchNews {
    SourceDropped {
        content: ContentId,
        addr: SocketAddr,
        reason: DropReason,
    },
    /// Every block is verified and committed to disk; `sources` says who sent what.
    Complete {
        content: ContentId,
        sources: Vec<SourceStats>,
    },
}

/// Progress of one fetch.
#[derive(Debug, Clone)]
pub struct FetchProgress {
    pub content: ContentId,
    pub bytes_held: u64,
    pub size: Option<u64>,
    pub sources: Vec<SourceStats>,
    /// Sources not dropped (connecting or active).
    pub live_sources: usize,
}

pub struct Endpoint {
    driver: Box<dyn Driver>,
    keys: Keys,
    clock: Clock,
    cfg: EndpointConfig,
    pub server: Server,
    pub store: Store,
    fetches: Vec<Fetch>,
    pub drops: DropCounters,
    batch: Vec<Transmit>,
    news: Vec<FetchNews>,
    last_commit: Time,
    seed: u64,
    /// Commit jobs go to a worker thread so `fdatasync` never stalls the network loop.
    commit_tx: mpsc::Sender<CommitJob>,
    commit_rx: mpsc::Receiver<CommitResult>,
    commits_in_flight: HashMap<ContentId, usize>,
    /// Fetches whose last blocks are being committed: complete once their jobs are done.
    finishing: Vec<(ContentId, Vec<SourceStats>)>,
    /// Contents with blocks written through [`Endpoint::write_block`] and no fetch to commit them.
    loose: std::collections::HashSet<ContentId>,
    /// Peers that asked for the background protocol, not yet taken by
    /// [`Endpoint::take_background_peers`] (at most [`BACKGROUND_PEERS_MAX`]).
    background_peers_new: Vec<IpAddr>,
    /// Every peer address that asked for the background protocol (at most
    /// [`BACKGROUND_PEERS_MAX`]; starts over when full).
    background_peers_seen: HashSet<IpAddr>,
}

/// Bound on the background peers an endpoint remembers (see [`Endpoint::take_background_peers`]).
pub const BACKGROUND_PEERS_MAX: usize = 4096;

/// A commit job back from the commit thread: done, or failed with why.
type CommitResult = Result<CommitJob, (CommitJob, StoreError)>;

fn spawn_committer() -> (mpsc::Sender<CommitJob>, mpsc::Receiver<CommitResult>) {
    let (tx, jobs) = mpsc::channel::<CommitJob>();
    let (done, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("lowtide-commit".into())
        .spawn(move || {
            for job in jobs {
                let r = match job.run() {
                    Ok(()) => Ok(job),
                    Err(e) => Err((job, e)),
                };
                if done.send(r).is_err() {
                    break;
                }
            }
        })
        .expect("spawning the commit thread");
    (tx, rx)
}

/// Why an endpoint could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("cannot bind UDP {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("io_uring was asked for but is unavailable ({0}); use --driver portable or auto")]
    NoUring(io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most 8 bytes into b.
    let _ = unsafe { libc::getrandom(b.as_mut_ptr() as *mut libc::c_void, 8, 0) };
    u64::from_ne_bytes(b)
}

impl Endpoint {
    pub fn bind(
        addr: SocketAddr,
        key: DeploymentKey,
        store: Store,
        cfg: EndpointConfig,
    ) -> Result<Self, EndpointError> {
        let sock = Socket::bind(addr).map_err(|source| EndpointError::Bind { addr, source })?;
        let driver: Box<dyn Driver> = match cfg.driver {
            DriverChoice::Portable => Box::new(Portable::new(sock)),
            DriverChoice::Uring => Box::new(Uring::new(sock, cfg.zero_copy).map_err(EndpointError::NoUring)?),
            DriverChoice::Auto if uring::available() => match Uring::new(sock, cfg.zero_copy) {
                Ok(u) => Box::new(u),
                Err(e) => {
                    tracing::warn!("io_uring unavailable ({e}); using the portable driver");
                    Box::new(Portable::new(
                        Socket::bind(addr).map_err(|source| EndpointError::Bind { addr, source })?,
                    ))
                }
            },
            DriverChoice::Auto => {
                tracing::info!(
                    "io_uring is disabled on this kernel (kernel.io_uring_disabled); using the portable driver"
                );
                Box::new(Portable::new(sock))
            }
        };
        tracing::info!("UDP {} with the {}", driver.local_addr(), driver.describe());
        let seed = random_seed();
        let (commit_tx, commit_rx) = spawn_committer();
        Ok(Self {
            commit_tx,
            commit_rx,
            commits_in_flight: HashMap::new(),
            finishing: Vec::new(),
            loose: std::collections::HashSet::new(),
            background_peers_new: Vec::new(),
            background_peers_seen: HashSet::new(),
            server: Server::new(key.clone(), cfg.server.clone(), seed),
            driver,
            keys: Keys::new(key),
            clock: Clock::new(),
            cfg,
            store,
            fetches: Vec::new(),
            drops: DropCounters::default(),
            batch: Vec::new(),
            news: Vec::new(),
            last_commit: Time::ZERO,
            seed,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.driver.local_addr()
    }

    pub fn driver_name(&self) -> &'static str {
        self.driver.name()
    }

    pub fn driver_description(&self) -> String {
        self.driver.describe()
    }

    pub fn now(&self) -> Time {
        self.clock.now()
    }

    /// Change the deployment keys (the server rotated them): everything sent from now on
    /// is signed with `keys.current`; datagrams under `keys.previous` are still accepted,
    /// and sessions a peer opened under it are answered under it.
    pub fn set_keys(&mut self, keys: Keys) {
        if keys.current != self.keys.current {
            self.server.set_key(keys.current.clone());
            for f in &mut self.fetches {
                f.set_key(keys.current.clone());
            }
        }
        self.keys = keys;
    }

    /// Start fetching `id` from `sources`. With a `table` (from the server), every
    /// block already in the store is kept; without one, the table is fetched from a source.
    pub fn start_fetch(
        &mut self,
        id: ContentId,
        table: Option<BlockTable>,
        sources: &[SocketAddr],
        cfg: FetchConfig,
    ) -> Result<(), StoreError> {
        if let Some(t) = &table {
            t.verify_root(&id)?;
            self.store.begin(t)?;
        }
        let known = self
            .store
            .table(&id)
            .map(|t| (t.clone(), self.store.have(&id).expect("table implies entry").clone()));
        self.store.pin(id);
        self.seed = self.seed.wrapping_add(1);
        let mut f = Fetch::new(self.keys.current.clone(), id, cfg, known, self.seed);
        let now = self.clock.now();
        for s in sources {
            f.add_source(now, *s);
        }
        if f.is_complete() {
            self.news.push(FetchNews::Complete {
                content: id,
                sources: Vec::new(),
            });
            self.store.unpin(&id);
            return Ok(());
        }
        self.fetches.push(f);
        Ok(())
    }

    /// Add a source to a running fetch, with the fetch's default protocol.
    pub fn add_source(&mut self, id: &ContentId, addr: SocketAddr) -> bool {
        let now = self.clock.now();
        self.fetches
            .iter_mut()
            .find(|f| f.content() == *id)
            .is_some_and(|f| f.add_source(now, addr))
    }

    /// Add a source to a running fetch, saying whether to ask it for the background protocol.
    pub fn add_source_with(&mut self, id: &ContentId, addr: SocketAddr, background: bool) -> bool {
        let now = self.clock.now();
        self.fetches
            .iter_mut()
            .find(|f| f.content() == *id)
            .is_some_and(|f| f.add_source_with(now, addr, background))
    }

    /// Stop fetching `id`: what was verified stays in the store (committed on the next turn)
    /// and the content is unpinned. Sources' sessions end by their idle timeout.
    pub fn cancel_fetch(&mut self, id: &ContentId) -> bool {
        let Some(k) = self.fetches.iter().position(|f| f.content() == *id) else {
            return false;
        };
        self.fetches.remove(k);
        self.loose.insert(*id);
        self.store.unpin(id);
        true
    }

    /// Store a block that came from outside the engine (an HTTP range from the origin),
    /// verifying it first; a running fetch of the content stops asking peers for it.
    pub fn write_block(&mut self, id: &ContentId, index: u64, data: &[u8]) -> Result<(), StoreError> {
        self.store.write_block(id, index, data)?;
        match self.fetches.iter_mut().find(|f| f.content() == *id) {
            Some(f) => f.mark_held(index),
            None => {
                self.loose.insert(*id);
            }
        }
        Ok(())
    }

    pub fn progress(&self) -> Vec<FetchProgress> {
        self.fetches
            .iter()
            .map(|f| FetchProgress {
                content: f.content(),
                bytes_held: f.bytes_held(),
                size: f.table().map(|t| t.geometry().size),
                sources: f.sources(),
                live_sources: f.live_sources(),
            })
            .collect()
    }

    /// Hand the egress monitor's latest view of the local interface to the background sessions
    /// (the agent samples its eBPF monitor, or the netlink fallback, and calls this).
    pub fn on_path_signal(&mut self, signal: &crate::cc::background::PathSignal) {
        let now = self.clock.now();
        self.server.on_path_signal(now, signal);
    }

    /// Addresses of peers that asked for the background protocol since the last call, each
    /// once: the caller watches the egress interface toward them (an egress monitor) and
    /// feeds what it sees to [`Endpoint::on_path_signal`]. Only authenticated requests count.
    pub fn take_background_peers(&mut self) -> Vec<IpAddr> {
        std::mem::take(&mut self.background_peers_new)
    }

    /// News since the last call.
    pub fn take_news(&mut self) -> Vec<FetchNews> {
        std::mem::take(&mut self.news)
    }

    /// Fetches not yet complete (including those whose last blocks are being committed).
    pub fn fetching(&self) -> usize {
        self.fetches.len() + self.finishing.len()
    }

    /// One turn of the loop, waiting at most `wait_max` for something to happen.
    pub fn poll(&mut self, wait_max: Duration) -> io::Result<()> {
        let now = self.clock.now();
        let more = self.transmit(now)?;
        let next = self
            .fetches
            .iter()
            .filter_map(|f| f.poll_timeout())
            .chain(self.server.poll_timeout())
            .min();
        let wait = if more {
            Duration::ZERO
        } else {
            next.map_or(wait_max, |t| t.since(now)).min(wait_max)
        };
        self.receive(wait)?;
        let now = self.clock.now();
        if self.server.poll_timeout().is_some_and(|t| t <= now) {
            self.server.handle_timeout(now);
        }
        for f in self.fetches.iter_mut() {
            if f.poll_timeout().is_some_and(|t| t <= now) {
                f.handle_timeout(now);
            }
        }
        self.drain_events(now)?;
        Ok(())
    }

    /// Send until the sessions have nothing more or the driver's batch is full.
    /// Returns true if a full batch went out (there may be more right away).
    fn transmit(&mut self, now: Time) -> io::Result<bool> {
        let slots = self.driver.tx_slots();
        self.batch.clear();
        while self.batch.len() < slots {
            let i = self.batch.len();
            let buf = self.driver.tx_buf(i);
            let mut t = None;
            for f in self.fetches.iter_mut() {
                t = f.poll_transmit(now, buf);
                if t.is_some() {
                    break;
                }
            }
            if t.is_none() {
                t = self.server.poll_transmit(now, &self.store, buf);
            }
            match t {
                Some(t) => self.batch.push(t),
                None => break,
            }
        }
        let full = self.batch.len() == slots;
        if !self.batch.is_empty() {
            self.driver.send(&self.batch)?;
        }
        Ok(full)
    }

    fn receive(&mut self, wait: Duration) -> io::Result<()> {
        let Self {
            driver,
            keys,
            clock,
            server,
            store,
            fetches,
            drops,
            background_peers_new,
            background_peers_seen,
            ..
        } = self;
        let mut on_datagram = |from: SocketAddr, bytes: &[u8], arrived: Option<Time>| {
            // The time a datagram is handled, not the time the wait began: a stale `now` (up to
            // the whole wait) would put the sessions' timers and rates off.
            let now = clock.now();
            // When the kernel received it: acknowledgements report that (the fetcher's
            // `recv_ts_us`, from which the background controller takes the one-way delay) and
            // round-trip samples use it, so the time this endpoint took to get round to the
            // datagram (milliseconds on a busy host) is not read as a queue on the path. The
            // handling time when the kernel gave no usable stamp (the driver logged that once).
            let arrived = arrived.map_or(now, |a| a.min(now));
            let (packet, key) = match keys.decode(bytes) {
                Ok(p) => p,
                Err(e) => {
                    drops.count(&e);
                    return;
                }
            };
            if let Packet::Request { fixed, .. } = &packet {
                if fixed.flags & crate::session::serve::REQUEST_BACKGROUND != 0
                    && !background_peers_seen.contains(&from.ip())
                {
                    if background_peers_seen.len() == BACKGROUND_PEERS_MAX {
                        background_peers_seen.clear();
                    }
                    background_peers_seen.insert(from.ip());
                    if background_peers_new.len() < BACKGROUND_PEERS_MAX {
                        background_peers_new.push(from.ip());
                    }
                }
            }
            match packet {
                Packet::Request { .. } | Packet::Ack { .. } | Packet::Cancel { .. } => {
                    server.handle_arrived(now, arrived, from, &packet, &*store, key)
                }
                Packet::Close { .. } => {
                    server.handle_arrived(now, arrived, from, &packet, &*store, key);
                    for f in fetches.iter_mut() {
                        f.handle_arrived(now, arrived, from, &packet);
                    }
                }
                _ => {
                    for f in fetches.iter_mut() {
                        f.handle_arrived(now, arrived, from, &packet);
                    }
                }
            }
        };
        driver.recv(Some(wait), clock, &mut on_datagram)?;
        Ok(())
    }

    fn drain_events(&mut self, now: Time) -> io::Result<()> {
        let mut done = Vec::new();
        for (k, f) in self.fetches.iter_mut().enumerate() {
            let id = f.content();
            while let Some(e) = f.poll_event() {
                match e {
                    Event::TableVerified(t) => {
                        self.store.begin(&t).map_err(io::Error::other)?;
                        self.store.pin(id);
                    }
                    Event::Block { index, data, .. } => {
                        self.store
                            .write_verified_block(&id, index, &data)
                            .map_err(io::Error::other)?;
                        f.recycle(data);
                    }
                    Event::SourceDropped { addr, reason } => {
                        tracing::warn!("source {addr} dropped for {}: {reason}", id.short());
                        self.news.push(FetchNews::SourceDropped {
                            content: id,
                            addr,
                            reason,
                        });
                    }
                    Event::Complete => done.push((k, f.sources())),
                }
            }
        }
        let due = now.since(self.last_commit) >= self.cfg.commit_interval;
        for k in 0..self.fetches.len() {
            let id = self.fetches[k].content();
            if self.store.uncommitted(&id) >= self.cfg.commit_blocks || (due && self.store.uncommitted(&id) > 0) {
                self.send_commit(&id)?;
            }
        }
        let loose: Vec<ContentId> = self.loose.drain().collect();
        for id in loose {
            if self.store.uncommitted(&id) >= self.cfg.commit_blocks || due {
                self.send_commit(&id)?;
            } else {
                self.loose.insert(id);
            }
        }
        if due {
            self.last_commit = now;
        }
        for (k, sources) in done.into_iter().rev() {
            let f = self.fetches.remove(k);
            let id = f.content();
            self.send_commit(&id)?;
            self.finishing.push((id, sources));
        }
        self.reap_commits(false)
    }

    fn send_commit(&mut self, id: &ContentId) -> io::Result<()> {
        if let Some(job) = self.store.take_commit(id).map_err(io::Error::other)? {
            *self.commits_in_flight.entry(*id).or_default() += 1;
            self.commit_tx
                .send(job)
                .map_err(|_| io::Error::other("the commit thread stopped"))?;
        }
        Ok(())
    }

    /// Apply finished commit jobs; with `wait`, block until none is in flight.
    fn reap_commits(&mut self, wait: bool) -> io::Result<()> {
        loop {
            let r = if wait && self.commits_in_flight.values().any(|n| *n > 0) {
                self.commit_rx
                    .recv()
                    .map_err(|_| io::Error::other("the commit thread stopped"))?
            } else {
                match self.commit_rx.try_recv() {
                    Ok(r) => r,
                    Err(_) => break,
                }
            };
            let (job, failed) = match r {
                Ok(job) => (job, None),
                Err((job, e)) => (job, Some(e)),
            };
            if let Some(n) = self.commits_in_flight.get_mut(&job.id) {
                *n -= 1;
            }
            if let Some(e) = failed {
                // Nothing is lost: the blocks are committed again at the next commit interval
                // (once there is room), and a finished fetch completes only when they are.
                self.loose.insert(job.id);
                self.store.commit_failed(job);
                return Err(io::Error::other(e));
            }
            self.store.commit_done(&job);
        }
        let mut k = 0;
        while k < self.finishing.len() {
            let id = self.finishing[k].0;
            if self.commits_in_flight.get(&id).copied().unwrap_or(0) == 0 && self.store.uncommitted(&id) == 0 {
                let (_, sources) = self.finishing.swap_remove(k);
                self.store.unpin(&id);
                self.news.push(FetchNews::Complete { content: id, sources });
            } else {
                k += 1;
            }
        }
        Ok(())
    }

    /// Wait until every written block is committed (for an orderly shutdown).
    pub fn flush_commits(&mut self) -> io::Result<()> {
        let ids: Vec<ContentId> = self
            .fetches
            .iter()
            .map(|f| f.content())
            .chain(self.loose.drain())
            .collect();
        for id in ids {
            self.send_commit(&id)?;
        }
        self.reap_commits(true)
    }
}
