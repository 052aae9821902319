/* Address and port translation for the load balancer's NAT mode: a
 * packet's source and destination addresses and ports rewritten in place,
 * with the IPv4 header checksum and the TCP or UDP checksum (which covers
 * the addresses through its pseudo-header) updated incrementally (RFC
 * 1624). One's complement sums do not depend on byte order, so the words
 * are summed as they lie in the packet. */
#ifndef BPFROUTER_NAT_H
#define BPFROUTER_NAT_H

#include "common.h"
#include "parse.h"
#include "csum.h"

/* ~sum of the 16-bit words of `from` plus those of `to`, into a running sum. */
static __always_inline __u32 csum_diff_words(__u32 sum, const __u16 *from, const __u16 *to, int words)
{
#pragma unroll
	for (int i = 0; i < 8; i++) {
		if (i >= words)
			break;
		sum += (__u16)~from[i] + to[i];
	}
	return sum;
}

/* The same for a pair of addresses going from (src, dst) to (to_src,
 * to_dst): 2 words each (IPv4) or 8 (IPv6), a constant on each path, as
 * the verifier bounds the reads by it. */
static __always_inline __u32 csum_diff_addrs(__u32 sum, const __u16 *src, const __u16 *dst, const __u8 *to_src,
					     const __u8 *to_dst, int words)
{
	if (words == 2) {
		sum = csum_diff_words(sum, src, (const __u16 *)to_src, 2);
		return csum_diff_words(sum, dst, (const __u16 *)to_dst, 2);
	}
	sum = csum_diff_words(sum, src, (const __u16 *)to_src, 8);
	return csum_diff_words(sum, dst, (const __u16 *)to_dst, 8);
}

static __always_inline __u16 csum_apply(__u16 check, __u32 diff)
{
	return ~csum_fold32((__u16)~check + csum_fold32(diff)) & 0xffff;
}

struct nat_rewrite {
	__u8 saddr[16];
	__u8 daddr[16];
	__be16 sport;
	__be16 dport;
};

/* Rewrites the packet's addresses and ports to `to`. l4 is its TCP or UDP
 * header (the parser checked it is whole: 20 or 8 bytes). */
static __always_inline int nat_rewrite(struct pkt *p, const struct nat_rewrite *to)
{
	__u16 *sum4 = NULL, *l4sum = NULL;
	__u32 diff = 0, l4diff;
	int words;
	__u16 *src, *dst, *ports = p->l4;

	if (!p->l4)
		return -1;
	if (p->l4_proto == IPPROTO_TCP) {
		if (p->l4 + 20 > p->data_end)
			return -1;
		l4sum = p->l4 + 16;
	} else if (p->l4_proto == IPPROTO_UDP) {
		if (p->l4 + 8 > p->data_end)
			return -1;
		l4sum = p->l4 + 6;
	} else {
		return -1;
	}
	if (p->ip4) {
		src = (__u16 *)&p->ip4->saddr;
		dst = (__u16 *)&p->ip4->daddr;
		sum4 = (__u16 *)&p->ip4->check;
		words = 2;
	} else if (p->ip6) {
		src = (__u16 *)&p->ip6->saddr;
		dst = (__u16 *)&p->ip6->daddr;
		words = 8;
	} else {
		return -1;
	}
	diff = csum_diff_addrs(diff, src, dst, to->saddr, to->daddr, words);
	l4diff = diff + (__u16)~ports[0] + (__u16)to->sport + (__u16)~ports[1] + (__u16)to->dport;
	if (sum4)
		*sum4 = csum_apply(*sum4, diff);
	/* an IPv4 UDP checksum of 0 is none: it stays none */
	if (!(p->l4_proto == IPPROTO_UDP && p->ip4 && *l4sum == 0)) {
		*l4sum = csum_apply(*l4sum, l4diff);
		if (p->l4_proto == IPPROTO_UDP && *l4sum == 0)
			*l4sum = 0xffff;
	}
	if (words == 2) {
		__builtin_memcpy(src, to->saddr, 4);
		__builtin_memcpy(dst, to->daddr, 4);
	} else {
		__builtin_memcpy(src, to->saddr, 16);
		__builtin_memcpy(dst, to->daddr, 16);
	}
	ports[0] = to->sport;
	ports[1] = to->dport;
	return 0;
}

