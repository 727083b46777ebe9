//! The discovery socket and its loops: the I/O shell around [`Core`].
//!
//! One UDP socket bound to `0.0.0.0:<discovery_port>` with `SO_BROADCAST`.
//! Broadcasts go to each interface subnet's directed broadcast address, so
//! the kernel sends each out of the interface of that subnet; replies and
//! unicast queries go to addresses in this agent's own subnets only, and a
//! discovered peer is used at the address it answered from, which is on the
//! subnet (and so the interface) the agent shares with it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::Ipv4Net;
use lowtide_engine::content::ContentId;
use lowtide_engine::wire::Keys;
use tokio::net::UdpSocket;

use super::{wire, Core, DiscoveryKey, Found, How, Incoming, Role, ScanPlan};
use crate::worker::{Cmd, Handle};

/// Most neighbour-cache entries queried per round.
pub const NEIGHBOURS_MAX: usize = 256;
/// Most content queries being answered at once (each asks the engine what it holds).
pub const ANSWERS_IN_FLIGHT_MAX: usize = 16;
/// How long one manifest chunk is waited for, and how many times it is asked for.
const CHUNK_WAIT: Duration = Duration::from_millis(500);
const CHUNK_TRIES: usize = 3;
/// How often a pending chunk is looked for.
const CHUNK_POLL: Duration = Duration::from_millis(10);
/// How often the round loop looks whether a round is due.
const ROUND_CHECK: Duration = Duration::from_secs(1);

/// The knobs, from the config (documented in `config.rs`).
#[derive(Debug, Clone)]
pub struct Settings {
    pub enabled: bool,
    pub port: u16,
    pub interval_secs: u64,
    pub peer_timeout_secs: u64,
    pub scan_per_sec: u32,
    pub scan_prefix_min: u8,
    pub lookup_ms: u64,
    /// Signed manifests kept by `get` ([`crate::manifests`]), handed to peers that ask.
    pub manifest_dir: std::path::PathBuf,
}

impl Settings {
    pub fn from_config(c: &crate::config::Config) -> Self {
        Self {
            enabled: c.discovery,
            port: c.discovery_port,
            interval_secs: c.discovery_interval_secs,
            peer_timeout_secs: c.discovery_peer_timeout_secs,
            scan_per_sec: c.discovery_scan_per_sec,
            scan_prefix_min: c.discovery_scan_prefix_min,
            lookup_ms: c.discovery_lookup_ms,
            manifest_dir: crate::manifests::dir(&c.state_dir),
        }
    }
}

/// Unix time in milliseconds (discovery packets carry it).
#[expect(
    clippy::disallowed_methods,
    reason = "the I/O shell reads the clock for the sans-IO core"
)]
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The discovery service of one agent.
pub struct Discovery {
    settings: Settings,
    sock: Option<UdpSocket>,
    /// Why discovery is not running, when it is not.
    error: Option<String>,
    core: Mutex<Core>,
    role: Mutex<Role>,
    /// Whether this agent serves peers now (replies say so).
    serving: AtomicBool,
    engine: Handle,
    answering: Arc<tokio::sync::Semaphore>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn bind(port: u16) -> std::io::Result<UdpSocket> {
    let s = std::net::UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], port)))?;
    s.set_broadcast(true)?;
    s.set_nonblocking(true)?;
    UdpSocket::from_std(s)
}

/// This agent's discovery subnets, now.
fn my_subnets() -> Vec<(String, Ipv4Net, Ipv4Addr)> {
    super::subnets(&crate::facts::interface_addresses().unwrap_or_default())
}

fn in_my_subnets(nets: &[(String, Ipv4Net, Ipv4Addr)], ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => nets.iter().any(|(_, n, me)| n.contains(&v4) && v4 != *me),
        IpAddr::V6(_) => false,
    }
}

