// SPDX-License-Identifier: GPL-2.0
/* FIB benchmark programs (bench/fib.py). Each runs once through
 * BPF_PROG_TEST_RUN and loops over `bench_n` destinations in an mmapable
 * array, so every lookup sees a different address: duration / iterations
 * is the cost per lookup. The lookup loops are plain loops bounded by
 * may_goto, with no call per iteration; the pipeline loops use bpf_loop,
 * whose callback costs an indirect call and return per iteration (about 9 ns
 * here, with SRSO's return thunks). The loader points the FIB maps at a router's pinned
 * maps. Variants: an empty loop (the floor), the DIR FIB (and, for IPv4, its
 * root uncompressed, as forwarding read it until 2026-11-23), the LPM trie,
 * bpf_fib_lookup on the kernel FIB, and the whole router pipeline on a packet
 * whose destination changes every iteration. */
#include "include/pipeline.h"

#define BENCH_MAX (1 << 21)

struct dst6 {
	__u8 a[16];
};

/* An array map's elements are 8-byte aligned: spelled out, so that the
 * writer (bench/common.py) uses the same stride as the kernel. */
struct dst4 {
	__be32 a;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, BENCH_MAX);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct dst4);
} bench_dst4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, BENCH_MAX);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct dst6);
} bench_dst6 SEC(".maps");

/* The Ethernet header the pipeline variant restores before each run. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ethhdr);
} bench_eth SEC(".maps");

/* The kernel cuts a may_goto loop off after a time limit (250 ms on x86),
 * which 1M LPM lookups exceed: the reader sets where a run starts and reads
 * how far it got, and runs again from there until all bench_n are done. */
struct bench_state {
	__u64 from;
	__u64 done;             /* iterations the last run made */
};

/* A global in its own section (the reader finds it as ".data.bench"): no
 * stack, where a map lookup's key would push the pipeline loops' combined
 * stack past 512 bytes. */
struct bench_state bench_state SEC(".data.bench");

/* Random reads over a footprint the loader sizes (max_entries; 1 unless a
 * run asks): what one lookup's memory access costs at 64 MiB (the DIR
 * root) and at the sizes a compressed structure would have. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} bench_mem SEC(".maps");

/* IPv4's 24-bit root uncompressed, as forwarding read it until 2026-11-23:
 * the benchmark copies the agent's root here (the loader sizes it). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct dir_chunk);
} bench_root4 SEC(".maps");

const volatile __u32 bench_mem_mask = 0;  /* max_entries - 1, a power of two minus one */
const volatile __u32 bench_n = 0;
const volatile __u32 bench_ifindex = 0;  /* ingress for bpf_fib_lookup */
__u64 bench_sink = 0;                    /* keeps results alive */

struct loop_ctx {
	struct xdp_md *xdp;
	__u64 acc;
};

/* may_goto: the verifier checks the loop body without unrolling it; the
 * kernel bounds the iterations (and, on x86, the time) instead. */
#define can_loop                                                                \
	({                                                                      \
		__label__ l_break, l_continue;                                  \
		int ok = 1;                                                     \
		asm volatile goto("may_goto %l[l_break]" :::: l_break);        \
		goto l_continue;                                                \
	l_break:                                                                \
		ok = 0;                                                         \
	l_continue:                                                             \
		ok;                                                             \
	})

/* A lookup loop: one straight-line loop, no call per iteration. */
#define FAST_LOOP(name, map, type, body)                                        \
	SEC("xdp")                                                              \
	int name(struct xdp_md *ctx)                                            \
	{                                                                       \
		struct loop_ctx cc = { .xdp = ctx }, *c = &cc;                  \
		__u32 i, from = bench_state.from;                               \
                                                                                \
		for (i = from; i < bench_n && can_loop; i++) {                  \
			type *d = bpf_map_lookup_elem(&map, &i);                \
			if (!d)                                                 \
				break;                                          \
			body;                                                   \
		}                                                               \
		bench_state.done = i - from;                                    \
		bench_sink += c->acc;                                           \
		return XDP_PASS;                                                \
	}

