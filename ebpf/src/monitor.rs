//! The BPF egress monitor: loads `bpf/egress.bpf.c` for one interface,
//! attaches its two qdisc tracepoints and its tcx egress classifier, and reads
//! what they publish from an mmapped `BPF_F_MMAPABLE` array (no syscall per
//! sample). Everything is detached when the [`Monitor`] is dropped.
//!
//! The monitor belongs to the network namespace of the thread that attaches
//! it: the interface is looked up there and the tracepoints, which fire for
//! every namespace on the machine, are filtered by that namespace's inode.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{fence, Ordering};
use std::sync::Mutex;

use aya::maps::{Array, Map, MapData};
use aya::programs::{BtfTracePoint, SchedClassifier, TcAttachType};
use aya::{Btf, Ebpf, EbpfLoader};

use crate::error::{MonitorError, KERNEL_MIN};
use crate::maps::{EgressRecord, EGRESS_RECORD_BYTES, FLAG_QDISC_CHILD, FLAG_QDISC_PERCPU, OWN_PORT_WORDS};
use crate::netlink::{sample_from, RtNetlink};
use crate::sample::{EgressSample, SampleSource, TrafficSplit};

/// The compiled BPF object (see `build.rs`).
static EGRESS_OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/egress.bpf.o"));

const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";
const PROG_ENQUEUE: &str = "lt_qdisc_enqueue";
const PROG_DEQUEUE: &str = "lt_qdisc_dequeue";
const PROG_CLASSIFY: &str = "lt_egress_classify";
const MAP_EGRESS: &str = "egress";
const MAP_OWN_PORTS: &str = "own_ports";
/// Attempts at a consistent seqlock read before falling back to field-by-field
/// loads (each still atomic). A writer holds the lock for a few instructions.
const SEQLOCK_READ_ATTEMPTS_MAX: u32 = 64;

/// Capability bits (linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// A BPF monitor of one interface's egress path.
pub struct Monitor {
    ifname: String,
    ifindex: u32,
    netns_inode: u64,
    record: MappedRecord,
    /// The own-port bitmap (`LT_OWN_PORT_WORDS` words of 64 ports).
    own_ports: Array<MapData, u64>,
    /// For qdiscs whose statistics BPF cannot read (per-CPU); opened lazily.
    netlink: Mutex<Option<RtNetlink>>,
    /// Owns the programs and their links: dropping it detaches everything.
    ebpf: Ebpf,
}

/// Kernel-side cost of one program, counted while BPF run-time statistics
/// are enabled (`sysctl kernel.bpf_stats_enabled=1` or `aya::sys::enable_stats`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProgramCost {
    pub name: String,
    /// The kernel's id of the loaded program (as `bpftool prog` lists it).
    pub id: u32,
    pub run_count: u64,
    pub run_time_ns: u64,
}

/// Diagnostics beyond the sample: what the programs have seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MonitorStats {
    pub enqueue_events: u64,
    pub dequeue_events: u64,
    /// Handle of the root qdisc seen by the last event (e.g. `0x8001_0000` for `8001:`).
    pub qdisc_handle: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the last qdisc snapshot; 0 before the first.
    pub updated_ns: u64,
    /// The root qdisc keeps per-CPU statistics, so backlogs come from netlink.
    pub qdisc_percpu: bool,
    /// Events came from children of a multiqueue root (e.g. `mq`), so backlogs come from netlink.
    pub qdisc_child_seen: bool,
}

impl Monitor {
    /// Watches the interface the kernel routes packets for `peer` through.
    pub fn attach_toward(peer: IpAddr) -> Result<Self, MonitorError> {
        let ifindex = RtNetlink::open()
            .and_then(|mut nl| nl.route_oif(peer))
            .map_err(|source| MonitorError::NoRoute { peer, source })?;
        let ifname = crate::iface::name_of(ifindex)?;
        Self::attach(&ifname)
    }

