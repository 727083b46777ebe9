//! Costs of the egress monitor, measured in one run (needs root; prints why
//! and exits otherwise):
//!
//! - kernel side, per event: run time / run count of each BPF program while
//!   UDP datagrams cross a TBF on a veth in namespaces made here (BPF run-time
//!   statistics are enabled for the duration);
//! - user side, per sample: `Monitor::sample` (mmapped map, no syscall)
//!   against `NetlinkMonitor::sample` (one RTM_GETQDISC round trip).
//!
//! `cargo bench -p lowtide-ebpf --bench monitor`

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::Duration;

use criterion::{black_box, Criterion};
use lowtide_ebpf::{Monitor, NetlinkMonitor};

const ADDR_A: Ipv4Addr = Ipv4Addr::new(10, 204, 0, 1);
const ADDR_B: Ipv4Addr = Ipv4Addr::new(10, 204, 0, 2);
const OWN_PORT: u16 = 41_001;
const OTHER_PORT: u16 = 41_002;
const DATAGRAMS: usize = 200_000;
const PAYLOAD_BYTES: usize = 1200;

fn run(args: &[&str]) {
    let status = Command::new(args[0]).args(&args[1..]).status().expect("spawn");
    assert!(status.success(), "{args:?} failed");
}

/// Deletes the namespaces on drop, also when the bench panics.
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn setup() -> Namespaces {
    let a = format!("ltbench-a-{}", std::process::id());
    let b = format!("ltbench-b-{}", std::process::id());
    let guard = Namespaces(vec![a.clone(), b.clone()]);
    for ns in [&a, &b] {
        run(&["ip", "netns", "add", ns]);
    }
    run(&[
        "ip", "-n", &a, "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", &b,
    ]);
    run(&["ip", "-n", &a, "addr", "add", &format!("{ADDR_A}/24"), "dev", "va"]);
    run(&["ip", "-n", &b, "addr", "add", &format!("{ADDR_B}/24"), "dev", "vb"]);
    run(&["ip", "-n", &a, "link", "set", "va", "up"]);
    run(&["ip", "-n", &b, "link", "set", "vb", "up"]);
    run(&[
        "tc", "-n", &a, "qdisc", "add", "dev", "va", "root", "tbf", "rate", "1gbit", "burst", "200000", "limit",
        "1000000",
    ]);
    // This thread (and every thread it starts) now lives in namespace a.
    let file = File::open(format!("/var/run/netns/{a}")).expect("open netns");
    // SAFETY: a valid netns fd.
    assert_eq!(unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns");
    guard
}

fn blast(port: u16, count: usize) {
    let socket = UdpSocket::bind(SocketAddr::from((ADDR_A, port))).expect("bind");
    let payload = [0u8; PAYLOAD_BYTES];
    for _ in 0..count {
        let _ = socket.send_to(&payload, SocketAddr::from((ADDR_B, 9)));
    }
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("monitor bench skipped: needs root (network namespaces, BPF)");
        return;
    }
    let _namespaces = setup();
    let mut monitor = Monitor::attach_toward(IpAddr::V4(ADDR_B)).expect("attach");
    monitor.add_own_port(OWN_PORT).expect("own port");
    let mut netlink = NetlinkMonitor::attach_toward(IpAddr::V4(ADDR_B)).expect("netlink");

    {
        let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("enable BPF stats");
        blast(OWN_PORT, DATAGRAMS / 2);
        blast(OTHER_PORT, DATAGRAMS / 2);
        std::thread::sleep(Duration::from_millis(200)); // let the TBF drain
        println!("per-event cost of the BPF programs ({DATAGRAMS} datagrams of {PAYLOAD_BYTES} B):");
        for cost in monitor.program_costs() {
            let per = cost.run_time_ns as f64 / cost.run_count.max(1) as f64;
            println!("  {:<20} {:>8} runs  {:>7.1} ns/run", cost.name, cost.run_count, per);
        }
        let s = monitor.sample();
        println!("  sample after the run: {s:?}");
    }

    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    c.bench_function("sample/bpf_mmap", |b| b.iter(|| black_box(monitor.sample())));
    c.bench_function("sample/netlink", |b| b.iter(|| black_box(netlink.sample().unwrap())));
    c.final_summary();
}
