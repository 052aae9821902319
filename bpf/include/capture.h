/* Capture at the XDP hook: while `bpfrouter capture` runs, the frame is
 * copied (up to the snap length) before the pipeline can rewrite it, and
 * sent with its verdict through a ring buffer once the verdict is known.
 * Only the capture program (router.bpf.c) has this hook, and it is attached
 * only while a capture runs: idle, the hook costs nothing. A full ring drops
 * the copy, never the packet; a capture whose reader died expires. */
#ifndef BPFROUTER_CAPTURE_H
#define BPFROUTER_CAPTURE_H

#include "observe.h"
#include "probe.h"

#define CAPTURE_MAX 2048        /* bytes kept per packet at most */
#define CAPTURE_RING_BYTES (8 << 20)

struct capture_cfg {
	__u32 active;
	__u32 ifindex;          /* 0: every interface */
	__u32 actions;          /* bit (1 << XDP action) set: capture that verdict */
	__u32 snaplen;
	__u64 expires_ns;       /* the reader renews it; bpf_ktime_get_ns() clock */
};

struct capture_rec {
	__u64 ts_ns;            /* 0: nothing pending on this CPU */
	__u32 ifindex;
	__u32 len;              /* on the wire */
	__u32 caplen;
	__u32 reason;
	__u32 action;
	__u32 egress_ifindex;
	__u8 data[CAPTURE_MAX];
};

/* A global in its own data section (a one-entry array map to user space,
 * pinned as capture_cfg): one load from a fixed address, where a map lookup
 * costs a bounds check and two dependent loads. */
struct capture_cfg capture_cfg SEC(".data.capture");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct capture_rec);
} capture_scratch SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, CAPTURE_RING_BYTES);
} capture_ring SEC(".maps");

/* Returns nothing: a pointer kept across the pipeline would double the
 * states the verifier explores. The pending copy waits in this CPU's slot. */
static __always_inline void capture_begin(struct xdp_md *ctx)
{
	__u32 zero = 0, caplen;
	struct capture_cfg *cfg = &capture_cfg;
	struct capture_rec *rec;
	__u64 now;

	if (!cfg->active)
		return;
	if (cfg->ifindex && cfg->ifindex != ctx->ingress_ifindex)
		return;
	now = bpf_ktime_get_ns();
	if (now > cfg->expires_ns || probe_from_ctx(ctx))
		return;
	rec = bpf_map_lookup_elem(&capture_scratch, &zero);
	if (!rec)
		return;
	rec->len = ctx->data_end - ctx->data;
	caplen = rec->len < cfg->snaplen ? rec->len : cfg->snaplen;
	if (caplen > CAPTURE_MAX)
		caplen = CAPTURE_MAX;
	if (caplen == 0 || bpf_xdp_load_bytes(ctx, 0, rec->data, caplen))
		return;
	rec->caplen = caplen;
	rec->ts_ns = now;
	rec->ifindex = ctx->ingress_ifindex;
}

static __always_inline void capture_end(__u32 reason, __u32 action, __u32 egress_ifindex)
{
	__u32 zero = 0, size;
	struct capture_cfg *cfg = &capture_cfg;
	struct capture_rec *rec;

	if (!cfg->active)
		return;
	rec = bpf_map_lookup_elem(&capture_scratch, &zero);
	if (!rec || !rec->ts_ns)
		return;
	if (cfg->actions & (1U << (action & 31))) {
		rec->reason = reason;
		rec->action = action;
		rec->egress_ifindex = egress_ifindex;
		size = __builtin_offsetof(struct capture_rec, data) + rec->caplen;
		if (size > sizeof(*rec))
			size = sizeof(*rec);
		if (bpf_ringbuf_output(&capture_ring, rec, size, 0))
			obs_count(OBS_CAPTURE_LOST);
		else
			obs_count(OBS_CAPTURED);
	}
	rec->ts_ns = 0;
}

#endif
