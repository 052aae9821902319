"""`bpfrouter explain`: run one packet through the loaded program against the
live maps (BPF_PROG_TEST_RUN with a probe header in the XDP metadata, so
nothing is counted or sent) and say what happened at each stage."""
from __future__ import annotations

import ipaddress
import re

from .datapath import Datapath
from .datapath import layout as lo
from .nexthop import nexthop_of_value
from .interfaces import ifname
from .observe import REASON_TEXT, XDP_ACTIONS, ecmp_choice, ecmp_text, rule_choice, rule_text, run_probe
from .packet import mac_str
from .telemetry import L4_NAMES, tcp_flags_str

SPEC_HELP = ("PROTO SRC[:PORT] > DST[:PORT] [ttl N] [flags SA] [len N] [vlan ID], e.g. "
             "'tcp 10.0.1.2:40000 > 10.0.2.2:80', 'udp [2001:db8::1]:53 > [2001:db8:2::2]:53', "
             "'icmp 10.0.1.2 > 10.0.2.2'")
PROTOS = ("tcp", "udp", "icmp", "icmp6")
_ENDPOINT = re.compile(r"^(?:\[(?P<v6>[0-9a-fA-F:.]+)\]|(?P<addr>[^\s:\[\]]+|[0-9a-fA-F:]+))(?::(?P<port>\d+))?$")


class PacketSpecError(ValueError):
    """A packet description that cannot be built; the message says why."""


def _endpoint(text: str, what: str):
    if text.count(":") > 1 and not text.startswith("["):  # a bare IPv6 address, no port
        addr_s, port_s = text, None
    else:
        m = _ENDPOINT.match(text)
        if not m:
            raise PacketSpecError(f"invalid {what} {text!r}: expected ADDRESS[:PORT] or [IPV6]:PORT")
        addr_s, port_s = m.group("v6") or m.group("addr"), m.group("port")
    try:
        addr = ipaddress.ip_address(addr_s)
    except ValueError:
        raise PacketSpecError(f"invalid {what} address {addr_s!r}") from None
    port = int(port_s) if port_s is not None else None
    if port is not None and port > 65535:
        raise PacketSpecError(f"invalid {what} port {port}: expected 0..65535")
    return addr, port


def spec_words(args: list[str] | tuple[str, ...]) -> list[str]:
    """The words of a description given as one quoted argument (as tcpdump
    filters are: the shell would take an unquoted > as a redirection), as
    several, or as a mix of both."""
    return [w for arg in args for w in arg.split()]


def parse_spec(words: list[str], dst_mac: bytes, src_mac: bytes = b"\x02\x00\x5e\x00\x00\x01") -> bytes:
    """Build an Ethernet frame from a short description (SPEC_HELP)."""
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
    from scapy.layers.l2 import Dot1Q, Ether
    from scapy.packet import Raw

    if not words:
        raise PacketSpecError(f"no packet given: {SPEC_HELP}")
    proto = words[0].lower()
    if proto not in PROTOS:
        raise PacketSpecError(f"unknown protocol {words[0]!r}: expected one of {', '.join(PROTOS)}")
    if len(words) < 4 or words[2] != ">":
        raise PacketSpecError(f"expected {proto} SRC > DST: {SPEC_HELP}")
    (src, sport), (dst, dport) = _endpoint(words[1], "source"), _endpoint(words[3], "destination")
    if src.version != dst.version:
        raise PacketSpecError("source and destination are of different IP versions")
    opts = words[4:]
    if len(opts) % 2:
        raise PacketSpecError(f"{opts[-1]!r} needs a value: ttl N, flags SA, len N, vlan ID")
    kv = dict(zip(opts[::2], opts[1::2], strict=True))
    unknown = set(kv) - {"ttl", "flags", "len", "vlan"}
    if unknown:
        raise PacketSpecError(f"unexpected {sorted(unknown)[0]!r}: expected ttl N, flags SA, len N, vlan ID")

    def number(key: str, hi: int, default: int) -> int:
        v = kv.get(key, str(default))
        if not v.isdigit() or int(v) > hi:
            raise PacketSpecError(f"invalid {key} {v!r}: expected 0..{hi}")
        return int(v)

    ttl, payload, vlan = number("ttl", 255, 64), number("len", 9000, 0), number("vlan", 4095, 0)
    if proto in ("tcp", "udp"):
        if sport is None or dport is None:
            raise PacketSpecError(f"{proto} needs ports: SRC:PORT > DST:PORT")
        l4 = (TCP(sport=sport, dport=dport, flags=kv.get("flags", "S")) if proto == "tcp"
              else UDP(sport=sport, dport=dport))
    elif sport is not None or dport is not None:
        raise PacketSpecError(f"{proto} has no ports")
    elif proto == "icmp" and dst.version == 4:
        l4 = ICMP(type=8, id=1)
    elif proto == "icmp6" or dst.version == 6:
        l4 = ICMPv6EchoRequest(id=1)
    if "flags" in kv and proto != "tcp":
        raise PacketSpecError("flags apply to tcp only")
    ip = IP(src=str(src), dst=str(dst), ttl=ttl) if dst.version == 4 else \
        IPv6(src=str(src), dst=str(dst), hlim=ttl)
    eth = Ether(dst=mac_str(dst_mac), src=mac_str(src_mac))
    frame = eth / Dot1Q(vlan=vlan) / ip / l4 if vlan else eth / ip / l4
    if payload:
        frame = frame / Raw(bytes(payload))
    return bytes(frame)


