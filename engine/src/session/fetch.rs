//! The fetching side: one content from one or more sources at once.
//!
//! # How a fetch runs
//!
//! 1. Each source gets a session: a hello `Request` (no ranges), answered by
//!    `Accept` with the server's nonce, size and completeness. Sources that do
//!    not answer after [`FetchConfig::connect_tries_max`] hellos are dropped.
//! 2. Without a block table, the first accepting source is asked for it
//!    (stream 1); it is verified against the content id before anything else
//!    is trusted. A source whose table does not verify is dropped.
//! 3. Blocks are handed out in runs to sources with room in their request
//!    window (the window is flow control: a server only sends what was
//!    requested). Every block is verified on arrival; a source that sends a
//!    bad block is dropped and the block is requested elsewhere.
//! 4. A source that sends nothing for a while loses its blocks to the others
//!    (and is dropped after [`FetchConfig::stall_strikes_max`] stalls); a
//!    block that does not arrive in time is re-requested. The fetch's last
//!    active source is not dropped for stalls alone (a WAN link flap must not
//!    lose the transfer): it is greeted again on a new session (its server may
//!    have dropped the old one), with backoff up to
//!    [`FetchConfig::probe_interval_max`], and dropped only once nothing came
//!    from it for [`FetchConfig::source_give_up`]. When every block is
//!    handed out, idle sources duplicate the oldest outstanding blocks of
//!    others (end game); the first copy to verify wins and the rest are cancelled.
//!
//! Verified blocks leave as [`Event::Block`] for the driver to store.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

use rand::{Rng, SeedableRng};

use super::Transmit;
use crate::content::{BlockTable, ContentId, Geometry, VerifyError};
use crate::ranges::{BlockSet, SpanSet};
use crate::session::serve::{REQUEST_BACKGROUND, REQUEST_BLOCKS_MAX};
use crate::time::Time;
use crate::wire::{self, DataKey, DeploymentKey, Kind, Packet, RejectReason, WireRange};

/// Bounds and knobs of a fetch.
#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// Most sources at once.
    pub sources_max: usize,
    /// Request window per source before its rate is known.
    pub window_bytes_initial: u64,
    pub window_bytes_min: u64,
    pub window_bytes_max: u64,
    /// A source's window covers this much time at its measured rate.
    pub window_time: Duration,
    /// Longest run of blocks in one requested range.
    pub run_blocks_max: u64,
    /// Acknowledge at least every this many data packets.
    pub ack_every_packets: u32,
    /// Longest an acknowledgement waits (foreground sources).
    pub ack_delay: Duration,
    /// Acknowledge a background source at least every this many data packets.
    pub ack_every_packets_background: u32,
    /// Longest an acknowledgement waits on a background source. Background
    /// sessions cross WAN links at tens of Mbit/s, where a datagram arrives
    /// every few hundred µs: with `ack_delay` nearly every datagram would be
    /// acknowledged on its own, about 5 % of the package back across the link.
    /// Stays under the `ACK_DELAY_MAX` a server allows for in its probe timeout.
    /// Together with `ack_every_packets_background` (fewer packets than the
    /// foreground's, so the scavenger still gets a delay sample every couple of
    /// ms at 50 Mbit/s) acknowledgements cost under 1 % of the package.
    pub ack_delay_background: Duration,
    pub connect_retry: Duration,
    pub connect_tries_max: u32,
    /// A source with outstanding blocks that sends nothing for this long stalls.
    pub stall_timeout: Duration,
    pub stall_strikes_max: u32,
    /// The last active source that stalls out is greeted again (new session) and kept
    /// until nothing came from it for this long, then dropped (`Stalled`).
    pub source_give_up: Duration,
    /// Longest wait between two greetings of such a source (bounds the recovery time
    /// once its link is back).
    pub probe_interval_max: Duration,
    /// Least time a requested block may take before it is requested again.
    pub block_timeout_min: Duration,
    /// How long a `NotHave` answer keeps a source from being asked for those blocks. A
    /// partial upstream (a site's RVP that is itself getting the package) answers `NotHave`
    /// at its frontier; at 2 s each hop of a chain of sites added up to 2 s at the end.
    pub not_have_retry: Duration,
    /// Largest block table accepted (bounds memory against a lying `Accept`).
    pub table_bytes_max: u64,
    /// Ask servers for the background (scavenger) protocol.
    pub background: bool,
    /// Ask servers to encrypt the data (AES-256-GCM); a source that does not agree is dropped.
    pub encrypt: bool,
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            sources_max: 32,
            window_bytes_initial: 4 << 20,
            window_bytes_min: 512 << 10,
            window_bytes_max: 32 << 20,
            window_time: Duration::from_millis(250),
            run_blocks_max: 256,
            ack_every_packets: 16,
            ack_delay: Duration::from_micros(500),
            ack_every_packets_background: 8,
            ack_delay_background: Duration::from_millis(4),
            connect_retry: Duration::from_millis(250),
            connect_tries_max: 5,
            stall_timeout: Duration::from_secs(1),
            stall_strikes_max: 3,
            source_give_up: Duration::from_secs(60),
            probe_interval_max: Duration::from_secs(1),
            block_timeout_min: Duration::from_secs(2),
            not_have_retry: Duration::from_millis(500),
            table_bytes_max: 64 << 20,
            background: false,
            encrypt: false,
        }
    }
}

/// Why a source was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DropReason {
    #[error("refused the request ({0:?})")]
    Rejected(RejectReason),
    #[error("did not answer")]
    NoAnswer,
    #[error("stopped sending")]
    Stalled,
    #[error("sent a bad block: {0}")]
    BadBlock(VerifyError),
    #[error("sent a bad block table: {0}")]
    BadTable(VerifyError),
    #[error("announced a size or block size that contradicts the verified block table")]
    WrongGeometry,
    #[error("closed the session")]
    Closed,
    #[error("did not agree to encrypt the data (encryption was asked for)")]
    NotEncrypted,
    #[error("encrypted the data although that was not asked for")]
    UnaskedEncryption,
    #[error("removed by the caller")]
    Removed,
}

/// What the driver must act on.
#[derive(Debug)]
pub enum Event {
    /// The block table is verified (first time only): persist it beside the data.
    TableVerified(BlockTable),
    /// A verified block: store it, then hand the buffer back with [`Fetch::recycle`].
    Block {
        index: u64,
        data: Vec<u8>,
        from: SocketAddr,
    },
    SourceDropped {
        addr: SocketAddr,
        reason: DropReason,
    },
    /// Every block is held.
    Complete,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting { next_try: Time, tries: u32 },
    Active,
    Gone,
}

