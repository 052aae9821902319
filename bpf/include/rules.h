/* Policy routing: the kernel's rules (`ip rule`), compiled by the agent
 * (bpfrouter/policy/rules.py) into a classifier whose cost does not grow
 * with the rule count.
 *
 * Each selector field has one lookup that gives a bit vector over the
 * family's rules (bit i: rule i, in the kernel's order, matches on this
 * field); the vectors are ANDed, the inverted rules' bits flipped, and the
 * first set bit is the first rule that matches:
 *
 *   from, to         LPM trie  -> vector of the longest rule prefix (or the
 *                               field's default: rules without that selector)
 *   iif              hash      -> vector of the port
 *   ipproto, tos     array     -> vector of the byte value
 *   fwmark           hash per distinct mask -> vector of (mark & mask)
 *   sport, dport     sorted interval bounds, binary search -> vector
 *
 * A field no rule uses is not looked up. Rules that never match a
 * forwarded packet, nop rules and gotos to no rule are left out by the
 * compiler.
 *
 * A rule's action runs in the policy stage (goto, blackhole, unreachable,
 * prohibit) or sends the packet to the fib stage with a table; when that
 * table has no route for it, a throw route, or a result the rule
 * suppresses, fib hands it back (STAGE_TO_POLICY) and the walk goes on after
 * the rule, as fib_rules_lookup does.
 *
 * Two banks: the agent writes a new rule set into the bank not in use and
 * then switches rule_active with one aligned store, so a packet sees the
 * old set or the new one, never a mix. */
#ifndef BPFROUTER_RULES_H
#define BPFROUTER_RULES_H

#include "common.h"
#include "consts.h"

#define MAX_RULES 1024              /* per family */
#define RULE_WORDS (MAX_RULES / 64)
#define MAX_RULE_VECTORS 4096       /* per bank and family */
#define MAX_RULE_MASKS 4            /* distinct fwmark masks per family */
#define RULE_PORT_SLOTS 2048        /* interval bounds per port field (a power of two) */
#define RULE_PORT_STEPS 11          /* log2(RULE_PORT_SLOTS) */
#define RULE_MAX_ROUNDS 8           /* table lookups per packet; more: passed */
#define RULE_MAX_JUMPS 4            /* gotos per round; more: passed */
#define RULE_NONE 0xFFFF

enum rule_field {
	RULE_F_SRC = 1 << 0,
	RULE_F_DST = 1 << 1,
	RULE_F_IIF = 1 << 2,
	RULE_F_PROTO = 1 << 3,
	RULE_F_TOS = 1 << 4,
	RULE_F_MARK = 1 << 5,
	RULE_F_SPORT = 1 << 6,
	RULE_F_DPORT = 1 << 7,
};

/* FR_ACT_* of the kernel, and one of bpfrouter's own. */
enum rule_kind {
	RULE_LOOKUP = 1,
	RULE_GOTO = 2,
	RULE_BLACKHOLE = 6,
	RULE_UNREACHABLE = 7,
	RULE_PROHIBIT = 8,
	RULE_PASS = 255,                /* the fast path cannot follow it: pass */
};

#define RULE_A_SUPPRESS_IFGROUP 1

struct rule_action {
	__u8 kind;                      /* enum rule_kind */
	__u8 flags;                     /* RULE_A_* */
	__u8 suppress_prefixlen;        /* a result this long or shorter is suppressed; 0xFF: none */
	__u8 reserved;
	__u32 table;                    /* RULE_LOOKUP */
	__u32 target;                   /* RULE_GOTO: the index it jumps to */
	__u32 ifgroup;                  /* RULE_A_SUPPRESS_IFGROUP */
	__u32 priority;                 /* the kernel rule's, for route get and explain */
};

struct rule_set {
	__u32 count;                    /* rules */
	__u32 fields;                   /* enum rule_field: the lookups to make */
	__u32 all;                      /* vector of every rule */
	__u32 invert;                   /* vector of the inverted rules, 0: none */
	__u32 miss[8];                  /* per field (bit number): the vector when its lookup misses */
	__u32 mask[MAX_RULE_MASKS];     /* fwmark masks */
	__u32 mask_miss[MAX_RULE_MASKS];        /* the vector when (mark & mask) has none */
	__u32 nmasks;
	__u32 nbounds[2];               /* sport, dport intervals */
};

