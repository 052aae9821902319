/* The load balancer's answer to a client whose packet is over the egress
 * MTU toward its backend, once encapsulated (encap.h) or translated
 * (nat.h): what IPVS answers from its transmit (ensure_mtu_is_adequate),
 * with the kernel's own icmp_send and icmpv6_send fields. An IPv4 packet
 * with DF and any IPv6 packet get ICMP fragmentation needed or packet too
 * big from the VIP, with the egress MTU less the outer header, quoting the
 * client's packet as it arrived (576 bytes in all for IPv4, 1280 for
 * IPv6). The answer is then routed to the client like a packet the router
 * sends. An IPv4 packet without DF stays the kernel's to fragment (the
 * outer header's DF is clear), as does what the answer cannot be built
 * for (counted frag_needed, as before).
 *
 * In three steps, so that nothing changes until the answer is certain:
 * the client's packet is checked where it lies (after the outer header of
 * any length, IPIP or GUE), then the outer header is stripped (or the
 * translation undone), then the answer is built around the packet, which
 * now starts right after the Ethernet header. */
#ifndef BPFROUTER_LB_TOOBIG_H
#define BPFROUTER_LB_TOOBIG_H

#include "common.h"
#include "consts.h"
#include "packet_ctx.h"
#include "lb.h"
#include "csum.h"
#include "nat.h"

#define ICMP4_ANSWER_MAX 576            /* RFC 1812 4.3.2.3, icmp_send */
#define ICMP6_ANSWER_MAX 1280           /* RFC 4443 2.4 (c), icmpv6_send */
#define ICMP4_QUOTE (ICMP4_ANSWER_MAX - 20 - 8)
#define ICMP6_QUOTE (ICMP6_ANSWER_MAX - 40 - 8)
#define ICMP4_TOS_CONTROL 0xC0          /* IPTOS_PREC_INTERNETCONTROL, with the quoted TOS bits (RT_TOS) */
#define IPV4_MIN_MTU 68
#define IPV6_MIN_MTU 1280
#define ANSWER_TTL 64                   /* the kernel's default ip_default_ttl, hop_limit */

/* The client's packet at `off` (the outer header's end, < 128): 4 or 6
 * when it is one to answer with the MTU `mtu`, else 0. */
static __always_inline int toobig_answerable(struct xdp_md *ctx, __u32 off, __u32 mtu)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	void *at = data + (off & 0x7f);
	struct iphdr *in4 = at;
	struct ipv6hdr *in6 = at;

	if ((void *)(in6 + 1) > end)
		return 0;
	if (in4->version == 4)
		return in4->ihl == 5 && (in4->frag_off & bpf_htons(0x4000)) && !(in4->frag_off & bpf_htons(0x3FFF)) &&
		       bpf_ntohs(in4->tot_len) >= ICMP4_QUOTE && mtu >= IPV4_MIN_MTU && mtu <= 0xFFFF &&
		       (in4->protocol == IPPROTO_TCP || in4->protocol == IPPROTO_UDP) ? 4 : 0;
	/* not about an ICMP error, nor through extension headers */
	return in6->version == 6 && bpf_ntohs(in6->payload_len) + sizeof(*in6) >= ICMP6_QUOTE &&
	       mtu >= IPV6_MIN_MTU && (in6->nexthdr == IPPROTO_TCP || in6->nexthdr == IPPROTO_UDP) ? 6 : 0;
}

/* Moves the frame's start by `delta` bytes (bpf_xdp_adjust_head), keeping
 * its Ethernet header: a passed answer must still be addressed to the
 * router. Returns 0, 1 when the frame is unchanged, -1 when it was changed
 * and could not be finished. */
static __always_inline int move_start(struct xdp_md *ctx, int delta)
{
	/* read afresh: the compiler would otherwise drop the check below as
	 * implied by an earlier one the verifier cannot relate to it */
	void *data = (void *)(long)*(volatile __u32 *)&ctx->data, *end = (void *)(long)ctx->data_end;
	struct ethhdr eth;

	if (data + sizeof(eth) > end)
		return 1;
	__builtin_memcpy(&eth, data, sizeof(eth));
	if (bpf_xdp_adjust_head(ctx, delta))
		return 1;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	if (data + sizeof(eth) > end)
		return -1;
	__builtin_memcpy(data, &eth, sizeof(eth));
	return 0;
}

/* Room for the IP header (`ip_len`) and the ICMP header in front of the
 * client's packet (right after Ethernet), cut to `quote` bytes of it.
 * Returns 0 or -1 (the frame changed, not finished). */
static __always_inline int toobig_reshape(struct xdp_md *ctx, int ip_len, int quote)
{
	int len;

	if (move_start(ctx, -(ip_len + 8)))
		return -1;
	len = (int)(ctx->data_end - ctx->data);
	if (bpf_xdp_adjust_tail(ctx, (int)(sizeof(struct ethhdr) + ip_len + 8 + quote) - len))
		return -1;
	return 0;
}

