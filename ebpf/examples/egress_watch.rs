//! Prints what the egress monitor sees, one line per interval:
//!
//! `egress_watch [--netns NAME] (--peer IP | --iface NAME) [--own-port P]...
//!               [--interval-ms 100] [--count N] [--netlink] [--compare]`
//!
//! With `--netns` the watcher moves into `/var/run/netns/NAME` first (as
//! `ip netns exec` would, without remounting /sys). `--netlink` forces the
//! fallback monitor; `--compare` adds the netlink figures read right after each
//! sample (what `tc -s qdisc` shows). Without `--count` it runs until interrupted.

use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use lowtide_ebpf::{EgressMonitor, EgressSample, MonitorError, NetlinkMonitor};

const USAGE: &str = "usage: egress_watch [--netns NAME] (--peer IP | --iface NAME) [--own-port P]... \
[--interval-ms 100] [--count N] [--netlink] [--compare]";

#[derive(Default)]
struct Args {
    netns: Option<String>,
    peer: Option<IpAddr>,
    iface: Option<String>,
    own_ports: Vec<u16>,
    interval: Duration,
    count: Option<u64>,
    netlink: bool,
    compare: bool,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        interval: Duration::from_millis(100),
        ..Args::default()
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--netlink" || flag == "--compare" {
            a.netlink |= flag == "--netlink";
            a.compare |= flag == "--compare";
            continue;
        }
        let v = it.next().ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {v}: {e}");
        match flag.as_str() {
            "--netns" => a.netns = Some(v),
            "--peer" => a.peer = Some(v.parse().map_err(|e| bad(&e))?),
            "--iface" => a.iface = Some(v),
            "--own-port" => a.own_ports.push(v.parse().map_err(|e| bad(&e))?),
            "--interval-ms" => a.interval = Duration::from_millis(v.parse().map_err(|e| bad(&e))?),
            "--count" => a.count = Some(v.parse().map_err(|e| bad(&e))?),
            _ => return Err(format!("unknown option {flag}\n{USAGE}")),
        }
    }
    if a.peer.is_none() == a.iface.is_none() {
        return Err(format!("give one of --peer and --iface\n{USAGE}"));
    }
    Ok(a)
}

fn attach(a: &Args) -> Result<EgressMonitor, MonitorError> {
    if a.netlink {
        let monitor = match (a.peer, &a.iface) {
            (Some(peer), _) => NetlinkMonitor::attach_toward(peer)?,
            (None, Some(iface)) => NetlinkMonitor::attach(iface)?,
            (None, None) => unreachable!("checked in parse"),
        };
        return Ok(EgressMonitor::Netlink {
            monitor,
            why: MonitorError::NotPermitted {
                missing: "nothing (--netlink given)".into(),
            },
        });
    }
    match (a.peer, &a.iface) {
        (Some(peer), _) => EgressMonitor::attach_toward(peer),
        (None, Some(iface)) => EgressMonitor::attach(iface),
        (None, None) => unreachable!("checked in parse"),
    }
}

#[expect(clippy::disallowed_methods, reason = "a command-line tool that paces its own output")]
fn now() -> Instant {
    Instant::now()
}

fn main() -> Result<(), String> {
    let a = parse()?;
    if let Some(ns) = &a.netns {
        let f = File::open(format!("/var/run/netns/{ns}")).map_err(|e| format!("netns {ns}: {e}"))?;
        // SAFETY: a valid netns fd; the process has one thread here.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!("setns {ns}: {}", std::io::Error::last_os_error()));
        }
    }
    let mut m = attach(&a).map_err(|e| e.to_string())?;
    for p in &a.own_ports {
        m.add_own_port(*p).map_err(|e| e.to_string())?;
    }
    match m.degraded() {
        None => eprintln!("watching {} with BPF", m.ifname()),
        Some(why) => eprintln!("watching {} through netlink: {why}", m.ifname()),
    }
    // --compare: a netlink read right after each BPF sample, as `tc -s` would see it.
    let mut compare = match a.compare {
        true => Some(NetlinkMonitor::attach(m.ifname()).map_err(|e| e.to_string())?),
        false => None,
    };
    println!(
        "{:>8} {:>10} {:>6} {:>8} {:>10} {:>10} {:>10} {:>6} {:>8}",
        "t_ms", "backlog_B", "pkts", "drops", "own_Mbps", "other_Mbps", "nl_bkl_B", "nl_pkt", "nl_drops"
    );
    let start = now();
    let mut last: Option<(Instant, EgressSample)> = None;
    let mut n = 0u64;
    while a.count.is_none_or(|c| n < c) {
        let t = now();
        let s = m.sample().map_err(|e| e.to_string())?;
        let nl = match &mut compare {
            Some(c) => Some(c.sample().map_err(|e| e.to_string())?),
            None => None,
        };
        let nl_col = |f: fn(&EgressSample) -> u64| nl.as_ref().map_or("-".into(), |n| f(n).to_string());
        let rate = |f: fn(&EgressSample) -> u64| match (&last, s.traffic) {
            (Some((t0, s0)), Some(_)) => {
                let secs = t.duration_since(*t0).as_secs_f64().max(1e-9);
                format!("{:.2}", (f(&s) - f(s0)) as f64 * 8.0 / secs / 1e6)
            }
            _ => "-".into(),
        };
        println!(
            "{:>8} {:>10} {:>6} {:>8} {:>10} {:>10} {:>10} {:>6} {:>8}",
            t.duration_since(start).as_millis(),
            s.backlog_bytes,
            s.backlog_packets,
            s.drops,
            rate(|s| s.traffic.map_or(0, |t| t.own_bytes)),
            rate(|s| s.traffic.map_or(0, |t| t.other_bytes)),
            nl_col(|n| n.backlog_bytes),
            nl_col(|n| n.backlog_packets),
            nl_col(|n| n.drops),
        );
        last = Some((t, s));
        n += 1;
        std::thread::sleep(a.interval);
    }
    Ok(())
}
