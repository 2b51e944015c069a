"""Each client must see what a direct QEMU monitor shows: compare transcripts byte for byte.

Every case sends the same bytes to qmpmux and to a second, independent monitor of the
same real QEMU, then a sync command, and requires identical output.
"""

from __future__ import annotations

import pytest

from tests.conftest import Mux
from tests.realqemu import RawClient

SYNC = b'{"execute":"query-name","id":"__sync"}'


async def transcript(path: object, chunks: list[bytes], negotiate: str) -> list[bytes]:
    """Greeting, optional negotiation ("", "plain", "oob"), the chunks, then sync."""
    client = await RawClient.connect(path)  # type: ignore[arg-type]
    out = [client.greeting]
    if negotiate:
        await client.negotiate(oob=negotiate == "oob")
    for chunk in chunks:
        await client.send(chunk)
    await client.send(SYNC)
    while True:
        line = await client.read()
        assert line, f"connection closed; got so far {out}"
        out.append(line)
        if b'"__sync"' in line:
            break
    await client.close()
    return out


def streams(lines: list[bytes], oob_ids: tuple[bytes, ...]) -> tuple[list[bytes], list[bytes]]:
    """Split a transcript into the in-band and out-of-band reply streams.

    With `oob` enabled an exec-oob reply may overtake in-band replies (in QEMU as well,
    depending on timing), so only the order within each stream is QEMU's contract.
    """
    oob = [
        ln
        for ln in lines
        if any(b'"id": %s}' % i in ln or b'{"id": %s,' % i in ln for i in oob_ids)
    ]
    return [ln for ln in lines if ln not in oob], oob


async def assert_same(
    mux: Mux, chunks: list[bytes], negotiate: str = "plain", oob_ids: tuple[bytes, ...] = ()
) -> None:
    via_mux = await transcript(mux.path, chunks, negotiate)
    direct = await transcript(mux.direct, chunks, negotiate)
    assert streams(via_mux, oob_ids) == streams(direct, oob_ids), f"input {chunks!r}"


async def test_greeting_is_qemus_own(mux: Mux) -> None:
    a = await RawClient.connect(mux.path)
    b = await RawClient.connect(mux.direct)
    assert a.greeting == b.greeting
    assert b'"capabilities": ["oob"]' in a.greeting


NEGOTIATION_CASES = [
    [b'{"execute":"query-status","id":1}'],
    [b'{"execute":"nope"}'],
    [b"[1]"],
    [b'{"execute":"query-status","foo":1,"id":3}'],
    [b'{"exec-oob":"qmp_capabilities","id":4}'],
    [b'{"exec-oob":"query-yank","id":4}'],
    [b'{"execute":"qmp_capabilities","arguments":{"enable":["foo"]},"id":6}'],
    [b'{"execute":"qmp_capabilities","arguments":{"enable":"oob"},"id":7}'],
    [b'{"execute":"qmp_capabilities","arguments":{"bogus":1},"id":8}'],
    [b'{"execute":"qmp_capabilities","arguments":{"enable":[1]},"id":8}'],
    [b'{"execute":"qmp_capabilities","arguments":{"enable":["oob",null]},"id":8}'],
    [b'{"execute":"qmp_capabilities","arguments":{"enable":null},"id":8}'],
    [b'{"execute":"qmp_capabilities","arguments":null,"id":8}'],
    [
        b'{"execute":"qmp_capabilities","arguments":{"enable":["oob","oob"]},"id":9}',
        b'{"exec-oob":"query-yank","id":"o"}',
    ],
    [
        b'{"execute":"qmp_capabilities","arguments":{"enable":[]},"id":10}',
        b'{"exec-oob":"query-yank","id":"no-oob"}',
        b'{"execute":"qmp_capabilities","id":"again"}',
        b'{"execute":"qmp_capabilities","arguments":{"enable":["x"]},"id":"again2"}',
    ],
    [b'{"execute":"qmp_capabilities","id":null}', b'{"execute":"query-status"}'],
]


@pytest.mark.parametrize("chunks", NEGOTIATION_CASES, ids=range(len(NEGOTIATION_CASES)))
async def test_negotiation_matches_qemu(mux: Mux, chunks: list[bytes]) -> None:
    await assert_same(mux, chunks, negotiate="")


