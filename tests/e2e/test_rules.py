"""`bpfrouter rule`: kernel rules added and deleted through the agent, rules
of bpfrouter's own (the exact DSCP), the packets each rule decides in `rule
show` and the metrics, and bad input. The rule walk's agreement with the
kernel is tests/e2e/test_policy_differential.py's."""
import re

from .conftest import wait_for


def metric(r, name: str, **labels) -> float:
    text = r.cli("metrics", "--once").stdout
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def rule_rows(r, family="ipv4") -> dict[int, dict]:
    return {x["priority"]: x for x in r.json("rule", "show")[family]["rules"]}


def test_kernel_and_own_rules(bpf_router):
    r, lab = bpf_router, bpf_router.lab
    lab.run("h2", ["ip", "addr", "add", "10.96.0.1/32", "dev", "lo"], check=True)
    r.cli("route", "add", "10.96.0.0/16", "via", "10.0.2.2", "table", "100")
    r.cli("route", "add", "blackhole", "10.96.0.0/16", "table", "101")
    try:
        # a kernel rule, added through the agent: in `ip rule` with protocol bpfrouter, walked on return
        r.cli("rule", "add", "pref", "100", "from", "10.0.1.0/24", "to", "10.96.0.0/16", "lookup", "100")
        assert re.search(r"^100:\s+from 10.0.1.0/24 to 10.96.0.0/16 lookup 100 proto 250$",
                         lab.run("r", ["ip", "rule", "show"], check=True).stdout, re.M)
        rows = rule_rows(r)
        assert rows[100]["fast_path"] == "walked" and rows[100]["packets"] == 0 and rows[100]["table"] == "100"
        assert r.ping("h1", "10.96.0.1", count=1)  # neighbors resolved (by the kernel)
        counted = rule_rows(r)[100]["packets"]
        before = r.forwarded()
        assert r.ping("h1", "10.96.0.1", count=3)
        assert r.forwarded() - before == 6  # both ways by XDP: table 100 there, main back
        assert rule_rows(r)[100]["packets"] - counted == 3
        assert metric(r, "bpfrouter_rule_packets_total", priority="100") == counted + 3
        assert metric(r, "bpfrouter_table_packets_total", table="100") == counted + 3
        st = r.json("status")["agent"]
        assert st["rule_packets"]["ipv4"]["100"] == counted + 3 and st["tables"]["100"] == {"ipv4": 1, "ipv6": 0}
        assert re.search(r"policy routing: ipv4: 4 rules walked; packets by table: .*\b100 \d+", r.cli("status").stdout)
        why = r.json("explain", "udp", "10.0.1.2:4000", ">", "10.96.0.1:53", "iif", "r-eth0")
        assert (why["rule"]["priority"], why["fib"]["table"], why["egress"]) == (100, "100", "r-eth1")
        assert "rule     rule 100 (lookup table 100)" in r.cli("explain", "udp", "10.0.1.2:4000", ">",
                                                               "10.96.0.1:53", "iif", "r-eth0").stdout

        # a rule of bpfrouter's own: DSCP 46 (EF) goes to table 101, which blackholes it
        r.cli("rule", "add", "pref", "50", "dscp", "46", "lookup", "101")
        assert "dscp" not in lab.run("r", ["ip", "rule", "show"], check=True).stdout, "the kernel has no such rule"
        rows = rule_rows(r)
        assert rows[50]["source"] == "bpfrouter (fast path only)" and rows[50]["fast_path"] == "walked"
        assert "[bpfrouter: fast path only]" in r.cli("rule", "show").stdout
        before = r.counter("r-eth0", "blackhole")
        assert not r.ping_tos("h1", "10.96.0.1", 0xB8, count=3)
        assert r.counter("r-eth0", "blackhole") - before == 3
        assert rule_rows(r)[50]["packets"] == 3
        assert r.ping("h1", "10.96.0.1", count=1), "other DSCPs still go by rule 100"
        got = r.json("route", "get", "10.96.0.1", "from", "10.0.1.2", "iif", "r-eth0", "tos", "0xb8")
        assert (got["reason"], got["rule"]["priority"], got["route"]["table"]) == ("blackhole", 50, "101")
        # an agent restart keeps it
        r.cli("agent", "stop")
        r.cli("agent", "start")
        assert wait_for(lambda: rule_rows(r).get(50, {}).get("fast_path") == "walked", timeout=30)

        r.cli("rule", "del", "pref", "50", "dscp", "46", "lookup", "101")
        r.cli("rule", "del", "pref", "100", "from", "10.0.1.0/24", "to", "10.96.0.0/16", "lookup", "100")
        assert set(rule_rows(r)) == {0, 32766, 32767}
        assert r.json("rule", "show")["ipv4"]["state"].startswith("default rules")
    finally:
        lab.run("r", ["ip", "rule", "del", "pref", "100"])
        lab.run("r", ["ip", "route", "flush", "table", "100"])
        lab.run("r", ["ip", "route", "flush", "table", "101"])
        lab.run("h2", ["ip", "addr", "del", "10.96.0.1/32", "dev", "lo"])


def test_bad_rules_are_refused_in_one_line(bpf_router):
    r = bpf_router
    for args, why in ((["pref", "5", "dscp", "64", "lookup", "100"], "invalid dscp '64'"),
                      (["dscp", "10", "lookup", "100"], "needs `pref N`"),
                      (["pref", "5", "dscp", "10", "lookup", "x"], "invalid table 'x'"),
                      (["pref", "5", "bogus", "1"], "the kernel refused the rule"),
                      (["pref", "5", "from", "10.0.0.0/8", "lookup", "main", "goto", "3"], "the kernel refused")):
        p = r.cli("rule", "add", *args, check=False)
        assert p.returncode != 0 and why in p.stderr and "Traceback" not in p.stderr, (args, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    p = r.cli("rule", "del", "pref", "5", "dscp", "10", "lookup", "100", check=False)
    assert p.returncode != 0 and "no rule of bpfrouter's own" in p.stderr
    assert set(rule_rows(r)) == {0, 32766, 32767}, "nothing half-applied"
