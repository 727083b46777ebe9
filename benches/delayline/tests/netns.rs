//! The delay line and the testbed script in network namespaces these tests
//! create (and always delete). Needs root; without it the tests print why and
//! pass, except under `CI=true`, where not being root is a failure.
//!
//! No wall-clock assertions: the one figure checked is a lower bound the
//! delay line guarantees by construction (no frame leaves before its release
//! time), so a slow machine cannot make it fail.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use lowtide_tests::netns::{is_root, run, unique};

const DELAY_US: u64 = 5_000;
const PINGS: &str = "5";
/// Polls (of 0.1 s) while waiting for the bridge to pass a first ping.
const READY_POLLS_MAX: u32 = 50;
/// What the tests need root for (see `is_root`).
const NEEDS: &str = "network namespaces, AF_PACKET";

fn netns_exists(name: &str) -> bool {
    run(&["ip", "netns", "list"])
        .lines()
        .any(|l| l.split_whitespace().next() == Some(name))
}

/// Namespaces `l`, `d`, `r`: l.eth0 — d.dly-a [delay line] d.dly-b — r.eth0.
/// Drop stops the delay line and deletes the namespaces, even on failure.
struct Bridge {
    names: [String; 3],
    child: Option<Child>,
}

impl Bridge {
    fn new() -> Self {
        let base = unique("ltdl-");
        let mut b = Self {
            names: [format!("{base}-l"), format!("{base}-d"), format!("{base}-r")],
            child: None,
        };
        for ns in &b.names {
            run(&["ip", "netns", "add", ns]);
            run(&[
                "ip",
                "netns",
                "exec",
                ns,
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.disable_ipv6=1",
            ]);
        }
        let [l, d, r] = &b.names;
        run(&[
            "ip", "-n", l, "link", "add", "eth0", "type", "veth", "peer", "name", "dly-a", "netns", d,
        ]);
        run(&[
            "ip", "-n", r, "link", "add", "eth0", "type", "veth", "peer", "name", "dly-b", "netns", d,
        ]);
        run(&["ip", "-n", l, "addr", "add", "10.203.0.1/24", "dev", "eth0"]);
        run(&["ip", "-n", r, "addr", "add", "10.203.0.2/24", "dev", "eth0"]);
        for (ns, dev) in [(l, "eth0"), (d, "dly-a"), (d, "dly-b"), (r, "eth0")] {
            run(&["ip", "-n", ns, "link", "set", dev, "up"]);
        }
        let child = Command::new("ip")
            .args(["netns", "exec", d, env!("CARGO_BIN_EXE_lowtide-delayline")])
            .args([
                "--if-a",
                "dly-a",
                "--if-b",
                "dly-b",
                "--delay-us",
                &DELAY_US.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the delay line");
        b.child = Some(child);
        b
    }

    /// Stops the delay line with SIGTERM and returns what it printed.
    fn stop(&mut self) -> String {
        let child = self.child.take().expect("running");
        // SAFETY: signals our own child process by its id.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let out = child.wait_with_output().expect("wait for the delay line");
        assert!(out.status.success(), "delay line exit {:?}", out.status);
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in &self.names {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// `rtt min/avg/max/mdev = a/b/c/d ms` → a.
fn ping_min_ms(output: &str) -> f64 {
    let line = output
        .lines()
        .find(|l| l.contains("min/avg/max"))
        .expect("ping summary");
    let values = line.split('=').nth(1).expect("values").trim();
    values.split('/').next().unwrap().parse().expect("min rtt")
}

#[test]
fn bridge_forwards_both_ways_and_never_early() {
    if !is_root(NEEDS) {
        return;
    }
    let mut bridge = Bridge::new();
    let l = bridge.names[0].clone();
    // The first ping also carries ARP through the bridge; wait until one passes.
    let mut polls = 0;
    while !Command::new("ip")
        .args(["netns", "exec", &l, "ping", "-c1", "-W1", "-q", "10.203.0.2"])
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success()
    {
        polls += 1;
        assert!(polls < READY_POLLS_MAX, "nothing passes the delay line");
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = run(&[
        "ip",
        "netns",
        "exec",
        &l,
        "ping",
        "-c",
        PINGS,
        "-i",
        "0.2",
        "10.203.0.2",
    ]);
    assert!(out.contains(&format!("{PINGS} received")), "{out}");
    let min_ms = ping_min_ms(&out);
    let floor_ms = 2.0 * DELAY_US as f64 / 1000.0;
    assert!(
        min_ms >= floor_ms,
        "a frame left early: rtt min {min_ms} ms < {floor_ms} ms"
    );
    eprintln!("rtt min {min_ms} ms for {floor_ms} ms configured");

    let report = bridge.stop();
    for dir in ["dly-a->dly-b", "dly-b->dly-a"] {
        let line = report
            .lines()
            .find(|l| l.contains(&format!("delayline {dir}:")))
            .unwrap_or_else(|| panic!("no report for {dir}: {report}"));
        let forwarded: u64 = line
            .split_whitespace()
            .skip_while(|w| *w != "forwarded")
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no count in {line}"));
        assert!(forwarded > PINGS.parse::<u64>().unwrap(), "{line}");
        assert!(
            line.contains("dropped_full 0") && line.contains("send_errors 0"),
            "{line}"
        );
    }
}

fn wan_sh() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/testbed/wan.sh")
}

fn wan_run(name: &str, command: &str) -> std::process::Output {
    Command::new(wan_sh())
        .args([
            "run",
            "--name",
            name,
            "--rate",
            "10mbit",
            "--rtt-ms",
            "20",
            "--senders",
            "2",
            "--",
        ])
        .args(["sh", "-c", command])
        .env("LOWTIDE_DELAYLINE", env!("CARGO_BIN_EXE_lowtide-delayline"))
        .output()
        .expect("run wan.sh")
}

#[test]
fn testbed_runs_a_command_and_always_tears_down() {
    if !is_root(NEEDS) {
        return;
    }
    let name = unique("ltwt");
    // Both senders reach the receiver through router, TBF and delay line;
    // the TBF sits where --bottleneck router puts it.
    let out = wan_run(
        &name,
        "ip netns exec $LT_NS_SND ping -c2 -i0.2 -q $LT_ADDR_RCV && \
         ip netns exec $LT_NS_SND2 ping -c2 -i0.2 -q $LT_ADDR_RCV && \
         ip netns exec $LT_BOTTLENECK_NS tc qdisc show dev $LT_BOTTLENECK_DEV",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.contains("qdisc tbf") && stdout.contains("rate 10Mbit"),
        "{stdout}"
    );
    for suffix in ["snd", "snd2", "rtr", "dly", "rcv"] {
        assert!(
            !netns_exists(&format!("{name}-{suffix}")),
            "{name}-{suffix} left behind"
        );
    }

    // A failing command: its status comes back and nothing is left behind.
    let name = unique("ltwt");
    let out = wan_run(&name, "exit 3");
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    for suffix in ["snd", "rtr", "dly", "rcv"] {
        assert!(
            !netns_exists(&format!("{name}-{suffix}")),
            "{name}-{suffix} left behind"
        );
    }
}
