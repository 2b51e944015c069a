"""Per-client views of QEMU's introspection and extension members (sans-IO, bytes in/out).

A client's `query-commands`, `query-events` and `query-qmp-schema` list what its profile
lets it use, plus qmpmux's own extension commands. A schema view drops the denied
commands and events and the types that only they reach, nothing else (docs/protocol.md
§11: type names are masked numbers, so reachability goes through `arg-type`, `ret-type`,
`members[].type`, `variants[].type` and `element-type`, every reference a SchemaInfo in
QEMU's qapi/introspect.json can hold). QEMU also lists types that no command or event
reaches (referenced only from branches compiled out of its build); they stay. So a
profile that denies nothing sees QEMU's reply unchanged with qmpmux's entries appended,
and every type a kept entry names is kept. Profiles may also strip downstream `__`
members from replies and events.

Invariant: everything kept is QEMU's bytes, unchanged; only whole entries or members are
dropped, so order and formatting stay exactly QEMU's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

import msgspec

from qmpmux.policy import EXTENSION_PREFIX, LIST_CLIENTS, WHOAMI, Decision, Profile
from qmpmux.qjson import encode

QUERY_COMMANDS: Final = "query-commands"
QUERY_EVENTS: Final = "query-events"
QUERY_SCHEMA: Final = "query-qmp-schema"
EXTENSION_COMMANDS: Final = (WHOAMI, LIST_CLIENTS)

_members = msgspec.json.Decoder(dict[str, msgspec.Raw]).decode
_items = msgspec.json.Decoder(list[msgspec.Raw]).decode


class _Named(msgspec.Struct):
    name: str = ""


class _TypeRef(msgspec.Struct):
    type: str = ""


class _Entry(msgspec.Struct, rename="kebab"):
    """The parts of a SchemaInfo entry that name other entries."""

    name: str = ""
    meta_type: str = ""
    arg_type: str | None = None
    ret_type: str | None = None
    element_type: str | None = None
    members: list[_TypeRef] = []
    variants: list[_TypeRef] = []


_named = msgspec.json.Decoder(_Named).decode
_entry = msgspec.json.Decoder(_Entry).decode

# Schema entries for qmpmux's own commands: an argument-less object type of its own and
# the `any` builtin (added only if QEMU's schema lacks it).
_ARGS_TYPE: Final = "__org.qmpmux_args"
_OWN_TYPES: Final = (
    b'{"name": "' + _ARGS_TYPE.encode() + b'", "members": [], "meta-type": "object"}',
)
_ANY: Final = b'{"name": "any", "json-type": "value", "meta-type": "builtin"}'


def _usable(profile: Profile, name: str) -> bool:
    return profile.command(name) is not Decision.DENY


def _join(items: Sequence[bytes]) -> bytes:
    return b"[" + b", ".join(items) + b"]"


def _extend(value: bytes, extra: Sequence[bytes]) -> bytes:
    """QEMU's JSON array `value`, byte for byte, with `extra` items appended."""
    if not extra:
        return value
    body = value.rstrip()[:-1].rstrip()  # up to QEMU's closing `]`
    separator = b", " if body != b"[" else b""
    return body + separator + b", ".join(extra) + b"]"


def _own_commands(profile: Profile) -> list[str]:
    return [name for name in EXTENSION_COMMANDS if _usable(profile, name)]


def filter_commands(value: bytes, profile: Profile) -> bytes:
    """`query-commands` return value: `[{"name": ...}, ...]` narrowed to the profile."""
    items = _items(value)
    kept = [bytes(raw) for raw in items if _usable(profile, _named(raw).name)]
    own = [b'{"name": ' + encode(name) + b"}" for name in _own_commands(profile)]
    if len(kept) == len(items):
        return _extend(value, own)  # nothing denied: QEMU's bytes exactly
    return _join(kept + own)


def filter_events(value: bytes, profile: Profile) -> bytes:
    """`query-events` return value (QEMU before 6.0): narrowed to the profile's events."""
    items = _items(value)
    kept = [bytes(raw) for raw in items if profile.event(_named(raw).name)]
    return value if len(kept) == len(items) else _join(kept)


