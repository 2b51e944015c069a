"""Unit tests for qmpmux.qjson: QEMU's JSON dialect, byte-exact.

Expectations come from docs/protocol.md (§1.2, §2, §3 and §6.4, checked on QEMU 7.2.22)
and from QEMU's source (json-lexer.c, json-streamer.c, json-parser.c, json-writer.c,
qdict.c, util/unicode.c).
tests/test_qjson_qemu.py checks the same behaviour against a real QEMU.
"""

from __future__ import annotations

import gc
import math
import random
import re
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from types import FrameType
from typing import TypedDict, Unpack

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from qmpmux import qjson
from qmpmux.qjson import (
    Framer,
    JsonValue,
    ParseError,
    encode,
    encode_compact,
    qdict_order,
)
from tests import qjson_reference as reference

Item = JsonValue | ParseError


def pe(msg: str) -> ParseError:
    """A parser error as QEMU words it."""
    return ParseError("JSON parse error, " + msg)


SIZE = ParseError("JSON token size limit exceeded")
COUNT = ParseError("JSON token count limit exceeded")
NESTING = ParseError("JSON nesting depth limit exceeded")


class Limits(TypedDict, total=False):
    max_message_bytes: int
    max_tokens: int
    max_nesting: int


def feed_whole(data: bytes, **limits: Unpack[Limits]) -> list[Item]:
    return Framer(**limits).feed(data)


def feed_bytewise(data: bytes, **limits: Unpack[Limits]) -> list[Item]:
    framer = Framer(**limits)
    out: list[Item] = []
    for i in range(len(data)):
        out += framer.feed(data[i : i + 1])
    return out


def feed_split(data: bytes, cuts: list[int], **limits: Unpack[Limits]) -> list[Item]:
    framer = Framer(**limits)
    out: list[Item] = []
    last = 0
    for cut in [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]:
        out += framer.feed(data[last:cut])
        last = cut
    return out


def canon(items: Sequence[object]) -> list[str]:
    """Comparable form: repr tells 1 from 1.0 and True, -0.0 from 0.0, and keeps dict order."""
    return [repr(x) for x in items]


def check(data: bytes, expected: Sequence[object], **limits: Unpack[Limits]) -> None:
    want = canon(expected)
    assert canon(feed_whole(data, **limits)) == want
    assert canon(feed_bytewise(data, **limits)) == want


# --------------------------------------------------------------------------
# docs/protocol.md §2.4: malformed inputs, each ended by "\n"
# --------------------------------------------------------------------------

P = b'{"execute":"query-status","id":'  # the "..." prefix of the table
QS: JsonValue = {"execute": "query-status"}

MALFORMED: list[tuple[bytes, list[Item]]] = [
    (b'{"execute": }\n', [pe("expecting value")]),
    (b'{"execute":"query-status"\n{"execute":"query-status"}\n', []),
    (
        b'{"execute":"query-status"\n{"execute":"query-status"}\n}\n',
        [pe("expected separator in dict")],
    ),
    (b'{"execute":"query-status\n', [pe("stray '\"query-status\n'")]),
    (b"]\n", [pe("expecting value")]),
    (b"}\n", [pe("expecting value")]),
    (b'{"execute":"query-status",}\n', [pe("expecting value")]),
    (b'{"execute" "query-status"}\n', [pe("missing : in object pair")]),
    (b'{"execute":"query-status" "id":1}\n', [pe("expected separator in dict")]),
    (b"[1 2]\n", [pe("expected separator in list")]),
    (b'{"execute":nul}\n', [pe("invalid keyword 'nul'")]),
    (P + b"True}\n", [pe("stray 'T'"), pe("expecting value")]),
    (P + b"NaN}\n", [pe("stray 'N'"), pe("expecting value")]),
    (P + b"Infinity}\n", [pe("stray 'I'"), pe("expecting value")]),
    (P + b"+1}\n", [pe("stray '+'"), pe("expecting value")]),
    (P + b"01}\n", [pe("stray '01'"), pe("expecting value")]),
    (P + b"-}\n", [pe("stray '-}'")]),
    (P + b"0x10}\n", [pe("expected separator in dict")]),
    (P + b'"\\q"}\n', [pe("invalid escape sequence in string")]),
    (P + b'"\\ud800"}\n', [pe("\\ud800 is not a valid Unicode character")]),
    (P + b'"\xc3\x28"}\n', [pe("invalid UTF-8 sequence in string")]),
    (P + b'"\xc0\xaf"}\n', [pe("invalid UTF-8 sequence in string")]),
    (P + b'"a\tb"}\n', [pe("stray '\"a\t'"), pe("expecting value")]),
    (
        b'{"execute":"query-status",\x0c"id":1}\n',
        [pe("stray '\x0c'"), pe("expecting value"), 1, pe("expecting value")],
    ),
    (b"\xff\n", [pe("stray '\ufffd'")]),
    (b"\x00\n", [pe("stray ''")]),
    (b"\x04\n", [pe("stray '\x04'")]),
    (b"hello world\n", [pe("invalid keyword 'hello'"), pe("invalid keyword 'world'")]),
    (b"// comment\n", [pe("stray '/'")]),
    (b"<xml/>\n", [pe("stray '<'")]),
    (b'{"execute":"query-status","id":1,"id":2}\n', [pe("duplicate key")]),
    (b'"hello"\n', ["hello"]),
    (b"42\n", [42]),
    (b"true\n", [True]),
    (b"null\n", [None]),
    (b'[{"execute":"query-status"}]\n', [[QS]]),
    (b"\n\n\n", []),
]


@pytest.mark.parametrize(("data", "expected"), MALFORMED, ids=[repr(d) for d, _ in MALFORMED])
def test_malformed_inputs(data: bytes, expected: list[Item]) -> None:
    check(data, expected)


def test_malformed_inputs_followed_by_a_command_recover() -> None:
    # Every row was verified on QEMU "each followed by a valid command that then worked";
    # only the unclosed-brace row swallows it.
    cmd = b'{"execute":"query-status"}'
    for data, expected in MALFORMED:
        if data.startswith(b'{"execute":"query-status"\n'):
            continue
        check(data + cmd, [*expected, QS])


