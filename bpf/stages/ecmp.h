/* Stage ecmp: a multipath route's path. The fib stage found a route that
 * names a next-hop group (include/nexthop.h); this stage hashes the flow's
 * fields as the kernel's multipath hash policy selects them, takes the
 * group's member for that hash, and resolves it as the fib stage resolves
 * a unicast route's next hop. Any other packet goes straight on. Loaded
 * with the BPF FIB only: bpf_fib_lookup picks the kernel's path itself. */
#ifndef BPFROUTER_STAGE_ECMP_H
#define BPFROUTER_STAGE_ECMP_H

#include "../include/packet_ctx.h"
#include "../include/fib.h"
#include "../include/nexthop.h"
#include "../include/lb_toobig.h"

static __always_inline int ecmp_stage(struct xdp_md *ctx, struct packet_ctx *pc)
{
	struct fib_result *res = &pc->res;
	struct pkt p = {};
	__u32 nh_id;
	int reason;

	if (res->route_type != RTYPE_MULTIPATH)
		return -1;
	reason = pkt_restore(ctx, pc, &p);
	if (reason >= 0)
		return reason;
	res->hash = ecmp_flow_hash(&p, p.fragment);
	nh_id = ecmp_pick(res->group, res->hash, &res->bucket);
	if (!nh_id)
		return REASON_PASS_NEXTHOP_INVALID;
	reason = nexthop_resolve(&p, res, nh_id, pc->probe);
#ifndef BPFROUTER_SINGLE_PROGRAM
	if (reason == REASON_PASS_FRAG_NEEDED)
		return lb_answer_too_big(ctx, pc, reason);
#endif
	return reason <= REASON_FWD_IPV6 ? -1 : reason;
}

#endif
