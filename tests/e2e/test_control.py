"""Control plane against a running BPF-FIB router: CLI routes, sources and
precedence, agent restart, netlink overrun resync."""
import os
import signal

from bpfrouter.agent.client import agent_pid

from .conftest import wait_for


def test_cli_route_add_del(bpf_router):
    r, lab = bpf_router, bpf_router.lab
    lab.run("h2", ["ip", "addr", "add", "10.99.0.1/32", "dev", "lo"], check=True)
    assert r.ping("h1", "10.0.2.2", count=1)
    r.cli("route", "add", "10.99.0.0/16", "via", "10.0.2.2")
    got = r.json("route", "get", "10.99.0.1")
    assert got["route"] == {"prefix": "10.99.0.0/16", "type": "unicast", "proto": "bpfrouter"}
    kernel = lab.run("r", ["ip", "route", "show", "10.99.0.0/16"], check=True).stdout
    assert "via 10.0.2.2" in kernel and "proto 250" in kernel, "the kernel FIB must hold the route too"
    assert got["nexthop"]["gateway"] == "10.0.2.2" and got["egress"] == "r-eth1" and got["verdict"] == "redirect"
    before = r.forwarded()
    assert r.ping("h1", "10.99.0.1", count=3)
    assert r.forwarded() - before >= 6
    shown = [x for x in r.json("route", "show") if x["prefix"] == "10.99.0.0/16"]
    assert shown == [{"prefix": "10.99.0.0/16", "type": "unicast", "table": "main", "proto": "bpfrouter",
                      "gateway": "10.0.2.2", "dev": "r-eth1", "nexthop_id": shown[0]["nexthop_id"], "group": None,
                      "nexthops": None, "passed": None}]
    dup = r.cli("route", "add", "10.99.0.0/16", "via", "10.0.2.2", check=False)
    assert dup.returncode != 0 and "already exists" in dup.stderr
    r.cli("route", "replace", "10.99.0.0/16", "dev", "r-eth1")
    assert r.json("route", "get", "10.99.0.1")["nexthop"]["gateway"] is None
    r.cli("route", "del", "10.99.0.0/16")
    assert r.json("route", "get", "10.99.0.1")["reason"] == "fib_miss"
    assert not r.ping("h1", "10.99.0.1", count=1)


def test_cli_routes_in_another_table(bpf_router):
    """`route add|show|del ... table N`, and a rule that sends packets there."""
    r, lab = bpf_router, bpf_router.lab
    r.cli("route", "add", "10.97.0.0/16", "via", "10.0.1.2", "table", "100")
    try:
        kernel = lab.run("r", ["ip", "route", "show", "table", "100"], check=True).stdout
        assert "10.97.0.0/16 via 10.0.1.2" in kernel and "proto 250" in kernel
        shown = r.json("route", "show", "table", "100")
        assert [(x["prefix"], x["table"], x["gateway"], x["proto"]) for x in shown] == \
            [("10.97.0.0/16", "100", "10.0.1.2", "bpfrouter")]
        assert not [x for x in r.json("route", "show") if x["prefix"] == "10.97.0.0/16"], "not in main"
        assert [x["table"] for x in r.json("route", "show", "table", "all") if x["prefix"] == "10.97.0.0/16"] == ["100"]
        assert "table 100" in r.cli("route", "show", "table", "100").stdout
        # no rule looks table 100 up yet: main has no route
        assert r.json("route", "get", "10.97.1.1", "from", "10.0.1.2")["reason"] == "fib_miss"
        lab.run("r", ["ip", "rule", "add", "pref", "150", "iif", "r-eth0", "lookup", "100"], check=True)
        got = wait_for(lambda: (g := r.json("route", "get", "10.97.1.1", "from", "10.0.1.2", "iif", "r-eth0"))
                       ["rule"] and g, timeout=10)
        assert got["route"]["table"] == "100" and got["route"]["prefix"] == "10.97.0.0/16"
        assert (got["rule"]["priority"], got["rule"]["table"], got["egress"]) == (150, "100", "r-eth0")
        assert "rule 150 (lookup table 100)" in r.cli("route", "get", "10.97.1.1", "iif", "r-eth0").stdout
        dup = r.cli("route", "add", "10.97.0.0/16", "via", "10.0.1.2", "table", "100", check=False)
        assert dup.returncode != 0 and "already exists" in dup.stderr
        r.cli("route", "del", "10.97.0.0/16", "table", "100")
        assert r.json("route", "show", "table", "100") == []
        assert "10.97.0.0/16" not in lab.run("r", ["ip", "route", "show", "table", "100"], check=True).stdout
    finally:
        lab.run("r", ["ip", "rule", "del", "pref", "150"])
        lab.run("r", ["ip", "route", "flush", "table", "100"])
    for bad, why in ((["table", "x"], "invalid table 'x'"), (["table", "0"], "invalid table '0'")):
        p = r.cli("route", "add", "10.97.0.0/16", "via", "10.0.1.2", *bad, check=False)
        assert p.returncode != 0 and why in p.stderr and "Traceback" not in p.stderr
    p = r.cli("route", "show", "table", check=False)
    assert p.returncode != 0 and "expected table N" in p.stderr


