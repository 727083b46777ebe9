//! Byte counts of the IPv4 traffic on some interfaces, both directions, per
//! (direction, source, destination, protocol), written as JSON.
//!
//! Used by `scripts/testbed/sites.py` to measure what crossed each WAN link
//! and what each host sent, on the link itself rather than as the
//! applications report it. For every frame it counts:
//!
//! - `frame_bytes`: IP total length + 14 bytes of Ethernet header (what TBF and
//!   the interface counters count);
//! - `payload_bytes`: the transport payload, i.e. what the applications put on
//!   the wire (UDP payload, TCP segment data; the whole IP payload for other
//!   protocols), which includes Lowtide's own datagram headers, HTTP headers,
//!   retransmissions and control messages, and leaves out only the per-packet
//!   IP/UDP/TCP/Ethernet framing;
//! - `big_frames`: frames of at least 1000 bytes (bulk data, not ACKs or probes).
//!
//! Outgoing frames are seen after the interface's qdisc, when the device sends
//! them, so frames a TBF bottleneck dropped are not counted.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::stopping;
use crate::tap::{drops, open_proto, recv_frame};

/// Ethernet header bytes in front of every IP packet.
const ETH_HEADER: u64 = 14;
/// Frames at least this large carry bulk data.
const BIG_FRAME: u64 = 1000;
/// Most interfaces one counter watches (one thread each).
const IFACES_MAX: usize = 32;
/// Most distinct (direction, source, destination, protocol) keys kept per
/// interface; further keys are folded into 0.0.0.0 -> 0.0.0.0.
const KEYS_MAX: usize = 4096;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    outgoing: bool,
    src: u32,
    dst: u32,
    proto: u8,
}

#[derive(Default, Clone, Copy)]
struct Count {
    frames: u64,
    frame_bytes: u64,
    payload_bytes: u64,
    big_frames: u64,
}

#[derive(Default)]
struct IfaceCounts {
    flows: BTreeMap<Key, Count>,
    dropped: u64,
}

/// The transport payload of an IPv4 packet whose first bytes are `h`.
fn payload_of(h: &[u8]) -> Option<(Key, u64)> {
    if h.len() < 20 || h[0] >> 4 != 4 {
        return None;
    }
    let ihl = ((h[0] & 0x0f) as u64) * 4;
    let ip_len = u16::from_be_bytes([h[2], h[3]]) as u64;
    let proto = h[9];
    let frag_offset = u16::from_be_bytes([h[6], h[7]]) & 0x1fff;
    let l4_header = match proto {
        _ if frag_offset != 0 => 0,
        17 => 8,
        6 => {
            let at = ihl as usize + 12;
            if h.len() <= at {
                return None;
            }
            ((h[at] >> 4) as u64) * 4
        }
        _ => 0,
    };
    let key = Key {
        outgoing: false,
        src: u32::from_be_bytes([h[12], h[13], h[14], h[15]]),
        dst: u32::from_be_bytes([h[16], h[17], h[18], h[19]]),
        proto,
    };
    Some((key, ip_len.saturating_sub(ihl + l4_header)))
}

/// Every frame, both directions (outgoing frames reach only `ETH_P_ALL` sockets).
fn open(iface: &str) -> Result<crate::tap::Fd, String> {
    open_proto(iface, libc::ETH_P_ALL as u16)
}

fn watch(iface: String, counts: Arc<Mutex<IfaceCounts>>) -> Result<(), String> {
    let fd = open(&iface)?;
    let mut buf = [0u8; 128];
    while !stopping() {
        let (n, from) = match recv_frame(&fd, &mut buf) {
            Ok(r) => r,
            Err(e) => match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted => {
                    let d = drops(&fd) as u64;
                    counts.lock().unwrap_or_else(|p| p.into_inner()).dropped += d;
                    continue;
                }
                _ => return Err(format!("recvfrom on {iface}: {e}")),
            },
        };
        if from.sll_protocol != (libc::ETH_P_IP as u16).to_be() {
            continue;
        }
        let got = n.min(buf.len());
        let Some((mut key, payload)) = payload_of(&buf[..got]) else {
            continue;
        };
        key.outgoing = from.sll_pkttype == libc::PACKET_OUTGOING;
        let ip_len = u16::from_be_bytes([buf[2], buf[3]]) as u64;
        let frame = ip_len + ETH_HEADER;
        let mut c = counts.lock().unwrap_or_else(|p| p.into_inner());
        if c.flows.len() >= KEYS_MAX && !c.flows.contains_key(&key) {
            key = Key {
                outgoing: key.outgoing,
                src: 0,
                dst: 0,
                proto: 0,
            };
        }
        let e = c.flows.entry(key).or_default();
        e.frames += 1;
        e.frame_bytes += frame;
        e.payload_bytes += payload;
        if frame >= BIG_FRAME {
            e.big_frames += 1;
        }
    }
    let d = drops(&fd) as u64;
    counts.lock().unwrap_or_else(|p| p.into_inner()).dropped += d;
    Ok(())
}

