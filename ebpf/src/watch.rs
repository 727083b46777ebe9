//! From monitor samples to the background controller's input.
//!
//! [`PathWatch`] is what a process that serves background transfers runs: it
//! watches the egress interface toward each peer (found by route lookup),
//! marks Lowtide's own UDP ports, and turns the cumulative figures of each
//! [`EgressSample`] into a [`PathSignal`] (backlog now, rate of other traffic
//! over the last [`RATE_WINDOW`]) for `Endpoint::on_path_signal`. Other
//! traffic in small packets (at most [`crate::SMALL_PACKET_BYTES`]: the TCP
//! ACKs of a download through the same interface, DNS, keep-alives) is not
//! competition for the egress link and is left out of that rate; it counts in
//! the interface's total rate.
//!
//! Which monitor is used follows [`MonitorMode`]: `auto` tries BPF and falls
//! back to rtnetlink (backlog only, no other-traffic signal), logging which and
//! why; `ebpf` and `netlink` insist on one; `off` watches nothing, and the
//! controller runs on the delay signal alone.
//!
//! Not here: when to sample (the caller's loop, every [`SAMPLE_INTERVAL`]),
//! and per-peer signals. When peers sit behind different interfaces the signals
//! are combined conservatively (the largest backlog, the sum of other traffic)
//! and every background session gets the combination.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use lowtide_engine::cc::background::PathSignal;
use lowtide_engine::time::Time;

use crate::{EgressSample, Monitor, MonitorError, NetlinkMonitor};

/// How often a caller should sample: a few times per round trip of the
/// shortest WAN path, so a yield is not delayed by sampling.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(5);
/// Other traffic's rate is measured over this window: long enough to smooth a
/// TCP burst, short enough to react within a round trip.
pub const RATE_WINDOW: Duration = Duration::from_millis(25);
/// Most interfaces watched at once.
pub const INTERFACES_MAX: usize = 8;
/// Most peers whose route is remembered; the cache starts over when full.
pub const PEERS_MAX: usize = 4096;
/// Samples kept per interface for the rate window.
const HISTORY_MAX: usize = 64;

/// Which egress monitor to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MonitorMode {
    /// BPF if it loads, else rtnetlink.
    #[default]
    Auto,
    /// BPF only: fail if it cannot be loaded.
    Ebpf,
    /// rtnetlink only (backlog, no other-traffic signal; no privilege needed).
    Netlink,
    /// No monitor: the controller runs on the delay signal alone.
    Off,
}

impl FromStr for MonitorMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "ebpf" | "bpf" => Ok(Self::Ebpf),
            "netlink" => Ok(Self::Netlink),
            "off" | "none" => Ok(Self::Off),
            _ => Err(format!("unknown monitor mode {s:?}: use auto, ebpf, netlink or off")),
        }
    }
}

impl fmt::Display for MonitorMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Ebpf => "ebpf",
            Self::Netlink => "netlink",
            Self::Off => "off",
        })
    }
}

/// Turns cumulative traffic counters into a rate over [`RATE_WINDOW`].
#[derive(Debug, Default, Clone)]
pub struct RateTracker {
    /// (time, cumulative other bytes), oldest first; the first entry is the last one
    /// at or before the start of the window.
    history: VecDeque<(Time, u64)>,
}

impl RateTracker {
    /// Records the cumulative count `bytes` at `now` and returns the rate over the
    /// window, bytes/s (0 until two samples are apart).
    pub fn push(&mut self, now: Time, bytes: u64) -> u64 {
        if self.history.back().is_some_and(|&(_, b)| bytes < b) {
            // The counters went back (the monitor was replaced): start over.
            self.history.clear();
        }
        if self.history.len() == HISTORY_MAX {
            self.history.pop_front();
        }
        self.history.push_back((now, bytes));
        while self.history.len() > 2 && now.since(self.history[1].0) >= RATE_WINDOW {
            self.history.pop_front();
        }
        let (t0, b0) = self.history[0];
        let dt = now.since(t0);
        if dt.is_zero() {
            return 0;
        }
        ((bytes - b0) as f64 / dt.as_secs_f64()) as u64
    }
}

enum Source {
    Bpf(Box<Monitor>),
    Netlink(NetlinkMonitor),
}

/// One watched interface.
struct Watched {
    ifname: String,
    source: Source,
    /// Why BPF is not in use on this interface, if it is not.
    degraded: Option<String>,
    other: RateTracker,
    /// Own and other traffic together.
    all: RateTracker,
    last: PathSignal,
    /// A sample failed; logged once until one succeeds again.
    failing: bool,
}

/// What one watched interface looks like, for status pages and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchedView {
    pub ifname: String,
    /// "ebpf" or "netlink".
    pub kind: &'static str,
    /// Why BPF is not in use, if it is not.
    pub degraded: Option<String>,
    pub backlog_bytes: u64,
    /// `None` with netlink, which cannot tell other traffic from ours.
    pub other_bytes_per_s: Option<u64>,
}

