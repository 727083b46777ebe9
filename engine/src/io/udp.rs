//! UDP socket set-up and message helpers shared by the real drivers:
//! binding with large buffers, UDP GSO (`UDP_SEGMENT`) and GRO (`UDP_GRO`),
//! kernel receive timestamps (`SO_TIMESTAMPNS`), address conversion, and the
//! [`Driver`] trait both drivers implement.
//!
//! # Arrival times
//!
//! The kernel stamps each datagram when it receives it (one stamp for a GRO
//! super-datagram, which covers its segments). [`RecvBatch`] reads the stamp
//! and hands each datagram on with that arrival time on the endpoint's
//! [`Clock`] ([`crate::time::arrival_from_realtime`]), so the one-way delay the
//! fetcher reports excludes the time the endpoint took to get round to the
//! datagram: on a busy host that is milliseconds, which the background
//! controller would otherwise read as a queue on the path. Without a usable
//! stamp (option refused, control message missing, wall clock stepped) the
//! datagram comes with `None` and the endpoint takes the time it handles it;
//! that is logged once per socket.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use crate::session::Transmit;
use crate::time::{arrival_from_realtime, Clock, Time};

/// Socket buffer we ask for (root may exceed `net.core.*mem_max` with the FORCE options).
pub const SOCKET_BUFFER_BYTES: usize = 32 << 20;
/// Largest datagram or GSO run / GRO super-datagram.
pub const BATCH_BYTES_MAX: usize = 65535;
/// `IPPROTO_UDP` level option numbers (linux/udp.h).
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;

/// What a driver hands each received datagram to: its sender, its bytes, and when it
/// arrived on the endpoint's clock (from the kernel's receive timestamp; `None` when there
/// is no usable one, and the endpoint takes the time it handles the datagram).
pub type OnDatagram<'a> = dyn FnMut(SocketAddr, &[u8], Option<Time>) + 'a;

