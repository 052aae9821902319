"""The kernel's routing policy database (`ip rule`): its rules as the kernel
dumps them, and their compilation into the fast path's classifier
(bpf/include/rules.h).

A forwarded packet meets fib_rules_lookup with what ip_route_input_slow
and ip6_route_input put in its flow: the input port, the addresses, the
DS field, the skb mark (0 for a packet XDP sees: nothing has marked it
yet), uid 0, no output interface, no tunnel id, and the flow dissector's
protocol and ports once any rule selects on them. Selectors that compare
against a value every forwarded packet has the same way (oif, tun_id,
uidrange) are decided here, once; the others become per-field bit vectors.

A family's rule set is walked in the fast path when it starts with the
unconditional `lookup local` rule (the local and main tables are one image
there, looked up in that order) and uses only what the classifier knows;
otherwise its ports pass that family's packets to the kernel, with the
reason (PASS_POLICY), as before rules were in the fast path."""
from __future__ import annotations

import ipaddress
import os
import socket
import struct
from dataclasses import dataclass, field

from ..datapath import layout as lo

AF_INET, AF_INET6 = socket.AF_INET, socket.AF_INET6
TABLE_UNSPEC, TABLE_DEFAULT, TABLE_MAIN, TABLE_LOCAL = 0, 253, 254, 255
FR_ACT_TO_TBL, FR_ACT_GOTO, FR_ACT_NOP = 1, 2, 3
FR_ACT_BLACKHOLE, FR_ACT_UNREACHABLE, FR_ACT_PROHIBIT = 6, 7, 8
FIB_RULE_INVERT, FIB_RULE_UNRESOLVED = 0x2, 0x4
ACTION_NAMES = {FR_ACT_TO_TBL: "lookup", FR_ACT_GOTO: "goto", FR_ACT_NOP: "nop", FR_ACT_BLACKHOLE: "blackhole",
                FR_ACT_UNREACHABLE: "unreachable", FR_ACT_PROHIBIT: "prohibit"}
NONE32 = 0xFFFFFFFF
PORT_PROTOCOLS = {6, 17, 33, 132, 136}  # TCP UDP DCCP SCTP UDP-Lite: the flow dissector's ports
# the kernel's default rules: no rule walk is needed to follow them
DEFAULTS = {AF_INET: [(0, TABLE_LOCAL), (32766, TABLE_MAIN), (32767, TABLE_DEFAULT)],
            AF_INET6: [(0, TABLE_LOCAL), (32766, TABLE_MAIN)]}

# fib_rule_hdr and the FRA_* attributes (include/uapi/linux/fib_rules.h)
_hdr = struct.Struct("=BBBBBBBBI")
FRA_DST, FRA_SRC, FRA_IIFNAME, FRA_GOTO, FRA_PRIORITY = 1, 2, 3, 4, 6
FRA_FWMARK, FRA_FLOW, FRA_TUN_ID, FRA_SUPPRESS_IFGROUP, FRA_SUPPRESS_PREFIXLEN = 10, 11, 12, 13, 14
FRA_TABLE, FRA_FWMASK, FRA_OIFNAME, FRA_PAD, FRA_L3MDEV, FRA_UID_RANGE = 15, 16, 17, 18, 19, 20
FRA_PROTOCOL, FRA_IP_PROTO, FRA_SPORT_RANGE, FRA_DPORT_RANGE = 21, 22, 23, 24
FRA_DSCP, FRA_FLOWLABEL, FRA_FLOWLABEL_MASK, FRA_SPORT_MASK, FRA_DPORT_MASK, FRA_DSCP_MASK = 25, 26, 27, 28, 29, 30


