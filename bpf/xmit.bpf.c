// SPDX-License-Identifier: GPL-2.0
/* Redirect outcome counters (include/xmit.h): tp_btf programs on the xdp
 * tracepoints, attached and pinned with the router (bpfrouter/xmit.py).
 * They share the router's ifaces map; a tracepoint fires for every
 * namespace and every XDP program on the host, so each event is matched to
 * this router: by the tx_ports map's id, or by the router's namespace and
 * its managed ports. */
#include "include/common.h"
#include "include/iface.h"
#include "include/xmit.h"
#include "include/event_record.h"
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

#define ENXIO 6
#define ENETDOWN 100
#define EMSGSIZE 90
#define EOPNOTSUPP 95

/* Just the fields read here; CO-RE relocates them against the kernel's BTF. */
struct ns_common {
	unsigned int inum;
} __attribute__((preserve_access_index));

struct net {
	struct ns_common ns;
} __attribute__((preserve_access_index));

typedef struct {
	struct net *net;
} possible_net_t;

struct net_device {
	int ifindex;
	possible_net_t nd_net;
} __attribute__((preserve_access_index));

struct bpf_prog_aux {
	__u32 id;
} __attribute__((preserve_access_index));

struct bpf_prog {
	struct bpf_prog_aux *aux;
} __attribute__((preserve_access_index));

/* Set by the loader: the router's namespace (inode of its net ns), its
 * tx_ports map and its two XDP programs. */
const volatile __u32 router_netns = 0;
const volatile __u32 tx_ports_id = 0;
const volatile __u32 router_prog_id = 0;
const volatile __u32 capture_prog_id = 0;
/* Lost-redirect events into the router's ring (its `events` map), when the
 * router runs the events observer: at most xmit_event_rate per second per
 * outcome and CPU (windows of jiffies_hz jiffies). */
const volatile __u32 xmit_events = 0;
const volatile __u32 xmit_event_rate = 100;
const volatile __u32 jiffies_hz = 250;

enum xmit_event_stat {
	XMIT_EVENTS_SENT = 0,
	XMIT_EVENTS_SUPPRESSED,
	XMIT_EVENTS_LOST,
	XMIT_EVENT_STAT_MAX,
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XMIT_MAX);
	__type(key, __u32);
	__type(value, struct event_window);
} xmit_event_windows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XMIT_EVENT_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} xmit_event_stats SEC(".maps");

static __always_inline void xmit_event_count(__u32 stat)
{
	__u64 *v = bpf_map_lookup_elem(&xmit_event_stats, &stat);

	if (v)
		(*v)++;
}

/* One record per lost bulk: ports, outcome and how many frames (`len`);
 * a bulk's headers are not at hand here. */
static __always_inline void xmit_event(__u32 outcome, __u32 ifindex, __u32 egress, __u32 frames, __u32 action)
{
	struct event_window *w;
	struct event *e;
	__u64 now;

	if (!xmit_events)
		return;
	w = bpf_map_lookup_elem(&xmit_event_windows, &outcome);
	if (!w)
		return;
	now = bpf_jiffies64();
	if (now - w->start_jiffies >= jiffies_hz) {
		w->start_jiffies = now;
		w->sent = 0;
	}
	if (w->sent >= xmit_event_rate) {
		xmit_event_count(XMIT_EVENTS_SUPPRESSED);
		return;
	}
	w->sent++;
	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		xmit_event_count(XMIT_EVENTS_LOST);
		return;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->ts_ns = bpf_ktime_get_ns();
	e->ifindex = ifindex;
	e->egress_ifindex = egress;
	e->len = frames;
	e->reason = REASON_MAX;         /* not a pipeline reason: see xmit_outcome */
	e->action = action;
	e->xmit_outcome = outcome;
	bpf_ringbuf_submit(e, 0);
	xmit_event_count(XMIT_EVENTS_SENT);
}

