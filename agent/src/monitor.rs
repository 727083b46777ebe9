//! The egress monitor of a running agent, and pause-when-busy.
//!
//! At start, before any other thread exists, [`setup`] attaches the egress
//! monitor ([`PathWatch`]: eBPF, or rtnetlink when BPF cannot be loaded) to
//! the interfaces named in `monitor_interfaces`, or to the interface toward
//! the server, then drops the capabilities only loading BPF needed
//! ([`drop_capabilities`]). The engine thread samples it every few
//! milliseconds ([`EgressWatch::tick`]): the figures go to the background
//! sessions' controllers (`Endpoint::on_path_signal`), and when other traffic
//! leaving the interface exceeds `busy_other_kbit`, serving background
//! transfers pauses ([`BusyPolicy`]) until it has stayed below half of that
//! for `busy_resume_secs`. Peers that ask for the background protocol through
//! an interface not watched yet get one watched then (with rtnetlink, since
//! the capabilities are gone by then; the log says so).
//!
//! A pause set by the operator (`lowtide-agent pause`) and a pause because the
//! link is busy are kept apart; background serving runs only when neither holds.

use std::net::{IpAddr, ToSocketAddrs};
use std::time::Duration;

use lowtide_ebpf::watch::{MonitorMode, PathWatch, WatchedView, SAMPLE_INTERVAL};
use lowtide_engine::cc::background::PathSignal;
use lowtide_engine::endpoint::Endpoint;
use lowtide_engine::time::Time;
use serde::Serialize;

use crate::config::Config;

/// Pause background serving while other traffic is above a threshold.
#[derive(Debug, Clone)]
pub struct BusyPolicy {
    /// Other traffic above this (bytes/s) means busy; 0: never pause.
    pub other_bytes_per_s_busy: u64,
    /// Resume once other traffic has stayed below half the threshold this long.
    pub resume_after: Duration,
    busy: bool,
    quiet_since: Option<Time>,
    pauses: u64,
}

impl BusyPolicy {
    pub fn new(other_bytes_per_s_busy: u64, resume_after: Duration) -> Self {
        Self {
            other_bytes_per_s_busy,
            resume_after,
            busy: false,
            quiet_since: None,
            pauses: 0,
        }
    }

    pub fn is_busy(&self) -> bool {
        self.busy
    }

    /// Times the link was found busy since start.
    pub fn pauses(&self) -> u64 {
        self.pauses
    }

    /// Takes one monitor sample; returns the new state when it changes.
    pub fn update(&mut self, now: Time, signal: &PathSignal) -> Option<bool> {
        let limit = self.other_bytes_per_s_busy;
        if limit == 0 {
            return None;
        }
        if signal.other_bytes_per_s > limit {
            self.quiet_since = None;
            if !self.busy {
                self.busy = true;
                self.pauses += 1;
                return Some(true);
            }
        } else if self.busy && signal.other_bytes_per_s <= limit / 2 {
            let since = *self.quiet_since.get_or_insert(now);
            if now.since(since) >= self.resume_after {
                self.busy = false;
                self.quiet_since = None;
                return Some(false);
            }
        } else {
            self.quiet_since = None;
        }
        None
    }
}

/// What `status` and `/metrics` show about the monitor and the pauses.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MonitorView {
    pub mode: String,
    pub interfaces: Vec<InterfaceView>,
    /// Paused by `lowtide-agent pause`.
    pub paused_by_operator: bool,
    /// Paused because other traffic exceeds `busy_other_kbit`.
    pub paused_busy: bool,
    pub busy_pauses: u64,
    pub busy_other_bytes_per_s: u64,
    /// Capabilities dropped after attaching, e.g. ["CAP_BPF", ...].
    pub capabilities_dropped: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct InterfaceView {
    pub name: String,
    /// "ebpf" or "netlink".
    pub kind: &'static str,
    pub degraded: Option<String>,
    pub backlog_bytes: u64,
    pub other_bytes_per_s: Option<u64>,
}

impl From<WatchedView> for InterfaceView {
    fn from(w: WatchedView) -> Self {
        Self {
            name: w.ifname,
            kind: w.kind,
            degraded: w.degraded,
            backlog_bytes: w.backlog_bytes,
            other_bytes_per_s: w.other_bytes_per_s,
        }
    }
}

/// The monitor, the pause state and the sampling clock, owned by the engine thread.
pub struct EgressWatch {
    watch: PathWatch,
    busy: BusyPolicy,
    operator_paused: bool,
    next_sample: Time,
    capabilities_dropped: Vec<String>,
}

