"""QMP messages on the wire: the one place that knows QMP's spellings and byte layout.

Downstream, qmpmux must be byte-identical to QEMU, so everything it writes to a client
goes through here: greetings, error and return replies (QEMU's member order: `return`
before `id`, `id` before `error`; docs/protocol.md §3.4), and upstream replies whose `id`
is swapped for the client's own. Upstream, commands are written as compactly as possible
(QEMU reads its socket one byte at a time, ~3.7 us a byte: §1.3) with qmpmux's short
integer ids.

Invariants:
- A reply from QEMU reaches a client with exactly one change: its `id` member.
- Events are never re-encoded: the bytes QEMU sent are the bytes every client gets
  (except from a `pretty=on` upstream monitor, whose output is compacted once here).
- Every message written downstream ends in CRLF, as QEMU's monitor does.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Final, TypeGuard

import msgspec

from qmpmux.bounded import compact_pieces
from qmpmux.qjson import (
    CText,
    Deferred,
    Framer,
    JsonValue,
    LongString,
    c_text_pieces,
    encode,
    encode_compact,
    heavy,
    long_string_pieces,
    pack,
    packed_pieces,
    qdict_slot,
    text_pieces,
)
from qmpmux.spelled import Buffer, Spelled, Spliced, joined

CRLF: Final = b"\r\n"

# Member names, command names and error classes as QEMU spells them (docs/protocol.md §6;
# qapi/error.json).
EXECUTE: Final = "execute"
EXEC_OOB: Final = "exec-oob"
ARGUMENTS: Final = "arguments"
ID: Final = "id"
QMP_CAPABILITIES: Final = "qmp_capabilities"
CAP_OOB: Final = "oob"
GENERIC_ERROR: Final = "GenericError"
COMMAND_NOT_FOUND: Final = "CommandNotFound"
SHUTDOWN_EVENT: Final = "SHUTDOWN"
# After SHUTDOWN, these say QEMU stays (docs/protocol.md §9): a guest's shutdown under
# -no-shutdown pauses the VM (STOP), and it may be reset and resumed from there.
STAYING_EVENTS: Final = frozenset({"STOP", "RESET", "RESUME"})
QUERY_COMMANDS: Final = "query-commands"
# QEMU writes a success as `{"return": R, "id": N}` (see `rewrite_reply`).
SUCCESS_OPENING: Final = b'{"return"'


class Absent(enum.Enum):
    """Marks a command that carried no `id` (distinct from `"id": null`)."""

    ID = 0


NO_ID: Final = Absent.ID
ClientId = JsonValue | Absent


# What qmpmux writes to a client: bytes, a reply too long to encode at once, made in
# pieces as the client's socket takes them, or a long reply of QEMU's with the client's
# id spliced in, never copied (spelled.py).
Reply = bytes | Spelled | Spliced
# A message from QEMU as the upstream reader hands it on: bytes, or a long one's read
# buffer itself, handed over rather than copied (UpstreamFramer).
Line = bytes | bytearray
# A client's id as QEMU would echo it, or None when it gave none.
WireId = bytes | Spelled | None


# Members a big message keeps packed: its arguments (built only if its reply depends on
# them) and its id (echoed from the packed form).
DEFERRED_MEMBERS: Final = frozenset({ARGUMENTS, ID})
# Members whose values a client's command is judged or answered by: its name and its id
# (echoed). A long string anywhere else is never built (qjson.Framer._string_fate): inside
# the arguments only when a check reads them, elsewhere never (the message is refused).
READ_MEMBERS: Final = frozenset({EXECUTE, EXEC_OOB, ID})
# Members whose value, a long string, is handed on in its parts (qjson.LongString): every
# member read, since a name is only matched and echoed, an id only echoed.
PART_MEMBERS: Final = READ_MEMBERS
# Packed bytes written at once: about half a millisecond of values at worst.
_PACKED_LIGHT: Final = 2048


def encode_id(value: ClientId | Deferred | LongString) -> WireId:
    """A client's id as QEMU would echo it (re-serialised, not verbatim), or None if absent.

    An id that would take long to encode is written as it is sent, from its packed form
    or its parts (a `Spelled` that holds only those)."""
    if value is NO_ID:
        return None
    if isinstance(value, LongString):
        return _quoted(value)
    if type(value) is int:  # the commonest ids, with short strings: written at once
        return b"%d" % value
    if type(value) is str and len(value) <= 256:
        return encode(value)
    if isinstance(value, Deferred):  # a big message's container, still packed
        if value.in_parts:  # long strings or keys in it: never built
            return Spelled((value.pieces,), len(value))
        raw = value.raw
        if len(raw) <= _PACKED_LIGHT:
            return encode(value.resolve())
    elif heavy(value):
        raw = pack(value)
    else:
        return encode(value)
    return Spelled((functools.partial(packed_pieces, raw),), len(raw))


def _quoted(text: str | CText | LongString) -> bytes | Spelled:
    """`text` as a JSON string, QEMU's spelling; made in pieces when long."""
    if type(text) is CText:
        return Spelled((functools.partial(c_text_pieces, text),), len(text.raw))
    if isinstance(text, LongString):
        return Spelled((functools.partial(long_string_pieces, text),), len(text))
    assert isinstance(text, str)
    if heavy(text):
        return Spelled((functools.partial(text_pieces, text),), len(text))
    return encode(text)