def test_other_parser_messages() -> None:
    check(b"{1:2}", [pe("key is not a string in object")])
    check(b'{[1]:2}{"a":[}]}', [pe("key is not a string in object")] + [pe("expecting value")] * 2)
    # the first error wins: an error inside a value comes before "duplicate key"
    check(b'{"a":1,"a":[}]', [pe("expecting value")])
    check(b'{"a":1,"a":[1]}', [pe("duplicate key")])
    check(b"%d\n%p ", [pe("stray '%'"), pe("stray '%'")])
    # the message goes to a 1024-byte buffer
    long_word = b"a" * 1100
    check(long_word + b"\n", [pe(("invalid keyword '" + "a" * 1100)[:1023])])
    check(b"x" * 1005 + b" ", [pe("invalid keyword '" + "x" * 1005 + "'")])
    check(b"x" * 1006 + b" ", [pe("invalid keyword '" + "x" * 1006)])
    # stray tokens are not truncated; their C string ends at a NUL
    check(b'"' + b"y" * 2000 + b"\n", [pe("stray '\"" + "y" * 2000 + "\n'")])
    check(b'"ab\x00', [pe("stray '\"ab'")])


def test_unicode_escape_errors() -> None:
    cases = {
        b'"\\ud800\\u0041"': "\\ud800",
        b'"\\udc00"': "\\udc00",
        b'"\\uD83F\\uDFFE"': "\\uD83F\\uDFFE",  # U+1FFFE is a noncharacter
        b'"\\uFFFF"': "\\uFFFF",
        b'"\\ufdd0"': "\\ufdd0",
        b'"\\u12x4"': "\\u12x4",
        b'"\\u1"': '\\u1"',  # "%.*s" runs to the end of the token
        b'"\\u"': '\\u"',
        b"'\\u12'": "\\u12'",
        b'"\\ud800\\u12"': "\\ud800",
    }
    for token, shown in cases.items():
        check(token, [pe(shown + " is not a valid Unicode character")])


def test_invalid_utf8() -> None:
    bad = [
        b"\xc3",  # truncated
        b"\xe2\x82",
        b"\x80",  # lone continuation
        b"\xc0\xaf",  # overlong
        b"\xe0\x80\xaf",
        b"\xed\xa0\x80",  # surrogate (CESU)
        b"\xf4\x90\x80\x80",  # beyond U+10FFFF
        b"\xf8\x88\x80\x80\x80",
        b"\xef\xbf\xbe",  # U+FFFE noncharacter
        b"\xef\xb7\x90",  # U+FDD0 noncharacter
        b"\xf0\x9f\xbf\xbf",  # U+1FFFF noncharacter
    ]
    for raw in bad:
        check(b'"' + raw + b'" ', [pe("invalid UTF-8 sequence in string")])
        check(b"'a\\n" + raw + b"' ", [pe("invalid UTF-8 sequence in string")])
    # 0xFE/0xFF end the string token: lexical errors
    check(b'"a\xfeb" ', [pe("stray '\"a\ufffd'")])
    check(b'"a\xffb" ', [pe("stray '\"a\ufffd'")])


def test_stray_text_is_printed_as_json_writer_does() -> None:
    # the writer turns each invalid modified-UTF-8 sequence into one U+FFFD
    check(b"\xc3\xa9 ", [pe("stray '\ufffd'")])
    check(b"\xe2\x82\xac ", [pe("stray '\ufffd'")])
    check(b'"\xe2\x82\xac\x01', [pe("stray '\"\u20ac\x01'")])
    check(b'"\xc0\x80\x01', [pe("stray '\"\x00\x01'")])
    check(b'"\xef\xbf\xbe\x01', [pe("stray '\"\ufffd\x01'")])
    check(b'"\xe2\x82\x01', [pe("stray '\"\ufffd\x01'")])


# --------------------------------------------------------------------------
# docs/protocol.md §1.2 and §2.2: framing and QEMU's extensions
# --------------------------------------------------------------------------


def test_framing() -> None:
    check(b'{"execute":"query-status"}', [QS])
    check(b'{"execute":"query-status"}{"execute":"query-status"}', [QS, QS])
    # scalars need a following character
    framer = Framer()
    assert framer.feed(b"42") == []
    assert framer.feed(b"\n") == [42]
    assert framer.feed(b"tru") == []
    assert framer.feed(b"e ") == [True]
    check(b'"x"', ["x"])
    check(b" \t\r\n{ \t\r\n} \t\r\n", [{}])
    check(b"\x0c", [pe("stray '\x0c'")])
    check(b"\x0b{}", [pe("stray '\x0b'"), {}])


def test_extensions() -> None:
    check(b"{'execute':'query-status'}", [QS])
    check(b"['it\\'s', \"it\\'s\", 'say \"hi\"', \"a'b\"]", [["it's", "it's", 'say "hi"', "a'b"]])
    check(b'["a\xc0\x80b", "\\u0000"]', [["a\x00b", "\x00"]])
    check(
        b'["\\"\\\\\\/\\b\\f\\n\\r\\t", "\\u00e9\\u20AC\\ud83d\\ude00"]',
        [['"\\/\b\f\n\r\t', "\u00e9\u20ac\U0001f600"]],
    )
    check(b'"\xc3\xa9\xf0\x9f\x98\x80\x7f"\n', ["\u00e9\U0001f600\x7f"])


def test_numbers() -> None:
    check(
        b"[0, -0, 1, -1, 9223372036854775807, -9223372036854775808, 9223372036854775808,"
        b" 18446744073709551615, 18446744073709551616, -9223372036854775809,"
        b" 1.0, -0.0, 0.1, 1e3, 1E400, -1e400, 1e-400, 2.5e-3, 1E+2, 0.5]",
        [
            [
                0,
                0,
                1,
                -1,
                2**63 - 1,
                -(2**63),
                2**63,
                2**64 - 1,
                1.8446744073709552e19,
                -9.223372036854775808e18,
                1.0,
                -0.0,
                0.1,
                1000.0,
                math.inf,
                -math.inf,
                0.0,
                0.0025,
                100.0,
                0.5,
            ]
        ],
    )
    digits = b"1" * 5000  # beyond Python's int() digit limit: strtod
    check(b"[" + digits + b"]", [[math.inf]])
    # Long integers are known infinite without reading their digits: what strtod gives
    # on both sides of DBL_MAX (1.797...e308, 309 digits).
    for n in range(300, 340):
        for head in (b"1", b"17976931348623157", b"9"):
            token = (head + b"0" * n)[:n]
            for signed in (token, b"-" + token):
                assert qjson._parse_integer(bytearray(signed)) == float(signed), signed
    # "0e5" is not a number in QEMU's lexer: 0, then keyword "e", then 5
    check(b"[0e5]", [pe("expected separator in list")])
    check(b"[1.]", [pe("stray '1.]'")])
    check(b"[1e]", [pe("stray '1e]'")])
    check(b"[1e+]", [pe("stray '1e+]'")])
    check(b"[-a]", [pe("stray '-a'"), pe("expecting value")])


