"""The multiplexer: one upstream QMP session, many client sessions (sans-IO).

The shell feeds it what happened (bytes from QEMU or a client, a connection opening or
closing) and carries out the actions it returns (write, close, pause reading, exit). It
owns every routing decision:

- Upstream handshake: read QEMU's greeting, negotiate `oob` when offered, then report
  `UpstreamReady`; clients are greeted with QEMU's own version from then on.
- Commands get qmpmux's smallest free integer id upstream; the reply is routed back by
  that id and restored to the client's id (`wire.rewrite_reply`).
- At most `upstream_window` in-band commands are in flight upstream (QEMU queues 8 per
  monitor and stops reading past that, which would strand exec-oob commands:
  docs/protocol.md §7.1); clients with queued commands are served round-robin, one
  command per turn.
- Events are fanned out as QEMU's original bytes to every negotiated client whose
  profile allows them (encoded once per profile when a profile strips `__` members).
- Each client's profile (`policy.py`) decides its commands and events; introspection
  replies are narrowed to what it may use; one audit record is made per command.

Invariants:
- A reply goes only to the client whose command it answers; a reply for a client that
  has gone is dropped; a reply with an id qmpmux did not issue is dropped and logged.
- A client's in-band replies (local or from QEMU) leave in the order its input came.
- Nothing a client sends reaches QEMU except a complete, validated, re-encoded command.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

import msgspec

from qmpmux.config import Limits
from qmpmux.ids import IdPool
from qmpmux.introspect import FILTERS, replace_return, strip_message
from qmpmux.policy import DEFAULT_POLICY, LIST_CLIENTS, WHOAMI, Decision, Policy, Profile
from qmpmux.qjson import Framer, JsonValue, ParseError, encode, qdict_order
from qmpmux.redact import encode_record, redact
from qmpmux.session import Command, Extension, Local, Peer, Phase, Session
from qmpmux.throttle import LogThrottle
from qmpmux.wire import (
    CAP_OOB,
    CAPABILITIES_OOB,
    CAPABILITIES_PLAIN,
    NO_ID,
    SHUTDOWN_EVENT,
    UpstreamFramer,
    command_bytes,
    decode_greeting,
    decode_upstream,
    describe_error,
    error_class,
    error_reply,
    greeting,
    return_reply,
    rewrite_reply,
)

log = logging.getLogger("qmpmux.hub")
QEMU_MAX_TOKENS: Final = 2 * 1024 * 1024  # MAX_TOKEN_COUNT, qobject/json-streamer.c


# --- actions for the shell ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ToClient:
    client: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Broadcast:
    """The same bytes to many clients (an event): one action, not one per client."""

    data: bytes
    clients: list[int]


@dataclass(frozen=True, slots=True)
class ToUpstream:
    data: bytes


@dataclass(frozen=True, slots=True)
class CloseClient:
    """Close after writing what is queued for it."""

    client: int
    reason: str


@dataclass(frozen=True, slots=True)
class PauseClient:
    client: int


@dataclass(frozen=True, slots=True)
class ResumeClient:
    client: int


@dataclass(frozen=True, slots=True)
class UpstreamReady:
    version: bytes
    oob: bool


@dataclass(frozen=True, slots=True)
class Exit:
    """The upstream session is over; close everything and exit with `code`."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Audit:
    """One audit record, a JSON line."""

    record: bytes


Action = (
    ToClient
    | Broadcast
    | ToUpstream
    | CloseClient
    | PauseClient
    | ResumeClient
    | UpstreamReady
    | Exit
    | Audit
)


class UpstreamState(enum.Enum):
    GREETING = "greeting"
    NEGOTIATING = "negotiating"
    READY = "ready"
    CLOSED = "closed"


_client_log = logging.getLogger("qmpmux.client")
INBAND, OOB = 0, 1  # the two upstream lanes
_UNSEEN: Final[list[int]] = []


