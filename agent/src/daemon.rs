//! `lowtide-agent run`: the daemon.
//!
//! - enrols with the token on first start and keeps the credential (and the
//!   server's manifest key, pinned) in `<state_dir>/credential.json`, mode 0600;
//! - heartbeats with the machine's facts, and reports inventory (complete
//!   content, byte ranges of partial content) when it changes;
//! - runs the engine on its own thread ([`crate::worker`]), serving the store
//!   to peers on the configured UDP address;
//! - answers commands on `<state_dir>/agent.sock` ([`crate::proto`]): `get`
//!   checks the signed manifest against the pinned key, verifies the block
//!   table, asks the server for sources, fetches from peers with the engine
//!   and falls back to the origin ([`crate::origin`]) when no peer can serve.
//!
//! Peers on the local subnets found by [`crate::discovery`] join the
//! same-site peers the server names.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use lowtide_engine::content::{BlockTable, ContentId};
use lowtide_engine::endpoint::{Endpoint, EndpointConfig};
use lowtide_engine::store::Store;
use lowtide_engine::wire::DeploymentKey;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

use crate::config::Config;
use crate::facts;
use crate::proto::{self, GetDone, Progress, Reply, Request, REQUEST_BYTES_MAX};
use crate::server::{self, Client, Facts, Inventory, InventoryItem, Protocol, SourceKind, TrafficReport};
use crate::tls::{self, PinVerifier};
use crate::worker::{self, Cmd, Dropped, Handle, Held, SourceView};

/// Most looks (50 ms apart) for a completed fetch's per-source figures.
const FINAL_STATS_POLLS_MAX: usize = 40;
/// Most ticks a finished fetch's last commit may take before the store shows the content complete.
const FINISHING_TICKS_MAX: u64 = 40;
/// How often a download looks at its progress.
const TICK: Duration = Duration::from_millis(250);
/// Most byte ranges reported per partial content (fewer is safe: under-reporting).
pub const INVENTORY_RANGES_MAX: usize = 64;
/// Most finished downloads kept for `status`.
const RECENT_MAX: usize = 16;
/// Most peers remembered for `peers` and `status`.
pub const PEERS_KNOWN_MAX: usize = 256;
/// Most control connections served at once.
const CONNECTIONS_MAX: usize = 64;
/// Heartbeat interval when neither the config nor the server gives one.
const HEARTBEAT_SECS_DEFAULT: u64 = 60;
/// Wait before retrying a failed heartbeat.
const HEARTBEAT_RETRY_SECS: u64 = 5;
/// How often the interface addresses are looked at between heartbeats; a
/// change (a new network, DHCP, a moved VM) heartbeats at once, so the server
/// places the agent in its new site and downloads ask for the new site's peers.
const ADDRESS_POLL: Duration = Duration::from_secs(2);
/// How long one assignments request waits on the server (under the client's request timeout).
const ASSIGNMENTS_WAIT_MS: u64 = 20_000;
/// Wait before asking for assignments again after a failed request, and before retrying
/// an assigned download that failed.
const ASSIGNMENT_RETRY_SECS: u64 = 10;
/// An assigned download that ended well is not taken again for this long (the server may not
/// have the new inventory yet); after that, being assigned it again means the site wants it
/// again (this agent lost some of it), and it is fetched at once.
const ASSIGNMENT_DONE_QUIET: Duration = Duration::from_secs(2);
/// Most assignments shown in `status`.
const ASSIGNMENTS_SHOWN_MAX: usize = 64;

/// What enrolment gave this agent, kept in the state directory (mode 0600).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Credential {
    pub server_url: String,
    pub agent_id: String,
    pub credential: String,
    /// The server's Ed25519 manifest key, pinned at enrolment.
    pub server_public_key: String,
    pub heartbeat_secs: u64,
    /// The P2P deployment keys (hex) the server last handed out, kept so the agent serves
    /// and fetches from peers while the server is unreachable.
    #[serde(default)]
    pub deployment_key: Option<String>,
    #[serde(default)]
    pub deployment_key_previous: Option<String>,
    /// The https server's key (SHA-256 of its SPKI), pinned at enrolment.
    #[serde(default)]
    pub server_spki_sha256: Option<String>,
}

/// The engine's keys: from `deployment_secret` when set (it overrides the server), else
/// the server's `current` and `previous` (hex).
pub fn p2p_keys(
    secret: Option<&str>,
    current: Option<&str>,
    previous: Option<&str>,
) -> anyhow::Result<lowtide_engine::wire::Keys> {
    use lowtide_engine::wire::Keys;
    if let Some(s) = secret {
        return Ok(Keys::new(DeploymentKey::derive(s.as_bytes())));
    }
    let parse = |h: &str| -> anyhow::Result<DeploymentKey> {
        let mut k = [0u8; 32];
        hex::decode_to_slice(h, &mut k).map_err(|_| {
            anyhow!("the deployment key from the server is not 64 hex characters; delete the credential file and enrol again")
        })?;
        Ok(DeploymentKey(k))
    };
    let Some(current) = current else {
        bail!(
            "the server handed out no P2P deployment key (a server older than this agent?): \
             upgrade the server, or set deployment_secret (LOWTIDE_DEPLOYMENT_SECRET) to the same passphrase on every agent"
        );
    };
    Ok(Keys {
        current: parse(current)?,
        previous: previous.map(parse).transpose()?,
    })
}

/// Write `bytes` to `path` atomically with mode 0600.
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

/// The server's client. Over https its key is pinned: the config's `server_spki_sha256`,
/// else the one kept in the credential file; with neither (enrolment) the system's trust
/// store decides and the key it accepted is pinned when the credential is written.
fn server_client(cfg: &Config, url: &str) -> anyhow::Result<Client> {
    if !url.starts_with("https://") {
        return Client::new(url);
    }
    let from_cfg = cfg.server_spki_sha256.as_deref().map(tls::parse_pin).transpose()?;
    let from_cred = std::fs::read(cfg.credential_path())
        .ok()
        .and_then(|b| serde_json::from_slice::<Credential>(&b).ok())
        .and_then(|c| c.server_spki_sha256);
    let pin = from_cfg.or(from_cred);
    let v = PinVerifier::new(pin.clone(), pin.is_none())?;
    Client::with_verifier(url, Some(&v))
}

async fn load_or_enrol(cfg: &Config, client: &Client, hostname: &str) -> anyhow::Result<Credential> {
    let path = cfg.credential_path();
    if path.exists() {
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let c: Credential = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is damaged; delete it and start again with an enrol_token to enrol anew",
                path.display()
            )
        })?;
        if c.server_url != client.base() {
            tracing::warn!(
                "enrolled with {} but server_url is now {}; using the credential anyway (delete {} to enrol again)",
                c.server_url,
                client.base(),
                path.display()
            );
        }
        return Ok(c);
    }
    let Some(token) = cfg.enrol_token.as_deref() else {
        bail!(
            "this agent is not enrolled and has no enrol_token: create one with `lowtide-server token create` \
             and set enrol_token in the config file or LOWTIDE_ENROL_TOKEN"
        );
    };
    let e = client
        .enrol(token, hostname)
        .await
        .context("enrolling with the token (a token can be used only as often as it was created for)")?;
    let c = Credential {
        server_url: client.base().to_string(),
        agent_id: e.agent_id,
        credential: e.credential,
        server_public_key: e.server_public_key,
        heartbeat_secs: e.heartbeat_secs,
        deployment_key: e.deployment_key,
        deployment_key_previous: e.deployment_key_previous,
        server_spki_sha256: client.pinned(),
    };
    write_private(&path, &serde_json::to_vec_pretty(&c)?)?;
    tracing::info!(agent = %c.agent_id, "enrolled; credential kept in {}", path.display());
    Ok(c)
}

#[derive(Debug, Default, Clone, Copy, Serialize)]
struct Totals {
    /// From peers of this site (foreground).
    peer: u64,
    /// From the parent site's RVP (background).
    parent: u64,
    origin: u64,
}

/// A peer the server named as a source, as last named.
#[derive(Debug, Clone, Serialize)]
pub struct PeerInfo {
    pub addr: SocketAddr,
    pub agent_id: Option<String>,
    pub site: Option<String>,
    pub kind: SourceKind,
    pub protocol: Protocol,
    /// The server's reason for ranking it, for the last content asked about.
    pub reason: String,
    pub content: ContentId,
    pub held_percent: u64,
}

#[derive(Default)]
struct State {
    site: Option<String>,
    site_kind: Option<String>,
    heartbeat_error: Option<String>,
    totals: Totals,
    unreported: TrafficReport,
    /// Peers the server named, by address (at most [`PEERS_KNOWN_MAX`]).
    peers: BTreeMap<SocketAddr, PeerInfo>,
    recent: VecDeque<GetDone>,
    last_inventory: Option<Vec<Held>>,
    metrics_addr: Option<SocketAddr>,
    /// Why this agent refuses to serve now, if it does.
    serving_refused: Option<String>,
    /// Last CPU and disk use sampled, percent.
    cpu_percent: Option<u8>,
    disk_percent: Option<u8>,
    /// Downloads the server assigned to this agent as its site's RVP (at most
    /// [`ASSIGNMENTS_SHOWN_MAX`]).
    assigned: BTreeMap<ContentId, Assigned>,
}

/// A download the server assigned to this agent as its site's RVP, run in the background.
#[derive(Debug, Clone, Serialize)]
pub struct Assigned {
    pub content: ContentId,
    pub site: String,
    /// `fetching`, `done` or `failed`.
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Unix milliseconds of the last state change.
    pub since_ms: u64,
    /// Monotonic instant it ended, for the back-off before the same content is run again.
    #[serde(skip)]
    pub ended_at: Option<tokio::time::Instant>,
}

struct Shared {
    cfg: Config,
    client: Client,
    /// For the origins; replaced when this machine's addresses change, like the server client's.
    http: std::sync::RwLock<reqwest::Client>,
    /// What checks the origins' TLS certificates (https only), for the replacements.
    origin_verifier: Option<Arc<crate::tls::PinVerifier>>,
    cred: Credential,
    hostname: String,
    engine: Handle,
    discovery: Arc<crate::discovery::service::Discovery>,
    state: Mutex<State>,
    /// One download per content at a time; a second `get` waits for the first.
    locks: Mutex<HashMap<ContentId, Arc<tokio::sync::Mutex<()>>>>,
    inventory_now: tokio::sync::Notify,
    /// Woken when whether this agent serves peers changes: the server hears of it at once
    /// (its RVP elections prefer agents that serve).
    heartbeat_now: tokio::sync::Notify,
    /// The server's deployment keys (current, previous) the engine runs with.
    server_keys: Mutex<(Option<String>, Option<String>)>,
}

