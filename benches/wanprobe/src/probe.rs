//! UDP echo server and the latency probe that talks to it.
//!
//! Both take the kernel's receive timestamp (`SO_TIMESTAMPNS`) of each
//! datagram, and the echo appends how long it held the datagram (from that
//! timestamp to just before its send), which the probe subtracts: on a busy
//! host, the time either process takes to be scheduled is then not counted
//! as network delay.

use std::io::{BufWriter, ErrorKind, Write};
use std::mem::size_of;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::time::Duration;

use crate::{clock_ns, stopping};

/// Probe datagram: sequence number and monotonic send time, 8 bytes each.
const PROBE_LEN: usize = 16;
/// The echo's reply to a probe: the probe and the echo's hold time in ns.
const REPLY_LEN: usize = PROBE_LEN + 8;
/// A reply later than this counts as lost.
const LOST_AFTER_NS: u64 = 2_000_000_000;
/// Longest sleep between checks of the stop flag.
const POLL_MAX: Duration = Duration::from_millis(100);

pub fn echo(listen: &str) -> Result<(), String> {
    let sock = UdpSocket::bind(listen).map_err(|e| format!("bind {listen}: {e}"))?;
    sock.set_read_timeout(Some(POLL_MAX)).map_err(|e| e.to_string())?;
    enable_rx_stamps(&sock)?;
    let mut buf = [0u8; 2048];
    let mut echoed = 0u64;
    while !stopping() {
        match recv_stamped(&sock, &mut buf[..2040]) {
            Ok((n, from, stamp)) => {
                // A probe gets its hold time appended (0 when unknown); other
                // datagrams go back unchanged.
                let mut len = n;
                if n == PROBE_LEN {
                    let hold = stamp.map_or(0, |t| clock_ns(libc::CLOCK_REALTIME).saturating_sub(t));
                    buf[n..n + 8].copy_from_slice(&hold.to_le_bytes());
                    len = REPLY_LEN;
                }
                // SAFETY: valid fd, buffer of `len` bytes, the sender's address as received.
                let rc = unsafe {
                    libc::sendto(
                        sock.as_raw_fd(),
                        buf.as_ptr().cast(),
                        len,
                        0,
                        (&from.0 as *const libc::sockaddr_storage).cast(),
                        from.1,
                    )
                };
                if rc >= 0 {
                    echoed += 1;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(format!("recv: {e}")),
        }
    }
    eprintln!("wanprobe echo: {echoed} datagrams echoed");
    Ok(())
}

fn enable_rx_stamps(sock: &UdpSocket) -> Result<(), String> {
    let on: libc::c_int = 1;
    // SAFETY: valid fd and an int option.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(format!("SO_TIMESTAMPNS: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

type RawAddr = (libc::sockaddr_storage, libc::socklen_t);

/// One datagram (blocking up to the socket's read timeout): its length, its
/// sender and the kernel's receive timestamp (`CLOCK_REALTIME` ns) if any.
fn recv_stamped(sock: &UdpSocket, buf: &mut [u8]) -> std::io::Result<(usize, RawAddr, Option<u64>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = [0u64; 16];
    // SAFETY: zeroed sockaddr_storage and msghdr are valid; pointers set below outlive the call.
    let mut from: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut from as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of::<[u64; 16]>() as _;
    // SAFETY: valid fd and a msghdr whose buffers are live and sized.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut stamp = None;
    // SAFETY: the kernel filled msg_control up to msg_controllen; the CMSG
    // macros walk it within those bounds.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_TIMESTAMPNS {
                let t = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::timespec>());
                stamp = Some(t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64);
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok((n as usize, (from, msg.msg_namelen), stamp))
}

struct Sent {
    realtime_ns: u64,
    rtt_us: Option<u64>,
}

pub fn probe(to: &str, interval_ms: u64, out: &str) -> Result<(), String> {
    if interval_ms == 0 {
        return Err("--interval-ms must be at least 1".to_owned());
    }
    let sock = UdpSocket::bind("0.0.0.0:0").map_err(|e| format!("bind: {e}"))?;
    sock.connect(to).map_err(|e| format!("connect {to}: {e}"))?;
    enable_rx_stamps(&sock)?;
    let interval_ns = interval_ms * 1_000_000;
    let start = clock_ns(libc::CLOCK_MONOTONIC);
    let mut sent: Vec<Sent> = Vec::new();
    let mut buf = [0u8; 64];
    let mut send_errors = 0u64;
    while !stopping() {
        let now = clock_ns(libc::CLOCK_MONOTONIC);
        let due = start + sent.len() as u64 * interval_ns;
        if now >= due {
            let mut pkt = [0u8; PROBE_LEN];
            pkt[..8].copy_from_slice(&(sent.len() as u64).to_le_bytes());
            pkt[8..].copy_from_slice(&now.to_le_bytes());
            let realtime_ns = clock_ns(libc::CLOCK_REALTIME);
            if sock.send(&pkt).is_err() {
                send_errors += 1;
            }
            sent.push(Sent {
                realtime_ns,
                rtt_us: None,
            });
            continue;
        }
        let wait = Duration::from_nanos(due - now).min(POLL_MAX);
        sock.set_read_timeout(Some(wait.max(Duration::from_micros(1))))
            .map_err(|e| e.to_string())?;
        match recv_stamped(&sock, &mut buf) {
            Ok((n, _, stamp)) if n == PROBE_LEN || n == REPLY_LEN => {
                let recv = clock_ns(libc::CLOCK_MONOTONIC);
                let seq = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes")) as usize;
                let sent_mono = u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes"));
                let hold = if n == REPLY_LEN {
                    u64::from_le_bytes(buf[16..24].try_into().expect("8 bytes"))
                } else {
                    0
                };
                let rtt_ns = match (stamp, sent.get(seq)) {
                    // Kernel receive time less send time, both CLOCK_REALTIME.
                    (Some(t), Some(s)) if t > s.realtime_ns => t - s.realtime_ns,
                    _ => recv.saturating_sub(sent_mono),
                }
                .saturating_sub(hold);
                if let Some(s) = sent.get_mut(seq) {
                    if s.rtt_us.is_none() && rtt_ns <= LOST_AFTER_NS {
                        s.rtt_us = Some(rtt_ns / 1000);
                    }
                }
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            // ECONNREFUSED while the echo server is not up yet: the probe counts as lost.
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
            Err(e) => return Err(format!("recv: {e}")),
        }
    }
    let file = std::fs::File::create(out).map_err(|e| format!("{out}: {e}"))?;
    let mut w = BufWriter::new(file);
    let write_err = |e: std::io::Error| format!("{out}: {e}");
    writeln!(w, "send_realtime_ns,rtt_us").map_err(write_err)?;
    let mut answered = 0usize;
    for s in &sent {
        match s.rtt_us {
            Some(rtt) => {
                answered += 1;
                writeln!(w, "{},{rtt}", s.realtime_ns).map_err(write_err)?;
            }
            None => writeln!(w, "{},-1", s.realtime_ns).map_err(write_err)?,
        }
    }
    w.flush().map_err(write_err)?;
    eprintln!(
        "wanprobe probe: {} sent, {answered} answered, {send_errors} send errors",
        sent.len()
    );
    Ok(())
}
