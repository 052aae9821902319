/* Stage policy: the kernel's rules (include/rules.h). It finds the packet's
 * next rule that matches and does its action; a lookup goes on to the fib
 * stage with the rule's table, which comes back here (STAGE_TO_POLICY) when
 * that table does not decide the packet. Entry skips this stage for a
 * family without rules to walk; fib then looks local and main up as one.
 * Loaded with the BPF FIB only: bpf_fib_lookup applies the rules itself. */
#ifndef BPFROUTER_STAGE_POLICY_H
#define BPFROUTER_STAGE_POLICY_H

#include "../include/packet_ctx.h"
#include "../include/rules.h"

/* What fib_rules_lookup sees of a forwarded packet: the flow dissector's
 * ports for TCP, UDP, DCCP, SCTP and UDP-Lite (none for a fragment). -1:
 * a packet whose ports the dissector reads otherwise (ESP and AH: the SPI)
 * or whose protocol it finds past a header this parser stops at. */
static __always_inline int rule_ports(const struct pkt *p, __u32 *sport, __u32 *dport)
{
	*sport = 0;
	*dport = 0;
	if (p->ip6 && p->l4_proto == IPPROTO_FRAGMENT)
		return -1;
	switch (p->l4_proto) {
	case IPPROTO_TCP:
	case IPPROTO_UDP:
	case IPPROTO_DCCP:
	case IPPROTO_SCTP:
	case IPPROTO_UDPLITE:
		break;
	case IPPROTO_ESP:
	case IPPROTO_AH:
		return -1;
	default:
		return 0;
	}
	if (p->fragment || !p->l4)
		return 0;
	if (p->l4 + 4 > p->data_end)
		return 0;
	*sport = bpf_ntohs(*(__be16 *)p->l4);
	*dport = bpf_ntohs(*(__be16 *)(p->l4 + 2));
	return 0;
}

/* The rules the packet matches, into the per-CPU scratch vector. */
static __always_inline int rule_classify(struct xdp_md *ctx, const struct packet_ctx *pc, const struct pkt *p,
					 const struct rule_set *rs, __u32 bank, __u32 fam6, struct rule_walk *wk)
{
	__u32 set = bank * 2 + fam6;
	__u32 key = set * MAX_RULE_VECTORS + (rs->all & (MAX_RULE_VECTORS - 1));
	struct rule_vector *all = bpf_map_lookup_elem(&rule_vectors, &key);
	struct rule_vector *acc = &wk->bits;
	__u32 fields = rs->fields, sport, dport;
	struct rule_prefix_key src = {}, dst = {};
	__u32 tos = 0;

	if (!all)
		return REASON_PASS_POLICY;
	*acc = *all;
	if (p->ip4) {
		__builtin_memcpy(src.addr, &p->ip4->saddr, 4);
		__builtin_memcpy(dst.addr, &p->ip4->daddr, 4);
		tos = p->ip4->tos;
	} else if (p->ip6) {
		__builtin_memcpy(src.addr, &p->ip6->saddr, 16);
		__builtin_memcpy(dst.addr, &p->ip6->daddr, 16);
		tos = (bpf_ntohl(*(__be32 *)p->ip6) >> 20) & 0xff;
	} else {
		return REASON_PASS_POLICY;
	}
	if (fields & (RULE_F_PROTO | RULE_F_SPORT | RULE_F_DPORT)) {
		if (rule_ports(p, &sport, &dport) < 0)
			return REASON_PASS_POLICY;
	}
	if (fields & RULE_F_SRC)
		rule_and(acc, set, rule_prefix_vector(rs, bank, fam6, 0, &src));
	if (fields & RULE_F_DST)
		rule_and(acc, set, rule_prefix_vector(rs, bank, fam6, 1, &dst));
	if (fields & RULE_F_IIF)
		rule_and(acc, set, rule_value_vector(bank, fam6, 0, ctx->ingress_ifindex, rs->miss[2]));
	if (fields & RULE_F_PROTO)
		rule_and(acc, set, rule_byte_vector(bank, fam6, 0, p->l4_proto));
	if (fields & RULE_F_TOS)
		rule_and(acc, set, rule_byte_vector(bank, fam6, 1, tos));
	if (fields & RULE_F_MARK) {
#pragma unroll
		for (int i = 0; i < MAX_RULE_MASKS; i++) {
			if (i >= rs->nmasks)
				break;
			rule_and(acc, set, rule_value_vector(bank, fam6, 1 + i, pc->mark & rs->mask[i], rs->mask_miss[i]));
		}
	}
	if (fields & RULE_F_SPORT)
		rule_and(acc, set, rule_port_vector(rs, bank, fam6, 0, sport));
	if (fields & RULE_F_DPORT)
		rule_and(acc, set, rule_port_vector(rs, bank, fam6, 1, dport));
	if (rs->invert) {
		struct rule_vector *inv;

		key = set * MAX_RULE_VECTORS + (rs->invert & (MAX_RULE_VECTORS - 1));
		inv = bpf_map_lookup_elem(&rule_vectors, &key);
		if (!inv)
			return REASON_PASS_POLICY;
#pragma unroll
		for (int i = 0; i < RULE_WORDS; i++)
			acc->w[i] = (acc->w[i] ^ inv->w[i]) & all->w[i];
	}
	wk->summary = 0;
#pragma unroll
	for (int i = 0; i < RULE_WORDS; i++)
		wk->summary |= (__u32)(acc->w[i] != 0) << i;
	return -1;
}

