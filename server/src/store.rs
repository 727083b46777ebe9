//! Storage: every read and write of the server's state, on SQLite or PostgreSQL
//! through `sqlx`'s `Any` driver with runtime queries.
//!
//! # Rules that keep several servers on one database correct
//!
//! - No state lives only in a process. The only in-process data is a cache of
//!   the topology, re-validated against `meta.topology_version` at most every
//!   [`TOPOLOGY_RECHECK_MS`].
//! - Elections are written with a conditional upsert (`... WHERE rvp.agent_id =
//!   <the one we saw>`), so two servers electing at once agree on one winner.
//! - Multi-row changes (enrolment, inventory, topology import) run in one
//!   transaction: a request that fails writes nothing.
//!
//! SQL is written once for both backends: `$N` placeholders (SQLite reads them
//! too), BIGINT for numbers and flags, and `INSERT ... ON CONFLICT`.
//!
//! On SQLite, writes go through a pool of one connection (SQLite has one writer
//! anyway; queueing in the pool beats spinning on `SQLITE_BUSY`) and reads
//! through a pool of several (WAL lets them run beside the writer).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use ed25519_dalek::SigningKey;
use ipnet::IpNet;
use lowtide_engine::content::ContentId;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AnyPool, Row};

use crate::error::{Error, Result};
use crate::ranking::{self, Candidate, Chassis, OsType, RankFacts};
use crate::topology::{Site, SiteKind, Topology};

/// How long a cached topology is trusted before its version is checked again.
pub const TOPOLOGY_RECHECK_MS: i64 = 1000;
/// Most agents of one site read to answer one sources request.
pub const SITE_CANDIDATES_MAX: i64 = 5000;
/// Most items in one inventory update.
pub const INVENTORY_ITEMS_MAX: usize = 10_000;
/// Most addresses or subnets an agent may report.
pub const AGENT_ADDRESSES_MAX: usize = 64;
/// Longest hostname, site override or token note.
pub const TEXT_FIELD_CHARS_MAX: usize = 255;
/// How long a cached content row is trusted (a retirement on another server shows within this).
pub const CONTENT_RECHECK_MS: i64 = 1000;
/// Most content rows cached per process.
pub const CONTENT_CACHE_MAX: usize = 4096;
/// Most heartbeats written in one statement.
pub const HEARTBEAT_BATCH_MAX: usize = 64;
/// Heartbeat writers (concurrent batches) per process on PostgreSQL.
pub const HEARTBEAT_WRITERS_PG: usize = 4;
/// Most heartbeats waiting for the writers; further requests wait to enqueue.
pub const HEARTBEAT_QUEUE_MAX: usize = 4096;
/// Largest byte count one traffic report may add (1 PiB).
pub const TRAFFIC_REPORT_BYTES_MAX: u64 = 1 << 50;
/// How long the cached deployment keys are trusted (a rotation by another server or the
/// command line shows within this).
pub const DEPLOYMENT_KEYS_RECHECK_MS: i64 = 5000;
/// Longest a request waits for a PostgreSQL connection; when the database is
/// down, requests get a 503 after this instead of hanging (sqlx's default is 30 s).
pub const PG_ACQUIRE_TIMEOUT_MS: u64 = 5000;

const SQLITE_INIT: &str = include_str!("../migrations/sqlite/0001_init.sql");
const POSTGRES_INIT: &str = include_str!("../migrations/postgres/0001_init.sql");
const SQLITE_WANTED: &str = include_str!("../migrations/sqlite/0002_wanted.sql");
const POSTGRES_WANTED: &str = include_str!("../migrations/postgres/0002_wanted.sql");
const SQLITE_RVP_POLLED: &str = include_str!("../migrations/sqlite/0003_rvp_polled.sql");
const POSTGRES_RVP_POLLED: &str = include_str!("../migrations/postgres/0003_rvp_polled.sql");
const SQLITE_AGENT_SERVES: &str = include_str!("../migrations/sqlite/0004_agent_serves.sql");
const POSTGRES_AGENT_SERVES: &str = include_str!("../migrations/postgres/0004_agent_serves.sql");
/// A recorded RVP that has not asked for its assignments (`POST /v1/assignments`, which
/// every agent long-polls about every 20 s) for this long is taken as gone, and the site
/// gets a new RVP, whether or not it holds the content whole (a dead RVP that holds it is
/// no source either, and the agents of its site and of the sites below wait for whoever is
/// named): far sooner than `inactive_after_secs` (300 s by default), and well before the
/// waiting agents give up on it (the agent's `rvp_wait_secs`) and cross the WAN to the origin.
pub const RVP_POLL_GRACE_MS: i64 = 45_000;
/// In an election, agents not heard from for this many heartbeat intervals come after the
/// others: they are likely gone with the RVP they would replace (whose heartbeats still made
/// it active when it stopped polling), and two gone agents elected in turn would each be
/// waited for a poll grace, until `inactive_after_secs`.
pub const ELECTION_FRESH_HEARTBEATS: i64 = 3;
/// An RVP's last poll is written at most this often.
pub const RVP_POLL_REWRITE_MS: i64 = 10_000;
/// Most wanted contents looked at per site for one assignments answer.
pub const ASSIGNMENTS_MAX: i64 = 64;
/// A (site, content) recorded as wanted is not written again for this long (saves a write per
/// sources query while a site downloads).
pub const WANTED_REWRITE_MS: i64 = 10_000;
/// Most (site, content) pairs remembered as recently wanted.
const WANTED_SEEN_MAX: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The server's database.
#[derive(Clone)]
pub struct Store {
    read: AnyPool,
    write: AnyPool,
    backend: Backend,
    topo: Arc<Mutex<TopoCache>>,
    /// One queue per heartbeat writer; an agent always goes to the same one (by id), so
    /// concurrent batches never update the same row (no lock-order deadlocks on PostgreSQL).
    hb_tx: Arc<Vec<tokio::sync::mpsc::Sender<HbItem>>>,
    /// Content rows by id with the time they were read; trusted for [`CONTENT_RECHECK_MS`].
    content_cache: Arc<Mutex<HashMap<ContentId, (ContentInfo, i64)>>>,
    /// The deployment keys with the time they were read; trusted for [`DEPLOYMENT_KEYS_RECHECK_MS`].
    keys_cache: Arc<Mutex<Option<(DeploymentKeys, i64)>>>,
    /// (site, content) pairs recorded as wanted, with when (see [`WANTED_REWRITE_MS`]).
    wanted_seen: Arc<Mutex<HashMap<(String, ContentId), i64>>>,
    /// Woken when a site comes to want a content or an RVP is elected: long-polling
    /// assignment requests of this process look again (other processes find out by their recheck).
    assignments_changed: Arc<tokio::sync::Notify>,
    /// The heartbeat interval agents are told (see [`ELECTION_FRESH_HEARTBEATS`]).
    heartbeat_ms: Arc<AtomicI64>,
}

/// A site's recorded RVP for one content, and whether it still counts: it polls for its
/// assignments (every agent does, whether or not it still has something to fetch).
#[derive(Debug, Clone, Default)]
struct Recorded {
    agent_id: Option<String>,
    polling: bool,
}

/// One heartbeat waiting for the writer.
struct HbItem {
    row: HbRow,
    /// `Ok(true)` recorded, `Ok(false)` refused (unknown, forged or revoked), `Err` database failure.
    reply: tokio::sync::oneshot::Sender<Result<bool, Error>>,
}

struct HbRow {
    agent_id: String,
    secret_hash: String,
    now_ms: i64,
    hostname: String,
    addresses: String,
    subnets: String,
    site: Option<String>,
    site_override: Option<String>,
    port: i64,
    disk_free_bytes: i64,
    disk_usable_bytes: i64,
    chassis: &'static str,
    os_type: &'static str,
    uptime_secs: i64,
    preferred: i64,
    serves: i64,
}

/// Columns of one heartbeat row in the batched UPDATE.
const HB_COLUMNS: usize = 16;

/// Record heartbeats in batches: whatever queued while the last batch was being
/// written goes in the next single `UPDATE ... FROM (VALUES ...)` statement. At low
/// load a batch is one heartbeat and nothing waits; under load it saves a database
/// round trip and a commit per heartbeat. Per process, so several servers can run.
async fn heartbeat_writer(pool: AnyPool, mut rx: tokio::sync::mpsc::Receiver<HbItem>) {
    let mut batch = Vec::with_capacity(HEARTBEAT_BATCH_MAX);
    while rx.recv_many(&mut batch, HEARTBEAT_BATCH_MAX).await > 0 {
        let result = write_heartbeats(&pool, &batch).await;
        for item in batch.drain(..) {
            let r = match &result {
                Ok(ids) => Ok(ids.contains(&item.row.agent_id)),
                Err(e) => Err(if crate::error::db_unavailable(e) {
                    Error::Unavailable(crate::error::db_message(e))
                } else {
                    Error::Internal(format!("database error while recording a heartbeat: {e}"))
                }),
            };
            let _ = item.reply.send(r);
        }
    }
}

async fn write_heartbeats(pool: &AnyPool, batch: &[HbItem]) -> Result<std::collections::HashSet<String>, sqlx::Error> {
    let mut sql = String::from(
        "UPDATE agents SET last_seen_ms = v.column3, hostname = v.column4, addresses = v.column5, subnets = v.column6, \
         site_id = v.column7, site_override = v.column8, port = v.column9, disk_free_bytes = v.column10, \
         disk_usable_bytes = v.column11, chassis = v.column12, os_type = v.column13, uptime_secs = v.column14, \
         preferred = v.column15, serves = v.column16 FROM (VALUES ",
    );
    for i in 0..batch.len() {
        sql.push_str(if i == 0 { "(" } else { ", (" });
        for c in 0..HB_COLUMNS {
            if c > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!("${}", i * HB_COLUMNS + c + 1));
        }
        sql.push(')');
    }
    sql.push_str(
        ") AS v WHERE agents.id = v.column1 AND agents.secret_hash = v.column2 AND agents.revoked_ms IS NULL RETURNING agents.id",
    );
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
    for item in batch {
        let r = &item.row;
        q = q
            .bind(r.agent_id.clone())
            .bind(r.secret_hash.clone())
            .bind(r.now_ms)
            .bind(r.hostname.clone())
            .bind(r.addresses.clone())
            .bind(r.subnets.clone())
            .bind(r.site.clone())
            .bind(r.site_override.clone())
            .bind(r.port)
            .bind(r.disk_free_bytes)
            .bind(r.disk_usable_bytes)
            .bind(r.chassis)
            .bind(r.os_type)
            .bind(r.uptime_secs)
            .bind(r.preferred)
            .bind(r.serves);
    }
    let rows = q.fetch_all(pool).await?;
    rows.iter().map(|r| r.try_get::<String, _>(0)).collect()
}

struct TopoCache {
    version: Option<String>,
    checked_ms: i64,
    topo: Arc<Topology>,
}

