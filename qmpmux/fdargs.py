"""Arguments through which QEMU takes a file descriptor, and the numeric-name trap (I/O free).

QEMU resolves most fd arguments with `monitor_fd_param` (monitor/misc.c in 7.2,
monitor/fds.c later; docs/protocol.md §10.7): a value whose first character is a digit is
not looked up among the names this monitor received with `getfd`, it is parsed as a raw
descriptor number of the QEMU process (`qemu_parse_fd`). That reaches every descriptor
QEMU holds: other clients' fds and qmpmux's own upstream socket (a `netdev_add` with
`"fd": "9"` took it over and hung every later command). `getfd` itself refuses names
that start with a digit (monitor/misc.c qmp_getfd), so such a value is never a real name
and refusing it costs no legitimate use. Callers without a current monitor (reconnect
paths) parse every value as a number, so SocketAddress `fd` values are covered too, even
where a monitor only looks up names.

`FD_ARGUMENTS` is the one table of every argument that carries an fd name, from the callers
of `monitor_fd_param`, `monitor_get_fd` and `socket_get_fd` in QEMU's source. Policy
(`policy.py`) refuses a numeric value in any of them for every profile but `full`.

Invariants:
- The table is data; `numeric_fd` is a pure function of (command, arguments).
- Lists are walked wherever they appear along a path, so `fds: ["1"]` is caught as `"1"`.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final, TypeAlias

import msgspec

from qmpmux.qjson import JsonValue, may_hold_pair, string_head


class Kind(enum.Enum):
    NAME = "fd name"  # monitor_fd_param / monitor_get_fd
    NAMES = "colon-separated fd names"  # net/tap.c get_fds, net/af-xdp.c
    SOCKET = "SocketAddress of type fd"  # any nested {"type":"fd","str"} or legacy {"data":{"str"}}
    URI = "fd: URI"  # migration/fd.c, dump/dump.c: "fd:NAME"


@dataclass(frozen=True)
class FdArgument:
    """`command`'s argument at `path` (member names; empty: anywhere) carries an fd."""

    command: str
    path: tuple[str, ...]
    kind: Kind
    source: str  # where QEMU resolves it
    # Only when this argument has one of these values (qom-set names the property).
    when: tuple[str, frozenset[str]] | None = None
    # A colon list (NAMES) whose last colon ends it (tap's get_fds), or starts one more,
    # empty, name (g_strsplit: af-xdp): _listed.
    colon_ends: bool = True


_FD_PROPERTIES: Final = frozenset({"fd", "vhostfd"})