impl Shared {
    fn origin_http(&self) -> reqwest::Client {
        self.http.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// New HTTP connection pools: the pooled connections may be bound to an address that is gone.
    fn reset_connections(&self) {
        match server::http_client_with(self.origin_verifier.as_ref()) {
            Ok(fresh) => *self.http.write().unwrap_or_else(|p| p.into_inner()) = fresh,
            Err(e) => tracing::warn!("{e:#}"),
        }
        if let Err(e) = self.client.reset_connections() {
            tracing::warn!("{e:#}");
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this agent serves peers now, as its heartbeat tells the server: not with
    /// `uploads_max = 0` (the engine's `sessions_max` is 0) nor while [`busy_loop`] has the
    /// engine refuse (on battery, busy CPU or disk, a VPN site). Either way every peer gets
    /// `DeviceBusy`.
    fn serves(&self) -> bool {
        self.cfg.uploads_max > 0 && self.state().serving_refused.is_none()
    }
}

/// Run the daemon until SIGINT or SIGTERM.
/// `mon` is the egress monitor [`crate::monitor::setup`] attached before any thread started.
pub async fn run(cfg: Config, mut mon: crate::monitor::EgressWatch) -> anyhow::Result<()> {
    let (url, secret) = cfg.check_for_daemon()?;
    std::fs::create_dir_all(&cfg.state_dir).with_context(|| {
        format!(
            "creating the state directory {} (set state_dir or LOWTIDE_STATE_DIR to a writable place)",
            cfg.state_dir.display()
        )
    })?;
    // Before touching the store: is another daemon using this state directory?
    let sock = cfg.socket_path();
    if sock.exists() && std::os::unix::net::UnixStream::connect(&sock).is_ok() {
        bail!(
            "another lowtide-agent is running with this state directory (its socket {} answers)",
            sock.display()
        );
    }
    // Enrol (or read the credential) first: the engine is keyed with what the server hands out.
    let client = server_client(&cfg, url)?;
    let hostname = if cfg.hostname.is_empty() {
        facts::hostname()
    } else {
        cfg.hostname.clone()
    };
    let cred = load_or_enrol(&cfg, &client, &hostname).await?;
    // Enrolled just now on the system's trust store: from here on, only the key it pinned.
    let client = server_client(&cfg, url)?;
    let https = url.starts_with("https://");
    if https && cred.server_spki_sha256.is_none() && cfg.server_spki_sha256.is_none() {
        tracing::warn!(
            "the server's TLS key is not pinned (enrolled before pinning existed): it is checked against \
             the system's trust store; delete {} and enrol again to pin it",
            cfg.credential_path().display()
        );
    }
    // Origins: the pinned key (the server's own /files) or what the system trusts.
    let origin_pin = cfg.server_spki_sha256.as_deref().map(tls::parse_pin).transpose()?;
    let origins = https
        .then(|| PinVerifier::new(origin_pin.or(cred.server_spki_sha256.clone()), true))
        .transpose()?;
    let keys = p2p_keys(
        secret,
        cred.deployment_key.as_deref(),
        cred.deployment_key_previous.as_deref(),
    )?;
    let disc_keys = keys.clone();
    if secret.is_some() {
        tracing::info!("P2P packets keyed by deployment_secret from the config (the server's key is not used)");
    } else if url.starts_with("http://") {
        tracing::warn!(
            "server_url is http://: the P2P deployment key and credentials cross the network in clear; use https"
        );
    }
    // The endpoint is not Send: it is opened on the engine thread, which reports how that went.
    let (store_dir, limit, listen, driver) = (cfg.store_dir(), cfg.cache_limit_bytes(), cfg.listen, cfg.driver);
    let server_cfg = lowtide_engine::session::serve::ServerConfig {
        sessions_max: cfg.uploads_max,
        require_encryption: cfg.require_encryption,
        upload_bytes_per_sec_max: cfg.upload_bytes_per_sec_max,
        ..Default::default()
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let (up_tx, up_rx) = std::sync::mpsc::channel::<anyhow::Result<SocketAddr>>();
    let engine_thread = std::thread::Builder::new()
        .name("lowtide-engine".into())
        .spawn(move || {
            let ep = Store::open(&store_dir, limit)
                .with_context(|| format!("opening the content store in {}", store_dir.display()))
                .and_then(|store| {
                    Endpoint::bind(
                        listen,
                        keys.current.clone(),
                        store,
                        EndpointConfig {
                            driver,
                            server: server_cfg,
                            ..EndpointConfig::default()
                        },
                    )
                    .with_context(|| format!("starting the engine on UDP {listen} (change listen or LOWTIDE_LISTEN)"))
                });
            match ep {
                Ok(mut ep) => {
                    ep.set_keys(keys);
                    let _ = up_tx.send(Ok(ep.local_addr()));
                    mon.add_own_port(ep.local_addr().port());
                    worker::run(ep, mon, rx)
                }
                Err(e) => {
                    let _ = up_tx.send(Err(e));
                }
            }
        })
        .context("spawning the engine thread")?;
    let udp = up_rx
        .recv()
        .map_err(|_| anyhow!("the engine thread stopped while starting"))??;
    let engine = Handle::new(tx);
    #[cfg(debug_assertions)]
    if let Err(e) = crate::test_hooks::at_start(&engine).await {
        engine.send(Cmd::Stop);
        let _ = engine_thread.join();
        return Err(e.context("running the test hooks"));
    }

    let started = async {
        let metrics = match cfg.metrics_listen {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding metrics_listen {addr} (change it or LOWTIDE_METRICS_LISTEN)"))?,
            ),
            None => None,
        };
        let listener = bind_socket(&cfg.socket_path())?;
        anyhow::Ok((metrics, listener))
    }
    .await;
    let (metrics_listener, listener) = match started {
        Ok(v) => v,
        Err(e) => {
            engine.send(Cmd::Stop);
            let _ = engine_thread.join();
            return Err(e);
        }
    };
    let sock_path = cfg.socket_path();
    let discovery = crate::discovery::service::Discovery::start(
        crate::discovery::service::Settings::from_config(&cfg),
        &disc_keys,
        udp.port(),
        engine.clone(),
    );
    let sh = Arc::new(Shared {
        discovery,
        http: std::sync::RwLock::new(server::http_client_with(origins.as_ref())?),
        origin_verifier: origins,
        server_keys: Mutex::new((cred.deployment_key.clone(), cred.deployment_key_previous.clone())),
        cfg,
        client,
        cred,
        hostname,
        engine: engine.clone(),
        state: Mutex::new(State::default()),
        locks: Mutex::new(HashMap::new()),
        inventory_now: tokio::sync::Notify::new(),
        heartbeat_now: tokio::sync::Notify::new(),
    });
    tracing::info!(
        agent = %sh.cred.agent_id,
        udp = %udp,
        socket = %sock_path.display(),
        server = %sh.client.base(),
        "lowtide-agent running"
    );
    let hb = tokio::spawn(heartbeat_loop(sh.clone()));
    let inv = tokio::spawn(inventory_loop(sh.clone()));
    let busy = tokio::spawn(busy_loop(sh.clone()));
    let asg = tokio::spawn(assignment_loop(sh.clone()));
    let acc = tokio::spawn(accept_loop(sh.clone(), listener));
    let metrics = metrics_listener.map(|l| {
        let bound = l.local_addr().ok();
        if let Some(b) = bound {
            tracing::info!("Prometheus metrics at http://{b}/metrics");
        }
        sh.state().metrics_addr = bound;
        tokio::spawn(metrics_loop(sh.clone(), l))
    });
    crate::systemd::notify(&format!("READY=1\nSTATUS=serving on UDP {udp}"));
    let wd = crate::systemd::watchdog_from_env().map(|every| tokio::spawn(watchdog_loop(sh.clone(), every)));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    tracing::info!("shutting down");
    crate::systemd::notify("STOPPING=1");
    if let Some(wd) = wd {
        wd.abort();
    }
    acc.abort();
    if let Some(m) = metrics {
        m.abort();
    }
    hb.abort();
    inv.abort();
    busy.abort();
    sh.discovery.stop();
    asg.abort();
    let _ = std::fs::remove_file(&sock_path);
    engine.send(Cmd::Stop);
    tokio::task::spawn_blocking(move || engine_thread.join())
        .await
        .ok()
        .and_then(Result::ok)
        .ok_or_else(|| anyhow!("the engine thread panicked"))?;
    tracing::info!("stopped");
    Ok(())
}

fn bind_socket(path: &Path) -> anyhow::Result<UnixListener> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another lowtide-agent is running with this state directory (its socket {} answers)",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let l = UnixListener::bind(path).with_context(|| format!("binding the control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    Ok(l)
}

/// Tell systemd we are alive while the engine thread answers within the interval.
async fn watchdog_loop(sh: Arc<Shared>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let alive = tokio::time::timeout(every, sh.engine.call(|reply| Cmd::Snapshot { reply })).await;
        match alive {
            Ok(Ok(_)) => {
                crate::systemd::notify("WATCHDOG=1");
            }
            _ => tracing::error!("the engine thread did not answer within {every:?}; not petting the watchdog"),
        }
    }
}

// ---- membership ----

async fn gather_facts(sh: &Shared) -> anyhow::Result<Facts> {
    let snap = sh.engine.call(|reply| Cmd::Snapshot { reply }).await?;
    let ifs = facts::interface_addresses().context("listing interface addresses")?;
    let (addresses, subnets) = facts::addresses_and_subnets(&ifs, &sh.cfg.advertise_addresses);
    let (free, avail) = facts::disk_free(&sh.cfg.state_dir).unwrap_or((0, 0));
    let room = snap.store_limit_bytes.saturating_sub(snap.store_used_bytes);
    Ok(Facts {
        hostname: sh.hostname.clone(),
        addresses,
        subnets,
        port: snap.udp.port(),
        disk_free_bytes: free,
        disk_usable_bytes: avail.min(room),
        chassis: facts::chassis(),
        os_type: facts::os_type(),
        uptime_secs: facts::uptime_secs(),
        preferred: sh.cfg.preferred,
        site_override: sh.cfg.site_override.clone(),
        serves: sh.serves(),
    })
}

async fn heartbeat_once(sh: &Shared) -> anyhow::Result<u64> {
    let f = gather_facts(sh).await?;
    let r = sh.client.heartbeat(&sh.cred.credential, &f).await?;
    update_keys(sh, &r.deployment_key, &r.deployment_key_previous)?;
    let report = {
        let mut st = sh.state();
        if st.site != r.site {
            tracing::info!(site = ?r.site, kind = ?r.site_kind, "site");
        }
        sh.discovery.set_site_kind(r.site_kind.as_deref());
        st.site = r.site;
        st.site_kind = r.site_kind;
        st.heartbeat_error = None;
        std::mem::take(&mut st.unreported)
    };
    if report != TrafficReport::default() {
        if let Err(e) = sh.client.traffic(&sh.cred.credential, &report).await {
            tracing::warn!("{e:#}");
            let mut st = sh.state();
            st.unreported.lan_bytes += report.lan_bytes;
            st.unreported.wan_bytes += report.wan_bytes;
            st.unreported.origin_bytes += report.origin_bytes;
        }
    }
    Ok(r.heartbeat_secs)
}

/// The server rotated the deployment key: keep the new keys in the credential file and
/// key the engine with them (unless `deployment_secret` overrides the server's key).
fn update_keys(sh: &Shared, current: &Option<String>, previous: &Option<String>) -> anyhow::Result<()> {
    if sh.cfg.deployment_secret.is_some() || current.is_none() {
        return Ok(());
    }
    let new = (current.clone(), previous.clone());
    if *sh.server_keys.lock().unwrap_or_else(|p| p.into_inner()) == new {
        return Ok(());
    }
    let keys = p2p_keys(None, current.as_deref(), previous.as_deref())?;
    let mut c = sh.cred.clone();
    (c.deployment_key, c.deployment_key_previous) = new.clone();
    write_private(&sh.cfg.credential_path(), &serde_json::to_vec_pretty(&c)?)?;
    sh.discovery.set_keys(&keys);
    sh.engine.send(Cmd::SetKeys(keys));
    *sh.server_keys.lock().unwrap_or_else(|p| p.into_inner()) = new;
    tracing::info!("the server rotated the P2P deployment key; the engine uses the new one");
    Ok(())
}

/// Sample CPU, disk and power every `busy_check_secs`; refuse to serve while
/// the device is busy, on battery or on a VPN site ([`crate::busy`]).
async fn busy_loop(sh: Arc<Shared>) {
    let limits = crate::busy::Limits {
        cpu_percent_max: sh.cfg.busy_cpu_percent_max,
        disk_percent_max: sh.cfg.busy_disk_percent_max,
        serve_on_battery: sh.cfg.serve_on_battery,
    };
    let every = Duration::from_secs(sh.cfg.busy_check_secs);
    let proc_dir = Path::new("/proc");
    let mut before = crate::busy::Reading::from_proc(proc_dir);
    let mut first = true;
    loop {
        // The first check comes at once for what needs no interval (battery, site kind).
        if !first {
            tokio::time::sleep(every).await;
        }
        let after = crate::busy::Reading::from_proc(proc_dir);
        let (cpu, disk) = if first {
            (None, None)
        } else {
            crate::busy::usage(&before, &after, every.as_millis() as u64)
        };
        first = false;
        before = after;
        let battery = crate::busy::on_battery(&sh.cfg.power_supply_dir);
        let changed = {
            let mut st = sh.state();
            let why = limits.refusal(cpu, disk, battery, st.site_kind.as_deref());
            st.cpu_percent = cpu;
            st.disk_percent = disk;
            let changed = (why.is_some() != st.serving_refused.is_some()).then(|| why.clone());
            st.serving_refused = why;
            changed
        };
        if let Some(why) = changed {
            match &why {
                Some(w) => tracing::info!("not serving peers: {w}"),
                None => tracing::info!("serving peers again"),
            }
            sh.engine.send(Cmd::Refuse(why.is_some()));
            sh.discovery.set_serving(why.is_none());
            sh.heartbeat_now.notify_one();
        }
    }
}

/// The addresses and subnets a heartbeat reports now (empty when they cannot be listed).
fn reported_addresses(sh: &Shared) -> (Vec<IpAddr>, Vec<ipnet::IpNet>) {
    let ifs = facts::interface_addresses().unwrap_or_default();
    facts::addresses_and_subnets(&ifs, &sh.cfg.advertise_addresses)
}

async fn heartbeat_loop(sh: Arc<Shared>) {
    loop {
        let addresses = reported_addresses(&sh);
        let wait = match heartbeat_once(&sh).await {
            Ok(server_secs) => match sh.cfg.heartbeat_secs {
                0 if server_secs > 0 => server_secs,
                0 => HEARTBEAT_SECS_DEFAULT,
                s => s,
            },
            Err(e) => {
                let msg = if server::api_status(&e) == Some(401) {
                    format!(
                        "{e:#}: the server no longer accepts this agent's credential (revoked?); \
                         delete {} and restart with a new enrol_token",
                        sh.cfg.credential_path().display()
                    )
                } else {
                    format!("{e:#}")
                };
                tracing::warn!("heartbeat failed: {msg}");
                sh.state().heartbeat_error = Some(msg);
                HEARTBEAT_RETRY_SECS
            }
        };
        // Sleep until the next heartbeat is due, or until the addresses or whether it serves change.
        let due = tokio::time::Instant::now() + Duration::from_secs(wait);
        while tokio::time::Instant::now() < due {
            tokio::select! {
                _ = tokio::time::sleep_until(due.min(tokio::time::Instant::now() + ADDRESS_POLL)) => {}
                _ = sh.heartbeat_now.notified() => {
                    tracing::debug!(serves = sh.serves(), "serving peers changed; heartbeating now");
                    break;
                }
            }
            let now = reported_addresses(&sh);
            if now != addresses {
                tracing::info!(
                    was = ?addresses.0,
                    now = ?now.0,
                    "the addresses changed; heartbeating now"
                );
                sh.reset_connections();
                break;
            }
        }
    }
}

/// What to tell the server: complete content whole, partial content as its
/// held byte ranges (at most [`INVENTORY_RANGES_MAX`]), nothing for empty entries.
pub fn inventory_items(list: &[Held]) -> Vec<InventoryItem> {
    list.iter()
        .filter(|h| h.complete || !h.ranges.is_empty())
        .map(|h| InventoryItem {
            content: h.content,
            complete: h.complete,
            ranges: if h.complete {
                Vec::new()
            } else {
                h.ranges.iter().take(INVENTORY_RANGES_MAX).copied().collect()
            },
        })
        .collect()
}

/// Report the inventory if it changed since the last report (everything, replacing the old).
async fn report_inventory(sh: &Shared) -> anyhow::Result<()> {
    let list = sh.engine.call(|reply| Cmd::List { reply }).await?;
    if sh.state().last_inventory.as_ref() == Some(&list) {
        return Ok(());
    }
    let items = inventory_items(&list);
    sh.client
        .inventory(&sh.cred.credential, &Inventory { items, replace: true })
        .await?;
    sh.state().last_inventory = Some(list);
    Ok(())
}

async fn inventory_loop(sh: Arc<Shared>) {
    loop {
        if let Err(e) = report_inventory(&sh).await {
            tracing::warn!("inventory: {e:#}");
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(sh.cfg.inventory_secs)) => {},
            _ = sh.inventory_now.notified() => {},
        }
    }
}