class Hub:
    """All proxy state and decisions; no I/O. Each input method returns the actions to do."""

    def __init__(
        self,
        limits: Limits | None = None,
        policy: Policy = DEFAULT_POLICY,
        *,
        audit: bool = False,
        protected: frozenset[str] = frozenset(),
        listener_caps: Mapping[str, int | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], float] = time.time,
    ) -> None:
        self.limits = limits or Limits()
        self.policy = policy
        self.audit = audit
        # Chardev ids of qmpmux's own upstream monitor; empty means unknown (refuse all).
        self.protected = protected
        # Every listener by label, with its own max-clients (None: the global one only).
        self.listener_caps: Mapping[str, int | None] = listener_caps or {}
        self._per_listener: dict[str, int] = {}
        self._clock = clock
        self._wallclock = wallclock
        # Lines a client triggers at will (denials, audit-only), limited per listener.
        self.log_limit = LogThrottle(clock=clock)
        # How many bytes the shell holds for a client (for list-clients); set by the shell.
        self.queued_bytes: Callable[[int], int] = lambda client: 0
        # Narrowed introspection replies, per (profile, command, QEMU's reply value).
        self._views: dict[tuple[int, str, bytes], bytes] = {}
        self.state = UpstreamState.GREETING
        self.version = b""
        self.oob = False
        self.shutdown_seen = False
        self.clients: dict[int, Session] = {}
        self._negotiated: dict[int, Session] = {}
        # Per lane (INBAND, OOB): clients with queued commands, and commands in QEMU.
        self._ready: tuple[deque[Session], deque[Session]] = (deque(), deque())
        self._lane_inflight = [0, 0]
        self._inflight_bytes = 0
        self._last_lane = INBAND
        self._inflight: dict[int, Command] = {}
        self._ids = IdPool()
        self._next_client = 1
        self._greeting = b""
        self._offered: frozenset[str] = frozenset()
        self._framer = UpstreamFramer()
        self._out: list[Action] = []

    def _take(self) -> list[Action]:
        out, self._out = self._out, []
        return out

    # --- upstream ---------------------------------------------------------------------------

    def upstream_data(self, data: bytes) -> list[Action]:
        try:
            for line in self._framer.feed(data):
                if self.state is UpstreamState.READY:
                    self._upstream_message(line)
                elif self.state is not UpstreamState.CLOSED:
                    self._handshake(line)
        except ValueError as exc:
            self._end(1, f"QEMU sent an oversized message: {exc}")
        self._pump()
        return self._take()

    def upstream_closed(self, reason: str = "QEMU closed the monitor connection") -> list[Action]:
        """The upstream connection is gone; `reason` says how (for the exit message)."""
        if self.state is not UpstreamState.CLOSED:
            if self.shutdown_seen:
                self._end(0, "QEMU shut down")
            else:
                self._end(1, reason)
        return self._take()

    def _end(self, code: int, reason: str) -> None:
        self.state = UpstreamState.CLOSED
        for cid in list(self.clients):
            self._out.append(CloseClient(cid, reason))
        self._out.append(Exit(code, reason))

    def _handshake(self, line: bytes) -> None:
        try:
            msg = decode_upstream(line)
        except msgspec.DecodeError:
            log.warning("ignoring non-QMP output from QEMU during handshake: %.200r", line)
            return
        if self.state is UpstreamState.GREETING:
            if not msg.QMP:
                self._end(1, f"QEMU did not greet with QMP: {line[:200]!r}")
                return
            try:
                self.version, caps = decode_greeting(msg.QMP)
            except msgspec.DecodeError:
                self._end(1, f"malformed QMP greeting: {line[:200]!r}")
                return
            self.oob = CAP_OOB in caps
            self._out.append(ToUpstream(CAPABILITIES_OOB if self.oob else CAPABILITIES_PLAIN))
            self.state = UpstreamState.NEGOTIATING
        elif msg.event is not None:
            return  # events before negotiation completes are not ours to deliver
        elif msg.error:
            self._end(1, f"QEMU refused qmp_capabilities: {describe_error(msg.error)}")
        else:
            self.state = UpstreamState.READY
            self._offered = frozenset({CAP_OOB}) if self.oob else frozenset()
            self._greeting = greeting(self.version, self.oob)
            self._out.append(UpstreamReady(self.version, self.oob))

    def _upstream_message(self, line: bytes) -> None:
        try:
            msg = decode_upstream(line)
        except msgspec.DecodeError:
            log.warning("dropping malformed output from QEMU: %.200r", line)
            return
        if msg.event is not None:
            if msg.event == SHUTDOWN_EVENT:
                self.shutdown_seen = True
            self._fan_out(msg.event, line)
        elif msg.id is not NO_ID:
            self._route_reply(line, msg.id)
        elif msg.error:
            # qmpmux sends every command with an id, so QEMU could not parse our output.
            log.error("QEMU reported an error without id: %s", describe_error(msg.error))
        else:
            log.warning("dropping unexpected message from QEMU: %.200r", line)

    def _fan_out(self, name: str, line: bytes) -> None:
        """One event to every negotiated client allowed it: decided once per profile, and
        the same bytes object for every client whose profile does not rewrite it."""
        targets: dict[Profile, list[int] | None] = {}
        for session in self._negotiated.values():
            profile = session.profile
            clients = targets.get(profile, _UNSEEN)
            if clients is _UNSEEN:
                clients = targets[profile] = [] if profile.event(name) else None
            if clients is not None:
                clients.append(session.id)
        for profile, clients in targets.items():
            if clients:
                data = strip_message(line) if profile.strip_extensions else line
                self._out.append(Broadcast(data, clients))

    def _route_reply(self, line: bytes, upstream_id: object) -> None:
        cmd = self._inflight.pop(upstream_id, None) if type(upstream_id) is int else None
        if cmd is None:
            log.warning("dropping reply with an id qmpmux did not issue: %.200r", line)
            return
        assert isinstance(upstream_id, int)
        self._ids.give_back(upstream_id)
        session = cmd.session
        lane = OOB if cmd.oob else INBAND
        self._lane_inflight[lane] -= 1
        self._inflight_bytes -= len(cmd.prefix)
        session.inflight[lane] -= 1
        if session.queues[lane] and not session.in_ready[lane] and not session.closed:
            session.in_ready[lane] = True  # its share of the window has room again
            self._ready[lane].append(session)
        if self.audit:  # also when its client has gone: what ran is on the record
            self._record(
                session, cmd.name, cmd.decision, error_class(line), cmd.arguments,
                cmd.started, cmd.profile,
            )  # fmt: skip
        if session.closed:
            return  # its client has gone: the reply is nobody else's
        profile = session.profile
        data = strip_message(line) if profile.strip_extensions else line  # before the id:
        data = rewrite_reply(data, upstream_id, cmd.wire_id)  # the client's id is its own
        if cmd.name in FILTERS:  # even for `full`: qmpmux's own commands are listed
            data = self._narrow(profile, cmd.name, data, cmd.wire_id)
        cmd.reply = data
        session.reply_bytes += len(data)
        self._flush(session)

    def _narrow(self, profile: Profile, name: str, reply: bytes, wire_id: bytes | None) -> bytes:
        """An introspection reply as this profile may see it (cached: QEMU's is static)."""
        narrow = FILTERS[name]

        def view(value: bytes) -> bytes:
            key = (id(profile), name, value)
            cached = self._views.get(key)
            if cached is None:
                if len(self._views) >= 16:  # keys hold QEMU's reply (the schema is ~200 KB)
                    self._views.clear()
                cached = self._views[key] = narrow(value, profile)
            return cached

        try:
            return replace_return(reply, view)
        except msgspec.DecodeError:
            log.warning("could not narrow a malformed %s reply; withholding it", name)
            return error_reply(wire_id, "GenericError", f"qmpmux could not filter {name}")

    # --- clients ----------------------------------------------------------------------------

    def client_connected(self, peer: Peer) -> tuple[int, list[Action]]:
        """Register a new client and greet it. The id is 0 if the client was refused."""
        if self.state is not UpstreamState.READY:
            return 0, []
        refusal = self._admission(peer.listener)
        if refusal is not None:
            self.log_client(
                logging.WARNING, "refusal", peer.listener,
                "refusing client on %s: %s", peer.listener, refusal,
            )  # fmt: skip
            return 0, []
        self._per_listener[peer.listener] = self._per_listener.get(peer.listener, 0) + 1
        cid = self._next_client
        self._next_client += 1
        framer = Framer(
            max_message_bytes=self.limits.max_message_bytes,
            max_tokens=QEMU_MAX_TOKENS - 8,  # qmpmux adds `,"id":N` upstream
        )
        profile = self._assign(peer)
        self.clients[cid] = Session(cid, peer, self._offered, framer, profile, self.protected)
        self.log_client(
            logging.INFO, "connect", peer.listener,
            "client %d: connected on %s (uid=%s pid=%s exe=%.80r), profile %s",
            cid, peer.listener, peer.uid, peer.pid, peer.exe, profile.name,
        )  # fmt: skip
        self._out.append(ToClient(cid, self._greeting))
        return cid, self._take()

    def log_client(self, level: int, kind: str, listener: str, message: str, *args: object) -> None:
        """Log a line that clients can trigger at will (connecting, being denied, ...):
        limited per listener and globally, with a count of what was left out
        (`throttle.py`), so no client, even one reconnecting, can flood the log."""
        if _client_log.isEnabledFor(level):
            note = self.log_limit.admit(kind, listener)
            if note is not None:
                _client_log.log(level, message + "%s", *args, note)

    def _admission(self, listener: str) -> str | None:
        """Why a new client of `listener` is refused, or None: the global bound, the
        listener's own bound, and the slots other listeners keep for themselves."""
        limits = self.limits
        total = len(self.clients)
        if total >= limits.max_clients:
            return f"{total} clients connected (max-clients)"
        count = self._per_listener.get(listener, 0)
        cap = self.listener_caps.get(listener)
        if cap is not None and count >= cap:
            return f"{count} clients on this listener (its max-clients)"
        owed = 0  # reserved slots the other listeners have not used yet
        caps = self.listener_caps
        fair = min(limits.reserve_clients, limits.max_clients // max(1, len(caps)))
        for other, other_cap in caps.items():
            if other != listener:
                reserve = min(fair, other_cap or fair)
                owed += max(0, reserve - self._per_listener.get(other, 0))
        if limits.max_clients - total <= owed:
            return f"the {limits.max_clients - total} free slot(s) are reserved for other listeners"
        return None

    def negotiation_deadline(self, client: int) -> list[Action]:
        """The client's time to negotiate is up: close it if it has not."""
        session = self.clients.get(client)
        if session is not None and session.phase is Phase.NEGOTIATING:
            timeout = self.limits.negotiation_timeout
            self.log_client(
                logging.WARNING, "negotiation", session.peer.listener,
                "client %d: did not negotiate within %g s; closing it", client, timeout,
            )  # fmt: skip
            self._out.append(CloseClient(client, f"did not negotiate within {timeout:g} s"))
        return self._take()

    def client_data(self, client: int, data: bytes) -> list[Action]:
        session = self.clients.get(client)
        if session is None or session.draining:
            return []
        try:
            for value in session.framer.feed(data):
                self._accept(session, value)
        except Exception:  # a bug must cost this client its connection, never the proxy
            _client_log.exception("client %d: internal error; disconnecting it", client)
            self._out.append(CloseClient(client, "internal error"))
            return self._take()
        held = self._held(session)  # before the flush moves ready replies to the shell
        self._flush(session)
        if session.phase is Phase.COMMAND and client not in self._negotiated:
            # Negotiation replies are all local, so the success reply has just been sent:
            # events flow from here on, never before.
            self._negotiated[client] = session
        limits = self.limits
        if not session.paused and (
            session.pending >= limits.max_pending or held >= limits.max_pending_bytes
        ):
            # Whatever a client makes qmpmux hold, it holds only until the bound: reading
            # pauses (and resumes as the backlog drains), so a client that reads is never
            # cut off for bytes qmpmux chose to hold, and one that does not is cut off by
            # its outbox bound alone.
            session.paused = True
            self._out.append(PauseClient(client))
        self._pump()
        return self._take()

    def _accept(self, session: Session, value: JsonValue | ParseError) -> None:
        verdict = session.judge(value)
        kind = type(verdict)
        if kind is Command:
            assert isinstance(verdict, Command)
            if self.audit:
                verdict.started = self._clock()
            self._enqueue(session, verdict)
            return
        if kind is Extension:
            assert isinstance(verdict, Extension)
            verdict = self._extension(session, verdict)
        assert isinstance(verdict, Local)
        (session.oob_replies if verdict.oob else session.replies).append(verdict.data)
        session.reply_bytes += len(verdict.data)
        if verdict.decision is not None:
            self._judged_locally(session, verdict)

    def reload(self, policy: Policy) -> list[Action]:
        """Apply a new policy to every client's next command and event, and to every
        command still queued inside qmpmux: a command is judged by the policy in force
        when it goes upstream, so one the new policy denies is answered with its denial,
        in the client's order, and never reaches QEMU."""
        self.policy = policy
        self._views.clear()
        for session in self.clients.values():
            session.profile = self._assign(session.peer)
            refused = False
            for queue in session.queues:
                for cmd in list(queue):
                    denial = session.rejudge(cmd)
                    if denial is None:
                        continue
                    queue.remove(cmd)
                    session.queued_bytes -= len(cmd.prefix)
                    cmd.reply = denial
                    session.reply_bytes += len(denial)
                    refused = True
                    self._judged_locally(
                        session, Local(denial, cmd.oob, cmd.name, Decision.DENY, cmd.arguments)
                    )
            if refused:
                for lane in (INBAND, OOB):  # an in-band queue may have waited on exec-oob
                    if session.queues[lane] and not session.in_ready[lane]:
                        session.in_ready[lane] = True
                        self._ready[lane].append(session)
                self._flush(session)
        self._pump()
        return self._take()

    def _assign(self, peer: Peer) -> Profile:
        return self.policy.assign(peer.listener, peer.profile, peer.uid, peer.gid, peer.exe)

    def _judged_locally(self, session: Session, verdict: Local) -> None:
        assert verdict.name is not None and verdict.decision is not None
        if verdict.decision is Decision.DENY:
            note = self.log_limit.admit("denial", session.peer.listener)
            if note is not None:  # a flood, even one reconnecting, must not flood the log
                _client_log.warning(
                    "client %d: %.80r denied by profile %s%s", session.id, verdict.name,
                    session.profile.name, note,
                )  # fmt: skip
        if self.audit:
            self._record(
                session, verdict.name, verdict.decision, error_class(verdict.data),
                verdict.arguments, None, session.profile.name,
            )  # fmt: skip

    def _record(
        self,
        session: Session,
        name: str,
        decision: Decision,
        result: str,
        arguments: dict[str, JsonValue] | None,
        started: float | None,
        profile: str,
    ) -> None:
        """One audit record: who ran what, what the policy said, and how it went."""
        peer = session.peer
        now = self._wallclock()
        record: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
            + f".{int(now * 1000) % 1000:03d}Z",
            "client": session.id,
            "listener": peer.listener,
            "uid": peer.uid,
            "gid": peer.gid,
            "pid": peer.pid,
            "profile": profile,
            "command": name,
            "decision": decision.value,
            "result": result or "ok",
            "latency_ms": round((self._clock() - started) * 1000, 3) if started else 0.0,
        }
        if arguments is not None:
            record["arguments"] = redact(name, arguments)
        if decision is Decision.AUDIT:
            note = self.log_limit.admit("audit-only", peer.listener)
            if note is not None:
                _client_log.warning(
                    "client %d: %.80r would be denied by profile %s (audit-only)%s",
                    session.id, name, profile, note,
                )  # fmt: skip
        self._out.append(Audit(encode_record(record)))

    def _extension(self, session: Session, ext: Extension) -> Local:
        """qmpmux's own commands (`__org.qmpmux_*`), answered in the client's order."""
        if ext.given and ext.name in (WHOAMI, LIST_CLIENTS):
            desc = f"Parameter '{qdict_order(ext.given)[0]}' is unexpected"
            reply = error_reply(ext.wire_id, "GenericError", desc)
            return Local(reply, ext.oob, ext.name, ext.decision, ext.arguments)
        if ext.name == WHOAMI:
            value: JsonValue = self._identity(session)
        elif ext.name == LIST_CLIENTS:
            value = [self._identity(s) for s in self.clients.values()]
        else:
            desc = f"The command {ext.name} has not been found"
            reply = error_reply(ext.wire_id, "CommandNotFound", desc)
            return Local(reply, ext.oob, ext.name, ext.decision, ext.arguments)
        reply = return_reply(ext.wire_id, encode(value))
        return Local(reply, ext.oob, ext.name, ext.decision, ext.arguments)

    def _identity(self, session: Session) -> dict[str, JsonValue]:
        peer = session.peer
        inflight = session.inflight[INBAND] + session.inflight[OOB]
        return {
            "client": session.id,
            "listener": peer.listener,
            "profile": session.profile.name,
            "uid": peer.uid,
            "gid": peer.gid,
            "pid": peer.pid,
            "exe": peer.exe,
            "address": peer.address or None,
            "negotiated": session.phase is Phase.COMMAND,
            "oob": session.oob,
            "commands-in-flight": inflight,
            "bytes-queued": self.queued_bytes(session.id),
        }

    def client_drained(self, client: int) -> list[Action]:
        """The shell sent everything queued for a paused client: maybe resume reading."""
        session = self.clients.get(client)
        if session is not None and session.paused:
            self._settle(session)
        return self._take()

    def client_eof(self, client: int) -> list[Action]:
        """The client shut down its sending side: answer what it sent, then close."""
        session = self.clients.get(client)
        if session is not None:
            session.draining = True
            self._settle(session)
        return self._take()

    def client_closed(self, client: int) -> list[Action]:
        """The connection is gone: drop its queued commands; late replies are discarded."""
        session = self.clients.pop(client, None)
        if session is None:
            return []
        session.closed = True
        self._negotiated.pop(client, None)
        self._per_listener[session.peer.listener] -= 1
        for queue in session.queues:
            queue.clear()
        session.replies.clear()
        session.oob_replies.clear()
        session.reply_bytes = 0
        self.log_client(
            logging.INFO, "disconnect", session.peer.listener, "client %d: disconnected", client
        )
        self._pump()
        return self._take()

    def _enqueue(self, session: Session, cmd: Command) -> None:
        lane = OOB if cmd.oob else INBAND
        (session.oob_replies if cmd.oob else session.replies).append(cmd)
        session.queues[lane].append(cmd)
        session.queued_bytes += len(cmd.prefix)
        if not session.in_ready[lane]:
            session.in_ready[lane] = True
            self._ready[lane].append(session)

    def _issue(self, cmd: Command) -> bytes:
        upstream_id = self._ids.take()
        self._inflight[upstream_id] = cmd
        return command_bytes(cmd.prefix, upstream_id)

    def _pump(self) -> None:
        """Fill the upstream lanes from the clients' queues: within a lane round-robin, one
        command per client a turn; across lanes alternately when both have work, so
        exec-oob floods cannot starve other clients (QEMU's OOB promise is per monitor:
        a client's in-band commands wait for its own earlier exec-oob, see below)."""
        if self.state is not UpstreamState.READY:
            return
        limits = self.limits
        window, share, budget = limits.upstream_window, limits.client_window, limits.upstream_bytes
        ready, inflight = self._ready, self._lane_inflight
        chunks: list[bytes] = []
        while self._inflight_bytes < budget:
            oob_can = bool(ready[OOB]) and inflight[OOB] < window
            inband_can = bool(ready[INBAND]) and inflight[INBAND] < window
            if oob_can and inband_can:
                lane = INBAND if self._last_lane == OOB else OOB
            elif oob_can or inband_can:
                lane = OOB if oob_can else INBAND
            else:
                break
            session = ready[lane].popleft()
            queue = session.queues[lane]
            if (
                session.closed
                or not queue
                or session.inflight[lane] >= share
                # QEMU dispatches an exec-oob as soon as it reads it, so a client's
                # in-band command never goes before its earlier out-of-band ones.
                or (lane == INBAND and session.queues[OOB])
            ):
                session.in_ready[lane] = False  # re-queued when that changes
                continue
            cmd = queue.popleft()
            session.queued_bytes -= len(cmd.prefix)
            self._inflight_bytes += len(cmd.prefix)
            chunks.append(self._issue(cmd))
            inflight[lane] += 1
            session.inflight[lane] += 1
            self._last_lane = lane
            if queue:
                ready[lane].append(session)
            else:
                session.in_ready[lane] = False
                if lane == OOB and session.queues[INBAND] and not session.in_ready[INBAND]:
                    session.in_ready[INBAND] = True
                    ready[INBAND].append(session)
        if chunks:
            self._out.append(ToUpstream(b"".join(chunks)))

    def _flush(self, session: Session) -> None:
        """Send the client's replies that are ready, each stream in input order."""
        out = self._out
        cid = session.id
        sent = 0
        for replies in (session.oob_replies, session.replies):
            while replies:
                head = replies[0]
                if type(head) is bytes:
                    data = head
                else:
                    assert isinstance(head, Command)
                    if head.reply is None:
                        break
                    data = head.reply
                out.append(ToClient(cid, data))
                sent += len(data)
                replies.popleft()
        session.reply_bytes -= sent
        self._settle(session, sent)

    def _held(self, session: Session) -> int:
        """Every byte qmpmux holds for a client: its commands not yet sent upstream,
        replies waiting behind an earlier command, and what waits in its outbox."""
        return session.queued_bytes + session.reply_bytes + self.queued_bytes(session.id)

    def _settle(self, session: Session, flushed: int = 0) -> None:
        """Flow control and half-close bookkeeping after the client's backlog shrank.

        `flushed` bytes were just handed to the shell for this client and are not in its
        outbox yet."""
        limits = self.limits
        if (
            session.paused
            and session.pending <= limits.max_pending // 2
            and self._held(session) + flushed <= limits.max_pending_bytes // 2
        ):
            session.paused = False
            self._out.append(ResumeClient(session.id))
        if session.draining and not session.pending:
            self._out.append(CloseClient(session.id, "client finished sending"))
