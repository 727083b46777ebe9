//! Lowtide's egress monitor: how full the local egress queue is and how much
//! other traffic competes with Lowtide on the interface toward a peer.
//!
//! The background congestion controller reads these figures every few
//! packets, so a sample must be cheap: the BPF programs in `bpf/` publish into
//! a `BPF_F_MMAPABLE` array that [`Monitor::sample`] reads from shared memory
//! (a few nanoseconds, no syscall).
//!
//! - [`Monitor`]: the BPF monitor. Per watched interface, the root qdisc's
//!   backlog (bytes, packets), drops and overlimits (`tp_btf/qdisc_enqueue`
//!   and `tp_btf/qdisc_dequeue`, filtered by netns inode and ifindex), and the
//!   bytes/packets of Lowtide's own traffic (UDP source ports given to
//!   [`Monitor::add_own_port`]) vs all other traffic leaving the interface (a
//!   tcx egress classifier). Needs root or CAP_BPF + CAP_PERFMON +
//!   CAP_NET_ADMIN, kernel BTF and Linux 6.6+; [`MonitorError`] says which is
//!   missing and what to do.
//! - [`NetlinkMonitor`]: the fallback without BPF or privilege: the same
//!   backlog and drops through rtnetlink `RTM_GETQDISC`, one syscall round
//!   trip per sample, no own/other split.
//! - [`EgressMonitor`]: tries the first, falls back to the second, and keeps
//!   the reason.
//!
//! - [`PathWatch`]: what a serving process runs: one monitor per interface
//!   toward its peers (chosen by [`MonitorMode`]), sampled into the
//!   background controller's `PathSignal`.
//!
//! The `bpf` feature (default) brings the BPF monitor, aya, and clang at build
//! time; without it the crate is [`EgressSample`] and [`NetlinkMonitor`] only.
//!
//! Not here: the controller that uses these figures (`lowtide-engine`), and
//! any queue that is not on this host (a bottleneck on a router further along
//! shows only in the one-way delay).
//!
//! A monitor belongs to the network namespace of the thread that attaches it.
//! The figures are cumulative where that makes sense (drops, traffic): rates
//! come from the difference of two samples.

mod error;
mod iface;
#[cfg(feature = "bpf")]
mod maps;
#[cfg(feature = "bpf")]
mod monitor;
mod netlink;
mod sample;
#[cfg(feature = "bpf")]
pub mod watch;

#[cfg(feature = "bpf")]
use std::net::IpAddr;

pub use error::{MonitorError, KERNEL_MIN};
pub use iface::netns_inode;
#[cfg(feature = "bpf")]
pub use monitor::{Monitor, MonitorStats, ProgramCost};
pub use netlink::{NetlinkMonitor, QdiscStats};
pub use sample::{EgressSample, SampleSource, TrafficSplit, SMALL_PACKET_BYTES};
#[cfg(feature = "bpf")]
pub use watch::{MonitorMode, PathWatch};

/// Name of the interface the kernel routes packets for `peer` out of, in this
/// thread's network namespace (as `ip route get PEER` shows it).
pub fn interface_toward(peer: std::net::IpAddr) -> Result<String, MonitorError> {
    let ifindex = netlink::RtNetlink::open()
        .and_then(|mut nl| nl.route_oif(peer))
        .map_err(|source| MonitorError::NoRoute { peer, source })?;
    iface::name_of(ifindex)
}

#[cfg(feature = "bpf")]
/// A BPF monitor if one can be attached, the netlink fallback otherwise.
pub enum EgressMonitor {
    Bpf(Box<Monitor>),
    /// BPF could not be used, for the reason kept in `why`.
    Netlink {
        monitor: NetlinkMonitor,
        why: MonitorError,
    },
}

#[cfg(feature = "bpf")]
impl EgressMonitor {
    /// Watches the interface toward `peer`, with BPF if possible. Fails only
    /// when neither monitor can be had (e.g. no route toward `peer`).
    pub fn attach_toward(peer: IpAddr) -> Result<Self, MonitorError> {
        match Monitor::attach_toward(peer) {
            Ok(m) => Ok(Self::Bpf(Box::new(m))),
            Err(why @ (MonitorError::NoRoute { .. } | MonitorError::InterfaceNotFound { .. })) => Err(why),
            Err(why) => Ok(Self::Netlink {
                monitor: NetlinkMonitor::attach_toward(peer)?,
                why,
            }),
        }
    }

    /// Watches interface `ifname`, with BPF if possible.
    pub fn attach(ifname: &str) -> Result<Self, MonitorError> {
        match Monitor::attach(ifname) {
            Ok(m) => Ok(Self::Bpf(Box::new(m))),
            Err(why @ MonitorError::InterfaceNotFound { .. }) => Err(why),
            Err(why) => Ok(Self::Netlink {
                monitor: NetlinkMonitor::attach(ifname)?,
                why,
            }),
        }
    }

    /// Why BPF is not in use, if it is not.
    pub fn degraded(&self) -> Option<&MonitorError> {
        match self {
            Self::Bpf(_) => None,
            Self::Netlink { why, .. } => Some(why),
        }
    }

    pub fn ifname(&self) -> &str {
        match self {
            Self::Bpf(m) => m.ifname(),
            Self::Netlink { monitor, .. } => monitor.ifname(),
        }
    }

    /// Marks `port` as Lowtide's own; a no-op for the netlink fallback, which
    /// cannot split traffic.
    pub fn add_own_port(&mut self, port: u16) -> Result<(), MonitorError> {
        match self {
            Self::Bpf(m) => m.add_own_port(port),
            Self::Netlink { .. } => Ok(()),
        }
    }

    pub fn sample(&mut self) -> Result<EgressSample, MonitorError> {
        match self {
            Self::Bpf(m) => Ok(m.sample()),
            Self::Netlink { monitor, .. } => monitor.sample(),
        }
    }
}
