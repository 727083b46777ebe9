//! A minimal rtnetlink client: route lookup (`RTM_GETROUTE`, as `ip route get`)
//! and the root qdisc's statistics (`RTM_GETQDISC`, as `tc -s qdisc show`).
//!
//! This is also the fallback monitor when BPF cannot be used: [`NetlinkMonitor`]
//! publishes the same [`EgressSample`] (without the own/other traffic split) at
//! the cost of one request/reply round trip (~2 µs) per sample.
//!
//! Not a general netlink library: it sends one request and reads until the
//! reply with the same sequence number, with a bounded number of messages and a
//! receive timeout.

use std::io;
use std::mem::size_of;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use crate::sample::{EgressSample, SampleSource};

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const RTM_NEWQDISC: u16 = 36;
const RTM_GETQDISC: u16 = 38;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ECHO: u16 = 8;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const TCA_KIND: u16 = 1;
const TCA_STATS2: u16 = 7;
const TCA_STATS_BASIC: u16 = 1;
const TCA_STATS_QUEUE: u16 = 3;
const NLA_TYPE_MASK: u16 = 0x3fff;
const TC_H_ROOT: u32 = 0xffff_ffff;

const NLMSG_HDR_LEN: usize = 16;
const RTMSG_LEN: usize = 12;
const TCMSG_LEN: usize = 20;
/// Receive buffer; a qdisc or route reply is a few hundred bytes.
const RECV_BUF_BYTES: usize = 32 * 1024;
/// Messages read while looking for the reply before giving up.
const RECV_MESSAGES_MAX: usize = 64;
/// A reply that does not come within this is an error, not a hang.
const RECV_TIMEOUT: Duration = Duration::from_secs(2);

/// An rtnetlink socket bound to the network namespace of the thread that opened it.
pub(crate) struct RtNetlink {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

/// Statistics of a qdisc as `tc -s qdisc show` prints them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QdiscStats {
    pub kind: String,
    pub handle: u32,
    pub sent_bytes: u64,
    pub sent_packets: u64,
    pub backlog_bytes: u32,
    pub backlog_packets: u32,
    pub drops: u32,
    pub requeues: u32,
    pub overlimits: u32,
}

impl RtNetlink {
    pub(crate) fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let timeout = libc::timeval {
            tv_sec: RECV_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: valid fd, pointer and length of a timeval.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            fd,
            seq: 0,
            buf: vec![0; RECV_BUF_BYTES],
        })
    }

    /// The interface index the kernel would send a packet to `peer` out of.
    pub(crate) fn route_oif(&mut self, peer: IpAddr) -> io::Result<u32> {
        let (family, addr) = match peer {
            IpAddr::V4(a) => (libc::AF_INET as u8, a.octets().to_vec()),
            IpAddr::V6(a) => (libc::AF_INET6 as u8, a.octets().to_vec()),
        };
        let mut body = vec![0u8; RTMSG_LEN];
        body[0] = family;
        body[1] = (addr.len() * 8) as u8; // rtm_dst_len
        push_attr(&mut body, RTA_DST, &addr);
        let reply = self.request(RTM_GETROUTE, NLM_F_REQUEST, &body, RTM_NEWROUTE)?;
        let attrs = reply.get(RTMSG_LEN..).ok_or_else(|| invalid("short route reply"))?;
        for (kind, value) in Attrs(attrs) {
            if kind == RTA_OIF {
                return read_u32(value, 0).ok_or_else(|| invalid("short RTA_OIF"));
            }
        }
        Err(invalid("route reply without an output interface"))
    }

    /// Statistics of the root qdisc of interface `ifindex`.
    pub(crate) fn root_qdisc(&mut self, ifindex: u32) -> io::Result<QdiscStats> {
        let mut body = vec![0u8; TCMSG_LEN];
        body[4..8].copy_from_slice(&ifindex.to_ne_bytes());
        // tcm_parent = root, tcm_handle = 0: the root qdisc, whatever its handle.
        body[12..16].copy_from_slice(&TC_H_ROOT.to_ne_bytes());
        // Without NLM_F_ECHO the kernel sends no reply to a single get and recv blocks.
        let reply = self.request(RTM_GETQDISC, NLM_F_REQUEST | NLM_F_ECHO, &body, RTM_NEWQDISC)?;
        parse_qdisc(&reply)
    }

    /// Sends one request and returns the body of the reply of type `want`.
    fn request(&mut self, kind: u16, flags: u16, body: &[u8], want: u16) -> io::Result<Vec<u8>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let len = NLMSG_HDR_LEN + body.len();
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(&(len as u32).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&flags.to_ne_bytes());
        msg.extend_from_slice(&seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(body);
        // SAFETY: a zeroed sockaddr_nl with the family set addresses the kernel.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: valid fd; msg and the address outlive the call.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut seen = 0;
        while seen < RECV_MESSAGES_MAX {
            // SAFETY: valid fd; the buffer is owned and its length is passed.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), self.buf.as_mut_ptr().cast(), self.buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut rest = &self.buf[..n as usize];
            while rest.len() >= NLMSG_HDR_LEN {
                seen += 1;
                let msg_len = read_u32(rest, 0).unwrap_or(0) as usize;
                if msg_len < NLMSG_HDR_LEN || msg_len > rest.len() {
                    return Err(invalid("truncated netlink message"));
                }
                let msg_kind = u16::from_ne_bytes([rest[4], rest[5]]);
                let msg_seq = read_u32(rest, 8).unwrap_or(0);
                let payload = &rest[NLMSG_HDR_LEN..msg_len];
                if msg_seq == seq {
                    match msg_kind {
                        NLMSG_ERROR => {
                            let errno = read_u32(payload, 0).map(|e| e as i32).unwrap_or(0);
                            if errno != 0 {
                                return Err(io::Error::from_raw_os_error(-errno));
                            }
                        }
                        NLMSG_DONE => return Err(invalid("netlink request answered with no data")),
                        k if k == want => return Ok(payload.to_vec()),
                        _ => {}
                    }
                }
                rest = &rest[align4(msg_len).min(rest.len())..];
            }
        }
        Err(invalid("no netlink reply with our sequence number"))
    }
}

