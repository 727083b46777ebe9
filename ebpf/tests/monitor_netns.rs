#![cfg(feature = "bpf")]
//! The monitor against `tc -s qdisc` in network namespaces this test creates:
//! a veth pair between namespaces A and B, a very slow TBF on A's egress so
//! that the queue stands still while both are read, and UDP traffic sent from
//! inside A on an own port and another port.
//!
//! Needs root (network namespaces, BPF). Without root the tests print why and
//! pass, except under `CI=true`, where CI runs as root and not being root is a
//! failure.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use lowtide_ebpf::{EgressMonitor, Monitor, MonitorError, NetlinkMonitor, SampleSource, SMALL_PACKET_BYTES};
use lowtide_tests::netns::{is_root, run, unique};

/// Serialises the tests of this file: the detach check counts loaded programs.
static SERIAL: Mutex<()> = Mutex::new(());

const ADDR_A: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
const ADDR_B: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);
const MAC_B: &str = "02:00:0a:c9:00:02";
const OWN_PORT: u16 = 40_001;
const OTHER_PORT: u16 = 40_002;
const PAYLOAD_BYTES: usize = 1000;
/// Ethernet + IPv4 + UDP headers around each payload.
const FRAME_BYTES: u64 = PAYLOAD_BYTES as u64 + 14 + 20 + 8;
const OWN_DATAGRAMS: usize = 60;
const OTHER_DATAGRAMS: usize = 40;
/// 8 kbit/s: one frame leaves every ~1 s, so the queue stands still between
/// two reads. The byte limit holds ~28 frames; the rest is dropped.
const TBF: &[&str] = &["rate", "8kbit", "burst", "1600", "limit", "30000"];
/// Packets the kernel itself sends on a fresh link (one IGMPv3 membership
/// report of 54 bytes is seen; robustness allows a retransmission or two).
const KERNEL_NOISE_PACKETS_MAX: u64 = 4;
/// Polls while waiting for the qdisc to dequeue once more (not a timing assertion).
const WAIT_POLLS_MAX: u32 = 200;
const WAIT_POLL: Duration = Duration::from_millis(50);
/// What the tests need root for (see `is_root`).
const NEEDS: &str = "network namespaces, BPF programs";

/// Two namespaces joined by a veth pair; deleted on drop, even when a test fails.
struct Pair {
    a: String,
    b: String,
}

impl Pair {
    fn new() -> Self {
        Self::with_tx_queues(1)
    }

    /// `tx_queues` > 1 makes `va` multiqueue, so that it can take an `mq` root.
    fn with_tx_queues(tx_queues: u32) -> Self {
        let id = unique("");
        let pair = Self {
            a: format!("ltmon-a-{id}"),
            b: format!("ltmon-b-{id}"),
        };
        for ns in [&pair.a, &pair.b] {
            run(&["ip", "netns", "add", ns]);
            // No IPv6 neighbour discovery or MLD noise in the "other traffic" count.
            run(&[
                "ip",
                "netns",
                "exec",
                ns,
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.disable_ipv6=1",
            ]);
            run(&[
                "ip",
                "netns",
                "exec",
                ns,
                "sysctl",
                "-qw",
                "net.ipv6.conf.default.disable_ipv6=1",
            ]);
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        let queues = tx_queues.to_string();
        run(&[
            "ip",
            "-n",
            &pair.a,
            "link",
            "add",
            "va",
            "numtxqueues",
            &queues,
            "type",
            "veth",
            "peer",
            "name",
            "vb",
            "netns",
            &pair.b,
            "address",
            MAC_B,
        ]);
        run(&["ip", "-n", &pair.a, "addr", "add", &format!("{ADDR_A}/24"), "dev", "va"]);
        run(&["ip", "-n", &pair.b, "addr", "add", &format!("{ADDR_B}/24"), "dev", "vb"]);
        run(&["ip", "-n", &pair.a, "link", "set", "va", "up"]);
        run(&["ip", "-n", &pair.b, "link", "set", "vb", "up"]);
        // A permanent neighbour entry: no ARP request queues behind the slow TBF.
        run(&[
            "ip",
            "-n",
            &pair.a,
            "neigh",
            "replace",
            &ADDR_B.to_string(),
            "lladdr",
            MAC_B,
            "dev",
            "va",
            "nud",
            "permanent",
        ]);
        pair
    }

    fn tc_root_qdisc(&self) -> serde_json::Value {
        let out = run(&["tc", "-n", &self.a, "-s", "-j", "qdisc", "show", "dev", "va"]);
        let all: serde_json::Value = serde_json::from_str(&out).expect("tc -j prints JSON");
        all.as_array()
            .and_then(|qs| qs.iter().find(|q| q["root"] == true))
            .cloned()
            .unwrap_or_else(|| panic!("no root qdisc in {out}"))
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Runs `f` on a thread moved into network namespace `ns`.
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = File::open(format!("/var/run/netns/{ns}")).expect("open netns");
            // SAFETY: a valid netns fd; only this thread changes namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("netns thread panicked")
    })
}

