"""The multiplexer: one upstream QMP session, many client sessions (sans-IO).

The shell feeds it what happened (bytes from QEMU or a client, a connection opening or
closing) and carries out the actions it returns (write, close, pause reading, exit). It
owns every routing decision:

- Upstream handshake: read QEMU's greeting, negotiate `oob` when offered, then report
  `UpstreamReady`; clients are greeted with QEMU's own version from then on.
- A short in-band command goes upstream without an id, its reply known by its place in
  the monitor's in-band order; others get qmpmux's smallest free integer id and are
  routed back by it (`link.py`). Either way the client's id is restored
  (`wire.rewrite_reply`).
- At most `upstream_window` in-band commands are in flight upstream (QEMU queues 8 per
  monitor and stops reading past that, which would strand exec-oob commands:
  docs/protocol.md §7.1); clients with queued commands are served round-robin, one
  command per turn.
- Events are fanned out as QEMU's original bytes to every negotiated client whose
  profile allows them (encoded once per profile when a profile strips `__` members).
- Each client's profile (`policy.py`) decides its commands and events; introspection
  replies are narrowed to what it may use; one audit record is made per command.
- Counters for monitoring (`metrics.py`) are bumped inline: a few list and dict slots
  per command; the shell's exporter reads them when Prometheus scrapes.

Invariants:
- A reply goes only to the client whose command it answers; a reply for a client that
  has gone is dropped; a reply with an id qmpmux did not issue is dropped and logged.
- A client's in-band replies (local or from QEMU) leave in the order its input came.
- Nothing a client sends reaches QEMU except a complete, validated, re-encoded command.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import msgspec

from qmpmux.config import Limits
from qmpmux.fdpass import (
    ADD_FD,
    CLOSEFD,
    QUERY_FDSETS,
    REMOVE_FD,
    TAKES_FD,
    FdFacts,
    restore_names,
    upstream_name,
)
from qmpmux.flow import Flow
from qmpmux.introspect import replace_return, strip_message
from qmpmux.judgement import Judgement, judge, off_loop
from qmpmux.link import INBAND, OOB, Link, UpstreamState
from qmpmux.metrics import (
    CLOSED,
    DURATION_BUCKETS,
    ERROR_AT,
    INTERNAL_ERROR,
    NEGOTIATION_TIMEOUT,
    OK,
    OK_AT,
    OTHER,
    SHUTDOWN,
    UPSTREAM_LOST,
    Stats,
)
from qmpmux.policy import DEFAULT_POLICY, FULL, LIST_CLIENTS, WHOAMI, Decision, Policy, Profile
from qmpmux.qjson import (
    Framer,
    JsonValue,
    LongString,
    ParseError,
    clipped,
    encode,
    qdict_order,
)
from qmpmux.redact import encode_record, redact
from qmpmux.session import (
    TOO_BIG_UPSTREAM,
    Audited,
    Command,
    Extension,
    Local,
    Peer,
    Phase,
    Session,
    Verdict,
)
from qmpmux.throttle import LogThrottle
from qmpmux.views import VIEWED, ViewJob, Views, WithheldError
from qmpmux.wire import (
    ARGUMENTS,
    CAP_OOB,
    CAPABILITIES_OOB,
    CAPABILITIES_PLAIN,
    DEFERRED_MEMBERS,
    GENERIC_ERROR,
    HANDSHAKE_ID,
    NO_ID,
    PART_MEMBERS,
    QUERY_COMMANDS,
    READ_MEMBERS,
    REPLY_OPENINGS,
    SHUTDOWN_EVENT,
    STAYING_EVENTS,
    CommandText,
    Line,
    OversizedMessageError,
    Reply,
    command_bytes,
    command_names,
    command_prefix,
    decode_fdset,
    decode_greeting,
    decode_prefix,
    decode_upstream,
    describe_error,
    error_class,
    error_reply,
    greeting,
    numbered,
    return_reply,
    rewrite_reply,
    small,
    upstream_error_class,
    upstream_id_bytes,
    upstream_write,
)

log = logging.getLogger("qmpmux.hub")
QEMU_MAX_TOKENS: Final = 2 * 1024 * 1024  # MAX_TOKEN_COUNT, qobject/json-streamer.c
# How much of a command name an audit record keeps (QEMU's are under 64 characters).
_RECORDED_NAME_MAX: Final = 256


# --- actions for the shell ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ToClient:
    client: int
    data: Reply


@dataclass(frozen=True, slots=True)
class Broadcast:
    """The same bytes to many clients (an event): one action, not one per client."""

    data: bytes
    clients: list[int]


@dataclass(frozen=True, slots=True)
class ToUpstream:
    """Bytes for QEMU; `fds` go in the same `sendmsg`, on its first byte, and are then
    closed by the shell (QEMU has its own copies)."""

    data: CommandText
    fds: tuple[int, ...] = ()
    link: int = 0  # which upstream monitor (lane)


@dataclass(frozen=True, slots=True)
class CloseFds:
    """File descriptors a client passed that nobody will take: close them."""

    fds: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class CloseClient:
    """Close after writing what is queued for it."""

    client: int
    reason: str


@dataclass(frozen=True, slots=True)
class PauseClient:
    client: int


@dataclass(frozen=True, slots=True)
class Judge:
    """Run `job` (judgement.Judgement.run) off the event loop, then hand it back with
    `Hub.judged`: a big message, whose judging may take long."""

    client: int
    job: Judgement


@dataclass(frozen=True, slots=True)
class View:
    """Run `job` (views.ViewJob.run) off the event loop, then hand it back with
    `Hub.viewed`: QEMU's long reply to one of the client's commands, whose view (the
    scrub, narrowing or stripping its profile asks for) may take long."""

    client: int
    job: ViewJob


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
    | CloseFds
    | CloseClient
    | PauseClient
    | Judge
    | View
    | ResumeClient
    | UpstreamReady
    | Exit
    | Audit
)


_client_log = logging.getLogger("qmpmux.client")
# Every command and reply at debug level, redacted (`_log_command`, `_log_reply`).
_traffic_log = logging.getLogger("qmpmux.traffic")
_EVENT_COPIES_MAX: Final = 4096  # events awaiting their copies from the other links
_UNREADABLE: Final = "qmpmux could not read QEMU's reply"
_UNSEEN: Final[list[int]] = []


def _iso_time(now: float) -> str:
    """UTC with milliseconds, as audit records and list-clients give times."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"


def _withheld(upstream_id: int | None, desc: str) -> bytes:
    """The error that stands for a reply of QEMU's qmpmux could not filter, with QEMU's
    id still in it if it had one (wire.rewrite_reply gives it the client's)."""
    wire_id = None if upstream_id is None else upstream_id_bytes(upstream_id)
    reply = error_reply(wire_id, GENERIC_ERROR, desc)
    assert type(reply) is bytes
    return reply


def _lane_link(flow: Flow, lane: int) -> Link | None:
    """The monitor a client's in-band (or exec-oob) commands go to."""
    return flow.oob_link if lane == OOB else flow.link


