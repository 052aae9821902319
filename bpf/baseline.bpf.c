// SPDX-License-Identifier: GPL-2.0
/* Small helper programs for benchmarks: the empty-program baseline, a
 * counting sink, the live-frames traffic generator (XDP_TX) and the minimal
 * forwarder (the floor of any XDP router's per-packet cost). */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

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

/* The minimal forwarder: parse Ethernet and IPv4/IPv6, one fixed next hop
 * (set by the loader), TTL or hop limit decremented with the IPv4 checksum
 * updated incrementally, devmap redirect. What no XDP router can skip, so
 * bpfrouter's pipeline is reported as a ratio to it. It counts what it
 * forwards, as bpfrouter does, so that a benchmark can check every packet
 * was forwarded. */
const volatile __u8 floor_dmac[ETH_ALEN] = {};
const volatile __u8 floor_smac[ETH_ALEN] = {};
const volatile __u32 floor_ifindex = 0;

struct {
	__uint(type, BPF_MAP_TYPE_DEVMAP_HASH);
	__uint(max_entries, 8);
	__type(key, __u32);
	__type(value, __u32);
} floor_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} floor_forwarded SEC(".maps");

SEC("xdp")
int xdp_fwd_floor(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	__u32 k = 0;
	__u64 *n;

	if ((void *)(eth + 1) > end)
		return XDP_PASS;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *iph = (void *)(eth + 1);
		__u32 check;

		if ((void *)(iph + 1) > end || iph->ttl <= 1)
			return XDP_PASS;
		check = (__u32)iph->check + (__u32)bpf_htons(0x0100);
		iph->check = (__sum16)(check + (check >= 0xFFFF));
		iph->ttl--;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6h = (void *)(eth + 1);

		if ((void *)(ip6h + 1) > end || ip6h->hop_limit <= 1)
			return XDP_PASS;
		ip6h->hop_limit--;
	} else {
		return XDP_PASS;
	}
#pragma unroll
	for (int i = 0; i < ETH_ALEN; i++) {
		eth->h_dest[i] = floor_dmac[i];
		eth->h_source[i] = floor_smac[i];
	}
	n = bpf_map_lookup_elem(&floor_forwarded, &k);
	if (n)
		(*n)++;
	return bpf_redirect_map(&floor_ports, floor_ifindex, 0);
}

char _license[] SEC("license") = "GPL";
