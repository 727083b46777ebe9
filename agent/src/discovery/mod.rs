//! Discovery of peers on this agent's own subnets, beside the server's source
//! lists.
//!
//! # What it does
//!
//! Agents find each other three ways, as products of this kind do:
//!
//! 1. **Broadcast**: a query to each IPv4 subnet's broadcast address, one per
//!    interface subnet, so a multi-NIC host asks on every LAN it is on and
//!    each query leaves by the interface of its subnet.
//! 2. **Neighbour cache**: unicast queries to the complete IPv4 entries of
//!    `/proc/net/arp` that lie in one of this agent's subnets.
//! 3. **Subnet scan**: unicast queries to every address of each subnet no
//!    larger than `/discovery_scan_prefix_min`, at most
//!    `discovery_scan_per_sec` a second ([`ScanPlan`]).
//!
//! A presence query (no content) every `discovery_interval_secs` keeps a
//! table of the agents that answer; one that has not answered for
//! `discovery_peer_timeout_secs` is dropped. When `get` starts a download it
//! asks for the content itself ([`service::Discovery::lookup`], at most
//! `discovery_lookup_ms`), and peers on its own subnets that hold some of it
//! and serve now join the same-site peers the server named.
//!
//! # Roles by site kind (from the server's heartbeat answer)
//!
//! | site kind | broadcasts | answers | scans and neighbour queries |
//! |---|---|---|---|
//! | standard (or no site) | yes | yes | yes |
//! | vpn | yes | no (a VPN agent does not serve) | yes |
//! | wifi | no | yes | yes (unicast only) |
//!
//! Until the first heartbeat answer says which kind of site the agent is
//! on, it neither sends nor answers.
//!
//! # Safety of the protocol
//!
//! Packets are tagged with a key derived from the deployment key and carry
//! the sender's time ([`wire`]); a reply is smaller than its query; replies
//! are rate-limited per source address ([`REPLIES_PER_SEC`], burst
//! [`REPLIES_BURST`]); a query is answered once per (sender, nonce), and a
//! reply is taken only for a nonce this agent sent and still waits on. Every
//! table has a bound.
//!
//! The core ([`Core`]) is sans-IO: it takes `now` (Unix milliseconds) and
//! bytes and gives bytes back; [`service`] owns the socket and the clock.

pub mod service;
pub mod wire;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use ipnet::{IpNet, Ipv4Net};
use lowtide_engine::content::ContentId;
use serde::Serialize;

pub use wire::{DecodeError, DiscoveryKey, Message};

/// Replies per second one source address may get (token bucket rate).
pub const REPLIES_PER_SEC: u64 = 5;
/// Replies one source address may get at once (token bucket size).
pub const REPLIES_BURST: u64 = 20;
/// Most source addresses with a reply bucket; beyond it, unknown sources get no reply.
pub const BUCKETS_MAX: usize = 1024;
/// Most (sender, nonce) pairs remembered against replayed queries.
pub const SEEN_MAX: usize = 8192;
/// Most queries waiting for replies.
pub const PENDING_MAX: usize = 4096;
/// How long a query's replies are taken.
pub const PENDING_MS: u64 = 10_000;
/// Most peers in the table.
pub const PEERS_MAX: usize = 1024;
/// Most replies collected for one content look-up.
pub const FOUND_MAX: usize = 64;

/// How a peer was found (the first way it answered).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum How {
    Broadcast,
    Neighbour,
    Scan,
    /// A unicast query to a peer already known (refresh, or a look-up on Wi-Fi).
    Known,
}

/// An agent that answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Peer {
    pub ip: IpAddr,
    /// Its engine UDP port.
    pub port: u16,
    pub how: How,
    pub last_seen_ms: u64,
    /// Whether its last reply said it serves now.
    pub serving: bool,
}

/// A peer that answered a content query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Found {
    /// Its engine address.
    pub addr: SocketAddr,
    pub held_permille: u16,
    pub complete: bool,
    pub serving: bool,
    pub how: How,
}