impl EgressWatch {
    pub fn new(watch: PathWatch, busy: BusyPolicy, capabilities_dropped: Vec<String>) -> Self {
        Self {
            watch,
            busy,
            operator_paused: false,
            next_sample: Time::ZERO,
            capabilities_dropped,
        }
    }

    /// Marks the endpoint's UDP port as Lowtide's own (needed when it was only known after binding).
    pub fn add_own_port(&mut self, port: u16) {
        if let Err(e) = self.watch.add_own_port(port) {
            tracing::warn!(
                "egress monitor: cannot mark UDP port {port} as Lowtide's: {e}; its traffic counts as other traffic"
            );
        }
    }

    /// How long the engine loop may wait before the next sample is due.
    pub fn wait_max(&self, default: Duration) -> Duration {
        if self.watch.is_watching() {
            default.min(SAMPLE_INTERVAL)
        } else {
            default
        }
    }

    fn apply(&self, ep: &mut Endpoint) {
        ep.server
            .set_background_paused(self.operator_paused || self.busy.is_busy());
    }

    /// The operator's `pause`/`resume`.
    pub fn set_operator_paused(&mut self, ep: &mut Endpoint, paused: bool) {
        self.operator_paused = paused;
        self.apply(ep);
    }

    /// One turn of the engine loop: watch new background peers, sample when due, feed
    /// the controllers, pause or resume background serving.
    pub fn tick(&mut self, ep: &mut Endpoint) {
        for peer in ep.take_background_peers() {
            self.watch.watch_peer(peer);
        }
        let now = ep.now();
        if now < self.next_sample {
            return;
        }
        self.next_sample = now + SAMPLE_INTERVAL;
        let Some(signal) = self.watch.sample(now) else {
            return;
        };
        ep.on_path_signal(&signal);
        if let Some(busy) = self.busy.update(now, &signal) {
            if busy {
                tracing::info!(
                    "link busy: {} kbit/s of other traffic (threshold {} kbit/s); background serving paused",
                    signal.other_bytes_per_s * 8 / 1000,
                    self.busy.other_bytes_per_s_busy * 8 / 1000
                );
            } else {
                tracing::info!(
                    "link quiet for {:?}; background serving resumed{}",
                    self.busy.resume_after,
                    if self.operator_paused {
                        " (still paused by the operator)"
                    } else {
                        ""
                    }
                );
            }
            self.apply(ep);
        }
    }

    pub fn view(&self) -> MonitorView {
        MonitorView {
            mode: self.watch.mode().to_string(),
            interfaces: self.watch.view().into_iter().map(Into::into).collect(),
            paused_by_operator: self.operator_paused,
            paused_busy: self.busy.is_busy(),
            busy_pauses: self.busy.pauses(),
            busy_other_bytes_per_s: self.busy.other_bytes_per_s_busy,
            capabilities_dropped: self.capabilities_dropped.clone(),
        }
    }
}

/// The server's address, for finding the interface toward it.
fn server_ip(url: &str) -> Option<IpAddr> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next()?.parse().ok();
    }
    let host = authority.split(':').next()?;
    if let Ok(ip) = host.parse() {
        return Some(ip);
    }
    (host, 0).to_socket_addrs().ok()?.next().map(|a| a.ip())
}

/// Attaches the monitor as `cfg` says and drops the capabilities BPF needed. Call it
/// before any thread is started: capabilities belong to threads, and threads started
/// later inherit the reduced set.
pub fn setup(cfg: &Config) -> EgressWatch {
    let own: Vec<u16> = [cfg.listen.port()].into_iter().filter(|&p| p != 0).collect();
    let mut watch = PathWatch::new(cfg.monitor, &own);
    if cfg.monitor != MonitorMode::Off {
        let mut names = cfg.monitor_interfaces.clone();
        if names.is_empty() {
            match cfg.server_url.as_deref().and_then(server_ip) {
                Some(ip) => match lowtide_ebpf::interface_toward(ip) {
                    Ok(name) => names.push(name),
                    Err(e) => tracing::warn!("egress monitor: {e}"),
                },
                None => tracing::warn!(
                    "egress monitor: cannot find the server's address to pick an interface; set monitor_interfaces"
                ),
            }
        }
        for name in &names {
            if let Err(e) = watch.watch_interface(name) {
                tracing::warn!("egress monitor on {name}: {e}; the background controller uses the delay signal for peers behind it");
            }
        }
    }
    let dropped = match drop_capabilities(MONITOR_CAPABILITIES) {
        Ok(d) => {
            if !d.dropped.is_empty() {
                tracing::info!(
                    "dropped {} from the effective and permitted sets{} (only loading BPF needed them)",
                    d.dropped.join(", "),
                    if d.bounding_kept.is_empty() {
                        " and the bounding set"
                    } else {
                        ""
                    }
                );
            }
            if !d.bounding_kept.is_empty() {
                tracing::info!(
                    "{} stay in the bounding set (no CAP_SETPCAP to drop them; they are not held)",
                    d.bounding_kept.join(", ")
                );
            }
            d.dropped
        }
        Err(e) => {
            tracing::warn!("could not drop the capabilities BPF needed: {e}");
            Vec::new()
        }
    };
    EgressWatch::new(
        watch,
        BusyPolicy::new(
            cfg.busy_other_kbit.saturating_mul(1000) / 8,
            Duration::from_secs(cfg.busy_resume_secs),
        ),
        dropped,
    )
}

