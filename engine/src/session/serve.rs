//! The serving side: answers fetchers' requests with data.
//!
//! A session starts when a fetcher's first `Request` names content this
//! server holds; the server answers `Accept` with a random nonce and sends no
//! data until the fetcher echoes it (address validation, see [`crate::wire`]).
//! Requested block ranges are queued; blocks the server does not hold are
//! answered with `NotHave`. Data leaves in GSO-sized runs of equal datagrams,
//! as far as the session's congestion window, its pacer and the fetcher's
//! requests allow. Lost data goes to the front of the queue.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};

use super::pacer::Pacer;
use super::recovery::{Recovery, PERSISTENT_PTO_COUNT};
use super::{Library, Transmit, GSO_SEGMENTS_MAX, PAYLOAD_BYTES_DEFAULT};
use crate::cc::background::BackgroundConfig;
use crate::cc::foreground::Foreground;
use crate::cc::group::Groups;
use crate::cc::{AckSample, Controller, LossSample};
use crate::content::{ContentId, Geometry};
use crate::time::Time;
use crate::wire::{
    self, DataKey, DeploymentKey, Kind, Packet, RejectReason, WireRange, AEAD_TAG_BYTES, DATA_HEADER_BYTES,
};

/// Builds a controller for a new session; `background` is the fetcher's request flag.
pub type ControllerFactory = Arc<dyn Fn(bool) -> Box<dyn Controller> + Send + Sync>;

/// While background sessions are paused, each gets an empty `NotHave` this often,
/// so its fetcher knows the server is alive and does not drop it as stalled.
pub const PAUSED_KEEPALIVE: Duration = Duration::from_millis(500);

/// Most blocks one request may name; the rest of it is ignored.
pub const REQUEST_BLOCKS_MAX: u64 = 8192;

pub use crate::wire::REQUEST_BACKGROUND;

/// Bounds and knobs of a server.
#[derive(Clone)]
pub struct ServerConfig {
    /// Payload bytes per data datagram.
    pub payload_bytes: usize,
    /// Most concurrent sessions; further requests get `Reject(Busy)` (`Reject(DeviceBusy)`
    /// when 0: the device serves nobody).
    pub sessions_max: usize,
    /// Most queued ranges per session; a request beyond it is ignored (the fetcher re-requests).
    pub queue_ranges_max: usize,
    /// Most queued control packets; beyond it new ones are dropped (the peer retries).
    pub control_queue_max: usize,
    /// A session with no packet from its fetcher for this long is dropped.
    pub idle_timeout: Duration,
    /// Consecutive probe timeouts after which a session is dropped.
    pub pto_count_max: u32,
    /// Pacer bucket, as time at the pacing rate.
    pub pacing_burst: Duration,
    /// Most datagrams per GSO run.
    pub gso_segments_max: usize,
    /// Serve encrypted sessions only: a request that does not ask for encryption is refused.
    pub require_encryption: bool,
    /// Upload rate of all sessions together, bytes a second on the wire (0: no cap).
    pub upload_bytes_per_sec_max: u64,
    /// Controllers for new sessions; `None`: the default, a background session's share of
    /// its LAN's group ([`crate::cc::group`], one group set per server) or a foreground one.
    pub controller: Option<ControllerFactory>,
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("payload_bytes", &self.payload_bytes)
            .field("sessions_max", &self.sessions_max)
            .finish_non_exhaustive()
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            payload_bytes: PAYLOAD_BYTES_DEFAULT,
            sessions_max: 256,
            queue_ranges_max: 4096,
            control_queue_max: 1024,
            idle_timeout: Duration::from_secs(10),
            pto_count_max: 10,
            pacing_burst: Duration::from_millis(1),
            gso_segments_max: GSO_SEGMENTS_MAX,
            require_encryption: false,
            upload_bytes_per_sec_max: 0,
            controller: None,
        }
    }
}

/// Counters of a server since it started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerStats {
    pub packets_sent: u64,
    pub payload_bytes_sent: u64,
    pub payload_bytes_resent: u64,
    pub sessions_opened: u64,
    pub sessions_dropped_idle: u64,
    pub requests_rejected: u64,
    /// Requests refused and sessions ended while the device refused to serve.
    pub requests_refused: u64,
    pub read_errors: u64,
}

struct Session {
    peer: SocketAddr,
    id: u32,
    /// The deployment key the fetcher's request verified with: every answer uses it, so a
    /// fetcher that has not learnt a rotated key yet is still served (see [`wire::Keys`]).
    key: DeploymentKey,
    /// The fetcher asked for encryption: every data payload is sealed with this.
    data_key: Option<DataKey>,
    content: ContentId,
    geometry: Geometry,
    nonce: u64,
    validated: bool,
    /// Retransmissions first, then new data: (stream, byte range).
    resend: VecDeque<(u8, Range<u64>)>,
    queue: VecDeque<(u8, Range<u64>)>,
    recovery: Recovery,
    cc: Box<dyn Controller>,
    pacer: Pacer,
    last_recv: Time,
    app_limited: bool,
    dead: bool,
    /// Probe datagrams that may go out past the congestion window (after a probe timeout).
    probes: u32,
    background: bool,
    /// Last keepalive sent while background sessions are paused.
    last_keepalive: Time,
}

impl Session {
    fn has_data(&self) -> bool {
        self.validated && !self.dead && (!self.resend.is_empty() || !self.queue.is_empty())
    }

