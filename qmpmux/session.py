"""One client's QMP session, run exactly as QEMU runs a monitor connection (I/O free).

A session starts in negotiation mode, where only `qmp_capabilities` exists, and moves to
command mode when that succeeds (docs/protocol.md §5). Each complete input value is
judged here in QEMU's own order (monitor/qmp.c handle_qmp_command, then
qapi/qmp-dispatch.c): parse errors and non-objects, the object's members walked in QDict
hash order, then the command. After negotiation the client's policy profile decides
(`policy.py`). The verdict is a reply qmpmux writes itself, a `Command` for QEMU, or an
`Extension` (one of qmpmux's own `__org.qmpmux_` commands) for the hub to answer.

Invariants:
- `qmp_capabilities` is always answered here and never reaches QEMU.
- A command the profile denies never becomes a `Command`: it is answered here.
- Nothing is forwarded before negotiation; `exec-oob` only when this client enabled `oob`.
- Replies keep QEMU's order: a client without `oob` gets everything in input order
  (QEMU reads such a monitor one command at a time); a client with `oob` has two ordered
  streams, in-band and out-of-band, the latter overtaking the former.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import msgspec

from qmpmux.policy import DEFAULT_POLICY, FULL, QMPMUX_PREFIX, Decision, Profile
from qmpmux.qjson import (
    CText,
    Deferred,
    DeferredObject,
    Framer,
    JsonValue,
    LongString,
    Message,
    ParseError,
    qdict_order,
)
from qmpmux.spelled import Buffer
from qmpmux.wire import (
    ARGUMENTS,
    CAP_OOB,
    COMMAND_NOT_FOUND,
    EXEC_OOB,
    EXECUTE,
    GENERIC_ERROR,
    ID,
    NO_ID,
    QMP_CAPABILITIES,
    CommandText,
    Reply,
    WireId,
    command_prefix,
    decode_prefix,
    encode_id,
    error_reply,
    return_reply,
)

KNOWN_CAPABILITIES: Final = frozenset({CAP_OOB})  # QMPCapability in qapi/control.json
# QEMU's MAX_TOKEN_SIZE (qobject/json-streamer.c), less room for qmpmux's `,"id":N}`.
MAX_UPSTREAM_BYTES: Final = 64 * 1024 * 1024 - 64
# QEMU's error for input past that limit (it has no id: QEMU never parsed the command).
TOO_BIG_UPSTREAM: Final = "JSON token size limit exceeded"
_PLAIN_KEYS: Final = frozenset({EXECUTE, ARGUMENTS, ID})


# Input past QEMU's token limit is read token by token, each an error of its own: the
# replies to those are the same few texts over and over (README "Security").
_NOT_AN_OBJECT: Final = error_reply(None, GENERIC_ERROR, "QMP input must be a JSON object")


@functools.lru_cache(maxsize=64)
def _short_parse_error(desc: str) -> Reply:
    return error_reply(None, GENERIC_ERROR, desc)


def _parse_error_reply(desc: str | CText) -> Reply:
    if type(desc) is str and len(desc) <= 64:
        return _short_parse_error(desc)
    return error_reply(None, GENERIC_ERROR, desc)


class Phase(enum.Enum):
    NEGOTIATING = "negotiating"
    COMMAND = "command"


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is on the other end, as far as the transport can tell."""

    listener: str
    profile: str = "full"
    uid: int | None = None
    gid: int | None = None
    pid: int | None = None
    address: str = ""
    exe: str | None = None


# Arguments as the audit log records them: none, the arguments, or (an int) only their
# size: redacting and encoding a megabyte of them would hold the loop tens of ms.
Audited = dict[str, JsonValue] | int | None
# Arguments up to this much client text are recorded whole.
AUDITED_ARGUMENTS_MAX: Final = 64 * 1024


def _audited(
    profile: Profile, args: Mapping[str, JsonValue] | None, text: Buffer | CommandText | None
) -> Audited:
    """What the audit log records of `args`, whose client text is `text` (None when the
    message was decoded whole: its compact encoding, at C speed, stands in)."""
    if not profile.audit_arguments or args is None:
        return None
    if isinstance(args, DeferredObject):
        assert text is not None, "deferred arguments come with their text"
        return len(text) if len(text) > AUDITED_ARGUMENTS_MAX else args.members()
    assert isinstance(args, dict)
    size = len(text if text is not None else msgspec.json.encode(args))
    return size if size > AUDITED_ARGUMENTS_MAX else args


@dataclass(slots=True)
class Local:
    """A reply qmpmux makes itself; `oob` when it belongs to the out-of-band stream.

    `name` and `decision` are set when it answers a command (for the audit log)."""

    data: Reply
    oob: bool = False
    name: str | LongString | None = None
    decision: Decision | None = None
    arguments: Audited = None