/// Counters since start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    pub queries_sent: u64,
    pub queries_answered: u64,
    pub replies_taken: u64,
    /// Dropped packets by reason: malformed, version, tag, stale, replayed, rate_limited, unsolicited.
    pub dropped: std::collections::BTreeMap<&'static str, u64>,
    pub peers_dropped: u64,
}

/// What a datagram asks of the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incoming {
    /// A query this agent may answer: look up what it holds and call [`Core::reply`].
    Query { from: SocketAddr, msg: Message },
    /// A reply was taken (peer table updated).
    Reply,
    /// Dropped (counted in [`Stats::dropped`]).
    Dropped(&'static str),
    /// Our own broadcast, looped back.
    Own,
}

/// A manifest query waiting for its chunk.
struct PendingChunk {
    content: ContentId,
    offset: u32,
    from: IpAddr,
    expires_ms: u64,
    /// The chunk, once it came: (total, bytes).
    got: Option<(u32, Vec<u8>)>,
}

struct Pending {
    content: Option<ContentId>,
    how: How,
    expires_ms: u64,
    found: Vec<Found>,
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens_milli: u64,
    at_ms: u64,
}

/// The sans-IO discovery state of one agent.
pub struct Core {
    /// Sends with this key.
    key: DiscoveryKey,
    /// Also accepted on receipt, after a rotation of the deployment key.
    previous: Option<DiscoveryKey>,
    /// Random id of this agent process.
    me: u64,
    /// This agent's engine port, put in every packet.
    port: u16,
    peer_timeout_ms: u64,
    peers: HashMap<IpAddr, Peer>,
    pending: HashMap<u64, Pending>,
    chunks: HashMap<u64, PendingChunk>,
    seen: HashMap<(u64, u64), u64>,
    buckets: HashMap<IpAddr, Bucket>,
    stats: Stats,
}

impl Core {
    pub fn new(key: DiscoveryKey, me: u64, port: u16, peer_timeout_ms: u64) -> Self {
        Self {
            key,
            previous: None,
            me,
            port,
            peer_timeout_ms,
            peers: HashMap::new(),
            pending: HashMap::new(),
            chunks: HashMap::new(),
            seen: HashMap::new(),
            buckets: HashMap::new(),
            stats: Stats::default(),
        }
    }