def parse_hex(text: str) -> bytes:
    cleaned = re.sub(r"[\s:]", "", text)
    if cleaned.startswith(("0x", "0X")):
        cleaned = cleaned[2:]
    if not cleaned or len(cleaned) % 2 or not re.fullmatch(r"[0-9a-fA-F]+", cleaned):
        raise PacketSpecError("invalid hex packet: expected pairs of hex digits (spaces and colons allowed)")
    frame = bytes.fromhex(cleaned)
    if len(frame) < 14:
        raise PacketSpecError(f"{len(frame)} bytes: BPF_PROG_TEST_RUN needs at least an Ethernet header (14)")
    return frame


def read_pcap(path: str, index: int) -> bytes:
    from scapy.utils import rdpcap
    try:
        pkts = rdpcap(path, count=index)
    except FileNotFoundError:
        raise PacketSpecError(f"no such file: {path}") from None
    except Exception as e:  # scapy raises Scapy_Exception and friends for bad files
        raise PacketSpecError(f"cannot read {path} as pcap or pcapng: {e}") from None
    if len(pkts) < index:
        raise PacketSpecError(f"{path} has {len(pkts)} packets; there is no packet {index}")
    frame = bytes(pkts[index - 1])
    if len(frame) < 14:
        raise PacketSpecError(f"packet {index} has {len(frame)} bytes: BPF_PROG_TEST_RUN needs at least 14")
    return frame


def frame_summary(frame: bytes) -> str:
    import scapy.layers.inet  # noqa: F401  (binds IP, TCP, UDP, ICMP into Ether's dissection)
    import scapy.layers.inet6  # noqa: F401
    from scapy.layers.l2 import Ether
    try:
        return Ether(frame).summary()
    except Exception:
        return f"{len(frame)} bytes (not decodable)"


def _ip_header(f: bytes, off: int):
    """(family, protocol, source, destination, header length) of the IP header at off, or None."""
    if len(f) > off and f[off] >> 4 == 4 and len(f) >= off + 20:
        return 4, f[off + 9], ipaddress.ip_address(f[off + 12:off + 16]), ipaddress.ip_address(f[off + 16:off + 20]), \
            (f[off] & 15) * 4
    if len(f) > off and f[off] >> 4 == 6 and len(f) >= off + 40:
        return 6, f[off + 6], ipaddress.ip_address(f[off + 8:off + 24]), ipaddress.ip_address(f[off + 24:off + 40]), 40
    return None


ENCAP_NAMES = {(4, 4): "IPIP", (4, 6): "IPv6 in IPv4", (6, 4): "IPv4 in IPv6", (6, 6): "IPv6 in IPv6"}