def test_streamer_ends_a_message_when_either_count_is_negative() -> None:
    # (a later json-streamer.c tests bracket_count >= 0 twice; QEMU 7.2 does not)
    check(b"[}]", [pe("expecting value")] * 2)
    check(b"[}}}]", [pe("expecting value")] * 4)
    check(b"{]", [pe("expecting value")])
    check(b"{]]", [pe("expecting value"), pe("expecting value")])
    check(
        b"[}" + b"[" * 1025 + b"]" * 1026,
        [pe("expecting value"), NESTING] + [pe("expecting value")] * 1026,
    )


# --------------------------------------------------------------------------
# docs/protocol.md §6.4 and §3.3: ids are re-serialised
# --------------------------------------------------------------------------

ID_TABLE: list[tuple[bytes, bytes]] = [
    (b"1.0", b"1"),
    (b"1e3", b"1000"),
    (b"0.1", b"0.10000000000000001"),
    (b"1.5", b"1.5"),
    (b"-0", b"0"),
    (b"-0.0", b"-0"),
    (b"9223372036854775808", b"9223372036854775808"),
    (b"18446744073709551616", b"1.8446744073709552e+19"),
    (b"1E400", b"inf"),
    (b"-1E400", b"-inf"),
    (b'[1,"two",3.0]', b'[1, "two", 3]'),
    (b"'single'", b'"single"'),
    (b'"a\\/b"', b'"a/b"'),
    (b'"\xc3\xa9"', b'"\\u00E9"'),
    (b'"\xf0\x9f\x98\x80"', b'"\\uD83D\\uDE00"'),
    (b'"\x7f"', b'"\\u007F"'),
    (b'"\\u0000x"', b'"\\u0000x"'),
    (b'"\\u00e9\\u20ac\\ud83d\\ude00"', b'"\\u00E9\\u20AC\\uD83D\\uDE00"'),
    (b'""', b'""'),
    (b"null", b"null"),
    (b"true", b"true"),
    (b"false", b"false"),
    (b"{}", b"{}"),
    (b"[]", b"[]"),
    (b'{"b":[{}],"a":1}', b'{"a": 1, "b": [{}]}'),
]


@pytest.mark.parametrize(("sent", "echoed"), ID_TABLE, ids=[repr(s) for s, _ in ID_TABLE])
def test_id_reserialisation(sent: bytes, echoed: bytes) -> None:
    data = b'{"execute":"query-status","id":' + sent + b"}"
    for items in (feed_whole(data), feed_bytewise(data)):
        assert len(items) == 1
        value = items[0]
        assert isinstance(value, dict)
        assert encode(value["id"]) == echoed
        response: JsonValue = {"return": {}, "id": value["id"]}
        assert encode(response) == b'{"return": {}, "id": ' + echoed + b"}"


def test_cesu_surrogate_id_is_rejected() -> None:
    check(P + b'"\xed\xa0\x80"}', [pe("invalid UTF-8 sequence in string")])


# --------------------------------------------------------------------------
# docs/protocol.md §2.5: limits (small limits here; same checks as QEMU's)
# --------------------------------------------------------------------------


def test_single_token_size_limit() -> None:
    # the lexer hands on the partial token at limit + 1 bytes; the rest is lexed afresh
    data = b'{"id":"' + b"a" * 29 + b'"}\n'
    check(
        data,
        [SIZE, pe("invalid keyword '" + "a" * 13 + "'"), pe("stray '\"}\n'")],
        max_message_bytes=16,
    )
    # the same with QEMU's numbers, scaled: token of exactly the limit is refused by the streamer
    check(b'"' + b"b" * 14 + b'" ', [SIZE], max_message_bytes=16)
    check(b'"' + b"b" * 13 + b'" ', ["b" * 13], max_message_bytes=16)


def test_message_size_limit() -> None:
    # token sizes 1+3+1+1+1 = 7, then '"b"' makes 7 + 3 + 1 > 10
    check(
        b'{"a":1,"b":2}',
        [SIZE, pe("expecting value"), 2, pe("expecting value")],
        max_message_bytes=10,
    )
    check(b'{"a":1,"b":2}', [{"a": 1, "b": 2}], max_message_bytes=14)
    check(b'{"a":1,"b":2}', [SIZE], max_message_bytes=13)  # the closing brace: 12 + 1 + 1 > 13


def test_token_count_limit() -> None:
    check(b"[1,2,3]", [COUNT, pe("expecting value")], max_tokens=5)
    check(b"[1,2,3]", [[1, 2, 3]], max_tokens=7)
    check(b"[1,2,3]", [COUNT], max_tokens=6)


def test_nesting_limit() -> None:
    check(b"[[[1]]]", [[[[1]]]], max_nesting=3)
    check(b"[[[[1]]]]", [NESTING, 1] + [pe("expecting value")] * 4, max_nesting=3)
    # 1 + 4 + 4 errors and values: with 1025 objects QEMU gave 1029 errors
    check(
        b'{"a":{"a":{"a":{"a":1}}}}',
        [NESTING, "a", pe("expecting value"), 1] + [pe("expecting value")] * 4,
        max_nesting=3,
    )


def depth_of(value: JsonValue) -> int:
    depth = 0
    while isinstance(value, list) and len(value) == 1:
        value = value[0]
        depth += 1
    assert value == 1
    return depth


def test_qemu_nesting_limits() -> None:
    # depth 1024 is accepted, 1025 fails (compared by hand: repr() would recurse too deep)
    data = b"[" * 1024 + b"1" + b"]" * 1024
    for items in (feed_whole(data), feed_bytewise(data)):
        assert len(items) == 1
        assert not isinstance(items[0], ParseError)
        assert depth_of(items[0]) == 1024
    check(b"[" * 1025 + b"]" * 1025, [NESTING] + [pe("expecting value")] * 1025)
    check(b"{}" + b"[" * 1025, [{}, NESTING])


def test_buffered_memory_is_bounded() -> None:
    limit = 1000
    rng = random.Random(7)
    framer = Framer(max_message_bytes=limit)
    inputs = [
        b'"' + b"x" * 100_000,  # one huge token
        b"[" + b"1," * 50_000,  # a huge message of small tokens
        b'{"a":"' + b"y" * 5000,
        bytes(rng.randrange(256) for _ in range(20_000)),
    ]
    for data in inputs:
        for i in range(0, len(data), 777):
            framer.feed(data[i : i + 777])
            assert framer.buffered <= limit + 1
        framer.feed(b"\x04")
        assert framer.buffered == 0