    fn may_send(&self, background_paused: bool) -> bool {
        self.has_data() && !(self.background && background_paused)
    }

    /// Next chunk of at most `max` bytes, taken from the front of the resend or send queue.
    fn take_chunk(&mut self, max: u64) -> Option<(u8, Range<u64>, bool)> {
        let (q, resent) = if !self.resend.is_empty() {
            (&mut self.resend, true)
        } else {
            (&mut self.queue, false)
        };
        let (stream, r) = q.front_mut()?;
        let stream = *stream;
        let end = (r.start + max).min(r.end);
        let chunk = r.start..end;
        r.start = end;
        if r.is_empty() {
            q.pop_front();
        }
        Some((stream, chunk, resent))
    }

    /// Put an unsent chunk back at the front.
    fn untake(&mut self, stream: u8, chunk: Range<u64>, resent: bool) {
        let q = if resent { &mut self.resend } else { &mut self.queue };
        match q.front_mut() {
            Some((s, r)) if *s == stream && r.start == chunk.end => r.start = chunk.start,
            _ => q.push_front((stream, chunk)),
        }
    }

    fn pacing_rate(&self) -> Option<u64> {
        self.cc.pacing_rate(self.recovery.srtt)
    }

    /// Bytes a datagram carries beyond header and payload (the AEAD tag when encrypted).
    fn seal_overhead(&self) -> usize {
        if self.data_key.is_some() {
            AEAD_TAG_BYTES
        } else {
            0
        }
    }

    fn accept_flags(&self, complete: bool) -> u8 {
        let mut f = if complete { wire::ACCEPT_COMPLETE } else { 0 };
        if self.data_key.is_some() {
            f |= wire::ACCEPT_ENCRYPTED;
        }
        f
    }
}

/// The serving endpoint.
pub struct Server {
    key: DeploymentKey,
    config: ServerConfig,
    sessions: Vec<Session>,
    control: VecDeque<(SocketAddr, Vec<u8>)>,
    rr: usize,
    rng: rand::rngs::SmallRng,
    stats: ServerStats,
    background_paused: bool,
    /// The device refuses to serve: every request gets `Reject(DeviceBusy)`.
    refusing: bool,
    /// Shared bucket of all sessions when `upload_bytes_per_sec_max` is set.
    upload: Pacer,
    /// Chunks of the GSO run being built (kept to reuse its allocation).
    plan: Vec<(u8, Range<u64>, bool)>,
    /// Background sessions by LAN, each group sharing one controller.
    groups: Groups,
}

impl Server {
    /// `seed` makes nonces reproducible in simulation; drivers pass a random one.
    pub fn new(key: DeploymentKey, config: ServerConfig, seed: u64) -> Self {
        Self {
            key,
            config,
            sessions: Vec::new(),
            control: VecDeque::new(),
            rr: 0,
            rng: rand::rngs::SmallRng::seed_from_u64(seed),
            stats: ServerStats::default(),
            background_paused: false,
            refusing: false,
            upload: Pacer::new(),
            plan: Vec::with_capacity(GSO_SEGMENTS_MAX),
            groups: Groups::new(BackgroundConfig::default()),
        }
    }

    /// A controller for a new session to `peer`: the configured factory's, or by default a
    /// background session's share of its LAN's group (a sender's sessions toward one LAN
    /// cross one bottleneck: with a controller each, they yielded to each other's queue).
    fn controller(&self, background: bool, peer: SocketAddr) -> Box<dyn Controller> {
        match &self.config.controller {
            Some(factory) => factory(background),
            None if background => Box::new(self.groups.member(peer.ip())),
            None => Box::new(Foreground::new()),
        }
    }

    /// Pause or resume every background session (the network is busy, or outside the schedule).
    /// Paused sessions keep their state and acknowledgements; they only stop sending data.
    pub fn set_background_paused(&mut self, paused: bool) {
        self.background_paused = paused;
    }

    pub fn background_paused(&self) -> bool {
        self.background_paused
    }

    /// Refuse to serve (the device is busy or on battery) or serve again.
    /// Refusing ends every session with `Reject(DeviceBusy)`, so its fetcher
    /// drops this server at once and fetches elsewhere; new requests get the same.
    pub fn set_refusing(&mut self, refusing: bool) {
        self.refusing = refusing;
        if !refusing {
            return;
        }
        let mut buf = [0u8; 256];
        for s in std::mem::take(&mut self.sessions) {
            let n = wire::encode_reject(&s.key, &mut buf, s.id, &s.content, RejectReason::DeviceBusy);
            self.stats.requests_refused += 1;
            self.push_control(s.peer, buf[..n].to_vec());
        }
        self.rr = 0;
    }

    pub fn refusing(&self) -> bool {
        self.refusing
    }

    /// Upload cap tokens: at least a full GSO run, or 10 ms at the cap.
    fn upload_burst(&self, full: u64) -> u64 {
        (self.config.upload_bytes_per_sec_max / 100).max(full * self.config.gso_segments_max as u64)
    }

    /// Hand the egress monitor's view of the local interface to every background session.
    pub fn on_path_signal(&mut self, now: Time, signal: &crate::cc::background::PathSignal) {
        for s in self.sessions.iter_mut().filter(|s| s.background) {
            s.cc.on_path(now, signal);
        }
    }

    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// The key new sessions are answered with unless their request came under another
    /// (after a rotation, the endpoint also accepts the previous key).
    pub fn set_key(&mut self, key: DeploymentKey) {
        self.key = key;
    }

