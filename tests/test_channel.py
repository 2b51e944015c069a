"""The channel's reads shrink while what they bring is slow to handle (README "Security").

A client's input that is slow to parse (a megabyte of `[`, of short keys, of floats) would
otherwise hold the loop a few milliseconds every turn; its reads shrink while the hub
takes over the budget on one (at once to what the budget takes at that cost), and grow
back once it takes under a quarter of it. The
rule is tested as a function of the time taken, and on a real socket with budgets that
every read is over (0) or under (infinity), so no test depends on how fast this machine is.
"""

from __future__ import annotations

import asyncio
import math
import os
import socket

import pytest

from qmpmux.channel import ANCILLARY_SIZE, MIN_READ, Channel, next_read_size, received_fds
from qmpmux.spelled import Spliced


@pytest.mark.parametrize(
    ("size", "took", "want"),
    [
        (4096, 0.002, 2048),  # over the budget: halved
        (1024, 0.0011, 512),
        (4096, 0.010, 409),  # ten times over: what the budget takes at that cost a byte
        (MIN_READ, 0.5, MIN_READ),  # never below the floor
        (512, 0.0001, 1024),  # under a quarter: doubled
        (4096, 0.0, 4096),  # never above what it was made with
        (2048, 0.0005, 2048),  # in between: kept
    ],
)
def test_the_next_read_follows_the_time_the_last_took(size: int, took: float, want: int) -> None:
    assert next_read_size(size, 4096, took, 0.001) == want


class _Recorder:
    def __init__(self, expected: int) -> None:
        self.sizes: list[int] = []
        self.expected = expected
        self.done = asyncio.get_running_loop().create_future()

    def channel_data(self, key: int, data: bytes, fds: list[int]) -> None:
        self.sizes.append(len(data))
        if sum(self.sizes) >= self.expected and not self.done.done():
            self.done.set_result(None)

    def channel_drained(self, key: int) -> None: ...
    def channel_eof(self, key: int) -> None: ...
    def channel_closed(self, key: int, reason: str, error: bool) -> None: ...


async def read_sizes(budget: float | None, total: int = 16384) -> list[int]:
    ours, theirs = socket.socketpair()
    theirs.sendall(b"x" * total)  # all there before the first read
    recorder = _Recorder(total)
    channel = Channel(
        asyncio.get_running_loop(), ours, recorder, 1, read_size=4096, read_budget=budget
    )
    channel.start()
    try:
        await asyncio.wait_for(recorder.done, 10)
    finally:
        channel.abort("test over")
        theirs.close()
    return recorder.sizes


async def test_reads_halve_while_each_takes_over_the_budget() -> None:
    sizes = await read_sizes(budget=0.0)
    assert sizes[0] == 4096
    assert set(sizes[1:]) == {MIN_READ}  # what no time at all would take: the floor


async def test_reads_stay_whole_while_each_takes_under_the_budget() -> None:
    assert await read_sizes(budget=math.inf) == [4096] * 4
    assert await read_sizes(budget=None) == [4096] * 4


class _Quiet:
    def channel_data(self, key: int, data: bytes, fds: list[int]) -> None: ...
    def channel_drained(self, key: int) -> None: ...
    def channel_eof(self, key: int) -> None: ...
    def channel_closed(self, key: int, reason: str, error: bool) -> None: ...


async def test_a_spliced_write_reaches_the_peer_whole_and_in_order() -> None:
    """A big command's text is written as the views it is made of (wire.Spliced): the
    peer reads exactly those bytes, and what is written after them comes after."""
    text = bytearray(bytes(range(256)) * (3 << 12))  # 3 MiB, more than a socket buffer
    parts = (b'{"execute":"x","arguments":', memoryview(text)[1:-1], b',"id":1}')
    spliced = Spliced(parts)
    ours, theirs = socket.socketpair()
    loop = asyncio.get_running_loop()
    channel = Channel(loop, ours, _Quiet(), 1)
    try:
        channel.write(spliced)
        channel.write(b"after")
        channel.flush()
        assert channel.queued < len(spliced) + 5  # the kernel took some already
        want = b"".join(parts) + b"after"
        got = bytearray()
        theirs.setblocking(False)
        while len(got) < len(want):
            got += await loop.sock_recv(theirs, 1 << 20)
        assert got == want
        assert channel.queued == 0
    finally:
        channel.abort("test over")
        theirs.close()