# --- messages qmpmux writes to clients ----------------------------------------------------


def greeting(version: bytes, oob: bool) -> bytes:
    """QEMU's greeting, with QEMU's own version object copied byte for byte."""
    caps = b'["oob"]' if oob else b"[]"
    return b'{"QMP": {"version": ' + version + b', "capabilities": ' + caps + b"}}" + CRLF


def error_reply(wire_id: WireId, error_class: str, desc: str | CText | LongString) -> Reply:
    """`{"id": ..., "error": {"class": ..., "desc": ...}}` exactly as QEMU lays it out."""
    if isinstance(desc, str) and not isinstance(wire_id, Spelled) and not heavy(desc):
        body = b'"error": {"class": ' + encode(error_class) + b', "desc": ' + encode(desc) + b"}}"
        if wire_id is None:
            return b"{" + body + CRLF
        return b'{"id": ' + wire_id + b", " + body + CRLF
    head = (b"{",) if wire_id is None else (b'{"id": ', wire_id, b", ")
    return joined(
        *head, b'"error": {"class": ', encode(error_class), b', "desc": ', _quoted(desc),
        b"}}" + CRLF, error=error_class,
    )  # fmt: skip


def return_reply(wire_id: WireId, value: bytes = b"{}") -> Reply:
    """`{"return": ..., "id": ...}` for replies qmpmux answers itself."""
    if wire_id is None:
        return b'{"return": ' + value + b"}" + CRLF
    return joined(b'{"return": ', value, b', "id": ', wire_id, b"}" + CRLF)


# --- commands qmpmux writes to QEMU ---------------------------------------------------------

_UPSTREAM_IDS: Final = [str(n).encode() for n in range(1024)]


def upstream_id_bytes(n: int) -> bytes:
    return _UPSTREAM_IDS[n] if n < 1024 else str(n).encode()


# Command text the client wrote is spliced in, not copied, from this size on.
SPLICED_FROM: Final = 64 * 1024
# What qmpmux writes to QEMU.
CommandText = bytes | Spliced


