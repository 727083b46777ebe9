//! Sans-IO transfer sessions.
//!
//! - [`serve::Server`]: answers requests for content it holds, one session per
//!   (fetcher address, session id), with loss recovery, congestion control
//!   and pacing per session.
//! - [`fetch::Fetch`]: gets one content from one or more sources at once,
//!   verifying every block against the block table, reassigning the blocks of
//!   slow or vanished sources and dropping sources that send bad blocks.
//!
//! Both are driven the same way, like quinn-proto's endpoints: feed every
//! datagram to `handle_datagram(now, from, bytes)`, call `poll_transmit(now,
//! ..)` until it returns `None`, sleep until `poll_timeout()`, then call
//! `handle_timeout(now)`. Nothing in here owns a socket, a thread or a clock.

pub mod fetch;
pub mod pacer;
pub mod recovery;
pub mod serve;

use std::net::SocketAddr;

use crate::content::{ContentId, Geometry};

/// One datagram, or a run of equal-sized datagrams to the same destination
/// (the last may be shorter) to be sent with UDP GSO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    pub dst: SocketAddr,
    /// Total bytes written to the buffer.
    pub len: usize,
    /// Size of each datagram when `len` holds several; `None` for a single datagram.
    pub segment_size: Option<usize>,
}

impl Transmit {
    /// One datagram of `len` bytes to `dst`.
    pub fn single(dst: SocketAddr, len: usize) -> Self {
        Self {
            dst,
            len,
            segment_size: None,
        }
    }
}

/// What a server holds: the capability to look up and read content. The
/// store implements it for files on disk, tests implement it in memory.
/// `read` is the only I/O the session layer asks for, and it is synchronous
/// reading of data that is already verified (usually from the page cache).
pub trait Library {
    /// Geometry of `id` and whether every block is held, if any of it is.
    fn info(&self, id: &ContentId) -> Option<(Geometry, bool)>;
    /// Whether block `block` of `id` is held and verified.
    fn has_block(&self, id: &ContentId, block: u64) -> bool;
    /// Read `buf.len()` bytes of `stream` (0: content, 1: encoded block table) at `offset`.
    fn read(&self, id: &ContentId, stream: u8, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;
    /// Read consecutive bytes from `offset` into `bufs`, in order (a scatter read: one
    /// system call for a whole GSO run where the store can).
    fn read_vectored(
        &self,
        id: &ContentId,
        stream: u8,
        offset: u64,
        bufs: &mut [std::io::IoSliceMut<'_>],
    ) -> std::io::Result<()> {
        let mut at = offset;
        for b in bufs.iter_mut() {
            self.read(id, stream, at, b)?;
            at += b.len() as u64;
        }
        Ok(())
    }
}

/// Payload per datagram on a standard 1500-byte Ethernet MTU.
pub const PAYLOAD_BYTES_DEFAULT: usize = 1500 - 28 - crate::wire::DATA_HEADER_BYTES;
/// Most datagrams in one GSO send (the kernel's limit is 64; 64 KiB total).
pub const GSO_SEGMENTS_MAX: usize = 44;
