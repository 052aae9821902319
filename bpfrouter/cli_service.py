"""The load balancer's commands: `service add|del|show|set` and `service
backend add|del|weight|drain` (docs/lb.md)."""
from __future__ import annotations

import click

from . import router
from .agent.client import request
from .cli import cli, console, emit_json, json_options, name_option
from .lb.maglev import MaglevError
from .lb.service import BACKEND_USAGE, GUE_PORT, Service, ServiceError, apply_options, parse_backend_change, \
    parse_service_id

SERVICE_HELP = ("SERVICE is PROTO VIP[:PORT]: `tcp 10.0.0.100:80`, `udp [2001:db8::53]:53`, `tcp 10.0.0.100` "
                "(every port).")


def _ask(name: str | None, op: str, args: list[str]) -> dict:
    meta = router.resolve(name)
    resp = request(meta.name, op, args=args)
    if not resp.get("ok"):
        raise click.ClickException(resp.get("error", "request failed"))
    return resp


def _check_words(args: tuple[str, ...], then: str) -> None:
    """Syntax first, so a typo is one line even without an agent. `then`:
    what follows the service: options, a backend change (add, del, weight,
    drain), or nothing."""
    try:
        sid, rest = parse_service_id(list(args))
        if then == "options":
            apply_options(Service(sid), rest)
        elif then in BACKEND_USAGE:
            parse_backend_change(then, rest)
        elif rest:
            raise ServiceError(f"unexpected {' '.join(rest)!r} after the service")
    except (ServiceError, MaglevError) as e:
        raise click.ClickException(str(e)) from None


@cli.group()
def service():
    """L4 load-balanced services: a VIP, port and protocol spread over
    backends by Maglev hashing, sent to them encapsulated (direct server
    return) or translated (NAT)."""


@service.command("add", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, required=True)
@name_option
def service_add(args, name):
    """Add a service: SERVICE [mode dsr|nat] [encap ipip|gue] [table-size PRIME] [no-affinity]
    [check tcp|http|udp|exec|none] [check-port P] [path /P] [status N] [payload TEXT] [expect TEXT] [command 'CMD']
    [interval S] [timeout S] [rise N] [fall N]. The check defaults to a TCP connect
    to the service's port every second (rise 2, fall 3)."""
    _check_words(args, "options")
    _ask(name, "service_add", list(args))


@service.command("del")
@click.argument("args", nargs=-1, required=True)
@name_option
def service_del(args, name):
    """Delete a service (SERVICE): its packets are routed again."""
    _check_words(args, "nothing")
    _ask(name, "service_del", list(args))


@service.command("set")
@click.argument("args", nargs=-1, required=True)
@name_option
def service_set(args, name):
    """Load-balancer settings: encap-source PREFIX (the outer source's IPv4
    prefix, default 172.16.0.0/16, or IPv6 /96, default 100::/96: the flow
    hash fills its host bits) and new-conn-limit N (new connections per
    second per CPU the connection table learns; above it, the hash alone
    decides; 0: no limit) and gue-port P (the UDP port of `encap gue`
    services, default 6080)."""
    resp = _ask(name, "lb_set", list(args))
    for k, v in resp["settings"].items():
        console.print(f"{k.replace('_', '-')} {v}", markup=False)


@service.group()
def backend():
    """A service's backends."""


def _backend_command(op: str, help_text: str) -> None:
    @backend.command(op, help=f"{help_text}\n\nUsage: SERVICE {BACKEND_USAGE[op]}. " + SERVICE_HELP,
                     context_settings={"ignore_unknown_options": True})
    @click.argument("args", nargs=-1, required=True)
    @name_option
    def cmd(args, name):
        _check_words(args, op)
        _ask(name, f"backend_{op}", list(args))


_backend_command("add", "Add a backend (weight 1 by default); it takes new flows at once.")
_backend_command("del", "Remove a backend: its flows move to the others.")
_backend_command("weight", "Set a backend's weight (0: drain).")
_backend_command("drain", "Drain a backend (weight 0): its established connections stay, new ones go elsewhere.")


