"""Getting hold of QEMU's monitor: connect to an existing socket, or start QEMU ourselves.

With `--spawn`, QEMU gets one end of a socketpair as a private QMP monitor
(`-chardev socket,fd=N`): nothing on the filesystem, no connect race, and nobody but
qmpmux can reach that monitor. QEMU is asked to die with qmpmux (PR_SET_PDEATHSIG) so
a killed proxy never leaves an unmanageable VM behind.

One more private monitor, the *lifecycle* monitor, is qmpmux's alone and stays
unnegotiated (so QEMU queues nothing on it: events go only to negotiated monitors,
`monitor/qmp.c`) until qmpmux shuts the guest down: `system_powerdown`, the ACPI power
button a host presses on shutdown, then `quit`, then signals. It is separate from the
clients' monitors so that shutting down needs nothing from the hub and cannot queue
behind clients' commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import stat
import struct
import time
from collections.abc import Sequence
from typing import Any

import msgspec

from qmpmux.config import Address
from qmpmux.server import StartupError

log = logging.getLogger("qmpmux.upstream")

MONITOR_ID = "qmpmux0"  # the chardev id of qmpmux's (first) private monitor inside QEMU
CONTROL_ID = "qmpmux-lifecycle"  # the chardev id of the lifecycle monitor
QUIT_GRACE = 5.0  # seconds QEMU gets to exit after `quit`, and again after SIGTERM
_PEERCRED = struct.Struct("3i")
_PR_SET_PDEATHSIG = 1


async def connect(address: Address, timeout: float, quiet: bool = False) -> socket.socket:
    """Connect to QEMU's monitor, retrying while the socket does not exist yet (`quiet`:
    without saying so, for reconnecting, which logs on its own terms)."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    loop = asyncio.get_running_loop()
    while True:
        if address.kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: str | tuple[Any, ...] = address.path
        else:
            try:
                infos = await loop.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
            except OSError as exc:  # socket.gaierror: QEMU's host is not there either
                raise StartupError(
                    f"cannot connect to QEMU at {address}: {exc.strerror or exc}"
                ) from None
            if not infos:
                raise StartupError(f"cannot resolve {address}")
            family, kind, proto, _, sockaddr = infos[0]
            sock = socket.socket(family, kind, proto)
            target = sockaddr
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, target)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            if delay == 0.01 and not quiet:
                log.info("waiting up to %g s for QEMU's monitor at %s", timeout, address)
            if time.monotonic() >= deadline:
                raise StartupError(
                    f"cannot connect to QEMU at {address}: {_what_is_there(address, exc)}"
                    f" (waited {timeout:g} s)"
                ) from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)
            continue
        except OSError as exc:
            sock.close()
            raise StartupError(
                f"cannot connect to QEMU at {address}: {_what_is_there(address, exc)}"
            ) from None
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


def _what_is_there(address: Address, exc: OSError) -> str:
    """Why a connect failed, in the operator's terms: what is (not) at the address."""
    if address.kind != "unix":
        if isinstance(exc, ConnectionRefusedError):
            return "nothing is listening on that port (is QEMU running with -qmp tcp:...?)"
        return str(exc.strerror or exc)
    try:
        st = os.stat(address.path)
    except FileNotFoundError:
        return (
            "no such file (is QEMU running with -qmp unix:PATH,server=on,wait=off, and "
            "is the path the same in qmpmux's mount namespace?)"
        )
    except OSError as exc2:
        return f"cannot look at it: {exc2.strerror}"
    if not stat.S_ISSOCK(st.st_mode):
        return "it exists but is not a socket"
    if isinstance(exc, ConnectionRefusedError):
        return "a socket file, but nothing is listening on it (QEMU exited and left it behind?)"
    if isinstance(exc, PermissionError):
        return (
            f"permission denied: the socket is uid {st.st_uid} gid {st.st_gid} mode "
            f"{stat.S_IMODE(st.st_mode):04o}, qmpmux runs as uid {os.geteuid()}"
        )
    return str(exc.strerror or exc)


async def connect_all(
    addresses: Sequence[Address], timeout: float, quiet: bool = False
) -> list[socket.socket]:
    """Connect to every monitor; unix ones must be served by one process (one QEMU:
    lanes of different QEMUs would mix two VMs' replies and events). Checked again on
    every reconnect: a restarted QEMU must own all of them too."""
    sockets: list[socket.socket] = []
    try:
        for address in addresses:
            sockets.append(await connect(address, timeout, quiet))
        owners = {}
        for address, sock in zip(addresses, sockets, strict=True):
            if sock.family == socket.AF_UNIX:
                raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
                owners[str(address)] = _PEERCRED.unpack(raw)[0]
        if len(set(owners.values())) > 1:
            seen = ", ".join(f"{a} (pid {pid})" for a, pid in owners.items())
            raise StartupError(f"the --upstream monitors belong to different processes: {seen}")
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if qmpmux dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def monitor_ids(lanes: int) -> list[str]:
    """The chardev ids of qmpmux's private monitors inside QEMU (nobody may yank them)."""
    return [f"qmpmux{i}" for i in range(lanes)]


def monitor_args(*fds: int) -> list[str]:
    args = []
    for chardev, fd in zip(monitor_ids(len(fds)), fds, strict=True):
        args += [
            "-chardev",
            f"socket,id={chardev},fd={fd}",
            "-mon",
            f"chardev={chardev},mode=control",
        ]
    return args


