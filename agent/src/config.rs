//! Agent configuration: a TOML file (`/etc/lowtide/agent.toml` unless
//! `--config` or `LOWTIDE_CONFIG` says otherwise), then `LOWTIDE_*`
//! environment variables on top.
//!
//! ```toml
//! server_url = "https://lowtide.example.org"   # the Lowtide server's HTTP API
//! enrol_token = "lte1...."                      # used once, on first start
//! deployment_secret = "long shared passphrase"  # optional: overrides the P2P key the server hands out
//! state_dir = "/var/lib/lowtide"                # credential, control socket, store/ by default
//! store_dir = "/var/cache/lowtide/store"        # the content store (default: <state_dir>/store)
//! listen = "0.0.0.0:4500"                       # UDP address peers fetch from
//! cache_limit_mib = 10240                       # content store size limit
//! advertise_addresses = ["10.1.2.3"]            # report these instead of the discovered ones
//! hostname = "pc-0412"                          # name reported to the server (default: the host name)
//! preferred = false                             # ranking hint for RVP election
//! site_override = "branch-7"                    # pin this agent to a site
//! peer_stall_secs = 5                           # no progress from peers this long: use the origin
//! rvp_wait_secs = 600                           # wait this long for a live RVP upstream that makes no progress
//! sources_refresh_secs = 10                     # while fetching from peers, ask the server for more this often
//! heartbeat_secs = 60                           # 0: the interval the server asks for
//! inventory_secs = 2                            # how often inventory changes are reported
//! driver = "auto"                               # engine I/O driver: auto, uring, portable
//! uploads_max = 64                              # peers served at once (0: serve nobody)
//! encrypt_p2p = false                           # ask peers to encrypt the data they send (AES-256-GCM)
//! require_encryption = false                    # serve peers only over encrypted sessions
//! server_spki_sha256 = "101e9f…"                # pin the https server's key (SHA-256 of its SPKI) at enrolment
//! metrics_listen = "127.0.0.1:9464"             # Prometheus /metrics over HTTP (off when absent)
//!
//! # Discovery of peers on the local subnets (src/discovery/)
//! discovery = true                              # broadcast, neighbour cache and subnet scan
//! discovery_port = 4501                         # UDP port of discovery, the same on every agent
//! discovery_interval_secs = 30                  # presence queries this often
//! discovery_peer_timeout_secs = 90              # a peer silent this long is dropped
//! discovery_scan_per_sec = 10                   # subnet scan rate, unicast queries a second (0: no scan)
//! discovery_scan_prefix_min = 22                # scan only subnets of this prefix or longer (<= 1022 hosts)
//! discovery_lookup_ms = 300                     # a get waits this long for local holders (0: do not ask)
//!
//! # Serving limits
//! upload_bytes_per_sec_max = 0                  # all uploads together, bytes/s (0: no cap)
//! busy_cpu_percent_max = 0                      # refuse to serve above this CPU use, e.g. 90 (0: never refuse)
//! busy_disk_percent_max = 0                     # refuse to serve above this disk busy time, e.g. 90 (0: never refuse)
//! serve_on_battery = false                      # serve while running on battery
//! busy_check_secs = 5                           # how often CPU, disk and power are sampled
//! power_supply_dir = "/sys/class/power_supply"  # where the battery state is read
//!
//! # Egress monitor and pause-when-busy (src/monitor.rs)
//! monitor = "auto"                              # egress monitor: auto (eBPF, else netlink), ebpf, netlink, off
//! monitor_interfaces = ["eth0"]                 # interfaces to watch (default: the one toward the server)
//! busy_other_kbit = 2000                        # other traffic above this pauses background serving (0: never)
//! busy_resume_secs = 2                          # ...until it stays under half of that this long
//! ```
//!
//! The P2P deployment key comes from the server at enrolment and with every
//! heartbeat (over TLS when `server_url` is https). `deployment_secret`
//! overrides it: then every agent of the deployment needs the same passphrase,
//! and agents keyed by the server cannot talk to these.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use lowtide_ebpf::watch::MonitorMode;
use lowtide_engine::endpoint::DriverChoice;
use serde::Deserialize;

