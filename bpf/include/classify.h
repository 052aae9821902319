/* Stage 2: decide which parsed packets the fast path may route at all.
 * Anything that needs the kernel's attention (ARP/ND, VLAN sub-interfaces,
 * multicast, options that routers must process, link-local scope) gets a
 * PASS_* reason; -1 means "route it". */
#ifndef BPFROUTER_CLASSIFY_H
#define BPFROUTER_CLASSIFY_H

#include "common.h"
#include "consts.h"
#include "parse.h"
#include "iface.h"

static __always_inline int mac_equal(const __u8 *a, const __u8 *b)
{
	return *(const __u32 *)a == *(const __u32 *)b &&
	       *(const __u16 *)(a + 4) == *(const __u16 *)(b + 4);
}

static __always_inline int classify_l2(const struct pkt *p, const struct iface *in)
{
	if (p->eth->h_dest[0] & 1)
		return REASON_PASS_L2_MULTICAST;
	if (!mac_equal(p->eth->h_dest, in->mac))
		return REASON_PASS_OTHERHOST;
	return -1;
}

static __always_inline int classify_ipv4(const struct pkt *p, const struct iphdr *iph,
					 const struct iface *in)
{
	__u32 dst = bpf_ntohl(iph->daddr);
	int reason = classify_l2(p, in);

	if (reason >= 0)
		return reason;
	if (p->ip_options)
		return REASON_PASS_IP_OPTIONS;
	if ((dst >> 28) == 0xE || dst == 0xFFFFFFFF)
		return REASON_PASS_L3_MULTICAST;
	return -1;
}

static __always_inline int classify_ipv6(const struct pkt *p, const struct ipv6hdr *ip6h,
					 const struct iface *in)
{
	int reason;

	if (p->l4 && p->l4_proto == IPPROTO_ICMPV6) {
		__u8 type = *(__u8 *)p->l4;
		if (type >= 133 && type <= 137)
			return REASON_PASS_ND;
	}
	reason = classify_l2(p, in);
	if (reason >= 0)
		return reason;
	if (p->hop_by_hop)
		return REASON_PASS_IPV6_HOP_BY_HOP;
	if (ip6h->daddr.in6_u.u6_addr8[0] == 0xFF)
		return REASON_PASS_L3_MULTICAST;
	/* fe80::/10 is never forwarded; the kernel answers beyond-scope. */
	if ((bpf_ntohs(ip6h->daddr.in6_u.u6_addr16[0]) & 0xFFC0) == 0xFE80 ||
	    (bpf_ntohs(ip6h->saddr.in6_u.u6_addr16[0]) & 0xFFC0) == 0xFE80)
		return REASON_PASS_LINK_LOCAL;
	return -1;
}

static __always_inline int classify(const struct pkt *p, const struct iface *in)
{
	if (p->vlan_depth)
		return REASON_PASS_VLAN;
	if (p->l3_proto == ETH_P_ARP)
		return REASON_PASS_ARP;
	if (p->ip4)
		return classify_ipv4(p, p->ip4, in);
	if (p->ip6)
		return classify_ipv6(p, p->ip6, in);
	return REASON_PASS_NON_IP;
}

#endif
