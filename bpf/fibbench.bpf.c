// SPDX-License-Identifier: GPL-2.0
/* FIB lookup loops (bench/fib.py, a secondary row): each program runs once
 * through BPF_PROG_TEST_RUN and loops over `bench_n` destinations in an
 * mmapable array, one independent lookup each, so the CPU overlaps their
 * cache misses: duration / iterations is a lookup's throughput, not what a
 * packet pays (pktbench.bpf.c measures that, on the attached program). The
 * loops are plain loops bounded by may_goto, with no call per iteration.
 * The loader points the FIB maps at a router's pinned maps. Variants: an
 * empty loop (the floor), the DIR FIB (and, for IPv4, its root
 * uncompressed), the LPM trie, and bpf_fib_lookup on the kernel FIB; every
 * lookup that finds a forwarding route counts a hit, which the reader
 * checks. */
#include "include/fib.h"
#include "include/benchdst.h"

/* The kernel cuts a may_goto loop off after a time limit (250 ms on x86),
 * which 1M LPM lookups exceed: the reader sets where a run starts and reads
 * how far it got, and runs again from there until all bench_n are done. */
struct bench_state {
	__u64 from;
	__u64 done;             /* iterations the last run made */
	__u64 hits;             /* lookups that found a forwarding route */
};

/* A global in its own section (the reader finds it as ".data.bench"). */
struct bench_state bench_state SEC(".data.bench");

/* IPv4's 24-bit root uncompressed (DIR-24-8's 64 MiB), what the compressed
 * root is measured against: the benchmark copies the agent's root here (the
 * loader sizes it). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct dir_chunk);
} bench_root4 SEC(".maps");

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

static __always_inline __u64 route_value(int found, struct route *r)
{
	if (!found || r->type != RTYPE_UNICAST)
		return 0;
	bench_state.hits++;
	return r->nh_id + 1;
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

static __always_inline __u64 kernel_hit(long rc)
{
	bench_state.hits += rc == BPF_FIB_LKUP_RET_SUCCESS;
	return rc;
}

static __always_inline __u64 kernel4(struct xdp_md *ctx, __be32 dst)
{
	struct bpf_fib_lookup p = { .family = AF_INET, .ifindex = bench_ifindex, .ipv4_dst = dst };

	return kernel_hit(bpf_fib_lookup(ctx, &p, sizeof(p), 0)) + p.ifindex;
}

static __always_inline __u64 kernel6(struct xdp_md *ctx, const __u8 *dst)
{
	struct bpf_fib_lookup p = { .family = AF_INET6, .ifindex = bench_ifindex };

	__builtin_memcpy(p.ipv6_dst, dst, 16);
	return kernel_hit(bpf_fib_lookup(ctx, &p, sizeof(p), 0)) + p.ifindex;
}

FAST_LOOP(bench_empty4, bench_dst4, struct dst4, c->acc += d->addr)
FAST_LOOP(bench_dir4, bench_dst4, struct dst4, c->acc += dir4(d->addr))
FAST_LOOP(bench_dir24_4, bench_dst4, struct dst4, c->acc += dir24_4(d->addr))
/* The IPv4 DIR lookup stopped after each of its steps (dirfib.h). */
FAST_LOOP(bench_dir4_top, bench_dst4, struct dst4, c->acc += dir4_root_walk(bpf_ntohl(d->addr) >> 8, DIR4_TOP))
FAST_LOOP(bench_dir4_block, bench_dst4, struct dst4, c->acc += dir4_root_walk(bpf_ntohl(d->addr) >> 8, DIR4_BLOCK))
FAST_LOOP(bench_dir4_rank, bench_dst4, struct dst4, c->acc += dir4_root_walk(bpf_ntohl(d->addr) >> 8, DIR4_RANK))
FAST_LOOP(bench_lpm4, bench_dst4, struct dst4, c->acc += lpm4(d->addr))
FAST_LOOP(bench_kernel4, bench_dst4, struct dst4, c->acc += kernel4(c->xdp, d->addr))
FAST_LOOP(bench_empty6, bench_dst6, struct dst6, c->acc += d->addr[15])
FAST_LOOP(bench_dir6, bench_dst6, struct dst6, c->acc += dir6(d->addr))
FAST_LOOP(bench_lpm6, bench_dst6, struct dst6, c->acc += lpm6(d->addr))
FAST_LOOP(bench_kernel6, bench_dst6, struct dst6, c->acc += kernel6(c->xdp, d->addr))

char _license[] SEC("license") = "GPL";