/// Per-source figures, for status displays and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceStats {
    pub addr: SocketAddr,
    pub active: bool,
    pub payload_bytes: u64,
    pub blocks_verified: u64,
    pub outstanding_blocks: u64,
    pub rate_bytes_per_s: u64,
    /// Encrypted data datagrams whose AEAD tag failed (dropped: tampered on the path).
    pub sealed_rejected: u64,
}

#[derive(Debug)]
struct Source {
    addr: SocketAddr,
    session: u32,
    phase: Phase,
    nonce: u64,
    complete: bool,
    /// Geometry announced in the source's `Accept` (trusted only once the table verifies).
    accepted: Option<Geometry>,
    lacks: Option<BlockSet>,
    lacks_until: Time,
    outstanding: u64,
    // Acknowledgement state.
    recv_pns: SpanSet,
    largest_pn: Option<u64>,
    largest_recv: Time,
    largest_send_ts: u32,
    unacked: u32,
    ack_at: Option<Time>,
    // Liveness and rate.
    last_data: Time,
    strikes: u32,
    /// When data (or a paused server's keepalive) last came from the source.
    heard: Time,
    /// Greeted again after it stalled out as the fetch's last active source.
    probing: bool,
    /// The session it stalled on: closed once the new one is accepted (the link is back),
    /// so its server stops sending what nobody reads.
    stale_session: Option<u32>,
    payload_bytes: u64,
    blocks_verified: u64,
    rate_since: Time,
    rate_bytes: u64,
    rate: u64,
    /// Highest recent rate, halving every [`RATE_PEAK_HALF_LIFE`]: a background source's
    /// request window follows it, so a source that yielded for a while to foreground
    /// traffic has enough requested when it takes the link back (with the window at
    /// the yielded rate, it would send one window and then wait a round trip for
    /// each further request while its measured rate climbed back).
    rate_peak: u64,
    // Outgoing control.
    want_request: Vec<(u64, u32)>,
    want_cancel: Vec<(u64, u32)>,
    want_table: bool,
    want_close: bool,
    /// Ask this source for the background (scavenger) protocol.
    background: bool,
    /// Ask this source to encrypt, with this random contribution to the data key.
    encrypt: bool,
    fetch_nonce: u64,
    /// The session's data key, once the source accepted to encrypt.
    data_key: Option<DataKey>,
    sealed_rejected: u64,
}

impl Source {
    fn new(now: Time, addr: SocketAddr, session: u32, fetch_nonce: u64, background: bool, encrypt: bool) -> Self {
        Self {
            addr,
            session,
            phase: Phase::Connecting {
                next_try: now,
                tries: 0,
            },
            nonce: 0,
            complete: false,
            accepted: None,
            lacks: None,
            lacks_until: Time::ZERO,
            outstanding: 0,
            recv_pns: SpanSet::new(),
            largest_pn: None,
            largest_recv: Time::ZERO,
            largest_send_ts: 0,
            unacked: 0,
            ack_at: None,
            last_data: now,
            strikes: 0,
            heard: now,
            probing: false,
            stale_session: None,
            payload_bytes: 0,
            blocks_verified: 0,
            rate_since: now,
            rate_bytes: 0,
            rate: 0,
            rate_peak: 0,
            want_request: Vec::new(),
            want_cancel: Vec::new(),
            want_table: false,
            want_close: false,
            background,
            encrypt,
            fetch_nonce,
            data_key: None,
            sealed_rejected: 0,
        }
    }

    fn window_blocks(&self, cfg: &FetchConfig, g: &Geometry) -> u64 {
        // Only background sources yield to other traffic and come back; a foreground source
        // that slowed down keeps a window that fits its current rate.
        let rate = if self.background {
            self.rate.max(self.rate_peak)
        } else {
            self.rate
        };
        let bytes = if rate == 0 {
            cfg.window_bytes_initial
        } else {
            ((rate as f64 * cfg.window_time.as_secs_f64()) as u64).clamp(cfg.window_bytes_min, cfg.window_bytes_max)
        };
        (bytes / g.block_bytes()).max(1)
    }

    fn may_have(&self, now: Time, b: u64) -> bool {
        self.complete
            || self
                .lacks
                .as_ref()
                .is_none_or(|l| now >= self.lacks_until || !l.contains(b))
    }
}

#[derive(Debug)]
struct InFlight {
    sources: Vec<usize>,
    requested_at: Time,
}

#[derive(Debug)]
struct Pending {
    buf: Vec<u8>,
    got: SpanSet,
    received: u64,
    /// Bit i set: source i contributed bytes.
    from: u64,
}

/// Most sources: pending blocks record contributors in a 64-bit mask.
pub const SOURCES_MAX: usize = 64;
/// Most spare block buffers kept for reuse.
const SPARE_BUFFERS_MAX: usize = 256;
/// A source's peak rate, which its request window follows, halves in this long.
pub const RATE_PEAK_HALF_LIFE: Duration = Duration::from_secs(60);

/// A fetch of one content.
pub struct Fetch {
    key: DeploymentKey,
    content: ContentId,
    cfg: FetchConfig,
    table: Option<BlockTable>,
    /// Blocks held and verified.
    have: BlockSet,
    /// Blocks held or in flight: the complement is what is free to hand out.
    taken: BlockSet,
    inflight: BTreeMap<u64, InFlight>,
    pending: BTreeMap<u64, Pending>,
    table_fetch: Option<(usize, Vec<u8>, SpanSet)>,
    sources: Vec<Source>,
    events: VecDeque<Event>,
    spare: Vec<Vec<u8>>,
    /// Where an encrypted payload is decrypted (kept to reuse its allocation).
    opened: Vec<u8>,
    rng: rand::rngs::SmallRng,
    complete_sent: bool,
    next_tick: Time,
}

/// How often stall and block timers are checked.
const TICK: Duration = Duration::from_millis(20);

impl Fetch {
    /// Start a fetch. `known` is the verified block table and the blocks already held, if any.
    pub fn new(
        key: DeploymentKey,
        content: ContentId,
        cfg: FetchConfig,
        known: Option<(BlockTable, BlockSet)>,
        seed: u64,
    ) -> Self {
        let (table, have) = match known {
            Some((t, h)) => (Some(t), h),
            None => (None, BlockSet::new(0)),
        };
        let taken = have.clone();
        Self {
            key,
            content,
            cfg,
            table,
            have,
            taken,
            inflight: BTreeMap::new(),
            pending: BTreeMap::new(),
            table_fetch: None,
            sources: Vec::new(),
            events: VecDeque::new(),
            spare: Vec::new(),
            opened: Vec::new(),
            rng: rand::rngs::SmallRng::seed_from_u64(seed),
            complete_sent: false,
            next_tick: Time::ZERO,
        }
    }

