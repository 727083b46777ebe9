//! Distribution at scale (issue 6, deliverable 4).
//!
//! A packet-level run of a 1 GB package to 10,000 agents would be ~7.7 billion
//! datagrams and 10 TB of hashing: out of reach on two cores. So two levels:
//!
//! - [`packet`]: the engine's real sessions (`Fetch`, `Server`, the background
//!   and foreground controllers, BLAKE3 verification of every block) over the
//!   deterministic network of `lowtide_engine::io::sim`, for representative
//!   pieces: one WAN link at 1 % loss, one LAN fan-out ([`calibrate`]), and a
//!   small whole organisation (the cross-check).
//! - [`model`]: a deterministic flow-level model of the whole organisation,
//!   whose WAN and LAN efficiencies, wire overheads and start-up times come
//!   from the packet-level calibration.
//!
//! Both are driven by the same [`control`]: the server's real ranking code
//! (RVP election, serving cap) and the agent's heartbeat / inventory / sources
//! / fallback behaviour, so the cross-check compares transports, not policies.

pub mod calibrate;
pub mod control;
pub mod model;
pub mod packet;
pub mod run;
pub mod topo;
