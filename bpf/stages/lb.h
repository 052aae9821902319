/* Stage lb: the L4 load balancer (include/lb.h). A TCP or UDP packet to
 * a service's VIP and port gets its flow's backend and leaves encapsulated
 * to it (include/encap.h), or, for a NAT service, translated to it
 * (include/nat.h: the backend's address, the router's source); a reply to
 * a translated flow is translated back to the client. The packet is then
 * routed like any other (fib, from local and main: the router sends it,
 * as IPVS does from the output path). Everything else goes on to routing.
 * Entry sends here only packets of a family with services, to an address
 * the load balancer serves (a VIP, a NAT source: lb_vips). A GUE packet's
 * context says IPIP or IPV6 (l4_off: the client's packet), not UDP: the
 * kernel FIB's multipath hash and port rules do not see its UDP ports. */
#ifndef BPFROUTER_STAGE_LB_H
#define BPFROUTER_STAGE_LB_H

#include "../include/packet_ctx.h"
#include "../include/counters.h"
#include "../include/lb.h"
#include "../include/encap.h"
#include "../include/nat.h"
#include "../include/kernelpolicy.h"

/* Per-CPU room for the NAT path's keys and rewrites: on the stack they
 * would not fit the single program's 512 bytes. A stage runs to its end
 * on its CPU, so the slot is this packet's while it is used. */
struct lb_scratch {
	struct lb_nat_key nk;
	struct lb_nat rev;
	struct nat_rewrite to;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct lb_scratch);
} lb_scratch SEC(".maps");

static __always_inline struct lb_scratch *lb_scratch_get(void)
{
	__u32 zero = 0;
	struct lb_scratch *sc = bpf_map_lookup_elem(&lb_scratch, &zero);

	if (sc)
		__builtin_memset(sc, 0, sizeof(*sc));
	return sc;
}

/* A client's packet from a martian source is dropped before it is
 * balanced, as the kernel drops it before IPVS sees it. */
static __always_inline int lb_martian_source(const struct pkt *p, __u32 flags)
{
	if (p->ip4)
		return martian4(bpf_ntohl(p->ip4->saddr), bpf_ntohl(p->ip4->daddr), flags) ==
		       REASON_DROP_MARTIAN_SOURCE;
	if (p->ip6)
		return ipv6_is_loopback(&p->ip6->saddr) || ipv6_is_unspecified(&p->ip6->saddr) ||
		       p->ip6->saddr.in6_u.u6_addr8[0] == 0xFF;
	return 0;
}

#define LB_FLOW 1               /* the packet is the flow's */
#define LB_ICMP_ERROR 2         /* an ICMP error about the flow's packet from the VIP */

/* An ICMP error (unreachable, packet too big, time exceeded, parameter
 * problem) quoting a packet from a VIP to its client: the key of the
 * client's flow it is about, as Katran finds it, so it reaches the
 * backend that sent that packet. */
static __always_inline int lb_icmp_quoted_key(const struct pkt *p, struct lb_conn_key *k)
{
	void *q = p->l4 + 8, *end = p->data_end;
	__u8 type = *(__u8 *)p->l4;
	__be16 *ports;

	if (p->ip4) {
		struct iphdr *in = q;

		if ((type != 3 && type != 11 && type != 12) || (void *)(in + 1) > end || in->version != 4 ||
		    in->ihl < 5 || (in->frag_off & bpf_htons(0x1FFF)))
			return 0;
		ports = q + ((in->ihl & 0xf) << 2);
		__builtin_memcpy(k->saddr, &in->daddr, 4);
		__builtin_memcpy(k->daddr, &in->saddr, 4);
		k->proto = in->protocol;
	} else {
		struct ipv6hdr *in = q;

		if (type < 1 || type > 4 || (void *)(in + 1) > end)
			return 0;
		ports = (void *)(in + 1);
		__builtin_memcpy(k->saddr, &in->daddr, 16);
		__builtin_memcpy(k->daddr, &in->saddr, 16);
		k->proto = in->nexthdr;
	}
	if ((k->proto != IPPROTO_TCP && k->proto != IPPROTO_UDP) || (void *)(ports + 2) > end)
		return 0;
	k->sport = ports[1];
	k->dport = ports[0];
	return LB_ICMP_ERROR;
}