def _references(entry: _Entry) -> list[str]:
    """Every entry name a SchemaInfo refers to (qapi/introspect.json: a command's
    `arg-type`/`ret-type`, an event's `arg-type`, an object's `members[].type` and
    `variants[].type` (its base is flattened into members), an alternate's
    `members[].type`, an array's `element-type`)."""
    refs = [t for t in (entry.arg_type, entry.ret_type, entry.element_type) if t]
    refs += [m.type for m in entry.members if m.type]
    refs += [v.type for v in entry.variants if v.type]
    return refs


def _reach(roots: list[str], by_name: dict[str, _Entry]) -> set[str]:
    """`roots` and every entry they refer to, directly or not."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        entry = by_name.get(name)
        if entry is not None:
            todo += _references(entry)
    return seen


def _denied(profile: Profile, entry: _Entry) -> bool:
    if entry.meta_type == "command":
        return not _usable(profile, entry.name)
    if entry.meta_type == "event":
        return not profile.event(entry.name)
    return False


def filter_schema(value: bytes, profile: Profile) -> bytes:
    """`query-qmp-schema` return value: denied commands and events dropped, with the
    types only they reached; qmpmux's own commands added.

    Entries are kept unless a denied command or event reaches them and no other entry
    left in the view does, so no kept entry names a missing type, and a profile that
    denies nothing sees every entry QEMU sent (types nothing reaches included)."""
    entries = [(raw, _entry(raw)) for raw in _items(value)]
    by_name = {e.name: e for _, e in entries}
    denied = [e.name for _, e in entries if _denied(profile, e)]
    own = _own_commands(profile)
    extra = [
        b'{"name": '
        + encode(name)
        + b', "arg-type": "'
        + _ARGS_TYPE.encode()
        + b'", "ret-type": "any", "meta-type": "command"}'
        for name in own
    ]
    if own:
        extra += list(_OWN_TYPES)
        if "any" not in by_name:
            extra.append(_ANY)
    if not denied:
        return _extend(value, extra)  # nothing to narrow: QEMU's bytes exactly
    tainted = _reach(denied, by_name)
    roots = [e.name for _, e in entries if e.name not in tainted]
    if own:
        roots.append("any")  # the ret-type of qmpmux's own commands
    keep = _reach(roots, by_name).difference(denied)
    return _join([bytes(raw) for raw, e in entries if e.name in keep] + extra)


FILTERS: Final[dict[str, Callable[[bytes, Profile], bytes]]] = {
    QUERY_COMMANDS: filter_commands,
    QUERY_EVENTS: filter_events,
    QUERY_SCHEMA: filter_schema,
}


def replace_return(line: bytes, transform: Callable[[bytes], bytes]) -> bytes:
    """Apply `transform` to a reply's `return` value, leaving every other byte alone."""
    members = _members(line)
    if "return" not in members:
        return line  # an error reply: nothing to narrow
    parts = []
    for key, raw in members.items():
        value = transform(bytes(raw)) if key == "return" else bytes(raw)
        parts.append(encode(key) + b": " + value)
    return b"{" + b", ".join(parts) + b"}\r\n"


def strip_extension_members(value: bytes) -> bytes:
    """Drop every member whose name starts with `__`, at any depth."""
    if b'"__' not in value:
        return value
    first = value[:1]
    if first == b"{":
        parts = [
            encode(key) + b": " + strip_extension_members(bytes(raw))
            for key, raw in _members(value).items()
            if not key.startswith(EXTENSION_PREFIX)
        ]
        return b"{" + b", ".join(parts) + b"}"
    if first == b"[":
        return _join([strip_extension_members(bytes(raw)) for raw in _items(value)])
    return value


def strip_message(line: bytes) -> bytes:
    """A whole reply or event without downstream extension members, CRLF kept."""
    if b'"__' not in line:
        return line
    return strip_extension_members(line.rstrip(b"\r\n")) + b"\r\n"
