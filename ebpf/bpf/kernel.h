/* The few kernel structures the Lowtide programs read, written by hand.
 *
 * Every struct is marked preserve_access_index: clang emits CO-RE relocations
 * for each field access and the loader (aya) fixes the offsets against the
 * running kernel's BTF (/sys/kernel/btf/vmlinux). Only the names of structs and
 * fields matter here, not their layout or completeness; list only what is read.
 */
#ifndef LOWTIDE_KERNEL_H
#define LOWTIDE_KERNEL_H

#include <linux/types.h>

#define PAI __attribute__((preserve_access_index))

struct ns_common {
	unsigned int inum;
} PAI;

struct net {
	struct ns_common ns;
} PAI;

typedef struct {
	struct net *net;
} PAI possible_net_t;

struct net_device {
	int ifindex;
	possible_net_t nd_net;
} PAI;

struct netdev_queue {
	struct net_device *dev;
} PAI;

struct qdisc_skb_head {
	__u32 qlen;
} PAI;

struct gnet_stats_queue {
	__u32 qlen;
	__u32 backlog;
	__u32 drops;
	__u32 requeues;
	__u32 overlimits;
} PAI;

struct sk_buff;

struct Qdisc {
	unsigned int flags;
	__u32 handle;
	__u32 parent;
	struct netdev_queue *dev_queue;
	struct qdisc_skb_head q;
	struct gnet_stats_queue qstats;
} PAI;

/* Qdisc flags (include/net/sch_generic.h), stable since 4.x/5.x. */
#define TCQ_F_CPUSTATS 0x20
#define TCQ_F_NOLOCK 0x100
#ifndef TC_H_ROOT
#define TC_H_ROOT 0xFFFFFFFFU
#endif

#endif
