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
import os
import signal
import socket
import stat
import time
from collections.abc import Sequence
from typing import Any

from qmpmux.config import Address
from qmpmux.server import StartupError

log = logging.getLogger("qmpmux.upstream")

MONITOR_ID = "qmpmux0"  # the chardev id of qmpmux's private monitor inside QEMU
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


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if qmpmux dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def monitor_args(fd: int) -> list[str]:
    return [
        "-chardev",
        f"socket,id={MONITOR_ID},fd={fd}",
        "-mon",
        f"chardev={MONITOR_ID},mode=control",
    ]


async def spawn(argv: Sequence[str]) -> tuple[asyncio.subprocess.Process, socket.socket]:
    """Start QEMU with a private QMP monitor on a socketpair; returns (process, our end)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            *monitor_args(theirs.fileno()),
            stdin=asyncio.subprocess.DEVNULL,
            pass_fds=(theirs.fileno(),),
            preexec_fn=_die_with_parent,
        )
    except FileNotFoundError:
        ours.close()
        raise StartupError(f"cannot start QEMU: {argv[0]}: command not found") from None
    except PermissionError:
        ours.close()
        raise StartupError(f"cannot start QEMU: {argv[0]}: permission denied") from None
    finally:
        theirs.close()
    log.info("started QEMU (pid %d): %s", process.pid, " ".join(argv))
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
