// SPDX-License-Identifier: GPL-2.0
/* bpfrouter's XDP entry program. It only sequences the stages:
 * parse -> classify -> fib -> rewrite -> verdict. Each stage lives in its
 * own header under include/. */
#include "include/common.h"
#include "include/consts.h"
#include "include/parse.h"
#include "include/iface.h"
#include "include/classify.h"
#include "include/neigh.h"
#include "include/fib.h"
#include "include/rewrite.h"
#include "include/counters.h"
#include "include/probe.h"

/* Set by the loader before the program is verified, so the unused FIB
 * back end is removed as dead code. */
const volatile __u32 fib_mode = FIB_MODE_BPF;

/* Anchors so the enums reach BTF; the loader checks Python's copies. */
const volatile enum reason btf_anchor_reason = REASON_MAX;
const volatile enum route_type btf_anchor_route_type = RTYPE_NONE;
const volatile enum fib_impl btf_anchor_fib_impl = FIB_IMPL_DIR;
const volatile struct probe_meta btf_anchor_probe_meta = {};

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

SEC("xdp")
int bpfrouter_xdp(struct xdp_md *ctx)
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
		reason = fib_lookup_bpf(&p, &res);
	if (reason > REASON_FWD_IPV6)
		goto out;

	rewrite_forward(&p, &res);
	record(probe, slot, reason, p.len, &res);
	return bpf_redirect_map(&tx_ports, res.egress_ifindex, 0);
out:
	record(probe, slot, reason, p.len, &res);
	return reason_action(reason);
}

char _license[] SEC("license") = "GPL";
