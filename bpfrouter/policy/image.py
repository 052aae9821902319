"""Writing compiled rule sets (rules.py) into the classifier's maps
(bpf/include/rules.h), one bank at a time.

Each family has two banks. A new set goes into the bank not in use, then
one store to rule_active switches the family to it; the bank it left is
written again only after an RCU grace period, when no packet that read
the old value can still be walking it. Packets each rule decided are
counted per bank; a bank's counts are added to its rules' totals (keyed
by the rule's priority and text) before the bank is reused."""
from __future__ import annotations

import ctypes
from collections import Counter

from ..datapath import layout as lo
from ..grace import GRACE
from .rules import Compiled, Rule, signature

u32 = lo.u32


class RuleImage:
    def __init__(self, dp):
        self.dp = dp
        m = dp.maps
        self.active, self.sets, self.actions = m["rule_active"], m["rule_sets"], m["rule_actions"]
        self.vectors, self.prefixes, self.values = m["rule_vectors"], m["rule_prefixes"], m["rule_values"]
        self.bytes_, self.bounds, self.hit_counts = m["rule_bytes"], m["rule_bounds"], m["rule_hits"]
        # per family: the bank in use, the rules each bank holds, the grace tag of its retirement
        self.state = [self.active.lookup(u32(f)).value for f in (0, 1)]
        self.rules: dict[tuple[int, int], list[Rule]] = {}
        self.retired: dict[tuple[int, int], int] = {}
        self.totals: Counter[tuple[int, int, str]] = Counter()  # (family, priority, text) -> packets
        self.written: list[tuple | None] = [None, None]  # per family: signature() of the set in use

    def walking(self, fam6: int) -> list[Rule]:
        """The rules the fast path walks for a family ([] when none)."""
        st = self.state[fam6]
        return self.rules.get((st & 1, fam6), []) if st & lo.RULE_ACTIVE_ON else []

    def apply(self, fam6: int, compiled: Compiled | None) -> None:
        """Make `compiled` the family's rule set (None: no walk)."""
        st = self.state[fam6]
        sig = signature(compiled) if compiled is not None else None
        if sig is not None and sig == self.written[fam6] and st & lo.RULE_ACTIVE_ON:
            self.rules[(st & 1, fam6)] = compiled.rules  # the same set: no switch, no packet passed for it
            return
        self.written[fam6] = sig
        if compiled is None:
            if st & lo.RULE_ACTIVE_ON:
                self.active.update(u32(fam6), u32(st & 1))
                self.state[fam6] = st & 1
                self.retired[(st & 1, fam6)] = GRACE.mark()
            return
        bank = (st & 1) ^ 1 if st & lo.RULE_ACTIVE_ON else st & 1
        key = (bank, fam6)
        if key in self.retired:
            GRACE.wait(self.retired.pop(key))
        self._fold(bank, fam6)
        self._clear(bank, fam6)
        self._write(bank, fam6, compiled)
        self.rules[key] = compiled.rules
        if st & lo.RULE_ACTIVE_ON:
            self.retired[(st & 1, fam6)] = GRACE.mark()
        self.state[fam6] = lo.RULE_ACTIVE_ON | bank
        self.active.update(u32(fam6), u32(self.state[fam6]))

    def _set(self, bank: int, fam6: int) -> int:
        return bank * 2 + fam6

    def _write(self, bank: int, fam6: int, c: Compiled) -> None:
        s = self._set(bank, fam6)
        base = s * lo.MAX_RULE_VECTORS
        self.vectors.update_batch([(u32(base + i), lo.RuleVector.from_buffer_copy(v))
                                   for i, v in enumerate(c.vectors)])
        self.actions.update_batch([(u32(s * lo.MAX_RULES + i), a) for i, a in enumerate(c.actions)])
        for (fld, net), vid in c.prefixes.items():
            k = lo.RulePrefixKey(prefixlen=32 + net.prefixlen, bank=bank, family=fam6, field=fld)
            ctypes.memmove(k.addr, net.network_address.packed, len(net.network_address.packed))
            self.prefixes.update(k, u32(vid))
        if c.values:
            self.values.update_batch([(lo.RuleU32Key(value=v, bank=bank, family=fam6, field=fld), u32(vid))
                                      for (fld, v), vid in c.values.items()])
        if c.bytes_:
            self.bytes_.update_batch([(u32((s * 2 + which) * 256 + v), u32(vid)) for (which, v), vid in c.bytes_.items()])
        for which, bounds in enumerate(c.bounds):
            if bounds:
                self.bounds.update_batch([(u32((s * 2 + which) * lo.RULE_PORT_SLOTS + i), lo.RuleBound(lo_, vid))
                                          for i, (lo_, vid) in enumerate(bounds)])
        rs = lo.RuleSet(count=len(c.rules), fields=int(c.fields), all=c.all, invert=c.invert,
                        nmasks=len(c.masks))
        rs.miss[:] = c.miss
        for i, (m, miss) in enumerate(zip(c.masks, c.mask_miss, strict=True)):
            rs.mask[i], rs.mask_miss[i] = m, miss
        rs.nbounds[0], rs.nbounds[1] = len(c.bounds[0]), len(c.bounds[1])
        self.sets.update(u32(s), rs)

    def _clear(self, bank: int, fam6: int) -> None:
        """Remove the bank's hashed and trie keys (arrays are overwritten or unread)."""
        for k in [k for k in self.prefixes.keys() if k.bank == bank and k.family == fam6]:
            self.prefixes.delete(k)
        for k in [k for k in self.values.keys() if k.bank == bank and k.family == fam6]:
            self.values.delete(k)
        self.sets.update(u32(self._set(bank, fam6)), lo.RuleSet())

    def hits(self, fam6: int) -> list[int]:
        """Packets each rule of the walked set decided, since it was written."""
        n = len(self.walking(fam6))
        if not n:
            return []
        base = self._set(self.state[fam6] & 1, fam6) * lo.MAX_RULES
        counts = [0] * n
        for k, per_cpu in self.hit_counts.lookup_batch():
            if base <= k.value < base + n:
                counts[k.value - base] = sum(v.value for v in per_cpu)
        return counts

    def rule_totals(self, fam6: int) -> list[tuple[Rule, int]]:
        """Each walked rule with the packets it decided, over all its banks."""
        rules = self.walking(fam6)
        counts = self.hits(fam6)
        return [(r, self.totals[(fam6, r.priority, r.text())] + n) for r, n in zip(rules, counts, strict=True)]

    def _fold(self, bank: int, fam6: int) -> None:
        """Add a bank's counts to its rules' totals and zero them."""
        s = self._set(bank, fam6)
        zero = (ctypes.c_uint64 * self.hit_counts.ncpus)()
        for i, r in enumerate(self.rules.get((bank, fam6), [])):
            key = u32(s * lo.MAX_RULES + i)
            n = sum(v.value for v in self.hit_counts.lookup(key))
            if n:
                self.totals[(fam6, r.priority, r.text())] += n
                self.hit_counts.update(key, zero)


def report_counts(families: dict) -> list[dict]:
    """The agent's rule report (`rules`: per family, its rules) as one row per
    walked rule: {family, priority, rule, table, packets}, as Agent.rule_counts gives them."""
    return [{"family": fam, "priority": r["priority"], "rule": r["rule"], "packets": r["packets"],
             "table": r["table"] or ""} for fam, f in families.items() for r in f["rules"] if r["packets"] is not None]


def packets_by_table(counts: list[dict]) -> dict[str, dict[str, int]]:
    """Per family, the packets the walked rules' lookups routed, by table."""
    out: dict[str, dict[str, int]] = {}
    for x in counts:
        if x["table"]:
            fam = out.setdefault(x["family"], {})
            fam[x["table"]] = fam.get(x["table"], 0) + x["packets"]
    return out