/// Facts an agent reports in each heartbeat. `Facts::default()` is what an empty heartbeat
/// body reads as (so it serves).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Facts {
    #[serde(default)]
    pub hostname: String,
    /// The agent's IP addresses.
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    /// The subnets its interfaces are on (CIDR).
    #[serde(default)]
    pub subnets: Vec<IpNet>,
    /// UDP/TCP port it serves peers on.
    #[serde(default)]
    pub port: u16,
    /// Real free disk space.
    #[serde(default)]
    pub disk_free_bytes: u64,
    /// Free space the agent may use for its cache.
    #[serde(default)]
    pub disk_usable_bytes: u64,
    #[serde(default)]
    pub chassis: Chassis,
    #[serde(default)]
    pub os_type: OsType,
    #[serde(default)]
    pub uptime_secs: u64,
    #[serde(default)]
    pub preferred: bool,
    /// A site id this agent is pinned to, overriding its subnets.
    #[serde(default)]
    pub site_override: Option<String>,
    /// Whether the agent serves peers now: false while its engine refuses every session
    /// (`uploads_max = 0`, on battery with `serve_on_battery = false`, busy). Absent (older
    /// agents): true. Elections take an agent that does not serve only when no agent of
    /// its site does.
    #[serde(default = "serves_by_default")]
    pub serves: bool,
}

fn serves_by_default() -> bool {
    true
}

impl Default for Facts {
    fn default() -> Self {
        Self {
            hostname: String::new(),
            addresses: Vec::new(),
            subnets: Vec::new(),
            port: 0,
            disk_free_bytes: 0,
            disk_usable_bytes: 0,
            chassis: Chassis::default(),
            os_type: OsType::default(),
            uptime_secs: 0,
            preferred: false,
            site_override: None,
            serves: true,
        }
    }
}

impl Facts {
    fn check(&self) -> Result<()> {
        if self.hostname.chars().count() > TEXT_FIELD_CHARS_MAX {
            return Err(Error::BadRequest(format!(
                "hostname is longer than {TEXT_FIELD_CHARS_MAX} characters"
            )));
        }
        if self.addresses.len() > AGENT_ADDRESSES_MAX || self.subnets.len() > AGENT_ADDRESSES_MAX {
            return Err(Error::BadRequest(format!(
                "at most {AGENT_ADDRESSES_MAX} addresses and {AGENT_ADDRESSES_MAX} subnets"
            )));
        }
        if self
            .site_override
            .as_ref()
            .is_some_and(|s| s.chars().count() > TEXT_FIELD_CHARS_MAX)
        {
            return Err(Error::BadRequest(format!(
                "site_override is longer than {TEXT_FIELD_CHARS_MAX} characters"
            )));
        }
        Ok(())
    }
}

/// A published content as listed and shown.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ContentInfo {
    pub id: ContentId,
    pub name: String,
    pub version: String,
    pub size: u64,
    pub block_chunks_log: u8,
    pub origins: Vec<String>,
    /// Whether the server's own file store holds a copy.
    pub stored: bool,
    pub published_ms: i64,
    pub retired_ms: Option<i64>,
}

/// What gets signed: the manifest agents check before trusting anything else.
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

/// A signed manifest as served: the exact signed JSON text, its Ed25519 signature and the key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SignedManifest {
    pub manifest: String,
    pub signature: String,
    pub public_key: String,
}