def test_bpfrouter_route_with_lower_metric_wins_and_blackhole_counts_drops(bpf_router):
    r, lab = bpf_router, bpf_router.lab
    lab.run("h2", ["ip", "addr", "add", "10.93.0.1/32", "dev", "lo"], check=True)
    # a routing daemon's route, as `ip route` installs it
    lab.run("r", ["ip", "route", "add", "10.93.0.0/16", "via", "10.0.2.2", "metric", "100"], check=True)
    assert r.ping("h1", "10.93.0.1", count=1)
    r.cli("route", "add", "blackhole", "10.93.0.0/16")
    assert r.json("route", "get", "10.93.0.1")["route"] == {"prefix": "10.93.0.0/16", "type": "blackhole",
                                                            "proto": "bpfrouter"}
    rib = [(x["type"], x["proto"], x["metric"], x["selected"]) for x in r.json("route", "show", "--all")
           if x["prefix"] == "10.93.0.0/16"]
    assert sorted(rib) == [("blackhole", "bpfrouter", 0, True), ("unicast", "boot", 100, False)]
    before = r.counter("r-eth0", "blackhole")
    assert not r.ping("h1", "10.93.0.1", count=3)
    assert r.counter("r-eth0", "blackhole") - before == 3
    r.cli("route", "del", "10.93.0.0/16")
    got = r.json("route", "get", "10.93.0.1")
    assert got["route"]["proto"] == "boot" and got["route"]["type"] == "unicast"
    assert r.ping("h1", "10.93.0.1", count=1)
    theirs = r.cli("route", "del", "10.93.0.0/16", check=False)
    assert theirs.returncode != 0 and "proto boot" in theirs.stderr and "ip route del" in theirs.stderr
    same_slot = r.cli("route", "add", "10.0.2.0/24", "dev", "r-eth1", check=False)
    assert same_slot.returncode != 0 and "already exists (proto kernel)" in same_slot.stderr
    lab.run("r", ["ip", "route", "del", "10.93.0.0/16"], check=True)


def test_ipv6_static_route(bpf_router):
    r, lab = bpf_router, bpf_router.lab
    lab.run("h2", ["ip", "-6", "addr", "add", "fd99::1/128", "dev", "lo"], check=True)
    r.cli("route", "add", "fd99::/64", "via", "fd00:2::2")
    assert r.ping("h1", "fd99::1", count=2)
    assert r.json("route", "get", "fd99::1")["route"]["proto"] == "bpfrouter"
    r.cli("route", "add", "-6", "default", "via", "fd00:2::2")
    assert r.json("route", "get", "2001:db8::1")["route"]["prefix"] == "::/0"
    mem = r.json("status")["fib"]["memory"]["ipv6"]
    assert mem["impl"] == "hash" and 64 in mem["levels"] and 0 in mem["levels"] and mem["slots_used"] >= 2
    assert "IPv6 hash" in r.cli("status").stdout  # the memory line of the human view
    r.cli("route", "del", "-6", "default")
    r.cli("route", "del", "fd99::/64")


def test_agent_restart_keeps_forwarding_and_resyncs(bpf_router):
    r, lab = bpf_router, bpf_router.lab
    r.cli("route", "add", "10.95.0.0/16", "via", "10.0.2.2")
    pid = r.json("status")["agent"]["pid"]
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: not r.json("status")["agent"]["running"])
    before = r.forwarded()
    assert r.ping("h1", "10.0.2.2", count=3), "forwarding stopped with the agent"
    assert r.forwarded() - before >= 6
    lab.run("r", ["ip", "route", "add", "10.94.0.0/16", "via", "10.0.2.2"], check=True)
    assert r.json("route", "get", "10.94.0.1")["reason"] == "fib_miss"  # nobody mirrors it yet
    r.cli("agent", "start")
    assert r.json("route", "get", "10.94.0.1")["route"]["proto"] == "boot"
    assert r.json("route", "get", "10.95.0.1")["route"]["proto"] == "bpfrouter", "bpfrouter route lost on restart"
    r.cli("route", "del", "10.95.0.0/16")
    lab.run("r", ["ip", "route", "del", "10.94.0.0/16"], check=True)


