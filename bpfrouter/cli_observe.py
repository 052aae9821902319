"""The observability commands: events, flows, top, capture, explain, metrics."""
from __future__ import annotations

import contextlib
import json
import socket
import sys
import time

import click
from rich.console import Group as RichGroup
from rich.live import Live
from rich.table import Table

from . import router
from .agent.client import AgentUnavailable, request
from .capture import Capture, CaptureError, PcapFilter, PcapWriter
from .cli import cli, console, emit_json, json_options, name_option
from .datapath import Datapath
from .datapath import layout as lo
from .explain import (PacketSpecError, SPEC_HELP, explain, explain_lines, frame_summary, parse_hex, parse_spec,
                      read_pcap, spec_words)
from .interfaces import Interfaces, ifname
from .observe import read_counters
from .telemetry import (L4_NAMES, EventStream, clock, decode_event, event_line, flow_table_stats, iter_flows_sorted,
                        obs_stats, read_flows)
from .xmit import Outcome

REASON_LABELS = sorted(r.label for r in lo.Reason) + sorted(o.label for o in Outcome if o != Outcome.SENT)
err_console = console.__class__(stderr=True, highlight=False, soft_wrap=True)


def _attached_iface(dp: Datapath, name: str | None, router_name: str) -> int:
    """ifindex of an interface attached to the router (0 for None)."""
    if name is None:
        return 0
    try:
        idx = socket.if_nametoindex(name)
    except OSError:
        raise click.ClickException(f"unknown interface {name!r}") from None
    if idx not in Interfaces(dp).configured():
        raise click.ClickException(f"{name} is not attached to router {router_name}")
    return idx


def _require(meta, observer: str) -> None:
    if observer not in meta.observers:
        raise click.ClickException(f"router {meta.name} runs without the {observer} observer "
                                   f"(bpfrouter up --observers ...)")


def _until(count: int, duration: float | None):
    """A stop predicate: after `count` items (0: never) or `duration` seconds."""
    end = time.monotonic() + duration if duration else None
    return lambda seen: (count and seen >= count) or (end is not None and time.monotonic() >= end)


# --- events ----------------------------------------------------------------------------
@cli.command()
@click.option("--reason", "-r", "reasons", multiple=True, metavar="REASON",
              help="Only this reason (repeatable), e.g. fib_miss, no_neigh, blackhole (docs/reasons.md).")
@click.option("--iface", "-i", default=None, metavar="IFACE", help="Only packets that arrived on IFACE.")
@click.option("--count", "-c", default=0, type=click.IntRange(min=0), help="Stop after COUNT events.")
@click.option("--duration", default=None, type=click.FloatRange(min=0), metavar="SECONDS",
              help="Stop after SECONDS.")
@name_option
@json_options
def events(reasons, iface, count, duration, name, as_json, pretty):
    """Stream drop and pass-to-kernel events from the data plane, and
    redirects the egress port did not deliver (verdict redirect_lost).

    The data plane sends at most a fixed number of events per second per
    reason and CPU; what it holds back and what a full ring loses are
    counted (`bpfrouter status`). JSON: one object per line."""
    bad = [r for r in reasons if r not in REASON_LABELS]
    if bad:
        raise click.ClickException(f"unknown reason {bad[0]!r}: one of {', '.join(REASON_LABELS)}")
    meta = router.resolve(name)
    _require(meta, "events")
    dp = Datapath.open(meta.name)
    try:
        iif = _attached_iface(dp, iface, meta.name)
        seen = 0
        done = _until(count, duration)
        before = obs_stats(dp)

        def on_event(raw: bytes) -> None:
            nonlocal seen
            if done(seen):
                return
            ev = decode_event(raw)
            if reasons and ev["reason"] not in reasons or iif and ev["iface"] != iface:
                return
            seen += 1
            if as_json or pretty:
                click.echo(json.dumps(ev, indent=2 if pretty else None))
            else:
                console.print(event_line(ev), markup=False)
            sys.stdout.flush()

        stream = EventStream(dp, on_event)
        err_console.print(f"events of router {meta.name}" + (f" on {iface}" if iface else "") +
                          (f", reasons {', '.join(reasons)}" if reasons else "") + "; Ctrl-C to stop")
        try:
            while not done(seen):
                stream.poll(100)
        except KeyboardInterrupt:
            pass
        finally:
            stream.close()
        after = obs_stats(dp)
        held, lost = (after[k] - before[k] for k in ("events_suppressed", "events_lost"))
        if held or lost:
            err_console.print(f"{held} events over the rate cap, {lost} lost to a full ring while this ran")
    finally:
        dp.close()


