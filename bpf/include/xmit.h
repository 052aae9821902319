/* Redirect outcomes: what became of the frames the router redirected.
 * XDP_REDIRECT's result is decided after the program returns (the devmap
 * enqueue, then the egress driver's ndo_xdp_xmit at the flush), so the
 * router program cannot count it; tracepoint programs (bpf/xmit.bpf.c) do,
 * per egress port and outcome. The Python side mirrors the enum
 * (bpfrouter/xmit.py) and checks it against the object's BTF. */
#ifndef BPFROUTER_XMIT_H
#define BPFROUTER_XMIT_H

#include "consts.h"

enum xmit_outcome {
	XMIT_SENT = 0,          /* taken by the egress driver (ndo_xdp_xmit) */
	/* lost after the program returned XDP_REDIRECT */
	XMIT_DROP_PEER_NOT_READY,       /* -ENXIO at ndo_xdp_xmit: the veth peer lost its NAPI (XDP or GRO
					 * turned off, or down) after the enqueue */
	XMIT_DROP_RING_FULL,    /* the driver took only part of a bulk: ring full (or frame over the peer's MTU) */
	XMIT_DROP_XMIT_ERROR,   /* any other ndo_xdp_xmit error */
	XMIT_DROP_LINK_DOWN,    /* -ENETDOWN at enqueue: egress not up */
	XMIT_DROP_TOO_BIG,      /* -EMSGSIZE at enqueue: frame over the egress MTU */
	XMIT_DROP_NO_XDP_XMIT,  /* -EOPNOTSUPP at enqueue: the port does not take redirected frames now
				 * (xdp_features without NDO_XMIT): a veth whose peer has neither an
				 * XDP program nor GRO, or a driver without XDP transmit */
	XMIT_DROP_ENQUEUE_ERROR,        /* any other enqueue error */
	XMIT_DROP_DEVMAP_MISS,  /* egress not in tx_ports: the program returned XDP_ABORTED;
				 * counted at the ingress port (the kernel does not say the egress) */
	XMIT_MAX,
};

/* Per-CPU packets per (port slot, outcome): slot * XMIT_MAX + outcome. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_IFACES * XMIT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} xmit_counters SEC(".maps");

#endif
