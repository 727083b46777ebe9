//! The I/O side: AF_PACKET sockets on two interfaces and one thread per
//! direction that receives frames, holds them in a [`DelayQueue`] and writes
//! them out on the other interface when due.
//!
//! The interfaces carry no addresses; the delay line is an invisible L2
//! bridge (ARP passes through it too, delayed like everything else). Offloads
//! must be off on the path (`ethtool -K DEV tso off gso off gro off tx off`,
//! as `scripts/testbed/wan.sh` does): a GSO super-frame larger than the MTU
//! cannot be written back out, and a frame with a partial checksum would
//! arrive corrupt. Oversized frames are counted and dropped.
//!
//! A frame's hold starts at the kernel's receive timestamp (`SO_TIMESTAMPNS`),
//! not when this thread got round to reading it: on a busy host the thread
//! may wake late, and that lateness must not add to the delay. Run it at a
//! real-time priority (`chrt -f`, as `wan.sh` does) so the send side wakes on
//! time too.

use std::ffi::CString;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::queue::{DelayQueue, QueueLimits};

/// Largest frame read; anything longer is counted as oversize and dropped.
pub const FRAME_BYTES_MAX: usize = 65_536;
/// Frames read per wake-up before the due ones are sent.
const RECV_BATCH_MAX: usize = 256;
/// Longest sleep, so a stop request is noticed.
const IDLE_WAIT_MAX: Duration = Duration::from_millis(100);
/// Receive buffer of each socket (SO_RCVBUFFORCE, root): ~2 ms at 10 Gbit/s.
const RCVBUF_BYTES: libc::c_int = 4 * 1024 * 1024;
/// Timer slack of the forwarding threads (the default 50 µs would blur the delay).
const TIMER_SLACK_NS: libc::c_ulong = 1_000;
/// linux/if_packet.h, newer than some libc releases.
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
/// A kernel receive timestamp older than this is not believed (a clock step);
/// the frame is then stamped when read.
const STAMP_AGE_MAX: Duration = Duration::from_secs(1);

/// What one direction did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectionStats {
    pub received: u64,
    pub forwarded: u64,
    pub dropped_full: u64,
    pub dropped_oversize: u64,
    pub send_errors: u64,
    /// Frames without a usable kernel receive timestamp (stamped when read).
    pub unstamped: u64,
}

/// One direction: frames read on `from`, written on `to` after `delay`.
pub struct Direction {
    pub name: String,
    pub from: String,
    pub to: String,
    pub delay: Duration,
    pub limits: QueueLimits,
}

#[expect(
    clippy::disallowed_methods,
    reason = "the delay line is an I/O driver: it stamps frames on arrival"
)]
fn now() -> Instant {
    Instant::now()
}

/// Runs one direction until `stop` is set.
pub fn run(dir: &Direction, stop: &AtomicBool) -> io::Result<DirectionStats> {
    let rx = PacketSocket::open(&dir.from, true)?;
    let tx = PacketSocket::open(&dir.to, false)?;
    // SAFETY: prctl(PR_SET_TIMERSLACK) only affects the calling thread.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, TIMER_SLACK_NS);
    }
    let mut queue = DelayQueue::new(dir.delay, dir.limits);
    let mut stats = DirectionStats::default();
    let mut buf = vec![0u8; FRAME_BYTES_MAX];
    while !stop.load(Ordering::Relaxed) {
        let wait = match queue.next_release() {
            Some(at) => at.saturating_duration_since(now()).min(IDLE_WAIT_MAX),
            None => IDLE_WAIT_MAX,
        };
        if rx.wait_readable(wait)? {
            for _ in 0..RECV_BATCH_MAX {
                let Some((len, truncated, stamp)) = rx.recv(&mut buf)? else {
                    break;
                };
                let read_at = now();
                let arrived = match stamp.and_then(age_of) {
                    Some(age) => read_at.checked_sub(age).unwrap_or(read_at),
                    None => {
                        stats.unstamped += 1;
                        read_at
                    }
                };
                stats.received += 1;
                if truncated {
                    stats.dropped_oversize += 1;
                    continue;
                }
                queue.push(arrived, buf[..len].to_vec());
            }
        }
        let t = now();
        while let Some(frame) = queue.pop_due(t) {
            match tx.send(&frame) {
                Ok(()) => stats.forwarded += 1,
                Err(_) => stats.send_errors += 1,
            }
        }
    }
    stats.dropped_full = queue.dropped_full;
    Ok(stats)
}