/// The egress monitors of a process, one per interface toward its peers.
pub struct PathWatch {
    mode: MonitorMode,
    own_ports: Vec<u16>,
    watched: Vec<Watched>,
    /// Peer address → interface its route goes out of (`None`: no route or not watchable,
    /// already logged).
    routes: HashMap<IpAddr, Option<String>>,
    last: Option<PathSignal>,
}

impl PathWatch {
    /// Watches nothing yet; `own_ports` are the UDP source ports of Lowtide's own traffic.
    pub fn new(mode: MonitorMode, own_ports: &[u16]) -> Self {
        if mode == MonitorMode::Off {
            tracing::info!(
                "egress monitor off (--monitor off): the background controller runs on the delay signal alone"
            );
        }
        Self {
            mode,
            own_ports: own_ports.to_vec(),
            watched: Vec::new(),
            routes: HashMap::new(),
            last: None,
        }
    }

    pub fn mode(&self) -> MonitorMode {
        self.mode
    }

    /// Marks `port` as Lowtide's own on every BPF monitor, present and future.
    pub fn add_own_port(&mut self, port: u16) -> Result<(), MonitorError> {
        if !self.own_ports.contains(&port) {
            self.own_ports.push(port);
        }
        let mut marked = Vec::new();
        for w in &mut self.watched {
            if let Source::Bpf(m) = &mut w.source {
                m.add_own_port(port)?;
                marked.push(w.ifname.as_str());
            }
        }
        if !marked.is_empty() {
            tracing::info!(
                "egress monitor on {}: UDP port {port} marked as Lowtide's own (own UDP ports now {:?})",
                marked.join(", "),
                self.own_ports
            );
        }
        Ok(())
    }

    /// UDP source ports counted as Lowtide's own traffic.
    pub fn own_ports(&self) -> &[u16] {
        &self.own_ports
    }

    /// True when at least one interface is watched with BPF.
    pub fn bpf_attached(&self) -> bool {
        self.watched.iter().any(|w| matches!(w.source, Source::Bpf(_)))
    }

    /// True when any interface is watched.
    pub fn is_watching(&self) -> bool {
        !self.watched.is_empty()
    }

    /// Watches interface `ifname` (no-op if already watched or the mode is `off`).
    pub fn watch_interface(&mut self, ifname: &str) -> Result<(), MonitorError> {
        if self.mode == MonitorMode::Off || self.watched.iter().any(|w| w.ifname == ifname) {
            return Ok(());
        }
        if self.watched.len() == INTERFACES_MAX {
            tracing::warn!("egress monitor: already watching {INTERFACES_MAX} interfaces; not watching {ifname}");
            return Ok(());
        }
        let (source, degraded) = match self.mode {
            MonitorMode::Off => return Ok(()),
            MonitorMode::Ebpf => (Source::Bpf(Box::new(Monitor::attach(ifname)?)), None),
            MonitorMode::Netlink => (Source::Netlink(NetlinkMonitor::attach(ifname)?), None),
            MonitorMode::Auto => match Monitor::attach(ifname) {
                Ok(m) => (Source::Bpf(Box::new(m)), None),
                Err(e @ MonitorError::InterfaceNotFound { .. }) => return Err(e),
                Err(why) => (Source::Netlink(NetlinkMonitor::attach(ifname)?), Some(why.to_string())),
            },
        };
        let mut w = Watched {
            ifname: ifname.to_owned(),
            source,
            degraded,
            other: RateTracker::default(),
            all: RateTracker::default(),
            last: PathSignal::default(),
            failing: false,
        };
        match (&mut w.source, &w.degraded) {
            (Source::Bpf(m), _) => {
                for &p in &self.own_ports {
                    m.add_own_port(p)?;
                }
                if self.own_ports.is_empty() {
                    tracing::info!(
                        "egress monitor on {ifname}: eBPF (qdisc backlog and other traffic; no own UDP port yet, \
                         marked once the socket is bound)"
                    );
                } else {
                    tracing::info!(
                        "egress monitor on {ifname}: eBPF (qdisc backlog and other traffic; own UDP ports {:?})",
                        self.own_ports
                    );
                }
            }
            (Source::Netlink(_), Some(why)) => tracing::warn!(
                "egress monitor on {ifname}: netlink fallback, queue backlog only, no other-traffic signal \
                 (eBPF unavailable: {why})"
            ),
            (Source::Netlink(_), None) => tracing::info!(
                "egress monitor on {ifname}: netlink (--monitor netlink), queue backlog only, no other-traffic signal"
            ),
        }
        self.watched.push(w);
        Ok(())
    }

    /// Watches the interface the route toward `peer` goes out of. Looks the route up
    /// once per peer; a failure is logged once and not retried.
    pub fn watch_peer(&mut self, peer: IpAddr) {
        if self.mode == MonitorMode::Off || self.routes.contains_key(&peer) {
            return;
        }
        if self.routes.len() == PEERS_MAX {
            self.routes.clear();
        }
        let found = crate::interface_toward(peer).and_then(|ifname| {
            self.watch_interface(&ifname)?;
            Ok(ifname)
        });
        let entry = match found {
            Ok(ifname) => Some(ifname),
            Err(e) => {
                tracing::warn!("egress monitor toward {peer}: {e}");
                None
            }
        };
        self.routes.insert(peer, entry);
    }

