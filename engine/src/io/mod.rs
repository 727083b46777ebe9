//! I/O drivers: the only part of the engine that touches sockets and clocks.
//!
//! # What a driver must do
//!
//! A driver owns one UDP socket and feeds the sans-IO endpoints
//! ([`crate::session::serve::Server`], [`crate::session::fetch::Fetch`]):
//!
//! 1. Receive datagrams in batches (GRO super-datagrams are split at their
//!    segment size), decode them with [`crate::wire::decode`], count the ones
//!    that fail by class, and hand each packet to the endpoint it is for,
//!    with the time it arrived (`handle_arrived(now, arrived, ..)`): the
//!    kernel's receive timestamp where there is one (see [`udp`]), so that
//!    the endpoint's own scheduling delay never counts as delay on the path.
//! 2. Call `poll_transmit(now, ..)` until it returns `None`, sending each
//!    [`crate::session::Transmit`] as one datagram or, when it has a segment
//!    size, as one GSO send of several datagrams.
//! 3. Sleep until the earliest `poll_timeout()` or until the socket is
//!    readable, then call `handle_timeout(now)`.
//!
//! Drivers: [`uring`] (io_uring with GSO/GRO and optional zero-copy send),
//! [`portable`] (`sendmmsg`/`recvmmsg`, used automatically when io_uring is
//! unavailable or disabled), and [`sim`] (a deterministic in-memory network).
//! [`udp`] holds the socket set-up and message helpers both real drivers share.

pub mod portable;
pub mod sim;
pub mod udp;
pub mod uring;
