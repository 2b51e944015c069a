"""How qmpmux's log lines look on stderr: for a person, for journald, for a log shipper.

- `text` on a terminal or into a file: each line starts with a UTC timestamp
  (`2026-01-02T03:04:05.678Z`), since nothing else records when it happened.
- `text` under journald (stderr is the stream systemd connected: `JOURNAL_STREAM` names
  its device and inode, systemd.exec(5)): no timestamp, journald keeps its own, and a
  syslog priority prefix (`<3>` error, `<4>` warning, `<6>` info, `<7>` debug,
  sd-daemon(3)) on every line, so `journalctl -p warning` finds them and a traceback's
  lines keep their priority.
- `json` (`--log-format json`): one JSON object per line with `time`, `level`, `logger`,
  `message` (and `exception`), encoded as the audit log is (`redact.encode_record`):
  ASCII only, so no reader's idea of a line separator can split a record, whatever a
  client put in a name that reaches a message.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from contextvars import ContextVar
from typing import Final, TextIO

from qmpmux.redact import encode_record

FORMATS: Final = ("text", "json")
# The VM whose work is running (host mode sets it for each VM's tasks and callbacks).
VM: ContextVar[str | None] = ContextVar("qmpmux_vm", default=None)
_PREFIX: Final = "qmpmux: %(levelname)s %(name)s: %(message)s"
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


def priority(levelno: int) -> int:
    """The syslog priority of a Python log level (debug and below: 7)."""
    for level, prio in _PRIORITY:
        if levelno >= level:
            return prio
    return 7


class TimestampFormatter(logging.Formatter):
    """`2026-01-02T03:04:05.678Z qmpmux: INFO qmpmux.hub: ...` (UTC)."""

    def __init__(self) -> None:
        super().__init__(_PREFIX)

    def format(self, record: logging.LogRecord) -> str:
        return f"{_utc(record.created)} {super().format(record)}"


class JournalFormatter(logging.Formatter):
    """`<6>qmpmux: INFO qmpmux.hub: ...`: every line with the record's priority."""

    def __init__(self) -> None:
        super().__init__(_PREFIX)

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


class JsonFormatter(logging.Formatter):
    """One ASCII JSON object per record (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": _utc(record.created),
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
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
