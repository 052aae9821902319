// SPDX-License-Identifier: GPL-2.0
/* The per-packet benchmark harness (bench/common.py PacketBench). One
 * BPF_PROG_TEST_RUN with `repeat` N runs bench_packet4/6 N times; each run
 * gives the test frame the next destination of a table (and the Ethernet
 * header, TTL and IPv4 checksum the forwarder rewrote last time), then
 * tail-calls the program under test: a router's attached entry program, the
 * minimal forwarder (baseline.bpf.c) or xdp_pass (the harness's own cost).
 * So a figure is what the attached program costs a packet, from parse to
 * verdict, whatever its inner structure (inline, global functions, tail
 * calls), and the program's own counters say what verdict each packet got.
 * (The test run's own repeat would reuse the rewritten frame: after 63 runs
 * every packet would be a TTL expiry.) */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_helpers.h>
#include "include/benchdst.h"

/* Slot 0: the program under test. */
struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} bench_target SEC(".maps");

const volatile __u32 bench_n = 1;          /* destinations in the table */
const volatile __u8 bench_eth[ETH_HLEN] = {};
const volatile __u32 bench_len = 0;        /* the frame's length: what an encapsulation added goes */
const volatile __u8 bench_set_src = 0;     /* the table holds sources (new flows to one destination) */

struct bench_state {
	__u32 next;             /* the next destination's index */
	__u32 pad;
	__u64 runs;             /* runs that reached the tail call */
};

/* In its own section: the reader finds it as the map ".data.bench". */
struct bench_state bench_state SEC(".data.bench");

static __always_inline __u32 next_index(void)
{
	__u32 i = bench_state.next;

	bench_state.next = i + 1 >= bench_n ? 0 : i + 1;
	return i;
}

static __always_inline int reset_eth(struct ethhdr *eth)
{
	/* volatile loads: a memcpy would let clang fold the zero initializer */
#pragma unroll
	for (int i = 0; i < ETH_HLEN; i++)
		((__u8 *)eth)[i] = bench_eth[i];
	return 0;
}

/* The load balancer put an outer header in front of the frame last time:
 * take it off again (the client's packet behind it is unchanged). */
static __always_inline int restore_len(struct xdp_md *ctx)
{
	__u32 len = ctx->data_end - ctx->data;

	if (bench_len && len > bench_len && bpf_xdp_adjust_head(ctx, len - bench_len))
		return -1;
	return 0;
}

static __always_inline int run_target(struct xdp_md *ctx)
{
	bench_state.runs++;
	bpf_tail_call(ctx, &bench_target, 0);
	return XDP_ABORTED;     /* no program under test */
}

SEC("xdp")
int bench_packet4(struct xdp_md *ctx)
{
	void *data, *end;
	struct iphdr *iph;
	__u32 i = next_index();
	struct dst4 *d = bpf_map_lookup_elem(&bench_dst4, &i);

	if (restore_len(ctx))
		return XDP_ABORTED;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	iph = data + ETH_HLEN;
	if (!d || (void *)(iph + 1) > end)
		return XDP_ABORTED;
	reset_eth(data);
	iph->ttl = 64;
	if (bench_set_src)
		iph->saddr = d->addr;
	else
		iph->daddr = d->addr;
	iph->check = d->check;
	return run_target(ctx);
}

SEC("xdp")
int bench_packet6(struct xdp_md *ctx)
{
	void *data, *end;
	struct ipv6hdr *ip6h;
	__u32 i = next_index();
	struct dst6 *d = bpf_map_lookup_elem(&bench_dst6, &i);

	if (restore_len(ctx))
		return XDP_ABORTED;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	ip6h = data + ETH_HLEN;
	if (!d || (void *)(ip6h + 1) > end)
		return XDP_ABORTED;
	reset_eth(data);
	ip6h->hop_limit = 64;
	if (bench_set_src)
		__builtin_memcpy(&ip6h->saddr, d->addr, 16);
	else
		__builtin_memcpy(&ip6h->daddr, d->addr, 16);
	return run_target(ctx);
}

char _license[] SEC("license") = "GPL";
