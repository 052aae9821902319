/* One's complement sums (RFC 1071) for the headers the data plane checks
 * or writes. Words are summed as they lie in the packet: a one's
 * complement sum does not depend on byte order, so no swapping is needed. */
#ifndef BPFROUTER_CSUM_H
#define BPFROUTER_CSUM_H

#include "common.h"

/* A 32-bit running sum folded to 16 bits (not complemented). */
static __always_inline __u32 csum_fold32(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	return (sum & 0xffff) + (sum >> 16);
}

/* A 64-bit running sum of 32-bit words folded to 16 bits (not complemented). */
static __always_inline __u32 csum_fold64(__u64 sum)
{
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffffffff) + (sum >> 32);
	return csum_fold32((__u32)sum);
}

/* The sum of an option-less IPv4 header's five words. */
static __always_inline __u64 ipv4_header_sum(const struct iphdr *iph)
{
	const __u32 *w = (const __u32 *)iph;

	return (__u64)w[0] + w[1] + w[2] + w[3] + w[4];
}

/* RFC 1812 5.2.2: a router verifies the header checksum (the kernel in
 * ip_rcv_core). Only option-less headers: those with options go to the
 * kernel, which checks them. */
static __always_inline int ipv4_csum_ok(const struct iphdr *iph)
{
	return csum_fold64(ipv4_header_sum(iph)) == 0xffff;
}

/* The checksum of an option-less IPv4 header whose check field is 0. */
static __always_inline __u16 ipv4_csum(const struct iphdr *iph)
{
	return ~csum_fold64(ipv4_header_sum(iph)) & 0xffff;
}

#endif
