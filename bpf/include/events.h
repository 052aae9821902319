/* Events: one ring-buffer record per dropped or passed packet, with what
 * the pipeline knew about it. A fixed window per (CPU, reason) caps the
 * rate, so a flood costs the fast path a counter increment, never a copy;
 * what the cap holds back and what a full ring refuses are both counted. */
#ifndef BPFROUTER_EVENTS_H
#define BPFROUTER_EVENTS_H

#include "observe.h"
#include "event_record.h"

/* Events per second per reason and CPU; set by the loader. */
const volatile __u32 event_rate = 100;
/* The kernel's CONFIG_HZ, for one-second windows in jiffies; set by the
 * loader (datapath/jiffies.py). */
const volatile __u32 jiffies_hz = 250;

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, REASON_MAX);
	__type(key, __u32);
	__type(value, struct event_window);
} event_windows SEC(".maps");

/* Counts the packet against its reason's window; 0: held back (counted). */
static __always_inline int event_allowed(__u32 reason)
{
	struct event_window *w = bpf_map_lookup_elem(&event_windows, &reason);
	__u64 now;

	if (!w)
		return 0;
	now = bpf_jiffies64();
	if (now - w->start_jiffies >= jiffies_hz) {
		w->start_jiffies = now;
		w->sent = 0;
	}
	if (w->sent >= event_rate) {
		obs_count(OBS_EVENTS_SUPPRESSED);
		return 0;
	}
	w->sent++;
	return 1;
}

/* The fast path reads only a route's type and next hop; an event, rare by
 * design, reads the route's leaf for its prefix length and protocol: IPv4
 * by looking the route up again, IPv6 from the slot the lookup found (a
 * second hash lookup here would not fit the stack: it is a call of its
 * own). */
static __always_inline void event_route_detail(struct event *e, __u32 slot6)
{
	struct route rt = {}, *lr;
	__u32 leaf6;
	__be32 d4;
	int found = 0;

	if (fib_mode != FIB_MODE_BPF || !e->route_type || e->route_proto)
		return;
	if (e->family == 4) {
		__builtin_memcpy(&d4, e->daddr, 4);
		found = fib_route4(d4, &rt, 1);
	} else if (e->family == 6 && fib_impl == FIB_IMPL_LPM) {
		found = lpm6_lookup(e->daddr, &rt);
	} else if (e->family == 6 && (leaf6 = h6_leaf_of(slot6, e->daddr)) &&
		   (lr = bpf_map_lookup_elem(&dir6_leaves, &leaf6))) {
		rt = *lr;
		found = 1;
	}
	if (found) {
		e->prefixlen = rt.prefixlen;
		e->route_proto = rt.proto;
	}
}

static __always_inline void event_emit(struct xdp_md *ctx, const struct obs_input *in)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct flow_key k = {};
	struct event *e;

	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		obs_count(OBS_EVENTS_LOST);
		return;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->ts_ns = bpf_ktime_get_ns();
	e->ifindex = ctx->ingress_ifindex;
	e->len = end - data;
	e->reason = in->reason;
	e->action = in->action;
	e->nh_id = in->nh_id;
	e->egress_ifindex = in->egress_ifindex;
	e->vlan_id = in->vlan_id;
	e->vlan_depth = in->vlan_depth;
	e->l3_proto = in->l3_proto;
	e->l4_proto = in->l4_proto;
	e->route_type = in->route_type;
	e->prefixlen = in->prefixlen;
	e->route_proto = in->route_proto;
	if ((void *)(eth + 1) <= end) {
		__builtin_memcpy(e->src_mac, eth->h_source, 6);
		__builtin_memcpy(e->dst_mac, eth->h_dest, 6);
	}
	e->family = flow_key_at(ctx, in, &k, &e->tcp_flags);
	if (e->family) {
		e->ttl = ttl_at(ctx, in->l3_off, in->l3_proto);
		__builtin_memcpy(e->saddr, k.saddr, 16);
		__builtin_memcpy(e->daddr, k.daddr, 16);
		e->sport = k.sport;
		e->dport = k.dport;
	}
	event_route_detail(e, in->slot6);
	bpf_ringbuf_submit(e, 0);
	obs_count(OBS_EVENTS_SENT);
}

#endif
