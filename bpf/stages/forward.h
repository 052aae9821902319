/* Stage forward: rewrite the frame for its next hop (bytes past the IP
 * packet, MACs, TTL or hop limit) and redirect it out of the egress port the fib stage found. */
#ifndef BPFROUTER_STAGE_FORWARD_H
#define BPFROUTER_STAGE_FORWARD_H

#include "../include/packet_ctx.h"
#include "../include/rewrite.h"

static __always_inline int forward_stage(struct xdp_md *ctx, struct packet_ctx *pc)
{
	struct pkt p = {};
	int reason = pkt_restore(ctx, pc, &p);
	__u32 excess;

	if (reason >= 0)
		return reason;
	excess = bytes_past_ip(&p);
	if (excess) {
		if (bpf_xdp_adjust_tail(ctx, -(int)excess))
			return REASON_PASS_TRIM_FAILED;
		__builtin_memset(&p, 0, sizeof(p));  /* its pointers moved */
		reason = pkt_restore(ctx, pc, &p);
		if (reason >= 0)
			return reason;
	}
	rewrite_forward(&p, &pc->res, !(pc->flags & PCTX_F_ORIGINATED));
	pc->action = bpf_redirect_map(&tx_ports, pc->res.egress_ifindex, 0);
	return p.ip4 ? REASON_FWD_IPV4 : REASON_FWD_IPV6;
}

#endif