impl Discovery {
    /// Bind the discovery port and start the loops (in the current tokio
    /// runtime). A port that cannot be bound turns discovery off with the
    /// reason in [`status`](Self::status) and the log; the agent runs on.
    pub fn start(settings: Settings, keys: &Keys, engine_port: u16, engine: Handle) -> Arc<Self> {
        let me = rand::random::<u64>();
        let mut core = Core::new(
            DiscoveryKey::from_deployment(&keys.current),
            me,
            engine_port,
            settings.peer_timeout_secs * 1000,
        );
        core.set_keys(
            DiscoveryKey::from_deployment(&keys.current),
            keys.previous.as_ref().map(DiscoveryKey::from_deployment),
        );
        let (sock, error) = if !settings.enabled {
            (None, Some("off (discovery = false)".to_string()))
        } else {
            match bind(settings.port) {
                Ok(s) => (Some(s), None),
                Err(e) => {
                    let msg = format!(
                        "cannot bind UDP port {} for discovery: {e}; peers come from the server only \
                         (change discovery_port, or free the port)",
                        settings.port
                    );
                    tracing::warn!("{msg}");
                    (None, Some(msg))
                }
            }
        };
        let d = Arc::new(Self {
            settings,
            sock,
            error,
            core: Mutex::new(core),
            role: Mutex::new(Role::UNKNOWN),
            serving: AtomicBool::new(true),
            engine,
            answering: Arc::new(tokio::sync::Semaphore::new(ANSWERS_IN_FLIGHT_MAX)),
            tasks: Mutex::new(Vec::new()),
        });
        if d.sock.is_some() {
            let mut t = lock(&d.tasks);
            t.push(tokio::spawn(d.clone().recv_loop()));
            t.push(tokio::spawn(d.clone().round_loop()));
            if d.settings.scan_per_sec > 0 {
                t.push(tokio::spawn(d.clone().scan_loop()));
            }
        }
        d
    }

    /// Stop the loops.
    pub fn stop(&self) {
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
    }

    /// Learn the site kind from a heartbeat answer (`None`: in no site).
    pub fn set_site_kind(&self, kind: Option<&str>) {
        let r = Role::for_site_kind(kind);
        let mut role = lock(&self.role);
        if *role != r {
            tracing::info!(?kind, broadcast = r.broadcast, answer = r.answer, "discovery role");
        }
        *role = r;
    }

    /// The deployment keys changed (the server rotated them).
    pub fn set_keys(&self, keys: &Keys) {
        lock(&self.core).set_keys(
            DiscoveryKey::from_deployment(&keys.current),
            keys.previous.as_ref().map(DiscoveryKey::from_deployment),
        );
    }

    /// Whether this agent serves peers now (said in replies).
    pub fn set_serving(&self, serving: bool) {
        self.serving.store(serving, Ordering::Relaxed);
    }

    fn role(&self) -> Role {
        *lock(&self.role)
    }

    async fn send(&self, pkt: &[u8], to: SocketAddr) {
        if let Some(s) = &self.sock {
            if let Err(e) = s.send_to(pkt, to).await {
                tracing::debug!("discovery to {to}: {e}");
            }
        }
    }