def lb_decision(frame: bytes, output: bytes, l3_off: int) -> dict | None:
    """What the load balancer did to a redirected packet, read off the frame
    that left (the lb stage takes untagged frames only): an outer header
    (and for GUE a UDP header) in front of the client's packet (dsr), or its
    addresses rewritten (nat)."""
    a, b = _ip_header(frame, l3_off), _ip_header(output, 14)
    if not a or not b:
        return None
    gue = 8 if b[1] == 17 else 0
    inner_off = 14 + b[4] + gue
    if (b[1] in (4, 41) or gue) and output[inner_off:inner_off + 20] == frame[l3_off:l3_off + 20]:
        d = {"mode": "dsr", "backend": str(b[3]), "encap": ENCAP_NAMES[(b[0], a[0])] + (" in GUE" if gue else ""),
             "outer_source": str(b[2])}
        if gue:
            d["outer_ports"] = [int.from_bytes(output[14 + b[4] + i:16 + b[4] + i], "big") for i in (0, 2)]
        return d
    if b[0] == a[0] and b[1] == a[1] and (b[2], b[3]) != (a[2], a[3]):
        l4 = output[14 + b[4]:]
        return {"mode": "nat", "backend": str(b[3]), "source": str(b[2]),
                "source_port": int.from_bytes(l4[0:2], "big") if len(l4) >= 4 else None,
                "backend_port": int.from_bytes(l4[2:4], "big") if len(l4) >= 4 else None}
    return None


def explain(dp: Datapath, frame: bytes, iif: int, fib_mode: str, fib_impl: str) -> dict:
    """The decision path of `frame` arriving on `iif`, as a JSON-ready dict."""
    out, res = run_probe(dp, frame, iif)
    reason = lo.Reason(out.reason)
    at = 12 + 4 * out.vlan_depth  # the ethertype after the tags the parser went past
    l3_proto = int.from_bytes(frame[at:at + 2], "big") if out.l3_off and len(frame) >= at + 2 else 0
    parse: dict = {"vlan_tags": out.vlan_depth, "ethertype": f"0x{l3_proto:04x}" if l3_proto else None}
    layers = ["ethernet"] + ["vlan"] * out.vlan_depth
    src = dst = None
    if out.l3_off:
        family = 4 if l3_proto == 0x0800 else 6
        layers.append(f"ipv{family}")
        parse["l3_offset"] = out.l3_off
        a = 12 if family == 4 else 8
        n = 4 if family == 4 else 16
        src = ipaddress.ip_address(frame[out.l3_off + a:out.l3_off + a + n])
        dst = ipaddress.ip_address(frame[out.l3_off + a + n:out.l3_off + a + 2 * n])
        parse.update(src=str(src), dst=str(dst), ttl=frame[out.l3_off + (8 if family == 4 else 7)])
    lb = lb_decision(frame, res.data, out.l3_off) if reason.verdict == "redirect" and out.l3_off else None
    l4_off, l4_proto = out.l4_off, out.l4_proto
    if lb and lb["mode"] == "dsr":  # the context describes the outer packet: the client's, from its own header
        hdr = _ip_header(frame, out.l3_off)
        l4_off, l4_proto = out.l3_off + hdr[4], hdr[1]
    if l4_off:
        name = L4_NAMES.get(l4_proto, str(l4_proto))
        layers.append(name)
        parse.update(l4_offset=l4_off, proto=name)
        l4 = frame[l4_off:]
        if l4_proto in (6, 17) and len(l4) >= 4:
            parse.update(sport=int.from_bytes(l4[0:2], "big"), dport=int.from_bytes(l4[2:4], "big"))
        if l4_proto == 6 and len(l4) >= 14:
            parse["tcp_flags"] = tcp_flags_str(l4[13])
    parse["layers"] = layers
    result: dict = {
        "input": {"iif": ifname(iif), "len": len(frame), "summary": frame_summary(frame)},
        "parse": parse, "fib": None, "nexthop": None, "neighbor": None,
        "verdict": reason.verdict, "reason": reason.label, "reason_text": REASON_TEXT[reason],
        "xdp_action": XDP_ACTIONS.get(res.retval, str(res.retval)),
        "egress": ifname(out.egress_ifindex) if out.egress_ifindex else None, "output": None,
    }
    result["lb"] = lb
    rule = rule_choice(dp, out, family) if out.l3_off else None
    result["rule"] = rule
    if out.route_type or reason in (lo.Reason.PASS_FIB_MISS,):
        fib: dict = {"lookup": "bpf_fib_lookup (kernel FIB)" if fib_mode == "kernel" else f"BPF FIB ({fib_impl})",
                     "matched": bool(out.route_type)}
        if out.route_type:
            rtype = lo.RouteType(out.route_type).name.lower()
            table = rule["table"] if rule and rule["table"] not in (None, "main", "local") else \
                "local" if rtype == "local" else "main"
            fib.update(type=rtype, table=table)
            routed = ipaddress.ip_address(lb["backend"]) if lb else dst  # the balanced packet goes to its backend
            if out.route_proto and routed is not None:
                fib["prefix"] = str(ipaddress.ip_network(f"{routed}/{out.prefixlen}", strict=False))
                fib["proto"] = lo.proto_name(out.route_proto)
        result["fib"] = fib
    result["ecmp"] = ecmp_choice(dp, out)
    if out.nh_id:
        v = dp.nexthops.lookup(lo.u32(out.nh_id))
        nh = nexthop_of_value(v) if v is not None and v.ifindex else None
        result["nexthop"] = {"id": out.nh_id, "gateway": str(nh.gateway) if nh and nh.gateway else None,
                             "dev": ifname(nh.ifindex) if nh else None}
        if nh is not None:
            via = nh.gateway if nh.gateway else ipaddress.ip_address(lb["backend"]) if lb else dst
            result["neighbor"] = {"address": str(via) if via else None, "found": bool(out.flags & lo.PROBE_F_NEIGH),
                                  "lladdr": mac_str(res.data[0:6]) if reason.verdict == "redirect" else None}
    if reason.verdict == "redirect":
        result["output"] = {"len": len(res.data), "summary": frame_summary(res.data), "hex": res.data.hex(),
                            "ttl": res.data[out.l3_off + (8 if l3_proto == 0x0800 else 7)]
                            if out.l3_off and len(res.data) > out.l3_off + 8 else None}
    return result


