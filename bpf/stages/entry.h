/* Stage entry (the attached program): parse, ingress interface, classify.
 * It starts the packet's context afresh and decides everything that needs
 * no route: malformed frames (drop), what the kernel must see (pass). */
#ifndef BPFROUTER_STAGE_ENTRY_H
#define BPFROUTER_STAGE_ENTRY_H

#include "../include/packet_ctx.h"
#include "../include/parse.h"
#include "../include/iface.h"
#include "../include/classify.h"
#include "../include/probe.h"
#include "../include/lb.h"

/* Returns -1 to go on to the next stage, else the packet's reason. */
static __always_inline int entry_stage(struct xdp_md *ctx, struct packet_ctx *pc)
{
	struct probe_meta *probe = probe_from_ctx(ctx);
	struct pkt p = {};
	struct iface *in;
	int reason;

	__builtin_memset(pc, 0, sizeof(*pc));
	pc->reason = -1;
	if (probe) {
		pc->probe = 1;
		pc->mark = probe->nh_id;
	}
	p.data = (void *)(long)ctx->data;
	p.data_end = (void *)(long)ctx->data_end;
	in = iface_lookup(ctx->ingress_ifindex);
	if (in && in->slot < MAX_IFACES)
		pc->slot = in->slot;
	if (in)
		pc->iface_flags = in->flags;

	reason = parse_packet(&p);
	packet_ctx_save(pc, &p);
	if (reason >= 0)
		return reason;
	if (!in)
		return REASON_PASS_UNKNOWN_IFACE;
	reason = classify(&p, in);
	if (reason >= 0)
		return reason;
	/* the lb stage follows (list.h): only a family with services needs it,
	 * and only for the addresses it serves */
	if (in->flags & (p.ip4 ? IFACE_F_LB4 : IFACE_F_LB6)) {
		pc->lb_addr = lb_addr_kind(&p);
		if (pc->lb_addr)
			return STAGE_NEXT;
	}
	return route_start(pc, !!p.ip4);
}

#endif