/// What every real driver offers the endpoint loop. Drivers are `Send` so an
/// endpoint can be built on one thread and run on another.
pub trait Driver: Send {
    /// "io_uring" or "portable", for logs.
    fn name(&self) -> &'static str;
    fn local_addr(&self) -> SocketAddr;
    /// How many transmits one `send` call takes.
    fn tx_slots(&self) -> usize;
    /// Buffer of transmit slot `i` (holds one datagram or one GSO run).
    fn tx_buf(&mut self, i: usize) -> &mut [u8];
    /// Send slots `0..batch.len()`, slot `i` holding `batch[i]`. Blocks until the kernel took them.
    fn send(&mut self, batch: &[Transmit]) -> io::Result<()>;
    /// Wait up to `timeout` (None: forever, zero: poll) for datagrams and hand each to
    /// `on_datagram` with its sender and its arrival time on `clock` (from the kernel's
    /// receive timestamp; `None` when there is no usable one). Returns the number of
    /// datagrams delivered.
    fn recv(&mut self, timeout: Option<Duration>, clock: &Clock, on_datagram: &mut OnDatagram<'_>)
        -> io::Result<usize>;
    /// One line on what the driver does (GSO, GRO, zero-copy), for logs.
    fn describe(&self) -> String;
}

/// A bound, non-blocking UDP socket with GSO/GRO detected.
#[derive(Debug)]
pub struct Socket {
    fd: OwnedFd,
    pub local: SocketAddr,
    /// The kernel accepts `UDP_SEGMENT`.
    pub gso: bool,
    /// `UDP_GRO` is on: received datagrams may be coalesced.
    pub gro: bool,
    /// `SO_TIMESTAMPNS` is on: the kernel stamps each datagram when it receives it.
    pub rx_timestamps: bool,
}

impl AsRawFd for Socket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn setsockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int, v: libc::c_int) -> io::Result<()> {
    // SAFETY: fd is a valid socket; the option value is a c_int that outlives the call.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &v as *const _ as *const libc::c_void,
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

impl Socket {
    /// Bind `addr` (port 0 picks one) with large buffers, GRO on, and GSO if the kernel has it.
    pub fn bind(addr: SocketAddr) -> io::Result<Self> {
        let domain = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
        // SAFETY: plain socket(2) call; the fd is owned right after.
        let raw = cvt(unsafe { libc::socket(domain, libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) })?;
        // SAFETY: raw is a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let bytes = SOCKET_BUFFER_BYTES as libc::c_int;
        for (force, plain) in [
            (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
            (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
        ] {
            if setsockopt_int(raw, libc::SOL_SOCKET, force, bytes).is_err() {
                let _ = setsockopt_int(raw, libc::SOL_SOCKET, plain, bytes);
            }
        }
        if addr.is_ipv4() {
            // Never fragment: datagrams are sized for the path MTU.
            let _ = setsockopt_int(raw, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_PROBE);
        }
        let gro = setsockopt_int(raw, libc::IPPROTO_UDP, UDP_GRO, 1).is_ok();
        // Kernel receive timestamps (module doc). `SO_TIMESTAMPNS` rather than `SO_TIMESTAMPING`:
        // software receive stamps are all we need, and it is what the WAN testbed's delay line uses.
        let rx_timestamps = match setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(
                    "UDP {addr}: the kernel refused receive timestamps (SO_TIMESTAMPNS: {e}); one-way delay \
                     is measured from when the endpoint handles each datagram, which adds its own \
                     scheduling delay to the background controller's queue estimate"
                );
                false
            }
        };
        let (sa, len) = to_sockaddr(addr);
        // SAFETY: sa is a valid sockaddr of length len.
        cvt(unsafe { libc::bind(raw, &sa as *const _ as *const libc::sockaddr, len) })?;
        let mut out: libc::sockaddr_storage = unsafe { zeroed() };
        let mut out_len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: out is large enough for any address.
        cvt(unsafe { libc::getsockname(raw, &mut out as *mut _ as *mut libc::sockaddr, &mut out_len) })?;
        let local = from_sockaddr(&out).ok_or_else(|| io::Error::other("getsockname returned an unknown family"))?;
        let gso = Self::probe_gso(raw);
        Ok(Self {
            fd,
            local,
            gso,
            gro,
            rx_timestamps,
        })
    }

    fn probe_gso(fd: RawFd) -> bool {
        let mut v: libc::c_int = 0;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: v and len are valid for the call.
        unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_UDP,
                UDP_SEGMENT,
                &mut v as *mut _ as *mut libc::c_void,
                &mut len,
            ) == 0
        }
    }

    /// Wait until readable (or `timeout`). Returns false on timeout.
    pub fn wait_readable(&self, timeout: Option<Duration>) -> io::Result<bool> {
        let mut p = libc::pollfd {
            fd: self.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.map_or(-1, |d| {
            d.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int
        });
        // SAFETY: one valid pollfd.
        match unsafe { libc::poll(&mut p, 1, ms) } {
            -1 => {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    Ok(false)
                } else {
                    Err(e)
                }
            }
            0 => Ok(false),
            _ => Ok(true),
        }
    }

    /// Wait until writable (the send buffer has room).
    pub fn wait_writable(&self) -> io::Result<()> {
        let mut p = libc::pollfd {
            fd: self.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut p, 1, 100) };
        Ok(())
    }
}

