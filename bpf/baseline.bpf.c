// SPDX-License-Identifier: GPL-2.0
/* Small helper programs for benchmarks: the empty-program baseline, a
 * counting sink, and the live-frames traffic generator (XDP_TX). */
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

#define TX_FRAME_LEN 60
/* The frame the generator sends, set by the loader. */
const volatile __u8 tx_frame[TX_FRAME_LEN] = {};

/* Run with BPF_PROG_TEST_RUN and BPF_F_TEST_XDP_LIVE_FRAMES: every frame is
 * transmitted out of the ingress device, as xdp-trafficgen does. Live-frame
 * pages are recycled without being reset, and the router rewrote the last
 * frame sent from this page in place, so the frame is written anew each time. */
SEC("xdp")
int xdp_tx(struct xdp_md *ctx)
{
	__u8 *data = (void *)(long)ctx->data;

	if ((void *)(data + TX_FRAME_LEN) > (void *)(long)ctx->data_end)
		return XDP_ABORTED;
	/* volatile loads: a memcpy would let clang fold the zero initializer */
#pragma unroll
	for (int i = 0; i < TX_FRAME_LEN; i++)
		data[i] = tx_frame[i];
	return XDP_TX;
}

char _license[] SEC("license") = "GPL";