fn unix_ms() -> u64 {
    #[expect(clippy::disallowed_methods, reason = "a wall-clock stamp for status, not a timer")]
    let now = std::time::SystemTime::now();
    now.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Forget the per-content download locks nobody holds or waits on.
fn forget_idle_locks(sh: &Shared) {
    sh.locks
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|_, l| Arc::strong_count(l) > 1);
}

/// As its site's RVP, fetch what the server says the site wants, without anybody asking:
/// long-poll `POST /v1/assignments` and run each new one as a background `get` (shown in
/// `status` under `assignments`). One that ended is not run again for [`ASSIGNMENT_RETRY_SECS`]
/// (a failed one is retried then).
async fn assignment_loop(sh: Arc<Shared>) {
    // An assigned download ended: the long poll in flight lists it as running (the server
    // would not offer it again until the poll's end), so ask again.
    let ended = Arc::new(tokio::sync::Notify::new());
    loop {
        // Running ones, and ended ones still quiet (failed: backing off): the server waits while
        // there is nothing else, but not past the end of the first quiet time, so a content the
        // site wants again is taken then, not at the end of the next long poll.
        let (busy, quiet_left) = {
            let st = sh.state();
            let mut left = Duration::from_millis(ASSIGNMENTS_WAIT_MS);
            let mut busy = Vec::new();
            for a in st.assigned.values() {
                let quiet = if a.state == "failed" {
                    Duration::from_secs(ASSIGNMENT_RETRY_SECS)
                } else {
                    ASSIGNMENT_DONE_QUIET
                };
                match a.ended_at.map(|t| quiet.saturating_sub(t.elapsed())) {
                    None if a.state == "fetching" => busy.push(a.content),
                    Some(l) if !l.is_zero() => {
                        busy.push(a.content);
                        left = left.min(l);
                    }
                    _ => {}
                }
            }
            (busy, left)
        };
        let wait_ms = u64::try_from(quiet_left.as_millis())
            .unwrap_or(ASSIGNMENTS_WAIT_MS)
            .max(100);
        let asked = tokio::select! {
            r = sh.client.assignments(&sh.cred.credential, &busy, wait_ms) => r,
            _ = ended.notified() => continue,
        };
        let list = match asked {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("{e:#}");
                tokio::time::sleep(Duration::from_secs(ASSIGNMENT_RETRY_SECS)).await;
                continue;
            }
        };
        let mut started = false;
        for a in list.into_iter().filter(|a| !busy.contains(&a.content)) {
            started = true;
            let id = a.content;
            tracing::info!(content = %id.short(), site = %a.site, held = a.held_bytes, "fetching for the site as its RVP");
            {
                let mut st = sh.state();
                if st.assigned.len() >= ASSIGNMENTS_SHOWN_MAX && !st.assigned.contains_key(&id) {
                    let old = st.assigned.iter().find(|(_, x)| x.state != "fetching").map(|(k, _)| *k);
                    if let Some(k) = old {
                        st.assigned.remove(&k);
                    }
                }
                st.assigned.insert(
                    id,
                    Assigned {
                        content: id,
                        site: a.site.clone(),
                        state: "fetching",
                        error: None,
                        since_ms: unix_ms(),
                        ended_at: None,
                    },
                );
            }
            let sh = sh.clone();
            let ended = ended.clone();
            tokio::spawn(async move {
                let (ptx, _) = mpsc::channel::<Progress>(1);
                let r = get(sh.clone(), id, ptx, true).await;
                forget_idle_locks(&sh);
                let _wake = Wake(&ended);
                let mut st = sh.state();
                if let Some(x) = st.assigned.get_mut(&id) {
                    x.since_ms = unix_ms();
                    x.ended_at = Some(tokio::time::Instant::now());
                    match r {
                        Ok(_) => x.state = "done",
                        Err(e) => {
                            tracing::warn!(content = %id.short(), "assigned download failed (retried later): {e:#}");
                            x.state = "failed";
                            x.error = Some(format!("{e:#}"));
                        }
                    }
                }
            });
        }
        if !started {
            // Answered without anything new (the wait ran out): ask again at once, but never spin.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Wakes the assignment loop when dropped (after the state it reads was updated).
struct Wake<'a>(&'a tokio::sync::Notify);

impl Drop for Wake<'_> {
    fn drop(&mut self) {
        self.0.notify_one();
    }
}

async fn metrics_text(sh: &Shared) -> String {
    let (Ok(snap), Ok(items)) = (
        sh.engine.call(|reply| Cmd::Snapshot { reply }).await,
        sh.engine.call(|reply| Cmd::List { reply }).await,
    ) else {
        return "# the engine thread stopped\n".into();
    };
    let st = sh.state();
    crate::metrics::render(&crate::metrics::Values {
        peer_bytes: st.totals.peer,
        parent_bytes: st.totals.parent,
        origin_bytes: st.totals.origin,
        served_bytes: snap.served_payload_bytes,
        serve_sessions: snap.serve_sessions as u64,
        transfers: snap.fetches.iter().filter(|f| f.live_sources > 0).count() as u64,
        cache_used_bytes: snap.store_used_bytes,
        cache_limit_bytes: snap.store_limit_bytes,
        cache_items: items.len() as u64,
        dropped_datagrams: snap.dropped_datagrams,
        heartbeat_ok: st.heartbeat_error.is_none(),
        background_paused: snap.background_paused,
        serving_refused: st.serving_refused.is_some(),
        requests_refused: snap.requests_refused,
        discovery_peers: sh.discovery.peer_count() as u64,
        discovery_dropped: sh.discovery.dropped(),
        busy_paused: snap.monitor.paused_busy,
        busy_pauses: snap.monitor.busy_pauses,
        egress_backlog_bytes: snap
            .monitor
            .interfaces
            .iter()
            .map(|i| i.backlog_bytes)
            .max()
            .unwrap_or(0),
        egress_other_bytes_per_s: snap.monitor.interfaces.iter().filter_map(|i| i.other_bytes_per_s).sum(),
        monitor_bpf: snap.monitor.interfaces.iter().any(|i| i.kind == "ebpf"),
    })
}

async fn metrics_loop(sh: Arc<Shared>, listener: tokio::net::TcpListener) {
    let slots = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX));
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let sh = sh.clone();
        tokio::spawn(async move {
            let _ = crate::metrics::answer(conn, || metrics_text(&sh)).await;
            drop(permit);
        });
    }
}

// ---- control socket ----

async fn accept_loop(sh: Arc<Shared>, listener: UnixListener) {
    let slots = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX));
    loop {
        let (conn, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("control socket: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let sh = sh.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_conn(sh, conn).await {
                tracing::debug!("control connection: {e:#}");
            }
            drop(permit);
        });
    }
}

async fn write_reply(w: &mut tokio::net::unix::OwnedWriteHalf, r: &Reply) -> anyhow::Result<()> {
    let mut line = serde_json::to_vec(r)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    Ok(())
}

