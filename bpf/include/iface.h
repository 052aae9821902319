/* Interfaces the router is attached to: their MAC, MTU, counter slot and
 * the kernel's policy for packets they receive, and the devmap used to
 * redirect frames out of them. */
#ifndef BPFROUTER_IFACE_H
#define BPFROUTER_IFACE_H

#include "common.h"
#include "consts.h"

/* The ingress's sysctls as the kernel combines them (conf.all and
 * conf.<port>), mirrored by the agent (bpfrouter/interfaces.py). 0 is the
 * kernel's default: forwarding on, rp_filter 0. */
enum iface_flag {
	IFACE_F_NO_FWD4 = 1 << 0,          /* conf.<port>.forwarding = 0 */
	IFACE_F_NO_FWD6 = 1 << 1,          /* conf.all.forwarding = 0, or disable_ipv6 */
	IFACE_F_RPF_STRICT = 1 << 2,       /* max(all, port) rp_filter = 1 */
	IFACE_F_RPF_LOOSE = 1 << 3,        /* ... = 2 */
	IFACE_F_ACCEPT_LOCAL = 1 << 4,     /* all or port */
	IFACE_F_ROUTE_LOCALNET = 1 << 5,   /* all or port */
	IFACE_F_NO_ADDR4 = 1 << 6,         /* the port has no IPv4 address */
	IFACE_F_SOURCE_UNSURE = 1 << 7,    /* the FIB mirror cannot check sources (kernelpolicy.h) */
	/* The family has services (include/lb.h): entry sends its packets to
	 * the load balancer's addresses (lb_vips) through the lb stage. */
	IFACE_F_LB4 = 1 << 8,
	IFACE_F_LB6 = 1 << 9,
	/* The family has rules to walk (include/rules.h): entry sends its
	 * packets through the policy stage. Here, not in a map of its own, as
	 * entry has the port's flags at hand. */
	IFACE_F_RULES4 = 1 << 12,
	IFACE_F_RULES6 = 1 << 13,
	/* The family's rules are ones the walk cannot follow (agent/rules.py):
	 * pass this port's packets of that family. */
	IFACE_F_PASS_POLICY4 = 1 << 14,
	IFACE_F_PASS_POLICY6 = 1 << 15,
};

struct iface {
	__u32 slot;             /* counter slot, 1..MAX_IFACES-1 */
	__u32 mtu;
	__u8 mac[6];
	__u16 flags;            /* enum iface_flag */
	__u32 group;            /* the device group, for rules' suppress_ifgroup */
};

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