    pub fn content(&self) -> ContentId {
        self.content
    }

    /// Sign what this fetch sends with `key` from now on (the deployment key was rotated).
    pub fn set_key(&mut self, key: DeploymentKey) {
        self.key = key;
    }

    pub fn table(&self) -> Option<&BlockTable> {
        self.table.as_ref()
    }

    pub fn have(&self) -> &BlockSet {
        &self.have
    }

    pub fn is_complete(&self) -> bool {
        self.table.is_some() && self.have.is_full()
    }

    /// Bytes held and verified.
    pub fn bytes_held(&self) -> u64 {
        match &self.table {
            Some(t) => {
                let g = t.geometry();
                let last = g.block_count() - 1;
                self.have.count() * g.block_bytes()
                    - if self.have.contains(last) {
                        g.block_bytes() - g.block_len(last)
                    } else {
                        0
                    }
            }
            None => 0,
        }
    }

    pub fn sources(&self) -> Vec<SourceStats> {
        self.sources
            .iter()
            .map(|s| SourceStats {
                addr: s.addr,
                active: s.phase == Phase::Active,
                payload_bytes: s.payload_bytes,
                blocks_verified: s.blocks_verified,
                outstanding_blocks: s.outstanding,
                rate_bytes_per_s: s.rate,
                sealed_rejected: s.sealed_rejected,
            })
            .collect()
    }

    /// Number of sources not dropped.
    pub fn live_sources(&self) -> usize {
        self.sources.iter().filter(|s| s.phase != Phase::Gone).count()
    }

    /// Add a source with the fetch's default protocol; returns false if it is already
    /// there or the source table is full.
    pub fn add_source(&mut self, now: Time, addr: SocketAddr) -> bool {
        self.add_source_with(now, addr, self.cfg.background)
    }

    /// Add a source, asking it for the background protocol or not (a parent site's
    /// RVP across a WAN, a same-site peer on the LAN).
    pub fn add_source_with(&mut self, now: Time, addr: SocketAddr, background: bool) -> bool {
        if self.sources.iter().any(|s| s.addr == addr && s.phase != Phase::Gone) {
            return false;
        }
        let slot = self.sources.iter().position(|s| s.phase == Phase::Gone);
        if slot.is_none() && self.sources.len() >= self.cfg.sources_max.min(SOURCES_MAX) {
            return false;
        }
        let session = self.rng.gen::<u32>() | 1;
        let fetch_nonce = self.rng.gen::<u64>();
        let src = Source::new(now, addr, session, fetch_nonce, background, self.cfg.encrypt);
        match slot {
            Some(i) => self.sources[i] = src,
            None => self.sources.push(src),
        }
        true
    }