    /// Take new keys (the deployment key was rotated): send with `current`,
    /// accept `previous` too until the next rotation.
    pub fn set_keys(&mut self, current: DiscoveryKey, previous: Option<DiscoveryKey>) {
        self.key = current;
        self.previous = previous;
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    fn drop_count(&mut self, why: &'static str) -> Incoming {
        *self.stats.dropped.entry(why).or_default() += 1;
        Incoming::Dropped(why)
    }

    /// A query (`content` or presence) under a fresh `nonce`; its replies are
    /// taken for [`PENDING_MS`] and, for content, kept for [`take_found`](Self::take_found).
    pub fn query(&mut self, now_ms: u64, nonce: u64, content: Option<ContentId>, how: How) -> [u8; wire::QUERY_BYTES] {
        if self.pending.len() >= PENDING_MAX {
            self.pending.retain(|_, p| p.expires_ms > now_ms);
            if self.pending.len() >= PENDING_MAX {
                // Still full of live ones: forget the one that expires first.
                if let Some(k) = self.pending.iter().min_by_key(|(_, p)| p.expires_ms).map(|(k, _)| *k) {
                    self.pending.remove(&k);
                }
            }
        }
        self.pending.insert(
            nonce,
            Pending {
                content,
                how,
                expires_ms: now_ms + PENDING_MS,
                found: Vec::new(),
            },
        );
        self.stats.queries_sent += 1;
        wire::encode_query(&self.key, now_ms, self.me, nonce, content, self.port)
    }

    /// Take one datagram from `from`.
    pub fn on_datagram(&mut self, now_ms: u64, from: SocketAddr, buf: &[u8]) -> Incoming {
        let mut got = wire::decode(&self.key, buf, now_ms);
        if let (Err(DecodeError::Tag), Some(prev)) = (&got, &self.previous) {
            got = wire::decode(prev, buf, now_ms);
        }
        let msg = match got {
            Ok(m) => m,
            Err(e) => return self.drop_count(e.label()),
        };
        if msg.sender == self.me {
            return Incoming::Own;
        }
        match msg.kind {
            wire::KIND_QUERY | wire::KIND_MANIFEST_QUERY => self.on_query(now_ms, from, msg),
            wire::KIND_MANIFEST_CHUNK => self.on_chunk(now_ms, from, msg, wire::chunk_data(buf, &msg)),
            _ => self.on_reply(now_ms, from, msg),
        }
    }

    fn on_query(&mut self, now_ms: u64, from: SocketAddr, msg: Message) -> Incoming {
        // Replays: each (sender, nonce) is answered once while its time is fresh.
        if self.seen.contains_key(&(msg.sender, msg.nonce)) {
            return self.drop_count("replayed");
        }
        if self.seen.len() >= SEEN_MAX {
            self.seen.retain(|_, exp| *exp > now_ms);
            if self.seen.len() >= SEEN_MAX {
                // Full of fresh entries (a flood): refuse rather than forget, so nothing replays.
                return self.drop_count("rate_limited");
            }
        }
        if !self.take_token(now_ms, from.ip()) {
            return self.drop_count("rate_limited");
        }
        self.seen
            .insert((msg.sender, msg.nonce), msg.sent_ms + 2 * wire::CLOCK_SKEW_MS_MAX);
        Incoming::Query { from, msg }
    }

    /// Per-source token bucket: [`REPLIES_PER_SEC`], burst [`REPLIES_BURST`].
    fn take_token(&mut self, now_ms: u64, ip: IpAddr) -> bool {
        let full = REPLIES_BURST * 1000;
        if !self.buckets.contains_key(&ip) && self.buckets.len() >= BUCKETS_MAX {
            // Forget sources whose bucket has refilled: they lose nothing.
            self.buckets
                .retain(|_, b| b.tokens_milli + now_ms.saturating_sub(b.at_ms) * REPLIES_PER_SEC < full);
            if self.buckets.len() >= BUCKETS_MAX {
                return false;
            }
        }
        let b = self.buckets.entry(ip).or_insert(Bucket {
            tokens_milli: full,
            at_ms: now_ms,
        });
        let refill = now_ms.saturating_sub(b.at_ms) * REPLIES_PER_SEC;
        b.tokens_milli = (b.tokens_milli + refill).min(full);
        b.at_ms = b.at_ms.max(now_ms);
        if b.tokens_milli < 1000 {
            return false;
        }
        b.tokens_milli -= 1000;
        true
    }

    /// The reply to a query [`on_datagram`](Self::on_datagram) handed out.
    pub fn reply(
        &mut self,
        now_ms: u64,
        query: &Message,
        held_permille: u16,
        complete: bool,
        serving: bool,
    ) -> [u8; wire::REPLY_BYTES] {
        let flags = if complete { wire::FLAG_COMPLETE } else { 0 } | if serving { wire::FLAG_SERVING } else { 0 };
        self.stats.queries_answered += 1;
        wire::encode_reply(&self.key, now_ms, self.me, query, flags, self.port, held_permille)
    }

    fn on_reply(&mut self, now_ms: u64, from: SocketAddr, msg: Message) -> Incoming {
        let Some(p) = self.pending.get_mut(&msg.nonce).filter(|p| p.expires_ms > now_ms) else {
            return self.drop_count("unsolicited");
        };
        if p.content != msg.content {
            return self.drop_count("unsolicited");
        }
        let serving = msg.flags & wire::FLAG_SERVING != 0;
        let how = p.how;
        if msg.content.is_some() {
            let addr = SocketAddr::new(from.ip(), msg.port);
            if p.found.len() < FOUND_MAX && !p.found.iter().any(|f| f.addr == addr) {
                p.found.push(Found {
                    addr,
                    held_permille: msg.held_permille,
                    complete: msg.flags & wire::FLAG_COMPLETE != 0,
                    serving,
                    how,
                });
            }
        }
        self.stats.replies_taken += 1;
        let ip = from.ip();
        if !self.peers.contains_key(&ip) && self.peers.len() >= PEERS_MAX {
            return Incoming::Reply;
        }
        let e = self.peers.entry(ip).or_insert(Peer {
            ip,
            port: msg.port,
            how,
            last_seen_ms: now_ms,
            serving,
        });
        e.port = msg.port;
        e.last_seen_ms = now_ms;
        e.serving = serving;
        Incoming::Reply
    }

    /// A query to `to` for the signed manifest of `content` from byte `offset`, under a fresh
    /// `nonce`; the chunk that answers it is kept for [`take_chunk`](Self::take_chunk).
    pub fn manifest_query(
        &mut self,
        now_ms: u64,
        nonce: u64,
        content: ContentId,
        offset: u32,
        to: IpAddr,
    ) -> [u8; wire::MANIFEST_QUERY_BYTES] {
        if self.chunks.len() >= PENDING_MAX {
            self.chunks.retain(|_, p| p.expires_ms > now_ms);
            if self.chunks.len() >= PENDING_MAX {
                if let Some(k) = self.chunks.iter().min_by_key(|(_, p)| p.expires_ms).map(|(k, _)| *k) {
                    self.chunks.remove(&k);
                }
            }
        }
        self.chunks.insert(
            nonce,
            PendingChunk {
                content,
                offset,
                from: to,
                expires_ms: now_ms + PENDING_MS,
                got: None,
            },
        );
        self.stats.queries_sent += 1;
        wire::encode_manifest_query(&self.key, now_ms, self.me, nonce, content, self.port, offset)
    }

    /// The answer to a manifest query [`on_datagram`](Self::on_datagram) handed out: the part
    /// of `signed` (signature, then the signed JSON) it asks for; `None` past its end.
    pub fn manifest_chunk(
        &mut self,
        now_ms: u64,
        query: &Message,
        signed: &[u8],
    ) -> Option<[u8; wire::MANIFEST_CHUNK_BYTES]> {
        let c = wire::encode_manifest_chunk(&self.key, now_ms, self.me, query, self.port, signed)?;
        self.stats.queries_answered += 1;
        Some(c)
    }

    fn on_chunk(&mut self, now_ms: u64, from: SocketAddr, msg: Message, data: &[u8]) -> Incoming {
        let Some(p) = self.chunks.get_mut(&msg.nonce).filter(|p| p.expires_ms > now_ms) else {
            return self.drop_count("unsolicited");
        };
        if Some(p.content) != msg.content || p.offset != msg.offset || p.from != from.ip() || p.got.is_some() {
            return self.drop_count("unsolicited");
        }
        p.got = Some((msg.total, data.to_vec()));
        self.stats.replies_taken += 1;
        Incoming::Reply
    }

    /// The chunk that answered the manifest query sent under `nonce`, once it came
    /// (then the query is forgotten): (total bytes of the signed manifest, this chunk's bytes).
    pub fn take_chunk(&mut self, nonce: u64) -> Option<(u32, Vec<u8>)> {
        let got = self.chunks.get(&nonce)?.got.is_some();
        got.then(|| self.chunks.remove(&nonce).and_then(|p| p.got)).flatten()
    }

    /// The replies to the content query sent under `nonce` (it stops waiting for more).
    pub fn take_found(&mut self, nonce: u64) -> Vec<Found> {
        self.pending.remove(&nonce).map(|p| p.found).unwrap_or_default()
    }

    /// Drop peers silent for longer than the timeout, and expired bookkeeping.
    pub fn expire(&mut self, now_ms: u64) {
        let before = self.peers.len();
        let timeout = self.peer_timeout_ms;
        self.peers
            .retain(|_, p| now_ms.saturating_sub(p.last_seen_ms) <= timeout);
        self.stats.peers_dropped += (before - self.peers.len()) as u64;
        self.pending.retain(|_, p| p.expires_ms > now_ms);
        self.chunks.retain(|_, p| p.expires_ms > now_ms);
        self.seen.retain(|_, exp| *exp > now_ms);
    }

    /// Peers that answered within the timeout, by address.
    pub fn peers(&self) -> Vec<Peer> {
        let mut v: Vec<Peer> = self.peers.values().cloned().collect();
        v.sort_by_key(|p| p.ip);
        v
    }

    pub fn knows(&self, ip: &IpAddr) -> bool {
        self.peers.contains_key(ip)
    }
}

/// What this agent does on its site kind (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Role {
    pub broadcast: bool,
    pub answer: bool,
    pub unicast: bool,
}

