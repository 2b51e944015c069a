"""A long reply of QEMU's costs qmpmux about its own size, once.

A client can make QEMU echo megabytes: an argument of a megabyte comes back in QEMU's
error about it, a `qom-get` returns whatever was set. Routing such a
reply must not decode, copy or rebuild it: each pass over fresh memory costs ~0.5 ms a
MiB, all in one loop turn, while every other client waits (README "Security")."""

from __future__ import annotations

import re
import tracemalloc
from collections.abc import Callable

import msgspec
import pytest

from qmpmux.hub import Hub, ToClient, ToUpstream
from qmpmux.qjson import JsonValue, encode
from qmpmux.wire import Upstream, decode_upstream, finite, upstream_error_class
from tests.playbook import connect, ready_hub, spelled_out

LONG = 1 << 20
CHUNK = 64 * 1024
TEXT = b'"' + b"b" * LONG + b'"'
ERROR = b'"error": {"class": "GenericError", "desc": "Property \'%s\' not found"}' % TEXT[1:-1]
BIG = b'{"execute":"qom-get","arguments":{"path":"/","property":%s},"id":"c"}' % TEXT

# (what the client sends, QEMU's reply to it given the upstream id, what the client gets)
Shape = tuple[bytes, Callable[[int | None], bytes], bytes]
SHAPES: dict[str, Shape] = {
    # A big command goes upstream with an id; QEMU prints it first before `error`...
    "error with an id": (
        BIG,
        lambda n: b'{"id": %d, %s}\r\n' % (n or 0, ERROR),
        b'{"id": "c", %s}\r\n' % ERROR,
    ),
    # ...and last after `return`.
    "return with an id": (
        BIG,
        lambda n: b'{"return": %s, "id": %d}\r\n' % (TEXT, n or 0),
        b'{"return": %s, "id": "c"}\r\n' % TEXT,
    ),
    # A small command goes without one; QEMU's reply has none (docs/protocol.md §3.4).
    "error without an id": (
        b'{"execute":"qom-get","arguments":{"path":"/","property":"x"},"id":"c"}',
        lambda n: b"{%s}\r\n" % ERROR,
        b'{"id": "c", %s}\r\n' % ERROR,
    ),
    "return without an id": (
        b'{"execute":"qom-get","arguments":{"path":"/","property":"x"},"id":"c"}',
        lambda n: b'{"return": %s}\r\n' % TEXT,
        b'{"return": %s, "id": "c"}\r\n' % TEXT,
    ),
}


def _sent(hub: Hub, cid: int, command: bytes) -> int | None:
    """Send `command`; the id it went upstream with (None: without one)."""
    actions = []
    for at in range(0, len(command), CHUNK):
        actions += hub.client_data(cid, command[at : at + CHUNK])
    (up,) = [a for a in actions if isinstance(a, ToUpstream)]
    m = re.search(rb',"id":([0-9]+)\}\Z', bytes(up.data))
    return int(m.group(1)) if m else None


def _reads(line: bytes) -> list[bytes]:
    return [line[at : at + CHUNK] for at in range(0, len(line), CHUNK)]


def _answered(hub: Hub, reply: bytes) -> list[ToClient]:
    """QEMU's `reply` in reads of CHUNK; the replies the last read gives."""
    *first, last = _reads(reply)
    for data in first:
        assert hub.upstream_data(data) == []
    return [a for a in hub.upstream_data(last) if isinstance(a, ToClient)]


@pytest.mark.parametrize("shape", SHAPES)
def test_a_long_reply_reaches_its_client_exactly(shape: str) -> None:
    command, reply, want = SHAPES[shape]
    hub = ready_hub()
    cid = connect(hub)
    (got,) = _answered(hub, reply(_sent(hub, cid, command)))
    assert got.client == cid
    assert spelled_out(got.data) == want


@pytest.mark.parametrize("shape", ["error with an id", "return without an id"])
def test_a_long_reply_gets_a_long_client_id(shape: str) -> None:
    """An id too long to encode at once is made in pieces around QEMU's reply."""
    long_id: list[JsonValue] = list(range(20_000))
    command, reply, want = SHAPES[shape]
    command = command.replace(b'"id":"c"', b'"id":' + encode(long_id).replace(b" ", b""))
    hub = ready_hub()
    cid = connect(hub)
    (got,) = _answered(hub, reply(_sent(hub, cid, command)))
    assert spelled_out(got.data) == want.replace(b'"id": "c"', b'"id": ' + encode(long_id))


@pytest.mark.parametrize("shape", SHAPES)
def test_routing_a_long_reply_never_copies_it(shape: str) -> None:
    """Python memory allocated while the read that completes the reply is handled: the
    read buffer holding QEMU's line is handed on, so little. Decoding the error's desc,
    a copy out of the buffer or a rebuilt reply would each add a whole reply's size."""
    command, reply, _want = SHAPES[shape]
    hub = ready_hub()
    cid = connect(hub)
    line = reply(_sent(hub, cid, command))
    *first, last = _reads(line)
    for data in first:
        hub.upstream_data(data)
    tracemalloc.start()
    try:
        got = hub.upstream_data(last)
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [type(a) for a in got] == [ToClient]
    assert peak < 0.1 * len(line), (peak, len(line))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("inf", [b"", b', "inf": inf'])
def test_a_long_reply_is_told_by_its_layout_as_decoding_tells_it(shape: str, inf: bytes) -> None:
    """What qmpmux reads of a long reply without decoding it (its id, whether it failed
    and how) is what decoding it says, QEMU's non-finite numbers included."""
    line = SHAPES[shape][1](7).replace(b"}\r\n", inf + b"}\r\n", 1)
    told = decode_upstream(bytearray(line))
    decoded = msgspec.json.decode(finite(line), type=Upstream)
    assert (told.id, told.event) == (decoded.id, decoded.event)
    assert (bool(told.error), bool(told.ret)) == (bool(decoded.error), bool(decoded.ret))
    assert upstream_error_class(told.error) == upstream_error_class(decoded.error)


@pytest.mark.parametrize("layout", [b'{"id": %s, %s}\r\n', b'{"return": %s, "id": %s}\r\n'])
def test_a_long_reply_with_an_id_qmpmux_never_issued_is_dropped(layout: bytes) -> None:
    """An id of thousands of digits is not read as a number (int() refuses past 4300)."""
    hub = ready_hub()
    connect(hub)
    huge = b"9" * 5000
    line = layout % ((huge, ERROR) if layout.startswith(b'{"id"') else (TEXT, huge))
    assert [a for a in hub.upstream_data(line) if isinstance(a, ToClient)] == []