def test_one_byte_feeds_cost_linear_time() -> None:
    data = b'{"execute":"guest-file-write","id":"' + b"z" * 200_000 + b'"}'
    framer = Framer()
    start = time.perf_counter()
    out: list[Item] = []
    for i in range(len(data)):
        out += framer.feed(data[i : i + 1])
    assert time.perf_counter() - start < 5  # quadratic rescans would take minutes
    assert out == [{"execute": "guest-file-write", "id": "z" * 200_000}]
    garbage = b"\x04" * 100_000
    start = time.perf_counter()
    assert len(Framer().feed(garbage)) == 100_000
    assert time.perf_counter() - start < 5


# --------------------------------------------------------------------------
# Split invariance: whole input, one byte at a time, random splits
# --------------------------------------------------------------------------

FRAGMENTS = [
    b"{",
    b"}",
    b"[",
    b"]",
    b":",
    b",",
    b'"',
    b"'",
    b"\\",
    b" ",
    b"\n",
    b"\t",
    b"\r",
    b'"execute"',
    b'"id"',
    b'"nope-x"',
    b"'sq'",
    b'"\\u00e9"',
    b'"\\ud83d\\ude00"',
    b"\\u",
    b"\\ud800",
    b'"\\""',
    b"1",
    b"0",
    b"-",
    b"12345678901234567890",
    b"1.5",
    b"e",
    b"E+3",
    b".",
    b"true",
    b"nul",
    b"null",
    b"x",
    b"%d",
    b"\x00",
    b"\x04",
    b"\x0c",
    b"\x7f",
    b"\xff",
    b"\xfe",
    b"\xc3\xa9",
    b"\xc0\x80",
    b"\xed\xa0\x80",
    b"\xf0\x9f\x98\x80",
    b'{"execute":"nope-a","id":1}',
    b'{"execute":"nope-b","id":[1,{"k":"v"}],"arguments":{}}',
    b"{'execute':'nope-c','id':-0.0}",
    b'{"a":1,"a":2}',
]

garbage = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=3)), max_size=30).map(
    b"".join
)


@settings(max_examples=300, deadline=None)
@given(data=garbage, cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=8))
def test_split_invariance(data: bytes, cuts: list[int]) -> None:
    whole = canon(feed_whole(data))
    assert canon(feed_bytewise(data)) == whole
    assert canon(feed_split(data, cuts)) == whole


@settings(max_examples=200, deadline=None)
@given(data=garbage, cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=8))
def test_split_invariance_with_small_limits(data: bytes, cuts: list[int]) -> None:
    limits = {"max_message_bytes": 24, "max_tokens": 9, "max_nesting": 3}
    whole = canon(feed_whole(data, **limits))
    assert canon(feed_bytewise(data, **limits)) == whole
    assert canon(feed_split(data, cuts, **limits)) == whole


# --------------------------------------------------------------------------
# Writer: QDict order and json-writer.c formatting
# --------------------------------------------------------------------------


def test_qdict_order() -> None:
    assert qdict_order(["return", "id"]) == ["return", "id"]
    assert qdict_order(["id", "return"]) == ["return", "id"]
    assert qdict_order(["error", "id"]) == ["id", "error"]
    assert qdict_order(["id", "error"]) == ["id", "error"]
    assert qdict_order(["class", "desc"]) == ["class", "desc"]
    for keys in (
        ["timestamp", "event", "data"],
        ["data", "event", "timestamp"],
        ["event", "data", "timestamp"],
    ):
        assert qdict_order(keys) == ["timestamp", "event", "data"]
    # "status" and "singlestep" share a bucket: the later insertion comes first.
    # QEMU inserts StatusInfo members in schema order (running, singlestep, status).
    assert qdict_order(["running", "singlestep", "status"]) == ["status", "singlestep", "running"]
    assert qdict_order(["status", "singlestep", "running"]) == ["singlestep", "status", "running"]
    assert qdict_order(["qemu", "package"]) == ["qemu", "package"]
    assert qdict_order(["major", "minor", "micro"]) == ["micro", "minor", "major"]
    assert qdict_order(["version", "capabilities"]) == ["version", "capabilities"]
    assert qdict_order(["a", "b", "a"]) == qdict_order(["a", "b"])
    assert qdict_order([]) == []


def test_encode_messages() -> None:
    greeting: JsonValue = {
        "QMP": {
            "version": {
                "qemu": {"major": 7, "minor": 2, "micro": 22},
                "package": "Debian 1:7.2+dfsg-7+deb12u18+b3",
            },
            "capabilities": ["oob"],
        }
    }
    assert encode(greeting) == (
        b'{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7},'
        b' "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}'
    )
    status: JsonValue = {
        "return": {"running": True, "singlestep": False, "status": "running"},
        "id": 1,
    }
    assert encode(status) == (
        b'{"return": {"status": "running", "singlestep": false, "running": true}, "id": 1}'
    )
    event: JsonValue = {
        "event": "STOP",
        "timestamp": {"seconds": 1795572380, "microseconds": 473494},
    }
    assert encode(event) == (
        b'{"timestamp": {"seconds": 1795572380, "microseconds": 473494}, "event": "STOP"}'
    )
    error: JsonValue = {
        "error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}
    }
    assert encode(error) == (
        b'{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}'
    )
    assert encode({"error": {"class": "CommandNotFound", "desc": "x"}, "id": 1}) == (
        b'{"id": 1, "error": {"class": "CommandNotFound", "desc": "x"}}'
    )
    assert encode({}) == b"{}"
    assert encode([]) == b"[]"
    assert encode({"return": {}}) == b'{"return": {}}'


def test_encode_scalars() -> None:
    assert encode(True) == b"true"
    assert encode(False) == b"false"
    assert encode(None) == b"null"
    assert encode(0) == b"0"
    assert encode(-(2**63)) == b"-9223372036854775808"
    assert encode(2**64 - 1) == b"18446744073709551615"
    floats = [
        (1.0, b"1"),
        (0.1, b"0.10000000000000001"),
        (-0.0, b"-0"),
        (0.0, b"0"),
        (1.5, b"1.5"),
        (1e3, b"1000"),
        (1e17, b"1e+17"),
        (1e16, b"10000000000000000"),
        (1.8446744073709552e19, b"1.8446744073709552e+19"),
        (5e-324, b"4.9406564584124654e-324"),
        (1e-5, b"1.0000000000000001e-05"),
        (math.inf, b"inf"),
        (-math.inf, b"-inf"),
        (math.nan, b"nan"),
        (-math.nan, b"-nan"),
    ]
    for value, text in floats:
        assert encode(value) == text, value
    assert encode([True, 1, 1.0]) == b"[true, 1, 1]"


