"""Differential test of qmpmux.qjson against a real QEMU monitor.

Each probe is a byte string sent to a negotiated QMP monitor. Framer + encode
predict QEMU's exact output for it: every complete value the Framer returns is
answered by QEMU's dispatcher (probes only name commands "nope-*", which do not
exist, so an object gets CommandNotFound or one of the checks QEMU makes before
the lookup), every ParseError becomes a GenericError without id. Each probe is
followed by ``\\x04`` (a lexical error in every lexer state, which empties the
streamer, so an unclosed probe cannot swallow what follows) and a unique sync
command; the errors those produce are predicted by feeding the same bytes to
the Framer. The whole corpus is sent in one stream, and QEMU's output is split
at the sync answers and compared probe by probe.
"""

from __future__ import annotations

import asyncio
import difflib
import math
import random
import re
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmpmux import qjson
from qmpmux.qjson import Framer, JsonValue, ParseError, encode, encode_compact, qdict_order
from qmpmux.session import Command
from tests.realqemu import Qemu, RawClient
from tests.spellings import commands
from tests.test_qjson import FRAGMENTS, ID_TABLE, MALFORMED
from tests.test_upstream_size import command_mode_session

SYNC = b'{"execute":"nope-sync-%d"}'
SYNC_ANSWER = re.compile(rb'"The command nope-sync-(\d+) has not been found"')
ID_PREFIX = b'{"execute":"nope-id","id":'


def error(cls: str, desc: str, request: dict[str, JsonValue] | None = None) -> bytes:
    response: dict[str, JsonValue] = {"error": {"class": cls, "desc": desc}}
    if request is not None and "id" in request:
        response["id"] = request["id"]
    return encode(response) + b"\r\n"


def answer(item: JsonValue | ParseError) -> bytes:
    """QEMU's answer on a negotiated monitor without OOB (monitor/qmp.c, qapi/qmp-dispatch.c)."""
    if isinstance(item, ParseError):
        desc = item.desc
        text = desc if isinstance(desc, str) else qjson._writer_text(desc.text)
        return error("GenericError", text)
    if not isinstance(item, dict):
        return error("GenericError", "QMP input must be a JSON object")
    # qmp_dispatch_check_obj() walks the members in QDict order
    has_execute = False
    for key in qdict_order(item):
        value = item[key]
        if key == "execute":
            if not isinstance(value, str):
                return error("GenericError", "QMP input member 'execute' must be a string", item)
            has_execute = True
        elif key == "arguments":
            if not isinstance(value, dict):
                return error("GenericError", "QMP input member 'arguments' must be an object", item)
        elif key != "id":
            return error("GenericError", f"QMP input member '{key}' is unexpected", item)
    if not has_execute:
        return error("GenericError", "QMP input lacks member 'execute'", item)
    name = item["execute"]
    assert isinstance(name, str) and (name == "" or name.startswith("nope")), name
    return error("CommandNotFound", f"The command {name} has not been found", item)


def safe(probe: bytes) -> bool:
    """No object in the probe runs a real command."""
    for item in Framer().feed(probe + b"\x04"):
        if isinstance(item, dict):
            name = item.get("execute")
            if isinstance(name, str) and name and not name.startswith("nope"):
                return False
    return True


# --------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------


