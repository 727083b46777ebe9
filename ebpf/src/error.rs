//! Why a monitor cannot attach, and what to do about it.

use std::io;
use std::net::IpAddr;

/// Oldest kernel the BPF monitor supports: tcx links (6.6) detach cleanly
/// when the monitor is dropped; BTF tracepoints and mmapable arrays are older.
pub const KERNEL_MIN: (u32, u32) = (6, 6);

/// An error that keeps a monitor from attaching or reading.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error(
        "not permitted to load BPF programs: missing {missing}; run as root or grant \
         CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (e.g. AmbientCapabilities= in the systemd unit), \
         or use the netlink fallback (NetlinkMonitor), which needs no privilege"
    )]
    NotPermitted { missing: String },
    #[error(
        "no kernel BTF at {path}: the kernel was built without CONFIG_DEBUG_INFO_BTF, so the \
         CO-RE programs cannot be relocated; use a kernel with BTF or the netlink fallback (NetlinkMonitor)"
    )]
    NoBtf { path: &'static str },
    #[error(
        "kernel {found} is too old for the BPF monitor (needs {}.{} or newer for tcx links); \
         upgrade the kernel or use the netlink fallback (NetlinkMonitor)",
        KERNEL_MIN.0, KERNEL_MIN.1
    )]
    KernelTooOld { found: String },
    #[error("interface {name:?} not found in this network namespace (netns inode {netns_inode}); check `ip link`")]
    InterfaceNotFound { name: String, netns_inode: u64 },
    #[error("no route toward {peer} in this network namespace: {source}; check `ip route get {peer}`")]
    NoRoute { peer: IpAddr, source: io::Error },
    #[error("cannot read this thread's network namespace ({path}): {source}")]
    Netns { path: &'static str, source: io::Error },
    #[cfg(feature = "bpf")]
    #[error("loading the BPF object failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[cfg(feature = "bpf")]
    #[error("BPF program {program} failed to load or attach on {ifname}: {source}")]
    Program {
        program: &'static str,
        ifname: String,
        source: aya::programs::ProgramError,
    },
    #[cfg(feature = "bpf")]
    #[error("BPF map {map}: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
    #[error("BPF object has no {what} named {name} (build mismatch)")]
    Missing { what: &'static str, name: &'static str },
    #[cfg(feature = "bpf")]
    #[error("cannot read kernel BTF: {0}")]
    Btf(#[from] aya::BtfError),
    #[error("cannot mmap the BPF map {map}: {source}")]
    Mmap { map: &'static str, source: io::Error },
    #[error("rtnetlink request about interface index {ifindex} failed: {source}")]
    Netlink { ifindex: u32, source: io::Error },
}
