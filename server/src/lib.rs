//! Lowtide server: the metadata service of a Lowtide deployment.
//!
//! # What it is
//!
//! It holds *metadata only*: published content (id, size, block table, name,
//! version, origin URLs, a signed manifest), agents (credentials, hardware
//! facts, last seen, site), what each agent holds, and the site tree. It
//! answers "where do I get content X" for an agent with a ranked list of
//! sources, electing a rendezvous point (RVP) per site and content.
//!
//! # What it is not
//!
//! It moves no content between agents (the engine does) and keeps no state
//! in memory that another server process would need: several servers can
//! share one PostgreSQL database.
//!
//! # Main types
//!
//! - [`store::Store`]: every query, on SQLite or PostgreSQL.
//! - [`topology::Topology`]: the site tree and its CSV form.
//! - [`ranking`]: ranking, RVP election, the serving cap.
//! - [`api`]: the HTTP API (agent and admin), `/metrics`, `/openapi.json`.
//! - [`publish`]: hashing, storing and signing a package.

pub mod api;

/// Install rustls' ring provider as the process default (idempotent). reqwest is
/// built without a provider of its own in this workspace (the agent chooses ring
/// explicitly), so anything in the server that makes an HTTP client calls this first.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub mod clock;
pub mod config;
pub mod error;
pub mod metrics;
pub mod openapi;
pub mod publish;
pub mod ranking;
pub mod store;
pub mod topology;