FD_ARGUMENTS: Final[tuple[FdArgument, ...]] = (
    FdArgument("getfd", ("fdname",), Kind.NAME, "monitor/misc.c qmp_getfd"),
    FdArgument("closefd", ("fdname",), Kind.NAME, "monitor/misc.c qmp_closefd"),
    FdArgument("add_client", ("fdname",), Kind.NAME, "monitor/qmp-cmds.c qmp_add_client"),
    FdArgument("netdev_add", ("fd",), Kind.NAME, "net/tap.c, net/socket.c net_init_*"),
    FdArgument("netdev_add", ("fds",), Kind.NAMES, "net/tap.c get_fds"),
    FdArgument("netdev_add", ("vhostfd",), Kind.NAME, "net/tap.c, net/vhost-vdpa.c"),
    FdArgument("netdev_add", ("vhostfds",), Kind.NAMES, "net/tap.c get_fds"),
    FdArgument("netdev_add", ("sock-fds",), Kind.NAMES, "net/af-xdp.c (QEMU 8.2+)",
               colon_ends=False),
    FdArgument("netdev_add", (), Kind.SOCKET, "net/stream.c, net/dgram.c addr/local/remote"),
    FdArgument("device_add", ("fd",), Kind.NAME, "hw/remote/proxy.c; hw/vfio/pci.c (10.0)"),
    FdArgument("device_add", ("vhostfd",), Kind.NAME, "hw/scsi/vhost-scsi.c, vhost-vsock.c"),
    FdArgument("device_add", ("ebpf-rss-fds",), Kind.NAME, "hw/net/virtio-net.c (QEMU 9.0+)"),
    FdArgument("object-add", ("fd",), Kind.NAME, "hw/remote/remote-obj.c; backends/iommufd.c"),
    FdArgument("object-add", (), Kind.SOCKET, "hw/remote/vfio-user-obj.c socket"),
    FdArgument("qom-set", ("value",), Kind.NAME, "property setters of the above",
               when=("property", _FD_PROPERTIES)),
    FdArgument("qom-set", ("value",), Kind.SOCKET, "hw/remote/vfio-user-obj.c socket"),
    FdArgument("chardev-add", (), Kind.SOCKET, "chardev/char-socket.c, char-udp.c"),
    FdArgument("chardev-change", (), Kind.SOCKET, "chardev/char-socket.c, char-udp.c"),
    FdArgument("nbd-server-start", (), Kind.SOCKET, "blockdev-nbd.c nbd_server_start"),
    FdArgument("blockdev-add", (), Kind.SOCKET, "block/nbd.c server (also nested nodes)"),
    FdArgument("blockdev-reopen", (), Kind.SOCKET, "block/nbd.c server"),
    FdArgument("block-export-add", (), Kind.SOCKET, "block/export/vhost-user-blk-server.c"),
    FdArgument("migrate", ("uri",), Kind.URI, "migration/fd.c fd_start_outgoing_migration"),
    FdArgument("migrate", ("channels",), Kind.SOCKET, "migration/socket.c (QEMU 8.2+)"),
    FdArgument("migrate-incoming", ("uri",), Kind.URI, "migration/fd.c (monitor_fd_param)"),
    FdArgument("migrate-incoming", ("channels",), Kind.SOCKET, "migration/socket.c (8.2+)"),
    FdArgument("migrate-recover", ("uri",), Kind.URI, "migration/migration.c incoming"),
    FdArgument("dump-guest-memory", ("protocol",), Kind.URI, "dump/dump.c qmp_dump_guest_memory"),
)  # fmt: skip

_BY_COMMAND: Final[Mapping[str, tuple[FdArgument, ...]]] = {
    name: tuple(row for row in FD_ARGUMENTS if row.command == name)
    for name in {row.command for row in FD_ARGUMENTS}
}
FD_COMMANDS: Final = frozenset(_BY_COMMAND)


def is_numeric(value: str) -> bool:
    """QEMU's own test (`qemu_isdigit(fdname[0])`): a leading ASCII digit means a number."""
    return value[:1].isascii() and value[:1].isdigit()


def _at(value: JsonValue, path: tuple[str, ...]) -> Iterator[JsonValue]:
    """Every value at `path`, walking lists along the way."""
    if isinstance(value, list):
        for item in value:
            if path or isinstance(item, list):
                yield from _at(item, path)
            else:
                yield item  # (a generator less for each of a list of a million names)
    elif not path:
        yield value
    elif isinstance(value, dict) and path[0] in value:
        yield from _at(value[path[0]], path[1:])


# A SocketAddress of type fd, as msgspec writes it in compact JSON. A string's own quotes
# are escaped there, so a value whose text lacks this holds no such address (a key
# ending in `"type` may show it falsely: then the walk below decides).
_SOCKET_TEXT: Final = b'"type":"fd"'
# Where a value is inside the arguments: its parent's place and its key or index.
_Place: TypeAlias = "tuple[_Place | None, str | int]"


def _holds_socket(value: JsonValue) -> bool:
    """Whether `value` may hold a SocketAddress of type fd (a dict whose `type` is "fd").

    The first _LOOKED_AT values are looked at in Python, so that a few members, one of
    them megabytes of string (a colon list of fd names), cost microseconds. Past them,
    each container left is told in C by its JSON text, some 10 ns a value against ~1 us
    for the walk that finds them (500,000 values: 0.25-0.45 s), in runs of _RUN members,
    one C call each (a list of 262,144 names at once: 24 ms)."""
    if not isinstance(value, list | dict):
        return False
    stack: list[list[JsonValue] | dict[str, JsonValue]] = [value]
    budget = _LOOKED_AT
    while stack:
        top = stack.pop()
        if isinstance(top, dict) and top.get("type") == "fd":
            return True
        members = list(top.values()) if isinstance(top, dict) else top
        if len(members) > budget:
            return any(map(_told_in_c, [members, *stack]))
        budget -= len(members)
        stack += (member for member in members if isinstance(member, list | dict))
    return False