def table_probes() -> list[bytes]:
    """The tricky rows of docs/protocol.md §2 and §6.4, as tabled in tests/test_qjson.py."""
    probes = [data.replace(b"query-status", b"nope-status!") for data, _ in MALFORMED]
    probes += [ID_PREFIX + sent + b"}" for sent, _ in ID_TABLE]
    probes += [
        # framing and extensions
        b'{"execute":"nope-a"}{"execute":"nope-b","id":2}',
        b"{'execute':'nope-sq','id':'it\\'s'}",
        b'{"execute":"nope-x","id":["a\xc0\x80b","\\u0000","\'","\\"\\\\\\/\\b\\f\\n\\r\\t"]}',
        b'{"execute":"nope-\xc3\xa9\\u0000x","id":1}',
        b'{"execute":"",\t"id" : \r\n 1 }',
        b'{"execute":"nope-n","id":[0,-0,-1,9223372036854775807,-9223372036854775808,'
        b"9223372036854775808,18446744073709551615,18446744073709551616,"
        b"-9223372036854775809,1.0,-0.0,0.1,1e3,1E400,-1e400,1e-400,2.5e-3,1E+2,0.5,"
        b"4.9406564584124654e-324,2.2250738585072014e-308,1.7976931348623157e308]}",
        ID_PREFIX + b"1" * 400 + b"}",
        b"[0e5]",
        b"[1.]",
        b"[1e+]",
        b"[-a]",
        b"%d %p",
        # dispatcher checks, in QDict order
        b'{"id":"noexec"}',
        b"{}",
        b'{"execute":5,"id":1}',
        b'{"execute":"nope","arguments":[1],"id":1}',
        b'{"execute":"nope","arguments":null}',
        b'{"execute":"nope","extra":1,"id":1}',
        b'{"extra":1,"execute":5,"arguments":2,"id":1}',
        b'{"exec-oob":"nope","id":1}',
        b'{"\\u0000":1,"execute":"nope"}',
        # QDict order of echoed ids, keys colliding in a bucket in both orders
        ID_PREFIX + b'{"running":1,"singlestep":2,"status":3}}',
        ID_PREFIX + b'{"status":1,"singlestep":2,"running":3}}',
        ID_PREFIX + b'{"major":7,"minor":2,"micro":22}}',
        ID_PREFIX + b'{"micro":22,"minor":2,"major":7}}',
        ID_PREFIX + b'{"timestamp":1,"event":2,"data":3,"return":4,"id":5,"error":6,"":7}}',
        # parser messages
        b"{1:2}",
        b'{[1]:2}{"a":[}]}',
        b'{"a":1,"a":[}]',
        b"x" * 1005 + b" " + b"x" * 1006 + b" " + b"a" * 1100 + b"\n",
        b'"' + b"y" * 2000 + b"\n",
        b'"ab\x00',
        # the streamer's unchecked negative brace count
        b"[}]",
        b"[}}}]",
        b"{]",
        b"{]]",
        b"[}" + b"[" * 1024 + b"]" * 1025,
        b"[}" + b"[" * 1025 + b"]" * 1026,
        # nesting limit
        b"[" * 1024 + b"1" + b"]" * 1024,
        b"[" * 1025 + b"]" * 1025,
        b'{"a":' * 1025 + b"1" + b"}" * 1025,
        b"{}" + b"[" * 1025,
        # stray text as the writer prints it
        b"\xc3\xa9 \xe2\x82\xac ",
        b'"\xe2\x82\xac\x01',
        b'"\xc0\x80\x01',
        b'"\xef\xbf\xbe\x01',
        b'"\xe2\x82\x01',
        b'"a\xfeb"',
        b"\x0b{}\x0c",
    ]
    for escape in (
        b"\\ud800\\u0041",
        b"\\udc00",
        b"\\uD83F\\uDFFE",
        b"\\uFFFF",
        b"\\ufdd0",
        b"\\u12x4",
        b"\\u1",
        b"\\u",
        b"\\ud800\\u12",
    ):
        probes.append(ID_PREFIX + b'"' + escape + b'"}')
    probes.append(ID_PREFIX + b"'\\u12'}")
    for raw in (
        b"\xc3",
        b"\xe2\x82",
        b"\x80",
        b"\xc0\xaf",
        b"\xe0\x80\xaf",
        b"\xed\xa0\x80",
        b"\xf4\x90\x80\x80",
        b"\xf8\x88\x80\x80\x80",
        b"\xef\xbf\xbe",
        b"\xef\xb7\x90",
        b"\xf0\x9f\xbf\xbf",
    ):
        probes.append(ID_PREFIX + b'"' + raw + b'"}')
        probes.append(ID_PREFIX + b"'a\\n" + raw + b"'}")
    return probes


INTERESTING_CHARS = [
    "a",
    "Z",
    " ",
    '"',
    "'",
    "\\",
    "/",
    "\x00",
    "\x01",
    "\b",
    "\t",
    "\n",
    "\x1f",
    "\x7f",
    "\x80",
    "\u00e9",
    "\u07ff",
    "\u0800",
    "\u2028",
    "\ufffd",
    "\ufeff",
    "\U0001f600",
    "\U00010000",
    "\U0010fffd",
]
KEYS = [
    "id",
    "status",
    "singlestep",
    "running",
    "minor",
    "micro",
    "major",
    "",
    "\x00",
    "k",
    "\u00e9",
]