/// `sockaddr_storage` for an address.
pub fn to_sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and suitably aligned.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in, sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in6, sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// The address in a `sockaddr_storage`, if it is IPv4 or IPv6.
pub fn from_sockaddr(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match ss.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: family says this is a sockaddr_in.
            let a = unsafe { &*(ss as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(a.sin_addr.s_addr.to_ne_bytes()),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: family says this is a sockaddr_in6.
            let a = unsafe { &*(ss as *const _ as *const libc::sockaddr_in6) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Room for the control messages of one message: on send a `UDP_SEGMENT` (u16); on receive
/// an `SCM_TIMESTAMPNS` timespec (32 bytes with its header) and then a `UDP_GRO` segment
/// size (int, 24 bytes). A buffer too small for both makes the kernel drop the second (set
/// `MSG_CTRUNC`), and a GRO super-datagram would then be handed on whole, undecodable.
pub const CMSG_BYTES: usize = 64;

/// One message slot: buffer, address, iovec, control space and msghdr.
/// Slots live in a `Vec` that is never resized, so the msghdr's internal
/// pointers stay valid while the kernel uses them.
pub struct MsgSlot {
    pub buf: Vec<u8>,
    pub addr: libc::sockaddr_storage,
    pub iov: libc::iovec,
    pub control: [u64; CMSG_BYTES / 8],
    pub hdr: libc::msghdr,
}

// SAFETY: the raw pointers in `hdr`/`iov` point into this slot's own heap buffers
// (which do not move when the slot's owner moves between threads) and are only
// dereferenced by the kernel during a call made by whichever single thread owns it.
unsafe impl Send for MsgSlot {}

impl MsgSlot {
    pub fn new(bytes: usize) -> Self {
        Self {
            buf: vec![0; bytes],
            // SAFETY: all-zero is valid for these C structs.
            addr: unsafe { zeroed() },
            iov: libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            },
            control: [0; CMSG_BYTES / 8],
            hdr: unsafe { zeroed() },
        }
    }

    /// Fill the header for sending `len` bytes to `dst`, with a GSO segment size if given.
    pub fn prepare_send(&mut self, dst: SocketAddr, len: usize, segment: Option<u16>) {
        let (ss, slen) = to_sockaddr(dst);
        self.addr = ss;
        self.iov = libc::iovec {
            iov_base: self.buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: len,
        };
        self.hdr = unsafe { zeroed() };
        self.hdr.msg_name = &mut self.addr as *mut _ as *mut libc::c_void;
        self.hdr.msg_namelen = slen;
        self.hdr.msg_iov = &mut self.iov;
        self.hdr.msg_iovlen = 1;
        if let Some(seg) = segment {
            self.hdr.msg_control = self.control.as_mut_ptr() as *mut libc::c_void;
            // SAFETY: CMSG_SPACE is a pure computation.
            self.hdr.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as _;
            // SAFETY: the control buffer is CMSG_BYTES long, enough for one u16 cmsg.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&self.hdr);
                (*c).cmsg_level = libc::IPPROTO_UDP;
                (*c).cmsg_type = UDP_SEGMENT;
                (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
                std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, seg);
            }
        }
    }

    /// Fill the header for receiving into the whole buffer.
    pub fn prepare_recv(&mut self) {
        self.iov = libc::iovec {
            iov_base: self.buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: self.buf.len(),
        };
        self.hdr = unsafe { zeroed() };
        self.hdr.msg_name = &mut self.addr as *mut _ as *mut libc::c_void;
        self.hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        self.hdr.msg_iov = &mut self.iov;
        self.hdr.msg_iovlen = 1;
        self.hdr.msg_control = self.control.as_mut_ptr() as *mut libc::c_void;
        self.hdr.msg_controllen = CMSG_BYTES as _;
    }

    /// After a receive: what its control messages said.
    pub fn received(&self) -> Received {
        let mut r = Received {
            from: from_sockaddr(&self.addr),
            segment: None,
            stamp_ns: None,
        };
        // SAFETY: the kernel filled msg_control/msg_controllen; the CMSG macros walk within it.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&self.hdr);
            while !c.is_null() {
                let data = libc::CMSG_DATA(c);
                match ((*c).cmsg_level, (*c).cmsg_type) {
                    (libc::IPPROTO_UDP, UDP_GRO) => {
                        r.segment = Some(std::ptr::read_unaligned(data as *const libc::c_int) as usize);
                    }
                    (libc::SOL_SOCKET, libc::SCM_TIMESTAMPNS) => {
                        let t = std::ptr::read_unaligned(data as *const libc::timespec);
                        r.stamp_ns = timespec_ns(&t);
                    }
                    _ => {}
                }
                c = libc::CMSG_NXTHDR(&self.hdr, c);
            }
        }
        r
    }
}

/// What the control messages of one receive said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// The sender, if IPv4 or IPv6.
    pub from: Option<SocketAddr>,
    /// GRO segment size, if the kernel coalesced datagrams.
    pub segment: Option<usize>,
    /// The kernel's receive timestamp (`CLOCK_REALTIME`, ns since the Unix epoch), if any.
    pub stamp_ns: Option<u64>,
}

