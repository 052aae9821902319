/* The event record and its ring, shared by the router program
 * (include/events.h: one record per dropped or passed packet) and the
 * redirect outcome programs (bpf/xmit.bpf.c: one record per lost bulk). */
#ifndef BPFROUTER_EVENT_RECORD_H
#define BPFROUTER_EVENT_RECORD_H

#include "common.h"

#define EVENT_RING_BYTES (1 << 20)

struct event {
	__u64 ts_ns;            /* bpf_ktime_get_ns() */
	__u32 ifindex;          /* ingress */
	__u32 len;              /* frame length */
	__u32 reason;
	__u32 action;           /* XDP action */
	__u32 nh_id;
	__u32 egress_ifindex;
	__u16 vlan_id;          /* outer tag, 0 when untagged */
	__u16 l3_proto;         /* ethertype after VLAN tags, host order */
	__u8 family;            /* 4, 6 or 0 */
	__u8 l4_proto;
	__u8 ttl;
	__u8 tcp_flags;
	__u8 route_type;
	__u8 prefixlen;         /* of the matched route (BPF FIB) */
	__u8 route_proto;
	__u8 vlan_depth;
	__u8 src_mac[6];
	__u8 dst_mac[6];
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport;
	__u16 dport;
	__u16 xmit_outcome;     /* a lost-redirect event (bpf/xmit.bpf.c): enum xmit_outcome; else 0 */
	__u16 reserved;
};

struct event_window {
	__u64 start_jiffies;
	__u64 sent;
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, EVENT_RING_BYTES);
} events SEC(".maps");

#endif