    async fn recv_loop(self: Arc<Self>) {
        let Some(sock) = &self.sock else { return };
        // Larger than any packet, so an oversized one is seen as such and not cut to size.
        let mut buf = [0u8; 2048];
        loop {
            let (n, from) = match sock.recv_from(&mut buf).await {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!("discovery receive: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let got = lock(&self.core).on_datagram(now_ms(), from, &buf[..n]);
            let Incoming::Query { from, msg } = got else { continue };
            if !self.role().answer {
                continue;
            }
            if msg.kind == wire::KIND_MANIFEST_QUERY {
                let Some(id) = msg.content else { continue };
                let Ok(permit) = self.answering.clone().try_acquire_owned() else {
                    continue;
                };
                let d = self.clone();
                tokio::spawn(async move {
                    let dir = d.settings.manifest_dir.clone();
                    let signed = tokio::task::spawn_blocking(move || {
                        crate::manifests::load_bytes(&dir, &id, wire::MANIFEST_BYTES_MAX)
                    })
                    .await
                    .ok()
                    .flatten();
                    // Not kept here: stay silent, as for content this agent does not hold.
                    let chunk = signed.and_then(|s| lock(&d.core).manifest_chunk(now_ms(), &msg, &s));
                    if let Some(c) = chunk {
                        d.send(&c, from).await;
                    }
                    drop(permit);
                });
                continue;
            }
            let Some(id) = msg.content else {
                let r = lock(&self.core).reply(now_ms(), &msg, 0, false, self.serving.load(Ordering::Relaxed));
                self.send(&r, from).await;
                continue;
            };
            // Asking the engine takes a loop turn: answer content queries beside the receive loop.
            let Ok(permit) = self.answering.clone().try_acquire_owned() else {
                continue;
            };
            let d = self.clone();
            tokio::spawn(async move {
                let held = d.engine.call(|reply| Cmd::Held { id, reply }).await.ok().flatten();
                // Holding nothing: stay silent (a broadcast would otherwise draw a reply from every agent).
                if let Some(h) = held.filter(|h| h.held_bytes > 0) {
                    let permille = (h.held_bytes.saturating_mul(1000) / h.size.max(1)).min(1000) as u16;
                    let serving = d.serving.load(Ordering::Relaxed);
                    let r = lock(&d.core).reply(now_ms(), &msg, permille.max(1), h.complete, serving);
                    d.send(&r, from).await;
                }
                drop(permit);
            });
        }
    }

    /// Queries to send for one round or look-up: (address, how).
    fn targets(&self, role: Role, nets: &[(String, Ipv4Net, Ipv4Addr)]) -> Vec<(IpAddr, How)> {
        let mut out: Vec<(IpAddr, How)> = Vec::new();
        if role.broadcast {
            out.extend(nets.iter().map(|(_, n, _)| (IpAddr::V4(n.broadcast()), How::Broadcast)));
        }
        if role.unicast {
            if !role.broadcast {
                out.extend(lock(&self.core).peers().iter().map(|p| (p.ip, How::Known)));
            }
            // This thread's network namespace (the process's /proc/net may be another's).
            let arp = std::fs::read_to_string("/proc/thread-self/net/arp")
                .or_else(|_| std::fs::read_to_string("/proc/net/arp"))
                .unwrap_or_default();
            let core = lock(&self.core);
            out.extend(
                super::parse_proc_arp(&arp)
                    .into_iter()
                    .map(|(ip, _)| IpAddr::V4(ip))
                    .filter(|ip| in_my_subnets(nets, *ip) && !core.knows(ip))
                    .take(NEIGHBOURS_MAX)
                    .map(|ip| (ip, How::Neighbour)),
            );
        }
        out
    }

    async fn round_loop(self: Arc<Self>) {
        let interval_ms = self.settings.interval_secs.max(1) * 1000;
        let mut last: Option<u64> = None;
        loop {
            tokio::time::sleep(ROUND_CHECK).await;
            let role = self.role();
            let now = now_ms();
            lock(&self.core).expire(now);
            if role == Role::UNKNOWN || last.is_some_and(|l| now.saturating_sub(l) < interval_ms) {
                continue;
            }
            last = Some(now);
            let nets = my_subnets();
            for (ip, how) in self.targets(role, &nets) {
                let pkt = lock(&self.core).query(now_ms(), rand::random(), None, how);
                self.send(&pkt, SocketAddr::new(ip, self.settings.port)).await;
            }
        }
    }

    async fn scan_loop(self: Arc<Self>) {
        let every = Duration::from_micros(1_000_000 / u64::from(self.settings.scan_per_sec.max(1)));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut plan = ScanPlan::new(&[], 32);
        let mut left = 0u64;
        loop {
            tick.tick().await;
            if !self.role().unicast {
                continue;
            }
            if left == 0 {
                // A new pass, over the subnets the agent is on now.
                plan = ScanPlan::new(&my_subnets(), self.settings.scan_prefix_min);
                left = plan.pass_len();
                if left == 0 {
                    tokio::time::sleep(Duration::from_secs(self.settings.interval_secs.max(1))).await;
                    continue;
                }
            }
            left -= 1;
            let Some(a) = plan.next() else {
                left = 0;
                continue;
            };
            let ip = IpAddr::V4(a);
            if lock(&self.core).knows(&ip) {
                continue;
            }
            let pkt = lock(&self.core).query(now_ms(), rand::random(), None, How::Scan);
            self.send(&pkt, SocketAddr::new(ip, self.settings.port)).await;
        }
    }

    /// Ask the local subnets who holds `id`, waiting at most `discovery_lookup_ms`.
    /// Only peers on this agent's own subnets that hold some of it and serve now count.
    pub async fn lookup(&self, id: ContentId) -> Vec<Found> {
        let role = self.role();
        if self.sock.is_none() || self.settings.lookup_ms == 0 || role == Role::UNKNOWN {
            return Vec::new();
        }
        let nets = my_subnets();
        let mut targets = self.targets(role, &nets);
        if role.broadcast {
            // Neighbours are on the broadcast subnets: a unicast copy of the query would be a duplicate.
            targets.retain(|(_, how)| *how == How::Broadcast);
        }
        if targets.is_empty() {
            return Vec::new();
        }
        let nonce = rand::random::<u64>();
        let how = if role.broadcast { How::Broadcast } else { How::Known };
        let pkt = lock(&self.core).query(now_ms(), nonce, Some(id), how);
        for (ip, _) in &targets {
            self.send(&pkt, SocketAddr::new(*ip, self.settings.port)).await;
        }
        tokio::time::sleep(Duration::from_millis(self.settings.lookup_ms)).await;
        lock(&self.core)
            .take_found(nonce)
            .into_iter()
            .filter(|f| f.serving && f.held_permille > 0 && in_my_subnets(&nets, f.addr.ip()))
            .collect()
    }

    /// The signed manifest of `id` as `peer` (on this agent's subnets) kept it: signature,
    /// then the signed text ([`crate::manifests`]). Not checked here: the caller checks it
    /// against the pinned server key before it trusts or stores anything.
    pub async fn fetch_manifest(&self, id: ContentId, peer: IpAddr) -> anyhow::Result<Vec<u8>> {
        if self.sock.is_none() {
            anyhow::bail!(
                "discovery is not running ({})",
                self.error.as_deref().unwrap_or("no socket")
            );
        }
        if !in_my_subnets(&my_subnets(), peer) {
            anyhow::bail!("{peer} is not on this agent's subnets");
        }
        let to = SocketAddr::new(peer, self.settings.port);
        let mut out: Vec<u8> = Vec::new();
        let mut total: Option<u32> = None;
        while total.is_none_or(|t| out.len() < t as usize) {
            let offset = out.len() as u32;
            let mut got = None;
            'tries: for _ in 0..CHUNK_TRIES {
                let nonce = rand::random::<u64>();
                let pkt = lock(&self.core).manifest_query(now_ms(), nonce, id, offset, peer);
                self.send(&pkt, to).await;
                for _ in 0..(CHUNK_WAIT.as_millis() / CHUNK_POLL.as_millis()) {
                    tokio::time::sleep(CHUNK_POLL).await;
                    if let Some(c) = lock(&self.core).take_chunk(nonce) {
                        got = Some(c);
                        break 'tries;
                    }
                }
            }
            let Some((t, bytes)) = got else {
                anyhow::bail!(
                    "{peer} did not send the manifest of {} (from byte {offset})",
                    id.short()
                );
            };
            if total.is_some_and(|x| x != t) {
                anyhow::bail!(
                    "{peer} sent parts of two manifests of {} of different sizes",
                    id.short()
                );
            }
            total = Some(t);
            out.extend_from_slice(&bytes);
        }
        Ok(out)
    }

    /// The hook for `get`: add peers on the local subnets that hold `id` to
    /// `peers` (same-site, foreground), unless the server named them already.
    pub async fn add_peers(&self, id: ContentId, peers: &mut Vec<(SocketAddr, String)>) {
        for f in self.lookup(id).await {
            if peers.iter().any(|(a, _)| a.ip() == f.addr.ip()) {
                continue;
            }
            let how = match f.how {
                How::Broadcast => "broadcast",
                How::Neighbour => "neighbour cache",
                How::Scan => "subnet scan",
                How::Known => "query to a known peer",
            };
            let held = if f.complete {
                "all of it".to_string()
            } else {
                format!("{:.1}%", f64::from(f.held_permille) / 10.0)
            };
            tracing::info!(
                "{}: discovered {} on the local subnet ({how}), holds {held}",
                id.short(),
                f.addr
            );
            peers.push((
                f.addr,
                format!("{}: discovered on the local subnet ({how}), holds {held}", f.addr),
            ));
        }
    }

    /// Peers in the table now.
    pub fn peer_count(&self) -> usize {
        lock(&self.core).peers().len()
    }

    /// Dropped packets by reason.
    pub fn dropped(&self) -> Vec<(&'static str, u64)> {
        lock(&self.core).stats().dropped.iter().map(|(k, v)| (*k, *v)).collect()
    }

    /// For `status` and `peers`.
    pub fn status(&self) -> serde_json::Value {
        let core = lock(&self.core);
        let now = now_ms();
        serde_json::json!({
            "running": self.sock.is_some(),
            "port": self.settings.port,
            "error": self.error,
            "role": (self.role() != Role::UNKNOWN).then(|| self.role()),
            "serving": self.serving.load(Ordering::Relaxed),
            "peers": core.peers().iter().map(|p| serde_json::json!({
                "addr": SocketAddr::new(p.ip, p.port),
                "how": p.how,
                "serving": p.serving,
                "last_seen_secs": now.saturating_sub(p.last_seen_ms) / 1000,
            })).collect::<Vec<_>>(),
            "stats": core.stats(),
            "packet_bytes": {
                "query": wire::QUERY_BYTES, "reply": wire::REPLY_BYTES,
                "manifest_query": wire::MANIFEST_QUERY_BYTES, "manifest_chunk": wire::MANIFEST_CHUNK_BYTES,
            },
        })
    }
}