struct rule_vector {
	__u64 w[RULE_WORDS];
};

struct rule_prefix_key {
	__u32 prefixlen;                /* 32 + the rule prefix's length */
	__u8 bank;
	__u8 family;                    /* 0: IPv4, 1: IPv6 */
	__u8 field;                     /* 0: from, 1: to */
	__u8 reserved;
	__u8 addr[16];
};

struct rule_u32_key {
	__u32 value;                    /* iif: ifindex; fwmark: mark & mask */
	__u8 bank;
	__u8 family;
	__u8 field;                     /* 0: iif, 1 + i: fwmark mask i */
	__u8 reserved;
};

struct rule_bound {
	__u32 lo;                       /* the interval's first port */
	__u32 vector;
};

/* Per family: bit 0 the bank in use, bit 1 set when the family has rules
 * for the fast path to walk (else it looks up local and main as one). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u32);
} rule_active SEC(".maps");

#define RULE_ACTIVE_ON 2

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 4);                 /* bank * 2 + family */
	__type(key, __u32);
	__type(value, struct rule_set);
} rule_sets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 4 * MAX_RULES);     /* (bank * 2 + family) * MAX_RULES + rule */
	__type(key, __u32);
	__type(value, struct rule_action);
} rule_actions SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 4 * MAX_RULE_VECTORS);  /* (bank * 2 + family) * MAX_RULE_VECTORS + id */
	__type(key, __u32);
	__type(value, struct rule_vector);
} rule_vectors SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 4 * MAX_RULES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct rule_prefix_key);
	__type(value, __u32);
} rule_prefixes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8 * MAX_RULES);
	__type(key, struct rule_u32_key);
	__type(value, __u32);
} rule_values SEC(".maps");

/* ipproto and tos: ((bank * 2 + family) * 2 + (0: ipproto, 1: tos)) * 256 + byte */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 8 * 256);
	__type(key, __u32);
	__type(value, __u32);
} rule_bytes SEC(".maps");

/* ((bank * 2 + family) * 2 + (0: sport, 1: dport)) * RULE_PORT_SLOTS + i */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 8 * RULE_PORT_SLOTS);
	__type(key, __u32);
	__type(value, struct rule_bound);
} rule_bounds SEC(".maps");

/* The packet's matching rules not yet passed, and which of its words are
 * not zero: the walk finds its next rule without a loop. */
struct rule_walk {
	struct rule_vector bits;
	__u32 summary;          /* bit i: bits.w[i] is not zero */
	__u32 reserved;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rule_walk);
} rule_scratch SEC(".maps");

/* Packets each rule decided: (bank * 2 + family) * MAX_RULES + rule. The
 * agent folds a bank's counts into its rules' totals when it retires it. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 4 * MAX_RULES);
	__type(key, __u32);
	__type(value, __u64);
} rule_hits SEC(".maps");

/* The rule state of a family: RULE_ACTIVE_ON | bank, or 0. */
static __always_inline __u32 rules_state(int family6)
{
	__u32 key = family6;
	__u32 *v = bpf_map_lookup_elem(&rule_active, &key);

	return v ? *v : 0;
}

/* set: bank * 2 + family */
static __always_inline void rule_and(struct rule_vector *acc, __u32 set, __u32 id)
{
	__u32 key = set * MAX_RULE_VECTORS + (id & (MAX_RULE_VECTORS - 1));
	struct rule_vector *v = bpf_map_lookup_elem(&rule_vectors, &key);

	if (!v) {
		__builtin_memset(acc, 0, sizeof(*acc));
		return;
	}
#pragma unroll
	for (int i = 0; i < RULE_WORDS; i++)
		acc->w[i] &= v->w[i];
}

/* k: the address filled in; bank, family and field are set here. */
static __always_inline __u32 rule_prefix_vector(const struct rule_set *rs, __u32 bank, __u32 fam6, __u32 field,
						struct rule_prefix_key *k)
{
	__u32 *id;