    /// Watches interface `ifname` of the calling thread's network namespace.
    pub fn attach(ifname: &str) -> Result<Self, MonitorError> {
        let ifindex = crate::iface::index_of(ifname)?;
        check_kernel()?;
        check_capabilities()?;
        if !Path::new(BTF_PATH).exists() {
            return Err(MonitorError::NoBtf { path: BTF_PATH });
        }
        let netns_inode = crate::iface::netns_inode()?;
        // ns.inum is an unsigned int in the kernel.
        let netns_u32 = netns_inode as u32;

        let mut ebpf = EbpfLoader::new()
            .override_global("target_netns", &netns_u32, true)
            .override_global("target_ifindex", &ifindex, true)
            .load(EGRESS_OBJECT)?;
        let btf = Btf::from_sys_fs()?;
        let program_error = |program: &'static str| {
            move |source| MonitorError::Program {
                program,
                ifname: ifname.to_owned(),
                source,
            }
        };
        for (program, tracepoint) in [(PROG_ENQUEUE, "qdisc_enqueue"), (PROG_DEQUEUE, "qdisc_dequeue")] {
            let p: &mut BtfTracePoint = ebpf
                .program_mut(program)
                .ok_or(MonitorError::Missing {
                    what: "program",
                    name: program,
                })?
                .try_into()
                .map_err(program_error(program))?;
            p.load(tracepoint, &btf).map_err(program_error(program))?;
            p.attach().map_err(program_error(program))?;
        }
        let classify: &mut SchedClassifier = ebpf
            .program_mut(PROG_CLASSIFY)
            .ok_or(MonitorError::Missing {
                what: "program",
                name: PROG_CLASSIFY,
            })?
            .try_into()
            .map_err(program_error(PROG_CLASSIFY))?;
        classify.load().map_err(program_error(PROG_CLASSIFY))?;
        // tcx on kernels >= 6.6: the link goes away with the program, leaving no qdisc behind.
        classify
            .attach(ifname, TcAttachType::Egress)
            .map_err(program_error(PROG_CLASSIFY))?;

