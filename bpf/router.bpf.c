// SPDX-License-Identifier: GPL-2.0
/* bpfrouter's XDP data plane: the stages of bpf/stages/ (list.h), joined
 * by include/pipeline.h into a chain of programs (this object) or into one
 * program (router_single.bpf.c, built from this file). */
#include "include/pipeline.h"

/* Anchors so the enums reach BTF; the loader checks Python's copies. */
const volatile enum reason btf_anchor_reason = REASON_MAX;
const volatile enum route_type btf_anchor_route_type = RTYPE_NONE;
const volatile enum fib_impl btf_anchor_fib_impl = FIB_IMPL_DIR;
const volatile enum stage btf_anchor_stage = STAGE_MAX;
const volatile struct probe_meta btf_anchor_probe_meta = {};
const volatile enum obs_stat btf_anchor_obs_stat = OBS_STAT_MAX;
const volatile struct event btf_anchor_event = {};

char _license[] SEC("license") = "GPL";