async fn serve_conn(sh: Arc<Shared>, conn: UnixStream) -> anyhow::Result<()> {
    let (r, mut w) = conn.into_split();
    let mut line = String::new();
    BufReader::new(r.take(REQUEST_BYTES_MAX as u64))
        .read_line(&mut line)
        .await?;
    let req: Request = match proto::parse_request(&line) {
        Ok(r) => r,
        Err(e) => return write_reply(&mut w, &Reply::Error(e)).await,
    };
    let result = match req {
        Request::Get { content } => {
            let (ptx, mut prx) = mpsc::channel::<Progress>(16);
            let task = tokio::spawn({
                let sh = sh.clone();
                async move {
                    let r = get(sh.clone(), content, ptx, false).await;
                    forget_idle_locks(&sh);
                    r
                }
            });
            while let Some(p) = prx.recv().await {
                if write_reply(&mut w, &Reply::Progress(p)).await.is_err() {
                    // The client went away; the download goes on.
                    return Ok(());
                }
            }
            match task.await {
                Ok(r) => r.and_then(|d| Ok(serde_json::to_value(d)?)),
                Err(e) => Err(anyhow!("the download task failed: {e}")),
            }
        }
        Request::Resolve { name, version } => sh
            .client
            .resolve(&sh.cred.credential, &name, version.as_deref())
            .await
            .map(|r| serde_json::json!({"content": r.id, "name": r.name, "version": r.version})),
        Request::Status => status(&sh).await,
        Request::Peers => peers(&sh).await,
        Request::CacheLs => sh
            .engine
            .call(|reply| Cmd::List { reply })
            .await
            .and_then(|l| Ok(serde_json::to_value(l)?)),
        Request::CacheRm { content } => {
            let r = sh.engine.call(|reply| Cmd::Remove { id: content, reply }).await;
            sh.inventory_now.notify_one();
            r.map(|()| serde_json::json!({"removed": content}))
        }
        Request::CacheVerify { content } => sh
            .engine
            .call(|reply| Cmd::Verify { id: content, reply })
            .await
            .inspect(|_| sh.inventory_now.notify_one())
            .map(|v| {
                serde_json::Value::Array(
                    v.into_iter()
                        .map(|(id, bad)| serde_json::json!({"content": id, "bad_blocks": bad}))
                        .collect(),
                )
            }),
        Request::Pause | Request::Resume => {
            let p = matches!(req, Request::Pause);
            sh.engine.send(Cmd::Pause(p));
            Ok(serde_json::json!({"background_paused": p}))
        }
    };
    let reply = match result {
        Ok(v) => Reply::Ok(v),
        Err(e) => Reply::Error(format!("{e:#}")),
    };
    write_reply(&mut w, &reply).await
}

/// The peers the server named, with what the engine sees of those in use.
async fn peers(sh: &Shared) -> anyhow::Result<serde_json::Value> {
    let snap = sh.engine.call(|reply| Cmd::Snapshot { reply }).await?;
    let st = sh.state();
    let v = st
        .peers
        .values()
        .map(|p| {
            let live = snap
                .fetches
                .iter()
                .flat_map(|f| f.sources.iter())
                .find(|s| s.addr == p.addr);
            let mut j = serde_json::to_value(p).unwrap_or_default();
            j["active"] = live.is_some_and(|s| s.active).into();
            j["receiving_bytes_per_s"] = live.map_or(0, |s| s.rate_bytes_per_s).into();
            j
        })
        .collect();
    Ok(serde_json::Value::Array(v))
}

async fn status(sh: &Shared) -> anyhow::Result<serde_json::Value> {
    let snap = sh.engine.call(|reply| Cmd::Snapshot { reply }).await?;
    let items = sh.engine.call(|reply| Cmd::List { reply }).await?;
    let st = sh.state();
    Ok(serde_json::json!({
        "agent_id": sh.cred.agent_id,
        "hostname": sh.hostname,
        "server": sh.client.base(),
        "site": st.site,
        "site_kind": st.site_kind,
        "heartbeat_error": st.heartbeat_error,
        "udp": snap.udp,
        "driver": snap.driver,
        "background_paused": snap.background_paused,
        "monitor": snap.monitor,
        // A fetch whose content completed another way (the origin) lingers in the engine: leave it out.
        "transfers": snap.fetches.iter().filter(|f| !items.iter().any(|h| h.content == f.content && h.complete)).collect::<Vec<_>>(),
        "peers": st.peers.keys().collect::<Vec<_>>(),
        "bytes_by_source": st.totals,
        "serving": {
            "refused": st.serving_refused,
            "requests_refused": snap.requests_refused,
            "cpu_percent": st.cpu_percent,
            "disk_percent": st.disk_percent,
            "upload_bytes_per_sec_max": sh.cfg.upload_bytes_per_sec_max,
        },
        "served": {
            "payload_bytes": snap.served_payload_bytes,
            "resent_bytes": snap.served_resent_bytes,
            "sessions_opened": snap.serve_sessions_opened,
            "sessions": snap.serve_sessions,
        },
        "dropped_datagrams": snap.dropped_datagrams,
        "dropped_peers": snap.dropped_peers,
        "metrics": st.metrics_addr,
        "discovery": sh.discovery.status(),
        "cache": {
            "used_bytes": snap.store_used_bytes,
            "limit_bytes": snap.store_limit_bytes,
            "items": items.len(),
            "complete": items.iter().filter(|h| h.complete).count(),
        },
        "recent": st.recent,
        "assignments": st.assigned.values().collect::<Vec<_>>(),
    }))
}

// ---- downloads ----

/// The address to reach a peer at: one in a subnet this agent is on, else the first that parses.
fn peer_addr(addresses: &[String], port: u16) -> Option<SocketAddr> {
    let ips: Vec<IpAddr> = addresses.iter().filter_map(|a| a.parse().ok()).collect();
    let mine = facts::interface_addresses().unwrap_or_default();
    ips.iter()
        .find(|ip| mine.iter().any(|m| m.net.contains(*ip)))
        .or_else(|| ips.first())
        .map(|ip| SocketAddr::new(*ip, port))
}

/// Fetch `id` into the cache. `assigned`: run for the server's assignment, not for a person
/// (a content already cached then leaves no entry in `recent`).
async fn get(
    sh: Arc<Shared>,
    id: ContentId,
    progress: mpsc::Sender<Progress>,
    assigned: bool,
) -> anyhow::Result<GetDone> {
    let lock = sh
        .locks
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(id)
        .or_default()
        .clone();
    let _guard = lock.lock().await;
    let cred = &sh.cred.credential;
    let _ = progress.try_send(Progress {
        content: Some(id),
        phase: "manifest".into(),
        ..Progress::default()
    });
    // Without the server, a peer on the local subnets that holds it may hand over the
    // manifest the server signed (checked against the pinned key like the server's own).
    let (signed, without_server) = match sh.client.manifest(cred, &id).await {
        Ok(s) => (s, None),
        Err(e) if server_unreachable(&e) => match manifest_from_peers(&sh, id).await {
            Ok((s, peers)) => (s, Some(peers)),
            Err(pe) => bail!("{e:#}; and no peer could stand in for it: {pe:#}"),
        },
        Err(e) => return Err(e),
    };
    let from = if without_server.is_some() {
        "a peer (the server is unreachable)".to_string()
    } else {
        sh.client.base().to_string()
    };
    let manifest = signed
        .verify(&sh.cred.server_public_key)
        .with_context(|| format!("the manifest of {id} from {from}"))?;
    if manifest.id != id {
        bail!(
            "the signed manifest from {from} is for {} but {id} was asked for: refusing it",
            manifest.id
        );
    }
    // Kept for peers that ask while the server is unreachable.
    if let Err(e) = crate::manifests::save(&crate::manifests::dir(&sh.cfg.state_dir), &id, &signed) {
        tracing::warn!("keeping the manifest of {} for peers: {e:#}", id.short());
    }
    let before = sh.engine.call(|reply| Cmd::Held { id, reply }).await?;
    let already = before.as_ref().map_or(0, |h| h.held_bytes);
    let mut done = GetDone {
        content: id,
        name: manifest.name.clone(),
        version: manifest.version.clone(),
        size: manifest.size,
        bytes_already_held: already,
        bytes_from_peers: 0,
        bytes_from_parent: 0,
        bytes_from_origin: 0,
        sources: Vec::new(),
        path: PathBuf::new(),
        site: None,
        you_are_rvp: false,
        received: Vec::new(),
    };
    let cached = before.as_ref().is_some_and(|h| h.complete);
    if !cached {
        let last_drop = |s: &worker::Snapshot| s.dropped_peers.last().map_or(0, |d| d.seq);
        let drops_before = last_drop(&sh.engine.call(|reply| Cmd::Snapshot { reply }).await?);
        let fetched = match without_server {
            None => fetch(&sh, id, &manifest, already, &progress, &mut done).await,
            Some(peers) => fetch_without_server(&sh, id, &manifest, already, peers, &progress, &mut done).await,
        };
        // Peers the engine dropped from this download, and why: in the answer, whatever the outcome.
        if let Ok(snap) = sh.engine.call(|reply| Cmd::Snapshot { reply }).await {
            let dropped = snap
                .dropped_peers
                .iter()
                .filter(|d| d.seq > drops_before && d.content == id);
            done.sources
                .extend(dropped.map(|d| format!("dropped {}: {}", d.addr, d.reason)));
        }
        fetched?;
    } else {
        done.sources.push("already in the cache".into());
    }
    if let Err(e) = report_inventory(&sh).await {
        tracing::warn!("inventory after {}: {e:#}", id.short());
    }
    done.path = match sh.engine.call(|reply| Cmd::DataPath { id, reply }).await {
        Ok(p) => p,
        // Fetched for the site, nobody waits for the file: a copy damaged since (found by a
        // verify) is reported by the inventory and assigned again, without a failure's back-off.
        Err(e) if assigned => {
            tracing::warn!("{}: fetched for the site, but now: {e:#}", id.short());
            PathBuf::new()
        }
        Err(e) => return Err(e),
    };
    let _ = progress.try_send(Progress {
        content: Some(id),
        size: manifest.size,
        held_bytes: manifest.size,
        phase: "done".into(),
        ..Progress::default()
    });
    if !(assigned && cached) {
        let mut st = sh.state();
        st.recent.push_back(done.clone());
        while st.recent.len() > RECENT_MAX {
            st.recent.pop_front();
        }
    }
    tracing::info!(
        content = %id.short(),
        peers = done.bytes_from_peers,
        origin = done.bytes_from_origin,
        rvp = done.you_are_rvp,
        sources = %done.sources.join("; "),
        "get complete"
    );
    Ok(done)
}

/// A peer a sources answer names, as this agent uses it.
#[derive(Debug, Clone)]
struct Named {
    addr: SocketAddr,
    agent_id: Option<String>,
    /// Reached over a WAN link: ask it for the background protocol.
    background: bool,
    held_bytes: u64,
    complete: bool,
    /// Byte ranges held (`[(0, size)]` when complete).
    ranges: Vec<(u64, u64)>,
    why: String,
}

/// What one sources answer offers this agent.
struct Plan {
    you_are_rvp: bool,
    site: Option<String>,
    /// Who gets the content for this agent: its site's RVP (foreground) or, when this agent
    /// is the RVP or its site does not share, the nearest serving ancestor site's RVP
    /// (background). `None`: nobody upstream (the top site's RVP): the origin.
    upstream: Option<Named>,
    /// Same-site peers that hold some of it (foreground), the upstream left out.
    peers: Vec<Named>,
    origins: Vec<String>,
}