@dataclass(slots=True)
class Extension:
    """One of qmpmux's own commands, answered by the hub (it needs the hub's state)."""

    name: str
    wire_id: WireId
    oob: bool
    decision: Decision
    arguments: Audited  # for the audit log
    given: dict[str, JsonValue] | None = None  # what the client passed


class Command:
    """A client command bound for QEMU; `reply` is filled when QEMU answers."""

    __slots__ = (
        "args",
        "arguments",
        "decision",
        "fds",
        "issued",
        "name",
        "names",
        "oob",
        "prefix",
        "profile",
        "reply",
        "session",
        "started",
        "wire_id",
    )

    def __init__(
        self,
        session: Session,
        name: str,
        prefix: CommandText,
        wire_id: WireId,
        oob: bool,
        decision: Decision = Decision.ALLOW,
        arguments: Audited = None,
        args: Mapping[str, JsonValue] | None = None,
    ) -> None:
        self.session = session
        self.name = name
        self.prefix = prefix
        # The arguments as the checks read them (a big message's built only as far as
        # they were read: qjson.DeferredObject), for the hub's fd work; the hub drops
        # them once it has the command (Hub._accept), so a queued command holds only
        # its prefix.
        self.args = args
        self.wire_id = wire_id
        self.oob = oob
        self.decision = decision
        self.arguments = arguments  # kept only for the audit log, when it records them
        self.reply: Reply | None = None
        self.started = 0.0
        self.issued = 0.0  # when it went upstream (the hub's clock), for its round trip
        # The fd it takes (getfd, add-fd), sent with its own bytes; and the fd names it
        # uses, as QEMU knows them -> as the client does (fdpass.py).
        self.fds: tuple[int, ...] = ()
        self.names: dict[str, str] | None = None
        self.profile = session.profile.name  # the profile that authorized it (for audit)


Verdict = Local | Command | Extension


def _is_object(value: object) -> bool:
    return isinstance(value, dict) or (isinstance(value, Deferred) and value.is_object)


def _is_string(value: object) -> bool:
    return isinstance(value, str | LongString)


def check_command(obj: dict[str, JsonValue], allow_oob: bool) -> str | LongString | None:
    """QEMU's qmp_dispatch_check_obj: the first problem in QDict hash order, or None."""
    execute = obj.get(EXECUTE)
    if _is_string(execute) and _PLAIN_KEYS.issuperset(obj) and _is_object(obj.get(ARGUMENTS, obj)):
        return None  # the common, valid shape: no order can matter
    exec_key: str | None = None
    for key in _in_qdict_order(_at_fault(obj, allow_oob), obj):
        if key == EXECUTE or (key == EXEC_OOB and allow_oob):
            if not _is_string(obj[key]):
                return f"QMP input member '{key}' must be a string"
            if exec_key is not None:
                return f"QMP input member '{key}' clashes with '{exec_key}'"
            exec_key = key
        elif key == ARGUMENTS:
            if not _is_object(obj[key]):
                return "QMP input member 'arguments' must be an object"
        elif key != ID:
            long = obj.long_key(key) if type(obj) is Message else None
            if long is not None:  # a long key's stand-in: QEMU names the key
                return long.text.around("QMP input member '", "' is unexpected")
            return f"QMP input member '{key}' is unexpected"
    if EXECUTE not in obj and (EXEC_OOB not in obj or not allow_oob):
        return "QMP input lacks member 'execute'"
    return None


def _at_fault(obj: dict[str, JsonValue], allow_oob: bool) -> list[str]:
    """The members check_command could stop at, in insertion order: the order of the
    others cannot change its answer, and a member of megabytes takes milliseconds to hash
    (qjson.qdict_order), so only these are ordered."""
    exec_keys = [key for key in (EXECUTE, EXEC_OOB) if key in obj and (key == EXECUTE or allow_oob)]
    clash = len(exec_keys) == 2 and all(_is_string(obj[key]) for key in exec_keys)
    return [
        key
        for key, value in obj.items()
        if not (
            key == ID
            or (key == ARGUMENTS and _is_object(value))
            or (key in exec_keys and _is_string(value) and not clash)
        )
    ]


def _in_qdict_order(keys: list[str], obj: Mapping[str, JsonValue] | None = None) -> list[str]:
    if len(keys) < 2:
        return keys
    if type(obj) is Message:  # long keys are ordered by their own buckets
        known = {k: long.bucket for k in keys if (long := obj.long_key(k)) is not None}
        return qdict_order(keys, known)
    return qdict_order(keys)


