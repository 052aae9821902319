/* Stage fib: the route, next hop, TTL, MTU and neighbor checks, into the
 * context's fib_result. The back end is fixed at load (fib_mode, fib_impl:
 * the BPF FIB's DIR or LPM structure, or the kernel's FIB through
 * bpf_fib_lookup); the verifier removes the others. */
#ifndef BPFROUTER_STAGE_FIB_H
#define BPFROUTER_STAGE_FIB_H

#include "../include/packet_ctx.h"
#include "../include/fib.h"

static __always_inline int fib_stage(struct xdp_md *ctx, struct packet_ctx *pc)
{
	struct pkt p = {};
	int reason = pkt_restore(ctx, pc, &p);

	if (reason >= 0)
		return reason;
	if (fib_mode == FIB_MODE_KERNEL)
		reason = fib_lookup_kernel(ctx, &p, &pc->res, pc->probe);
	else
		reason = fib_lookup_bpf(&p, &pc->res, pc->probe);
	if (reason > REASON_FWD_IPV6)
		return reason;
	/* the ecmp stage follows (list.h): only a multipath route needs it */
	return pc->res.route_type == RTYPE_MULTIPATH ? STAGE_NEXT : STAGE_SKIP_NEXT;
}

#endif
