"""Replies too long to write at once are made a piece at a time, as the socket takes them.

An echo of a client's megabytes (a stray token, an id, a command name) would hold the
loop tens of milliseconds if written at once (README "Security"). The hub hands the shell
a `Spelled` instead, and the client's channel makes its next piece only when the socket
has taken the last: a peer that does not read gets nothing more made for it, and what is
written after the reply still comes after it.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

from qmpmux.channel import Channel
from qmpmux.spelled import PIECE, Spelled, Spliced, joined


class _Quiet:
    def channel_data(self, key: int, data: bytes, fds: list[int]) -> None: ...
    def channel_drained(self, key: int) -> None: ...
    def channel_eof(self, key: int) -> None: ...
    def channel_closed(self, key: int, reason: str, error: bool) -> None: ...


def test_short_parts_join_to_bytes_and_long_ones_to_pieces() -> None:
    assert joined(b"a", b"b") == b"ab"

    def maker() -> Iterator[bytes]:
        yield b"1" * PIECE
        yield b""  # work that wrote nothing: a piece of its own
        yield b"2"

    spelled = joined(b"<", Spelled((maker,), 10), b">", error="GenericError")
    assert isinstance(spelled, Spelled) and len(spelled) == 12
    assert spelled.error == "GenericError"
    assert list(spelled.pieces()) == [b"<" + b"1" * PIECE, b"", b"2", b">"]
    assert spelled.spell() == spelled.spell()  # a recipe, made afresh each time


def test_spliced_parts_are_joined_as_views_never_copies() -> None:
    """A long reply of QEMU's keeps its bytes: joined with bytes it stays in parts, and
    around a part made in pieces it is cut in views of PIECE."""
    text = b"x" * (2 * PIECE + 1)
    kept = Spliced((memoryview(text)[1:],))
    spliced = joined(b"<", kept, b">")
    assert isinstance(spliced, Spliced) and bytes(spliced) == b"<" + text[1:] + b">"
    assert [memoryview(p).obj for p in spliced.parts[1:-1]] == [text]

    def maker() -> Iterator[bytes]:
        yield b"id"

    spelled = joined(b"<", Spelled((maker,), 2), b":", kept, b">")
    assert isinstance(spelled, Spelled) and len(spelled) == 5 + 2 * PIECE
    assert list(spelled.pieces()) == [b"<id", b":" + text[1 : PIECE + 1], text[PIECE + 1 :], b">"]


async def test_a_spelled_reply_is_made_as_the_peer_reads_it() -> None:
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    made: list[int] = []

    def maker() -> Iterator[bytes]:
        for n in range(300):
            made.append(n)
            yield bytes([65 + n % 26]) * PIECE

    channel = Channel(loop, ours, _Quiet(), 1)
    try:
        channel.write(Spelled((b"head:", maker, b":tail\r\n"), 1000))
        channel.write(b"after\r\n")
        assert channel.queued == 1000 + 7  # what qmpmux holds for it, not its length
        channel.flush()
        assert made == [0]  # one piece, made when the socket could take bytes
        for _ in range(200):  # turns of the loop, while the peer reads nothing
            await asyncio.sleep(0)
        assert 1 <= len(made) <= 4  # no piece made before the socket took the last
        theirs.setblocking(False)
        received = bytearray()
        want = b"head:" + b"".join(bytes([65 + n % 26]) * PIECE for n in range(300))
        want += b":tail\r\nafter\r\n"
        while len(received) < len(want):
            received += await asyncio.wait_for(loop.sock_recv(theirs, 1 << 20), 10)
        assert bytes(received) == want  # whole, and what came after it after it
        assert len(made) == 300 and channel.queued == 0
    finally:
        channel.abort("test over")
        theirs.close()


def test_bytes_before_a_maker_that_makes_nothing_are_kept() -> None:
    def nothing() -> Iterator[bytes]:
        yield from ()

    assert Spelled((b"a", nothing, b"b"), 2).spell() == b"ab"
