"""The `bpfrouter` command."""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time

import click
from rich.console import Console
from rich.table import Table

from . import netns, router
from .agent.paths import AgentRunning
from .agent.client import AgentUnavailable, agent_pid, log_path, request, start_agent, stop_agent
from .bpf import BpfError
from .datapath import Datapath, DatapathError
from .datapath.layout import OBSERVERS, LayoutMismatch, RouteType, proto_name
from .interfaces import Interfaces, InterfaceError, ifname
from .lab import Lab, LabError, list_labs
from .netns import NetnsError
from .observe import ecmp_text, probe, rule_text, table_name
from .packet import mac_str
from .routespec import RouteSpecError, parse_address, parse_route

# Not on a terminal (a pipe, a log), tables keep their rows on one line.
console = Console(highlight=False, emoji=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
USER_ERRORS = (DatapathError, BpfError, AgentUnavailable, AgentRunning, NetnsError, RouteSpecError,
               LayoutMismatch, InterfaceError, LabError)


def emit_json(data, pretty: bool) -> None:
    click.echo(json.dumps(data, indent=2 if pretty else None, sort_keys=False))


def json_options(f):
    f = click.option("-p", "--pretty", is_flag=True, help="Pretty-print JSON (implies -j).")(f)
    f = click.option("-j", "--json", "as_json", is_flag=True, help="Print JSON (keys: docs/cli.md).")(f)
    return f


class SyncProgress:
    """A progress line for long operations, on a terminal only (quiet for
    JSON output and when stdout is not a terminal)."""

    def __init__(self, description: str, total: int | None = None, quiet: bool = False):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
        self.enabled = console.is_terminal and not quiet
        columns = [SpinnerColumn(), TextColumn("{task.description}")]
        if total is not None:
            columns += [BarColumn(), MofNCompleteColumn()]
        self.progress = Progress(*columns, TimeElapsedColumn(), console=console, transient=True,
                                 disable=not self.enabled)
        self.task = self.progress.add_task(description, total=total)

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def update(self, completed: int | None = None, description: str | None = None) -> None:
        kw = {k: v for k, v in (("completed", completed), ("description", description)) if v is not None}
        self.progress.update(self.task, **kw)

    def agent(self, answer: dict) -> None:
        """Callback for start_agent: the agent's first sync with the kernel."""
        sync = answer.get("sync") or {}
        if sync.get("phase") == "dump":
            self.update(description=f"agent: reading the kernel's routes ({sync.get('routes', 0):,})")
        elif sync.get("phase") == "apply":
            self.update(description=f"agent: writing {sync.get('routes', 0):,} routes to the data plane")


name_option = click.option("--name", "-n", "name", default=None, metavar="NAME",
                           help="Router to address (optional while only one runs).")


class Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
            raise click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        except PermissionError as e:
            raise click.ClickException(f"permission denied ({e.filename or e}): run bpfrouter as root") from None
        except KeyboardInterrupt:
            raise click.Abort() from None
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as e:
            if os.environ.get("BPFROUTER_DEBUG"):
                raise
            raise click.ClickException(f"internal error: {type(e).__name__}: {e} "
                                       f"(set BPFROUTER_DEBUG=1 for a traceback)") from None


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--netns", "netns_name", metavar="NS", default=None,
              help="Run in network namespace NS (like `ip -n NS`).")
@click.version_option(package_name="bpfrouter")
def cli(netns_name):
    """bpfrouter: an XDP fast path for Linux routing, fed by the kernel's FIB and its own routes."""
    if os.environ.get("BPFROUTER_DEBUG"):
        logging.basicConfig(level=logging.DEBUG)
    if netns_name:
        netns.enter(netns_name)


# --- up / down / status -------------------------------------------------------------
@cli.command()
@click.argument("ifaces", nargs=-1, required=True, metavar="IFACE...")
@click.option("--name", "-n", default=router.DEFAULT_NAME, show_default=True, help="Name of this router.")
@click.option("--fib", "fib_mode", type=click.Choice(["bpf", "kernel"]), default="bpf", show_default=True,
              help="bpf: routes mirrored into BPF maps; kernel: bpf_fib_lookup on the kernel FIB.")
@click.option("--xdp-mode", type=click.Choice(["native", "generic"]), default="native", show_default=True,
              help="native falls back to generic when the driver has no XDP support.")