/// Sort an answer into a [`Plan`], and remember every peer named.
fn plan_from(sh: &Shared, id: ContentId, size: u64, answer: &server::SourcesAnswer) -> Plan {
    let mut plan = Plan {
        you_are_rvp: answer.you_are_rvp,
        site: answer.site.clone(),
        upstream: None,
        peers: Vec::new(),
        origins: Vec::new(),
    };
    let (mut site_rvp, mut parent) = (None, None);
    for s in &answer.sources {
        if s.kind == SourceKind::Origin {
            if let Some(url) = &s.url {
                plan.origins.push(url.clone());
            }
            continue;
        }
        if s.agent_id.as_deref() == Some(sh.cred.agent_id.as_str()) {
            continue;
        }
        let Some(addr) = s.port.and_then(|p| peer_addr(&s.addresses, p)) else {
            continue;
        };
        {
            let mut st = sh.state();
            if st.peers.len() >= PEERS_KNOWN_MAX && !st.peers.contains_key(&addr) {
                st.peers.pop_first();
            }
            st.peers.insert(
                addr,
                PeerInfo {
                    addr,
                    agent_id: s.agent_id.clone(),
                    site: s.site.clone(),
                    kind: s.kind,
                    protocol: s.protocol,
                    reason: s.reason.clone(),
                    content: id,
                    held_percent: s.held_percent,
                },
            );
        }
        let complete = s.held_percent >= 100;
        let (held_bytes, ranges) = if complete {
            (size, vec![(0, size)])
        } else if !s.ranges.is_empty() {
            (
                s.ranges.iter().map(|(a, b)| b.saturating_sub(*a)).sum(),
                s.ranges.clone(),
            )
        } else {
            (size.saturating_mul(s.held_percent) / 100, Vec::new())
        };
        let n = Named {
            addr,
            agent_id: s.agent_id.clone(),
            background: s.protocol == Protocol::Background,
            held_bytes,
            complete,
            ranges,
            why: format!("{addr}: {}", s.reason),
        };
        match s.kind {
            SourceKind::SiteRvp => site_rvp = Some(n),
            SourceKind::ParentRvp => parent = Some(n),
            // A peer that holds none of it cannot serve now.
            _ if n.held_bytes == 0 => {}
            _ => plan.peers.push(n),
        }
    }
    plan.upstream = match site_rvp {
        Some(r) if !plan.you_are_rvp => Some(r),
        _ => parent,
    };
    plan
}

/// Byte ranges of `[0, size)` not in `held` (sorted, disjoint).
fn complement(held: &[(u64, u64)], size: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = 0;
    for &(s, e) in held {
        if s > at {
            out.push((at, s.min(size)));
        }
        at = at.max(e);
    }
    if at < size {
        out.push((at, size));
    }
    out
}

/// Bytes in both range lists (each sorted and disjoint).
fn overlap(a: &[(u64, u64)], b: &[(u64, u64)]) -> u64 {
    let (mut i, mut j, mut n) = (0, 0, 0);
    while i < a.len() && j < b.len() {
        let (s, e) = (a[i].0.max(b[j].0), a[i].1.min(b[j].1));
        n += e.saturating_sub(s);
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    n
}

/// The sources to give the engine now, each `(named, background)`:
/// - same-site peers that hold something this agent lacks, over the foreground protocol;
/// - a same-site upstream (the site's RVP) always, even while it holds little or nothing:
///   it re-serves verified ranges while it downloads;
/// - a background upstream (the parent site's RVP, across the WAN) only once no same-site
///   peer holds anything this agent lacks, or they made no progress for `defer_done`:
///   what the site already has never crosses the WAN again.
fn choose<'a>(plan: &'a Plan, missing: &[(u64, u64)], defer_done: bool) -> Vec<&'a Named> {
    let mut out: Vec<&Named> = plan
        .peers
        .iter()
        .filter(|p| overlap(&p.ranges, missing) > 0 || (p.ranges.is_empty() && p.held_bytes > 0))
        .collect();
    // Only peers known to hold something this agent lacks hold the parent back.
    let site_has_more = out.iter().any(|p| !p.ranges.is_empty());
    if let Some(u) = &plan.upstream {
        if !u.background || !site_has_more || defer_done {
            out.push(u);
        }
    }
    out
}

/// Where a download stands between ticks.
#[derive(Default)]
struct Watch {
    /// Ticks since this agent's copy last grew.
    idle: u64,
    /// Ticks since the upstream last changed (another RVP) or grew.
    up_idle: u64,
    last_held: u64,
    /// The upstream as last seen: agent, address and bytes held.
    up_seen: Option<(Option<String>, SocketAddr, u64)>,
    /// The upstream's device refuses to serve anybody (`DeviceBusy`): that was its latest
    /// answer since the server named it, and no session with it has been open since.
    up_refusing: bool,
    /// Sources given to the engine, with what they held then (a dropped one is given again
    /// only when it holds more, or when it is an upstream that is still getting it).
    given: HashMap<SocketAddr, u64>,
    /// Sources asked for the background protocol, in use.
    background: HashSet<SocketAddr>,
    /// Every source ever asked for the background protocol (for counting bytes by source).
    wan: HashSet<SocketAddr>,
    /// Blocks verified per source address: (as last seen in the engine's figures, total).
    /// Counted here because the engine reuses a dropped source's slot for the next one.
    verified: HashMap<SocketAddr, (u64, u64)>,
    /// Payload bytes received per source address, counted the same way.
    payload: HashMap<SocketAddr, (u64, u64)>,
    /// Ticks since the engine's fetch finished while the store does not show it complete yet.
    finishing: u64,
    /// Loop ticks since the download started.
    ticks: u64,
    /// Dropped sources to give the engine again at this tick: the upstream (an RVP the server
    /// still names is not gone) and peers that refused for now (busy).
    retry_at: HashMap<SocketAddr, u64>,
    /// The last engine drop (its sequence number) looked at.
    drops_seen: u64,
    /// Sources that sent data that does not verify: never used again, so an upstream among
    /// them is not waited for.
    banned: HashSet<SocketAddr>,
}

impl Watch {
    /// Take the engine's per-source figures into the per-address totals.
    fn count(&mut self, views: &[SourceView]) {
        // A source given again starts from zero.
        fn add((last, total): &mut (u64, u64), now: u64) {
            *total += now.saturating_sub(if now < *last { 0 } else { *last });
            *last = now;
        }
        for v in views {
            add(self.verified.entry(v.addr).or_default(), v.blocks_verified);
            add(self.payload.entry(v.addr).or_default(), v.payload_bytes);
        }
    }

    /// Take a new plan's upstream into account: a new RVP, or one that grew, is progress.
    /// One named anew (another agent or address, even one named before) has not refused yet.
    fn upstream(&mut self, plan: &Plan) {
        let now = plan
            .upstream
            .as_ref()
            .map(|u| (u.agent_id.clone(), u.addr, u.held_bytes));
        let progressed = match (&self.up_seen, &now) {
            (Some((a, _, h0)), Some((b, _, h1))) => a != b || h1 > h0,
            (None, Some(_)) => true,
            _ => false,
        };
        if progressed {
            self.up_idle = 0;
        }
        let who = |s: &Option<(Option<String>, SocketAddr, u64)>| s.as_ref().map(|(a, addr, _)| (a.clone(), *addr));
        if who(&self.up_seen) != who(&now) {
            self.up_refusing = false;
        }
        self.up_seen = now;
    }

    /// Take the engine's news of the upstream at `up` into [`Watch::up_refusing`]: its drops
    /// from `id`'s fetch not looked at yet (after `drops_seen`; call before it moves on), and
    /// whether a session with it is open now (`views`). A `DeviceBusy` answer lasts (on
    /// battery...) and is waited for [`RVP_REFUSING_WAIT`] only; but one from before the
    /// upstream was named anew, or before it accepted a session (it serves now, and has not
    /// got further yet itself), is no longer its answer: waiting for it is the whole
    /// `rvp_wait_secs`, not a crossing of every WAN link above to the origin after 60 s.
    fn upstream_answers(&mut self, id: ContentId, up: Option<SocketAddr>, drops: &[Dropped], views: &[SourceView]) {
        let Some(up) = up else {
            self.up_refusing = false;
            return;
        };
        if let Some(d) = drops
            .iter()
            .rev()
            .find(|d| d.seq > self.drops_seen && d.content == id && d.addr == up)
        {
            self.up_refusing = d.device_busy;
        }
        if views.iter().any(|v| v.addr == up && v.active && !v.dropped) {
            self.up_refusing = false;
        }
    }
}

/// Give the engine the sources [`choose`] picks that it is not using yet; true when one of
/// them was never given before (a dropped one given again does not count as news).
async fn apply(
    sh: &Shared,
    table: &lowtide_engine::content::BlockTable,
    plan: &Plan,
    held: &Held,
    w: &mut Watch,
    defer_done: bool,
    done: &mut GetDone,
) -> anyhow::Result<bool> {
    let id = table.root();
    let missing = complement(&held.ranges, held.size);
    let views = sh.engine.call(|reply| Cmd::FetchSources { id, reply }).await?;
    let upstream = plan.upstream.as_ref().map(|u| u.addr);
    let mut add = Vec::new();
    let mut new = false;
    for n in choose(plan, &missing, defer_done) {
        let in_use = views.iter().any(|v| v.addr == n.addr && !v.dropped);
        let retry_due = w.retry_at.get(&n.addr).is_some_and(|t| w.ticks >= *t);
        let again = match w.given.get(&n.addr) {
            None => true,
            Some(h) => !in_use && (n.held_bytes > *h || (Some(n.addr) == upstream && !n.complete) || retry_due),
        };
        if in_use || !again {
            continue;
        }
        if !w.given.contains_key(&n.addr) {
            new = true;
            let how = if n.background {
                "background from"
            } else {
                "foreground from"
            };
            done.sources.push(format!("{how} {}", n.why));
        }
        w.given.insert(n.addr, n.held_bytes);
        w.retry_at.remove(&n.addr);
        if n.background {
            w.background.insert(n.addr);
            w.wan.insert(n.addr);
        }
        add.push((n.addr, n.background));
    }
    if add.is_empty() {
        return Ok(false);
    }
    let t = table.clone();
    sh.engine
        .call(|reply| Cmd::Fetch {
            table: t,
            peers: add,
            encrypt: sh.cfg.encrypt_p2p,
            reply,
        })
        .await?;
    Ok(new)
}

/// Longest a download waits for its block table from its site's RVP and peers before it asks
/// the server (in the head office, across the WAN for a branch).
const TABLE_FROM_PEERS_WAIT: Duration = Duration::from_secs(10);

/// The content's block table: from the store when held; else from this agent's upstream (its
/// site's RVP, or the parent site's RVP over the background protocol) and the same-site peers
/// that hold some of it (the table is verified against the content id, so any peer may serve
/// it, and it does not cross the WAN once per agent behind the link: a Wi-Fi site's RVP takes
/// it from its wired parent site); else, or when none sends it within
/// [`TABLE_FROM_PEERS_WAIT`], from the server (the top site's RVP).
/// Also returns the peers it gave the engine's fetch (which goes on with the blocks).
async fn table_for(sh: &Shared, id: ContentId, plan: &Plan) -> anyhow::Result<(BlockTable, Vec<Named>)> {
    if let Some(t) = sh.engine.call(|reply| Cmd::Table { id, reply }).await? {
        return Ok((t, Vec::new()));
    }
    let named: Vec<Named> = plan
        .peers
        .iter()
        .filter(|p| p.held_bytes > 0)
        .chain(plan.upstream.iter())
        .cloned()
        .collect();
    let peers: Vec<(SocketAddr, bool)> = named.iter().map(|n| (n.addr, n.background)).collect();
    if !peers.is_empty() {
        let polls = (TABLE_FROM_PEERS_WAIT.as_millis() / TICK.as_millis()) as u64;
        for i in 0..polls {
            // Peers that refused or do not hold it yet (an RVP that is just starting) are asked again.
            if i % RETRY_TICKS == 0 {
                sh.engine.send(Cmd::FetchTable {
                    id,
                    peers: peers.clone(),
                    encrypt: sh.cfg.encrypt_p2p,
                });
            }
            tokio::time::sleep(TICK).await;
            if let Some(t) = sh.engine.call(|reply| Cmd::Table { id, reply }).await? {
                tracing::debug!("{}: block table from site peers {peers:?}", id.short());
                return Ok((t, named));
            }
        }
        tracing::info!(
            "{}: no site peer sent the block table in {} s; asking the server",
            id.short(),
            TABLE_FROM_PEERS_WAIT.as_secs()
        );
    }
    Ok((sh.client.table(&sh.cred.credential, &id).await?, named))
}

