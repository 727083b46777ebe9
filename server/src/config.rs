//! Server configuration: a TOML file, then `LOWTIDE_*` environment variables
//! on top, then command-line flags on top of both.
//!
//! ```toml
//! state_dir = "/var/lib/lowtide-server"     # SQLite database, signing key, file store
//! database_url = "postgres://lowtide@db/lowtide"   # omit for SQLite under state_dir
//! listen = "0.0.0.0:7400"
//! public_url = "https://lowtide.example.org"       # how agents reach this server (origin URLs)
//! admin_token = "long random string"               # enables the HTTP admin API
//! inactive_after_secs = 300
//! heartbeat_secs = 60
//! peers_active_max = 8
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

/// Everything the server reads at start.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory for the SQLite database and the file store.
    pub state_dir: PathBuf,
    /// `sqlite://...` or `postgres://...`; empty means SQLite in `state_dir`.
    pub database_url: Option<String>,
    /// Address the HTTP API listens on.
    pub listen: SocketAddr,
    /// Base URL agents use to reach this server; origin URLs of stored content start with it.
    pub public_url: Option<String>,
    /// Bearer token for the HTTP admin API; without it the admin API answers 403.
    pub admin_token: Option<String>,
    /// An agent not heard from for this long is inactive and left out of answers.
    pub inactive_after_secs: u64,
    /// How often agents are told to heartbeat.
    pub heartbeat_secs: u64,
    /// Most peers of one site that serve one content at a time; the rest wait on the bench.
    pub peers_active_max: u32,
    /// Largest JSON request body.
    pub body_bytes_max: usize,
    /// Largest topology CSV upload.
    pub topology_bytes_max: usize,
    /// Database connections per server process (reads; SQLite writes use one connection).
    pub db_connections_max: u32,
    /// Default lifetime of an enrolment token.
    pub token_ttl_hours: u64,
    /// PEM certificate chain; with `tls_key`, the API is served over HTTPS.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from("/var/lib/lowtide-server"),
            database_url: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 7400)),
            public_url: None,
            admin_token: None,
            inactive_after_secs: 300,
            heartbeat_secs: 60,
            peers_active_max: 8,
            body_bytes_max: 1 << 20,
            topology_bytes_max: 8 << 20,
            db_connections_max: 8,
            token_ttl_hours: 24 * 7,
            tls_cert: None,
            tls_key: None,
        }
    }
}

/// Environment variables read on top of the file, and the field each sets.
pub const ENV_OVERRIDES: &[(&str, &str)] = &[
    ("LOWTIDE_STATE_DIR", "state_dir"),
    ("LOWTIDE_DATABASE_URL", "database_url"),
    ("LOWTIDE_LISTEN", "listen"),
    ("LOWTIDE_PUBLIC_URL", "public_url"),
    ("LOWTIDE_ADMIN_TOKEN", "admin_token"),
    ("LOWTIDE_INACTIVE_AFTER_SECS", "inactive_after_secs"),
    ("LOWTIDE_HEARTBEAT_SECS", "heartbeat_secs"),
    ("LOWTIDE_PEERS_ACTIVE_MAX", "peers_active_max"),
    ("LOWTIDE_BODY_BYTES_MAX", "body_bytes_max"),
    ("LOWTIDE_DB_CONNECTIONS_MAX", "db_connections_max"),
    ("LOWTIDE_TLS_CERT", "tls_cert"),
    ("LOWTIDE_TLS_KEY", "tls_key"),
];