def _told_in_c(members: list[JsonValue] | dict[str, JsonValue]) -> bool:
    """Whether a container holds `"type":"fd"`, its members told in C a run at a time:
    strings are left out (an escaped quote never matches), and a member that is itself
    a container of more than a run is told on its own, in runs."""
    stack = [members]
    try:
        while stack:
            top = stack.pop()
            if isinstance(top, dict) and top.get("type") == "fd":
                return True
            values = list(top.values()) if isinstance(top, dict) else top
            for start in range(0, len(values), _RUN):
                run: list[JsonValue] = []
                for member in values[start : start + _RUN]:
                    if isinstance(member, list | dict):
                        (stack if len(member) > _RUN else run).append(member)
                if run and _SOCKET_TEXT in msgspec.json.encode(run):
                    return True
    except (TypeError, OverflowError, RecursionError):  # (never for what QEMU parses: 1024
        return True  # levels at most; then walk)
    return False


_LOOKED_AT: Final = 1024
_RUN: Final = 4096


def _spelled(place: _Place) -> str:
    """`where.key[3].str` of a place."""
    steps: list[str] = []
    at: _Place | None = place
    while at is not None:
        at, step = at
        steps.append(f"[{step}]" if type(step) is int else f".{step}" if at else str(step))
    return "".join(reversed(steps))


def _sockets(value: JsonValue, where: str) -> Iterator[tuple[str, str]]:
    """(path, `str`) of every SocketAddress of type fd in `value`, flat or legacy (`data`).

    Iterative: a client may nest up to QEMU's 1024 levels, deeper than Python recursion.
    Only containers are walked, a member at a time (a list of the members of a container
    of megabytes, made at once, held the interpreter for ms to build and to free), and a
    place is spelled only for what is found."""
    if not _holds_socket(value):
        return
    root: tuple[str | int, JsonValue] = (where, value)
    stack: list[tuple[Iterator[tuple[str | int, JsonValue]], _Place | None]] = [
        (iter((root,)), None)
    ]
    while stack:
        members, parent = stack[-1]
        for member in members:
            if isinstance(member[1], list | dict):
                break
        else:
            stack.pop()
            continue
        step, item = member
        place: _Place = (parent, step)
        if isinstance(item, list):
            stack.append((enumerate(item), place))
        elif isinstance(item, dict):
            if item.get("type") == "fd":
                fd, data = item.get("str"), item.get("data")
                if isinstance(fd, str):
                    yield f"{_spelled(place)}.str", fd
                elif isinstance(data, dict) and isinstance(data.get("str"), str):
                    yield f"{_spelled(place)}.data.str", str(data["str"])
            stack.append((iter(item.items()), place))


def _names(row: FdArgument, value: JsonValue, where: str) -> Iterator[tuple[str, str]]:
    if row.kind is Kind.SOCKET:
        yield from _sockets(value, where)
    elif isinstance(value, str):  # (a colon list is read in C: _listed_numeric)
        if row.kind is Kind.NAME:
            yield where, value
        elif row.kind is Kind.URI and value.startswith("fd:"):
            yield where, value[len("fd:") :]


def _rows(command: str, args: Mapping[str, JsonValue] | None) -> Iterator[FdArgument]:
    """The table's rows that apply to this call of `command`."""
    for row in _BY_COMMAND.get(command, ()) if args else ():
        if row.when is not None:
            key, values = row.when
            # (a short name: no more of a client's string is read than it could match)
            selector = string_head(args, key, max(map(len, values)) + 1) if args else None
            if selector not in values:
                continue
        yield row


# What numeric_fd reads of a name QEMU takes whole: QEMU tests its first character,
# errors quote 32, and a URI's name comes after `fd:`.
_NAME_HEAD: Final = 3 + 32