def command_prefix(
    name: str,
    arguments: Mapping[str, JsonValue] | None,
    oob: bool,
    texts: tuple[Buffer, Buffer | None] | None = None,
    long: Mapping[str, Sequence[str]] | None = None,
) -> CommandText:
    """A command's upstream bytes up to (not including) its id: `{"execute":"x","arguments":{..}`.

    `texts` are the client's own tokens for the name and the arguments (qjson.Message),
    sent as they are: QEMU reads the same tokens to the same value, and the command costs
    QEMU no more bytes than the client wrote (the id aside). Without them, the values are
    encoded compactly. Empty arguments are dropped: QEMU treats a missing `arguments` as
    `{}`, and every byte costs QEMU ~3.7 us to read. A long text is spliced in (Spliced).
    `long`: strings of `arguments` that stand for long ones kept in pieces (fdargs.
    rename_fds); given (a renamed command, fdpass), heavy arguments or any with stand-ins
    are encoded a run at a time, one short C call each (bounded.compact_pieces: a command
    of megabytes is encoded on the worker thread). Without it, the arguments are a small
    command's and are encoded at once.
    """
    head = b'{"exec-oob":' if oob else b'{"execute":'
    if texts is None:
        assert arguments is None or isinstance(arguments, dict), "decoded whole, so a dict"
        prefix = head + encode_compact(name)
        if not arguments:
            return prefix
        if long is not None and (long or heavy(arguments)):  # (never copied again: Spliced)
            return Spliced((prefix + b',"arguments":', *compact_pieces(arguments, long)))
        encoded = encode_compact(arguments)  # (a small command's: no walk to weigh it)
        if len(encoded) >= SPLICED_FROM:
            return Spliced((prefix + b',"arguments":', encoded))
        return prefix + b',"arguments":' + encoded
    name_text, arguments_text = texts
    parts: tuple[Buffer, ...] = (head, name_text)
    if arguments:
        assert arguments_text is not None
        parts += (b',"arguments":', arguments_text)
    size = sum(map(len, parts))
    if size >= SPLICED_FROM and 2 * size >= _kept_alive(parts):
        return Spliced(parts)
    return b"".join(parts)


def _kept_alive(parts: tuple[Buffer, ...]) -> int:
    """The bytes that holding `parts` holds: a view holds all of the text it views (the
    whole message's), which must not be much more than the command qmpmux counts (a huge
    id beside small arguments is copied out of it instead)."""
    views = {id(p.obj): memoryview(p.obj).nbytes for p in parts if type(p) is memoryview}
    return sum(views.values()) + sum(len(part) for part in parts if type(part) is not memoryview)


def decode_prefix(prefix: CommandText) -> dict[str, JsonValue]:
    """The command a `command_prefix` encodes, read back in QEMU's own dialect (rare:
    a policy reload re-judges queued commands from their upstream bytes)."""
    values = Framer(max_message_bytes=len(prefix) + 2, max_tokens=len(prefix) + 2).feed(
        bytes(prefix) + b"}"
    )
    value = values[0] if len(values) == 1 else None
    assert isinstance(value, dict), "command_prefix always encodes an object"
    return value


# An in-band command this small goes to QEMU without an id (link.py, docs/protocol.md
# §7.2): qmpmux re-encoded it from tokens its parser took as QEMU does (the differential
# tests in tests/test_qjson_qemu.py), far inside every limit of QEMU's parser (§2.5), so
# QEMU parses it as one object and answers it in its place. At ~4 µs a byte (§1.3) the
# 7 bytes of `,"id":0` are a tenth of a short command's round trip.
ANONYMOUS_MAX: Final = 4096


def small(prefix: CommandText) -> TypeGuard[bytes]:
    """Whether a command is short enough to go without an id (ANONYMOUS_MAX)."""
    return type(prefix) is bytes and len(prefix) < ANONYMOUS_MAX


def command_bytes(prefix: CommandText, upstream_id: int | None) -> CommandText:
    """A command as QEMU reads it: its prefix closed, with `upstream_id` if not None."""
    tail = b"}" if upstream_id is None else b',"id":' + upstream_id_bytes(upstream_id) + b"}"
    if type(prefix) is bytes:
        # (a long one is kept whole: a renamed colon list of fd names is tens of MiB, and
        # copying them takes the event loop's thread ~0.5 ms a MiB)
        return prefix + tail if len(prefix) < SPLICED_FROM else Spliced((prefix, tail))
    assert isinstance(prefix, Spliced)
    return Spliced((*prefix.parts, tail))


def upstream_write(chunks: list[CommandText]) -> CommandText:
    """Commands sent together as one write: joined, unless one of them is spliced."""
    if len(chunks) == 1:
        return chunks[0]
    if all(type(chunk) is bytes for chunk in chunks):
        return b"".join(chunks)  # type: ignore[arg-type]
    parts: list[Buffer] = []
    for chunk in chunks:
        if isinstance(chunk, Spliced):
            parts += chunk.parts
        else:
            parts.append(chunk)
    return Spliced(tuple(parts))