def test_encode_strings() -> None:
    assert encode('"\\/\b\f\n\r\t') == b'"\\"\\\\/\\b\\f\\n\\r\\t"'
    assert encode("\x00\x01\x1f\x7f") == b'"\\u0000\\u0001\\u001F\\u007F"'
    assert (
        encode("\u00e9\u20ac\U0001f600\U0010fffd")
        == b'"\\u00E9\\u20AC\\uD83D\\uDE00\\uDBFF\\uDFFD"'
    )
    assert encode(" ~azAZ09") == b'" ~azAZ09"'
    # escapes are cached per character: U+10000 must not land on U+0000's entry
    assert encode(["\U00010000", "\x00", "\U00010001", "\x01"]) == (
        b'["\\uD800\\uDC00", "\\u0000", "\\uD800\\uDC01", "\\u0001"]'
    )
    # noncharacters and lone surrogates cannot come out of QEMU's decoder: U+FFFD
    assert encode("\ufffe\uffff\ufdd0\U0001ffff\ud800x") == b'"' + b"\\uFFFD" * 5 + b'x"'
    assert encode({"\u00e9\x00": 1}) == b'{"\\u00E9\\u0000": 1}'


def test_encode_desc_of_stray_bytes() -> None:
    (err,) = Framer().feed(b"\xff")
    assert isinstance(err, ParseError) and isinstance(err.desc, str)
    assert encode(err.desc) == b"\"JSON parse error, stray '\\uFFFD'\""
    (err,) = Framer().feed(b"\x04")
    assert isinstance(err, ParseError) and isinstance(err.desc, str)
    assert encode(err.desc) == b"\"JSON parse error, stray '\\u0004'\""
    (err,) = Framer().feed(b'{"id":"\\ud800"}')
    assert isinstance(err, ParseError) and isinstance(err.desc, str)
    assert encode(err.desc) == b'"JSON parse error, \\\\ud800 is not a valid Unicode character"'


def test_encode_rejects_non_json() -> None:
    with pytest.raises(TypeError):
        encode(object())  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# encode_compact: what goes upstream must parse in QEMU to the same value
# --------------------------------------------------------------------------


def reparse(data: bytes) -> JsonValue:
    items = Framer().feed(data + b"\n")
    assert len(items) == 1, items
    assert not isinstance(items[0], ParseError), items
    return items[0]


def test_encode_compact_examples() -> None:
    assert (
        encode_compact({"execute": "query-status", "id": 1}) == b'{"execute":"query-status","id":1}'
    )
    assert encode_compact({"a": [1, True, None, "x"]}) == b'{"a":[1,true,null,"x"]}'
    assert encode_compact("\x00\u00e9\x7f\n") == b'"\xc0\x80\xc3\xa9\x7f\\n"'
    floats = [
        (1.0, b"1e0"),
        (100.0, b"1e2"),
        (1.5e10, b"15e9"),
        (0.001, b"1e-3"),
        (0.1, b"0.1"),
        (123.456, b"123.456"),
        (-2.5, b"-2.5"),
        (0.0, b"0.0"),
        (-0.0, b"-0.0"),
        (math.inf, b"1e999"),
        (-math.inf, b"-1e999"),
        (1.8446744073709552e19, b"18446744073709552e3"),
        (5e-324, b"5e-324"),
        (1.2345678901234567e-100, b"1.2345678901234567e-100"),
    ]
    for value, text in floats:
        got = encode_compact(value)
        assert len(got) <= len(text), (value, got)
        assert repr(reparse(got)) == repr(value)
    assert encode_compact(2**64 - 1) == b"18446744073709551615"
    assert encode_compact(-(2**63)) == b"-9223372036854775808"
    with pytest.raises(ValueError):
        encode_compact(math.nan)


def texts(max_size: int) -> st.SearchStrategy[str]:
    """Strings of any characters QEMU's decoder can produce (no noncharacters)."""
    return st.text(
        alphabet=st.characters(codec="utf-8").filter(
            lambda c: not (0xFDD0 <= ord(c) <= 0xFDEF or (ord(c) & 0xFFFE) == 0xFFFE)
        ),
        max_size=max_size,
    )


def json_values(
    text: st.SearchStrategy[str], numbers: st.SearchStrategy[JsonValue], width: int, leaves: int
) -> st.SearchStrategy[JsonValue]:
    return st.recursive(
        st.none() | st.booleans() | numbers | text,
        lambda children: (
            st.lists(children, max_size=width) | st.dictionaries(text, children, max_size=width)
        ),
        max_leaves=leaves,
    )


ALL_TEXT = texts(8)
INTEGERS = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # larger ones are doubles
JSON_VALUES = json_values(ALL_TEXT, INTEGERS | st.floats(allow_nan=False), width=4, leaves=12)


@settings(max_examples=300, deadline=None)
@given(value=JSON_VALUES)
def test_encode_compact_round_trips(value: JsonValue) -> None:
    data = encode_compact(value)
    assert not set(data) & set(b" \t\r\n") or b'"' in data
    assert repr(reparse(data)) == repr(value)


def numbers_as_floats(value: JsonValue) -> object:
    """Order-free comparable form; QEMU prints integral doubles without '.' or 'e'
    (so -0.0 is written `-0`, which reads back as the integer 0: signed zero is lost,
    in QEMU as here)."""
    if isinstance(value, dict):
        return sorted((k, repr(numbers_as_floats(v))) for k, v in value.items())
    if isinstance(value, list):
        return [numbers_as_floats(v) for v in value]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value) + 0.0  # -0.0 + 0.0 == 0.0
    return value


def has_inf(value: JsonValue) -> bool:
    if isinstance(value, dict):
        return any(has_inf(v) for v in value.values())
    if isinstance(value, list):
        return any(has_inf(v) for v in value)
    return isinstance(value, float) and math.isinf(value)


@settings(max_examples=300, deadline=None)
@given(value=JSON_VALUES)
def test_encode_reads_back(value: JsonValue) -> None:
    text = encode(value)
    assert text.isascii()
    if has_inf(value):
        assert b"inf" in text
        return  # QEMU prints inf, which no JSON reader takes back
    assert numbers_as_floats(reparse(text)) == numbers_as_floats(value)


