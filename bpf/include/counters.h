/* Per-CPU packet and byte counters for every (ingress interface, reason). */
#ifndef BPFROUTER_COUNTERS_H
#define BPFROUTER_COUNTERS_H

#include "common.h"
#include "consts.h"

struct counter {
	__u64 packets;
	__u64 bytes;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_IFACES * REASON_MAX);
	__type(key, __u32);     /* slot * REASON_MAX + reason */
	__type(value, struct counter);
} counters SEC(".maps");

static __always_inline void count(__u32 slot, __u32 reason, __u32 len)
{
	__u32 idx = slot * REASON_MAX + reason;
	struct counter *c = bpf_map_lookup_elem(&counters, &idx);

	if (c) {
		c->packets++;
		c->bytes += len;
	}
}

#endif