@click.option("--fib-impl", type=click.Choice(["dir", "lpm"]), default="dir", show_default=True,
              help="Structure of the BPF FIB: dir (IPv4: DIR-24-8, root compressed; IPv6: a hash table per "
                   "prefix length) or lpm (LPM trie).")
@click.option("--fib-groups", default=None, metavar="V4,V6",
              help="DIR FIB space in KiB: IPv4's groups (1 KiB each) and IPv6's hash buckets "
                   "(default 16384,32768).")
@click.option("--metrics", "metrics_listen", default=None, metavar="ADDR:PORT",
              help="The agent serves Prometheus metrics here (inside the router's namespace).")
@click.option("--observers", default=",".join(OBSERVERS), show_default=True, metavar="LIST",
              help="Observers compiled into the data plane: any of events, flows, capture, or none. "
                   "Events and flows cost about 10 ns per packet; capture loads a second program, "
                   "attached only while `bpfrouter capture` runs (docs/observability.md).")
@click.option("--foreground", is_flag=True, help="Run the agent in this process instead of in the background.")
def up(ifaces, name, fib_mode, xdp_mode, fib_impl, fib_groups, metrics_listen, observers, foreground):
    """Attach the data plane to IFACE... and start the agent that keeps it in sync."""
    groups = None
    if fib_groups is not None:
        try:
            groups = tuple(int(x) for x in fib_groups.split(","))
            if len(groups) != 2 or min(groups) < 2 or max(groups) > 1 << 26:
                raise ValueError
        except ValueError:
            raise click.ClickException(f"invalid --fib-groups {fib_groups!r}: expected two sizes in KiB from 2 to 67108864, e.g. 16384,32768") from None
    chosen = [] if observers.strip() == "none" else [o.strip() for o in observers.split(",") if o.strip()]
    unknown = [o for o in chosen if o not in OBSERVERS]
    if unknown or len(set(chosen)) != len(chosen):
        raise click.ClickException(f"invalid --observers {observers!r}: a list of events, flows, capture, or none")
    if metrics_listen is not None:
        from .metrics import parse_listen
        try:
            parse_listen(metrics_listen)
        except ValueError as e:
            raise click.ClickException(str(e)) from None
    with SyncProgress("loading the data plane") as bar:
        meta = router.up(list(ifaces), name, fib_mode, xdp_mode, start=not foreground, fib_impl=fib_impl,
                         groups=groups, progress=bar.agent, metrics=metrics_listen, observers=chosen,
                         notify=lambda line: console.print(line, markup=False))
    where = f" in netns {meta.netns}" if meta.netns else ""
    impl = f" ({meta.fib_impl})" if meta.fib_mode == "bpf" else ""
    console.print(f"router [bold]{meta.name}[/] up{where}: fib {meta.fib_mode}{impl}, "
                  f"XDP {meta.xdp_mode} on {', '.join(meta.interfaces)}")
    if foreground:
        _run_agent(name)
    else:
        console.print(f"agent pid {agent_pid(name)}, log {log_path(name)}" +
                      (f", metrics http://{meta.metrics}/metrics" if meta.metrics else ""))


@cli.command()
@name_option
def down(name):
    """Stop the agent, detach XDP and remove the router's pinned state."""
    meta = router.resolve(name)
    router.down(meta.name)
    console.print(f"router [bold]{meta.name}[/] down")


