//! The engine thread: owns the [`Endpoint`] (UDP socket, store, serving and
//! fetching sessions) and runs its loop; the rest of the daemon talks to it
//! with [`Cmd`]s over a channel and gets answers on oneshot channels.
//!
//! The endpoint has no wake-up handle, so the loop polls it with a short
//! wait ([`POLL_WAIT`]) and drains commands between turns.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use lowtide_engine::content::{BlockTable, ContentId};
use lowtide_engine::endpoint::{Endpoint, FetchNews};
use lowtide_engine::session::fetch::{DropReason, FetchConfig};
use lowtide_engine::store::StoreError;
use lowtide_engine::wire::RejectReason;
use serde::Serialize;
use tokio::sync::oneshot;

use crate::monitor::{EgressWatch, MonitorView};

/// Longest one loop turn waits for datagrams before looking at commands again.
pub const POLL_WAIT: Duration = Duration::from_millis(20);
/// Most commands handled between two loop turns.
const COMMANDS_PER_TURN_MAX: usize = 64;
/// Most source drops remembered for `status` and `get` answers.
pub const DROPS_KEPT_MAX: usize = 64;

/// What one content in the store holds.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Held {
    pub content: ContentId,
    pub size: u64,
    pub held_bytes: u64,
    pub complete: bool,
    /// Byte ranges `[start, end)` held.
    pub ranges: Vec<(u64, u64)>,
    /// Block index runs `[start, end)` missing.
    #[serde(skip)]
    pub missing_blocks: Vec<(u64, u64)>,
}