/// A `timespec` in nanoseconds since the epoch; `None` for zero (the kernel had no stamp) or negative.
fn timespec_ns(t: &libc::timespec) -> Option<u64> {
    let ns = u64::try_from(t.tv_sec)
        .ok()?
        .checked_mul(1_000_000_000)?
        .checked_add(u64::try_from(t.tv_nsec).ok()?)?;
    (ns != 0).then_some(ns)
}

/// Slots for `recvmmsg`: drains whatever the socket holds without blocking,
/// `slots` messages per system call. Both real drivers receive with it.
pub struct RecvBatch {
    slots: Vec<MsgSlot>,
    mmsg: Vec<libc::mmsghdr>,
    /// The socket's address, for logs.
    local: SocketAddr,
    /// The socket has `SO_TIMESTAMPNS` on, so every datagram should come with a stamp.
    stamps_expected: bool,
    /// Datagrams (GRO super-datagrams count once) that came without a usable stamp.
    unstamped: u64,
}

// SAFETY: as for MsgSlot: the mmsghdr copies point into the slots' own heap buffers.
unsafe impl Send for RecvBatch {}

/// Most `recvmmsg` rounds in one drain before returning to the loop.
pub(crate) const RECV_ROUNDS_MAX: usize = 8;

/// What one [`RecvBatch::drain`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Datagrams handed on (GRO super-datagrams count per segment).
    pub delivered: usize,
    /// The socket was found empty (`EAGAIN`). False when the drain stopped at
    /// [`RECV_ROUNDS_MAX`] full rounds: datagrams may still be queued, and an
    /// edge-triggered waiter (io_uring's multishot poll) will not be told about
    /// them again.
    pub emptied: bool,
}

impl RecvBatch {
    /// Slots for receiving from `sock`.
    pub fn new(slots: usize, sock: &Socket) -> Self {
        Self {
            slots: (0..slots).map(|_| MsgSlot::new(BATCH_BYTES_MAX)).collect(),
            // SAFETY: all-zero mmsghdr is valid; fields are set before each call.
            mmsg: vec![unsafe { zeroed() }; slots],
            local: sock.local,
            stamps_expected: sock.rx_timestamps,
            unstamped: 0,
        }
    }

    /// Receives (GRO super-datagrams count once) that came without a usable kernel timestamp
    /// although the socket asked for them.
    pub fn unstamped(&self) -> u64 {
        self.unstamped
    }

