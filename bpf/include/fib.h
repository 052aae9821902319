/* Stage 3: route lookup. Two interchangeable back ends chosen at load
 * time: the BPF FIB (LPM tries + next-hop table, fed by the control plane)
 * and the kernel FIB through bpf_fib_lookup. Both fill a struct fib_result
 * and return a reason; REASON_FWD_* means "forward with res". */
#ifndef BPFROUTER_FIB_H
#define BPFROUTER_FIB_H

#include "common.h"
#include "consts.h"
#include "parse.h"
#include "iface.h"
#include "neigh.h"
#include "dirfib.h"
#include "hashfib6.h"
#include "lpmfib.h"
#include "nexthop.h"
#include "tables.h"

struct fib_result {
	__u32 egress_ifindex;
	__u32 nh_id;
	__u8 smac[6];
	__u8 dmac[6];
	__u8 route_type;
	__u8 prefixlen;
	__u8 route_proto;
	__u8 neigh_found;
	__u32 slot6;            /* the matched IPv6 slot (hash levels), for events */
	__u32 group;            /* RTYPE_MULTIPATH: the route's next-hop group (nexthop.h) */
	__u32 hash;             /* RTYPE_MULTIPATH: the flow's hash */
	__u32 bucket;           /* RTYPE_MULTIPATH: the bucket taken */
	__u32 mtu;              /* REASON_PASS_FRAG_NEEDED: the egress MTU */
};

static __always_inline __u32 pkt_l3_len(const struct pkt *p)
{
	if (p->ip4)
		return bpf_ntohs(p->ip4->tot_len);
	if (p->ip6)
		return bpf_ntohs(p->ip6->payload_len) + sizeof(struct ipv6hdr);
	return 0;
}

static __always_inline __u8 pkt_ttl(const struct pkt *p)
{
	if (p->ip4)
		return p->ip4->ttl;
	if (p->ip6)
		return p->ip6->hop_limit;
	return 0;
}

static __always_inline int route_type_reason(__u8 type)
{
	switch (type) {
	case RTYPE_LOCAL:
		return REASON_PASS_LOCAL;
	case RTYPE_BLACKHOLE:
		return REASON_DROP_BLACKHOLE;
	case RTYPE_UNREACHABLE:
		return REASON_PASS_UNREACHABLE;
	case RTYPE_PROHIBIT:
		return REASON_PASS_PROHIBIT;
	}
	return REASON_PASS_FIB_MISS;
}

/* A RTYPE_KERNEL route's reason, from its entry (a PASS_* reason). */
static __always_inline int kernel_route_reason(__u32 nh_id)
{
	int reason = nh_id & KERNEL_ROUTE_REASON_MASK;

	if (reason > REASON_FWD_IPV6 && reason < REASON_DROP_BLACKHOLE)
		return reason;
	return REASON_PASS_ROUTE_TYPE;
}

/* Set by the loader before verification, so unused code is removed. */
const volatile __u32 fib_mode = FIB_MODE_BPF;
const volatile __u32 fib_impl = FIB_IMPL_DIR;

static __always_inline int fib_route4(__be32 daddr, struct route *rt, int detail)
{
	return fib_impl == FIB_IMPL_LPM ? lpm4_lookup(daddr, rt) : dir4_lookup(daddr, rt, detail);
}

static __always_inline int fib_route6(const __u8 *daddr, struct route *rt, int detail, __u32 *slot)
{
	return fib_impl == FIB_IMPL_LPM ? lpm6_lookup(daddr, rt) : h6_lookup(daddr, rt, detail, slot);
}

/* A route's next hop nh_id, in the kernel's forwarding order after the
 * route type: TTL, MTU, then neighbor. detail: a probe, which is not traffic. */