# The upstream handshake's command has an id of its own, so its reply is known: a command
# of an earlier connection still running in QEMU answers on the new one, first.
HANDSHAKE_ID: Final = "qmpmux"
CAPABILITIES_OOB: Final = (
    b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]},"id":"qmpmux"}'
)
CAPABILITIES_PLAIN: Final = b'{"execute":"qmp_capabilities","id":"qmpmux"}'


# --- messages QEMU writes to qmpmux ---------------------------------------------------------


class Upstream(msgspec.Struct):
    """What qmpmux needs to route one upstream message; payloads stay undecoded (Raw)."""

    QMP: msgspec.Raw = msgspec.Raw()  # empty (falsy) when absent
    event: str | None = None
    id: Any = NO_ID
    error: msgspec.Raw = msgspec.Raw()
    ret: msgspec.Raw = msgspec.field(default=msgspec.Raw(), name="return")


class _Greeting(msgspec.Struct):
    version: msgspec.Raw
    capabilities: list[str]


class _ErrorBody(msgspec.Struct):
    desc: str = ""
    cls: str = msgspec.field(default="", name="class")


_decode_upstream = msgspec.json.Decoder(Upstream).decode
_decode_greeting = msgspec.json.Decoder(_Greeting).decode
_decode_error = msgspec.json.Decoder(_ErrorBody).decode
_decode_members = msgspec.json.Decoder(dict[str, msgspec.Raw]).decode


# QEMU prints a non-finite double as `inf`, `-inf`, `nan` or `-nan` (docs/protocol.md
# §3.3), which is not JSON; strings are matched first so that their text is kept.
_NON_FINITE: Final = re.compile(rb'"(?:[^"\\]|\\.)*"|-?\b(?:inf|nan)\b')


def _finite(m: re.Match[bytes]) -> bytes:
    token = m.group()
    return token if token[0] == 0x22 else b"0"  # '"'


def finite(line: bytes) -> bytes:
    """`line` with QEMU's non-finite numbers made 0, for reading what it is (its own bytes
    go on): the same bytes, at the cost of one scan, when it has none."""
    if b"inf" not in line and b"nan" not in line:
        return line
    return _NON_FINITE.sub(_finite, line)


def decode_upstream(line: Line) -> Upstream:
    """Classify one upstream message; raises msgspec.DecodeError on anything not QMP-shaped.

    A message with QEMU's non-finite numbers is classified from a copy with them made 0
    (its own bytes go on): a reply of QEMU's is never dropped for them. A long reply is
    classified by its layout (`_laid_out`)."""
    if len(line) >= SPLICED_FROM:
        laid_out = _laid_out(line)
        if laid_out is not None:
            return laid_out
    try:
        return _decode_upstream(line)
    except msgspec.DecodeError:
        return _decode_upstream(finite(bytes(line)))


# QEMU prints a reply's id first before `error` and last after `return` (§3.4).
# (Ids are qmpmux's own, a few digits: a longer one is not read as a number.)
_ERROR_LAYOUT: Final = re.compile(rb'\{"id": ([0-9]{1,20}), "error": ')
_RETURN_LAYOUT: Final = re.compile(rb', "id": ([0-9]{1,20})\}\r\n\Z')


def _laid_out(line: Line) -> Upstream | None:
    """A reply of QEMU's with an id, told by where QEMU prints its members, or None.

    Decoding costs ~0.25 ms a MiB in one turn, and a reply can echo megabytes of a
    client's command. QEMU's writer prints valid JSON (ASCII, escapes for the rest), so
    the opening and closing of a reply say what it is; its members are views of it."""
    m = _ERROR_LAYOUT.match(line)
    if m is not None:
        return Upstream(id=int(m.group(1)), error=msgspec.Raw(memoryview(line)[m.end() : -3]))
    if line.startswith(b'{"return": '):
        m = _RETURN_LAYOUT.search(line, len(line) - 40)
        if m is not None:
            return Upstream(id=int(m.group(1)), ret=msgspec.Raw(memoryview(line)[11 : m.start()]))
    return None