def _read(
    args: Mapping[str, JsonValue], path: tuple[str, ...], sockets: bool = False
) -> Iterator[JsonValue]:
    """_at of the arguments, reading only the member a path starts at: arguments of
    megabytes are built a member at a time (qjson.DeferredObject). All of them (socket
    addresses may be anywhere) has of each string member only what a check reads. A
    search for `sockets` builds no member that holds none (qjson.may_hold_pair)."""
    if not path:
        whole: dict[str, JsonValue] = {}
        for key in args:
            head = string_head(args, key, _NAME_HEAD)
            if head is not None:
                whole[key] = head
            elif (
                not sockets
                or may_hold_pair(args, key, "type", "fd")
                or (key == "data" and string_head(args, "type", 3) == "fd")
            ):
                whole[key] = args[key]  # (`data`: the arguments are a legacy address)
        return _at(whole, path)
    if path[0] not in args or (sockets and not may_hold_pair(args, path[0], "type", "fd")):
        return iter(())
    return _at(args[path[0]], path[1:])


# A colon list is searched, and renamed (_Renamer.listed), in C: a million names handled
# one by one held the loop for seconds. These find, after a colon, a numeric name (a
# leading ASCII digit: is_numeric) with what an error quotes of it, and a name that is
# not numeric (an empty one too). Both scan for the colon first: a pattern that may
# match anywhere tries every position, 20 ns a character.
_NUMERIC_LISTED: Final = re.compile(r":[0-9][^:]{0,31}")
_NAME_LISTED: Final = re.compile(r":(?![0-9])")
# The names of a colon list recorded for restore_names: QEMU's tap reads no more
# (MAX_TAP_QUEUES in net/tap.c), so none of its errors quotes a later one (af-xdp's
# `sock-fds`, 8.2+, reads them all: an error about a later one shows its upstream name).
_LISTED_RECORDED: Final = 1024


def numeric_fd(command: str, args: Mapping[str, JsonValue] | None) -> tuple[str, str] | None:
    """(argument, value) of the first fd argument QEMU would read as a raw number, or None
    (a value of it cut to the 32 characters an error quotes)."""
    for row in _rows(command, args):
        assert args is not None
        head = None
        if len(row.path) == 1 and row.kind in (Kind.NAME, Kind.URI):
            head = string_head(args, row.path[0], _NAME_HEAD)  # never megabytes of it
        # (a name may also come in a list: read whole then)
        sockets = row.kind is Kind.SOCKET
        values: Iterable[JsonValue] = (
            (head,) if head is not None else _read(args, row.path, sockets)
        )
        where = ".".join(row.path)
        for value in values:
            if row.kind is Kind.NAMES:
                found = _listed_numeric(value) if isinstance(value, str) else None
                if found is not None:
                    return where, found
                continue
            for at, name in _names(row, value, where):
                if is_numeric(name):
                    return at.lstrip("."), name
    return None


def _rename_sockets(value: JsonValue, rename: _Renamer) -> JsonValue:
    """A copy of `value` with every SocketAddress of type fd renamed (flat or legacy);
    `value` itself if it holds none (_holds_socket, asked once: nothing copied)."""
    return _renamed_sockets(value, rename) if _holds_socket(value) else value


def _renamed_sockets(value: JsonValue, rename: _Renamer) -> JsonValue:
    if isinstance(value, list):
        return [_renamed_sockets(item, rename) for item in value]
    if not isinstance(value, dict):
        return value
    out = {key: _renamed_sockets(member, rename) for key, member in value.items()}
    if value.get("type") == "fd":
        fd, data = out.get("str"), out.get("data")
        if isinstance(fd, str):
            out["str"] = rename(fd)
        elif isinstance(data, dict) and isinstance(data.get("str"), str):
            out["data"] = {**data, "str": rename(str(data["str"]))}
    return out


class NameRecord(dict[str, str]):
    """Upstream names -> the client's own, for fdpass.restore_names, with what it needs to
    read a reply for them by where `prefix` occurs rather than name by name (a command
    may hold 500,000 names): the lengths the upstream names have."""

    __slots__ = ("lengths", "prefix")

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix
        self.lengths: set[int] = set()

    def add(self, upstream: str, name: str) -> None:
        self[upstream] = name
        self.lengths.add(len(upstream))


class RenamedTooLongError(Exception):
    """The names renamed would make the command longer than the room it has."""