/// How long ago the kernel stamped a frame (`CLOCK_REALTIME`), if believable.
fn age_of(stamp: libc::timespec) -> Option<Duration> {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid clock id and out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut now) };
    let ns = |t: libc::timespec| i128::from(t.tv_sec) * 1_000_000_000 + i128::from(t.tv_nsec);
    let age = ns(now) - ns(stamp);
    if age < 0 || age > STAMP_AGE_MAX.as_nanos() as i128 {
        return None;
    }
    Some(Duration::from_nanos(age as u64))
}

struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    /// A raw packet socket bound to `ifname`; `receive` sockets see every
    /// frame arriving on it (promiscuous), send-only sockets see nothing.
    fn open(ifname: &str, receive: bool) -> io::Result<Self> {
        let name = CString::new(ifname).map_err(|_| io::Error::other("interface name has a NUL"))?;
        // SAFETY: valid NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(io::Error::other(format!("interface {ifname} not found")));
        }
        let protocol = if receive { (libc::ETH_P_ALL as u16).to_be() } else { 0 };
        // SAFETY: plain socket(2); checked below.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::c_int::from(protocol),
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd we own.
        let sock = Self {
            fd: unsafe { OwnedFd::from_raw_fd(raw) },
        };
        // SAFETY: zeroed sockaddr_ll is valid; fields set below.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = protocol;
        addr.sll_ifindex = ifindex as i32;
        // SAFETY: valid fd and address of the stated length.
        let rc = unsafe {
            libc::bind(
                sock.fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        if receive {
            // Frames this process writes on the interface are not input.
            sock.set_int(libc::SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)?;
            // Kernel receive timestamps (see the module doc).
            sock.set_int(libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1)?;
            // Best effort: SO_RCVBUFFORCE needs CAP_NET_ADMIN, SO_RCVBUF is capped.
            if sock
                .set_int(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, RCVBUF_BYTES)
                .is_err()
            {
                sock.set_int(libc::SOL_SOCKET, libc::SO_RCVBUF, RCVBUF_BYTES)?;
            }
            // SAFETY: zeroed packet_mreq is valid; fields set below.
            let mut mreq: libc::packet_mreq = unsafe { std::mem::zeroed() };
            mreq.mr_ifindex = ifindex as i32;
            mreq.mr_type = libc::PACKET_MR_PROMISC as u16;
            // SAFETY: valid fd and option of the stated length.
            let rc = unsafe {
                libc::setsockopt(
                    sock.fd.as_raw_fd(),
                    libc::SOL_PACKET,
                    libc::PACKET_ADD_MEMBERSHIP,
                    (&mreq as *const libc::packet_mreq).cast(),
                    size_of::<libc::packet_mreq>() as libc::socklen_t,
                )
            };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(sock)
    }

    fn set_int(&self, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
        // SAFETY: valid fd and an int option.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                level,
                name,
                (&value as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits up to `timeout` (nanosecond resolution) for a frame.
    fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
        };
        // SAFETY: one valid pollfd, a valid timespec, no signal mask change.
        let n = unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            };
        }
        Ok(n > 0 && pfd.revents & libc::POLLIN != 0)
    }

    /// One frame, without blocking: `(length, truncated, kernel receive
    /// timestamp)`, or `None` when none is waiting.
    fn recv(&self, buf: &mut [u8]) -> io::Result<Option<(usize, bool, Option<libc::timespec>)>> {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // u64s: aligned for cmsghdr; room for one timestamp and more.
        let mut control = [0u64; 16];
        // SAFETY: zeroed msghdr is valid; pointers set below outlive the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = size_of::<[u64; 16]>() as _;
        // SAFETY: valid fd and a msghdr whose buffers are live and sized.
        let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT | libc::MSG_TRUNC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(e),
            };
        }
        let mut stamp = None;
        // SAFETY: the kernel filled msg_control up to msg_controllen; the
        // CMSG macros walk it within those bounds.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_TIMESTAMPNS {
                    stamp = Some(std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::timespec>()));
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
        let n = n as usize;
        Ok(Some((n.min(buf.len()), n > buf.len(), stamp)))
    }

    fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: valid fd; the frame's length is passed.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}
