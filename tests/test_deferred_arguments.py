"""A big command's arguments are built only when its reply depends on them.

The reader keeps a big message's values packed while it grows (qjson.py); the client
reader leaves the `arguments` member packed at the end too (qjson.Deferred), and the
session builds it only for a command it may forward or audit. A client looping
megabyte commands its profile refuses by name so costs a hash lookup per command, not
the hundreds of thousands of Python objects its arguments would make in one loop turn
(README "Hostile clients"). A command that goes upstream is sent as the client's own
text, a view of what was read (wire.Spliced), and its arguments are built only if a
check reads them. A long string inside them is kept in parts until then, a long name
or id is handed on in its parts (qjson.LongString), and one anywhere else nobody reads
is never built at all (qjson.Framer._string_fate).
"""

from __future__ import annotations

import gc
import json
import re
import tracemalloc

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmpmux import qjson
from qmpmux.policy import DEFAULT_POLICY, FULL, READONLY, ProfileSpec, compile_policy
from qmpmux.qjson import Deferred, Framer, JsonValue, LongString, ParseError, encode
from qmpmux.session import Command, Local, Peer, Phase, Session, Verdict
from qmpmux.spelled import Spliced
from qmpmux.wire import (
    ARGUMENTS,
    COMMAND_NOT_FOUND,
    DEFERRED_MEMBERS,
    EXECUTE,
    ID,
    PART_MEMBERS,
    READ_MEMBERS,
    error_reply,
)
from tests.playbook import spelled_out

EMPTY_OBJECTS = 1 << 16  # 192 KiB of `{},`: some 4 MiB of Python dicts if built
AUDITED = compile_policy(
    {
        "audited": ProfileSpec(base="readonly", audit_arguments=True),
        "globbed": ProfileSpec(commands=("*",)),  # migrate, netdev_add by a glob: checked
    }
)


def big(name: str, arguments: bytes = b"{'a':[" + b"{}," * EMPTY_OBJECTS + b"{}]}") -> bytes:
    return b"{'execute':'" + name.encode() + b"','arguments':" + arguments + b",'id':7}"


def session(profile: str = READONLY, negotiated: bool = True) -> Session:
    profiles = AUDITED.profiles if profile in AUDITED.profiles else DEFAULT_POLICY.profiles
    s = Session(1, Peer("unix:t"), frozenset({"oob"}), client_framer(), profiles[profile])
    if negotiated:
        s.phase = Phase.COMMAND
    return s


def client_framer() -> Framer:
    return Framer(
        max_message_bytes=1 << 24,
        defer_members=DEFERRED_MEMBERS,
        read_members=READ_MEMBERS,
        part_members=PART_MEMBERS,
    )


def judged(s: Session, data: bytes, framer: Framer | None = None) -> Verdict:
    (value,) = (framer or s.framer).feed(data)
    assert not isinstance(value, ParseError), value
    return s.judge(value)


def peak_while_judging(s: Session, data: bytes) -> tuple[Verdict, int]:
    """The verdict, and the most memory allocated while the last bytes are read and the
    message judged (everything before is the framer's packed state)."""
    head, tail = data[:-64], data[-64:]
    assert s.framer.feed(head) == []
    gc.collect()
    tracemalloc.start()
    try:
        verdict = judged(s, tail)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return verdict, peak


def test_a_command_refused_by_name_never_builds_its_arguments() -> None:
    data = big("human-monitor-command")
    verdict, peak = peak_while_judging(session(READONLY), data)
    assert isinstance(verdict, Local), verdict
    reply = spelled_out(verdict.data)
    assert b"refused by qmpmux policy" in reply and b'"id": 7' in reply
    assert peak <= 3 * len(data), peak / len(data)  # its packed text, no objects


def test_nor_does_a_command_before_negotiation() -> None:
    data = big("query-status")
    verdict, peak = peak_while_judging(session(READONLY, negotiated=False), data)
    assert isinstance(verdict, Local) and b"Expecting capabilities" in spelled_out(verdict.data)
    assert peak <= 3 * len(data), peak / len(data)