fn to_json(ifaces: &[(String, Arc<Mutex<IfaceCounts>>)]) -> String {
    let mut s = String::from("{\"ifaces\":{");
    for (i, (name, counts)) in ifaces.iter().enumerate() {
        let c = counts.lock().unwrap_or_else(|p| p.into_inner());
        if i > 0 {
            s.push(',');
        }
        let _ = write!(s, "\"{name}\":{{\"dropped\":{},\"flows\":[", c.dropped);
        for (j, (k, v)) in c.flows.iter().enumerate() {
            if j > 0 {
                s.push(',');
            }
            let _ = write!(
                s,
                "{{\"dir\":\"{}\",\"src\":\"{}\",\"dst\":\"{}\",\"proto\":{},\"frames\":{},\"frame_bytes\":{},\"payload_bytes\":{},\"big_frames\":{}}}",
                if k.outgoing { "out" } else { "in" },
                Ipv4Addr::from(k.src),
                Ipv4Addr::from(k.dst),
                k.proto,
                v.frames,
                v.frame_bytes,
                v.payload_bytes,
                v.big_frames
            );
        }
        s.push_str("]}");
    }
    s.push_str("}}\n");
    s
}

/// Write `text` to `out` through a temporary file and a rename, so readers never see half a file.
fn write_atomic(out: &str, text: &str) -> Result<(), String> {
    let tmp = format!("{out}.tmp");
    std::fs::write(&tmp, text).map_err(|e| format!("{tmp}: {e}"))?;
    std::fs::rename(&tmp, out).map_err(|e| format!("{out}: {e}"))
}

pub fn count(ifaces: &str, every_ms: u64, out: &str) -> Result<(), String> {
    let names: Vec<String> = ifaces
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    if names.is_empty() || names.len() > IFACES_MAX {
        return Err(format!(
            "--iface takes 1 to {IFACES_MAX} comma-separated interface names"
        ));
    }
    if every_ms == 0 {
        return Err("--every-ms must be at least 1".to_owned());
    }
    let counts: Vec<(String, Arc<Mutex<IfaceCounts>>)> = names.iter().map(|n| (n.clone(), Arc::default())).collect();
    let mut threads = Vec::new();
    for (name, c) in &counts {
        // Open here so that a bad name fails at once, before anything is written.
        drop(open(name)?);
        let (name, c) = (name.clone(), c.clone());
        threads.push(std::thread::spawn(move || watch(name, c)));
    }
    write_atomic(out, &to_json(&counts))?;
    let mut waited_ms = 0;
    while !stopping() && threads.iter().all(|t| !t.is_finished()) {
        std::thread::sleep(Duration::from_millis(50));
        waited_ms += 50;
        if waited_ms >= every_ms {
            waited_ms = 0;
            write_atomic(out, &to_json(&counts))?;
        }
    }
    let mut first_err = None;
    for t in threads {
        if let Err(e) = t
            .join()
            .map_err(|_| "a counter thread panicked".to_owned())
            .and_then(|r| r)
        {
            first_err.get_or_insert(e);
        }
    }
    write_atomic(out, &to_json(&counts))?;
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4(proto: u8, total: u16, l4: &[u8]) -> Vec<u8> {
        let mut h = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, proto, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2];
        h[2..4].copy_from_slice(&total.to_be_bytes());
        h.extend_from_slice(l4);
        h
    }

    #[test]
    fn payload_of_udp_tcp_and_fragments() {
        let (k, p) = payload_of(&ipv4(17, 1500, &[0; 8])).unwrap();
        assert_eq!((k.proto, p), (17, 1472));
        assert_eq!(Ipv4Addr::from(k.src), Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(Ipv4Addr::from(k.dst), Ipv4Addr::new(10, 0, 0, 2));
        // TCP with a 32-byte header (data offset 8).
        let mut tcp = [0u8; 20];
        tcp[12] = 8 << 4;
        assert_eq!(payload_of(&ipv4(6, 1500, &tcp)).unwrap().1, 1448);
        // A non-first fragment has no transport header.
        let mut frag = ipv4(17, 1500, &[0; 8]);
        frag[7] = 1;
        assert_eq!(payload_of(&frag).unwrap().1, 1480);
        // Not IPv4, or too short: not counted.
        assert!(payload_of(&[0x60; 40]).is_none());
        assert!(payload_of(&[0x45; 10]).is_none());
    }
}