/// Sends `count` datagrams from `port` as fast as the socket takes them;
/// returns how many the kernel accepted (never blocks).
fn blast(port: u16, count: usize) -> usize {
    blast_sized(port, count, PAYLOAD_BYTES)
}

fn blast_sized(port: u16, count: usize, payload_bytes: usize) -> usize {
    let socket = UdpSocket::bind(SocketAddr::from((ADDR_A, port))).expect("bind");
    socket.set_nonblocking(true).expect("nonblocking");
    let payload = vec![0x5au8; payload_bytes];
    (0..count)
        .filter(|_| socket.send_to(&payload, SocketAddr::from((ADDR_B, 9))).is_ok())
        .count()
}

fn json_u64(v: &serde_json::Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("tc JSON has no {key}: {v}"))
}

fn loaded(ids: &[u32]) -> usize {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| ids.contains(&p.id()))
        .count()
}

fn assert_close(what: &str, got: u64, want: u64, slack: u64) {
    assert!(
        got.abs_diff(want) <= slack,
        "{what}: monitor {got}, tc {want} (slack {slack})"
    );
}

#[test]
fn monitor_matches_tc_and_splits_own_traffic() {
    if !is_root(NEEDS) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pair = Pair::new();
    let mut tbf = vec!["tc", "-n", &pair.a, "qdisc", "add", "dev", "va", "root", "tbf"];
    tbf.extend_from_slice(TBF);
    run(&tbf);
    let program_ids = in_netns(&pair.a, || {
        let mut monitor = Monitor::attach_toward(IpAddr::V4(ADDR_B)).expect("attach the BPF monitor");
        assert_eq!(monitor.ifname(), "va");
        assert_eq!(monitor.netns_inode(), lowtide_ebpf::netns_inode().unwrap());
        monitor.add_own_port(OWN_PORT).unwrap();
        let mut netlink = NetlinkMonitor::attach_toward(IpAddr::V4(ADDR_B)).expect("netlink monitor");
        assert_eq!(netlink.ifname(), "va");
        let ids: Vec<u32> = monitor.program_costs().iter().map(|p| p.id).collect();
        assert_eq!(ids.len(), 3, "two tracepoints and the classifier");
        assert_eq!(loaded(&ids), 3);

        let idle = monitor.sample();
        assert_eq!(idle.backlog_source, SampleSource::Bpf);
        assert_eq!(idle.traffic.unwrap().own_packets, 0);

        // Interleave own and other traffic so both meet a full queue.
        let (mut own_sent, mut other_sent) = (0, 0);
        for _ in 0..10 {
            own_sent += blast(OWN_PORT, OWN_DATAGRAMS / 10);
            other_sent += blast(OTHER_PORT, OTHER_DATAGRAMS / 10);
        }
        assert!(own_sent > 0 && other_sent > 0, "the sockets took nothing");

        // A drop is published at the next enqueue or dequeue: wait for one dequeue.
        let dequeues = monitor.stats().dequeue_events;
        let mut polls = 0;
        while monitor.stats().dequeue_events == dequeues {
            polls += 1;
            assert!(polls < WAIT_POLLS_MAX, "the TBF never dequeued: {:?}", monitor.stats());
            std::thread::sleep(WAIT_POLL);
        }

        let bpf = monitor.sample();
        let tc = pair.tc_root_qdisc();
        let nl = netlink.sample().unwrap();
        let stats = monitor.stats();
        eprintln!("bpf {bpf:?}\nnetlink {nl:?}\ntc {tc}\nstats {stats:?}");

        assert_eq!(tc["kind"], "tbf");
        let tc_backlog_packets = json_u64(&tc, "qlen");
        let tc_backlog_bytes = json_u64(&tc, "backlog");
        let tc_drops = json_u64(&tc, "drops");
        assert!(tc_backlog_packets >= 10, "queue should stand: {tc}");
        assert!(tc_drops >= 10, "the byte limit should drop: {tc}");

        // Within a packet or two of tc (one frame may leave between the reads).
        assert_close("backlog packets", bpf.backlog_packets, tc_backlog_packets, 2);
        assert_close("backlog bytes", bpf.backlog_bytes, tc_backlog_bytes, 2 * FRAME_BYTES);
        assert_close("drops", bpf.drops, tc_drops, 2);
        assert_eq!(nl.backlog_source, SampleSource::Netlink);
        assert_close("netlink backlog packets", nl.backlog_packets, tc_backlog_packets, 2);
        assert_close(
            "netlink backlog bytes",
            nl.backlog_bytes,
            tc_backlog_bytes,
            2 * FRAME_BYTES,
        );
        assert_close("netlink drops", nl.drops, tc_drops, 2);
        assert_eq!(stats.qdisc_handle >> 16, {
            let h = tc["handle"].as_str().unwrap();
            u32::from_str_radix(h.trim_end_matches(':'), 16).unwrap()
        });
        assert!(!stats.qdisc_percpu && !stats.qdisc_child_seen, "{stats:?}");

        // Own vs other: the classifier sees every datagram the sockets accepted.
        let t = bpf.traffic.expect("BPF splits traffic");
        assert_eq!(t.own_packets, own_sent as u64);
        assert_eq!(t.own_bytes, own_sent as u64 * FRAME_BYTES);
        assert!(
            (other_sent as u64..=other_sent as u64 + KERNEL_NOISE_PACKETS_MAX).contains(&t.other_packets),
            "other packets {} for {other_sent} sent",
            t.other_packets
        );
        assert!(t.other_bytes >= other_sent as u64 * FRAME_BYTES);
        // The kernel's own small packets (IGMP) are counted apart from other traffic.
        assert!(t.small_packets <= KERNEL_NOISE_PACKETS_MAX, "{t:?}");
        // Everything handed to the device was sent, dropped or is queued.
        let accounted = json_u64(&tc, "packets") + tc_drops + tc_backlog_packets;
        assert_close(
            "handed vs sent+dropped+queued",
            t.own_packets + t.other_packets + t.small_packets,
            accounted,
            2,
        );

        // Small packets of other traffic (a download's TCP ACKs, DNS) are not counted as
        // other traffic, whose rate means "someone competes for the link": 40-byte
        // payloads are 82-byte frames, 1000-byte payloads are not small.
        let before = monitor.sample().traffic.unwrap();
        let small = blast_sized(OTHER_PORT, 3, 40);
        let at_limit = blast_sized(OTHER_PORT, 2, (SMALL_PACKET_BYTES - 42) as usize);
        let large = blast_sized(OTHER_PORT, 1, (SMALL_PACKET_BYTES - 41) as usize);
        let after = monitor.sample().traffic.unwrap();
        assert!(small + at_limit + large > 0, "the socket took nothing");
        // The kernel may add a small packet of its own (an IGMP report) meanwhile.
        let small_sent = (small + at_limit) as u64;
        let small_seen = after.small_packets - before.small_packets;
        assert!(
            (small_sent..=small_sent + KERNEL_NOISE_PACKETS_MAX).contains(&small_seen),
            "{small_seen} small packets seen for {small_sent} sent"
        );
        let small_bytes = small as u64 * 82 + at_limit as u64 * SMALL_PACKET_BYTES;
        let small_bytes_seen = after.small_bytes - before.small_bytes;
        assert!(
            (small_bytes..=small_bytes + KERNEL_NOISE_PACKETS_MAX * SMALL_PACKET_BYTES).contains(&small_bytes_seen),
            "{small_bytes_seen} small bytes seen for {small_bytes} sent"
        );
        assert_eq!(after.other_packets, before.other_packets + large as u64);

        // Ports can be unmarked; traffic from them then counts as other.
        monitor.remove_own_port(OWN_PORT).unwrap();
        monitor.remove_own_port(OWN_PORT).unwrap();
        let before = monitor.sample().traffic.unwrap();
        let extra = blast(OWN_PORT, 1);
        let after = monitor.sample().traffic.unwrap();
        assert_eq!(after.own_packets, before.own_packets);
        assert_eq!(after.other_packets, before.other_packets + extra as u64);
        drop(monitor);
        ids
    });

    // Dropping the monitor detached and unloaded its programs (the kernel
    // frees them after an RCU grace period).
    let mut polls = 0;
    while loaded(&program_ids) > 0 {
        polls += 1;
        assert!(
            polls < WAIT_POLLS_MAX,
            "programs {program_ids:?} still loaded after drop"
        );
        std::thread::sleep(WAIT_POLL);
    }
}

