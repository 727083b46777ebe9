//! User-space mirror of `bpf/lowtide.h`, read from the mmapped map.

use std::sync::atomic::AtomicU64;

/// `LT_OWN_PORT_WORDS` in `bpf/lowtide.h`: the own-port bitmap's 64-bit words.
pub(crate) const OWN_PORT_WORDS: u32 = 1024;
const _: () = assert!(OWN_PORT_WORDS as usize * 64 == 1 << 16);

/// `LT_FLAG_QDISC_PERCPU`: the root qdisc keeps per-CPU statistics.
pub(crate) const FLAG_QDISC_PERCPU: u64 = 1;
/// `LT_FLAG_QDISC_CHILD`: events came from a child of a multiqueue root.
pub(crate) const FLAG_QDISC_CHILD: u64 = 2;

/// `struct lt_egress`. Every field is a `u64` the BPF programs write and user
/// space reads with single atomic loads.
#[repr(C)]
pub(crate) struct EgressRecord {
    pub seq: AtomicU64,
    pub backlog_bytes: AtomicU64,
    pub backlog_packets: AtomicU64,
    pub drops: AtomicU64,
    pub requeues: AtomicU64,
    pub overlimits: AtomicU64,
    pub qdisc_handle: AtomicU64,
    pub updated_ns: AtomicU64,
    pub enqueue_events: AtomicU64,
    pub dequeue_events: AtomicU64,
    pub own_bytes: AtomicU64,
    pub own_packets: AtomicU64,
    pub other_bytes: AtomicU64,
    pub other_packets: AtomicU64,
    pub flags: AtomicU64,
    pub small_bytes: AtomicU64,
    pub small_packets: AtomicU64,
}

/// Size of `struct lt_egress`: 17 `__u64` fields. Changing one side without
/// the other breaks the build here.
pub(crate) const EGRESS_RECORD_BYTES: usize = 17 * 8;
const _: () = assert!(std::mem::size_of::<EgressRecord>() == EGRESS_RECORD_BYTES);
const _: () = assert!(std::mem::align_of::<EgressRecord>() == 8);
