//! The figures a monitor publishes, independent of how they were read.

/// Where the queue figures of a sample came from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SampleSource {
    /// The BPF qdisc tracepoints, read from shared memory (no syscall).
    #[default]
    Bpf,
    /// An rtnetlink `RTM_GETQDISC` request (one syscall round trip per sample).
    Netlink,
}

/// Bytes and packets handed to the interface for transmission, split into
/// Lowtide's own traffic (UDP source port marked with `add_own_port`), other
/// traffic in small packets (at most [`SMALL_PACKET_BYTES`] each: TCP's pure
/// ACKs of a download, DNS, keep-alives, which do not compete for the link) and
/// the rest. Counted before the qdisc, so packets the qdisc later drops are
/// included. Cumulative since the monitor attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TrafficSplit {
    pub own_bytes: u64,
    pub own_packets: u64,
    pub other_bytes: u64,
    pub other_packets: u64,
    pub small_bytes: u64,
    pub small_packets: u64,
}

/// `LT_SMALL_PACKET_BYTES` in `bpf/lowtide.h`: other traffic in wire packets of at
/// most this many bytes (Ethernet header included) is counted as `small_*`.
pub const SMALL_PACKET_BYTES: u64 = 128;

/// One reading of the egress path of an interface.
///
/// `backlog_*` is the root qdisc's queue at the time of the last enqueue or
/// dequeue (BPF) or of the request (netlink); `drops`, `overlimits` and the
/// traffic counters are cumulative, so rates come from the difference of two
/// samples. With BPF, a drop is published at the next enqueue or dequeue on the
/// interface, so `drops` can lag by one packet's transmission time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EgressSample {
    pub backlog_source: SampleSource,
    pub backlog_bytes: u64,
    pub backlog_packets: u64,
    pub drops: u64,
    pub overlimits: u64,
    pub requeues: u64,
    /// Own vs other traffic; `None` when no BPF classifier is attached.
    pub traffic: Option<TrafficSplit>,
}