#[test]
fn attach_reports_missing_interface_and_route() {
    if !is_root(NEEDS) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pair = Pair::new();
    in_netns(&pair.a, || {
        let err = Monitor::attach("nosuch0").err().expect("no such interface");
        assert!(
            matches!(err, MonitorError::InterfaceNotFound { ref name, .. } if name == "nosuch0"),
            "{err}"
        );
        // Nothing routes 10.202.0.0/16 inside the namespace (no default route).
        let err = Monitor::attach_toward(IpAddr::V4(Ipv4Addr::new(10, 202, 0, 1)))
            .err()
            .expect("no route");
        assert!(matches!(err, MonitorError::NoRoute { .. }), "{err}");
        assert!(err.to_string().contains("ip route get"), "{err}");
        // With a route, the combined monitor gets BPF (we are root).
        let m = EgressMonitor::attach_toward(IpAddr::V4(ADDR_B)).unwrap();
        assert!(m.degraded().is_none(), "{:?}", m.degraded());
        assert_eq!(m.ifname(), "va");
    });
}

#[test]
fn multiqueue_root_backlog_comes_from_netlink() {
    if !is_root(NEEDS) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pair = Pair::with_tx_queues(2);
    run(&[
        "tc", "-n", &pair.a, "qdisc", "replace", "dev", "va", "root", "handle", "1:", "mq",
    ]);
    for child in ["1:1", "1:2"] {
        let mut tbf = vec![
            "tc", "-n", &pair.a, "qdisc", "replace", "dev", "va", "parent", child, "tbf",
        ];
        tbf.extend_from_slice(TBF);
        run(&tbf);
    }
    in_netns(&pair.a, || {
        let mut monitor = Monitor::attach("va").expect("attach");
        monitor.add_own_port(OWN_PORT).unwrap();
        let sent = blast(OWN_PORT, OWN_DATAGRAMS);
        assert!(monitor.stats().qdisc_child_seen, "{:?}", monitor.stats());
        let bpf = monitor.sample();
        let tc = pair.tc_root_qdisc();
        eprintln!("bpf {bpf:?}\ntc {tc}");
        assert_eq!(tc["kind"], "mq");
        // The queue figures are the mq totals, read through rtnetlink.
        assert_eq!(bpf.backlog_source, SampleSource::Netlink);
        let tc_backlog_packets = json_u64(&tc, "qlen");
        assert!(tc_backlog_packets >= 10, "queue should stand: {tc}");
        assert_close("backlog packets", bpf.backlog_packets, tc_backlog_packets, 2);
        assert_close(
            "backlog bytes",
            bpf.backlog_bytes,
            json_u64(&tc, "backlog"),
            2 * FRAME_BYTES,
        );
        assert_close("drops", bpf.drops, json_u64(&tc, "drops"), 2);
        // The classifier does not care what the qdisc is.
        assert_eq!(bpf.traffic.unwrap().own_packets, sent as u64);
    });
}

