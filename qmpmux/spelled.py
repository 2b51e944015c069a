"""Long output the shell sends as it is made of: replies made a piece at a time
(`Spelled`), and text kept as its parts (`Spliced`): a client's long command, or a long
reply of QEMU's with the client's id around it.

A client can make qmpmux echo megabytes back: an id of half a million numbers, or a
command name, a member name or a stray token of a megabyte of non-ASCII text, which
QEMU's writer prints as `\\uXXXX` escapes (3 to 6 times as long). Encoded at once, one
such reply holds the event loop for tens to hundreds of milliseconds, and every other
client waits (README "Security"). A `Spelled` is the recipe instead: plain bytes and
functions that make the rest in pieces, each piece a bounded amount of work (qjson's
`*_pieces`). The client's channel makes the next piece only when its socket has taken
the last one (channel.py), so a turn of the loop does one piece of it, and whatever is
written to that client afterwards waits behind it, in order.

A `Spelled` is immutable and can be spelled any number of times; its `len()` is what
qmpmux holds for it (about the size of what it echoes), which is what the per-client
bounds count, not the size of the text it will make.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Final

# What a command's text is made of: bytes, or views of the client's own text.
Buffer = bytes | memoryview

# About how many bytes of output a piece is: a few hundred microseconds of encoding at
# worst, and large enough that sending it costs little next to making it.
PIECE: Final = 32 << 10

Part = bytes | Callable[[], Iterator[Buffer]]


class Spliced:
    """Bytes kept as the parts they are made of, never joined.

    A big command's text is the client's own (qjson.Message.member_text, a view of what
    the framer read), and a big reply's is QEMU's: joining either with qmpmux's few bytes
    would copy megabytes, each copy ~0.5 ms a MiB in fresh memory, all in one loop turn.
    The shell writes the parts as they are, in one `sendmsg` of many buffers."""

    __slots__ = ("parts", "size")

    def __init__(self, parts: tuple[Buffer, ...]) -> None:
        self.parts = parts
        self.size = sum(map(len, parts))

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return b"".join(self.parts)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Spliced):
            other = bytes(other)
        return isinstance(other, bytes) and bytes(self) == other

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Spliced({bytes(self)[:60]!r}..., {self.size} bytes)"


class Spelled:
    """Bytes yet to be made: `parts` in order, each bytes or a maker of pieces."""

    __slots__ = ("error", "parts", "size")

    def __init__(self, parts: tuple[Part, ...], size: int, error: str = "") -> None:
        self.parts = parts
        self.size = size
        # The error class of the reply it spells ("" for anything else): for audit
        # records and statistics, which must not spell it to learn that.
        self.error = error

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"Spelled({len(self.parts)} parts, {self.size} bytes held)"

    def pieces(self) -> Iterator[bytes]:
        """The bytes in pieces: bytes parts gathered up to about PIECE, and each piece a
        maker makes handed out as it comes (each is one bounded stretch of its work, even
        an empty one), with the bytes gathered before it."""
        gathered: list[Buffer] = []
        size = 0
        for part in self.parts:
            if type(part) is bytes:
                gathered.append(part)
                size += len(part)
                if size >= PIECE:
                    yield b"".join(gathered)
                    gathered.clear()
                    size = 0
            else:
                for piece in part():  # type: ignore[operator]
                    gathered.append(piece)
                    yield b"".join(gathered)
                    gathered.clear()
                    size = 0
        if gathered:
            yield b"".join(gathered)

    def spell(self) -> bytes:
        """All of it at once (tests, and what is never sent to a client)."""
        return b"".join(self.pieces())


def joined(*parts: bytes | Spelled | Spliced, error: str = "") -> bytes | Spelled | Spliced:
    """The parts one after another: bytes when they all are, a `Spliced` when none is
    made in pieces and no error class is given (long bytes are never copied to join
    them), else one `Spelled` (which carries the class)."""
    if all(type(part) is bytes for part in parts):
        return b"".join(parts)  # type: ignore[arg-type]
    if not error and not any(type(part) is Spelled for part in parts):
        buffers: list[Buffer] = []
        for part in parts:
            if type(part) is Spliced:
                buffers.extend(part.parts)
            else:
                buffers.append(part)  # type: ignore[arg-type]
        return Spliced(tuple(buffers))
    flat: list[Part] = []
    size = 0
    for part in parts:
        if type(part) is Spelled:
            flat.extend(part.parts)
        elif type(part) is Spliced:
            flat.append(functools.partial(_cut, part.parts))
        else:
            flat.append(part)  # type: ignore[arg-type]
        size += len(part)
    return Spelled(tuple(flat), size, error)


def _cut(buffers: tuple[Buffer, ...]) -> Iterator[Buffer]:
    """Spliced buffers as pieces of a `Spelled`: views of PIECE, each copied only as it
    is sent (Spelled.pieces)."""
    for buffer in buffers:
        view = memoryview(buffer)
        for start in range(0, len(view), PIECE):
            yield view[start : start + PIECE]
