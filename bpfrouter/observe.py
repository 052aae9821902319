"""Read the data plane back: counters per interface and reason, and probe
decisions (`route get`) made by the live program on a crafted packet."""
from __future__ import annotations

import ctypes
import ipaddress
from dataclasses import dataclass

from .datapath import Datapath
from .datapath import layout as lo
from .nexthop import nexthop_of_value
from .packet import mac_str, udp_probe

Reason = lo.Reason

# What each reason means (docs/reasons.md has the same table).
REASON_TEXT: dict[Reason, str] = {
    Reason.FWD_IPV4: 'forwarded by XDP: MACs rewritten, TTL/hop limit decremented, redirected out of the egress port',
    Reason.FWD_IPV6: 'forwarded by XDP: MACs rewritten, TTL/hop limit decremented, redirected out of the egress port',
    Reason.PASS_ARP: 'ARP, for the kernel',
    Reason.PASS_ND: 'IPv6 neighbor discovery / router advertisement (ICMPv6 133-137)',
    Reason.PASS_NON_IP: 'another EtherType',
    Reason.PASS_VLAN: "802.1Q/802.1ad tagged: for the kernel's VLAN sub-interfaces",
    Reason.PASS_L2_MULTICAST: 'broadcast or multicast destination MAC',
    Reason.PASS_OTHERHOST: "destination MAC is not the port's (promiscuous receive); the kernel drops it",
    Reason.PASS_IP_OPTIONS: 'IPv4 options, which routers must process',
    Reason.PASS_IPV6_HOP_BY_HOP: 'IPv6 hop-by-hop header, which routers must process',
    Reason.PASS_L3_MULTICAST: 'multicast or limited-broadcast destination',
    Reason.PASS_LINK_LOCAL: 'IPv6 link-local source or destination: never forwarded',
    Reason.PASS_LOCAL: 'to the router itself (local table)',
    Reason.PASS_UNREACHABLE: 'route of that type: the kernel answers with ICMP',
    Reason.PASS_PROHIBIT: 'route of that type: the kernel answers with ICMP',
    Reason.PASS_FIB_MISS: 'no route (BPF FIB): the kernel answers',
    Reason.PASS_TTL_EXCEEDED: 'TTL or hop limit <= 1: the kernel sends time-exceeded',
    Reason.PASS_NO_NEIGH: "next hop's MAC unknown: the kernel resolves it; later packets take the fast path",
    Reason.PASS_FRAG_NEEDED: 'larger than the egress MTU: the kernel fragments or sends packet-too-big',
    Reason.PASS_MULTIPATH: ('multipath route the fast path cannot hold: more than 32 live paths, or a resilient '
                            'group whose buckets are not known yet'),
    Reason.PASS_EGRESS_UNMANAGED: 'egress port is not attached to this router',
    Reason.PASS_KERNEL_NOT_FWDED: '--fib kernel: bpf_fib_lookup says local delivery, no route, or forwarding disabled',
    Reason.PASS_UNKNOWN_IFACE: 'arrived on a port the router has no entry for',
    Reason.PASS_NEXTHOP_INVALID: 'route points at an empty next hop (a transient during updates)',
    Reason.PASS_STAGE_MISSING: 'the next stage of the data plane is not loaded (never once the router is up)',
    Reason.PASS_FORWARDING_OFF: ('forwarding is off for the ingress (IPv4 conf.<port>.forwarding; IPv6 '
                                 'conf.all.forwarding, or disable_ipv6): the kernel decides'),
    Reason.PASS_HAIRPIN: 'egress port is the ingress port: the kernel may send a redirect',
    Reason.PASS_LOCAL_SOURCE: ('source is a local or broadcast address of the router with rp_filter off: '
                               'the kernel decides'),
    Reason.PASS_SOURCE_UNVERIFIED: ('the source check needs what the fast path cannot evaluate (custom rules, '
                                    'VRF, a multipath route back with dead paths left out)'),
    Reason.PASS_ENCAP: 'route with encapsulation (mpls, ip, seg6, ...): only the kernel adds it',
    Reason.PASS_ROUTE_TYPE: 'route of a type the fast path does not implement (throw, nat, ...)',
    Reason.PASS_POLICY: 'rules or VRFs could route this port and family other than by main alone',
    Reason.PASS_TRIM_FAILED: ('bytes past the IP packet could not be cut (bpf_xdp_adjust_tail refused): '
                              'the kernel trims them'),
    Reason.PASS_LB_FRAGMENT: "a fragment to a service's VIP: no ports to pick a backend by, the kernel decides",
    Reason.PASS_LB_ENCAP_FAILED: ("the frame could not grow for the load balancer's outer header "
                                  "(bpf_xdp_adjust_head refused)"),
    Reason.DROP_BLACKHOLE: 'blackhole route',
    Reason.DROP_MARTIAN_SOURCE: ('martian source: multicast, limited broadcast, 0.0.0.0, 127/8 without '
                                 'route_localnet, a local or broadcast address with rp_filter on (IPv6: '
                                 'multicast, loopback, unspecified)'),
    Reason.DROP_MARTIAN_DEST: 'martian destination: 0.0.0.0, 127/8 without route_localnet (IPv6: loopback)',
    Reason.DROP_RPFILTER: ('reverse-path filter: no route back to the source (loose), or not through the '
                           'ingress port (strict)'),
    Reason.DROP_TRUNC_L2: 'frame shorter than its Ethernet/VLAN headers',
    Reason.DROP_TRUNC_L3: 'shorter than its IPv4/IPv6 header (options included)',
    Reason.DROP_BAD_IP_VERSION: 'version field does not match the EtherType',
    Reason.DROP_BAD_IHL: 'IPv4 header length below 5 words',
    Reason.DROP_BAD_TOTAL_LEN: 'IPv4 total length / IPv6 payload length inconsistent with header or frame',
    Reason.DROP_BAD_CHECKSUM: 'IPv4 header checksum wrong (RFC 1812 5.2.2; the kernel drops it in ip_rcv)',
    Reason.DROP_LB_NO_BACKEND: ("a service's packet and no backend takes new flows (all unhealthy, drained or "
                                "removed)"),
    Reason.DROP_LB_NAT_PORTS: "a NAT service's new flow found no free translated source port",
    Reason.DROP_LB_NAT_UNROUTED: ("translated to the router's own source, and the fast path cannot send it (no "
                                  "neighbor yet, over the MTU, ...): the router's kernel would drop it as a martian"),
    Reason.DROP_LB_ANSWER_FAILED: ("a service's packet over the MTU toward its backend, whose ICMP answer to the "
                                   "client could not be finished once the frame was reshaped"),
}
XDP_ACTIONS = {0: "aborted", 1: "drop", 2: "pass", 3: "tx", 4: "redirect"}


