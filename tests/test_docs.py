"""The project stands alone: every `docs/protocol.md` section the code cites exists."""

from __future__ import annotations

import re
from pathlib import Path

from qmpmux.policy import READONLY_COMMANDS, WHOAMI

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL = ROOT / "docs" / "protocol.md"
# `docs/protocol.md §7.1`, `§5` after an earlier mention in the same sentence, `A.1`.
CITATION = re.compile(r"docs/protocol\.md(?:\]\([^)]*\))?,? (§[0-9]+(?:\.[0-9]+)?|A\.[0-9]+)")
LOCAL = re.compile(r"(?<![\w.])§([0-9]+(?:\.[0-9]+)?)")


def sections() -> set[str]:
    """`§N` / `§N.M` for every numbered heading, `A.N` for the appendix."""
    found = set()
    for line in PROTOCOL.read_text().splitlines():
        m = re.match(r"#{2,3} ([0-9]+(?:\.[0-9]+)?|A\.[0-9]+)\.? ", line)
        if m:
            label = m.group(1)
            found.add(label if label.startswith("A.") else "§" + label)
    return found


def cited() -> list[tuple[str, str]]:
    files = [*ROOT.glob("qmpmux/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("bench/*.py")]
    files += [ROOT / "README.md", ROOT / "systemd" / "qmpmux.toml.example"]
    out = []
    for path in files:
        text = path.read_text()
        out += [(path.name, c) for c in CITATION.findall(text)]
        if "docs/protocol.md" in text:  # bare `§N` near a citation of the document
            out += [(path.name, "§" + c) for c in LOCAL.findall(text)]
    return out


def test_every_cited_section_exists() -> None:
    known = sections()
    assert {"§1.1", "§7.1", "§10.7", "A.1"} <= known  # the parser reads the headings
    citations = cited()
    assert citations  # the code does cite the document
    missing = sorted({f"{name}: {c}" for name, c in citations if c not in known})
    assert not missing, missing


def test_internal_references_of_the_document_exist() -> None:
    known = sections()
    text = PROTOCOL.read_text()
    missing = sorted({"§" + c for c in LOCAL.findall(text)} - known)
    assert not missing, missing


def test_nothing_cites_a_document_outside_the_repository() -> None:
    outside = re.compile(r"qmp-semantics|[Rr]eference (?:section|appendix|tables?)\b")
    files = [*ROOT.glob("qmpmux/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("bench/*.py")]
    files += [ROOT / "README.md", PROTOCOL]
    found = [f"{path.name}: {m.group(0)}" for path in files if path != Path(__file__)
             for m in outside.finditer(path.read_text())]  # fmt: skip
    assert not found, found


def test_the_read_only_list_in_the_document_is_the_profiles() -> None:
    """docs/protocol.md §10.1 names exactly the commands `readonly` has (but qmpmux's own)."""
    text = PROTOCOL.read_text()
    section = text[text.index("### 10.1") : text.index("Read-only in name but not in effect")]
    documented = set(re.findall(r"`((?:query|qom|trace)-[a-z0-9-]*)`", section))
    assert documented == set(READONLY_COMMANDS) - {WHOAMI}, documented ^ (
        set(READONLY_COMMANDS) - {WHOAMI}
    )