class _Renamer:
    """Upstream names (`prefix` + the client's), and a record of them for restore_names:
    upstream -> the client's own. Each name renamed adds `prefix` (ASCII, so as many
    bytes encoded): past `room` bytes added, RenamedTooLongError, raised before a colon
    list of millions of names is renamed."""

    __slots__ = ("long", "names", "prefix", "room")

    def __init__(self, prefix: str, room: int, long: dict[str, list[str]] | None) -> None:
        assert prefix.isascii()
        self.prefix = prefix
        self.room = room
        self.names = NameRecord(prefix)
        # Where a long colon list, renamed, is kept in its pieces (see rename_fds).
        self.long = long

    def __call__(self, name: str) -> str:
        """A name renamed, unless it is numeric (a raw descriptor number, which only
        `full` may use: it is not a name)."""
        if is_numeric(name):
            return name
        self._add(1)
        upstream = self.prefix + name
        self.names.add(upstream, name)
        return upstream

    def _add(self, names: int) -> None:
        self.room -= names * len(self.prefix)
        if self.room < 0:
            raise RenamedTooLongError

    def listed(self, value: str, colon_ends: bool) -> str:
        """A colon list with every name in it renamed (an empty one too), in C; a colon
        that ends it stays as it is (_listed)."""
        if ":" not in value:  # one name, or none (a list of many such strings: quick)
            return self(value) if value else value
        body, end = _listed(value, colon_ends)
        if body is None:
            return value
        pieces = _cut(body)  # (each C call below on a piece: 8 MiB counted at once, 3 ms)
        names = sum(piece.count(":") for piece in pieces) + 1
        if names * len(self.prefix) > self.room:  # numeric ones are not renamed: count
            numeric = sum(1 for piece in pieces for _ in _NUMERIC_LISTED.finditer(piece))
            names -= numeric + is_numeric(body)
        self._add(names)
        for name in _first_names(pieces, _LISTED_RECORDED):
            if not is_numeric(name):
                self.names.add(self.prefix + name, name)
        head = "" if is_numeric(body) else self.prefix
        if not any(_NUMERIC_LISTED.search(piece) for piece in pieces):  # (20 ms a million)
            renamed = [piece.replace(":", ":" + self.prefix) for piece in pieces]
        else:
            colon = ":" + self.prefix.replace("\\", "\\\\")
            renamed = [_NAME_LISTED.sub(colon, piece) for piece in pieces]
        if self.long is None or len(value) < _KEPT_FROM:
            return "".join([head, *renamed, end])
        stand_in = f"{_STAND_IN}{len(self.long)}\ufdd0"
        self.long[stand_in] = [head, *renamed, end]
        return stand_in


# Characters of a colon list searched or renamed in one C call: a list of megabytes is
# worked on in pieces, so a judging thread holds the interpreter a piece at a time.
_PIECE: Final = 1 << 16
# What stands for a long colon list renamed, until it is written in its pieces: text
# around a noncharacter, which no string QEMU's parser (and so qmpmux's) takes holds
# (docs/protocol.md §2.3), so no client's string can be taken for one.
_STAND_IN: Final = "\ufdd0qmpmux-"
# A colon list renamed at least this long is kept in its pieces (a list of lists of
# names, each shorter than a piece, would otherwise be encoded at once).
_KEPT_FROM: Final = 1 << 16


def _cut(body: str) -> list[str]:
    """`body` in pieces of about _PIECE characters, each cut just before a colon: a
    name is never parted from the colon before it, nor from what follows it, so the
    patterns above (a colon and what follows up to the next) match each piece as they
    match the whole."""
    pieces = []
    start = 0
    while len(body) - start > _PIECE:
        cut = body.find(":", start + _PIECE)
        if cut < 0:
            break
        pieces.append(body[start:cut])
        start = cut
    pieces.append(body[start:])
    return pieces


def _first_names(pieces: list[str], n: int) -> list[str]:
    """The first `n` names of a colon list cut into `pieces` (_cut: each after the first
    starts with the colon before its first name), split a piece at a time."""
    names: list[str] = []
    for i, piece in enumerate(pieces):
        want = n - len(names)
        split = (piece[1:] if i else piece).split(":", want)
        names += split[:want]
        if len(split) > want:
            break
    return names


