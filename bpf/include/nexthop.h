/* Next-hop groups: a multipath route (RTA_MULTIPATH, or a kernel next-hop
 * group, `ip nexthop add id N group ...`) names a group instead of a next
 * hop, and the ecmp stage picks one of its members per flow: bucket
 * hash % buckets of the group's table in nh_buckets, as the kernel's
 * resilient groups do (nexthop_select_path_res).
 *
 * Resilient groups (`type resilient`): the table is the kernel's, mirrored
 * bucket by bucket (its dump, and RTM_NEWNEXTHOPBUCKET for each bucket the
 * kernel moves as its idle and unbalanced timers allow).
 *
 * Hash-threshold groups (multipath routes, `type mpath`): the kernel splits
 * the hash space by weight, so removing one member moves flows between
 * the others too. Here the agent fills a table of its own by weight
 * (bpfrouter/ecmp.py), and when a route's group changes it keeps every
 * bucket whose member stays: removing a member moves only its flows,
 * adding one moves only the flows it takes over. Each flow still takes a
 * member of the kernel's group, at the member's weight.
 *
 * The flow hash covers the fields the kernel's fib_multipath_hash_policy
 * and fib_multipath_hash_fields select (the agent mirrors both sysctls of
 * each family as a field mask); the hash function is bpfrouter's own, so a
 * flow may take another member than the kernel would give it, never one
 * outside the group. */
#ifndef BPFROUTER_NEXTHOP_H
#define BPFROUTER_NEXTHOP_H

#include "common.h"
#include "consts.h"
#include "parse.h"
#include "lpmfib.h"

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_NEXTHOPS);
	__type(key, __u32);
	__type(value, struct nexthop);
} nexthops SEC(".maps");

struct nh_group {
	__u16 count;            /* members; 0: the group is empty */
	__u16 buckets;          /* the size of its table */
	__u32 bucket_base;      /* its table's first entry in nh_buckets */
	__u32 kernel_id;        /* the kernel's next-hop group id, 0: a multipath route's */
	__u32 flags;            /* NH_GROUP_F_* */
	__u32 nh[MAX_ECMP_PATHS];       /* member next-hop ids (the nexthops map) */
};

#define NH_GROUP_F_PARTIAL 1        /* the kernel's route has members left out here (dead) */
#define NH_GROUP_F_RESILIENT 2      /* the table is the kernel's */

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_NH_GROUPS);
	__type(key, __u32);
	__type(value, struct nh_group);
} nh_groups SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_NH_BUCKETS);
	__type(key, __u32);
	__type(value, __u32);   /* next-hop id */
} nh_buckets SEC(".maps");

/* The kernel's FIB_MULTIPATH_HASH_FIELD_* bits (include/net/ip_fib.h). */
#define HASH_F_SRC_IP           0x0001
#define HASH_F_DST_IP           0x0002
#define HASH_F_IP_PROTO         0x0004
#define HASH_F_FLOWLABEL        0x0008
#define HASH_F_SRC_PORT         0x0010
#define HASH_F_DST_PORT         0x0020
#define HASH_F_INNER_SRC_IP     0x0040
#define HASH_F_INNER_DST_IP     0x0080
#define HASH_F_INNER_IP_PROTO   0x0100
#define HASH_F_INNER_FLOWLABEL  0x0200
#define HASH_F_INNER_SRC_PORT   0x0400
#define HASH_F_INNER_DST_PORT   0x0800
#define HASH_F_INNER_L3         (HASH_F_INNER_SRC_IP | HASH_F_INNER_DST_IP | HASH_F_INNER_IP_PROTO | \
				 HASH_F_INNER_FLOWLABEL)

/* Per family (0: IPv4, 1: IPv6): the fields the kernel's policy selects,
 * and the seed (net.ipv4.fib_multipath_hash_seed when set, so routers
 * configured alike hash alike). Written by the agent. */
struct ecmp_hash_config {
	__u32 fields[2];
	__u32 seed;
	__u32 reserved;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ecmp_hash_config);
} ecmp_hash SEC(".maps");

static __always_inline __u32 hash_mix(__u32 h, __u32 w)
{
	h ^= w;
	h *= 0x9E3779B1U;
	return h ^ (h >> 15);
}

static __always_inline __u32 hash_final(__u32 h)
{
	h ^= h >> 16;
	h *= 0x85EBCA6BU;
	h ^= h >> 13;
	h *= 0xC2B2AE35U;
	return h ^ (h >> 16);
}

static __always_inline __u32 hash_addr6(__u32 h, const struct in6_addr *a)
{
	h = hash_mix(h, a->in6_u.u6_addr32[0]);
	h = hash_mix(h, a->in6_u.u6_addr32[1]);
	h = hash_mix(h, a->in6_u.u6_addr32[2]);
	return hash_mix(h, a->in6_u.u6_addr32[3]);
}

/* What follows the IP header, for protocols the parser leaves alone
 * (IP-in-IP, SCTP, UDP-Lite): right after the IPv4 header of a first or
 * only fragment, or right after the IPv6 header (no extension header). */
static __always_inline void *after_ip(const struct pkt *p, __u8 proto, int fragment)
{
	if (fragment)
		return NULL;
	if (p->ip4)
		return p->ip4->protocol == proto ? (void *)p->ip4 + (p->ip4->ihl & 0xF) * 4 : NULL;
	if (p->ip6)
		return p->ip6->nexthdr == proto ? (void *)(p->ip6 + 1) : NULL;
	return NULL;
}

/* The inner IPv4 or IPv6 header of an IP-in-IP packet (policy 2, or the
 * inner fields of policy 3). */
