/* Probe packets: `bpfrouter route get` runs a crafted packet through the
 * live program with BPF_PROG_TEST_RUN and puts this struct in the XDP
 * metadata area in front of it. The program writes its decision back there
 * (BPF_PROG_TEST_RUN returns data from data_meta on) and does not count
 * the packet. Frames from the wire never carry metadata into this hook,
 * so real traffic cannot take this path. */
#ifndef BPFROUTER_PROBE_H
#define BPFROUTER_PROBE_H

#include "common.h"

#define PROBE_MAGIC 0x4252504fU  /* "BRPO" */
#define PROBE_F_NEIGH 1          /* a neighbor entry was found */

struct probe_meta {     /* 32 bytes: all XDP metadata can hold */
	__u32 magic;            /* PROBE_MAGIC in; out: a multipath route's group (nexthop.h) */
	__u32 nh_id;            /* in: the packet's fwmark */
	__u32 egress_ifindex;
	__u32 hash;             /* a multipath route's: the flow hash */
	__u8 reason;
	__u8 route_type;
	__u8 prefixlen;
	__u8 route_proto;
	__u8 flags;
	__u8 reserved;
	__u16 bucket;           /* a multipath route's: the bucket taken */
	/* what the parser found */
	__u16 l3_off;           /* 0: no IP header */
	__u16 l4_off;           /* 0: no L4 header */
	__u16 rule;             /* the rule that decided, + 1 (0: no rule walk) */
	__u8 l4_proto;
	__u8 vlan_depth;
};

static __always_inline struct probe_meta *probe_from_ctx(struct xdp_md *ctx)
{
	struct probe_meta *meta = (void *)(long)ctx->data_meta;

	if ((void *)(meta + 1) > (void *)(long)ctx->data)
		return NULL;
	return meta->magic == PROBE_MAGIC ? meta : NULL;
}

#endif