def check_capabilities_arguments(args: Mapping[str, JsonValue]) -> str | list[str]:
    """Validate `qmp_capabilities` arguments as QEMU's generated visitor does.

    Returns the requested capabilities, or the error desc QEMU would give.
    """
    requested: list[str] = []
    if "enable" in args:
        enable = args["enable"]
        if not isinstance(enable, list):
            return "Invalid parameter type for 'enable', expected: array"
        for i, cap in enumerate(enable):
            if not isinstance(cap, str):
                return f"Invalid parameter type for 'enable[{i}]', expected: string"
            if cap not in KNOWN_CAPABILITIES:
                # QEMU names list elements 'null' in this message (qapi-visit-core.c).
                return f"Parameter 'null' does not accept value '{cap}'"
            requested.append(cap)
    for key in _in_qdict_order([key for key in args if key != "enable"]):
        return f"Parameter '{key}' is unexpected"
    return requested


class Session:
    """Protocol state of one client: phase, capabilities, input framing, profile.

    What the hub schedules for the client (reply order, queues, backpressure) is the
    hub's own record of it (`flow.py`)."""

    __slots__ = (
        "framer",
        "id",
        "offered",
        "oob",
        "peer",
        "phase",
        "profile",
        "protected",
    )

    def __init__(
        self,
        client_id: int,
        peer: Peer,
        offered: frozenset[str],
        framer: Framer,
        profile: Profile = DEFAULT_POLICY.profiles[FULL],
        protected: frozenset[str] = frozenset(),
    ) -> None:
        self.id = client_id
        self.peer = peer
        self.offered = offered
        self.framer = framer
        # The policy's choice for this peer: the hub assigns it again on a reload.
        self.profile = profile
        # Chardev ids of qmpmux's own upstream monitor, which nobody may yank.
        self.protected = protected
        self.phase = Phase.NEGOTIATING
        self.oob = False

    def judge(self, value: JsonValue | ParseError) -> Verdict:
        """Decide what one complete input value gets: a local reply or a command for QEMU."""
        if isinstance(value, ParseError):
            return Local(_parse_error_reply(value.desc))
        if not isinstance(value, dict):
            return Local(_NOT_AN_OBJECT)
        wire_id = encode_id(value.get(ID, NO_ID))
        # QEMU answers the exec-oob path at once, but it only reads a monitor without oob
        # after the previous command finished, so for such a client that is in order too.
        oob_path = EXEC_OOB in value and EXECUTE not in value
        problem = check_command(value, self.oob)
        if problem is not None:
            return Local(error_reply(wire_id, GENERIC_ERROR, problem), oob=oob_path and self.oob)
        name_key = EXECUTE if EXECUTE in value else EXEC_OOB
        name: object = value[name_key]
        assert isinstance(name, str | LongString)
        given = value.get(ARGUMENTS)
        args: Mapping[str, JsonValue] | None
        if isinstance(given, Deferred):  # a big message's: built only if it will be read
            args = None if self._refused_unread(name) else DeferredObject(given)
        else:
            assert given is None or isinstance(given, dict)
            args = given
        if self.phase is Phase.NEGOTIATING:
            if name != QMP_CAPABILITIES:
                return Local(
                    error_reply(
                        wire_id,
                        COMMAND_NOT_FOUND,
                        "Expecting capabilities negotiation with 'qmp_capabilities'",
                    )
                )
            return self._negotiate(wire_id, args or {})
        if name == QMP_CAPABILITIES:
            if oob_path:
                desc = "The command qmp_capabilities does not support OOB"
                return Local(error_reply(wire_id, GENERIC_ERROR, desc), oob=True)
            checked = check_capabilities_arguments(args or {})
            if isinstance(checked, str):
                return Local(error_reply(wire_id, GENERIC_ERROR, checked))
            desc = "Capabilities negotiation is already complete, command ignored"
            return Local(error_reply(wire_id, COMMAND_NOT_FOUND, desc))
        texts = None
        if type(value) is Message:
            args_text = value.member_text(ARGUMENTS) if args is not None else None
            texts = (value.member_text(name_key), args_text)
        if isinstance(name, LongString):
            return self._long_named(name, args, wire_id, oob_path, texts)
        return self._authorize(name, args, wire_id, oob_path, texts)

    def _long_named(
        self,
        name: LongString,
        args: Mapping[str, JsonValue] | None,
        wire_id: WireId,
        oob: bool,
        texts: tuple[Buffer, Buffer | None] | None,
    ) -> Local:
        """A command named by a long string: never one QEMU or qmpmux has (QEMU's names
        are QAPI identifiers, a few dozen characters), so its reply is known without
        QEMU, which looks a name up before reading anything else of the command (docs/
        protocol.md §6.2): the profile's refusal, or QEMU's own "not found". Answered
        here, it costs QEMU nothing (it would read the name a byte at a time, seconds a
        MiB) and qmpmux never joins it (qjson.LongString)."""
        profile = self.profile
        decision = profile.command(name)
        if decision is Decision.DENY:
            desc = name.around("The command ", " has been refused by qmpmux policy")
        else:
            desc = name.around("The command ", " has not been found")
        audited = _audited(profile, args, texts[1] if texts else None)
        reply = error_reply(wire_id, COMMAND_NOT_FOUND, desc)
        return Local(reply, oob=oob, name=name, decision=decision, arguments=audited)

    def _refused_unread(self, name: str | LongString) -> bool:
        """Whether this command's reply never depends on its arguments: refused by name,
        in negotiation or by the profile, and not audited with its arguments."""
        if name == QMP_CAPABILITIES:
            return False
        if self.phase is Phase.NEGOTIATING:
            return True
        profile = self.profile
        if isinstance(name, LongString):  # answered by its name alone (_long_named)
            return not profile.audit_arguments
        return profile.command(name) is Decision.DENY and not profile.audit_arguments

    def _authorize(
        self,
        name: str,
        args: Mapping[str, JsonValue] | None,
        wire_id: WireId,
        oob: bool,
        texts: tuple[Buffer, Buffer | None] | None = None,
    ) -> Verdict:
        """The profile's decision on a well-formed command (exec-oob takes the same road)."""
        profile = self.profile
        audited = _audited(profile, args, texts[1] if texts else None)
        decision, refusal = self._verdict(name, args)
        if refusal is not None:
            reply = error_reply(wire_id, *refusal)
            return Local(reply, oob=oob, name=name, decision=Decision.DENY, arguments=audited)
        if name.startswith(QMPMUX_PREFIX):
            given = dict(args) if args is not None else None  # small: qmpmux's own commands
            return Extension(name, wire_id, oob, decision, audited, given)
        prefix = command_prefix(name, args, oob, texts)
        if len(prefix) > MAX_UPSTREAM_BYTES:
            # Never reached while max-message-bytes stays below QEMU's limit (upstream text
            # is never longer than the client's, the id aside); if it were, refuse here as
            # QEMU refuses oversized input, never half-send it.
            return Local(error_reply(None, GENERIC_ERROR, TOO_BIG_UPSTREAM), oob)
        return Command(self, name, prefix, wire_id, oob, decision, audited, args)

    def _verdict(
        self, name: str, args: Mapping[str, JsonValue] | None
    ) -> tuple[Decision, tuple[str, str] | None]:
        """The profile's decision, and the (error class, desc) of a refusal if refused."""
        profile = self.profile
        decision = profile.command(name)
        if decision is Decision.DENY:  # before any argument check: nothing to say about them
            return decision, (
                COMMAND_NOT_FOUND,
                f"The command {name} has been refused by qmpmux policy",
            )
        problem = profile.fatal_problem(name, args, self.protected)
        if problem is not None:
            return decision, (GENERIC_ERROR, problem)
        problem = profile.argument_problem(name, args, self.protected)
        if problem is None:
            return decision, None
        if profile.audit_only:
            return Decision.AUDIT, None
        return decision, (GENERIC_ERROR, problem)

    def rejudge(self, cmd: Command) -> Reply | None:
        """Judge a queued command again under the current profile (after a reload): the
        denial reply if it is now refused; otherwise it is updated to its new authority.

        A command is judged by the policy in force when it goes upstream, so a reload
        that denies it must catch it while it still waits inside qmpmux."""
        message = decode_prefix(cmd.prefix)
        args = message.get(ARGUMENTS)
        assert args is None or isinstance(args, dict)
        decision, refusal = self._verdict(cmd.name, args)
        cmd.arguments = _audited(self.profile, args, cmd.prefix)
        cmd.profile = self.profile.name
        if refusal is not None:
            cmd.decision = Decision.DENY
            return error_reply(cmd.wire_id, *refusal)
        cmd.decision = decision
        return None

    def _negotiate(self, wire_id: WireId, args: Mapping[str, JsonValue]) -> Local:
        checked = check_capabilities_arguments(args)
        if isinstance(checked, str):
            return Local(error_reply(wire_id, GENERIC_ERROR, checked))
        unavailable = [cap for cap in checked if cap not in self.offered]
        if unavailable:
            desc = f"Capability {', '.join(unavailable)} not available"
            return Local(error_reply(wire_id, GENERIC_ERROR, desc))
        self.phase = Phase.COMMAND
        self.oob = CAP_OOB in checked
        return Local(return_reply(wire_id))