@cli.command()
@name_option
@json_options
def status(name, as_json, pretty):
    """Interfaces, XDP mode, program, FIB sizes and counters."""
    st = router.status(router.resolve(name))
    if as_json or pretty:
        return emit_json(st, pretty)
    ag = st["agent"]
    agent = f"agent pid {ag['pid']}" if ag["running"] else "[red]agent not running[/] (data plane keeps forwarding)"
    where = f"netns {st['netns']}, " if st["netns"] else ""
    console.print(f"router [bold]{st['name']}[/] ({where}fib {st['fib_mode']}, program id "
                  f"{st['program']['id']}, {agent})")
    t = Table("interface", "ifindex", "xdp", "mac", "mtu", "sysctls", "rules", box=None, pad_edge=False)
    for i in st["interfaces"]:
        t.add_row(i["name"], str(i["ifindex"]), i["xdp_mode"], i["mac"], str(i["mtu"]), i.get("sysctls", ""),
                  "passed " + "+".join(i["policy_passed"]) if i["policy_passed"] else "-")
    console.print(t)
    for fam, why in (ag.get("policy") or {}).items():
        by_table = (ag.get("rule_packets") or {}).get(fam)
        counts = ", ".join(f"{t} {n}" for t, n in (by_table or {}).items() if n)
        console.print(f"policy routing: {fam}: {why}" + (f"; packets by table: {counts}" if counts else ""),
                      markup=False, soft_wrap=True)
    if (lb := ag.get("lb")) and lb["services"]:
        states = ", ".join(f"{n} {s}" for s, n in sorted(lb["backends"].items()))
        console.print(f"load balancer: {lb['services']} services ({lb['nat']} nat), backends: {states or 'none'} "
                      f"(`bpfrouter service show`)", markup=False)
    if ag.get("tables"):
        console.print("tables: " + ", ".join(f"{t} ({n['ipv4']} IPv4 + {n['ipv6']} IPv6 routes)"
                                             for t, n in ag["tables"].items()))
    f = st["fib"]
    console.print(f"fib: {f['ipv4']} IPv4 + {f['ipv6']} IPv6 routes, {f['nexthops']} next hops, "
                  f"{st['neighbors']} neighbors")
    mem = [f"{fam.replace('ipv', 'IPv')} {m['impl']} " +
           (f"{m['forwarding_bytes'] / 2**20:.1f} MiB read by forwarding of {m['bytes'] / 2**20:.1f} MiB"
            if "forwarding_bytes" in m else f"{m['bytes'] / 2**20:.1f} MiB") for fam, m in f["memory"].items()]
    console.print("fib memory: " + "; ".join(mem))
    if full := ag.get("fib_full"):
        console.print(f"[red]fib full[/] ({full['error']}): {full['left_out']} routes left out of the fast path "
                      f"and {full['withheld']} covering them withheld; their traffic is passed to the kernel")
    tot = st["totals"]
    console.print(f"packets: {tot['redirect']} redirected by XDP, {tot['pass']} passed to the kernel, "
                  f"{tot['drop']} dropped")
    if st["counters"]:
        t = Table("iface", "verdict", "reason", "packets", "bytes", box=None, pad_edge=False)
        for c in st["counters"]:
            t.add_row(c["iface"] or "?", c["verdict"], c["reason"], str(c["packets"]), str(c["bytes"]))
        console.print(t)
    rd = st["redirects"]
    if not rd["counted"]:
        console.print("[yellow]redirect outcomes not counted[/] (router started by an older bpfrouter)")
    elif rd["outcomes"]:
        sent = sum(o["packets"] for o in rd["outcomes"] if o["outcome"] == "sent")
        console.print(f"redirects: {sent} taken by the egress ports, {tot['redirect_lost']} lost after redirect")
        t = Table("egress", "outcome", "packets", box=None, pad_edge=False)
        for o in rd["outcomes"]:
            t.add_row(o["iface"] or "?", o["outcome"], str(o["packets"]))
        console.print(t)
    ob, ft = st["observers"], st["observers"]["flow_table"]
    console.print(f"events: {ob['events_sent']} sent, {ob['events_suppressed']} over the rate cap, "
                  f"{ob['events_lost']} lost (ring full); flows: {ft['entries']} of {ft['capacity']}, "
                  f"{ft['evicted']} evicted")
    if ob["capture_hook_on"]:
        console.print(f"capture: the program with the capture hook runs on {', '.join(ob['capture_hook_on'])}")
    for w in st["warnings"]:
        console.print(f"[yellow]warning:[/] {w}")


# --- routes ---------------------------------------------------------------------------
@cli.group()
def route():
    """Routes, with iproute2's syntax: route add 10.0.0.0/8 via 192.0.2.1 dev eth1."""


def _family(v4: bool, v6: bool) -> int | None:
    return 6 if v6 else 4 if v4 else None


def _route_change(op: str, name, args, v4, v6):
    parse_route(list(args), _family(v4, v6), need_target=op != "route_del")  # syntax first
    meta = router.resolve(name)
    resp = request(meta.name, op, args=list(args), family=_family(v4, v6))
    if not resp.get("ok"):
        raise click.ClickException(resp.get("error", "request failed"))


def _route_change_command(op: str, help_text: str) -> None:
    @route.command(op, help=help_text, context_settings={"ignore_unknown_options": True})
    @click.argument("args", nargs=-1, required=True)
    @click.option("-4", "v4", is_flag=True, help="IPv4 (for `default`).")
    @click.option("-6", "v6", is_flag=True, help="IPv6 (for `default`).")
    @name_option
    def cmd(args, v4, v6, name):
        _route_change(f"route_{op}", name, args, v4, v6)


