"""The Python mirrors must match the compiled object's BTF, and a drift must fail loudly."""
import ctypes

import pytest

from bpfrouter.datapath import layout as lo
from tests.conftest import OBJECT

pytestmark = pytest.mark.skipif(not OBJECT.exists(), reason="build/router.bpf.o missing: run `make build`")


def test_mirrors_match_btf():
    lo.check_layouts(str(OBJECT))


def test_struct_drift_is_detected(monkeypatch):
    class Drifted(ctypes.Structure):
        _fields_ = [("nh_id", ctypes.c_uint16), ("type", ctypes.c_uint8), ("prefixlen", ctypes.c_uint8),
                    ("source", ctypes.c_uint8), ("flags", ctypes.c_uint8)]
    monkeypatch.setitem(lo.STRUCTS, "route", Drifted)
    with pytest.raises(lo.LayoutMismatch, match="struct route"):
        lo.check_layouts(str(OBJECT))


def test_enum_drift_is_detected(monkeypatch):
    import enum
    Shifted = enum.IntEnum("RouteType", {m.name: m.value + 1 for m in lo.RouteType})
    monkeypatch.setitem(lo.ENUMS, "route_type", (Shifted, "RTYPE_"))
    with pytest.raises(lo.LayoutMismatch, match="enum route_type"):
        lo.check_layouts(str(OBJECT))


def test_verdicts_follow_reason_names():
    for r in lo.Reason:
        assert r.verdict == {"FWD": "redirect", "PASS": "pass", "DROP": "drop"}[r.name.split("_")[0]]


def test_redirect_outcomes_match_btf():
    """bpfrouter/xmit.py's outcomes against bpf/include/xmit.h, and every one explained."""
    from bpfrouter import xmit
    xmit.check_layout(xmit.object_path(str(OBJECT)))
    assert set(xmit.OUTCOME_TEXT) == set(xmit.Outcome)
