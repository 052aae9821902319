/* The DIR FIB: a multibit trie in mmapable BPF arrays, written by the
 * control plane through mmap (bpfrouter/dirfib.py).
 *
 *   root[addr >> (W-24)]    -> leaf index, or DIR_EXT | group index
 *   group[g][next 8 bits]   -> leaf index, or DIR_EXT | deeper group
 *   leaf[i]                 -> struct route (+ its prefix, for the control plane)
 *
 * IPv4 is DIR-24-8: at most two table reads and the leaf. IPv6 walks at most
 * 13 groups after the root; a /48 needs three. Entry 0 means "no route".
 * Every entry is one aligned 32-bit word and a leaf's route one aligned
 * 64-bit word, so a packet reads either the old or the new value. */
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

#define DIR_MAPS(fam, leaf_t, groups, leaves)                                   \
	struct {                                                                \
		__uint(type, BPF_MAP_TYPE_ARRAY);                                \
		__uint(max_entries, (1 << DIR_ROOT_BITS) / DIR_CHUNK);          \
		__uint(map_flags, BPF_F_MMAPABLE);                               \
		__type(key, __u32);                                              \
		__type(value, struct dir_chunk);                                 \
	} dir##fam##_root SEC(".maps");                                          \
	struct {                                                                \
		__uint(type, BPF_MAP_TYPE_ARRAY);                                \
		__uint(max_entries, groups);                                     \
		__uint(map_flags, BPF_F_MMAPABLE);                               \
		__type(key, __u32);                                              \
		__type(value, struct dir_group);                                 \
	} dir##fam##_groups SEC(".maps");                                        \
	struct {                                                                \
		__uint(type, BPF_MAP_TYPE_ARRAY);                                \
		__uint(max_entries, leaves);                                     \
		__uint(map_flags, BPF_F_MMAPABLE);                               \
		__type(key, __u32);                                              \
		__type(value, leaf_t);                                           \
	} dir##fam##_leaves SEC(".maps");

DIR_MAPS(4, struct dir_leaf4, DIR_GROUPS_V4, DIR_LEAVES_V4)
DIR_MAPS(6, struct dir_leaf6, DIR_GROUPS_V6, DIR_LEAVES_V6)

static __always_inline __u32 dir_root_entry(void *root, __u32 top24)
{
	__u32 k = top24 / DIR_CHUNK;
	struct dir_chunk *c = bpf_map_lookup_elem(root, &k);

	return c ? c->e[top24 & (DIR_CHUNK - 1)] : 0;
}

static __always_inline __u32 dir_group_entry(void *groups, __u32 e, __u8 byte)
{
	__u32 g = e & ~DIR_EXT;
	struct dir_group *grp = bpf_map_lookup_elem(groups, &g);

	return grp ? grp->e[byte] : 0;
}

static __always_inline struct route *dir4_lookup(__be32 daddr)
{
	__u32 a = bpf_ntohl(daddr);
	__u32 e = dir_root_entry(&dir4_root, a >> 8);
	struct dir_leaf4 *leaf;

	if (e & DIR_EXT)
		e = dir_group_entry(&dir4_groups, e, a & 0xff);
	if (!e || (e & DIR_EXT))
		return NULL;
	leaf = bpf_map_lookup_elem(&dir4_leaves, &e);
	return leaf ? &leaf->r : NULL;
}

static __always_inline struct route *dir6_lookup(const __u8 *daddr)
{
	__u8 a[16];
	struct dir_leaf6 *leaf;
	__u32 e;

	__builtin_memcpy(a, daddr, 16);
	e = dir_root_entry(&dir6_root, (__u32)a[0] << 16 | (__u32)a[1] << 8 | a[2]);
#pragma unroll
	for (int i = 3; i < 16; i++) {
		if (!(e & DIR_EXT))
			break;
		e = dir_group_entry(&dir6_groups, e, a[i]);
	}
	if (!e || (e & DIR_EXT))
		return NULL;
	leaf = bpf_map_lookup_elem(&dir6_leaves, &e);
	return leaf ? &leaf->r : NULL;
}

#endif