ID_VALUES = [
    b"1",
    b"-5",
    b"1.0",
    b"1e3",
    b"0.1",
    b"1.5",
    b"-0",
    b"-0.0",
    b"9223372036854775808",
    b"18446744073709551616",
    b'[1,"two",3.0]',
    b"'single'",
    b'"a\\/b"',
    b'"\\u00e9\\u20ac"',
    "\u00e9\U0001f600".encode(),
    b'"\x7f"',
    b"null",
    b"true",
    b"false",
    b'""',
    b'{"b":1,"a":[],"id":{}}',
    b'"\\u0000x"',
    b"'it\\'s'",
]


async def test_ids_of_every_json_type_come_back_as_qemu_echoes_them(mux: Mux) -> None:
    chunks = []
    for n, raw in enumerate(ID_VALUES):
        value = b'"' + raw + b'"' if raw.startswith((b"\xc3", b"\xe2")) else raw
        chunks.append(b'{"execute":"query-status","id":' + value + b"}")
        chunks.append(b'{"execute":"nope-%d","id":' % n + value + b"}")
    chunks.append(b'{"execute":"query-status"}')
    await assert_same(mux, chunks)


COMMAND_CASES = [
    b"{}",
    b'{"id":"noexec"}',
    b'{"execute":5,"id":1}',
    b'{"execute":"query-status","arguments":[1],"id":2}',
    b'{"execute":"query-status","arguments":null,"id":3}',
    b'{"execute":"query-status","extra":1,"id":4}',
    b'{"execute":"nope","id":5}',
    b'{"execute":"","id":6}',
    b'{"execute":"Query-Status","id":7}',
    b'{"execute":"query-status","arguments":{"x":1},"id":8}',
    b'{"execute":"qom-list","arguments":{"path":1},"id":9}',
    b'{"execute":"qom-list","id":10}',
    b'{"exec-oob":"query-yank","id":11}',
    b'{"execute":"query-status","exec-oob":"yank","id":12}',
    b'{"extra":1,"execute":5,"arguments":7,"id":13}',
    b'{"execute":"qmp_capabilities","id":14}',
    b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]},"id":15}',
    b'{"execute":"qmp_capabilities","arguments":{"zzz":1},"id":16}',
    b'{"execute":"query-status","id":1,"id":2}',
    b'{"execute":"query-name","arguments":{},"id":17}',
]


@pytest.mark.parametrize("mode", ["plain", "oob"])
async def test_command_checks_match_qemu(mux: Mux, mode: str) -> None:
    await assert_same(mux, COMMAND_CASES, negotiate=mode, oob_ids=(b"11",))


OOB_CASES = [
    b'{"exec-oob":"query-status","id":1}',
    b'{"exec-oob":"yank","arguments":{"instances":[]}}',
    b'{"exec-oob":"nope","id":6}',
    b'{"exec-oob":"qmp_capabilities","id":7}',
    b'{"exec-oob":1,"id":10}',
    b'{"exec-oob":"migrate-pause","id":4}',
    b'{"exec-oob":"query-yank","arguments":{"bogus":1},"id":5}',
]


async def test_exec_oob_errors_match_qemu(mux: Mux) -> None:
    await assert_same(mux, OOB_CASES, negotiate="oob")


FRAMING_CASES = [
    [b'{"execute":"query-status","id":1}{"execute":"query-name","id":2}'],
    [b'{"exe', b'cute":"query', b'-status","i', b'd":3}'],
    [b"{'execute':'query-status','id':'sq'}"],
    [b'{"execute": }\n', b'{"execute":"query-status","id":4}'],
    [b']\n}\n{"execute":"query-status",}\n'],
    [b'{"execute" "query-status"}\n{"execute":"query-status" "id":1}\n[1 2]\n'],
    [b'{"execute":nul}\n', b'{"execute":"query-status","id":True}\n'],
    [b'{"execute":"query-status","id":NaN}\n{"execute":"query-status","id":+1}\n'],
    [b'{"execute":"query-status","id":01}\n{"execute":"query-status","id":-}\n'],
    [b'{"execute":"query-status","id":"\\q"}\n{"execute":"query-status","id":"\\ud800"}\n'],
    [b'{"execute":"query-status","id":"\xc3\x28"}\n{"execute":"query-status","id":"a\tb"}\n'],
    [b'{"execute":"query-status",\x0c"id":1}\n'],
    [b"\xff\n", b"\x00\n", b"\x04\n"],
    [b"hello world\n// comment\n<xml/>\n"],
    [b'"hello"\n42\ntrue\nnull\n[{"execute":"query-status","id":1}]\n'],
    [b"\n\n\n"],
    [b'{"execute":"query-status"\n', b'{"execute":"query-status","id":5}\n', b"}\n"],
    [b'{"execute":"query-status","id":"\xc0\x80"}'],
]