/// The config file read when neither `--config` nor `LOWTIDE_CONFIG` names one.
pub const CONFIG_PATH_DEFAULT: &str = "/etc/lowtide/agent.toml";
/// Longest a peer look-up may stall before the origin is used.
pub const PEER_STALL_SECS_MAX: u64 = 600;
/// Fastest subnet scan allowed, unicast queries a second.
pub const DISCOVERY_SCAN_PER_SEC_MAX: u32 = 1000;
/// Longest a get may wait for discovery answers.
pub const DISCOVERY_LOOKUP_MS_MAX: u64 = 5000;
/// Longest a download may wait for an upstream RVP that makes no progress.
pub const RVP_WAIT_SECS_MAX: u64 = 3600;

/// Everything the agent reads at start.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Base URL of the Lowtide server's HTTP API.
    pub server_url: Option<String>,
    /// Enrolment token, used once; afterwards the credential in `state_dir` is used.
    pub enrol_token: Option<String>,
    /// Passphrase the P2P deployment key is derived from, instead of the key the server hands out.
    pub deployment_secret: Option<String>,
    /// Credential, control socket and (unless `store_dir` says otherwise) the content store.
    pub state_dir: PathBuf,
    /// The content store; `<state_dir>/store` when not set.
    pub store_dir: Option<PathBuf>,
    /// UDP address the engine serves peers on (port 0: any free port).
    pub listen: SocketAddr,
    /// Size limit of the content store, in MiB.
    pub cache_limit_mib: u64,
    /// Addresses reported to the server instead of the discovered ones.
    pub advertise_addresses: Vec<IpAddr>,
    /// Name reported to the server (empty: the host name).
    pub hostname: String,
    /// Ranking hint: prefer this device as a site's RVP.
    pub preferred: bool,
    /// Pin this agent to a site instead of matching its subnets.
    pub site_override: Option<String>,
    /// No progress from peers for this long (or no peer at all): fetch the rest from the origin.
    pub peer_stall_secs: u64,
    /// While this agent's upstream (its site's RVP, or for an RVP the parent site's RVP) is
    /// listed by the server and still getting the content, or is reached over the background
    /// protocol, wait this long without progress (neither this agent's copy nor the upstream's
    /// grows) before fetching the rest from the origin.
    pub rvp_wait_secs: u64,
    /// While fetching from peers, ask the server for more sources this often.
    pub sources_refresh_secs: u64,
    /// Heartbeat interval; 0 takes the interval the server asks for.
    pub heartbeat_secs: u64,
    /// How often inventory changes are reported to the server.
    pub inventory_secs: u64,
    /// Engine I/O driver: auto, uring or portable.
    #[serde(deserialize_with = "de_driver")]
    pub driver: DriverChoice,
    /// Most peers served at once; further requests are refused as busy (0: serve nobody).
    pub uploads_max: usize,
    /// Ask peers to encrypt the data they send (a key per session, from the deployment key).
    pub encrypt_p2p: bool,
    /// Serve peers only over encrypted sessions (set `encrypt_p2p` on every agent too).
    pub require_encryption: bool,
    /// The https server's key (SHA-256 of its certificate's SubjectPublicKeyInfo): required at
    /// enrolment unless the system trusts the certificate; afterwards it overrides the pin kept
    /// in the credential file (to follow a key change without enrolling again).
    pub server_spki_sha256: Option<String>,
    /// Serve Prometheus metrics at `http://<this>/metrics`; off when absent.
    pub metrics_listen: Option<SocketAddr>,
    /// Discover peers on the local subnets (broadcast, neighbour cache, subnet scan).
    pub discovery: bool,
    /// UDP port of discovery; the same on every agent of a deployment.
    pub discovery_port: u16,
    /// Presence queries this often.
    pub discovery_interval_secs: u64,
    /// A peer that has not answered for this long is dropped.
    pub discovery_peer_timeout_secs: u64,
    /// Subnet scan rate in unicast queries a second (0: no scan).
    pub discovery_scan_per_sec: u32,
    /// Scan only subnets with at least this prefix length.
    pub discovery_scan_prefix_min: u8,
    /// How long a `get` waits for peers on the local subnets to answer (0: do not ask).
    pub discovery_lookup_ms: u64,
    /// Upload rate of all serving sessions together, bytes a second (0: no cap).
    pub upload_bytes_per_sec_max: u64,
    /// Refuse to serve while CPU use (all cores) is above this percentage (0: never refuse).
    pub busy_cpu_percent_max: u8,
    /// Refuse to serve while any disk is busy more than this share of the time (0: never refuse).
    pub busy_disk_percent_max: u8,
    /// Serve while the device runs on battery.
    pub serve_on_battery: bool,
    /// How often CPU, disk and power supply are sampled.
    pub busy_check_secs: u64,
    /// Where the power supplies are read (`type`, `status`, `online` files).
    pub power_supply_dir: PathBuf,
    /// Egress monitor for background serving: auto, ebpf, netlink or off.
    #[serde(deserialize_with = "de_monitor")]
    pub monitor: MonitorMode,
    /// Interfaces the monitor watches from the start (empty: the one toward the server).
    pub monitor_interfaces: Vec<String>,
    /// Other traffic on a watched interface above this (kbit/s) pauses background serving; 0: never.
    pub busy_other_kbit: u64,
    /// Background serving resumes once other traffic stays under half of `busy_other_kbit` this long.
    pub busy_resume_secs: u64,
}