static __always_inline void xmit_count(__u32 slot, __u32 outcome, __u64 n)
{
	__u32 idx = slot * XMIT_MAX + outcome;
	__u64 *c;

	if (slot >= MAX_IFACES || outcome >= XMIT_MAX)
		return;
	c = bpf_map_lookup_elem(&xmit_counters, &idx);
	if (c)
		*c += n;
}

/* The port's counter slot if dev is one of this router's ports; else 0. */
static __always_inline __u32 managed_slot(const struct net_device *dev)
{
	struct iface *ifc;
	__u32 ifindex;

	if (!dev || BPF_CORE_READ(dev, nd_net.net, ns.inum) != router_netns)
		return 0;
	ifindex = BPF_CORE_READ(dev, ifindex);
	ifc = bpf_map_lookup_elem(&ifaces, &ifindex);
	return ifc ? ifc->slot : 0;
}

/* The bulk flush of a devmap: the egress driver took `sent` of
 * sent + drops frames, err < 0 if it refused all of them. */
SEC("tp_btf/xdp_devmap_xmit")
int BPF_PROG(xmit_devmap_xmit, const struct net_device *from_dev, const struct net_device *to_dev,
	     int sent, int drops, int err)
{
	__u32 slot;

	/* both ends ours: the frames came from this router's program (no
	 * other XDP program runs on its ports) */
	if (!managed_slot(from_dev))
		return 0;
	slot = managed_slot(to_dev);
	if (!slot)
		return 0;
	if (sent > 0)
		xmit_count(slot, XMIT_SENT, sent);
	if (drops > 0) {
		__u32 why = XMIT_DROP_RING_FULL;

		if (err == -ENXIO)
			why = XMIT_DROP_PEER_NOT_READY;
		else if (err < 0)
			why = XMIT_DROP_XMIT_ERROR;
		xmit_count(slot, why, drops);
		xmit_event(why, BPF_CORE_READ(from_dev, ifindex), BPF_CORE_READ(to_dev, ifindex), drops,
			   XDP_REDIRECT);
	}
	return 0;
}

/* The enqueue into the devmap failed (xdp_do_redirect): one frame. */
SEC("tp_btf/xdp_redirect_err")
int BPF_PROG(xmit_redirect_err, const struct net_device *dev, const struct bpf_prog *xdp,
	     const void *tgt, int err, int map_type, __u32 map_id, __u32 index)
{
	struct iface *ifc;
	__u32 why, ifindex = index;

	if (map_id != tx_ports_id)
		return 0;
	switch (err) {
	case -ENETDOWN:
		why = XMIT_DROP_LINK_DOWN;
		break;
	case -EMSGSIZE:
		why = XMIT_DROP_TOO_BIG;
		break;
	case -EOPNOTSUPP:
		why = XMIT_DROP_NO_XDP_XMIT;
		break;
	default:
		why = XMIT_DROP_ENQUEUE_ERROR;
	}
	ifc = bpf_map_lookup_elem(&ifaces, &ifindex);
	xmit_count(ifc ? ifc->slot : 0, why, 1);
	xmit_event(why, BPF_CORE_READ(dev, ifindex), ifindex, 1, XDP_REDIRECT);
	return 0;
}

/* XDP_ABORTED from the router's program: bpf_redirect_map found no
 * tx_ports entry (the only way the router aborts). */
SEC("tp_btf/xdp_exception")
int BPF_PROG(xmit_exception, const struct net_device *dev, const struct bpf_prog *xdp, __u32 act)
{
	__u32 id = BPF_CORE_READ(xdp, aux, id);

	if (act != XDP_ABORTED || !id || (id != router_prog_id && id != capture_prog_id))
		return 0;
	xmit_count(managed_slot(dev), XMIT_DROP_DEVMAP_MISS, 1);
	xmit_event(XMIT_DROP_DEVMAP_MISS, BPF_CORE_READ(dev, ifindex), 0, 1, XDP_ABORTED);
	return 0;
}

const volatile enum xmit_outcome btf_anchor_xmit_outcome = XMIT_MAX;
const volatile enum xmit_event_stat btf_anchor_xmit_event_stat = XMIT_EVENT_STAT_MAX;

char _license[] SEC("license") = "GPL";