_route_change_command("add", "Add a route to the kernel FIB (proto bpfrouter); the data plane has it on return.")
_route_change_command("replace", "Add or replace a bpfrouter route.")
_route_change_command("del", "Delete a route added with bpfrouter.")


@cli.group()
def rule():
    """Policy routing rules, with `ip rule`'s syntax, and their fast-path walk."""


def _rule_change_command(op: str, help_text: str) -> None:
    @rule.command(op, help=help_text, context_settings={"ignore_unknown_options": True})
    @click.argument("args", nargs=-1, required=True)
    @click.option("-4", "v4", is_flag=True, help="IPv4 (the default without addresses).")
    @click.option("-6", "v6", is_flag=True, help="IPv6.")
    @name_option
    def cmd(args, v4, v6, name):
        if "dscp" in args:
            from .policy.rules import AF_INET, AF_INET6, RuleSyntaxError, parse_own_rule
            try:  # syntax first
                parse_own_rule(list(args), {4: AF_INET, 6: AF_INET6}.get(_family(v4, v6)))
            except RuleSyntaxError as e:
                raise click.ClickException(str(e)) from None
        meta = router.resolve(name)
        resp = request(meta.name, f"rule_{op}", args=list(args), family=_family(v4, v6))
        if not resp.get("ok"):
            raise click.ClickException(resp.get("error", "request failed"))


_rule_change_command("add", "Add a rule: a kernel rule (`ip rule add ARGS protocol bpfrouter`), or, with `dscp N` "
                     "(the exact DSCP, which `ip rule` lacks), a rule of bpfrouter's own, which only the fast path "
                     "follows. The fast path walks it on return.")
_rule_change_command("del", "Delete a rule, as `ip rule del` takes it (with `dscp N`: one of bpfrouter's own).")


@rule.command("show")
@click.option("-4", "v4", is_flag=True, help="IPv4 only.")
@click.option("-6", "v6", is_flag=True, help="IPv6 only.")
@name_option
@json_options
def rule_show(v4, v6, name, as_json, pretty):
    """The rules, as `ip rule show` lists them, with what the fast path makes of
    each (walked, left out because it never matches a forwarded packet, or
    passed to the kernel) and the packets each walked rule decided."""
    meta = router.resolve(name)
    resp = request(meta.name, "rules")
    if not resp.get("ok"):
        raise click.ClickException(resp.get("error", "request failed"))
    fams = {k: v for k, v in resp["families"].items() if not ((v4 and k == "ipv6") or (v6 and k == "ipv4"))}
    if as_json or pretty:
        return emit_json(fams, pretty)
    for fam, f in fams.items():
        console.print(f"{fam}: {f['state']}")
        for r in f["rules"]:
            count = f"{r['packets']} packets" if r["packets"] is not None else r["fast_path"]
            own = "  [bpfrouter: fast path only]" if r["source"].startswith("bpfrouter (") else ""
            console.print(f"{r['priority']}:\t{r['rule']}{own}  ({count})", markup=False)


