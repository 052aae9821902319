/* The stage list: the router's decision stages after entry, in packet
 * order. X(SLOT, name) names a stage's slot in the chain (enum stage,
 * pipeline.h) and its name: its file is stages/<name>.h, its function
 * <name>_stage(ctx, pc) and, in the staged build, its program
 * stage_<name>. Observe runs after the verdict, in its own slot, last.
 *
 * Adding a stage: its file, its include and X line here, its entry in the
 * loader's list (bpfrouter/datapath/stages.py), which says when it is
 * configured. A stage that is not configured is not loaded and not in the
 * chain: the loader fills its slot with its successor. */
#ifndef BPFROUTER_STAGE_LIST_H
#define BPFROUTER_STAGE_LIST_H

#include "entry.h"
#include "lb.h"
#include "policy.h"
#include "fib.h"
#include "ecmp.h"
#include "kernel_policy.h"
#include "forward.h"
#include "observe.h"

/* entry goes to lb only for a family with services, to an address the
 * load balancer serves (include/lb.h: lb_vips); routing starts
 * (route_start: policy for a family with rules to walk, else fib) from
 * entry, or from lb for what it does not take; fib goes back to policy
 * (STAGE_TO_POLICY) when a rule's table does not decide, and skips ecmp
 * unless the route is multipath. */
#define BEFORE_ROUTE_STAGES(X) \
	X(LB, lb)
#define ROUTE_STAGES(X) \
	X(POLICY, policy) \
	X(FIB, fib)
#define AFTER_ROUTE_STAGES(X) \
	X(ECMP, ecmp) \
	X(KERNEL_POLICY, kernel_policy) \
	X(FORWARD, forward)
#define DECISION_STAGES(X) BEFORE_ROUTE_STAGES(X) ROUTE_STAGES(X) AFTER_ROUTE_STAGES(X)

#endif
