/* The L4 load balancer's state (the lb stage, stages/lb.h; written by
 * bpfrouter/lb/). A service is a VIP, a port (0: every port) and a
 * protocol; its backends are slots of lb_backends, and its Maglev table a
 * range of lb_ring, which the agent fills (bpfrouter/lb/maglev.py) and
 * swaps make-before-break: a new range is written, then the service's
 * entry names it with one update.
 *
 * A flow's backend: its entry in the connection table when it has one
 * and the backend still takes that service's connections (present and
 * healthy, or draining); else the ring at hash % size. The hash has a
 * fixed seed, so routers with the same service definition (same table)
 * behind ECMP send a flow to the same backend without sharing state. */
#ifndef BPFROUTER_LB_H
#define BPFROUTER_LB_H

#include "common.h"
#include "consts.h"
#include "parse.h"
#include "counters.h"
#include "nexthop.h"

#define MAX_LB_SERVICES 1024    /* service ids 1..MAX-1 */
#define MAX_LB_BACKENDS 65536   /* backend slots of every service; 0: none */
#define MAX_LB_RING (1 << 22)   /* every service's Maglev table together */
#define MAX_LB_CONNS (1 << 18)  /* the connection and NAT tables: LRU maps are preallocated */
#define LB_HASH_SEED 0x62706672U

struct lb_service_key {
	__u8 addr[16];          /* the VIP (IPv4: the first 4 bytes) */
	__be16 port;            /* 0: every port */
	__u8 proto;             /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 family;            /* 4 or 6 */
};

#define LB_SVC_F_NO_AFFINITY 1  /* the hash alone: no connection table */
#define LB_SVC_F_NAT 2          /* NAT to the backend (else: encapsulation, direct server return) */
#define LB_SVC_F_GUE 4          /* DSR in GUE (UDP, variant 1: the IP packet right after the UDP header) */

struct lb_service {
	__u32 id;               /* its counters' index */
	__u32 ring_base;        /* its table's first entry in lb_ring */
	__u32 ring_size;        /* a prime; 0: no backend takes new flows */
	__u32 flags;            /* LB_SVC_F_* */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_LB_SERVICES);
	__type(key, struct lb_service_key);
	__type(value, struct lb_service);
} lb_services SEC(".maps");

/* The addresses the lb stage must see, and what they are (LB_ADDR_*):
 * a service's VIP (a fragment to one, without ports to match, is the
 * kernel's), or a NAT service's source toward a backend (its replies come
 * back to it). Entry sends a packet to the stage only when its destination
 * is one, so other traffic of a family with services pays one lookup. */
#define LB_ADDR_VIP 1
#define LB_ADDR_NAT_SOURCE 2

struct lb_vip_key {
	__u8 addr[16];
	__u32 family;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 2 * MAX_LB_SERVICES);      /* VIPs and NAT sources */
	__type(key, struct lb_vip_key);
	__type(value, __u32);
} lb_vips SEC(".maps");

#define LB_BE_F_CONNS 1         /* its established connections stay (healthy, or draining) */

struct lb_backend {
	__u8 addr[16];
	__u8 family;            /* of the outer header: 4 (IPIP) or 6 (IPv6 outer) */
	__u8 flags;             /* LB_BE_F_* */
	__u16 reserved;
	__u32 service;          /* its service's id */
	__u32 gen;              /* bumped each time the slot is given out; connections carry it */
	__u8 nat_src[16];       /* NAT: the router's address toward it, the clients' translated source */
};

/* mmapable: a restarted agent reads every slot's generation at once */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_LB_BACKENDS);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct lb_backend);
} lb_backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_LB_RING);
	__type(key, __u32);
	__type(value, __u32);   /* backend slot, 0: none */
} lb_ring SEC(".maps");

struct lb_conn_key {
	__u8 saddr[16];
	__u8 daddr[16];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 family;
	__u16 reserved;
};

struct lb_conn {
	__u32 backend;          /* slot */
	__u32 gen;              /* the slot's gen when learned */
	__be16 nat_port;        /* NAT: the flow's translated source port, 0: none yet */
	__u16 reserved;
};

/* Per-CPU LRU lists (BPF_F_NO_COMMON_LRU), as Katran keeps one table per
 * CPU: a flow stays on its CPU (RSS), and CPUs never contend for a list. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_LB_CONNS);
	__uint(map_flags, BPF_F_NO_COMMON_LRU);
	__type(key, struct lb_conn_key);
	__type(value, struct lb_conn);
} lb_conns SEC(".maps");

/* The router's load-balancer settings, written by the agent. */
struct lb_config {
	__be32 src4;            /* outer IPv4 source: src4 | (hash & src4_hostmask) */
	__be32 src4_hostmask;
	__u8 src6[16];          /* outer IPv6 source: its first 12 bytes, then the hash */
	__u32 new_conn_limit;   /* new connections per second per CPU the table learns; 0: no limit */
	__u32 nat_services;     /* services in NAT mode: replies are looked up only when there are some */
	__be16 gue_port;        /* GUE services' outer UDP destination port */
	__u16 reserved;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct lb_config);
} lb_config SEC(".maps");

