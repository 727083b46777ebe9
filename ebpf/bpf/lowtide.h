/* Map value types shared between the BPF programs and the loader crate
 * (src/maps.rs mirrors them, with a compile-time size check). All fields are
 * 64-bit so that user space can read each one with a single atomic load from
 * the mmapped map.
 */
#ifndef LOWTIDE_H
#define LOWTIDE_H

#include <linux/types.h>

/* The own-port bitmap: 65536 bits in 64-bit words. */
#define LT_OWN_PORT_WORDS 1024

/* Other traffic whose wire packets are at most this long (Ethernet header
 * included) is counted apart: TCP's pure ACKs of a download, DNS, keep-alives.
 * A stream of them is not bulk traffic competing for the egress link. */
#define LT_SMALL_PACKET_BYTES 128

/* flags */
/* The root qdisc keeps per-CPU statistics (lockless qdiscs such as
 * pfifo_fast): its backlog cannot be read from BPF, use rtnetlink. */
#define LT_FLAG_QDISC_PERCPU 1ULL
/* Events were seen from a child qdisc (multiqueue root such as mq, whose
 * totals the kernel sums only when dumping): use rtnetlink for the backlog. */
#define LT_FLAG_QDISC_CHILD 2ULL

/* One watched interface: entry 0 of the `egress` array (BPF_F_MMAPABLE). */
struct lt_egress {
	/* Seqlock over the qdisc snapshot below: odd while a writer is inside.
	 * Writers are the qdisc tracepoints, which run under the root qdisc's
	 * lock, so there is at most one writer at a time. */
	__u64 seq;
	/* Snapshot of the root qdisc's statistics, taken after every enqueue and
	 * dequeue on the watched interface. */
	__u64 backlog_bytes;
	__u64 backlog_packets;
	__u64 drops;
	__u64 requeues;
	__u64 overlimits;
	__u64 qdisc_handle;
	/* bpf_ktime_get_ns() (CLOCK_MONOTONIC) of the last snapshot. */
	__u64 updated_ns;
	/* Tracepoint events that matched the interface (atomic adds). */
	__u64 enqueue_events;
	__u64 dequeue_events;
	/* Traffic handed to the interface's egress (tcx classifier, before the
	 * qdisc, so it includes what the qdisc later drops). Atomic adds. Packets
	 * are wire packets (GSO segments); bytes are skb->len. */
	__u64 own_bytes;
	__u64 own_packets;
	__u64 other_bytes;
	__u64 other_packets;
	/* LT_FLAG_* bits, set with atomic or. */
	__u64 flags;
	/* Other traffic of packets of at most LT_SMALL_PACKET_BYTES (not in
	 * other_bytes/other_packets). Atomic adds. */
	__u64 small_bytes;
	__u64 small_packets;
};

#endif
