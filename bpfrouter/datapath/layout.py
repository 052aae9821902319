"""Python mirrors of the data plane's map layouts and enums (bpf/include/*.h).

The C headers are the definition; `check_layouts` compares every mirror with
the BTF of the compiled object when it is loaded or opened, so a drift fails
loudly instead of corrupting state."""
from __future__ import annotations

import ctypes
import enum

from ..bpf import Btf

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64

MAX_IFACES = 256
MAX_NEXTHOPS = 65536
MAX_ECMP_PATHS = 32
MAX_NH_GROUPS = 4096
MAX_NH_BUCKETS = 1 << 20
NH_GROUP_F_PARTIAL, NH_GROUP_F_RESILIENT = 1, 2
PROBE_MAGIC = 0x4252504F
PROBE_F_NEIGH = 1
NEXTHOP_F_GATEWAY = 1
AF_INET, AF_INET6 = 2, 10


class Reason(enum.IntEnum):
    FWD_IPV4 = 0
    FWD_IPV6 = enum.auto()
    PASS_ARP = enum.auto()
    PASS_ND = enum.auto()
    PASS_NON_IP = enum.auto()
    PASS_VLAN = enum.auto()
    PASS_L2_MULTICAST = enum.auto()
    PASS_OTHERHOST = enum.auto()
    PASS_IP_OPTIONS = enum.auto()
    PASS_IPV6_HOP_BY_HOP = enum.auto()
    PASS_L3_MULTICAST = enum.auto()
    PASS_LINK_LOCAL = enum.auto()
    PASS_LOCAL = enum.auto()
    PASS_UNREACHABLE = enum.auto()
    PASS_PROHIBIT = enum.auto()
    PASS_FIB_MISS = enum.auto()
    PASS_TTL_EXCEEDED = enum.auto()
    PASS_NO_NEIGH = enum.auto()
    PASS_FRAG_NEEDED = enum.auto()
    PASS_MULTIPATH = enum.auto()
    PASS_EGRESS_UNMANAGED = enum.auto()
    PASS_KERNEL_NOT_FWDED = enum.auto()
    PASS_UNKNOWN_IFACE = enum.auto()
    PASS_NEXTHOP_INVALID = enum.auto()
    PASS_STAGE_MISSING = enum.auto()
    PASS_FORWARDING_OFF = enum.auto()
    PASS_HAIRPIN = enum.auto()
    PASS_LOCAL_SOURCE = enum.auto()
    PASS_SOURCE_UNVERIFIED = enum.auto()
    PASS_ENCAP = enum.auto()
    PASS_ROUTE_TYPE = enum.auto()
    PASS_POLICY = enum.auto()
    PASS_TRIM_FAILED = enum.auto()
    PASS_LB_FRAGMENT = enum.auto()
    PASS_LB_ENCAP_FAILED = enum.auto()
    DROP_BLACKHOLE = enum.auto()
    DROP_MARTIAN_SOURCE = enum.auto()
    DROP_MARTIAN_DEST = enum.auto()
    DROP_RPFILTER = enum.auto()
    DROP_TRUNC_L2 = enum.auto()
    DROP_TRUNC_L3 = enum.auto()
    DROP_BAD_IP_VERSION = enum.auto()
    DROP_BAD_IHL = enum.auto()
    DROP_BAD_TOTAL_LEN = enum.auto()
    DROP_BAD_CHECKSUM = enum.auto()
    DROP_LB_NO_BACKEND = enum.auto()
    DROP_LB_NAT_PORTS = enum.auto()
    DROP_LB_NAT_UNROUTED = enum.auto()
    DROP_LB_ANSWER_FAILED = enum.auto()

    @property
    def verdict(self) -> str:
        if self <= Reason.FWD_IPV6:
            return "redirect"
        return "drop" if self >= Reason.DROP_BLACKHOLE else "pass"

    @property
    def label(self) -> str:
        """The reason without its verdict prefix, e.g. 'no_neigh'."""
        return self.name.split("_", 1)[1].lower()


REASON_MAX = len(Reason)


class RouteType(enum.IntEnum):
    NONE = 0
    UNICAST = 1
    LOCAL = 2
    BLACKHOLE = 3
    UNREACHABLE = 4
    PROHIBIT = 5
    MULTIPATH = 6
    KERNEL = 7  # only the kernel can route it; the entry's nh_id holds the reason


