/* The kernel's input policy for a packet the FIB stage would forward: the
 * checks ip_route_input_slow, __mkroute_input and ip6_forward make besides
 * the route, with the ingress's sysctls as mirrored in struct iface flags.
 * They run after the FIB stage and only when it would forward: whatever
 * else the FIB stage decides goes to the kernel (which applies them
 * itself) or is a blackhole drop (which the kernel drops too), and a probe
 * (`route get`) still reports the route.
 *
 * IPv4, in the kernel's order:
 *   martians: multicast or limited-broadcast source; source 0.0.0.0
 *     (to 0.0.0.0: delivered); destination 0.0.0.0; 127/8 destination,
 *     else 127/8 source, unless route_localnet (class E, 240/4, and the
 *     rest of 0/8 are unicast to the kernel).
 *   forwarding off on the ingress (conf.<ingress>.forwarding): to the kernel.
 *   egress = ingress: to the kernel, which may send a redirect.
 *   fib_validate_source (net/ipv4/fib_frontend.c), oif = the egress:
 *     rp_filter 0 (max of conf.all and conf.<ingress>): accept_local
 *       accepts; else a source that is an address of the router is refused
 *       (with custom local routes or rules, one whose route is local or
 *       broadcast). The mirror cannot tell these apart (local, broadcast
 *       and anycast routes are all RTYPE_LOCAL), so a local-route source
 *       goes to the kernel (PASS_LOCAL_SOURCE).
 *     rp_filter 1 or 2, the full check, with the route back to the source
 *       from the fast path's own FIB. None, or blackhole/unreachable/
 *       prohibit: refused. Local or broadcast: refused unless accept_local
 *       (then the kernel decides: broadcast is still refused). Unicast
 *       through the ingress: accepted. Through another port: refused when
 *       the ingress has no IPv4 address or rp_filter is 1 (strict),
 *       accepted when 2 (loose).
 *     With custom rules the kernel makes that lookup through the rules
 *     even with rp_filter 0; local and main come first there (the rule
 *     walk's precondition), so the mirror's check holds unless another
 *     table holds local routes. What the mirror cannot evaluate goes to
 *     the kernel (IFACE_F_SOURCE_UNSURE): custom rules with rp_filter on
 *     or with such a table, a VRF, a multipath route back.
 * IPv6 (ip6_rcv_core, ip6_forward): loopback or multicast source, loopback
 *   destination; conf.all.forwarding off or disable_ipv6: to the kernel;
 *   egress = ingress: to the kernel; unspecified source. No reverse-path
 *   filter. */
#ifndef BPFROUTER_KERNELPOLICY_H
#define BPFROUTER_KERNELPOLICY_H

#include "common.h"
#include "consts.h"
#include "parse.h"
#include "iface.h"
#include "fib.h"

#define IFACE_F_RPF (IFACE_F_RPF_STRICT | IFACE_F_RPF_LOOSE)

static __always_inline int martian4(__u32 src, __u32 dst, __u32 flags)
{
	if ((src >> 28) == 0xE || src == 0xFFFFFFFF)
		return REASON_DROP_MARTIAN_SOURCE;
	if (!src && !dst)
		return REASON_PASS_LOCAL;       /* brd_input: delivered to the router */
	/* ipv4_is_zeronet: 0.0.0.0 alone since Linux 5.3 (the rest of 0/8 is unicast) */
	if (!src)
		return REASON_DROP_MARTIAN_SOURCE;
	if (!dst)
		return REASON_DROP_MARTIAN_DEST;
	if ((dst >> 24) == 127) {
		if (!(flags & IFACE_F_ROUTE_LOCALNET))
			return REASON_DROP_MARTIAN_DEST;
	} else if ((src >> 24) == 127 && !(flags & IFACE_F_ROUTE_LOCALNET)) {
		return REASON_DROP_MARTIAN_SOURCE;
	}
	return -1;
}

/* --fib kernel: the route back through bpf_fib_lookup. It reports the
 * egress of one path of a multipath route, so a mismatch it cannot settle
 * goes to the kernel. */
static __always_inline int source_check4_kernel(struct xdp_md *ctx, __be32 saddr, __be32 daddr, __u32 flags)
{
	struct bpf_fib_lookup params = {};
	struct route route = {};
	__u32 rpf = flags & IFACE_F_RPF;
	long rc;

	params.family = AF_INET;
	params.ifindex = ctx->ingress_ifindex;
	params.ipv4_dst = saddr;
	params.ipv4_src = daddr;
	rc = bpf_fib_lookup(ctx, &params, sizeof(params), 0);
	switch (rc) {
	case BPF_FIB_LKUP_RET_SUCCESS:
	case BPF_FIB_LKUP_RET_NO_NEIGH:     /* the egress is known all the same */
		if (!rpf || params.ifindex == ctx->ingress_ifindex)
			return -1;
		if ((flags & IFACE_F_RPF_LOOSE) && !(flags & IFACE_F_NO_ADDR4))
			return -1;
		return REASON_PASS_SOURCE_UNVERIFIED;
	case BPF_FIB_LKUP_RET_BLACKHOLE:
	case BPF_FIB_LKUP_RET_UNREACHABLE:
	case BPF_FIB_LKUP_RET_PROHIBIT:
		return rpf ? REASON_DROP_RPFILTER : -1;
	case BPF_FIB_LKUP_RET_NOT_FWDED:    /* local, broadcast or no route */
		if (rpf && !(flags & IFACE_F_ACCEPT_LOCAL))
			return REASON_DROP_RPFILTER;
		if (rpf)
			return REASON_PASS_LOCAL_SOURCE;
		/* rp_filter 0 refuses only the router's own addresses: the
		 * mirror (kept in this mode too) tells them from no route. */
		if (fib_route4(saddr, &route, 0) && route.type == RTYPE_LOCAL)
			return REASON_PASS_LOCAL_SOURCE;
		return -1;
	}
	return REASON_PASS_SOURCE_UNVERIFIED;
}