static __always_inline int toobig4(struct xdp_md *ctx, __u32 mtu)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	struct iphdr *in = data + sizeof(struct ethhdr), *ip;
	__be32 client, vip;
	struct ethhdr *eth;
	__u8 *icmp;
	__u64 sum;
	__u8 tos;

	if ((void *)(in + 1) > end)
		return -1;
	client = in->saddr;
	vip = in->daddr;
	tos = ICMP4_TOS_CONTROL | (in->tos & 0x1E);
	if (toobig_reshape(ctx, sizeof(struct iphdr), ICMP4_QUOTE))
		return -1;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	eth = data;
	ip = data + sizeof(*eth);
	icmp = (void *)(ip + 1);
	if (icmp + 8 + ICMP4_QUOTE > (__u8 *)end)
		return -1;
	eth->h_proto = bpf_htons(ETH_P_IP);
	ip->version = 4;
	ip->ihl = 5;
	ip->tos = tos;
	ip->tot_len = bpf_htons(ICMP4_ANSWER_MAX);
	ip->id = bpf_get_prandom_u32() & 0xffff;
	ip->frag_off = 0;
	ip->ttl = ANSWER_TTL;
	ip->protocol = IPPROTO_ICMP;
	ip->check = 0;
	ip->saddr = vip;
	ip->daddr = client;
	ip->check = ipv4_csum(ip);
	*(__be32 *)icmp = bpf_htonl(0x03040000);        /* destination unreachable, fragmentation needed */
	*(__be32 *)(icmp + 4) = bpf_htonl(mtu);         /* unused, next-hop MTU */
	sum = bpf_csum_diff(NULL, 0, (void *)icmp, 512, 0);
	sum += bpf_csum_diff(NULL, 0, (void *)icmp + 512, 8 + ICMP4_QUOTE - 512, 0);
	*(__u16 *)(icmp + 2) = ~csum_fold64(sum) & 0xffff;
	return 4;
}

static __always_inline int toobig6(struct xdp_md *ctx, __u32 mtu)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	struct ipv6hdr *in = data + sizeof(struct ethhdr), *ip;
	struct in6_addr client, vip;
	struct ethhdr *eth;
	__u8 *icmp;
	__u64 sum = 0;

	if ((void *)(in + 1) > end)
		return -1;
	client = in->saddr;
	vip = in->daddr;
	if (toobig_reshape(ctx, sizeof(struct ipv6hdr), ICMP6_QUOTE))
		return -1;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	eth = data;
	ip = data + sizeof(*eth);
	icmp = (void *)(ip + 1);
	if (icmp + 8 + ICMP6_QUOTE > (__u8 *)end)
		return -1;
	eth->h_proto = bpf_htons(ETH_P_IPV6);
	*(__be32 *)ip = bpf_htonl(0x60000000U);
	ip->payload_len = bpf_htons(8 + ICMP6_QUOTE);
	ip->nexthdr = IPPROTO_ICMPV6;
	ip->hop_limit = ANSWER_TTL;
	ip->saddr = vip;
	ip->daddr = client;
	*(__be32 *)icmp = bpf_htonl(0x02000000);        /* packet too big */
	*(__be32 *)(icmp + 4) = bpf_htonl(mtu);
	/* the pseudo-header: addresses, upper-layer length, next header */
#pragma unroll
	for (int i = 0; i < 4; i++)
		sum += vip.in6_u.u6_addr32[i] + (__u64)client.in6_u.u6_addr32[i];
	sum += bpf_htonl(8 + ICMP6_QUOTE) + (__u64)bpf_htonl(IPPROTO_ICMPV6);
	sum += bpf_csum_diff(NULL, 0, (void *)icmp, 512, 0);
	sum += bpf_csum_diff(NULL, 0, (void *)icmp + 512, 512, 0);
	sum += bpf_csum_diff(NULL, 0, (void *)icmp + 1024, 8 + ICMP6_QUOTE - 1024, 0);
	*(__u16 *)(icmp + 2) = ~csum_fold64(sum) & 0xffff;
	return 6;
}

/* NAT: the translated packet back to what the client sent (the answer
 * quotes that, as IPVS answers before it translates); its service's id,
 * or -1 when the flow's way back is gone. */
