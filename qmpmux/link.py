"""One upstream monitor connection to QEMU ("link"): what the hub keeps for it (I/O free).

QEMU serves several QMP monitors at once and reads them in parallel, each one byte at a
time (docs/protocol.md §1.1), so qmpmux may hold several links to one QEMU ("lanes") and
spread its clients over them. Each link has its own handshake, framer, upstream ids,
window of commands in QEMU, and fd barrier (fds and fd names live in one monitor).

Invariants:
- `inflight` maps this link's upstream ids to the commands sent with one that QEMU has
  not answered; `anonymous` holds, oldest first, the in-band commands sent without an id
  (docs/protocol.md §7.2: a monitor answers its in-band input in order, so their replies
  are told apart by place, and QEMU reads 7 fewer bytes for each).
- `big` counts the commands in `inflight` too big to go without an id (wire.small),
  in-band or exec-oob. While any is in QEMU, every command goes with an id: a big
  command may be the client's own text, the only upstream input QEMU could fail to
  parse, and parse errors carry no id and take an in-band place (§6.3), so nothing
  without an id may be sent behind it. Every command in `anonymous` is therefore ahead
  of every big one in QEMU's input. (exec-oob and fd-carrying commands that are small
  go with an id too, but hold nothing back: qmpmux wrote them.)
- `ready[lane]` holds the flows assigned to this link that have commands queued for that
  lane (in-band or out-of-band) and room in their share of the window.
- `system` queues qmpmux's own commands for this link (closing a departed client's fds).
"""

from __future__ import annotations

import enum
from collections import deque

from qmpmux.flow import Flow
from qmpmux.ids import IdPool
from qmpmux.qjson import Framer
from qmpmux.session import Command, Peer, Session
from qmpmux.wire import UpstreamFramer

INBAND, OOB = 0, 1  # the two queues of a monitor: in-band commands and exec-oob


class UpstreamState(enum.Enum):
    GREETING = "greeting"
    NEGOTIATING = "negotiating"
    READY = "ready"
    CLOSED = "closed"


class Link:
    """An upstream monitor: handshake state, framer, id pool, window and fd barrier."""

    __slots__ = (
        "anonymous",
        "big",
        "fd_inflight",
        "fd_waiting",
        "framer",
        "ids",
        "index",
        "inflight",
        "inflight_bytes",
        "lane_inflight",
        "last_lane",
        "oob",
        "queued_bytes",
        "ready",
        "state",
        "system",
        "version",
    )

    def __init__(self, index: int) -> None:
        self.index = index
        self.state = UpstreamState.GREETING
        self.version = b""
        self.oob = False
        self.framer = UpstreamFramer()
        self.ids = IdPool()
        self.inflight: dict[int, Command] = {}
        self.anonymous: deque[Command] = deque()
        self.big = 0
        self.ready: tuple[deque[Flow], deque[Flow]] = (deque(), deque())
        self.lane_inflight = [0, 0]
        self.inflight_bytes = 0
        self.queued_bytes = 0  # commands of the flows on this link not sent yet
        self.last_lane = INBAND
        # The upstream id of the one fd-carrying command QEMU has not answered yet, and
        # the flows whose next command waits for it (fdpass.py).
        self.fd_inflight: int | None = None
        self.fd_waiting: list[tuple[Flow, int]] = []
        self.system = Flow(Session(0, Peer(f"qmpmux link {index}"), frozenset(), Framer()))

    @property
    def in_qemu(self) -> int:
        """Commands sent on this monitor and not answered yet."""
        return len(self.inflight) + len(self.anonymous)

    def forget_commands(self) -> None:
        """The monitor is gone: no reply will come for what it held."""
        self.inflight.clear()
        self.anonymous.clear()
        self.big = 0

    @property
    def load(self) -> int:
        """What a command sent now waits behind here, in bytes QEMU must read or run:
        bytes in flight and queued, and a few hundred bytes' worth per command."""
        commands = self.lane_inflight[INBAND] + self.lane_inflight[OOB]
        return self.inflight_bytes + self.queued_bytes + 512 * commands
