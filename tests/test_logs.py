"""Log lines as an operator gets them: qmpmux run as a process, its stderr parsed
(qmpmux/logs.py; README "Logs")."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sys
from pathlib import Path

import pytest

from qmpmux.cli import parse_args
from tests.realqemu import BASE_ARGS, RawClient, qemu_path

TIMESTAMPED = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z qmpmux: [A-Z]+ qmpmux[.\w]*: ")
JOURNAL = re.compile(r"^<([0-7])>qmpmux: ([A-Z]+) qmpmux[.\w]*: ")
SECRET = "hunter2"


class Mux:
    """qmpmux spawning QEMU, its stderr on a pipe this test reads line by line."""

    def __init__(self, proc: asyncio.subprocess.Process, reader: asyncio.StreamReader) -> None:
        self.proc, self.reader, self.lines = proc, reader, list[str]()

    @classmethod
    async def start(cls, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> Mux:
        read_fd, write_fd = os.pipe()
        if env is not None and env.get("JOURNAL_STREAM") == "this-pipe":
            st = os.fstat(write_fd)
            env = {**env, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "qmpmux", *args, "--shutdown-timeout", "0",
            "--spawn", "--", qemu_path(), *BASE_ARGS,
            stdin=asyncio.subprocess.DEVNULL, stderr=write_fd,
            env={**os.environ, **(env or {})},
        )  # fmt: skip
        os.close(write_fd)
        reader = asyncio.StreamReader()
        loop = asyncio.get_running_loop()
        await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", 0)
        )
        mux = cls(proc, reader)
        await mux.expect("ready: ")
        return mux

    async def expect(self, text: str) -> str:
        while True:
            line = (await asyncio.wait_for(self.reader.readline(), 20)).decode()
            assert line, f"qmpmux exited; log: {''.join(self.lines)}"
            self.lines.append(line)
            if text in line:
                return line

    async def stop(self) -> list[str]:
        self.proc.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(self.reader.read(), 20)
        self.lines += rest.decode().splitlines(keepends=True)
        assert await asyncio.wait_for(self.proc.wait(), 20) == 0
        return self.lines


async def _connect_and_deny(sock: Path) -> None:
    """A client that connects and runs one command its profile refuses (a warning)."""
    c = await RawClient.connect(sock)
    await c.negotiate()
    assert b"refused by qmpmux policy" in await c.command(b'{"execute":"stop"}')
    await c.close()


async def test_text_logs_carry_timestamps(tmp_path: Path) -> None:
    sock = tmp_path / "m.sock"
    # JOURNAL_STREAM inherited from elsewhere (not this stderr) changes nothing.
    mux = await Mux.start(
        tmp_path, "--listen", f"unix:{sock},profile=readonly", env={"JOURNAL_STREAM": "1:1"}
    )
    await _connect_and_deny(sock)
    await mux.expect("denied by profile")
    lines = [ln for ln in await mux.stop() if ln.strip()]
    assert len(lines) >= 3
    for line in lines:
        assert TIMESTAMPED.match(line), line


async def test_journald_gets_priorities_and_no_timestamps(tmp_path: Path) -> None:
    sock = tmp_path / "m.sock"
    mux = await Mux.start(
        tmp_path, "--listen", f"unix:{sock},profile=readonly",
        env={"JOURNAL_STREAM": "this-pipe"},
    )  # fmt: skip
    await _connect_and_deny(sock)
    await mux.expect("denied by profile")
    lines = [ln for ln in await mux.stop() if ln.strip()]
    seen = set()
    for line in lines:
        m = JOURNAL.match(line)
        assert m, line
        assert not TIMESTAMPED.search(line[3:])
        expected = {"DEBUG": "7", "INFO": "6", "WARNING": "4", "ERROR": "3", "CRITICAL": "2"}
        assert m[1] == expected[m[2]], line
        seen.add(m[2])
    assert {"INFO", "WARNING"} <= seen


async def test_json_logs_debug_traffic_redacted_and_tcp_peer_address(tmp_path: Path) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    mux = await Mux.start(
        tmp_path, "--listen", f"tcp:127.0.0.1:{port}", "--log-format", "json",
        "--log-level", "debug",
    )  # fmt: skip
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    host, port_used = writer.get_extra_info("sockname")[:2]
    local = f"{host}:{port_used}"
    assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b'{"QMP"')
    secret = (
        b'{"execute":"qmp_capabilities"}'
        b'{"execute":"object-add","arguments":{"qom-type":"secret","id":"s0",'
        b'"data":"' + SECRET.encode() + b'"}}'
        b'{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n0",'
        b'"x-url":"http://alice:' + SECRET.encode() + b'@h/x"}}'
    )
    writer.write(secret)
    replies = [await asyncio.wait_for(reader.readline(), 10) for _ in range(3)]
    assert replies[1] == b'{"return": {}}\r\n' and b"error" in replies[2]
    await mux.expect("'blockdev-add' reply: 'GenericError'")
    writer.close()
    lines = await mux.stop()
    records = [json.loads(line) for line in lines if line.strip()]
    assert len(records) == len([ln for ln in lines if ln.strip()])  # every line is JSON
    for record in records:
        assert set(record) >= {"time", "level", "logger", "message"}, record
    assert all(line.isascii() for line in lines)
    text = "".join(lines)
    assert SECRET not in text and "alice" not in text
    connect = next(r for r in records if "connected on" in r["message"])
    assert f"from {local}" in connect["message"] and connect["level"] == "info"
    traffic = [r["message"] for r in records if r["logger"] == "qmpmux.traffic"]
    added = next(m for m in traffic if "execute 'object-add'" in m)
    assert '"data": "<redacted>"' in added and "bytes)" in added
    done = next(m for m in traffic if "'object-add' reply: 'ok'" in m)
    assert re.search(r"\(\d+ bytes, [0-9.]+ ms\)", done)
    assert any("'blockdev-add' reply: 'GenericError'" in m for m in traffic)
    assert any("answered by qmpmux (" in m for m in traffic)  # negotiation is local


def test_log_format_comes_from_the_config_file_or_the_command_line(tmp_path: Path) -> None:
    conf = tmp_path / "q.toml"
    listen = '\n[[listen]]\naddress = "unix:/tmp/x.sock"\n'
    conf.write_text('upstream = "unix:/nonexistent"\nlog-format = "json"\n' + listen)
    assert parse_args(["--config", str(conf)]).log_format == "json"
    assert parse_args(["--config", str(conf), "--log-format", "text"]).log_format == "text"
    conf.write_text('upstream = "unix:/nonexistent"\nlog-format = "xml"\n' + listen)
    with pytest.raises(Exception, match="log-format"):
        parse_args(["--config", str(conf)])