/// The capabilities only attaching BPF programs needs.
pub const MONITOR_CAPABILITIES: &[(u32, &str)] = &[
    (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
    (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
    (CAP_PERFMON, "CAP_PERFMON"),
    (CAP_BPF, "CAP_BPF"),
];
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn has(set: &[u32; 2], cap: u32) -> bool {
    set[(cap / 32) as usize] & (1 << (cap % 32)) != 0
}

/// What [`drop_capabilities`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dropped {
    /// Held before (in any set) and gone now from the effective, permitted and inheritable sets.
    pub dropped: Vec<String>,
    /// Left in the bounding set because this thread lacks CAP_SETPCAP (they cannot come back
    /// without an execve of a binary with file capabilities).
    pub bounding_kept: Vec<String>,
}

const CAP_SETPCAP: u32 = 8;

/// Removes `caps` from the calling thread's effective, permitted, inheritable, ambient
/// and (given CAP_SETPCAP) bounding sets. Only this thread and threads it starts
/// afterwards are affected.
pub fn drop_capabilities(caps: &[(u32, &str)]) -> std::io::Result<Dropped> {
    let mut hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget writes two CapData for version 3, which `data` holds.
    if unsafe { libc::syscall(libc::SYS_capget, &mut hdr as *mut CapHeader, data.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let permitted = [data[0].permitted, data[1].permitted];
    let effective = [data[0].effective, data[1].effective];
    let mut out = Dropped::default();
    for &(cap, name) in caps {
        // SAFETY: prctl with integer arguments only.
        let in_bounding = unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong, 0, 0, 0) } == 1;
        if has(&permitted, cap) {
            out.dropped.push(name.to_owned());
        }
        if in_bounding {
            // SAFETY: prctl with integer arguments only.
            let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
            if r != 0 {
                if has(&effective, CAP_SETPCAP) {
                    return Err(std::io::Error::other(format!(
                        "PR_CAPBSET_DROP {name}: {}",
                        std::io::Error::last_os_error()
                    )));
                }
                out.bounding_kept.push(name.to_owned());
            }
        }
        // SAFETY: prctl with integer arguments only; fails harmlessly where ambient caps are unsupported.
        unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_LOWER as libc::c_ulong,
                cap as libc::c_ulong,
                0,
                0,
            )
        };
        let (word, bit) = ((cap / 32) as usize, 1u32 << (cap % 32));
        data[word].effective &= !bit;
        data[word].permitted &= !bit;
        data[word].inheritable &= !bit;
    }
    let mut hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    // SAFETY: capset reads the header and two CapData.
    if unsafe { libc::syscall(libc::SYS_capset, &mut hdr as *mut CapHeader, data.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sig(other: u64) -> PathSignal {
        PathSignal {
            other_bytes_per_s: other,
            ..Default::default()
        }
    }

    fn ms(t: u64) -> Time {
        Time(t * 1000)
    }

    #[test]
    fn busy_policy_pauses_above_the_threshold_and_resumes_after_quiet() {
        let mut b = BusyPolicy::new(250_000, Duration::from_secs(2));
        assert_eq!(b.update(ms(0), &sig(100_000)), None);
        assert_eq!(b.update(ms(5), &sig(300_000)), Some(true));
        assert!(b.is_busy());
        assert_eq!(b.update(ms(10), &sig(400_000)), None);
        // Below the threshold but above half of it: still busy, no quiet time counted.
        assert_eq!(b.update(ms(1_000), &sig(200_000)), None);
        assert_eq!(b.update(ms(4_000), &sig(200_000)), None);
        assert!(b.is_busy());
        // Quiet: resumes only after 2 s of it.
        assert_eq!(b.update(ms(5_000), &sig(0)), None);
        assert_eq!(b.update(ms(6_000), &sig(0)), None);
        // Traffic again restarts the quiet time.
        assert_eq!(b.update(ms(6_500), &sig(300_000)), None);
        assert_eq!(b.update(ms(7_000), &sig(0)), None);
        assert_eq!(b.update(ms(8_999), &sig(0)), None);
        assert_eq!(b.update(ms(9_000), &sig(0)), Some(false));
        assert!(!b.is_busy());
        assert_eq!(b.pauses(), 1);
    }

    #[test]
    fn busy_policy_zero_never_pauses() {
        let mut b = BusyPolicy::new(0, Duration::from_secs(1));
        assert_eq!(b.update(ms(0), &sig(u64::MAX)), None);
        assert!(!b.is_busy());
    }

    #[test]
    fn server_ip_reads_literal_addresses_from_urls() {
        assert_eq!(server_ip("http://10.1.2.3:8080/x"), Some("10.1.2.3".parse().unwrap()));
        assert_eq!(server_ip("https://[fd00::1]:443"), Some("fd00::1".parse().unwrap()));
        assert_eq!(server_ip("http://127.0.0.1"), Some("127.0.0.1".parse().unwrap()));
        assert_eq!(server_ip("http://localhost:1/"), Some("127.0.0.1".parse().unwrap()));
    }

    /// Capability bits of `field` (CapEff, CapPrm, CapBnd) in /proc/thread-self/status.
    fn caps_of(field: &str) -> u64 {
        let s = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        let line = s.lines().find(|l| l.starts_with(&format!("{field}:"))).unwrap();
        u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
    }

    const CHILD_ENV: &str = "LOWTIDE_TEST_DROP_CAPS_CHILD";

    /// Runs in a child process (re-executed test binary), so the parent's test threads keep
    /// their capabilities: drops, then prints the sets before and after.
    #[test]
    fn drop_capabilities_child() {
        if std::env::var_os(CHILD_ENV).is_none() {
            return;
        }
        let before = (caps_of("CapEff"), caps_of("CapPrm"), caps_of("CapBnd"));
        let dropped = drop_capabilities(MONITOR_CAPABILITIES).unwrap().dropped;
        let after = (caps_of("CapEff"), caps_of("CapPrm"), caps_of("CapBnd"));
        println!(
            "CAPS before={:x},{:x},{:x} after={:x},{:x},{:x} dropped={}",
            before.0,
            before.1,
            before.2,
            after.0,
            after.1,
            after.2,
            dropped.join("+")
        );
    }

    #[test]
    fn drop_capabilities_clears_the_monitor_capabilities_in_a_child_process() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "monitor::tests::drop_capabilities_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "child failed: {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = text
            .lines()
            .find_map(|l| l.find("CAPS ").map(|i| &l[i..]))
            .unwrap_or_else(|| panic!("no CAPS line from the child: {text}"));
        let field = |name: &str| -> Vec<u64> {
            let v = line.split_whitespace().find_map(|w| w.strip_prefix(name)).unwrap();
            v.split(',').map(|x| u64::from_str_radix(x, 16).unwrap()).collect()
        };
        let (before, after) = (field("before="), field("after="));
        let mask: u64 = MONITOR_CAPABILITIES.iter().map(|(c, _)| 1u64 << c).sum();
        // The bounding set can only shrink with CAP_SETPCAP (root has it).
        let sets = if before[0] & (1 << CAP_SETPCAP) != 0 { 3 } else { 2 };
        for (set, (b, a)) in ["effective", "permitted", "bounding"]
            .iter()
            .zip(before.iter().zip(&after))
            .take(sets)
        {
            assert_eq!(a & mask, 0, "{set} still holds {:x} after the drop ({line})", a & mask);
            // Nothing else is taken away.
            assert_eq!(a & !mask, b & !mask, "{set} lost other capabilities ({line})");
        }
        if before[1] & mask == mask {
            // Running as root: every one of them was held, and is reported.
            let names = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("dropped="))
                .unwrap();
            assert_eq!(names.split('+').count(), MONITOR_CAPABILITIES.len(), "{line}");
        }
    }
}