/// One source of a running fetch, as the engine sees it.
#[derive(Debug, Clone, Serialize)]
pub struct SourceView {
    pub addr: SocketAddr,
    pub active: bool,
    /// Dropped by the fetch (no answer, stalled, refused, lied); may be added again.
    pub dropped: bool,
    pub payload_bytes: u64,
    pub blocks_verified: u64,
    pub rate_bytes_per_s: u64,
    /// Encrypted datagrams from it whose AEAD tag failed (tampered on the path).
    pub sealed_rejected: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct FetchView {
    pub content: ContentId,
    pub bytes_held: u64,
    pub size: Option<u64>,
    pub live_sources: usize,
    pub sources: Vec<SourceView>,
}

/// A peer the engine dropped from a fetch, and why (a bad block, no answer, busy...).
#[derive(Debug, Clone, Serialize)]
pub struct Dropped {
    /// Counts drops since the daemon started (tells new drops from old ones).
    pub seq: u64,
    pub content: ContentId,
    pub addr: SocketAddr,
    pub reason: String,
    /// The peer refused for now (serving as many peers as it may, or the device is busy):
    /// ask it again later, it is not gone.
    pub refused: bool,
    /// The peer sent data that does not verify (a bad block or table): never used again
    /// for this content.
    pub banned: bool,
    /// The peer does not have the content (yet): an upstream RVP that has not begun its own
    /// download, which it does within moments.
    pub not_found: bool,
    /// The device refuses to serve anybody for now (on battery, busy CPU or disk, a VPN site,
    /// `uploads_max = 0`): unlike a full serving cap, this lasts.
    pub device_busy: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub udp: SocketAddr,
    pub driver: String,
    pub background_paused: bool,
    /// The device refuses to serve (busy, on battery, VPN site).
    pub serving_refused: bool,
    /// Requests refused and sessions ended while refusing.
    pub requests_refused: u64,
    pub fetches: Vec<FetchView>,
    pub served_payload_bytes: u64,
    /// Of those, bytes sent again (lost or late on the path).
    pub served_resent_bytes: u64,
    pub serve_sessions_opened: u64,
    pub serve_sessions: usize,
    pub store_used_bytes: u64,
    pub store_limit_bytes: u64,
    pub dropped_datagrams: u64,
    /// The last [`DROPS_KEPT_MAX`] peers dropped from fetches, oldest first.
    pub dropped_peers: Vec<Dropped>,
    /// Store errors (a full disk, an I/O error) since the start, and the last one.
    pub store_errors: u64,
    pub store_error: Option<String>,
    /// The egress monitor and why background serving is paused.
    pub monitor: MonitorView,
}

/// What the engine loop remembers for snapshots besides the endpoint.
#[derive(Default)]
struct Notes {
    drops: VecDeque<Dropped>,
    drop_seq: u64,
    store_errors: u64,
    store_error: Option<String>,
}

pub type Reply<T> = oneshot::Sender<Result<T, String>>;

pub enum Cmd {
    /// Fetch from peers, each `(address, background)`: added to the running fetch of the
    /// content, else a fetch is started (the table is verified and the store entry begun
    /// first). Peers that sent a bad block or table for the content are not added again.
    Fetch {
        table: BlockTable,
        peers: Vec<(SocketAddr, bool)>,
        /// Ask the peers to encrypt the data.
        encrypt: bool,
        reply: Reply<()>,
    },
    /// Fetch from same-site peers without the server's block table (the server is
    /// unreachable): the table comes from the first peer that accepts, verified against the
    /// content id before anything is stored; the store's own table is used if it has one.
    /// Peers are added to the running fetch of the content, else a fetch is started.
    FetchFromPeers {
        id: ContentId,
        peers: Vec<SocketAddr>,
        encrypt: bool,
        reply: Reply<()>,
    },
    /// Get the block table from peers (it is verified against the content id, so any peer
    /// that holds it may serve it): a fetch without a table is started with these peers,
    /// or they are added to the running one. Once the table verifies, the
    /// store entry is begun and the fetch goes on for blocks; [`Cmd::Table`] shows it.
    FetchTable {
        id: ContentId,
        /// Each `(address, background)`.
        peers: Vec<(SocketAddr, bool)>,
        encrypt: bool,
    },
    /// The content's verified block table, when the store holds it.
    Table {
        id: ContentId,
        reply: Reply<Option<BlockTable>>,
    },
    /// Begin a store entry (for content fetched from the origin only).
    Begin {
        table: BlockTable,
        reply: Reply<()>,
    },
    /// Write blocks (index, bytes) the caller verified against the content's
    /// verified table; with `commit`, make everything written so far durable.
    Write {
        id: ContentId,
        blocks: Vec<(u64, Vec<u8>)>,
        commit: bool,
        reply: Reply<()>,
    },
    Held {
        id: ContentId,
        reply: Reply<Option<Held>>,
    },
    /// Stop using these sources for the content (an agent that is no longer its site's RVP
    /// stops fetching across the WAN). The engine's fetch is restarted without them (what was
    /// verified stays; blocks in flight are asked for again).
    DropSources {
        id: ContentId,
        addrs: Vec<SocketAddr>,
        /// Ask the peers to encrypt the data (as the fetch being restarted did).
        encrypt: bool,
    },
    /// Per-source figures of the content's fetch: the running one, else the last one that
    /// completed.
    FetchSources {
        id: ContentId,
        reply: Reply<Vec<SourceView>>,
    },
    List {
        reply: Reply<Vec<Held>>,
    },
    Remove {
        id: ContentId,
        reply: Reply<()>,
    },
    /// Re-verify held blocks; answers the bad block indices per content.
    Verify {
        id: Option<ContentId>,
        reply: Reply<Vec<(ContentId, Vec<u64>)>>,
    },
    DataPath {
        id: ContentId,
        reply: Reply<PathBuf>,
    },
    Pause(bool),
    /// Key the engine with new deployment keys (the server rotated them).
    SetKeys(lowtide_engine::wire::Keys),
    /// Refuse to serve peers (true) or serve again.
    Refuse(bool),
    Snapshot {
        reply: Reply<Snapshot>,
    },
    Stop,
}

fn held(ep: &Endpoint, id: &ContentId) -> Option<Held> {
    let t = ep.store.table(id)?;
    let have = ep.store.have(id)?;
    let g = t.geometry();
    let mut ranges = Vec::new();
    let mut held_bytes = 0;
    for r in have.runs() {
        let (s, e) = (g.block_range(r.start).start, g.block_range(r.end - 1).end);
        held_bytes += e - s;
        ranges.push((s, e));
    }
    let mut missing_blocks = Vec::new();
    let mut i = 0;
    while let Some(s) = have.next_missing(i) {
        let e = have.next_member(s).unwrap_or(g.block_count());
        missing_blocks.push((s, e));
        i = e;
    }
    Some(Held {
        content: *id,
        size: g.size,
        held_bytes,
        complete: have.is_full(),
        ranges,
        missing_blocks,
    })
}

/// What the engine thread remembers about the sources of its fetches.
#[derive(Default)]
struct Sources {
    /// Per content: sources that lied (bad block, bad table, wrong geometry); never added again.
    banned: HashMap<ContentId, HashSet<SocketAddr>>,
    /// Per content: sources dropped and not added again since.
    dropped: HashMap<ContentId, HashSet<SocketAddr>>,
    /// Per content and source: whether it was asked for the background protocol.
    background: HashMap<(ContentId, SocketAddr), bool>,
    /// Per content: the sources of the fetch that completed last (until another starts).
    finals: HashMap<ContentId, Vec<SourceView>>,
}

/// Most completed fetches whose source figures are kept until asked for.
const FINALS_MAX: usize = 64;

fn source_view(s: &lowtide_engine::session::fetch::SourceStats, dropped: bool) -> SourceView {
    SourceView {
        addr: s.addr,
        active: s.active,
        dropped,
        payload_bytes: s.payload_bytes,
        blocks_verified: s.blocks_verified,
        rate_bytes_per_s: s.rate_bytes_per_s,
        sealed_rejected: s.sealed_rejected,
    }
}

/// Most contents whose source bans are remembered.
const BANNED_CONTENTS_MAX: usize = 1024;

impl Sources {
    /// A source dropped for this is never used again for the content.
    fn bans(reason: &DropReason) -> bool {
        matches!(
            reason,
            DropReason::BadBlock(_) | DropReason::BadTable(_) | DropReason::WrongGeometry
        )
    }

