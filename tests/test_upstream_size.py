"""What qmpmux sends QEMU for a command costs QEMU no more than what the client sent.

QEMU reads its monitor one byte at a time and every client waits behind the bytes on the
wire (README "Big commands cost everyone"), so the upstream text of a command may exceed
the client's own text by qmpmux's `,"id":N` only, whatever spelling the client chose, and
must mean the same to QEMU. tests/test_qjson_qemu.py checks the meaning against QEMU.
"""

from __future__ import annotations

from hypothesis import given, settings

from qmpmux.qjson import Framer, JsonValue, Message
from qmpmux.session import Command, Peer, Phase, Session
from qmpmux.spelled import Spliced
from qmpmux.wire import SPLICED_FROM, command_bytes, upstream_write
from tests.spellings import commands

UPSTREAM_ID = 1023
ID_COST = len(b',"id":1023')


def command_mode_session() -> Session:
    session = Session(1, Peer("unix:t"), frozenset({"oob"}), Framer())
    session.phase = Phase.COMMAND
    return session


def forwarded(data: bytes) -> tuple[JsonValue, bytes]:
    """The client's command as the reader sees it, and the bytes qmpmux writes upstream."""
    (value,) = Framer().feed(data)
    assert isinstance(value, dict), value
    verdict = command_mode_session().judge(value)
    assert isinstance(verdict, Command), verdict
    return value, bytes(command_bytes(verdict.prefix, UPSTREAM_ID))


def same_command(upstream: bytes, value: JsonValue) -> None:
    assert isinstance(value, dict)
    (back,) = Framer().feed(upstream)
    assert isinstance(back, dict), back
    assert back["id"] == UPSTREAM_ID
    assert repr(back["execute"]) == repr(value["execute"])
    args = value.get("arguments")
    assert repr(back.get("arguments")) == repr(args or None)


@settings(max_examples=500, deadline=None)
@given(data=commands(["query-name", "qom-list"], padded=False))
def test_upstream_text_is_never_longer_than_the_clients(data: bytes) -> None:
    value, upstream = forwarded(data)
    assert len(upstream) <= len(data) + ID_COST
    same_command(upstream, value)


@settings(max_examples=300, deadline=None)
@given(data=commands(["query-name", "qom-list"]))
def test_whitespace_and_ids_are_not_forwarded(data: bytes) -> None:
    value, upstream = forwarded(data)
    assert len(upstream) <= len(data) + ID_COST
    same_command(upstream, value)


def test_spellings_shorter_than_any_re_encoding_are_kept() -> None:
    # U+0000 as C0 80 (6 bytes as \u0000), '"' raw in a single-quoted string (2 as \"),
    # floats written shorter than their shortest round-trip text, integers beyond uint64
    cases = [
        b'{"execute":"qom-list","arguments":{"path":"' + b"\xc0\x80" * 4096 + b'"}}',
        b"{'execute':'qom-list','arguments':{'path':'" + b'"' * 4096 + b"'}}",
        b"{'execute':'qom-list','arguments':{'v':[" + b"1e2," * 1000 + b"9e308]}}",
        b"{'execute':'qom-list','arguments':{'v':[" + b"1" * 300 + b"]}}",
        b'{"execute":"qom-list","arguments":{"v":[' + b'"\\u0000",' * 1000 + b"0]}}",
    ]
    for data in cases:
        value, upstream = forwarded(data)
        assert len(upstream) <= len(data) + ID_COST, (data[:60], upstream[:60])
        same_command(upstream, value)


@settings(max_examples=300, deadline=None)
@given(data=commands(["query-name"]))
def test_member_texts_do_not_depend_on_how_input_is_split(data: bytes) -> None:
    # Whole input takes runs of members at once (their spans found in the run), one
    # byte at a time goes token by token.
    whole = Framer().feed(b"{'k':0," + data[1:])
    framer = Framer()
    bytewise = [
        item
        for i in range(len(data) + 6)
        for item in framer.feed((b"{'k':0," + data[1:])[i : i + 1])
    ]
    assert len(whole) == len(bytewise) == 1
    a, b = whole[0], bytewise[0]
    assert isinstance(a, Message) and isinstance(b, Message)
    assert repr(a) == repr(b)
    for key in a:
        assert a.member_text(key) == b.member_text(key), key


def test_a_long_text_is_spliced_in_and_written_with_the_commands_around_it() -> None:
    """From SPLICED_FROM on, the client's text is sent as the view it is, never copied
    into qmpmux's bytes (a copy costs ~0.5 ms a MiB in one loop turn), and commands that
    share a write keep their order."""
    long = b"{'a':'" + b"x" * SPLICED_FROM + b"'}"
    _, small = forwarded(b'{"execute":"query-status"}')
    value, big = forwarded(b"{'execute':'query-status','arguments':" + long + b"}")
    verdict = command_mode_session().judge(value)
    assert isinstance(verdict, Command) and isinstance(verdict.prefix, Spliced)
    assert any(type(part) is memoryview for part in verdict.prefix.parts)
    assert big == b'{"execute":\'query-status\',"arguments":' + long + b',"id":1023}'
    joined = upstream_write([small, command_bytes(verdict.prefix, 5), small])
    assert isinstance(joined, Spliced)
    assert bytes(joined) == small + big.replace(b"1023}", b"5}") + small
    assert upstream_write([small, small]) == small + small


def test_a_text_that_would_keep_a_much_bigger_message_alive_is_copied_out() -> None:
    """A view holds all of the message it views: arguments beside an id of megabytes are
    copied, so that what qmpmux holds for the command is what it counts."""
    arguments = b"{'a':'" + b"x" * SPLICED_FROM + b"'}"
    big_id = b"[" + b"1," * (2 * SPLICED_FROM) + b"1]"
    (value,) = Framer().feed(
        b"{'execute':'query-status','arguments':" + arguments + b",'id':" + big_id + b"}"
    )
    verdict = command_mode_session().judge(value)
    assert isinstance(verdict, Command) and type(verdict.prefix) is bytes
    assert verdict.prefix == b'{"execute":\'query-status\',"arguments":' + arguments