    /// Stop using a source.
    pub fn remove_source(&mut self, addr: SocketAddr) {
        if let Some(i) = self
            .sources
            .iter()
            .position(|s| s.addr == addr && s.phase != Phase::Gone)
        {
            self.drop_source(i, DropReason::Removed);
        }
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Block `b` was verified and stored by other means (an HTTP range from the origin):
    /// stop asking sources for it.
    pub fn mark_held(&mut self, b: u64) {
        if self.table.is_none() || !self.have.insert(b) {
            return;
        }
        self.taken.insert(b);
        if let Some(p) = self.pending.remove(&b) {
            self.recycle(p.buf);
        }
        if let Some(f) = self.inflight.remove(&b) {
            for s in f.sources {
                self.sources[s].outstanding = self.sources[s].outstanding.saturating_sub(1);
                self.sources[s].want_cancel.push((b, 1));
            }
        }
    }

    /// Give a block buffer back for reuse.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        if self.spare.len() < SPARE_BUFFERS_MAX {
            self.spare.push(buf);
        }
    }

    fn source_of(&self, from: SocketAddr, session: u32) -> Option<usize> {
        self.sources
            .iter()
            .position(|s| s.session == session && s.addr == from && s.phase != Phase::Gone)
    }

    /// Handle a packet meant for the fetching side (Accept, Reject, Data, NotHave, Close)
    /// that arrived `now`.
    pub fn handle(&mut self, now: Time, from: SocketAddr, packet: &Packet<'_>) {
        self.handle_arrived(now, now, from, packet)
    }

    /// [`handle`](Self::handle) for a packet handled at `now` that arrived earlier, at
    /// `arrived` (the kernel's receive timestamp; later than `now` counts as `now`). The
    /// arrival time is what the acknowledgements report (`recv_ts_us`, and `ack_delay_us`
    /// counts from it), so a server's one-way delay and round-trip samples leave out the time
    /// this endpoint took to get round to the packet. Everything else runs on `now`.
    pub fn handle_arrived(&mut self, now: Time, arrived: Time, from: SocketAddr, packet: &Packet<'_>) {
        let arrived = arrived.min(now);
        let Some(i) = self.source_of(from, packet.session()) else {
            return;
        };
        match packet {
            Packet::Accept { fixed, .. } => self.on_accept(now, i, fixed),
            Packet::Reject { fixed, .. } => {
                self.drop_source(i, DropReason::Rejected(RejectReason::from_u8(fixed.reason)))
            }
            Packet::Data {
                fixed, header, payload, ..
            } => match &self.sources[i].data_key {
                Some(k) => {
                    let mut opened = std::mem::take(&mut self.opened);
                    match k.open(header, fixed, payload, &mut opened) {
                        Ok(()) => self.on_data(now, arrived, i, fixed, &opened),
                        Err(_) => self.sources[i].sealed_rejected += 1,
                    }
                    self.opened = opened;
                }
                // Asked for encryption, no key yet: nothing to read (and nothing sent in clear is taken).
                None if self.sources[i].encrypt => {}
                None => self.on_data(now, arrived, i, fixed, payload),
            },
            // An empty NotHave is a paused server's keepalive: alive, just not sending now.
            // Its blocks still move to other sources by the late-block timer.
            Packet::NotHave { ranges: [], .. } => {
                let s = &mut self.sources[i];
                if s.phase == Phase::Active {
                    s.last_data = now;
                    s.heard = now;
                    s.strikes = 0;
                    s.ack_at = Some(now); // and we are alive too: keeps the server's session open
                }
            }
            Packet::NotHave { fixed, ranges, .. } if fixed.stream == wire::STREAM_CONTENT => {
                self.on_not_have(now, i, ranges)
            }
            Packet::Close { .. } => self.drop_source(i, DropReason::Closed),
            _ => {}
        }
        self.schedule(now);
    }

    fn on_accept(&mut self, now: Time, i: usize, fixed: &wire::AcceptFixed) {
        if ContentId(fixed.content) != self.content {
            return;
        }
        let Ok(geometry) = Geometry::new(fixed.size.get(), fixed.block_chunks_log) else {
            self.drop_source(i, DropReason::WrongGeometry);
            return;
        };
        if let Some(t) = &self.table {
            if t.geometry() != geometry {
                self.drop_source(i, DropReason::WrongGeometry);
                return;
            }
        }
        if !matches!(self.sources[i].phase, Phase::Connecting { .. }) {
            return;
        }
        let encrypted = fixed.flags & wire::ACCEPT_ENCRYPTED != 0;
        if encrypted != self.sources[i].encrypt {
            let why = if encrypted {
                DropReason::UnaskedEncryption
            } else {
                DropReason::NotEncrypted
            };
            self.drop_source(i, why);
            return;
        }
        let s = &mut self.sources[i];
        if encrypted {
            s.data_key = Some(DataKey::derive(
                &self.key,
                s.session,
                &self.content,
                s.fetch_nonce,
                fixed.nonce.get(),
            ));
        }
        s.phase = Phase::Active;
        s.probing = false;
        s.nonce = fixed.nonce.get();
        s.complete = fixed.flags & wire::ACCEPT_COMPLETE != 0;
        s.last_data = now;
        s.rate_since = now;
        s.accepted = Some(geometry);
        if self.table.is_none() && self.table_fetch.is_none() {
            self.start_table_fetch(i);
        }
    }

    /// Ask source `i` for the block table, sized by the geometry it announced.
    fn start_table_fetch(&mut self, i: usize) {
        let Some(geometry) = self.sources[i].accepted else {
            return;
        };
        let len = 16 + 32 * geometry.block_count();
        if len > self.cfg.table_bytes_max {
            self.drop_source(i, DropReason::WrongGeometry);
            return;
        }
        self.table_fetch = Some((i, vec![0; len as usize], SpanSet::new()));
        self.sources[i].want_table = true;
    }

    fn on_not_have(&mut self, now: Time, i: usize, ranges: &[WireRange]) {
        let Some(t) = &self.table else { return };
        let count = t.geometry().block_count();
        let s = &mut self.sources[i];
        let lacks = s.lacks.get_or_insert_with(|| BlockSet::new(count));
        s.lacks_until = now + self.cfg.not_have_retry;
        let mut blocks = Vec::new();
        for r in ranges {
            let start = r.start.get().min(count);
            let end = start.saturating_add(r.count.get() as u64).min(count);
            for b in start..end {
                lacks.insert(b);
                blocks.push(b);
            }
        }
        for b in blocks {
            self.unassign(b, i);
        }
    }

    fn on_data(&mut self, now: Time, arrived: Time, i: usize, fixed: &wire::DataFixed, payload: &[u8]) {
        let pn = fixed.pn.get();
        {
            let s = &mut self.sources[i];
            if s.phase != Phase::Active {
                return;
            }
            let expected = s.largest_pn.map_or(0, |l| l + 1);
            s.recv_pns.insert(pn..pn + 1);
            if s.largest_pn.is_none_or(|l| pn > l) {
                s.largest_pn = Some(pn);
                s.largest_recv = arrived;
                s.largest_send_ts = fixed.send_ts_us.get();
            }
            s.unacked += 1;
            let (every, delay) = if s.background {
                (self.cfg.ack_every_packets_background, self.cfg.ack_delay_background)
            } else {
                (self.cfg.ack_every_packets, self.cfg.ack_delay)
            };
            if pn != expected || s.unacked >= every {
                s.ack_at = Some(now);
            } else if s.ack_at.is_none() {
                s.ack_at = Some(now + delay);
            }
            s.last_data = now;
            s.heard = now;
            s.strikes = 0;
            s.payload_bytes += payload.len() as u64;
            s.rate_bytes += payload.len() as u64;
            let dt = now.since(s.rate_since);
            if dt >= Duration::from_millis(50) {
                let sample = (s.rate_bytes as f64 / dt.as_secs_f64()) as u64;
                s.rate = if s.rate == 0 { sample } else { (s.rate * 3 + sample) / 4 };
                let decay = 0.5f64.powf(dt.as_secs_f64() / RATE_PEAK_HALF_LIFE.as_secs_f64());
                s.rate_peak = ((s.rate_peak as f64 * decay) as u64).max(s.rate);
                s.rate_since = now;
                s.rate_bytes = 0;
            }
        }
        let offset = fixed.offset.get();
        match fixed.stream {
            wire::STREAM_TABLE => self.on_table_data(i, offset, payload),
            wire::STREAM_CONTENT => self.on_content_data(i, offset, payload),
            _ => {}
        }
    }

    fn on_table_data(&mut self, i: usize, offset: u64, payload: &[u8]) {
        let Some((src, buf, got)) = &mut self.table_fetch else {
            return;
        };
        if *src != i {
            return;
        }
        let end = offset.saturating_add(payload.len() as u64);
        if end > buf.len() as u64 {
            return;
        }
        buf[offset as usize..end as usize].copy_from_slice(payload);
        got.insert(offset..end);
        if !got.covers(0..buf.len() as u64) {
            return;
        }
        let (src, buf, _) = self.table_fetch.take().expect("checked above");
        match BlockTable::decode_verified(&buf, &self.content) {
            Ok(t) => {
                let count = t.geometry().block_count();
                self.have = BlockSet::new(count);
                self.taken = BlockSet::new(count);
                self.table = Some(t.clone());
                self.events.push_back(Event::TableVerified(t));
            }
            Err(e) => self.drop_source(src, DropReason::BadTable(e)),
        }
    }

    fn on_content_data(&mut self, i: usize, offset: u64, payload: &[u8]) {
        let Some(g) = self.table.as_ref().map(|t| t.geometry()) else {
            return;
        };
        let end = offset.saturating_add(payload.len() as u64).min(g.size);
        let mut at = offset;
        while at < end {
            let b = at / g.block_bytes();
            let r = g.block_range(b);
            let piece_end = end.min(r.end);
            let piece = &payload[(at - offset) as usize..(piece_end - offset) as usize];
            if !self.have.contains(b) && self.inflight.get(&b).is_some_and(|f| f.sources.contains(&i)) {
                let block_len = (r.end - r.start) as usize;
                let spare = &mut self.spare;
                let p = self.pending.entry(b).or_insert_with(|| {
                    let mut buf = spare.pop().unwrap_or_default();
                    buf.resize(block_len, 0);
                    Pending {
                        buf,
                        got: SpanSet::new(),
                        received: 0,
                        from: 0,
                    }
                });
                let rel = (at - r.start) as usize;
                p.buf[rel..rel + piece.len()].copy_from_slice(piece);
                p.received += p.got.insert(rel as u64..(rel + piece.len()) as u64);
                p.from |= 1 << i;
                if p.received == block_len as u64 {
                    self.finish_block(b, i);
                }
            }
            at = piece_end;
        }
    }

    /// Block `b` is complete, its last bytes from source `last`: verify it.
    fn finish_block(&mut self, b: u64, last: usize) {
        let p = self.pending.remove(&b).expect("finish_block on a pending block");
        let table = self.table.as_ref().expect("blocks only arrive with a table");
        let flight = self.inflight.remove(&b);
        match table.verify_block(b, &p.buf) {
            Ok(()) => {
                self.have.insert(b);
                self.taken.insert(b);
                let from = self.sources[last].addr;
                self.sources[last].blocks_verified += 1;
                for &s in flight.iter().flat_map(|f| f.sources.iter()) {
                    self.sources[s].outstanding = self.sources[s].outstanding.saturating_sub(1);
                    if p.from & (1 << s) == 0 {
                        self.sources[s].want_cancel.push((b, 1));
                    }
                }
                self.events.push_back(Event::Block {
                    index: b,
                    data: p.buf,
                    from,
                });
            }
            Err(e) => {
                for &s in flight.iter().flat_map(|f| f.sources.iter()) {
                    self.sources[s].outstanding = self.sources[s].outstanding.saturating_sub(1);
                }
                self.taken.remove(b);
                self.recycle(p.buf);
                if p.from.count_ones() == 1 {
                    self.drop_source(p.from.trailing_zeros() as usize, DropReason::BadBlock(e));
                }
            }
        }
    }

    /// Take block `b` away from source `i` (it stalled, lacks it, or was dropped).
    fn unassign(&mut self, b: u64, i: usize) {
        let Some(f) = self.inflight.get_mut(&b) else { return };
        let Some(pos) = f.sources.iter().position(|&s| s == i) else {
            return;
        };
        f.sources.swap_remove(pos);
        self.sources[i].outstanding = self.sources[i].outstanding.saturating_sub(1);
        if f.sources.is_empty() {
            self.inflight.remove(&b);
            if !self.have.contains(b) {
                self.taken.remove(b);
            }
        }
    }

    /// Ask source `i` to forget block `b` (a Cancel goes out before any new request to it):
    /// a block taken away from a source that stalled or was late is requested again, often
    /// from the same source, and the server would otherwise send it twice.
    fn push_cancel(&mut self, i: usize, b: u64) {
        let c = &mut self.sources[i].want_cancel;
        match c.last_mut() {
            Some((s, n)) if *s + *n as u64 == b && *n < u32::MAX => *n += 1,
            _ => c.push((b, 1)),
        }
    }

    /// The blocks source `i` was asked for and has not delivered.
    fn inflight_at(&self, i: usize) -> Vec<u64> {
        self.inflight
            .iter()
            .filter(|(_, f)| f.sources.contains(&i))
            .map(|(b, _)| *b)
            .collect()
    }

    /// Cancel at source `i` every block it was asked for and has not delivered.
    fn cancel_all(&mut self, i: usize) {
        for b in self.inflight_at(i) {
            self.push_cancel(i, b);
        }
    }

    /// Take every block away from source `i`.
    fn unassign_all(&mut self, i: usize) {
        for b in self.inflight_at(i) {
            self.unassign(b, i);
        }
    }

    fn drop_source(&mut self, i: usize, reason: DropReason) {
        if self.sources[i].phase == Phase::Gone {
            return;
        }
        self.unassign_all(i);
        // Partial blocks that hold bytes from this source are suspect.
        let bit = 1u64 << i;
        let suspect: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.from & bit != 0)
            .map(|(b, _)| *b)
            .collect();
        for b in suspect {
            if let Some(p) = self.pending.remove(&b) {
                self.recycle(p.buf);
            }
        }
        if let Some((src, _, _)) = &self.table_fetch {
            if *src == i {
                self.table_fetch = None;
            }
        }
        let s = &mut self.sources[i];
        s.phase = Phase::Gone;
        s.outstanding = 0;
        s.want_request.clear();
        s.want_cancel.clear();
        s.want_table = false;
        s.want_close = true;
        self.events.push_back(Event::SourceDropped { addr: s.addr, reason });
    }

    /// Source `i`, the fetch's last active one, stalled out: greet it again on a new session
    /// (its server may have dropped the old one; what the old one still sends is ignored) and
    /// keep greeting with backoff until it answers or [`FetchConfig::source_give_up`] passed.
    /// Its blocks go back to the free pool; what arrived of them stays pending.
    fn greet_again(&mut self, now: Time, i: usize) {
        self.unassign_all(i);
        if self.table_fetch.as_ref().is_some_and(|(src, _, _)| *src == i) {
            self.table_fetch = None; // asked again once a source accepts
        }
        let session = self.rng.gen::<u32>() | 1;
        let fetch_nonce = self.rng.gen::<u64>();
        let old = &self.sources[i];
        let mut s = Source::new(now, old.addr, session, fetch_nonce, old.background, old.encrypt);
        s.heard = old.heard;
        s.probing = true;
        s.stale_session = Some(old.session);
        s.payload_bytes = old.payload_bytes;
        s.blocks_verified = old.blocks_verified;
        s.sealed_rejected = old.sealed_rejected;
        self.sources[i] = s;
    }

    /// Hand out free blocks to sources with room in their window.
    fn schedule(&mut self, now: Time) {
        if self.table.is_none() {
            if self.table_fetch.is_none() {
                // No table yet and nobody asked for it (its source was dropped): ask the next active source.
                if let Some(i) = self
                    .sources
                    .iter()
                    .position(|s| s.phase == Phase::Active && s.accepted.is_some())
                {
                    self.start_table_fetch(i);
                }
            }
            return;
        }
        if self.is_complete() {
            if !self.complete_sent {
                self.complete_sent = true;
                self.events.push_back(Event::Complete);
                for s in self.sources.iter_mut().filter(|s| s.phase != Phase::Gone) {
                    s.phase = Phase::Gone;
                    s.want_close = true;
                }
            }
            return;
        }
        let g = self.table.as_ref().expect("checked").geometry();
        let count = g.block_count();
        for i in 0..self.sources.len() {
            if self.sources[i].phase != Phase::Active {
                continue;
            }
            let window = self.sources[i].window_blocks(&self.cfg, &g).min(REQUEST_BLOCKS_MAX);
            let mut room = window.saturating_sub(self.sources[i].outstanding);
            // Only top up when a useful amount is free, so requests carry long runs.
            if room < (window / 4).max(1) {
                continue;
            }
            let mut runs: Vec<(u64, u32)> = Vec::new();
            let mut at = 0;
            while room > 0 && runs.len() < wire::RANGES_MAX {
                let Some(b) = self.taken.next_missing(at) else { break };
                if !self.sources[i].may_have(now, b) {
                    at = b + 1;
                    continue;
                }
                let mut end = b;
                while end < count
                    && end - b < room.min(self.cfg.run_blocks_max)
                    && !self.taken.contains(end)
                    && self.sources[i].may_have(now, end)
                {
                    end += 1;
                }
                for blk in b..end {
                    self.taken.insert(blk);
                    self.inflight.insert(
                        blk,
                        InFlight {
                            sources: vec![i],
                            requested_at: now,
                        },
                    );
                }
                room -= end - b;
                runs.push((b, (end - b) as u32));
                at = end;
            }
            // End game: nothing free, so duplicate the oldest blocks that only one other source has.
            if runs.is_empty() && self.sources[i].outstanding == 0 {
                let dup: Vec<u64> = self
                    .inflight
                    .iter()
                    .filter(|(b, f)| f.sources.len() == 1 && f.sources[0] != i && self.sources[i].may_have(now, **b))
                    .map(|(b, _)| *b)
                    .take(room.min(self.cfg.run_blocks_max) as usize)
                    .collect();
                for b in dup {
                    let extends = runs.last().is_some_and(|(s, c)| s + *c as u64 == b);
                    if extends {
                        runs.last_mut().expect("checked").1 += 1;
                    } else if runs.len() < wire::RANGES_MAX {
                        runs.push((b, 1));
                    } else {
                        break;
                    }
                    self.inflight.get_mut(&b).expect("listed above").sources.push(i);
                }
            }
            let added: u64 = runs.iter().map(|(_, c)| *c as u64).sum();
            self.sources[i].outstanding += added;
            self.sources[i].want_request.extend(runs);
        }
    }

    /// Write the next control datagram (hello, request, cancel, ack, close) into `buf`.
    pub fn poll_transmit(&mut self, now: Time, buf: &mut [u8]) -> Option<Transmit> {
        for s in self.sources.iter_mut() {
            let request = |buf: &mut [u8], s: &Source, stream: u8, ranges: &[WireRange], window: u64| {
                let mut flags = if s.background { REQUEST_BACKGROUND } else { 0 };
                if s.encrypt {
                    flags |= wire::REQUEST_ENCRYPT;
                }
                let f = wire::RequestFixed {
                    content: self.content.0,
                    nonce_echo: s.nonce.into(),
                    fetch_nonce: s.fetch_nonce.into(),
                    window_bytes: (window.min(u32::MAX as u64) as u32).into(),
                    stream,
                    flags,
                    range_count: 0.into(),
                };
                wire::encode_request(&self.key, buf, s.session, &f, ranges)
            };
            if s.want_close {
                s.want_close = false;
                let n = wire::encode_close(&self.key, buf, s.session, 0);
                return Some(Transmit::single(s.addr, n));
            }
            match s.phase {
                Phase::Connecting { next_try, tries } if next_try <= now => {
                    // Hello: a request without ranges. Sent again with backoff until accepted.
                    let n = request(buf, s, wire::STREAM_CONTENT, &[], self.cfg.window_bytes_initial);
                    let mut backoff = self.cfg.connect_retry * 2u32.pow(tries.min(10));
                    if s.probing {
                        backoff = backoff.min(self.cfg.probe_interval_max);
                    }
                    s.phase = Phase::Connecting {
                        next_try: now + backoff,
                        tries: tries + 1,
                    };
                    return Some(Transmit::single(s.addr, n));
                }
                Phase::Active => {}
                _ => continue,
            }
            if let Some(old) = s.stale_session.take() {
                let n = wire::encode_close(&self.key, buf, old, 0);
                return Some(Transmit::single(s.addr, n));
            }
            if s.ack_at.is_some_and(|t| t <= now) {
                s.ack_at = None;
                s.unacked = 0;
                let largest = s.largest_pn.unwrap_or(0);
                let ranges: Vec<WireRange> = s
                    .recv_pns
                    .iter()
                    .rev()
                    .take(wire::RANGES_MAX)
                    .map(|r| WireRange {
                        start: r.start.into(),
                        count: ((r.end - r.start).min(u32::MAX as u64) as u32).into(),
                    })
                    .collect();
                let f = wire::AckFixed {
                    nonce_echo: s.nonce.into(),
                    largest: largest.into(),
                    ack_delay_us: (now.since(s.largest_recv).as_micros() as u32).into(),
                    echo_send_ts_us: s.largest_send_ts.into(),
                    recv_ts_us: s.largest_recv.wire_us().into(),
                    range_count: 0.into(),
                    reserved: [0; 2],
                };
                let n = wire::encode_ack(&self.key, buf, s.session, &f, &ranges);
                return Some(Transmit::single(s.addr, n));
            }
            if s.want_table {
                s.want_table = false;
                let n = request(buf, s, wire::STREAM_TABLE, &[], self.cfg.window_bytes_initial);
                return Some(Transmit::single(s.addr, n));
            }
            if !s.want_cancel.is_empty() {
                let take = s.want_cancel.len().min(wire::RANGES_MAX);
                let ranges = wire::wire_ranges(s.want_cancel.drain(..take));
                let n = wire::encode_ranges(&self.key, buf, Kind::Cancel, s.session, wire::STREAM_CONTENT, &ranges);
                return Some(Transmit::single(s.addr, n));
            }
            if !s.want_request.is_empty() {
                let take = s.want_request.len().min(wire::RANGES_MAX);
                let ranges = wire::wire_ranges(s.want_request.drain(..take));
                let n = request(buf, s, wire::STREAM_CONTENT, &ranges, self.cfg.window_bytes_max);
                return Some(Transmit::single(s.addr, n));
            }
        }
        None
    }

    pub fn poll_timeout(&self) -> Option<Time> {
        let mut t: Option<Time> = None;
        let mut at = |x: Time| t = Some(t.map_or(x, |t| t.min(x)));
        for s in &self.sources {
            match s.phase {
                Phase::Connecting { next_try, .. } => at(next_try),
                Phase::Active => {
                    if let Some(a) = s.ack_at {
                        at(a);
                    }
                }
                Phase::Gone => {}
            }
        }
        if !self.inflight.is_empty() || self.sources.iter().any(|s| s.phase == Phase::Active) {
            at(self.next_tick);
        }
        t
    }

    pub fn handle_timeout(&mut self, now: Time) {
        for i in 0..self.sources.len() {
            if let Phase::Connecting { tries, next_try } = self.sources[i].phase {
                let s = &self.sources[i];
                if s.probing {
                    if now.since(s.heard) >= self.cfg.source_give_up {
                        self.drop_source(i, DropReason::Stalled);
                    }
                } else if tries >= self.cfg.connect_tries_max && next_try <= now {
                    self.drop_source(i, DropReason::NoAnswer);
                }
            }
        }
        if now >= self.next_tick {
            self.next_tick = now + TICK;
            self.check_stalls(now);
        }
        self.schedule(now);
    }

    fn check_stalls(&mut self, now: Time) {
        let block_bytes = self.table.as_ref().map(|t| t.geometry().block_bytes()).unwrap_or(1);
        for i in 0..self.sources.len() {
            let s = &self.sources[i];
            let waiting = s.outstanding > 0 || self.table_fetch.as_ref().is_some_and(|(src, _, _)| *src == i);
            if s.phase != Phase::Active || !waiting || now.since(s.last_data) < self.cfg.stall_timeout {
                continue;
            }
            let strikes = s.strikes + 1;
            if strikes >= self.cfg.stall_strikes_max {
                let others = (0..self.sources.len()).any(|j| j != i && self.sources[j].phase == Phase::Active);
                if others || now.since(s.heard) >= self.cfg.source_give_up {
                    self.drop_source(i, DropReason::Stalled);
                } else {
                    self.greet_again(now, i);
                }
                continue;
            }
            self.sources[i].strikes = strikes;
            self.sources[i].last_data = now;
            self.cancel_all(i);
            self.unassign_all(i);
            if self.table_fetch.as_ref().is_some_and(|(src, _, _)| *src == i) {
                self.sources[i].want_table = true; // the table request or its data was lost: ask again
            }
        }
        // Blocks that take far longer than the source's rate explains are requested again.
        let late: Vec<(u64, usize)> = self
            .inflight
            .iter()
            .flat_map(|(b, f)| f.sources.iter().map(move |s| (*b, *s, f.requested_at)))
            .filter(|(_, s, at)| {
                let src = &self.sources[*s];
                let drain = if src.rate > 0 {
                    Duration::from_secs_f64((src.outstanding * block_bytes) as f64 / src.rate as f64 * 2.0)
                } else {
                    Duration::ZERO
                };
                now.since(*at) > self.cfg.block_timeout_min.max(drain)
            })
            .map(|(b, s, _)| (b, s))
            .collect();
        for (b, s) in late {
            self.push_cancel(s, b);
            self.unassign(b, s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{decode, DeploymentKey, Packet};

    #[test]
    fn fetch_asks_each_source_for_its_own_protocol() {
        let key = DeploymentKey::derive(b"t");
        let mut f = Fetch::new(key.clone(), ContentId::of(b"x"), FetchConfig::default(), None, 1);
        let wan: SocketAddr = "10.0.0.1:1".parse().unwrap();
        let lan: SocketAddr = "10.0.0.2:1".parse().unwrap();
        assert!(f.add_source_with(Time(0), wan, true));
        assert!(f.add_source_with(Time(0), lan, false));
        let mut buf = vec![0u8; 2048];
        let mut seen = Vec::new();
        while let Some(t) = f.poll_transmit(Time(0), &mut buf) {
            match decode(&key, &buf[..t.len]).unwrap() {
                Packet::Request { fixed, .. } => seen.push((t.dst, fixed.flags & REQUEST_BACKGROUND != 0)),
                p => panic!("{p:?}"),
            }
        }
        seen.sort();
        assert_eq!(seen, vec![(wan, true), (lan, false)]);
    }

    /// The header of the first data datagram of a session (the block table's first bytes).
    fn first_table_datagram(send_ts_us: u32) -> wire::DataFixed {
        wire::DataFixed {
            pn: 0.into(),
            offset: 0.into(),
            send_ts_us: send_ts_us.into(),
            stream: wire::STREAM_TABLE,
            reserved: [0; 3],
        }
    }

    /// The Accept a server would send for `f`'s only source, with `flags`.
    fn accept_for(f: &mut Fetch, key: &DeploymentKey, flags: u8) -> (SocketAddr, Vec<u8>) {
        let mut buf = vec![0u8; 2048];
        let t = f.poll_transmit(Time(0), &mut buf).unwrap();
        let session = match decode(key, &buf[..t.len]).unwrap() {
            Packet::Request { session, .. } => session,
            p => panic!("{p:?}"),
        };
        let a = wire::AcceptFixed {
            content: f.content().0,
            nonce: 99.into(),
            size: 4096.into(),
            block_chunks_log: 4,
            flags,
            payload_max: 1400.into(),
            reserved: [0; 4],
        };
        let n = wire::encode_accept(key, &mut buf, session, &a);
        (t.dst, buf[..n].to_vec())
    }

    #[test]
    fn fetch_uses_a_source_only_when_encryption_was_negotiated() {
        let key = DeploymentKey::derive(b"t");
        let src: SocketAddr = "10.0.0.1:1".parse().unwrap();
        for (asked, answered, drop) in [
            (true, 0, Some(DropReason::NotEncrypted)),
            (false, wire::ACCEPT_ENCRYPTED, Some(DropReason::UnaskedEncryption)),
            (true, wire::ACCEPT_ENCRYPTED, None),
            (false, 0, None),
        ] {
            let cfg = FetchConfig {
                encrypt: asked,
                ..FetchConfig::default()
            };
            let mut f = Fetch::new(key.clone(), ContentId::of(b"x"), cfg, None, 1);
            f.add_source(Time(0), src);
            let (to, accept) = accept_for(&mut f, &key, answered);
            assert_eq!(to, src);
            f.handle(Time(1), src, &decode(&key, &accept).unwrap());
            let mut drops = Vec::new();
            while let Some(e) = f.poll_event() {
                if let Event::SourceDropped { reason, .. } = e {
                    drops.push(reason);
                }
            }
            assert_eq!(
                drops,
                drop.into_iter().collect::<Vec<_>>(),
                "asked {asked} answered {answered}"
            );
        }
    }

    #[test]
    fn fetch_drops_and_counts_data_not_sealed_under_its_session_key() {
        let key = DeploymentKey::derive(b"t");
        let src: SocketAddr = "10.0.0.1:1".parse().unwrap();
        let cfg = FetchConfig {
            encrypt: true,
            ..FetchConfig::default()
        };
        let mut f = Fetch::new(key.clone(), ContentId::of(b"x"), cfg, None, 1);
        f.add_source(Time(0), src);
        let (_, accept) = accept_for(&mut f, &key, wire::ACCEPT_ENCRYPTED);
        f.handle(Time(1), src, &decode(&key, &accept).unwrap());
        let session = f.sources[0].session;
        let mut buf = vec![0u8; 2048];
        let fixed = first_table_datagram(0);
        // In clear, then sealed under another session's key: both refused and counted.
        let n = wire::seal_data(&key, &mut buf, session, &fixed, 100);
        f.handle(Time(2), src, &decode(&key, &buf[..n]).unwrap());
        let other = DataKey::derive(&key, session, &f.content(), 1, 2);
        let n = wire::seal_data(&key, &mut buf, session, &fixed, 100);
        let n2 = other.seal(&mut buf, n - wire::DATA_HEADER_BYTES);
        f.handle(Time(3), src, &decode(&key, &buf[..n2]).unwrap());
        let st = f.sources();
        assert_eq!(st[0].sealed_rejected, 2, "{st:?}");
        assert_eq!(st[0].payload_bytes, 0, "nothing refused was taken: {st:?}");
    }

    /// Issue 6: a source that stalls gets its blocks requested again, and the server must not
    /// send them twice: the blocks taken away are cancelled at that source before the new request.
    #[test]
    fn fetch_cancels_blocks_taken_from_a_stalled_source_before_asking_again() {
        let key = DeploymentKey::derive(b"t");
        let data: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
        let table = BlockTable::from_bytes(&data, 0); // 1 KiB blocks
        let count = table.geometry().block_count();
        let mut f = Fetch::new(
            key.clone(),
            table.root(),
            FetchConfig::default(),
            Some((table, BlockSet::new(count))),
            1,
        );
        let src: SocketAddr = "10.0.0.1:1".parse().unwrap();
        f.add_source(Time(0), src);
        let mut buf = vec![0u8; 2048];
        let t = f.poll_transmit(Time(0), &mut buf).unwrap();
        let session = match decode(&key, &buf[..t.len]).unwrap() {
            Packet::Request { session, .. } => session,
            p => panic!("{p:?}"),
        };
        let a = wire::AcceptFixed {
            content: f.content().0,
            nonce: 99.into(),
            size: (data.len() as u64).into(),
            block_chunks_log: 0,
            flags: wire::ACCEPT_COMPLETE,
            payload_max: 1400.into(),
            reserved: [0; 4],
        };
        let n = wire::encode_accept(&key, &mut buf, session, &a);
        f.handle(Time(1), src, &decode(&key, &buf[..n]).unwrap());
        // Every control datagram now: (kind, blocks named).
        let drain = |f: &mut Fetch, now: Time| {
            let mut buf = vec![0u8; 2048];
            let mut out = Vec::new();
            while let Some(t) = f.poll_transmit(now, &mut buf) {
                match decode(&key, &buf[..t.len]).unwrap() {
                    Packet::Request { ranges, .. } => {
                        out.push(("request", ranges.iter().map(|r| r.count.get() as u64).sum::<u64>()))
                    }
                    Packet::Cancel { ranges, .. } => {
                        out.push(("cancel", ranges.iter().map(|r| r.count.get() as u64).sum::<u64>()))
                    }
                    _ => {}
                }
            }
            out
        };
        let first = drain(&mut f, Time(2));
        assert_eq!(first, vec![("request", count)], "the whole content asked for at once");
        // Nothing arrives for longer than the stall timeout.
        let later = Time(2) + f.cfg.stall_timeout + Duration::from_millis(200);
        f.handle_timeout(later);
        let again = drain(&mut f, later);
        assert_eq!(
            again,
            vec![("cancel", count), ("request", count)],
            "the stalled blocks are cancelled before they are asked for again"
        );
    }

    /// Issue 4 (DESIGN.md property 3): the acknowledgement reports when the datagram arrived
    /// (the kernel's timestamp the driver hands in), not when the fetcher got round to it, so
    /// the server's one-way delay (`recv_ts_us - echo_send_ts_us`) leaves out the fetcher's own
    /// scheduling delay and its round trip subtracts it with `ack_delay_us`.
    #[test]
    fn fetch_acknowledges_with_the_arrival_time_not_the_handling_time() {
        let key = DeploymentKey::derive(b"t");
        let src: SocketAddr = "10.0.0.1:1".parse().unwrap();
        let mut f = Fetch::new(key.clone(), ContentId::of(b"x"), FetchConfig::default(), None, 1);
        f.add_source_with(Time(0), src, true);
        let (_, accept) = accept_for(&mut f, &key, 0);
        f.handle(Time(1), src, &decode(&key, &accept).unwrap());
        let session = f.sources[0].session;
        let mut buf = vec![0u8; 2048];
        let fixed = first_table_datagram(4_000);
        let n = wire::seal_data(&key, &mut buf, session, &fixed, 16);
        // Arrived at 10 ms, handled at 35 ms (the fetcher was busy), acknowledged at 40 ms.
        let (arrived, handled, acked) = (Time(10_000), Time(35_000), Time(40_000));
        f.handle_arrived(handled, arrived, src, &decode(&key, &buf[..n]).unwrap());
        let mut ack = None;
        while let Some(t) = f.poll_transmit(acked, &mut buf) {
            if let Packet::Ack { fixed, .. } = decode(&key, &buf[..t.len]).unwrap() {
                ack = Some(*fixed);
            }
        }
        let ack = ack.expect("an acknowledgement of the data");
        assert_eq!(ack.echo_send_ts_us.get(), 4_000);
        assert_eq!(
            ack.recv_ts_us.get(),
            arrived.wire_us(),
            "recv_ts_us is the arrival time"
        );
        assert_eq!(ack.ack_delay_us.get(), 30_000, "ack_delay_us counts from the arrival");
        // An arrival later than the handling time (a clock mishap) counts as the handling time.
        let fixed = wire::DataFixed { pn: 1.into(), ..fixed };
        let n = wire::seal_data(&key, &mut buf, session, &fixed, 16);
        f.handle_arrived(Time(50_000), Time(90_000), src, &decode(&key, &buf[..n]).unwrap());
        assert_eq!(f.sources[0].largest_recv, Time(50_000));
    }
}