	k->prefixlen = 32 + (fam6 ? 128 : 32);
	k->bank = bank;
	k->family = fam6;
	k->field = field;
	id = bpf_map_lookup_elem(&rule_prefixes, k);
	return id ? *id : rs->miss[field & 1];
}

static __always_inline __u32 rule_value_vector(__u32 bank, __u32 fam6, __u32 field, __u32 value, __u32 miss)
{
	struct rule_u32_key k = { .value = value, .bank = bank, .family = fam6, .field = field };
	__u32 *id = bpf_map_lookup_elem(&rule_values, &k);

	return id ? *id : miss;
}

static __always_inline __u32 rule_byte_vector(__u32 bank, __u32 fam6, __u32 which, __u32 value)
{
	__u32 key = ((bank * 2 + fam6) * 2 + which) * 256 + (value & 0xff);
	__u32 *id = bpf_map_lookup_elem(&rule_bytes, &key);

	return id ? *id : 0;
}

/* The vector of the interval that holds port: the last bound <= port. */
static __always_inline __u32 rule_port_vector(const struct rule_set *rs, __u32 bank, __u32 fam6, __u32 which,
					      __u32 port)
{
	__u32 base = ((bank * 2 + fam6) * 2 + which) * RULE_PORT_SLOTS;
	__u32 n = rs->nbounds[which & 1], pos = 0, step = RULE_PORT_SLOTS >> 1;
	struct rule_bound *b;
	__u32 key;

#pragma unroll
	for (int i = 0; i < RULE_PORT_STEPS; i++) {
		key = base + ((pos + step) & (RULE_PORT_SLOTS - 1));
		if (pos + step < n) {
			b = bpf_map_lookup_elem(&rule_bounds, &key);
			if (b && b->lo <= port)
				pos += step;
		}
		step >>= 1;
	}
	key = base + (pos & (RULE_PORT_SLOTS - 1));
	b = bpf_map_lookup_elem(&rule_bounds, &key);
	return b ? b->vector : 0;
}

/* The index of a word's lowest set bit, by halving (BPF has no ctz). */
static __always_inline __u32 lowest_bit64(__u64 w)
{
	__u32 bit = 0;

	w &= -w;
	if (w & 0xFFFFFFFF00000000ULL)
		bit += 32;
	if (w & 0xFFFF0000FFFF0000ULL)
		bit += 16;
	if (w & 0xFF00FF00FF00FF00ULL)
		bit += 8;
	if (w & 0xF0F0F0F0F0F0F0F0ULL)
		bit += 4;
	if (w & 0xCCCCCCCCCCCCCCCCULL)
		bit += 2;
	if (w & 0xAAAAAAAAAAAAAAAAULL)
		bit += 1;
	return bit;
}

/* Drop the rules before `from` from the walk, and return the first one
 * left (RULE_NONE: none). */
static __always_inline __u32 rule_next(struct rule_walk *wk, __u32 from)
{
	__u32 w;

	if (from >= MAX_RULES)
		return RULE_NONE;
	w = from >> 6;
	wk->summary &= ~((1U << w) - 1);
	wk->bits.w[w & (RULE_WORDS - 1)] &= ~0ULL << (from & 63);
	if (!wk->bits.w[w & (RULE_WORDS - 1)])
		wk->summary &= ~(1U << w);
	if (!wk->summary)
		return RULE_NONE;
	w = lowest_bit64(wk->summary);
	return w * 64 + lowest_bit64(wk->bits.w[w & (RULE_WORDS - 1)]);
}

static __always_inline const struct rule_action *rule_action_of(__u32 bank, __u32 fam6, __u32 rule)
{
	__u32 key = (bank * 2 + fam6) * MAX_RULES + (rule & (MAX_RULES - 1));

	return bpf_map_lookup_elem(&rule_actions, &key);
}

static __always_inline void rule_count(__u32 bank, __u32 fam6, __u32 rule)
{
	__u32 key = (bank * 2 + fam6) * MAX_RULES + (rule & (MAX_RULES - 1));
	__u64 *n = bpf_map_lookup_elem(&rule_hits, &key);

	if (n)
		*n += 1;
}

#endif