impl Config {
    /// Read `path` (if given) and apply environment overrides from `env`.
    pub fn load(path: Option<&Path>, env: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let mut cfg = match path {
            Some(p) => {
                let text =
                    std::fs::read_to_string(p).with_context(|| format!("reading config file {}", p.display()))?;
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
            .context("config is not valid TOML for the Lowtide server (see the keys in server/src/config.rs)")
    }

    fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> anyhow::Result<()> {
        for (var, _) in ENV_OVERRIDES {
            let Some(v) = env(var) else { continue };
            let bad = |e: &dyn std::fmt::Display| anyhow::anyhow!("environment variable {var}={v:?} is not valid: {e}");
            match *var {
                "LOWTIDE_STATE_DIR" => self.state_dir = PathBuf::from(&v),
                "LOWTIDE_DATABASE_URL" => self.database_url = Some(v.clone()).filter(|s| !s.is_empty()),
                "LOWTIDE_LISTEN" => self.listen = v.parse().map_err(|e| bad(&e))?,
                "LOWTIDE_PUBLIC_URL" => self.public_url = Some(v.clone()).filter(|s| !s.is_empty()),
                "LOWTIDE_ADMIN_TOKEN" => self.admin_token = Some(v.clone()).filter(|s| !s.is_empty()),
                "LOWTIDE_INACTIVE_AFTER_SECS" => self.inactive_after_secs = v.parse().map_err(|e| bad(&e))?,
                "LOWTIDE_HEARTBEAT_SECS" => self.heartbeat_secs = v.parse().map_err(|e| bad(&e))?,
                "LOWTIDE_PEERS_ACTIVE_MAX" => self.peers_active_max = v.parse().map_err(|e| bad(&e))?,
                "LOWTIDE_BODY_BYTES_MAX" => self.body_bytes_max = v.parse().map_err(|e| bad(&e))?,
                "LOWTIDE_DB_CONNECTIONS_MAX" => self.db_connections_max = v.parse().map_err(|e| bad(&e))?,
                "LOWTIDE_TLS_CERT" => self.tls_cert = Some(PathBuf::from(&v)).filter(|p| !p.as_os_str().is_empty()),
                "LOWTIDE_TLS_KEY" => self.tls_key = Some(PathBuf::from(&v)).filter(|p| !p.as_os_str().is_empty()),
                _ => unreachable!("every entry of ENV_OVERRIDES has an arm"),
            }
        }
        Ok(())
    }

    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.peers_active_max >= 1, "peers_active_max must be at least 1");
        anyhow::ensure!(self.inactive_after_secs >= 1, "inactive_after_secs must be at least 1");
        anyhow::ensure!(self.db_connections_max >= 1, "db_connections_max must be at least 1");
        anyhow::ensure!(self.body_bytes_max >= 1024, "body_bytes_max must be at least 1024");
        anyhow::ensure!(
            self.tls_cert.is_some() == self.tls_key.is_some(),
            "tls_cert and tls_key go together: set both for HTTPS, or neither for plain HTTP"
        );
        if let Some(t) = &self.admin_token {
            anyhow::ensure!(
                t.len() >= 16,
                "admin_token must be at least 16 characters; generate one with `openssl rand -hex 24`"
            );
        }
        Ok(())
    }

    /// The database URL in force: the configured one or SQLite under `state_dir`.
    pub fn database_url(&self) -> String {
        match &self.database_url {
            Some(u) => u.clone(),
            None => format!("sqlite://{}?mode=rwc", self.state_dir.join("lowtide.db").display()),
        }
    }

    /// Where published files are kept when the server is their origin.
    pub fn files_dir(&self) -> PathBuf {
        self.state_dir.join("files")
    }

    /// Base URL for origin links, without a trailing slash.
    pub fn public_url(&self) -> String {
        match &self.public_url {
            Some(u) => u.trim_end_matches('/').to_string(),
            None if self.tls_cert.is_some() => format!("https://{}", self.listen),
            None => format!("http://{}", self.listen),
        }
    }

    pub fn inactive_after_ms(&self) -> i64 {
        i64::try_from(self.inactive_after_secs.saturating_mul(1000)).unwrap_or(i64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_env_overrides_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.toml");
        std::fs::write(&p, "peers_active_max = 3\nlisten = \"127.0.0.1:9000\"\n").unwrap();
        let cfg = Config::load(Some(&p), |k| (k == "LOWTIDE_PEERS_ACTIVE_MAX").then(|| "5".to_string())).unwrap();
        assert_eq!(cfg.peers_active_max, 5);
        assert_eq!(cfg.listen.port(), 9000);
    }

    #[test]
    fn config_example_file_parses_to_the_defaults() {
        let cfg = Config::from_toml(include_str!("../lowtide-server.example.toml")).unwrap();
        let d = Config::default();
        assert_eq!(cfg.listen.port(), 7400);
        assert_eq!(
            (
                cfg.inactive_after_secs,
                cfg.heartbeat_secs,
                cfg.peers_active_max,
                cfg.body_bytes_max
            ),
            (
                d.inactive_after_secs,
                d.heartbeat_secs,
                d.peers_active_max,
                d.body_bytes_max
            )
        );
        assert_eq!(
            (cfg.topology_bytes_max, cfg.db_connections_max, cfg.token_ttl_hours),
            (d.topology_bytes_max, d.db_connections_max, d.token_ttl_hours)
        );
        cfg.check().unwrap();
    }

    #[test]
    fn config_rejects_unknown_keys_and_bad_env() {
        assert!(Config::from_toml("peers_activ_max = 3").is_err());
        let err = Config::load(None, |k| (k == "LOWTIDE_LISTEN").then(|| "nope".to_string())).unwrap_err();
        assert!(err.to_string().contains("LOWTIDE_LISTEN"), "{err}");
    }
}