    /// Handle a packet meant for the serving side (Request, Ack, Cancel, Close). Others are ignored.
    pub fn handle(&mut self, now: Time, from: SocketAddr, packet: &Packet<'_>, lib: &dyn Library) {
        let key = self.key.clone();
        self.handle_keyed(now, from, packet, lib, &key)
    }

    /// [`handle`](Self::handle) for a packet that verified under `key`; a new session is
    /// answered under the same key.
    pub fn handle_keyed(
        &mut self,
        now: Time,
        from: SocketAddr,
        packet: &Packet<'_>,
        lib: &dyn Library,
        key: &DeploymentKey,
    ) {
        self.handle_arrived(now, now, from, packet, lib, key)
    }

    /// [`handle_keyed`](Self::handle_keyed) for a packet handled at `now` that arrived
    /// earlier, at `arrived` (the kernel's receive timestamp; later than `now` counts as
    /// `now`). An acknowledgement's round-trip sample and loss detection run on its arrival
    /// time, so they leave out the time this endpoint took to get round to it; everything
    /// else (the controller's clock, timers) runs on `now`.
    pub fn handle_arrived(
        &mut self,
        now: Time,
        arrived: Time,
        from: SocketAddr,
        packet: &Packet<'_>,
        lib: &dyn Library,
        key: &DeploymentKey,
    ) {
        let arrived = arrived.min(now);
        match packet {
            Packet::Request { session, fixed, ranges } => self.on_request(now, from, *session, fixed, ranges, lib, key),
            Packet::Ack { session, fixed, ranges } => {
                if let Some(s) = self.find(from, *session) {
                    s.last_recv = now;
                    if fixed.nonce_echo.get() == s.nonce {
                        s.validated = true;
                    }
                    Self::on_ack(now, arrived, s, fixed, ranges);
                }
            }
            Packet::Cancel { session, fixed, ranges } => {
                if let Some(s) = self.find(from, *session) {
                    s.last_recv = now;
                    if fixed.stream == wire::STREAM_CONTENT {
                        let g = s.geometry;
                        for r in ranges.iter() {
                            let bytes = byte_range(&g, r);
                            remove_range(&mut s.queue, &bytes);
                            remove_range(&mut s.resend, &bytes);
                        }
                    }
                }
            }
            Packet::Close { session, .. } => {
                self.sessions.retain(|s| !(s.peer == from && s.id == *session));
            }
            _ => {}
        }
    }

    fn find(&mut self, from: SocketAddr, id: u32) -> Option<&mut Session> {
        self.sessions.iter_mut().find(|s| s.peer == from && s.id == id)
    }

    fn push_control(&mut self, to: SocketAddr, pkt: Vec<u8>) {
        if self.control.len() < self.config.control_queue_max {
            self.control.push_back((to, pkt));
        }
    }