@dataclass(frozen=True)
class Rule:
    """One kernel rule, in the kernel's words."""
    family: int
    priority: int
    action: int
    table: int = 0
    src: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    dst: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    tos: int = 0                    # the legacy tos selector (rtm tos byte)
    iif: str | None = None
    oif: str | None = None
    mark: int | None = None
    mask: int = NONE32
    ipproto: int = 0
    sport: tuple[int, int] | None = None
    dport: tuple[int, int] | None = None
    uid: tuple[int, int] | None = None
    tun_id: int = 0
    l3mdev: bool = False
    invert: bool = False
    goto: int | None = None         # the target priority
    unresolved: bool = False
    suppress_prefixlen: int = -1
    suppress_ifgroup: int = -1
    unknown: tuple[str, ...] = ()   # selectors the classifier does not know
    dscp: int | None = None         # bpfrouter's own selector: the exact DSCP (0..63)
    own: bool = False               # a rule of bpfrouter's own: in the fast path only
    protocol: int = 0               # who added it (FRA_PROTOCOL)

    @property
    def is_plain_lookup(self) -> bool:
        """`lookup T` with no selector, suppression or inversion."""
        return (self.action == FR_ACT_TO_TBL and not self.invert and self.selectors() == []
                and self.suppress_prefixlen < 0 and self.suppress_ifgroup < 0)

    def selectors(self) -> list[str]:
        words = []
        if self.src is not None:
            words += ["from", str(self.src)]
        if self.dst is not None:
            words += ["to", str(self.dst)]
        if self.tos:
            words += ["tos", f"0x{self.tos:02x}"]
        if self.dscp is not None:
            words += ["dscp", str(self.dscp)]
        if self.mark is not None:
            words += ["fwmark", f"0x{self.mark:x}" + (f"/0x{self.mask:x}" if self.mask != NONE32 else "")]
        if self.iif:
            words += ["iif", self.iif]
        if self.oif:
            words += ["oif", self.oif]
        if self.l3mdev:
            words += ["l3mdev"]
        if self.uid is not None:
            words += ["uidrange", f"{self.uid[0]}-{self.uid[1]}"]
        if self.ipproto:
            words += ["ipproto", str(self.ipproto)]
        for name, rng in (("sport", self.sport), ("dport", self.dport)):
            if rng is not None:
                words += [name, str(rng[0]) if rng[0] == rng[1] else f"{rng[0]}-{rng[1]}"]
        if self.tun_id:
            words += ["tun_id", str(self.tun_id)]
        return words + list(self.unknown)

    def text(self) -> str:
        """As `ip rule show` writes it (and `bpfrouter rule add` takes it)."""
        words = (["not"] if self.invert else []) + (self.selectors() or ["from", "all"])
        if self.action == FR_ACT_TO_TBL:
            words += ["lookup", table_name(self.table)]
        elif self.action == FR_ACT_GOTO:
            words += ["goto", str(self.goto)] + (["[unresolved]"] if self.unresolved else [])
        else:
            words += [ACTION_NAMES.get(self.action, f"action {self.action}")]
        if self.suppress_prefixlen >= 0:
            words += ["suppress_prefixlength", str(self.suppress_prefixlen)]
        if self.suppress_ifgroup >= 0:
            words += ["suppress_ifgroup", str(self.suppress_ifgroup)]
        return " ".join(words)


def table_name(table: int) -> str:
    return {TABLE_MAIN: "main", TABLE_LOCAL: "local", TABLE_DEFAULT: "default"}.get(table, str(table))


