"""How qmpmux's log lines look on stderr: for a person, for journald, for a log shipper.

- `text` on a terminal or into a file: each line starts with a UTC timestamp
  (`2026-01-02T03:04:05.678Z`), since nothing else records when it happened.
- `text` under journald (stderr is the stream systemd connected: `JOURNAL_STREAM` names
  its device and inode, systemd.exec(5)): no timestamp, journald keeps its own, and a
  syslog priority prefix (`<3>` error, `<4>` warning, `<6>` info, `<7>` debug,
  sd-daemon(3)) on every line, so `journalctl -p warning` finds them and a traceback's
  lines keep their priority.
- `json` (`--log-format json`): one JSON object per line with `time`, (`vm`,) `level`,
  `logger`, `message` (and `exception`), encoded as the audit log is (`redact.encode_record`):
  ASCII only, so no reader's idea of a line separator can split a record, whatever a
  client put in a name that reaches a message.

A process that serves several VMs runs each VM's setup in a context where `VM` names it
(`vm_context`): every task, reader and timer registered from there copies that context
(asyncio and uvloop take `contextvars.copy_context()` when they make a handle), so each
record logged on that VM's behalf says which VM, as `vm NAME: ` right before the message
in text and as a `vm` member in JSON. The handler's `VmFilter` reads `VM` when a record
is handled, which is synchronously in the code that logged it. With no VM set (one VM,
the default) a line is exactly what it was without any of this.
"""

from __future__ import annotations

import contextvars
import logging
import os
import sys
import time
from typing import Final, TextIO

from qmpmux.redact import encode_record

FORMATS: Final = ("text", "json")
_PREFIX: Final = "qmpmux: %(levelname)s %(name)s: %(message)s"
_PREFIX_VM: Final = "qmpmux: %(levelname)s %(name)s: vm %(vm)s: %(message)s"
# The VM the running code serves; None in single-VM mode (see the module docstring).
VM: contextvars.ContextVar[str | None] = contextvars.ContextVar("qmpmux_vm", default=None)
# sd-daemon(3) priorities, by Python level (rounded down to the nearest known one).
_PRIORITY: Final = (
    (logging.CRITICAL, 2),
    (logging.ERROR, 3),
    (logging.WARNING, 4),
    (logging.INFO, 6),
)


def _utc(created: float) -> str:
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
        + f".{int(created * 1000) % 1000:03d}Z"
    )


def vm_context(name: str) -> contextvars.Context:
    """A copy of the current context with `VM` set to `name`: run a VM's setup in it
    (`ctx.run(...)`, `loop.create_task(coro, context=ctx)`) and all it schedules logs
    as that VM."""
    ctx = contextvars.copy_context()
    ctx.run(VM.set, name)
    return ctx


class VmFilter(logging.Filter):
    """Stamps each record with the VM of the code that logged it (`record.vm`), unless
    the caller named one itself (`extra={"vm": NAME}`). Drops nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "vm"):
            record.vm = VM.get()
        return True


def _vm(record: logging.LogRecord) -> str | None:
    vm: str | None = getattr(record, "vm", None)
    return vm


class _PrefixFormatter(logging.Formatter):
    """`qmpmux: LEVEL LOGGER: ` and, for a record of a VM, `vm NAME: ` before the message."""

    def __init__(self) -> None:
        super().__init__(_PREFIX)
        self._vm_style = logging.PercentStyle(_PREFIX_VM)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        style = self._style if _vm(record) is None else self._vm_style
        return style.format(record)


def priority(levelno: int) -> int:
    """The syslog priority of a Python log level (debug and below: 7)."""
    for level, prio in _PRIORITY:
        if levelno >= level:
            return prio
    return 7


class TimestampFormatter(_PrefixFormatter):
    """`2026-01-02T03:04:05.678Z qmpmux: INFO qmpmux.hub: ...` (UTC)."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{_utc(record.created)} {super().format(record)}"


class JournalFormatter(_PrefixFormatter):
    """`<6>qmpmux: INFO qmpmux.hub: ...`: every line with the record's priority."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


class JsonFormatter(logging.Formatter):
    """One ASCII JSON object per record (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {"time": _utc(record.created)}
        vm = _vm(record)
        if vm is not None:
            entry["vm"] = vm
        entry |= {
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return encode_record(entry).decode().rstrip("\n")


def under_journald(stream: TextIO, environ: dict[str, str] | None = None) -> bool:
    """Whether `stream` is the journal stream systemd gave this process: `JOURNAL_STREAM`
    (`DEV:INODE`) matches the stream's own device and inode, so a child that inherited
    the variable but writes elsewhere (a terminal, a file) still gets timestamps."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (ValueError, OSError, AttributeError):
        return False


def formatter(log_format: str, stream: TextIO) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter()
    if under_journald(stream):
        return JournalFormatter()
    return TimestampFormatter()


def setup(level: str, log_format: str = "text", stream: TextIO | None = None) -> None:
    """Route every qmpmux log record to `stream` (stderr) in the chosen format."""
    stream = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter(log_format, stream))
    handler.addFilter(VmFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
