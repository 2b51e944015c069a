"""One complete client input judged: the session's verdict, and for a command that takes or
names fds, what its arguments say (fdpass.FdFacts). I/O free, and free of the hub's state.

Judging reads a command's arguments, and for a big command that can take long: tens of
milliseconds to seconds for megabytes of `transaction` actions, of fd names, or of
containers searched for socket addresses (README "Security"). It depends only on the
client's session and the message, never on other clients, so the hub hands a big one to
the shell as a `Judgement`, which the shell runs on a worker thread, and holds the
client's later input until the result comes back (`Hub.judged`). The event loop goes on
serving everyone else meanwhile, and the client's order is kept.

Invariants:
- `run` reads the session (profile, capabilities) and the message, and writes only the
  Judgement and the message's own lazily built parts. Nothing else touches either while
  it runs: the hub reads nothing more from the client until `Hub.judged`, and judges off
  the loop only in command mode, where the session changes only its profile.
- A result is applied only under the profile it was judged by: after a reload the hub
  judges the message again (the policy in force decides, as for queued commands).
"""

from __future__ import annotations

from collections import deque
from typing import Final

from qmpmux.bounded import let_go
from qmpmux.fdpass import FD_RELATED, FdFacts, fd_facts
from qmpmux.policy import Profile
from qmpmux.qjson import JsonValue, Message, ParseError
from qmpmux.session import Command, Session, Verdict

# A message at least this long is judged off the event loop. The costliest shapes to
# judge take ~0.5 us a byte (a container searched for socket addresses, a list of fd
# names), so anything shorter stays within ~2 ms inline; anything longer costs QEMU
# ~4 us a byte to read, beside which the worker thread's hand-off (~0.1 ms) is nothing.
OFF_LOOP_BYTES: Final = 4096


def judge(
    session: Session,
    value: JsonValue | ParseError,
    has_fds: bool,
    read: list[object] | None = None,
) -> tuple[Verdict, FdFacts | None]:
    """The verdict on `value`, and its fd facts when it is a command that needs them
    (`has_fds`: whether the client has fds waiting). The arguments read are dropped,
    or handed to `read` if given (to be freed a run at a time: bounded.let_go)."""
    verdict = session.judge(value)
    facts = None
    if type(verdict) is Command:
        args, verdict.args = verdict.args, None  # a big message's: dropped once read
        if verdict.name in FD_RELATED:
            size = len(verdict.prefix)
            facts = fd_facts(verdict.name, verdict.oob, args, has_fds, session.id, size, read)
        if read is not None:
            read.append(args)
    return verdict, facts


def off_loop(value: JsonValue | ParseError, threshold: int | None) -> bool:
    """Whether `value` is long enough to be judged off the event loop. Only a Message
    can be: a client is read 1 KiB at a time, and what takes longer is read token by
    token into one (qjson)."""
    return threshold is not None and type(value) is Message and value.size >= threshold


class Judgement:
    """A message to judge off the event loop, and then its result (`run`)."""

    __slots__ = (
        "epoch",
        "error",
        "facts",
        "has_fds",
        "profile",
        "session",
        "value",
        "verdict",
        "waiting",
    )

    def __init__(
        self, session: Session, value: JsonValue | ParseError, has_fds: bool, epoch: int
    ) -> None:
        self.session = session
        self.value: JsonValue | ParseError | None = value
        self.has_fds = has_fds
        # What it is judged by: the profile, and the hub's count of reloads (a reload
        # and back would leave the same profile, with a verdict of two made meanwhile).
        self.profile: Profile = session.profile
        self.epoch = epoch
        self.verdict: Verdict | None = None
        self.facts: FdFacts | None = None
        self.error: BaseException | None = None
        # The client's inputs read after it, waiting for its verdict (the hub's).
        self.waiting: deque[JsonValue | ParseError] = deque()

    def run(self) -> None:
        """Judge it (on any thread), unless cancelled; an exception is kept for the hub,
        which treats it as its own bug: the client loses its connection, nobody else
        anything."""
        value = self.value
        if value is None:  # cancelled
            return
        read: list[object] = []
        try:
            self.verdict, self.facts = judge(self.session, value, self.has_fds, read)
        except Exception as exc:  # (handed to the hub, never lost)
            self.error = exc
        let_go(read)

    def cancel(self) -> None:
        """The client has gone: never judge it, and hold none of its input meanwhile (a
        job waits behind others on the one worker thread)."""
        self.value = None
        self.waiting.clear()

    @property
    def cancelled(self) -> bool:
        return self.value is None