/* The sum's change when a 16-bit word goes from `from` to `to`. */
static __always_inline __u32 csum_word(__u32 sum, __u16 from, __u16 to)
{
	return sum + (__u16)~from + to;
}

/* An ICMP error about a translated packet, translated the same way: the
 * outer addresses to `to_src` and `to_dst`, the quoted packet's addresses
 * and ports to `quoted` (and the quoted headers' checksums with them), and
 * the ICMP checksum for all of it (ICMPv6's covers the outer addresses
 * too). q: the quoted IP header, ports: its L4 ports (both bounds-checked
 * by the caller, 20 or 40 bytes and 4). */
static __always_inline void nat_rewrite_icmp(struct pkt *p, void *q, __u16 *ports, const __u8 *to_src,
					      const __u8 *to_dst, const struct nat_rewrite *quoted)
{
	void *end = p->data_end;
	__u16 *icmp_sum = p->l4 + 2, *src, *dst, *qsum4 = NULL, *l4sum = NULL;
	__u32 icmp = 0, outer = 0, addrs = 0, l4 = 0;
	int words;
	__u8 proto;

	if (p->l4 + 4 > end)
		return;
	if (p->ip4) {
		struct iphdr *in = q;

		src = (__u16 *)&in->saddr;
		dst = (__u16 *)&in->daddr;
		qsum4 = (__u16 *)&in->check;
		proto = in->protocol;
		words = 2;
		outer = csum_diff_addrs(0, (const __u16 *)&p->ip4->saddr, (const __u16 *)&p->ip4->daddr, to_src,
					to_dst, 2);
	} else if (p->ip6) {
		struct ipv6hdr *in = q;

		src = (__u16 *)&in->saddr;
		dst = (__u16 *)&in->daddr;
		proto = in->nexthdr;
		words = 8;
		outer = csum_diff_addrs(0, (const __u16 *)&p->ip6->saddr, (const __u16 *)&p->ip6->daddr, to_src,
					to_dst, 8);
	} else {
		return;
	}
	addrs = csum_diff_addrs(addrs, src, dst, quoted->saddr, quoted->daddr, words);
	l4 = csum_word(addrs, ports[0], quoted->sport);
	l4 = csum_word(l4, ports[1], quoted->dport);
	icmp = l4;                      /* the quoted addresses and ports themselves */
	if (proto == IPPROTO_UDP && (void *)(ports + 4) <= end)
		l4sum = ports + 3;
	else if (proto == IPPROTO_TCP && (void *)(ports + 9) <= end)
		l4sum = ports + 8;
	if (l4sum && !(proto == IPPROTO_UDP && p->ip4 && *l4sum == 0)) {
		__u16 old = *l4sum, new = csum_apply(old, l4);

		if (proto == IPPROTO_UDP && new == 0)
			new = 0xffff;
		icmp = csum_word(icmp, old, new);
		*l4sum = new;
	}
	if (qsum4) {
		__u16 old = *qsum4, new = csum_apply(old, addrs);

		icmp = csum_word(icmp, old, new);
		*qsum4 = new;
	}
	if (p->ip6)
		icmp += outer;          /* ICMPv6's pseudo-header */
	*icmp_sum = csum_apply(*icmp_sum, icmp);
	if (p->ip4) {
		p->ip4->check = csum_apply(p->ip4->check, outer);
		__builtin_memcpy(&p->ip4->saddr, to_src, 4);
		__builtin_memcpy(&p->ip4->daddr, to_dst, 4);
		__builtin_memcpy(src, quoted->saddr, 4);
		__builtin_memcpy(dst, quoted->daddr, 4);
	} else if (p->ip6) {
		__builtin_memcpy(&p->ip6->saddr, to_src, 16);
		__builtin_memcpy(&p->ip6->daddr, to_dst, 16);
		__builtin_memcpy(src, quoted->saddr, 16);
		__builtin_memcpy(dst, quoted->daddr, 16);
	}
	ports[0] = quoted->sport;
	ports[1] = quoted->dport;
}

#endif
