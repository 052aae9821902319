/* Stage 4: rewrite a forwarded frame: MAC addresses and TTL/hop limit,
 * with an incremental IPv4 header checksum update (RFC 1624). */
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

static __always_inline void rewrite_forward(struct pkt *p, const struct fib_result *res)
{
	if (p->ip4)
		ipv4_decrease_ttl(p->ip4);
	else if (p->ip6)
		p->ip6->hop_limit--;
	__builtin_memcpy(p->eth->h_dest, res->dmac, ETH_ALEN);
	__builtin_memcpy(p->eth->h_source, res->smac, ETH_ALEN);
}

#endif