impl Role {
    /// Before the first heartbeat answer: nothing.
    pub const UNKNOWN: Role = Role {
        broadcast: false,
        answer: false,
        unicast: false,
    };

    /// From the heartbeat answer's `site_kind` (`None`: in no site, treated as standard).
    pub fn for_site_kind(kind: Option<&str>) -> Role {
        match kind {
            Some("vpn") => Role {
                broadcast: true,
                answer: false,
                unicast: true,
            },
            Some("wifi") => Role {
                broadcast: false,
                answer: true,
                unicast: true,
            },
            _ => Role {
                broadcast: true,
                answer: true,
                unicast: true,
            },
        }
    }
}

/// The IPv4 subnets discovery works on: those of interfaces that are up, not
/// loopback, with room for more than one host (`/31` and `/32` have no peers to find).
pub fn subnets(ifs: &[crate::facts::IfAddr]) -> Vec<(String, Ipv4Net, Ipv4Addr)> {
    let mut v: Vec<(String, Ipv4Net, Ipv4Addr)> = ifs
        .iter()
        .filter_map(|i| match i.net {
            IpNet::V4(n) if !n.addr().is_loopback() && n.prefix_len() <= 30 => {
                Some((i.interface.clone(), n.trunc(), n.addr()))
            }
            _ => None,
        })
        .collect();
    v.sort_by_key(|(_, n, a)| (*n, *a));
    v.dedup_by_key(|(_, n, _)| *n);
    v
}