static __always_inline int nexthop_resolve(const struct pkt *p, struct fib_result *res, __u32 nh_id, int detail)
{
	struct nexthop *nh;
	struct iface *out;
	struct neigh_key nk = {};
	struct neigh *n;

	res->nh_id = nh_id;
	nh = bpf_map_lookup_elem(&nexthops, &nh_id);
	if (!nh || !nh->ifindex)
		return REASON_PASS_NEXTHOP_INVALID;
	res->egress_ifindex = nh->ifindex;
	if (pkt_ttl(p) <= 1)
		return REASON_PASS_TTL_EXCEEDED;
	out = iface_lookup(nh->ifindex);
	if (!out)
		return REASON_PASS_EGRESS_UNMANAGED;
	if (pkt_l3_len(p) > out->mtu) {
		res->mtu = out->mtu;
		return REASON_PASS_FRAG_NEEDED;
	}

	nk.ifindex = nh->ifindex;
	if (nh->flags & NEXTHOP_F_GATEWAY) {
		nk.family = nh->family;
		__builtin_memcpy(nk.addr, nh->gw, 16);
	} else if (p->ip4) {
		nk.family = AF_INET;
		__builtin_memcpy(nk.addr, &p->ip4->daddr, 4);
	} else if (p->ip6) {
		nk.family = AF_INET6;
		__builtin_memcpy(nk.addr, &p->ip6->daddr, 16);
	}
	n = bpf_map_lookup_elem(&neighbors, &nk);
	if (!n)
		return REASON_PASS_NO_NEIGH;
	if (!detail)
		neigh_mark_used(n);
	res->neigh_found = 1;
	__builtin_memcpy(res->dmac, n->mac, 6);
	__builtin_memcpy(res->smac, out->mac, 6);
	return p->ip4 ? REASON_FWD_IPV4 : REASON_FWD_IPV6;
}

/* The route of the table in `table` (include/rules.h): 0, main and local
 * are the image of local and main as one, which a lookup without rules
 * walks; any other table is a prefix of the keys of one LPM trie per
 * family. detail: fill in the prefix length (and protocol) too. */
static __always_inline int fib_find(const struct pkt *p, struct route *rt, __u32 table, int detail,
				    struct fib_result *res)
{
	if (table && table != RT_TABLE_MAIN && table != RT_TABLE_LOCAL) {
		if (p->ip4)
			return tables4_lookup(table, p->ip4->daddr, rt);
		if (p->ip6)
			return tables6_lookup(table, p->ip6->daddr.in6_u.u6_addr8, rt);
		return 0;
	}
	if (p->ip4)
		return fib_route4(p->ip4->daddr, rt, detail);
	if (p->ip6)
		return fib_route6(p->ip6->daddr.in6_u.u6_addr8, rt, detail, &res->slot6);
	return 0;
}

/* A found route: its reason, or its next hop. A multipath route's group
 * is left in res->group for the ecmp stage, which picks the path (-1: go on). */
static __always_inline int fib_apply(const struct pkt *p, struct fib_result *res, const struct route *rt, int detail)
{
	res->route_type = rt->type;
	res->prefixlen = rt->prefixlen;
	res->route_proto = rt->proto;
	if (rt->type == RTYPE_KERNEL)
		return kernel_route_reason(rt->nh_id);
	if (rt->type == RTYPE_MULTIPATH) {
		res->group = rt->nh_id;
		return -1;
	}
	if (rt->type != RTYPE_UNICAST)
		return route_type_reason(rt->type);
	return nexthop_resolve(p, res, rt->nh_id, detail);
}

/* The route, then its next hop, without rules to walk. */
static __always_inline int fib_lookup_bpf(const struct pkt *p, struct fib_result *res, int detail)
{
	struct route rt = {};

	if (!p->ip4 && !p->ip6)
		return REASON_PASS_NON_IP;
	if (!fib_find(p, &rt, 0, detail, res) || rt.type == RTYPE_NONE)
		return REASON_PASS_FIB_MISS;
	return fib_apply(p, res, &rt, detail);
}

/* bpf_fib_lookup leaves the next hop's address in params (the gateway, or
 * the destination on a connected route); the mirrored entry for it is marked
 * so the agent replays the use, as the kernel's own entry is not touched. */