#define LOOKUP_LOOP(name, map, type, body)                                      \
	static long name##_cb(__u32 i, struct loop_ctx *c)                      \
	{                                                                       \
		type *d = bpf_map_lookup_elem(&map, &i);                        \
		if (!d)                                                         \
			return 1;                                               \
		body;                                                           \
		return 0;                                                       \
	}                                                                       \
	SEC("xdp")                                                              \
	int name(struct xdp_md *ctx)                                            \
	{                                                                       \
		struct loop_ctx c = { .xdp = ctx };                             \
		bench_state.done = bpf_loop(bench_n, name##_cb, &c, 0);         \
		bench_sink += c.acc;                                            \
		return XDP_PASS;                                                \
	}

static __always_inline __u64 route_value(int found, struct route *r)
{
	return found ? r->nh_id + 1 : 0;
}

static __always_inline __u64 dir4(__be32 d)
{
	struct route r;
	return route_value(dir4_lookup(d, &r, 0), &r);
}

static __always_inline __u64 dir24_4(__be32 d)
{
	__u32 a = bpf_ntohl(d);
	__u32 e = dir_root_entry(&bench_root4, a >> 8);
	struct route r;

	if (e & DIR_EXT)
		e = dir_group_entry(&dir4_groups, e & ~DIR_EXT, a & 0xff);
	return route_value(dir_route(e, 0, &dir4_leaves, &r), &r);
}

static __always_inline __u64 dir6(const __u8 *d)
{
	struct route r;
	__u32 leaf;

	return route_value(h6_lookup(d, &r, 0, &leaf), &r);
}

static __always_inline __u64 lpm4(__be32 d)
{
	struct route r;
	return route_value(lpm4_lookup(d, &r), &r);
}

static __always_inline __u64 lpm6(const __u8 *d)
{
	struct route r;
	return route_value(lpm6_lookup(d, &r), &r);
}

static __always_inline __u64 kernel4(struct xdp_md *ctx, __be32 dst)
{
	struct bpf_fib_lookup p = { .family = AF_INET, .ifindex = bench_ifindex, .ipv4_dst = dst };

	return bpf_fib_lookup(ctx, &p, sizeof(p), 0) + p.ifindex;
}

static __always_inline __u64 kernel6(struct xdp_md *ctx, const __u8 *dst)
{
	struct bpf_fib_lookup p = { .family = AF_INET6, .ifindex = bench_ifindex };

	__builtin_memcpy(p.ipv6_dst, dst, 16);
	return bpf_fib_lookup(ctx, &p, sizeof(p), 0) + p.ifindex;
}

FAST_LOOP(bench_empty4, bench_dst4, struct dst4, c->acc += d->a)
FAST_LOOP(bench_dir4, bench_dst4, struct dst4, c->acc += dir4(d->a))
FAST_LOOP(bench_dir24_4, bench_dst4, struct dst4, c->acc += dir24_4(d->a))
/* The IPv4 DIR lookup stopped after each of its steps (dirfib.h). */
FAST_LOOP(bench_dir4_top, bench_dst4, struct dst4, c->acc += dir4_root_walk(bpf_ntohl(d->a) >> 8, DIR4_TOP))
FAST_LOOP(bench_dir4_block, bench_dst4, struct dst4, c->acc += dir4_root_walk(bpf_ntohl(d->a) >> 8, DIR4_BLOCK))
FAST_LOOP(bench_dir4_rank, bench_dst4, struct dst4, c->acc += dir4_root_walk(bpf_ntohl(d->a) >> 8, DIR4_RANK))
FAST_LOOP(bench_lpm4, bench_dst4, struct dst4, c->acc += lpm4(d->a))
FAST_LOOP(bench_kernel4, bench_dst4, struct dst4, c->acc += kernel4(c->xdp, d->a))
FAST_LOOP(bench_empty6, bench_dst6, struct dst6, c->acc += d->a[15])
FAST_LOOP(bench_dir6, bench_dst6, struct dst6, c->acc += dir6(d->a))
FAST_LOOP(bench_lpm6, bench_dst6, struct dst6, c->acc += lpm6(d->a))
FAST_LOOP(bench_kernel6, bench_dst6, struct dst6, c->acc += kernel6(c->xdp, d->a))
static __always_inline __u64 mem_read(__be32 dst)
{
	__u32 idx = (bpf_ntohl(dst) >> 8) & bench_mem_mask;  /* the root's index, folded */
	__u64 *v = bpf_map_lookup_elem(&bench_mem, &idx);

	return v ? *v : 0;
}

FAST_LOOP(bench_mem4, bench_dst4, struct dst4, c->acc += mem_read(d->a))

/* The whole pipeline: the test-run packet gets destination i, its Ethernet
 * header and TTL restored (the pipeline rewrote them), then is routed as if
 * it had just arrived. BPF_PROG_TEST_RUN's own repeat would reuse the
 * rewritten packet: after 63 runs every packet would be a TTL expiry. */
static __always_inline int reset_eth(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	struct ethhdr *eth = data, *orig;
	__u32 k = 0;

	if ((void *)(eth + 1) > (void *)(long)ctx->data_end)
		return -1;
	orig = bpf_map_lookup_elem(&bench_eth, &k);
	if (!orig)
		return -1;
	__builtin_memcpy(eth, orig, sizeof(*eth));
	return 0;
}

static __always_inline int reset_packet(struct xdp_md *ctx, __be32 dst)
{
	struct iphdr *iph = (void *)(long)ctx->data + sizeof(struct ethhdr);

	if ((void *)(iph + 1) > (void *)(long)ctx->data_end || reset_eth(ctx))
		return -1;
	iph->ttl = 64;
	iph->daddr = dst;
	return 0;
}

static __always_inline int reset_packet6(struct xdp_md *ctx, const __u8 *dst)
{
	struct ipv6hdr *ip6h = (void *)(long)ctx->data + sizeof(struct ethhdr);

	if ((void *)(ip6h + 1) > (void *)(long)ctx->data_end || reset_eth(ctx))
		return -1;
	ip6h->hop_limit = 64;
	__builtin_memcpy(&ip6h->daddr, dst, 16);
	return 0;
}

static __always_inline int plain_pipeline(struct xdp_md *ctx)
{
	struct decision dd = {};

	return bpfrouter_pipeline(ctx, &dd);
}

LOOKUP_LOOP(bench_pipeline_reset4, bench_dst4, struct dst4, c->acc += reset_packet(c->xdp, d->a))
LOOKUP_LOOP(bench_pipeline4, bench_dst4, struct dst4,
	    if (reset_packet(c->xdp, d->a) == 0) c->acc += plain_pipeline(c->xdp))
LOOKUP_LOOP(bench_observed4, bench_dst4, struct dst4,
	    if (reset_packet(c->xdp, d->a) == 0) c->acc += bpfrouter_observed(c->xdp, observe_flags & OBS_F_CAPTURE))
LOOKUP_LOOP(bench_pipeline_reset6, bench_dst6, struct dst6, c->acc += reset_packet6(c->xdp, d->a))
LOOKUP_LOOP(bench_pipeline6, bench_dst6, struct dst6,
	    if (reset_packet6(c->xdp, d->a) == 0) c->acc += plain_pipeline(c->xdp))
LOOKUP_LOOP(bench_observed6, bench_dst6, struct dst6,
	    if (reset_packet6(c->xdp, d->a) == 0) c->acc += bpfrouter_observed(c->xdp, observe_flags & OBS_F_CAPTURE))

char _license[] SEC("license") = "GPL";