# --- flows and top ------------------------------------------------------------------------
def _flow_filter(proto: str | None, host: str | None, verdict: str | None, iif: int):
    def keep(f) -> bool:
        return ((proto is None or L4_NAMES.get(f.proto) == proto) and
                (host is None or host in (f.src, f.dst)) and
                (verdict is None or f.reason.verdict == verdict) and (not iif or f.iface == iif))
    return keep


@cli.command()
@click.option("--sort", "sort_key", type=click.Choice(["packets", "bytes", "last", "first"]), default="packets",
              show_default=True)
@click.option("--limit", default=20, show_default=True, type=click.IntRange(min=0), help="0: every flow.")
@click.option("--proto", type=click.Choice(["tcp", "udp", "icmp", "icmp6"]), default=None)
@click.option("--host", default=None, metavar="ADDR", help="Only flows from or to ADDR.")
@click.option("--verdict", type=click.Choice(["redirect", "pass", "drop"]), default=None)
@click.option("--iface", "-i", default=None, metavar="IFACE", help="Only flows arriving on IFACE.")
@name_option
@json_options
def flows(sort_key, limit, proto, host, verdict, iface, name, as_json, pretty):
    """Flows the data plane has seen: packets, bytes, first and last seen,
    TCP flags and the last verdict per 5-tuple and VLAN."""
    meta = router.resolve(name)
    _require(meta, "flows")
    dp = Datapath.open(meta.name)
    try:
        iif = _attached_iface(dp, iface, meta.name)
        everything = read_flows(dp)
        table = flow_table_stats(dp, len(everything))
        keep = _flow_filter(proto, host, verdict, iif)
        rows = [f for f in iter_flows_sorted(everything, sort_key) if keep(f)]
        rows = rows[:limit] if limit else rows
        if as_json or pretty:
            return emit_json({"flows": [f.as_json() for f in rows], "table": table}, pretty)
        t = Table("proto", "source", "destination", "iface", "packets", "bytes", "flags", "verdict", "age",
                  box=None, pad_edge=False)
        now = time.time()
        for f in rows:
            j = f.as_json()
            src = f"{j['src']}:{j['sport']}" if j["sport"] is not None else j["src"]
            dst = f"{j['dst']}:{j['dport']}" if j["dport"] is not None else j["dst"]
            if "icmp_id" in j:  # one flow per type and echo id, as ping runs differ by id
                dst += f" type {j['icmp_type']} id {j['icmp_id']}"
            t.add_row(str(j["proto"]), src, dst, j["iface"], str(j["packets"]), str(j["bytes"]),
                      j["tcp_flags"] or "", f"{j['verdict']} {j['reason']}", f"{now - j['last_seen']:.0f}s")
        console.print(t)
        console.print(f"{len(rows)} of {table['entries']} flows shown; table capacity {table['capacity']}, "
                      f"{table['evicted']} evicted")
    finally:
        dp.close()


def _top_view(meta, counters_rate: dict, flow_rates: list, interval: float, table: dict):
    head = Table.grid(padding=(0, 2))
    head.add_row(f"[bold]bpfrouter top[/] router {meta.name}", f"refresh {interval:g}s",
                 f"flows {table['entries']}/{table['capacity']}, {table['evicted']} evicted",
                 time.strftime("%H:%M:%S"))
    per_if = Table("interface", "redirect pps", "pass pps", "drop pps", "bits/s", box=None, pad_edge=False,
                   title="per interface", title_justify="left")
    for iface in sorted(counters_rate):
        v = counters_rate[iface]
        per_if.add_row(iface, f"{v['redirect']:.0f}", f"{v['pass']:.0f}", f"{v['drop']:.0f}", f"{v['bits']:.0f}")
    fl = Table("proto", "source", "destination", "pps", "bits/s", "verdict", box=None, pad_edge=False,
               title="top flows", title_justify="left")
    for j, pps, bps in flow_rates:
        src = f"{j['src']}:{j['sport']}" if j["sport"] is not None else j["src"]
        dst = f"{j['dst']}:{j['dport']}" if j["dport"] is not None else j["dst"]
        fl.add_row(str(j["proto"]), src, dst, f"{pps:.0f}", f"{bps:.0f}", f"{j['verdict']} {j['reason']}")
    return RichGroup(head, per_if, fl)