static __always_inline __u32 hash_inner(const struct pkt *p, __u32 h, __u32 fields, int fragment)
{
	void *inner;

	if ((inner = after_ip(p, IPPROTO_IPIP, fragment))) {
		struct iphdr *in4 = inner;

		if ((void *)(in4 + 1) > p->data_end || in4->version != 4)
			return h;
		if (fields & HASH_F_INNER_SRC_IP)
			h = hash_mix(h, in4->saddr);
		if (fields & HASH_F_INNER_DST_IP)
			h = hash_mix(h, in4->daddr);
		if (fields & HASH_F_INNER_IP_PROTO)
			h = hash_mix(h, in4->protocol);
	} else if ((inner = after_ip(p, IPPROTO_IPV6, fragment))) {
		struct ipv6hdr *in6 = inner;

		if ((void *)(in6 + 1) > p->data_end || in6->version != 6)
			return h;
		if (fields & HASH_F_INNER_SRC_IP)
			h = hash_addr6(h, &in6->saddr);
		if (fields & HASH_F_INNER_DST_IP)
			h = hash_addr6(h, &in6->daddr);
		if (fields & HASH_F_INNER_IP_PROTO)
			h = hash_mix(h, in6->nexthdr);
		if (fields & HASH_F_INNER_FLOWLABEL)
			h = hash_mix(h, *(__be32 *)in6 & bpf_htonl(0x000FFFFF));
	}
	return h;
}

/* The flow's 31-bit multipath hash (the kernel's is 31 bits too). Ports
 * count only when the packet has an L4 header and is not a fragment, as
 * the kernel's flow dissector reads them. */
static __always_inline __u32 ecmp_flow_hash(const struct pkt *p, int fragment)
{
	__u32 zero = 0, fields, h;
	struct ecmp_hash_config *cfg = bpf_map_lookup_elem(&ecmp_hash, &zero);
	__u16 *ports = p->l4;

	if (!cfg)
		return 0;
	h = cfg->seed;
	if (p->ip4) {
		fields = cfg->fields[0];
		if (fields & HASH_F_SRC_IP)
			h = hash_mix(h, p->ip4->saddr);
		if (fields & HASH_F_DST_IP)
			h = hash_mix(h, p->ip4->daddr);
		if (fields & HASH_F_IP_PROTO)
			h = hash_mix(h, p->ip4->protocol);
	} else if (p->ip6) {
		/* a fragment header right after the IPv6 header (where it is in
		 * practice): marking it in the parser's header walk doubles the
		 * entry stage's verification */
		fragment |= p->ip6->nexthdr == IPPROTO_FRAGMENT;
		fields = cfg->fields[1];
		if (fields & HASH_F_SRC_IP)
			h = hash_addr6(h, &p->ip6->saddr);
		if (fields & HASH_F_DST_IP)
			h = hash_addr6(h, &p->ip6->daddr);
		/* a fragment's protocol is its fragment header, as the kernel's
		 * flow dissector stops there */
		if (fields & HASH_F_IP_PROTO)
			h = hash_mix(h, p->l4_proto && !fragment ? p->l4_proto : p->ip6->nexthdr);
		if (fields & HASH_F_FLOWLABEL)
			h = hash_mix(h, *(__be32 *)p->ip6 & bpf_htonl(0x000FFFFF));
	} else {
		return 0;
	}
	if (!ports && !fragment)         /* the parser reads TCP and UDP ports only */
		ports = after_ip(p, IPPROTO_SCTP, 0) ?: after_ip(p, IPPROTO_UDPLITE, 0);
	if (ports && (void *)(ports + 2) <= p->data_end && !fragment &&
	    (p->l4_proto == IPPROTO_TCP || p->l4_proto == IPPROTO_UDP ||
	     p->l4_proto == IPPROTO_SCTP || p->l4_proto == IPPROTO_UDPLITE)) {
		if (fields & HASH_F_SRC_PORT)
			h = hash_mix(h, ports[0]);
		if (fields & HASH_F_DST_PORT)
			h = hash_mix(h, (__u32)ports[1] << 16);
	}
	if (fields & HASH_F_INNER_L3)
		h = hash_inner(p, h, fields, fragment);
	return hash_final(h) >> 1;
}

/* Whether a member of the group leaves through ifindex (the reverse-path
 * filter's fib_info_nh_uses_dev): 1 yes, 0 no, -1 unknown (members were
 * left out). */
static __always_inline int ecmp_group_uses_dev(__u32 group, __u32 ifindex)
{
	struct nh_group *g = bpf_map_lookup_elem(&nh_groups, &group);

	if (!g || !g->count)
		return -1;
	for (int i = 0; i < MAX_ECMP_PATHS; i++) {
		__u32 id = g->nh[i];
		struct nexthop *nh;

		if (i >= g->count)
			break;
		nh = bpf_map_lookup_elem(&nexthops, &id);
		if (!nh || !nh->ifindex)        /* cleared under us: cannot tell */
			return -1;
		if (nh->ifindex == ifindex)
			return 1;
	}
	return g->flags & NH_GROUP_F_PARTIAL ? -1 : 0;
}

/* The group member for hash: its next-hop id (0: the group is empty or
 * unknown), and the bucket taken, for `route get`. */
static __always_inline __u32 ecmp_pick(__u32 group, __u32 hash, __u32 *bucket)
{
	struct nh_group *g = bpf_map_lookup_elem(&nh_groups, &group);
	__u32 key, *nh;

	if (!g || !g->count || !g->buckets)
		return 0;
	*bucket = hash % g->buckets;
	key = g->bucket_base + *bucket;
	nh = bpf_map_lookup_elem(&nh_buckets, &key);
	return nh ? *nh : 0;
}

#endif