def decode_greeting(raw: msgspec.Raw) -> tuple[bytes, list[str]]:
    """(version bytes, offered capabilities) from the greeting's `QMP` member."""
    g = _decode_greeting(raw)
    return bytes(g.version), g.capabilities


class _FdsetAdded(msgspec.Struct):
    fdset_id: int = msgspec.field(name="fdset-id")


class _AddFdReply(msgspec.Struct):
    return_: _FdsetAdded = msgspec.field(name="return")


_add_fd_reply = msgspec.json.Decoder(_AddFdReply)


def decode_fdset(reply: bytes) -> int:
    """The fdset id in QEMU's reply to a successful `add-fd`."""
    return _add_fd_reply.decode(reply).return_.fdset_id


def describe_error(raw: msgspec.Raw) -> str:
    """`Class: desc` of an upstream error member, for logs."""
    try:
        err = _decode_error(raw)
    except msgspec.DecodeError:
        return bytes(raw).decode("ascii", "replace")
    return f"{err.cls}: {err.desc}"


class _ErrorClass(msgspec.Struct):
    cls: str = msgspec.field(default="", name="class")


class _Reply(msgspec.Struct):
    error: _ErrorClass | None = None


_decode_reply = msgspec.json.Decoder(_Reply).decode
_decode_class = msgspec.json.Decoder(_ErrorClass).decode
# QEMU prints an error's class before its desc (docs/protocol.md §3.4).
_CLASS_FIRST: Final = re.compile(rb'\{"class": "([A-Za-z0-9_]+)", ')


def error_class(reply: Reply) -> str:
    """The error class of a reply, or "" for a success (for audit records)."""
    if isinstance(reply, Spelled):
        return reply.error
    try:
        err = _decode_reply(finite(bytes(reply))).error
    except msgspec.DecodeError:
        return "?"
    return err.cls if err is not None else ""


def upstream_error_class(error: msgspec.Raw) -> str:
    """The class of an upstream message's `error` member (decode_upstream), or "" when
    it has none: read where QEMU prints it, never decoding the desc, which may echo
    megabytes of a client's command (README "Security")."""
    if not error:
        return ""
    m = _CLASS_FIRST.match(error)
    if m is not None:
        return m.group(1).decode()
    try:
        return _decode_class(error).cls or "?"
    except msgspec.DecodeError:
        return "?"


class _Named(msgspec.Struct):
    name: str


class _CommandList(msgspec.Struct):
    ret: list[_Named] = msgspec.field(name="return", default_factory=list)


_decode_commands = msgspec.json.Decoder(_CommandList).decode


def command_names(reply: bytes) -> list[str]:
    """The names in a `query-commands` reply (empty if it is anything else)."""
    try:
        return [entry.name for entry in _decode_commands(reply).ret]
    except msgspec.DecodeError:
        return []


def rewrite_reply(line: Line, upstream_id: int | None, wire_id: WireId) -> Reply:
    """Give an upstream reply the client's id back, touching nothing else.

    QEMU writes a reply as `{"return": R, "id": N}` or `{"id": N, "error": E}` (its hash
    order, docs/protocol.md §3.4), so the common case is a splice at a known end; anything
    else (a downstream build adding members, say) takes the general path that rebuilds the
    top-level object. A command sent without an id (`upstream_id` None) has a reply
    without one, `{"return": R}` or `{"error": E}`: the client's id goes where QEMU puts it.
    A long reply is never copied to splice the id in (`_kept`).
    """
    if upstream_id is None:
        return _id_added(line, wire_id)
    n = upstream_id_bytes(upstream_id)
    suffix = b', "id": ' + n + b"}\r\n"
    if line.endswith(suffix):
        end = len(line) - len(suffix)
        if type(line) is bytes and type(wire_id) is bytes and end < SPLICED_FROM:  # the common case
            return line[:end] + b', "id": ' + wire_id + _CLOSING
        if wire_id is None:
            return joined(_kept(line, 0, end), _CLOSING)
        return joined(_kept(line, 0, end), b', "id": ', wire_id, _CLOSING)
    prefix = b'{"id": ' + n + b", "
    if line.startswith(prefix):
        if type(line) is bytes and type(wire_id) is bytes and len(line) < SPLICED_FROM:
            return b'{"id": ' + wire_id + b", " + line[len(prefix) :]
        rest = _kept(line, len(prefix), len(line))
        return joined(b"{", rest) if wire_id is None else joined(b'{"id": ', wire_id, b", ", rest)
    return _rebuilt(line, wire_id)


