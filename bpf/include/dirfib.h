/* The DIR FIB: a multibit trie in mmapable BPF arrays, written by the
 * control plane through mmap (bpfrouter/dirfib.py).
 *
 *   root[addr >> (W-24)]    -> route type | next-hop id, or DIR_EXT | group
 *   group[g][next 8 bits]   -> the same, one level deeper
 *
 * The entry holds what forwarding needs. Parallel arrays (root_leaf,
 * group_leaf) give each entry's leaf: the prefix and its protocol, which only
 * probes (`route get`) and the control plane read. Entry 0 means "no
 * route". IPv6 uses hash levels instead (hashfib6.h), with these entries
 * and leaves. Every entry is one aligned
 * 32-bit store, so a packet reads either the old or the new value.
 *
 * IPv4's 24-bit root (64 MiB, one cache and TLB miss per lookup at a full
 * table) is stored compressed, in about 3 MiB at 1M routes:
 *
 *   top[addr >> 16]         -> the entry of a /16 whose 256 root entries are
 *                              equal, or DIR_EXT | block (its first word)
 *   block                   -> a 256-bit map of where runs of equal root
 *                              entries start in that /16, then the runs
 *   run[rank]               -> the 8-bit id of the root entry of the run that
 *                              holds the /24 (with DIR_TOP_RAW: that entry)
 *   run_entries[id]         -> the entry of an id
 *
 * rank is the number of run starts up to the /24, a popcount. A changed /16
 * gets a new block, filled before the one top store that switches to it; an
 * id's entry is written before any block names it. */
#ifndef BPFROUTER_DIRFIB_H
#define BPFROUTER_DIRFIB_H

#include "common.h"
#include "consts.h"

struct route {
	__u32 nh_id;            /* index into nexthops, for RTYPE_UNICAST */
	__u8 type;              /* enum route_type */
	__u8 prefixlen;         /* the matched prefix, reported by route get */
	__u8 proto;             /* rtm_protocol of the kernel route: who installed it */
	__u8 flags;
};

struct dir_chunk {
	__u32 e[DIR_CHUNK];
};

struct dir_group {
	__u32 e[256];
};

struct dir_leaf4 {
	struct route r;
	__be32 addr;            /* the prefix: read by the control plane only */
	__u32 reserved;
};

struct dir_leaf6 {
	struct route r;
	__u8 addr[16];
};

/* One mmapable array of the DIR FIB. */
#define DIR_ARRAY(name, entries, value_t)                                       \
	struct {                                                                \
		__uint(type, BPF_MAP_TYPE_ARRAY);                                \
		__uint(max_entries, entries);                                    \
		__uint(map_flags, BPF_F_MMAPABLE);                               \
		__type(key, __u32);                                              \
		__type(value, value_t);                                          \
	} name SEC(".maps");