        let egress = match ebpf.take_map(MAP_EGRESS) {
            Some(Map::Array(data)) => data,
            _ => {
                return Err(MonitorError::Missing {
                    what: "array map",
                    name: MAP_EGRESS,
                })
            }
        };
        let record = MappedRecord::map(egress)?;
        let own_ports_map = ebpf.take_map(MAP_OWN_PORTS).ok_or(MonitorError::Missing {
            what: "map",
            name: MAP_OWN_PORTS,
        })?;
        let own_ports = Array::try_from(own_ports_map).map_err(|source| MonitorError::Map {
            map: MAP_OWN_PORTS,
            source,
        })?;
        Ok(Self {
            ifname: ifname.to_owned(),
            ifindex,
            netns_inode,
            record,
            own_ports,
            netlink: Mutex::new(None),
            ebpf,
        })
    }

    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// Inode of the network namespace the watched interface lives in.
    pub fn netns_inode(&self) -> u64 {
        self.netns_inode
    }

    /// Marks UDP source port `port` as Lowtide's own. Two syscalls; not for
    /// the fast path.
    pub fn add_own_port(&mut self, port: u16) -> Result<(), MonitorError> {
        self.update_own_port(port, true)
    }

    /// Stops counting UDP source port `port` as Lowtide's own (a port that
    /// was never added is left as it is).
    pub fn remove_own_port(&mut self, port: u16) -> Result<(), MonitorError> {
        self.update_own_port(port, false)
    }

    fn update_own_port(&mut self, port: u16, own: bool) -> Result<(), MonitorError> {
        let map_error = |source| MonitorError::Map {
            map: MAP_OWN_PORTS,
            source,
        };
        let word = u32::from(port >> 6);
        debug_assert!(word < OWN_PORT_WORDS);
        let bit = 1u64 << (port & 63);
        let bits = self.own_ports.get(&word, 0).map_err(map_error)?;
        let bits = if own { bits | bit } else { bits & !bit };
        self.own_ports.set(word, bits, 0).map_err(map_error)
    }

    /// The current figures, read from shared memory with no syscall (a few
    /// nanoseconds), except when the root qdisc keeps per-CPU statistics
    /// (pfifo_fast) or is multiqueue (mq): from the first event that shows
    /// it, the queue figures come from rtnetlink (`backlog_source` says so).
    pub fn sample(&self) -> EgressSample {
        let r = self.record.get();
        let traffic = Some(TrafficSplit {
            own_bytes: r.own_bytes.load(Ordering::Relaxed),
            own_packets: r.own_packets.load(Ordering::Relaxed),
            other_bytes: r.other_bytes.load(Ordering::Relaxed),
            other_packets: r.other_packets.load(Ordering::Relaxed),
            small_bytes: r.small_bytes.load(Ordering::Relaxed),
            small_packets: r.small_packets.load(Ordering::Relaxed),
        });
        // Per-CPU statistics (lockless roots such as pfifo_fast) and multiqueue
        // roots (mq: one child per tx queue, totals summed only at dump time)
        // cannot be read from BPF; rtnetlink sums them as `tc -s` does.
        if r.flags.load(Ordering::Relaxed) & (FLAG_QDISC_PERCPU | FLAG_QDISC_CHILD) != 0 {
            if let Some(mut s) = self.netlink_sample() {
                s.traffic = traffic;
                return s;
            }
        }
        let mut sample = EgressSample {
            backlog_source: SampleSource::Bpf,
            traffic,
            ..EgressSample::default()
        };
        for _ in 0..SEQLOCK_READ_ATTEMPTS_MAX {
            let seq = r.seq.load(Ordering::Acquire);
            if seq & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            read_queue(r, &mut sample);
            fence(Ordering::Acquire);
            if r.seq.load(Ordering::Relaxed) == seq {
                return sample;
            }
        }
        // Writers kept the lock through every attempt: each field is still a
        // value the kernel wrote, backlog bytes and packets may be one event apart.
        read_queue(r, &mut sample);
        sample
    }

    /// What the programs have seen so far.
    pub fn stats(&self) -> MonitorStats {
        let r = self.record.get();
        let flags = r.flags.load(Ordering::Relaxed);
        MonitorStats {
            enqueue_events: r.enqueue_events.load(Ordering::Relaxed),
            dequeue_events: r.dequeue_events.load(Ordering::Relaxed),
            qdisc_handle: r.qdisc_handle.load(Ordering::Relaxed) as u32,
            updated_ns: r.updated_ns.load(Ordering::Relaxed),
            qdisc_percpu: flags & FLAG_QDISC_PERCPU != 0,
            qdisc_child_seen: flags & FLAG_QDISC_CHILD != 0,
        }
    }

    /// Run counts and run time of the monitor's programs (zero unless BPF
    /// statistics are enabled). One syscall per program.
    pub fn program_costs(&self) -> Vec<ProgramCost> {
        self.ebpf
            .programs()
            .filter_map(|(name, program)| {
                let info = program.info().ok()?;
                Some(ProgramCost {
                    name: name.to_owned(),
                    id: info.id(),
                    run_count: info.run_count(),
                    run_time_ns: u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
                })
            })
            .collect()
    }

    fn netlink_sample(&self) -> Option<EgressSample> {
        let mut guard = self.netlink.lock().ok()?;
        if guard.is_none() {
            *guard = RtNetlink::open().ok();
        }
        let q = guard.as_mut()?.root_qdisc(self.ifindex).ok()?;
        Some(sample_from(&q))
    }
}

fn read_queue(r: &EgressRecord, s: &mut EgressSample) {
    s.backlog_bytes = r.backlog_bytes.load(Ordering::Relaxed);
    s.backlog_packets = r.backlog_packets.load(Ordering::Relaxed);
    s.drops = r.drops.load(Ordering::Relaxed);
    s.overlimits = r.overlimits.load(Ordering::Relaxed);
    s.requeues = r.requeues.load(Ordering::Relaxed);
}

/// Entry 0 of the `egress` array, mapped read-only into this process.
struct MappedRecord {
    ptr: NonNull<EgressRecord>,
    len: usize,
    /// Keeps the map's fd open for as long as the mapping is used.
    _map: MapData,
}

// SAFETY: the mapping is only read through atomics and unmapped once, on drop.
unsafe impl Send for MappedRecord {}
// SAFETY: as above; shared reads of atomics are sound.
unsafe impl Sync for MappedRecord {}

