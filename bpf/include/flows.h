/* The flow table: packets, bytes, first/last seen, TCP flags and the last
 * verdict per (addresses, ports, protocol, VLAN). An LRU hash: when full,
 * the least recently used flow is evicted, so the table never refuses a new
 * flow; evictions are flows created minus flows present. Per-CPU values: the
 * fast path never writes a cache line another CPU writes.
 *
 * In front of it, a per-CPU direct-mapped cache holds each recent flow's
 * counts not yet added to the table (its delta). A packet of a cached flow
 * costs a multiply-shift hash, an inlined array lookup and a key compare,
 * instead of a jhash, an LRU hash walk and a helper call. A packet whose
 * slot holds another flow adds that flow's delta to the table, makes sure
 * its own flow is in the table (created, first seen), and takes the slot.
 * Readers merge the table and the cache (telemetry.read_flows). */
#ifndef BPFROUTER_FLOWS_H
#define BPFROUTER_FLOWS_H

#include "observe.h"

#define FLOW_TABLE_SIZE 65536
#define FLOW_CACHE_BITS 10
#define FLOW_CACHE_SLOTS (1 << FLOW_CACHE_BITS)   /* per CPU */

struct flow {
	__u64 packets;
	__u64 bytes;
	__u64 first_jiffies;    /* bpf_jiffies64(): inlined, a load, where */
	__u64 last_jiffies;     /* ktime helpers cost ~20 ns a call here */
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

struct flow_slot {
	struct flow_key key;
	struct flow delta;      /* counts not yet in the table; packets 0: empty */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, FLOW_CACHE_SLOTS);
	__type(key, __u32);
	__type(value, struct flow_slot);
} flow_cache SEC(".maps");

/* Multiply-shift over the key's five 64-bit words; the destination is
 * rotated so that A->B and B->A land in different slots. */
static __always_inline __u32 flow_slot_index(const struct flow_key *k)
{
	const __u64 *w = (const __u64 *)k;
	__u64 h;

	h = (w[0] ^ (w[2] << 32 | w[2] >> 32)) * 0x9E3779B97F4A7C15ULL;
	h ^= (w[1] ^ w[3]) * 0xC2B2AE3D27D4EB4FULL;
	h ^= w[4] * 0x165667B19E3779F9ULL;
	return h >> (64 - FLOW_CACHE_BITS);
}

static __always_inline int flow_key_equal(const struct flow_key *a, const struct flow_key *b)
{
	const __u64 *x = (const __u64 *)a, *y = (const __u64 *)b;

	return ((x[0] ^ y[0]) | (x[1] ^ y[1]) | (x[2] ^ y[2]) | (x[3] ^ y[3]) | (x[4] ^ y[4])) == 0;
}

/* The table's entry for key on this CPU, inserted if new. */
static __always_inline struct flow *flow_entry(const struct flow_key *k, __u64 now)
{
	struct flow *f = bpf_map_lookup_elem(&flows, k);

	if (f)
		return f;
	/* other CPUs' slots of a new entry start zeroed */
	if (bpf_map_update_elem(&flows, k, &flow_zero, BPF_NOEXIST) == 0)
		obs_count(OBS_FLOWS_CREATED);
	f = bpf_map_lookup_elem(&flows, k);
	if (!f)
		obs_count(OBS_FLOWS_FAILED);
	else if (!f->first_jiffies)
		f->first_jiffies = now;
	return f;
}

/* Adds a slot's delta to the table. */
static __always_inline void flow_flush(struct flow_slot *s)
{
	struct flow *d = &s->delta;
	struct flow *f = flow_entry(&s->key, d->first_jiffies);

	if (!f)
		return;
	f->packets += d->packets;
	f->bytes += d->bytes;
	f->last_jiffies = d->last_jiffies;
	f->ifindex = d->ifindex;
	f->egress_ifindex = d->egress_ifindex;
	f->reason = d->reason;
	f->action = d->action;
	f->tcp_flags |= d->tcp_flags;
}

static __always_inline void flow_slot_add(struct flow *d, struct xdp_md *ctx, const struct obs_input *in,
					  __u8 tcp_flags, __u64 now)
{
	d->last_jiffies = now;
	d->packets++;
	d->bytes += (long)ctx->data_end - (long)ctx->data;
	d->ifindex = ctx->ingress_ifindex;
	d->egress_ifindex = in->egress_ifindex;
	d->reason = in->reason;
	d->action = in->action;
	d->tcp_flags |= tcp_flags;
}

/* The common case, inlined into the pipeline: the packet's flow holds its
 * slot. Returns 0 when the slot holds another flow (flow_account then). */
static __always_inline int flow_cached(struct xdp_md *ctx, const struct obs_input *in)
{
	struct flow_key k;      /* flow_key_at writes all of it */
	struct flow_slot *s;
	__u8 tcp_flags = 0;
	__u32 idx;

	if (!flow_key_at(ctx, in, &k, &tcp_flags))
		return 1;      /* nothing to account */
	idx = flow_slot_index(&k);
	s = bpf_map_lookup_elem(&flow_cache, &idx);
	if (!s || !s->delta.packets || !flow_key_equal(&s->key, &k))
		return 0;
	flow_slot_add(&s->delta, ctx, in, tcp_flags, bpf_jiffies64());
	return 1;
}

/* A packet flow_cached did not take: its slot holds another flow (or none).
 * The slot's flow goes to the table, this flow is made sure of there, and
 * takes the slot. */
static __always_inline void flow_account(struct xdp_md *ctx, const struct obs_input *in)
{
	struct flow_key k = {};
	struct flow_slot *s;
	struct flow *d;
	__u8 tcp_flags = 0;
	__u32 idx;
	__u64 now;

	if (!flow_key_at(ctx, in, &k, &tcp_flags))
		return;
	idx = flow_slot_index(&k);
	s = bpf_map_lookup_elem(&flow_cache, &idx);
	if (!s)
		return;
	now = bpf_jiffies64();
	d = &s->delta;
	if (d->packets)
		flow_flush(s);
	if (!flow_entry(&k, now))
		return;
	__builtin_memcpy(&s->key, &k, sizeof(k));
	d->packets = 0;
	d->bytes = 0;
	d->first_jiffies = now;
	d->tcp_flags = 0;
	flow_slot_add(d, ctx, in, tcp_flags, now);
}

#endif
