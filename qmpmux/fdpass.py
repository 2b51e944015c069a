"""File descriptors clients pass with SCM_RIGHTS, made safe to share one monitor (I/O free).

QEMU keeps the fds of a connection's most recent fd-carrying read waiting; `getfd` and
`add-fd` take the first of them (closing the rest), any later fd-carrying read closes and
replaces waiting ones, and named fds (`getfd`) live in the monitor, one namespace for
everything that talks on it (docs/protocol.md §10.7). Through qmpmux every client shares one
monitor, so:

- each client's waiting fds are its own (held here, in the hub), and an fd goes upstream
  only inside the `sendmsg` of the command that takes it;
- only well-formed `getfd`/`add-fd` commands that have an fd go upstream, so a command
  QEMU rejects before taking its fd never leaves one waiting for another client's command:
  QEMU's own argument errors and "No file descriptor supplied" are answered here;
- fd names are rewritten per client (`tap0` of client 7 is `qmpmux.7.tap0` in QEMU) in
  every argument that takes one (`fdargs.FD_ARGUMENTS`), and back in QEMU's errors.

Invariants:
- Every checker here mirrors QEMU's visitor (qapi/qobject-input-visitor.c): the declared
  members in order, then the first unexpected one in QDict order.
- `upstream_name` never starts with a digit and never equals another client's name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import msgspec

from qmpmux.fdargs import FD_COMMANDS, NameRecord, RenamedTooLongError, is_numeric, rename_fds
from qmpmux.qjson import JsonValue, encode, qdict_order, string_head
from qmpmux.session import MAX_UPSTREAM_BYTES
from qmpmux.wire import CommandText, command_prefix

GETFD: Final = "getfd"
ADD_FD: Final = "add-fd"
CLOSEFD: Final = "closefd"
REMOVE_FD: Final = "remove-fd"
QUERY_FDSETS: Final = "query-fdsets"
TAKES_FD: Final = frozenset({GETFD, ADD_FD})
# Commands the hub must look at for fds: they take one, name one, or act on fdsets.
FD_RELATED: Final = FD_COMMANDS | TAKES_FD | {REMOVE_FD}
NO_FD: Final = "No file descriptor supplied via SCM_RIGHTS"
DIGIT_NAME: Final = "Parameter 'fdname' expects a name not starting with a digit"
_INT64: Final = range(-(2**63), 2**63)


def _type_error(member: str, expected: str) -> str:
    return f"Invalid parameter type for '{member}', expected: {expected}"


def _unexpected(args: Mapping[str, JsonValue], known: frozenset[str]) -> str | None:
    extra = [key for key in qdict_order(args) if key not in known]
    return f"Parameter '{extra[0]}' is unexpected" if extra else None


def argument_error(name: str, args: Mapping[str, JsonValue] | None) -> str | None:
    """QEMU's error for the arguments of `getfd` or `add-fd` before it runs the command
    (so before it takes an fd), or None when they are well formed."""
    args = args or {}
    if name == GETFD:
        if "fdname" not in args:
            return "Parameter 'fdname' is missing"
        if string_head(args, "fdname", 0) is None:  # (not a string: none is built)
            return _type_error("fdname", "string")
        return _unexpected(args, frozenset({"fdname"}))
    fdset = args.get("fdset-id", 0)
    if "fdset-id" in args and (type(fdset) is not int or fdset not in _INT64):
        return _type_error("fdset-id", "integer")
    if "opaque" in args and not isinstance(args["opaque"], str):
        return _type_error("opaque", "string")
    return _unexpected(args, frozenset({"fdset-id", "opaque"}))


@dataclass(slots=True)
class FdFacts:
    """What a command's arguments say for its fd work, read by `fd_facts` apart from the
    hub's state (for a big command, off the event loop: judgement.py); the hub then adds
    what only it knows (whose fdsets are whose) in `Hub._with_fds`."""

    # QEMU's reply text when the command cannot go: its arguments, no fd, a digit name.
    problem: str | None = None
    # `getfd` of a name that starts with a digit: QEMU would take the fd and close it.
    digit: bool = False
    # `add-fd`/`remove-fd`: the fdset and fd they name, when integers.
    fdset: int | None = None
    fd: int | None = None
    # `getfd`'s name, kept to close it in QEMU when the client leaves.
    fdname: str | None = None
    # The command with its fd names renamed (upstream -> the client's names), if any.
    prefix: CommandText | None = None
    names: dict[str, str] | None = None
    # Renamed, it would pass QEMU's size limit.
    too_long: bool = False


def fd_facts(
    name: str,
    oob: bool,
    args: Mapping[str, JsonValue] | None,
    has_fds: bool,
    client: int,
    size: int,
    read: list[object] | None = None,
) -> FdFacts:
    """The facts of a command in FD_RELATED from client `client` (`has_fds`: whether it
    has fds waiting), whose upstream text is `size` bytes long. The names are renamed
    only when no problem stops it first; the renamed arguments are dropped once encoded,
    or handed to `read` if given (judgement.judge)."""
    facts = FdFacts()
    takes_fd = name in TAKES_FD and not oob  # exec-oob: QEMU refuses it without one
    if takes_fd:
        problem = argument_error(name, args)
        if problem is None and not has_fds:
            problem = NO_FD
        if (
            problem is None
            and name == GETFD
            and args
            and is_numeric(string_head(args, "fdname", 1) or "")  # (never built whole)
        ):
            problem, facts.digit = DIGIT_NAME, True
        facts.problem = problem
    if args and (name == REMOVE_FD or (takes_fd and name == ADD_FD)):
        fdset, fd = args.get("fdset-id"), args.get("fd")
        facts.fdset = fdset if type(fdset) is int else None
        facts.fd = fd if type(fd) is int else None
    if facts.problem is not None:
        return facts
    # Each name renamed is some ten bytes longer: a colon list of millions of them can
    # pass QEMU's limit, as the client's text never does. QEMU's own error then, told
    # before the names are renamed where it can be.
    try:
        long: dict[str, list[str]] = {}  # (long colon lists, kept in their pieces)
        room = MAX_UPSTREAM_BYTES - size
        renamed = rename_fds(name, args, upstream_name(client, ""), room, long)
        if renamed is not None:
            facts.prefix = command_prefix(name, renamed[0], oob, long=long)
            facts.names = renamed[1]
            if read is not None:
                read.append(renamed[0])
            if len(facts.prefix) > MAX_UPSTREAM_BYTES:
                raise RenamedTooLongError
    except RenamedTooLongError:
        facts.too_long = True
    if takes_fd and name == GETFD and args:
        facts.fdname = str(args["fdname"])
    return facts


def upstream_name(client: int, name: str) -> str:
    """The name QEMU knows client `client`'s fd `name` by."""
    return f"qmpmux.{client}.{name}"


