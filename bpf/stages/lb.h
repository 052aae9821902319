/* Stage lb: the L4 load balancer (include/lb.h). A TCP or UDP packet to
 * a service's VIP and port gets its flow's backend and leaves encapsulated
 * to it (include/encap.h); the outer packet is then routed like any other
 * (fib, from local and main: the router sends it, as IPVS's tunnel does
 * from the output path). Everything else goes on to routing. Entry sends
 * only families with services here. */
#ifndef BPFROUTER_STAGE_LB_H
#define BPFROUTER_STAGE_LB_H

#include "../include/packet_ctx.h"
#include "../include/counters.h"
#include "../include/lb.h"
#include "../include/encap.h"

/* The flow's key from the packet; 0 when it has none to balance on. */
static __always_inline int lb_flow_key(const struct pkt *p, struct lb_conn_key *k)
{
	if (p->ip4) {
		__builtin_memcpy(k->saddr, &p->ip4->saddr, 4);
		__builtin_memcpy(k->daddr, &p->ip4->daddr, 4);
		k->family = 4;
	} else if (p->ip6) {
		__builtin_memcpy(k->saddr, &p->ip6->saddr, 16);
		__builtin_memcpy(k->daddr, &p->ip6->daddr, 16);
		k->family = 6;
	} else {
		return 0;
	}
	k->proto = p->l4_proto;
	if ((p->l4_proto != IPPROTO_TCP && p->l4_proto != IPPROTO_UDP) || !p->l4 || p->fragment)
		return 0;
	if (p->l4 + 4 > p->data_end)
		return 0;
	k->sport = ((__be16 *)p->l4)[0];
	k->dport = ((__be16 *)p->l4)[1];
	return 1;
}

/* Is the destination a VIP at all (for what carries no ports to match)? */
static __always_inline int lb_is_vip(const struct lb_conn_key *k)
{
	struct lb_vip_key v = {};

	__builtin_memcpy(v.addr, k->daddr, 16);
	v.family = k->family;
	return bpf_map_lookup_elem(&lb_vips, &v) != NULL;
}

static __always_inline struct lb_service *lb_service_of(const struct lb_conn_key *k)
{
	struct lb_service_key sk = {};
	struct lb_service *svc;

	__builtin_memcpy(sk.addr, k->daddr, 16);
	sk.port = k->dport;
	sk.proto = k->proto;
	sk.family = k->family;
	svc = bpf_map_lookup_elem(&lb_services, &sk);
	if (svc)
		return svc;
	sk.port = 0;
	return bpf_map_lookup_elem(&lb_services, &sk);
}

/* The flow's backend: its connection's while that backend takes the
 * service's connections, else the ring's, learned unless flooding.
 * Returns the slot, 0 for none. */
static __always_inline __u32 lb_pick(const struct packet_ctx *pc, const struct lb_conn_key *k,
				     const struct lb_service *svc, const struct lb_config *cfg,
				     struct lb_stat *st, __u32 hash)
{
	struct lb_conn *c = NULL, fresh = {};
	struct lb_backend *be;
	__u32 idx, *slot;

	if (!(svc->flags & LB_SVC_F_NO_AFFINITY)) {
		c = bpf_map_lookup_elem(&lb_conns, k);
		if (c) {
			be = lb_backend_of(c->backend, svc->id);
			if (be && be->gen == c->gen && (be->flags & LB_BE_F_CONNS))
				return c->backend;
		}
	}
	if (!svc->ring_size)
		return 0;
	idx = svc->ring_base + hash % svc->ring_size;
	slot = bpf_map_lookup_elem(&lb_ring, &idx);
	if (!slot)
		return 0;
	be = lb_backend_of(*slot, svc->id);
	if (!be)
		return 0;
	if (pc->probe)
		return *slot;
	st->new_flows++;
	if (svc->flags & LB_SVC_F_NO_AFFINITY)
		return *slot;
	if (c) {                /* its backend left: the flow moves, and stays moved */
		c->backend = *slot;
		c->gen = be->gen;
	} else if (lb_may_learn(cfg, st)) {
		fresh.backend = *slot;
		fresh.gen = be->gen;
		bpf_map_update_elem(&lb_conns, k, &fresh, BPF_ANY);
	} else {
		st->unlearned++;
	}
	return *slot;
}

static __always_inline int lb_stage(struct xdp_md *ctx, struct packet_ctx *pc)
{
	struct lb_conn_key k = {};
	struct lb_service *svc;
	struct lb_backend *be;
	struct lb_config *cfg;
	struct lb_stat *st, none = {};
	struct counter *bc;
	struct pkt p = {};
	__u32 zero = 0, hash, slot, grow;
	int reason = pkt_restore(ctx, pc, &p);

	if (reason >= 0)
		return reason;
	if (!lb_flow_key(&p, &k)) {
		if (k.family && (p.fragment || k.proto == IPPROTO_FRAGMENT) && lb_is_vip(&k))
			return REASON_PASS_LB_FRAGMENT;
		return route_start(pc, !!p.ip4);
	}
	svc = lb_service_of(&k);
	cfg = bpf_map_lookup_elem(&lb_config, &zero);
	if (!svc || !cfg)
		return route_start(pc, !!p.ip4);
	st = pc->probe ? &none : bpf_map_lookup_elem(&lb_service_stats, &svc->id);
	if (!st)
		st = &none;
	hash = lb_flow_hash(&k);
	slot = lb_pick(pc, &k, svc, cfg, st, hash);
	be = slot ? bpf_map_lookup_elem(&lb_backends, &slot) : NULL;
	if (!be) {
		st->no_backend++;
		return REASON_DROP_LB_NO_BACKEND;
	}
	st->packets++;
	st->bytes += pc->len;
	if (!pc->probe) {
		bc = bpf_map_lookup_elem(&lb_backend_stats, &slot);
		if (bc) {
			bc->packets++;
			bc->bytes += pc->len;
		}
	}
	grow = lb_encapsulate(ctx, &p, be, cfg, hash);
	if (!grow)
		return REASON_PASS_LB_ENCAP_FAILED;
	/* pc->len stays the received frame's: the ingress counters count what came in */
	pc->l3_proto = be->family == 4 ? ETH_P_IP : ETH_P_IPV6;
	pc->l4_off = pc->l3_off + grow;
	pc->l4_proto = k.family == 4 ? IPPROTO_IPIP : IPPROTO_IPV6;
	pc->flags = PCTX_F_LB;
	return STAGE_TO_FIB;
}

#endif
