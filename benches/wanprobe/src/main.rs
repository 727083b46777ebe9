//! `lowtide-wanprobe`: measurement helpers for `scripts/bench-wan.sh`.
//!
//! - `echo --listen IP:PORT`: UDP echo server (returns every datagram to its sender).
//! - `probe --to IP:PORT [--interval-ms 10] --out FILE`: sends a small datagram every
//!   interval and writes `send_realtime_ns,rtt_us` per probe (`rtt_us` = -1 when no
//!   reply came within 2 s). RTT = kernel receive timestamp of the reply − send time,
//!   less the echo's hold time, which the echo appends (see `probe.rs`).
//! - `tap --iface IF [--bin-ms 10] --out FILE`: counts the IPv4 frames arriving on IF
//!   (AF_PACKET, outgoing frames ignored) per time bin and per flow, and writes
//!   `bin_start_realtime_ns,src,proto,sport,dport,bytes,frames,big_frames` where
//!   `bytes` are frame bytes as TBF counts them (IP total length + 14 bytes of
//!   Ethernet header) and `big_frames` counts frames of at least 1000 bytes.
//! - `count --iface IF[,IF...] [--every-ms 1000] --out FILE.json`: counts the IPv4
//!   frames on each IF in both directions per (direction, source, destination,
//!   protocol): frames, frame bytes, transport payload bytes, big frames; rewrites
//!   FILE.json every interval and on exit (see `count.rs`).
//!
//! All run until SIGINT/SIGTERM and flush their file on exit.

mod count;
mod probe;
mod tap;

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

pub(crate) static STOP: AtomicBool = AtomicBool::new(false);

const USAGE: &str = "usage: lowtide-wanprobe echo --listen IP:PORT\n\
       lowtide-wanprobe probe --to IP:PORT [--interval-ms 10] --out FILE\n\
       lowtide-wanprobe tap --iface IF [--bin-ms 10] --out FILE\n\
       lowtide-wanprobe count --iface IF[,IF...] [--every-ms 1000] --out FILE.json\n\
Each runs until SIGINT/SIGTERM.";

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// `--flag value` pairs after the subcommand.
fn options(args: &[String]) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Err(USAGE.to_owned());
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        out.push((flag.clone(), value.clone()));
    }
    Ok(out)
}

fn get<'a>(opts: &'a [(String, String)], name: &str) -> Option<&'a str> {
    opts.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn required<'a>(opts: &'a [(String, String)], name: &str) -> Result<&'a str, String> {
    get(opts, name).ok_or_else(|| format!("{name} is required\n{USAGE}"))
}

fn number(opts: &[(String, String)], name: &str, default: u64) -> Result<u64, String> {
    match get(opts, name) {
        None => Ok(default),
        Some(v) => v.parse().map_err(|e| format!("{name} {v}: {e}")),
    }
}

fn check_known(opts: &[(String, String)], known: &[&str]) -> Result<(), String> {
    for (k, _) in opts {
        if !known.contains(&k.as_str()) {
            return Err(format!("unknown option {k}\n{USAGE}"));
        }
    }
    Ok(())
}

fn run(args: &[String]) -> Result<(), String> {
    let (cmd, rest) = args.split_first().ok_or_else(|| USAGE.to_owned())?;
    let opts = options(rest)?;
    match cmd.as_str() {
        "echo" => {
            check_known(&opts, &["--listen"])?;
            probe::echo(required(&opts, "--listen")?)
        }
        "probe" => {
            check_known(&opts, &["--to", "--interval-ms", "--out"])?;
            probe::probe(
                required(&opts, "--to")?,
                number(&opts, "--interval-ms", 10)?,
                required(&opts, "--out")?,
            )
        }
        "tap" => {
            check_known(&opts, &["--iface", "--bin-ms", "--out"])?;
            tap::tap(
                required(&opts, "--iface")?,
                number(&opts, "--bin-ms", 10)?,
                required(&opts, "--out")?,
            )
        }
        "count" => {
            check_known(&opts, &["--iface", "--every-ms", "--out"])?;
            count::count(
                required(&opts, "--iface")?,
                number(&opts, "--every-ms", 1000)?,
                required(&opts, "--out")?,
            )
        }
        _ => Err(USAGE.to_owned()),
    }
}

fn main() -> ExitCode {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("lowtide-wanprobe: {msg}");
            ExitCode::from(2)
        }
    }
}

/// Nanoseconds on `clock` (`CLOCK_REALTIME` to line files up, `CLOCK_MONOTONIC` for intervals).
pub(crate) fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe {
        libc::clock_gettime(clock, &mut ts);
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub(crate) fn stopping() -> bool {
    STOP.load(Ordering::Relaxed)
}
