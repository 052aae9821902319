/* The router's per-packet pipeline: parse -> classify -> fib -> rewrite ->
 * verdict, then the observers (capture, flows, events). The XDP entry
 * program (router.bpf.c) only calls it; the FIB benchmark (fibbench.bpf.c)
 * runs it in a loop over many destinations. */
#ifndef BPFROUTER_PIPELINE_H
#define BPFROUTER_PIPELINE_H

#include "common.h"
#include "consts.h"
#include "parse.h"
#include "iface.h"
#include "classify.h"
#include "neigh.h"
#include "fib.h"
#include "rewrite.h"
#include "counters.h"
#include "probe.h"
#include "observe.h"
#include "events.h"
#include "flows.h"
#include "capture.h"

static __always_inline int reason_action(int reason)
{
	if (reason >= REASON_DROP_BLACKHOLE)
		return XDP_DROP;
	return XDP_PASS;
}

static __always_inline void record(struct probe_meta *probe, __u32 slot, int reason,
				   const struct pkt *p, const struct fib_result *res)
{
	if (!probe) {
		count(slot, reason, p->len);
		return;
	}
	probe->l3_off = p->l3_off;
	probe->l4_off = p->l4_off;
	probe->l3_proto = p->l3_proto;
	probe->l4_proto = p->l4_proto;
	probe->vlan_depth = p->vlan_depth;
	probe->reason = reason;
	probe->nh_id = res->nh_id;
	probe->egress_ifindex = res->egress_ifindex;
	probe->route_type = res->route_type;
	probe->prefixlen = res->prefixlen;
	probe->route_proto = res->route_proto;
	probe->flags = res->neigh_found ? PROBE_F_NEIGH : 0;
}

/* The decision, without observers: d records what it found for them. */
static __always_inline int bpfrouter_pipeline(struct xdp_md *ctx, struct decision *d)
{
	struct probe_meta *probe = probe_from_ctx(ctx);
	struct pkt *p = &d->p;
	struct iface *in;
	int reason;

	p->data = (void *)(long)ctx->data;
	p->data_end = (void *)(long)ctx->data_end;
	d->probe = probe != NULL;
	in = iface_lookup(ctx->ingress_ifindex);
	if (in && in->slot < MAX_IFACES)
		d->slot = in->slot;

	reason = parse_packet(p);
	if (reason >= 0)
		goto out;
	if (!in) {
		reason = REASON_PASS_UNKNOWN_IFACE;
		goto out;
	}
	reason = classify(p, in);
	if (reason >= 0)
		goto out;
	/* bpf_fib_lookup (FIB_MODE_KERNEL) applies the rules itself */
	if (fib_mode == FIB_MODE_BPF &&
	    (in->flags & (p->ip4 ? IFACE_F_PASS_POLICY4 : IFACE_F_PASS_POLICY6))) {
		reason = REASON_PASS_POLICY;
		goto out;
	}

	if (fib_mode == FIB_MODE_KERNEL)
		reason = fib_lookup_kernel(ctx, p, &d->res);
	else
		reason = fib_lookup_bpf(p, &d->res, probe != NULL);
	if (reason > REASON_FWD_IPV6)
		goto out;

	rewrite_forward(p, &d->res);
	d->reason = reason;
	record(probe, d->slot, reason, p, &d->res);
	return bpf_redirect_map(&tx_ports, d->res.egress_ifindex, 0);
out:
	d->reason = reason;
	record(probe, d->slot, reason, p, &d->res);
	return reason_action(reason);
}

/* The slow parts of flows and events, for packets that are not probes: a
 * flow that does not hold its cache slot, an event the rate cap lets
 * through. A global function: the verifier checks it once, not once per
 * path through the pipeline. */
__attribute__((noinline)) int bpfrouter_observe(struct xdp_md *ctx, struct obs_input *in)
{
	if (!ctx || !in)
		return 0;
	if ((observe_flags & OBS_F_FLOWS) && !in->flow_done)
		flow_account(ctx, in);
	if ((observe_flags & OBS_F_EVENTS) && in->event)
		event_emit(ctx, in);
	return 0;
}

/* The pipeline with its observers: flows and events see the decision; with
 * `capture` (a constant: the capture program, attached only while a capture
 * runs), the frame is copied before the pipeline may rewrite it and sent
 * once the verdict is known. The common cases are inlined: a packet of a
 * cached flow, an event held back by the rate cap. A call costs several ns
 * here (return thunks), so the rest is made only when needed. */
static __always_inline int bpfrouter_observed(struct xdp_md *ctx, const int capture)
{
	struct decision d = {};
	struct obs_input in = {};
	int action;

	if (capture)
		capture_begin(ctx);
	action = bpfrouter_pipeline(ctx, &d);
	if (d.probe)
		return action;
	obs_input_of(&in, &d, action);
	in.flow_done = 1;
	if ((observe_flags & OBS_F_FLOWS) && d.reason < REASON_DROP_TRUNC_L2)
		in.flow_done = flow_cached(ctx, &in);
	if ((observe_flags & OBS_F_EVENTS) && d.reason > REASON_FWD_IPV6)
		in.event = event_allowed(d.reason);
	if (!in.flow_done || in.event)
		bpfrouter_observe(ctx, &in);
	if (capture)
		capture_end(d.reason, action, d.res.egress_ifindex);
	return action;
}

#endif
