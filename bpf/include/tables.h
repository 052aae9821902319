/* Routing tables besides local and main (`ip route ... table N`), which
 * rules look up (include/rules.h): one LPM trie per family whose keys start
 * with the table id, so one lookup walks one table. Local and main keep
 * their faster image (dirfib.h, hashfib6.h), looked up as one as the kernel
 * does without rules. */
#ifndef BPFROUTER_TABLES_H
#define BPFROUTER_TABLES_H

#include "common.h"
#include "consts.h"
#include "dirfib.h"     /* struct route */

#define MAX_TABLE_ROUTES_V4 (1 << 18)
#define MAX_TABLE_ROUTES_V6 (1 << 16)

struct table4_key {
	__u32 prefixlen;        /* 32 + the route's prefix length */
	__be32 table;
	__be32 addr;
};

struct table6_key {
	__u32 prefixlen;        /* 32 + the route's prefix length */
	__be32 table;
	__u8 addr[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, MAX_TABLE_ROUTES_V4);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct table4_key);
	__type(value, struct route);
} tables4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, MAX_TABLE_ROUTES_V6);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct table6_key);
	__type(value, struct route);
} tables6 SEC(".maps");

static __always_inline int tables4_lookup(__u32 table, __be32 daddr, struct route *rt)
{
	struct table4_key k = { .prefixlen = 64, .table = bpf_htonl(table), .addr = daddr };
	struct route *r = bpf_map_lookup_elem(&tables4, &k);

	if (!r)
		return 0;
	*rt = *r;
	return 1;
}

static __always_inline int tables6_lookup(__u32 table, const __u8 *daddr, struct route *rt)
{
	struct table6_key k = { .prefixlen = 160, .table = bpf_htonl(table) };
	struct route *r;

	__builtin_memcpy(k.addr, daddr, 16);
	r = bpf_map_lookup_elem(&tables6, &k);
	if (!r)
		return 0;
	*rt = *r;
	return 1;
}

#endif