fn parse_qdisc(reply: &[u8]) -> io::Result<QdiscStats> {
    let head = reply.get(..TCMSG_LEN).ok_or_else(|| invalid("short qdisc reply"))?;
    let mut stats = QdiscStats {
        handle: read_u32(head, 8).unwrap_or(0),
        ..QdiscStats::default()
    };
    for (kind, value) in Attrs(&reply[TCMSG_LEN..]) {
        match kind {
            TCA_KIND => {
                let name = value.split(|b| *b == 0).next().unwrap_or_default();
                stats.kind = String::from_utf8_lossy(name).into_owned();
            }
            TCA_STATS2 => {
                for (sub, v) in Attrs(value) {
                    match sub {
                        TCA_STATS_BASIC => {
                            stats.sent_bytes = read_u64(v, 0).unwrap_or(0);
                            stats.sent_packets = u64::from(read_u32(v, 8).unwrap_or(0));
                        }
                        TCA_STATS_QUEUE => {
                            stats.backlog_packets = read_u32(v, 0).unwrap_or(0);
                            stats.backlog_bytes = read_u32(v, 4).unwrap_or(0);
                            stats.drops = read_u32(v, 8).unwrap_or(0);
                            stats.requeues = read_u32(v, 12).unwrap_or(0);
                            stats.overlimits = read_u32(v, 16).unwrap_or(0);
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok(stats)
}

/// Appends one netlink attribute (header, value, padding).
fn push_attr(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = 4 + value.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(value);
    buf.resize(buf.len() + align4(len) - len, 0);
}

/// Iterator over `(type, value)` of the netlink attributes in a buffer.
struct Attrs<'a>(&'a [u8]);

impl<'a> Iterator for Attrs<'a> {
    type Item = (u16, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let buf = self.0;
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            self.0 = &[];
            return None;
        }
        self.0 = &buf[align4(len).min(buf.len())..];
        Some((kind, &buf[4..len]))
    }
}

const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn read_u32(buf: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(buf.get(at..at + 4)?.try_into().ok()?))
}

fn read_u64(buf: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(buf.get(at..at + 8)?.try_into().ok()?))
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// The fallback monitor: the root qdisc's backlog and drops through
/// rtnetlink, no BPF and no privilege needed. Bound to the network namespace
/// of the thread that created it.
pub struct NetlinkMonitor {
    ifname: String,
    ifindex: u32,
    netlink: RtNetlink,
}

impl NetlinkMonitor {
    /// Watches the interface the kernel routes packets for `peer` through.
    pub fn attach_toward(peer: IpAddr) -> Result<Self, crate::MonitorError> {
        let mut netlink = RtNetlink::open().map_err(|source| crate::MonitorError::NoRoute { peer, source })?;
        let ifindex = netlink
            .route_oif(peer)
            .map_err(|source| crate::MonitorError::NoRoute { peer, source })?;
        let ifname = crate::iface::name_of(ifindex)?;
        Ok(Self {
            ifname,
            ifindex,
            netlink,
        })
    }

    /// Watches interface `ifname` of this thread's network namespace.
    pub fn attach(ifname: &str) -> Result<Self, crate::MonitorError> {
        let ifindex = crate::iface::index_of(ifname)?;
        let netlink = RtNetlink::open().map_err(|source| crate::MonitorError::Netlink { ifindex, source })?;
        Ok(Self {
            ifname: ifname.to_owned(),
            ifindex,
            netlink,
        })
    }

    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// Full statistics of the root qdisc, as `tc -s qdisc show` prints them.
    pub fn qdisc_stats(&mut self) -> Result<QdiscStats, crate::MonitorError> {
        let ifindex = self.ifindex;
        self.netlink
            .root_qdisc(ifindex)
            .map_err(|source| crate::MonitorError::Netlink { ifindex, source })
    }

    /// One request/reply round trip; `traffic` is always `None`.
    pub fn sample(&mut self) -> Result<EgressSample, crate::MonitorError> {
        Ok(sample_from(&self.qdisc_stats()?))
    }
}

pub(crate) fn sample_from(q: &QdiscStats) -> EgressSample {
    EgressSample {
        backlog_source: SampleSource::Netlink,
        backlog_bytes: u64::from(q.backlog_bytes),
        backlog_packets: u64::from(q.backlog_packets),
        drops: u64::from(q.drops),
        overlimits: u64::from(q.overlimits),
        requeues: u64::from(q.requeues),
        traffic: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attrs_parse_nested_qdisc_stats() {
        let mut queue = Vec::new();
        for v in [3u32, 4200, 7, 1, 9] {
            queue.extend_from_slice(&v.to_ne_bytes());
        }
        let mut basic = Vec::new();
        basic.extend_from_slice(&123_456u64.to_ne_bytes());
        basic.extend_from_slice(&89u32.to_ne_bytes());
        basic.extend_from_slice(&[0; 4]);
        let mut stats2 = Vec::new();
        push_attr(&mut stats2, TCA_STATS_BASIC, &basic);
        push_attr(&mut stats2, TCA_STATS_QUEUE, &queue);
        let mut reply = vec![0u8; TCMSG_LEN];
        reply[8..12].copy_from_slice(&0x8001_0000u32.to_ne_bytes());
        push_attr(&mut reply, TCA_KIND, b"tbf\0");
        push_attr(&mut reply, TCA_STATS2 | 0x8000, &stats2); // NLA_F_NESTED is masked off
        let q = parse_qdisc(&reply).unwrap();
        assert_eq!(
            q,
            QdiscStats {
                kind: "tbf".into(),
                handle: 0x8001_0000,
                sent_bytes: 123_456,
                sent_packets: 89,
                backlog_bytes: 4200,
                backlog_packets: 3,
                drops: 7,
                requeues: 1,
                overlimits: 9,
            }
        );
    }

    #[test]
    fn attrs_stop_at_a_truncated_attribute() {
        let mut buf = Vec::new();
        push_attr(&mut buf, TCA_KIND, b"htb\0");
        buf.extend_from_slice(&[200, 0, 1, 0, 1, 2]); // claims 200 bytes, has 6
        let kinds: Vec<u16> = Attrs(&buf).map(|(k, _)| k).collect();
        assert_eq!(kinds, vec![TCA_KIND]);
    }

    #[test]
    fn route_lookup_of_loopback_is_lo() {
        let mut nl = RtNetlink::open().unwrap();
        for peer in [
            IpAddr::from([127, 0, 0, 1]),
            IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
        ] {
            let oif = nl.route_oif(peer).unwrap();
            assert_eq!(crate::iface::name_of(oif).unwrap(), "lo", "{peer}");
        }
    }
}