fn de_monitor<'de, D: serde::Deserializer<'de>>(d: D) -> Result<MonitorMode, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(serde::de::Error::custom)
}

fn de_driver<'de, D: serde::Deserializer<'de>>(d: D) -> Result<DriverChoice, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(serde::de::Error::custom)
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server_url: None,
            enrol_token: None,
            deployment_secret: None,
            state_dir: PathBuf::from("/var/lib/lowtide"),
            store_dir: None,
            listen: SocketAddr::from(([0, 0, 0, 0], 4500)),
            cache_limit_mib: 10 * 1024,
            advertise_addresses: Vec::new(),
            hostname: String::new(),
            preferred: false,
            site_override: None,
            peer_stall_secs: 5,
            rvp_wait_secs: 600,
            sources_refresh_secs: 10,
            heartbeat_secs: 0,
            inventory_secs: 2,
            driver: DriverChoice::Auto,
            metrics_listen: None,
            monitor: MonitorMode::Auto,
            monitor_interfaces: Vec::new(),
            busy_other_kbit: 2000,
            busy_resume_secs: 2,
            uploads_max: lowtide_engine::session::serve::ServerConfig::default().sessions_max,
            encrypt_p2p: false,
            require_encryption: false,
            server_spki_sha256: None,
            discovery: true,
            discovery_port: 4501,
            discovery_interval_secs: 30,
            discovery_peer_timeout_secs: 90,
            discovery_scan_per_sec: 10,
            discovery_scan_prefix_min: 22,
            discovery_lookup_ms: 300,
            upload_bytes_per_sec_max: 0,
            busy_cpu_percent_max: 0,
            busy_disk_percent_max: 0,
            serve_on_battery: false,
            busy_check_secs: 5,
            power_supply_dir: PathBuf::from("/sys/class/power_supply"),
        }
    }
}

