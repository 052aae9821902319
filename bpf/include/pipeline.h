/* How the stages (bpf/stages/, listed in stages/list.h) are joined into the
 * router: the verdict every deciding stage ends with, and the chain.
 *
 * Staged (the default build): each stage is its own XDP program, verified
 * on its own. A stage that goes on tail-calls the next slot of the `stages`
 * program array with a constant index, which the x86-64 JIT turns into a
 * direct jump; the per-packet context (packet_ctx.h) carries what it found.
 * The loader fills each slot with the first configured stage at or after
 * it, so a stage that is not configured is not on the packet's path. A
 * stage that decides counts the packet (or answers a probe) and tail-calls
 * the observe slot, unless no observer is configured (observe_in_chain):
 * then it returns the verdict itself.
 *
 * Single (BPFROUTER_SINGLE_PROGRAM, router_single.bpf.c): the same stage
 * functions inlined into one program, for `make bench` to set the chain's
 * cost beside. */
#ifndef BPFROUTER_PIPELINE_H
#define BPFROUTER_PIPELINE_H

#include "common.h"
#include "consts.h"
#include "packet_ctx.h"
#include "counters.h"
#include "probe.h"
#include "../stages/list.h"

enum stage {
	STAGE_ENTRY = 0,        /* the attached program, not in the array */
#define STAGE_SLOT(SLOT, name) STAGE_##SLOT,
	DECISION_STAGES(STAGE_SLOT)
#undef STAGE_SLOT
	STAGE_OBSERVE,
	STAGE_MAX,
};

static __always_inline int reason_action(int reason)
{
	if (reason >= REASON_DROP_BLACKHOLE)
		return XDP_DROP;
	return XDP_PASS;
}

/* Count the decided packet, or, for a probe, write the decision into its
 * metadata instead. */
static __always_inline void record(struct xdp_md *ctx, const struct packet_ctx *pc)
{
	const struct fib_result *res = &pc->res;
	struct probe_meta *probe;

	if (!pc->probe) {
		count(pc->slot, pc->reason, pc->len);
		return;
	}
	probe = probe_from_ctx(ctx);
	if (!probe)
		return;
	probe->l3_off = pc->l3_off;
	probe->l4_off = pc->l4_off;
	probe->rule = !pc->rounds ? 0 : pc->rule == RULE_NONE ? 0xFFFF : pc->rule + 1;
	probe->l4_proto = pc->l4_proto;
	probe->vlan_depth = pc->vlan_depth;
	probe->reason = pc->reason;
	probe->nh_id = res->nh_id;
	probe->egress_ifindex = res->egress_ifindex;
	probe->route_type = res->route_type;
	probe->prefixlen = res->prefixlen;
	probe->route_proto = res->route_proto;
	probe->flags = res->neigh_found ? PROBE_F_NEIGH : 0;
	probe->hash = res->hash;
	probe->bucket = res->bucket;
	probe->magic = res->group;      /* read last: nothing checks the magic after this */
}

/* A stage decided the packet's reason: its action (a forward's redirect
 * was set by the forward stage), its count. Returns 1 when the observers
 * should see it (not a probe). */
static __always_inline int decided(struct xdp_md *ctx, struct packet_ctx *pc, int reason)
{
	/* the router's kernel drops what comes in with its own source as a martian */
	if ((pc->flags & PCTX_F_LB_SNAT) && reason > REASON_FWD_IPV6 && reason < REASON_DROP_BLACKHOLE)
		reason = REASON_DROP_LB_NAT_UNROUTED;
	pc->reason = reason;
	if (reason > REASON_FWD_IPV6)
		pc->action = reason_action(reason);
	record(ctx, pc);
	return !pc->probe;
}

#ifndef BPFROUTER_SINGLE_PROGRAM

struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, STAGE_MAX);
	__type(key, __u32);
	__type(value, __u32);
} stages SEC(".maps");

/* Set by the loader: the observe slot is filled. When it is not, the
 * deciding stages do not even try the tail call. */
const volatile __u32 observe_in_chain = 1;

/* After stage SLOT returned `reason`: go on to the next slot (STAGE_NEXT),
 * past it (STAGE_SKIP_NEXT), to policy or fib (STAGE_TO_*), or end with
 * the verdict. A next stage missing
 * from the chain (the loader fills every slot before attaching) passes the
 * packet to the kernel, counted. */