@pytest.mark.parametrize(
    "arguments",
    [
        b'{"a":[' + b'"' + b"x" * 60 + b'",' * 1 + b'"y",' * 200_000 + b'"z"]}',
        b'{"p":1,"a":{"b":[' + b"[0,1]," * 200_000 + b'{}]},"c":[' + b"2," * 3000 + b"3]}",
        b"[" + b"{}," * 300_000 + b"[" + b'"w",' * 100_000 + b"1]]",
    ],
    ids=["strings", "nested", "arrays"],
)
def test_completing_a_big_message_copies_none_of_its_big_members(
    arguments: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A big container that closes is kept apart from its parent's packed bytes (qjson.
    _Unjoined), not copied into them as each level closes: megabytes copied in the turn
    that completes the message held the loop ~0.6 ms a MiB. It is joined when read
    (Deferred), a slice at a time, by the worker thread for a big message."""
    data = b'{"execute":"query-status","arguments":' + arguments + b',"id":[1,2]}'
    framer = client_framer()
    for start in range(0, len(data) - 8, 4096):  # (read as qmpmux reads a client)
        assert framer.feed(data[start : min(start + 4096, len(data) - 8)]) == []
    packed: list[int] = []  # what each packing call in the last turn wrote

    def encode_into(value: JsonValue, out: bytearray, start: int) -> None:
        encode(value, out, start)
        packed.append(len(out) - start)

    def pack(value: JsonValue) -> bytes:
        out = encode_whole(value)
        packed.append(len(out))
        return out

    encode, encode_whole = qjson._encode_into, qjson._pack
    monkeypatch.setattr(qjson, "_encode_into", encode_into)
    monkeypatch.setattr(qjson, "_pack", pack)
    (value,) = framer.feed(data[-8:])
    monkeypatch.undo()
    assert max(packed, default=0) < qjson._APART_FROM, packed
    assert isinstance(value, dict) and value["execute"] == "query-status"
    given = value["arguments"]
    assert isinstance(given, Deferred)
    assert given.resolve() == json.loads(arguments)
    assert len(given) <= len(arguments)


def test_a_forwarded_command_goes_as_the_clients_text_and_never_builds_its_arguments() -> None:
    data = big("query-status")
    verdict, peak = peak_while_judging(session(FULL), data)
    assert isinstance(verdict, Command)
    assert peak <= 3 * len(data), peak / len(data)  # no objects, and no copy of the text
    # the client's own tokens go upstream (wire.command_prefix), spliced in, not joined
    text = b"{'a':[" + b"{}," * EMPTY_OBJECTS + b"{}]}"
    assert isinstance(verdict.prefix, Spliced)
    assert bytes(verdict.prefix) == b'{"execute":\'query-status\',"arguments":' + text
    assert any(type(part) is memoryview for part in verdict.prefix.parts)
    (eager,) = Framer(max_message_bytes=1 << 24).feed(data)
    assert isinstance(eager, dict)
    (value,) = client_framer().feed(data)
    assert isinstance(value, dict) and isinstance(value[ARGUMENTS], Deferred)
    assert value[ARGUMENTS].resolve() == eager[ARGUMENTS]


def test_a_check_that_reads_the_arguments_gets_them_built() -> None:
    filler = b"'x':[" + b"{}," * EMPTY_OBJECTS + b"{}]"
    secret = big("qom-get", b"{'path':'/objects/s'," + filler + b",'property':'Secret'}")
    verdict = judged(session(READONLY), secret)
    assert isinstance(verdict, Local)
    assert b"qom-get of property 'Secret' refused" in spelled_out(verdict.data)
    plain = big("qom-get", b"{'path':'/objects/s'," + filler + b",'property':'size'}")
    assert isinstance(judged(session(READONLY), plain), Command)


def test_a_refused_command_is_audited_with_its_arguments() -> None:
    few = 10_000  # still a big message (packed), under the 64 KiB recorded whole
    arguments = b"{'a':[" + b"{}," * few + b"{}]}"
    verdict = judged(session("audited"), big("human-monitor-command", arguments))
    assert isinstance(verdict, Local) and verdict.arguments == {"a": [{}] * (few + 1)}
    # Past 64 KiB of text, only their size (README "Policy", audit-arguments).
    verdict = judged(session("audited"), big("human-monitor-command"))
    assert isinstance(verdict, Local) and verdict.arguments == 6 + 3 * EMPTY_OBJECTS + 4


def test_arguments_that_are_not_an_object_are_still_refused_as_qemu_does() -> None:
    verdict = judged(session(READONLY), big("query-status", b"[" + b"{}," * EMPTY_OBJECTS + b"1]"))
    assert isinstance(verdict, Local)
    assert b"QMP input member 'arguments' must be an object" in spelled_out(verdict.data)


def verdict_text(verdict: Verdict) -> tuple[object, ...]:
    """What a verdict says, whatever it is made of (bytes or pieces, str or parts)."""
    wire_id = None if isinstance(verdict, Local) or verdict.wire_id is None else verdict.wire_id
    said = spelled_out(wire_id) if wire_id is not None else None
    if isinstance(verdict, Command):
        return ("command", verdict.name, bytes(verdict.prefix), said, verdict.arguments)
    if isinstance(verdict, Local):
        name = "".join(verdict.name.parts) if isinstance(verdict.name, LongString) else verdict.name
        data = spelled_out(verdict.data)
        return ("local", data, verdict.oob, name, verdict.decision, verdict.arguments)
    return ("extension", verdict.name, said, verdict.given, verdict.arguments)


NAMES = [
    "query-status",
    "human-monitor-command",
    "qmp_capabilities",
    "getfd",
    "stop",
    "qom-get",
    "__org.qmpmux_clients",
]
values = st.recursive(
    st.sampled_from([b"1", b"'a'", b"null", b"{}", b"[]"]),
    lambda children: (
        st.lists(children, max_size=4).map(lambda xs: b"[" + b",".join(xs) + b"]")
        | st.lists(st.tuples(st.sampled_from([b"'a'", b"'b'", b"'fd'"]), children), max_size=4)
        .filter(lambda kvs: len({k for k, _ in kvs}) == len(kvs))
        .map(lambda kvs: b"{" + b",".join(k + b":" + v for k, v in kvs) + b"}")
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(NAMES),
    arguments=values,
    profile=st.sampled_from([FULL, READONLY, "vm-control", "audited"]),
    negotiated=st.booleans(),
)
def test_deferring_changes_no_verdict(
    name: str, arguments: bytes, profile: str, negotiated: bool
) -> None:
    data = b"{'execute':'" + name.encode() + b"','arguments':" + arguments + b",'id':1}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(qjson, "_PACK_EVERY", 1)  # every message is a packed one
        deferred = verdict_text(judged(session(profile, negotiated), data))
        patch.setattr(qjson, "_APART_FROM", 1)  # every packed child kept apart (_Unjoined)
        apart = verdict_text(judged(session(profile, negotiated), data))
    eager = judged(session(profile, negotiated), data, Framer(max_message_bytes=1 << 24))
    assert deferred == apart == verdict_text(eager)


def test_only_the_named_members_of_a_top_level_object_are_deferred() -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(qjson, "_PACK_EVERY", 1)
        out: list[JsonValue | ParseError] = client_framer().feed(
            b"{'id':[1,2],'arguments':{'x':[{}]},'y':[3]} [{'arguments':{}}] {'arguments':1}"
        )
    first, second, third = out
    assert isinstance(first, dict) and first["y"] == [3]
    assert isinstance(first["id"], Deferred) and first["id"].resolve() == [1, 2]
    assert isinstance(first[ARGUMENTS], Deferred) and first[ARGUMENTS].is_object
    assert second == [{"arguments": {}}]
    assert third == {"arguments": 1}


# --- long strings ------------------------------------------------------------------------


def fed(framer: Framer, data: bytes, chunk: int) -> list[JsonValue | ParseError]:
    """`data` fed `chunk` bytes at a time, as a client's reads arrive (a long string is
    decoded a part per read that brings enough of it: Framer._string_step)."""
    out: list[JsonValue | ParseError] = []
    for start in range(0, len(data), chunk):
        out += framer.feed(data[start : start + chunk])
    return out


LONG = 4 << 20


def longest_string(value: object) -> int:
    """The longest str in `value` (what a Deferred keeps packed is not walked)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return max([0, *map(longest_string, value), *map(longest_string, value.values())])
    if isinstance(value, list):
        return max([0, *map(longest_string, value)])
    return 0