/// Complete IPv4 neighbour entries of `/proc/net/arp` text: (address, device).
pub fn parse_proc_arp(text: &str) -> Vec<(Ipv4Addr, String)> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let ip: Ipv4Addr = f.first()?.parse().ok()?;
            let flags = u32::from_str_radix(f.get(2)?.trim_start_matches("0x"), 16).ok()?;
            const ATF_COM: u32 = 0x2;
            (flags & ATF_COM != 0).then(|| (ip, f.get(5).copied().unwrap_or_default().to_string()))
        })
        .collect()
}

/// The addresses a subnet scan visits, one subnet after another, then again
/// from the start: hosts of subnets with a prefix of at least `prefix_min`
/// (larger subnets are not scanned), without this agent's own addresses.
#[derive(Debug, Clone)]
pub struct ScanPlan {
    nets: Vec<(Ipv4Net, Ipv4Addr)>,
    net: usize,
    host: u32,
}

impl ScanPlan {
    pub fn new(nets: &[(String, Ipv4Net, Ipv4Addr)], prefix_min: u8) -> Self {
        Self {
            nets: nets
                .iter()
                .filter(|(_, n, _)| n.prefix_len() >= prefix_min && n.prefix_len() <= 30)
                .map(|(_, n, a)| (*n, *a))
                .collect(),
            net: 0,
            host: 1,
        }
    }

    /// Addresses in one pass.
    pub fn pass_len(&self) -> u64 {
        self.nets
            .iter()
            .map(|(n, _)| (1u64 << (32 - n.prefix_len())).saturating_sub(3))
            .sum()
    }
}

impl Iterator for ScanPlan {
    type Item = Ipv4Addr;

