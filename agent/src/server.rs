//! The agent's side of the server's HTTP API (`server/src/api.rs`): enrol,
//! heartbeat, inventory, traffic, sources, the signed manifest and the block
//! table.
//!
//! The request and answer types mirror `lowtide_server::store` field for
//! field (the agent does not link the server crate, which carries the
//! database); the integration tests run both against each other.

use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use ipnet::IpNet;
use lowtide_engine::content::{BlockTable, ContentId};
use serde::{Deserialize, Serialize};

use crate::facts::{Chassis, OsType};
use crate::tls::PinVerifier;

/// Longest any API call may take.
pub const REQUEST_TIMEOUT_SECS: u64 = 30;
/// Largest block table accepted from the server (a 1 TiB content at 16 KiB blocks).
pub const TABLE_BYTES_MAX: usize = 64 << 21;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Enrolled {
    pub agent_id: String,
    pub credential: String,
    pub server_public_key: String,
    pub heartbeat_secs: u64,
    /// The P2P deployment key (64 hex); absent from servers older than the key hand-out.
    #[serde(default)]
    pub deployment_key: Option<String>,
    #[serde(default)]
    pub deployment_key_previous: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Facts {
    pub hostname: String,
    pub addresses: Vec<IpAddr>,
    pub subnets: Vec<IpNet>,
    pub port: u16,
    pub disk_free_bytes: u64,
    pub disk_usable_bytes: u64,
    pub chassis: Chassis,
    pub os_type: OsType,
    pub uptime_secs: u64,
    pub preferred: bool,
    pub site_override: Option<String>,
    /// Serves peers now (see `Shared::serves` in the daemon); the server elects an agent that
    /// does not as its site's RVP only when no agent of the site serves.
    pub serves: bool,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct HeartbeatReply {
    pub agent_id: String,
    pub site: Option<String>,
    pub site_kind: Option<String>,
    pub heartbeat_secs: u64,
    #[serde(default)]
    pub deployment_key: Option<String>,
    #[serde(default)]
    pub deployment_key_previous: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct InventoryItem {
    pub content: ContentId,
    pub complete: bool,
    pub ranges: Vec<(u64, u64)>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Inventory {
    pub items: Vec<InventoryItem>,
    pub replace: bool,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct TrafficReport {
    pub lan_bytes: u64,
    pub wan_bytes: u64,
    pub origin_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    Peer,
    SiteRvp,
    ParentRvp,
    Origin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Foreground,
    Background,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Source {
    pub kind: SourceKind,
    pub protocol: Protocol,
    pub reason: String,
    #[serde(default)]
    pub agent_id: Option<String>,
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub site: Option<String>,
    #[serde(default)]
    pub url: Option<String>,
    pub held_percent: u64,
    #[serde(default)]
    pub ranges: Vec<(u64, u64)>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SourcesAnswer {
    pub content: ContentId,
    pub size: u64,
    pub site: Option<String>,
    pub you_are_rvp: bool,
    #[serde(default)]
    pub wan_up_kbps: Option<u64>,
    #[serde(default)]
    pub wan_down_kbps: Option<u64>,
    pub sources: Vec<Source>,
}

/// What a name look-up answers (the server's content record; more fields are ignored).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Resolved {
    pub id: ContentId,
    pub name: String,
    pub version: String,
}

/// A content this agent should fetch for its site, as the site's RVP.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Assignment {
    pub content: ContentId,
    pub site: String,
    pub size: u64,
    pub held_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AssignmentsAnswer {
    pub assignments: Vec<Assignment>,
}

/// What the server signs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    pub id: ContentId,
    pub name: String,
    pub version: String,
    pub size: u64,
    pub block_chunks_log: u8,
    pub origins: Vec<String>,
    pub published_ms: i64,
}

/// A signed manifest as served: the exact signed JSON text and its Ed25519 signature.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SignedManifest {
    pub manifest: String,
    pub signature: String,
    pub public_key: String,
}

impl SignedManifest {
    /// Check the signature against the key pinned at enrolment (never the key
    /// the answer carries), then parse.
    pub fn verify(&self, pinned_key_hex: &str) -> anyhow::Result<Manifest> {
        use ed25519_dalek::{Signature, Verifier, VerifyingKey};
        let mut key = [0u8; 32];
        hex::decode_to_slice(pinned_key_hex, &mut key).map_err(|_| {
            anyhow!("the server key pinned in the credential file is not 64 hex characters; enrol again")
        })?;
        let key = VerifyingKey::from_bytes(&key).map_err(|e| anyhow!("the pinned server key is not valid: {e}"))?;
        let mut sig = [0u8; 64];
        hex::decode_to_slice(&self.signature, &mut sig)
            .map_err(|_| anyhow!("the manifest signature is not 128 hex characters"))?;
        key.verify(self.manifest.as_bytes(), &Signature::from_bytes(&sig))
            .map_err(|_| {
                anyhow!(
                    "the manifest signature does not verify against the server key pinned at enrolment \
                 ({}…): refusing the content. If the server's key really changed, re-enrol the agent",
                    &pinned_key_hex[..16.min(pinned_key_hex.len())]
                )
            })?;
        serde_json::from_str(&self.manifest).context("the signed manifest is not valid JSON")
    }
}

/// An HTTP error answer from the server: status and its `error` text.
#[derive(Debug)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the server answered {}: {}", self.status, self.message)
    }
}

impl std::error::Error for ApiError {}

/// A client of one server.
#[derive(Clone)]
pub struct Client {
    /// Replaced by [`Client::reset_connections`] when this machine's addresses change.
    http: Arc<RwLock<reqwest::Client>>,
    base: String,
    verifier: Option<Arc<PinVerifier>>,
}

/// Install the ring crypto provider for rustls (once per process).
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A plain HTTP client with the agent's timeouts (for the server and origins).
pub fn http_client() -> anyhow::Result<reqwest::Client> {
    http_client_with(None)
}

/// An HTTP client with the agent's timeouts whose TLS certificates `verifier` checks
/// (reqwest's default, the system's trust store, without one).
pub fn http_client_with(verifier: Option<&Arc<PinVerifier>>) -> anyhow::Result<reqwest::Client> {
    install_tls_provider();
    let mut b = reqwest::Client::builder()
        .timeout(Duration::from_secs(REQUEST_TIMEOUT_SECS))
        .connect_timeout(Duration::from_secs(10))
        .user_agent(concat!("lowtide-agent/", env!("CARGO_PKG_VERSION")));
    if let Some(v) = verifier {
        b = b.tls_backend_preconfigured(v.client_config()?);
    }
    b.build().context("building the HTTP client")
}

impl Client {
    pub fn new(base: &str) -> anyhow::Result<Self> {
        Self::with_verifier(base, None)
    }

    /// A client whose TLS connections to the server `verifier` checks (see [`crate::tls`]).
    pub fn with_verifier(base: &str, verifier: Option<&Arc<PinVerifier>>) -> anyhow::Result<Self> {
        Ok(Self {
            http: Arc::new(RwLock::new(http_client_with(verifier)?)),
            base: base.trim_end_matches('/').to_string(),
            verifier: verifier.cloned(),
        })
    }

    /// The key hash of the server's TLS certificate last accepted (https only).
    pub fn pinned(&self) -> Option<String> {
        self.verifier.as_ref().and_then(|v| v.seen())
    }

    /// `GET /healthz`: is the server there (and, over https, the one pinned)?
    pub async fn health(&self) -> anyhow::Result<()> {
        self.send(self.http().get(format!("{}/healthz", self.base)), "checking the server")
            .await
            .map(|_| ())
    }

    fn http(&self) -> reqwest::Client {
        self.http.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Forget pooled connections to the server: after this machine's addresses
    /// changed they may be bound to an address that is gone, and a request on
    /// one would hang until its timeout.
    pub fn reset_connections(&self) -> anyhow::Result<()> {
        let fresh = http_client_with(self.verifier.as_ref())?;
        *self.http.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    async fn send(&self, rb: reqwest::RequestBuilder, what: &str) -> anyhow::Result<reqwest::Response> {
        let r = rb
            .send()
            .await
            .with_context(|| format!("{what}: cannot reach the server at {}", self.base))?;
        let status = r.status();
        if status.is_success() {
            return Ok(r);
        }
        let body = r.bytes().await.unwrap_or_default();
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned());
        Err(anyhow::Error::new(ApiError {
            status: status.as_u16(),
            message,
        })
        .context(what.to_string()))
    }

    async fn json<T: serde::de::DeserializeOwned>(r: reqwest::Response, what: &str) -> anyhow::Result<T> {
        let b = r.bytes().await.with_context(|| format!("{what}: reading the answer"))?;
        serde_json::from_slice(&b)
            .with_context(|| format!("{what}: the server's answer is not what this agent expects"))
    }

    pub async fn enrol(&self, token: &str, hostname: &str) -> anyhow::Result<Enrolled> {
        let what = "enrolling";
        let r = self
            .send(
                self.http()
                    .post(format!("{}/v1/enroll", self.base))
                    .json(&serde_json::json!({"token": token, "hostname": hostname})),
                what,
            )
            .await?;
        Self::json(r, what).await
    }

    pub async fn heartbeat(&self, cred: &str, facts: &Facts) -> anyhow::Result<HeartbeatReply> {
        let what = "heartbeat";
        let r = self
            .send(
                self.http()
                    .post(format!("{}/v1/heartbeat", self.base))
                    .bearer_auth(cred)
                    .json(facts),
                what,
            )
            .await?;
        Self::json(r, what).await
    }

    pub async fn inventory(&self, cred: &str, inv: &Inventory) -> anyhow::Result<()> {
        self.send(
            self.http()
                .put(format!("{}/v1/inventory", self.base))
                .bearer_auth(cred)
                .json(inv),
            "reporting inventory",
        )
        .await?;
        Ok(())
    }

    pub async fn traffic(&self, cred: &str, t: &TrafficReport) -> anyhow::Result<()> {
        self.send(
            self.http()
                .post(format!("{}/v1/traffic", self.base))
                .bearer_auth(cred)
                .json(t),
            "reporting traffic",
        )
        .await?;
        Ok(())
    }

    pub async fn sources(&self, cred: &str, id: &ContentId) -> anyhow::Result<SourcesAnswer> {
        let what = format!("asking the server for sources of {id}");
        let r = self
            .send(
                self.http()
                    .get(format!("{}/v1/content/{id}/sources", self.base))
                    .bearer_auth(cred),
                &what,
            )
            .await?;
        Self::json(r, &what).await
    }

    /// The content published as `name` (`version`, or the highest version not retired).
    pub async fn resolve(&self, cred: &str, name: &str, version: Option<&str>) -> anyhow::Result<Resolved> {
        let what = match version {
            Some(v) => format!("looking up {name}@{v}"),
            None => format!("looking up {name}"),
        };
        let mut url = reqwest::Url::parse(&self.base).with_context(|| format!("server_url {:?}", self.base))?;
        url.path_segments_mut()
            .map_err(|()| anyhow!("server_url {} cannot take a path", self.base))?
            .pop_if_empty()
            .extend(["v1", "names", name])
            .extend(version);
        let r = self.send(self.http().get(url).bearer_auth(cred), &what).await?;
        Self::json(r, &what).await
    }

    /// What to fetch for the site as its RVP: answers at once when there is something not in
    /// `running`, else waits up to `wait_ms` on the server for it.
    pub async fn assignments(
        &self,
        cred: &str,
        running: &[ContentId],
        wait_ms: u64,
    ) -> anyhow::Result<Vec<Assignment>> {
        let what = "asking the server what to fetch for the site";
        let r = self
            .send(
                self.http()
                    .post(format!("{}/v1/assignments", self.base))
                    .bearer_auth(cred)
                    .json(&serde_json::json!({"wait_ms": wait_ms, "running": running})),
                what,
            )
            .await?;
        Ok(Self::json::<AssignmentsAnswer>(r, what).await?.assignments)
    }

    pub async fn manifest(&self, cred: &str, id: &ContentId) -> anyhow::Result<SignedManifest> {
        let what = format!("fetching the manifest of {id}");
        let r = self
            .send(
                self.http()
                    .get(format!("{}/v1/content/{id}/manifest", self.base))
                    .bearer_auth(cred),
                &what,
            )
            .await?;
        Self::json(r, &what).await
    }

    /// The block table, verified against `id` before it is returned.
    pub async fn table(&self, cred: &str, id: &ContentId) -> anyhow::Result<BlockTable> {
        let what = format!("fetching the block table of {id}");
        let r = self
            .send(
                self.http()
                    .get(format!("{}/v1/content/{id}/table", self.base))
                    .bearer_auth(cred),
                &what,
            )
            .await?;
        let b = r.bytes().await.with_context(|| format!("{what}: reading the answer"))?;
        if b.len() > TABLE_BYTES_MAX {
            bail!("{what}: {} bytes is more than any table can be", b.len());
        }
        BlockTable::decode_verified(&b, id)
            .with_context(|| format!("{what}: the server sent a table that does not hash to the content id"))
    }
}

/// The status of an HTTP error in `e`'s chain, if any.
pub fn api_status(e: &anyhow::Error) -> Option<u16> {
    e.chain().find_map(|c| c.downcast_ref::<ApiError>()).map(|a| a.status)
}