def explain_lines(r: dict) -> list[str]:
    """The decision path for a terminal, one stage per line."""
    p = r["parse"]
    lines = [f"packet   {r['input']['summary']} ({r['input']['len']} bytes) in on {r['input']['iif']}"]
    parse = " > ".join(p["layers"])
    if p.get("src"):
        parse += f": {p['src']}" + (f".{p['sport']}" if "sport" in p else "") + f" > {p['dst']}" + \
            (f".{p['dport']}" if "dport" in p else "") + f" ttl {p['ttl']}"
        if p.get("tcp_flags"):
            parse += f" [{p['tcp_flags']}]"
    lines.append(f"parse    {parse}")
    if r.get("lb"):
        b = r["lb"]
        lines.append(f"lb       {p.get('proto')} {p['dst']}.{p.get('dport')}: backend {b['backend']}, " +
                     (f"dsr ({b['encap']}, outer source {b['outer_source']})" if b["mode"] == "dsr" else
                      f"nat (source {b['source']}.{b['source_port']})"))
    if r.get("rule"):
        lines.append(f"rule     {rule_text(r['rule'])}")
    if r["fib"]:
        f = r["fib"]
        if f["matched"]:
            lines.append(f"fib      {f['lookup']}: table {f['table']}, " +
                         (f"{f['prefix']} " if f.get("prefix") else "") + f"{f['type']}" +
                         (f", proto {f['proto']}" if f.get("proto") else ""))
        else:
            lines.append(f"fib      {f['lookup']}: no route")
    if r.get("ecmp"):
        lines.append(f"ecmp     {ecmp_text(r['ecmp'])}")
    if r["nexthop"]:
        n = r["nexthop"]
        lines.append(f"nexthop  id {n['id']}: " + (f"via {n['gateway']} " if n["gateway"] else "connected ") +
                     f"dev {n['dev']}")
    if r["neighbor"]:
        nb = r["neighbor"]
        lines.append(f"neighbor {nb['address']}: " +
                     (f"lladdr {nb['lladdr']}" if nb["lladdr"] else "found" if nb["found"] else "not resolved"))
    lines.append(f"verdict  {r['verdict']} ({r['reason']}: {r['reason_text']}), xdp {r['xdp_action']}" +
                 (f", out {r['egress']}" if r["verdict"] == "redirect" and r["egress"] else ""))
    if r["output"]:
        lines.append(f"output   {r['output']['summary']} ({r['output']['len']} bytes), ttl {r['output']['ttl']}")
    return lines