impl SignedManifest {
    /// Check the signature against `public_key_hex` (the key the agent pinned at enrolment) and parse.
    pub fn verify(&self, public_key_hex: &str) -> Result<Manifest, String> {
        use ed25519_dalek::{Signature, Verifier, VerifyingKey};
        let mut key = [0u8; 32];
        hex::decode_to_slice(public_key_hex, &mut key)
            .map_err(|_| "public key is not 64 hex characters".to_string())?;
        let key = VerifyingKey::from_bytes(&key).map_err(|e| format!("bad public key: {e}"))?;
        let mut sig = [0u8; 64];
        hex::decode_to_slice(&self.signature, &mut sig)
            .map_err(|_| "signature is not 128 hex characters".to_string())?;
        key.verify(self.manifest.as_bytes(), &Signature::from_bytes(&sig))
            .map_err(|_| "manifest signature does not verify: it was not signed by this server's key".to_string())?;
        serde_json::from_str(&self.manifest).map_err(|e| format!("signed manifest is not valid JSON: {e}"))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenInfo {
    pub id: String,
    pub note: String,
    pub created_ms: i64,
    pub expires_ms: i64,
    pub uses_left: i64,
    pub revoked_ms: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NewToken {
    pub id: String,
    /// The secret token to give the agent; shown once, stored only as a hash.
    pub token: String,
    pub expires_ms: i64,
    pub uses: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Enrolled {
    pub agent_id: String,
    /// Send as `Authorization: Bearer <credential>`; shown once, stored only as a hash.
    pub credential: String,
    /// The server's Ed25519 key (hex) that signs manifests.
    pub server_public_key: String,
    pub heartbeat_secs: u64,
    /// The P2P deployment key (64 hex) the agent keys the engine with; sent only over this API.
    pub deployment_key: String,
    /// The key before the last rotation, still accepted from peers that have not learnt the new one.
    pub deployment_key_previous: Option<String>,
}

/// The P2P deployment keys (hex): `current` signs every datagram; `previous`
/// (after a rotation) is still accepted until the next rotation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeploymentKeys {
    pub current: String,
    pub previous: Option<String>,
}

impl std::fmt::Display for DeploymentKeys {
    /// Fingerprints only: never the keys themselves.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let fp = |k: &str| blake3::hash(k.as_bytes()).to_hex()[..12].to_string();
        write!(f, "current {}", fp(&self.current))?;
        match &self.previous {
            Some(p) => write!(f, ", previous {} (still accepted)", fp(p)),
            None => write!(f, ", no previous"),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AgentStatus {
    Active,
    Inactive,
    Revoked,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentInfo {
    pub id: String,
    pub hostname: String,
    pub status: AgentStatus,
    pub site: Option<String>,
    pub site_override: Option<String>,
    pub addresses: Vec<String>,
    pub subnets: Vec<String>,
    pub port: u16,
    pub disk_free_bytes: u64,
    pub disk_usable_bytes: u64,
    pub chassis: Chassis,
    pub os_type: OsType,
    pub uptime_secs: u64,
    pub preferred: bool,
    /// Serves peers, as its last heartbeat said (see [`Facts::serves`]).
    pub serves: bool,
    pub enrolled_ms: i64,
    pub last_seen_ms: i64,
    pub revoked_ms: Option<i64>,
}

/// An authenticated agent.
#[derive(Debug, Clone)]
pub struct AgentAuth {
    pub id: String,
    pub site: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HeartbeatReply {
    pub agent_id: String,
    pub site: Option<String>,
    pub site_kind: Option<SiteKind>,
    pub heartbeat_secs: u64,
    /// The P2P deployment keys, so a rotation reaches every agent within one heartbeat.
    pub deployment_key: String,
    pub deployment_key_previous: Option<String>,
}

/// One entry of an inventory update.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct InventoryItem {
    pub content: ContentId,
    /// The whole content is held and verified.
    #[serde(default)]
    pub complete: bool,
    /// Byte ranges `[start, end)` held, when not complete. Empty and not complete: no longer held.
    #[serde(default)]
    pub ranges: Vec<(u64, u64)>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    pub items: Vec<InventoryItem>,
    /// Forget everything else this agent held before.
    #[serde(default)]
    pub replace: bool,
}

/// Bytes an agent moved since its last report.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TrafficReport {
    /// Sent to or received from peers of its own site.
    #[serde(default)]
    pub lan_bytes: u64,
    /// Received over its site's WAN link (from the parent site).
    #[serde(default)]
    pub wan_bytes: u64,
    /// Fetched from the origin.
    #[serde(default)]
    pub origin_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TrafficRow {
    pub site: String,
    /// `lan` (within the site), `wan` (the site's link to its parent) or `origin`.
    pub link: String,
    pub bytes: u64,
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
    /// LAN transfer at line rate.
    Foreground,
    /// WAN scavenger transfer that yields to other traffic.
    Background,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Source {
    pub kind: SourceKind,
    pub protocol: Protocol,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Percent of the content this source holds (100 for the origin).
    pub held_percent: u64,
    /// Byte ranges held, when partial.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ranges: Vec<(u64, u64)>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SourcesAnswer {
    pub content: ContentId,
    pub size: u64,
    pub site: Option<String>,
    /// This agent is its site's RVP for the content: it fetches across the WAN for its site.
    pub you_are_rvp: bool,
    /// Limits of the agent's site's WAN link to its parent (from the topology), for pacing background transfers.
    pub wan_up_kbps: Option<u64>,
    pub wan_down_kbps: Option<u64>,
    /// Ranked best first.
    pub sources: Vec<Source>,
}

/// `POST /v1/assignments`: what an RVP should fetch for its site.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AssignmentsRequest {
    /// Wait up to this long for an assignment not in `running` (bounded by the server).
    #[serde(default)]
    pub wait_ms: u64,
    /// Contents the agent is already fetching: the wait ends only for others.
    #[serde(default)]
    pub running: Vec<ContentId>,
}

/// One content an agent should fetch for its site, as the site's RVP.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Assignment {
    pub content: ContentId,
    pub site: String,
    pub size: u64,
    /// Bytes of it the agent holds, as last reported.
    pub held_bytes: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AssignmentsAnswer {
    pub assignments: Vec<Assignment>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Election {
    pub site: String,
    pub content: ContentId,
    pub rvp: Option<String>,
    /// Whether the RVP serves peers (null without an RVP). False only when no agent of the
    /// site that is still heard from serves; `warning` then says so.
    pub rvp_serves: Option<bool>,
    pub serving: Vec<String>,
    pub bench: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counts {
    pub agents_active: i64,
    pub agents_inactive: i64,
    pub agents_revoked: i64,
    pub content_live: i64,
    pub content_retired: i64,
    pub sites: i64,
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}

fn hexok(x: &str, n: usize) -> bool {
    x.len() == n && x.bytes().all(|b| b.is_ascii_hexdigit())
}

fn secret_hash(secret: &str) -> String {
    blake3::hash(secret.as_bytes()).to_hex().to_string()
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Prefix of agent credentials.
pub const CREDENTIAL_PREFIX: &str = "lt1";
/// Prefix of enrolment tokens.
pub const TOKEN_PREFIX: &str = "lte1";

/// Split `prefix.id.secret`, checking the shape (32-hex id, 64-hex secret).
fn split_secret<'a>(s: &'a str, prefix: &str, what: &str) -> Result<(&'a str, &'a str)> {
    let bad = || {
        Error::Unauthorized(format!(
            "malformed {what}: expected {prefix}.<32 hex id>.<64 hex secret>; copy it again exactly"
        ))
    };
    let mut it = s.trim().split('.');
    let (p, id, secret) = (
        it.next().ok_or_else(bad)?,
        it.next().ok_or_else(bad)?,
        it.next().ok_or_else(bad)?,
    );
    if it.next().is_some() || p != prefix || !hexok(id, 32) || !hexok(secret, 64) {
        return Err(bad());
    }
    Ok((id, secret))
}

/// Order version strings as people read them: split into runs of digits and
/// of other characters, digits compared as numbers (`1.10` after `1.9`), the
/// rest as text; a version that is a prefix of another sorts first.
pub fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn parts(s: &str) -> impl Iterator<Item = (bool, &str)> {
        let mut rest = s;
        std::iter::from_fn(move || {
            let first = rest.chars().next()?;
            let digit = first.is_ascii_digit();
            let end = rest.find(|c: char| c.is_ascii_digit() != digit).unwrap_or(rest.len());
            let (head, tail) = rest.split_at(end);
            rest = tail;
            Some((digit, head))
        })
    }
    let (mut x, mut y) = (parts(a), parts(b));
    loop {
        match (x.next(), y.next()) {
            (None, None) => return a.cmp(b),
            (None, Some(_)) => return std::cmp::Ordering::Less,
            (Some(_), None) => return std::cmp::Ordering::Greater,
            (Some((true, p)), Some((true, q))) => {
                let (p, q) = (p.trim_start_matches('0'), q.trim_start_matches('0'));
                let o = p.len().cmp(&q.len()).then_with(|| p.cmp(q));
                if o.is_ne() {
                    return o;
                }
            }
            (Some((_, p)), Some((_, q))) => {
                let o = p.cmp(q);
                if o.is_ne() {
                    return o;
                }
            }
        }
    }
}

/// Shorten input echoed back in an error.
fn clip(s: &str) -> String {
    s.chars().take(80).collect()
}

fn content_info(r: &AnyRow) -> Result<ContentInfo> {
    let id: String = r.try_get("id")?;
    let origins: String = r.try_get("origins")?;
    Ok(ContentInfo {
        id: id
            .parse()
            .map_err(|e| Error::Upstream(format!("database holds a bad content id: {e}")))?,
        name: r.try_get("name")?,
        version: r.try_get("version")?,
        size: to_u64(r.try_get("size")?),
        block_chunks_log: u8::try_from(r.try_get::<i64, _>("block_chunks_log")?).unwrap_or(0),
        origins: serde_json::from_str(&origins).unwrap_or_default(),
        stored: r.try_get::<i64, _>("stored")? != 0,
        published_ms: r.try_get("published_ms")?,
        retired_ms: r.try_get("retired_ms")?,
    })
}

const AGENT_COLS: &str = "id, hostname, revoked_ms, last_seen_ms, site_id, site_override, addresses, subnets, port, \
     disk_free_bytes, disk_usable_bytes, chassis, os_type, uptime_secs, preferred, serves, enrolled_ms";

fn words(s: String) -> Vec<String> {
    s.split_whitespace().map(str::to_string).collect()
}

fn agent_info(r: &AnyRow, active_since_ms: i64) -> Result<AgentInfo> {
    let revoked_ms: Option<i64> = r.try_get("revoked_ms")?;
    let last_seen_ms: i64 = r.try_get("last_seen_ms")?;
    let status = if revoked_ms.is_some() {
        AgentStatus::Revoked
    } else if last_seen_ms >= active_since_ms {
        AgentStatus::Active
    } else {
        AgentStatus::Inactive
    };
    Ok(AgentInfo {
        id: r.try_get("id")?,
        hostname: r.try_get("hostname")?,
        status,
        site: r.try_get("site_id")?,
        site_override: r.try_get("site_override")?,
        addresses: words(r.try_get("addresses")?),
        subnets: words(r.try_get("subnets")?),
        port: u16::try_from(r.try_get::<i64, _>("port")?).unwrap_or(0),
        disk_free_bytes: to_u64(r.try_get("disk_free_bytes")?),
        disk_usable_bytes: to_u64(r.try_get("disk_usable_bytes")?),
        chassis: Chassis::parse(&r.try_get::<String, _>("chassis")?),
        os_type: OsType::parse(&r.try_get::<String, _>("os_type")?),
        uptime_secs: to_u64(r.try_get("uptime_secs")?),
        preferred: r.try_get::<i64, _>("preferred")? != 0,
        serves: r.try_get::<i64, _>("serves")? != 0,
        enrolled_ms: r.try_get("enrolled_ms")?,
        last_seen_ms,
        revoked_ms,
    })
}

/// A candidate from the first [`CANDIDATE_COLUMNS`] columns of a candidates, holders or RVP query.
/// The columns [`candidate`] reads (agents `a`, holdings `h`), first in every query it reads.
macro_rules! candidate_columns {
    () => {
        "a.id, a.addresses, a.port, a.disk_free_bytes, a.preferred, a.chassis, a.os_type, a.uptime_secs, \
         a.disk_usable_bytes, h.bytes, h.ranges, a.serves"
    };
}
/// How many columns [`candidate_columns!`] names: a query's own columns come after them.
const CANDIDATE_COLUMNS: usize = 12;

fn candidate(r: &AnyRow) -> Result<Candidate> {
    Ok(Candidate {
        agent_id: r.try_get(0)?,
        addresses: words(r.try_get(1)?),
        port: u16::try_from(r.try_get::<i64, _>(2)?).unwrap_or(0),
        facts: RankFacts {
            disk_free_bytes: to_u64(r.try_get(3)?),
            preferred: r.try_get::<i64, _>(4)? != 0,
            chassis: Chassis::parse(&r.try_get::<String, _>(5)?),
            os_type: OsType::parse(&r.try_get::<String, _>(6)?),
            uptime_secs: to_u64(r.try_get(7)?),
            disk_usable_bytes: to_u64(r.try_get(8)?),
        },
        held_bytes: r.try_get::<Option<i64>, _>(9)?.map(to_u64).unwrap_or(0),
        ranges: r
            .try_get::<Option<String>, _>(10)?
            .map(|t| ranking::ranges_from_text(&t))
            .unwrap_or_default(),
        serves: r.try_get::<i64, _>(11)? != 0,
    })
}

impl Store {
    /// Open (creating if needed) and migrate the database at `url`.
    pub async fn open(url: &str, connections_max: u32) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            return Err(Error::BadRequest(format!(
                "database URL {:?} is neither sqlite://... nor postgres://...",
                clip(url.split('@').next_back().unwrap_or(""))
            )));
        };
        let (read, write) = match backend {
            Backend::Sqlite => {
                let opts = || {
                    AnyPoolOptions::new().after_connect(|conn, _| {
                        Box::pin(async move {
                            use sqlx::Executor;
                            conn.execute("PRAGMA journal_mode = WAL").await?;
                            conn.execute("PRAGMA synchronous = NORMAL").await?;
                            conn.execute("PRAGMA foreign_keys = ON").await?;
                            conn.execute("PRAGMA busy_timeout = 5000").await?;
                            // Read the (small) database through memory, not a pread per page.
                            conn.execute("PRAGMA cache_size = -32768").await?;
                            conn.execute("PRAGMA mmap_size = 268435456").await?;
                            Ok(())
                        })
                    })
                };
                let write = opts().max_connections(1).connect(url).await?;
                let read = opts().max_connections(connections_max).connect(url).await?;
                (read, write)
            }
            Backend::Postgres => {
                let pool = AnyPoolOptions::new()
                    .max_connections(connections_max)
                    .acquire_timeout(std::time::Duration::from_millis(PG_ACQUIRE_TIMEOUT_MS))
                    .connect(url)
                    .await?;
                (pool.clone(), pool)
            }
        };
        let sql = match backend {
            Backend::Sqlite => SQLITE_INIT,
            Backend::Postgres => POSTGRES_INIT,
        };
        let wanted = match backend {
            Backend::Sqlite => SQLITE_WANTED,
            Backend::Postgres => POSTGRES_WANTED,
        };
        let rvp_polled = match backend {
            Backend::Sqlite => SQLITE_RVP_POLLED,
            Backend::Postgres => POSTGRES_RVP_POLLED,
        };
        let agent_serves = match backend {
            Backend::Sqlite => SQLITE_AGENT_SERVES,
            Backend::Postgres => POSTGRES_AGENT_SERVES,
        };
        let migrator = Migrator::with_migrations(vec![
            Migration::new(
                1,
                "init".into(),
                MigrationType::Simple,
                sqlx::SqlSafeStr::into_sql_str(sql),
                false,
            ),
            Migration::new(
                2,
                "wanted".into(),
                MigrationType::Simple,
                sqlx::SqlSafeStr::into_sql_str(wanted),
                false,
            ),
            Migration::new(
                3,
                "rvp polled".into(),
                MigrationType::Simple,
                sqlx::SqlSafeStr::into_sql_str(rvp_polled),
                false,
            ),
            Migration::new(
                4,
                "agent serves".into(),
                MigrationType::Simple,
                sqlx::SqlSafeStr::into_sql_str(agent_serves),
                false,
            ),
        ]);
        migrator.run(&write).await?;
        // SQLite has one writer anyway; PostgreSQL takes concurrent batches.
        let writers = match backend {
            Backend::Sqlite => 1,
            Backend::Postgres => HEARTBEAT_WRITERS_PG.min(connections_max as usize).max(1),
        };
        let hb_tx = Arc::new(
            (0..writers)
                .map(|_| {
                    let (tx, rx) = tokio::sync::mpsc::channel(HEARTBEAT_QUEUE_MAX / writers);
                    tokio::spawn(heartbeat_writer(write.clone(), rx));
                    tx
                })
                .collect::<Vec<_>>(),
        );
        let store = Self {
            read,
            write,
            backend,
            hb_tx,
            content_cache: Arc::default(),
            keys_cache: Arc::default(),
            wanted_seen: Arc::default(),
            assignments_changed: Arc::new(tokio::sync::Notify::new()),
            heartbeat_ms: Arc::new(AtomicI64::new(60_000)),
            topo: Arc::new(Mutex::new(TopoCache {
                version: None,
                checked_ms: i64::MIN,
                topo: Arc::default(),
            })),
        };
        Ok(store)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub async fn close(&self) {
        self.write.close().await;
        self.read.close().await;
    }

    // ---- signing key ----

    /// The server's Ed25519 signing key, created on first use and shared by every server on this database.
    pub async fn signing_key(&self) -> Result<SigningKey> {
        let mut seed = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut seed);
        sqlx::query("INSERT INTO meta (key, value) VALUES ('signing_key_v1', $1) ON CONFLICT (key) DO NOTHING")
            .bind(hex::encode(seed))
            .execute(&self.write)
            .await?;
        let v: String = sqlx::query("SELECT value FROM meta WHERE key = 'signing_key_v1'")
            .fetch_one(&self.read)
            .await?
            .try_get(0)?;
        let mut key = [0u8; 32];
        hex::decode_to_slice(v.trim(), &mut key).map_err(|_| {
            Error::Upstream("meta.signing_key_v1 is not 64 hex characters; restore it from a backup".into())
        })?;
        Ok(SigningKey::from_bytes(&key))
    }

    // ---- P2P deployment key ----

    /// The deployment keys, the current one created on first use and shared by every
    /// server on this database; cached for [`DEPLOYMENT_KEYS_RECHECK_MS`].
    pub async fn deployment_keys(&self, now_ms: i64) -> Result<DeploymentKeys> {
        if let Some((k, at)) = &*self.keys_cache.lock().unwrap_or_else(|p| p.into_inner()) {
            if now_ms.saturating_sub(*at) < DEPLOYMENT_KEYS_RECHECK_MS && now_ms >= *at {
                return Ok(k.clone());
            }
        }
        sqlx::query("INSERT INTO meta (key, value) VALUES ('deployment_key_v1', $1) ON CONFLICT (key) DO NOTHING")
            .bind(random_hex(32))
            .execute(&self.write)
            .await?;
        let rows =
            sqlx::query("SELECT key, value FROM meta WHERE key IN ('deployment_key_v1', 'deployment_key_previous_v1')")
                .fetch_all(&self.write)
                .await?;
        let mut keys = DeploymentKeys {
            current: String::new(),
            previous: None,
        };
        for r in rows {
            let (k, v): (String, String) = (r.try_get(0)?, r.try_get(1)?);
            if !hexok(v.trim(), 64) {
                return Err(Error::Upstream(format!(
                    "meta.{k} is not 64 hex characters; rotate the key (`lowtide-server deployment-key rotate`) or restore it from a backup"
                )));
            }
            match k.as_str() {
                "deployment_key_v1" => keys.current = v.trim().to_string(),
                _ => keys.previous = Some(v.trim().to_string()),
            }
        }
        *self.keys_cache.lock().unwrap_or_else(|p| p.into_inner()) = Some((keys.clone(), now_ms));
        Ok(keys)
    }

    /// Make a new current deployment key; the old one becomes `previous` (still accepted by
    /// agents until the next rotation), or with `drop_previous` is no longer accepted at all
    /// (after a stolen device: agents that have not heartbeated since cannot talk to the
    /// others until they do). Agents learn it at their next heartbeat.
    pub async fn rotate_deployment_key(&self, now_ms: i64, drop_previous: bool) -> Result<DeploymentKeys> {
        self.deployment_keys(now_ms).await?;
        let mut tx = self.write.begin().await?;
        if drop_previous {
            sqlx::query("DELETE FROM meta WHERE key = 'deployment_key_previous_v1'")
                .execute(&mut *tx)
                .await?;
        } else {
            sqlx::query(
                "INSERT INTO meta (key, value) SELECT 'deployment_key_previous_v1', value FROM meta WHERE key = 'deployment_key_v1' \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query("UPDATE meta SET value = $1 WHERE key = 'deployment_key_v1'")
            .bind(random_hex(32))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        *self.keys_cache.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.deployment_keys(now_ms).await
    }

    // ---- content ----

    /// Record published content and its block table. Publishing the same id again
    /// updates name, version and origins and un-retires it.
    pub async fn put_content(&self, info: &ContentInfo, manifest: &SignedManifest, table: &[u8]) -> Result<()> {
        let mut tx = self.write.begin().await?;
        sqlx::query(
            "INSERT INTO content (id, name, version, size, block_chunks_log, origins, stored, manifest, signature, published_ms, retired_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, NULL) \
             ON CONFLICT (id) DO UPDATE SET name = excluded.name, version = excluded.version, origins = excluded.origins, \
             stored = excluded.stored, manifest = excluded.manifest, signature = excluded.signature, \
             published_ms = excluded.published_ms, retired_ms = NULL",
        )
        .bind(info.id.to_string())
        .bind(&info.name)
        .bind(&info.version)
        .bind(to_i64(info.size))
        .bind(i64::from(info.block_chunks_log))
        .bind(serde_json::to_string(&info.origins).expect("strings serialise"))
        .bind(i64::from(info.stored))
        .bind(&manifest.manifest)
        .bind(&manifest.signature)
        .bind(info.published_ms)
        .execute(&mut *tx)
        .await?;
        sqlx::query("INSERT INTO content_tables (content_id, data) VALUES ($1, $2) ON CONFLICT (content_id) DO UPDATE SET data = excluded.data")
            .bind(info.id.to_string())
            .bind(table.to_vec())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        self.forget_content(&info.id);
        Ok(())
    }

    pub async fn list_content(&self, include_retired: bool) -> Result<Vec<ContentInfo>> {
        let rows = sqlx::query(
            "SELECT id, name, version, size, block_chunks_log, origins, stored, published_ms, retired_ms FROM content \
             WHERE retired_ms IS NULL OR $1 = 1 ORDER BY name, version, id",
        )
        .bind(i64::from(include_retired))
        .fetch_all(&self.read)
        .await?;
        rows.iter().map(content_info).collect()
    }

    /// One content, retired or not.
    pub async fn content(&self, id: &ContentId) -> Result<ContentInfo> {
        let row = sqlx::query(
            "SELECT id, name, version, size, block_chunks_log, origins, stored, published_ms, retired_ms FROM content WHERE id = $1",
        )
        .bind(id.to_string())
        .fetch_optional(&self.read)
        .await?;
        match row {
            Some(r) => content_info(&r),
            None => Err(Error::NotFound(format!(
                "no content {id} is published here; `lowtide-server content ls` lists what is"
            ))),
        }
    }

    /// One content that agents may still fetch.
    pub async fn live_content(&self, id: &ContentId) -> Result<ContentInfo> {
        let c = self.content(id).await?;
        if c.retired_ms.is_some() {
            return Err(Error::Gone(format!(
                "content {id} ({} {}) was retired; publish it again to bring it back",
                c.name, c.version
            )));
        }
        Ok(c)
    }

    /// [`live_content`](Self::live_content) through a per-process cache of at most
    /// [`CONTENT_RECHECK_MS`]; this process's own publish and retire update it at once.
    pub async fn live_content_cached(&self, id: &ContentId, now_ms: i64) -> Result<ContentInfo> {
        let hit = {
            let c = self.content_cache.lock().expect("content cache lock");
            c.get(id)
                .filter(|(_, at)| now_ms >= *at && now_ms - *at < CONTENT_RECHECK_MS)
                .map(|(info, _)| info.clone())
        };
        let info = match hit {
            Some(info) => info,
            None => {
                let info = self.content(id).await?;
                let mut c = self.content_cache.lock().expect("content cache lock");
                if c.len() >= CONTENT_CACHE_MAX {
                    c.clear();
                }
                c.insert(*id, (info.clone(), now_ms));
                info
            }
        };
        if info.retired_ms.is_some() {
            return Err(Error::Gone(format!(
                "content {id} ({} {}) was retired; publish it again to bring it back",
                info.name, info.version
            )));
        }
        Ok(info)
    }

    fn forget_content(&self, id: &ContentId) {
        self.content_cache.lock().expect("content cache lock").remove(id);
    }

    pub async fn manifest(&self, id: &ContentId, public_key: &str) -> Result<SignedManifest> {
        self.live_content(id).await?;
        let r = sqlx::query("SELECT manifest, signature FROM content WHERE id = $1")
            .bind(id.to_string())
            .fetch_one(&self.read)
            .await?;
        Ok(SignedManifest {
            manifest: r.try_get(0)?,
            signature: r.try_get(1)?,
            public_key: public_key.to_string(),
        })
    }

    pub async fn block_table(&self, id: &ContentId) -> Result<Vec<u8>> {
        self.live_content(id).await?;
        let r = sqlx::query("SELECT data FROM content_tables WHERE content_id = $1")
            .bind(id.to_string())
            .fetch_one(&self.read)
            .await?;
        Ok(r.try_get(0)?)
    }

    /// The content an agent means by `name` (and `version`): with a version,
    /// that version (the most recently published if it was published more
    /// than once); without, the highest version by [`version_cmp`] that is not
    /// retired. Unknown names are `NotFound`, retired ones `Gone`, each saying
    /// which versions there are.
    pub async fn resolve_name(&self, name: &str, version: Option<&str>) -> Result<ContentInfo> {
        let rows = sqlx::query(
            "SELECT id, name, version, size, block_chunks_log, origins, stored, published_ms, retired_ms FROM content \
             WHERE name = $1",
        )
        .bind(name)
        .fetch_all(&self.read)
        .await?;
        let all: Vec<ContentInfo> = rows.iter().map(content_info).collect::<Result<_>>()?;
        if all.is_empty() {
            return Err(Error::NotFound(format!(
                "no content named {:?} is published here; ask an administrator (`lowtide-server content ls` lists what is)",
                clip(name)
            )));
        }
        let live: Vec<&ContentInfo> = all.iter().filter(|c| c.retired_ms.is_none()).collect();
        let mut versions: Vec<&str> = live.iter().map(|c| c.version.as_str()).collect();
        versions.sort_by(|a, b| version_cmp(a, b));
        versions.dedup();
        let listed = if versions.is_empty() {
            "none (every version was retired)".to_string()
        } else {
            versions.join(", ")
        };
        fn newest(cs: Vec<&ContentInfo>) -> Option<&ContentInfo> {
            cs.into_iter().max_by(|a, b| {
                version_cmp(&a.version, &b.version)
                    .then(a.published_ms.cmp(&b.published_ms))
                    .then(a.id.to_string().cmp(&b.id.to_string()))
            })
        }
        match version {
            Some(v) => {
                if let Some(c) = newest(live.iter().copied().filter(|c| c.version == v).collect()) {
                    return Ok(c.clone());
                }
                let msg = format!("{:?} version {:?}", clip(name), clip(v));
                if all.iter().any(|c| c.version == v) {
                    Err(Error::Gone(format!(
                        "{msg} was retired; versions that can be fetched: {listed}"
                    )))
                } else {
                    Err(Error::NotFound(format!(
                        "no {msg} is published here; versions that can be fetched: {listed}"
                    )))
                }
            }
            None => newest(live).cloned().ok_or_else(|| {
                Error::Gone(format!(
                    "every version of {:?} was retired; an administrator can publish it again",
                    clip(name)
                ))
            }),
        }
    }

    pub async fn retire_content(&self, id: &ContentId, now_ms: i64) -> Result<ContentInfo> {
        let n = sqlx::query("UPDATE content SET retired_ms = $2 WHERE id = $1 AND retired_ms IS NULL")
            .bind(id.to_string())
            .bind(now_ms)
            .execute(&self.write)
            .await?
            .rows_affected();
        self.forget_content(id);
        let c = self.content(id).await?;
        if n == 0 {
            return Err(Error::Conflict(format!("content {id} was already retired")));
        }
        Ok(c)
    }

    // ---- enrolment tokens ----

    pub async fn create_token(&self, uses: i64, ttl_ms: i64, note: &str, now_ms: i64) -> Result<NewToken> {
        if uses < 1 {
            return Err(Error::BadRequest("a token needs at least one use".into()));
        }
        if ttl_ms < 1 {
            return Err(Error::BadRequest(
                "a token needs a lifetime of at least one second".into(),
            ));
        }
        if note.chars().count() > TEXT_FIELD_CHARS_MAX {
            return Err(Error::BadRequest(format!(
                "note is longer than {TEXT_FIELD_CHARS_MAX} characters"
            )));
        }
        let id = random_hex(16);
        let secret = random_hex(32);
        let expires_ms = now_ms.saturating_add(ttl_ms);
        sqlx::query(
            "INSERT INTO enrol_tokens (id, secret_hash, note, created_ms, expires_ms, uses_left, revoked_ms) VALUES ($1, $2, $3, $4, $5, $6, NULL)",
        )
        .bind(&id)
        .bind(secret_hash(&secret))
        .bind(note)
        .bind(now_ms)
        .bind(expires_ms)
        .bind(uses)
        .execute(&self.write)
        .await?;
        Ok(NewToken {
            token: format!("{TOKEN_PREFIX}.{id}.{secret}"),
            id,
            expires_ms,
            uses,
        })
    }

    pub async fn list_tokens(&self) -> Result<Vec<TokenInfo>> {
        let rows = sqlx::query(
            "SELECT id, note, created_ms, expires_ms, uses_left, revoked_ms FROM enrol_tokens ORDER BY created_ms, id",
        )
        .fetch_all(&self.read)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(TokenInfo {
                    id: r.try_get("id")?,
                    note: r.try_get("note")?,
                    created_ms: r.try_get("created_ms")?,
                    expires_ms: r.try_get("expires_ms")?,
                    uses_left: r.try_get("uses_left")?,
                    revoked_ms: r.try_get("revoked_ms")?,
                })
            })
            .collect()
    }

    /// Revoke an enrolment token (by id, or by the whole token string).
    pub async fn revoke_token(&self, id_or_token: &str, now_ms: i64) -> Result<()> {
        let id = split_secret(id_or_token, TOKEN_PREFIX, "token")
            .map(|(id, _)| id)
            .unwrap_or(id_or_token.trim());
        let n = sqlx::query("UPDATE enrol_tokens SET revoked_ms = $2 WHERE id = $1 AND revoked_ms IS NULL")
            .bind(id)
            .bind(now_ms)
            .execute(&self.write)
            .await?
            .rows_affected();
        if n == 0 {
            let exists = sqlx::query("SELECT 1 FROM enrol_tokens WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.read)
                .await?
                .is_some();
            return Err(if exists {
                Error::Conflict(format!("token {id} was already revoked"))
            } else {
                Error::NotFound(format!(
                    "no enrolment token {:?}; `lowtide-server token ls` lists them",
                    clip(id)
                ))
            });
        }
        Ok(())
    }

    // ---- agents ----

    /// Enrol an agent with an enrolment token: one use of the token, a new credential.
    pub async fn enrol(&self, token: &str, hostname: &str, now_ms: i64) -> Result<(String, String)> {
        if hostname.chars().count() > TEXT_FIELD_CHARS_MAX {
            return Err(Error::BadRequest(format!(
                "hostname is longer than {TEXT_FIELD_CHARS_MAX} characters"
            )));
        }
        let (token_id, secret) = split_secret(token, TOKEN_PREFIX, "enrolment token")?;
        let mut tx = self.write.begin().await?;
        let row = sqlx::query("SELECT secret_hash, expires_ms, uses_left, revoked_ms FROM enrol_tokens WHERE id = $1")
            .bind(token_id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| {
                Error::Unauthorized(format!(
                    "unknown enrolment token {token_id}; ask the administrator for a new one"
                ))
            })?;
        if row.try_get::<String, _>(0)? != secret_hash(secret) {
            return Err(Error::Unauthorized(format!(
                "enrolment token {token_id} has the wrong secret (forged or mistyped)"
            )));
        }
        if row.try_get::<Option<i64>, _>(3)?.is_some() {
            return Err(Error::Unauthorized(format!(
                "enrolment token {token_id} was revoked; ask the administrator for a new one"
            )));
        }
        if row.try_get::<i64, _>(1)? <= now_ms {
            return Err(Error::Unauthorized(format!(
                "enrolment token {token_id} has expired; ask the administrator for a new one"
            )));
        }
        let n = sqlx::query("UPDATE enrol_tokens SET uses_left = uses_left - 1 WHERE id = $1 AND uses_left > 0")
            .bind(token_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n == 0 {
            return Err(Error::Unauthorized(format!(
                "enrolment token {token_id} is used up (a replayed token?); ask the administrator for a new one"
            )));
        }
        let agent_id = random_hex(16);
        let agent_secret = random_hex(32);
        sqlx::query(
            "INSERT INTO agents (id, secret_hash, hostname, token_id, enrolled_ms, revoked_ms, last_seen_ms, site_id, site_override, \
             addresses, subnets, port, disk_free_bytes, disk_usable_bytes, chassis, os_type, uptime_secs, preferred) \
             VALUES ($1, $2, $3, $4, $5, NULL, $5, NULL, NULL, '', '', 0, 0, 0, 'unknown', 'unknown', 0, 0)",
        )
        .bind(&agent_id)
        .bind(secret_hash(&agent_secret))
        .bind(hostname)
        .bind(token_id)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok((
            agent_id.clone(),
            format!("{CREDENTIAL_PREFIX}.{agent_id}.{agent_secret}"),
        ))
    }

    /// Why a credential was refused (called once the fast path failed).
    async fn refusal(&self, agent_id: &str, secret: &str) -> Error {
        let row = match sqlx::query("SELECT secret_hash, revoked_ms FROM agents WHERE id = $1")
            .bind(agent_id)
            .fetch_optional(&self.read)
            .await
        {
            Ok(r) => r,
            Err(e) => return e.into(),
        };
        match row {
            None => Error::Unauthorized(format!(
                "unknown agent {agent_id}: it was never enrolled on this server (or the database was reset); enrol again with a new token"
            )),
            Some(r) if r.try_get::<String, _>(0).ok().as_deref() != Some(secret_hash(secret).as_str()) => {
                Error::Unauthorized(format!("credential for agent {agent_id} has the wrong secret (forged or corrupted)"))
            }
            Some(_) => Error::Forbidden(format!(
                "agent {agent_id} was revoked by an administrator; enrol again with a new token if that was a mistake"
            )),
        }
    }

    /// Check an agent credential.
    pub async fn authenticate(&self, credential: &str) -> Result<AgentAuth> {
        let (agent_id, secret) = split_secret(credential, CREDENTIAL_PREFIX, "agent credential")?;
        let row = sqlx::query("SELECT secret_hash, revoked_ms, site_id FROM agents WHERE id = $1")
            .bind(agent_id)
            .fetch_optional(&self.read)
            .await?;
        match row {
            Some(r)
                if r.try_get::<String, _>(0)? == secret_hash(secret) && r.try_get::<Option<i64>, _>(1)?.is_none() =>
            {
                Ok(AgentAuth {
                    id: agent_id.to_string(),
                    site: r.try_get(2)?,
                })
            }
            _ => Err(self.refusal(agent_id, secret).await),
        }
    }

    /// Record a heartbeat: facts, last seen, and the site the topology puts the agent in.
    pub async fn heartbeat(&self, credential: &str, facts: &Facts, now_ms: i64) -> Result<(String, Option<String>)> {
        let (agent_id, secret) = split_secret(credential, CREDENTIAL_PREFIX, "agent credential")?;
        facts.check()?;
        let topo = self.topology(now_ms).await?;
        let site = topo
            .site_for(&facts.addresses, facts.site_override.as_deref())
            .map(str::to_string);
        let join = |v: &mut dyn Iterator<Item = String>| v.collect::<Vec<_>>().join(" ");
        let row = HbRow {
            agent_id: agent_id.to_string(),
            secret_hash: secret_hash(secret),
            now_ms,
            hostname: facts.hostname.clone(),
            addresses: join(&mut facts.addresses.iter().map(|a| a.to_string())),
            subnets: join(&mut facts.subnets.iter().map(|n| n.trunc().to_string())),
            site: site.clone(),
            site_override: facts.site_override.clone(),
            port: i64::from(facts.port),
            disk_free_bytes: to_i64(facts.disk_free_bytes),
            disk_usable_bytes: to_i64(facts.disk_usable_bytes),
            chassis: facts.chassis.as_str(),
            os_type: facts.os_type.as_str(),
            uptime_secs: to_i64(facts.uptime_secs),
            preferred: i64::from(facts.preferred),
            serves: i64::from(facts.serves),
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        let stopped = || Error::Internal("the heartbeat writer has stopped; restart the server".into());
        let lane = (blake3::hash(agent_id.as_bytes()).as_bytes()[0] as usize) % self.hb_tx.len();
        self.hb_tx[lane]
            .send(HbItem { row, reply })
            .await
            .map_err(|_| stopped())?;
        match answer.await.map_err(|_| stopped())? {
            Ok(true) => Ok((agent_id.to_string(), site)),
            Ok(false) => Err(self.refusal(agent_id, secret).await),
            Err(e) => Err(e),
        }
    }

    pub async fn update_inventory(&self, agent: &AgentAuth, inv: &Inventory, now_ms: i64) -> Result<usize> {
        if inv.items.len() > INVENTORY_ITEMS_MAX {
            return Err(Error::BadRequest(format!(
                "{} items; send at most {INVENTORY_ITEMS_MAX} per request",
                inv.items.len()
            )));
        }
        // Check everything before writing anything.
        let mut rows = Vec::with_capacity(inv.items.len());
        for (i, item) in inv.items.iter().enumerate() {
            let size = match sqlx::query("SELECT size FROM content WHERE id = $1")
                .bind(item.content.to_string())
                .fetch_optional(&self.read)
                .await?
            {
                Some(r) => to_u64(r.try_get(0)?),
                None => {
                    return Err(Error::NotFound(format!(
                        "item {i}: content {} is not published on this server; nothing was recorded",
                        item.content
                    )))
                }
            };
            let ranges = if item.complete {
                if size == 0 {
                    vec![]
                } else {
                    vec![(0, size)]
                }
            } else {
                ranking::normalize_ranges(item.ranges.clone(), size).map_err(|m| {
                    Error::BadRequest(format!(
                        "item {i} (content {}): {m}; nothing was recorded",
                        item.content
                    ))
                })?
            };
            let held = ranking::ranges_bytes(&ranges);
            let complete = item.complete || (size > 0 && held == size);
            rows.push((
                item.content.to_string(),
                held,
                complete,
                ranking::ranges_to_text(&ranges),
            ));
        }
        let mut tx = self.write.begin().await?;
        if inv.replace {
            sqlx::query("DELETE FROM holdings WHERE agent_id = $1")
                .bind(&agent.id)
                .execute(&mut *tx)
                .await?;
        }
        for (content, held, complete, ranges) in &rows {
            if *held == 0 && !complete {
                sqlx::query("DELETE FROM holdings WHERE content_id = $1 AND agent_id = $2")
                    .bind(content)
                    .bind(&agent.id)
                    .execute(&mut *tx)
                    .await?;
                continue;
            }
            sqlx::query(
                "INSERT INTO holdings (content_id, agent_id, bytes, complete, ranges, updated_ms) VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (content_id, agent_id) DO UPDATE SET bytes = excluded.bytes, complete = excluded.complete, \
                 ranges = excluded.ranges, updated_ms = excluded.updated_ms",
            )
            .bind(content)
            .bind(&agent.id)
            .bind(to_i64((*held).max(u64::from(*complete))))
            .bind(i64::from(*complete))
            .bind(ranges)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(rows.len())
    }

    pub async fn add_traffic(&self, agent: &AgentAuth, t: &TrafficReport) -> Result<()> {
        for (name, v) in [
            ("lan_bytes", t.lan_bytes),
            ("wan_bytes", t.wan_bytes),
            ("origin_bytes", t.origin_bytes),
        ] {
            if v > TRAFFIC_REPORT_BYTES_MAX {
                return Err(Error::BadRequest(format!(
                    "{name} {v} is above {TRAFFIC_REPORT_BYTES_MAX}; report more often"
                )));
            }
        }
        let site = agent.site.clone().unwrap_or_else(|| "(unassigned)".into());
        let mut tx = self.write.begin().await?;
        for (link, v) in [("lan", t.lan_bytes), ("wan", t.wan_bytes), ("origin", t.origin_bytes)] {
            if v == 0 {
                continue;
            }
            sqlx::query(
                "INSERT INTO traffic (site_id, link, bytes) VALUES ($1, $2, $3) \
                 ON CONFLICT (site_id, link) DO UPDATE SET bytes = traffic.bytes + excluded.bytes",
            )
            .bind(&site)
            .bind(link)
            .bind(to_i64(v))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn traffic(&self) -> Result<Vec<TrafficRow>> {
        let rows = sqlx::query("SELECT site_id, link, bytes FROM traffic ORDER BY site_id, link")
            .fetch_all(&self.read)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(TrafficRow {
                    site: r.try_get(0)?,
                    link: r.try_get(1)?,
                    bytes: to_u64(r.try_get(2)?),
                })
            })
            .collect()
    }

    pub async fn list_agents(&self, active_since_ms: i64) -> Result<Vec<AgentInfo>> {
        let sql = format!("SELECT {AGENT_COLS} FROM agents ORDER BY site_id, hostname, id");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(&self.read).await?;
        rows.iter().map(|r| agent_info(r, active_since_ms)).collect()
    }

    pub async fn agent(&self, id: &str, active_since_ms: i64) -> Result<AgentInfo> {
        let sql = format!("SELECT {AGENT_COLS} FROM agents WHERE id = $1");
        match sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.read)
            .await?
        {
            Some(r) => agent_info(&r, active_since_ms),
            None => Err(Error::NotFound(format!(
                "no agent {:?}; `lowtide-server agents ls` lists them",
                clip(id)
            ))),
        }
    }

    pub async fn revoke_agent(&self, id: &str, now_ms: i64) -> Result<()> {
        let n = sqlx::query("UPDATE agents SET revoked_ms = $2 WHERE id = $1 AND revoked_ms IS NULL")
            .bind(id)
            .bind(now_ms)
            .execute(&self.write)
            .await?
            .rows_affected();
        if n == 0 {
            self.agent(id, 0).await?;
            return Err(Error::Conflict(format!("agent {id} was already revoked")));
        }
        Ok(())
    }

    pub async fn counts(&self, active_since_ms: i64) -> Result<Counts> {
        let r = sqlx::query(
            "SELECT \
             (SELECT COUNT(*) FROM agents WHERE revoked_ms IS NULL AND last_seen_ms >= $1), \
             (SELECT COUNT(*) FROM agents WHERE revoked_ms IS NULL AND last_seen_ms < $1), \
             (SELECT COUNT(*) FROM agents WHERE revoked_ms IS NOT NULL), \
             (SELECT COUNT(*) FROM content WHERE retired_ms IS NULL), \
             (SELECT COUNT(*) FROM content WHERE retired_ms IS NOT NULL), \
             (SELECT COUNT(*) FROM sites)",
        )
        .bind(active_since_ms)
        .fetch_one(&self.read)
        .await?;
        Ok(Counts {
            agents_active: r.try_get(0)?,
            agents_inactive: r.try_get(1)?,
            agents_revoked: r.try_get(2)?,
            content_live: r.try_get(3)?,
            content_retired: r.try_get(4)?,
            sites: r.try_get(5)?,
        })
    }

    // ---- topology ----

    async fn load_topology(&self) -> Result<Topology> {
        let sites =
            sqlx::query("SELECT id, name, parent, kind, wan_up_kbps, wan_down_kbps FROM sites ORDER BY position")
                .fetch_all(&self.read)
                .await?;
        let subnets = sqlx::query("SELECT cidr, site_id FROM subnets")
            .fetch_all(&self.read)
            .await?;
        let mut by_site: HashMap<String, Vec<IpNet>> = HashMap::new();
        for r in &subnets {
            let cidr: String = r.try_get(0)?;
            if let Ok(n) = cidr.parse() {
                by_site.entry(r.try_get(1)?).or_default().push(n);
            }
        }
        let mut out = Vec::with_capacity(sites.len());
        for r in &sites {
            let id: String = r.try_get(0)?;
            let mut subnets = by_site.remove(&id).unwrap_or_default();
            subnets.sort();
            out.push(Site {
                name: r.try_get(1)?,
                parent: r.try_get(2)?,
                kind: SiteKind::parse(&r.try_get::<String, _>(3)?).unwrap_or(SiteKind::Standard),
                subnets,
                wan_up_kbps: r.try_get::<Option<i64>, _>(4)?.map(to_u64),
                wan_down_kbps: r.try_get::<Option<i64>, _>(5)?.map(to_u64),
                id,
            });
        }
        let lines: Vec<usize> = (2..out.len() + 2).collect();
        if out.is_empty() {
            return Ok(Topology::default());
        }
        Topology::from_sites(out, &lines)
            .map_err(|e| Error::Upstream(format!("stored topology is inconsistent: {}", e[0])))
    }

    /// The current topology (cached; re-checked against the database's version every [`TOPOLOGY_RECHECK_MS`]).
    pub async fn topology(&self, now_ms: i64) -> Result<Arc<Topology>> {
        {
            let c = self.topo.lock().expect("topology cache lock");
            if c.version.is_some()
                && now_ms.saturating_sub(c.checked_ms) < TOPOLOGY_RECHECK_MS
                && now_ms >= c.checked_ms
            {
                return Ok(c.topo.clone());
            }
        }
        let version: String = sqlx::query("SELECT value FROM meta WHERE key = 'topology_version'")
            .fetch_optional(&self.read)
            .await?
            .map(|r| r.try_get(0))
            .transpose()?
            .unwrap_or_default();
        {
            let mut c = self.topo.lock().expect("topology cache lock");
            if c.version.as_deref() == Some(version.as_str()) {
                c.checked_ms = now_ms;
                return Ok(c.topo.clone());
            }
        }
        let topo = Arc::new(self.load_topology().await?);
        let mut c = self.topo.lock().expect("topology cache lock");
        *c = TopoCache {
            version: Some(version),
            checked_ms: now_ms,
            topo: topo.clone(),
        };
        Ok(topo)
    }

    /// Replace the whole topology in one transaction and move every agent to its new site.
    pub async fn import_topology(&self, topo: &Topology, now_ms: i64) -> Result<()> {
        let mut tx = self.write.begin().await?;
        sqlx::query("DELETE FROM subnets").execute(&mut *tx).await?;
        sqlx::query("DELETE FROM sites").execute(&mut *tx).await?;
        for (pos, s) in topo.sites().iter().enumerate() {
            sqlx::query("INSERT INTO sites (id, name, parent, kind, wan_up_kbps, wan_down_kbps, position) VALUES ($1, $2, $3, $4, $5, $6, $7)")
                .bind(&s.id)
                .bind(&s.name)
                .bind(&s.parent)
                .bind(s.kind.as_str())
                .bind(s.wan_up_kbps.map(to_i64))
                .bind(s.wan_down_kbps.map(to_i64))
                .bind(pos as i64)
                .execute(&mut *tx)
                .await?;
            for n in &s.subnets {
                sqlx::query("INSERT INTO subnets (cidr, site_id) VALUES ($1, $2)")
                    .bind(n.to_string())
                    .bind(&s.id)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        let agents = sqlx::query("SELECT id, addresses, site_override, site_id FROM agents WHERE revoked_ms IS NULL")
            .fetch_all(&mut *tx)
            .await?;
        for r in &agents {
            let addrs: Vec<IpAddr> = r
                .try_get::<String, _>(1)?
                .split_whitespace()
                .filter_map(|a| a.parse().ok())
                .collect();
            let over: Option<String> = r.try_get(2)?;
            let old: Option<String> = r.try_get(3)?;
            let new = topo.site_for(&addrs, over.as_deref()).map(str::to_string);
            if new != old {
                sqlx::query("UPDATE agents SET site_id = $2 WHERE id = $1")
                    .bind(r.try_get::<String, _>(0)?)
                    .bind(&new)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        // Elections belong to the old sites.
        sqlx::query("DELETE FROM rvp").execute(&mut *tx).await?;
        let version = format!("{now_ms}-{}", random_hex(8));
        sqlx::query("INSERT INTO meta (key, value) VALUES ('topology_version', $1) ON CONFLICT (key) DO UPDATE SET value = excluded.value")
            .bind(&version)
            .execute(&mut *tx)
            .await?;
        tx.commit().await.map_err(|e| match e {
            sqlx::Error::Database(d) if d.is_unique_violation() => {
                Error::Conflict("another topology import ran at the same time; export, check and import again".into())
            }
            e => e.into(),
        })?;
        *self.topo.lock().expect("topology cache lock") = TopoCache {
            version: Some(version),
            checked_ms: now_ms,
            topo: Arc::new(topo.clone()),
        };
        Ok(())
    }

    /// Subnets reported by every agent that is not revoked, one list per agent.
    pub async fn reported_subnets(&self) -> Result<Vec<Vec<IpNet>>> {
        let rows = sqlx::query("SELECT subnets FROM agents WHERE revoked_ms IS NULL")
            .fetch_all(&self.read)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(r.try_get::<String, _>(0)?
                    .split_whitespace()
                    .filter_map(|s| s.parse().ok())
                    .collect())
            })
            .collect()
    }

    // ---- sources and elections ----

    /// The recorded RVP of `site` for `content` while it is still an active member of the site.
    async fn recorded_rvp(
        &self,
        site: &str,
        content: &ContentId,
        active_since_ms: i64,
        now_ms: i64,
    ) -> Result<Option<Candidate>> {
        let row = sqlx::query(
            concat!(
                "SELECT ",
                candidate_columns!(),
                " FROM rvp r JOIN agents a ON a.id = r.agent_id \
             LEFT JOIN holdings h ON h.agent_id = a.id AND h.content_id = r.content_id \
             WHERE r.site_id = $1 AND r.content_id = $2 AND a.site_id = $1 AND a.revoked_ms IS NULL AND a.last_seen_ms >= $3 \
             AND COALESCE(r.polled_ms, r.elected_ms) >= $4"
            ),
        )
        .bind(site)
        .bind(content.to_string())
        .bind(active_since_ms)
        .bind(now_ms - RVP_POLL_GRACE_MS)
        .fetch_optional(&self.read)
        .await?;
        row.as_ref().map(candidate).transpose()
    }

    /// In one query: the active holders of `content` in `site` (sorted), the recorded RVP of
    /// `site` and the recorded RVP of `upper`, each while it is still active in its site and
    /// polls for its assignments.
    async fn snapshot(
        &self,
        site: Option<&str>,
        upper: Option<&str>,
        content: &ContentId,
        active_since_ms: i64,
        now_ms: i64,
    ) -> Result<(Vec<Candidate>, Option<Candidate>, Option<Candidate>)> {
        let rows = sqlx::query(concat!(
            "SELECT * FROM (SELECT ",
            candidate_columns!(),
            ", CAST(0 AS BIGINT) AS tag \
             FROM agents a CROSS JOIN holdings h \
             WHERE h.agent_id = a.id AND h.content_id = $1 AND a.site_id = $2 AND a.revoked_ms IS NULL \
             AND a.last_seen_ms >= $3 LIMIT $5) AS hs \
             UNION ALL SELECT ",
            candidate_columns!(),
            ", CASE WHEN r.site_id = $2 THEN CAST(1 AS BIGINT) ELSE CAST(2 AS BIGINT) END AS tag \
             FROM rvp r JOIN agents a ON a.id = r.agent_id \
             LEFT JOIN holdings h ON h.agent_id = a.id AND h.content_id = r.content_id \
             WHERE r.content_id = $1 AND (r.site_id = $2 OR r.site_id = $4) AND a.site_id = r.site_id \
             AND a.revoked_ms IS NULL AND a.last_seen_ms >= $3 \
             AND COALESCE(r.polled_ms, r.elected_ms) >= $6"
        ))
        .bind(content.to_string())
        .bind(site)
        .bind(active_since_ms)
        .bind(upper)
        .bind(SITE_CANDIDATES_MAX)
        .bind(now_ms - RVP_POLL_GRACE_MS)
        .fetch_all(&self.read)
        .await?;
        let (mut holders, mut own, mut up) = (Vec::new(), None, None);
        for r in &rows {
            match r.try_get::<i64, _>(CANDIDATE_COLUMNS)? {
                0 => holders.push(candidate(r)?),
                1 => own = Some(candidate(r)?),
                _ => up = Some(candidate(r)?),
            }
        }
        ranking::sort_candidates(&mut holders);
        Ok((holders, own, up))
    }

    /// The RVP of `site` for `content`: the recorded one while it is active in the site and
    /// serves peers, else a new election among all the site's active agents (which keeps a
    /// recorded RVP that does not serve when no agent of the site does).
    async fn site_rvp(
        &self,
        site: &str,
        content: &ContentId,
        active_since_ms: i64,
        now_ms: i64,
    ) -> Result<Option<Candidate>> {
        if let Some(c) = self
            .recorded_rvp(site, content, active_since_ms, now_ms)
            .await?
            .filter(|c| c.serves)
        {
            return Ok(Some(c));
        }
        self.elect_rvp(site, content, active_since_ms, now_ms).await
    }

    /// Elect (or confirm) the RVP of `site` for `content` among all its active agents.
    async fn elect_rvp(
        &self,
        site: &str,
        content: &ContentId,
        active_since_ms: i64,
        now_ms: i64,
    ) -> Result<Option<Candidate>> {
        let (sorted, current) = self.candidates(site, content, active_since_ms, now_ms).await?;
        let rvp = self.rvp(site, content, &sorted, current, now_ms).await?;
        Ok(rvp.and_then(|id| sorted.into_iter().find(|c| c.agent_id == id)))
    }

    /// Active agents of `site` with what each holds of `content`, sorted for that content.
    /// Also returns the recorded RVP of the site for the content, if any (read in the same query),
    /// and whether it still counts; one that stopped polling for its assignments is left out of
    /// the candidates (it is gone, even while its last heartbeat keeps it active).
    async fn candidates(
        &self,
        site: &str,
        content: &ContentId,
        active_since_ms: i64,
        now_ms: i64,
    ) -> Result<(Vec<Candidate>, Recorded)> {
        let rows = sqlx::query(
            concat!(
                "SELECT ",
                candidate_columns!(),
                ", (SELECT r.agent_id FROM rvp r WHERE r.site_id = $2 AND r.content_id = $1) AS rvp, \
             (SELECT COALESCE(r.polled_ms, r.elected_ms) FROM rvp r WHERE r.site_id = $2 AND r.content_id = $1) AS polled, \
             a.last_seen_ms \
             FROM agents a LEFT JOIN holdings h ON h.agent_id = a.id AND h.content_id = $1 \
             WHERE a.site_id = $2 AND a.revoked_ms IS NULL AND a.last_seen_ms >= $3 LIMIT $4"
            ),
        )
        .bind(content.to_string())
        .bind(site)
        .bind(active_since_ms)
        .bind(SITE_CANDIDATES_MAX)
        .fetch_all(&self.read)
        .await?;
        let mut out = rows.iter().map(candidate).collect::<Result<Vec<_>>>()?;
        let fresh_since = now_ms - ELECTION_FRESH_HEARTBEATS * self.heartbeat_ms.load(Ordering::Relaxed);
        let mut stale = std::collections::HashSet::new();
        for (r, c) in rows.iter().zip(&out) {
            if r.try_get::<i64, _>(CANDIDATE_COLUMNS + 2)? < fresh_since {
                stale.insert(c.agent_id.clone());
            }
        }
        let current = match rows.first() {
            Some(r) => Recorded {
                agent_id: r.try_get::<Option<String>, _>(CANDIDATE_COLUMNS)?,
                polling: r
                    .try_get::<Option<i64>, _>(CANDIDATE_COLUMNS + 1)?
                    .is_none_or(|t| t >= now_ms - RVP_POLL_GRACE_MS),
            },
            None => Recorded::default(),
        };
        if !current.polling {
            out.retain(|c| Some(&c.agent_id) != current.agent_id.as_ref());
        }
        ranking::sort_candidates(&mut out);
        out.sort_by_key(|c| stale.contains(&c.agent_id));
        Ok((out, current))
    }

    /// The RVP of `site` for `content` among `sorted`, electing (and recording) a new one when
    /// there is none or the recorded one is no longer an active member of the site.
    async fn rvp(
        &self,
        site: &str,
        content: &ContentId,
        sorted: &[Candidate],
        recorded: Recorded,
        now_ms: i64,
    ) -> Result<Option<String>> {
        let current = recorded.agent_id.clone().filter(|_| recorded.polling);
        let Some(choice) = ranking::elect(sorted, current.as_deref()) else {
            return Ok(None);
        };
        if current.as_deref() == Some(choice.agent_id.as_str()) {
            return Ok(current);
        }
        let why = match (
            &recorded.agent_id,
            sorted.iter().find(|c| Some(&c.agent_id) == current.as_ref()),
        ) {
            (None, _) => "no RVP yet",
            (Some(_), Some(c)) if !c.serves => "the RVP no longer serves peers",
            (Some(_), _) if !recorded.polling => "the RVP stopped polling for its assignments",
            (Some(_), _) => "the RVP is inactive, revoked or left the site",
        };
        let current = recorded.agent_id;
        let n = sqlx::query(
            "INSERT INTO rvp (site_id, content_id, agent_id, elected_ms) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (site_id, content_id) DO UPDATE SET agent_id = excluded.agent_id, elected_ms = excluded.elected_ms, \
             polled_ms = NULL WHERE rvp.agent_id = $5",
        )
        .bind(site)
        .bind(content.to_string())
        .bind(&choice.agent_id)
        .bind(now_ms)
        .bind(current.clone().unwrap_or_default())
        .execute(&self.write)
        .await?
        .rows_affected();
        if n == 1 {
            if choice.serves {
                tracing::info!(site, content = %content.short(), rvp = %choice.agent_id, previous = ?current, why, "elected RVP");
            } else {
                tracing::warn!(
                    site, content = %content.short(), rvp = %choice.agent_id, previous = ?current, why,
                    "elected an RVP that does not serve peers: no agent of the site that is still heard from serves \
                     (uploads_max = 0, on battery, busy); the site's agents will use the origin after a wait"
                );
            }
            self.assignments_changed.notify_waiters();
            return Ok(Some(choice.agent_id.clone()));
        }
        // Another server elected at the same time: take its choice.
        Ok(
            sqlx::query("SELECT agent_id FROM rvp WHERE site_id = $1 AND content_id = $2")
                .bind(site)
                .bind(content.to_string())
                .fetch_optional(&self.write)
                .await?
                .map(|r| r.try_get(0))
                .transpose()?,
        )
    }

    /// RVP, serving peers and bench of one site for one content (admin view).
    pub async fn election(
        &self,
        site: &str,
        content: &ContentId,
        active_since_ms: i64,
        cap: usize,
        now_ms: i64,
    ) -> Result<Election> {
        let topo = self.topology(now_ms).await?;
        let s = topo
            .site(site)
            .ok_or_else(|| Error::NotFound(format!("no site {:?} in the topology", clip(site))))?;
        self.live_content(content).await?;
        if !s.kind.serves() {
            return Ok(Election {
                site: site.into(),
                content: *content,
                rvp: None,
                rvp_serves: None,
                serving: vec![],
                bench: vec![],
                warning: None,
            });
        }
        let (sorted, current) = self.candidates(site, content, active_since_ms, now_ms).await?;
        let rvp = self.rvp(site, content, &sorted, current, now_ms).await?;
        let (serving, bench) = ranking::serving_and_bench(&sorted, rvp.as_deref(), cap);
        let rvp_serves = rvp
            .as_ref()
            .map(|id| sorted.iter().find(|c| &c.agent_id == id).is_none_or(|c| c.serves));
        let warning = (rvp_serves == Some(false)).then(|| {
            "no agent of the site that is still heard from serves peers (uploads_max = 0, on battery, busy): \
             the RVP fetches for the site but refuses its peers, which use the origin after a wait"
                .to_string()
        });
        Ok(Election {
            site: site.into(),
            content: *content,
            rvp,
            rvp_serves,
            serving: serving.iter().map(|c| c.agent_id.clone()).collect(),
            bench: bench.iter().map(|c| c.agent_id.clone()).collect(),
            warning,
        })
    }

    /// Record that `site` wants `content` (its RVP does not hold it whole), at most once per
    /// [`WANTED_REWRITE_MS`] per process; wakes long-polling assignment requests when new.
    async fn want(&self, site: &str, content: &ContentId, now_ms: i64) -> Result<()> {
        let key = (site.to_string(), *content);
        {
            let mut seen = self.wanted_seen.lock().expect("wanted lock");
            if seen
                .get(&key)
                .is_some_and(|t| now_ms.saturating_sub(*t) < WANTED_REWRITE_MS)
            {
                return Ok(());
            }
            if seen.len() >= WANTED_SEEN_MAX {
                seen.clear();
            }
            seen.insert(key, now_ms);
        }
        let n = sqlx::query(
            "INSERT INTO wanted (site_id, content_id, wanted_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (site_id, content_id) DO NOTHING",
        )
        .bind(site)
        .bind(content.to_string())
        .bind(now_ms)
        .execute(&self.write)
        .await?
        .rows_affected();
        if n == 1 {
            tracing::info!(site, content = %content.short(), "site wants content: its RVP is told to fetch it");
            self.assignments_changed.notify_waiters();
        }
        Ok(())
    }

    /// Woken when a site comes to want a content or an RVP is elected (in this process).
    /// `agent` asked for its assignments: where it is a recorded RVP, it is alive (see
    /// [`RVP_POLL_GRACE_MS`]). Read first, so that the agents that are nobody's RVP (most)
    /// cost no write.
    pub async fn rvp_polled(&self, agent: &str, now_ms: i64) -> Result<()> {
        let stale = now_ms - RVP_POLL_REWRITE_MS;
        let due = sqlx::query("SELECT 1 FROM rvp WHERE agent_id = $1 AND COALESCE(polled_ms, elected_ms) < $2 LIMIT 1")
            .bind(agent)
            .bind(stale)
            .fetch_optional(&self.read)
            .await?;
        if due.is_some() {
            sqlx::query("UPDATE rvp SET polled_ms = $1 WHERE agent_id = $2 AND COALESCE(polled_ms, elected_ms) < $3")
                .bind(now_ms)
                .bind(agent)
                .bind(stale)
                .execute(&self.write)
                .await?;
        }
        Ok(())
    }

    /// The heartbeat interval agents are told (elections put agents not heard from for
    /// [`ELECTION_FRESH_HEARTBEATS`] of them last).
    pub fn set_heartbeat_secs(&self, secs: u64) {
        let ms = i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX / 4);
        self.heartbeat_ms.store(ms, Ordering::Relaxed);
    }

    pub fn assignments_changed(&self) -> &tokio::sync::Notify {
        &self.assignments_changed
    }

    /// What `agent` should fetch for its site: contents the site wants, of which it is the RVP
    /// (electing a new RVP where the recorded one went inactive), that it does not hold whole.
    /// Wanted rows whose RVP holds the content whole, or whose content was retired, are removed.
    pub async fn assignments(&self, agent: &AgentAuth, active_since_ms: i64, now_ms: i64) -> Result<Vec<Assignment>> {
        let Some(site) = agent.site.as_deref() else {
            return Ok(Vec::new());
        };
        let rows = sqlx::query(
            "SELECT w.content_id, c.size, c.retired_ms FROM wanted w LEFT JOIN content c ON c.id = w.content_id \
             WHERE w.site_id = $1 ORDER BY w.wanted_ms LIMIT $2",
        )
        .bind(site)
        .bind(ASSIGNMENTS_MAX)
        .fetch_all(&self.read)
        .await?;
        let mut out = Vec::new();
        for r in &rows {
            let id: String = r.try_get(0)?;
            let size: Option<i64> = r.try_get(1)?;
            let retired: Option<i64> = r.try_get(2)?;
            let Ok(content) = id.parse::<ContentId>() else { continue };
            let done = match (size, retired) {
                (Some(size), None) => {
                    let size = to_u64(size);
                    match self.site_rvp(site, &content, active_since_ms, now_ms).await? {
                        Some(c) if c.held_bytes >= size => true,
                        Some(c) if c.agent_id == agent.id => {
                            out.push(Assignment {
                                content,
                                site: site.to_string(),
                                size,
                                held_bytes: c.held_bytes,
                            });
                            false
                        }
                        _ => false,
                    }
                }
                _ => true,
            };
            if done {
                sqlx::query("DELETE FROM wanted WHERE site_id = $1 AND content_id = $2")
                    .bind(site)
                    .bind(&id)
                    .execute(&self.write)
                    .await?;
                self.wanted_seen
                    .lock()
                    .expect("wanted lock")
                    .remove(&(site.to_string(), content));
            }
        }
        Ok(out)
    }

    /// Where `agent` should get `content` from, best first.
    pub async fn sources(
        &self,
        agent: &AgentAuth,
        content: &ContentId,
        active_since_ms: i64,
        cap: usize,
        now_ms: i64,
    ) -> Result<SourcesAnswer> {
        let info = self.live_content_cached(content, now_ms).await?;
        let size = info.size;
        let topo = self.topology(now_ms).await?;
        let site = agent.site.as_deref().and_then(|s| topo.site(s));
        let mut sources = Vec::new();
        let mut you_are_rvp = false;
        let held = |c: &Candidate| {
            let pct = ranking::percent(c.held_bytes, size);
            let ranges = if pct < 100 { c.ranges.clone() } else { vec![] };
            (pct, ranges)
        };
        let peer_source = |c: &Candidate, kind, protocol, reason: String, site: Option<String>| {
            let (pct, ranges) = held(c);
            Source {
                kind,
                protocol,
                reason,
                agent_id: Some(c.agent_id.clone()),
                addresses: c.addresses.clone(),
                port: Some(c.port),
                site,
                url: None,
                held_percent: pct,
                ranges,
            }
        };
        // One query for the common case: the site's holders, its recorded RVP and the nearest
        // serving ancestor's recorded RVP. Elections (rare) take their own queries.
        let own = site.filter(|s| s.kind.serves());
        let mut up = site.and_then(|s| topo.parent(&s.id));
        let mut hops = 1;
        while let Some(p) = up.filter(|p| !p.kind.serves()) {
            up = topo.parent(&p.id);
            hops += 1;
        }
        let (holders, own_rec, up_rec) = self
            .snapshot(
                own.map(|s| s.id.as_str()),
                up.map(|p| p.id.as_str()),
                content,
                active_since_ms,
                now_ms,
            )
            .await?;
        if let Some(s) = own {
            let rvp_c = match own_rec {
                Some(c) if c.serves => Some(c),
                _ => self.elect_rvp(&s.id, content, active_since_ms, now_ms).await?,
            };
            let rvp = rvp_c.as_ref().map(|c| c.agent_id.clone());
            you_are_rvp = rvp.as_deref() == Some(agent.id.as_str());
            // The site's RVP does not hold it whole: it is told to fetch it for the site.
            if rvp_c.as_ref().is_some_and(|c| c.held_bytes < size) {
                self.want(&s.id, content, now_ms).await?;
            }
            let (serving, _bench) = ranking::serving_and_bench(&holders, rvp.as_deref(), cap);
            for c in serving.iter().filter(|c| c.agent_id != agent.id) {
                let (pct, _) = held(c);
                let is_rvp = rvp.as_deref() == Some(c.agent_id.as_str());
                let (kind, reason) = if is_rvp {
                    (SourceKind::SiteRvp, format!("same site, site RVP, holds {pct}%"))
                } else {
                    (SourceKind::Peer, format!("same site, holds {pct}%"))
                };
                sources.push(peer_source(c, kind, Protocol::Foreground, reason, Some(s.id.clone())));
            }
            if let Some(c) = rvp_c
                .as_ref()
                .filter(|r| r.agent_id != agent.id && !serving.iter().any(|c| c.agent_id == r.agent_id))
            {
                sources.push(peer_source(
                    c,
                    SourceKind::SiteRvp,
                    Protocol::Foreground,
                    "site RVP, holds 0%: it fetches for the site, ask it first".into(),
                    Some(s.id.clone()),
                ));
            }
        }
        // The nearest ancestor site that serves and whose RVP serves peers. An ancestor whose
        // RVP does not (no agent of that site that is still heard from serves: on battery,
        // uploads_max = 0, busy) would answer this site's RVP `DeviceBusy`, which waits for it
        // (the agent's 60 s) and then crosses the WAN to the origin: skip it, as a site with
        // no active agent is skipped. Its own agents still get the content through it, and
        // this site's link is still crossed once. Its RVP is named again as soon as it
        // serves (or another agent of its site that serves is elected).
        let mut up_rec = up_rec;
        let mut skipped: Vec<&str> = Vec::new();
        while let Some(p) = up {
            if p.kind.serves() {
                let c = match up_rec.take() {
                    Some(c) if c.serves => Some(c),
                    Some(_) => self.elect_rvp(&p.id, content, active_since_ms, now_ms).await?,
                    None => self.site_rvp(&p.id, content, active_since_ms, now_ms).await?,
                };
                if c.as_ref().is_some_and(|c| !c.serves) {
                    skipped.push(&p.id);
                }
                if let Some(c) = c.filter(|c| c.serves) {
                    if c.held_bytes < size {
                        self.want(&p.id, content, now_ms).await?;
                    }
                    let (pct, _) = held(&c);
                    let which = if hops == 1 { "parent site" } else { "ancestor site" };
                    let mut reason = format!("{which} {} RVP, holds {pct}%", p.id);
                    if !skipped.is_empty() {
                        reason.push_str(&format!(
                            " (the RVP of {} serves no peers: skipped)",
                            skipped.join(", ")
                        ));
                    }
                    sources.push(peer_source(
                        &c,
                        SourceKind::ParentRvp,
                        Protocol::Background,
                        reason,
                        Some(p.id.clone()),
                    ));
                    break;
                }
            }
            up = topo.parent(&p.id);
            hops += 1;
        }
        let any_peer_holds = sources.iter().any(|s| s.held_percent > 0);
        let at_top = site.is_some_and(|s| s.parent.is_none());
        let mut reason = match (site.is_some(), any_peer_holds) {
            (false, _) => "your addresses match no site in the topology: origin",
            (true, false) => "no peer holds it: origin",
            (true, true) => "origin, last resort",
        }
        .to_string();
        if !skipped.is_empty() && !sources.iter().any(|s| s.kind == SourceKind::ParentRvp) {
            reason.push_str(&format!(
                " (the RVP of {} serves no peers: skipped)",
                skipped.join(", ")
            ));
        }
        for url in &info.origins {
            sources.push(Source {
                kind: SourceKind::Origin,
                protocol: if at_top {
                    Protocol::Foreground
                } else {
                    Protocol::Background
                },
                reason: reason.clone(),
                agent_id: None,
                addresses: vec![],
                port: None,
                site: None,
                url: Some(url.clone()),
                held_percent: 100,
                ranges: vec![],
            });
        }
        Ok(SourcesAnswer {
            content: *content,
            size,
            site: agent.site.clone(),
            you_are_rvp,
            wan_up_kbps: site.and_then(|s| s.wan_up_kbps),
            wan_down_kbps: site.and_then(|s| s.wan_down_kbps),
            sources,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::version_cmp;
    use std::cmp::Ordering::*;

    #[test]
    fn version_cmp_reads_numbers_as_numbers() {
        assert_eq!(version_cmp("1.10", "1.9"), Greater);
        assert_eq!(version_cmp("1.2", "1.2.1"), Less);
        assert_eq!(version_cmp("2.0", "10.0"), Less);
        assert_eq!(version_cmp("1.0-rc1", "1.0-rc2"), Less);
        assert_eq!(version_cmp("1.01", "1.1"), Less, "equal numbers fall back to the text");
        assert_eq!(version_cmp("abc", "abd"), Less);
        assert_eq!(version_cmp("", "0"), Less);
        assert_eq!(version_cmp("2026.11.21", "2026.11.21"), Equal);
    }
}