static __always_inline int policy_stage(struct xdp_md *ctx, struct packet_ctx *pc)
{
	__u32 zero = 0, fam6, state, bank, set, rule;
	struct rule_walk *walk = bpf_map_lookup_elem(&rule_scratch, &zero);
	const struct rule_action *act;
	const struct rule_set *rs;
	struct pkt p = {};
	int reason;

	reason = pkt_restore(ctx, pc, &p);
	if (reason >= 0)
		return reason;
	if (!walk)
		return REASON_PASS_POLICY;
	fam6 = !p.ip4;
	state = rules_state(fam6);
	if (!(state & RULE_ACTIVE_ON))
		return STAGE_NEXT;      /* the set went away since entry looked */
	bank = state & 1;
	set = bank * 2 + fam6;
	rs = bpf_map_lookup_elem(&rule_sets, &set);
	if (!rs)
		return REASON_PASS_POLICY;
	if (pc->rounds == 0) {
		pc->bank = bank;
		reason = rule_classify(ctx, pc, &p, rs, bank, fam6, walk);
		if (reason >= 0)
			return reason;
	} else if (pc->bank != bank) {
		return REASON_PASS_POLICY;      /* the rules changed under this packet */
	}
	if (++pc->rounds > RULE_MAX_ROUNDS)
		return REASON_PASS_POLICY;
	rule = pc->rule_next;
#pragma unroll
	for (int jump = 0; jump <= RULE_MAX_JUMPS; jump++) {
		rule = rule_next(walk, rule);
		if (rule == RULE_NONE) {
			pc->rule = RULE_NONE;
			return REASON_PASS_UNREACHABLE;   /* no rule: the kernel answers unreachable */
		}
		act = rule_action_of(bank, fam6, rule);
		if (!act)
			return REASON_PASS_POLICY;
		pc->rule = rule;
		switch (act->kind) {
		case RULE_LOOKUP:
			pc->table = act->table;
			pc->rule_next = rule + 1;
			return STAGE_NEXT;
		case RULE_GOTO:
			rule = act->target;
			continue;
		}
		if (!pc->probe)         /* the rule decides the packet itself */
			rule_count(bank, fam6, rule);
		switch (act->kind) {
		case RULE_BLACKHOLE:
			return REASON_DROP_BLACKHOLE;
		case RULE_UNREACHABLE:
			return REASON_PASS_UNREACHABLE;
		case RULE_PROHIBIT:
			return REASON_PASS_PROHIBIT;
		default:
			return REASON_PASS_POLICY;
		}
	}
	return REASON_PASS_POLICY;
}

#endif