@route.command("load")
@click.argument("file", type=click.File("r"))
@name_option
def route_load(file, name):
    """Install many routes from FILE ('-' for stdin), one per line, in
    `route add` syntax (`10.0.0.0/8 via 192.0.2.1`, `blackhole 10.66.0.0/16`;
    a leading `route add` and '#' comments are allowed).

    All or nothing: every line is checked first, and if the kernel refuses one,
    the routes already installed are removed again. Routes go into the kernel
    FIB with protocol bpfrouter through `ip -batch`; a progress bar follows the
    data plane's mirror on a terminal."""
    import subprocess
    import tempfile
    from .datapath.layout import RTPROT_BPFROUTER
    lines = []
    for i, raw in enumerate(file, 1):
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        if words[:2] == ["route", "add"]:
            words = words[2:]
        if "proto" in words or "table" in words:
            raise click.ClickException(f"{file.name}:{i}: 'proto' and 'table' are set by route load")
        try:
            parse_route(words)
        except RouteSpecError as e:
            raise click.ClickException(f"{file.name}:{i}: {e}") from None
        lines.append((i, words))
    if not lines:
        raise click.ClickException(f"{file.name}: no routes")
    meta = router.resolve(name)
    base = request(meta.name, "ping")["fib"]
    base_n = base["ipv4"] + base["ipv6"]
    with tempfile.NamedTemporaryFile("w", suffix=".batch") as batch:
        batch.write("".join(f"route add {' '.join(w)} proto {RTPROT_BPFROUTER}\n" for _, w in lines))
        batch.flush()
        t0 = time.monotonic()
        proc = subprocess.Popen(["ip", "-batch", batch.name], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        with SyncProgress("installing routes", total=len(lines)) as bar:
            last, stable_since = -1, time.monotonic()
            while True:
                fib = request(meta.name, "ping")["fib"]
                now = fib["ipv4"] + fib["ipv6"] - base_n
                bar.update(completed=max(0, min(now, len(lines))))
                if now != last:
                    last, stable_since = now, time.monotonic()
                if proc.poll() is not None and (now >= len(lines) or time.monotonic() - stable_since > 0.5):
                    break
                time.sleep(0.1)
        _, err = proc.communicate()
        if proc.returncode != 0:
            failed = next((int(x.rsplit(":", 1)[1]) for x in err.splitlines()
                           if x.startswith("Command failed") and x.rsplit(":", 1)[1].isdigit()), len(lines))
            undo = "".join(f"route del {' '.join(w)} proto {RTPROT_BPFROUTER}\n" for _, w in lines[:failed - 1])
            subprocess.run(["ip", "-force", "-batch", "-"], input=undo, capture_output=True, text=True)
            reason = next((x for x in err.splitlines() if x and not x.startswith("Command failed")), err.strip())
            raise click.ClickException(f"{file.name}:{lines[failed - 1][0]}: the kernel refused the route "
                                       f"({reason.strip()}); nothing was loaded")
    console.print(f"loaded {len(lines)} routes in {time.monotonic() - t0:.1f} s")


@route.command("show")
@click.argument("words", nargs=-1)
@click.option("-4", "v4", is_flag=True, help="IPv4 only.")
@click.option("-6", "v6", is_flag=True, help="IPv6 only.")
@click.option("--all", "show_all", is_flag=True,
              help="Every route the agent mirrors, also those not selected (asks the agent).")
@name_option
@json_options
def route_show(words, v4, v6, show_all, name, as_json, pretty):
    """Routes in the data plane's FIB, with the protocol that installed each (its source).

    `table N` (a number, main, local or default) shows one table, `table
    all` every table; without it, local and main, which the fast path
    looks up as one."""
    from .fib import kernel_route_info, read_installed  # (numpy: only where routes are read)
    from .routespec import parse_table
    table: int | None = None
    if words:
        if len(words) != 2 or words[0] != "table":
            raise click.ClickException(f"unexpected {' '.join(words)!r}: expected table N|main|local|default|all")
        table = 0 if words[1] == "all" else parse_table(words[1])
    meta = router.resolve(name)
    if show_all:
        return _route_show_all(meta, v4, v6, as_json, pretty, table)
    dp = Datapath.open(meta.name)
    try:
        rows = []
        for prefix, v, hops, tid in read_installed(dp, table):
            if (v4 and prefix.version != 4) or (v6 and prefix.version != 6):
                continue
            kernel, multipath = v.type == RouteType.KERNEL, v.type == RouteType.MULTIPATH
            nh = hops[0] if hops and not multipath else None
            rows.append({"prefix": str(prefix), "type": RouteType(v.type).name.lower(),
                         "table": table_name(tid) if tid else "local" if v.type == RouteType.LOCAL else "main",
                         "proto": proto_name(v.proto),
                         "gateway": str(nh.gateway) if nh and nh.gateway else None,
                         "dev": ifname(nh.ifindex) if nh else None,
                         "nexthop_id": (v.nh_id or None) if not kernel and not multipath else None,
                         "group": v.nh_id if multipath else None,
                         "nexthops": [{"gateway": str(h.gateway) if h.gateway else None, "dev": ifname(h.ifindex)}
                                      for h in hops] if multipath else None,
                         "passed": kernel_route_info(v.nh_id) if kernel else None})
    finally:
        dp.close()
    if as_json or pretty:
        return emit_json(rows, pretty)
    for r in rows:
        words = [r["prefix"] if r["type"] == "unicast" else f"{r['type']} {r['prefix']}"]
        if r["passed"]:
            words.append(_passed_words(r["passed"]))
        if r["gateway"]:
            words.append(f"via {r['gateway']}")
        if r["dev"]:
            words.append(f"dev {r['dev']}")
        for h in r["nexthops"] or []:
            words += ["nexthop"] + ([f"via {h['gateway']}"] if h["gateway"] else []) + [f"dev {h['dev']}"]
        words.append(f"proto {r['proto']}")
        if r["table"] != "main":
            words.append(f"table {r['table']}")
        console.print(" ".join(words))


def _passed_words(info: dict) -> str:
    """How `route show` says why a KERNEL route's packets go to the kernel."""
    what = f"encap {info['encap']}" if info["encap"] else info["kernel_type"]
    return f"({what}: passed to the kernel, reason {info['reason']})"


def _route_show_all(meta, v4, v6, as_json, pretty, table: int | None):
    resp = request(meta.name, "routes")
    want = None if table is None else table_name(table)
    rows = [r for r in resp["routes"] if not ((v4 and ":" in r["prefix"]) or (v6 and ":" not in r["prefix"]))
            and (r["table"] == want if want else table == 0 or r["table"] in ("main", "local"))]
    for r in rows:
        for nh in r["nexthops"]:
            nh["dev"] = ifname(nh.pop("ifindex"))
    if as_json or pretty:
        return emit_json(rows, pretty)
    for r in rows:
        words = ["*" if r["selected"] else " ", r["prefix"] if r["type"] == "unicast" else f"{r['type']} {r['prefix']}"]
        if r.get("passed"):
            words.append(_passed_words(r["passed"]))
        for nh in r["nexthops"]:
            words += (["nexthop"] if len(r["nexthops"]) > 1 else []) + \
                ([f"via {nh['gateway']}"] if nh["gateway"] else []) + [f"dev {nh['dev']}"]
        words += [f"proto {r['proto']}", f"metric {r['metric']}"] + ([f"table {r['table']}"] if r["table"] != "main" else [])
        console.print(" ".join(words))


@route.command("get", context_settings={"ignore_unknown_options": True})
@click.argument("address")
@click.argument("extra", nargs=-1)
@name_option
@json_options
def route_get(address, extra, name, as_json, pretty):
    """Ask the loaded program what it does with a packet to ADDRESS.

    Optional words, as `ip route get` takes them: `from SRC`, `iif IFACE`,
    `mark N`, `ipproto tcp|udp|icmp|N`, `sport N`, `dport N`, `tos N`,
    `flowlabel N`, and `ttl N`. The probe packet runs through the live program
    (BPF_PROG_TEST_RUN) against the live maps; it is not sent and not
    counted. For a multipath route it shows the flow's hash and the path or
    bucket taken."""
    dst = parse_address(address, "destination")
    opts = dict(zip(extra[::2], extra[1::2], strict=False))  # an odd word is reported below
    unknown = set(opts) - {"from", "iif", "ttl", "ipproto", "sport", "dport", "tos", "dsfield", "flowlabel",
                           "mark", "fwmark"} or (len(extra) % 2 and {extra[-1]})
    if unknown:
        raise click.ClickException(f"unexpected {sorted(unknown)[0]!r}: expected from SRC, iif IFACE, mark N, "
                                   "ipproto tcp|udp|icmp|N, sport N, dport N, tos N, flowlabel N, ttl N")
    word = opts.get("ipproto", "udp").lower()
    proto = {"udp": 17, "tcp": 6, "icmp": 1, "ipv6-icmp": 58, "icmpv6": 58}.get(word)
    if proto is None and word.isdigit() and int(word) < 256:
        proto = int(word)
    if proto is None:
        raise click.ClickException(f"invalid ipproto {opts['ipproto']!r}: expected tcp, udp, icmp or 0..255")
    fields = {}
    for word, top in (("sport", 65535), ("dport", 65535), ("tos", 255), ("dsfield", 255), ("flowlabel", 0xFFFFF),
                      ("mark", 0xFFFFFFFF), ("fwmark", 0xFFFFFFFF)):
        if word in opts:
            try:
                fields[word] = int(opts[word], 0)
            except ValueError:
                fields[word] = -1
            if not 0 <= fields[word] <= top:
                raise click.ClickException(f"invalid {word} {opts[word]!r}: expected 0..{top}")
    meta = router.resolve(name)
    dp = Datapath.open(meta.name)
    try:
        configured = Interfaces(dp).configured()
        if "iif" in opts:
            try:
                iif = socket.if_nametoindex(opts["iif"])
            except OSError:
                raise click.ClickException(f"unknown interface {opts['iif']!r}") from None
            if iif not in configured:
                raise click.ClickException(f"{opts['iif']} is not attached to router {meta.name}")
        else:
            iif = min(configured)
        src = parse_address(opts["from"], "source") if "from" in opts else None
        if src is not None and src.version != dst.version:
            raise click.ClickException("source and destination are of different IP versions")
        ttl = opts.get("ttl", "64")
        if not ttl.isdigit() or not 0 <= int(ttl) <= 255:
            raise click.ClickException(f"invalid ttl {ttl!r}: expected 0..255")
        d = probe(dp, dst, iif, bytes(configured[iif].mac), src, int(ttl), proto=proto,
                  sport=fields.get("sport", 40000), dport=fields.get("dport", 33434),
                  tos=fields.get("tos", fields.get("dsfield", 0)), flowlabel=fields.get("flowlabel", 0),
                  mark=fields.get("mark", fields.get("fwmark", 0)))
    finally:
        dp.close()
    out = {
        "dst": d.dst, "iif": ifname(d.iif), "verdict": d.verdict, "reason": d.reason.label,
        "xdp_action": d.action, "route": None, "nexthop": None,
        "egress": ifname(d.egress_ifindex) if d.egress_ifindex else None,
        "neighbor": d.dmac if d.neigh_found else None, "smac": d.smac, "ttl": d.ttl_out,
    }
    if d.route_type:
        out["route"] = {"prefix": d.prefix, "type": d.route_type, "proto": d.proto}
    if d.nh_id or d.gateway:
        out["nexthop"] = {"id": d.nh_id or None, "gateway": d.gateway}
    out["ecmp"] = d.ecmp
    out["rule"] = d.rule
    if d.rule and d.rule["table"] and out["route"]:
        out["route"]["table"] = d.rule["table"]
    if as_json or pretty:
        return emit_json(out, pretty)
    line = [d.dst]
    if out["route"] and out["route"]["prefix"]:
        line.append(f"route {out['route']['prefix']} ({out['route']['type']}, proto {out['route']['proto']})")
    elif out["route"]:
        line.append(f"route {out['route']['type']}")
    if d.gateway:
        line.append(f"via {d.gateway}")
    if out["egress"]:
        line.append(f"dev {out['egress']}")
    if out["neighbor"]:
        line.append(f"lladdr {out['neighbor']}")
    console.print(" ".join(line))
    console.print(f"    verdict {d.verdict} ({out['reason']}), xdp {d.action}, iif {out['iif']}"
                  + (f", ttl {d.ttl_in}->{d.ttl_out}" if d.ttl_out is not None else ""))
    if d.rule:
        console.print(f"    {rule_text(d.rule)}")
    if d.ecmp:
        console.print(f"    ecmp {ecmp_text(d.ecmp)}")


@cli.command()
@click.option("--count", "-c", default=2000, show_default=True, help="Destinations per IP version.")
@click.option("--seed", default=None, type=int, help="Random seed (to repeat a run).")
@click.option("-4", "v4", is_flag=True, help="IPv4 only.")
@click.option("-6", "v6", is_flag=True, help="IPv6 only.")
@name_option
@json_options
def verify(count, seed, v4, v6, name, as_json, pretty):
    """Check that the data plane forwards like the kernel FIB.

    For sampled destinations (half inside installed prefixes), compare the
    decision of the loaded program (as `route get`) with `ip route get`.
    Exits 1 on any difference."""
    import numpy as np
    from pyroute2 import IPRoute
    from .fib import read_installed
    from .fibcheck import sample_destinations, verify as run_verify
    meta = router.resolve(name)
    dp = Datapath.open(meta.name)
    rng = np.random.default_rng(seed)
    try:
        configured = Interfaces(dp).configured()
        iif = min(configured)
        prefixes = [p for p, _, _, _ in read_installed(dp)]
        result = {"checked": 0, "mismatches": []}
        versions = [4] if v4 else [6] if v6 else [4, 6]
        with IPRoute() as ipr, SyncProgress("comparing with the kernel", total=count * len(versions),
                                            quiet=as_json or pretty) as bar:
            for version in versions:
                dests = sample_destinations(rng, [p for p in prefixes if p.version == version], count, version)
                n, bad = run_verify(dp, dests, iif, bytes(configured[iif].mac), ipr,
                                    progress=lambda i: bar.update(completed=result["checked"] + i))
                result["checked"] += n
                result["mismatches"] += [{"dst": m.dst, "kernel": str(m.kernel), "dataplane": str(m.dataplane)}
                                         for m in bad]
    finally:
        dp.close()
    if as_json or pretty:
        emit_json(result, pretty)
    else:
        for m in result["mismatches"][:20]:
            console.print(f"{m['dst']}: kernel {m['kernel']}, data plane {m['dataplane']}")
        console.print(f"{result['checked']} destinations checked, {len(result['mismatches'])} differ")
    if result["mismatches"]:
        sys.exit(1)


@cli.group()
def neigh():
    """Neighbors mirrored into the data plane."""


@neigh.command("show")
@name_option
@json_options
def neigh_show(name, as_json, pretty):
    from .neighbors import Neighbors
    meta = router.resolve(name)
    dp = Datapath.open(meta.name)
    try:
        rows = [{"dst": str(a), "dev": ifname(i), "lladdr": mac_str(mac),
                 "state": state} for i, a, mac, state in Neighbors(dp).entries()]
    finally:
        dp.close()
    if as_json or pretty:
        return emit_json(rows, pretty)
    for r in rows:
        console.print(f"{r['dst']} dev {r['dev']} lladdr {r['lladdr']}")


# --- agent --------------------------------------------------------------------------------
@cli.group()
def agent():
    """The agent that mirrors the kernel's routes and neighbors into the data plane."""


def _run_agent(name):
    from .agent.agent import Agent
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    Agent(name).run()


@agent.command("run")
@name_option
def agent_run(name):
    """Run the agent in the foreground (what `up` starts in the background)."""
    _run_agent(router.resolve(name).name)


@agent.command("start")
@name_option
def agent_start(name):
    """Start the agent in the background; it resyncs with the running data plane."""
    meta = router.resolve(name)
    with SyncProgress("starting the agent") as bar:
        pid = start_agent(meta.name, meta.netns, progress=bar.agent)
    console.print(f"agent of router {meta.name} running, pid {pid}")


@agent.command("stop")
@name_option
def agent_stop(name):
    """Stop the agent; the data plane keeps forwarding with its last state."""
    meta = router.resolve(name)
    if not stop_agent(meta.name):
        raise click.ClickException(f"the agent of router {meta.name} is not running")
    console.print(f"agent of router {meta.name} stopped; the data plane keeps forwarding")


# --- lab ------------------------------------------------------------------------------------
@cli.group()
def lab():
    """The built-in namespace lab: h1 -- r -- h2 (see docs/lab.md)."""


lab_name = click.option("--lab", "lab_name", default="lab", show_default=True, help="Lab name (prefix of its namespaces).")


@lab.command("up")
@lab_name
@click.option("--backends", type=click.IntRange(0, 8), default=0, show_default=True,
              help="Backend hosts b1..bN behind the router, for services (docs/lb.md).")
def lab_up(lab_name, backends):
    """Create the lab's namespaces and veth pairs (replacing a lab of the same name)."""
    lb = Lab(lab_name, backends)
    lb.up()
    console.print(f"lab {lab_name} up: h1 {lb.addr('h1')}/{lb.addr('h1', 6)} -- {lb.router_ns} -- "
                  f"h2 {lb.addr('h2')}/{lb.addr('h2', 6)}")
    for i in range(1, backends + 1):
        console.print(f"  backend b{i} {lb.addr(f'b{i}')}/{lb.addr(f'b{i}', 6)} behind r-eth{i + 1}")
    ports = " ".join(p for p, *_ in lb.router_ports())
    console.print(f"start the router: bpfrouter --netns {lb.router_ns} up {ports} --name {lab_name}")


@lab.command("down")
@lab_name
def lab_down(lab_name):
    """Stop the lab's router and remove its namespaces."""
    Lab(lab_name).down()
    console.print(f"lab {lab_name} down")


@lab.command("list")
def lab_list():
    """Labs present on this machine."""
    for name in list_labs():
        console.print(name)



from . import cli_observe  # noqa: E402,F401  (registers events, flows, top, capture, explain, metrics)
from . import cli_service  # noqa: E402,F401  (registers service)


def main():
    try:
        cli.main(prog_name="bpfrouter", standalone_mode=False)
    except click.UsageError as e:  # one line, not click's usage block
        where = f"bpfrouter {e.ctx.command_path.split(' ', 1)[1]} --help" if e.ctx and ' ' in e.ctx.command_path \
            else "bpfrouter --help"
        click.echo(f"Error: {e.format_message()} (see `{where}`)", err=True)
        sys.exit(2)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (click.Abort, KeyboardInterrupt):
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