/// Environment variables read on top of the file, and the key each sets.
pub const ENV_OVERRIDES: &[(&str, &str)] = &[
    ("LOWTIDE_SERVER_URL", "server_url"),
    ("LOWTIDE_ENROL_TOKEN", "enrol_token"),
    ("LOWTIDE_DEPLOYMENT_SECRET", "deployment_secret"),
    ("LOWTIDE_STATE_DIR", "state_dir"),
    ("LOWTIDE_STORE_DIR", "store_dir"),
    ("LOWTIDE_LISTEN", "listen"),
    ("LOWTIDE_CACHE_LIMIT_MIB", "cache_limit_mib"),
    ("LOWTIDE_ADVERTISE_ADDRESSES", "advertise_addresses (comma-separated)"),
    ("LOWTIDE_HOSTNAME", "hostname"),
    ("LOWTIDE_PREFERRED", "preferred"),
    ("LOWTIDE_SITE_OVERRIDE", "site_override"),
    ("LOWTIDE_PEER_STALL_SECS", "peer_stall_secs"),
    ("LOWTIDE_RVP_WAIT_SECS", "rvp_wait_secs"),
    ("LOWTIDE_SOURCES_REFRESH_SECS", "sources_refresh_secs"),
    ("LOWTIDE_HEARTBEAT_SECS", "heartbeat_secs"),
    ("LOWTIDE_INVENTORY_SECS", "inventory_secs"),
    ("LOWTIDE_DRIVER", "driver"),
    ("LOWTIDE_METRICS_LISTEN", "metrics_listen"),
    ("LOWTIDE_UPLOADS_MAX", "uploads_max"),
    ("LOWTIDE_ENCRYPT_P2P", "encrypt_p2p"),
    ("LOWTIDE_REQUIRE_ENCRYPTION", "require_encryption"),
    ("LOWTIDE_SERVER_SPKI_SHA256", "server_spki_sha256"),
    ("LOWTIDE_DISCOVERY", "discovery"),
    ("LOWTIDE_DISCOVERY_PORT", "discovery_port"),
    ("LOWTIDE_DISCOVERY_INTERVAL_SECS", "discovery_interval_secs"),
    ("LOWTIDE_DISCOVERY_PEER_TIMEOUT_SECS", "discovery_peer_timeout_secs"),
    ("LOWTIDE_DISCOVERY_SCAN_PER_SEC", "discovery_scan_per_sec"),
    ("LOWTIDE_DISCOVERY_SCAN_PREFIX_MIN", "discovery_scan_prefix_min"),
    ("LOWTIDE_DISCOVERY_LOOKUP_MS", "discovery_lookup_ms"),
    ("LOWTIDE_UPLOAD_BYTES_PER_SEC_MAX", "upload_bytes_per_sec_max"),
    ("LOWTIDE_BUSY_CPU_PERCENT_MAX", "busy_cpu_percent_max"),
    ("LOWTIDE_BUSY_DISK_PERCENT_MAX", "busy_disk_percent_max"),
    ("LOWTIDE_SERVE_ON_BATTERY", "serve_on_battery"),
    ("LOWTIDE_BUSY_CHECK_SECS", "busy_check_secs"),
    ("LOWTIDE_POWER_SUPPLY_DIR", "power_supply_dir"),
    ("LOWTIDE_MONITOR", "monitor"),
    ("LOWTIDE_MONITOR_INTERFACES", "monitor_interfaces (comma-separated)"),
    ("LOWTIDE_BUSY_OTHER_KBIT", "busy_other_kbit"),
    ("LOWTIDE_BUSY_RESUME_SECS", "busy_resume_secs"),
];

impl Config {
    /// Read the config file and apply environment overrides from `env`.
    ///
    /// `path` is the file named by `--config`/`LOWTIDE_CONFIG` (it must exist);
    /// without one, [`CONFIG_PATH_DEFAULT`] is read if it exists.
    pub fn load(path: Option<&Path>, env: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        Self::load_or_default(path, Path::new(CONFIG_PATH_DEFAULT), env)
    }