@service.command("show")
@name_option
@json_options
def service_show(name, as_json, pretty):
    """Services with their backends: state (active, draining, unhealthy),
    weight, share of the table, packets; the table's size, its max/avg load
    and the share of flows its last change moved."""
    services = _ask(name, "services", [])["services"]
    if as_json or pretty:
        return emit_json(services, pretty)
    if not services:
        console.print("no services")
    for s in services:
        moved = f", last change moved {100 * s['moved_last_change']:.2f}% of flows" \
            if s["moved_last_change"] is not None else ""
        st = s["stats"]
        mode = s["mode"] + (f" {s['encap']}" if s.get("encap") else "")
        console.print(f"{s['service']}  {mode}, table {s['table_size']}, max/avg load {s['max_over_avg_load']:.3f}{moved}; "
                      f"{st.get('packets', 0)} packets, {st.get('new_flows', 0)} new flows"
                      + (f", {st['no_backend']} dropped (no backend)" if st.get("no_backend") else "")
                      + (f", {st['unlearned']} not learned (flood)" if st.get("unlearned") else "")
                      + (f", {st['too_big']} answered too big" if st.get("too_big") else ""),
                      markup=False)
        c = s["check"]
        console.print(f"  check {c['kind']}" + ("" if c["kind"] == "none" else
                      f" every {c['interval']:g}s, rise {c['rise']}, fall {c['fall']}"), markup=False)
        for b in s["backends"]:
            console.print(f"  -> {b['address']}  weight {b['weight']}  {b['state']} ({b['health']})  "
                          f"share {100 * b['share']:.1f}%  {b['packets']} packets", markup=False)


@cli.group()
def decap():
    """On a backend: strip the load balancer's encapsulation in XDP (for
    kernels without ipip/ip6tnl devices). Run it in the backend's
    namespace; put the VIP on lo there."""


@decap.command("attach")
@click.argument("dev")
@click.option("--from", "sources", multiple=True, metavar="PREFIX",
              help="Outer sources to take: the load balancer's encap-source, an IPv4 prefix and an IPv6 /96 "
                   "(default 172.16.0.0/16 and 100::/96, its defaults), or `any`. Others pass untouched.")
@click.option("--gue-port", type=click.IntRange(0, 65535), default=GUE_PORT, show_default=True,
              help="The load balancer's gue-port: GUE to it is decapsulated too (0: no GUE).")
def decap_attach(dev, sources, gue_port):
    """Decapsulate IPIP, IPv6-in-IPv6 (and their GUE) arriving on DEV from the load balancer."""
    from .lb.decap import DEFAULT_FROM, DecapError, attach
    try:
        mode = attach(dev, sources=list(sources) or list(DEFAULT_FROM), gue_port=gue_port)
    except DecapError as e:
        raise click.ClickException(str(e)) from None
    console.print(f"{dev}: decapsulating ({mode} XDP)", markup=False)


@decap.command("detach")
@click.argument("dev")
def decap_detach(dev):
    """Stop decapsulating on DEV."""
    from .lb.decap import DecapError, detach
    try:
        detach(dev)
    except DecapError as e:
        raise click.ClickException(str(e)) from None


@decap.command("show")
@click.argument("dev")
@json_options
def decap_show(dev, as_json, pretty):
    """Packets DEV decapsulated, by outer and inner family."""
    from .lb.decap import DecapError, stats
    try:
        st = stats(dev)
    except DecapError as e:
        raise click.ClickException(str(e)) from None
    if as_json or pretty:
        return emit_json(st, pretty)
    console.print(" ".join(f"{k} {v}" for k, v in st.items()), markup=False)


@service.command("log")
@name_option
@json_options
def service_log(name, as_json, pretty):
    """The latest changes to services: added, deleted, backends added,
    removed, reweighted, drained, and health checks' verdicts (the agent
    keeps the last 200; each is also in its log)."""
    import time
    changes = _ask(name, "services", [])["changes"]
    if as_json or pretty:
        return emit_json(changes, pretty)
    for c in changes:
        seen = f" ({c['seen']})" if c.get("seen") else ""
        console.print(f"{time.strftime('%H:%M:%S', time.localtime(c['time']))}  {c['service']}: {c['change']}{seen}",
                      markup=False)
