/* The LPM-trie FIB (`--fib-impl lpm`): BPF_MAP_TYPE_LPM_TRIE per family.
 * Kept for comparison with the DIR FIB; the kernel walks the trie. */
#ifndef BPFROUTER_LPMFIB_H
#define BPFROUTER_LPMFIB_H

#include "common.h"
#include "consts.h"
#include "dirfib.h"     /* struct route */

struct route4_key {
	__u32 prefixlen;
	__be32 addr;
};

struct route6_key {
	__u32 prefixlen;
	__u8 addr[16];
};

struct nexthop {
	__u32 ifindex;
	__u8 family;            /* family of gw; may differ from the route's */
	__u8 flags;             /* NEXTHOP_F_GATEWAY: resolve gw, else the destination */
	__u16 reserved;
	__u8 gw[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, MAX_ROUTES_V4);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct route4_key);
	__type(value, struct route);
} fib4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, MAX_ROUTES_V6);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct route6_key);
	__type(value, struct route);
} fib6 SEC(".maps");

static __always_inline int lpm4_lookup(__be32 daddr, struct route *rt)
{
	struct route4_key k = { .prefixlen = 32, .addr = daddr };
	struct route *r = bpf_map_lookup_elem(&fib4, &k);

	if (!r)
		return 0;
	*rt = *r;
	return 1;
}

static __always_inline int lpm6_lookup(const __u8 *daddr, struct route *rt)
{
	struct route6_key k = { .prefixlen = 128 };
	struct route *r;

	__builtin_memcpy(k.addr, daddr, 16);
	r = bpf_map_lookup_elem(&fib6, &k);
	if (!r)
		return 0;
	*rt = *r;
	return 1;
}

#endif
