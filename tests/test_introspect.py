"""Schema narrowing without sockets, on small schemas with every SchemaInfo reference kind
(qapi/introspect.json) and shapes QEMU cannot be made to send on demand: unreferenced
types, chains and cycles of them, and types shared between denied and kept entries."""

from __future__ import annotations

import msgspec

from qmpmux.introspect import filter_commands, filter_schema
from qmpmux.policy import DEFAULT_POLICY, ProfileSpec, compile_policy

POLICY = compile_policy(
    {
        "narrow": ProfileSpec(commands=("query-a", "query-b"), events=("KEPT",)),
        "narrow-own": ProfileSpec(
            commands=("query-a", "query-b", "__org.qmpmux_whoami"), events=("KEPT",)
        ),
    }
)
NARROW = POLICY.profiles["narrow"]
NARROW_OWN = POLICY.profiles["narrow-own"]
FULL = DEFAULT_POLICY.profiles["full"]

# Names: q* reached from the kept command/event, d* only from denied ones, s* from both,
# o* from nothing (an orphan, a chain and a cycle of orphans, one reaching d-shared);
# `any` only from a denied command.
SCHEMA = [
    b'{"name": "query-a", "arg-type": "q-args", "ret-type": "q-alt", "meta-type": "command"}',
    b'{"name": "query-b", "arg-type": "q-args", "ret-type": "[q-elem]", "meta-type": "command"}',
    b'{"name": "stop", "arg-type": "d-args", "ret-type": "s-shared", "meta-type": "command",'
    b' "features": ["q-feature"]}',
    b'{"name": "KEPT", "arg-type": "q-event", "meta-type": "event"}',
    b'{"name": "DROPPED", "arg-type": "d-event", "meta-type": "event"}',
    b'{"name": "q-args", "members": [{"name": "x", "default": null, "type": "s-shared"}],'
    b' "meta-type": "object"}',
    b'{"name": "q-alt", "members": [{"type": "int"}, {"type": "q-union"}],'
    b' "meta-type": "alternate"}',
    b'{"name": "q-union", "members": [{"name": "kind", "type": "q-enum"}], "tag": "kind",'
    b' "variants": [{"case": "one", "type": "q-variant"}], "meta-type": "object"}',
    b'{"name": "q-enum", "members": [{"name": "one"}], "meta-type": "enum", "values": ["one"]}',
    b'{"name": "q-variant", "members": [], "meta-type": "object"}',
    b'{"name": "[q-elem]", "element-type": "q-elem", "meta-type": "array"}',
    b'{"name": "q-elem", "members": [{"name": "n", "type": "int"}], "meta-type": "object"}',
    b'{"name": "q-event", "members": [{"name": "e", "type": "str"}], "meta-type": "object"}',
    b'{"name": "d-args", "members": [{"name": "y", "type": "d-only"}, {"name": "v",'
    b' "type": "any"}], "meta-type": "object"}',
    b'{"name": "d-only", "members": [{"name": "z", "type": "d-shared"}], "meta-type": "object"}',
    b'{"name": "d-event", "members": [], "meta-type": "object"}',
    b'{"name": "d-shared", "members": [], "meta-type": "object"}',
    b'{"name": "s-shared", "members": [], "meta-type": "object"}',
    b'{"name": "o-alone", "members": [], "meta-type": "object"}',
    b'{"name": "o-chain", "members": [{"name": "c", "type": "d-shared"}], "meta-type": "object"}',
    b'{"name": "o-cycle1", "members": [{"name": "c", "type": "o-cycle2"}], "meta-type": "object"}',
    b'{"name": "o-cycle2", "members": [{"name": "c", "type": "o-cycle1"}], "meta-type": "object"}',
    b'{"name": "int", "json-type": "int", "meta-type": "builtin"}',
    b'{"name": "str", "json-type": "string", "meta-type": "builtin"}',
    b'{"name": "any", "json-type": "value", "meta-type": "builtin"}',
]
VALUE = b"[" + b", ".join(SCHEMA) + b"]"


def names(value: bytes) -> list[str]:
    return [e["name"] for e in msgspec.json.decode(value)]


def test_a_profile_that_denies_nothing_sees_qemus_bytes_then_its_own() -> None:
    out = filter_schema(VALUE, FULL)
    assert out.startswith(VALUE[:-1] + b", ")  # every entry, orphans included, as sent
    assert names(out)[len(SCHEMA) :] == [
        "__org.qmpmux_whoami", "__org.qmpmux_list-clients", "__org.qmpmux_args",
    ]  # fmt: skip
    commands = b'[{"name": "stop"},  {"name": "cont"}]'  # odd spacing survives too
    assert filter_commands(commands, FULL) == commands[:-1] + (
        b', {"name": "__org.qmpmux_whoami"}, {"name": "__org.qmpmux_list-clients"}]'
    )
    assert filter_commands(b"[]", FULL).startswith(b'[{"name": "__org.qmpmux_whoami"}, ')


def references(entry: dict[str, list[dict[str, str]] | str]) -> list[str]:
    refs = [entry.get(k) for k in ("arg-type", "ret-type", "element-type")]
    for key in ("members", "variants"):
        items = entry.get(key, [])
        assert isinstance(items, list)
        refs += [item.get("type") for item in items]
    return [r for r in refs if isinstance(r, str)]


def test_narrowing_drops_only_what_denied_entries_alone_reach() -> None:
    dropped = {"stop", "DROPPED", "d-args", "d-only", "d-event", "any"}
    for profile, own in ((NARROW, []), (NARROW_OWN, ["__org.qmpmux_whoami"])):
        out = filter_schema(VALUE, profile)
        gone = dropped - {"any"} if own else dropped
        kept = [raw for raw in SCHEMA if name_of(raw) not in gone]
        # QEMU's entries as sent, in QEMU's order (`any` stays where QEMU put it: qmpmux's
        # own commands return it), then qmpmux's own entries.
        assert out.startswith(b"[" + b", ".join(kept) + (b", " if own else b"]"))
        assert names(out)[len(kept) :] == ([*own, "__org.qmpmux_args"] if own else [])
        # d-shared stays: o-chain, which nothing denied reaches, names it. Every name a
        # kept entry refers to is there.
        view = msgspec.json.decode(out)
        assert "d-shared" in names(out)
        assert all(r in names(out) for e in view for r in references(e)), profile.name


def test_any_is_appended_only_when_qemu_has_none() -> None:
    without = b"[" + b", ".join(e for e in SCHEMA if name_of(e) != "any") + b"]"
    for value in (without, VALUE):
        out = names(filter_schema(value, NARROW_OWN))
        assert out.count("any") == 1


def name_of(entry: bytes) -> str:
    name = msgspec.json.decode(entry)["name"]
    assert isinstance(name, str)
    return name