# --------------------------------------------------------------------------
# String decoding at C speed agrees with the byte-at-a-time reference
# --------------------------------------------------------------------------

STRING_PIECES = [
    b"a",
    b"\\\\",
    b'\\"',
    b"\\'",
    b"'",
    b'"',
    b"\\/",
    b"\\n",
    b"\\q",
    b"\\\xc3\xa9",
    b"\\u0000",
    b"\\u00e9",
    b"\\ud83d",
    b"\\ude00",
    b"\\uD83F",
    b"\\uDFFE",
    b"\\ufdd0",
    b"\\uFFFF",
    b"\\u12",
    b"\\u",
    b"\xc0\x80",
    b"\xc0",
    b"\xc3\xa9",
    b"\xc3",
    b"\x80",
    b"\xed\xa0\x80",
    b"\xef\xbf\xbe",
    b"\xef\xb7\x90",
    b"\xf0\x9f\x98\x80",
    b"\xf0\x9f\xbf\xbf",
    b"\xf4\x90\x80\x80",
    b"\xf8\x88\x80\x80\x80",
    b"\xfc\x84\x80\x80\x80\x80",
    b"\xe0\x80\xaf",
    b"\x7f",
    b"\xfe",
    b"\x00",
]
_STRING_TOKEN = re.compile(rb'"(?:[\x20\x21\x23-\x5b\x5d-\xfd]|\\[\x20-\xfd])*"\Z')
_SQ_STRING_TOKEN = re.compile(rb"'(?:[\x20-\x26\x28-\x5b\x5d-\xfd]|\\[\x20-\xfd])*'\Z")
string_bodies = st.lists(
    st.one_of(st.sampled_from(STRING_PIECES), st.binary(max_size=3)), max_size=12
).map(b"".join)


def decoded(decode: Callable[[bytes], str], tok: bytes) -> str | bytes:
    try:
        return decode(tok)
    except qjson._Error as e:
        return bytes(e.args[0])


@settings(max_examples=1500, deadline=None)
@given(body=string_bodies, quote=st.sampled_from([b'"', b"'"]))
def test_string_tokens_decode_as_the_reference_does(body: bytes, quote: bytes) -> None:
    tok = quote + body + quote
    token = _STRING_TOKEN if quote == b'"' else _SQ_STRING_TOKEN
    assume(token.match(tok) is not None)  # what the lexer hands on as one string token
    assert decoded(qjson._parse_string, tok) == decoded(reference.parse_string, tok)


@settings(max_examples=1500, deadline=None)
@given(
    body=st.lists(
        st.one_of(
            st.sampled_from(STRING_PIECES),
            st.binary(max_size=3),
            # valid text often, so that an error in a part made alone would show
            st.sampled_from(
                [b"\\ud83d\\ude00", b"\\uDBFF\\uDFFE", b"\\u00e9", b"abcdef", b"\xc3\xa9"]
            ),
        ),
        max_size=40,
    ).map(b"".join),
    quote=st.sampled_from([b'"', b"'"]),
    key=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6),
)
def test_a_string_decoded_in_parts_is_the_string_decoded_whole(
    body: bytes, quote: bytes, key: bool, cuts: list[int]
) -> None:
    # A long string is decoded as it arrives, cut where parse_string() can start afresh
    # (Framer._string_step): made to step at every feed here, whatever the cut, the
    # values and the errors are those of the whole token, also with bytes that end it.
    tok = quote + body + quote
    data = b"{" + tok + b":1}" if key else b'{"a":' + tok + b"}"
    whole = canon(feed_whole(data))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(qjson, "_STR_STEP", 0)
        assert canon(feed_bytewise(data)) == whole
        assert canon(feed_split(data, cuts)) == whole


@settings(max_examples=1500, deadline=None)
@given(
    text=st.lists(st.one_of(st.sampled_from(STRING_PIECES), st.binary(max_size=6))).map(b"".join)
)
def test_a_stray_text_in_pieces_is_the_text_qemu_prints(text: bytes) -> None:
    # Cut every few bytes, so that cuts fall inside every kind of unit: the pieces must
    # still join to what json-writer.c prints for the whole C string.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(qjson, "_SLICE", 5)
        pieces = list(qjson.c_text_pieces(qjson.CText(text, b"stray '", b"'")))
    # printf("stray '%s'"): the text ends at its first NUL, the quote after it does not
    c_string = b"stray '" + text.split(b"\0", 1)[0] + b"'"
    assert b"".join(pieces) == encode(qjson._writer_text(c_string))
    assert len(pieces) >= len(text.split(b"\0", 1)[0]) // 5 // 8


BIG_VALUES = json_values(texts(40), INTEGERS | st.floats(), width=6, leaves=40)


@settings(max_examples=600, deadline=None)
@given(value=BIG_VALUES)
def test_a_value_in_pieces_is_what_encode_writes(value: JsonValue) -> None:
    # Small slices and pieces: long strings, long keys and big dicts take the paths a
    # megabyte-long id takes (hashes a stretch at a time, keys written in parts).
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(qjson, "_SLICE", 3)
        patch.setattr(qjson, "_FRAGMENTS", 2)
        pieces = list(qjson.packed_pieces(qjson.pack(value)))
        if isinstance(value, str):
            assert b"".join(qjson.text_pieces(value)) == encode(value)
    assert b"".join(pieces) == encode(value)


def test_every_packed_scalar_is_written_as_encode_writes_it() -> None:
    scalars: list[JsonValue] = [None, True, False, 0, 127, 128, -1, -32, -33, 255, 256]
    scalars += [2**16, 2**32, 2**63 - 1, 2**64 - 1, -(2**7), -(2**15), -(2**31), -(2**63)]
    scalars += [0.5, -0.0, 1e300, float("inf"), float("-inf"), float("nan"), "", "x" * 40]
    scalars += ["\u00e9" * 70_000, "\x00\x7f\ufdd0"]
    for value in scalars:
        assert b"".join(qjson.packed_pieces(qjson.pack([value, {"k": value}]))) == encode(
            [value, {"k": value}]
        ), value


def test_long_keys_hash_in_stretches_to_the_same_bucket() -> None:
    for key in ["a" * 10000, "\u00e9" * 7777, "\x00" * 5000 + "x", "\U0001f600" * 3001]:
        raw = key.encode().replace(b"\0", b"\xc0\x80")
        steps = qjson._bucket_steps(raw[at : at + 999] for at in range(0, len(raw), 999))
        with pytest.raises(StopIteration) as done:
            while True:
                next(steps)
        assert done.value.value == qjson._bucket(key)


