/* Neighbors (IP -> MAC per interface), mirrored from the kernel's table. */
#ifndef BPFROUTER_NEIGH_H
#define BPFROUTER_NEIGH_H

#include "common.h"
#include "consts.h"

struct neigh_key {
	__u32 ifindex;
	__u32 family;           /* AF_INET or AF_INET6 */
	__u8 addr[16];          /* IPv4 in the first 4 bytes, rest zero */
};

struct neigh {
	__u8 mac[6];
	__u16 state;            /* kernel NUD_* state when mirrored */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_NEIGHBORS);
	__type(key, struct neigh_key);
	__type(value, struct neigh);
} neighbors SEC(".maps");

#endif
