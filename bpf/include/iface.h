/* Interfaces the router is attached to: their MAC, MTU and counter slot,
 * and the devmap used to redirect frames out of them. */
#ifndef BPFROUTER_IFACE_H
#define BPFROUTER_IFACE_H

#include "common.h"
#include "consts.h"

struct iface {
	__u32 slot;             /* counter slot, 1..MAX_IFACES-1 */
	__u32 mtu;
	__u8 mac[6];
	__u16 flags;
};

/* Policy routing the fast path does not implement (rules other than the
 * defaults, VRFs) could route this port's packets of that family
 * differently: pass them to the kernel. High bits: the low ones are the
 * sysctl flags'. */
#define IFACE_F_PASS_POLICY4 0x4000
#define IFACE_F_PASS_POLICY6 0x8000

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_IFACES);
	__type(key, __u32);     /* ifindex */
	__type(value, struct iface);
} ifaces SEC(".maps");

/* Redirect targets; written from inside the router's network namespace
 * because the kernel resolves the ifindex there. */
struct {
	__uint(type, BPF_MAP_TYPE_DEVMAP_HASH);
	__uint(max_entries, MAX_IFACES);
	__type(key, __u32);
	__type(value, __u32);
} tx_ports SEC(".maps");

static __always_inline struct iface *iface_lookup(__u32 ifindex)
{
	return bpf_map_lookup_elem(&ifaces, &ifindex);
}

#endif
