"""Router lifecycle: bring a data plane up on interfaces, report, tear down.

Used by the CLI; every step that fails undoes the ones before it, so a
failed `up` leaves nothing behind."""
from __future__ import annotations

import shutil

from . import netns, xmit
from .agent.client import AgentUnavailable, agent_pid, request, start_agent, stop_agent
from .agent.kernel import link_from_msg
from .bpf import prog_info, xdp_query
from .datapath import (Datapath, DatapathError, RouterMeta, check_bpffs, default_object,
                       running_routers, validate_name)
from .datapath import layout as lo
from .interfaces import Interfaces, flags_text, ifname
from .observe import clear_slot, read_counters
from .packet import mac_str
from .policy.image import packets_by_table, report_counts
from .telemetry import fill_warnings, flow_table_stats, map_fill, obs_stats

DEFAULT_NAME = "default"


def resolve(name: str | None) -> RouterMeta:
    """Find the router to address and enter its network namespace."""
    if name is None:
        routers = running_routers()
        if not routers:
            raise DatapathError("no router is running (start one with `bpfrouter up IFACE...`)")
        if len(routers) > 1:
            raise DatapathError(f"several routers are running ({', '.join(routers)}): pick one with --name")
        name = routers[0]
    meta = RouterMeta.load(validate_name(name))
    if meta.netns and netns.current_name() != meta.netns:
        netns.enter(meta.netns)
    return meta


def _read_links(ifnames: list[str]):
    from pyroute2 import IPRoute  # (a second to import: not for every `bpfrouter` command)
    with IPRoute() as ipr:
        links = {li.name: li for li in (link_from_msg(m) for m in ipr.link("dump"))}
    missing = [n for n in ifnames if n not in links]
    if missing:
        raise DatapathError(f"unknown interface {missing[0]!r} in "
                            f"{'namespace ' + repr(netns.current_name()) if netns.current_name() else 'this namespace'}"
                            f" (see `ip link`)")
    return [links[n] for n in ifnames]


def up(ifnames: list[str], name: str = DEFAULT_NAME, fib_mode: str = "bpf",
       xdp_mode: str = "native", start: bool = True, fib_impl: str = "dir",
       groups: tuple[int, int] | None = None, progress=None, metrics: str | None = None,
       observers: list[str] | None = None, notify=None) -> RouterMeta:
    """notify(line) reports what `up` changed outside the router (a veth peer's GRO)."""
    check_bpffs()
    validate_name(name)
    if not ifnames:
        raise DatapathError("name at least one interface: `bpfrouter up eth0 eth1`")
    if len(set(ifnames)) != len(ifnames):
        raise DatapathError("an interface is named twice")
    if name in running_routers():
        raise DatapathError(f"a router named {name!r} is already running: pick another --name "
                            f"or stop it with `bpfrouter down --name {name}`")
    links = _read_links(ifnames)
    for li in links:
        mode, prog_id = xdp_query(li.ifindex)
        if prog_id:
            raise DatapathError(f"interface {li.name} already runs XDP program {prog_id} ({mode}); "
                                f"detach it first (`ip link set {li.name} xdp off`)")
    # Native redirects into a veth need its peer's NAPI (bpfrouter/veth.py); every
    # peer is checked before one is changed, so a refusal changes nothing.
    from . import veth  # (pyroute2: imported by the commands that use it)
    for peer in veth.peers_to_fix(ifnames) if xdp_mode == "native" else []:
        veth.turn_gro_on(peer)
        if notify:
            notify(peer.fixed_line())
    object_path = default_object()
    if fib_mode == "kernel":
        fib_impl = "lpm"  # the BPF FIB only mirrors, for `route show`: keep it small
    meta = RouterMeta(name, object_path, fib_mode, netns.current_name(), xdp_mode, fib_impl=fib_impl,
                      metrics=metrics)
    if observers is not None:
        meta.observers = observers
    dp = Datapath.load(name, object_path, lo.FibMode[fib_mode.upper()], lo.FibImpl[fib_impl.upper()], groups,
                       observe=sum(lo.OBSERVERS[o] for o in meta.observers))
    try:
        # before the first port is attached: no redirect goes uncounted
        xmit.attach(dp, dp.capture_program().id if dp.has_capture_program() else 0,
                    events="events" in meta.observers)
        ifaces = Interfaces(dp)
        modes = []
        for li in links:
            slot = ifaces.configure(li.ifindex, li.mac, li.mtu, group=li.group)
            clear_slot(dp, slot)
            modes.append(dp.attach(li.ifindex, xdp_mode))
            meta.interfaces[li.name] = li.ifindex
        meta.xdp_mode = ",".join(sorted(set(modes)))
        meta.save()
        if start:
            start_agent(name, meta.netns, progress=progress)
    except BaseException:
        stop_agent(name)
        dp.destroy()
        shutil.rmtree(RouterMeta.path(name).parent, ignore_errors=True)
        raise
    dp.close()
    return meta