def read_counters(dp: Datapath, ifindex: int | None = None) -> dict[tuple[int, Reason], tuple[int, int]]:
    """(ingress ifindex, reason) -> (packets, bytes), summed over CPUs.
    Ingress 0 stands for packets on an interface the router does not know.
    With `ifindex`, only that interface's counters are read."""
    slot_to_ifindex = {v.slot: k.value for k, v in dp.ifaces.lookup_batch()}
    if ifindex is None:
        entries = dp.counters.lookup_batch()
    else:
        slot = next((s for s, i in slot_to_ifindex.items() if i == ifindex), 0)
        keys = [lo.u32(slot * lo.REASON_MAX + r) for r in range(lo.REASON_MAX)]
        entries = [(k, dp.counters.lookup(k)) for k in keys]
    out: dict[tuple[int, Reason], tuple[int, int]] = {}
    for k, per_cpu in entries:
        pk = sum(c.packets for c in per_cpu)
        if not pk:
            continue
        slot, reason = divmod(k.value, lo.REASON_MAX)
        if reason >= lo.REASON_MAX or (slot and slot not in slot_to_ifindex):
            continue
        out[(slot_to_ifindex.get(slot, 0), Reason(reason))] = (pk, sum(c.bytes for c in per_cpu))
    return out


def clear_slot(dp: Datapath, slot: int) -> None:
    zero = [lo.Counter() for _ in range(dp.counters.ncpus)]
    stride = (ctypes.sizeof(lo.Counter) + 7) & ~7
    buf = (ctypes.c_uint8 * (stride * len(zero)))()
    for r in range(lo.REASON_MAX):
        dp.counters.update(lo.u32(slot * lo.REASON_MAX + r), buf)  # type: ignore[arg-type]


@dataclass
class Decision:
    dst: str
    iif: int
    reason: Reason
    action: str
    route_type: str | None = None
    prefix: str | None = None
    proto: str | None = None
    nh_id: int = 0
    gateway: str | None = None
    egress_ifindex: int = 0
    neigh_found: bool = False
    smac: str | None = None
    dmac: str | None = None
    ttl_in: int = 64
    ttl_out: int | None = None
    ecmp: dict | None = None    # a multipath route's choice (ecmp_choice)
    rule: dict | None = None    # the rule the walk ended at (rule_choice)

    @property
    def verdict(self) -> str:
        return self.reason.verdict


def run_probe(dp: Datapath, frame: bytes, iif: int, mark: int = 0):
    """Run `frame`, arriving on `iif` with fwmark `mark`, through the live
    program with a probe header in the XDP metadata: the program reports its
    decision there and neither counts nor observes the packet. Returns
    (ProbeMeta, test-run result)."""
    meta = lo.ProbeMeta(magic=lo.PROBE_MAGIC, reason=0xFF, nh_id=mark)
    res = dp.program.test_run(frame, ingress_ifindex=iif, meta=bytes(meta))
    return lo.ProbeMeta.from_buffer_copy(res.meta.ljust(ctypes.sizeof(lo.ProbeMeta), b"\0")), res