/* NAT: a translated flow as its replies come back from the backend. */
struct lb_nat_key {
	__u8 backend[16];       /* the reply's source */
	__u8 nat_src[16];       /* its destination: the router's address */
	__be16 backend_port;
	__be16 nat_port;
	__u8 proto;
	__u8 family;
	__u16 reserved;
};

struct lb_nat {
	__u8 client[16];
	__u8 vip[16];
	__be16 client_port;
	__be16 vip_port;
	__u32 service;          /* its counters */
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_LB_CONNS);
	__uint(map_flags, BPF_F_NO_COMMON_LRU);
	__type(key, struct lb_nat_key);
	__type(value, struct lb_nat);
} lb_nat SEC(".maps");

/* Per service, per CPU. */
struct lb_stat {
	__u64 packets;
	__u64 bytes;
	__u64 new_flows;        /* packets given a backend by the ring: a flow's first, or any of an unlearned
				 * flow or a no-affinity service */
	__u64 unlearned;        /* such packets the table did not learn: over the flood limit */
	__u64 no_backend;       /* dropped: the ring is empty */
	__u64 flood_windows;    /* one-second windows that went over the limit */
	__u64 replies;          /* NAT: replies translated back to the client */
	__u64 nat_port_busy;    /* NAT: dropped, no free translated port found for a new flow */
	__u64 too_big;          /* over the MTU toward the backend, answered with ICMP (lb_toobig.h); in packets too */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_LB_SERVICES);
	__type(key, __u32);
	__type(value, struct lb_stat);
} lb_service_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_LB_BACKENDS);
	__type(key, __u32);
	__type(value, struct counter);
} lb_backend_stats SEC(".maps");

/* The flood switch's window, per CPU. */
struct lb_flood {
	__u64 start_ns;
	__u32 learned;
	__u32 reserved;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct lb_flood);
} lb_flood SEC(".maps");

/* The flow's hash: addresses, protocol, ports; fixed seed (see above). */
static __always_inline __u32 lb_flow_hash(const struct lb_conn_key *k)
{
	const __u32 *s = (const __u32 *)k->saddr, *d = (const __u32 *)k->daddr;
	__u32 h = LB_HASH_SEED;

	h = hash_mix(h, s[0]);
	h = hash_mix(h, d[0]);
	if (k->family == 6) {
		h = hash_mix(h, s[1]);
		h = hash_mix(h, s[2]);
		h = hash_mix(h, s[3]);
		h = hash_mix(h, d[1]);
		h = hash_mix(h, d[2]);
		h = hash_mix(h, d[3]);
	}
	h = hash_mix(h, ((__u32)k->sport << 16) | k->dport);
	h = hash_mix(h, k->proto);
	return hash_final(h);
}

/* May this new flow be learned? Counts the CPU's window, and a window
 * going over the limit once. */
static __always_inline int lb_may_learn(const struct lb_config *cfg, struct lb_stat *st)
{
	__u32 zero = 0;
	struct lb_flood *f;
	__u64 now;

	if (!cfg->new_conn_limit)
		return 1;
	f = bpf_map_lookup_elem(&lb_flood, &zero);
	if (!f)
		return 1;
	now = bpf_ktime_get_ns();
	if (now - f->start_ns >= 1000000000ULL) {
		f->start_ns = now;
		f->learned = 0;
	}
	if (f->learned >= cfg->new_conn_limit) {
		if (f->learned++ == cfg->new_conn_limit)
			st->flood_windows++;
		return 0;
	}
	f->learned++;
	return 1;
}

/* What the destination of the parsed packet is to the load balancer
 * (LB_ADDR_*), 0: nothing. */
static __always_inline __u32 lb_addr_kind(const struct pkt *p)
{
	struct lb_vip_key k = {};
	__u32 *kind;

	if (p->ip4) {
		__builtin_memcpy(k.addr, &p->ip4->daddr, 4);
		k.family = 4;
	} else if (p->ip6) {
		__builtin_memcpy(k.addr, &p->ip6->daddr, 16);
		k.family = 6;
	} else {
		return 0;
	}
	kind = bpf_map_lookup_elem(&lb_vips, &k);
	return kind ? *kind : 0;
}

/* The backend in a slot, if it takes this service's flows. */
static __always_inline struct lb_backend *lb_backend_of(__u32 slot, __u32 service)
{
	struct lb_backend *be;

	if (!slot)
		return NULL;
	be = bpf_map_lookup_elem(&lb_backends, &slot);
	if (!be || be->service != service)
		return NULL;
	return be;
}

#endif
