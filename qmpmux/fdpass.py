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

from collections.abc import Mapping
from typing import Final

from qmpmux.fdargs import FD_COMMANDS
from qmpmux.qjson import JsonValue, encode, qdict_order, string_head

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


def upstream_name(client: int, name: str) -> str:
    """The name QEMU knows client `client`'s fd `name` by."""
    return f"qmpmux.{client}.{name}"


def _json_text(text: str) -> bytes:
    return encode(text)[1:-1]  # as QEMU writes it inside a string


def restore_names(reply: bytes, names: dict[str, str]) -> bytes:
    """A reply (an error mentioning a name) with upstream names turned back into the
    client's own (`names`: upstream -> client)."""
    for upstream in sorted(names, key=len, reverse=True):  # `.a` is inside `.ab`
        reply = reply.replace(_json_text(upstream), _json_text(names[upstream]))
    return reply