/* A family's tables; root_leaf and group_leaf mirror the root and groups. */
#define DIR_LEVELS(fam, leaf_t, groups, leaves)                                 \
	DIR_ARRAY(dir##fam##_groups, groups, struct dir_group)                  \
	DIR_ARRAY(dir##fam##_leaves, leaves, leaf_t)                            \
	DIR_ARRAY(dir##fam##_root_leaf, (1 << DIR_ROOT_BITS) / DIR_CHUNK, struct dir_chunk) \
	DIR_ARRAY(dir##fam##_group_leaf, groups, struct dir_group)

DIR_LEVELS(4, struct dir_leaf4, DIR_GROUPS_V4, DIR_LEAVES_V4)
DIR_ARRAY(dir4_top, (1 << DIR_TOP_BITS) / DIR_CHUNK, struct dir_chunk)
/* One element, so that a lookup takes one pointer and indexes from it; a
 * size, not a type: the loader shrinks it for routers that do not use it. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(key_size, 4);
	__uint(value_size, DIR_BLOCK_BYTES_V4 + DIR_BLOCK_SLACK);
} dir4_blocks SEC(".maps");

struct dir_run_entries {
	__u32 e[DIR_RUN_IDS];
};

DIR_ARRAY(dir4_run_entries, 1, struct dir_run_entries)
/* IPv6's entries are in hash levels (hashfib6.h); its leaves are here. */
DIR_ARRAY(dir6_leaves, DIR_LEAVES_V6, struct dir_leaf6)

static __always_inline __u32 dir_root_entry(void *root, __u32 top24)
{
	__u32 k = top24 / DIR_CHUNK;
	struct dir_chunk *c = bpf_map_lookup_elem(root, &k);

	return c ? c->e[top24 & (DIR_CHUNK - 1)] : 0;
}

static __always_inline __u32 dir_group_entry(void *groups, __u32 g, __u8 byte)
{
	struct dir_group *grp = bpf_map_lookup_elem(groups, &g);

	return grp ? grp->e[byte] : 0;
}

/* Fill *rt from an entry (and, for probes, from its leaf). 0 = no route. */
static __always_inline int dir_route(__u32 e, __u32 leaf, void *leaves, struct route *rt)
{
	struct route *lr;

	if (!e || (e & DIR_EXT))
		return 0;
	rt->type = e >> DIR_TYPE_SHIFT;
	rt->nh_id = e & DIR_NH_MASK;
	if (leaf && (lr = bpf_map_lookup_elem(leaves, &leaf))) {
		rt->prefixlen = lr->prefixlen;
		rt->proto = lr->proto;
	}
	return 1;
}

/* The bits set in x (BPF has no popcount instruction). */
static __always_inline __u32 popcount64(__u64 x)
{
	x = x - ((x >> 1) & 0x5555555555555555ULL);
	x = (x & 0x3333333333333333ULL) + ((x >> 2) & 0x3333333333333333ULL);
	x = (x + (x >> 4)) & 0x0f0f0f0f0f0f0f0fULL;
	return (x * 0x0101010101010101ULL) >> 56;
}

/* How far dir4_root_walk goes: forwarding takes every step; the benchmark
 * stops after each one in turn, to time them. */
enum dir4_step {
	DIR4_TOP = 1,           /* read top */
	DIR4_BLOCK,             /* and the block's bitmap word and rank byte */
	DIR4_RANK,              /* and count the runs (a popcount) */
	DIR4_ENTRY,             /* and read the run's id and the id's entry */
};

/* IPv4's root entry for a /24, from the compressed root (with upto below
 * DIR4_ENTRY: a value that depends on every read made). A block is
 * starts[4], rank (byte w: runs started in starts[0..w-1]), then one 8-bit
 * id per run (a raw block: one 32-bit root entry per run), 8-byte aligned. */
static __always_inline __u32 dir4_root_walk(__u32 top24, const enum dir4_step upto)
{
	__u32 e = dir_root_entry(&dir4_top, top24 >> 8);
	__u32 s = top24 & 0xff, w = s >> 6, zero = 0, off, rank, run, raw, v;
	struct dir_run_entries *ids;
	__u8 *blocks;
	__u64 starts;

	if (upto == DIR4_TOP || !(e & DIR_EXT))
		return e;
	blocks = bpf_map_lookup_elem(&dir4_blocks, &zero);
	ids = bpf_map_lookup_elem(&dir4_run_entries, &zero);
	if (!blocks || !ids)
		return 0;
	off = (e << 3) & (DIR_BLOCK_BYTES_V4 - 1);  /* the block's first byte (the flags shift out) */
	starts = *(__u64 *)(blocks + off + 8 * w);
	rank = blocks[off + 32 + w];
	if (upto == DIR4_BLOCK)
		return starts + rank;
	/* starts[0] bit 0 is always set: runs started up to s, minus one */
	run = rank + popcount64(starts & (~0ULL >> (63 - (s & 63)))) - 1;
	if (upto == DIR4_RANK)
		return run;
	raw = (e / DIR_TOP_RAW) & 1;
	v = *(__u32 *)(blocks + ((off + DIR_BLOCK_HEAD + (run << (2 * raw))) & (DIR_BLOCK_BYTES_V4 - 1)));
	return raw ? v : ids->e[v & 0xff];
}

static __always_inline __u32 dir4_root_entry(__u32 top24)
{
	return dir4_root_walk(top24, DIR4_ENTRY);
}

/* detail: also read the leaf (prefix length, protocol), for probes only. */
static __always_inline int dir4_lookup(__be32 daddr, struct route *rt, int detail)
{
	__u32 a = bpf_ntohl(daddr);
	__u32 e = dir4_root_entry(a >> 8);
	__u32 leaf = 0;

	if (detail)
		leaf = dir_root_entry(&dir4_root_leaf, a >> 8);
	if (e & DIR_EXT) {
		__u32 g = e & ~DIR_EXT;

		e = dir_group_entry(&dir4_groups, g, a & 0xff);
		if (detail)
			leaf = dir_group_entry(&dir4_group_leaf, g, a & 0xff);
	}
	return dir_route(e, leaf, &dir4_leaves, rt);
}

#endif