    /// [`load`](Self::load) with another default file (tests must not read `/etc`).
    pub fn load_or_default(
        path: Option<&Path>,
        default: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Self> {
        let file = match path {
            Some(p) => Some(p.to_path_buf()),
            None => Some(default.to_path_buf()).filter(|p| p.exists()),
        };
        let mut cfg = match &file {
            Some(p) => {
                let text = std::fs::read_to_string(p).with_context(|| {
                    format!(
                        "reading config file {} (create it, or point --config / LOWTIDE_CONFIG at another)",
                        p.display()
                    )
                })?;
                Self::from_toml(&text).with_context(|| format!("in config file {}", p.display()))?
            }
            None => Self::default(),
        };
        cfg.apply_env(env)?;
        cfg.check()?;
        Ok(cfg)
    }

    pub fn from_toml(text: &str) -> anyhow::Result<Self> {
        toml::from_str(text)
            .context("config is not valid TOML for the Lowtide agent (the keys are listed in agent/src/config.rs)")
    }

    fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> anyhow::Result<()> {
        for (var, _) in ENV_OVERRIDES {
            let Some(v) = env(var) else { continue };
            let bad = |e: &dyn std::fmt::Display| anyhow::anyhow!("environment variable {var}={v:?} is not valid: {e}");
            let text = || Some(v.clone()).filter(|s| !s.is_empty());
            match *var {
                "LOWTIDE_SERVER_URL" => self.server_url = text(),
                "LOWTIDE_ENROL_TOKEN" => self.enrol_token = text(),
                "LOWTIDE_DEPLOYMENT_SECRET" => self.deployment_secret = text(),
                "LOWTIDE_STATE_DIR" => self.state_dir = PathBuf::from(&v),
                "LOWTIDE_STORE_DIR" => self.store_dir = text().map(PathBuf::from),
                "LOWTIDE_LISTEN" => self.listen = v.parse().map_err(|e| bad(&e))?,
                "LOWTIDE_CACHE_LIMIT_MIB" => self.cache_limit_mib = v.parse().map_err(|e| bad(&e))?,
                "LOWTIDE_ADVERTISE_ADDRESSES" => {
                    self.advertise_addresses = v
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(|s| s.parse().map_err(|e| bad(&e)))
                        .collect::<anyhow::Result<_>>()?
                }
                "LOWTIDE_HOSTNAME" => self.hostname = v.clone(),
                "LOWTIDE_PREFERRED" => self.preferred = v.parse().map_err(|e| bad(&e))?,
                "LOWTIDE_SITE_OVERRIDE" => self.site_override = text(),
                "LOWTIDE_PEER_STALL_SECS" => self.peer_stall_secs = v.parse().map_err(|e| bad(&e))?,
                "LOWTIDE_RVP_WAIT_SECS" => self.rvp_wait_secs = v.parse().map_err(|e| bad(&e))?,
                "LOWTIDE_SOURCES_REFRESH_SECS" => self.sources_refresh_secs = v.parse().map_err(|e| bad(&e))?,
                "LOWTIDE_HEARTBEAT_SECS" => self.heartbeat_secs = v.parse().map_err(|e| bad(&e))?,
                "LOWTIDE_INVENTORY_SECS" => self.inventory_secs = v.parse().map_err(|e| bad(&e))?,
                "LOWTIDE_DRIVER" => self.driver = v.parse().map_err(|e: String| bad(&e))?,
                "LOWTIDE_UPLOADS_MAX" => self.uploads_max = v.parse().map_err(|e| bad(&e))?,
                "LOWTIDE_ENCRYPT_P2P" => self.encrypt_p2p = v.parse().map_err(|e| bad(&e))?,
                "LOWTIDE_REQUIRE_ENCRYPTION" => self.require_encryption = v.parse().map_err(|e| bad(&e))?,
                "LOWTIDE_SERVER_SPKI_SHA256" => self.server_spki_sha256 = text(),
                "LOWTIDE_DISCOVERY" => self.discovery = v.parse().map_err(|e| bad(&e))?,
                "LOWTIDE_DISCOVERY_PORT" => self.discovery_port = v.parse().map_err(|e| bad(&e))?,
                "LOWTIDE_DISCOVERY_INTERVAL_SECS" => self.discovery_interval_secs = v.parse().map_err(|e| bad(&e))?,
                "LOWTIDE_DISCOVERY_PEER_TIMEOUT_SECS" => {
                    self.discovery_peer_timeout_secs = v.parse().map_err(|e| bad(&e))?
                }
                "LOWTIDE_DISCOVERY_SCAN_PER_SEC" => self.discovery_scan_per_sec = v.parse().map_err(|e| bad(&e))?,
                "LOWTIDE_DISCOVERY_SCAN_PREFIX_MIN" => {
                    self.discovery_scan_prefix_min = v.parse().map_err(|e| bad(&e))?
                }
                "LOWTIDE_DISCOVERY_LOOKUP_MS" => self.discovery_lookup_ms = v.parse().map_err(|e| bad(&e))?,
                "LOWTIDE_UPLOAD_BYTES_PER_SEC_MAX" => self.upload_bytes_per_sec_max = v.parse().map_err(|e| bad(&e))?,
                "LOWTIDE_BUSY_CPU_PERCENT_MAX" => self.busy_cpu_percent_max = v.parse().map_err(|e| bad(&e))?,
                "LOWTIDE_BUSY_DISK_PERCENT_MAX" => self.busy_disk_percent_max = v.parse().map_err(|e| bad(&e))?,
                "LOWTIDE_SERVE_ON_BATTERY" => self.serve_on_battery = v.parse().map_err(|e| bad(&e))?,
                "LOWTIDE_BUSY_CHECK_SECS" => self.busy_check_secs = v.parse().map_err(|e| bad(&e))?,
                "LOWTIDE_POWER_SUPPLY_DIR" => self.power_supply_dir = PathBuf::from(&v),
                "LOWTIDE_MONITOR" => self.monitor = v.parse().map_err(|e: String| bad(&e))?,
                "LOWTIDE_MONITOR_INTERFACES" => {
                    self.monitor_interfaces = v
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect()
                }
                "LOWTIDE_BUSY_OTHER_KBIT" => self.busy_other_kbit = v.parse().map_err(|e| bad(&e))?,
                "LOWTIDE_BUSY_RESUME_SECS" => self.busy_resume_secs = v.parse().map_err(|e| bad(&e))?,
                "LOWTIDE_METRICS_LISTEN" => {
                    self.metrics_listen = text().map(|t| t.parse()).transpose().map_err(|e| bad(&e))?
                }
                _ => unreachable!("every entry of ENV_OVERRIDES has an arm"),
            }
        }
        Ok(())
    }

    /// What every command needs of a config (`load` runs it after the overrides).
    pub fn check(&self) -> anyhow::Result<()> {
        if let Some(u) = &self.server_url {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                bail!("server_url {u:?} must start with http:// or https://");
            }
        }
        if let Some(p) = &self.server_spki_sha256 {
            crate::tls::parse_pin(p)?;
        }
        anyhow::ensure!(self.cache_limit_mib >= 1, "cache_limit_mib must be at least 1");
        anyhow::ensure!(self.inventory_secs >= 1, "inventory_secs must be at least 1");
        anyhow::ensure!(
            self.sources_refresh_secs >= 1,
            "sources_refresh_secs must be at least 1"
        );
        anyhow::ensure!(
            self.peer_stall_secs <= PEER_STALL_SECS_MAX,
            "peer_stall_secs must be at most {PEER_STALL_SECS_MAX}"
        );
        if self.discovery {
            anyhow::ensure!(
                self.discovery_port != 0,
                "discovery_port must not be 0: every agent must use the same port (or set discovery = false)"
            );
            anyhow::ensure!(
                self.discovery_interval_secs >= 1 && self.discovery_peer_timeout_secs > self.discovery_interval_secs,
                "discovery_peer_timeout_secs must be longer than discovery_interval_secs (at least 1), \
                 or every peer is dropped between two rounds"
            );
            anyhow::ensure!(
                self.discovery_scan_per_sec <= DISCOVERY_SCAN_PER_SEC_MAX,
                "discovery_scan_per_sec must be at most {DISCOVERY_SCAN_PER_SEC_MAX}"
            );
            anyhow::ensure!(
                (16..=30).contains(&self.discovery_scan_prefix_min),
                "discovery_scan_prefix_min must be between 16 and 30"
            );
            anyhow::ensure!(
                self.discovery_lookup_ms <= DISCOVERY_LOOKUP_MS_MAX,
                "discovery_lookup_ms must be at most {DISCOVERY_LOOKUP_MS_MAX} (it delays every get)"
            );
        }
        for (k, v) in [
            ("busy_cpu_percent_max", self.busy_cpu_percent_max),
            ("busy_disk_percent_max", self.busy_disk_percent_max),
        ] {
            anyhow::ensure!(v <= 100, "{k} is a percentage: 0 (never refuse) to 100");
        }
        anyhow::ensure!(self.busy_check_secs >= 1, "busy_check_secs must be at least 1");
        anyhow::ensure!(
            self.rvp_wait_secs <= RVP_WAIT_SECS_MAX,
            "rvp_wait_secs must be at most {RVP_WAIT_SECS_MAX}"
        );
        Ok(())
    }