@cli.command()
@click.option("--interval", "-d", default=1.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds between refreshes.")
@click.option("--count", "-c", default=0, type=click.IntRange(min=0), help="Stop after COUNT refreshes.")
@click.option("--limit", default=15, show_default=True, type=click.IntRange(min=1), help="Flows shown.")
@name_option
def top(interval, count, limit, name):
    """Live view of rates per interface and verdict, and the busiest flows."""
    meta = router.resolve(name)
    _require(meta, "flows")
    dp = Datapath.open(meta.name)

    def snapshot():
        per_if: dict[str, dict[str, float]] = {}
        for (idx, reason), (pk, by) in read_counters(dp).items():
            v = per_if.setdefault(ifname(idx) if idx else "unknown", {"redirect": 0, "pass": 0, "drop": 0, "bits": 0})
            v[reason.verdict] += pk
            v["bits"] += by * 8
        return time.monotonic(), per_if, {f.key: f for f in read_flows(dp)}

    try:
        prev = snapshot()
        shown = 0
        # on a terminal, one full screen refreshed in place; elsewhere, one view per refresh
        live = Live(console=console, screen=True, auto_refresh=False) if console.is_terminal else None
        with live or contextlib.nullcontext():
            while not count or shown < count:
                time.sleep(interval)
                cur = snapshot()
                dt = cur[0] - prev[0]
                rates = {i: {k: (v[k] - prev[1].get(i, {}).get(k, 0)) / dt for k in v} for i, v in cur[1].items()}
                frates = []
                for key, f in cur[2].items():
                    old = prev[2].get(key)
                    dpk, db = f.packets - (old.packets if old else 0), f.bytes - (old.bytes if old else 0)
                    if dpk > 0:
                        frates.append((f.as_json(), dpk / dt, db * 8 / dt))
                frates.sort(key=lambda x: -x[1])
                table = flow_table_stats(dp, len(cur[2]))
                view = _top_view(meta, rates, frates[:limit], interval, table)
                if live:
                    live.update(view, refresh=True)
                else:
                    console.print(view)
                prev = cur
                shown += 1
    except KeyboardInterrupt:
        pass
    finally:
        dp.close()


# --- capture ---------------------------------------------------------------------------
@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("expression", nargs=-1)
@click.option("--iface", "-i", default=None, metavar="IFACE", help="Only packets arriving on IFACE.")
@click.option("--write", "-w", "path", default=None, metavar="FILE",
              help="Write pcapng (the verdict in each packet's comment), or pcap if FILE ends in .pcap.")
@click.option("--count", "-c", default=0, type=click.IntRange(min=0), help="Stop after COUNT packets.")
@click.option("--verdict", type=click.Choice(["any", "drop", "pass", "redirect"]), default="any",
              show_default=True)
@click.option("--snaplen", "-s", default=lo.CAPTURE_MAX, show_default=True,
              type=click.IntRange(min=14, max=lo.CAPTURE_MAX), help="Bytes kept per packet.")
@click.option("--duration", default=None, type=click.FloatRange(min=0), metavar="SECONDS",
              help="Stop after SECONDS.")
@name_option
def capture(expression, iface, path, count, verdict, snaplen, duration, name):
    """Capture the packets the XDP program sees, with their verdict.

    EXPRESSION is a tcpdump filter (compiled by libpcap). Without -w, prints
    one line per packet. Redirected and dropped packets never reach tcpdump;
    here they do. A full capture ring skips packets (counted), never slows
    forwarding."""
    meta = router.resolve(name)
    _require(meta, "capture")
    dp = Datapath.open(meta.name)
    flt = writer = None
    try:
        iif = _attached_iface(dp, iface, meta.name)
        expr = " ".join(expression)
        flt = PcapFilter(expr) if expr else None
        cap = Capture(dp, iif, verdict, snaplen)
        writer = PcapWriter(path) if path else None
        got = 0
        done = _until(count, duration)
        before = obs_stats(dp)

        def on_packet(c) -> bool:
            nonlocal got
            if flt is not None and not flt.matches(c.data, c.wirelen):
                return True
            got += 1
            if writer:
                writer.write(c)
            else:
                out = f" -> {ifname(c.egress_ifindex)}" if c.verdict == "redirect" and c.egress_ifindex else ""
                console.print(f"{clock(c.time)} {ifname(c.ifindex)} {c.verdict} {c.reason.label}{out}: "
                              f"{frame_summary(c.data)}, length {c.wirelen}", markup=False)
            return not done(got)

        cap.start()  # before the announcement: what is sent after it is seen
        err_console.print(f"capturing at the XDP hook of router {meta.name}" + (f" on {iface}" if iface else "") +
                          f", verdict {verdict}" + (f", filter '{expr}'" if expr else "") +
                          (f", writing {path}" if path else "") + "; Ctrl-C to stop")
        try:
            cap.run(on_packet, stop=lambda: done(got))
        except KeyboardInterrupt:
            cap.stop()
        after = obs_stats(dp)
        err_console.print(f"{got} packets captured, {after['capture_lost'] - before['capture_lost']} skipped "
                          f"(capture ring full)")
    except CaptureError as e:
        raise click.ClickException(str(e)) from None
    finally:
        if writer:
            writer.close()
        if flt:
            flt.close()
        dp.close()


# --- explain ---------------------------------------------------------------------------
@cli.command("explain", context_settings={"ignore_unknown_options": True})
@click.argument("packet", nargs=-1)
@click.option("--hex", "hex_bytes", default=None, metavar="HEX", help="The frame as hex bytes.")
@click.option("--pcap", "pcap_path", default=None, metavar="FILE", help="Take the frame from a pcap/pcapng file.")
@click.option("--index", default=1, show_default=True, type=click.IntRange(min=1), help="Which packet of --pcap.")
@click.option("--iif", default=None, metavar="IFACE", help="Ingress interface (default: the first attached).")
@name_option
@json_options
def explain_cmd(packet, hex_bytes, pcap_path, index, iif, name, as_json, pretty):
    """Run one packet through the live program and show its decision path.

    PACKET: PROTO SRC[:PORT] > DST[:PORT] [iif IFACE] [ttl N] [flags SA]
    [len N] [vlan ID], e.g. 'tcp 10.0.1.2:40000 > 10.0.2.2:80 iif r-eth0'
    (one quoted argument or several words, with '>' quoted); or --hex BYTES,
    or --pcap FILE [--index N]. Nothing is sent or counted."""
    words = spec_words(packet)
    if "iif" in words:
        i = words.index("iif")
        if i + 1 >= len(words):
            raise click.ClickException("iif needs an interface name")
        iif = words[i + 1]
        del words[i:i + 2]
    given = [x for x in (words and "PACKET", hex_bytes and "--hex", pcap_path and "--pcap") if x]
    if len(given) != 1:
        raise click.ClickException(f"give exactly one packet: a description ({SPEC_HELP}), --hex or --pcap")
    meta = router.resolve(name)
    dp = Datapath.open(meta.name)
    try:
        configured = Interfaces(dp).configured()
        idx = _attached_iface(dp, iif, meta.name) if iif else min(configured)
        try:
            if words:
                frame = parse_spec(words, bytes(configured[idx].mac))
            elif hex_bytes:
                frame = parse_hex(hex_bytes)
            else:
                frame = read_pcap(pcap_path, index)
        except PacketSpecError as e:
            raise click.ClickException(str(e)) from None
        result = explain(dp, frame, idx, meta.fib_mode, meta.fib_impl)
    finally:
        dp.close()
    if as_json or pretty:
        return emit_json(result, pretty)
    for line in explain_lines(result):
        console.print(line, markup=False)


# --- metrics ---------------------------------------------------------------------------
@cli.command()
@click.option("--listen", "-l", default="127.0.0.1:9469", show_default=True, metavar="ADDR:PORT")
@click.option("--once", is_flag=True, help="Print the metrics once (Prometheus text format) and exit.")
@name_option
def metrics(listen, once, name):
    """Serve Prometheus metrics for a router until interrupted."""
    from prometheus_client import generate_latest

    from .metrics import parse_listen, registry_for, serve
    meta = router.resolve(name)

    def rule_counts() -> list[dict]:  # from the agent, which knows the rules
        from .policy.image import report_counts
        try:
            return report_counts(request(meta.name, "rules").get("families", {}))
        except AgentUnavailable:
            return []
    def services() -> dict:
        try:
            return request(meta.name, "services")
        except AgentUnavailable:
            return {}
    if once:
        click.echo(generate_latest(registry_for(meta.name, rule_counts=rule_counts, services=services)).decode(),
                   nl=False)
        return
    try:
        parse_listen(listen)
        server, _ = serve(meta.name, listen, rule_counts=rule_counts, services=services)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    err_console.print(f"metrics of router {meta.name} on http://{listen}/metrics; Ctrl-C to stop")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.shutdown()
