/* Rewrite a forwarded frame: bytes past the IP packet trimmed, MAC
 * addresses and TTL/hop limit, with an incremental IPv4 header checksum
 * update (RFC 1624). */
#ifndef BPFROUTER_REWRITE_H
#define BPFROUTER_REWRITE_H

#include "common.h"
#include "parse.h"
#include "fib.h"

static __always_inline void ipv4_decrease_ttl(struct iphdr *iph)
{
	__u32 check = (__u32)iph->check;

	check += (__u32)bpf_htons(0x0100);
	iph->check = (__sum16)(check + (check >= 0xFFFF));
	iph->ttl--;
}

/* Bytes after the IP packet (Ethernet padding, or a bogus length) leave
 * with it, as the kernel trims them on input (ip_rcv_core, ip6_rcv_core:
 * pskb_trim_rcsum to the IP length). Returns the bytes to cut, 0 for none:
 * the parser has already refused an IP length past the frame. An IPv6
 * payload length of 0 is a jumbogram only with a hop-by-hop header, which
 * the fast path passes; else the kernel keeps the bare header, as here. */
static __always_inline __u32 bytes_past_ip(const struct pkt *p)
{
	__u32 frame = p->data_end - p->data, ip_end;

	if (p->ip4)
		ip_end = p->l3_off + bpf_ntohs(p->ip4->tot_len);
	else if (p->ip6)
		ip_end = p->l3_off + sizeof(struct ipv6hdr) + bpf_ntohs(p->ip6->payload_len);
	else
		return 0;
	return frame > ip_end ? frame - ip_end : 0;
}

/* forwarded: the TTL goes down; a header the router wrote itself leaves
 * with the TTL it was given, as the kernel's output path sends it */
static __always_inline void rewrite_forward(struct pkt *p, const struct fib_result *res, int forwarded)
{
	if (forwarded && p->ip4)
		ipv4_decrease_ttl(p->ip4);
	else if (forwarded && p->ip6)
		p->ip6->hop_limit--;
	__builtin_memcpy(p->eth->h_dest, res->dmac, ETH_ALEN);
	__builtin_memcpy(p->eth->h_source, res->smac, ETH_ALEN);
}

#endif
