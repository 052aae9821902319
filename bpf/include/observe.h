/* What the observability stages share: which of them this program runs
 * (fixed at load), their counters, and the packet's decision they read. */
#ifndef BPFROUTER_OBSERVE_H
#define BPFROUTER_OBSERVE_H

#include "common.h"
#include "consts.h"
#include "parse.h"
#include "fib.h"

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

/* One packet's way through the pipeline. */
struct decision {
	struct pkt p;
	struct fib_result res;
	__u32 slot;
	int reason;
	int probe;
};

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
};

static __always_inline void obs_input_of(struct obs_input *in, const struct decision *d, int action)
{
	const struct pkt *p = &d->p;

	in->reason = d->reason;
	in->action = action;
	in->nh_id = d->res.nh_id;
	in->egress_ifindex = d->res.egress_ifindex;
	in->route_type = d->res.route_type;
	in->prefixlen = d->res.prefixlen;
	in->route_proto = d->res.route_proto;
	in->l3_proto = p->l3_proto;
	in->vlan_id = p->vlan_id[0];
	in->vlan_depth = p->vlan_depth;
	in->l4_proto = p->l4_proto;
	in->l3_off = p->l3_off;
	in->l4_off = p->l4_off;
}

/* The parsed view again, from offsets, with fresh bounds checks. */
static __always_inline void obs_pkt(struct xdp_md *ctx, const struct obs_input *in, struct pkt *p)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	void *l3 = data + (in->l3_off & 0x1ff);
	void *l4 = data + (in->l4_off & 0x3ff);

	p->data = data;
	p->data_end = end;
	p->len = end - data;
	p->l3_proto = in->l3_proto;
	p->l4_proto = in->l4_proto;
	p->vlan_id[0] = in->vlan_id;
	p->vlan_depth = in->vlan_depth;
	if (data + sizeof(struct ethhdr) <= end)
		p->eth = data;
	if (in->l3_off && in->l3_proto == ETH_P_IP && l3 + sizeof(struct iphdr) <= end)
		p->ip4 = l3;
	else if (in->l3_off && in->l3_proto == ETH_P_IPV6 && l3 + sizeof(struct ipv6hdr) <= end)
		p->ip6 = l3;
	if (in->l4_off && l4 + 8 <= end)
		p->l4 = l4;
}

static __always_inline __u8 pkt_tcp_flags(const struct pkt *p)
{
	struct tcphdr *th = p->l4;

	if (!th || p->l4_proto != IPPROTO_TCP || (void *)(th + 1) > p->data_end)
		return 0;
	return ((__u8 *)th)[13];
}

/* L4 identifiers: ports, or for ICMP type<<8|code and the echo id. */
static __always_inline void pkt_ports(const struct pkt *p, __u16 *sport, __u16 *dport)
{
	__u8 *l4 = p->l4;

	if (!l4 || (void *)(l4 + 8) > p->data_end)
		return;
	if (p->l4_proto == IPPROTO_TCP || p->l4_proto == IPPROTO_UDP) {
		*sport = bpf_ntohs(*(__be16 *)l4);
		*dport = bpf_ntohs(*(__be16 *)(l4 + 2));
	} else if (p->l4_proto == IPPROTO_ICMP || p->l4_proto == IPPROTO_ICMPV6) {
		*sport = (__u16)l4[0] << 8 | l4[1];
		*dport = bpf_ntohs(*(__be16 *)(l4 + 4));
	}
}

/* Copies the addresses (IPv4 in the first 4 bytes) and returns 4, 6 or 0. */
static __always_inline __u8 pkt_addrs(const struct pkt *p, __u8 *saddr, __u8 *daddr)
{
	if (p->ip4) {
		__builtin_memcpy(saddr, &p->ip4->saddr, 4);
		__builtin_memcpy(daddr, &p->ip4->daddr, 4);
		return 4;
	}
	if (p->ip6) {
		__builtin_memcpy(saddr, &p->ip6->saddr, 16);
		__builtin_memcpy(daddr, &p->ip6->daddr, 16);
		return 6;
	}
	return 0;
}

#endif
