// SPDX-License-Identifier: GPL-2.0
/* bpfrouter's XDP entry program. The stages live in include/, one concern
 * per header; include/pipeline.h sequences them. */
#include "include/pipeline.h"

/* Anchors so the enums reach BTF; the loader checks Python's copies. */
const volatile enum reason btf_anchor_reason = REASON_MAX;
const volatile enum route_type btf_anchor_route_type = RTYPE_NONE;
const volatile enum fib_impl btf_anchor_fib_impl = FIB_IMPL_DIR;
const volatile struct probe_meta btf_anchor_probe_meta = {};
const volatile enum obs_stat btf_anchor_obs_stat = OBS_STAT_MAX;
const volatile struct event btf_anchor_event = {};

/* Attached while no capture runs: the capture hook is not in it at all. */
SEC("xdp")
int bpfrouter_xdp(struct xdp_md *ctx)
{
	return bpfrouter_observed(ctx, 0);
}

/* The same with the capture hook: `bpfrouter capture` swaps it in on the
 * interfaces it records (bpf_link_update, atomic per interface) and back
 * when it ends. Both share every map. */
SEC("xdp")
int bpfrouter_xdp_capture(struct xdp_md *ctx)
{
	return bpfrouter_observed(ctx, 1);
}

char _license[] SEC("license") = "GPL";
