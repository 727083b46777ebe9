//! # lowtide-agent
//!
//! The agent runs on every device: it enrols with the server, heartbeats
//! with the machine's facts, reports what it holds, serves its content store
//! to peers with the engine, and fetches content for people and scripts who
//! ask through `lowtide-agent get` on a local Unix socket.
//!
//! - [`config`]: the TOML file and `LOWTIDE_*` overrides.
//! - [`facts`]: free disk space, chassis, OS type, uptime, addresses and subnets.
//! - [`server`]: the client of the server's HTTP API and the signed manifest check.
//! - [`worker`]: the engine thread (UDP endpoint, store, sessions).
//! - [`origin`]: verified HTTP Range fetches from the origin, the last resort.
//! - [`daemon`]: `lowtide-agent run`.
//! - [`proto`]: the JSON-lines protocol of the control socket.
//! - [`systemd`]: `sd_notify` readiness and watchdog.
//! - [`metrics`]: Prometheus metrics (bytes by source, share from peers).
//! - [`tls`]: the server's TLS key, pinned at enrolment.
//! - [`busy`]: whether the device may serve now (CPU, disk, battery, VPN site).
//! - [`discovery`]: peers on the local subnets (broadcast, neighbour cache, subnet scan).
//! - [`manifests`]: signed manifests kept for peers that ask while the server is unreachable.
//! - `test_hooks`: fault injection for the integration tests, debug builds only.
//! - [`monitor`]: the egress monitor, pause-when-busy, dropping BPF capabilities.

pub mod busy;
pub mod config;
pub mod daemon;
pub mod discovery;
pub mod facts;
pub mod manifests;
pub mod metrics;
pub mod monitor;
pub mod origin;
pub mod proto;
pub mod server;
pub mod systemd;
#[cfg(debug_assertions)]
pub mod test_hooks;
pub mod tls;
pub mod worker;
