"""Introspection fidelity against a real QEMU, judged by a direct monitor of the same QEMU.

`full` must see QEMU's own `query-qmp-schema` and `query-commands`, every entry byte for
byte and in QEMU's order, then qmpmux's own entries. A narrowed profile must see exactly
QEMU's entries minus the denied commands and events and the types only they reach: every
name a kept entry refers to resolves, and QEMU's unreferenced types stay. References are
found here by scanning every string of an entry outside the keys that hold names, values
and flags, so a reference kind the filter misses (now or in a later QEMU) fails the test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import pytest

from qmpmux.policy import Decision, Profile, ProfileSpec, compile_policy
from qmpmux.qjson import JsonValue
from tests.conftest import Mux, start_mux
from tests.realqemu import Qemu, RawClient

OWN_COMMANDS = ("__org.qmpmux_whoami", "__org.qmpmux_list-clients")
POLICY = compile_policy(
    {
        # A custom profile: some queries, block and device events, and run-state changes.
        "custom": ProfileSpec(
            commands=("query-*", "qom-list", "stop", "cont", "__org.qmpmux_whoami"),
            events=("BLOCK_*", "DEVICE_*", "STOP", "RESUME"),
        ),
        "from-full": ProfileSpec(base="full", deny_commands=("stop", "blockdev-*")),
    }
)
PROFILES = ("full", "readonly", "custom", "from-full")
# Keys whose strings are names, values or flags, never a reference to another entry
# (qapi/introspect.json: SchemaInfo and its members, variants and enum members).
NOT_REFERENCES = frozenset(
    {"name", "meta-type", "json-type", "values", "features", "case", "tag", "default",
     "allow-oob"}
)  # fmt: skip

_raw_reply = msgspec.json.Decoder(dict[str, msgspec.Raw]).decode
_raw_items = msgspec.json.Decoder(list[msgspec.Raw]).decode


@pytest.fixture
async def imux(qemu: Qemu, tmp_path: Path) -> AsyncIterator[Mux]:
    mux = await start_mux(qemu, tmp_path, policy=POLICY, profiles=PROFILES)
    yield mux
    mux.proxy.stop("test over")
    await mux.proxy.wait()


async def replies(path: Path, command: bytes) -> bytes:
    c = await RawClient.connect(path)
    try:
        await c.negotiate()
        return await c.command(command)
    finally:
        await c.close()


def entries(reply: bytes) -> list[bytes]:
    """A list reply's items, each exactly as it was on the wire."""
    return [bytes(raw) for raw in _raw_items(bytes(_raw_reply(reply)["return"]))]


def name_of(entry: bytes) -> str:
    name = msgspec.json.decode(entry)["name"]
    assert isinstance(name, str)
    return name


def references(value: JsonValue, key: str = "") -> Iterator[str]:
    if key in NOT_REFERENCES:
        return
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from references(item)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from references(v, k)


def reach(roots: set[str], schema: dict[str, JsonValue]) -> set[str]:
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += references(schema[name])
    return seen


def allows(profile: Profile, command: str) -> bool:
    return profile.command(command) is not Decision.DENY


def denied(profile: Profile, entry: JsonValue) -> bool:
    assert isinstance(entry, dict)
    name = entry["name"]
    assert isinstance(name, str)
    if entry["meta-type"] == "command":
        return not allows(profile, name)
    return entry["meta-type"] == "event" and not profile.event(name)


async def test_full_sees_qemus_schema_and_commands_byte_for_byte(imux: Mux) -> None:
    for command in (b'{"execute":"query-qmp-schema"}', b'{"execute":"query-commands"}'):
        direct = entries(await replies(imux.direct, command))
        seen = entries(await replies(imux.sockets["full"], command))
        assert seen[: len(direct)] == direct, command  # every entry, QEMU's order and bytes
        own = [msgspec.json.decode(e) for e in seen[len(direct) :]]
        assert [e["name"] for e in own if e.get("meta-type", "command") == "command"] == list(
            OWN_COMMANDS
        )
        # The rest is what qmpmux's own commands need: its own types, `any` if QEMU has none.
        assert all(e["name"].startswith("__org.qmpmux_") or e["name"] == "any" for e in own)
        assert len({name_of(e) for e in seen}) == len(seen)  # no name twice