KERNEL_ROUTE_REASON_MASK = 0xFF
IFACE_F_PASS_POLICY4, IFACE_F_PASS_POLICY6 = 0x4000, 0x8000
IFACE_F_RULES4, IFACE_F_RULES6 = 0x1000, 0x2000  # the family's rules are walked
IFACE_F_LB4, IFACE_F_LB6 = 0x100, 0x200  # the family has services (the lb stage)


# rtm_protocol values: who installed a route (iproute2's rt_protos).
RTPROT_BPFROUTER = 250
PROTO_NAMES = {0: "unspec", 1: "redirect", 2: "kernel", 3: "boot", 4: "static", 8: "gated", 9: "ra",
               10: "mrt", 11: "zebra", 12: "bird", 13: "dnrouted", 14: "xorp", 15: "ntk", 16: "dhcp",
               17: "keepalived", 18: "babel", 42: "openr", 99: "openr", 186: "bgp", 187: "isis",
               188: "ospf", 189: "rip", 192: "eigrp", RTPROT_BPFROUTER: "bpfrouter"}


def proto_name(proto: int) -> str:
    return PROTO_NAMES.get(proto, str(proto))


class FibMode(enum.IntEnum):
    BPF = 0
    KERNEL = 1


class FibImpl(enum.IntEnum):
    DIR = 0
    LPM = 1


DIR_ROOT_BITS = 24
DIR_CHUNK = 16
DIR_EXT = 0x80000000
DIR_TYPE_SHIFT = 28
DIR_NH_MASK = 0x0FFFFFFF
DIR_GROUPS_V4 = 16384
DIR_TOP_BITS = 16
DIR_BLOCK_BYTES_V4 = 32 << 20
DIR_BLOCK_SLACK = 64
DIR_BLOCK_HEAD = 36
DIR_TOP_RAW = 0x40000000
DIR_RUN_IDS = 256
H6_MAX_LEVELS = 16
H6_BUCKETS = 1 << 19
H6_SLOTS = 5


class Iface(ctypes.Structure):
    _fields_ = [("slot", u32), ("mtu", u32), ("mac", u8 * 6), ("flags", u16), ("group", u32)]


class Counter(ctypes.Structure):
    _fields_ = [("packets", u64), ("bytes", u64)]


class NeighKey(ctypes.Structure):
    _fields_ = [("ifindex", u32), ("family", u32), ("addr", u8 * 16)]


class Neigh(ctypes.Structure):
    _fields_ = [("mac", u8 * 6), ("state", u16), ("used", u32)]


class Route4Key(ctypes.Structure):
    _fields_ = [("prefixlen", u32), ("addr", u8 * 4)]


class Route6Key(ctypes.Structure):
    _fields_ = [("prefixlen", u32), ("addr", u8 * 16)]


class RouteValue(ctypes.Structure):
    _fields_ = [("nh_id", u32), ("type", u8), ("prefixlen", u8), ("proto", u8), ("flags", u8)]


class NexthopValue(ctypes.Structure):
    _fields_ = [("ifindex", u32), ("family", u8), ("flags", u8), ("reserved", u16), ("gw", u8 * 16)]


class NhGroup(ctypes.Structure):
    _fields_ = [("count", u16), ("buckets", u16), ("bucket_base", u32), ("kernel_id", u32), ("flags", u32),
                ("nh", u32 * MAX_ECMP_PATHS)]


class EcmpHashConfig(ctypes.Structure):
    _fields_ = [("fields", u32 * 2), ("seed", u32), ("reserved", u32)]


class DirChunk(ctypes.Structure):
    _fields_ = [("e", u32 * DIR_CHUNK)]


class DirGroup(ctypes.Structure):
    _fields_ = [("e", u32 * 256)]


class DirLeaf4(ctypes.Structure):
    _fields_ = [("r", RouteValue), ("addr", u8 * 4), ("reserved", u32)]


class DirLeaf6(ctypes.Structure):
    _fields_ = [("r", RouteValue), ("addr", u8 * 16)]


class H6Bucket(ctypes.Structure):
    _fields_ = [("key", u64 * H6_SLOTS), ("entry", u32 * H6_SLOTS), ("reserved", u32)]


