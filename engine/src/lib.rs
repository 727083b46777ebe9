//! # lowtide-engine
//!
//! The transfer engine shared by the Lowtide agent and server.
//!
//! - [`content`]: content ids (BLAKE3) and block tables that verify any block
//!   from any source, in any order.
//! - [`store`]: the on-disk content store: verified, crash-safe, resumable, bounded.
//! - [`wire`]: the UDP wire protocol (its module docs are the spec).
//! - [`session`]: sans-IO serving and multi-source fetching state machines.
//! - [`cc`]: congestion controllers behind one trait.
//! - [`io`]: the drivers that put sessions on real sockets (io_uring, portable)
//!   or on a deterministic simulated network; [`endpoint`] runs them.
//!
//! The protocol core is sans-IO: state machines take bytes and `now` and say
//! what to send and when to wake up. Only [`io`], [`endpoint`] and [`store`]
//! touch sockets, files and clocks.

pub mod cc;
pub mod content;
pub mod endpoint;
pub mod io;
pub mod ranges;
pub mod session;
pub mod store;
pub mod time;
pub mod wire;