static __always_inline int source_check4(struct xdp_md *ctx, __be32 saddr, __be32 daddr, __u32 flags)
{
	struct route route = {};
	struct nexthop *nh;
	__u32 rpf = flags & IFACE_F_RPF, nh_id;

	if (flags & IFACE_F_SOURCE_UNSURE)
		return REASON_PASS_SOURCE_UNVERIFIED;
	if (!rpf && (flags & IFACE_F_ACCEPT_LOCAL))
		return -1;
	if (fib_mode == FIB_MODE_KERNEL)
		return source_check4_kernel(ctx, saddr, daddr, flags);
	if (!fib_route4(saddr, &route, 0) || route.type == RTYPE_NONE)
		return rpf ? REASON_DROP_RPFILTER : -1;
	switch (route.type) {
	case RTYPE_UNICAST:
		break;
	case RTYPE_LOCAL:
		if (rpf && !(flags & IFACE_F_ACCEPT_LOCAL))
			return REASON_DROP_MARTIAN_SOURCE;
		return REASON_PASS_LOCAL_SOURCE;
	case RTYPE_MULTIPATH:
		if (!rpf)
			return -1;
		switch (ecmp_group_uses_dev(route.nh_id, ctx->ingress_ifindex)) {
		case 1:
			return -1;
		case 0:
			break;
		default:
			return REASON_PASS_SOURCE_UNVERIFIED;
		}
		if ((flags & IFACE_F_RPF_LOOSE) && !(flags & IFACE_F_NO_ADDR4))
			return -1;
		return REASON_DROP_RPFILTER;
	case RTYPE_KERNEL:      /* only the kernel routes it (a group too wide, encap, throw, ...) */
		return rpf ? REASON_PASS_SOURCE_UNVERIFIED : -1;
	default:                /* blackhole, unreachable, prohibit: the lookup fails */
		return rpf ? REASON_DROP_RPFILTER : -1;
	}
	if (!rpf)
		return -1;
	nh_id = route.nh_id;
	nh = bpf_map_lookup_elem(&nexthops, &nh_id);
	if (!nh || !nh->ifindex)
		return REASON_PASS_SOURCE_UNVERIFIED;
	if (nh->ifindex == ctx->ingress_ifindex)
		return -1;
	if ((flags & IFACE_F_RPF_LOOSE) && !(flags & IFACE_F_NO_ADDR4))
		return -1;
	return REASON_DROP_RPFILTER;
}

static __always_inline int ipv6_is_loopback(const struct in6_addr *a)
{
	return !(a->in6_u.u6_addr32[0] | a->in6_u.u6_addr32[1] | a->in6_u.u6_addr32[2]) &&
	       a->in6_u.u6_addr32[3] == bpf_htonl(1);
}

static __always_inline int ipv6_is_unspecified(const struct in6_addr *a)
{
	return !(a->in6_u.u6_addr32[0] | a->in6_u.u6_addr32[1] | a->in6_u.u6_addr32[2] |
		 a->in6_u.u6_addr32[3]);
}

static __always_inline int kernel_policy6(const struct ipv6hdr *ip6h, __u32 flags, int hairpin)
{
	if (ipv6_is_loopback(&ip6h->saddr) || ip6h->saddr.in6_u.u6_addr8[0] == 0xFF)
		return REASON_DROP_MARTIAN_SOURCE;
	if (ipv6_is_loopback(&ip6h->daddr))
		return REASON_DROP_MARTIAN_DEST;
	if (flags & IFACE_F_NO_FWD6)
		return REASON_PASS_FORWARDING_OFF;
	if (hairpin)
		return REASON_PASS_HAIRPIN;
	if (ipv6_is_unspecified(&ip6h->saddr))
		return REASON_DROP_MARTIAN_SOURCE;
	return -1;
}

/* Beside the iface flags: the FIB stage's egress is the ingress. */
#define POLICY_HAIRPIN (1U << 16)

/* IPv4's checks, a global function: verified once, not once per path
 * through the pipeline. Returns -1 (forward) or the reason. */
__attribute__((noinline)) int bpfrouter_kernel_policy4(struct xdp_md *ctx, __be32 saddr, __be32 daddr, __u32 flags)
{
	int reason;

	if (!ctx)
		return -1;
	reason = martian4(bpf_ntohl(saddr), bpf_ntohl(daddr), flags);
	if (reason >= 0)
		return reason;
	if (flags & IFACE_F_NO_FWD4)
		return REASON_PASS_FORWARDING_OFF;
	if (flags & POLICY_HAIRPIN)
		return REASON_PASS_HAIRPIN;
	return source_check4(ctx, saddr, daddr, flags);
}

/* The policy check of a packet the FIB stage forwards out of res's egress:
 * -1 to forward it, else the reason. */
static __always_inline int kernel_policy(struct xdp_md *ctx, const struct pkt *p, __u32 iface_flags,
					 const struct fib_result *res)
{
	int hairpin = res->egress_ifindex == ctx->ingress_ifindex;

	if (p->ip4)
		return bpfrouter_kernel_policy4(ctx, p->ip4->saddr, p->ip4->daddr,
						iface_flags | (hairpin ? POLICY_HAIRPIN : 0));
	if (p->ip6)
		return kernel_policy6(p->ip6, iface_flags, hairpin);
	return -1;
}

#endif
