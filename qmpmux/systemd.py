"""The service manager's two interfaces: inherited listening sockets and notifications.

Socket activation (sd_listen_fds(3)): the manager passes listening sockets as fds 3, 4, ...
and says so in `LISTEN_FDS`, `LISTEN_PID` (the process they are meant for) and
`LISTEN_FDNAMES` (colon-separated `FileDescriptorName=`s). Notification (sd_notify(3)):
newline-separated `KEY=VALUE` lines in one datagram to the unix socket `NOTIFY_SOCKET`
names (a path, or `@` for an abstract address); `WATCHDOG_USEC` asks for `WATCHDOG=1`
at least that often.

Both are a handful of environment variables and one `sendto`, covered by systemd's
interface stability promise, so this module speaks them itself instead of depending on
libsystemd bindings (a C extension, and a package distributions ship separately) or a
third-party wrapper (which would still leave the checks below to us). Invariants:

- The variables are read once and removed from the environment, so a spawned QEMU
  neither inherits them nor answers for qmpmux (QEMU reads `LISTEN_FDS` itself).
- Inherited fds are made close-on-exec at once: only qmpmux serves them.
- Sockets meant for another process (`LISTEN_PID`) are never touched.
- A notification that cannot be sent is logged, never fatal: the manager may be gone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field

log = logging.getLogger("qmpmux.systemd")

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START
STATUS_INTERVAL = 1.0  # seconds: STATUS= is sent at most this often, and only on change


class InheritError(Exception):
    """A `systemd:NAME` listener that cannot be served; one line for the operator."""


@dataclass
class Inherited:
    """The sockets the service manager passed, by name; `problem` says why there are none."""

    by_name: dict[str, list[int]] = field(default_factory=dict)
    problem: str = ""

    def take(self, name: str) -> list[socket.socket]:
        """Every inherited socket named `name`, checked to be listening stream sockets."""
        if self.problem:
            raise InheritError(f"cannot listen on systemd:{name}: {self.problem}")
        fds = self.by_name.pop(name, None)
        if fds is None:
            known = ", ".join(sorted(self.by_name)) or "none left"
            raise InheritError(
                f"cannot listen on systemd:{name}: no inherited socket named {name!r} "
                f"(LISTEN_FDNAMES: {known}; set FileDescriptorName= in the .socket unit)"
            )
        out = []
        for fd in fds:
            try:
                sock = socket.socket(fileno=fd)
            except OSError as exc:
                raise InheritError(
                    f"cannot listen on systemd:{name}: fd {fd} is not a socket ({exc.strerror})"
                ) from None
            if sock.type != socket.SOCK_STREAM:
                sock.detach()
                raise InheritError(
                    f"cannot listen on systemd:{name}: fd {fd} is not a stream socket "
                    "(use ListenStream= in the .socket unit)"
                )
            if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                sock.detach()
                raise InheritError(
                    f"cannot listen on systemd:{name}: fd {fd} is not listening "
                    "(Accept=no in the .socket unit, and ListenStream=)"
                )
            out.append(sock)
        return out


def listen_fds(environ: MutableMapping[str, str] = os.environ) -> Inherited:
    """Read and remove LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES (sd_listen_fds_with_names)."""
    count = environ.pop("LISTEN_FDS", None)
    pid = environ.pop("LISTEN_PID", None)
    names = environ.pop("LISTEN_FDNAMES", None)
    if count is None:
        return Inherited(problem="no sockets inherited (LISTEN_FDS is not set: not started "
                         "by a .socket unit or systemd-socket-activate)")  # fmt: skip
    if pid is None or not pid.isdigit() or not count.isdigit():
        return Inherited(problem=f"bad LISTEN_PID={pid!r} or LISTEN_FDS={count!r}")
    if int(pid) != os.getpid():
        return Inherited(
            problem=f"LISTEN_PID={pid} is not qmpmux's pid {os.getpid()}: the sockets were "
            "passed to another process"
        )
    n = int(count)
    fds = range(LISTEN_FDS_START, LISTEN_FDS_START + n)
    for fd in fds:
        try:
            os.set_inheritable(fd, False)  # FD_CLOEXEC: never into a spawned QEMU
        except OSError:
            return Inherited(problem=f"LISTEN_FDS={n} but fd {fd} is not open")
    labels = names.split(":") if names is not None else ["unknown"] * n
    if len(labels) != n:
        return Inherited(problem=f"LISTEN_FDNAMES has {len(labels)} names for {n} fds")
    out = Inherited()
    for fd, label in zip(fds, labels, strict=True):
        out.by_name.setdefault(label, []).append(fd)
    return out


class Notifier:
    """sd_notify: fire-and-forget datagrams to `NOTIFY_SOCKET`, if the manager gave one."""

    def __init__(self, environ: MutableMapping[str, str] = os.environ) -> None:
        target = environ.pop("NOTIFY_SOCKET", None)
        usec = environ.pop("WATCHDOG_USEC", None)
        wpid = environ.pop("WATCHDOG_PID", None)
        self.address: str | None = None
        self._sock: socket.socket | None = None
        if target and target[0] in "/@":
            # A leading '@' names an abstract socket: a NUL byte on the wire (unix(7)).
            self.address = "\0" + target[1:] if target[0] == "@" else target
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)
        elif target:
            log.warning("NOTIFY_SOCKET=%r is not a unix socket address; not notifying", target)
        # The watchdog is ours unless WATCHDOG_PID names another process.
        self.watchdog: float | None = None
        if usec and usec.isdigit() and int(usec) > 0 and (wpid is None or wpid == str(os.getpid())):
            self.watchdog = int(usec) / 1e6

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *fields: str) -> None:
        if self._sock is None or self.address is None:
            return
        try:
            self._sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            log.debug("sd_notify %s failed: %s", fields[0], exc.strerror or exc)


class ServiceState:
    """What qmpmux tells the manager and when: readiness, reloads, stopping, a status line
    kept current (polled, sent at most once a second and only when it changed), and the
    watchdog heartbeat at half its interval, as sd_watchdog_enabled(3) advises."""

    def __init__(self, notifier: Notifier, status: Callable[[], str]) -> None:
        self._notifier = notifier
        self._status = status
        self._last = ""
        self._poll_timer: asyncio.TimerHandle | None = None
        self._watchdog_timer: asyncio.TimerHandle | None = None

    def starting(self, what: str) -> None:
        """Before QEMU is reached: a status line, and the watchdog from now on (the
        manager's watchdog runs during start-up too)."""
        self._send_status(what)
        if self._notifier.watchdog is not None and self._watchdog_timer is None:
            self._heartbeat(asyncio.get_running_loop())

    def ready(self) -> None:
        """Upstream negotiated and listeners open: READY=1, then keep the status current."""
        self._last = self._status()
        self._notifier.send("READY=1", f"STATUS={self._last}")
        if self._poll_timer is None and self._notifier.enabled:
            loop = asyncio.get_running_loop()
            self._poll_timer = loop.call_later(STATUS_INTERVAL, self._poll, loop)

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._notifier.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")

    def reloaded(self) -> None:
        self._last = self._status()
        self._notifier.send("READY=1", f"STATUS={self._last}")

    def stopping(self, why: str) -> None:
        """STOPPING=1; the status stops following clients, the watchdog keeps beating
        (powering a guest down may take a while, and qmpmux is still alive)."""
        if self._poll_timer is not None:
            self._poll_timer.cancel()
            self._poll_timer = None
        self._notifier.send("STOPPING=1", f"STATUS=stopping: {why}")

    def _send_status(self, text: str) -> None:
        if text != self._last:
            self._last = text
            self._notifier.send(f"STATUS={text}")

    def _poll(self, loop: asyncio.AbstractEventLoop) -> None:
        self._send_status(self._status())
        self._poll_timer = loop.call_later(STATUS_INTERVAL, self._poll, loop)

    def _heartbeat(self, loop: asyncio.AbstractEventLoop) -> None:
        self._notifier.send("WATCHDOG=1")
        assert self._notifier.watchdog is not None
        self._watchdog_timer = loop.call_later(self._notifier.watchdog / 2, self._heartbeat, loop)