    /// Samples every watched interface and combines them: the largest backlog and the
    /// sum of other traffic. `None` while nothing is watched.
    pub fn sample(&mut self, now: Time) -> Option<PathSignal> {
        if self.watched.is_empty() {
            return None;
        }
        let mut combined = PathSignal::default();
        for w in &mut self.watched {
            let s: Result<EgressSample, MonitorError> = match &mut w.source {
                Source::Bpf(m) => Ok(m.sample()),
                Source::Netlink(m) => m.sample(),
            };
            match s {
                Ok(s) => {
                    w.failing = false;
                    w.last = PathSignal {
                        backlog_bytes: s.backlog_bytes,
                        other_bytes_per_s: s.traffic.map_or(0, |t| w.other.push(now, t.other_bytes)),
                        egress_bytes_per_s: s
                            .traffic
                            .map_or(0, |t| w.all.push(now, t.other_bytes + t.own_bytes + t.small_bytes)),
                    };
                }
                Err(e) => {
                    if !w.failing {
                        tracing::warn!("egress monitor on {}: {e}; keeping the last sample", w.ifname);
                    }
                    w.failing = true;
                }
            }
            combined.backlog_bytes = combined.backlog_bytes.max(w.last.backlog_bytes);
            combined.other_bytes_per_s = combined.other_bytes_per_s.saturating_add(w.last.other_bytes_per_s);
            // The busiest interface's rate goes with the largest backlog more often than not.
            combined.egress_bytes_per_s = combined.egress_bytes_per_s.max(w.last.egress_bytes_per_s);
        }
        self.last = Some(combined);
        self.last
    }

    /// The last combined signal.
    pub fn last(&self) -> Option<PathSignal> {
        self.last
    }

    /// The watched interfaces and their last figures.
    pub fn view(&self) -> Vec<WatchedView> {
        self.watched
            .iter()
            .map(|w| WatchedView {
                ifname: w.ifname.clone(),
                kind: match w.source {
                    Source::Bpf(_) => "ebpf",
                    Source::Netlink(_) => "netlink",
                },
                degraded: w.degraded.clone(),
                backlog_bytes: w.last.backlog_bytes,
                other_bytes_per_s: match w.source {
                    Source::Bpf(_) => Some(w.last.other_bytes_per_s),
                    Source::Netlink(_) => None,
                },
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(t: u64) -> Time {
        Time(t * 1000)
    }

    #[test]
    fn rate_tracker_measures_over_the_window() {
        let mut r = RateTracker::default();
        assert_eq!(r.push(ms(0), 0), 0);
        // 1000 bytes every 5 ms = 200 kB/s.
        let mut rate = 0;
        for k in 1..=20 {
            rate = r.push(ms(5 * k), 1000 * k);
        }
        assert_eq!(rate, 200_000);
        // The traffic stops: within one window the rate is zero.
        let total = 1000 * 20;
        for k in 21..=26 {
            rate = r.push(ms(5 * k), total);
        }
        assert_eq!(rate, 0, "still {rate} B/s one window after the traffic stopped");
        assert!(r.history.len() <= 2 + (RATE_WINDOW.as_millis() / 5) as usize);
    }

    #[test]
    fn rate_tracker_starts_over_when_counters_go_back() {
        let mut r = RateTracker::default();
        r.push(ms(0), 5_000_000);
        r.push(ms(10), 5_100_000);
        assert_eq!(r.push(ms(20), 100), 0);
        assert_eq!(r.push(ms(30), 1100), 100_000);
    }

    #[test]
    fn monitor_mode_parses_and_prints() {
        for m in [
            MonitorMode::Auto,
            MonitorMode::Ebpf,
            MonitorMode::Netlink,
            MonitorMode::Off,
        ] {
            assert_eq!(m.to_string().parse::<MonitorMode>(), Ok(m));
        }
        assert!("bogus"
            .parse::<MonitorMode>()
            .unwrap_err()
            .contains("auto, ebpf, netlink or off"));
    }

    #[test]
    fn path_watch_off_watches_nothing() {
        let mut w = PathWatch::new(MonitorMode::Off, &[7000]);
        w.watch_peer("127.0.0.1".parse().unwrap());
        assert!(w.watch_interface("lo").is_ok());
        assert!(!w.is_watching());
        assert_eq!(w.sample(Time(1)), None);
    }

    #[test]
    fn path_watch_netlink_watches_the_route_toward_a_peer() {
        let mut w = PathWatch::new(MonitorMode::Netlink, &[7000]);
        w.watch_peer("127.0.0.1".parse().unwrap());
        w.watch_peer("127.0.0.2".parse().unwrap());
        let v = w.view();
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!((v[0].ifname.as_str(), v[0].kind), ("lo", "netlink"));
        assert!(!w.bpf_attached());
        let s = w.sample(Time(1)).expect("a sample");
        assert_eq!(s.other_bytes_per_s, 0);
    }
}
