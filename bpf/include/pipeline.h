/* The router's per-packet pipeline: parse -> classify -> fib -> rewrite ->
 * verdict. The XDP entry program (router.bpf.c) only calls it; the FIB
 * benchmark (fibbench.bpf.c) runs it in a loop over many destinations. */
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

static __always_inline int reason_action(int reason)
{
	if (reason >= REASON_DROP_BLACKHOLE)
		return XDP_DROP;
	return XDP_PASS;
}

static __always_inline void record(struct probe_meta *probe, __u32 slot, int reason,
				   __u32 len, const struct fib_result *res)
{
	if (!probe) {
		count(slot, reason, len);
		return;
	}
	probe->reason = reason;
	probe->nh_id = res->nh_id;
	probe->egress_ifindex = res->egress_ifindex;
	probe->route_type = res->route_type;
	probe->prefixlen = res->prefixlen;
	probe->route_proto = res->route_proto;
	probe->flags = res->neigh_found ? PROBE_F_NEIGH : 0;
}

static __always_inline int bpfrouter_pipeline(struct xdp_md *ctx)
{
	struct probe_meta *probe = probe_from_ctx(ctx);
	struct fib_result res = {};
	struct pkt p = {
		.data = (void *)(long)ctx->data,
		.data_end = (void *)(long)ctx->data_end,
	};
	struct iface *in;
	__u32 slot = 0;
	int reason;

	in = iface_lookup(ctx->ingress_ifindex);
	if (in && in->slot < MAX_IFACES)
		slot = in->slot;

	reason = parse_packet(&p);
	if (reason >= 0)
		goto out;
	if (!in) {
		reason = REASON_PASS_UNKNOWN_IFACE;
		goto out;
	}
	reason = classify(&p, in);
	if (reason >= 0)
		goto out;

	if (fib_mode == FIB_MODE_KERNEL)
		reason = fib_lookup_kernel(ctx, &p, &res);
	else
		reason = fib_lookup_bpf(&p, &res, probe != NULL);
	if (reason > REASON_FWD_IPV6)
		goto out;

	rewrite_forward(&p, &res);
	record(probe, slot, reason, p.len, &res);
	return bpf_redirect_map(&tx_ports, res.egress_ifindex, 0);
out:
	record(probe, slot, reason, p.len, &res);
	return reason_action(reason);
}

#endif
