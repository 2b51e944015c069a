"""What the hub counts for monitoring (sans-IO: plain integers and dicts, no I/O).

The hub bumps these on its hot path; nothing here formats, locks or allocates per
command beyond a dict slot the first time a label pair is seen. The shell's exporter
(`exporter.py`) reads them only when Prometheus scrapes, and turns them into the
exposition format there, so a proxy nobody scrapes pays only for the increments.

Invariants:
- Every label value is bounded: a command or event name is its own label only when
  QEMU advertised it (`query-commands`) or it is one of qmpmux's own commands, and only
  for the first `NAMES_MAX` such names; anything else counts under `OTHER`. Profiles,
  results and disconnect reasons are fixed sets (or the operator's own profile names).
- Counters only grow; gauges (clients, in flight, links up) are read from the hub's
  state at scrape time, never kept twice.
"""

from __future__ import annotations

from typing import Final

OTHER: Final = "other"
NAMES_MAX: Final = 512

# Results of a command (qmpmux_commands_total{result}).
OK: Final = "ok"
ERROR: Final = "error"
DENIED: Final = "denied"

# Why a client went (qmpmux_client_disconnects_total{reason}): a fixed set.
# The client closed its connection, or shut down its sending side and was answered
# (the same to a reader: end of file).
CLOSED: Final = "closed"
SLOW_READER: Final = "cut_slow_reader"  # its outbox passed limits.outbox-bytes
IO_ERROR: Final = "io_error"  # a read or write on its socket failed
NEGOTIATION_TIMEOUT: Final = "negotiation_timeout"
INTERNAL_ERROR: Final = "internal_error"
UPSTREAM_LOST: Final = "upstream_lost"  # its QEMU monitor went away
SHUTDOWN: Final = "shutdown"  # qmpmux is exiting
DISCONNECT_REASONS: Final = (
    CLOSED, SLOW_READER, IO_ERROR, NEGOTIATION_TIMEOUT, INTERNAL_ERROR, UPSTREAM_LOST,
    SHUTDOWN,
)  # fmt: skip

# Upstream round trip buckets, seconds: a query answers in tens of microseconds, a
# migration-sized command can take seconds.
DURATION_BUCKETS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


# A command's row of counts: results by index.
OK_AT: Final = 0
ERROR_AT: Final = 1
DENIED_AT: Final = 2
RESULTS: Final = ((OK, OK_AT), (ERROR, ERROR_AT), (DENIED, DENIED_AT))


class Stats:
    """The hub's counters. Attributes are public: the hub writes (inline, on its hot
    path: one dict lookup and a few list slots per command), the exporter reads."""

    __slots__ = (
        "commands",
        "denials",
        "disconnects",
        "events",
        "hist",
        "now",
        "reconnects",
        "reloads",
        "timed",
    )

    def __init__(self, timed: bool = False) -> None:
        # Whether round trips are timed (someone scrapes them), and the hub's clock at
        # its current input (when timed): a command's round trip runs from the `now` of
        # the input that sent it upstream to the `now` of the one that brought its reply.
        self.timed = timed
        self.now = 0.0
        # Command label -> [ok, error, denied]: a name QEMU advertised (`learn`) or ours
        # has its own row, every other name shares the OTHER row (see `row`).
        self.commands: dict[str, list[int]] = {OTHER: [0, 0, 0]}
        # (profile, command label) -> count.
        self.denials: dict[tuple[str, str], int] = {}
        # event name -> count (QEMU's names: bounded by QEMU's schema, see `event`).
        self.events: dict[str, int] = {}
        self.disconnects: dict[str, int] = dict.fromkeys(DISCONNECT_REASONS, 0)
        # The round-trip histogram: per-bucket (not cumulative) counts, +Inf's, then
        # the sum of seconds: one list, so the hub adds to it without attribute writes.
        self.hist: list[float] = [0] * (len(DURATION_BUCKETS) + 1) + [0.0]
        self.reconnects = 0
        self.reloads: dict[str, int] = {OK: 0, ERROR: 0}

    def learn(self, names: list[str] | set[str] | tuple[str, ...]) -> None:
        """Names QEMU advertised (or qmpmux's own): they become labels, up to the cap."""
        commands = self.commands
        for name in names:
            if len(commands) > NAMES_MAX:
                return
            commands.setdefault(name, [0, 0, 0])

    def label(self, name: str) -> str:
        return name if name in self.commands else OTHER

    def row(self, name: str) -> list[int]:
        """The counts of `name` (the shared OTHER row for a name that is no label)."""
        row = self.commands.get(name)
        return self.commands[OTHER] if row is None else row

    def denial(self, profile: str, name: str) -> None:
        label = self.label(name)
        self.commands[label][DENIED_AT] += 1
        key = (profile, label)
        self.denials[key] = self.denials.get(key, 0) + 1

    def event(self, name: str) -> None:
        # Events come from QEMU, never from a client: QEMU's schema bounds them; the cap
        # only guards against a QEMU that invents names.
        events = self.events
        count = events.get(name)
        if count is not None:
            events[name] = count + 1
        elif len(events) < NAMES_MAX:
            events[name] = 1
        else:
            events[OTHER] = events.get(OTHER, 0) + 1

    def disconnect(self, reason: str) -> None:
        self.disconnects[reason] += 1
