//! `lowtide-delayline --if-a A --if-b B --delay-us N`: bridges A and B,
//! delaying every frame by N µs each way, until SIGINT or SIGTERM; then prints
//! what each direction did on stderr.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lowtide_delayline::bridge::{self, Direction};
use lowtide_delayline::queue::QueueLimits;

static STOP: AtomicBool = AtomicBool::new(false);

const USAGE: &str = "usage: lowtide-delayline --if-a IFACE --if-b IFACE --delay-us N \
[--delay-b-to-a-us N] [--queue-frames-max N] [--queue-bytes-max N]\n\
Bridges IFACE A and B (AF_PACKET, promiscuous), holding every frame N µs in each\n\
direction (A→B and, unless --delay-b-to-a-us is given, B→A). Runs until SIGINT/SIGTERM.";

struct Args {
    if_a: String,
    if_b: String,
    delay_ab: Duration,
    delay_ba: Duration,
    limits: QueueLimits,
}

fn parse_args() -> Result<Args, String> {
    let mut if_a = None;
    let mut if_b = None;
    let mut delay_ab = None;
    let mut delay_ba = None;
    let mut limits = QueueLimits::default();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "-h" || flag == "--help" {
            return Err(USAGE.to_owned());
        }
        let value = args.next().ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let number = || value.parse::<u64>().map_err(|e| format!("{flag} {value}: {e}"));
        match flag.as_str() {
            "--if-a" => if_a = Some(value.clone()),
            "--if-b" => if_b = Some(value.clone()),
            "--delay-us" => delay_ab = Some(Duration::from_micros(number()?)),
            "--delay-b-to-a-us" => delay_ba = Some(Duration::from_micros(number()?)),
            "--queue-frames-max" => limits.frames_max = number()? as usize,
            "--queue-bytes-max" => limits.bytes_max = number()? as usize,
            _ => return Err(format!("unknown option {flag}\n{USAGE}")),
        }
    }
    let delay_ab = delay_ab.ok_or_else(|| format!("--delay-us is required\n{USAGE}"))?;
    Ok(Args {
        if_a: if_a.ok_or_else(|| format!("--if-a is required\n{USAGE}"))?,
        if_b: if_b.ok_or_else(|| format!("--if-b is required\n{USAGE}"))?,
        delay_ab,
        delay_ba: delay_ba.unwrap_or(delay_ab),
        limits,
    })
}

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
    let directions = [
        Direction {
            name: format!("{}->{}", args.if_a, args.if_b),
            from: args.if_a.clone(),
            to: args.if_b.clone(),
            delay: args.delay_ab,
            limits: args.limits,
        },
        Direction {
            name: format!("{}->{}", args.if_b, args.if_a),
            from: args.if_b.clone(),
            to: args.if_a.clone(),
            delay: args.delay_ba,
            limits: args.limits,
        },
    ];
    eprintln!(
        "delayline: {} <-> {}, delay {} µs / {} µs, queue max {} frames / {} bytes",
        args.if_a,
        args.if_b,
        args.delay_ab.as_micros(),
        args.delay_ba.as_micros(),
        args.limits.frames_max,
        args.limits.bytes_max
    );
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = directions
            .iter()
            .map(|d| {
                s.spawn(move || {
                    let r = bridge::run(d, &STOP);
                    // One direction failing stops the other: a half bridge misleads.
                    STOP.store(true, Ordering::Relaxed);
                    r
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join()).collect()
    });
    let mut code = ExitCode::SUCCESS;
    for (d, r) in directions.iter().zip(results) {
        match r {
            Ok(Ok(s)) => eprintln!(
                "delayline {}: received {} forwarded {} dropped_full {} dropped_oversize {} send_errors {} unstamped {}",
                d.name, s.received, s.forwarded, s.dropped_full, s.dropped_oversize, s.send_errors, s.unstamped
            ),
            Ok(Err(e)) => {
                eprintln!("delayline {}: {e}", d.name);
                code = ExitCode::FAILURE;
            }
            Err(_) => {
                eprintln!("delayline {}: thread panicked", d.name);
                code = ExitCode::FAILURE;
            }
        }
    }
    code
}