def _listed_numeric(value: str) -> str | None:
    """A colon list's first numeric name, cut to what an error quotes, or None."""
    if is_numeric(value):
        return value[:32].split(":", 1)[0]
    if ":" not in value:
        return None
    for piece in _cut(value):  # (a list of megabytes: 20 ms in one C call)
        found = _NUMERIC_LISTED.search(piece)
        if found is not None:
            return found.group()[1:]
    return None


def _listed_named(value: str, colon_ends: bool) -> bool:
    """Whether a colon list holds a name that is not numeric (an empty one too)."""
    body, _end = _listed(value, colon_ends)
    if body is None or not is_numeric(body):
        return body is not None
    return any(_NAME_LISTED.search(piece) for piece in _cut(body))  # (88 ms for 16 MiB)


def _listed(value: str, colon_ends: bool) -> tuple[str | None, str]:
    """A colon list's names as QEMU reads them (docs/protocol.md §10.7), and what ends
    it: `""` holds no name (None), and each colon parts two names, but for a colon at
    the end of a tap's list (net/tap.c get_fds: `"a:"` is one name, `":"` one empty
    name), where af-xdp's `g_strsplit` reads one more, empty, name."""
    if not value:
        return None, ""
    if colon_ends and value.endswith(":"):
        return value[:-1], ":"
    return value, ""


def _rename_value(row: FdArgument, value: JsonValue, rename: _Renamer) -> JsonValue:
    if row.kind is Kind.SOCKET:
        return _rename_sockets(value, rename)
    if isinstance(value, list):
        return [_rename_value(row, item, rename) for item in value]
    if not isinstance(value, str):
        return value
    if row.kind is Kind.NAME:
        return rename(value)
    if row.kind is Kind.NAMES:
        return rename.listed(value, row.colon_ends)
    return "fd:" + rename(value[len("fd:") :]) if value.startswith("fd:") else value


def _rename_at(
    value: JsonValue, path: tuple[str, ...], row: FdArgument, rename: _Renamer
) -> JsonValue:
    if isinstance(value, list):
        return [_rename_at(item, path, row, rename) for item in value]
    if not path:
        return _rename_value(row, value, rename)
    if isinstance(value, dict) and path[0] in value:
        return {**value, path[0]: _rename_at(value[path[0]], path[1:], row, rename)}
    return value


def _names_any(command: str, args: Mapping[str, JsonValue]) -> bool:
    """Whether any fd argument of this call holds a name (numeric ones are not names),
    read as numeric_fd reads them: a command without one is never built whole."""
    for row in _rows(command, args):
        where = ".".join(row.path)
        for value in _read(args, row.path, row.kind is Kind.SOCKET):
            if row.kind is Kind.NAMES:
                if isinstance(value, str) and _listed_named(value, row.colon_ends):
                    return True
                continue
            if any(not is_numeric(name) for _at, name in _names(row, value, where)):
                return True
    return False


def rename_fds(
    command: str,
    args: Mapping[str, JsonValue] | None,
    prefix: str,
    room: int,
    long: dict[str, list[str]] | None = None,
) -> tuple[dict[str, JsonValue], NameRecord] | None:
    """A copy of `args` with every fd name in it prefixed with `prefix`, and the names
    renamed (upstream -> the client's own); None when no argument holds a name.
    Numeric values (raw descriptor numbers, which only `full` may use) are left as they
    are: they are not names. RenamedTooLongError if the names would grow by more than
    `room` bytes.

    Given `long`, a colon list of _KEPT_FROM characters or more is renamed and never
    joined: a stand-in string takes its place in the copy, and `long` maps it to the
    pieces, for wire.command_prefix to write them one by one (joining and then encoding
    the tens of MiB a list of millions of names becomes takes ~20 ms each, in one C
    call)."""
    if command not in _BY_COMMAND or not args or not _names_any(command, args):
        return None
    rename = _Renamer(prefix, room, long)
    out: JsonValue = dict(args)
    for row in _rows(command, args):
        out = _rename_at(out, row.path, row, rename)
    assert isinstance(out, dict)
    return out, rename.names
