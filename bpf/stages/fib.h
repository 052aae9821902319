/* Stage fib: the route, next hop, TTL, MTU and neighbor checks, into the
 * context's fib_result. The back end is fixed at load (fib_mode, fib_impl:
 * the BPF FIB's DIR or LPM structure, or the kernel's FIB through
 * bpf_fib_lookup); the verifier removes the others. With rules to walk, the
 * policy stage names the table, and a table that does not decide the
 * packet sends it back there (STAGE_TO_POLICY). */
#ifndef BPFROUTER_STAGE_FIB_H
#define BPFROUTER_STAGE_FIB_H

#include "../include/packet_ctx.h"
#include "../include/fib.h"
#include "../include/rules.h"
#include "../include/lb_toobig.h"

/* fib_rules_lookup goes on to the next rule when the rule's table has no
 * route, a throw route, or a result the rule suppresses; errors
 * (blackhole, unreachable, prohibit) are never suppressed. The local and
 * main tables are one image here: the rule walk starts with the local
 * rule (the agent makes sure of it), for which a route of any other kind
 * than the local table's (local, broadcast: passed) is not its own. */
static __always_inline int rule_goes_on(const struct packet_ctx *pc, int found, const struct route *rt,
					const struct rule_action *act)
{
	if (!found || rt->type == RTYPE_NONE)
		return 1;
	if (rt->type == RTYPE_KERNEL && ((rt->nh_id >> KERNEL_ROUTE_TYPE_SHIFT) & 0xff) == RTN_THROW_)
		return 1;
	if (pc->table == RT_TABLE_LOCAL)
		return rt->type != RTYPE_LOCAL && rt->type != RTYPE_KERNEL;
	if (rt->type == RTYPE_BLACKHOLE || rt->type == RTYPE_UNREACHABLE || rt->type == RTYPE_PROHIBIT)
		return 0;
	return rt->prefixlen <= act->suppress_prefixlen && act->suppress_prefixlen != 0xFF;
}

/* The local rule's lookup found no local route: the image's answer is
 * main's. When the next rule that matches is `lookup main`, it is taken
 * here on that answer, saving a round (the usual walk: local, rules that do
 * not match, main). Returns the rule's action, or NULL to go back to the
 * policy stage. */
static __always_inline const struct rule_action *rule_main_after_local(struct packet_ctx *pc, __u32 fam6,
									int detail)
{
	__u32 zero = 0, next;
	struct rule_walk *walk = bpf_map_lookup_elem(&rule_scratch, &zero);
	const struct rule_action *act;

	if (!walk)
		return NULL;
	next = rule_next(walk, pc->rule_next);
	if (next == RULE_NONE)
		return NULL;
	act = rule_action_of(pc->bank, fam6, next);
	if (!act || act->kind != RULE_LOOKUP || act->table != RT_TABLE_MAIN ||
	    (act->suppress_prefixlen != 0xFF && !detail))
		return NULL;
	pc->rule = next;
	pc->rule_next = next + 1;
	pc->table = RT_TABLE_MAIN;
	return act;
}

/* The group of a route's device as fib4_rule_suppress sees it (its first
 * next hop's): known for a unicast route out of a port; -1 otherwise (a
 * multipath route, whose first path may be one the mirror left out; a
 * local route's device), which the kernel is left to check. */
static __always_inline int route_dev_group(const struct route *rt)
{
	struct nexthop *nh;
	struct iface *out;
	__u32 nh_id = rt->nh_id;

	if (rt->type != RTYPE_UNICAST)
		return -1;
	nh = bpf_map_lookup_elem(&nexthops, &nh_id);
	if (!nh || !nh->ifindex)
		return -1;
	out = iface_lookup(nh->ifindex);
	if (!out || out->group > 0x7FFFFFFF)
		return -1;
	return out->group;
}

static __always_inline int fib_lookup_rule(const struct pkt *p, struct packet_ctx *pc)
{
	const struct rule_action *act = rule_action_of(pc->bank, !p->ip4, pc->rule);
	struct route rt = {};
	int found, detail;

	if (!act)
		return REASON_PASS_POLICY;
	detail = pc->probe || act->suppress_prefixlen != 0xFF;
	found = fib_find(p, &rt, pc->table, detail, &pc->res);
	if (rule_goes_on(pc, found, &rt, act)) {
		if (pc->table != RT_TABLE_LOCAL)
			return STAGE_TO_POLICY;
		act = rule_main_after_local(pc, !p->ip4, detail);
		if (!act || rule_goes_on(pc, found, &rt, act))
			return STAGE_TO_POLICY;
	}
	if ((act->flags & RULE_A_SUPPRESS_IFGROUP) && rt.type != RTYPE_BLACKHOLE &&
	    rt.type != RTYPE_UNREACHABLE && rt.type != RTYPE_PROHIBIT) {
		int group = route_dev_group(&rt);

		if (group < 0)
			return REASON_PASS_POLICY;
		if ((__u32)group == act->ifgroup)
			return STAGE_TO_POLICY;
	}
	if (!pc->probe)
		rule_count(pc->bank, !p->ip4, pc->rule);
	return fib_apply(p, &pc->res, &rt, pc->probe);
}

static __always_inline int fib_stage(struct xdp_md *ctx, struct packet_ctx *pc)
{
	struct pkt p = {};
	int reason = pkt_restore(ctx, pc, &p);

	if (reason >= 0)
		return reason;
	if (fib_mode == FIB_MODE_KERNEL)
		reason = fib_lookup_kernel(ctx, &p, &pc->res, pc->probe);
	else if (pc->rounds)
		reason = fib_lookup_rule(&p, pc);
	else
		reason = fib_lookup_bpf(&p, &pc->res, pc->probe);
#ifndef BPFROUTER_SINGLE_PROGRAM    /* the answer goes round to fib again: a tail call */
	if (reason == REASON_PASS_FRAG_NEEDED)
		return lb_answer_too_big(ctx, pc, reason);
#endif
	if (reason > REASON_FWD_IPV6 || reason == STAGE_TO_POLICY)
		return reason;
	/* the ecmp stage follows (list.h): only a multipath route needs it */
	return pc->res.route_type == RTYPE_MULTIPATH ? STAGE_NEXT : STAGE_SKIP_NEXT;
}

#endif