/// Loop ticks before a dropped upstream, or a peer that refused for now, is asked again.
const RETRY_TICKS: u64 = 4;
/// Longest wait for an upstream RVP whose device refuses to serve anybody: what
/// `rvp_wait_secs` was by default before it became 600 s, which is for a slow but live upstream.
const RVP_REFUSING_WAIT: Duration = Duration::from_secs(60);

/// Loop ticks in `d` (at least one).
fn ticks_of(d: Duration) -> u64 {
    (d.as_millis() as u64 / TICK.as_millis() as u64).max(1)
}

/// The upstream (site RVP, or parent site's RVP) as a download sees it.
#[derive(Debug, Clone, Copy)]
struct UpstreamState {
    /// Reached over the background protocol (the parent site's RVP).
    background: bool,
    /// The server says it holds the whole content.
    complete: bool,
    /// The engine dropped it (no answer, stalled, refused...).
    dropped: bool,
    /// Its last answer was that the device serves nobody for now (on battery, busy CPU or
    /// disk, `uploads_max = 0`): that lasts, unlike a full serving cap or a slow parent chain.
    refusing: bool,
}

/// What a download knows when it decides whether to fetch the rest from the origin.
#[derive(Debug, Clone, Copy)]
struct Standing {
    /// The upstream the server names (`None`: nobody upstream, the top site's RVP).
    upstream: Option<UpstreamState>,
    you_are_rvp: bool,
    /// Any source was given to the engine.
    given_any: bool,
    /// Sources the engine still uses.
    live: usize,
    /// Dropped sources waiting to be asked again (the upstream, peers that refused).
    retries_pending: usize,
    /// Ticks since this agent's copy last grew, and since the upstream last grew or changed.
    idle_ticks: u64,
    up_idle_ticks: u64,
}

/// Why to go to the origin now, or `None` to keep waiting for peers.
///
/// The origin is across every WAN link above this agent, so while an upstream RVP the server
/// names holds or gets the content, a download waits for it (`rvp_ticks` without progress
/// from anybody, the upstream included) rather than give up after `stall_ticks`; a refusal or a
/// drop of that upstream is "ask again later", not "gone" (the server names another RVP when
/// it stops heartbeating). Peers that hold it whole on the LAN get `stall_ticks`. An upstream
/// whose device refuses to serve anybody (on battery...) is waited for [`RVP_REFUSING_WAIT`] at
/// most: the server names such a device only while no device of its site serves (or until it
/// hears of the change from its heartbeat), and then keeps it named.
fn origin_reason(s: &Standing, stall_ticks: u64, rvp_ticks: u64) -> Option<String> {
    if s.upstream.is_none() && !s.given_any {
        return Some("nobody upstream of this agent and no peer holds it".to_string());
    }
    let up_alive = s
        .upstream
        .is_some_and(|u| !u.complete || !s.you_are_rvp || (u.background && !u.dropped));
    if s.live == 0 && !up_alive && s.retries_pending == 0 {
        return Some("every peer was dropped".to_string());
    }
    let budget = if up_alive || s.retries_pending > 0 && s.upstream.is_some() {
        if s.upstream.is_some_and(|u| u.refusing) {
            rvp_ticks.min(ticks_of(RVP_REFUSING_WAIT))
        } else {
            rvp_ticks
        }
    } else {
        stall_ticks
    };
    (s.idle_ticks >= budget && s.up_idle_ticks >= budget)
        .then(|| format!("no progress for {} s", budget * TICK.as_millis() as u64 / 1000))
}

