"""Real QEMU for tests: start `qemu-system-x86_64 -machine none` with QMP monitors, talk raw QMP.

Every integration test runs against a real QEMU; this module starts one per test with
several independent monitors (one for qmpmux, spare ones for direct comparison) and
offers a tiny raw client that speaks bytes, so tests can compare exact wire output.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pytest

QEMU_BINARY = os.environ.get("QMPMUX_TEST_QEMU", "qemu-system-x86_64")
BASE_ARGS = ("-machine", "none", "-nodefaults", "-display", "none")


def qemu_path() -> str:
    """The QEMU binary, or skip (fail under CI, where it must be installed)."""
    path = shutil.which(QEMU_BINARY)
    if path is None:
        reason = f"{QEMU_BINARY} not installed"
        if os.environ.get("CI"):
            pytest.fail(reason + " (CI must install qemu-system-x86)")
        pytest.skip(reason)
    return path


@dataclass
class Qemu:
    """A running QEMU with `monitors` unix QMP sockets, all server=on,wait=off."""

    proc: subprocess.Popen[bytes]
    monitors: list[Path]
    workdir: Path
    log: Path = field(repr=False)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_qemu(workdir: Path, monitors: int = 2, extra: Sequence[str] = ()) -> Qemu:
    """Start QEMU and wait (bounded) until it has started: a monitor of its own, after
    the `monitors` ones, has answered a command from the main loop."""
    binary = qemu_path()
    args = [binary, *BASE_ARGS]
    paths = []
    for name in [f"mon{n}" for n in range(monitors)] + ["ready"]:
        path = workdir / f"{name}.sock"
        paths.append(path)
        args += [
            "-chardev",
            f"socket,id={name},path={path},server=on,wait=off",
            "-mon",
            f"chardev={name},mode=control",
        ]
    args += list(extra)
    log = workdir / "qemu.log"
    with log.open("wb") as logf:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
    try:
        _wait_started(paths[-1], proc, time.monotonic() + 10)
    except OSError as exc:
        proc.kill()
        proc.wait()
        raise RuntimeError(
            f"QEMU did not start ({exc}): {log.read_text(errors='replace')}"
        ) from exc
    return Qemu(proc, paths[:-1], workdir, log)


def _wait_started(path: Path, proc: subprocess.Popen[bytes], deadline: float) -> None:
    """Return once QEMU's main loop answers `query-status` on the monitor at `path`.

    That monitor's chardev comes last, so every other monitor listens by then. Until
    then QEMU may still emit its start-up events (`RESUME`), which would reach some of a
    test's connections and not others, even ahead of a greeting (docs/protocol.md §4):
    tests start from a QEMU with nothing left to say."""
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise OSError("its monitors do not listen")
        sock = socket.socket(socket.AF_UNIX)
        try:
            sock.connect(str(path))
            break
        except (FileNotFoundError, ConnectionRefusedError):  # not yet bound, or listening
            sock.close()
            time.sleep(0.005)
    with sock:
        sock.settimeout(max(deadline - time.monotonic(), 0.1))
        for line in sock.makefile("rb"):
            if line.startswith(b'{"QMP"'):  # perhaps after an event
                sock.sendall(b'{"execute":"qmp_capabilities"}{"execute":"query-status","id":"up"}')
            elif line.endswith(b'"id": "up"}\r\n'):
                return
        raise OSError("the start-up monitor closed")


class RawClient:
    """A byte-level QMP client: send exact bytes, read exact CRLF-terminated messages."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.greeting: bytes = b""

    @classmethod
    async def connect(cls, path: Path | str, *, greeting: bool = True) -> RawClient:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 24)
        client = cls(reader, writer)
        if greeting:
            client.greeting = await client.read()
        return client

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read(self, timeout: float = 10) -> bytes:
        """One message, CRLF included; b"" at EOF."""
        return await asyncio.wait_for(self.reader.readline(), timeout)

    async def read_json(self, timeout: float = 10) -> dict[str, object]:
        line = await self.read(timeout)
        assert line, "connection closed"
        value = msgspec.json.decode(line)
        assert isinstance(value, dict)
        return value

    async def read_n(self, n: int, timeout: float = 10) -> list[bytes]:
        return [await self.read(timeout) for _ in range(n)]

    async def negotiate(self, oob: bool = False) -> None:
        caps = b',"arguments":{"enable":["oob"]}' if oob else b""
        await self.send(b'{"execute":"qmp_capabilities"' + caps + b"}")
        reply = await self.read()
        assert reply == b'{"return": {}}\r\n', reply

    async def command(self, data: bytes) -> bytes:
        """Send one command and return the next non-event message."""
        await self.send(data)
        while True:
            line = await self.read()
            if not line.startswith(b'{"timestamp"'):
                return line

    async def eof(self, timeout: float = 10) -> bool:
        """True if the peer closes the connection (any unread messages are drained)."""

        async def drain() -> None:
            while await self.reader.read(65536):
                pass

        await asyncio.wait_for(drain(), timeout)
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()