def _kept(line: Line, start: int, end: int) -> bytes | Spliced:
    """QEMU's reply from `start` to `end`: a slice, or a view of a long one (a reply can
    echo megabytes of a client's command, and a copy costs ~0.5 ms a MiB in one turn)."""
    if type(line) is bytes and end - start < SPLICED_FROM:
        return line[start:end]
    return Spliced((memoryview(line)[start:end],))


_ERROR_OPENING: Final = b'{"error": '
# How QEMU's reply to a command sent without an id opens (§3.4), in its compact layout
# (a downstream build's member may come first: only a message that cannot be read is
# told by its opening).
REPLY_OPENINGS: Final = (SUCCESS_OPENING, _ERROR_OPENING)
_CLOSING: Final = b"}\r\n"


_NUMBERED: Final = re.compile(rb'\{"id": ([0-9]{1,20}), |, "id": ([0-9]{1,20})\}\r\n\Z')


def numbered(line: Line) -> int | None:
    """The upstream id of a reply qmpmux cannot read, where QEMU prints it (§3.4)."""
    m = _NUMBERED.match(line) or _NUMBERED.search(line, max(0, len(line) - 40))
    if m is None:
        return None
    return int(m.group(1) or m.group(2))


def _id_added(line: Line, wire_id: WireId) -> Reply:
    """rewrite_reply for a reply to a command sent without an id: QEMU prints the id
    first before `error` and last after `return` (§3.4). A reply that may hold another
    member (a downstream build's `__RFQDN_` one) is rebuilt to place it exactly."""
    if wire_id is None:
        return line if type(line) is bytes else Spliced((memoryview(line),))
    if line.startswith(SUCCESS_OPENING) and line.endswith(_CLOSING) and b'"__' not in line:
        if type(line) is bytes and type(wire_id) is bytes and len(line) < SPLICED_FROM:
            return b'%b, "id": %b}\r\n' % (line[:-3], wire_id)
        return joined(_kept(line, 0, len(line) - 3), b', "id": ', wire_id, _CLOSING)
    if line.startswith(_ERROR_OPENING):
        if type(line) is bytes and type(wire_id) is bytes and len(line) < SPLICED_FROM:
            return b'{"id": %b, %b' % (wire_id, line[1:])
        return joined(b'{"id": ', wire_id, b", ", _kept(line, 1, len(line)))
    try:
        return _rebuilt(line, wire_id)
    except msgspec.DecodeError:  # QEMU's non-finite numbers: after `return`, as QEMU would
        return joined(_kept(line, 0, len(line) - 3), b', "id": ', wire_id, _CLOSING)


def _rebuilt(line: Line, wire_id: WireId) -> Reply:
    """The reply's members in its order, the id's value the client's; a reply without an
    id gets it where QEMU would have printed it (it adds the id last, qjson.qdict_slot)."""
    items: list[tuple[str, bytes | Spelled]] = [
        (key, bytes(raw)) for key, raw in _decode_members(line).items()
    ]
    keys = [key for key, _value in items]
    if ID in keys:
        at = keys.index(ID)
        if wire_id is None:
            del items[at]
        else:
            items[at] = (ID, wire_id)
    elif wire_id is not None:
        items.insert(qdict_slot(keys, ID), (ID, wire_id))
    parts: list[bytes | Spelled] = []
    for key, value in items:
        parts += (b", " if parts else b"{", encode(key), b": ", value)
    return joined(*(parts or [b"{"]), b"}" + CRLF)