@pytest.mark.parametrize("chunks", FRAMING_CASES, ids=range(len(FRAMING_CASES)))
async def test_input_framing_and_parse_errors_match_qemu(mux: Mux, chunks: list[bytes]) -> None:
    await assert_same(mux, chunks)


async def test_nesting_limit_flood_matches_qemu(mux: Mux) -> None:
    await assert_same(mux, [b"[" * 1025 + b"\n", b"]" * 1025 + b"\n"])


# Arguments in spellings a re-encoding would change: qmpmux forwards the client's own
# tokens, so QEMU reads (and echoes in its errors) exactly what it would read directly.
SPELLING_CASES = [
    b"{'execute':'qom-get','arguments':{'path':'/machine','property':'type'},'id':1}",
    b'{"execute":"qom-get","arguments":{"path":"\\/machine","property":"t\\u0079pe"},"id":2}',
    b'{"execute":"qom-get","arguments":{"path":"/machine","property":"ty\xc0\x80pe"},"id":3}',
    b"{'execute':'qom-get','arguments':{'path':'/machine','property':'\"q\\'\"'},'id':4}",
    b'{"execute":"qom-list","arguments":{"path":"/m\xc3\xa9\\u00e9\xf0\x9f\x98\x80"},"id":5}',
    b'{"execute" : "qom-get" , "arguments" : { "path" : "/machine" , "x" : 1e2 } , "id":6}',
    b'{"execute":"query-status","arguments":{"x":[1E400,-0.0,18446744073709551616]},"id":7}',
    b'{"execute":"qom-list","arguments":{"path":"' + b"\xc0\x80" * 3000 + b'"},"id":8}',
]


async def test_argument_spellings_reach_qemu_as_written(mux: Mux) -> None:
    await assert_same(mux, SPELLING_CASES)


BIG_ID = b"[" + b'"\xc3\xa9",' * 10_000 + b"0.5]"  # 10,001 values to echo
LONG_NAME = "\u00e9".encode() * 20_000  # 40 KB, echoed as 120 KB of \u00E9
# Read in many reads (over 128 KiB), so kept in parts (qjson.LongString): ASCII, Latin-1,
# astral characters, and escapes (QEMU's NUL among them).
LONG_TEXT = (
    b"q" * 60_000 + "\u00e9".encode() * 20_000 + "\U0001f600".encode() * 10_000
    + b"\\u0000\\u00e9\\ud83d\\ude00\\n" * 2_000
)  # fmt: skip


@pytest.mark.parametrize(
    ("negotiate", "chunks"),
    [
        ("plain", [b'"' + b"\x80" * 40_000 + b"\x01"]),  # a 240 KB stray-token error
        ("plain", [b'"' + b"a" * 5_000 + b"\x00"]),  # printed up to the NUL, then '
        ("plain", [b'{"execute":"query-status","id":' + BIG_ID + b"}"]),  # QEMU's reply
        ("", [b'{"execute":"query-status","id":' + BIG_ID + b"}"]),  # qmpmux's own
        ("", [b'{"execute":"qmp_capabilities","arguments":{"' + LONG_NAME + b'":1}}']),
        ("plain", [b'{"execute":"' + LONG_TEXT + b'","id":1}']),  # QEMU's: not found
        ("plain", [b'{"execute":"query-status","id":"' + LONG_TEXT + b'"}']),
        ("plain", [b'{"execute":"query-status","id":[{"%s":"%s","a":1}]}' % ((LONG_TEXT,) * 2)]),
        ("plain", [b'{"execute":"query-status","' + LONG_TEXT + b'":1,"id":1}']),
        ("plain", [b'{"execute":"query-status","arguments":{"' + LONG_TEXT + b'":1},"id":1}']),
        ("plain", [b'{"execute":"stop","arguments":{"%s":1,"%s":2}}' % (LONG_TEXT, LONG_TEXT)]),
    ],
    ids=[
        "stray-token", "stray-nul", "id-on-qemus-reply", "id-on-own-reply", "member-name",
        "long-name", "long-id", "long-in-id", "long-member", "long-parameter", "long-key-twice",
    ],
)  # fmt: skip
async def test_echoes_made_in_pieces_are_qemus_bytes(
    mux: Mux, negotiate: str, chunks: list[bytes]
) -> None:
    """What qmpmux writes a piece at a time (echoes too long to write in one turn of its
    loop: README "Security") is byte for byte what QEMU writes at once."""
    await assert_same(mux, chunks, negotiate=negotiate)
