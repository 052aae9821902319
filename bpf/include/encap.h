/* Encapsulation for direct server return: the client's IP packet, whole,
 * inside an outer IPv4 (IPIP, protocol 4 or 41) or IPv6 header to the
 * backend, which decapsulates it (an ipip or ip6tnl device) and answers
 * the client from the VIP itself. The outer source carries the flow's
 * hash, so the backend's NIC spreads flows over its receive queues. GUE
 * (variant 1, draft-ietf-intarea-gue: the IP packet right after a UDP
 * header, as Katran sends it) carries the hash in the UDP source port
 * too, for NICs that spread UDP by ports but not IPIP; its UDP checksum
 * is 0, which IPv6 allows for tunnels (RFC 6935, 6936: the receiver must
 * take it, as `bpfrouter decap` does). */
#ifndef BPFROUTER_ENCAP_H
#define BPFROUTER_ENCAP_H

#include "common.h"
#include "parse.h"
#include "csum.h"
#include "lb.h"

#define OUTER_TTL 64

/* The inner packet's IP length and DS field, from its header. */
static __always_inline int inner_ip(const struct pkt *p, __u32 *len, __u8 *ds)
{
	if (p->ip4) {
		*len = bpf_ntohs(p->ip4->tot_len);
		*ds = p->ip4->tos;
		return 4;
	}
	if (p->ip6) {
		*len = sizeof(struct ipv6hdr) + bpf_ntohs(p->ip6->payload_len);
		*ds = (bpf_ntohl(*(__be32 *)p->ip6) >> 20) & 0xff;
		return 6;
	}
	return 0;
}

#define GUE_SPORT_BASE 0xC000         /* the flow's hash in 49152-65535 */

static __always_inline void gue_header(struct udphdr *u, const struct lb_config *cfg, __u32 hash, __u32 inner_len)
{
	u->source = bpf_htons(GUE_SPORT_BASE | (hash & 0x3FFF));
	u->dest = cfg->gue_port;
	u->len = bpf_htons(sizeof(*u) + inner_len);
	u->check = 0;
}

/* Puts the outer header (and, `gue`, a UDP header) in front of the IP
 * packet at l3_off (14: no VLAN tag). Returns the bytes added, or 0 when
 * the frame cannot grow. The outer IPv4 header leaves DF clear: one over
 * the egress MTU is the kernel's to fragment, and its id is random, so
 * fragments of different packets are not put together (RFC 6864). */
static __always_inline int lb_encapsulate(struct xdp_md *ctx, const struct pkt *p, const struct lb_backend *be,
					  const struct lb_config *cfg, __u32 hash, int gue)
{
	__u32 inner_len;
	__u8 ds;
	int inner = inner_ip(p, &inner_len, &ds);
	int udp = gue ? sizeof(struct udphdr) : 0;
	int grow = (be->family == 4 ? sizeof(struct iphdr) : sizeof(struct ipv6hdr)) + udp;
	__u8 proto = gue ? IPPROTO_UDP : inner == 4 ? IPPROTO_IPIP : IPPROTO_IPV6;
	struct ethhdr eth;
	void *data, *end;

	if (!inner || p->l3_off != sizeof(struct ethhdr) || inner_len > 0xFFFF - sizeof(struct iphdr) - udp)
		return 0;
	__builtin_memcpy(&eth, p->eth, sizeof(eth));
	if (bpf_xdp_adjust_head(ctx, -grow))
		return 0;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	if (be->family == 4) {
		struct ethhdr *e = data;
		struct iphdr *o = data + sizeof(*e);

		if ((void *)(o + 1) + sizeof(struct udphdr) > end)
			return 0;
		__builtin_memcpy(e, &eth, sizeof(eth));
		e->h_proto = bpf_htons(ETH_P_IP);
		o->version = 4;
		o->ihl = 5;
		o->tos = ds;
		o->tot_len = bpf_htons(inner_len + sizeof(*o) + udp);
		o->id = bpf_get_prandom_u32() & 0xffff;
		o->frag_off = 0;
		o->ttl = OUTER_TTL;
		o->protocol = proto;
		o->check = 0;
		o->saddr = cfg->src4 | (bpf_htonl(hash) & cfg->src4_hostmask);
		__builtin_memcpy(&o->daddr, be->addr, 4);
		o->check = ipv4_csum(o);
		if (gue)
			gue_header((void *)(o + 1), cfg, hash, inner_len);
	} else {
		struct ethhdr *e = data;
		struct ipv6hdr *o = data + sizeof(*e);
		__be32 h = bpf_htonl(hash);

		if ((void *)(o + 1) + sizeof(struct udphdr) > end)
			return 0;
		__builtin_memcpy(e, &eth, sizeof(eth));
		e->h_proto = bpf_htons(ETH_P_IPV6);
		*(__be32 *)o = bpf_htonl(0x60000000U | ((__u32)ds << 20) | (hash & 0xFFFFF));
		o->payload_len = bpf_htons(inner_len + udp);
		o->nexthdr = proto;
		o->hop_limit = OUTER_TTL;
		__builtin_memcpy(o->saddr.in6_u.u6_addr8, cfg->src6, 12);
		__builtin_memcpy(o->saddr.in6_u.u6_addr8 + 12, &h, 4);
		__builtin_memcpy(o->daddr.in6_u.u6_addr8, be->addr, 16);
		if (gue)
			gue_header((void *)(o + 1), cfg, hash, inner_len);
	}
	return grow;
}

#endif
