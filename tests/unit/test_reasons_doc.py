"""`explain` prints each reason's meaning from observe.REASON_TEXT;
docs/reasons.md holds the same table for readers. They must not drift."""
import re

from bpfrouter.observe import REASON_TEXT
from tests.conftest import ROOT


def test_reason_texts_match_the_docs():
    documented = {}
    for line in (ROOT / "docs" / "reasons.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or "`" not in cells[1]:
            continue
        prefix = "fwd" if cells[0] == "redirect" else cells[0]
        for label in re.findall(r"`([a-z0-9_]+)`", cells[1]):
            documented[f"{prefix}_{label}".upper()] = cells[2].replace("`", "")
    assert documented == {r.name: text for r, text in REASON_TEXT.items()}