async fn fetch(
    sh: &Shared,
    id: ContentId,
    manifest: &server::Manifest,
    already: u64,
    progress: &mpsc::Sender<Progress>,
    done: &mut GetDone,
) -> anyhow::Result<()> {
    let cred = &sh.cred.credential;
    let size = manifest.size;
    let mut plan = plan_from(sh, id, size, &sh.client.sources(cred, &id).await?);
    // The engine's drops from here on are this download's. The block table's fetch asks the
    // upstream and the site's peers first, and what they answer then counts as in the loop
    // below: a refusal is "ask again later" (a complete upstream that refused then was never
    // asked again: a site's member waited for nothing, then crossed the WAN to the origin).
    let drops_at_start = {
        let snap = sh.engine.call(|reply| Cmd::Snapshot { reply }).await?;
        snap.dropped_peers.last().map_or(0, |d| d.seq)
    };
    let (table, table_peers) = table_for(sh, id, &plan).await?;
    if table.geometry().size != manifest.size {
        bail!(
            "the block table of {id} describes {} bytes but the signed manifest says {}: refusing it",
            table.geometry().size,
            manifest.size
        );
    }
    // The store entry first: peers of the site may ask this agent for what it gets while it gets it.
    let t = table.clone();
    sh.engine.call(|reply| Cmd::Begin { table: t, reply }).await?;
    done.site = plan.site.clone();
    done.you_are_rvp = plan.you_are_rvp;
    // Holders found on the local subnets join the same-site peers (foreground) for the whole
    // download; their ranges are not known, so they never hold back an RVP's parent source.
    let discovered = {
        let mut named: Vec<(SocketAddr, String)> = plan
            .peers
            .iter()
            .chain(plan.upstream.iter())
            .map(|n| (n.addr, n.why.clone()))
            .collect();
        let before = named.len();
        sh.discovery.add_peers(id, &mut named).await;
        named
            .split_off(before)
            .into_iter()
            .map(|(addr, why)| Named {
                addr,
                agent_id: None,
                background: false,
                held_bytes: 1,
                complete: false,
                ranges: Vec::new(),
                why,
            })
            .collect::<Vec<_>>()
    };
    plan.peers.extend(discovered.iter().cloned());
    let origins = |plan: &Plan| {
        let mut o = plan.origins.clone();
        o.extend(manifest.origins.iter().filter(|m| !plan.origins.contains(m)).cloned());
        o
    };
    let ticks = |secs: u64| ticks_of(Duration::from_secs(secs));
    let stall_ticks = ticks(sh.cfg.peer_stall_secs);
    let rvp_ticks = ticks(sh.cfg.rvp_wait_secs);
    let refresh_ticks = ticks(sh.cfg.sources_refresh_secs);
    let wait_refresh_ticks = ticks(1).min(refresh_ticks);
    let mut w = Watch {
        last_held: already,
        ..Watch::default()
    };
    // The block table's fetch gave the engine these as sources, and it goes on with the blocks
    // from them: count them as given, with their protocol (a fast LAN may finish before the
    // first look at the engine's sources).
    for n in table_peers {
        if w.given.contains_key(&n.addr) {
            continue;
        }
        let how = if n.background {
            "background from"
        } else {
            "foreground from"
        };
        done.sources.push(format!("{how} {}", n.why));
        if n.background {
            w.background.insert(n.addr);
            w.wan.insert(n.addr);
        }
        w.given.insert(n.addr, n.held_bytes);
    }
    w.upstream(&plan);
    let mut since_refresh = 0u64;
    let store_errors_before = sh.engine.call(|reply| Cmd::Snapshot { reply }).await?.store_errors;
    w.drops_seen = drops_at_start;
    // Answers in a row while nothing arrives: the polling backs off (1, 2, 4, 8 s, then
    // every sources_refresh_secs), so a site waiting for its RVP does not ask every second.
    let mut wait_streak = 0u32;
    let mut site_seen = sh.state().site.clone();
    let mut origin_bytes = 0u64;
    let mut tick = tokio::time::interval(TICK);
    loop {
        let h = sh
            .engine
            .call(|reply| Cmd::Held { id, reply })
            .await?
            .ok_or_else(|| anyhow!("{id} was removed from the cache during the download"))?;
        if h.complete {
            break;
        }
        // Every tick: what this agent lacks changes as blocks arrive (a deferred parent joins
        // once the site's peers have given what they hold).
        let defer_done = w.idle >= stall_ticks;
        if apply(sh, &table, &plan, &h, &mut w, defer_done, done).await? {
            w.idle = 0;
        }
        tick.tick().await;
        let snap = sh.engine.call(|reply| Cmd::Snapshot { reply }).await?;
        // The store cannot keep what arrives (a full disk): say so now rather than stall.
        if snap.store_errors > store_errors_before {
            bail!(
                "{}: what was verified and made durable is kept, and what arrived is \
                 committed once there is room; fix it (free disk space) and get again to resume",
                snap.store_error.as_deref().unwrap_or("the content store failed")
            );
        }
        let fv = snap.fetches.iter().find(|f| f.content == id);
        if let Some(f) = fv {
            w.count(&f.sources);
            w.finishing = 0;
        } else if !w.given.is_empty() && w.finishing < FINISHING_TICKS_MAX {
            // The engine's fetch is gone: it got every block and is committing the last ones
            // (the store shows them once they are durable). Not a reason for the origin.
            w.finishing += 1;
            continue;
        }
        let live = fv.map_or(0, |f| f.sources.iter().filter(|s| !s.dropped).count());
        let rate: u64 = fv.map_or(0, |f| f.sources.iter().map(|s| s.rate_bytes_per_s).sum());
        let held_now = fv.map_or(h.held_bytes, |f| f.bytes_held.max(h.held_bytes));
        if held_now > w.last_held {
            w.last_held = held_now;
            w.idle = 0;
        } else {
            w.idle += 1;
        }
        w.up_idle += 1;
        w.ticks += 1;
        let up = plan.upstream.as_ref();
        // Drops since the last look (the first look: since the download began, the block
        // table's fetch included): a refusal (busy) is "ask again later", and so is any drop
        // of the upstream the server still names (it holds or is getting the content).
        // Bans count whenever they happened (the block table's fetch may have dropped a peer that
        // sent a bad block before this loop first looked): the engine never uses that peer again.
        w.banned.extend(
            snap.dropped_peers
                .iter()
                .filter(|d| d.content == id && d.banned)
                .map(|d| d.addr),
        );
        w.upstream_answers(
            id,
            up.map(|u| u.addr),
            &snap.dropped_peers,
            fv.map_or(&[], |f| &f.sources),
        );
        for d in snap
            .dropped_peers
            .iter()
            .filter(|d| d.seq > w.drops_seen && d.content == id && !d.banned)
        {
            if d.refused || up.is_some_and(|u| u.addr == d.addr) {
                // An upstream that has not begun its own download yet does within moments: a
                // tick, not a second (each site of a chain waited a second on the one above).
                let after = if d.not_found { 1 } else { RETRY_TICKS };
                w.retry_at.entry(d.addr).or_insert(w.ticks + after);
            }
        }
        w.drops_seen = snap.dropped_peers.last().map_or(w.drops_seen, |d| d.seq);
        // The upstream is still getting it: wait for it (it re-serves what it verified).
        let up_getting = up.is_some_and(|u| !u.complete);
        let up_dropped =
            up.is_some_and(|u| fv.is_some_and(|f| f.sources.iter().any(|s| s.addr == u.addr && s.dropped)));
        let waiting = up_getting && rate == 0 && w.idle > 1;
        let phase = match up {
            Some(u) if waiting => format!(
                "waiting for the {} RVP ({}%)",
                if u.background { "parent site" } else { "site" },
                held_percent(u.held_bytes, size)
            ),
            Some(u) if rate == 0 && w.retry_at.contains_key(&u.addr) => format!(
                "waiting for the {} RVP (busy)",
                if u.background { "parent site" } else { "site" },
            ),
            _ => "peers".to_string(),
        };
        let _ = progress.try_send(Progress {
            content: Some(id),
            size,
            held_bytes: held_now,
            phase,
            sources: live,
            peer_rate_bytes_per_s: rate,
        });
        // An upstream that sent bad data is never used again: not one to wait for.
        let why = origin_reason(
            &Standing {
                upstream: up.filter(|u| !w.banned.contains(&u.addr)).map(|u| UpstreamState {
                    background: u.background,
                    complete: u.complete,
                    dropped: up_dropped,
                    refusing: w.up_refusing,
                }),
                you_are_rvp: plan.you_are_rvp,
                given_any: !w.given.is_empty(),
                live,
                retries_pending: w.retry_at.len(),
                idle_ticks: w.idle,
                up_idle_ticks: w.up_idle,
            },
            stall_ticks,
            rvp_ticks,
        );
        // Ask the server again now and then, and before giving up: another RVP may have been
        // elected, or agents got it meanwhile. At once when this agent moved to another site:
        // the new site's peers (and RVP) serve it.
        since_refresh += 1;
        // While nothing comes, from every second, backing off to sources_refresh_secs (1, 2, 4,
        // 8 s...) while no answer shows progress; except from a same-site upstream that is in
        // use and made this agent's copy grow lately: it re-serves what it gets, so asking the
        // server (across the WAN for a branch) would tell nothing new.
        let up_in_use = up.is_some_and(|u| {
            !u.background && fv.is_some_and(|f| f.sources.iter().any(|s| s.addr == u.addr && !s.dropped))
        });
        let cadence = if (rate == 0 || live == 0) && !(up_in_use && w.idle < stall_ticks) {
            wait_refresh_ticks
                .saturating_mul(1 << wait_streak.min(16))
                .min(refresh_ticks)
        } else {
            refresh_ticks
        };
        let site_now = sh.state().site.clone();
        if site_now != site_seen {
            tracing::info!("{}: now in site {site_now:?}; asking for its sources", id.short());
            site_seen = site_now;
            since_refresh = cadence;
        }
        if since_refresh >= cadence || (why.is_some() && since_refresh > 1 && !w.given.is_empty()) {
            since_refresh = 0;
            match sh.client.sources(cred, &id).await {
                Ok(a) => {
                    plan = plan_from(sh, id, size, &a);
                    let named: Vec<SocketAddr> = plan.peers.iter().map(|n| n.addr).collect();
                    plan.peers
                        .extend(discovered.iter().filter(|d| !named.contains(&d.addr)).cloned());
                    w.upstream(&plan);
                    if w.idle == 0 || w.up_idle == 0 {
                        wait_streak = 0;
                    } else {
                        wait_streak = wait_streak.saturating_add(1);
                    }
                    if plan.you_are_rvp && !done.you_are_rvp {
                        tracing::info!("{}: this agent is now its site's RVP for it", id.short());
                        done.sources.push("elected the site's RVP meanwhile".into());
                    }
                    // Background sources that are no longer this agent's upstream (it is no
                    // longer the RVP, or the parent site's RVP changed): stop crossing the WAN.
                    let keep = plan.upstream.as_ref().filter(|u| u.background).map(|u| u.addr);
                    let stale: Vec<SocketAddr> = w.background.iter().filter(|a| Some(**a) != keep).copied().collect();
                    if !stale.is_empty() {
                        tracing::info!("{}: no longer fetching across the WAN from {stale:?}", id.short());
                        for a in &stale {
                            w.background.remove(a);
                            w.given.remove(a);
                        }
                        sh.engine.send(Cmd::DropSources {
                            id,
                            addrs: stale,
                            encrypt: sh.cfg.encrypt_p2p,
                        });
                    }
                    done.you_are_rvp = plan.you_are_rvp;
                    done.site = plan.site.clone();
                    let h = sh.engine.call(|reply| Cmd::Held { id, reply }).await?;
                    if let Some(h) = h {
                        let defer_done = w.idle >= stall_ticks;
                        if apply(sh, &table, &plan, &h, &mut w, defer_done, done).await? {
                            w.idle = 0;
                            continue;
                        }
                    }
                    if why.is_some() {
                        // Look again with the new answer before giving up.
                        continue;
                    }
                }
                Err(e) => tracing::warn!("{}: asking for sources again: {e:#}", id.short()),
            }
        }
        let Some(why) = why else { continue };
        let origins = origins(&plan);
        tracing::info!("{}: {why}; fetching the rest from the origin", id.short());
        done.sources.push(format!("origin ({why}): {}", origins.join(", ")));
        let base = h.held_bytes;
        let ptx = progress.clone();
        let mut n_origin = 0u64;
        let stored = crate::origin::fetch_missing(
            &sh.origin_http(),
            &origins,
            &table,
            &h.missing_blocks,
            &sh.engine,
            |n| {
                n_origin += n;
                let _ = ptx.try_send(Progress {
                    content: Some(id),
                    size,
                    held_bytes: (base + n_origin).min(size),
                    phase: "origin".into(),
                    sources: 1,
                    peer_rate_bytes_per_s: 0,
                });
            },
        )
        .await
        .with_context(|| {
            format!(
                "no peer could serve {id} and the origin failed; what was verified is kept \
                 and the next get resumes from it"
            )
        })?;
        origin_bytes += n_origin;
        tracing::debug!("{} bytes of {} from the origin", stored, id.short());
        w.idle = 0;
        // The engine makes written blocks durable on its commit thread; the store shows them
        // once they are. Wait for that, so the next look does not take them for missing.
        for _ in 0..FINISHING_TICKS_MAX {
            let now = sh.engine.call(|reply| Cmd::Held { id, reply }).await?;
            if now.is_none_or(|x| x.complete || x.held_bytes >= (base + stored).min(size)) {
                break;
            }
            tokio::time::sleep(TICK).await;
        }
    }
    // Who sent what: the engine's per-source counts of verified blocks, split by protocol
    // (the completed fetch's figures come once its last blocks are committed).
    let engine_bytes = size.saturating_sub(already).saturating_sub(origin_bytes);
    if engine_bytes > 0 {
        for _ in 0..FINAL_STATS_POLLS_MAX {
            let views = sh.engine.call(|reply| Cmd::FetchSources { id, reply }).await?;
            if !views.is_empty() {
                w.count(&views);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let blocks = |bg: bool| -> u64 {
        w.verified
            .iter()
            .filter(|(a, _)| w.wan.contains(a) == bg)
            .map(|(_, (_, total))| *total)
            .sum()
    };
    let (bg_blocks, fg_blocks) = (blocks(true), blocks(false));
    tracing::debug!(content = %id.short(), verified = ?w.verified, background = ?w.wan, "sources used");
    let parent_bytes = if bg_blocks + fg_blocks == 0 {
        0
    } else {
        (engine_bytes as u128 * bg_blocks as u128 / (bg_blocks + fg_blocks) as u128) as u64
    };
    let peer_bytes = engine_bytes - parent_bytes;
    done.received = w
        .payload
        .iter()
        .map(|(addr, (_, payload_bytes))| crate::proto::Received {
            addr: *addr,
            background: w.wan.contains(addr),
            payload_bytes: *payload_bytes,
            blocks_verified: w.verified.get(addr).map_or(0, |v| v.1),
        })
        .collect();
    done.received.sort_by_key(|r| r.addr);
    done.bytes_from_peers = peer_bytes;
    done.bytes_from_parent = parent_bytes;
    done.bytes_from_origin = origin_bytes;
    let mut st = sh.state();
    st.totals.parent += parent_bytes;
    st.unreported.wan_bytes += parent_bytes;
    st.totals.peer += peer_bytes;
    st.unreported.lan_bytes += peer_bytes;
    st.totals.origin += origin_bytes;
    st.unreported.origin_bytes += origin_bytes;
    Ok(())
}

/// Whether `e` says the server could not be reached at all (no HTTP answer came).
fn server_unreachable(e: &anyhow::Error) -> bool {
    server::api_status(e).is_none() && e.chain().any(|c| c.is::<reqwest::Error>())
}

/// The server is unreachable: ask the peers on the local subnets that hold `id` (discovery)
/// for the signed manifest they kept, and take the first that verifies against the pinned
/// server key and names `id`. Returns it and the holders' engine addresses.
async fn manifest_from_peers(sh: &Shared, id: ContentId) -> anyhow::Result<(server::SignedManifest, Vec<SocketAddr>)> {
    let found = sh.discovery.lookup(id).await;
    if found.is_empty() {
        bail!("no peer on the local subnets answered that it holds {id} (discovery)");
    }
    let holders: Vec<SocketAddr> = found.iter().map(|f| f.addr).collect();
    let mut why = Vec::new();
    for f in &found {
        let got = async {
            let b = sh.discovery.fetch_manifest(id, f.addr.ip()).await?;
            let signed = crate::manifests::from_bytes(&b)?;
            let m = signed.verify(&sh.cred.server_public_key)?;
            if m.id != id {
                bail!("it sent the manifest of {}", m.id);
            }
            Ok(signed)
        }
        .await;
        match got {
            Ok(signed) => {
                tracing::info!(
                    "{}: the server is unreachable; the signed manifest came from {}",
                    id.short(),
                    f.addr.ip()
                );
                return Ok((signed, holders));
            }
            Err(e) => why.push(format!("{}: {e:#}", f.addr.ip())),
        }
    }
    bail!(
        "no peer sent a manifest that verifies against the pinned server key ({})",
        why.join("; ")
    )
}

/// The server is unreachable: get `id` from the peers on the local subnets that hold it
/// (`holders`, from discovery; looked for again now and then). The block table comes from
/// the first peer that accepts, verified against the id before anything is stored. No
/// origin without the server: when every peer is gone, what was verified is kept for the
/// next `get`.
async fn fetch_without_server(
    sh: &Shared,
    id: ContentId,
    manifest: &server::Manifest,
    already: u64,
    holders: Vec<SocketAddr>,
    progress: &mpsc::Sender<Progress>,
    done: &mut GetDone,
) -> anyhow::Result<()> {
    let size = manifest.size;
    let mut given: HashSet<SocketAddr> = holders.iter().copied().collect();
    done.sources.push(format!(
        "the server is unreachable: from peers on the local subnets (discovery): {}",
        holders.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ")
    ));
    let encrypt = sh.cfg.encrypt_p2p;
    sh.engine
        .call(|reply| Cmd::FetchFromPeers {
            id,
            peers: holders,
            encrypt,
            reply,
        })
        .await?;
    let lookup_ticks = (sh.cfg.sources_refresh_secs * 1000 / TICK.as_millis() as u64).max(1);
    let (mut since_lookup, mut gone) = (0u64, 0u64);
    let mut tick = tokio::time::interval(TICK);
    loop {
        tick.tick().await;
        if let Some(h) = sh.engine.call(|reply| Cmd::Held { id, reply }).await? {
            if h.size != size {
                bail!(
                    "the peers' block table of {id} describes {} bytes but the signed manifest says {size}: refusing it",
                    h.size
                );
            }
            if h.complete {
                break;
            }
        }
        let snap = sh.engine.call(|reply| Cmd::Snapshot { reply }).await?;
        let fv = snap.fetches.iter().find(|f| f.content == id);
        let live = fv.map_or(0, |f| f.live_sources);
        if live == 0 {
            // Gone from the engine with every block (committing the last ones), or every peer dropped.
            gone += 1;
            if gone > FINISHING_TICKS_MAX {
                bail!(
                    "the server is unreachable and every peer that held {id} was dropped; what was \
                     verified is kept and the next get resumes from it"
                );
            }
        } else {
            gone = 0;
        }
        let _ = progress.try_send(Progress {
            content: Some(id),
            size,
            held_bytes: fv.map_or(already, |f| f.bytes_held.max(already)),
            phase: "peers (the server is unreachable)".into(),
            sources: live,
            peer_rate_bytes_per_s: fv.map_or(0, |f| f.sources.iter().map(|s| s.rate_bytes_per_s).sum()),
        });
        since_lookup += 1;
        if since_lookup >= lookup_ticks {
            since_lookup = 0;
            let more: Vec<SocketAddr> = sh
                .discovery
                .lookup(id)
                .await
                .into_iter()
                .map(|f| f.addr)
                .filter(|a| given.insert(*a))
                .collect();
            if !more.is_empty() {
                done.sources.push(format!("more peers found meanwhile: {more:?}"));
                sh.engine
                    .call(|reply| Cmd::FetchFromPeers {
                        id,
                        peers: more,
                        encrypt,
                        reply,
                    })
                    .await?;
            }
        }
    }
    let peer_bytes = size.saturating_sub(already);
    done.bytes_from_peers = peer_bytes;
    let mut st = sh.state();
    st.totals.peer += peer_bytes;
    st.unreported.lan_bytes += peer_bytes;
    Ok(())
}

/// Percent of `size` that `held` is (100 only when whole).
fn held_percent(held: u64, size: u64) -> u64 {
    if size == 0 || held >= size {
        100
    } else {
        (held as u128 * 100 / size as u128).min(99) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(seed: &[u8], complete: bool, ranges: Vec<(u64, u64)>) -> Held {
        Held {
            content: ContentId::of(seed),
            size: 1 << 20,
            held_bytes: ranges.iter().map(|(s, e)| e - s).sum(),
            complete,
            ranges,
            missing_blocks: Vec::new(),
        }
    }

    #[test]
    fn inventory_reports_ranges_of_partial_content() {
        let many: Vec<(u64, u64)> = (0..100).map(|i| (i * 32768, i * 32768 + 16384)).collect();
        let list = vec![
            held(b"whole", true, vec![(0, 1 << 20)]),
            held(b"part", false, vec![(0, 16384), (65536, 81920)]),
            held(b"empty", false, vec![]),
            held(b"many", false, many),
        ];
        let items = inventory_items(&list);
        assert_eq!(items.len(), 3, "an entry with nothing held is not announced");
        assert!(items[0].complete && items[0].ranges.is_empty());
        assert_eq!(items[1].ranges, vec![(0, 16384), (65536, 81920)]);
        assert!(!items[1].complete);
        assert_eq!(items[2].ranges.len(), INVENTORY_RANGES_MAX);
    }

    /// Issue 6 bug (200 MB demo): a Wi-Fi agent whose site RVP held the whole package but refused
    /// it for a moment (busy) took "every peer was dropped" for "gone" and fetched 168 MB from the
    /// origin across its parent site's WAN link. A refusal, or any drop of an upstream RVP the
    /// server still names, is "ask again later": the origin only after `rvp_ticks` without progress.
    #[test]
    fn origin_waits_for_a_site_rvp_that_refused_or_dropped() {
        let (stall, rvp) = (20, 240);
        let refused = Standing {
            upstream: Some(UpstreamState {
                background: false,
                complete: true,
                dropped: true,
                refusing: false,
            }),
            you_are_rvp: false,
            given_any: true,
            live: 0,
            retries_pending: 1,
            idle_ticks: stall + 1,
            up_idle_ticks: stall + 1,
        };
        assert_eq!(origin_reason(&refused, stall, rvp), None);
        // Also once the retry went out and the site RVP is asked again (no retry pending).
        let asked_again = Standing {
            retries_pending: 0,
            ..refused
        };
        assert_eq!(origin_reason(&asked_again, stall, rvp), None);
        // A parent site's RVP that refused a child site's RVP: the same.
        let child_rvp = Standing {
            upstream: Some(UpstreamState {
                background: true,
                complete: true,
                dropped: true,
                refusing: false,
            }),
            you_are_rvp: true,
            ..refused
        };
        assert_eq!(origin_reason(&child_rvp, stall, rvp), None);
        // Without progress from anybody for `rvp_ticks` (a dead RVP the server has not replaced).
        let dead = Standing {
            idle_ticks: rvp,
            up_idle_ticks: rvp,
            ..refused
        };
        assert!(origin_reason(&dead, stall, rvp).is_some_and(|w| w.contains("no progress")));
        // An upstream whose device refuses to serve anybody (on battery, `uploads_max = 0`)
        // is waited for RVP_REFUSING_WAIT, not the whole rvp_wait_secs (600 s by default).
        let (rvp_long, refusing_ticks) = (ticks_of(RVP_REFUSING_WAIT) * 10, ticks_of(RVP_REFUSING_WAIT));
        let on_battery = Standing {
            upstream: Some(UpstreamState {
                background: false,
                complete: true,
                dropped: true,
                refusing: true,
            }),
            idle_ticks: refusing_ticks - 1,
            up_idle_ticks: refusing_ticks - 1,
            ..refused
        };
        assert_eq!(origin_reason(&on_battery, stall, rvp_long), None);
        let on_battery_long = Standing {
            idle_ticks: refusing_ticks,
            up_idle_ticks: refusing_ticks,
            ..on_battery
        };
        assert!(origin_reason(&on_battery_long, stall, rvp_long).is_some_and(|w| w.contains("no progress")));
        // A busy one (a full serving cap) is not refusing: the long wait holds.
        let busy = Standing {
            upstream: Some(UpstreamState {
                refusing: false,
                ..on_battery.upstream.unwrap()
            }),
            ..on_battery_long
        };
        assert_eq!(origin_reason(&busy, stall, rvp_long), None);
        // A shorter rvp_wait_secs still wins.
        assert!(origin_reason(&on_battery_long, stall, refusing_ticks / 2).is_some());
        // Same-site peers only (no upstream named), all gone: the origin at once.
        let peers_gone = Standing {
            upstream: None,
            retries_pending: 0,
            idle_ticks: 1,
            up_idle_ticks: 1,
            ..refused
        };
        assert_eq!(
            origin_reason(&peers_gone, stall, rvp).as_deref(),
            Some("every peer was dropped")
        );
        // The top site's RVP: nobody upstream and no peer.
        let top = Standing {
            given_any: false,
            ..peers_gone
        };
        assert!(origin_reason(&top, stall, rvp).is_some_and(|w| w.contains("nobody upstream")));
    }

    /// Issue 6: the upstream's `DeviceBusy` counted whenever it was sent. After the server
    /// named b's RVP, then (it refused: on battery) hq's, then b's again once it serves, or
    /// once b's RVP served again under the same naming and had nothing more yet, that old
    /// refusal cut the wait for it to RVP_REFUSING_WAIT (60 s) and sent the child site's RVP
    /// to the origin: a second crossing of every WAN link above. It counts only while it is
    /// the latest answer since the upstream was named, and no session with it opened since.
    #[test]
    fn an_upstream_refusal_counts_only_until_it_serves_or_is_named_anew() {
        let id = ContentId::of(b"package");
        let (b0, hq0): (SocketAddr, SocketAddr) =
            ("10.0.2.10:7000".parse().unwrap(), "10.0.1.10:7000".parse().unwrap());
        let plan = |addr: SocketAddr, agent: &str| Plan {
            you_are_rvp: true,
            site: Some("c".into()),
            upstream: Some(Named {
                addr,
                agent_id: Some(agent.into()),
                background: true,
                held_bytes: 0,
                complete: false,
                ranges: Vec::new(),
                why: String::new(),
            }),
            peers: Vec::new(),
            origins: Vec::new(),
        };
        let drop = |seq: u64, addr: SocketAddr, device_busy: bool| Dropped {
            seq,
            content: id,
            addr,
            reason: String::new(),
            refused: true,
            banned: false,
            not_found: false,
            device_busy,
        };
        let view = |addr: SocketAddr, active: bool, dropped: bool| SourceView {
            addr,
            active,
            dropped,
            payload_bytes: 0,
            blocks_verified: 0,
            rate_bytes_per_s: 0,
            sealed_rejected: 0,
        };
        let mut w = Watch::default();
        // One look of the fetch loop: the engine's drops and sources, then the drops are seen.
        let look = |w: &mut Watch, up: SocketAddr, drops: &[Dropped], views: &[SourceView]| {
            w.upstream_answers(id, Some(up), drops, views);
            w.drops_seen = drops.last().map_or(w.drops_seen, |d| d.seq);
            w.up_refusing
        };
        w.upstream(&plan(b0, "b0"));
        let mut drops = vec![drop(1, b0, true)];
        assert!(
            look(&mut w, b0, &drops, &[view(b0, false, true)]),
            "b0 refuses: on battery"
        );
        // Asked again (the greeting is not answered yet): still its latest answer.
        assert!(look(&mut w, b0, &drops, &[view(b0, false, false)]));
        // Another content's drop, or another peer's, says nothing about b0.
        drops.push(Dropped {
            content: ContentId::of(b"other"),
            ..drop(2, b0, false)
        });
        drops.push(drop(3, hq0, false));
        assert!(look(&mut w, b0, &drops, &[view(b0, false, true)]));
        // Plugged in: it accepts the session, and has nothing more to send yet. No drop since.
        assert!(
            !look(&mut w, b0, &drops, &[view(b0, true, false)]),
            "a session with b0 is open: its refusal is over (this was a 60 s wait)"
        );
        assert!(!look(&mut w, b0, &drops, &[view(b0, true, false)]));
        // It refuses again later: that counts.
        drops.push(drop(4, b0, true));
        assert!(look(&mut w, b0, &drops, &[view(b0, false, true)]));
        // A full serving cap (Busy, not DeviceBusy) is its latest answer now: not refusing.
        drops.push(drop(5, b0, false));
        assert!(!look(&mut w, b0, &drops, &[view(b0, false, true)]));
        drops.push(drop(6, b0, true));
        assert!(look(&mut w, b0, &drops, &[view(b0, false, true)]));
        // The server names hq's RVP (b's serves nobody), then b's again once it serves: the
        // refusal was before this naming, and no drop of b0 came since.
        w.upstream(&plan(hq0, "hq0"));
        assert!(!w.up_refusing);
        assert!(!look(&mut w, hq0, &drops, &[view(hq0, true, false)]));
        w.upstream(&plan(b0, "b0"));
        assert!(
            !look(&mut w, b0, &drops, &[view(b0, false, false)]),
            "b0 named anew: its old DeviceBusy is not its answer (this was a 60 s wait)"
        );
        // The same naming seen again in the next answer keeps what b0 answered since.
        drops.push(drop(7, b0, true));
        assert!(look(&mut w, b0, &drops, &[view(b0, false, true)]));
        w.upstream(&plan(b0, "b0"));
        assert!(w.up_refusing, "the same upstream named again keeps its refusal");
        // Its agent restarted on another port: named anew.
        let b0_moved: SocketAddr = "10.0.2.10:7001".parse().unwrap();
        w.upstream(&plan(b0_moved, "b0"));
        assert!(!look(&mut w, b0_moved, &drops, &[view(b0_moved, false, false)]));
        // And what that means for the wait: the whole rvp_wait_secs, not RVP_REFUSING_WAIT.
        let refusing_ticks = ticks_of(RVP_REFUSING_WAIT);
        let standing = |refusing: bool| Standing {
            upstream: Some(UpstreamState {
                background: true,
                complete: false,
                dropped: false,
                refusing,
            }),
            you_are_rvp: true,
            given_any: true,
            live: 1,
            retries_pending: 0,
            idle_ticks: refusing_ticks,
            up_idle_ticks: refusing_ticks,
        };
        assert!(origin_reason(&standing(true), 20, refusing_ticks * 10).is_some());
        assert_eq!(origin_reason(&standing(w.up_refusing), 20, refusing_ticks * 10), None);
    }
}