async def test_a_spliced_write_with_fds_carries_them_on_its_first_byte() -> None:
    """A command that takes an fd and was renamed is long (wire.command_bytes keeps it
    Spliced): the fds go with its first byte, and every byte follows in order."""
    prefix = b'{"execute":"getfd","arguments":{"fdname":"' + b"n" * (3 << 20) + b'"}'
    spliced = Spliced((prefix, b',"id":0}'))
    ours, theirs = socket.socketpair()
    passed_r, passed_w = os.pipe()
    loop = asyncio.get_running_loop()
    channel = Channel(loop, ours, _Quiet(), 1)
    try:
        channel.write(spliced, fds=(passed_w,))
        channel.flush()
        theirs.setblocking(False)
        got = bytearray()
        fds: list[int] = []
        while len(got) < len(spliced):
            try:
                data, ancillary, _flags, _addr = theirs.recvmsg(1 << 20, ANCILLARY_SIZE)
            except BlockingIOError:
                await _readable(loop, theirs)
                continue
            if ancillary:
                assert not got, "the fds came with a later byte than the first"
                fds += received_fds(ancillary)
            got += data
        assert got == bytes(spliced)
        assert len(fds) == 1 and os.fstat(fds[0]).st_ino == os.fstat(passed_r).st_ino
        os.close(fds[0])
        with pytest.raises(OSError):
            os.fstat(passed_w)  # the channel closed its copy once sent
    finally:
        channel.abort("test over")
        theirs.close()
        os.close(passed_r)


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), readable)
    try:
        await asyncio.wait_for(ready, 10)
    finally:
        loop.remove_reader(sock.fileno())


async def test_write_all_sends_at_once_and_queues_what_the_socket_did_not_take() -> None:
    """An event to every client goes straight to each socket; what one does not take
    waits in order, ahead of anything written after it."""
    ours, theirs = socket.socketpair()
    loop = asyncio.get_running_loop()
    channel = Channel(loop, ours, _Quiet(), 1)
    try:
        Channel.write_all([channel], b"event\r\n")
        assert channel.queued == 0 and theirs.recv(100) == b"event\r\n"
        big = bytes(range(256)) * (1 << 14)  # 4 MiB: more than the socket takes
        Channel.write_all([channel], big)
        assert 0 < channel.queued < len(big)
        Channel.write_all([channel], b"next\r\n")  # behind what is queued, never ahead of it
        got = bytearray()
        theirs.setblocking(False)
        while len(got) < len(big) + 6:
            got += await loop.sock_recv(theirs, 1 << 20)
        assert got == big + b"next\r\n" and channel.queued == 0
    finally:
        channel.abort("test over")
        theirs.close()


async def test_small_replies_queued_behind_others_are_gathered_in_order() -> None:
    """A client that does not read may be owed a full outbox of small replies: they are
    gathered into chunks of up to 64 KiB, so the outbox holds a few hundred chunks, not
    hundreds of thousands (each costing work to send and to drop), and arrive in order."""
    ours, theirs = socket.socketpair()
    loop = asyncio.get_running_loop()
    channel = Channel(loop, ours, _Quiet(), 1)
    try:
        replies = [b'{"error": %d}\r\n' % i for i in range(200_000)]
        for reply in replies:
            channel.write(reply)
            channel.flush()
        assert channel.queued > 1 << 20  # the peer has not read: most of it waits
        assert len(channel._out) < channel.queued // (1 << 15)
        got = bytearray()
        theirs.setblocking(False)
        want = b"".join(replies)
        while len(got) < len(want):
            got += await loop.sock_recv(theirs, 1 << 20)
        assert got == want and channel.queued == 0
    finally:
        channel.abort("test over")
        theirs.close()
