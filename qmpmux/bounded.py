"""Decoded values of megabytes, encoded and freed in bounded steps (I/O free).

A big command is judged on the worker thread (judgement.py), which holds the interpreter
one C call at a time: the event loop's thread gets it back between calls, within the
switch interval, but never inside one. Two C calls were unbounded in a value's size:

- encoding it: a command whose fd names qmpmux renames is encoded again for QEMU
  (fdargs.rename_fds), and `msgspec` encodes a list of 500,000 names in one 9 ms call;
- freeing it: dropping the last reference to a container frees everything only it holds
  in one call, 15 ms for the 250,000 actions of a 4 MiB `transaction`.

`compact_pieces` encodes a value a run of members at a time and `let_go` frees one a run
at a time, each run a fraction of a millisecond. Both walk the value in Python, about
0.1 us a member, which the worker can afford (judging it took longer) and the interpreter
can interrupt.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Final, TypeAlias

from qmpmux.qjson import DeferredObject, JsonValue, encode_compact

# What one C call encodes at most, weighed as qjson.heavy weighs a value (a character 1,
# a value 16): a fraction of a millisecond.
_RUN_WEIGHT: Final = 1 << 18
# A container of at most this many members, all scalars or strings of at most _SHORT
# characters, is encoded inside its parent's runs (each action of a `transaction`, each
# `{}` of a padding); anything else has runs of its own.
_FLAT: Final = 8
_SHORT: Final = 256
# Pieces shorter than this are joined before they are handed out, so that a value of
# small members makes a few pieces of this size, not a piece per bracket.
_PIECE_BYTES: Final = 1 << 16

# A writer's steps: encoded text, or the steps of a member (run in turn).
_Steps: TypeAlias = Iterator["bytes | _Steps"]


def compact_pieces(
    value: JsonValue, stand_ins: Mapping[str, Sequence[str]] | None = None
) -> list[bytes]:
    """qjson.encode_compact(value), in pieces that join to it, each made of C calls on
    at most _RUN_WEIGHT of it. A string of `stand_ins` is written as the pieces it
    stands for (fdargs.rename_fds keeps a long colon list renamed in its pieces), each
    encoded on its own; every stand-in must be found once (ValueError)."""
    stand_ins = stand_ins or {}
    found: list[str] = []
    out: list[bytes] = []
    pending: list[bytes] = []  # short steps, joined once they make a piece
    size = 0

    def flush() -> None:
        if pending:
            out.append(b"".join(pending))
            pending.clear()

    stack: list[_Steps] = [_value_steps(value, stand_ins, found)]
    while stack:
        step = next(stack[-1], None)
        if step is None:
            stack.pop()
        elif not isinstance(step, bytes):
            stack.append(step)
        elif len(step) >= _PIECE_BYTES:
            flush()
            size = 0
            out.append(step)
        else:
            pending.append(step)
            size += len(step)
            if size >= _PIECE_BYTES:
                flush()
                size = 0
    flush()
    if sorted(found) != sorted(stand_ins):  # (no client's string holds one)
        raise ValueError("a stand-in for a long string is not found once")
    return out


def _value_steps(
    value: JsonValue, stand_ins: Mapping[str, Sequence[str]], found: list[str]
) -> _Steps:
    if type(value) is str:
        if value in stand_ins:
            found.append(value)
            return _string_steps(stand_ins[value])
        return _string_steps((value,))
    if type(value) is list:
        return _list_steps(value, stand_ins, found)
    if type(value) is dict:
        return _dict_steps(value, stand_ins, found)
    return iter((encode_compact(value),))


def _string_steps(parts: Sequence[str]) -> _Steps:
    """A string given in `parts`, encoded _RUN_WEIGHT characters at a time."""
    if len(parts) == 1 and len(parts[0]) <= _RUN_WEIGHT:
        yield encode_compact(parts[0])
        return
    yield b'"'
    for part in parts:
        for start in range(0, len(part), _RUN_WEIGHT):
            yield encode_compact(part[start : start + _RUN_WEIGHT])[1:-1]
    yield b'"'


def _weight(value: JsonValue, stand_ins: Mapping[str, Sequence[str]]) -> int | None:
    """What encoding `value` inside a run weighs, or None if it needs steps of its own."""
    if type(value) is str:
        if len(value) > _RUN_WEIGHT // 4 or (stand_ins and value in stand_ins):
            return None
        return 16 + len(value)
    if type(value) is list or type(value) is dict:
        if len(value) > _FLAT:
            return None
        for member in value.values() if type(value) is dict else value:
            if type(member) is str:
                if len(member) > _SHORT or (stand_ins and member in stand_ins):
                    return None
            elif type(member) in _CONTAINERS:
                return None
        if type(value) is dict and any(len(key) > _SHORT for key in value):
            return None
        return 16 + (16 + _SHORT) * len(value)
    return 16


_CONTAINERS: Final = frozenset({list, dict})


def _list_steps(
    value: list[JsonValue], stand_ins: Mapping[str, Sequence[str]], found: list[str]
) -> _Steps:
    return _bracketed(b"[", _list_entries(value, stand_ins, found), b"]")


def _bracketed(opening: bytes, entries: Iterator[bytes | _Steps], closing: bytes) -> _Steps:
    """A container's steps: its entries (runs of members, or one member's steps) with a
    comma between each two."""
    yield opening
    for i, entry in enumerate(entries):
        if i:
            yield b","
        yield entry
    yield closing


def _run_text(run: list[JsonValue] | dict[str, JsonValue]) -> bytes:
    return encode_compact(run)[1:-1]  # (one C call: the run's weight bounds it)


def _list_entries(
    value: list[JsonValue], stand_ins: Mapping[str, Sequence[str]], found: list[str]
) -> Iterator[bytes | _Steps]:
    run: list[JsonValue] = []
    weight = 0
    for start in range(0, len(value), _CHUNK):
        chunk = value[start : start + _CHUNK]
        if _short_scalars(chunk, stand_ins):  # (a list of names: told in C, encoded at once)
            if run:
                yield _run_text(run)
                run, weight = [], 0
            yield _run_text(chunk)
            continue
        for member in chunk:
            w = 16 if not member else _weight(member, stand_ins)
            if w is not None:
                run.append(member)
                weight += w
                if weight < _RUN_WEIGHT:
                    continue
            if run:
                yield _run_text(run)
                run, weight = [], 0
            if w is None:
                yield _value_steps(member, stand_ins, found)
    if run:
        yield _run_text(run)


# Members of a list told at once (_short_scalars): at most _CHUNK * (16 + _SHORT) of weight.
_CHUNK: Final = 1024
_SCALARS: Final = frozenset({str, int, float, bool, type(None)})


def _short_scalars(chunk: list[JsonValue], stand_ins: Mapping[str, Sequence[str]]) -> bool:
    """Whether `chunk` holds only scalars, and strings of at most _SHORT characters none
    of which is a stand-in, told in C (a list of a million names is ~10 ns a name)."""
    kinds = set(map(type, chunk))
    if not kinds <= _SCALARS:
        return False
    if str not in kinds:
        return True
    if kinds != {str}:
        return False
    return max(map(len, chunk)) <= _SHORT and stand_ins.keys().isdisjoint(chunk)  # type: ignore[arg-type]


def _dict_steps(
    value: dict[str, JsonValue], stand_ins: Mapping[str, Sequence[str]], found: list[str]
) -> _Steps:
    return _bracketed(b"{", _dict_entries(value, stand_ins, found), b"}")


def _dict_entries(
    value: dict[str, JsonValue], stand_ins: Mapping[str, Sequence[str]], found: list[str]
) -> Iterator[bytes | _Steps]:
    run: dict[str, JsonValue] = {}
    weight = 0
    for key, member in value.items():
        w = None if len(key) > _SHORT else 16 if not member else _weight(member, stand_ins)
        if w is not None:
            run[key] = member
            weight += w + len(key)
            if weight < _RUN_WEIGHT:
                continue
        if run:
            yield _run_text(run)
            run, weight = {}, 0
        if w is None:
            yield _member_steps(key, member, stand_ins, found)
    if run:
        yield _run_text(run)


def _member_steps(
    key: str, member: JsonValue, stand_ins: Mapping[str, Sequence[str]], found: list[str]
) -> _Steps:
    yield _string_steps((key,))
    yield b":"
    yield _value_steps(member, stand_ins, found)


# Members freed in one C call by let_go: a fraction of a millisecond of them.
_FREED_RUN: Final = 4096


def let_go(values: list[object]) -> None:
    """Empty `values`, freeing what only they hold a run of _FREED_RUN members at a time
    (where dropping them would free it all in one C call). A container someone else
    holds too is left to them (a renamed copy shares members with the arguments it was
    made from: whichever is let go of last frees those)."""
    stack = values[:]
    values.clear()
    # What the count reads for a container only `top` holds, read the same way: 2 on
    # Python 3.11-3.13 (`top`, and the call's own reference), less where a local is lent
    # to a call without a reference of its own (3.14's borrowed loads).
    alone: object = []
    only_here = sys.getrefcount(alone)
    while stack:
        top = stack.pop()
        if sys.getrefcount(top) > only_here:  # held elsewhere too
            continue
        kind = type(top)
        if kind is list:
            assert isinstance(top, list)
            while top:
                run = top[-_FREED_RUN:]
                del top[-_FREED_RUN:]
                if not _HOLDERS.isdisjoint(map(type, run)):  # (told in C)
                    stack += _held_apart(run)
                del run  # (its other members are freed with it)
        elif kind is dict:
            assert isinstance(top, dict)
            if len(top) <= _FREED_RUN:
                stack += _held_apart(top.values())
                top.clear()
            else:
                while top:
                    _key, member = top.popitem()
                    if type(member) in _HOLDERS and member:
                        stack.append(member)
                    del member
        elif kind is DeferredObject:
            assert isinstance(top, DeferredObject)
            stack += top.let_go()


_HOLDERS: Final = frozenset({list, dict, DeferredObject})


def _held_apart(members: Iterable[object]) -> list[object]:
    """The members to free apart from the run they are in: the containers, but for empty
    ones and dicts of a scalar or two (a `transaction`'s actions), freed with the run."""
    apart: list[object] = []
    for member in members:
        if type(member) in _HOLDERS and member:
            if type(member) is dict and len(member) <= 2:
                for value in member.values():
                    if type(value) in _HOLDERS and value:
                        apart.append(member)
                        break
            else:
                apart.append(member)
    return apart