    fn on_drop(&mut self, content: ContentId, addr: SocketAddr, reason: &DropReason) {
        if Self::bans(reason) {
            if self.banned.len() >= BANNED_CONTENTS_MAX && !self.banned.contains_key(&content) {
                self.banned.clear();
            }
            self.banned.entry(content).or_default().insert(addr);
        }
        self.dropped.entry(content).or_default().insert(addr);
    }

    fn banned(&self, content: &ContentId, addr: &SocketAddr) -> bool {
        self.banned.get(content).is_some_and(|b| b.contains(addr))
    }
}

fn snapshot(ep: &Endpoint, notes: &Notes, mon: &EgressWatch, known: &Sources) -> Snapshot {
    let s = ep.server.stats();
    Snapshot {
        udp: ep.local_addr(),
        driver: ep.driver_name().to_string(),
        background_paused: ep.server.background_paused(),
        serving_refused: ep.server.refusing(),
        requests_refused: s.requests_refused,
        fetches: ep
            .progress()
            .into_iter()
            .map(|p| FetchView {
                content: p.content,
                bytes_held: p.bytes_held,
                size: p.size,
                live_sources: p.live_sources,
                sources: p
                    .sources
                    .iter()
                    .map(|s| source_view(s, known.dropped.get(&p.content).is_some_and(|d| d.contains(&s.addr))))
                    .collect(),
            })
            .collect(),
        served_payload_bytes: s.payload_bytes_sent,
        served_resent_bytes: s.payload_bytes_resent,
        serve_sessions_opened: s.sessions_opened,
        serve_sessions: ep.server.session_count(),
        store_used_bytes: ep.store.used_bytes(),
        store_limit_bytes: ep.store.limit_bytes(),
        dropped_datagrams: ep.drops.total(),
        dropped_peers: notes.drops.iter().cloned().collect(),
        store_errors: notes.store_errors,
        store_error: notes.store_error.clone(),
        monitor: mon.view(),
    }
}

/// Start a fetch of `id` whose block table comes from its peers, unless one is running.
fn start_without_table(ep: &mut Endpoint, known: &mut Sources, id: ContentId, encrypt: bool) -> Result<(), String> {
    if ep.progress().iter().any(|p| p.content == id) {
        return Ok(());
    }
    known.dropped.remove(&id);
    known.finals.remove(&id);
    let cfg = FetchConfig {
        encrypt,
        ..FetchConfig::default()
    };
    ep.start_fetch(id, None, &[], cfg).map_err(|x| x.to_string())
}

/// Give the running fetch of `id` these peers (`true`: over the background protocol), except
/// those banned for it; a peer given again is no longer counted as dropped.
fn add_peers(
    ep: &mut Endpoint,
    known: &mut Sources,
    id: ContentId,
    peers: impl IntoIterator<Item = (SocketAddr, bool)>,
) {
    for (addr, background) in peers {
        if known.banned(&id, &addr) || !ep.add_source_with(&id, addr, background) {
            continue;
        }
        if let Some(d) = known.dropped.get_mut(&id) {
            d.remove(&addr);
        }
        if known.background.len() >= BANNED_CONTENTS_MAX * 64 {
            known.background.clear();
        }
        known.background.insert((id, addr), background);
    }
}

fn handle(ep: &mut Endpoint, notes: &Notes, mon: &mut EgressWatch, known: &mut Sources, cmd: Cmd) -> bool {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    match cmd {
        Cmd::Fetch {
            table,
            peers,
            encrypt,
            reply,
        } => {
            let id = table.root();
            let running = ep.progress().into_iter().find(|p| p.content == id);
            // A fetch still waiting for its table from peers is started again with this one.
            if running.as_ref().is_some_and(|p| p.size.is_none()) {
                ep.cancel_fetch(&id);
            }
            let r = if running.is_some_and(|p| p.size.is_some()) {
                Ok(())
            } else {
                known.dropped.remove(&id);
                known.finals.remove(&id);
                let cfg = FetchConfig {
                    encrypt,
                    ..FetchConfig::default()
                };
                ep.start_fetch(id, Some(table), &[], cfg).map_err(|x| e(&x))
            };
            if r.is_ok() {
                add_peers(ep, known, id, peers);
            }
            let _ = reply.send(r);
        }
        Cmd::FetchFromPeers {
            id,
            peers,
            encrypt,
            reply,
        } => {
            let r = start_without_table(ep, known, id, encrypt);
            if r.is_ok() {
                add_peers(ep, known, id, peers.into_iter().map(|a| (a, false)));
            }
            let _ = reply.send(r);
        }
        Cmd::FetchTable { id, peers, encrypt } => match start_without_table(ep, known, id, encrypt) {
            Ok(()) => add_peers(ep, known, id, peers),
            Err(x) => tracing::warn!("fetching the table of {} from peers: {x}", id.short()),
        },
        Cmd::Table { id, reply } => {
            let _ = reply.send(Ok(ep.store.table(&id).cloned()));
        }
        Cmd::Begin { table, reply } => {
            let r = table
                .verify_root(&table.root())
                .map_err(|x| e(&x))
                .and_then(|()| ep.store.begin(&table).map_err(|x| e(&x)));
            let _ = reply.send(r);
        }
        Cmd::Write {
            id,
            blocks,
            commit,
            reply,
        } => {
            let r = (|| {
                for (i, b) in &blocks {
                    ep.write_block(&id, *i, b)?;
                }
                if commit {
                    ep.store.commit(&id)?;
                }
                Ok::<(), lowtide_engine::store::StoreError>(())
            })()
            .map_err(|x| e(&x));
            let _ = reply.send(r);
        }
        Cmd::Held { id, reply } => {
            let _ = reply.send(Ok(held(ep, &id)));
        }
        Cmd::DropSources { id, addrs, encrypt } => {
            let keep: Option<Vec<(SocketAddr, bool)>> = ep.progress().into_iter().find(|p| p.content == id).map(|p| {
                let dropped = known.dropped.get(&id);
                p.sources
                    .iter()
                    .filter(|s| !addrs.contains(&s.addr) && !dropped.is_some_and(|d| d.contains(&s.addr)))
                    .map(|s| (s.addr, known.background.get(&(id, s.addr)).copied().unwrap_or(false)))
                    .collect()
            });
            if let Some(keep) = keep {
                ep.cancel_fetch(&id);
                known.dropped.remove(&id);
                let cfg = FetchConfig {
                    encrypt,
                    ..FetchConfig::default()
                };
                match ep.start_fetch(id, None, &[], cfg) {
                    Ok(()) => {
                        for (addr, background) in keep {
                            ep.add_source_with(&id, addr, background);
                        }
                    }
                    Err(e) => tracing::warn!("restarting the fetch of {} without {addrs:?}: {e}", id.short()),
                }
            }
        }
        Cmd::FetchSources { id, reply } => {
            let running = ep.progress().into_iter().find(|p| p.content == id).map(|p| {
                p.sources
                    .iter()
                    .map(|s| source_view(s, known.dropped.get(&id).is_some_and(|d| d.contains(&s.addr))))
                    .collect()
            });
            let v = running.or_else(|| known.finals.get(&id).cloned()).unwrap_or_default();
            let _ = reply.send(Ok(v));
        }
        Cmd::List { reply } => {
            let v = ep.store.list().iter().filter_map(|i| held(ep, &i.id)).collect();
            let _ = reply.send(Ok(v));
        }
        Cmd::Remove { id, reply } => {
            let busy = ep.progress().iter().any(|p| p.content == id && p.live_sources > 0);
            let r = if busy {
                Err(format!("{id} is being fetched; wait until it finishes, then remove it"))
            } else {
                ep.store.remove(&id).map_err(|x| e(&x))
            };
            let _ = reply.send(r);
        }
        Cmd::Verify { id, reply } => {
            let ids: Vec<ContentId> = match id {
                Some(id) => vec![id],
                None => ep.store.list().iter().map(|i| i.id).collect(),
            };
            let r = ids
                .into_iter()
                .map(|id| ep.store.verify(&id).map(|bad| (id, bad)))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|x| e(&x));
            let _ = reply.send(r);
        }
        Cmd::DataPath { id, reply } => {
            let r = if ep.store.is_complete(&id) {
                ep.store
                    .data_path(&id)
                    .ok_or_else(|| format!("{id} is not in the cache"))
            } else {
                Err(format!("{id} is not complete in the cache"))
            };
            let _ = reply.send(r);
        }
        Cmd::Pause(p) => mon.set_operator_paused(ep, p),
        Cmd::SetKeys(k) => ep.set_keys(k),
        Cmd::Refuse(r) => ep.server.set_refusing(r),
        Cmd::Snapshot { reply } => {
            let _ = reply.send(Ok(snapshot(ep, notes, mon, known)));
        }
        Cmd::Stop => return false,
    }
    true
}

