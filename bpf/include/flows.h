/* The flow table: packets, bytes, first/last seen, TCP flags and the last
 * verdict per (addresses, ports, protocol, VLAN). An LRU hash: when full,
 * the least recently used flow is evicted, so the table never refuses a new
 * flow; evictions are flows created minus flows present. Per-CPU values: the
 * fast path never writes a cache line another CPU writes. */
#ifndef BPFROUTER_FLOWS_H
#define BPFROUTER_FLOWS_H

#include "observe.h"

#define FLOW_TABLE_SIZE 65536

struct flow_key {
	__u8 saddr[16];         /* IPv4: first 4 bytes */
	__u8 daddr[16];
	__u16 sport;            /* ports, or ICMP type<<8|code ... */
	__u16 dport;            /* ... and echo id */
	__u16 vlan_id;
	__u8 l4_proto;
	__u8 family;            /* 4 or 6 */
};

struct flow {
	__u64 packets;
	__u64 bytes;
	__u64 first_ns;         /* bpf_ktime_get_coarse_ns(), this CPU's first packet */
	__u64 last_ns;
	__u32 ifindex;          /* ingress of the last packet */
	__u32 egress_ifindex;
	__u16 reason;           /* of the last packet */
	__u8 action;
	__u8 tcp_flags;         /* every flag seen */
	__u32 reserved;
};

/* A new flow's initial value, from .rodata rather than the stack: the
 * observers' stack frame sits on top of the pipeline's. */
static const struct flow flow_zero = {};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_PERCPU_HASH);
	__uint(max_entries, FLOW_TABLE_SIZE);
	__type(key, struct flow_key);
	__type(value, struct flow);
} flows SEC(".maps");

static __always_inline void flow_account(struct xdp_md *ctx, const struct obs_input *in,
					const struct pkt *p)
{
	struct flow_key k = {};
	struct flow *f;
	__u64 now;

	k.family = pkt_addrs(p, k.saddr, k.daddr);
	if (!k.family)
		return;
	k.l4_proto = p->l4_proto;
	k.vlan_id = p->vlan_id[0];
	pkt_ports(p, &k.sport, &k.dport);
	now = bpf_ktime_get_coarse_ns();
	f = bpf_map_lookup_elem(&flows, &k);
	if (!f) {
		/* other CPUs' slots of a new entry start zeroed */
		if (bpf_map_update_elem(&flows, &k, &flow_zero, BPF_NOEXIST) == 0)
			obs_count(OBS_FLOWS_CREATED);
		f = bpf_map_lookup_elem(&flows, &k);
		if (!f) {
			obs_count(OBS_FLOWS_FAILED);
			return;
		}
	}
	if (!f->first_ns)
		f->first_ns = now;
	f->last_ns = now;
	f->packets++;
	f->bytes += p->len;
	f->ifindex = ctx->ingress_ifindex;
	f->egress_ifindex = in->egress_ifindex;
	f->reason = in->reason;
	f->action = in->action;
	f->tcp_flags |= pkt_tcp_flags(p);
}

#endif
