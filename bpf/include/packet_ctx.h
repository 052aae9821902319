/* The per-packet context: what one stage tells the next about the packet.
 * Scalars only (offsets, protocols, the ingress slot, the FIB result, the
 * reason and action): a packet pointer cannot cross a tail call, so each
 * stage rebuilds the pointers it needs from the offsets (pkt_restore).
 *
 * It lives in a per-CPU array of one element. An XDP program runs to its
 * verdict on one CPU without being preempted by another XDP program there,
 * and every packet's entry stage rewrites the whole context, so the slot is
 * this packet's from entry to verdict. XDP metadata (bpf_xdp_adjust_meta)
 * was the other candidate: it holds at most 32 bytes, which the probe header
 * of `route get` already fills, and it costs a helper call per packet where
 * the array's lookup is inlined to a few instructions. */
#ifndef BPFROUTER_PACKET_CTX_H
#define BPFROUTER_PACKET_CTX_H

#include "common.h"
#include "consts.h"
#include "parse.h"
#include "fib.h"
#include "iface.h"

/* What a stage returns when it has not decided the packet (else: a reason). */
#define STAGE_NEXT (-1)         /* go on with the next stage */
#define STAGE_SKIP_NEXT (-2)    /* go on past the next stage (list.h says which that is) */
#define STAGE_TO_POLICY (-3)    /* to the policy stage: the walk starts, or the rule's table did not decide */
#define STAGE_TO_FIB (-4)       /* to the fib stage: local and main as one, no rules to walk */

#define PCTX_F_IP_OPTIONS 1     /* IPv4 header carries options */
#define PCTX_F_HOP_BY_HOP 2     /* IPv6 hop-by-hop header present */
#define PCTX_F_FRAGMENT 4       /* an IP fragment */
#define PCTX_F_LB 8             /* encapsulated or translated by the load balancer (stages/lb.h) */
#define PCTX_F_LB_SNAT 16       /* ... to the router's own source: the kernel would not forward it */
#define PCTX_F_LB_ENCAP 32      /* ... encapsulated for DSR: over the MTU, answered (lb_toobig.h) */
#define PCTX_F_ORIGINATED 64    /* the router's own header (an outer one, an ICMP answer): leaves with its TTL */

struct packet_ctx {
	__u32 len;              /* frame length */
	__u32 slot;             /* ingress counter slot, 0: unknown interface */
	__s32 reason;           /* -1 until a stage decides */
	__u32 action;           /* XDP action once decided */
	__u16 l3_off;           /* 0: no IP header */
	__u16 l4_off;           /* 0: no L4 header */
	__u16 l3_proto;         /* host order ethertype after VLAN tags */
	__u16 vlan_id[MAX_VLAN_DEPTH];
	__u8 l4_proto;
	__u8 vlan_depth;
	__u8 flags;             /* PCTX_F_* */
	__u8 probe;             /* a `route get` probe (probe.h): report, don't count */
	__u16 iface_flags;     /* the ingress's enum iface_flag (iface.h) */
	/* policy routing (stages/policy.h) */
	__u32 table;            /* the table fib looks up; 0: local and main as one, no rules */
	__u32 mark;             /* the fwmark: 0 from the wire (nothing set one yet), a probe's own */
	__u16 rule;             /* the rule whose action decides or is under way */
	__u16 rule_next;        /* where the rule walk goes on */
	__u8 rounds;            /* policy stage runs so far */
	__u8 bank;              /* the rule bank of the first round */
	__u16 lb_service;       /* PCTX_F_LB_ENCAP: the service's id, for its counters */
	__u8 lb_addr;           /* what entry found the destination to be to the load balancer (LB_ADDR_*) */
	struct fib_result res;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct packet_ctx);
} packet_ctx_scratch SEC(".maps");

static __always_inline struct packet_ctx *packet_ctx_get(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&packet_ctx_scratch, &zero);
}

/* The parser's findings, as scalars. */
static __always_inline void packet_ctx_save(struct packet_ctx *pc, const struct pkt *p)
{
	pc->len = p->len;
	pc->l3_off = p->l3_off;
	pc->l4_off = p->l4_off;
	pc->l3_proto = p->l3_proto;
	pc->vlan_id[0] = p->vlan_id[0];
	pc->vlan_id[1] = p->vlan_id[1];
	pc->vlan_depth = p->vlan_depth;
	pc->l4_proto = p->l4_proto;
	pc->flags = (p->ip_options ? PCTX_F_IP_OPTIONS : 0) | (p->hop_by_hop ? PCTX_F_HOP_BY_HOP : 0) |
		    (p->fragment ? PCTX_F_FRAGMENT : 0);
}

/* Where routing starts for a packet no earlier stage took: the policy
 * stage for a family with rules to walk, else fib. A family whose rules
 * the walk cannot follow (bpfrouter/policy/) is passed; bpf_fib_lookup
 * (FIB_MODE_KERNEL) applies the rules itself. */
static __always_inline int route_start(const struct packet_ctx *pc, int ip4)
{
	if (fib_mode != FIB_MODE_BPF)
		return STAGE_TO_FIB;
	if (pc->iface_flags & (ip4 ? IFACE_F_PASS_POLICY4 : IFACE_F_PASS_POLICY6))
		return REASON_PASS_POLICY;
	return pc->iface_flags & (ip4 ? IFACE_F_RULES4 : IFACE_F_RULES6) ? STAGE_TO_POLICY : STAGE_TO_FIB;
}

/* The parsed view again, in a later stage: the Ethernet and IP headers (and
 * the first 8 bytes of L4, ports or ICMP type) from the saved offsets. The
 * frame is the one the entry stage parsed, so the checks cannot fail; the
 * verifier needs them. Returns -1, or a DROP_* reason if they did. */
static __always_inline int pkt_restore(struct xdp_md *ctx, const struct packet_ctx *pc, struct pkt *p)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	void *l3 = data + (pc->l3_off & 0xff);
	void *l4 = data + (pc->l4_off & 0x3ff);

	p->data = data;
	p->data_end = end;
	p->len = pc->len;
	p->l3_off = pc->l3_off;
	p->l4_off = pc->l4_off;
	p->l3_proto = pc->l3_proto;
	p->vlan_id[0] = pc->vlan_id[0];
	p->vlan_id[1] = pc->vlan_id[1];
	p->vlan_depth = pc->vlan_depth;
	p->l4_proto = pc->l4_proto;
	p->ip_options = !!(pc->flags & PCTX_F_IP_OPTIONS);
	p->hop_by_hop = !!(pc->flags & PCTX_F_HOP_BY_HOP);
	p->fragment = !!(pc->flags & PCTX_F_FRAGMENT);
	if (data + sizeof(struct ethhdr) > end)
		return REASON_DROP_TRUNC_L2;
	p->eth = data;
	if (!pc->l3_off)
		return -1;
	if (pc->l3_proto == ETH_P_IP) {
		if (l3 + sizeof(struct iphdr) > end)
			return REASON_DROP_TRUNC_L3;
		p->ip4 = l3;
	} else if (pc->l3_proto == ETH_P_IPV6) {
		if (l3 + sizeof(struct ipv6hdr) > end)
			return REASON_DROP_TRUNC_L3;
		p->ip6 = l3;
	}
	if (pc->l4_off && l4 + 8 <= end)
		p->l4 = l4;
	return -1;
}

#endif