static __always_inline int nat_untranslate(struct xdp_md *ctx, const struct packet_ctx *pc)
{
	struct lb_nat_key nk = {};
	struct nat_rewrite to;
	struct lb_nat *rev;
	struct pkt p = {};
	__u16 *ports;

	/* constant offsets (l3 at 14, checked by the caller; no IPv4 options,
	 * which the kernel handles before a service sees them), and room for
	 * an IPv6 header whatever the family: nat_rewrite's copies are that
	 * long to the verifier, which does not tie them to the family */
	p.data = (void *)(long)ctx->data;
	p.data_end = (void *)(long)ctx->data_end;
	if (p.data + sizeof(struct ethhdr) + sizeof(struct ipv6hdr) + 20 > p.data_end)
		return -1;
	p.eth = p.data;
	p.l3_off = sizeof(struct ethhdr);
	p.l4_proto = pc->l4_proto;
	if (pc->l3_proto == ETH_P_IP) {
		p.ip4 = p.data + sizeof(struct ethhdr);
		if (p.ip4->ihl != 5)
			return -1;
		p.l4 = (void *)(p.ip4 + 1);
		__builtin_memcpy(nk.backend, &p.ip4->daddr, 4);
		__builtin_memcpy(nk.nat_src, &p.ip4->saddr, 4);
		nk.family = 4;
	} else {
		p.ip6 = p.data + sizeof(struct ethhdr);
		p.l4 = p.data + (pc->l4_off & 0x3ff);
		if (p.l4 + 4 > p.data_end)
			return -1;
		__builtin_memcpy(nk.backend, &p.ip6->daddr, 16);
		__builtin_memcpy(nk.nat_src, &p.ip6->saddr, 16);
		nk.family = 6;
	}
	ports = p.l4;
	nk.backend_port = ports[1];
	nk.nat_port = ports[0];
	nk.proto = p.l4_proto;
	rev = bpf_map_lookup_elem(&lb_nat, &nk);
	if (!rev)
		return -1;
	__builtin_memcpy(to.saddr, rev->client, 16);
	__builtin_memcpy(to.daddr, rev->vip, 16);
	to.sport = rev->client_port;
	to.dport = rev->vip_port;
	if (nat_rewrite(&p, &to))
		return -1;
	return rev->service;
}

/* After the fib or ecmp stage found `reason`: a packet of a service over
 * the egress MTU (res.mtu) becomes the answer to its client and goes back
 * to routing (STAGE_TO_FIB); anything else keeps its reason. DSR: the
 * MTU less the outer header. NAT: the translation is undone first (a
 * translated packet the kernel cannot have: decided() drops it). */
static __always_inline int lb_answer_too_big(struct xdp_md *ctx, struct packet_ctx *pc, int reason)
{
	__u32 svc = pc->lb_service, mtu = pc->res.mtu, outer = 0;
	struct lb_stat *st;
	struct iface *in;
	int family;

	if (reason != REASON_PASS_FRAG_NEEDED || !(pc->flags & (PCTX_F_LB_ENCAP | PCTX_F_LB_SNAT)) || pc->probe ||
	    pc->l3_off != sizeof(struct ethhdr))
		return reason;
	/* more than the ingress MTU arrived: a GRO aggregate (generic XDP), whose
	 * segments may each fit; the kernel segments it (IPVS: !skb_is_gso) */
	in = iface_lookup(ctx->ingress_ifindex);
	if (!in || pc->len - pc->l3_off > in->mtu)
		return reason;
	if (pc->flags & PCTX_F_LB_ENCAP) {
		outer = pc->l4_off - pc->l3_off;        /* the client's packet follows the outer header */
		if (pc->l4_off > 127 || outer >= mtu)
			return reason;
	}
	family = toobig_answerable(ctx, pc->l3_off + outer, mtu - outer);
	if (!family)
		return reason;
	if (outer) {
		int rc = move_start(ctx, outer);

		if (rc)
			return rc > 0 ? reason : REASON_DROP_LB_ANSWER_FAILED;
	} else {
		int id = nat_untranslate(ctx, pc);

		if (id < 0)
			return reason;
		svc = id;
	}
	if ((family == 4 ? toobig4(ctx, mtu - outer) : toobig6(ctx, mtu - outer)) < 0)
		return REASON_DROP_LB_ANSWER_FAILED;    /* the frame changed: nothing to send */
	st = bpf_map_lookup_elem(&lb_service_stats, &svc);
	if (st)
		st->too_big++;
	/* routed like the router's own packet: local and main, no input checks */
	pc->l3_proto = family == 4 ? ETH_P_IP : ETH_P_IPV6;
	pc->l4_off = pc->l3_off + (family == 4 ? sizeof(struct iphdr) : sizeof(struct ipv6hdr));
	pc->l4_proto = family == 4 ? IPPROTO_ICMP : IPPROTO_ICMPV6;
	pc->flags = PCTX_F_LB | PCTX_F_ORIGINATED;
	pc->rounds = 0;
	pc->table = 0;
	__builtin_memset(&pc->res, 0, sizeof(pc->res));
	return STAGE_TO_FIB;
}

#endif
