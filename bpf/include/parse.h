/* Stage 1: parse Ethernet, VLAN tags, IPv4/IPv6 (options, extension
 * headers) and TCP/UDP/ICMP/ICMPv6. Every access is bounds-checked. A
 * packet the kernel's IP input drops (bad header, checksum, length) yields
 * a DROP_* reason; anything past the IP header is the hosts' business and
 * never drops a packet. The rest fills struct pkt for the later stages. */
#ifndef BPFROUTER_PARSE_H
#define BPFROUTER_PARSE_H

#include "common.h"
#include "csum.h"
#include "consts.h"

#define ETH_P_8021AD_ 0x88A8
#define ETH_P_8021Q_ 0x8100

struct vlan_hdr_ {
	__be16 tci;
	__be16 encap_proto;
};

struct pkt {
	void *data;
	void *data_end;
	struct ethhdr *eth;
	/* At most one of ip4/ip6 is set. Test the one you use: the verifier
	 * cannot prove a packet pointer non-NULL, so "!ip4" does not imply ip6. */
	struct iphdr *ip4;
	struct ipv6hdr *ip6;
	void *l4;                 /* NULL: no L4 header (non-first fragment, other proto) */
	__u32 len;                /* frame length */
	__u16 l3_off;             /* offsets of the IP and L4 headers, 0: none; */
	__u16 l4_off;             /* scalars, for the observers (observe.h) */
	__u16 l3_proto;           /* host order ethertype after VLAN tags */
	__u16 vlan_id[MAX_VLAN_DEPTH];
	__u8 vlan_depth;
	__u8 l4_proto;
	__u8 ip_options;          /* IPv4 header carries options */
	__u8 hop_by_hop;          /* IPv6 hop-by-hop header present */
	__u8 fragment;            /* an IPv4 fragment (first or not): its ports do not hash */
};

/* The L4 header's fixed part, for the observers and classify (ICMPv6
 * type). A router forwards whatever follows the IP header, so an L4 header
 * that is short, cut off or inconsistent (TCP doff < 5, UDP length < 8) is
 * not a reason to drop: p->l4 stays NULL ("not understood") and the packet
 * is routed as the kernel routes it. l4_len: the bytes the IP header says
 * follow (frames may carry padding past them). */
static __always_inline void parse_l4(struct pkt *p, void *l4, __u32 l4_len, __u8 proto)
{
	void *end = p->data_end;

	p->l4_proto = proto;
	switch (proto) {
	case IPPROTO_TCP:
		if (l4_len < sizeof(struct tcphdr) || l4 + sizeof(struct tcphdr) > end)
			return;
		break;
	case IPPROTO_UDP:
	case IPPROTO_ICMP:
		if (l4_len < 8 || l4 + 8 > end)
			return;
		break;
	case IPPROTO_ICMPV6:
		if (l4_len < 4 || l4 + 4 > end)
			return;
		break;
	default:
		return;        /* other protocols are forwarded unparsed */
	}
	p->l4 = l4;
	p->l4_off = l4 - p->data;
}

/* Returns -1 when the IP header is valid (the kernel would process the
 * packet), else the DROP_* reason of the kernel's ip_rcv_core. */
static __always_inline int parse_ipv4(struct pkt *p, void *l3)
{
	struct iphdr *iph = l3;
	void *end = p->data_end;
	__u32 hlen, tot;

	if ((void *)(iph + 1) > end)
		return REASON_DROP_TRUNC_L3;
	if (iph->version != 4)
		return REASON_DROP_BAD_IP_VERSION;
	if (iph->ihl < 5)
		return REASON_DROP_BAD_IHL;
	hlen = iph->ihl * 4;
	if (l3 + hlen > end)
		return REASON_DROP_TRUNC_L3;
	if (hlen == sizeof(*iph) && !ipv4_csum_ok(iph))
		return REASON_DROP_BAD_CHECKSUM;
	tot = bpf_ntohs(iph->tot_len);
	if (tot < hlen || l3 + tot > end)
		return REASON_DROP_BAD_TOTAL_LEN;
	p->ip4 = iph;
	p->l3_off = l3 - p->data;
	p->ip_options = hlen > sizeof(*iph);
	p->fragment = !!(iph->frag_off & bpf_htons(0x3FFF));
	/* Only the first fragment carries the L4 header. */
	if (iph->frag_off & bpf_htons(0x1FFF))
		return -1;
	parse_l4(p, l3 + hlen, tot - hlen, iph->protocol);
	return -1;
}