    #[expect(clippy::too_many_arguments, reason = "the request's parts, as decoded")]
    fn on_request(
        &mut self,
        now: Time,
        from: SocketAddr,
        id: u32,
        fixed: &wire::RequestFixed,
        ranges: &[WireRange],
        lib: &dyn Library,
        key: &DeploymentKey,
    ) {
        let content = ContentId(fixed.content);
        let mut buf = [0u8; 256];
        let existing = self.sessions.iter().position(|s| s.peer == from && s.id == id);
        if let Some(i) = existing {
            let s = &self.sessions[i];
            if s.content != content {
                return; // a session id reused for other content: ignore
            }
            if !s.validated && fixed.nonce_echo.get() != s.nonce {
                // Our Accept was lost: the fetcher says hello again.
                if let Some((geometry, complete)) = lib.info(&content) {
                    let flags = s.accept_flags(complete);
                    let n = Self::encode_accept(&self.config, &s.key, &mut buf, id, &content, geometry, flags, s.nonce);
                    self.push_control(from, buf[..n].to_vec());
                }
                return;
            }
        }
        let idx = match existing {
            Some(i) => i,
            None if self.refusing => {
                self.stats.requests_refused += 1;
                let n = wire::encode_reject(key, &mut buf, id, &content, RejectReason::DeviceBusy);
                self.push_control(from, buf[..n].to_vec());
                return;
            }
            None => {
                let Some((geometry, complete)) = lib.info(&content) else {
                    self.stats.requests_rejected += 1;
                    let n = wire::encode_reject(key, &mut buf, id, &content, RejectReason::NotFound);
                    self.push_control(from, buf[..n].to_vec());
                    return;
                };
                if self.config.require_encryption && fixed.flags & wire::REQUEST_ENCRYPT == 0 {
                    self.stats.requests_rejected += 1;
                    let n = wire::encode_reject(key, &mut buf, id, &content, RejectReason::EncryptionRequired);
                    self.push_control(from, buf[..n].to_vec());
                    return;
                }
                if self.sessions.len() >= self.config.sessions_max {
                    self.stats.requests_rejected += 1;
                    // A server that may serve nobody refuses as a device, for as long as it is
                    // configured so; a full cap is busy for a moment.
                    let reason = if self.config.sessions_max == 0 {
                        RejectReason::DeviceBusy
                    } else {
                        RejectReason::Busy
                    };
                    let n = wire::encode_reject(key, &mut buf, id, &content, reason);
                    self.push_control(from, buf[..n].to_vec());
                    return;
                }
                let nonce = self.rng.gen::<u64>() | 1;
                let data_key = (fixed.flags & wire::REQUEST_ENCRYPT != 0)
                    .then(|| DataKey::derive(key, id, &content, fixed.fetch_nonce.get(), nonce));
                let mut flags = if complete { wire::ACCEPT_COMPLETE } else { 0 };
                if data_key.is_some() {
                    flags |= wire::ACCEPT_ENCRYPTED;
                }
                let n = Self::encode_accept(&self.config, key, &mut buf, id, &content, geometry, flags, nonce);
                self.push_control(from, buf[..n].to_vec());
                self.stats.sessions_opened += 1;
                let background = fixed.flags & REQUEST_BACKGROUND != 0;
                self.sessions.push(Session {
                    peer: from,
                    id,
                    key: key.clone(),
                    data_key,
                    content,
                    geometry,
                    nonce,
                    validated: false,
                    resend: VecDeque::new(),
                    queue: VecDeque::new(),
                    recovery: Recovery::new(),
                    cc: self.controller(background, from),
                    pacer: Pacer::new(),
                    last_recv: now,
                    app_limited: false,
                    dead: false,
                    probes: 0,
                    background,
                    last_keepalive: now,
                });
                // Ranges in the very first request are queued but not sent before validation.
                self.sessions.len() - 1
            }
        };
        let queue_max = self.config.queue_ranges_max;
        let s = &mut self.sessions[idx];
        s.last_recv = now;
        if fixed.nonce_echo.get() == s.nonce {
            s.validated = true;
        }
        if fixed.stream == wire::STREAM_TABLE {
            let table_len = 16 + 32 * s.geometry.block_count();
            if s.queue.iter().all(|(st, _)| *st != wire::STREAM_TABLE) {
                s.queue.push_back((wire::STREAM_TABLE, 0..table_len));
            }
            return;
        }
        let g = s.geometry;
        let mut missing: Vec<(u64, u32)> = Vec::new();
        // Bound the work one request can cause: a fetcher never has more than its window
        // (at most 32 MiB = 2048 blocks of 16 KiB) outstanding; blocks past the bound are
        // ignored and requested again later.
        let mut blocks_left = REQUEST_BLOCKS_MAX;
        for r in ranges {
            let count = (r.count.get() as u64).min(blocks_left);
            blocks_left -= count;
            let end = (r.start.get().saturating_add(count)).min(g.block_count());
            let mut b = r.start.get();
            while b < end {
                // Queue runs of held blocks; collect runs of missing ones for NotHave.
                let held = lib.has_block(&s.content, b);
                let run_start = b;
                while b < end && lib.has_block(&s.content, b) == held {
                    b += 1;
                }
                if held {
                    if s.queue.len() < queue_max {
                        let bytes = g.block_range(run_start).start..g.block_range(b - 1).end;
                        s.queue.push_back((wire::STREAM_CONTENT, bytes));
                    }
                } else if missing.len() < wire::RANGES_MAX {
                    missing.push((run_start, (b - run_start) as u32));
                }
            }
        }
        if !missing.is_empty() {
            let n = wire::encode_ranges(
                &s.key,
                &mut buf[..],
                Kind::NotHave,
                id,
                wire::STREAM_CONTENT,
                &wire::wire_ranges(missing),
            );
            let pkt = buf[..n].to_vec();
            self.push_control(from, pkt);
        }
    }

    #[expect(clippy::too_many_arguments, reason = "an Accept has that many fields")]
    fn encode_accept(
        config: &ServerConfig,
        key: &DeploymentKey,
        buf: &mut [u8],
        id: u32,
        content: &ContentId,
        geometry: Geometry,
        flags: u8,
        nonce: u64,
    ) -> usize {
        let accept = wire::AcceptFixed {
            content: content.0,
            nonce: nonce.into(),
            size: geometry.size.into(),
            block_chunks_log: geometry.block_chunks_log,
            flags,
            payload_max: (config.payload_bytes as u16).into(),
            reserved: [0; 4],
        };
        wire::encode_accept(key, buf, id, &accept)
    }

    fn on_ack(now: Time, arrived: Time, s: &mut Session, fixed: &wire::AckFixed, ranges: &[WireRange]) {
        // The controllers' events (e.g. `lowtide_engine::cc=debug`) say which session they are about.
        let _session =
            tracing::debug_span!(target: "lowtide_engine::cc", "session", peer = %s.peer, id = s.id).entered();
        let largest = fixed.largest.get();
        let ack_delay = Duration::from_micros(fixed.ack_delay_us.get() as u64);
        let out = s.recovery.on_ack(
            arrived,
            largest,
            ack_delay,
            ranges
                .iter()
                .map(|r| r.start.get()..r.start.get().saturating_add(r.count.get() as u64)),
        );
        let owd = (fixed.recv_ts_us.get().wrapping_sub(fixed.echo_send_ts_us.get()) as i32) as i64;
        if out.acked_bytes > 0 {
            s.cc.on_ack(
                now,
                &AckSample {
                    acked_bytes: out.acked_bytes,
                    rtt: out.rtt,
                    srtt: s.recovery.srtt,
                    min_rtt: s.recovery.min_rtt,
                    one_way_delay_us: out.rtt.map(|_| owd),
                    in_flight: s.recovery.in_flight(),
                    app_limited: s.app_limited,
                },
            );
        }
        if !out.lost.is_empty() {
            Self::requeue_lost(now, s, out.lost, out.lost_bytes, out.largest_lost_sent, false);
        }
    }