@pytest.mark.parametrize("profile_name", ["readonly", "custom", "from-full"])
async def test_narrowed_schema_is_qemus_minus_what_only_denied_entries_reach(
    imux: Mux, profile_name: str
) -> None:
    profile = POLICY.profiles[profile_name]
    direct_raw = entries(await replies(imux.direct, b'{"execute":"query-qmp-schema"}'))
    direct = {name_of(e): e for e in direct_raw}
    schema: dict[str, JsonValue] = {n: msgspec.json.decode(e) for n, e in direct.items()}
    assert all(r in schema for e in schema.values() for r in references(e))  # scan is sound
    seen_raw = entries(await replies(imux.sockets[profile_name], b'{"execute":"query-qmp-schema"}'))
    seen = {name_of(e): e for e in seen_raw}
    assert len(seen) == len(seen_raw)
    # QEMU's entries kept are QEMU's bytes, in QEMU's order; the rest are qmpmux's own.
    from_qemu = [name_of(e) for e in seen_raw if name_of(e) in direct]
    assert all(seen[n] == direct[n] for n in from_qemu)
    assert from_qemu == [n for n in direct if n in seen]
    assert all(n.startswith("__org.qmpmux_") for n in seen.keys() - direct.keys())
    # Closure: every name a kept entry refers to is in the view.
    view = {n: msgspec.json.decode(e) for n, e in seen.items()}
    for name, entry in view.items():
        missing = [r for r in references(entry) if r not in view]
        assert not missing, (name, missing)
    # Exactly the denied commands and events go, with what only they reach.
    tainted = reach({n for n, e in schema.items() if denied(profile, e)}, schema)
    assert tainted, "the profile denies nothing: the test would prove nothing"
    clean = set(schema) - tainted
    assert clean <= seen.keys()  # QEMU's unreferenced types included
    assert set(from_qemu) <= reach(clean | {"any"}, schema)  # `any`: qmpmux's own ret-type
    assert not any(denied(profile, view[n]) for n in from_qemu)
    kinds = ("command", "event")
    listed = {n for n, e in view.items() if isinstance(e, dict) and e["meta-type"] in kinds}
    usable = {n for n, e in schema.items() if isinstance(e, dict) and e["meta-type"] in kinds}
    own = {n for n in OWN_COMMANDS if allows(profile, n)}
    assert listed == {n for n in usable if not denied(profile, schema[n])} | own


@pytest.mark.parametrize("profile_name", ["readonly", "custom", "from-full"])
async def test_narrowed_commands_are_qemus_minus_denied(imux: Mux, profile_name: str) -> None:
    profile = POLICY.profiles[profile_name]
    direct = entries(await replies(imux.direct, b'{"execute":"query-commands"}'))
    seen = entries(await replies(imux.sockets[profile_name], b'{"execute":"query-commands"}'))
    own = [n for n in OWN_COMMANDS if allows(profile, n)]
    assert [name_of(e) for e in seen] == [
        name_of(e) for e in direct if allows(profile, name_of(e))
    ] + own
    assert set(seen) - set(direct) == {b'{"name": "%s"}' % n.encode() for n in own}


async def test_query_events_is_qemus_own_answer(imux: Mux) -> None:
    """QEMU 6.0 removed `query-events` (docs/protocol.md §11): every profile that may
    call it gets QEMU's CommandNotFound; where QEMU still has it, `full` gets QEMU's list
    and narrower profiles only their own events."""
    command = b'{"execute":"query-events","id":7}'
    direct = await replies(imux.direct, command)
    for profile_name in PROFILES:
        profile = POLICY.profiles[profile_name]
        seen = await replies(imux.sockets[profile_name], command)
        if not allows(profile, "query-events"):
            assert b"refused by qmpmux policy" in seen, profile_name
        elif b'"error"' in direct or profile_name == "full":
            assert seen == direct, profile_name
        else:
            kept = [e for e in entries(direct) if profile.event(name_of(e))]
            assert entries(seen) == kept, profile_name