class H6Leaves(ctypes.Structure):
    _fields_ = [("leaf", u32 * H6_SLOTS), ("reserved", u32)]


class H6Level(ctypes.Structure):
    _fields_ = [("mask_hi", u64), ("mask_lo", u64), ("first", u32), ("nbuckets", u32), ("len", u32),
                ("wide", u32)]


class H6Conf(ctypes.Structure):
    _fields_ = [("nlevels", u32), ("reserved", u32), ("lv", H6Level * H6_MAX_LEVELS)]


class ProbeMeta(ctypes.Structure):
    _fields_ = [("magic", u32), ("nh_id", u32), ("egress_ifindex", u32), ("hash", u32),
                ("reason", u8), ("route_type", u8), ("prefixlen", u8), ("route_proto", u8), ("flags", u8),
                ("reserved", u8), ("bucket", u16),
                ("l3_off", u16), ("l4_off", u16), ("rule", u16), ("l4_proto", u8), ("vlan_depth", u8)]


PROBE_RULE_NONE = 0xFFFF  # ProbeMeta.rule: the rules were walked and none matched

# Policy routing (bpf/include/rules.h, tables.h)
MAX_RULES = 1024
RULE_WORDS = MAX_RULES // 64
MAX_RULE_VECTORS = 4096
MAX_RULE_MASKS = 4
RULE_PORT_SLOTS = 2048
RULE_ACTIVE_ON = 2
RULE_A_SUPPRESS_IFGROUP = 1


class RuleKind(enum.IntEnum):
    LOOKUP = 1
    GOTO = 2
    BLACKHOLE = 6
    UNREACHABLE = 7
    PROHIBIT = 8
    PASS = 255


class RuleField(enum.IntFlag):
    SRC = 1
    DST = 2
    IIF = 4
    PROTO = 8
    TOS = 16
    MARK = 32
    SPORT = 64
    DPORT = 128


class RuleAction(ctypes.Structure):
    _fields_ = [("kind", u8), ("flags", u8), ("suppress_prefixlen", u8), ("reserved", u8), ("table", u32),
                ("target", u32), ("ifgroup", u32), ("priority", u32)]


class RuleSet(ctypes.Structure):
    _fields_ = [("count", u32), ("fields", u32), ("all", u32), ("invert", u32), ("miss", u32 * 8),
                ("mask", u32 * MAX_RULE_MASKS), ("mask_miss", u32 * MAX_RULE_MASKS), ("nmasks", u32),
                ("nbounds", u32 * 2)]


class RuleVector(ctypes.Structure):
    _fields_ = [("w", ctypes.c_uint64 * RULE_WORDS)]


class RulePrefixKey(ctypes.Structure):
    _fields_ = [("prefixlen", u32), ("bank", u8), ("family", u8), ("field", u8), ("reserved", u8),
                ("addr", u8 * 16)]


class RuleU32Key(ctypes.Structure):
    _fields_ = [("value", u32), ("bank", u8), ("family", u8), ("field", u8), ("reserved", u8)]


class RuleBound(ctypes.Structure):
    _fields_ = [("lo", u32), ("vector", u32)]


class Table4Key(ctypes.Structure):
    _fields_ = [("prefixlen", u32), ("table", u8 * 4), ("addr", u8 * 4)]


class Table6Key(ctypes.Structure):
    _fields_ = [("prefixlen", u32), ("table", u8 * 4), ("addr", u8 * 16)]


# The load balancer (bpf/include/lb.h).
MAX_LB_SERVICES = 1024
MAX_LB_BACKENDS = 65536
MAX_LB_RING = 1 << 22
LB_HASH_SEED = 0x62706672
LB_SVC_F_NO_AFFINITY = 1
LB_SVC_F_NAT = 2
LB_SVC_F_GUE = 4
LB_ADDR_VIP = 1
LB_ADDR_NAT_SOURCE = 2
LB_BE_F_CONNS = 1


class LbServiceKey(ctypes.Structure):
    _fields_ = [("addr", u8 * 16), ("port", u16), ("proto", u8), ("family", u8)]  # port: network order


class LbService(ctypes.Structure):
    _fields_ = [("id", u32), ("ring_base", u32), ("ring_size", u32), ("flags", u32)]