@pytest.mark.parametrize(
    "value",
    [
        [0] * 200_000,
        [""] * 100_000,
        [{}] * 100_000,
        [[0.5]] * 50_000,
        {f"k{n}": n for n in range(50_000)},
        {"\u00e9" * 300_000: 0},
        "\U0001f600" * 200_000,
    ],
    ids=["ints", "strings", "objects", "nested", "wide-object", "long-key", "long-string"],
)
def test_pieces_are_bounded_work(value: JsonValue) -> None:
    """Each piece writes at most _FRAGMENTS values, about 8 slices of text, or one stretch
    of a long key's hash: the work one loop turn does for such an echo."""
    pieces = list(qjson.packed_pieces(qjson.pack(value)))
    assert b"".join(pieces) == encode(value)
    assert max(map(len, pieces)) <= 8 * 12 * qjson._SLICE + 12 * qjson._SLICE
    values = len(value) if isinstance(value, list | dict) else 1
    assert len(pieces) >= values // qjson._FRAGMENTS
    assert not qjson.heavy(list(range(100))) and qjson.heavy(value)


@settings(max_examples=300, deadline=None)
@given(
    runs=st.lists(
        st.tuples(
            st.sampled_from(
                [
                    "a",
                    '"',
                    "\\",
                    "\n",
                    "\x00",
                    "\x7f",
                    "\u00e9",
                    "\ufffd",
                    "\ud800",
                    "\ufdd0",
                    "\uffff",
                    "\U0001f600",
                    "\ufdef",
                    "\ue000",
                ]
            ),
            st.integers(min_value=1, max_value=300),
        ),
        max_size=40,
    )
)
def test_long_strings_are_quoted_as_character_by_character(runs: list[tuple[str, int]]) -> None:
    # Long runs of characters printed as \uXXXX are escaped in bulk (_quote): the same
    # text as the one-character-at-a-time table gives.
    s = "".join(c * n for c, n in runs) * 8
    assert qjson._quote(s) == '"' + s.translate(qjson._ESCAPES) + '"'


@settings(max_examples=1500, deadline=None)
@given(text=string_bodies)
def test_stray_text_prints_as_the_reference_does(text: bytes) -> None:
    assert qjson._writer_text(text) == reference.writer_text(text)


# --------------------------------------------------------------------------
# Memory: a partial message costs about its own size (packing)
# --------------------------------------------------------------------------


