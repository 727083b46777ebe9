// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
/* Lowtide egress monitor: per watched interface, the root qdisc's backlog and
 * drops (from the qdisc_enqueue/qdisc_dequeue BTF tracepoints) and the bytes
 * and packets of Lowtide's own vs other traffic leaving the interface (a tcx
 * egress classifier). Everything is published into entry 0 of the mmapable
 * `egress` array so that user space reads it without a syscall.
 *
 * One object is loaded per watched interface; the interface is fixed at load
 * time through the read-only globals below. The tracepoints fire for every
 * network namespace on the machine, so events are filtered by netns inode and
 * ifindex.
 */
#include <linux/types.h>
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/in.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_endian.h>

#include "kernel.h"
#include "lowtide.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Set by the loader: the watched interface. */
const volatile __u32 target_netns = 0;
const volatile __u32 target_ifindex = 0;

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct lt_egress);
} egress SEC(".maps");

/* UDP source ports of Lowtide's own traffic: a 65536-bit bitmap, bit
 * (port & 63) of entry (port >> 6). The verifier inlines array lookups, so
 * the per-packet test is a load and a mask. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, LT_OWN_PORT_WORDS);
	__type(key, __u32);
	__type(value, __u64);
} own_ports SEC(".maps");

static __always_inline struct lt_egress *record(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&egress, &zero);
}

/* Publishes the root qdisc's statistics if `q` belongs to the watched
 * interface. Runs under the qdisc's root lock for locked qdiscs. */
static __always_inline void snapshot(struct Qdisc *q, int dequeue)
{
	struct net_device *dev = q->dev_queue->dev;

	if (dev->ifindex != (int)target_ifindex)
		return;
	if (dev->nd_net.net->ns.inum != target_netns)
		return;
	struct lt_egress *r = record();
	if (!r)
		return;
	if (q->parent != TC_H_ROOT) {
		__sync_fetch_and_or(&r->flags, LT_FLAG_QDISC_CHILD);
		return;
	}
	unsigned int qflags = q->flags;
	if (qflags & (TCQ_F_CPUSTATS | TCQ_F_NOLOCK)) {
		/* No lock serialises writers and the totals live per CPU. */
		__sync_fetch_and_or(&r->flags, LT_FLAG_QDISC_PERCPU);
		return;
	}
	if (dequeue)
		__sync_fetch_and_add(&r->dequeue_events, 1);
	else
		__sync_fetch_and_add(&r->enqueue_events, 1);

	__sync_fetch_and_add(&r->seq, 1); /* odd: writing; full barrier */
	r->backlog_bytes = q->qstats.backlog;
	r->backlog_packets = q->q.qlen;
	r->drops = q->qstats.drops;
	r->requeues = q->qstats.requeues;
	r->overlimits = q->qstats.overlimits;
	r->qdisc_handle = q->handle;
	r->updated_ns = bpf_ktime_get_ns();
	__sync_fetch_and_add(&r->seq, 1); /* even: done; full barrier */
}

SEC("tp_btf/qdisc_enqueue")
int BPF_PROG(lt_qdisc_enqueue, struct Qdisc *q, const struct netdev_queue *txq, struct sk_buff *skb)
{
	snapshot(q, 0);
	return 0;
}

SEC("tp_btf/qdisc_dequeue")
int BPF_PROG(lt_qdisc_dequeue, struct Qdisc *q, const struct netdev_queue *txq, int packets, struct sk_buff *skb)
{
	snapshot(q, 1);
	return 0;
}

/* Returns the UDP source port (network order) of an Ethernet/IPv4 or IPv6
 * frame, or 0 if the frame is not UDP. Reads the headers in place when they
 * are in the linear part of the skb (always, for locally sent UDP), else
 * copies them out. */
static __always_inline __u16 udp_source_port_slow(struct __sk_buff *skb)
{
	__u16 port = 0;
	__u32 l4;

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		__u8 vihl;
		__u8 proto;
		__be16 frag;
		if (bpf_skb_load_bytes(skb, ETH_HLEN, &vihl, 1) < 0)
			return 0;
		if (bpf_skb_load_bytes(skb, ETH_HLEN + offsetof(struct iphdr, protocol), &proto, 1) < 0)
			return 0;
		if (proto != IPPROTO_UDP)
			return 0;
		if (bpf_skb_load_bytes(skb, ETH_HLEN + offsetof(struct iphdr, frag_off), &frag, 2) < 0)
			return 0;
		if (frag & bpf_htons(0x1fff)) /* not the first fragment: no UDP header */
			return 0;
		l4 = ETH_HLEN + (vihl & 0x0f) * 4;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		__u8 next;
		if (bpf_skb_load_bytes(skb, ETH_HLEN + offsetof(struct ipv6hdr, nexthdr), &next, 1) < 0)
			return 0;
		if (next != IPPROTO_UDP) /* extension headers are not followed */
			return 0;
		l4 = ETH_HLEN + sizeof(struct ipv6hdr);
	} else {
		return 0;
	}
	if (bpf_skb_load_bytes(skb, l4 + offsetof(struct udphdr, source), &port, 2) < 0)
		return 0;
	return port;
}

static __always_inline __u16 udp_source_port(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = data + ETH_HLEN;
		if ((void *)(ip + 1) > end)
			return udp_source_port_slow(skb);
		if (ip->protocol != IPPROTO_UDP)
			return 0;
		if (ip->frag_off & bpf_htons(0x1fff))
			return 0;
		if (ip->ihl != 5) /* IP options: rare, take the careful path */
			return udp_source_port_slow(skb);
		struct udphdr *udp = (void *)(ip + 1);
		if ((void *)(udp + 1) > end)
			return udp_source_port_slow(skb);
		return udp->source;
	}
	if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = data + ETH_HLEN;
		if ((void *)(ip6 + 1) > end)
			return udp_source_port_slow(skb);
		if (ip6->nexthdr != IPPROTO_UDP)
			return 0;
		struct udphdr *udp = (void *)(ip6 + 1);
		if ((void *)(udp + 1) > end)
			return udp_source_port_slow(skb);
		return udp->source;
	}
	return 0;
}

static __always_inline int is_own_port(__u16 host_port)
{
	__u32 word = host_port >> 6;
	__u64 *bits = bpf_map_lookup_elem(&own_ports, &word);
	return bits && (*bits & (1ULL << (host_port & 63)));
}

SEC("classifier")
int lt_egress_classify(struct __sk_buff *skb)
{
	struct lt_egress *r = record();
	if (!r)
		return TC_ACT_OK;

	__u64 packets = skb->gso_segs ? skb->gso_segs : 1;
	__u64 bytes = skb->len;
	__u16 port = udp_source_port(skb);
	if (port) {
		if (is_own_port(bpf_ntohs(port))) {
			__sync_fetch_and_add(&r->own_bytes, bytes);
			__sync_fetch_and_add(&r->own_packets, packets);
			return TC_ACT_OK;
		}
	}
	if (bytes <= packets * LT_SMALL_PACKET_BYTES) {
		__sync_fetch_and_add(&r->small_bytes, bytes);
		__sync_fetch_and_add(&r->small_packets, packets);
		return TC_ACT_OK;
	}
	__sync_fetch_and_add(&r->other_bytes, bytes);
	__sync_fetch_and_add(&r->other_packets, packets);
	return TC_ACT_OK;
}
