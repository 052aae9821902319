// SPDX-License-Identifier: GPL-2.0
/* The backend's side of direct server return (bpfrouter/lb/decap.py,
 * `bpfrouter decap attach DEV`): XDP on a backend's port strips the outer
 * IPv4 or IPv6 header the load balancer added (include/encap.h) and hands
 * the client's packet to the kernel, which delivers it to the VIP on lo.
 * For backends whose kernel has no ipip or ip6tnl device (or to skip the
 * tunnel device's cost, as Katran's decap program does). Only outer
 * sources inside the load balancer's encapsulation prefixes are taken, so
 * nobody else can slip a packet with a forged inner source in (set at
 * attach: `decap attach --from`). GUE (variant 1: the IP packet right
 * after a UDP header to the GUE port, `decap attach --gue-port`) is
 * stripped the same way. Everything else passes untouched. */
#include "include/common.h"
#include "include/parse.h"

/* Outer sources taken: IPv4 under a mask, IPv6 by its first 12 bytes (a
 * /96: the load balancer puts the flow hash in the last 4). */
const volatile __be32 decap_src4 = 0;
const volatile __be32 decap_mask4 = 0xffffffff;     /* nothing, until the loader says */
const volatile __u8 decap_src6[12] = {};
const volatile __u8 decap_any6 = 0;                /* 1: any IPv6 outer source */
const volatile __u8 decap_no6 = 1;                 /* 1: no IPv6 outer source */
const volatile __be16 decap_gue_port = 0;          /* 0: no GUE */

static __always_inline int src6_ok(const struct ipv6hdr *o)
{
	if (decap_any6)
		return 1;
	if (decap_no6)
		return 0;
#pragma unroll
	for (int i = 0; i < 12; i++)
		if (o->saddr.in6_u.u6_addr8[i] != decap_src6[i])
			return 0;
	return 1;
}

enum decap_stat {
	DECAP_V4_IN_V4 = 0,
	DECAP_V6_IN_V4,
	DECAP_V4_IN_V6,
	DECAP_V6_IN_V6,
	DECAP_FAILED,           /* the frame could not shrink: passed as it came */
	DECAP_FOREIGN,          /* an outer source outside the prefixes: passed as it came */
	DECAP_GUE,              /* of the decapsulated, those in GUE */
	DECAP_STAT_MAX,
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, DECAP_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} decap_stats SEC(".maps");

const volatile enum decap_stat btf_anchor_decap_stat = DECAP_STAT_MAX;

static __always_inline void decap_count(__u32 stat)
{
	__u64 *n = bpf_map_lookup_elem(&decap_stats, &stat);

	if (n)
		(*n)++;
}

/* A GUE header after the outer IP header at `o` (`outer` bytes): the
 * inner protocol (IPIP or IPV6, by the first nibble, as variant 1 says),
 * *outer grown by the UDP header; 0 when it is not GUE to our port. */
static __always_inline __u8 gue_inner(void *o, void *end, __u32 *outer)
{
	struct udphdr *u = o + *outer;
	__u8 *first = (void *)(u + 1);

	if (!decap_gue_port || (void *)(first + 1) > end || u->dest != decap_gue_port)
		return 0;
	*outer += sizeof(*u);
	switch (*first >> 4) {
	case 4:
		return IPPROTO_IPIP;
	case 6:
		return IPPROTO_IPV6;
	}
	return 0;
}

SEC("xdp")
int bpfrouter_decap(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data, copy;
	__u32 outer, stat;
	__u8 inner, gue = 0;

	if ((void *)(eth + 1) > end)
		return XDP_PASS;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *o = (void *)(eth + 1);

		if ((void *)(o + 1) > end || o->ihl != 5 || (o->frag_off & bpf_htons(0x3FFF)))
			return XDP_PASS;   /* options or a fragment: the kernel's */
		inner = o->protocol;
		outer = sizeof(*o);
		if (inner == IPPROTO_UDP) {
			inner = gue_inner(o, end, &outer);
			gue = !!inner;
		}
		stat = inner == IPPROTO_IPIP ? DECAP_V4_IN_V4 : DECAP_V6_IN_V4;
		if ((inner == IPPROTO_IPIP || inner == IPPROTO_IPV6) && (o->saddr & decap_mask4) != decap_src4) {
			decap_count(DECAP_FOREIGN);
			return XDP_PASS;
		}
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *o = (void *)(eth + 1);

		if ((void *)(o + 1) > end)
			return XDP_PASS;
		inner = o->nexthdr;
		outer = sizeof(*o);
		if (inner == IPPROTO_UDP) {
			inner = gue_inner(o, end, &outer);
			gue = !!inner;
		}
		stat = inner == IPPROTO_IPIP ? DECAP_V4_IN_V6 : DECAP_V6_IN_V6;
		if ((inner == IPPROTO_IPIP || inner == IPPROTO_IPV6) && !src6_ok(o)) {
			decap_count(DECAP_FOREIGN);
			return XDP_PASS;
		}
	} else {
		return XDP_PASS;
	}
	if (inner != IPPROTO_IPIP && inner != IPPROTO_IPV6)
		return XDP_PASS;
	__builtin_memcpy(&copy, eth, sizeof(copy));
	copy.h_proto = bpf_htons(inner == IPPROTO_IPIP ? ETH_P_IP : ETH_P_IPV6);
	if (bpf_xdp_adjust_head(ctx, outer)) {
		decap_count(DECAP_FAILED);
		return XDP_PASS;
	}
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	eth = data;
	if ((void *)(eth + 1) > end) {  /* never, for a parsed outer header */
		decap_count(DECAP_FAILED);
		return XDP_DROP;
	}
	__builtin_memcpy(eth, &copy, sizeof(copy));
	decap_count(stat);
	if (gue)
		decap_count(DECAP_GUE);
	return XDP_PASS;
}

char _license[] SEC("license") = "GPL";