    /// What `run` needs on top of what every command needs: the server URL and the
    /// deployment secret that overrides the server's key, if any.
    pub fn check_for_daemon(&self) -> anyhow::Result<(&str, Option<&str>)> {
        let Some(url) = self.server_url.as_deref() else {
            bail!("no server_url: set it in the config file ({CONFIG_PATH_DEFAULT} by default) or LOWTIDE_SERVER_URL");
        };
        Ok((url.trim_end_matches('/'), self.deployment_secret.as_deref()))
    }

    pub fn store_dir(&self) -> PathBuf {
        self.store_dir.clone().unwrap_or_else(|| self.state_dir.join("store"))
    }

    pub fn socket_path(&self) -> PathBuf {
        self.state_dir.join("agent.sock")
    }

    pub fn credential_path(&self) -> PathBuf {
        self.state_dir.join("credential.json")
    }

    pub fn cache_limit_bytes(&self) -> u64 {
        self.cache_limit_mib.saturating_mul(1 << 20)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_env_overrides_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.toml");
        std::fs::write(
            &p,
            "server_url = \"http://127.0.0.1:7400\"\ncache_limit_mib = 5\nlisten = \"127.0.0.1:0\"\ndriver = \"portable\"\n",
        )
        .unwrap();
        let cfg = Config::load(Some(&p), |k| match k {
            "LOWTIDE_CACHE_LIMIT_MIB" => Some("7".into()),
            "LOWTIDE_ADVERTISE_ADDRESSES" => Some("127.0.0.1, 10.0.0.2".into()),
            "LOWTIDE_STATE_DIR" => Some("/tmp/x".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(cfg.cache_limit_mib, 7);
        assert_eq!(cfg.listen.port(), 0);
        assert_eq!(cfg.driver, DriverChoice::Portable);
        assert_eq!(cfg.advertise_addresses.len(), 2);
        assert_eq!(cfg.store_dir(), PathBuf::from("/tmp/x/store"));
    }

    fn load_env(env: impl Fn(&str) -> Option<String>) -> anyhow::Result<Config> {
        Config::load_or_default(None, Path::new("/nonexistent/lowtide-agent.toml"), env)
    }

    #[test]
    fn config_errors_say_what_to_do() {
        let e = Config::from_toml("server_ur = \"x\"").unwrap_err();
        assert!(format!("{e:#}").contains("server_ur"), "{e:#}");
        let e = load_env(|k| (k == "LOWTIDE_LISTEN").then(|| "nope".into())).unwrap_err();
        assert!(e.to_string().contains("LOWTIDE_LISTEN"), "{e}");
        let e = Config::load(Some(Path::new("/nonexistent/agent.toml")), |_| None).unwrap_err();
        assert!(format!("{e:#}").contains("--config"), "{e:#}");
        let cfg = load_env(|_| None).unwrap();
        let e = cfg.check_for_daemon().unwrap_err();
        assert!(e.to_string().contains("LOWTIDE_SERVER_URL"), "{e}");
        let cfg = load_env(|k| (k == "LOWTIDE_SERVER_URL").then(|| "http://s".into())).unwrap();
        assert_eq!(cfg.check_for_daemon().unwrap(), ("http://s", None));
        let e = load_env(|k| (k == "LOWTIDE_SERVER_URL").then(|| "ftp://s".into())).unwrap_err();
        assert!(e.to_string().contains("http://"), "{e}");
    }
}