@pytest.mark.parametrize("unit", [b"x", "\u00e9".encode(), "\U0001f600".encode()])
def test_a_long_string_in_forwarded_arguments_is_never_built(unit: bytes) -> None:
    # Built, it is one str of 4 to 16 MiB made in the turn that completes it (README
    # "Security"): the first touch of that much fresh memory holds the loop milliseconds.
    text = b"{'a':'" + unit * (LONG // len(unit)) + b"'}"
    data = big("query-status", text)
    s = session(FULL)
    (value,) = fed(s.framer, data, 1 << 16)
    assert isinstance(value, dict) and isinstance(value[ARGUMENTS], Deferred)
    assert longest_string(value) < 64
    verdict = s.judge(value)
    assert isinstance(verdict, Command)
    assert bytes(verdict.prefix) == b'{"execute":\'query-status\',"arguments":' + text


@pytest.mark.parametrize(
    ("head", "tail", "error"),
    [
        (b"['", b"']", b"QMP input must be a JSON object"),
        (b"{'execute':'stop','x':'", b"'}", b"QMP input member 'x' is unexpected"),
        (b"{'execute':['", b"']}", b"QMP input member 'execute' must be a string"),
        (b"{'execute':'stop','arguments':'", b"'}", b"member 'arguments' must be an object"),
        (b"{'execute':'stop','arguments':{'a':1 '", b"'}}", b"expected separator in dict"),
    ],
)
def test_a_long_string_nobody_reads_is_never_built(head: bytes, tail: bytes, error: bytes) -> None:
    s = session(FULL)
    (value,) = fed(s.framer, head + b"x" * LONG + tail, 1 << 16)
    assert longest_string(value) < 64  # an empty str stands in for it
    verdict = s.judge(value)
    assert isinstance(verdict, Local) and error in spelled_out(verdict.data)


UNITS = [b"x", "\u00e9".encode(), "\U0001f600".encode(), b"\\u0000"]


def fed_and_judged(s: Session, data: bytes) -> tuple[JsonValue | ParseError, Verdict, int]:
    """The value read in reads of 64 KiB, its verdict, and the most memory allocated
    while the read that completes it is handled and the message judged."""
    *head, tail = [data[at : at + (1 << 16)] for at in range(0, len(data), 1 << 16)]
    for read in head:
        assert s.framer.feed(read) == []
    gc.collect()
    tracemalloc.start()
    try:
        (value,) = s.framer.feed(tail)
        assert not isinstance(value, ParseError), value
        verdict = s.judge(value)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return value, verdict, peak


@pytest.mark.parametrize("unit", UNITS, ids=["ascii", "latin", "astral", "nul"])
@pytest.mark.parametrize(
    ("profile", "desc"),
    [
        (FULL, "The command %s has not been found"),
        (READONLY, "The command %s has been refused by qmpmux policy"),
    ],
)
def test_a_long_name_is_answered_as_qemu_would_without_being_joined(
    unit: bytes, profile: str, desc: str
) -> None:
    """No command has a name that long: its reply is known, QEMU's "not found" or the
    profile's refusal, quoting the name as QEMU does; it is never joined (4 to 16 MiB
    of fresh memory in one loop turn) nor sent to QEMU to read a byte at a time."""
    name = unit * (LONG // len(unit))
    data = b"{'execute':'" + name + b"','id':7}"
    value, verdict, peak = fed_and_judged(session(profile), data)
    assert isinstance(value, dict) and isinstance(value[EXECUTE], LongString)
    assert isinstance(verdict, Local) and verdict.decision is not None
    assert peak < LONG // 8, peak  # nothing the size of the name
    (whole,) = Framer(max_message_bytes=1 << 24).feed(data)
    assert isinstance(whole, dict) and isinstance(whole[EXECUTE], str)
    text = desc % whole[EXECUTE]
    error = b'"error": {"class": "CommandNotFound", "desc": ' + encode(text) + b"}"
    assert spelled_out(verdict.data) == b'{"id": 7, ' + error + b"}\r\n"
    assert verdict_text(verdict) == verdict_text(as_qemu_answers(session(profile).judge(whole)))


@pytest.mark.parametrize("unit", UNITS, ids=["ascii", "latin", "astral", "nul"])
@pytest.mark.parametrize(
    "shape",
    [b"'%s'", b"[1,'%s',{'a':'%s'}]", b"{'b':{'%s':['%s']},'a':0}"],
    ids=["str", "in", "key"],
)
def test_a_long_id_is_echoed_from_its_parts(unit: bytes, shape: bytes) -> None:
    """Strings and keys in it too, each echoed as QEMU prints it, keys in QDict order."""
    long = unit * (LONG // len(unit) // 2)
    data = b"{'execute':'query-status','id':" + shape.replace(b"%s", long) + b"}"
    value, verdict, peak = fed_and_judged(session(FULL), data)
    assert isinstance(value, dict) and isinstance(value[ID], LongString | Deferred)
    assert isinstance(verdict, Command) and verdict.wire_id is not None
    assert peak < LONG // 8, peak
    (whole,) = Framer(max_message_bytes=1 << 24).feed(data)
    assert isinstance(whole, dict)
    assert spelled_out(verdict.wire_id) == encode(whole[ID])


@pytest.mark.parametrize("unit", UNITS, ids=["ascii", "latin", "astral", "nul"])
@pytest.mark.parametrize("other", [b"", b",'y':2", b",'zz':2"])
def test_a_long_top_level_key_is_named_as_qemu_names_it_without_being_joined(
    unit: bytes, other: bytes
) -> None:
    """A key that long is never a member QEMU knows: the message is refused, naming it
    when it is the first unexpected member in QEMU's order (its QDict bucket, summed as
    it was read), never joined. Another unexpected member may come first."""
    data = b"{'execute':'query-status','" + unit * (LONG // len(unit)) + b"':1" + other + b"}"
    value, verdict, peak = fed_and_judged(session(FULL), data)
    assert isinstance(value, qjson.Message) and not any(len(k) > 64 for k in value)
    assert isinstance(verdict, Local)
    assert peak < LONG // 8, peak
    (whole,) = Framer(max_message_bytes=1 << 24).feed(data)
    assert verdict_text(verdict) == verdict_text(session(FULL).judge(whole))


TWICE = [
    b"{'execute':'query-status','%s':{'%s':1},'zz':2}",
    b"{'execute':'query-status','%s':1,'arguments':{'%s':1},'zz':2}",
]


# Sizes whose key QEMU hashes to a later bucket than `zz` (473 and 331, against 321).
@pytest.mark.parametrize("size", [5_000, LONG + 2], ids=["read-whole", "read-in-parts"])
@pytest.mark.parametrize("shape", TWICE, ids=["in-its-value", "in-arguments"])
def test_a_long_top_level_key_keeps_its_order_when_it_is_used_deeper_too(
    size: int, shape: bytes
) -> None:
    """The key deeper is the same key (the same stand-in): its bucket is still the one
    the top-level member is ordered by, so `zz` comes first, as QEMU has it."""
    assert qjson._bucket("x" * size) > qjson._bucket("zz")
    data = shape.replace(b"%s", b"x" * size)
    _value, verdict, _peak = fed_and_judged(session(FULL), data)
    assert isinstance(verdict, Local)
    assert spelled_out(verdict.data).endswith(b"\"QMP input member 'zz' is unexpected\"}}\r\n")
    (whole,) = Framer(max_message_bytes=1 << 24).feed(data)
    assert verdict_text(verdict) == verdict_text(session(FULL).judge(whole))


@pytest.mark.parametrize("unit", UNITS, ids=["ascii", "latin", "astral", "nul"])
def test_a_long_key_in_arguments_is_built_only_when_they_are_read(unit: bytes) -> None:
    key = unit * (LONG // len(unit))
    data = big("query-status", b"{'a':1,'" + key + b"':{'" + key + b"':[2]}}")
    value, verdict, peak = fed_and_judged(session(FULL), data)
    assert isinstance(verdict, Command) and peak < LONG // 8, peak
    assert bytes(verdict.prefix).endswith(b"{'a':1,'" + key + b"':{'" + key + b"':[2]}}")
    assert isinstance(value, dict) and isinstance(value[ARGUMENTS], Deferred)
    (whole,) = Framer(max_message_bytes=1 << 24).feed(data)
    assert isinstance(whole, dict)
    assert value[ARGUMENTS].resolve() == whole[ARGUMENTS]  # in order, each key whole
    assert list(value[ARGUMENTS].resolve()) == list(whole[ARGUMENTS])


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (b"x" * LONG, b"x" * LONG),  # both read in parts
        (b"\\u0078" * 24_000, b"x" * 24_000),  # in parts, then whole: the same key
        (b"x" * 5_000, b"\\u0078" * 5_000),  # both whole, over 4096 characters
    ],
    ids=["parts-parts", "parts-whole", "whole-whole"],
)
@pytest.mark.parametrize("where", [b"{%s}", b"{'execute':'stop','arguments':{%s}}", b"[{%s}]"])
def test_a_long_key_twice_is_a_duplicate_key(first: bytes, second: bytes, where: bytes) -> None:
    members = b"'" + first + b"':1,'" + second + b"':2"
    (value,) = fed(client_framer(), where.replace(b"%s", members), 1 << 16)
    assert value == ParseError("JSON parse error, duplicate key")
    other = b"'" + first + b"':1,'y" + second + b"':2"  # a key one character longer
    (different,) = fed(client_framer(), where.replace(b"%s", other), 1 << 16)
    assert not isinstance(different, ParseError)


@pytest.mark.parametrize("unit", UNITS, ids=["ascii", "latin", "astral", "nul"])
def test_a_check_builds_only_the_members_it_reads(unit: bytes) -> None:
    """readonly reads a qom-get's property (secrets): a long string beside it is never
    built, and the command goes upstream as the client's text."""
    text = b"{'path':'/objects/s','pad':'" + unit * (LONG // len(unit)) + b"','property':'size'}"
    value, verdict, peak = fed_and_judged(session(READONLY), big("qom-get", text))
    assert isinstance(verdict, Command) and peak < LONG // 8, peak
    assert bytes(verdict.prefix).endswith(b'"arguments":' + text)
    assert isinstance(value, dict) and isinstance(value[ARGUMENTS], Deferred)


@pytest.mark.parametrize("unit", UNITS, ids=["ascii", "latin", "astral", "nul"])
def test_a_long_property_is_no_secret_and_never_built(unit: bytes) -> None:
    """readonly compares a qom-get's property with short secret names: one of megabytes
    is none of them, told from its packed size (built and lowercased, 15 MiB ending in
    one emoji held the loop 157 ms)."""
    text = b"{'path':'/objects/s','property':'" + unit * (LONG // len(unit)) + b"'}"
    _value, verdict, peak = fed_and_judged(session(READONLY), big("qom-get", text))
    assert isinstance(verdict, Command) and peak < LONG // 8, peak
    secret = b"{'path':'/objects/s','pad':'" + unit * (LONG // len(unit)) + b"','property':'Key'}"
    _value, verdict, peak = fed_and_judged(session(READONLY), big("qom-get", secret))
    assert isinstance(verdict, Local) and peak < LONG // 8, peak
    assert b"qom-get of property 'Key' refused" in spelled_out(verdict.data)


def test_an_id_holds_only_its_own_long_strings() -> None:
    """A long string in the arguments is none of the id's: the id is echoed at once, and
    counts (and keeps) only itself."""
    data = b"{'execute':'query-status','arguments':{'p':'" + b"x" * LONG + b"'},'id':[1,{}]}"
    value, verdict, _peak = fed_and_judged(session(FULL), data)
    assert isinstance(value, dict) and isinstance(value[ID], Deferred)
    assert not value[ID].in_parts and len(value[ID]) < 64
    assert isinstance(verdict, Command) and verdict.wire_id == b"[1, {}]"


@pytest.mark.parametrize("before", [b"'pad':'%s',", b""], ids=["after-a-long-pad", "alone"])
@pytest.mark.parametrize("long_id", [True, False], ids=["long-id", "short-id"])
def test_a_secret_property_kept_in_parts_is_still_refused(before: bytes, long_id: bool) -> None:
    """With a tiny _STR_STEP a secret name is long enough to be kept in parts, among
    other strings kept so (its index then is not the first)."""
    secret = b"".join(b"\\u%04X" % c for c in b"PASSWORDS")
    args = b"{" + before.replace(b"%s", b"x" * 40) + b"'property':'" + secret + b"'}"
    ident = b"'" + b"i" * 40 + b"'" if long_id else b"1"
    data = b"{'id':" + ident + b",'execute':'qom-get','arguments':" + args + b"}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(qjson, "_STR_STEP", 16)
        patch.setattr(qjson, "_PACK_EVERY", 1)  # the arguments are deferred
        (value,) = fed(client_framer(), data, 7)
    assert isinstance(value, dict) and isinstance(value[ARGUMENTS], Deferred)
    verdict = session(READONLY).judge(value)
    assert isinstance(verdict, Local), verdict
    assert b"qom-get of property 'PASSWORDS' refused" in spelled_out(verdict.data)


@pytest.mark.parametrize(
    ("command", "member", "head", "refused"),
    [
        ("migrate", "uri", "exec:", True),
        ("migrate", "uri", "tcp:", False),
        ("migrate", "uri", "fd:3", True),  # a numeric fd: QEMU's own descriptor
        ("qom-set", "property", "fd", False),  # no fd property: its value is not one
        ("netdev_add", "script", "/bin/", True),  # (socket addresses are looked for too)
        ("netdev_add", "id", "n", False),
    ],
)
def test_an_escape_hatch_reads_only_the_start_of_a_long_member(
    command: str, member: str, head: str, refused: bool
) -> None:
    """Granted by a glob, an escape hatch is refused by the start of its member, and a
    numeric fd by its first character: the rest of megabytes is never built."""
    long = head.encode() + b"x" * LONG
    data = big(command, b"{'" + member.encode() + b"':'" + long + b"'}")
    _value, verdict, peak = fed_and_judged(session("globbed"), data)
    assert peak < LONG // 8, peak
    if refused:
        assert isinstance(verdict, Local), verdict
        assert b"refused by qmpmux policy" in spelled_out(verdict.data)
    else:
        assert isinstance(verdict, Command), verdict


def test_members_read_one_at_a_time_are_the_members_built_at_once() -> None:
    key = "k\u00e9\U0001f600" * (LONG // 64)
    text = json.dumps({"a": [1, {key: key}], key: {"b": key, key: 2}, "c": None})
    (value,) = fed(client_framer(), big("qom-get", text.encode()), 1 << 16)
    assert isinstance(value, dict) and isinstance(value[ARGUMENTS], Deferred)
    whole = value[ARGUMENTS].resolve()
    assert isinstance(whole, dict) and list(whole) == ["a", key, "c"]
    one_by_one = qjson.DeferredObject(value[ARGUMENTS])
    assert list(one_by_one) == ["a", key, "c"] and len(one_by_one) == 3
    assert one_by_one[key] == whole[key] and one_by_one["a"] == whole["a"]
    assert "c" in one_by_one and "d" not in one_by_one and one_by_one.get("d") is None
    assert dict(one_by_one) == whole == one_by_one.members()


def test_a_check_that_reads_the_arguments_gets_their_long_strings() -> None:
    long = "\u00e9\U0001f600" * (LONG // 8)
    data = big("qom-get", b"{'path':'/objects/s','property':" + json.dumps(long).encode() + b"}")
    s = session(READONLY)
    (value,) = fed(s.framer, data, 1 << 16)
    assert isinstance(value, dict) and isinstance(value[ARGUMENTS], Deferred)
    assert value[ARGUMENTS].resolve() == {"path": "/objects/s", "property": long}
    verdict = s.judge(value)  # readonly reads a qom-get's property (secrets)
    assert isinstance(verdict, Command) and verdict.name == "qom-get"


def test_a_message_never_holds_the_long_strings_of_the_next() -> None:
    # The first one's arguments are packed (many values) with no long string in them.
    first = b"{'execute':'a','arguments':{'k':[" + b"{}," * 1100 + b"{}]}}"
    second = b"{'execute':'b','arguments':{'k':'" + b"y" * 100 + b"'}}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(qjson, "_STR_STEP", 16)
        one, two = fed(client_framer(), first + second, 7)
    assert isinstance(one, dict) and isinstance(one[ARGUMENTS], Deferred)
    assert isinstance(two, dict) and isinstance(two[ARGUMENTS], Deferred)
    assert len(one[ARGUMENTS].raw) > 1100  # nothing kept in parts: it can be read whole
    assert one[ARGUMENTS].resolve() == {"k": [{}] * 1101}
    assert two[ARGUMENTS].resolve() == {"k": "y" * 100}


# Strings long enough to be decoded in parts when _STR_STEP is small: escapes of every
# kind (surrogate pairs among them) and raw UTF-8, cut anywhere.
long_strings = st.text(min_size=30, max_size=90).flatmap(
    lambda t: st.sampled_from(
        [
            json.dumps(t).encode(),
            json.dumps(t, ensure_ascii=False).encode(),
            b"'" + json.dumps(t)[1:-1].encode() + b"\\x'",  # a bad escape: a lexical error
        ]
    )
)
keys = st.sampled_from([b"'a'", b"'b'"]) | long_strings
anywhere = st.recursive(
    st.sampled_from([b"1", b"'a'", b"{}", b"[]"]) | long_strings,
    lambda children: (
        st.lists(children, max_size=3).map(lambda xs: b"[" + b",".join(xs) + b"]")
        | st.lists(st.tuples(keys, children), max_size=3)
        .filter(lambda kvs: len({k for k, _ in kvs}) == len(kvs))
        .map(lambda kvs: b"{" + b",".join(k + b":" + v for k, v in kvs) + b"}")
    ),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from([b"'query-status'", b"'qom-get'", b"'stop'"]) | long_strings,
    arguments=anywhere,
    id_=anywhere,
    extra=st.sampled_from([b"", b",'x':"]).flatmap(
        lambda key: anywhere.map(lambda v: key + v) if key else st.just(b"")
    ),
    profile=st.sampled_from([FULL, READONLY, "audited"]),
    top_level=st.booleans(),
)
def test_long_strings_left_unbuilt_change_no_verdict(
    name: bytes,
    arguments: bytes,
    id_: bytes,
    extra: bytes,
    profile: str,
    top_level: bool,
) -> None:
    """What the client reader leaves unbuilt (kept in parts, or dropped as unread) gives
    every message the same verdict, byte for byte, as reading everything."""
    if top_level:  # not an object: refused, nothing in it read
        data = arguments + b"\n"  # (a number ends at the byte after it)
    else:
        data = b"{'execute':" + name + b",'arguments':" + arguments + b",'id':" + id_ + extra + b"}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(qjson, "_STR_STEP", 16)
        # Keys of 10 characters or more are LongKeys where they may be (4096 otherwise):
        # the members QEMU knows are shorter, the long strings above longer.
        patch.setattr(qjson, "_LONG_KEY", 10)
        patch.setattr(qjson, "_LONG_KEY_TEXT", re.compile(rb'"(?:[^"\\]|\\.){10,}"\s*:'))
        lazy = fed(client_framer(), data, 7)
        eager = fed(Framer(max_message_bytes=1 << 24), data, 7)
    assert lazy  # (a bad escape is a lexical error: more than one value then)
    for parted, whole in zip(lazy, eager, strict=True):
        want = session(profile).judge(whole)
        if isinstance(parted, dict) and isinstance(parted.get(EXECUTE), LongString):
            want = as_qemu_answers(want)
        assert verdict_text(session(profile).judge(parted)) == verdict_text(want)


def as_qemu_answers(verdict: Verdict) -> Verdict:
    """A command sent to QEMU under a name it has not: QEMU's answer, which is what
    qmpmux answers itself for a long name (kept in parts, never a command's)."""
    if not isinstance(verdict, Command):
        return verdict
    desc = f"The command {verdict.name} has not been found"
    reply = error_reply(verdict.wire_id, COMMAND_NOT_FOUND, desc)
    return Local(reply, verdict.oob, verdict.name, verdict.decision, verdict.arguments)


@pytest.mark.parametrize(
    ("member", "may"),
    [
        (b"{'a':[{'type':'fd','str':'s'}]}", True),
        (b"{'a':[{'str':'s','typ\\u0065':'fd'}]}", True),  # (the value, not the spelling)
        (b"{'a':['type','fd']}", True),  # side by side in a list: may (then a walk decides)
        (b"{'a':[{'type':'fdx'},{'kind':'fd'}]}", False),
        (b"{'a':[{'type':'file'}]}", False),
        (  # past the first packed values, beside a long key and a long string
            b"{'a':["
            + b"{}," * 3000
            + b"{'"
            + b"k" * 5000
            + b"':'"
            + b"x" * 70000
            + b"','type':'fd','str':'s'}]}",
            True,
        ),
    ],
    ids=["object", "escaped", "list", "others", "file", "far"],
)
def test_a_member_that_cannot_hold_a_pair_is_told_unbuilt(member: bytes, may: bool) -> None:
    data = big("chardev-add", b"{'x':" + member + b",'pad':[" + b"{}," * EMPTY_OBJECTS + b"{}]}")
    (value,) = client_framer().feed(data)
    assert isinstance(value, dict) and isinstance(value[ARGUMENTS], Deferred)
    args = qjson.DeferredObject(value[ARGUMENTS])
    assert qjson.may_hold_pair(args, "x", "type", "fd") is may
    assert not qjson.may_hold_pair(args, "pad", "type", "fd")
    assert not qjson.may_hold_pair(args, "absent", "type", "fd")
    assert not args._read  # nothing built to tell


def test_asking_for_a_member_builds_nothing() -> None:
    """`key in args` reads the member names (a Mapping's own `in` builds the member)."""
    (value,) = client_framer().feed(big("getfd"))
    assert isinstance(value, dict) and isinstance(value[ARGUMENTS], Deferred)
    args = qjson.DeferredObject(value[ARGUMENTS])
    assert "a" in args and "fdname" not in args and 7 not in args
    assert not args._read


def _long(code: int, data: memoryview) -> str:
    return f"long {code} {bytes(data).hex()}"  # a long string's stand-in: any string will do


packable = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=300)
    | st.binary(min_size=4, max_size=4).map(lambda data: msgspec.msgpack.Ext(1, data)),
    lambda children: (
        st.lists(children, max_size=20)
        | st.dictionaries(st.text(max_size=8), children, max_size=20)
    ),
    max_leaves=80,
)


@settings(max_examples=400, deadline=None)
@given(value=packable, step=st.integers(0, 200))
def test_a_container_built_a_run_at_a_time_is_the_container(value: object, step: int) -> None:
    # qjson.unpacked builds a container of megabytes in runs of at most UNPACK_STEP
    # packed bytes (a judging thread holds the interpreter no longer than one run).
    decoder = msgspec.msgpack.Decoder(ext_hook=_long)
    raw = msgspec.msgpack.encode(value)
    calls: list[bytes] = []

    def decode(data: bytes | memoryview) -> object:
        calls.append(bytes(data))
        return decoder.decode(data)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(qjson, "UNPACK_STEP", step)
        assert qjson.unpacked(raw, decode) == decoder.decode(raw)
    for data in calls:  # a run's header is up to 5 bytes; one value is built whole
        built = decoder.decode(data)
        assert len(data) <= step + 5 or not isinstance(built, list | dict) or len(built) == 1