/// Run the endpoint until [`Cmd::Stop`] or the command channel closes.
/// Fetch news (source drops) is logged; completion is read from the store.
/// The egress monitor is sampled between turns (see [`crate::monitor`]).
pub fn run(mut ep: Endpoint, mut mon: EgressWatch, rx: mpsc::Receiver<Cmd>) {
    let mut notes = Notes::default();
    let mut known = Sources::default();
    'outer: loop {
        for _ in 0..COMMANDS_PER_TURN_MAX {
            match rx.try_recv() {
                Ok(c) => {
                    if !handle(&mut ep, &notes, &mut mon, &mut known, c) {
                        break 'outer;
                    }
                }
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => break 'outer,
            }
        }
        if let Err(e) = ep.poll(mon.wait_max(POLL_WAIT)) {
            tracing::error!("engine loop: {e}");
            if e.get_ref().is_some_and(|x| x.is::<StoreError>()) {
                notes.store_errors += 1;
                notes.store_error = Some(e.to_string());
            }
        }
        mon.tick(&mut ep);
        for n in ep.take_news() {
            match n {
                FetchNews::Complete { content, sources } => {
                    known.dropped.remove(&content);
                    if known.finals.len() >= FINALS_MAX {
                        known.finals.clear();
                    }
                    known
                        .finals
                        .insert(content, sources.iter().map(|s| source_view(s, false)).collect());
                    tracing::info!("{} complete from peers", content.short())
                }
                FetchNews::SourceDropped { content, addr, reason } => {
                    tracing::warn!("peer {addr} dropped for {}: {reason}", content.short());
                    if notes.drops.len() >= DROPS_KEPT_MAX {
                        notes.drops.pop_front();
                    }
                    notes.drop_seq += 1;
                    notes.drops.push_back(Dropped {
                        seq: notes.drop_seq,
                        content,
                        addr,
                        reason: reason.to_string(),
                        refused: matches!(
                            reason,
                            DropReason::Rejected(RejectReason::Busy | RejectReason::DeviceBusy)
                        ),
                        banned: Sources::bans(&reason),
                        not_found: matches!(reason, DropReason::Rejected(RejectReason::NotFound)),
                        device_busy: matches!(reason, DropReason::Rejected(RejectReason::DeviceBusy)),
                    });
                    known.on_drop(content, addr, &reason);
                }
            }
        }
    }
    if let Err(e) = ep.flush_commits() {
        tracing::error!("flushing commits at shutdown: {e}");
    }
}

/// A handle to the engine thread.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<Cmd>,
}

impl Handle {
    pub fn new(tx: mpsc::Sender<Cmd>) -> Self {
        Self { tx }
    }

    pub fn send(&self, c: Cmd) {
        let _ = self.tx.send(c);
    }

    /// Send a command built around a reply channel and wait for the answer.
    pub async fn call<T>(&self, f: impl FnOnce(Reply<T>) -> Cmd) -> anyhow::Result<T> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(f(tx))
            .map_err(|_| anyhow::anyhow!("the engine thread stopped"))?;
        rx.await
            .map_err(|_| anyhow::anyhow!("the engine thread stopped"))?
            .map_err(anyhow::Error::msg)
    }
}
