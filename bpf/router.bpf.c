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

SEC("xdp")
int bpfrouter_xdp(struct xdp_md *ctx)
{
	return bpfrouter_observed(ctx);
}

char _license[] SEC("license") = "GPL";