class LbVipKey(ctypes.Structure):
    _fields_ = [("addr", u8 * 16), ("family", u32)]


class LbBackend(ctypes.Structure):
    _fields_ = [("addr", u8 * 16), ("family", u8), ("flags", u8), ("reserved", u16), ("service", u32),
                ("gen", u32), ("nat_src", u8 * 16)]


class LbConnKey(ctypes.Structure):
    _fields_ = [("saddr", u8 * 16), ("daddr", u8 * 16), ("sport", u16), ("dport", u16), ("proto", u8),
                ("family", u8), ("reserved", u16)]


class LbConn(ctypes.Structure):
    _fields_ = [("backend", u32), ("gen", u32), ("nat_port", u16), ("reserved", u16)]


class LbNatKey(ctypes.Structure):
    _fields_ = [("backend", u8 * 16), ("nat_src", u8 * 16), ("backend_port", u16), ("nat_port", u16),
                ("proto", u8), ("family", u8), ("reserved", u16)]


class LbNat(ctypes.Structure):
    _fields_ = [("client", u8 * 16), ("vip", u8 * 16), ("client_port", u16), ("vip_port", u16), ("service", u32)]


class LbConfig(ctypes.Structure):
    _fields_ = [("src4", u8 * 4), ("src4_hostmask", u8 * 4), ("src6", u8 * 16), ("new_conn_limit", u32),
                ("nat_services", u32), ("gue_port", u8 * 2), ("reserved", u16)]


class LbStat(ctypes.Structure):
    _fields_ = [("packets", u64), ("bytes", u64), ("new_flows", u64), ("unlearned", u64), ("no_backend", u64),
                ("flood_windows", u64), ("replies", u64), ("nat_port_busy", u64),
                ("too_big", u64)]


class ObsStat(enum.IntEnum):
    EVENTS_SENT = 0
    EVENTS_SUPPRESSED = enum.auto()
    EVENTS_LOST = enum.auto()
    FLOWS_CREATED = enum.auto()
    FLOWS_FAILED = enum.auto()
    CAPTURED = enum.auto()
    CAPTURE_LOST = enum.auto()


OBS_F_EVENTS, OBS_F_FLOWS, OBS_F_CAPTURE = 1, 2, 4
OBSERVERS = {"events": OBS_F_EVENTS, "flows": OBS_F_FLOWS, "capture": OBS_F_CAPTURE}  # `up --observers` names
CAPTURE_MAX = 2048


class Event(ctypes.Structure):
    _fields_ = [("ts_ns", u64), ("ifindex", u32), ("len", u32), ("reason", u32), ("action", u32),
                ("nh_id", u32), ("egress_ifindex", u32), ("vlan_id", u16), ("l3_proto", u16),
                ("family", u8), ("l4_proto", u8), ("ttl", u8), ("tcp_flags", u8), ("route_type", u8),
                ("prefixlen", u8), ("route_proto", u8), ("vlan_depth", u8), ("src_mac", u8 * 6),
                ("dst_mac", u8 * 6), ("saddr", u8 * 16), ("daddr", u8 * 16), ("sport", u16), ("dport", u16),
                ("xmit_outcome", u16), ("reserved", u16)]


class EventWindow(ctypes.Structure):
    _fields_ = [("start_jiffies", u64), ("sent", u64)]


class FlowKey(ctypes.Structure):
    _fields_ = [("saddr", u8 * 16), ("daddr", u8 * 16), ("sport", u16), ("dport", u16), ("vlan_id", u16),
                ("l4_proto", u8), ("family", u8)]


class Flow(ctypes.Structure):
    _fields_ = [("packets", u64), ("bytes", u64), ("first_jiffies", u64), ("last_jiffies", u64), ("ifindex", u32),
                ("egress_ifindex", u32), ("reason", u16), ("action", u8), ("tcp_flags", u8), ("reserved", u32)]


class FlowSlot(ctypes.Structure):
    _fields_ = [("key", FlowKey), ("delta", Flow)]


class CaptureCfg(ctypes.Structure):
    _fields_ = [("active", u32), ("ifindex", u32), ("actions", u32), ("snaplen", u32), ("expires_ns", u64)]


class CaptureRec(ctypes.Structure):
    _fields_ = [("ts_ns", u64), ("ifindex", u32), ("len", u32), ("caplen", u32), ("reason", u32),
                ("action", u32), ("egress_ifindex", u32), ("data", u8 * CAPTURE_MAX)]