    fn requeue_lost(now: Time, s: &mut Session, lost: Vec<(u8, Range<u64>)>, bytes: u64, largest: Time, timeout: bool) {
        // A single probe timeout is not congestion (the fetcher may just have been busy);
        // several in a row are.
        if !timeout || s.recovery.pto_count() >= PERSISTENT_PTO_COUNT {
            s.cc.on_loss(
                now,
                &LossSample {
                    lost_bytes: bytes,
                    largest_lost_sent: largest,
                    timeout,
                },
            );
        }
        if timeout {
            s.probes = 1;
        }
        for (stream, r) in lost.into_iter().rev() {
            s.resend.push_front((stream, r));
        }
    }

    /// Write the next datagram (or GSO run of datagrams) into `buf`.
    /// `buf` must hold `gso_segments_max` full datagrams.
    pub fn poll_transmit(&mut self, now: Time, lib: &dyn Library, buf: &mut [u8]) -> Option<Transmit> {
        if let Some((dst, pkt)) = self.control.pop_front() {
            buf[..pkt.len()].copy_from_slice(&pkt);
            return Some(Transmit::single(dst, pkt.len()));
        }
        if self.background_paused {
            for s in self.sessions.iter_mut().filter(|s| s.background && s.has_data()) {
                if now.since(s.last_keepalive) >= PAUSED_KEEPALIVE {
                    s.last_keepalive = now;
                    let n = wire::encode_ranges(&s.key, buf, Kind::NotHave, s.id, wire::STREAM_CONTENT, &[]);
                    return Some(Transmit::single(s.peer, n));
                }
            }
        }
        let n = self.sessions.len();
        for k in 0..n {
            let i = (self.rr + k) % n;
            if let Some(t) = self.transmit_session(now, i, lib, buf) {
                self.rr = (i + 1) % n;
                return Some(t);
            }
        }
        None
    }

    fn transmit_session(&mut self, now: Time, i: usize, lib: &dyn Library, buf: &mut [u8]) -> Option<Transmit> {
        let cap = self.config.upload_bytes_per_sec_max;
        let upload_burst = self.upload_burst((DATA_HEADER_BYTES + self.config.payload_bytes) as u64);
        let cfg = &self.config;
        let paused = self.background_paused;
        let s = &mut self.sessions[i];
        if !s.may_send(paused) || s.recovery.is_full() {
            if !s.has_data() {
                // Everything asked for is out: whatever the window, the sender is application-limited.
                s.app_limited = true;
            }
            return None;
        }
        // Encrypted datagrams carry a tag more and as much payload less: the same size on the wire.
        let overhead = s.seal_overhead();
        let payload_max = (cfg.payload_bytes - overhead) as u64;
        let full = (DATA_HEADER_BYTES + cfg.payload_bytes) as u64;
        let window = s.cc.window();
        let rate = s.pacing_rate();
        let mut budget = window.saturating_sub(s.recovery.in_flight());
        if s.recovery.in_flight() == 0 || s.probes > 0 {
            budget = budget.max(full);
        }
        if let Some(rate) = rate {
            let burst = ((rate as f64 * cfg.pacing_burst.as_secs_f64()) as u64).max(2 * full);
            let tokens = s.pacer.available(now, rate, burst);
            budget = if s.probes > 0 {
                budget.min(tokens.max(full))
            } else {
                budget.min(tokens)
            };
        }
        if cap > 0 {
            // The cap is shared by every session: no probe goes past it either.
            budget = budget.min(self.upload.available(now, cap, upload_burst));
        }
        let segs_max = cfg.gso_segments_max.min((buf.len() as u64 / full) as usize);
        // 1. Plan the run: which chunks, within the budget, equal sizes but the last.
        let mut plan = std::mem::take(&mut self.plan);
        plan.clear();
        let mut seg_size = 0usize;
        while plan.len() < segs_max && budget > 0 {
            let Some((stream, chunk, resent)) = s.take_chunk(payload_max) else {
                break;
            };
            let dlen = DATA_HEADER_BYTES + (chunk.end - chunk.start) as usize + overhead;
            if (dlen as u64) > budget || (!plan.is_empty() && dlen > seg_size) {
                s.untake(stream, chunk, resent);
                break;
            }
            budget = budget.saturating_sub(dlen as u64);
            plan.push((stream, chunk, resent));
            if s.probes > 0 {
                s.probes -= 1;
                break; // a probe goes alone
            }
            if plan.len() == 1 {
                seg_size = dlen;
            } else if dlen < seg_size {
                break; // a short datagram ends a GSO run
            }
        }
        // 2. Read the payloads straight into their datagrams: one scatter read per contiguous span.
        let mut at = 0usize;
        let mut k = 0;
        while k < plan.len() {
            let mut j = k + 1;
            while j < plan.len() && plan[j].0 == plan[k].0 && plan[j].1.start == plan[j - 1].1.end {
                j += 1;
            }
            let mut slices = Vec::with_capacity(j - k);
            let mut rest = &mut buf[at..];
            for (_, chunk, _) in &plan[k..j] {
                let plen = (chunk.end - chunk.start) as usize;
                let dlen = DATA_HEADER_BYTES + plen + overhead;
                let (datagram, tail) = rest.split_at_mut(dlen);
                slices.push(std::io::IoSliceMut::new(
                    &mut datagram[DATA_HEADER_BYTES..DATA_HEADER_BYTES + plen],
                ));
                at += dlen;
                rest = tail;
            }
            if lib
                .read_vectored(&s.content, plan[k].0, plan[k].1.start, &mut slices)
                .is_err()
            {
                // The store lost the data (evicted or disk error): stop serving this session.
                self.stats.read_errors += 1;
                s.dead = true;
                self.plan = plan;
                return None;
            }
            k = j;
        }
        // 3. Seal and account for each datagram.
        let mut len = 0usize;
        for (stream, chunk, resent) in plan.iter() {
            let plen = (chunk.end - chunk.start) as usize;
            let dlen = DATA_HEADER_BYTES + plen + overhead;
            let pn = s.recovery.on_sent(now, *stream, chunk.start, plen as u32, dlen as u32);
            let fixed = wire::DataFixed {
                pn: pn.into(),
                offset: chunk.start.into(),
                send_ts_us: now.wire_us().into(),
                stream: *stream,
                reserved: [0; 3],
            };
            wire::seal_data(&s.key, &mut buf[len..], s.id, &fixed, plen);
            if let Some(k) = &s.data_key {
                k.seal(&mut buf[len..len + dlen], plen);
            }
            s.cc.on_sent(now, dlen as u64);
            s.pacer.consume(dlen as u64);
            if cap > 0 {
                self.upload.consume(dlen as u64);
            }
            self.stats.packets_sent += 1;
            self.stats.payload_bytes_sent += plen as u64;
            if *resent {
                self.stats.payload_bytes_resent += plen as u64;
            }
            len += dlen;
        }
        let count = plan.len();
        self.plan = plan;
        s.app_limited = !s.has_data() && s.recovery.in_flight() < window;
        (count > 0).then(|| Transmit {
            dst: s.peer,
            len,
            segment_size: (count > 1).then_some(seg_size),
        })
    }