def rule_from_bytes(buf: bytes) -> Rule:
    """A rule from an RTM_NEWRULE message's body (fib_rule_hdr and attributes)."""
    family, dst_len, src_len, tos, table, _, _, action, flags = _hdr.unpack_from(buf, 0)
    kw: dict = {}
    unknown: list[str] = []
    pos = _hdr.size
    addr_len = 4 if family == AF_INET else 16
    net = ipaddress.IPv4Network if family == AF_INET else ipaddress.IPv6Network
    while pos + 4 <= len(buf):
        alen, atype = struct.unpack_from("=HH", buf, pos)
        if alen < 4:
            break
        v = buf[pos + 4:pos + alen]
        pos += (alen + 3) & ~3
        atype &= 0x3FFF
        u32 = struct.unpack_from("=I", v)[0] if len(v) >= 4 else None
        if atype == FRA_SRC:
            kw["src"] = net((int.from_bytes(v[:addr_len], "big"), src_len))
        elif atype == FRA_DST:
            kw["dst"] = net((int.from_bytes(v[:addr_len], "big"), dst_len))
        elif atype == FRA_IIFNAME:
            kw["iif"] = v.rstrip(b"\0").decode()
        elif atype == FRA_OIFNAME:
            kw["oif"] = v.rstrip(b"\0").decode()
        elif atype == FRA_PRIORITY:
            kw["priority"] = u32
        elif atype == FRA_TABLE:
            table = u32
        elif atype == FRA_GOTO:
            kw["goto"] = u32
        elif atype == FRA_FWMARK:
            kw["mark"] = u32
        elif atype == FRA_FWMASK:
            kw["mask"] = u32
        elif atype == FRA_SUPPRESS_PREFIXLEN:
            kw["suppress_prefixlen"] = -1 if u32 == NONE32 else u32
        elif atype == FRA_SUPPRESS_IFGROUP:
            kw["suppress_ifgroup"] = -1 if u32 == NONE32 else u32
        elif atype == FRA_L3MDEV:
            kw["l3mdev"] = bool(v[0])
        elif atype == FRA_UID_RANGE:
            kw["uid"] = struct.unpack_from("=II", v)
        elif atype == FRA_IP_PROTO:
            kw["ipproto"] = v[0]
        elif atype in (FRA_SPORT_RANGE, FRA_DPORT_RANGE):
            kw["sport" if atype == FRA_SPORT_RANGE else "dport"] = struct.unpack_from("=HH", v)
        elif atype == FRA_TUN_ID:
            kw["tun_id"] = struct.unpack_from(">Q", v)[0]
        elif atype in (FRA_SPORT_MASK, FRA_DPORT_MASK):
            if struct.unpack_from("=H", v)[0] != 0xFFFF:  # a single port has this mask
                unknown.append(f"{'sport' if atype == FRA_SPORT_MASK else 'dport'} mask")
        elif atype == FRA_PROTOCOL:
            kw["protocol"] = v[0]
        elif atype in (FRA_PAD, FRA_FLOW):
            pass  # padding; a realm (tclassid), which selects nothing
        else:
            unknown.append({FRA_DSCP: "dscp", FRA_DSCP_MASK: "dscp mask", FRA_FLOWLABEL: "flowlabel",
                            FRA_FLOWLABEL_MASK: "flowlabel mask"}.get(atype, f"attribute {atype}"))
    if "mark" not in kw and "mask" in kw:
        kw["mark"] = 0
    return Rule(family, kw.pop("priority", 0), action, table, tos=tos, invert=bool(flags & FIB_RULE_INVERT),
                unresolved=bool(flags & FIB_RULE_UNRESOLVED), unknown=tuple(unknown), **kw)