impl MappedRecord {
    fn map(map: MapData) -> Result<Self, MonitorError> {
        let info = map.info().map_err(|source| MonitorError::Map {
            map: MAP_EGRESS,
            source,
        })?;
        // The kernel lays values out with a stride of value_size rounded up to 8.
        let stride = (info.value_size() as usize).next_multiple_of(8);
        if info.value_size() as usize != EGRESS_RECORD_BYTES {
            return Err(MonitorError::Mmap {
                map: MAP_EGRESS,
                source: io::Error::other(format!(
                    "value size {} does not match the loader's {EGRESS_RECORD_BYTES} (bpf/lowtide.h and src/maps.rs differ)",
                    info.value_size()
                )),
            });
        }
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let len = (stride * info.max_entries() as usize).next_multiple_of(page);
        // SAFETY: a fresh shared read-only mapping of a BPF_F_MMAPABLE array fd;
        // the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(MonitorError::Mmap {
                map: MAP_EGRESS,
                source: io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(ptr.cast::<EgressRecord>()).ok_or(MonitorError::Mmap {
            map: MAP_EGRESS,
            source: io::Error::other("mmap returned null"),
        })?;
        Ok(Self { ptr, len, _map: map })
    }

    fn get(&self) -> &EgressRecord {
        // SAFETY: the mapping is page-aligned, at least one record long and
        // lives until drop; all access is through atomics.
        unsafe { self.ptr.as_ref() }
    }
}

impl Drop for MappedRecord {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the region mapped in `map`, once.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

fn check_kernel() -> Result<(), MonitorError> {
    // SAFETY: uname fills the zeroed struct it is given.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a utsname.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return Ok(()); // cannot tell: let loading say what is wrong
    }
    // SAFETY: uname NUL-terminates release.
    let release = unsafe { std::ffi::CStr::from_ptr(uts.release.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    match parse_release(&release) {
        Some(v) if v < KERNEL_MIN => Err(MonitorError::KernelTooOld { found: release }),
        _ => Ok(()),
    }
}

/// `"6.18.44-fc"` → `(6, 18)`.
fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

fn check_capabilities() -> Result<(), MonitorError> {
    let Ok(status) = std::fs::read_to_string("/proc/thread-self/status") else {
        return Ok(()); // cannot tell: let loading say what is wrong
    };
    let Some(caps) = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
    else {
        return Ok(());
    };
    let missing = missing_capabilities(caps);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(MonitorError::NotPermitted {
            missing: missing.join(", "),
        })
    }
}

/// Capabilities, of those the monitor needs, that the effective set lacks.
fn missing_capabilities(effective: u64) -> Vec<&'static str> {
    let has = |cap: u32| effective & (1u64 << cap) != 0;
    let admin = has(CAP_SYS_ADMIN);
    let mut missing = Vec::new();
    if !(has(CAP_BPF) || admin) {
        missing.push("CAP_BPF");
    }
    if !(has(CAP_PERFMON) || admin) {
        missing.push("CAP_PERFMON");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_release_reads_major_minor() {
        assert_eq!(parse_release("6.18.44-fc-v445"), Some((6, 18)));
        assert_eq!(parse_release("5.15.0-91-generic"), Some((5, 15)));
        assert_eq!(parse_release("garbage"), None);
    }

    #[test]
    fn capabilities_sys_admin_covers_bpf_and_perfmon() {
        assert!(missing_capabilities(1 << CAP_SYS_ADMIN | 1 << CAP_NET_ADMIN).is_empty());
        assert!(missing_capabilities(1 << CAP_BPF | 1 << CAP_PERFMON | 1 << CAP_NET_ADMIN).is_empty());
        assert_eq!(missing_capabilities(0), vec!["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"]);
        assert_eq!(
            missing_capabilities(1 << CAP_BPF | 1 << CAP_NET_ADMIN),
            vec!["CAP_PERFMON"]
        );
    }

    #[test]
    fn not_permitted_says_what_to_do() {
        let e = MonitorError::NotPermitted {
            missing: "CAP_BPF".into(),
        };
        let text = e.to_string();
        assert!(text.contains("CAP_BPF") && text.contains("NetlinkMonitor"), "{text}");
    }

    #[test]
    fn monitor_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Monitor>();
        check::<crate::EgressMonitor>();
    }
}