#define STAGE_RETURN(ctx, pc, SLOT, reason) do {				\
	int reason_ = (reason);							\
	if (reason_ == STAGE_SKIP_NEXT)						\
		bpf_tail_call_static(ctx, &stages, (SLOT) + 2);			\
	else if (reason_ == STAGE_TO_POLICY)					\
		bpf_tail_call_static(ctx, &stages, STAGE_POLICY);		\
	else if (reason_ == STAGE_TO_FIB)					\
		bpf_tail_call_static(ctx, &stages, STAGE_FIB);			\
	else if (reason_ < 0)							\
		bpf_tail_call_static(ctx, &stages, (SLOT) + 1);			\
	if (reason_ < 0)							\
		reason_ = REASON_PASS_STAGE_MISSING;				\
	if (decided(ctx, pc, reason_) && observe_in_chain)			\
		bpf_tail_call_static(ctx, &stages, STAGE_OBSERVE);		\
	return (pc)->action;							\
} while (0)

/* The attached program. The capture chain's (`capture`, a constant: only
 * its programs hold the hook) copies the frame before any stage may rewrite
 * it; its observe stage sends the copy with the verdict. */
static __always_inline int entry_program(struct xdp_md *ctx, const int capture)
{
	struct packet_ctx *pc = packet_ctx_get();

	if (!pc)                /* a one-element per-CPU array: never */
		return XDP_PASS;
	if (capture)
		capture_begin(ctx);
	STAGE_RETURN(ctx, pc, STAGE_ENTRY, entry_stage(ctx, pc));
}

static __always_inline int observe_program(struct xdp_md *ctx, const int capture)
{
	struct packet_ctx *pc = packet_ctx_get();

	if (!pc)
		return XDP_PASS;
	return observe_stage(ctx, pc, capture);
}

SEC("xdp")
int bpfrouter_xdp(struct xdp_md *ctx)
{
	return entry_program(ctx, 0);
}

SEC("xdp")
int bpfrouter_xdp_capture(struct xdp_md *ctx)
{
	return entry_program(ctx, 1);
}

#define STAGE_PROGRAM(SLOT, name)						\
SEC("xdp")									\
int stage_##name(struct xdp_md *ctx)						\
{										\
	struct packet_ctx *pc = packet_ctx_get();				\
										\
	if (!pc)								\
		return XDP_PASS;						\
	STAGE_RETURN(ctx, pc, STAGE_##SLOT, name##_stage(ctx, pc));		\
}
DECISION_STAGES(STAGE_PROGRAM)
#undef STAGE_PROGRAM

SEC("xdp")
int stage_observe(struct xdp_md *ctx)
{
	return observe_program(ctx, 0);
}

SEC("xdp")
int stage_observe_capture(struct xdp_md *ctx)
{
	return observe_program(ctx, 1);
}

#else /* BPFROUTER_SINGLE_PROGRAM */

/* The context lives in the chain's per-CPU array here too: on the stack it
 * would take most of the 512 bytes the inlined stages share. */
static __always_inline int single_program(struct xdp_md *ctx, const int capture)
{
	struct packet_ctx *pc = packet_ctx_get();
	int reason;

	if (!pc)
		return XDP_PASS;
	if (capture)
		capture_begin(ctx);
	reason = entry_stage(ctx, pc);
#define STAGE_CALL(SLOT, name)							\
	if (reason == STAGE_SKIP_NEXT)						\
		reason = STAGE_NEXT;						\
	else if (reason < 0)							\
		reason = name##_stage(ctx, pc);
	if (reason == STAGE_NEXT)
		reason = lb_stage(ctx, pc);
	/* The rule walk goes round between two stages by tail calls, which
	 * inlined rounds would multiply past the verifier's limit; this build,
	 * which measures what the chain costs, passes the families that have
	 * rules to walk. */
	if (reason == STAGE_TO_POLICY)
		reason = REASON_PASS_POLICY;
	if (reason == STAGE_TO_FIB)
		reason = fib_stage(ctx, pc);
	AFTER_ROUTE_STAGES(STAGE_CALL)
#undef STAGE_CALL
	if (reason < 0)
		reason = REASON_PASS_STAGE_MISSING;
	if (decided(ctx, pc, reason) && (observe_flags || capture))
		return observe_stage(ctx, pc, capture);
	return pc->action;
}

SEC("xdp")
int bpfrouter_xdp(struct xdp_md *ctx)
{
	return single_program(ctx, 0);
}

SEC("xdp")
int bpfrouter_xdp_capture(struct xdp_md *ctx)
{
	return single_program(ctx, 1);
}

#endif /* BPFROUTER_SINGLE_PROGRAM */

#endif