def ecmp_choice(dp: Datapath, out: lo.ProbeMeta) -> dict | None:
    """What the ecmp stage chose for a probe of a multipath route: its group
    (from the nh_groups map), the flow's hash, the bucket or path taken."""
    if out.route_type != lo.RouteType.MULTIPATH or not out.magic or out.magic == lo.PROBE_MAGIC:
        return None
    g = dp.nh_groups.lookup(lo.u32(out.magic))
    if g is None or not g.count:
        return None
    members = list(g.nh[:g.count])
    choice: dict = {"group": out.magic, "type": "resilient" if g.flags & lo.NH_GROUP_F_RESILIENT else "hash-threshold",
                    "paths": g.count, "hash": f"0x{out.hash:08x}", "bucket": out.bucket, "buckets": g.buckets,
                    "path": members.index(out.nh_id) if out.nh_id in members else None}
    if g.kernel_id:
        choice["kernel_id"] = g.kernel_id
    return choice


def rule_choice(dp: Datapath, out: lo.ProbeMeta, family: int) -> dict | None:
    """The rule a probe's rule walk ended at (None: the family has no rules to
    walk), from the bank in use: its index, priority, action and table."""
    if not out.rule:
        return None
    if out.rule == lo.PROBE_RULE_NONE:
        return {"index": None, "priority": None, "action": "none decided", "table": None}
    fam6 = int(family == 6)
    bank = (dp.maps["rule_active"].lookup(lo.u32(fam6)) or lo.u32(0)).value & 1
    act = dp.maps["rule_actions"].lookup(lo.u32((bank * 2 + fam6) * lo.MAX_RULES + out.rule - 1))
    if act is None:
        return None
    kind = lo.RuleKind(act.kind).name.lower() if act.kind in lo.RuleKind._value2member_map_ else str(act.kind)
    return {"index": out.rule - 1, "priority": act.priority, "action": kind,
            "table": table_name(act.table) if act.kind == lo.RuleKind.LOOKUP else None}


def table_name(table: int) -> str:
    return {254: "main", 255: "local", 253: "default"}.get(table, str(table))


def rule_text(r: dict) -> str:
    """One line of the rule a walk ended at (rule_choice)."""
    if r["index"] is None:
        return "no rule decided (the tables the rules looked up had no route): unreachable"
    return f"rule {r['priority']} ({r['action']}" + (f" table {r['table']}" if r["table"] else "") + ")"


def ecmp_text(e: dict) -> str:
    """One line of what the ecmp stage chose (ecmp_choice)."""
    return (f"group {e['group']} ({e['type']}, {e['paths']} paths"
            + (f", kernel id {e['kernel_id']}" if e.get("kernel_id") else "")
            + f"): hash {e['hash']}, bucket {e['bucket']} of {e['buckets']} -> path {e['path']}")


def probe(dp: Datapath, dst, iif: int, iif_mac: bytes, src=None, ttl: int = 64, proto: int = 17,
          sport: int = 40000, dport: int = 33434, tos: int = 0, flowlabel: int = 0, mark: int = 0) -> Decision:
    """Run a UDP (or TCP) probe to `dst`, arriving on `iif`, through the live program."""
    dst = ipaddress.ip_address(dst)
    if src is None:
        src = ipaddress.ip_address("192.0.2.1" if dst.version == 4 else "2001:db8::1")
    frame = udp_probe(src, dst, iif_mac, ttl=ttl, proto=proto, sport=sport, dport=dport, tos=tos,
                      flowlabel=flowlabel)
    out, res = run_probe(dp, frame, iif, mark)
    d = Decision(str(dst), iif, Reason(out.reason), XDP_ACTIONS.get(res.retval, str(res.retval)),
                 ttl_in=ttl)
    if out.route_type:
        d.route_type = lo.RouteType(out.route_type).name.lower()
        if out.route_proto:  # BPF FIB mode: the matched entry is known
            d.prefix = str(ipaddress.ip_network(f"{dst}/{out.prefixlen}", strict=False))
            d.proto = lo.proto_name(out.route_proto)
    d.nh_id = out.nh_id
    if out.nh_id:
        v = dp.nexthops.lookup(lo.u32(out.nh_id))
        if v is not None and v.ifindex:
            gw = nexthop_of_value(v).gateway
            d.gateway = str(gw) if gw else None
    d.egress_ifindex = out.egress_ifindex
    d.neigh_found = bool(out.flags & lo.PROBE_F_NEIGH)
    d.ecmp = ecmp_choice(dp, out)
    d.rule = rule_choice(dp, out, dst.version)
    if d.verdict == "redirect" and len(res.data) >= 14:
        d.dmac, d.smac = mac_str(res.data[0:6]), mac_str(res.data[6:12])
        # the frame's own family: a service's outer header may be the other one
        d.ttl_out = res.data[22] if res.data[12:14] == b"\x08\x00" else res.data[21]
    return d