    fn next(&mut self) -> Option<Ipv4Addr> {
        // Each subnet has at least one other host (prefix <= 30): a full turn finds one.
        for _ in 0..=self.nets.len() {
            let (n, me) = *self.nets.get(self.net)?;
            let size = 1u32 << (32 - n.prefix_len());
            while self.host < size - 1 {
                let a = Ipv4Addr::from(u32::from(n.network()) + self.host);
                self.host += 1;
                if a != me {
                    return Some(a);
                }
            }
            self.net = (self.net + 1) % self.nets.len();
            self.host = 1;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lowtide_engine::wire::DeploymentKey;

    const NOW: u64 = 1_800_000_000_000;

    fn key() -> DiscoveryKey {
        DiscoveryKey::from_deployment(&DeploymentKey::derive(b"s"))
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn discovery_core_finds_holders_and_answers_once() {
        let (mut a, mut b) = (Core::new(key(), 1, 4500, 90_000), Core::new(key(), 2, 4600, 90_000));
        let id = ContentId::of(b"pkg");
        let q = a.query(NOW, 77, Some(id), How::Broadcast);
        // a hears its own broadcast and ignores it.
        assert_eq!(a.on_datagram(NOW, sa("10.0.0.1:4501"), &q), Incoming::Own);
        let Incoming::Query { msg, .. } = b.on_datagram(NOW, sa("10.0.0.1:4501"), &q) else {
            panic!("b should be asked")
        };
        assert_eq!(msg.content, Some(id));
        // The same query again (a replay, or a duplicate copy): not answered twice.
        assert_eq!(
            b.on_datagram(NOW + 5, sa("10.0.0.1:4501"), &q),
            Incoming::Dropped("replayed")
        );
        let r = b.reply(NOW, &msg, 1000, true, true);
        assert_eq!(a.on_datagram(NOW + 1, sa("10.0.0.2:4501"), &r), Incoming::Reply);
        // A second copy of the reply adds no second entry; once taken, more replies are unsolicited.
        assert_eq!(a.on_datagram(NOW + 2, sa("10.0.0.2:4501"), &r), Incoming::Reply);
        let found = a.take_found(77);
        assert_eq!(found.len(), 1, "one entry per peer");
        assert_eq!(found[0].addr, sa("10.0.0.2:4600"), "the peer's engine port");
        assert!(found[0].complete && found[0].serving);
        assert_eq!(
            a.on_datagram(NOW + 3, sa("10.0.0.2:4501"), &r),
            Incoming::Dropped("unsolicited")
        );
        assert_eq!(a.peers().len(), 1);
        assert_eq!(a.stats().dropped.get("unsolicited"), Some(&1));
    }

    #[test]
    fn discovery_core_drops_peers_that_stop_answering() {
        let (mut a, mut b) = (Core::new(key(), 1, 4500, 90_000), Core::new(key(), 2, 4600, 90_000));
        let q = a.query(NOW, 5, None, How::Scan);
        let Incoming::Query { msg, .. } = b.on_datagram(NOW, sa("10.0.0.1:4501"), &q) else {
            panic!()
        };
        a.on_datagram(NOW, sa("10.0.0.2:4501"), &b.reply(NOW, &msg, 0, false, true));
        assert_eq!(a.peers()[0].how, How::Scan);
        a.expire(NOW + 90_000);
        assert_eq!(a.peers().len(), 1, "still within the timeout");
        a.expire(NOW + 90_001);
        assert!(a.peers().is_empty(), "silent too long: dropped");
        assert_eq!(a.stats().peers_dropped, 1);
    }

    #[test]
    fn discovery_core_rate_limits_replies_per_source() {
        let mut b = Core::new(key(), 2, 4600, 90_000);
        let mut a = Core::new(key(), 1, 4500, 90_000);
        let mut answered = 0;
        for n in 0..100u64 {
            let q = a.query(NOW, n, None, How::Scan);
            if matches!(b.on_datagram(NOW, sa("10.0.0.1:4501"), &q), Incoming::Query { .. }) {
                answered += 1;
            }
        }
        assert_eq!(answered, REPLIES_BURST, "a burst, then nothing");
        // Another source has its own bucket; the first refills with time.
        let q = a.query(NOW, 1000, None, How::Scan);
        assert!(matches!(
            b.on_datagram(NOW, sa("10.0.0.9:4501"), &q),
            Incoming::Query { .. }
        ));
        let q = a.query(NOW + 1000, 1001, None, How::Scan);
        assert!(matches!(
            b.on_datagram(NOW + 1000, sa("10.0.0.1:4501"), &q),
            Incoming::Query { .. }
        ));
        assert_eq!(b.stats().dropped.get("rate_limited"), Some(&(100 - REPLIES_BURST)));
    }

    #[test]
    fn discovery_core_counts_bad_packets_by_reason() {
        let mut b = Core::new(key(), 2, 4600, 90_000);
        let other = DiscoveryKey::from_deployment(&DeploymentKey::derive(b"other deployment"));
        let forged = wire::encode_query(&other, NOW, 9, 9, None, 1);
        assert_eq!(b.on_datagram(NOW, sa("10.0.0.1:1"), &forged), Incoming::Dropped("tag"));
        let old = wire::encode_query(&key(), NOW - 120_000, 9, 9, None, 1);
        assert_eq!(b.on_datagram(NOW, sa("10.0.0.1:1"), &old), Incoming::Dropped("stale"));
        assert_eq!(
            b.on_datagram(NOW, sa("10.0.0.1:1"), b"LD\x01"),
            Incoming::Dropped("malformed")
        );
        assert_eq!(
            b.on_datagram(NOW, sa("10.0.0.1:1"), &[0u8; 4000]),
            Incoming::Dropped("malformed")
        );
        assert_eq!(b.stats().queries_answered, 0);
    }

    #[test]
    fn discovery_core_accepts_the_previous_key_after_a_rotation() {
        let k = |s: &[u8]| DiscoveryKey::from_deployment(&DeploymentKey::derive(s));
        let mut old = Core::new(k(b"old"), 1, 4500, 90_000);
        let mut b = Core::new(k(b"old"), 2, 4600, 90_000);
        b.set_keys(k(b"new"), Some(k(b"old")));
        let q = old.query(NOW, 1, None, How::Scan);
        assert!(matches!(
            b.on_datagram(NOW, sa("10.0.0.1:1"), &q),
            Incoming::Query { .. }
        ));
        b.set_keys(k(b"newer"), Some(k(b"new")));
        let q = old.query(NOW, 2, None, How::Scan);
        assert_eq!(b.on_datagram(NOW, sa("10.0.0.1:1"), &q), Incoming::Dropped("tag"));
    }

    #[test]
    fn discovery_roles_follow_the_site_kind() {
        assert!(!Role::for_site_kind(Some("vpn")).answer);
        assert!(Role::for_site_kind(Some("vpn")).broadcast);
        assert!(!Role::for_site_kind(Some("wifi")).broadcast);
        assert!(Role::for_site_kind(Some("wifi")).answer);
        assert_eq!(Role::for_site_kind(None), Role::for_site_kind(Some("standard")));
        assert_eq!(
            Role::for_site_kind(Some("vpn")).unicast,
            Role::for_site_kind(Some("wifi")).unicast
        );
    }

    #[test]
    fn discovery_parses_the_neighbour_cache() {
        let text = "IP address       HW type     Flags       HW address            Mask     Device\n\
                    10.1.0.7         0x1         0x2         52:54:00:12:35:02     *        eth0\n\
                    10.1.0.9         0x1         0x0         00:00:00:00:00:00     *        eth0\n\
                    garbage line\n\
                    10.2.0.3         0x1         0x6         52:54:00:12:35:03     *        eth1\n";
        assert_eq!(
            parse_proc_arp(text),
            vec![
                ("10.1.0.7".parse().unwrap(), "eth0".to_string()),
                ("10.2.0.3".parse().unwrap(), "eth1".to_string())
            ]
        );
        assert!(parse_proc_arp("").is_empty());
    }

    #[test]
    fn discovery_scan_covers_small_subnets_only_and_skips_itself() {
        let nets = vec![
            (
                "eth0".to_string(),
                "10.1.0.0/29".parse().unwrap(),
                "10.1.0.3".parse().unwrap(),
            ),
            (
                "eth1".to_string(),
                "10.8.0.0/16".parse().unwrap(),
                "10.8.0.1".parse().unwrap(),
            ),
        ];
        let plan = ScanPlan::new(&nets, 22);
        assert_eq!(plan.pass_len(), 5);
        let seen: Vec<Ipv4Addr> = plan.take(10).collect();
        let first: Vec<String> = seen[..5].iter().map(|a| a.to_string()).collect();
        assert_eq!(first, ["10.1.0.1", "10.1.0.2", "10.1.0.4", "10.1.0.5", "10.1.0.6"]);
        assert_eq!(seen[5..], seen[..5], "then again from the start");
        assert_eq!(ScanPlan::new(&nets[1..], 22).next(), None, "a /16 is not scanned");
    }
}