    /// Receive until the socket is empty (or [`RECV_ROUNDS_MAX`] full rounds), handing each
    /// datagram (GRO super-datagrams split) to `f` with its arrival time on `clock` (from the
    /// kernel's receive timestamp, if usable). Says how many were delivered and whether the
    /// socket was emptied.
    pub fn drain(&mut self, fd: RawFd, clock: &Clock, f: &mut OnDatagram<'_>) -> io::Result<Drained> {
        let n = self.slots.len();
        let mut delivered = 0;
        let mut emptied = false;
        for _ in 0..RECV_ROUNDS_MAX {
            for (slot, m) in self.slots.iter_mut().zip(self.mmsg.iter_mut()) {
                slot.prepare_recv();
                m.msg_hdr = slot.hdr;
                m.msg_len = 0;
            }
            // SAFETY: mmsg[..n] point at slots in a never-resized Vec that outlives the call.
            let r = unsafe {
                libc::recvmmsg(
                    fd,
                    self.mmsg.as_mut_ptr(),
                    n as u32,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => {
                        emptied = true;
                        break;
                    }
                    io::ErrorKind::Interrupted => break,
                    // ICMP feedback for an earlier send: not this receive's business.
                    _ if e.raw_os_error() == Some(libc::ECONNREFUSED) => continue,
                    _ => return Err(e),
                }
            }
            // Both clocks once per batch: every stamp in it is older than this moment.
            let (now, now_realtime_ns) = if r > 0 {
                clock.now_with_realtime()
            } else {
                (Time::ZERO, None)
            };
            for k in 0..r as usize {
                let len = self.mmsg[k].msg_len as usize;
                // The kernel updated msg_controllen in the mmsghdr copy; reflect it in the slot.
                self.slots[k].hdr.msg_controllen = self.mmsg[k].msg_hdr.msg_controllen;
                let got = self.slots[k].received();
                let arrived = got
                    .stamp_ns
                    .zip(now_realtime_ns)
                    .and_then(|(stamp, wall)| arrival_from_realtime(now, wall, stamp));
                if arrived.is_none() && self.stamps_expected {
                    self.note_unstamped(got.stamp_ns.is_some(), self.mmsg[k].msg_hdr.msg_flags);
                }
                if let Some(from) = got.from {
                    delivered += split_gro(from, &self.slots[k].buf[..len], got.segment, arrived, f);
                }
            }
            if (r as usize) < n {
                // recvmmsg stopped at EAGAIN. (An error after some datagrams would also cut the
                // batch short, but an unconnected UDP socket without IP_RECVERR gets no ICMP
                // errors, and the kernel drops bad checksums and reads on.)
                emptied = true;
                break;
            }
        }
        Ok(Drained { delivered, emptied })
    }

    /// Count a receive without a usable timestamp; say so the first time.
    fn note_unstamped(&mut self, had_stamp: bool, msg_flags: libc::c_int) {
        self.unstamped += 1;
        if self.unstamped > 1 {
            return;
        }
        let why = if had_stamp {
            "its stamp was more than a second off the wall clock (was the clock stepped?)"
        } else if msg_flags & libc::MSG_CTRUNC != 0 {
            "the control buffer was too small for it (MSG_CTRUNC)"
        } else {
            "the kernel gave none"
        };
        tracing::warn!(
            "UDP {}: a datagram came without a usable kernel receive timestamp ({why}); such \
             datagrams count as arrived when the endpoint handles them (logged once; \
             see RecvBatch::unstamped)",
            self.local
        );
    }
}

/// Hand each datagram of a (possibly GRO-coalesced) receive to `f`, all with the same arrival time.
pub fn split_gro(
    from: SocketAddr,
    data: &[u8],
    seg: Option<usize>,
    arrived: Option<Time>,
    f: &mut OnDatagram<'_>,
) -> usize {
    match seg {
        Some(s) if s > 0 && s < data.len() => {
            let mut n = 0;
            for d in data.chunks(s) {
                f(from, d, arrived);
                n += 1;
            }
            n
        }
        _ => {
            f(from, data, arrived);
            1
        }
    }
}

/// True for send errors that concern one destination only (ICMP feedback) and must not stop the loop.
pub fn is_transient_send_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EPERM | libc::EMSGSIZE)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmsg_bytes_hold_a_timestamp_and_a_gro_segment_size() {
        // SAFETY: CMSG_SPACE is a pure computation.
        let need = unsafe {
            libc::CMSG_SPACE(size_of::<libc::timespec>() as u32) + libc::CMSG_SPACE(size_of::<libc::c_int>() as u32)
        };
        assert!(CMSG_BYTES >= need as usize, "{CMSG_BYTES} < {need}");
        assert_eq!(CMSG_BYTES % 8, 0, "the control buffer is an array of u64");
    }

    #[test]
    fn timespec_ns_refuses_zero_and_negative_stamps() {
        let t = |tv_sec, tv_nsec| libc::timespec { tv_sec, tv_nsec };
        assert_eq!(timespec_ns(&t(1_790_000_000, 5)), Some(1_790_000_000_000_000_005));
        assert_eq!(timespec_ns(&t(0, 0)), None, "no stamp");
        assert_eq!(timespec_ns(&t(-1, 0)), None);
        assert_eq!(timespec_ns(&t(1, -1)), None);
    }
}
