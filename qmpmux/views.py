"""QEMU's replies as a profile may see them: extension members stripped, introspection
narrowed, credentials scrubbed. I/O free, and free of the hub's state.

Each change depends only on the profile, the command's name and QEMU's bytes, so it can
be made on any thread. The two costly ones are remembered per QEMU reply value, because
a client polls the same state again and again and QEMU's reply is then the same bytes:
the schema narrowed for a profile (~200 KB, a few ms), and a block or chardev reply
scrubbed (scrub.py; 1000 block nodes, 500 KB: 15-18 ms, then 1.4-1.9 ms).

A long reply whose view is costly is made off the event loop: the hub hands it to the
shell as a `ViewJob` (in a `View` action), which the shell runs on the worker thread big
commands are judged on (judgement.py), and holds what else comes for that client,
replies and events, in QEMU's order until it is back (`Hub.viewed`). Everyone else is
served meanwhile. It is viewed for the profile in force when QEMU's reply arrived, as
one viewed inline is.

Invariants: a reply `view` does not change comes back as QEMU's bytes, unchanged; what it
cannot read raises `WithheldError` with the error that stands for it, never passes.
A job reads its own bytes, its profile and the memos, nothing of the hub's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Final, Generic, TypeVar

import msgspec

from qmpmux.introspect import FILTERS, replace_return, strip_message
from qmpmux.policy import Profile
from qmpmux.scrub import SCRUBBED, scrub_return
from qmpmux.session import Command
from qmpmux.wire import Line

K = TypeVar("K")

# What each memo may hold, QEMU's bytes and the views together: a few polled replies
# (the 207 KB schema narrowed for a few profiles; 400 KB of block nodes and their scrub),
# at most a few MiB for a VM however its clients poll, and nothing once they have gone
# (Hub.client_closed).
_MEMO_BYTES: Final = 2 << 20

# A reply at least this long, whose view is costly, is viewed off the event loop. The
# costliest view, the scrub, takes ~30 ns a byte (500 KB: 15 ms), so a shorter reply
# costs the loop at most ~2 ms; block and chardev replies of a usual VM are far shorter.
OFF_LOOP_VIEW_BYTES: Final = 65536

# A reply at least this long is remembered whole once viewed (Views._replies).
_WHOLE_FROM: Final = 16384

# The commands whose replies a view may change even for a profile that does not strip
# extension members.
VIEWED: Final = frozenset(FILTERS) | SCRUBBED


class WithheldError(Exception):
    """A reply the view could not read: `desc` says so in its place (the hub's error)."""

    def __init__(self, desc: str) -> None:
        super().__init__(desc)
        self.desc = desc


class Memo(Generic[K]):
    """A few results of a costly pure function of QEMU's bytes, by key; forgotten all at
    once when they would hold more than `budget` bytes (QEMU's bytes in the keys and the
    results alike). Safe to use from several threads (a lock around each lookup and
    store)."""

    __slots__ = ("_budget", "_entries", "_held", "_lock")

    def __init__(self, budget: int) -> None:
        self._budget = budget
        self._entries: dict[K, bytes] = {}
        self._held = 0
        self._lock = threading.Lock()

    def peek(self, key: K) -> bytes | None:
        with self._lock:
            return self._entries.get(key)

    def get(self, key: K, make: Callable[[], bytes], size: int) -> bytes:
        """The result for `key` (which holds `size` bytes of QEMU's), made (outside the
        lock) and kept when new, unless it alone would pass the budget."""
        with self._lock:
            found = self._entries.get(key)
        if found is not None:
            return found
        made = make()
        weight = size + len(made)
        if weight <= self._budget:
            with self._lock:
                if self._held + weight > self._budget:
                    self._entries.clear()
                    self._held = 0
                self._entries[key] = made
                self._held += weight
        return made

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._held = 0


class Views:
    """The changes a profile makes to QEMU's replies, with their results remembered."""

    __slots__ = ("_narrowed", "_replies", "_scrubbed", "off_loop_bytes")

    def __init__(self, off_loop_bytes: int | None = None) -> None:
        # Replies at least this long whose view is costly are viewed off the event loop
        # (`off_loop`); None: every one inline.
        self.off_loop_bytes = off_loop_bytes
        # Narrowed introspection, per (profile, command, QEMU's value): keyed by the
        # profile itself, never its id, which a later profile may reuse.
        self._narrowed: Memo[tuple[Profile, str, bytes]] = Memo(_MEMO_BYTES)
        # Scrubbed replies, per QEMU's value (the same for every profile).
        self._scrubbed: Memo[bytes] = Memo(_MEMO_BYTES)
        # Long replies viewed, whole, per (profile, command, QEMU's line): a reply polled
        # again is then one hash and lookup, where reading its value out of the line and
        # writing the line again takes ~1.5 ms for 400 KB. (Short commands go to QEMU
        # without an id, so a poll's reply is the same line each time.)
        self._replies: Memo[tuple[Profile, str, bytes]] = Memo(_MEMO_BYTES)

    def forget(self, everything: bool = False) -> None:
        """A reload made new profiles: let go of the old ones' views; `everything`: of
        every view (no client is left to poll)."""
        self._narrowed.clear()
        self._replies.clear()
        if everything:
            self._scrubbed.clear()

    def view(self, profile: Profile, name: str, line: Line) -> Line:
        """QEMU's reply `line` to command `name` as `profile` sees it."""
        if len(line) < _WHOLE_FROM or not self._costly(profile, name, line):
            return self._made(profile, name, line)
        whole = bytes(line)
        key = (profile, name, whole)
        return self._replies.get(key, lambda: self._viewed(profile, name, whole), len(whole))

    def remembered(self, profile: Profile, name: str, line: Line) -> bytes | None:
        """The view of a long reply already made, if it is still remembered."""
        return None if len(line) < _WHOLE_FROM else self._replies.peek((profile, name, bytes(line)))

    def _viewed(self, profile: Profile, name: str, line: bytes) -> bytes:
        view = self._made(profile, name, line)
        return view if type(view) is bytes else bytes(view)

    def _made(self, profile: Profile, name: str, line: Line) -> Line:
        data = line
        if profile.strip_extensions:
            data = strip_message(bytes(data))
        if name in FILTERS:  # even for `full`: qmpmux's own commands are listed
            narrow = FILTERS[name]

            def narrowed(value: bytes) -> bytes:
                key = (profile, name, value)
                return self._narrowed.get(key, lambda: narrow(value, profile), len(value))

            try:
                return replace_return(bytes(data), narrowed)
            except msgspec.DecodeError:
                raise WithheldError(f"qmpmux could not filter {name}") from None
        if name in SCRUBBED and not profile.secret_properties:

            def scrubbed(value: bytes) -> bytes:
                return self._scrubbed.get(value, lambda: scrub_return(value), len(value))

            try:
                return replace_return(bytes(data), scrubbed)
            except msgspec.DecodeError:
                raise WithheldError(f"qmpmux could not scrub {name}") from None
        return data

    def off_loop(self, profile: Profile, name: str, line: Line) -> bool:
        """Whether to view `line` off the event loop: it is long, and it is narrowed or
        scrubbed, or holds extension members to strip."""
        if self.off_loop_bytes is None or len(line) < self.off_loop_bytes:
            return False
        return self._costly(profile, name, line)

    @staticmethod
    def _costly(profile: Profile, name: str, line: Line) -> bool:
        """Whether the view of `line` does more than look: it is narrowed or scrubbed, or
        holds extension members to strip."""
        if name in FILTERS or (name in SCRUBBED and not profile.secret_properties):
            return True
        return profile.strip_extensions and b'"__' in line


class ViewJob:
    """QEMU's reply to `cmd`, to view off the event loop (`run`), then its outcome."""

    __slots__ = ("cmd", "error", "failed", "line", "profile", "result", "size", "upstream_id",
                 "views")  # fmt: skip

    def __init__(
        self,
        views: Views,
        profile: Profile,
        cmd: Command,
        line: bytes,
        failed: str,
        upstream_id: int | None,
    ) -> None:
        self.views = views
        self.cmd = cmd
        self.line: bytes | None = line
        self.size = len(line)
        self.failed = failed
        self.upstream_id = upstream_id
        # The profile in force when QEMU's reply arrived, as for a reply viewed inline.
        self.profile = profile
        self.result: Line | None = None
        self.error: Exception | None = None

    def run(self) -> None:
        """View it (on any thread), unless cancelled; an exception is kept for the hub."""
        line = self.line
        if line is None:
            return
        try:
            self.result = self.views.view(self.profile, self.cmd.name, line)
        except Exception as exc:  # (handed to the hub, never lost)
            self.error = exc

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None

    def cancel(self) -> None:
        """Its client has gone, or it was viewed on the loop after all (`again`): never
        view it, and let go of QEMU's bytes."""
        self.line = None

    def again(self) -> ViewJob:
        """The same view to make anew (on the loop: the hub is closing its client), and
        this one cancelled, so that the worker never writes to what the hub reads."""
        assert self.line is not None, "cancelled only for a client gone"
        job = ViewJob(self.views, self.profile, self.cmd, self.line, self.failed, self.upstream_id)
        self.cancel()
        return job
