/* Stage kernel_policy, for a packet the fib stage would forward: the
 * kernel's input policy besides the route (martians, forwarding sysctls,
 * hairpin, the source check of rp_filter and accept_local), with the
 * ingress's sysctls as the entry stage found them (include/kernelpolicy.h).
 * After the fib stage, because the kernel validates the source against the
 * route found, and so `route get` still reports the route. */
#ifndef BPFROUTER_STAGE_KERNEL_POLICY_H
#define BPFROUTER_STAGE_KERNEL_POLICY_H

#include "../include/packet_ctx.h"
#include "../include/kernelpolicy.h"

static __always_inline int kernel_policy_stage(struct xdp_md *ctx, struct packet_ctx *pc)
{
	struct pkt p = {};
	int reason = pkt_restore(ctx, pc, &p);

	if (reason >= 0)
		return reason;
	/* the load balancer's encapsulation or translation: the router sends
	 * it, as IPVS does from the output path, which these input checks are
	 * not for */
	if (pc->flags & PCTX_F_LB)
		return STAGE_NEXT;
	return kernel_policy(ctx, &p, pc->iface_flags, &pc->res);
}

#endif
