// SPDX-License-Identifier: GPL-2.0
/* Small helper programs: the empty-program baseline for benchmarks, the
 * XDP_PASS program the lab puts on host-side veths (a veth only accepts
 * redirected frames when its peer runs XDP), and a counting sink. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("xdp")
int xdp_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} sink_packets SEC(".maps");

/* Counts and drops: the far end of lab forwarding benchmarks. */
SEC("xdp")
int xdp_count_drop(struct xdp_md *ctx)
{
	__u32 k = 0;
	__u64 *n = bpf_map_lookup_elem(&sink_packets, &k);

	if (n)
		(*n)++;
	return XDP_DROP;
}

char _license[] SEC("license") = "GPL";
