/* Neighbors (IP -> MAC per interface), mirrored from the kernel's table.
 *
 * Liveness: the kernel ages a neighbor only when its own traffic uses it
 * (neigh_event_send: STALE -> DELAY -> PROBE -> REACHABLE or FAILED). XDP
 * traffic never reaches that code, so the fast path marks the entries it
 * forwards with (`used`), and the agent replays the use to the kernel with
 * NTF_USE (bpfrouter/neighbors.py); an entry the kernel then finds dead
 * (FAILED) leaves this map on the RTM_NEWNEIGH that follows. */
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
	__u32 used;             /* set by the fast path, cleared by the agent once it told the kernel */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_NEIGHBORS);
	__type(key, struct neigh_key);
	__type(value, struct neigh);
} neighbors SEC(".maps");

/* Written only when it changes (once per agent pass), so forwarding CPUs do
 * not bounce the entry's cache line on every packet. */
static __always_inline void neigh_mark_used(struct neigh *n)
{
	if (!n->used)
		n->used = 1;
}

#endif
