"""A non-blocking stream socket on the event loop, with an explicit, bounded outbox.

qmpmux drives sockets itself (`add_reader`/`add_writer`) rather than through asyncio
transports because it needs what transports hide: `recvmsg` for file descriptors passed
with SCM_RIGHTS on unix sockets, the exact size of what is queued for a peer (a client
that stops reading is cut off at `outbox_limit`, never allowed to grow memory or stall
anyone), and writes coalesced per event-loop turn (`write` queues, `flush` sends).

Invariants:
- `handler.channel_closed` is called exactly once (`error` when the connection failed or
  was cut off rather than closed in order), after which the socket is closed and
  the channel does nothing.
- The socket is never half-closed: a graceful `close` flushes, then closes fully
  (QEMU drops pending replies as soon as it reads EOF).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any, Final, Protocol

from qmpmux.spelled import Spelled, Spliced

MAX_FDS_PER_MESSAGE: Final = 16
# How a cut for not reading is worded: the shell counts these (metrics.py).
SLOW_READER_CUT: Final = "not reading: "
ANCILLARY_SIZE: Final = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * array.array("i").itemsize)
# Every read lands in this one buffer and only what arrived is copied out: allocating a
# fresh 256 KiB object per read costs an mmap/mremap/munmap triple each time.
_READ_BUFFER: Final = memoryview(bytearray(1 << 18))
_IOV_MAX: Final = 512  # chunks per sendmsg (the kernel's limit is 1024)
# Small replies queued behind others are gathered into chunks of up to this size: a client
# that does not read may be owed a full outbox of 80-byte errors (some 300 000 of them),
# and every byte of work per chunk (sending, dropping the outbox when it goes: 13-21 ms in
# one turn measured) then is per 64 KiB.
_GATHER: Final = 1 << 16


class _WithFds:
    """Bytes to send in a `sendmsg` of their own with `fds` on their first byte (SCM_RIGHTS
    attaches them to the write, and QEMU to the first byte it reads of it)."""

    __slots__ = ("data", "fds")

    def __init__(self, data: bytes, fds: tuple[int, ...]) -> None:
        self.data = data
        self.fds = fds

    def __len__(self) -> int:
        return len(self.data)


class _Spelling:
    """A `Spelled` being sent: its pieces still to make, and what qmpmux still holds for
    it (counted in the outbox until the last piece is made)."""

    __slots__ = ("held", "pieces")

    def __init__(self, spelled: Spelled) -> None:
        self.pieces = spelled.pieces()
        self.held = len(spelled)

    def __len__(self) -> int:
        return self.held


def _close_all(fds: tuple[int, ...]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class ChannelHandler(Protocol):
    def channel_data(self, key: int, data: bytes, fds: list[int]) -> None: ...
    def channel_drained(self, key: int) -> None: ...
    def channel_eof(self, key: int) -> None: ...
    def channel_closed(self, key: int, reason: str, error: bool) -> None: ...


def received_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            ints = array.array("i")
            ints.frombytes(payload[: len(payload) - len(payload) % ints.itemsize])
            fds.extend(ints)
    return fds


# The slowest input costs ~4 us a byte (past QEMU's token limit every token is a message
# of its own, each answered with an error): 128 bytes take about the 0.5 ms budget (server.py).
MIN_READ = 128


def next_read_size(size: int, largest: int, took: float, budget: float) -> int:
    """The next read's size: when handling this one took over `budget`, at most half of
    it and what the budget would have taken at the same cost a byte (down to MIN_READ),
    so input ten times slower than the last costs one slow turn, not four; doubled back
    (up to `largest`) when it took under a quarter of the budget. Input that is slow to
    parse (a megabyte of `[`, of short keys, of floats: ~1-2 us a byte token by token)
    is then read a hundred or so bytes a turn, and everything else as before (README
    "Security")."""
    if took > budget:
        return max(MIN_READ, min(size // 2, int(size * budget / took)))
    if took < budget / 4:
        return min(largest, size * 2)
    return size


class Channel:
    __slots__ = (
        "_closing",
        "_done",
        "_linger",
        "_loop",
        "_out",
        "_out_size",
        "_read_max",
        "_reading",
        "_special",
        "_writing",
        "handler",
        "key",
        "outbox_limit",
        "read_budget",
        "read_size",
        "recv_fds",
        "sock",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        handler: ChannelHandler,
        key: int,
        *,
        read_size: int = 65536,
        outbox_limit: int = 8 << 20,
        recv_fds: bool = False,
        read_budget: float | None = None,
    ) -> None:
        sock.setblocking(False)
        self._loop = loop
        self.sock = sock
        self.handler = handler
        self.key = key
        self.read_size = read_size
        self._read_max = read_size
        # Seconds the handler may spend on one read: reads shrink while it takes longer
        # (next_read_size), so no input shape holds the loop long per turn.
        self.read_budget = read_budget
        self.outbox_limit = outbox_limit
        self.recv_fds = recv_fds and sock.family == socket.AF_UNIX
        self._out: list[bytes | bytearray | memoryview | _WithFds | _Spelling] = []
        # How many entries of _out carry fds, or are being spelled: a write of many
        # chunks stops before the first of them.
        self._special = 0
        self._out_size = 0
        self._reading = False
        self._writing = False
        self._closing = False
        self._done = False
        self._linger: asyncio.TimerHandle | None = None

    @property
    def closed(self) -> bool:
        return self._done

    @property
    def queued(self) -> int:
        """Bytes written but not yet taken by the kernel."""
        return self._out_size

    # --- reading ----------------------------------------------------------------------------

    def resume_reading(self) -> None:
        if not self._reading and not self._closing and not self._done:
            self._reading = True
            self._loop.add_reader(self.sock.fileno(), self._on_readable)

    start = resume_reading

    def pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self.sock.fileno())

    def _on_readable(self) -> None:
        fds: list[int] = []
        buffer = _READ_BUFFER[: self.read_size]
        try:
            if self.recv_fds:
                n, ancillary, _flags, _addr = self.sock.recvmsg_into([buffer], ANCILLARY_SIZE)
                if ancillary:
                    fds = received_fds(ancillary)
            else:
                n = self.sock.recv_into(buffer)
        except (BlockingIOError, InterruptedError):
            return
        except ConnectionResetError:
            self._finish("connection reset by peer")  # a peer that vanished: not our fault
            return
        except OSError as exc:
            self.abort(f"read failed: {exc.strerror or exc}")
            return
        data = bytes(buffer[:n])
        if data or fds:
            if self.read_budget is None:
                self.handler.channel_data(self.key, data, fds)
            else:
                began = time.perf_counter()
                self.handler.channel_data(self.key, data, fds)
                took = time.perf_counter() - began
                self.read_size = next_read_size(
                    self.read_size, self._read_max, took, self.read_budget
                )
        if not data and not self._done:
            self.pause_reading()
            self.handler.channel_eof(self.key)

    # --- writing ----------------------------------------------------------------------------

    def write(self, data: bytes | Spelled | Spliced, fds: tuple[int, ...] = ()) -> None:
        """Queue `data`; it is sent by the next `flush` (or when the socket is writable).

        `fds` are sent with `data`, in a `sendmsg` of its own, and then closed here (the
        peer has its own copies); if the channel closes first, they are closed unsent.
        A `Spelled` is made one piece per send, each when the one before has been taken
        (spelled.py), and what is written after it waits behind it. A `Spliced` is
        queued as its parts, never joined."""
        if self._done:
            _close_all(fds)
        elif type(data) is bytes and not fds:
            out = self._out
            # Behind the head (which may be half sent, and so shared with a view), a small
            # reply joins the small ones before it.
            tail = out[-1] if len(out) > 1 else None
            if type(tail) is bytearray and len(tail) + len(data) <= _GATHER:
                tail += data
            elif type(tail) is bytes and len(tail) + len(data) <= _GATHER:
                out[-1] = bytearray(tail) + data
            else:
                out.append(data)
            self._out_size += len(data)
        elif isinstance(data, Spelled):
            assert not fds, "fds go with bytes"
            spelling = _Spelling(data)
            self._out.append(spelling)
            self._special += 1
            self._out_size += spelling.held
        elif fds:  # a command that takes an fd: they go with its first byte
            first, *rest = data.parts if isinstance(data, Spliced) else (data,)
            self._out.append(_WithFds(bytes(first), fds))  # (a long first part: not copied)
            self._out += rest
            self._special += 1
            self._out_size += len(data)
        elif isinstance(data, Spliced):
            self._out += data.parts
            self._out_size += len(data)
        else:
            self._out.append(bytes(data))
            self._out_size += len(data)

    @staticmethod
    def write_all(channels: Iterable[Channel], data: bytes) -> None:
        """`write` then `flush` of the same bytes on every channel in turn (an event to
        every client, where the last client waits for all the others): a channel with
        nothing queued hands them to the kernel straight away, and queues what it did not
        take. One loop for all: per channel, only what must be done for it."""
        size = len(data)
        for channel in channels:
            if channel._out or channel._writing or channel._done:
                channel.write(data)
                channel.flush()
                continue
            try:
                sent = channel.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                channel.abort(f"write failed: {exc.strerror or exc}")
                continue
            if sent < size:
                channel.write(data[sent:] if sent else data)  # rare: a client behind
                channel.flush()  # waits for the socket to be writable, or cuts a slow reader
            elif not channel._reading and not channel._closing:
                channel.handler.channel_drained(channel.key)  # a paused reader may resume

    def flush(self) -> None:
        if self._done or not self._out:
            return
        if not self._writing:
            self._send()
            if self._done:
                return
            if self._out:
                self._writing = True
                self._loop.add_writer(self.sock.fileno(), self._on_writable)
            elif not self._reading and not self._closing:
                self.handler.channel_drained(self.key)  # a paused reader may resume
                return
        if self._out_size > self.outbox_limit:
            self.abort(
                f"{SLOW_READER_CUT}{self._out_size} bytes queued (limit {self.outbox_limit})"
            )

    def _send(self) -> None:
        """Send what the kernel takes now: one write of many chunks, never a re-join of a
        large backlog (a client far behind would make every attempt copy all of it).

        A chunk with fds goes in a `sendmsg` of its own (rare: only commands that pass a
        client's fd to QEMU): the chunks before it go first, then it alone."""
        out = self._out
        head = out[0]
        if type(head) is _Spelling:
            spelled = self._spell(head)
            if spelled is None:
                return
            head = spelled
        if type(head) is _WithFds:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", head.fds))]
            sent = self._try(self.sock.sendmsg, [head.data], ancillary)
            if sent is None:
                return
            _close_all(head.fds)  # sent with the first byte: the peer has them now
            self._special -= 1
            out[0] = head.data  # what is left of it is plain bytes now
        elif len(out) == 1:
            sent = self._try(self.sock.send, head)
        else:
            end = _IOV_MAX
            if self._special:
                end = next(
                    (i for i, c in enumerate(out) if type(c) is _WithFds or type(c) is _Spelling),
                    end,
                )
                end = min(max(end, 1), _IOV_MAX)
            sent = self._try(self.sock.sendmsg, out[:end])
        if sent is None:
            return
        self._out_size -= sent
        done = 0
        for chunk in out:
            if sent < len(chunk) or type(chunk) is _Spelling:  # sent only once made
                break
            sent -= len(chunk)
            done += 1
        del out[:done]
        if sent:
            out[0] = memoryview(out[0])[sent:]  # type: ignore[arg-type]

    def _spell(self, spelling: _Spelling) -> bytes | bytearray | memoryview | _WithFds | None:
        """Make the next piece of the `Spelled` at the head of the outbox, ahead of it;
        the new head, or None when there is nothing to send this turn (an empty piece: a
        stretch of work that wrote nothing, or the outbox ran empty)."""
        out = self._out
        while (piece := next(spelling.pieces, None)) is None:  # spelled out: next one
            del out[0]
            self._special -= 1
            self._out_size -= spelling.held
            if not out:
                return None
            head = out[0]
            if not isinstance(head, _Spelling):
                return head
            spelling = head
        taken = min(spelling.held, len(piece))
        spelling.held -= taken
        self._out_size += len(piece) - taken
        if not piece:
            return None
        out.insert(0, piece)
        return piece

    def _try(self, send: Callable[..., int], *args: Any) -> int | None:
        """One send call: bytes taken, or None when nothing was (would block, or failed
        and the channel is aborted)."""
        try:
            return send(*args)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            self.abort(f"write failed: {exc.strerror or exc}")
            return None

    def _on_writable(self) -> None:
        self._send()
        if self._done:
            return
        if not self._out:
            self._writing = False
            self._loop.remove_writer(self.sock.fileno())
            if self._closing:
                self._finish("closed")
            elif not self._reading:
                self.handler.channel_drained(self.key)  # a paused reader may resume
        elif self._out_size > self.outbox_limit:
            self.abort(
                f"{SLOW_READER_CUT}{self._out_size} bytes queued (limit {self.outbox_limit})"
            )

    # --- closing ----------------------------------------------------------------------------

    def close(self, reason: str, linger: float = 2.0) -> None:
        """Stop reading, send what is queued (for at most `linger` seconds), then close."""
        if self._closing or self._done:
            return
        self._closing = True
        self.pause_reading()
        self.flush()
        if self._done:
            return
        if not self._out:
            self._finish(reason)
        else:
            self._linger = self._loop.call_later(linger, self.abort, f"{reason} (output dropped)")

    def abort(self, reason: str) -> None:
        """Close at once, dropping anything queued."""
        self._finish(reason, error=True)

    def _discard_input(self) -> None:
        """Read away unread input: closing with data pending would reset the connection,
        and a reset can destroy what the peer has not read yet (its last replies)."""
        try:
            for _ in range(64):
                if not self.sock.recv(65536):
                    return
        except OSError:
            pass

    def _finish(self, reason: str, error: bool = False) -> None:
        if self._done:
            return
        self._done = True
        if self._linger is not None:
            self._linger.cancel()
        fd = self.sock.fileno()
        if self._reading:
            self._loop.remove_reader(fd)
        if self._writing:
            self._loop.remove_writer(fd)
        self._reading = self._writing = False
        if self._special:
            for chunk in self._out:
                if type(chunk) is _WithFds:
                    _close_all(chunk.fds)
        self._special = 0
        self._out.clear()
        self._out_size = 0
        if not error:
            self._discard_input()
        self.sock.close()
        self.handler.channel_closed(self.key, reason, error)
