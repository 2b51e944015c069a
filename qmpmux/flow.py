"""What the hub keeps per client to schedule its commands and bound what it holds (I/O free).

The protocol state of a client (phase, capabilities, framer, profile) is its `Session`'s,
and only the session changes it. Everything here is the hub's, and only the hub writes it:
the order replies must leave in, commands waiting for their turn upstream, how many are
in QEMU now, the bytes qmpmux holds, and whether reading is paused.

Invariants:
- `replies` and `oob_replies` hold, in input order, ready reply bytes and `Command`s still
  waiting for QEMU; `reply_bytes` is the size of the ready ones among them.
- `queued_bytes` is the size of the commands in `queues` (what they cost upstream).
- `ready_on[lane]` is the monitor (link.Link) whose ready list of that lane holds the flow,
  or None: an entry in any other monitor's list is stale (the client moved) and that
  monitor drops it.
- While `judging` is set, the client's reading is paused and every input framed after
  the judged one waits in it (`Judgement.waiting`): inputs are judged in their order.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from qmpmux.session import Command, Session
from qmpmux.wire import Reply

if TYPE_CHECKING:
    from qmpmux.judgement import Judgement
    from qmpmux.link import Link
    from qmpmux.views import ViewJob


class Flow:
    """The hub's record of one client: reply order, queues, in-flight counts, backpressure."""

    __slots__ = (
        "bye",
        "closed",
        "commands",
        "connected",
        "denials",
        "draining",
        "events",
        "fd_busy",
        "fd_names",
        "fds",
        "held",
        "id",
        "inflight",
        "judging",
        "link",
        "oob_link",
        "oob_replies",
        "paused",
        "queued_bytes",
        "queues",
        "ready_on",
        "replies",
        "reply_bytes",
        "session",
    )

    def __init__(self, session: Session) -> None:
        self.session = session
        self.id = session.id
        # Replies in input order, one stream per path: bytes are ready, a Command waits.
        self.replies: deque[Reply | Command] = deque()
        self.oob_replies: deque[Reply | Command] = deque()
        # Commands not yet sent upstream, per lane (INBAND, OOB): the hub sends them
        # round-robin within each lane's window; `inflight` counts what QEMU has now.
        self.queues: tuple[deque[Command], deque[Command]] = (deque(), deque())
        self.inflight = [0, 0]
        self.ready_on: list[Link | None] = [None, None]
        # The upstream monitor its commands go to (link.Link; None until its first). It
        # moves only when nothing of it is in QEMU and it has no fd named there.
        self.link: Link | None = None
        # Where its exec-oob commands go: any monitor, as they overtake in-band work.
        self.oob_link: Link | None = None
        self.queued_bytes = 0
        # Bytes of replies that are made (locally, or by QEMU) but wait in `replies` or
        # `oob_replies` behind an earlier unanswered command: held by qmpmux, so counted.
        self.reply_bytes = 0
        self.paused = False
        # A big message being judged off the event loop (judgement.py); the inputs read
        # after it wait in it for its verdict, and reading pauses meanwhile.
        self.judging: Judgement | None = None
        # QEMU's replies to it being viewed off the event loop (views.ViewJob), with what
        # came for it after each, replies and events, in QEMU's order: sent when the
        # view ahead is back (Hub.viewed). None while nothing waits so.
        self.held: deque[ViewJob | tuple[Command, Reply] | bytes] | None = None
        self.draining = False
        self.closed = False
        # File descriptors (fdpass.py): the ones its latest fd-carrying read brought, still
        # waiting for a command that takes one; the names it gave with getfd (closed in
        # QEMU when it leaves); whether a command with its fd is unanswered (reading
        # pauses meanwhile, so qmpmux never holds more than one read's worth of its fds).
        self.fds: list[int] = []
        self.fd_names: set[str] = set()
        self.fd_busy = False
        # For list-clients and metrics: when it connected (wall clock), its commands
        # answered (by QEMU or qmpmux), denied, and events delivered; and why the hub
        # closed it, when the hub did (metrics.py's disconnect reasons).
        self.connected = 0.0
        self.commands = 0
        self.denials = 0
        self.events = 0
        self.bye = ""

    @property
    def pending(self) -> int:
        """Inputs read but not yet answered: what flow control bounds."""
        return len(self.replies) + len(self.oob_replies)