@pytest.fixture
def pack_often(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pack after every value, and merge key-hash runs of at most 4: every path taken."""
    monkeypatch.setattr(qjson, "_PACK_EVERY", 1)
    monkeypatch.setattr(qjson, "_RUN_MAX", 4)


json_texts = st.recursive(
    st.sampled_from([b"1", b"-0.0", b"1e400", b'"a"', b"'\\u0000'", b"true", b"null", b"{}"]),
    lambda children: (
        st.lists(children, max_size=5).map(lambda xs: b"[" + b",".join(xs) + b"]")
        | st.lists(
            st.tuples(st.sampled_from([b'"a"', b'"b"', b"'c'", b'""', b'"\\u0000"']), children),
            max_size=5,
        ).map(lambda kvs: b"{" + b",".join(k + b":" + v for k, v in kvs) + b"}")
    ),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(data=st.lists(st.one_of(json_texts, st.sampled_from(FRAGMENTS)), max_size=6).map(b" ".join))
def test_packing_changes_no_result(data: bytes) -> None:
    unpacked = canon(feed_whole(data))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(qjson, "_PACK_EVERY", 1)
        patch.setattr(qjson, "_RUN_MAX", 4)
        assert canon(feed_whole(data)) == unpacked
        assert canon(feed_bytewise(data)) == unpacked
        patch.setattr(qjson, "_APART_FROM", 1)  # every packed child kept apart (_Unjoined)
        assert canon(feed_bytewise(data)) == unpacked


@pytest.mark.usefixtures("pack_often")
def test_duplicate_keys_are_found_in_packed_members() -> None:
    members = b",".join(b'"k%d":[%d]' % (i, i) for i in range(40))
    check(b"{" + members + b',"k7":1}', [pe("duplicate key")])
    check(b"{" + members + b',"k7":[}]}', [pe("expecting value")] * 2)
    check(b"{" + members + b',"k40":1}', [{**{f"k{i}": [i] for i in range(40)}, "k40": 1}])
    (message,) = Framer().feed(b"{'execute':'x','arguments':{" + members + b"},'id':1}")
    assert isinstance(message, qjson.Message)
    assert message.member_text("arguments") == b"{" + members + b"}"


PARTIAL = 1 << 18  # small: tracemalloc slows parsing down
PARTIAL_SHAPES = {  # about PARTIAL bytes each
    "empty objects": b"[" + b"{}," * (PARTIAL // 6),
    "empty arrays in an argument": b'{"execute":"x","arguments":{"a":[' + b"[]," * (PARTIAL // 6),
    "many keys": b"{" + b",".join(b'"k%d":1' % i for i in range(PARTIAL // 20)),
    "many keys in an argument": b'{"arguments":{'
    + b",".join(b"'%x':0" % i for i in range(PARTIAL // 16)),
    "short strings": b'["' + b'ab","' * (PARTIAL // 10),
    "floats": b"[" + b"0.5," * (PARTIAL // 8),
    "deep, then wide": b"[" * 1000 + b"{}," * (PARTIAL // 6),
    "nested small arrays": b"[" + b"[[1,2],[3]]," * (PARTIAL // 24),
}


@pytest.mark.parametrize("data", PARTIAL_SHAPES.values(), ids=PARTIAL_SHAPES.keys())
def test_a_partial_message_costs_about_its_own_size(data: bytes) -> None:
    gc.collect()
    tracemalloc.start()
    try:
        framer = Framer()
        for i in range(0, len(data), 16384):
            framer.feed(data[i : i + 16384])
        held, _ = tracemalloc.get_traced_memory()
        del framer
        gc.collect()
        left, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The text (a top-level object keeps its tokens, see Message), packed values, key
    # hashes and member spans; plus the loose values between packings, a constant.
    assert held <= 3 * len(data) + 512 * 1024, held / len(data)
    assert left <= 64 * 1024


# --------------------------------------------------------------------------
# Work per feed() does not grow with the message (counted, not timed)
# --------------------------------------------------------------------------

READ_SIZE = 16384  # what the shell reads from a client per event-loop turn


def hostile(shape: str, size: int) -> bytes:
    head = b'{"execute":"query-status","id":"'
    shapes = {
        "C0 80 string": head + b"\xc0\x80" * (size // 2) + b'"}',
        "escaped U+0000": head + b"\\u0000" * (size // 6) + b'"}',
        "non-ASCII string": head + "\u00e9".encode() * (size // 2) + b'"}',
        "single-quoted": b"{'id':'" + b"\"\\'" * (size // 3) + b"'}",
        "0x80 then a stray": b'"' + b"\x80" * size + b"\x01",
        "overlong then a stray": b'"' + b"\xc1\x80" * (size // 2) + b"\x01",
        "empty objects": b"[" + b"{}," * (size // 3) + b"{}]",
        "many keys": b"{" + b",".join(b"'%x':0" % i for i in range(size // 9)) + b"}",
        "deep nesting": b"[" * size,
        "tiny messages": b"{}" * (size // 2),
        "long number": b"[" + b"1" * size + b"]",
        "long float": b"[1." + b"5" * size + b"]",
        "long keyword": b"[" + b"a" * size + b"]",
        "lone surrogates": head + b"\\ud800" * (size // 6) + b'"}',
    }
    return shapes[shape]


def most_calls_in_one_feed(data: bytes) -> int:
    """The most function calls (Python and C) that code of qjson makes in one feed() of
    READ_SIZE bytes (not counting others', e.g. garbage-collector callbacks)."""
    framer = Framer(max_message_bytes=4 * len(data))
    worst = 0
    count = 0
    ours = qjson.__file__

    def profile(frame: FrameType, event: str, arg: object) -> None:
        nonlocal count
        if event in ("call", "c_call") and frame.f_code.co_filename == ours:
            count += 1

    for i in range(0, len(data), READ_SIZE):
        count = 0
        sys.setprofile(profile)
        try:
            framer.feed(data[i : i + READ_SIZE])
        finally:
            sys.setprofile(None)
        worst = max(worst, count)
    return worst


SHAPES = [
    "C0 80 string",
    "escaped U+0000",
    "non-ASCII string",
    "single-quoted",
    "0x80 then a stray",
    "overlong then a stray",
    "empty objects",
    "many keys",
    "deep nesting",
    "tiny messages",
    "long number",
    "long float",
    "long keyword",
    "lone surrogates",
]


@pytest.mark.parametrize("shape", SHAPES)
def test_work_per_feed_does_not_grow_with_the_message(shape: str) -> None:
    # A message four times longer may cost four times as many feeds, never more per feed:
    # completing it (decoding a long string, printing a stray error's text, unpacking)
    # is done in C, not in a Python loop over its bytes.
    small = most_calls_in_one_feed(hostile(shape, 1 << 16))
    large = most_calls_in_one_feed(hostile(shape, 1 << 18))
    assert large <= small * 1.1 + 50, (small, large)


@settings(max_examples=300, deadline=None)
@given(
    data=st.lists(json_texts, max_size=4).map(b" ".join),
    limits=st.sampled_from(
        [
            {"max_message_bytes": 40, "max_tokens": 12, "max_nesting": 10},
            {"max_message_bytes": 90, "max_tokens": 30, "max_nesting": 12},
            {"max_nesting": 9},
        ]
    ),
)
def test_element_runs_meet_the_limits_where_qemu_does(data: bytes, limits: Limits) -> None:
    # Whole input takes runs of array elements at once; one byte at a time never does.
    assert canon(feed_whole(data, **limits)) == canon(feed_bytewise(data, **limits))


RUNS = [
    b'[0,[1],{"a":2},"b",' + b"3," * 5 + b"4] [[[5,6],7,8],9]",
    b'{"x":{"a":1,"b":[2],"c":{"d":3},"e":4,"f":5}}',
    b'{"x":{"a":1,"b":[2],"c":{"d":3},"e":4,"a":5}}',  # a duplicate within a run
    b'{"x":{"a":1,"b":[2],"c":{"d":3}, "a":4,"e":5}}',  # one the object had before it
    b'{"x":{"a":1, "b":2,"c":{"d":3,"d":4},"e":5}}',  # one in a nested object
]


@pytest.mark.parametrize("data", RUNS)
def test_element_runs_stop_at_each_limit_exactly(data: bytes) -> None:
    for limit in range(4, len(data) + 2):
        for limits in ({"max_message_bytes": limit}, {"max_tokens": limit}):
            assert canon(feed_whole(data, **limits)) == canon(feed_bytewise(data, **limits))
    for depth in range(1, 12):
        limits = {"max_nesting": depth}
        assert canon(feed_whole(data, **limits)) == canon(feed_bytewise(data, **limits))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(qjson, "_PACK_EVERY", 1)
        assert canon(feed_whole(data)) == canon(feed_bytewise(data))


def test_nested_maps_are_walked_once() -> None:
    """A map's keys are ordered before its values are written, which needs where each
    value ends: that walk is done once for the outermost map and remembered for the
    maps inside, never again per level (300 levels over 1000 values: 300x the work)."""
    value: JsonValue = [0] * 1000
    for _ in range(300):
        value = {"a": value, "b": 1}
    readers: list[qjson._Reader] = []

    class Counting(qjson._Reader):
        def __init__(self, raw: bytes) -> None:
            super().__init__(raw)
            readers.append(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(qjson, "_Reader", Counting)
        out = b"".join(qjson.packed_pieces(qjson.pack(value)))
    assert out == encode(value)
    (reader,) = readers
    assert reader.work <= 1 + 1000 + 4 * 300 and not reader.layouts  # each item once


def test_packed_keys_stay_in_few_runs_whatever_the_pack_sizes() -> None:
    """Every pack of an object's keys is a sorted run that new keys are looked up in:
    runs merge a pack at a time even when packs shrink, so lookups stay cheap, and every
    key is still found."""
    frame = qjson._Object({})
    keys = []
    for i, n in enumerate(range(600, 0, -1)):  # packs of 600, 599, ... 1 keys
        batch = [f"k{i}.{j}" for j in range(n)]
        frame.value.update(dict.fromkeys(batch, 0))
        frame.pack()
        keys += batch[:1]
    assert len(frame.runs) <= qjson._RUNS_CROWDED + 1, len(frame.runs)
    assert all(frame.has(key) for key in keys[::150])  # a found key unpacks them all
    assert not frame.has("k-none")
