"""Prometheus metrics, read from the pinned maps at every scrape.

Served by `bpfrouter metrics --listen ADDR:PORT` and, with
`bpfrouter up --metrics ADDR:PORT`, by the agent. Names follow Prometheus
conventions: `_total` counters, base units (bytes, seconds), and labels
for router, interface, verdict and reason."""
from __future__ import annotations

import os

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from .datapath import Datapath
from .fib import fib_memory
from .interfaces import ifname
from .observe import read_counters
from . import xmit
from .policy.image import packets_by_table
from .telemetry import flow_table_stats, map_fill, obs_stats

BPF_STATS = "/proc/sys/kernel/bpf_stats_enabled"


def parse_listen(text: str) -> tuple[str, int]:
    """ADDR:PORT (IPv6 as [ADDR]:PORT, or :PORT for every address)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"invalid listen address {text!r}: expected ADDR:PORT, e.g. 127.0.0.1:9469")
    return host.strip("[]") or "0.0.0.0", int(port)


def bpf_stats_enabled() -> bool:
    try:
        with open(BPF_STATS) as f:
            return f.read().strip() == "1"
    except OSError:
        return False


class RouterCollector(Collector):
    """Every metric of one router, collected from its maps on each scrape."""

    def __init__(self, name: str, fib_full=None, rule_counts=None, services=None):
        self.name = name
        self.fib_full = fib_full  # the agent's Fib.full_status, when the agent serves
        self.rule_counts = rule_counts  # the agent's Agent.rule_counts
        self.services = services  # the agent's `services` answer (agent/lb.py: Balancer.request)

    def collect(self):
        dp = Datapath.open(self.name)
        try:
            yield from self._collect(dp)
        finally:
            dp.close()

    def _collect(self, dp: Datapath):
        r = self.name
        pk = CounterMetricFamily("bpfrouter_packets", "Packets the XDP program decided on, by ingress "
                                 "interface, verdict and reason.", labels=["router", "interface", "verdict", "reason"])
        by = CounterMetricFamily("bpfrouter_bytes", "Bytes the XDP program decided on, by ingress interface, "
                                 "verdict and reason.", labels=["router", "interface", "verdict", "reason"])
        for (idx, reason), (p, b) in read_counters(dp).items():
            labels = [r, ifname(idx) if idx else "unknown", reason.verdict, reason.label]
            pk.add_metric(labels, p)
            by.add_metric(labels, b)
        yield pk
        yield by
        rd = CounterMetricFamily("bpfrouter_redirect_packets", "What became of the frames XDP redirected, by "
                                 "egress interface: sent (taken by its driver) or the reason it was lost.",
                                 labels=["router", "interface", "outcome"])
        for (idx, outcome), n in xmit.read(dp).items():
            rd.add_metric([r, ifname(idx) if idx else "unknown", outcome.label], n)
        yield rd

        memory = fib_memory(dp)
        routes = GaugeMetricFamily("bpfrouter_fib_routes", "Routes in the data plane's FIB.",
                                   labels=["router", "family"])
        mem = GaugeMetricFamily("bpfrouter_fib_memory_bytes", "Memory the FIB structure holds in the kernel.",
                                labels=["router", "family"])
        for v, m in memory.items():
            routes.add_metric([r, f"ipv{v}"], m["routes"])
            mem.add_metric([r, f"ipv{v}"], m["bytes"])
        yield routes
        yield mem
        if self.fib_full is not None:
            full = self.fib_full() or {"left_out": 0, "withheld": 0}
            yield _gauge("bpfrouter_fib_left_out_routes", "Routes the full FIB had no room for: their traffic, "
                         "and that of the routes covering them, is passed to the kernel.", r, full["left_out"])
            yield _gauge("bpfrouter_fib_withheld_routes", "Routes kept out of the fast path because they cover "
                         "a route left out.", r, full["withheld"])

        fill = map_fill(dp, memory)
        entries = GaugeMetricFamily("bpfrouter_map_entries", "Entries in a BPF map.", labels=["router", "map"])
        cap = GaugeMetricFamily("bpfrouter_map_capacity", "Capacity of a BPF map.", labels=["router", "map"])
        ratio = GaugeMetricFamily("bpfrouter_map_fill_ratio", "Entries over capacity (0..1).",
                                  labels=["router", "map"])
        for m, v in fill.items():
            entries.add_metric([r, m], v["entries"])
            cap.add_metric([r, m], v["capacity"])
            ratio.add_metric([r, m], v["entries"] / v["capacity"] if v["capacity"] else 0.0)
        yield entries
        yield cap
        yield ratio
        yield _gauge("bpfrouter_neighbors", "Neighbor entries mirrored from the kernel.", r,
                     fill["neighbors"]["entries"])
        st = obs_stats(dp)
        ev = CounterMetricFamily("bpfrouter_events", "Drop and pass events: sent to user space, held back by "
                                 "the per-reason rate cap, or lost to a full ring buffer.",
                                 labels=["router", "outcome"])
        for outcome in ("sent", "suppressed", "lost"):
            ev.add_metric([r, outcome], st[f"events_{outcome}"])
        yield ev
        ft = flow_table_stats(dp, fill["flows"]["entries"], st)
        yield _counter("bpfrouter_flows_created", "Flows inserted into the flow table.", r, ft["created"])
        yield _counter("bpfrouter_flows_evicted", "Flows the LRU flow table evicted (created minus present).",
                       r, ft["evicted"])
        cp = CounterMetricFamily("bpfrouter_capture_packets", "Packets copied to a running capture, or lost "
                                 "to a full capture ring.", labels=["router", "outcome"])
        cp.add_metric([r, "captured"], st["captured"])
        cp.add_metric([r, "lost"], st["capture_lost"])
        yield cp

        if self.rule_counts is not None:
            rules = self.rule_counts()
            per_rule = CounterMetricFamily("bpfrouter_rule_packets", "Packets each rule the fast path walks "
                                           "decided (its table's route, or its action).",
                                           labels=["router", "family", "priority", "rule"])
            per_table = CounterMetricFamily("bpfrouter_table_packets", "Packets routed by each table that "
                                            "rules looked up.", labels=["router", "family", "table"])
            for x in rules:
                per_rule.add_metric([r, x["family"], str(x["priority"]), x["rule"]], x["packets"])
            for fam, tables in sorted(packets_by_table(rules).items()):
                for table, n in sorted(tables.items()):
                    per_table.add_metric([r, fam, table], n)
            yield per_rule
            yield per_table
        if self.services is not None:
            yield from lb_metrics(r, self.services())
        runs, run_ns = dp.program_stats()
        yield _gauge("bpfrouter_program_stats_enabled", "1 when kernel.bpf_stats_enabled=1, which the run "
                     "count and time below need.", r, 1 if bpf_stats_enabled() else 0)
        yield _counter("bpfrouter_program_runs", "Runs of the XDP programs, with and without the capture "
                       "hook (kernel.bpf_stats_enabled=1).", r, runs)
        yield _counter("bpfrouter_program_run_seconds", "Time spent in the XDP programs, with and without "
                       "the capture hook (kernel.bpf_stats_enabled=1).", r, run_ns / 1e9)


LB_STATS = {  # lb_stat field -> (metric, help)
    "packets": ("bpfrouter_lb_packets", "Packets sent to a service's backends."),
    "new_flows": ("bpfrouter_lb_new_flows", "Flows without a connection entry, given a backend by the table."),
    "unlearned": ("bpfrouter_lb_unlearned_flows", "New flows the connection table did not learn: over "
                  "new-conn-limit (the flood switch)."),
    "flood_windows": ("bpfrouter_lb_flood_windows", "One-second windows of a CPU that went over new-conn-limit."),
    "no_backend": ("bpfrouter_lb_no_backend_drops", "Packets dropped: no backend takes new flows."),
    "too_big": ("bpfrouter_lb_too_big_answers", "Packets over the MTU toward their backend (once encapsulated, "
                "or translated), answered with ICMP fragmentation needed or packet too big from the VIP."),
}


def lb_metrics(r: str, answer: dict):
    """The load balancer's metrics from the agent's `services` answer."""
    services = answer.get("services", [])
    for field, (name, doc) in LB_STATS.items():
        m = CounterMetricFamily(name, doc, labels=["router", "service"])
        for s in services:
            m.add_metric([r, s["service"]], s["stats"].get(field, 0))
        yield m
    be = CounterMetricFamily("bpfrouter_lb_backend_packets", "Packets sent to each backend.",
                             labels=["router", "service", "backend"])
    up = GaugeMetricFamily("bpfrouter_lb_backend_state", "1 for the backend's state (active, draining, "
                           "unhealthy).", labels=["router", "service", "backend", "state"])
    share = GaugeMetricFamily("bpfrouter_lb_backend_share", "The backend's share of its service's table.",
                              labels=["router", "service", "backend"])
    for s in services:
        for b in s["backends"]:
            be.add_metric([r, s["service"], b["address"]], b["packets"])
            share.add_metric([r, s["service"], b["address"]], b["share"])
            for state in ("active", "draining", "unhealthy"):
                up.add_metric([r, s["service"], b["address"], state], 1 if b["state"] == state else 0)
    load = GaugeMetricFamily("bpfrouter_lb_max_over_avg_load", "Maglev's max/avg load: the busiest backend's "
                             "share of the table over what its weight asks for.", labels=["router", "service"])
    moved = GaugeMetricFamily("bpfrouter_lb_moved_ratio", "The share of flows the service's last table change "
                              "moved.", labels=["router", "service"])
    for s in services:
        load.add_metric([r, s["service"]], s["max_over_avg_load"])
        if s["moved_last_change"] is not None:
            moved.add_metric([r, s["service"]], s["moved_last_change"])
    tr = CounterMetricFamily("bpfrouter_lb_health_transitions", "Backends becoming healthy or unhealthy, by "
                             "their health checks.", labels=["router", "service", "backend", "to"])
    for t in answer.get("transitions", []):
        tr.add_metric([r, t["service"], t["backend"], t["to"]], t["count"])
    yield from (be, up, share, load, moved, tr)


def _counter(name: str, doc: str, router_name: str, value: float) -> CounterMetricFamily:
    m = CounterMetricFamily(name, doc, labels=["router"])
    m.add_metric([router_name], value)
    return m


def _gauge(name: str, doc: str, router_name: str, value: float) -> GaugeMetricFamily:
    m = GaugeMetricFamily(name, doc, labels=["router"])
    m.add_metric([router_name], value)
    return m


def registry_for(name: str, fib_full=None, rule_counts=None, services=None) -> CollectorRegistry:
    reg = CollectorRegistry()
    reg.register(RouterCollector(name, fib_full, rule_counts, services))
    return reg


def serve(name: str, listen: str, fib_full=None, rule_counts=None, services=None):
    """Start the HTTP endpoint in a background thread; returns (server, thread)."""
    from prometheus_client import start_http_server
    host, port = parse_listen(listen)
    try:
        return start_http_server(port, addr=host, registry=registry_for(name, fib_full, rule_counts, services))
    except OSError as e:
        raise ValueError(f"cannot listen on {listen}: {os.strerror(e.errno) if e.errno else e}") from None