/* The flow's key from the packet: LB_FLOW, LB_ICMP_ERROR, or 0 when it
 * has none to balance on. */
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
	if (!p->l4 || p->fragment)
		return 0;
	if ((p->ip4 && p->l4_proto == IPPROTO_ICMP) || (p->ip6 && p->l4_proto == IPPROTO_ICMPV6))
		return lb_icmp_quoted_key(p, k);
	if (p->l4_proto != IPPROTO_TCP && p->l4_proto != IPPROTO_UDP)
		return 0;
	if (p->l4 + 4 > p->data_end)
		return 0;
	k->sport = ((__be16 *)p->l4)[0];
	k->dport = ((__be16 *)p->l4)[1];
	return LB_FLOW;
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
 * service's connections, else the ring's, learned unless flooding (or
 * `learn` is 0: a probe, an ICMP error). Returns the slot, 0 for none;
 * *conn: the connection entry it found (NULL: none, or a new one). */
static __always_inline __u32 lb_pick(int learn, const struct lb_conn_key *k,
				     const struct lb_service *svc, const struct lb_config *cfg,
				     struct lb_stat *st, __u32 hash, struct lb_conn **conn)
{
	struct lb_conn *c = NULL, fresh = {};
	struct lb_backend *be;
	__u32 idx, *slot;

