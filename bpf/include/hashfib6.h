/* IPv6's BPF FIB: one hash table per prefix length in use (a level),
 * probed from the longest down, so the first hit is the longest match.
 * Written by the control plane through mmap (bpfrouter/hashfib6.py).
 *
 * An Internet table uses about nine lengths (/29 to /48), so a /48
 * destination costs one or two bucket reads per level, none of them
 * depending on another, in about 4 MiB at 230k prefixes; a multibit trie
 * needs 4-5 dependent reads in 250 MiB. Past 16 lengths, a prefix is stored
 * expanded in the next longer level (the control plane picks levels that
 * store the fewest keys).
 *
 * A bucket is one cache line: 5 slots of key (the prefix's first 64 bits,
 * masked to the level's length) and entry (as in the DIR FIB: route type
 * and next-hop id, 0 = empty); each slot's leaf is in h6_leaf. Levels
 * longer than /64 use two slots per key (slots 0-1 and 2-3: high and low
 * 64 bits; slot 4 stays empty). A key sits in one of two buckets (cuckoo
 * hashing), and a filter bit per bucket tells most levels that do not hold
 * a key apart without reading their buckets.
 *
 * Concurrent updates: a slot is emptied (entry 0) before another key is
 * written there, and a key's entry is written last. The probe reads a
 * slot's key, its entry, then its key again, and counts the slot only if
 * the key did not change meanwhile. A key only ever moves from its first
 * bucket to its second, new slot written before the old one is emptied:
 * probing the first bucket, then the second, finds it in one of them. A
 * rebuild writes the other half of the buckets and conf, then switches
 * with one store to h6_active. */
#ifndef BPFROUTER_HASHFIB6_H
#define BPFROUTER_HASHFIB6_H

#include "common.h"
#include "consts.h"
#include "dirfib.h"

struct h6_bucket {
	__u64 key[H6_SLOTS];
	__u32 entry[H6_SLOTS];
	__u32 reserved;
};

/* Each slot's leaf, beside the buckets: forwarding reads only the entry,
 * an event or a probe the leaf too. */
struct h6_leaves {
	__u32 leaf[H6_SLOTS];
	__u32 reserved;
};

struct h6_level {
	__u64 mask_hi;          /* the level's prefix length as masks */
	__u64 mask_lo;
	__u32 first;            /* its first bucket */
	__u32 nbuckets;
	__u32 len;              /* read by the control plane only */
	__u32 wide;             /* 1: longer than /64, a key takes two slots */
};

struct h6_conf {
	__u32 nlevels;
	__u32 reserved;
	struct h6_level lv[H6_MAX_LEVELS];  /* longest first */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, H6_BUCKETS);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct h6_bucket);
} h6_buckets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, H6_BUCKETS);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct h6_leaves);
} h6_leaf SEC(".maps");

/* A one-bit filter per bucket of each level (a Bloom filter with one hash):
 * a level whose bit for the key is clear holds no such key, and is passed
 * over without reading its buckets. Most levels a lookup passes over cost
 * one read here (about 15 bits per key, 6 % false hits; 0.5 MiB at 230k
 * prefixes) instead of two bucket reads. Set before a key is written;
 * cleared only by a rebuild. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, H6_BUCKETS);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, __u64);
} h6_filter SEC(".maps");

/* Two confs, one per half of the buckets; h6_active says which is read. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct h6_conf);
} h6_conf SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, __u64);
} h6_active SEC(".maps");

#define H6_C1 0x9E3779B97F4A7C15ULL
#define H6_C2 0xC2B2AE3D27D4EB4FULL
#define H6_C3 0x165667B19E3779F9ULL

static __always_inline __u64 h6_load(const volatile __u64 *p)
{
	return *p;
}

/* Key (khi, klo) at slot s: wmask is all ones on a wide level (the low key
 * is in the odd slot after the high one), else 0 (klo is 0 there). Slot 4
 * is never a wide key's: its "low key" is read from slot 4 itself. */
static __always_inline int h6_key_at(struct h6_bucket *bk, int s, __u64 khi, __u64 klo, __u64 wmask)
{
	return h6_load(&bk->key[s]) == khi && (h6_load(&bk->key[s < 4 ? s | 1 : s]) & wmask) == klo;
}

/* entry | slot << 32 of the slot holding the key in bucket b (slot: its
 * place in the table, b * H6_SLOTS + s, plus 1), or 0. A slot counts if
 * its key is read the same before and after its entry, and the entry is
 * set. */