def random_float(rng: random.Random) -> float:
    choice = rng.randrange(4)
    if choice == 0:
        return rng.choice(
            [0.0, -0.0, 1.0, 0.1, -2.5, 1e300, 5e-324, math.inf, -math.inf, 1e16, 1e17]
        )
    if choice == 1:
        return rng.uniform(-1e6, 1e6)
    while True:
        (value,) = struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))
        if not math.isnan(value):
            return float(value)


def random_value(rng: random.Random, depth: int = 0) -> JsonValue:
    choice = rng.randrange(9 if depth < 3 else 7)
    if choice == 0:
        return rng.choice([None, True, False])
    if choice == 1:
        return rng.choice(
            [0, -1, 2**63 - 1, -(2**63), 2**63, 2**64 - 1, rng.randrange(-1000, 1000)]
        )
    if choice == 2:
        return rng.randrange(-(2**63), 2**64)
    if choice in (3, 4):
        return random_float(rng)
    if choice in (5, 6):
        return "".join(rng.choice(INTERESTING_CHARS) for _ in range(rng.randrange(6)))
    if choice == 7:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(KEYS): random_value(rng, depth + 1) for _ in range(rng.randrange(4))}


def random_command(rng: random.Random) -> bytes:
    """A command in one of several spellings (compact, with whitespace, single quotes)."""
    name = rng.choice([b'"nope-r"', b"'nope-q'", b'"nope-\\u00e9"', b'"nope-\xc3\xa9"'])
    value = random_value(rng)
    text = (
        encode(value)
        if rng.random() < 0.5 and b"inf" not in encode(value)
        else encode_compact(value)
    )
    parts = [b'"execute"', b":", name]
    if rng.random() < 0.8:
        parts = [*parts, b",", b"'id'" if rng.random() < 0.2 else b'"id"', b":", text]
    ws = [b"", b"", b" ", b"\n", b"\t", b"\r\n "]
    return b"{" + b"".join(p + rng.choice(ws) for p in parts) + b"}"


def random_garbage(rng: random.Random) -> bytes:
    pieces: list[bytes] = []
    for _ in range(rng.randrange(1, 10)):
        choice = rng.randrange(10)
        if choice < 4:
            pieces.append(rng.choice(FRAGMENTS))
        elif choice < 6:
            pieces.append(random_command(rng))
        elif choice < 8:
            pieces.append(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4))))
        else:
            pieces.append(
                rng.choice([b"\x00", b"\x1b", b"\x80", b"\xc3", b"\xff", b"\x7f", b"{", b"'"])
            )
    return b"".join(pieces)