/* The kernel forwards IPv6 without reading extension headers other than
 * hop-by-hop (which goes to the kernel here), so a chain that is cut off
 * or longer than MAX_IPV6_EXTHDRS only leaves the L4 header unknown. */
static __always_inline int parse_ipv6(struct pkt *p, void *l3)
{
	struct ipv6hdr *ip6h = l3;
	void *end = p->data_end;
	void *cur, *payload_end;
	__u8 nexthdr;

	if ((void *)(ip6h + 1) > end)
		return REASON_DROP_TRUNC_L3;
	if (ip6h->version != 6)
		return REASON_DROP_BAD_IP_VERSION;
	payload_end = (void *)(ip6h + 1) + bpf_ntohs(ip6h->payload_len);
	if (payload_end > end)
		return REASON_DROP_BAD_TOTAL_LEN;
	p->ip6 = ip6h;
	p->l3_off = l3 - p->data;
	cur = ip6h + 1;
	nexthdr = ip6h->nexthdr;

#pragma unroll
	for (int i = 0; i < MAX_IPV6_EXTHDRS; i++) {
		__u8 *h = cur;

		switch (nexthdr) {
		case IPPROTO_HOPOPTS:
			p->hop_by_hop = 1;
			/* fallthrough */
		case IPPROTO_ROUTING:
		case IPPROTO_DSTOPTS:
			if ((void *)(h + 8) > end)
				return -1;
			nexthdr = h[0];
			cur += (h[1] + 1) * 8;
			continue;
		case IPPROTO_AH:
			if ((void *)(h + 8) > end)
				return -1;
			nexthdr = h[0];
			cur += (h[1] + 2) * 4;
			continue;
		case IPPROTO_FRAGMENT:
			if ((void *)(h + 8) > end)
				return -1;
			/* Non-first fragment: no L4 header follows. */
			if (((__u16)h[2] << 8 | h[3]) & 0xFFF8)
				return -1;
			nexthdr = h[0];
			cur += 8;
			continue;
		default:
			if (cur <= payload_end)
				parse_l4(p, cur, payload_end - cur, nexthdr);
			return -1;
		}
	}
	/* Walked MAX_IPV6_EXTHDRS headers: a longer chain's L4 stays unknown. */
	switch (nexthdr) {
	case IPPROTO_HOPOPTS:
	case IPPROTO_ROUTING:
	case IPPROTO_DSTOPTS:
	case IPPROTO_AH:
	case IPPROTO_FRAGMENT:
		return -1;
	}
	if (cur <= payload_end)
		parse_l4(p, cur, payload_end - cur, nexthdr);
	return -1;
}

static __always_inline int parse_packet(struct pkt *p)
{
	struct ethhdr *eth = p->data;
	void *cur;
	__u16 proto;

	p->len = p->data_end - p->data;
	if ((void *)(eth + 1) > p->data_end)
		return REASON_DROP_TRUNC_L2;
	p->eth = eth;
	proto = bpf_ntohs(eth->h_proto);
	cur = eth + 1;

#pragma unroll
	for (int i = 0; i < MAX_VLAN_DEPTH; i++) {
		struct vlan_hdr_ *vh = cur;

		if (proto != ETH_P_8021Q_ && proto != ETH_P_8021AD_)
			break;
		if ((void *)(vh + 1) > p->data_end)
			return REASON_DROP_TRUNC_L2;
		p->vlan_id[i] = bpf_ntohs(vh->tci) & 0x0FFF;
		p->vlan_depth = i + 1;
		proto = bpf_ntohs(vh->encap_proto);
		cur = vh + 1;
	}
	p->l3_proto = proto;

	if (proto == ETH_P_IP)
		return parse_ipv4(p, cur);
	if (proto == ETH_P_IPV6)
		return parse_ipv6(p, cur);
	return -1;
}

#endif
