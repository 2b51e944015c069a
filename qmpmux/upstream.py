"""Getting hold of QEMU's monitor: connect to an existing socket, or start QEMU ourselves.

With `--spawn`, QEMU gets one end of a socketpair as a private QMP monitor
(`-chardev socket,fd=N`): nothing on the filesystem, no connect race, and nobody but
qmpmux can reach that monitor. QEMU is asked to die with qmpmux (PR_SET_PDEATHSIG) so
a killed proxy never leaves an unmanageable VM behind.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import signal
import socket
import struct
import time
from collections.abc import Sequence
from typing import Any

from qmpmux.config import Address
from qmpmux.server import StartupError

log = logging.getLogger("qmpmux.upstream")

MONITOR_ID = "qmpmux0"  # the chardev id of qmpmux's (first) private monitor inside QEMU
_PEERCRED = struct.Struct("3i")
_PR_SET_PDEATHSIG = 1


async def connect(address: Address, timeout: float) -> socket.socket:
    """Connect to QEMU's monitor, retrying while the socket does not exist yet."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    loop = asyncio.get_running_loop()
    while True:
        if address.kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: str | tuple[Any, ...] = address.path
        else:
            infos = await loop.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
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
            if delay == 0.01:
                log.info("waiting up to %g s for QEMU's monitor at %s", timeout, address)
            if time.monotonic() >= deadline:
                raise StartupError(f"cannot connect to QEMU at {address}: {exc.strerror}") from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)
            continue
        except OSError as exc:
            sock.close()
            raise StartupError(f"cannot connect to QEMU at {address}: {exc.strerror}") from None
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


async def connect_all(addresses: Sequence[Address], timeout: float) -> list[socket.socket]:
    """Connect to every monitor; unix ones must be served by one process (one QEMU:
    lanes of different QEMUs would mix two VMs' replies and events)."""
    sockets: list[socket.socket] = []
    try:
        for address in addresses:
            sockets.append(await connect(address, timeout))
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


async def spawn(
    argv: Sequence[str], lanes: int = 1
) -> tuple[asyncio.subprocess.Process, list[socket.socket]]:
    """Start QEMU with `lanes` private QMP monitors on socketpairs; returns (process, our
    ends)."""
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(lanes)]
    ours = [pair[0] for pair in pairs]
    theirs = [pair[1].fileno() for pair in pairs]
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            *monitor_args(*theirs),
            stdin=asyncio.subprocess.DEVNULL,
            pass_fds=theirs,
            preexec_fn=_die_with_parent,
        )
    except (FileNotFoundError, PermissionError) as exc:
        for sock in ours:
            sock.close()
        why = "command not found" if isinstance(exc, FileNotFoundError) else "permission denied"
        raise StartupError(f"cannot start QEMU: {argv[0]}: {why}") from None
    finally:
        for _, theirs_sock in pairs:
            theirs_sock.close()
    log.info("started QEMU (pid %d, %d monitor(s)): %s", process.pid, lanes, " ".join(argv))
    return process, ours


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
