"""A scripted QMP server for faults a real QEMU will not produce on demand.

Only for what QEMU cannot be made to do: garbage output, errors without an id, replies
with ids nobody sent, dying in the middle of a reply, never greeting. Everything else
is tested against the real thing.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

GREETING = (
    b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 9}, "package": "fake"}, '
    b'"capabilities": ["oob"]}}\r\n'
)


class FakeQemu:
    """Greets, accepts qmp_capabilities, then hands each command to the test."""

    def __init__(
        self, path: Path, greeting: bytes | None = GREETING, capabilities: bool = True
    ) -> None:
        self.path = path
        self.greeting = greeting
        self.capabilities = capabilities  # whether qmp_capabilities is answered
        self.commands: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.writer: asyncio.StreamWriter | None = None
        self.connected = asyncio.Event()
        self._server: asyncio.Server | None = None

    async def start(self) -> FakeQemu:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.connected.set()
        if self.greeting is not None:
            writer.write(self.greeting)
        decoder = json.JSONDecoder()
        buf = ""
        while data := await reader.read(65536):
            buf += data.decode()
            while buf.strip():
                try:
                    obj, end = decoder.raw_decode(buf.lstrip())
                except ValueError:
                    break
                buf = buf.lstrip()[end:]
                if obj.get("execute") == "qmp_capabilities":
                    if self.capabilities:
                        writer.write(b'{"return": {}, "id": "qmpmux"}\r\n')
                else:
                    await self.commands.put(obj)

    async def next_command(self) -> dict[str, Any]:
        return await asyncio.wait_for(self.commands.get(), 10)

    def answer(self, command: dict[str, Any], body: bytes = b"{}") -> None:
        """`{"return": BODY}` to `command` as QEMU writes it: with its id if it had one."""
        if "id" in command:
            self.send(b'{"return": %s, "id": %s}\r\n' % (body, json.dumps(command["id"]).encode()))
        else:
            self.send(b'{"return": %s}\r\n' % body)

    def send(self, data: bytes) -> None:
        assert self.writer is not None
        self.writer.write(data)

    def die(self) -> None:
        assert self.writer is not None
        self.writer.transport.abort()

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.transport.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