class Nothing(ctypes.Structure):
    """Key and value of maps that have none (ring buffers)."""
    _fields_ = []


# C struct name -> Python mirror; C field names equal Python field names.
STRUCTS: dict[str, type[ctypes.Structure]] = {
    "iface": Iface,
    "counter": Counter,
    "neigh_key": NeighKey,
    "neigh": Neigh,
    "route4_key": Route4Key,
    "route6_key": Route6Key,
    "route": RouteValue,
    "nexthop": NexthopValue,
    "nh_group": NhGroup,
    "ecmp_hash_config": EcmpHashConfig,
    "probe_meta": ProbeMeta,
    "rule_action": RuleAction,
    "rule_set": RuleSet,
    "rule_vector": RuleVector,
    "rule_prefix_key": RulePrefixKey,
    "rule_u32_key": RuleU32Key,
    "rule_bound": RuleBound,
    "lb_service_key": LbServiceKey,
    "lb_service": LbService,
    "lb_vip_key": LbVipKey,
    "lb_backend": LbBackend,
    "lb_conn_key": LbConnKey,
    "lb_conn": LbConn,
    "lb_nat_key": LbNatKey,
    "lb_nat": LbNat,
    "lb_config": LbConfig,
    "lb_stat": LbStat,
    "table4_key": Table4Key,
    "table6_key": Table6Key,
    "dir_chunk": DirChunk,
    "dir_group": DirGroup,
    "dir_leaf4": DirLeaf4,
    "dir_leaf6": DirLeaf6,
    "h6_bucket": H6Bucket,
    "h6_leaves": H6Leaves,
    "h6_level": H6Level,
    "h6_conf": H6Conf,
    "event": Event,
    "event_window": EventWindow,
    "flow_key": FlowKey,
    "flow": Flow,
    "flow_slot": FlowSlot,
    "capture_cfg": CaptureCfg,
    "capture_rec": CaptureRec,
}

# C enum name -> (Python enum, prefix of the C constants)
ENUMS: dict[str, tuple[type[enum.IntEnum], str]] = {
    "reason": (Reason, "REASON_"),
    "route_type": (RouteType, "RTYPE_"),
    "fib_impl": (FibImpl, "FIB_IMPL_"),
    "obs_stat": (ObsStat, "OBS_"),
}


ENUM_SENTINELS = {"reason": "REASON_MAX", "obs_stat": "OBS_STAT_MAX"}


class LayoutMismatch(Exception):
    """The Python mirrors disagree with the compiled data plane."""


def check_layouts(object_path: str) -> None:
    problems: list[str] = []
    with Btf(object_path) as btf:
        for cname, py in STRUCTS.items():
            try:
                size, members = btf.struct(cname)
            except KeyError:
                problems.append(f"struct {cname} missing from BTF")
                continue
            if size != ctypes.sizeof(py):
                problems.append(f"struct {cname}: {size} bytes in C, {ctypes.sizeof(py)} in Python")
            py_fields = {name: getattr(py, name) for name, *_ in py._fields_}
            c_names = [m.name for m in members]
            if c_names != list(py_fields):
                problems.append(f"struct {cname}: fields {c_names} in C, {list(py_fields)} in Python")
                continue
            for m in members:
                f = py_fields[m.name]
                if f.offset != m.offset or f.size != m.size:
                    problems.append(f"struct {cname}.{m.name}: offset/size {m.offset}/{m.size} in C, "
                                    f"{f.offset}/{f.size} in Python")
        for cname, (py, prefix) in ENUMS.items():
            try:
                values = btf.enum(cname)
            except KeyError:
                problems.append(f"enum {cname} missing from BTF")
                continue
            want = {prefix + m.name: m.value for m in py}
            if cname in ENUM_SENTINELS:  # the C enum's count, e.g. REASON_MAX
                want[ENUM_SENTINELS[cname]] = len(py)
            if values != want:
                diff = set(values.items()) ^ set(want.items())
                problems.append(f"enum {cname} differs: {sorted(diff)[:4]}")
    if problems:
        raise LayoutMismatch(f"data plane layout mismatch in {object_path}: " + "; ".join(problems))