def _json_text(text: str) -> bytes:
    return encode(text)[1:-1]  # as QEMU writes it inside a string


def restore_names(reply: bytes, names: dict[str, str]) -> bytes:
    """A reply (an error mentioning a name) with upstream names turned back into the
    client's own (`names`: upstream -> client). A few are put back name by name; more
    (a NameRecord) where qmpmux's prefix occurs in the reply, the longest name there
    first: name by name, 250,000 names held the loop 275 ms for a one-line error."""
    if not isinstance(names, NameRecord) or len(names) <= _BY_NAME:
        for upstream in sorted(names, key=len, reverse=True):  # `.a` is inside `.ab`
            if len(upstream) <= _LONGEST:  # (8 MiB of name: 89 ms on the loop)
                reply = reply.replace(_json_text(upstream), _json_text(names[upstream]))
        return reply
    sizes = sorted((size for size in names.lengths if size <= _LONGEST), reverse=True)
    mark = names.prefix.encode("ascii")
    parts: list[bytes] = []
    done = 0  # where the reply is taken as it is from
    budget = _READ_AT_MOST
    at = reply.find(mark)
    for _ in range(_PLACES):
        if at < 0 or budget <= 0 or not sizes:
            break
        found, work = _named_at(reply, at, sizes, names, budget)
        budget -= work
        if found is not None:
            size, client = found
            parts += (reply[done:at], _json_text(client))
            done = at + size
        at = reply.find(mark, max(done, at + 1))
    parts.append(reply[done:])
    return b"".join(parts)


# A command of more names than this has them put back where its prefix occurs in a
# reply (restore_names): at most _PLACES of them, reading about _READ_AT_MOST bytes in
# all (~1 ms); QEMU's errors quote a name or two, and one further on stays as QEMU
# knows it. So does a name of more than _LONGEST characters, in any command: putting
# back one of 8 MiB held the loop 89 ms.
_BY_NAME: Final = 64
_PLACES: Final = 16
_READ_AT_MOST: Final = 1 << 20
_LONGEST: Final = 1 << 12


def _named_at(
    reply: bytes, at: int, sizes: list[int], names: Mapping[str, str], budget: int
) -> tuple[tuple[int, str] | None, int]:
    """(length of its text, the client's name) of the longest upstream name whose text,
    as QEMU writes it, starts at `at` (or None), and the bytes read to find it: what a
    name of the longest size could take of the JSON string there is decoded once, and
    its prefixes of each size looked up, longest first, until `budget` is spent."""
    # (a character takes 12 bytes at most, as a surrogate pair's two escapes)
    found = _STRING_REST.match(reply, at, min(len(reply), at + 12 * sizes[0] + 12))
    assert found is not None  # (it matches the empty string too)
    text = found.group()
    decoded, passes = _decoded(text)
    work = (1 + passes) * len(text)
    if decoded is None:
        return None, work
    for size in sizes:
        if size > len(decoded):
            continue
        if work > budget:
            break
        work += size
        client = names.get(decoded[:size])
        if client is not None:
            upstream = _json_text(decoded[:size])
            if reply.startswith(upstream, at):
                return (len(upstream), client), work
    return None, work


# The text of a JSON string up to its closing quote (one no backslash escapes), told in C.
_STRING_REST: Final = re.compile(rb'(?:[^"\\]|\\.)*+', re.DOTALL)


def _decoded(text: bytes) -> tuple[str | None, int]:
    """The characters of the text of a JSON string, or of its start (one cut inside an
    escape, or a surrogate pair's, loses what the cut leaves incomplete), and the passes
    over `text` it took."""
    if text.isascii() and b"\\" not in text:
        return text.decode("ascii"), 1  # as QEMU writes a plain name: no escape in it
    for passes in range(1, 4):
        try:
            return str(msgspec.json.decode(b'"' + text + b'"')), passes
        except msgspec.DecodeError:
            cut = text.rfind(b"\\")
            if cut < 0:
                return None, passes
            text = text[:cut]
    return None, 3