static __always_inline __u64 h6_probe(__u32 b, __u64 khi, __u64 klo, __u64 wmask)
{
	struct h6_bucket *bk = bpf_map_lookup_elem(&h6_buckets, &b);
	__u32 e;

	if (!bk)
		return 0;
	for (int s = 0; s < H6_SLOTS; s++) {
		if (!h6_key_at(bk, s, khi, klo, wmask))
			continue;
		asm volatile("" ::: "memory");
		e = *(volatile __u32 *)&bk->entry[s];
		asm volatile("" ::: "memory");
		if (e && h6_key_at(bk, s, khi, klo, wmask))
			return e | (__u64)(b * H6_SLOTS + s + 1) << 32;
	}
	return 0;
}

/* entry | slot << 32 of the longest prefix holding the address (its first
 * and last 64 bits, host order), or 0. A global function: the verifier
 * checks it once, not once per place the pipeline looks a route up. */
__attribute__((noinline)) __u64 h6_find(__u64 hi, __u64 lo)
{
	__u32 zero = 0, half;
	__u64 *active = bpf_map_lookup_elem(&h6_active, &zero);
	struct h6_conf *c;
	__u64 found = 0;

	if (!active)
		return 0;
	half = *active & 1;
	c = bpf_map_lookup_elem(&h6_conf, &half);
	if (!c)
		return 0;
	for (__u32 i = 0; i < H6_MAX_LEVELS; i++) {
		struct h6_level *l = &c->lv[i];
		__u64 khi, klo, x, h, nb, *filter;
		__u32 b2;

		if (i >= c->nlevels)
			break;
		khi = hi & l->mask_hi;
		klo = lo & l->mask_lo;
		x = khi * H6_C1 ^ klo * H6_C2;
		h = (x ^ (x >> 31)) * H6_C3;
		nb = l->nbuckets;
		b2 = l->first + (((h & 0xffffffffULL) * nb) >> 32);
		filter = bpf_map_lookup_elem(&h6_filter, &b2);
		if (!filter || !((*filter >> ((h >> 32) & 63)) & 1))
			continue;
		found = h6_probe(l->first + (((h >> 32) * nb) >> 32), khi, klo, -(__u64)l->wide);
		if (!found)
			found = h6_probe(b2, khi, klo, -(__u64)l->wide);
		if (found)
			break;
	}
	return found;
}

/* The leaf of a slot h6_find returned, if it still holds a prefix of the
 * address (the slot may have been given to another key since), else 0. */
static __always_inline __u32 h6_leaf_of(__u32 slot, const __u8 *daddr)
{
	__u32 b = (slot - 1) / H6_SLOTS, s = (slot - 1) % H6_SLOTS, leaf;
	struct h6_leaves *lv = bpf_map_lookup_elem(&h6_leaf, &b);
	struct dir_leaf6 *l;
	__u64 a[2], p[2], m[2];
	__u8 len;

	asm volatile("" : "+r"(s));  /* keep the bound the verifier needs (s < 5 holds anyway) */
	if (!slot || !lv || s >= H6_SLOTS)
		return 0;
	leaf = lv->leaf[s];
	l = bpf_map_lookup_elem(&dir6_leaves, &leaf);
	if (!l)
		return 0;
	len = l->r.prefixlen;
	__builtin_memcpy(a, daddr, 16);
	__builtin_memcpy(p, l->addr, 16);
	m[0] = len >= 64 ? ~0ULL : len ? ~0ULL << (64 - len) : 0;
	m[1] = len >= 128 ? ~0ULL : len > 64 ? ~0ULL << (128 - len) : 0;
	if (((bpf_be64_to_cpu(a[0]) ^ bpf_be64_to_cpu(p[0])) & m[0]) ||
	    ((bpf_be64_to_cpu(a[1]) ^ bpf_be64_to_cpu(p[1])) & m[1]))
		return 0;
	return leaf;
}

/* *slot: the matched slot, so that an event can report the prefix without
 * a second lookup. detail: also read the leaf (for probes only). */
static __always_inline int h6_lookup(const __u8 *daddr, struct route *rt, int detail, __u32 *slot)
{
	__u64 hi, lo, found;

	__builtin_memcpy(&hi, daddr, 8);
	__builtin_memcpy(&lo, daddr + 8, 8);
	found = h6_find(bpf_be64_to_cpu(hi), bpf_be64_to_cpu(lo));
	*slot = found >> 32;
	return dir_route((__u32)found, detail ? h6_leaf_of(*slot, daddr) : 0, &dir6_leaves, rt);
}

#endif
