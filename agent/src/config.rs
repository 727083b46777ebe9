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
//! preferred = false                             # ranking hint for RVP election
//! site_override = "branch-7"                    # pin this agent to a site
//! peer_stall_secs = 5                           # no progress from peers this long: use the origin
//! sources_refresh_secs = 10                     # while fetching from peers, ask the server for more this often
//! heartbeat_secs = 60                           # 0: the interval the server asks for
//! inventory_secs = 2                            # how often inventory changes are reported
//! driver = "auto"                               # engine I/O driver: auto, uring, portable
//! uploads_max = 64                              # peers served at once (0: serve nobody)
//! encrypt_p2p = false                           # ask peers to encrypt the data they send (AES-256-GCM)
//! require_encryption = false                    # serve peers only over encrypted sessions
//! server_spki_sha256 = "101e9f…"                # pin the https server's key (SHA-256 of its SPKI) at enrolment
//! metrics_listen = "127.0.0.1:9464"             # Prometheus /metrics over HTTP (off when absent)
//! ```
//!
//! The P2P deployment key comes from the server at enrolment and with every
//! heartbeat (over TLS when `server_url` is https). `deployment_secret`
//! overrides it: then every agent of the deployment needs the same passphrase,
//! and agents keyed by the server cannot talk to these.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use lowtide_engine::endpoint::DriverChoice;
use serde::Deserialize;

/// The config file read when neither `--config` nor `LOWTIDE_CONFIG` names one.
pub const CONFIG_PATH_DEFAULT: &str = "/etc/lowtide/agent.toml";
/// Longest a peer look-up may stall before the origin is used.
pub const PEER_STALL_SECS_MAX: u64 = 600;

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
            sources_refresh_secs: 10,
            heartbeat_secs: 0,
            inventory_secs: 2,
            driver: DriverChoice::Auto,
            metrics_listen: None,
            uploads_max: lowtide_engine::session::serve::ServerConfig::default().sessions_max,
            encrypt_p2p: false,
            require_encryption: false,
            server_spki_sha256: None,
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
    ("LOWTIDE_SOURCES_REFRESH_SECS", "sources_refresh_secs"),
    ("LOWTIDE_HEARTBEAT_SECS", "heartbeat_secs"),
    ("LOWTIDE_INVENTORY_SECS", "inventory_secs"),
    ("LOWTIDE_DRIVER", "driver"),
    ("LOWTIDE_METRICS_LISTEN", "metrics_listen"),
    ("LOWTIDE_UPLOADS_MAX", "uploads_max"),
    ("LOWTIDE_ENCRYPT_P2P", "encrypt_p2p"),
    ("LOWTIDE_REQUIRE_ENCRYPTION", "require_encryption"),
    ("LOWTIDE_SERVER_SPKI_SHA256", "server_spki_sha256"),
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
                "LOWTIDE_SOURCES_REFRESH_SECS" => self.sources_refresh_secs = v.parse().map_err(|e| bad(&e))?,
                "LOWTIDE_HEARTBEAT_SECS" => self.heartbeat_secs = v.parse().map_err(|e| bad(&e))?,
                "LOWTIDE_INVENTORY_SECS" => self.inventory_secs = v.parse().map_err(|e| bad(&e))?,
                "LOWTIDE_DRIVER" => self.driver = v.parse().map_err(|e: String| bad(&e))?,
                "LOWTIDE_UPLOADS_MAX" => self.uploads_max = v.parse().map_err(|e| bad(&e))?,
                "LOWTIDE_ENCRYPT_P2P" => self.encrypt_p2p = v.parse().map_err(|e| bad(&e))?,
                "LOWTIDE_REQUIRE_ENCRYPTION" => self.require_encryption = v.parse().map_err(|e| bad(&e))?,
                "LOWTIDE_SERVER_SPKI_SHA256" => self.server_spki_sha256 = text(),
                "LOWTIDE_METRICS_LISTEN" => {
                    self.metrics_listen = text().map(|t| t.parse()).transpose().map_err(|e| bad(&e))?
                }
                _ => unreachable!("every entry of ENV_OVERRIDES has an arm"),
            }
        }
        Ok(())
    }

    fn check(&self) -> anyhow::Result<()> {
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