def generated_probes(count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    probes: list[bytes] = []
    while len(probes) < count:
        probe = random_command(rng) if rng.random() < 0.3 else random_garbage(rng)
        if safe(probe):
            probes.append(probe)
    return probes


# --------------------------------------------------------------------------
# Running a corpus
# --------------------------------------------------------------------------


async def run_corpus(
    client: RawClient, chunks: list[bytes], expected: list[list[bytes]], timeout: float = 10
) -> str:
    """Send all chunks in one stream; return a report of the chunks whose output differs."""
    stream = b"".join(chunks)
    sender = asyncio.create_task(client.send(stream))
    actual: list[list[bytes]] = [[] for _ in chunks]
    current: list[bytes] = []
    last = len(chunks) - 1
    try:
        while True:
            line = await client.read(timeout)
            if not line:
                break
            current.append(line)
            m = SYNC_ANSWER.search(line)
            if m is not None:
                index = int(m.group(1))
                actual[index] = current
                current = []
                if index == last:
                    break
    except TimeoutError:
        pass
    if current:
        actual[last] += current
    await asyncio.wait_for(sender, timeout)

    report: list[str] = []
    for index, (want, got) in enumerate(zip(expected, actual, strict=True)):
        if want != got:
            diff = difflib.unified_diff(
                [w.decode("ascii", "backslashreplace").rstrip("\r\n") for w in want],
                [g.decode("ascii", "backslashreplace").rstrip("\r\n") for g in got],
                "predicted",
                "qemu",
                lineterm="",
                n=1,
            )
            report.append(f"chunk {index}: {chunks[index][:300]!r}\n" + "\n".join(list(diff)[:40]))
    return "\n\n".join(report[:15])


async def negotiated(qemu: Qemu, monitor: int) -> RawClient:
    client = await RawClient.connect(qemu.monitors[monitor])
    await client.negotiate()
    return client


def predict(probes: list[bytes]) -> tuple[list[bytes], list[list[bytes]]]:
    """Each probe with its resync and sync command, and QEMU's predicted output for it."""
    framer = Framer()  # one reader for the whole stream, as QEMU has one per monitor
    chunks: list[bytes] = []
    expected: list[list[bytes]] = []
    for index, probe in enumerate(probes):
        chunk = probe + b"\x04" + SYNC % index
        chunks.append(chunk)
        expected.append([answer(item) for item in framer.feed(chunk)])
        sync = error("CommandNotFound", f"The command nope-sync-{index} has not been found")
        assert expected[-1][-1] == sync
    return chunks, expected


async def test_framer_predicts_qemu(qemu: Qemu) -> None:
    probes = table_probes() + generated_probes(500, seed=20240607)
    chunks, expected = predict(probes)
    client = await negotiated(qemu, 0)
    report = await run_corpus(client, chunks, expected)
    await client.close()
    assert qemu.alive()
    if report:
        pytest.fail("QEMU's output differs from the prediction:\n" + report, pytrace=False)


async def test_encode_compact_round_trips_through_qemu(qemu: Qemu) -> None:
    """Values sent upstream as encode_compact() come back from QEMU as encode() prints them."""
    rng = random.Random(99)
    values: list[JsonValue] = [
        1.0,
        -0.0,
        0.1,
        math.inf,
        -math.inf,
        5e-324,
        1.7976931348623157e308,
        1e16,
        1.5e10,
        2**63,
        2**64 - 1,
        -(2**63),
        "\x00\x7f\u00e9\U0001f600'\"\\/\b\f\n\r\t\x01",
        {"status": 1, "singlestep": 2, "running": 3},
        {"running": [1.0, {"micro": 0.5, "minor": None}], "": {}},
    ]
    values += [random_value(rng) for _ in range(150)]
    chunks: list[bytes] = []
    expected: list[list[bytes]] = []
    for index, value in enumerate(values):
        request: dict[str, JsonValue] = {"execute": "nope-id", "id": value}
        chunks.append(encode_compact(request) + SYNC % index)
        expected.append(
            [
                error("CommandNotFound", "The command nope-id has not been found", request),
                error("CommandNotFound", f"The command nope-sync-{index} has not been found"),
            ]
        )
    client = await negotiated(qemu, 0)
    report = await run_corpus(client, chunks, expected)
    await client.close()
    if report:
        pytest.fail("QEMU's echo differs:\n" + report, pytrace=False)


def sample(strategy: st.SearchStrategy[bytes], count: int) -> list[bytes]:
    """``count`` examples of ``strategy``, the same on every run."""
    found: list[bytes] = []

    @settings(
        max_examples=count,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(example: bytes) -> None:
        found.append(example)

    collect()
    return found


async def test_forwarded_arguments_mean_to_qemu_what_the_client_wrote(qemu: Qemu) -> None:
    """The argument text qmpmux sends upstream (the client's own tokens, or a compact
    re-encoding) is read by QEMU as the value qmpmux's reader made of the client's text:
    QEMU echoes it, as an id, exactly as encode() prints that value."""
    chunks: list[bytes] = []
    expected: list[list[bytes]] = []
    head = b'{"execute":"nope-id","arguments":'
    for data in sample(commands(["nope-id"]), 800):
        (value,) = Framer().feed(data)
        assert isinstance(value, dict)
        verdict = command_mode_session().judge(value)
        assert isinstance(verdict, Command)
        prefix = bytes(verdict.prefix)
        if not prefix.startswith(head):
            continue  # empty arguments are not forwarded
        request: dict[str, JsonValue] = {"execute": "nope-id", "id": value["arguments"]}
        chunks.append(ID_PREFIX + prefix[len(head) :] + b"}" + SYNC % len(chunks))
        expected.append(
            [
                error("CommandNotFound", "The command nope-id has not been found", request),
                error(
                    "CommandNotFound", f"The command nope-sync-{len(chunks) - 1} has not been found"
                ),
            ]
        )
    assert len(chunks) > 100
    client = await negotiated(qemu, 0)
    report = await run_corpus(client, chunks, expected)
    await client.close()
    if report:
        pytest.fail("QEMU reads the forwarded arguments differently:\n" + report, pytrace=False)
