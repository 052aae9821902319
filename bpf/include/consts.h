/* Constants and enums shared by the data plane and the control plane.
 * The Python side mirrors these enums and checks them against this
 * object's BTF at load time (bpfrouter/datapath/layout.py). */
#ifndef BPFROUTER_CONSTS_H
#define BPFROUTER_CONSTS_H

#define MAX_IFACES 256          /* counter slots; slot 0 = unknown ingress */
#define MAX_NEXTHOPS 65536
#define MAX_NEIGHBORS 65536
#define MAX_ECMP_PATHS 32         /* members of a group the fast path holds */
#define MAX_NH_GROUPS 4096
#define MAX_NH_BUCKETS (1 << 20)  /* all groups' tables together */
#define MAX_ROUTES_V4 (1 << 20)
#define MAX_ROUTES_V6 (1 << 18)
#define MAX_VLAN_DEPTH 2
#define MAX_IPV6_EXTHDRS 8

/* Every packet ends with exactly one reason; the verdict follows from it
 * (REASON_FWD_* redirect, REASON_DROP_* drop, REASON_PASS_* pass). */
enum reason {
	REASON_FWD_IPV4 = 0,
	REASON_FWD_IPV6,
	/* passed to the kernel */
	REASON_PASS_ARP,
	REASON_PASS_ND,
	REASON_PASS_NON_IP,
	REASON_PASS_VLAN,
	REASON_PASS_L2_MULTICAST,
	REASON_PASS_OTHERHOST,
	REASON_PASS_IP_OPTIONS,
	REASON_PASS_IPV6_HOP_BY_HOP,
	REASON_PASS_L3_MULTICAST,
	REASON_PASS_LINK_LOCAL,
	REASON_PASS_LOCAL,
	REASON_PASS_UNREACHABLE,
	REASON_PASS_PROHIBIT,
	REASON_PASS_FIB_MISS,
	REASON_PASS_TTL_EXCEEDED,
	REASON_PASS_NO_NEIGH,
	REASON_PASS_FRAG_NEEDED,
	REASON_PASS_MULTIPATH,
	REASON_PASS_EGRESS_UNMANAGED,
	REASON_PASS_KERNEL_NOT_FWDED,
	REASON_PASS_UNKNOWN_IFACE,
	REASON_PASS_NEXTHOP_INVALID,
	REASON_PASS_STAGE_MISSING,      /* the next stage's program is not in the chain */
	REASON_PASS_FORWARDING_OFF,
	REASON_PASS_HAIRPIN,
	REASON_PASS_LOCAL_SOURCE,
	REASON_PASS_SOURCE_UNVERIFIED,
	REASON_PASS_ENCAP,
	REASON_PASS_ROUTE_TYPE,
	REASON_PASS_POLICY,
	REASON_PASS_TRIM_FAILED,
	REASON_PASS_LB_FRAGMENT,        /* a fragment to a VIP: no ports to pick a backend by */
	REASON_PASS_LB_ENCAP_FAILED,    /* the frame could not grow for the outer header */
	/* dropped */
	REASON_DROP_BLACKHOLE,
	REASON_DROP_MARTIAN_SOURCE,
	REASON_DROP_MARTIAN_DEST,
	REASON_DROP_RPFILTER,
	REASON_DROP_TRUNC_L2,
	REASON_DROP_TRUNC_L3,
	REASON_DROP_BAD_IP_VERSION,
	REASON_DROP_BAD_IHL,
	REASON_DROP_BAD_TOTAL_LEN,
	REASON_DROP_BAD_CHECKSUM,
	REASON_DROP_LB_NO_BACKEND,      /* a service's packet, no backend takes new flows */
	REASON_DROP_LB_NAT_PORTS,       /* NAT: no free translated port for a new flow */
	REASON_DROP_LB_NAT_UNROUTED,    /* NAT: translated to the router's source, and the fast path cannot send it */
	REASON_DROP_LB_ANSWER_FAILED,   /* the ICMP answer to a service's oversize packet could not be finished */
	REASON_MAX,
};

enum route_type {
	RTYPE_NONE = 0,
	RTYPE_UNICAST,
	RTYPE_LOCAL,
	RTYPE_BLACKHOLE,
	RTYPE_UNREACHABLE,
	RTYPE_PROHIBIT,
	RTYPE_MULTIPATH,
	/* Only the kernel can route it (encapsulation, throw, nat, ...): the
	 * entry's nh_id holds the pass reason in its low 8 bits (and, for the
	 * control plane's display, the kernel's route type and encap type). */
	RTYPE_KERNEL,
};

#define KERNEL_ROUTE_REASON_MASK 0xFF
#define KERNEL_ROUTE_TYPE_SHIFT 8   /* the kernel's route type (RTN_*) in a RTYPE_KERNEL entry */
#define RTN_THROW_ 9

#define RT_TABLE_MAIN 254
#define RT_TABLE_LOCAL 255

enum fib_mode {
	FIB_MODE_BPF = 0,
	FIB_MODE_KERNEL,
};

/* Structure of the BPF FIB (FIB_MODE_BPF). */
enum fib_impl {
	FIB_IMPL_DIR = 0,       /* multibit trie: 24-bit root + 8-bit groups (DIR-24-8 for IPv4) */
	FIB_IMPL_LPM,           /* BPF_MAP_TYPE_LPM_TRIE, kept for comparison */
};

#define DIR_ROOT_BITS 24
#define DIR_CHUNK 16            /* root entries per array element: one cache line */
#define DIR_EXT 0x80000000U     /* entry points to a group */
#define DIR_TYPE_SHIFT 28       /* else: route type in bits 28-30, next-hop id in 0-27 */
#define DIR_NH_MASK 0x0FFFFFFFU
#define DIR_GROUPS_V4 16384     /* default; the loader may resize */
#define DIR_LEAVES_V4 (1 << 21)
#define DIR_LEAVES_V6 (1 << 19)
#define DIR_TOP_BITS 16         /* IPv4's compressed root: one entry or block per /16 */
#define DIR_BLOCK_BYTES_V4 (32 << 20) /* blocks: two halves, each over four times a full table's */
#define DIR_BLOCK_SLACK 64      /* bytes past the last block a masked read may touch */
#define DIR_BLOCK_HEAD 36       /* a block's bytes before its runs */
#define DIR_TOP_RAW 0x40000000U /* top: the block's runs are root entries, not 8-bit ids */
#define DIR_RUN_IDS 256         /* root entries a block can name by an 8-bit id */
#define H6_MAX_LEVELS 16        /* IPv6 hash levels: prefix lengths stored */
#define H6_BUCKETS (1 << 19)    /* default, 32 MiB in two halves; the loader may resize */
#define H6_SLOTS 5              /* per bucket (a cache line) */

#define NEXTHOP_F_GATEWAY 1

#endif