def down(name: str) -> None:
    stop_agent(name)
    try:
        Datapath.remove(name)
    finally:
        shutil.rmtree(RouterMeta.path(name).parent, ignore_errors=True)


def rule_packets_by_table(name: str, policy: dict) -> dict:
    """Per family with rules walked, the packets the walk's lookups routed, by table."""
    if not any("walked" in why for why in policy.values()):
        return {}
    return packets_by_table(report_counts(request(name, "rules", timeout=5).get("families", {})))


def status(meta: RouterMeta) -> dict:
    dp = Datapath.open(meta.name)
    try:
        pid = agent_pid(meta.name)
        agent: dict = {"running": pid is not None, "pid": pid}
        if pid is not None:
            try:
                info = request(meta.name, "ping", timeout=5)
                agent.update({k: info.get(k) for k in ("events", "resyncs", "enobufs", "last_resync", "fib_full",
                                                       "policy", "lb")})
                agent["tables"] = (info.get("fib") or {}).get("tables", {})  # routes of tables besides main
                agent["rule_packets"] = rule_packets_by_table(meta.name, agent.get("policy") or {})
            except AgentUnavailable:
                agent["running"] = False
        pinfo = prog_info(dp.program.fd)
        ifaces = Interfaces(dp).configured()
        attached = dp.attached()
        interfaces = []
        for idx, v in sorted(ifaces.items()):
            interfaces.append({"name": ifname(idx), "ifindex": idx, "xdp_mode": attached.get(idx, "detached"),
                               "mac": mac_str(bytes(v.mac)), "mtu": v.mtu,
                               "sysctls": flags_text(v.flags),   # the kernel's input policy as mirrored
                               # families passed to the kernel: rules or VRFs could route them otherwise
                               "policy_passed": [f for f, bit in (("ipv4", lo.IFACE_F_PASS_POLICY4),
                                                                  ("ipv6", lo.IFACE_F_PASS_POLICY6)) if v.flags & bit]})
        counters = []
        totals = {"redirect": 0, "pass": 0, "drop": 0}
        for (idx, reason), (pk, by) in sorted(read_counters(dp).items(), key=lambda kv: (kv[0][0], kv[0][1])):
            counters.append({"iface": ifname(idx) if idx else None, "ifindex": idx,
                             "verdict": reason.verdict, "reason": reason.label,
                             "packets": pk, "bytes": by})
            totals[reason.verdict] += pk
        redirects, lost = [], 0
        for (idx, outcome), n in sorted(xmit.read(dp).items(), key=lambda kv: (kv[0][0], kv[0][1])):
            redirects.append({"iface": ifname(idx) if idx else None, "ifindex": idx,
                              "outcome": outcome.label, "packets": n})
            lost += n if outcome != xmit.Outcome.SENT else 0
        totals["redirect_lost"] = lost
        from .fib import fib_memory  # (numpy: not for every `bpfrouter` command)
        by_version = fib_memory(dp)
        memory = {f"ipv{v}": m for v, m in by_version.items()}
        v4, v6 = memory["ipv4"]["routes"], memory["ipv6"]["routes"]
        fill = map_fill(dp, by_version)
        stats = obs_stats(dp)
        return {
            "name": meta.name, "netns": meta.netns, "fib_mode": meta.fib_mode,
            "program": {"id": pinfo.id, "name": pinfo.name.decode(), "jited_bytes": pinfo.jited_prog_len},
            "agent": agent, "interfaces": interfaces,
            "fib": {"ipv4": v4, "ipv6": v6, "impl": meta.fib_impl,
                    "nexthops": fill["nexthops"]["entries"],
                    "memory": memory},
            "neighbors": fill["neighbors"]["entries"],
            "totals": totals, "counters": counters,
            "redirects": {"counted": xmit.attached(dp), "outcomes": redirects, "events": xmit.event_stats(dp)},
            "observers": {"enabled": meta.observers, **stats,
                          "capture_hook_on": [ifname(i) for i in dp.capture_hooked()],
                          "flow_table": flow_table_stats(dp, fill["flows"]["entries"], stats)},
            "maps": fill, "warnings": fill_warnings(fill),
        }
    finally:
        dp.close()