class Spawned:
    """A QEMU qmpmux started: its process and qmpmux's end of the lifecycle monitor."""

    def __init__(self, process: asyncio.subprocess.Process, control: socket.socket) -> None:
        self.process = process
        self._control = control
        self._buffer = b""
        self._negotiated = False

    async def execute(self, command: str, timeout: float = QUIT_GRACE) -> None:
        """Run one argument-less command on the lifecycle monitor; OSError (a closed
        monitor) or TimeoutError if QEMU does not answer it."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            if not self._negotiated:
                await self._line(loop)  # the greeting, waiting since start-up
                await self._call(loop, "qmp_capabilities")
                self._negotiated = True
            await self._call(loop, command)

    async def _call(self, loop: asyncio.AbstractEventLoop, command: str) -> None:
        request = msgspec.json.encode({"execute": command, "id": command})
        await loop.sock_sendall(self._control, request)
        while True:
            message = msgspec.json.decode(await self._line(loop))
            if isinstance(message, dict) and message.get("id") == command:
                if "error" in message:
                    raise ConnectionError(f"{command}: {message['error']}")
                return

    async def _line(self, loop: asyncio.AbstractEventLoop) -> bytes:
        while b"\n" not in self._buffer:
            data = await loop.sock_recv(self._control, 65536)
            if not data:
                raise ConnectionError("QEMU closed the lifecycle monitor")
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line


def _lifecycle_args(fd: int) -> list[str]:
    return ["-chardev", f"socket,id={CONTROL_ID},fd={fd}", "-mon",
            f"chardev={CONTROL_ID},mode=control"]  # fmt: skip


async def spawn(argv: Sequence[str], lanes: int = 1) -> tuple[Spawned, list[socket.socket]]:
    """Start QEMU with `lanes` private QMP monitors on socketpairs, and the lifecycle
    monitor on one more; returns (the QEMU, our ends of the clients' monitors)."""
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(lanes)]
    control, their_control = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    control.setblocking(False)
    ours = [pair[0] for pair in pairs]
    theirs = [pair[1].fileno() for pair in pairs]
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            *monitor_args(*theirs),
            *_lifecycle_args(their_control.fileno()),
            stdin=asyncio.subprocess.DEVNULL,
            pass_fds=(*theirs, their_control.fileno()),
            preexec_fn=_die_with_parent,
        )
    except (FileNotFoundError, PermissionError) as exc:
        for sock in (*ours, control):
            sock.close()
        why = "command not found" if isinstance(exc, FileNotFoundError) else "permission denied"
        raise StartupError(f"cannot start QEMU: {argv[0]}: {why}") from None
    finally:
        for _, theirs_sock in pairs:
            theirs_sock.close()
        their_control.close()
    log.info("started QEMU (pid %d, %d monitor(s)): %s", process.pid, lanes, " ".join(argv))
    return Spawned(process, control), ours


async def _exited(
    process: asyncio.subprocess.Process, timeout: float, hurry: asyncio.Event
) -> bool:
    """Whether QEMU exits within `timeout` (cut short when `hurry` is set)."""
    waits = [asyncio.ensure_future(process.wait()), asyncio.ensure_future(hurry.wait())]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
    return process.returncode is not None


async def shut_down(qemu: Spawned, timeout: float, hurry: asyncio.Event) -> int:
    """Shut a guest down as a host does: press its power button (`system_powerdown`) and
    wait up to `timeout` seconds for the guest OS to power off, which ends QEMU; then
    `quit`, then SIGTERM, then SIGKILL (the order of qemu.qmp's machine.py). `timeout` 0
    skips the guest; `hurry` (a second SIGTERM) cuts the wait short. Returns QEMU's
    return code."""
    process = qemu.process
    if timeout > 0 and process.returncode is None:
        try:
            await qemu.execute("system_powerdown")
            log.info("asked the guest to power down; waiting up to %g s", timeout)
            if await _exited(process, timeout, hurry):
                return await process.wait()
            log.warning(
                "the guest did not power down %s; quitting QEMU",
                "(asked again to stop)" if hurry.is_set() else f"within {timeout:g} s",
            )
        except (OSError, TimeoutError, msgspec.DecodeError) as exc:
            log.warning("cannot ask the guest to power down (%s); quitting QEMU", exc)
    if process.returncode is None:
        # QEMU may close the monitor before it answers `quit`.
        with contextlib.suppress(OSError, TimeoutError, msgspec.DecodeError):
            await qemu.execute("quit")
        if await _exited(process, QUIT_GRACE, asyncio.Event()):
            return await process.wait()
        log.warning("QEMU did not quit within %g s; sending SIGTERM", QUIT_GRACE)
    return await stop_qemu(process, grace=QUIT_GRACE)


async def stop_qemu(process: asyncio.subprocess.Process, grace: float = 10.0) -> int:
    """Ask QEMU to shut down cleanly (SIGTERM), kill it if it will not; returns its status."""
    if process.returncode is None:
        try:
            process.send_signal(signal.SIGTERM)
            return await asyncio.wait_for(process.wait(), grace)
        except ProcessLookupError:
            pass
        except TimeoutError:
            log.warning("QEMU ignored SIGTERM for %g s; killing it", grace)
            process.kill()
    return await process.wait()


def exit_status(returncode: int) -> int:
    """A shell-style exit status for a child's return code (negative = killed by signal)."""
    return 128 - returncode if returncode < 0 else returncode