# A token-level rewrite from QEMU's pretty output to its compact form: strings are kept,
# whitespace between tokens dropped, and `, ` / `: ` restored as QEMU's compact writer has them.
_PRETTY_TOKEN: Final = re.compile(rb'"(?:[^"\\]|\\.)*"|[ \t\r\n]+|[,:]')


def _compact_token(m: re.Match[bytes]) -> bytes:
    tok = m.group()
    if tok[0] == 0x22:  # '"'
        return tok
    if tok == b",":
        return b", "
    if tok == b":":
        return b": "
    return b""


def compact_pretty(message: bytes) -> bytes:
    """A `pretty=on` monitor's multi-line message as QEMU's one-line output, CRLF ended."""
    return _PRETTY_TOKEN.sub(_compact_token, message) + CRLF


def _bare(line: Line, brace: bytes) -> bool:
    """Whether `line` is `brace` alone, as a pretty block opens or closes: told without
    stripping (a copy of) a long compact message."""
    return (
        line.startswith(brace)
        and (len(line) < 64 or line[1:2].isspace())
        and (line.rstrip() == brace)
    )


class OversizedMessageError(ValueError):
    """QEMU sent more than `max_message_bytes` without ending a message."""


class UpstreamFramer:
    """Splits QEMU's output into messages: one per CRLF line, or one pretty-printed block.

    A pretty monitor (docs/protocol.md §1.1) opens a message with a line `{` and closes it
    with a line `}` (inner lines are indented), so both layouts are recognised without a
    full JSON parser. Input is scanned once (a long reply arriving in many reads costs
    linear time) and buffering is bounded by `max_message_bytes`; more is a protocol
    failure.
    """

    __slots__ = ("_buf", "_max", "_pretty", "_pretty_size", "_scan")

    def __init__(self, max_message_bytes: int = 256 * 1024 * 1024) -> None:
        self._buf = bytearray()
        self._scan = 0  # where the search for the next newline resumes
        self._pretty: list[bytes] | None = None
        self._pretty_size = 0
        self._max = max_message_bytes

    def feed(self, data: bytes) -> Iterable[Line]:
        """Each complete message, CRLF ended; raise OversizedMessageError if one is too large."""
        if (
            not self._buf
            and self._pretty is None
            and data.startswith(b'{"')  # not a pretty block's `{` line
            and data.find(b"\n") == len(data) - 1
            and data.endswith(CRLF)
        ):
            return (data,)  # one whole compact message: a reply, most often
        return self._lines(data)

    def _lines(self, data: bytes) -> Iterator[Line]:
        buf = self._buf
        buf += data
        start = 0
        while True:
            end = buf.find(b"\n", max(start, self._scan))
            if end < 0:
                break
            line: Line
            if end - start < SPLICED_FROM:
                line = bytes(buf[start : end + 1])
            elif start == 0 and end + 1 == len(buf) and self._pretty is None:
                # A long message ends a read buffer of its own: it is handed over, not
                # copied (a copy costs ~0.5 ms a MiB, all in this turn).
                line = buf
                self._buf = buf = bytearray()
                end = -1  # the next search starts at the new buffer's start
            else:
                with memoryview(buf) as view:
                    line = bytes(view[start : end + 1])
            start = end + 1
            self._scan = start
            if self._pretty is not None:
                self._pretty.append(bytes(line))  # (never handed over: no copy)
                self._pretty_size += len(line)
                if _bare(line, b"}"):
                    block = b"".join(self._pretty)
                    self._pretty = None
                    yield compact_pretty(block)
                elif self._pretty_size > self._max:
                    raise OversizedMessageError("upstream message exceeds the size limit")
            elif _bare(line, b"{"):
                self._pretty = [bytes(line)]
                self._pretty_size = len(line)
            elif not line.isspace():
                yield line if line.endswith(CRLF) else line[:-1] + CRLF
        if start:
            del buf[:start]
            self._scan = 0
        self._scan = len(buf)
        if len(buf) > self._max:
            raise OversizedMessageError("upstream message exceeds the size limit")
