/* Stage observe, after the verdict: flows and events see the decision; in
 * the capture chain (`capture`, a constant: its own program), the frame the
 * entry stage copied is sent with its verdict. The common cases are inlined (a
 * packet of a cached flow, an event held back by the rate cap); the rest is
 * one global function, called only when needed (a call costs several ns
 * here: return thunks). */
#ifndef BPFROUTER_STAGE_OBSERVE_H
#define BPFROUTER_STAGE_OBSERVE_H

#include "../include/packet_ctx.h"
#include "../include/observe.h"
#include "../include/events.h"
#include "../include/flows.h"
#include "../include/capture.h"

/* The slow parts of flows and events: a flow that does not hold its cache
 * slot, an event the rate cap lets through. */
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

/* Returns the packet's XDP action. */
static __always_inline int observe_stage(struct xdp_md *ctx, struct packet_ctx *pc, const int capture)
{
	struct obs_input in = {};

	obs_input_of(&in, pc);
	in.flow_done = 1;
	if ((observe_flags & OBS_F_FLOWS) && pc->reason < REASON_DROP_TRUNC_L2)
		in.flow_done = flow_cached(ctx, &in);
	if ((observe_flags & OBS_F_EVENTS) && pc->reason > REASON_FWD_IPV6)
		in.event = event_allowed(pc->reason);
	if (!in.flow_done || in.event)
		bpfrouter_observe(ctx, &in);
	if (capture)
		capture_end(pc->reason, pc->action, pc->res.egress_ifindex);
	return pc->action;
}

#endif