def test_second_agent_is_refused(bpf_router):
    """One writer per router: a second agent would unlink the first one's
    socket and both would write the maps."""
    r, lab = bpf_router, bpf_router.lab
    pid = r.json("status")["agent"]["pid"]
    second = r.cli("agent", "run", check=False, timeout=60)
    assert second.returncode != 0
    assert second.stderr.strip().splitlines() == [second.stderr.strip()], "one line"
    assert "already runs" in second.stderr and f"pid {pid}" in second.stderr, second.stderr
    assert "Traceback" not in second.stderr + second.stdout
    agent = r.json("status")["agent"]
    assert agent["running"] and agent["pid"] == pid, "the first agent must still answer"
    lab.run("r", ["ip", "route", "add", "10.91.0.0/16", "via", "10.0.2.2"], check=True)
    assert wait_for(lambda: (r.json("route", "get", "10.91.0.1")["route"] or {}).get("prefix") == "10.91.0.0/16",
                    timeout=15), "the first agent must still mirror the kernel"
    lab.run("r", ["ip", "route", "del", "10.91.0.0/16"], check=True)


def test_netlink_overrun_triggers_full_resync(bpf_router, tmp_path):
    r, lab = bpf_router, bpf_router.lab
    r.cli("agent", "stop")
    env = dict(os.environ, BPFROUTER_NETLINK_RCVBUF="4096")
    import subprocess, sys
    subprocess.run([sys.executable, "-m", "bpfrouter", "agent", "start", "--name", r.name], env=env,
                   check=True, capture_output=True)
    base = r.json("status")["fib"]["ipv4"]
    batch = tmp_path / "routes"
    batch.write_text("".join(f"route add 10.{200 + i // 250}.{i % 250}.0/24 via 10.0.2.2\n" for i in range(3000)))
    # A stopped agent (descheduled, swapped out, stuck in a long write) is how a real overrun happens;
    # a reader that keeps up would make the overrun depend on the machine's speed.
    pid = agent_pid(r.name)
    os.kill(pid, signal.SIGSTOP)
    try:
        lab.run("r", ["ip", "-batch", str(batch)], check=True)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert wait_for(lambda: r.json("status")["fib"]["ipv4"] == base + 3000, timeout=10)
    st = r.json("status")
    assert st["agent"]["enobufs"] >= 1, "the overrun did not happen; the test proves nothing"
    assert r.json("route", "get", "10.211.5.1")["route"]["prefix"] == "10.211.5.0/24"
    lab.run("r", ["ip", "route", "flush", "proto", "boot"], check=True)
    assert wait_for(lambda: r.json("status")["fib"]["ipv4"] == base, timeout=10)
    r.cli("agent", "stop")
    r.cli("agent", "start")


def test_route_load_all_or_nothing_with_progress_on_a_terminal(bpf_router, tmp_path):
    import subprocess
    import sys
    r = bpf_router
    base = r.json("status")["fib"]["ipv4"]
    good = tmp_path / "routes"
    good.write_text("# a table\n" + "".join(f"route add 10.{150 + i // 200}.{i % 200}.0/24 via 10.0.2.2\n"
                                             for i in range(2000)) + "blackhole 10.149.0.0/16\n")
    # on a pseudo-terminal (script), the progress bar is drawn
    cmd = f"{sys.executable} -m bpfrouter route load {good} --name {r.name}"
    tty = subprocess.run(["script", "-qec", cmd, "/dev/null"], capture_output=True, text=True, timeout=120)
    assert tty.returncode == 0 and "installing routes" in tty.stdout and "loaded 2001 routes" in tty.stdout
    assert r.json("status")["fib"]["ipv4"] == base + 2001
    assert r.json("route", "get", "10.159.3.1")["route"]["proto"] == "bpfrouter"
    assert r.json("route", "get", "10.149.1.1")["verdict"] == "drop"
    # a refused line: nothing stays; and piped output has no progress drawing
    bad = tmp_path / "bad"
    bad.write_text("10.148.0.0/16 via 10.0.2.2\n10.147.0.0/16 via 10.66.66.66\n")
    proc = r.cli("route", "load", str(bad), check=False)
    assert proc.returncode != 0 and f"{bad}:2" in proc.stderr and "nothing was loaded" in proc.stderr
    assert "installing" not in proc.stdout
    assert r.json("route", "get", "10.148.0.1")["route"] is None or \
        r.json("route", "get", "10.148.0.1")["route"]["prefix"] != "10.148.0.0/16"
    syntax = tmp_path / "syntax"
    syntax.write_text("10.146.0.0/16 via 10.0.2.2\n10.145.0.0/40 via 10.0.2.2\n")
    proc = r.cli("route", "load", str(syntax), check=False)
    assert proc.returncode != 0 and f"{syntax}:2: invalid prefix" in proc.stderr
    assert r.json("route", "get", "10.146.0.1")["route"] is None or \
        r.json("route", "get", "10.146.0.1")["route"]["prefix"] != "10.146.0.0/16"
    r.lab.run("r", ["ip", "route", "flush", "proto", "250"], check=True)