def _who(peer: Peer) -> str:
    """A client as a connect line shows it: a TCP peer by its address, a unix peer by its
    credentials."""
    if peer.address:
        return f"from {peer.address}"
    return f"uid={peer.uid} pid={peer.pid} exe={peer.exe!r:.80}"


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
        listener_message_bytes: Mapping[str, int] | None = None,
        links: int = 1,
        first_client: int = 1,
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], float] = time.time,
        metrics: bool = False,
        vm: str | None = None,
        off_loop_bytes: int | None = None,
        off_loop_view_bytes: int | None = None,
    ) -> None:
        self.limits = limits or Limits()
        # Messages at least this long are judged off the event loop (judgement.py; the
        # shell runs them), or None: every one inline.
        self.off_loop_bytes = off_loop_bytes
        self.policy = policy
        self.audit = audit
        # The VM this hub serves when one process serves several: every audit record
        # names it (README "Running it", `--audit`); None for the only one.
        self.vm = vm
        # Chardev ids of qmpmux's own upstream monitor; empty means unknown (refuse all).
        self.protected = protected
        # Every listener by label, with its own max-clients (None: the global one only).
        self.listener_caps: Mapping[str, int | None] = listener_caps or {}
        # Listeners whose clients have a tighter max-message-bytes than limits' (config).
        self.listener_message_bytes: Mapping[str, int] = listener_message_bytes or {}
        self._per_listener: dict[str, int] = {}
        self._clock = clock
        self._wallclock = wallclock
        # Lines a client triggers at will (denials, audit-only), limited per listener.
        self.log_limit = LogThrottle(clock=clock)
        # How many bytes the shell holds for a client (for list-clients); set by the shell.
        self.queued_bytes: Callable[[int], int] = lambda client: 0
        # QEMU's replies as each profile may see them (views.py), with their memos; those
        # at least `off_loop_view_bytes` long are viewed off the loop when that is costly
        # (None: every one inline).
        self.views = Views(off_loop_view_bytes)
        # Clients whose output waits for a reply being viewed off the loop (Flow.held).
        self._holding: dict[int, Flow] = {}
        self.state = UpstreamState.GREETING
        self.version = b""
        self.oob = False
        # QEMU announced SHUTDOWN and has not shown since that it stays: it is quitting.
        self.shutdown_seen = False
        self.clients: dict[int, Flow] = {}
        self._negotiated: dict[int, Flow] = {}  # clients events go to
        # The upstream monitors ("lanes"), each with its own window and queues.
        self.links = [Link(i) for i in range(links)]
        self._live: list[Link] = list(self.links)  # not closed
        self._turn = 0  # where the next tie between equally loaded links is broken
        # An event comes once per link: per event bytes, copies seen on each link and
        # how many were delivered (a copy beyond that on some link is a new event).
        self._event_copies: dict[bytes, list[int]] = {}
        # Client ids are never reused within a process: a hub made after QEMU restarted
        # (README "Deploying") starts after the last one, whose connections may linger.
        self._next_client = first_client
        self._greeting = b""
        self._offered: frozenset[str] = frozenset()
        # Whether the upstream can carry fds (unix sockets; the shell says), and the
        # client that created each fdset (fdpass.py).
        self.upstream_fds = True
        self._fdsets: dict[int, int] = {}
        self._out: list[Action] = []
        # Counters for monitoring (metrics.py), always kept (list-clients shows some).
        # With `metrics` (someone scrapes them) the hub also asks QEMU for its command
        # names once ready, so they can label them (others fold), and times each command's
        # round trip: two clock reads and a histogram slot per command, paid only then.
        # (Kept in one attribute: a Hub has about 30, CPython's limit for the fast
        # shared-key instance dict, past which every `self.x` on the hot path slows.)
        self.stats = Stats(timed=metrics)
        self.stats.learn((WHOAMI, LIST_CLIENTS))

    def _take(self) -> list[Action]:
        out, self._out = self._out, []
        return out

    # --- upstream ---------------------------------------------------------------------------

    def upstream_data(self, data: bytes, link: int = 0) -> list[Action]:
        """Bytes from upstream monitor `link`."""
        up = self.links[link]
        if self.stats.timed:
            self.stats.now = self._clock()
        try:
            for line in up.framer.feed(data):
                if up.state is UpstreamState.READY:
                    self._upstream_message(up, line)
                elif up.state is not UpstreamState.CLOSED:
                    self._handshake(up, bytes(line))
        except OversizedMessageError as exc:
            self._end(1, f"QEMU sent an oversized message: {exc}")
        self._pump()
        return self._take()

    def upstream_closed(
        self, reason: str = "QEMU closed the monitor connection", link: int = 0
    ) -> list[Action]:
        """Upstream monitor `link` is gone; `reason` says how (for the log and exit).

        The session ends when the last link goes, or any before all were ready. A link
        lost while others serve costs only the clients that had commands in flight or
        queued on it, or fds named in it: what became of those commands is unknown, so
        they are closed (with the reason) rather than told something QEMU never said.

        Once QEMU has announced SHUTDOWN every monitor goes, each after what QEMU wrote
        to it: the reply to `quit` may still be on a monitor that closes after another,
        so the session ends cleanly with the last one, not the first."""
        up = self.links[link]
        if self.state is UpstreamState.CLOSED or up.state is UpstreamState.CLOSED:
            return self._take()
        was_ready = up.state is UpstreamState.READY
        up.state = UpstreamState.CLOSED
        self._live.remove(up)
        if not self._live or not was_ready or self.state is not UpstreamState.READY:
            if self.shutdown_seen:
                self._end(0, "QEMU shut down")
            else:
                self._end(1, reason)
            return self._take()
        if self.shutdown_seen:
            bye, why = SHUTDOWN, "QEMU shut down"
        else:
            log.error("lost QEMU monitor link %d (%s); %d link(s) still serve",
                      link, reason, len(self._live))  # fmt: skip
            bye, why = UPSTREAM_LOST, f"lost QEMU monitor link {link}: {reason}"
        for cid, flow in self.clients.items():
            lanes = [lane for lane in (INBAND, OOB) if _lane_link(flow, lane) is up]
            if any(flow.inflight[lane] or flow.queues[lane] for lane in lanes) or (
                flow.link is up and flow.fd_names
            ):
                self._release_views(flow)
                self._drop_fds(flow)
                flow.bye = bye
                self._out.append(CloseClient(cid, why))
            if flow.link is up:
                flow.link = None
            if flow.oob_link is up:
                flow.oob_link = None
        up.forget_commands()
        for line in list(self._event_copies):
            self._event_delivered(line)
        self._pump()
        return self._take()

    def session_over(self, reason: str) -> list[Action]:
        """End the upstream session now, whatever links still serve: the shell reconnects
        every monitor (README "Running it", --reconnect), so a lost one ends it all."""
        if self.state is not UpstreamState.CLOSED:
            self._end(0 if self.shutdown_seen else 1, reason)
        return self._take()

    @property
    def next_client(self) -> int:
        """The id the next client gets."""
        return self._next_client

    @property
    def busy(self) -> bool:
        """Whether a command is still in QEMU or queued to go there (graceful shutdown
        waits until it is not): every such command gets its reply before qmpmux closes."""
        if any(up.in_qemu or any(up.system.queues) for up in self._live):
            return True
        clients = self.clients.values()
        return any(any(flow.queues) or flow.judging or flow.held for flow in clients)

    def _end(self, code: int, reason: str) -> None:
        self.state = UpstreamState.CLOSED
        for cid, flow in self.clients.items():
            self._release_views(flow)
            self._drop_fds(flow)
            flow.bye = SHUTDOWN if code == 0 else UPSTREAM_LOST
            self._out.append(CloseClient(cid, reason))
        self._out.append(Exit(code, reason))

    def _handshake(self, up: Link, line: bytes) -> None:
        try:
            msg = decode_upstream(line)
        except msgspec.DecodeError:
            log.warning("ignoring non-QMP output from QEMU during handshake: %r", line[:200])
            return
        if msg.event is not None:
            # No client is owed an event from before the link is ready. One may even come
            # ahead of the greeting, on a connection made as QEMU starts (docs/protocol.md §4).
            return
        if up.state is UpstreamState.GREETING:
            if not msg.QMP:
                self._end(1, f"QEMU did not greet with QMP: {line[:200]!r}")
                return
            try:
                up.version, caps = decode_greeting(msg.QMP)
            except msgspec.DecodeError:
                self._end(1, f"malformed QMP greeting: {line[:200]!r}")
                return
            up.oob = CAP_OOB in caps
            caps_command = CAPABILITIES_OOB if up.oob else CAPABILITIES_PLAIN
            self._out.append(ToUpstream(caps_command, link=up.index))
            up.state = UpstreamState.NEGOTIATING
        elif msg.id != HANDSHAKE_ID:
            # A command of an earlier connection, answered now: it must not be taken for
            # qmp_capabilities, whose own reply would then answer a client's command.
            log.warning("ignoring a reply from before this connection: %r", line[:200])
        elif msg.error:
            self._end(1, f"QEMU refused qmp_capabilities: {describe_error(msg.error)}")
        else:
            up.state = UpstreamState.READY
            if all(link.state is UpstreamState.READY for link in self.links):
                # Clients see what every link offers: exec-oob may go on any of them.
                first = self.links[0]
                self.version = first.version
                self.oob = all(link.oob for link in self.links)
                self.state = UpstreamState.READY
                self._offered = frozenset({CAP_OOB}) if self.oob else frozenset()
                self._greeting = greeting(self.version, self.oob)
                self._out.append(UpstreamReady(self.version, self.oob))
                if self.stats.timed:  # learn the command label's values (metrics.py)
                    self._system_command(first, QUERY_COMMANDS, None)

    def _upstream_message(self, up: Link, line: Line) -> None:
        try:
            msg = decode_upstream(line)
        except msgspec.DecodeError:
            # A reply that cannot be read is answered with an error in its place, so the
            # replies after it keep theirs: by its id where QEMU prints one, else it is
            # the oldest command's sent without an id (-1: a line that is not a reply).
            upstream_id = numbered(line) if line.startswith(REPLY_OPENINGS) else -1
            if (upstream_id is None and up.anonymous) or upstream_id in up.inflight:
                log.error("QEMU's reply could not be read: %r", bytes(line[:200]))
                withheld = _withheld(upstream_id, _UNREADABLE)
                self._route_reply(up, withheld, GENERIC_ERROR, upstream_id)
            else:
                log.warning("dropping malformed output from QEMU: %r", bytes(line[:200]))
            return
        if msg.event is not None:
            line = bytes(line)  # (a long one's buffer: copied, events are keyed by their bytes)
            # (every lane's copy counts, even once the others have closed: QEMU quitting
            # closes them all, and the last one read may bring a copy still)
            if len(self.links) > 1 and not self._first_copy(up, line):
                return
            if msg.event == SHUTDOWN_EVENT:
                self.shutdown_seen = True
            elif self.shutdown_seen and msg.event in STAYING_EVENTS:
                # The guest shut down under -no-shutdown: QEMU paused and stays, and a
                # monitor that goes now is lost, not closed by QEMU quitting (§9).
                self.shutdown_seen = False
            self.stats.event(msg.event)
            self._fan_out(msg.event, line)
        elif type(msg.id) is int:
            self._route_reply(up, line, upstream_error_class(msg.error), msg.id)
        elif msg.id is not NO_ID:
            log.warning("dropping reply with an id qmpmux did not issue: %r", bytes(line[:200]))
        elif up.anonymous and (msg.ret or msg.error):
            # the oldest command sent without an id (link.py)
            self._route_reply(up, line, upstream_error_class(msg.error))
        elif msg.error:
            # Every command in QEMU has an id: QEMU could not parse what it was sent.
            log.error("QEMU reported an error without id: %s", describe_error(msg.error))
        else:
            log.warning("dropping unexpected message from QEMU: %r", bytes(line[:200]))

    def _first_copy(self, up: Link, line: bytes) -> bool:
        """QEMU writes every event to every monitor (the same bytes), before the reply of
        the command that caused it on that command's monitor: delivering the first copy
        from whichever link keeps each event once and ahead of that reply."""
        copies = self._event_copies.get(line)
        if copies is None:
            if len(self._event_copies) >= _EVENT_COPIES_MAX:  # a link far behind: forget
                del self._event_copies[next(iter(self._event_copies))]
            copies = self._event_copies[line] = [0] * (len(self.links) + 1)
        copies[up.index] += 1
        first = copies[up.index] > copies[-1]
        if first:
            copies[-1] += 1
        self._event_delivered(line)
        return first

    def _event_delivered(self, line: bytes) -> None:
        """Forget an event once every live link has sent all its copies."""
        copies = self._event_copies.get(line)
        if copies is not None and all(copies[up.index] >= copies[-1] for up in self._live):
            del self._event_copies[line]

    def _fan_out(self, name: str, line: bytes) -> None:
        """One event to every negotiated client allowed it: decided once per profile, and
        the same bytes object for every client whose profile does not rewrite it."""
        targets: dict[Profile, list[int] | None] = {}
        for flow in self._negotiated.values():
            profile = flow.session.profile
            clients = targets.get(profile, _UNSEEN)
            if clients is _UNSEEN:
                clients = targets[profile] = [] if profile.event(name) else None
            if clients is not None:
                clients.append(flow.id)
                flow.events += 1
        for profile, listed in targets.items():
            if listed:
                try:
                    data = strip_message(line) if profile.strip_extensions else line
                except msgspec.DecodeError:  # never a member it should not see
                    log.warning("could not strip an event for profile %s; dropped for it: %r",
                                profile.name, line[:200])  # fmt: skip
                    continue
                clients = self._hold_event(data, listed) if self._holding else listed
                if clients:
                    self._out.append(Broadcast(data, clients))

    def _hold_event(self, data: bytes, clients: list[int]) -> list[int]:
        """The clients of `clients` the event goes to now; it waits for the others behind
        a reply being viewed off the loop, which QEMU wrote before it."""
        holding = self._holding
        now = []
        for cid in clients:
            flow = holding.get(cid)
            if flow is None:
                now.append(cid)
            else:
                assert flow.held is not None
                flow.held.append(data)
                flow.reply_bytes += len(data)
        return now

    def _route_reply(
        self, up: Link, line: Line, failed: str, upstream_id: int | None = None
    ) -> None:
        """QEMU's reply to a command sent with `upstream_id`, or without one (None);
        `failed` is its error class, "" for a success."""
        if upstream_id is None:
            cmd = up.anonymous.popleft()
        else:
            sent = up.inflight.pop(upstream_id, None)
            if sent is None:
                log.warning("dropping reply with an id qmpmux did not issue: %r", bytes(line[:200]))
                return
            cmd = sent
            up.ids.give_back(upstream_id)
            if not small(cmd.prefix):
                up.big -= 1
            if upstream_id == up.fd_inflight:
                self._fd_taken(up)
        lane = OOB if cmd.oob else INBAND
        up.lane_inflight[lane] -= 1
        up.inflight_bytes -= len(cmd.prefix)
        session = cmd.session
        name = cmd.name
        debug = _traffic_log.isEnabledFor(logging.DEBUG)
        if cmd.name == ADD_FD and not failed:
            self._fdset_created(session.id, bytes(line))
        if not session.id:
            up.system.inflight[lane] -= 1  # qmpmux's own cleanup: nobody to answer
            self._requeue(up.system, lane)
            if name == QUERY_COMMANDS and not failed:
                self.stats.learn(command_names(bytes(line)))
            return
        # Counted inline (Stats.row): this runs once per command.
        stats = self.stats
        row = stats.commands.get(name)
        if row is None:
            row = stats.row(name)
        row[ERROR_AT if failed else OK_AT] += 1
        if stats.timed:
            took = stats.now - cmd.issued
            hist = stats.hist
            hist[bisect_left(DURATION_BUCKETS, took)] += 1
            hist[-1] += took
        if self.audit:  # also when its client has gone: what ran is on the record
            self._record(
                session, cmd.name, cmd.decision, failed, cmd.arguments, cmd.started,
                cmd.profile, len(cmd.fds),
            )  # fmt: skip
        if debug:
            self._log_reply(session.id, name, failed, len(line), cmd.started)
        flow = self.clients.get(session.id)
        if flow is None:
            return  # its client has gone: the reply is nobody else's
        flow.commands += 1
        flow.inflight[lane] -= 1
        if flow.queues[lane]:
            self._requeue(flow, lane)  # its share of the window has room again
        if cmd.fds:
            flow.fd_busy = False
        profile = session.profile
        view: Line | Exception = line
        if profile.strip_extensions or name in VIEWED:
            views = self.views
            # (query-fdsets is filtered by who owns each fdset as its reply arrives)
            if name != QUERY_FDSETS and views.off_loop(profile, name, line):
                whole = bytes(line)  # (hashed once: the lookup here, the view's memo after)
                remembered = views.remembered(profile, name, whole)  # (a reply polled again)
                if remembered is None:
                    self._view_off_loop(flow, cmd, whole, failed, upstream_id)
                    return
                view = remembered
            else:
                try:
                    view = views.view(profile, name, line)
                except (WithheldError, msgspec.DecodeError) as exc:
                    view = exc
        reply = self._reply(session, cmd, line, view, failed, upstream_id)
        flow.reply_bytes += len(reply)
        if flow.held is not None:  # behind a reply being viewed: in QEMU's order
            flow.held.append((cmd, reply))
            return
        cmd.reply = reply
        self._flush(flow)

    def _reply(
        self,
        session: Session,
        cmd: Command,
        line: Line,
        view: Line | Exception,
        failed: str,
        upstream_id: int | None,
    ) -> Reply:
        """QEMU's reply `line` to `cmd` as its client gets it, from its profile's `view`
        of it (views.py), or the error that stands for a reply that could not be read."""
        # Every change but the id's is made to QEMU's reply as QEMU wrote it (the client's
        # id is its own, and may be long to encode: wire.rewrite_reply). A change reads
        # bytes: a long reply's buffer (wire.Line) is copied only for one.
        name = cmd.name
        try:
            if isinstance(view, Exception):
                raise view
            data = view
            if cmd.names and failed:  # QEMU's error names the fd as QEMU knows it
                data = restore_names(bytes(data), cmd.names)
            elif name == QUERY_FDSETS and session.profile.name != FULL and not failed:
                data = self._own_fdsets(session.id, bytes(data), upstream_id)
            return rewrite_reply(data, upstream_id, cmd.wire_id)
        except WithheldError as exc:
            log.warning("%s: withholding QEMU's reply", exc.desc)
            return rewrite_reply(_withheld(upstream_id, exc.desc), upstream_id, cmd.wire_id)
        except msgspec.DecodeError:  # e.g. QEMU's non-finite numbers where one is reread
            log.warning("could not rewrite QEMU's reply to %r; withholding it: %r",
                        name[:80], bytes(line[:200]))  # fmt: skip
            return rewrite_reply(_withheld(upstream_id, _UNREADABLE), upstream_id, cmd.wire_id)

    def _view_off_loop(
        self, flow: Flow, cmd: Command, line: bytes, failed: str, upstream_id: int | None
    ) -> None:
        """Have QEMU's long reply to `cmd` viewed off the loop; what comes for the client
        meanwhile waits behind it (Flow.held)."""
        job = ViewJob(self.views, flow.session.profile, cmd, line, failed, upstream_id)
        if flow.held is None:
            flow.held = deque()
            self._holding[flow.id] = flow
        flow.held.append(job)
        flow.reply_bytes += job.size
        self._out.append(View(flow.id, job))

    def viewed(self, client: int, job: ViewJob) -> list[Action]:
        """A reply viewed off the event loop (a `View` action) is back: answer its
        command, then send what waited behind it, in QEMU's order."""
        flow = self.clients.get(client)
        held = None if flow is None else flow.held
        if flow is None or held is None or job not in held:
            return self._take()  # the client has gone
        if flow.bye or self.state is not UpstreamState.READY:
            return self._take()  # the hub is closing it: nothing more goes to it
        try:
            self._replay(flow, held)
        except Exception:  # a bug must cost this client its connection, never the proxy
            self._internal_error(flow)
        return self._take()

    def _release_views(self, flow: Flow) -> None:
        """Before the hub closes a client, view here what is still being viewed off the
        loop and send it all: what QEMU answered goes out ahead of the close, as inline."""
        held = flow.held
        if held is None:
            return
        for i in range(len(held)):
            waiting = held[i]
            if type(waiting) is ViewJob and not waiting.done:
                held[i] = job = waiting.again()
                job.run()
        try:
            self._replay(flow, held)
        except Exception:  # (a bug: the client is being closed anyway)
            _client_log.exception("client %d: internal error", flow.id)

    def _replay(self, flow: Flow, held: deque[ViewJob | tuple[Command, Reply] | bytes]) -> None:
        """Send what waited for replies viewed off the loop, up to the next one still out."""
        out = self._out
        sent = 0
        while held:
            head = held[0]
            if type(head) is ViewJob:
                if not head.done:
                    break
                assert head.line is not None, "cancelled only for a client gone"
                view = head.result if head.error is None else head.error
                assert view is not None
                cmd = head.cmd
                reply = self._reply(cmd.session, cmd, head.line, view, head.failed,
                                    head.upstream_id)  # fmt: skip
                flow.reply_bytes += len(reply) - head.size
                cmd.reply = reply
                sent += self._flush(flow, settle=False)
            elif type(head) is tuple:
                cmd, cmd.reply = head
                sent += self._flush(flow, settle=False)
            else:
                assert type(head) is bytes
                out.append(ToClient(flow.id, head))
                flow.reply_bytes -= len(head)
                sent += len(head)
            held.popleft()
        if not held:
            flow.held = None
            del self._holding[flow.id]
        self._settle(flow, sent)

    def _requeue(self, flow: Flow, lane: int) -> None:
        up = _lane_link(flow, lane)
        if flow.queues[lane] and up is not None and flow.ready_on[lane] is not up:
            flow.ready_on[lane] = up
            up.ready[lane].append(flow)

    def _fd_taken(self, up: Link) -> None:
        """QEMU answered the link's fd-carrying command: the next one may go."""
        up.fd_inflight = None
        waiting, up.fd_waiting = up.fd_waiting, []
        for flow, lane in waiting:
            if not flow.closed:
                self._requeue(flow, lane)

    def _fdset_created(self, client: int, line: bytes) -> None:
        try:
            fdset = decode_fdset(line)
        except msgspec.DecodeError:
            log.warning("unexpected add-fd reply from QEMU: %r", line[:200])
            return
        self._fdsets.setdefault(fdset, client)
        if client not in self.clients and self._fdsets[fdset] == client:
            self._forget_fdsets(client)  # it left before QEMU answered

    def _own_fdsets(self, client: int, reply: bytes, upstream_id: int | None) -> bytes:
        """`query-fdsets` as a client that may not see others' fdsets sees it."""

        def own(value: bytes) -> bytes:
            sets = msgspec.json.decode(value)
            kept = [s for s in sets if self._fdsets.get(s.get("fdset-id")) == client]
            return encode(kept)

        try:
            return replace_return(reply, own)
        except (msgspec.DecodeError, AttributeError):
            log.warning("could not filter a malformed query-fdsets reply; withholding it")
            return _withheld(upstream_id, "qmpmux could not filter query-fdsets")

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
            max_message_bytes=self.listener_message_bytes.get(
                peer.listener, self.limits.max_message_bytes
            ),
            max_tokens=QEMU_MAX_TOKENS - 8,  # qmpmux adds `,"id":N` upstream
            defer_members=DEFERRED_MEMBERS,
            read_members=READ_MEMBERS,
            part_members=PART_MEMBERS,
        )
        profile = self._assign(peer)
        flow = Flow(Session(cid, peer, self._offered, framer, profile, self.protected))
        flow.connected = self._wallclock()
        self.clients[cid] = flow
        self.log_client(
            logging.INFO, "connect", peer.listener,
            "client %d: connected on %s (%s), profile %s",
            cid, peer.listener, _who(peer), profile.name,
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
        flow = self.clients.get(client)
        if flow is not None and flow.session.phase is Phase.NEGOTIATING:
            flow.bye = NEGOTIATION_TIMEOUT
            timeout = self.limits.negotiation_timeout
            self.log_client(
                logging.WARNING, "negotiation", flow.session.peer.listener,
                "client %d: did not negotiate within %g s; closing it", client, timeout,
            )  # fmt: skip
            self._out.append(CloseClient(client, f"did not negotiate within {timeout:g} s"))
        return self._take()

    def client_data(self, client: int, data: bytes, fds: Sequence[int] = ()) -> list[Action]:
        """Bytes from a client, and the fds that came with them (SCM_RIGHTS): they wait
        for the client's next command that takes one, as on a QEMU monitor. A read brings
        the fds of at most one `sendmsg`, the last one it reaches (the kernel stops there),
        so they are the client's newest whichever of the read's commands comes first."""
        flow = self.clients.get(client)
        if flow is None or flow.draining:
            if fds:
                self._out.append(CloseFds(tuple(fds)))
            return self._take()
        if fds:
            self._receive_fds(flow, fds)
        try:
            for value in flow.session.framer.feed(data):
                self._accept(flow, value)
        except Exception:  # a bug must cost this client its connection, never the proxy
            self._internal_error(flow)
            return self._take()
        self._after_input(flow)
        return self._take()

    def _internal_error(self, flow: Flow) -> None:
        _client_log.exception("client %d: internal error; disconnecting it", flow.id)
        flow.bye = INTERNAL_ERROR
        self._out.append(CloseClient(flow.id, "internal error"))

    def _after_input(self, flow: Flow, judged: bool = False) -> None:
        """Send what the client's input answered, bound what qmpmux holds for it, and let
        its commands go upstream. `judged`: after a message judged off the loop, whose
        pause ends here unless the bounds keep it (as they would have without it)."""
        client = flow.id
        # Before the flush moves ready replies to the shell (`_held`, inline: hot).
        held = flow.queued_bytes + flow.reply_bytes + self.queued_bytes(client)
        self._flush(flow)
        if flow.fd_busy and not flow.paused:
            # One command with this client's fd at a time: qmpmux holds at most one
            # read's worth of its fds (QEMU takes at most 16 per message).
            flow.paused = True
            self._out.append(PauseClient(client))
        if flow.session.phase is Phase.COMMAND and client not in self._negotiated:
            # Negotiation replies are all local, so the success reply has just been sent:
            # events flow from here on, never before.
            self._negotiated[client] = flow
        limits = self.limits
        over = flow.pending >= limits.max_pending or held >= limits.max_pending_bytes
        if over and not flow.paused:
            # Whatever a client makes qmpmux hold, it holds only until the bound: reading
            # pauses (and resumes as the backlog drains), so a client that reads is never
            # cut off for bytes qmpmux chose to hold, and one that does not is cut off by
            # its outbox bound alone.
            flow.paused = True
            self._out.append(PauseClient(client))
        elif judged and flow.paused and not over and not flow.fd_busy and flow.judging is None:
            # Paused for the judging alone (a pause earlier in its read would have been
            # for an fd: the bounds are checked after a read): it reads on.
            flow.paused = False
            self._out.append(ResumeClient(client))
        self._pump()

    def _receive_fds(self, flow: Flow, fds: Sequence[int]) -> None:
        """The client's newest fds replace (close) its waiting ones; a client that could
        never hand them on (its profile allows neither getfd nor add-fd, or the upstream
        is not a unix socket) has them closed at once."""
        profile = flow.session.profile
        usable = self.upstream_fds and any(
            profile.command(name) is not Decision.DENY for name in TAKES_FD
        )
        if flow.fds:
            self._out.append(CloseFds(tuple(flow.fds)))
            flow.fds = []
        if usable:
            flow.fds = list(fds)
        else:
            self._out.append(CloseFds(tuple(fds)))

    def _with_fds(self, flow: Flow, cmd: Command, facts: FdFacts) -> Local | None:
        """Ready a command that takes an fd or an fd name for the shared monitor; or the
        reply QEMU would give when it cannot go (see fdpass.py). `facts` are what its
        arguments say (read with the verdict: judgement.py); this adds what only the hub
        knows, whose fdsets are whose, and hands the client's fd on."""
        name = cmd.name
        takes_fd = name in TAKES_FD and not cmd.oob  # exec-oob: QEMU refuses it without one
        problem = facts.problem
        if facts.digit:  # QEMU takes the fd and closes it
            self._out.append(CloseFds(tuple(flow.fds)))
            flow.fds = []
        if problem is None and name == REMOVE_FD:
            problem = self._fdset_problem(flow, facts, own=True)
        elif problem is None and takes_fd and name == ADD_FD:
            problem = self._fdset_problem(flow, facts, own=False)
        if problem is not None:
            reply = error_reply(cmd.wire_id, GENERIC_ERROR, problem)
            return Local(reply, cmd.oob, name, cmd.decision, cmd.arguments)
        if facts.too_long:  # (the command goes nowhere: its prefix no matter)
            reply = error_reply(None, GENERIC_ERROR, TOO_BIG_UPSTREAM)
            return Local(reply, cmd.oob, name, cmd.decision, cmd.arguments)
        if facts.prefix is not None:
            cmd.prefix, cmd.names = facts.prefix, facts.names
        if takes_fd:
            first, *rest = flow.fds
            if rest:  # QEMU closes all but the first
                self._out.append(CloseFds(tuple(rest)))
            cmd.fds, flow.fds, flow.fd_busy = (first,), [], True
            if facts.fdname is not None:
                flow.fd_names.add(facts.fdname)
        return None

    def _fdset_problem(self, flow: Flow, facts: FdFacts, *, own: bool) -> str | None:
        """fdsets are global in QEMU: `full` keeps that; every other profile adds to and
        removes only fdsets it created (QEMU's own error for one it may not see)."""
        fdset = facts.fdset
        if flow.session.profile.name == FULL or fdset is None:
            return None
        if self._fdsets.get(fdset, flow.id) == flow.id:
            return None
        if not own:
            return f"fdset {fdset} belongs to another client (refused by qmpmux policy)"
        if facts.fd is not None:
            return f"File descriptor named 'fdset-id:{fdset}, fd:{facts.fd}' not found"
        return f"File descriptor named 'fdset-id:{fdset}' not found"

    def _accept(self, flow: Flow, value: JsonValue | ParseError) -> None:
        if flow.judging is not None:  # behind a message being judged: its turn comes after
            flow.judging.waiting.append(value)
            return
        if off_loop(value, self.off_loop_bytes) and flow.session.phase is Phase.COMMAND:
            epoch = self.stats.reloads[OK]
            flow.judging = job = Judgement(flow.session, value, bool(flow.fds), epoch)
            self._out.append(Judge(flow.id, job))
            if not flow.paused:
                flow.paused = True
                self._out.append(PauseClient(flow.id))
            return
        self._apply_verdict(flow, *judge(flow.session, value, bool(flow.fds)))

    def judged(self, client: int, job: Judgement) -> list[Action]:
        """A message judged off the event loop (a `Judge` action) is back: act on its
        verdict, then on the client's inputs that waited behind it."""
        flow = self.clients.get(client)
        if flow is None or flow.judging is not job:
            return self._take()  # the client has gone
        flow.judging = None
        if flow.bye or self.state is not UpstreamState.READY:
            job.cancel()  # the hub is closing it: nothing more of it goes anywhere
            return self._take()
        try:
            if job.error is not None:
                raise job.error
            assert job.value is not None, "cancelled only for a client gone or closing"
            if job.profile is not flow.session.profile or job.epoch != self.stats.reloads[OK]:
                self._accept(flow, job.value)  # reloaded meanwhile: judged again
            else:
                assert job.verdict is not None
                self._apply_verdict(flow, job.verdict, job.facts)
            waiting = job.waiting
            while waiting and flow.judging is None:
                self._accept(flow, waiting.popleft())
            if flow.judging is not None:  # another big one: the rest waits for it
                flow.judging.waiting += waiting
        except Exception:  # a bug must cost this client its connection, never the proxy
            self._internal_error(flow)
            return self._take()
        self._after_input(flow, judged=True)
        return self._take()

    def _apply_verdict(self, flow: Flow, verdict: Verdict, facts: FdFacts | None) -> None:
        """Act on the verdict on one input: a command is queued for QEMU, anything else is
        answered here, in the client's order."""
        kind = type(verdict)
        if kind is Command:
            assert isinstance(verdict, Command)
            if facts is not None:
                local = self._with_fds(flow, verdict, facts)
                if local is not None:
                    (flow.oob_replies if local.oob else flow.replies).append(local.data)
                    flow.reply_bytes += len(local.data)
                    self._judged_locally(flow, local)
                    return
            if _traffic_log.isEnabledFor(logging.DEBUG):
                self._log_command(flow.id, verdict)
                verdict.started = self._clock()
            elif self.audit:
                verdict.started = self._clock()
            self._enqueue(flow, verdict)
            return
        if kind is Extension:
            assert isinstance(verdict, Extension)
            verdict = self._extension(flow, verdict)
        assert isinstance(verdict, Local)
        if _traffic_log.isEnabledFor(logging.DEBUG):
            _traffic_log.debug(
                "client %d: %r answered by qmpmux (%d bytes)",
                flow.id, clipped(verdict.name or "-", 80), len(verdict.data),
            )  # fmt: skip
        (flow.oob_replies if verdict.oob else flow.replies).append(verdict.data)
        flow.reply_bytes += len(verdict.data)
        if verdict.decision is not None:
            self._judged_locally(flow, verdict)

    def _log_command(self, client: int, cmd: Command) -> None:
        """Debug: the command, its arguments redacted as the audit log's are, its size."""
        args = decode_prefix(cmd.prefix).get(ARGUMENTS)
        shown = (
            encode(redact(cmd.name, args)).decode(errors="replace")
            if isinstance(args, dict)
            else "-"
        )
        _traffic_log.debug(
            "client %d: %s %r %.300s (%d bytes)",
            client, "exec-oob" if cmd.oob else "execute", cmd.name[:80], shown, len(cmd.prefix),
        )  # fmt: skip

    def _log_reply(
        self, client: int, name: str, failed: str, size: int, started: float | None
    ) -> None:
        """Debug: how a command went, and the reply's size (never its payload)."""
        took = (self._clock() - started) * 1000 if started is not None else 0.0
        _traffic_log.debug(
            "client %d: %r reply: %r (%d bytes, %.3f ms)",
            client, name[:80], (failed or "ok")[:60], size, took,
        )  # fmt: skip

    def reload(self, policy: Policy) -> list[Action]:
        """Apply a new policy to every client's next command and event, and to every
        command still queued inside qmpmux: a command is judged by the policy in force
        when it goes upstream, so one the new policy denies is answered with its denial,
        in the client's order, and never reaches QEMU."""
        self.policy = policy
        self.stats.reloads[OK] += 1
        self.views.forget()
        for flow in self.clients.values():
            flow.session.profile = self._assign(flow.session.peer)
            refused = False
            for queue in flow.queues:
                for cmd in list(queue):
                    denial = flow.session.rejudge(cmd)
                    if denial is None:
                        continue
                    queue.remove(cmd)
                    flow.queued_bytes -= len(cmd.prefix)
                    queued_on = _lane_link(flow, OOB if cmd.oob else INBAND)
                    if queued_on is not None:
                        queued_on.queued_bytes -= len(cmd.prefix)
                    cmd.reply = denial
                    flow.reply_bytes += len(denial)
                    refused = True
                    self._judged_locally(
                        flow, Local(denial, cmd.oob, cmd.name, Decision.DENY, cmd.arguments)
                    )
            if refused:
                for lane in (INBAND, OOB):  # an in-band queue may have waited on exec-oob
                    self._requeue(flow, lane)
                self._flush(flow)
        self._pump()
        return self._take()

    def _assign(self, peer: Peer) -> Profile:
        return self.policy.assign(peer.listener, peer.profile, peer.uid, peer.gid, peer.exe)

    def _judged_locally(self, flow: Flow, verdict: Local) -> None:
        assert verdict.name is not None and verdict.decision is not None
        label = verdict.name if type(verdict.name) is str else OTHER  # a long name is no label
        if verdict.decision is Decision.DENY:
            self.stats.denial(flow.session.profile.name, label)
            flow.denials += 1
        else:  # qmpmux's own commands, fd commands refused and long names, as QEMU would
            self.stats.row(label)[ERROR_AT if error_class(verdict.data) else OK_AT] += 1
            flow.commands += 1
        if verdict.decision is Decision.DENY:
            note = self.log_limit.admit("denial", flow.session.peer.listener)
            if note is not None:  # a flood, even one reconnecting, must not flood the log
                _client_log.warning(
                    "client %d: %r denied by profile %s%s", flow.id, clipped(verdict.name, 80),
                    flow.session.profile.name, note,
                )  # fmt: skip
        if self.audit:
            self._record(
                flow.session, verdict.name, verdict.decision, error_class(verdict.data),
                verdict.arguments, None, flow.session.profile.name,
            )  # fmt: skip

    def _record(
        self,
        session: Session,
        name: str | LongString,
        decision: Decision,
        result: str,
        arguments: Audited,
        started: float | None,
        profile: str,
        fds: int = 0,
    ) -> None:
        """One audit record: who ran what, what the policy said, and how it went."""
        peer = session.peer
        now = self._wallclock()
        record: dict[str, object] = {"time": _iso_time(now)}
        if self.vm is not None:
            record["vm"] = self.vm
        record |= {
            "client": session.id,
            "listener": peer.listener,
            "uid": peer.uid,
            "gid": peer.gid,
            "pid": peer.pid,
            "profile": profile,
            "command": clipped(name, _RECORDED_NAME_MAX),
            "decision": decision.value,
            "result": result or "ok",
            "latency_ms": round((self._clock() - started) * 1000, 3) if started else 0.0,
        }
        if len(name) > _RECORDED_NAME_MAX:  # a client's megabyte of name, not a command
            record["command_chars"] = len(name)
        if fds:
            record["fds"] = fds
        if isinstance(arguments, int):  # too big to record: only how big
            record["arguments_bytes"] = arguments
        elif arguments is not None:
            record["arguments"] = redact(name if type(name) is str else "", arguments)
        if decision is Decision.AUDIT:
            note = self.log_limit.admit("audit-only", peer.listener)
            if note is not None:
                _client_log.warning(
                    "client %d: %r would be denied by profile %s (audit-only)%s",
                    session.id, clipped(name, 80), profile, note,
                )  # fmt: skip
        self._out.append(Audit(encode_record(record)))

    def _extension(self, flow: Flow, ext: Extension) -> Local:
        """qmpmux's own commands (`__org.qmpmux_*`), answered in the client's order."""
        if ext.given and ext.name in (WHOAMI, LIST_CLIENTS):
            desc = f"Parameter '{qdict_order(ext.given)[0]}' is unexpected"
            reply = error_reply(ext.wire_id, "GenericError", desc)
            return Local(reply, ext.oob, ext.name, ext.decision, ext.arguments)
        if ext.name == WHOAMI:
            value: JsonValue = self._identity(flow)
        elif ext.name == LIST_CLIENTS:
            value = [self._identity(s) for s in self.clients.values()]
        else:
            desc = f"The command {ext.name} has not been found"
            reply = error_reply(ext.wire_id, "CommandNotFound", desc)
            return Local(reply, ext.oob, ext.name, ext.decision, ext.arguments)
        reply = return_reply(ext.wire_id, encode(value))
        return Local(reply, ext.oob, ext.name, ext.decision, ext.arguments)

    def _identity(self, flow: Flow) -> dict[str, JsonValue]:
        peer = flow.session.peer
        inflight = flow.inflight[INBAND] + flow.inflight[OOB]
        return {
            "client": flow.id,
            "listener": peer.listener,
            "profile": flow.session.profile.name,
            "uid": peer.uid,
            "gid": peer.gid,
            "pid": peer.pid,
            "exe": peer.exe,
            "address": peer.address or None,
            "negotiated": flow.session.phase is Phase.COMMAND,
            "oob": flow.session.oob,
            "commands-in-flight": inflight,
            "bytes-queued": self.queued_bytes(flow.id),
            "connected-at": _iso_time(flow.connected),
            "commands": flow.commands,
            "denials": flow.denials,
            "events": flow.events,
        }

    def client_drained(self, client: int) -> list[Action]:
        """The shell sent everything queued for a paused client: maybe resume reading."""
        flow = self.clients.get(client)
        if flow is not None and flow.paused:
            self._settle(flow)
        return self._take()

    def client_eof(self, client: int) -> list[Action]:
        """The client shut down its sending side: answer what it sent, then close."""
        flow = self.clients.get(client)
        if flow is not None:
            flow.draining = True
            self._settle(flow)
        return self._take()

    def client_closed(self, client: int, reason: str = CLOSED) -> list[Action]:
        """The connection is gone: drop its queued commands; late replies are discarded.

        `reason` is the shell's word for how (metrics.py's disconnect reasons); when the
        hub itself asked for the close, its own reason wins."""
        flow = self.clients.pop(client, None)
        if flow is None:
            return []
        self.stats.disconnect(flow.bye or reason)
        flow.closed = True
        self._negotiated.pop(client, None)
        self._per_listener[flow.session.peer.listener] -= 1
        if flow.judging is not None:
            flow.judging.cancel()
        if flow.held is not None:
            for waiting in flow.held:
                if type(waiting) is ViewJob:
                    waiting.cancel()
            flow.held = None
            del self._holding[client]
        self._drop_fds(flow)
        for lane, queue in enumerate(flow.queues):
            queued_on = _lane_link(flow, lane)
            if queued_on is not None:
                queued_on.queued_bytes -= sum(len(cmd.prefix) for cmd in queue)
            queue.clear()
        flow.queued_bytes = 0
        up = flow.link
        if up is not None and up.state is UpstreamState.READY:
            # A native monitor keeps a departed client's named fds until QEMU exits;
            # qmpmux closes them (in the monitor that has them), and removes its fdsets
            # as QEMU does when its last client leaves.
            for name in sorted(flow.fd_names):
                self._system_command(up, CLOSEFD, {"fdname": upstream_name(client, name)})
        self._forget_fdsets(client)
        flow.replies.clear()
        flow.oob_replies.clear()
        flow.reply_bytes = 0
        if not self.clients:
            self.views.forget(everything=True)  # nobody left to poll what it remembers
        self.log_client(
            logging.INFO,
            "disconnect",
            flow.session.peer.listener,
            "client %d: disconnected",
            client,
        )
        self._pump()
        return self._take()

    def _drop_fds(self, flow: Flow) -> None:
        """Close every fd the client passed that has not gone to QEMU yet."""
        held = [*flow.fds, *(fd for queue in flow.queues for cmd in queue for fd in cmd.fds)]
        flow.fds = []
        if held:
            self._out.append(CloseFds(tuple(held)))

    def _forget_fdsets(self, client: int) -> None:
        """Remove the fdsets `client` created (QEMU closes their fds; a device using one
        keeps its own duplicate)."""
        fdsets = [n for n, owner in self._fdsets.items() if owner == client]
        if fdsets and self._live:
            up = self._live[0]  # fdsets are global: any monitor will do
            for fdset in fdsets:
                del self._fdsets[fdset]
                self._system_command(up, REMOVE_FD, {"fdset-id": fdset})

    def _system_command(self, up: Link, name: str, args: dict[str, JsonValue] | None) -> None:
        """A command of qmpmux's own on monitor `up`; its reply is dropped."""
        system = up.system
        system.link = system.oob_link = up
        self._enqueue(system, Command(system.session, name, command_prefix(name, args, False),
                                      None, False))  # fmt: skip

    def _enqueue(self, flow: Flow, cmd: Command) -> None:
        lane = OOB if cmd.oob else INBAND
        if flow.session.id:  # nobody waits for qmpmux's own replies
            (flow.oob_replies if cmd.oob else flow.replies).append(cmd)
            # A client moves only when it has nothing in QEMU, and only off a monitor that
            # has something: an idle one is as good as any (and a sequential client then
            # costs no choosing at all).
            if lane == INBAND:
                link = flow.link
                if link is None or (
                    len(self._live) > 1
                    and not (flow.inflight[INBAND] or flow.queues[INBAND] or flow.fd_names)
                    and (link.inflight_bytes or link.queued_bytes)
                ):
                    flow.link = self._pick_link()  # free to move: it has nothing in QEMU
            elif (link := flow.oob_link) is None or (
                len(self._live) > 1
                and not (flow.inflight[OOB] or flow.queues[OOB])
                and (link.inflight_bytes or link.queued_bytes)
            ):
                # exec-oob overtakes in-band work by design, on any monitor: it goes where
                # no big command's bytes are ahead of it (not even its own client's).
                flow.oob_link = self._pick_link()
        up = _lane_link(flow, lane)
        assert up is not None
        flow.queues[lane].append(cmd)
        flow.queued_bytes += len(cmd.prefix)
        up.queued_bytes += len(cmd.prefix)
        if flow.ready_on[lane] is not up:  # not there yet, or listed where it was before
            flow.ready_on[lane] = up
            up.ready[lane].append(flow)

    def _pick_link(self) -> Link:
        """The least loaded live monitor: clients spread by load, and a client that has
        nothing in QEMU leaves a monitor busy with a big or slow command."""
        live = self._live
        if len(live) == 1:
            return live[0]
        self._turn = (self._turn + 1) % len(live)
        order = live[self._turn :] + live[: self._turn]
        return min(order, key=lambda up: up.load)

    def _issue(self, up: Link, cmd: Command) -> tuple[int | None, CommandText]:
        """The command's upstream id (None: it goes without one, link.py) and bytes."""
        prefix = cmd.prefix
        if small(prefix):
            if not (cmd.oob or cmd.fds or up.big):
                up.anonymous.append(cmd)
                return None, command_bytes(prefix, None)
        else:
            up.big += 1
        upstream_id = up.ids.take()
        up.inflight[upstream_id] = cmd
        return upstream_id, command_bytes(prefix, upstream_id)

    def _pump(self) -> None:
        """Fill every live monitor's window from its clients' queues."""
        if self.state is not UpstreamState.READY:
            return
        for up in self._live:
            if up.ready[INBAND] or up.ready[OOB]:
                self._pump_link(up)

    def _pump_link(self, up: Link) -> None:
        """Fill one monitor's lanes from its clients' queues: within a lane round-robin,
        one command per client a turn; across lanes alternately when both have work, so
        exec-oob floods cannot starve other clients (QEMU's OOB promise is per monitor:
        a client's in-band commands wait for its own earlier exec-oob, see below)."""
        # Each command's round trip starts here (0.0 when nobody times them).
        now = self._clock() if self.stats.timed else 0.0
        limits = self.limits
        window, share, budget = limits.upstream_window, limits.client_window, limits.upstream_bytes
        ready, inflight = up.ready, up.lane_inflight
        chunks: list[CommandText] = []
        while up.inflight_bytes < budget:
            oob_can = bool(ready[OOB]) and inflight[OOB] < window
            inband_can = bool(ready[INBAND]) and inflight[INBAND] < window
            if oob_can and inband_can:
                lane = INBAND if up.last_lane == OOB else OOB
            elif oob_can or inband_can:
                lane = OOB if oob_can else INBAND
            else:
                break
            flow = ready[lane].popleft()
            if flow.ready_on[lane] is not up:
                continue  # listed before it moved: it is listed where it is now
            queue = flow.queues[lane]
            if (
                flow.closed
                or not queue
                or flow.inflight[lane] >= share
                # QEMU dispatches an exec-oob as soon as it reads it, so a client's
                # in-band command never goes before its earlier out-of-band ones.
                or (lane == INBAND and flow.queues[OOB])
            ):
                flow.ready_on[lane] = None  # re-queued when that changes
                continue
            cmd = queue[0]
            if cmd.fds and up.fd_inflight is not None:
                # QEMU reads ahead of execution (with oob), and an fd-carrying read closes
                # the fds an earlier command has not taken yet: one at a time.
                flow.ready_on[lane] = None
                up.fd_waiting.append((flow, lane))
                continue
            queue.popleft()
            flow.queued_bytes -= len(cmd.prefix)
            up.queued_bytes -= len(cmd.prefix)
            up.inflight_bytes += len(cmd.prefix)
            upstream_id, data = self._issue(up, cmd)
            cmd.issued = now
            if cmd.fds:  # in a sendmsg of its own, so the fd comes with its own first byte
                if chunks:
                    self._out.append(ToUpstream(upstream_write(chunks), link=up.index))
                    chunks = []
                up.fd_inflight = upstream_id
                self._out.append(ToUpstream(data, cmd.fds, up.index))
            else:
                chunks.append(data)
            inflight[lane] += 1
            flow.inflight[lane] += 1
            up.last_lane = lane
            if queue:
                ready[lane].append(flow)
            else:
                flow.ready_on[lane] = None
                if lane == OOB:  # its in-band queue waited for this exec-oob
                    self._requeue(flow, INBAND)
        if chunks:
            self._out.append(ToUpstream(upstream_write(chunks), link=up.index))

    def _flush(self, flow: Flow, settle: bool = True) -> int:
        """Send the client's replies that are ready, each stream in input order; how many
        bytes. `settle`: see what that allows (else the caller does, once done)."""
        out = self._out
        cid = flow.id
        sent = 0
        for replies in (flow.oob_replies, flow.replies):
            while replies:
                head = replies[0]
                if type(head) is Command:
                    if head.reply is None:
                        break
                    data = head.reply
                else:
                    data = head  # type: ignore[assignment]
                out.append(ToClient(cid, data))
                sent += len(data)
                replies.popleft()
        flow.reply_bytes -= sent
        if settle:
            self._settle(flow, sent)
        return sent

    def _held(self, flow: Flow) -> int:
        """Every byte qmpmux holds for a client: its commands not yet sent upstream,
        replies waiting behind an earlier command, and what waits in its outbox."""
        return flow.queued_bytes + flow.reply_bytes + self.queued_bytes(flow.id)

    def _settle(self, flow: Flow, flushed: int = 0) -> None:
        """Flow control and half-close bookkeeping after the client's backlog shrank.

        `flushed` bytes were just handed to the shell for this client and are not in its
        outbox yet."""
        limits = self.limits
        if (
            flow.paused
            and not flow.fd_busy
            and flow.judging is None
            and flow.pending <= limits.max_pending // 2
            and self._held(flow) + flushed <= limits.max_pending_bytes // 2
        ):
            flow.paused = False
            self._out.append(ResumeClient(flow.id))
        if flow.draining and not flow.pending and flow.judging is None:
            flow.bye = CLOSED
            self._out.append(CloseClient(flow.id, "client finished sending"))