static __always_inline void neigh_mark_used_kernel(const struct bpf_fib_lookup *params)
{
	struct neigh_key nk = {};
	struct neigh *n;

	nk.ifindex = params->ifindex;
	nk.family = params->family;
	if (params->family == AF_INET)
		__builtin_memcpy(nk.addr, &params->ipv4_dst, 4);
	else
		__builtin_memcpy(nk.addr, params->ipv6_dst, 16);
	n = bpf_map_lookup_elem(&neighbors, &nk);
	if (n)
		neigh_mark_used(n);
}

static __always_inline int fib_lookup_kernel(struct xdp_md *ctx, const struct pkt *p,
					     struct fib_result *res, int detail)
{
	struct bpf_fib_lookup params = {};
	long rc;

	params.ifindex = ctx->ingress_ifindex;
	params.tot_len = pkt_l3_len(p);
	if (p->ip4) {
		params.family = AF_INET;
		params.tos = p->ip4->tos;
		params.l4_protocol = p->ip4->protocol;
		params.ipv4_src = p->ip4->saddr;
		params.ipv4_dst = p->ip4->daddr;
	} else if (p->ip6) {
		params.family = AF_INET6;
		params.flowinfo = *(__be32 *)p->ip6 & bpf_htonl(0x0FFFFFFF);
		params.l4_protocol = p->ip6->nexthdr;
		__builtin_memcpy(params.ipv6_src, &p->ip6->saddr, 16);
		__builtin_memcpy(params.ipv6_dst, &p->ip6->daddr, 16);
	} else {
		return REASON_PASS_NON_IP;
	}
	/* the ports, for fib_multipath_hash_policy 1 and 3 */
	if (p->l4 && !p->fragment && !(p->ip6 && p->ip6->nexthdr == IPPROTO_FRAGMENT) &&
	    (p->l4_proto == IPPROTO_TCP || p->l4_proto == IPPROTO_UDP ||
				      p->l4_proto == IPPROTO_SCTP || p->l4_proto == IPPROTO_UDPLITE)) {
		params.sport = ((__be16 *)p->l4)[0];
		params.dport = ((__be16 *)p->l4)[1];
	}
	rc = bpf_fib_lookup(ctx, &params, sizeof(params), 0);
	switch (rc) {
	case BPF_FIB_LKUP_RET_SUCCESS:
		break;
	case BPF_FIB_LKUP_RET_BLACKHOLE:
		res->route_type = RTYPE_BLACKHOLE;
		return REASON_DROP_BLACKHOLE;
	case BPF_FIB_LKUP_RET_UNREACHABLE:
		res->route_type = RTYPE_UNREACHABLE;
		return REASON_PASS_UNREACHABLE;
	case BPF_FIB_LKUP_RET_PROHIBIT:
		res->route_type = RTYPE_PROHIBIT;
		return REASON_PASS_PROHIBIT;
	case BPF_FIB_LKUP_RET_NO_NEIGH:
		res->route_type = RTYPE_UNICAST;
		res->egress_ifindex = params.ifindex;
		return REASON_PASS_NO_NEIGH;
	case BPF_FIB_LKUP_RET_FRAG_NEEDED:
		res->route_type = RTYPE_UNICAST;
		res->mtu = params.mtu_result;
		return REASON_PASS_FRAG_NEEDED;
	default:        /* local delivery, no route, forwarding disabled, ... */
		return REASON_PASS_KERNEL_NOT_FWDED;
	}
	res->route_type = RTYPE_UNICAST;
	res->egress_ifindex = params.ifindex;
	if (pkt_ttl(p) <= 1)
		return REASON_PASS_TTL_EXCEEDED;
	if (!iface_lookup(params.ifindex))
		return REASON_PASS_EGRESS_UNMANAGED;
	if (!detail)    /* a probe (`route get`) is not traffic */
		neigh_mark_used_kernel(&params);
	res->neigh_found = 1;
	__builtin_memcpy(res->dmac, params.dmac, 6);
	__builtin_memcpy(res->smac, params.smac, 6);
	return p->ip4 ? REASON_FWD_IPV4 : REASON_FWD_IPV6;
}

#endif