def dump_rules(family: int) -> list[Rule]:
    """The current namespace's rules of one family, in the kernel's order."""
    RTM_NEWRULE, RTM_GETRULE, NLM_F_REQUEST, NLM_F_DUMP, NLMSG_DONE, NLMSG_ERROR = 32, 34, 1, 0x300, 3, 2
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0) as s:
        s.bind((0, 0))
        body = _hdr.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)
        s.send(struct.pack("=IHHII", 16 + len(body), RTM_GETRULE, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + body)
        rules: list[Rule] = []
        while True:
            data = s.recv(1 << 20)
            off = 0
            while off + 16 <= len(data):
                length, mtype, _, _, _ = struct.unpack_from("=IHHII", data, off)
                if mtype == NLMSG_DONE:
                    return rules
                if mtype == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", data, off + 16)[0]
                    if code:
                        raise OSError(code, f"rule dump: {os.strerror(code)}")
                elif mtype == RTM_NEWRULE:
                    rules.append(rule_from_bytes(data[off + 16:off + length]))
                off += (length + 3) & ~3


def merge_own(kernel: list[Rule], own: list[Rule]) -> list[Rule]:
    """The kernel's rules with bpfrouter's own among them by priority (after
    the kernel's of the same priority, as the kernel adds a rule after those)."""
    out = list(kernel)
    for r in sorted(own, key=lambda r: r.priority):
        at = next((i for i, k in enumerate(out) if k.priority > r.priority), len(out))
        out.insert(at, r)
    return out


OWN_ACTIONS = {"blackhole": FR_ACT_BLACKHOLE, "unreachable": FR_ACT_UNREACHABLE, "prohibit": FR_ACT_PROHIBIT}


class RuleSyntaxError(ValueError):
    """One line telling the user what is wrong with the rule's words."""


def parse_own_rule(words: list[str], family: int | None = None) -> Rule:
    """A rule of bpfrouter's own from `ip rule` words plus `dscp N`: pref,
    from, to, tos, dscp, fwmark, iif, ipproto, sport, dport, not; lookup
    (table), blackhole, unreachable, prohibit."""
    kw: dict = {}
    action, table = FR_ACT_TO_TBL, TABLE_MAIN
    i = 0

    def value() -> str:
        if i + 1 >= len(words):
            raise RuleSyntaxError(f"{words[i]!r} needs a value")
        return words[i + 1]

    def number(text: str, top: int, what: str) -> int:
        try:
            n = int(text, 0)
        except ValueError:
            n = -1
        if not 0 <= n <= top:
            raise RuleSyntaxError(f"invalid {what} {text!r}: expected 0..{top}")
        return n

    def port_range(text: str, what: str) -> tuple[int, int]:
        lo_, _, hi = text.partition("-")
        rng = (number(lo_, 65535, what), number(hi or lo_, 65535, what))
        if rng[0] > rng[1]:
            raise RuleSyntaxError(f"invalid {what} {text!r}: the range is empty")
        return rng

    while i < len(words):
        w = words[i]
        if w == "not":
            kw["invert"] = True
            i += 1
            continue
        if w in OWN_ACTIONS:
            action = OWN_ACTIONS[w]
            i += 1
            continue
        v = value()
        if w in ("pref", "priority", "preference", "order"):
            kw["priority"] = number(v, 0xFFFFFFFF, "priority")
        elif w in ("from", "to"):
            if v != "all":
                try:
                    net = ipaddress.ip_network(v, strict=False)
                except ValueError:
                    raise RuleSyntaxError(f"invalid prefix {v!r}") from None
                if family is not None and net.version != (4 if family == AF_INET else 6):
                    raise RuleSyntaxError(f"{v} is not of the rule's family")
                family = AF_INET if net.version == 4 else AF_INET6
                kw["src" if w == "from" else "dst"] = net
        elif w in ("tos", "dsfield"):
            kw["tos"] = number(v, 255, "tos")
        elif w == "dscp":
            kw["dscp"] = number(v, 63, "dscp")
        elif w == "fwmark":
            mark, _, mask = v.partition("/")
            kw["mark"] = number(mark, 0xFFFFFFFF, "fwmark")
            kw["mask"] = number(mask, 0xFFFFFFFF, "fwmark mask") if mask else NONE32
        elif w in ("iif", "dev"):
            kw["iif"] = v
        elif w == "ipproto":
            kw["ipproto"] = {"tcp": 6, "udp": 17, "icmp": 1, "ipv6-icmp": 58}.get(v) or number(v, 255, "ipproto")
        elif w in ("sport", "dport"):
            kw[w] = port_range(v, w)
        elif w in ("lookup", "table"):
            table = {"main": TABLE_MAIN, "local": TABLE_LOCAL, "default": TABLE_DEFAULT}.get(v) \
                or number(v, 0xFFFFFFFF, "table")
            if not table:
                raise RuleSyntaxError("invalid table '0': expected main, local, default or 1..4294967295")
        else:
            raise RuleSyntaxError(f"unexpected {w!r}: expected pref, from, to, tos, dscp, fwmark, iif, ipproto, "
                                  "sport, dport, lookup, blackhole, unreachable or prohibit")
        i += 2
    if "priority" not in kw:
        raise RuleSyntaxError("a rule of bpfrouter's own needs `pref N`")
    if not kw["priority"]:
        raise RuleSyntaxError("pref 0 is the local table's: pick 1 or more")
    return Rule(family or AF_INET, kw.pop("priority"), action, table if action == FR_ACT_TO_TBL else 0,
                own=True, **kw)


@dataclass(frozen=True)
class Port:
    ifindex: int
    name: str
    master: str | None  # the name of its master device, if it has one


def tos_matches(r: Rule, dsfield: int) -> bool:
    """fib4_rule_match / fib6_rule_match on the DS field: IPv4 compares the
    legacy TOS bits the rule may hold, IPv6 the whole DSCP."""
    if r.dscp is not None and dsfield >> 2 != r.dscp:
        return False
    if not r.tos:
        return True
    if r.family == AF_INET:
        return (dsfield & 0x1C) == r.tos
    return (dsfield & 0xFC) == r.tos


@dataclass
class Compiled:
    """A family's rule set as the classifier holds it (rules.h)."""
    rules: list[Rule]                       # the walked rules, bit i = rules[i]
    actions: list[lo.RuleAction]
    vectors: list[bytes]                    # id -> RULE_WORDS words; 0: empty
    fields: int = 0
    all: int = 0
    invert: int = 0
    miss: list[int] = field(default_factory=lambda: [0] * 8)
    prefixes: dict[tuple[int, ipaddress._BaseNetwork], int] = field(default_factory=dict)  # (0 from|1 to, net)
    values: dict[tuple[int, int], int] = field(default_factory=dict)   # (0 iif|1+i mask i, value) -> vector
    bytes_: dict[tuple[int, int], int] = field(default_factory=dict)   # (0 ipproto|1 tos, byte) -> vector
    masks: list[int] = field(default_factory=list)
    mask_miss: list[int] = field(default_factory=list)
    bounds: list[list[tuple[int, int]]] = field(default_factory=lambda: [[], []])  # per port field: (lo, vector)


def signature(c: "Compiled") -> tuple:
    """What the data plane would hold for c: equal signatures, nothing to write."""
    return (tuple(bytes(a) for a in c.actions), tuple(c.vectors), int(c.fields), c.all, c.invert, tuple(c.miss),
            tuple(sorted((f, str(n), v) for (f, n), v in c.prefixes.items())), tuple(sorted(c.values.items())),
            tuple(sorted(c.bytes_.items())), tuple(c.masks), tuple(c.mask_miss), tuple(map(tuple, c.bounds)))


class Unsupported(Exception):
    """The rule set needs what the classifier does not do: its family is passed."""


def _constant(r: Rule, ports: list[Port]) -> bool | None:
    """The rule's match for every forwarded packet when a selector decides it
    alone (True, False), else None."""
    never = (r.oif is not None or r.tun_id != 0 or (r.uid is not None and not r.uid[0] <= 0 <= r.uid[1])
             or (r.iif is not None and not any(r.iif in (p.name, p.master) for p in ports))
             or (r.l3mdev and not any(p.master for p in ports)))
    if never:
        return r.invert
    return None


def compile_rules(rules: list[Rule], ports: list[Port]) -> Compiled | None:
    """The classifier of one family's rules (kernel order), for packets from
    `ports`; None when the defaults alone would route them (no walk needed).
    Raises Unsupported with the reason when the fast path cannot follow them."""
    if not rules:
        raise Unsupported("no rules: the kernel routes nothing")
    family = rules[0].family
    if [(r.priority, r.table) for r in rules if r.is_plain_lookup] == DEFAULTS[family] \
            and all(r.is_plain_lookup for r in rules):
        return None
    first = rules[0]
    if not (first.is_plain_lookup and first.table == TABLE_LOCAL):
        raise Unsupported(f"the first rule is not `lookup local` but `{first.priority}: {first.text()}`")
    kept: list[tuple[int, Rule, bool]] = []  # (position in the kernel's list, rule, matches always)
    for pos, r in enumerate(rules):
        if r.unknown:
            raise Unsupported(f"rule {r.priority} selects on {', '.join(r.unknown)}")
        if r.l3mdev and any(p.master for p in ports):
            raise Unsupported(f"rule {r.priority} (l3mdev): ports with a master device")
        const = _constant(r, ports)
        if const is False:
            continue
        if r.action == FR_ACT_NOP or (r.action == FR_ACT_GOTO and (r.unresolved or r.goto is None)):
            continue  # never decides: the walk goes on after it
        if r.action == FR_ACT_TO_TBL and r.table == TABLE_UNSPEC:
            continue  # no such table: -EAGAIN, the walk goes on
        if r.action not in ACTION_NAMES:
            raise Unsupported(f"rule {r.priority} has action {r.action}")
        kept.append((pos, r, const is True))
    if len(kept) > lo.MAX_RULES:
        raise Unsupported(f"{len(kept)} rules, more than the fast path's {lo.MAX_RULES}")
    width = 32 if family == AF_INET else 128
    n = len(kept)
    full = (1 << n) - 1
    vec_ids: dict[int, int] = {0: 0}

    def vid(bits: int) -> int:
        if bits not in vec_ids:
            if len(vec_ids) >= lo.MAX_RULE_VECTORS:
                raise Unsupported(f"the rules need more than {lo.MAX_RULE_VECTORS} bit vectors")
            vec_ids[bits] = len(vec_ids)
        return vec_ids[bits]

    out = Compiled([r for _, r, _ in kept], [], [])
    out.all = vid(full)
    inv = sum(1 << i for i, (_, r, always) in enumerate(kept) if r.invert and not always)
    out.invert = vid(inv) if inv else 0

    # Each field's vectors are built from the bits of the rules by value
    # (not rule by rule for every value): 1000 rules compile in well under a second.
    live = [(1 << i, r) for i, (_, r, always) in enumerate(kept) if not always]

    def without(attr_set) -> int:
        """The bits of the rules without this selector (they match on it anyway)."""
        return full & ~sum(b for b, r in live if attr_set(r))

    # from / to: the vector of the longest rule prefix holding the address
    for fld, attr, flag in ((0, "src", lo.RuleField.SRC), (1, "dst", lo.RuleField.DST)):
        by_net: dict = {}
        for b, r in live:
            net = getattr(r, attr)
            if net is not None and net.prefixlen:
                by_net[net] = by_net.get(net, 0) | b
        if not by_net:
            continue
        out.fields |= flag
        wild = without(lambda r, attr=attr: getattr(r, attr) is not None and getattr(r, attr).prefixlen)
        out.miss[fld] = vid(wild)
        lengths = sorted({n.prefixlen for n in by_net})
        net_cls = type(next(iter(by_net)))
        for net in by_net:
            bits, addr = wild, int(net.network_address)
            for plen in lengths:  # every rule prefix holding net: a supernet of one of these lengths
                if plen > net.prefixlen:
                    break
                sup = (addr >> (width - plen) << (width - plen), plen)
                bits |= by_net.get(net_cls(sup), 0)
            out.prefixes[(fld, net)] = vid(bits)
    # iif: the port's vector (a rule names the port or its master)
    if any(r.iif is not None for _, r in live):
        out.fields |= lo.RuleField.IIF
        wild = without(lambda r: r.iif is not None)
        out.miss[2] = vid(wild)
        for p in ports:
            out.values[(0, p.ifindex)] = vid(wild | sum(b for b, r in live if r.iif in (p.name, p.master)))
    # ipproto and the DS field: a vector per byte
    if any(r.ipproto for _, r in live):
        out.fields |= lo.RuleField.PROTO
        wild = without(lambda r: r.ipproto)
        by_proto: dict[int, int] = {}
        for b, r in live:
            if r.ipproto:
                by_proto[r.ipproto] = by_proto.get(r.ipproto, 0) | b
        for v in range(256):
            out.bytes_[(0, v)] = vid(wild | by_proto.get(v, 0))
    if any(r.tos or r.dscp is not None for _, r in live):
        out.fields |= lo.RuleField.TOS
        wild = without(lambda r: r.tos or r.dscp is not None)
        tos_rules = [(b, r) for b, r in live if r.tos or r.dscp is not None]
        for v in range(256):
            out.bytes_[(1, v)] = vid(wild | sum(b for b, r in tos_rules if tos_matches(r, v)))
    # fwmark: per distinct mask, a vector per (mark & mask)
    masks = sorted({r.mask for _, r in live if r.mark is not None and r.mask})
    if masks:
        if len(masks) > lo.MAX_RULE_MASKS:
            raise Unsupported(f"fwmark rules use {len(masks)} masks, more than {lo.MAX_RULE_MASKS}")
        out.fields |= lo.RuleField.MARK
        for i, m in enumerate(masks):
            wild = without(lambda r, m=m: r.mark is not None and r.mask == m)
            by_value: dict[int, int] = {}
            for b, r in live:
                if r.mark is not None and r.mask == m:
                    by_value[r.mark & m] = by_value.get(r.mark & m, 0) | b
            out.masks.append(m)
            out.mask_miss.append(vid(wild))
            for value, bits in by_value.items():
                out.values[(1 + i, value)] = vid(wild | bits)
    # sport, dport: the elementary intervals of the rules' ranges, swept once
    for fld, attr, flag in ((0, "sport", lo.RuleField.SPORT), (1, "dport", lo.RuleField.DPORT)):
        ranged = [(b, getattr(r, attr)) for b, r in live if getattr(r, attr) is not None]
        if not ranged:
            continue
        out.fields |= flag
        wild = without(lambda r, attr=attr: getattr(r, attr) is not None)
        opens: dict[int, int] = {}
        closes: dict[int, int] = {}
        for b, (lo_, hi) in ranged:
            opens[lo_] = opens.get(lo_, 0) | b
            if hi < 65535:
                closes[hi + 1] = closes.get(hi + 1, 0) | b
        starts = sorted({0} | set(opens) | set(closes))
        if len(starts) > lo.RULE_PORT_SLOTS:
            raise Unsupported(f"{attr} ranges need more than {lo.RULE_PORT_SLOTS} intervals")
        active, bounds = 0, []
        for s_ in starts:
            active = (active & ~closes.get(s_, 0)) | opens.get(s_, 0)
            bounds.append((s_, vid(wild | active)))
        out.bounds[fld] = bounds
    # actions; a goto names the first kept rule at or after its target
    positions = [pos for pos, _, _ in kept]
    for pos, r, _ in kept:
        a = lo.RuleAction(kind=r.action, suppress_prefixlen=0xFF if r.suppress_prefixlen < 0
                          else min(r.suppress_prefixlen, 0xFE), table=r.table, priority=r.priority)
        if r.suppress_ifgroup >= 0:
            a.flags |= lo.RULE_A_SUPPRESS_IFGROUP
            a.ifgroup = r.suppress_ifgroup
        if r.action == FR_ACT_GOTO:
            target = next((p for p, x in enumerate(rules) if x.priority == r.goto), None)
            if target is None or target <= pos:
                a.kind = lo.RuleKind.PASS
            else:
                a.target = next((i for i, p in enumerate(positions) if p >= target), lo.MAX_RULES)
        out.actions.append(a)
    words = lo.RULE_WORDS
    out.vectors = [b""] * len(vec_ids)
    for bits, i in vec_ids.items():
        out.vectors[i] = bits.to_bytes(words * 8, "little")
    return out