    /// When `handle_timeout` must next be called.
    pub fn poll_timeout(&self) -> Option<Time> {
        let full = (DATA_HEADER_BYTES + self.config.payload_bytes) as u64;
        let cap = self.config.upload_bytes_per_sec_max;
        // Capped and out of shared tokens while some session has data: wake when they are back.
        let upload = (cap > 0
            && self.upload.tokens() < full as f64
            && self.sessions.iter().any(|s| s.may_send(self.background_paused)))
        .then(|| self.upload.next_send(full, cap));
        self.sessions
            .iter()
            .flat_map(|s| {
                let pace = (s.may_send(self.background_paused) && s.recovery.in_flight() + full <= s.cc.window())
                    .then(|| s.pacing_rate().map(|r| s.pacer.next_send(full, r)))
                    .flatten();
                let keepalive = (self.background_paused && s.background && s.has_data())
                    .then(|| s.last_keepalive + PAUSED_KEEPALIVE);
                [
                    s.recovery.timeout(),
                    Some(s.last_recv + self.config.idle_timeout),
                    pace,
                    keepalive,
                ]
            })
            .flatten()
            .chain(upload)
            .min()
    }

    pub fn handle_timeout(&mut self, now: Time) {
        let idle = self.config.idle_timeout;
        let pto_max = self.config.pto_count_max;
        let before = self.sessions.len();
        self.sessions
            .retain(|s| now.since(s.last_recv) < idle && s.recovery.pto_count() <= pto_max && !s.dead);
        self.stats.sessions_dropped_idle += (before - self.sessions.len()) as u64;
        for s in &mut self.sessions {
            if s.recovery.timeout().is_some_and(|t| t <= now) {
                let out = s.recovery.on_timeout(now);
                if !out.lost.is_empty() {
                    Self::requeue_lost(now, s, out.lost, out.lost_bytes, out.largest_lost_sent, true);
                }
            }
        }
    }
}

fn byte_range(g: &Geometry, r: &WireRange) -> Range<u64> {
    let count = g.block_count();
    let first = r.start.get().min(count);
    let end = first.saturating_add(r.count.get() as u64).min(count);
    if first >= end {
        return 0..0;
    }
    g.block_range(first).start..g.block_range(end - 1).end
}

