/* Stage 1: parse Ethernet, VLAN tags, IPv4/IPv6 (options, extension
 * headers) and TCP/UDP/ICMP/ICMPv6. Every access is bounds-checked; a
 * malformed packet yields a DROP_* reason, a well-formed one fills
 * struct pkt for the later stages. */
#ifndef BPFROUTER_PARSE_H
#define BPFROUTER_PARSE_H

#include "common.h"
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
};

/* Returns -1 when the packet parsed, else the DROP_* reason. */
static __always_inline int parse_l4(struct pkt *p, void *l4, __u8 proto)
{
	void *end = p->data_end;

	p->l4_proto = proto;
	switch (proto) {
	case IPPROTO_TCP: {
		struct tcphdr *th = l4;
		if ((void *)(th + 1) > end)
			return REASON_DROP_TRUNC_L4;
		if (th->doff < 5)
			return REASON_DROP_BAD_L4_HEADER;
		if (l4 + th->doff * 4 > end)
			return REASON_DROP_TRUNC_L4;
		break;
	}
	case IPPROTO_UDP: {
		struct udphdr *uh = l4;
		if ((void *)(uh + 1) > end)
			return REASON_DROP_TRUNC_L4;
		if (bpf_ntohs(uh->len) < sizeof(*uh))
			return REASON_DROP_BAD_L4_HEADER;
		break;
	}
	case IPPROTO_ICMP:
		if (l4 + 8 > end)
			return REASON_DROP_TRUNC_L4;
		break;
	case IPPROTO_ICMPV6:
		if (l4 + 4 > end)
			return REASON_DROP_TRUNC_L4;
		break;
	default:
		return -1;     /* other protocols are forwarded unparsed */
	}
	p->l4 = l4;
	p->l4_off = l4 - p->data;
	return -1;
}

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
	tot = bpf_ntohs(iph->tot_len);
	if (tot < hlen || l3 + tot > end)
		return REASON_DROP_BAD_TOTAL_LEN;
	p->ip4 = iph;
	p->l3_off = l3 - p->data;
	p->ip_options = hlen > sizeof(*iph);
	/* Only the first fragment carries the L4 header. */
	if (iph->frag_off & bpf_htons(0x1FFF))
		return -1;
	return parse_l4(p, l3 + hlen, iph->protocol);
}

static __always_inline int parse_ipv6(struct pkt *p, void *l3)
{
	struct ipv6hdr *ip6h = l3;
	void *end = p->data_end;
	void *cur;
	__u8 nexthdr;

	if ((void *)(ip6h + 1) > end)
		return REASON_DROP_TRUNC_L3;
	if (ip6h->version != 6)
		return REASON_DROP_BAD_IP_VERSION;
	if ((void *)(ip6h + 1) + bpf_ntohs(ip6h->payload_len) > end)
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
				return REASON_DROP_TRUNC_EXTHDR;
			nexthdr = h[0];
			cur += (h[1] + 1) * 8;
			continue;
		case IPPROTO_AH:
			if ((void *)(h + 8) > end)
				return REASON_DROP_TRUNC_EXTHDR;
			nexthdr = h[0];
			cur += (h[1] + 2) * 4;
			continue;
		case IPPROTO_FRAGMENT:
			if ((void *)(h + 8) > end)
				return REASON_DROP_TRUNC_EXTHDR;
			/* Non-first fragment: no L4 header follows. */
			if (((__u16)h[2] << 8 | h[3]) & 0xFFF8)
				return -1;
			nexthdr = h[0];
			cur += 8;
			continue;
		default:
			return parse_l4(p, cur, nexthdr);
		}
	}
	/* Walked MAX_IPV6_EXTHDRS headers without reaching an upper layer. */
	switch (nexthdr) {
	case IPPROTO_HOPOPTS:
	case IPPROTO_ROUTING:
	case IPPROTO_DSTOPTS:
	case IPPROTO_AH:
	case IPPROTO_FRAGMENT:
		return REASON_DROP_TOO_MANY_EXTHDRS;
	}
	return parse_l4(p, cur, nexthdr);
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
