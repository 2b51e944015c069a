"""Per-client views of QEMU's introspection and extension members (sans-IO, bytes in/out).

A client's `query-commands`, `query-events` and `query-qmp-schema` list only what its
profile lets it use, plus qmpmux's own extension commands; schema types are kept when
the kept commands and events reach them (docs/protocol.md §11: type names are masked
numbers, so reachability goes through `arg-type`, `ret-type`, `members[].type`,
`variants[].type` and `element-type`). Profiles may also strip downstream `__` members
from replies and events.

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


def _own_commands(profile: Profile) -> list[str]:
    return [name for name in EXTENSION_COMMANDS if _usable(profile, name)]


def filter_commands(value: bytes, profile: Profile) -> bytes:
    """`query-commands` return value: `[{"name": ...}, ...]` narrowed to the profile."""
    kept = [bytes(raw) for raw in _items(value) if _usable(profile, _named(raw).name)]
    kept += [b'{"name": ' + encode(name) + b"}" for name in _own_commands(profile)]
    return _join(kept)


def filter_events(value: bytes, profile: Profile) -> bytes:
    """`query-events` return value (QEMU before 6.0): narrowed to the profile's events."""
    return _join([bytes(raw) for raw in _items(value) if profile.event(_named(raw).name)])


def filter_schema(value: bytes, profile: Profile) -> bytes:
    """`query-qmp-schema` return value: denied commands and events dropped, with the
    types only they reached; qmpmux's own commands added."""
    entries = [(raw, _entry(raw)) for raw in _items(value)]
    by_name = {e.name: e for _, e in entries}
    keep: set[str] = set()
    todo: list[str] = []
    for _, e in entries:
        if e.meta_type == "command" and _usable(profile, e.name):
            todo += [t for t in (e.arg_type, e.ret_type) if t]
            keep.add(e.name)
        elif e.meta_type == "event" and profile.event(e.name):
            todo += [t for t in (e.arg_type,) if t]
            keep.add(e.name)
    while todo:
        name = todo.pop()
        if name in keep:
            continue
        keep.add(name)
        ref = by_name.get(name)
        if ref is not None:
            todo += [m.type for m in ref.members if m.type]
            todo += [v.type for v in ref.variants if v.type]
            if ref.element_type:
                todo.append(ref.element_type)
    out = [bytes(raw) for raw, e in entries if e.name in keep]
    own = _own_commands(profile)
    if own:
        out += [
            b'{"name": '
            + encode(name)
            + b', "arg-type": "'
            + _ARGS_TYPE.encode()
            + b'", "ret-type": "any", "meta-type": "command"}'
            for name in own
        ]
        out += list(_OWN_TYPES)
        if "any" not in keep:
            out.append(_ANY)
    return _join(out)


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
