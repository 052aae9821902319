/* What the observability stages share: which of them this program runs
 * (fixed at load), their counters, and the packet's decision they read. */
#ifndef BPFROUTER_OBSERVE_H
#define BPFROUTER_OBSERVE_H

#include "common.h"
#include "consts.h"
#include "packet_ctx.h"

#define OBS_F_EVENTS 1
#define OBS_F_FLOWS 2
#define OBS_F_CAPTURE 4

/* Set by the loader; a bit cleared removes that stage's code. */
const volatile __u32 observe_flags = OBS_F_EVENTS | OBS_F_FLOWS | OBS_F_CAPTURE;

enum obs_stat {
	OBS_EVENTS_SENT = 0,
	OBS_EVENTS_SUPPRESSED,  /* over the per-reason rate: not sent, by design */
	OBS_EVENTS_LOST,        /* ring buffer full: user space is behind */
	OBS_FLOWS_CREATED,      /* evictions = created - entries in the table */
	OBS_FLOWS_FAILED,       /* a new flow could not be inserted */
	OBS_CAPTURED,
	OBS_CAPTURE_LOST,       /* capture ring full: the packet went on uncaptured */
	OBS_STAT_MAX,
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, OBS_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} obs_stats SEC(".maps");

static __always_inline void obs_count(__u32 stat)
{
	__u64 *v = bpf_map_lookup_elem(&obs_stats, &stat);

	if (v)
		(*v)++;
}

/* What the observers get: the decision as scalars and header offsets, not
 * packet pointers. They run in one global function, verified once, instead
 * of once per path through the pipeline. */
struct obs_input {
	__u32 reason;
	__u32 action;
	__u32 nh_id;
	__u32 egress_ifindex;
	__u16 l3_off;           /* 0: no IP header parsed */
	__u16 l4_off;           /* 0: no L4 header parsed */
	__u16 l3_proto;
	__u16 vlan_id;
	__u8 l4_proto;
	__u8 vlan_depth;
	__u8 route_type;
	__u8 prefixlen;
	__u8 route_proto;
	__u8 flow_done;         /* the flow cache took this packet already */
	__u8 event;             /* the rate cap lets an event through */
	__u8 reserved;
	__u32 slot6;            /* fib_result.slot6 */
};

static __always_inline void obs_input_of(struct obs_input *in, const struct packet_ctx *pc)
{
	in->reason = pc->reason;
	in->action = pc->action;
	in->nh_id = pc->res.nh_id;
	in->egress_ifindex = pc->res.egress_ifindex;
	in->route_type = pc->res.route_type;
	in->prefixlen = pc->res.prefixlen;
	in->route_proto = pc->res.route_proto;
	in->slot6 = pc->res.slot6;
	in->l3_proto = pc->l3_proto;
	in->vlan_id = pc->vlan_id[0];
	in->vlan_depth = pc->vlan_depth;
	in->l4_proto = pc->l4_proto;
	in->l3_off = pc->l3_off;
	in->l4_off = pc->l4_off;
}

/* TTL or hop limit of the IP header at l3_off (0 when cut short). */
static __always_inline __u8 ttl_at(struct xdp_md *ctx, __u16 l3_off, __u16 l3_proto)
{
	void *l3 = (void *)(long)ctx->data + (l3_off & 0x1ff);
	void *end = (void *)(long)ctx->data_end;

	if (l3_proto == ETH_P_IP && l3 + sizeof(struct iphdr) <= end)
		return ((struct iphdr *)l3)->ttl;
	if (l3_proto == ETH_P_IPV6 && l3 + sizeof(struct ipv6hdr) <= end)
		return ((struct ipv6hdr *)l3)->hop_limit;
	return 0;
}

/* A packet's identity: the flow table's key, and what events report.
 * flow_key_at writes it as five 64-bit words, little-endian. */
struct flow_key {
	__u8 saddr[16];         /* IPv4: first 4 bytes */
	__u8 daddr[16];
	__u16 sport;            /* ports, or ICMP type<<8|code ... */
	__u16 dport;            /* ... and echo id */
	__u16 vlan_id;
	__u8 l4_proto;
	__u8 family;            /* 4 or 6 */
};

/* The packet's flow key and TCP flags, straight from the header offsets the
 * pipeline found (no parsed view rebuilt). The key is written as the five
 * 64-bit words that flow_slot_index and flow_key_equal read back: narrower
 * stores under a wider load defeat store-to-load forwarding, a stall of
 * about a dozen cycles per word. Returns the address family, 0 when the
 * packet has no flow (the key is then unwritten). */
static __always_inline __u8 flow_key_at(struct xdp_md *ctx, const struct obs_input *in, struct flow_key *k,
					__u8 *tcp_flags)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	__u16 l3_off = in->l3_off, l4_off = in->l4_off, l3_proto = in->l3_proto;
	__u8 l4_proto = in->l4_proto;
	void *l3 = data + (l3_off & 0x1ff);
	__u8 *l4 = data + (l4_off & 0x3ff);
	__u64 *w = (__u64 *)k;
	__u64 sport = 0, dport = 0, family;

	if (!l3_off)
		return 0;
	if (l3_proto == ETH_P_IP) {
		struct iphdr *ip = l3;

		if ((void *)(ip + 1) > end)
			return 0;
		w[0] = ip->saddr;
		w[1] = 0;
		w[2] = ip->daddr;
		w[3] = 0;
		family = 4;
	} else if (l3_proto == ETH_P_IPV6) {
		struct ipv6hdr *ip6 = l3;
		const __u32 *s = ip6->saddr.in6_u.u6_addr32, *d = ip6->daddr.in6_u.u6_addr32;

		if ((void *)(ip6 + 1) > end)
			return 0;
		w[0] = s[0] | (__u64)s[1] << 32;
		w[1] = s[2] | (__u64)s[3] << 32;
		w[2] = d[0] | (__u64)d[1] << 32;
		w[3] = d[2] | (__u64)d[3] << 32;
		family = 6;
	} else {
		return 0;
	}
	if (l4_off && (void *)(l4 + 8) <= end) {
		if (l4_proto == IPPROTO_TCP || l4_proto == IPPROTO_UDP) {
			sport = bpf_ntohs(*(__be16 *)l4);
			dport = bpf_ntohs(*(__be16 *)(l4 + 2));
			if (l4_proto == IPPROTO_TCP && (void *)(l4 + 14) <= end)
				*tcp_flags = l4[13];
		} else if (l4_proto == IPPROTO_ICMP || l4_proto == IPPROTO_ICMPV6) {
			sport = (__u16)l4[0] << 8 | l4[1];
			dport = bpf_ntohs(*(__be16 *)(l4 + 4));
		}
	}
	/* sport, dport, vlan_id, l4_proto, family: struct flow_key's last word */
	w[4] = sport | dport << 16 | (__u64)in->vlan_id << 32 | (__u64)l4_proto << 48 | family << 56;
	return family;
}

#endif