/// Remove the byte range `cut` from every content range in `q`.
fn remove_range(q: &mut VecDeque<(u8, Range<u64>)>, cut: &Range<u64>) {
    if cut.is_empty() {
        return;
    }
    let mut out = VecDeque::with_capacity(q.len());
    for (stream, r) in q.drain(..) {
        if stream != wire::STREAM_CONTENT || r.end <= cut.start || r.start >= cut.end {
            out.push_back((stream, r));
            continue;
        }
        if r.start < cut.start {
            out.push_back((stream, r.start..cut.start));
        }
        if r.end > cut.end {
            out.push_back((stream, cut.end..r.end));
        }
    }
    *q = out;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::content::BlockTable;
    use crate::io::sim::MemLibrary;
    use crate::wire::{decode, encode_request, wire_ranges, RequestFixed};

    #[test]
    fn server_bounds_the_blocks_one_request_can_queue() {
        let key = DeploymentKey::derive(b"t");
        let data = vec![7u8; 20 << 20];
        let table = BlockTable::from_bytes(&data, 0); // 1 KiB blocks: 20480 of them
        let id = table.root();
        let mut lib = MemLibrary::default();
        lib.insert_full(table, data);
        let mut server = Server::new(key.clone(), ServerConfig::default(), 1);
        let peer: SocketAddr = "10.0.0.9:9".parse().unwrap();
        let mut buf = vec![0u8; 4096];
        let mut request = |server: &mut Server, nonce: u64, ranges: &[(u64, u32)]| {
            let f = RequestFixed {
                content: id.0,
                nonce_echo: nonce.into(),
                fetch_nonce: 0.into(),
                window_bytes: 0.into(),
                stream: wire::STREAM_CONTENT,
                flags: 0,
                range_count: 0.into(),
            };
            let n = encode_request(&key, &mut buf, 5, &f, &wire_ranges(ranges.iter().copied()));
            let p = decode(&key, &buf[..n]).unwrap();
            server.handle(Time(0), peer, &p, &lib);
        };
        request(&mut server, 0, &[]);
        let mut out = vec![0u8; 64 * 1024];
        let t = server.poll_transmit(Time(0), &lib, &mut out).unwrap();
        let nonce = match decode(&key, &out[..t.len]).unwrap() {
            Packet::Accept { fixed, .. } => fixed.nonce.get(),
            p => panic!("{p:?}"),
        };
        request(&mut server, nonce, &[(0, u32::MAX), (0, u32::MAX)]);
        let queued: u64 = server.sessions[0].queue.iter().map(|(_, r)| r.end - r.start).sum();
        assert_eq!(queued, REQUEST_BLOCKS_MAX * 1024);
    }

    #[test]
    fn server_answers_a_session_under_the_key_its_request_came_with() {
        let (old, new) = (DeploymentKey::derive(b"old"), DeploymentKey::derive(b"new"));
        let data = vec![1u8; 4096];
        let table = BlockTable::from_bytes(&data, 0);
        let id = table.root();
        let mut lib = MemLibrary::default();
        lib.insert_full(table, data);
        // Rotated: sends under `new`, still accepts `old`.
        let keys = wire::Keys {
            current: new.clone(),
            previous: Some(old.clone()),
        };
        let mut server = Server::new(new.clone(), ServerConfig::default(), 1);
        let peer: SocketAddr = "10.0.0.9:9".parse().unwrap();
        let mut buf = vec![0u8; 4096];
        let f = RequestFixed {
            content: id.0,
            nonce_echo: 0.into(),
            fetch_nonce: 0.into(),
            window_bytes: 0.into(),
            stream: wire::STREAM_CONTENT,
            flags: 0,
            range_count: 0.into(),
        };
        let mut out = vec![0u8; 64 * 1024];
        for (session, fetcher_key) in [(5, &old), (6, &new)] {
            let n = encode_request(fetcher_key, &mut buf, session, &f, &[]);
            let (p, used) = keys.decode(&buf[..n]).unwrap();
            assert_eq!(used, fetcher_key);
            server.handle_keyed(Time(0), peer, &p, &lib, used);
            let t = server.poll_transmit(Time(0), &lib, &mut out).unwrap();
            // The fetcher, which knows only its own key, can read the Accept.
            assert!(matches!(decode(fetcher_key, &out[..t.len]), Ok(Packet::Accept { .. })));
        }
    }

    /// Issue 4: the round-trip sample of an acknowledgement runs to when it arrived (the
    /// kernel's timestamp), not to when the server got round to it.
    #[test]
    fn server_takes_round_trips_to_the_acks_arrival() {
        let (mut server, lib, key, _) = serving(ServerConfig::default());
        let mut out = vec![0u8; 256 * 1024];
        let sent = Time(10_000);
        let t = server.poll_transmit(sent, &lib, &mut out).expect("data to send");
        let pn = match decode(&key, &out[..t.segment_size.unwrap_or(t.len)]) {
            Ok(Packet::Data { fixed, .. }) => fixed.pn.get(),
            p => panic!("{p:?}"),
        };
        let mut buf = vec![0u8; 4096];
        let ack = wire::AckFixed {
            nonce_echo: server.sessions[0].nonce.into(),
            largest: pn.into(),
            ack_delay_us: 0.into(),
            echo_send_ts_us: 0.into(),
            recv_ts_us: 0.into(),
            range_count: 0.into(),
            reserved: [0; 2],
        };
        let n = wire::encode_ack(&key, &mut buf, 5, &ack, &wire_ranges([(pn, 1)]));
        let peer: SocketAddr = "10.0.0.9:9".parse().unwrap();
        // Arrived 20 ms after the send, handled 70 ms after it.
        let (arrived, handled) = (sent + Duration::from_millis(20), sent + Duration::from_millis(70));
        server.handle_arrived(handled, arrived, peer, &decode(&key, &buf[..n]).unwrap(), &lib, &key);
        assert_eq!(
            server.sessions[0].recovery.srtt,
            Duration::from_millis(20),
            "the first sample"
        );
    }

    /// A controller that never limits: the upload cap is all that does.
    #[derive(Debug)]
    struct Unlimited;

    impl Controller for Unlimited {
        fn name(&self) -> &'static str {
            "unlimited"
        }
        fn on_sent(&mut self, _: Time, _: u64) {}
        fn on_ack(&mut self, _: Time, _: &AckSample) {}
        fn on_loss(&mut self, _: Time, _: &LossSample) {}
        fn window(&self) -> u64 {
            1 << 40
        }
        fn pacing_rate(&self, _: Duration) -> Option<u64> {
            None
        }
    }

    /// A deployment key and a library holding `size` bytes whole; the content's id.
    fn holding(size: usize) -> (DeploymentKey, MemLibrary, ContentId) {
        let key = DeploymentKey::derive(b"t");
        let data = vec![7u8; size];
        let table = BlockTable::from_bytes(&data, 0);
        let id = table.root();
        let mut lib = MemLibrary::default();
        lib.insert_full(table, data);
        (key, lib, id)
    }

    /// A server holding 20 MiB, with one validated session (id 5) that asked for 8 MiB.
    fn serving(config: ServerConfig) -> (Server, MemLibrary, DeploymentKey, ContentId) {
        let (key, lib, id) = holding(20 << 20);
        let mut server = Server::new(key.clone(), config, 1);
        let nonce = request(&mut server, &lib, &key, &id, 5, 0, &[]).expect("accepted");
        request(&mut server, &lib, &key, &id, 5, nonce, &[(0, u32::MAX)]);
        (server, lib, key, id)
    }

    /// Send a request; the nonce of the Accept it drew, if it drew one.
    fn request(
        server: &mut Server,
        lib: &MemLibrary,
        key: &DeploymentKey,
        id: &ContentId,
        session: u32,
        nonce: u64,
        ranges: &[(u64, u32)],
    ) -> Option<u64> {
        let mut buf = vec![0u8; 4096];
        let f = RequestFixed {
            content: id.0,
            nonce_echo: nonce.into(),
            fetch_nonce: 0.into(),
            window_bytes: 0.into(),
            stream: wire::STREAM_CONTENT,
            flags: 0,
            range_count: 0.into(),
        };
        let n = encode_request(key, &mut buf, session, &f, &wire_ranges(ranges.iter().copied()));
        let p = decode(key, &buf[..n]).unwrap();
        let peer: SocketAddr = "10.0.0.9:9".parse().unwrap();
        server.handle(Time(0), peer, &p, lib);
        if nonce != 0 {
            return None;
        }
        let mut out = vec![0u8; 64 * 1024];
        let t = server.poll_transmit(Time(0), lib, &mut out)?;
        match decode(key, &out[..t.len]).unwrap() {
            Packet::Accept { fixed, .. } => Some(fixed.nonce.get()),
            Packet::Reject { fixed, .. } => {
                assert_eq!(fixed.reason, RejectReason::DeviceBusy as u8);
                None
            }
            p => panic!("{p:?}"),
        }
    }

    /// Payload-and-header bytes sent in one virtual second, polling every millisecond.
    fn bytes_in_one_second(server: &mut Server, lib: &MemLibrary) -> u64 {
        let mut out = vec![0u8; 256 * 1024];
        let mut sent = 0u64;
        for ms in 0..1000u64 {
            while let Some(t) = server.poll_transmit(Time::from_micros(ms * 1000), lib, &mut out) {
                sent += t.len as u64;
            }
        }
        sent
    }

    #[test]
    fn server_upload_cap_bounds_all_sessions_together() {
        let unlimited: ControllerFactory = Arc::new(|_| Box::new(Unlimited) as Box<dyn Controller>);
        let cap = 1_000_000;
        let (mut capped, lib, ..) = serving(ServerConfig {
            upload_bytes_per_sec_max: cap,
            controller: Some(unlimited.clone()),
            ..ServerConfig::default()
        });
        let sent = bytes_in_one_second(&mut capped, &lib);
        let burst = capped.upload_burst((DATA_HEADER_BYTES + PAYLOAD_BYTES_DEFAULT) as u64);
        assert!(
            sent <= cap + burst,
            "{sent} bytes in one second at a cap of {cap} (burst {burst})"
        );
        assert!(
            sent >= cap * 9 / 10,
            "{sent} bytes: the cap should be used, not undershot"
        );
        // The same server without the cap sends everything asked for at once.
        let (mut free, lib, ..) = serving(ServerConfig {
            controller: Some(unlimited),
            ..ServerConfig::default()
        });
        assert!(bytes_in_one_second(&mut free, &lib) > 4 * cap);
        // While capped and out of tokens, the server asks to be woken, not polled in a loop.
        assert!(capped.poll_timeout().is_some());
    }

    #[test]
    fn a_server_that_may_serve_nobody_refuses_as_a_device_not_as_busy() {
        let (key, lib, id) = holding(1 << 20);
        let mut server = Server::new(
            key.clone(),
            ServerConfig {
                sessions_max: 0,
                ..ServerConfig::default()
            },
            1,
        );
        // `request` asserts that a Reject says DeviceBusy (a full cap would say Busy).
        assert_eq!(request(&mut server, &lib, &key, &id, 5, 0, &[]), None);
        assert_eq!(server.session_count(), 0);
    }

    #[test]
    fn server_refusing_ends_sessions_and_rejects_requests() {
        let (mut server, lib, key, id) = serving(ServerConfig::default());
        assert_eq!(server.session_count(), 1);
        server.set_refusing(true);
        assert_eq!(server.session_count(), 0, "every session ends");
        let mut out = vec![0u8; 64 * 1024];
        let t = server
            .poll_transmit(Time(0), &lib, &mut out)
            .expect("a Reject for the session");
        match decode(&key, &out[..t.len]).unwrap() {
            Packet::Reject { session, fixed } => {
                assert_eq!((session, fixed.reason), (5, RejectReason::DeviceBusy as u8));
            }
            p => panic!("{p:?}"),
        }
        assert!(server.poll_transmit(Time(0), &lib, &mut out).is_none(), "and no data");
        assert_eq!(
            request(&mut server, &lib, &key, &id, 6, 0, &[]),
            None,
            "new requests refused"
        );
        assert_eq!(server.stats().requests_refused, 2);
        server.set_refusing(false);
        assert!(
            request(&mut server, &lib, &key, &id, 7, 0, &[]).is_some(),
            "serving again"
        );
    }
}
