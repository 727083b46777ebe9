//! Per-flow byte counts of the IPv4 frames arriving on one interface, in time bins.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io::{BufWriter, Write};
use std::net::Ipv4Addr;

use crate::{clock_ns, stopping};

/// Ethernet header bytes that TBF counts in front of every IP packet.
const ETH_HEADER: u64 = 14;
/// Frames at least this large carry bulk data (not SYNs, ACKs or probes).
const BIG_FRAME: u64 = 1000;
const RCVBUF: libc::c_int = 8 << 20;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    bin: u64,
    src: u32,
    proto: u8,
    sport: u16,
    dport: u16,
}

#[derive(Default)]
struct Count {
    bytes: u64,
    frames: u64,
    big: u64,
}

/// One frame from a packet socket: its length before truncation to `buf`
/// (`MSG_TRUNC`) and where it came from (direction, protocol).
pub(crate) fn recv_frame(fd: &Fd, buf: &mut [u8]) -> std::io::Result<(usize, libc::sockaddr_ll)> {
    // SAFETY: an all-zero sockaddr_ll is valid for recvfrom to fill.
    let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    // SAFETY: `buf` and `from` are writable for the lengths passed.
    let n = unsafe {
        libc::recvfrom(
            fd.0,
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
            libc::MSG_TRUNC,
            &mut from as *mut libc::sockaddr_ll as *mut libc::sockaddr,
            &mut from_len,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((n as usize, from))
}

pub(crate) struct Fd(pub(crate) libc::c_int);

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: the descriptor is owned by this value and closed once.
        unsafe {
            libc::close(self.0);
        }
    }
}

fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

pub(crate) fn open(iface: &str) -> Result<Fd, String> {
    open_proto(iface, libc::ETH_P_IP as u16)
}

/// An AF_PACKET socket bound to `iface` for frames of ethertype `ethertype`
/// (`ETH_P_ALL` to also see outgoing frames: the kernel hands those only to
/// sockets of every protocol).
pub(crate) fn open_proto(iface: &str, ethertype: u16) -> Result<Fd, String> {
    let name = CString::new(iface).map_err(|_| "bad interface name".to_owned())?;
    // SAFETY: `name` is a valid NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(os_err(&format!("interface {iface}")));
    }
    let proto = ethertype.to_be();
    // SAFETY: plain socket(2) call.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, proto as libc::c_int) };
    if fd < 0 {
        return Err(os_err("socket(AF_PACKET)"));
    }
    let fd = Fd(fd);
    // SAFETY: an all-zero sockaddr_ll is valid; the fields we need are set below.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: `sll` is a valid sockaddr_ll of the size passed.
    let rc = unsafe {
        libc::bind(
            fd.0,
            &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(os_err(&format!("bind to {iface}")));
    }
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: option values are valid for the sizes passed.
    unsafe {
        libc::setsockopt(
            fd.0,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
        libc::setsockopt(
            fd.0,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &RCVBUF as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    Ok(fd)
}

/// Packets the kernel dropped because the socket's buffer was full.
pub(crate) fn drops(fd: &Fd) -> u32 {
    let mut stats = libc::tpacket_stats {
        tp_packets: 0,
        tp_drops: 0,
    };
    let mut len = std::mem::size_of::<libc::tpacket_stats>() as libc::socklen_t;
    // SAFETY: `stats` is writable and `len` is its size.
    let rc = unsafe {
        libc::getsockopt(
            fd.0,
            libc::SOL_PACKET,
            libc::PACKET_STATISTICS,
            &mut stats as *mut libc::tpacket_stats as *mut libc::c_void,
            &mut len,
        )
    };
    if rc < 0 {
        0
    } else {
        stats.tp_drops
    }
}

pub fn tap(iface: &str, bin_ms: u64, out: &str) -> Result<(), String> {
    if bin_ms == 0 {
        return Err("--bin-ms must be at least 1".to_owned());
    }
    let bin_ns = bin_ms * 1_000_000;
    let fd = open(iface)?;
    let mut counts: BTreeMap<Key, Count> = BTreeMap::new();
    let mut buf = [0u8; 64];
    let mut total = 0u64;
    let mut dropped = 0u64;
    while !stopping() {
        let (n, from) = match recv_frame(&fd, &mut buf) {
            Ok(r) => r,
            Err(e) => match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted => {
                    dropped += drops(&fd) as u64;
                    continue;
                }
                _ => return Err(format!("recvfrom: {e}")),
            },
        };
        let now = clock_ns(libc::CLOCK_REALTIME);
        if from.sll_pkttype == libc::PACKET_OUTGOING {
            continue;
        }
        let got = n.min(buf.len());
        if got < 20 || buf[0] >> 4 != 4 {
            continue;
        }
        let ihl = ((buf[0] & 0x0f) as usize) * 4;
        let ip_len = u16::from_be_bytes([buf[2], buf[3]]) as u64;
        let proto = buf[9];
        let src = u32::from_be_bytes([buf[12], buf[13], buf[14], buf[15]]);
        let frag_offset = u16::from_be_bytes([buf[6], buf[7]]) & 0x1fff;
        let (sport, dport) = if frag_offset == 0 && (proto == 6 || proto == 17) && got >= ihl + 4 {
            (
                u16::from_be_bytes([buf[ihl], buf[ihl + 1]]),
                u16::from_be_bytes([buf[ihl + 2], buf[ihl + 3]]),
            )
        } else {
            (0, 0)
        };
        let frame = ip_len + ETH_HEADER;
        let key = Key {
            bin: now / bin_ns * bin_ns,
            src,
            proto,
            sport,
            dport,
        };
        let c = counts.entry(key).or_default();
        c.bytes += frame;
        c.frames += 1;
        if frame >= BIG_FRAME {
            c.big += 1;
        }
        total += 1;
    }
    dropped += drops(&fd) as u64;
    let file = std::fs::File::create(out).map_err(|e| format!("{out}: {e}"))?;
    let mut w = BufWriter::new(file);
    let write_err = |e: std::io::Error| format!("{out}: {e}");
    writeln!(w, "bin_start_realtime_ns,src,proto,sport,dport,bytes,frames,big_frames").map_err(write_err)?;
    for (k, c) in &counts {
        writeln!(
            w,
            "{},{},{},{},{},{},{},{}",
            k.bin,
            Ipv4Addr::from(k.src),
            k.proto,
            k.sport,
            k.dport,
            c.bytes,
            c.frames,
            c.big
        )
        .map_err(write_err)?;
    }
    w.flush().map_err(write_err)?;
    eprintln!("wanprobe tap {iface}: {total} frames counted, {dropped} dropped by the socket");
    Ok(())
}