/// Clears capabilities from this thread's effective set (capabilities are
/// per thread; the permitted set is kept, other threads are unaffected).
fn drop_effective_capabilities(caps: &[u32]) {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget/capset with a v3 header and two data words, as the ABI requires.
    unsafe {
        assert_eq!(
            libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()),
            0,
            "capget"
        );
        for &cap in caps {
            data[(cap / 32) as usize].effective &= !(1 << (cap % 32));
        }
        assert_eq!(libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()), 0, "capset");
    }
}

#[test]
fn without_bpf_capabilities_the_monitor_falls_back_to_netlink() {
    if !is_root(NEEDS) {
        return;
    }
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pair = Pair::new();
    let mut tbf = vec!["tc", "-n", &pair.a, "qdisc", "add", "dev", "va", "root", "tbf"];
    tbf.extend_from_slice(TBF);
    run(&tbf);
    in_netns(&pair.a, || {
        drop_effective_capabilities(&[CAP_SYS_ADMIN, CAP_BPF, CAP_PERFMON]);
        let err = Monitor::attach("va").err().expect("no BPF without CAP_BPF");
        assert!(
            matches!(&err, MonitorError::NotPermitted { missing } if missing.contains("CAP_BPF") && missing.contains("CAP_PERFMON")),
            "{err}"
        );
        let mut monitor = EgressMonitor::attach_toward(IpAddr::V4(ADDR_B)).expect("the netlink fallback");
        assert!(
            matches!(monitor.degraded(), Some(MonitorError::NotPermitted { .. })),
            "{:?}",
            monitor.degraded().map(ToString::to_string)
        );
        monitor.add_own_port(OWN_PORT).expect("a no-op without BPF");
        blast(OWN_PORT, OWN_DATAGRAMS);
        let s = monitor.sample().expect("netlink sample");
        let tc = pair.tc_root_qdisc();
        assert_eq!(s.backlog_source, SampleSource::Netlink);
        assert_eq!(s.traffic, None, "no split without the classifier");
        let tc_backlog_packets = json_u64(&tc, "qlen");
        assert!(tc_backlog_packets >= 10, "queue should stand: {tc}");
        assert_close("backlog packets", s.backlog_packets, tc_backlog_packets, 2);
        assert_close("drops", s.drops, json_u64(&tc, "drops"), 2);
    });
}