	if (!(svc->flags & LB_SVC_F_NO_AFFINITY)) {
		c = bpf_map_lookup_elem(&lb_conns, k);
		*conn = c;
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
	if (!learn)
		return *slot;
	st->new_flows++;
	if (svc->flags & LB_SVC_F_NO_AFFINITY)
		return *slot;
	if (c) {                /* its backend left: the flow moves, and stays moved */
		c->backend = *slot;
		c->gen = be->gen;
		c->nat_port = 0;
	} else if ((svc->flags & LB_SVC_F_NAT) || lb_may_learn(cfg, st)) {  /* NAT needs the state */
		*conn = NULL;
		fresh.backend = *slot;
		fresh.gen = be->gen;
		bpf_map_update_elem(&lb_conns, k, &fresh, BPF_ANY);
	} else {
		st->unlearned++;
	}
	return *slot;
}

/* Translated ports: below the kernel's default ephemeral range (32768 on),
 * so the router's own connections to a backend (its health checks) never
 * share a reply key with a translated flow. */
#define NAT_PORT_TRIES 4
#define NAT_PORT_FIRST 1024
#define NAT_PORT_END 32768

static __always_inline int addr16_equal(const __u8 *a, const __u8 *b)
{
	const __u32 *x = (const __u32 *)a, *y = (const __u32 *)b;

	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

static __always_inline int lb_nat_same_flow(const struct lb_nat *rev, const struct lb_conn_key *k)
{
	return addr16_equal(rev->client, k->saddr) && addr16_equal(rev->vip, k->daddr) &&
	       rev->client_port == k->sport && rev->vip_port == k->dport;
}

/* NAT: the flow's translated source port, from its connection entry c
 * (lb_pick's; NULL: just learned, looked up here), or a new one whose
 * reply key is free (or already this flow's: its connection entry was
 * evicted, not its way back); 0 when none is (counted). An established
 * flow's reply entry is looked up too, which keeps it fresh in its LRU
 * while only the client sends. */
static __always_inline __be16 lb_nat_port(const struct packet_ctx *pc, const struct lb_conn_key *k,
					  struct lb_conn *c, const struct lb_backend *be, __u32 svc_id, __u32 hash,
					  struct lb_stat *st)
{
	struct lb_scratch *sc;
	struct lb_nat_key *nk;
	struct lb_nat *rev;

	if (!c)
		c = bpf_map_lookup_elem(&lb_conns, k);
	if (pc->probe)          /* a probe learns nothing: any port shows the translation */
		return c && c->nat_port ? c->nat_port : bpf_htons(NAT_PORT_FIRST);
	sc = lb_scratch_get();
	if (!c || !sc)
		return 0;
	nk = &sc->nk;
	rev = &sc->rev;
	__builtin_memcpy(nk->backend, be->addr, 16);
	__builtin_memcpy(nk->nat_src, be->nat_src, 16);
	nk->backend_port = k->dport;
	nk->proto = k->proto;
	nk->family = k->family;
	__builtin_memcpy(rev->client, k->saddr, 16);
	__builtin_memcpy(rev->vip, k->daddr, 16);
	rev->client_port = k->sport;
	rev->vip_port = k->dport;
	rev->service = svc_id;
	if (c->nat_port) {
		nk->nat_port = c->nat_port;
		if (!bpf_map_lookup_elem(&lb_nat, nk))    /* evicted: the way back again */
			bpf_map_update_elem(&lb_nat, nk, rev, BPF_ANY);
		return c->nat_port;
	}
#pragma unroll
	for (int i = 0; i < NAT_PORT_TRIES; i++) {
		struct lb_nat *taken;

		nk->nat_port = bpf_htons(NAT_PORT_FIRST + (hash + i * 40503U) % (NAT_PORT_END - NAT_PORT_FIRST));
		taken = bpf_map_lookup_elem(&lb_nat, nk);
		if (taken && !lb_nat_same_flow(taken, k))
			continue;
		if (taken || !bpf_map_update_elem(&lb_nat, nk, rev, BPF_NOEXIST)) {
			c->nat_port = nk->nat_port;
			return nk->nat_port;
		}
	}
	st->nat_port_busy++;
	return 0;
}

/* NAT, client to backend: the router's address and the flow's port as the
 * source, the backend as the destination (same port). */
static __always_inline int lb_nat_forward(struct packet_ctx *pc, struct pkt *p, const struct lb_conn_key *k,
					  const struct lb_backend *be, __be16 port)
{
	struct lb_scratch *sc = lb_scratch_get();
	struct nat_rewrite *to;

	if (!sc)
		return REASON_PASS_LB_ENCAP_FAILED;
	to = &sc->to;
	__builtin_memcpy(to->saddr, be->nat_src, 16);
	__builtin_memcpy(to->daddr, be->addr, 16);
	to->sport = port;
	to->dport = k->dport;
	if (nat_rewrite(p, to))
		return REASON_PASS_LB_ENCAP_FAILED;
	pc->flags |= PCTX_F_LB | PCTX_F_LB_SNAT;
	return STAGE_TO_FIB;
}

/* The translated flow a packet from a backend to the router belongs to
 * (NULL: none), and the scratch room to rewrite it with. */
static __always_inline struct lb_nat *lb_nat_of_reply(const struct lb_conn_key *k, struct lb_scratch **scp)
{
	struct lb_scratch *sc = lb_scratch_get();
	struct lb_nat_key *nk;

	if (!sc)
		return NULL;
	*scp = sc;
	nk = &sc->nk;

	__builtin_memcpy(nk->backend, k->saddr, 16);
	__builtin_memcpy(nk->nat_src, k->daddr, 16);
	nk->backend_port = k->sport;
	nk->nat_port = k->dport;
	nk->proto = k->proto;
	nk->family = k->family;
	return bpf_map_lookup_elem(&lb_nat, nk);
}

/* The quoted packet of an ICMP error: its IP header (*qp) and its L4
 * ports, bounds-checked; NULL when it is cut short. */
static __always_inline __u16 *icmp_quoted_ports(const struct pkt *p, void **qp)
{
	void *q = p->l4 + 8, *end = p->data_end;
	__u16 *ports;

	if (p->ip4) {
		struct iphdr *in = q;

		if ((void *)(in + 1) > end || in->ihl < 5)
			return NULL;
		ports = q + ((in->ihl & 0xf) << 2);
	} else {
		struct ipv6hdr *in = q;

		if ((void *)(in + 1) > end)
			return NULL;
		ports = (void *)(in + 1);
	}
	if ((void *)(ports + 2) > end)
		return NULL;
	*qp = q;
	return ports;
}

/* NAT: an ICMP error to the router's address about a translated packet
 * toward a backend (the backend's port unreachable, a hop's fragmentation
 * needed) goes to the client from the VIP, about the packet the client
 * sent, as IPVS translates it (ip_vs_nat_icmp, outward). k: the
 * quoted packet's flow, reversed (lb_icmp_quoted_key). STAGE_NEXT: not
 * about a translated flow. */
static __always_inline int lb_nat_icmp_back(struct packet_ctx *pc, struct pkt *p, const struct lb_conn_key *k)
{
	struct lb_scratch *sc = NULL;
	struct lb_nat *rev = lb_nat_of_reply(k, &sc);
	struct nat_rewrite *to;
	__u16 *ports;
	void *q;

	if (!rev || !sc)
		return STAGE_NEXT;
	ports = icmp_quoted_ports(p, &q);
	if (!ports)
		return STAGE_NEXT;
	to = &sc->to;
	__builtin_memcpy(to->saddr, rev->client, 16);
	__builtin_memcpy(to->daddr, rev->vip, 16);
	to->sport = rev->client_port;
	to->dport = rev->vip_port;
	nat_rewrite_icmp(p, q, ports, rev->vip, rev->client, to);
	pc->flags |= PCTX_F_LB;
	return STAGE_TO_FIB;
}

/* NAT: an ICMP error to a VIP about one of its replies to a client (a hop
 * on the client's side: fragmentation needed) goes to the backend that
 * sent the reply, about the packet it sent (to the router's address and
 * the flow's port), as IPVS translates it (ip_vs_nat_icmp, inward). Its
 * source becomes the router's address toward the backend too: the
 * backend of a source-translated service need not have a route to the
 * client's side. k: the client's flow (lb_icmp_quoted_key). STAGE_NEXT:
 * no translated flow of the service has it. */
static __always_inline int lb_nat_icmp_forward(struct packet_ctx *pc, struct pkt *p, const struct lb_conn_key *k,
					       const struct lb_service *svc)
{
	struct lb_conn *c = bpf_map_lookup_elem(&lb_conns, k);
	struct lb_scratch *sc;
	struct lb_backend *be;
	struct nat_rewrite *to;
	__u16 *ports;
	void *q;

	if (!c || !c->nat_port)
		return STAGE_NEXT;
	be = lb_backend_of(c->backend, svc->id);
	if (!be || be->gen != c->gen)
		return STAGE_NEXT;
	ports = icmp_quoted_ports(p, &q);
	sc = lb_scratch_get();
	if (!ports || !sc)
		return STAGE_NEXT;
	to = &sc->to;
	__builtin_memcpy(to->saddr, be->addr, 16);
	__builtin_memcpy(to->daddr, be->nat_src, 16);
	to->sport = k->dport;
	to->dport = c->nat_port;
	nat_rewrite_icmp(p, q, ports, be->nat_src, be->addr, to);
	pc->flags |= PCTX_F_LB;
	return STAGE_TO_FIB;
}

/* NAT, backend to client: a reply to a translated flow goes back with the
 * VIP as its source. STAGE_NEXT: not one. */
static __always_inline int lb_nat_reply(struct packet_ctx *pc, struct pkt *p, const struct lb_conn_key *k)
{
	struct lb_scratch *sc = NULL;
	struct lb_nat *rev = lb_nat_of_reply(k, &sc);
	struct nat_rewrite *to;
	struct lb_stat *st;

	if (!rev || !sc)
		return STAGE_NEXT;
	to = &sc->to;
	__builtin_memcpy(to->saddr, rev->vip, 16);
	__builtin_memcpy(to->daddr, rev->client, 16);
	to->sport = rev->vip_port;
	to->dport = rev->client_port;
	if (!pc->probe) {
		st = bpf_map_lookup_elem(&lb_service_stats, &rev->service);
		if (st)
			st->replies++;
	}
	if (nat_rewrite(p, to))
		return REASON_PASS_LB_ENCAP_FAILED;
	pc->flags |= PCTX_F_LB;
	return STAGE_TO_FIB;
}

static __always_inline int lb_stage(struct xdp_md *ctx, struct packet_ctx *pc)
{
	struct lb_conn_key k = {};
	struct lb_service *svc;
	struct lb_backend *be;
	struct lb_config *cfg;
	struct lb_stat *st;
	struct counter *bc;
	struct pkt p = {};
	__u32 zero = 0, hash, slot, grow, svc_slot;
	struct lb_conn *conn = NULL;
	int kind;
	int reason = pkt_restore(ctx, pc, &p);

	if (reason >= 0)
		return reason;
	kind = lb_flow_key(&p, &k);
	if (!kind) {
		if (k.family && (p.fragment || k.proto == IPPROTO_FRAGMENT) && (pc->lb_addr & LB_ADDR_VIP))
			return REASON_PASS_LB_FRAGMENT;
		return route_start(pc, !!p.ip4);
	}
	svc = pc->lb_addr & LB_ADDR_VIP ? lb_service_of(&k) : NULL;  /* a NAT source has no service */
	cfg = bpf_map_lookup_elem(&lb_config, &zero);
	if (!cfg)
		return route_start(pc, !!p.ip4);
	if (kind == LB_ICMP_ERROR && (!svc || (svc->flags & LB_SVC_F_NAT))) {
		if (svc)
			reason = lb_nat_icmp_forward(pc, &p, &k, svc);
		else if (cfg->nat_services)
			reason = lb_nat_icmp_back(pc, &p, &k);
		else
			reason = STAGE_NEXT;
		if (reason != STAGE_NEXT)
			return reason;
		return route_start(pc, !!p.ip4);    /* about no flow of ours */
	}
	if (!svc) {
		if (cfg->nat_services) {
			reason = lb_nat_reply(pc, &p, &k);
			if (reason != STAGE_NEXT)
				return reason;
		}
		return route_start(pc, !!p.ip4);
	}
	if (kind == LB_FLOW && lb_martian_source(&p, pc->iface_flags))
		return REASON_DROP_MARTIAN_SOURCE;
	/* a probe counts into slot 0, which no service has (a stack copy would
	 * take stack the inlined single program lacks) */
	svc_slot = pc->probe ? 0 : svc->id;
	st = bpf_map_lookup_elem(&lb_service_stats, &svc_slot);
	if (!st)
		return route_start(pc, !!p.ip4);
	hash = lb_flow_hash(&k);
	slot = lb_pick(!pc->probe && kind == LB_FLOW, &k, svc, cfg, st, hash, &conn);
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
	if (svc->flags & LB_SVC_F_NAT) {
		__be16 port = lb_nat_port(pc, &k, conn, be, svc->id, hash, st);

		if (!port)
			return REASON_DROP_LB_NAT_PORTS;
		return lb_nat_forward(pc, &p, &k, be, port);
	}
	grow = lb_encapsulate(ctx, &p, be, cfg, hash, svc->flags & LB_SVC_F_GUE);
	if (!grow)
		return REASON_PASS_LB_ENCAP_FAILED;
	/* pc->len stays the received frame's: the ingress counters count what came in */
	pc->l3_proto = be->family == 4 ? ETH_P_IP : ETH_P_IPV6;
	pc->l4_off = pc->l3_off + grow;
	pc->l4_proto = k.family == 4 ? IPPROTO_IPIP : IPPROTO_IPV6;
	pc->flags = PCTX_F_LB | PCTX_F_LB_ENCAP | PCTX_F_ORIGINATED;
	pc->lb_service = svc->id;
	return STAGE_TO_FIB;
}

#endif
