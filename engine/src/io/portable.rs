//! The portable driver: `sendmmsg`/`recvmmsg` on a non-blocking socket, with
//! UDP GSO and GRO when the kernel has them. Chosen when io_uring is missing
//! or disabled (`kernel.io_uring_disabled`), or when asked for.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::Duration;

use super::udp::{is_transient_send_error, Driver, MsgSlot, OnDatagram, RecvBatch, Socket, BATCH_BYTES_MAX};
use crate::session::Transmit;
use crate::time::Clock;

/// Transmit slots per `sendmmsg`.
pub const TX_SLOTS: usize = 16;
/// Receive slots per `recvmmsg`.
pub const RX_SLOTS: usize = 16;

pub struct Portable {
    pub(super) sock: Socket,
    tx: Vec<MsgSlot>,
    pub(super) rx: RecvBatch,
    mmsg: Vec<libc::mmsghdr>,
}

// SAFETY: the mmsghdr array points into this driver's own slots (see MsgSlot).
unsafe impl Send for Portable {}

impl Portable {
    pub fn new(sock: Socket) -> Self {
        let rx = RecvBatch::new(RX_SLOTS, &sock);
        Self {
            sock,
            tx: (0..TX_SLOTS).map(|_| MsgSlot::new(BATCH_BYTES_MAX)).collect(),
            rx,
            // SAFETY: all-zero mmsghdr is valid; fields are set before each call.
            mmsg: vec![unsafe { std::mem::zeroed() }; TX_SLOTS],
        }
    }

    /// Send slot `i` one datagram at a time (the kernel refused GSO for it).
    fn send_split(&mut self, i: usize, t: &Transmit) -> io::Result<()> {
        let seg = t.segment_size.unwrap_or(t.len);
        let fd = self.sock.as_raw_fd();
        let mut at = 0;
        while at < t.len {
            let end = (at + seg).min(t.len);
            let (ss, slen) = super::udp::to_sockaddr(t.dst);
            // SAFETY: the buffer range is within the slot; ss is a valid address.
            let r = unsafe {
                libc::sendto(
                    fd,
                    self.tx[i].buf[at..end].as_ptr() as *const libc::c_void,
                    end - at,
                    0,
                    &ss as *const _ as *const libc::sockaddr,
                    slen,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock {
                    self.sock.wait_writable()?;
                    continue;
                }
                if !is_transient_send_error(&e) {
                    return Err(e);
                }
            }
            at = end;
        }
        Ok(())
    }
}

impl Driver for Portable {
    fn name(&self) -> &'static str {
        "portable"
    }

    fn local_addr(&self) -> SocketAddr {
        self.sock.local
    }

    fn tx_slots(&self) -> usize {
        TX_SLOTS
    }

    fn tx_buf(&mut self, i: usize) -> &mut [u8] {
        &mut self.tx[i].buf
    }

    fn send(&mut self, batch: &[Transmit]) -> io::Result<()> {
        let gso = self.sock.gso;
        let mut start = 0;
        while start < batch.len() {
            let n = batch.len() - start;
            for k in 0..n {
                let t = &batch[start + k];
                let seg = if gso { t.segment_size.map(|s| s as u16) } else { None };
                let slot = &mut self.tx[start + k];
                slot.prepare_send(t.dst, t.len, seg);
                self.mmsg[k].msg_hdr = slot.hdr;
                self.mmsg[k].msg_len = 0;
            }
            if !gso && batch[start].segment_size.is_some() {
                self.send_split(start, &batch[start])?;
                start += 1;
                continue;
            }
            // SAFETY: mmsg[..n] point at slots in never-resized Vecs that outlive the call.
            let r = unsafe { libc::sendmmsg(self.sock.as_raw_fd(), self.mmsg.as_mut_ptr(), n as u32, 0) };
            if r < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) => self.sock.wait_writable()?,
                    Some(libc::EIO) | Some(libc::EINVAL) if batch[start].segment_size.is_some() => {
                        // The device cannot segment: send this run datagram by datagram.
                        self.send_split(start, &batch[start])?;
                        start += 1;
                    }
                    _ if is_transient_send_error(&e) => start += 1,
                    _ => return Err(e),
                }
            } else {
                start += r as usize;
            }
        }
        Ok(())
    }

    fn recv(&mut self, timeout: Option<Duration>, clock: &Clock, f: &mut OnDatagram<'_>) -> io::Result<usize> {
        if timeout != Some(Duration::ZERO) && !self.sock.wait_readable(timeout)? {
            return Ok(0);
        }
        // poll(2) reports the level, so datagrams a capped drain left behind are seen next time.
        Ok(self.rx.drain(self.sock.as_raw_fd(), clock, f)?.delivered)
    }

    fn describe(&self) -> String {
        format!(
            "portable driver (sendmmsg/recvmmsg), UDP GSO {}, GRO {}, kernel receive timestamps {}",
            if self.sock.gso { "on" } else { "off" },
            if self.sock.gro { "on" } else { "off" },
            if self.sock.rx_timestamps { "on" } else { "off" }
        )
    }
}
