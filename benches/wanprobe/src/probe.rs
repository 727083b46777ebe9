//! UDP echo server and the latency probe that talks to it.

use std::io::{BufWriter, ErrorKind, Write};
use std::net::UdpSocket;
use std::time::Duration;

use crate::{clock_ns, stopping};

/// Probe datagram: sequence number and monotonic send time, 8 bytes each.
const PROBE_LEN: usize = 16;
/// A reply later than this counts as lost.
const LOST_AFTER_NS: u64 = 2_000_000_000;
/// Longest sleep between checks of the stop flag.
const POLL_MAX: Duration = Duration::from_millis(100);

pub fn echo(listen: &str) -> Result<(), String> {
    let sock = UdpSocket::bind(listen).map_err(|e| format!("bind {listen}: {e}"))?;
    sock.set_read_timeout(Some(POLL_MAX)).map_err(|e| e.to_string())?;
    let mut buf = [0u8; 2048];
    let mut echoed = 0u64;
    while !stopping() {
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                if sock.send_to(&buf[..n], from).is_ok() {
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
        match sock.recv(&mut buf) {
            Ok(n) if n == PROBE_LEN => {
                let recv = clock_ns(libc::CLOCK_MONOTONIC);
                let seq = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes")) as usize;
                let sent_mono = u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes"));
                let rtt_ns = recv.saturating_sub(sent_mono);
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
