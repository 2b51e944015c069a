"""Lanes against a real QEMU: several monitors of one QEMU behind one qmpmux."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from qmpmux.config import Limits
from tests.conftest import Mux, start_mux
from tests.realqemu import RawClient, start_qemu
from tests.test_cli import Running, spawn_args
from tests.test_hostile_qemu import until

LANES = 4


@pytest.fixture
async def lanes(tmp_path: Path) -> AsyncIterator[Mux]:
    """qmpmux on four monitors of one QEMU; a fifth stays direct."""
    qemu = start_qemu(tmp_path, monitors=LANES + 1)
    limits = Limits(max_message_bytes=1 << 20, max_pending_bytes=2 << 20, outbox_bytes=4 << 20)
    try:
        mux = await start_mux(qemu, tmp_path, limits, lanes=LANES)
        try:
            yield mux
        finally:
            mux.proxy.stop("test over")
            await asyncio.wait_for(mux.proxy.wait(), 10)
    finally:
        qemu.stop()


async def negotiated(mux: Mux, n: int) -> list[RawClient]:
    clients = [await RawClient.connect(mux.path) for _ in range(n)]
    for client in clients:
        await client.negotiate()
    return clients


async def test_events_reach_every_client_once_over_four_lanes(lanes: Mux) -> None:
    clients = await negotiated(lanes, 12)
    # Put every lane to use: twelve clients' commands spread over the four monitors.
    for i, client in enumerate(clients):
        assert await client.command(b'{"execute":"query-name","id":%d}' % i) == (
            b'{"return": {}, "id": %d}\r\n' % i
        )
    used = {flow.link.index for flow in lanes.proxy.hub.clients.values() if flow.link}
    assert len(used) > 1
    for command, event in ((b"stop", b'"STOP"'), (b"cont", b'"RESUME"')):
        reply = await clients[0].command(b'{"execute":"%s","id":"x"}' % command)
        assert reply == b'{"return": {}, "id": "x"}\r\n'
        for client in clients[1:]:
            assert event in await client.read()
    for client in clients:  # nothing more: each event came once
        await client.send(b'{"execute":"query-name","id":"end"}')
        assert await client.read() == b'{"return": {}, "id": "end"}\r\n'


async def test_a_big_command_holds_up_only_its_own_client(lanes: Mux) -> None:
    """QEMU reads each monitor one byte at a time but serves monitors in parallel: while
    one client's 600 KB command is being read, another client is answered on another lane
    (on one monitor it would wait behind all of those bytes)."""
    big, other = await negotiated(lanes, 2)
    hub = lanes.proxy.hub

    def big_in_qemu() -> bool:
        return b'"big"' in [c.wire_id for up in hub.links for c in up.inflight.values()]

    await big.send(b'{"execute":"query-name","arguments":{"%s":1},"id":"big"}' % (b"x" * 600_000))
    await until(lanes.proxy, big_in_qemu)  # all of it read by qmpmux and sent upstream
    await other.send(b'{"execute":"query-status","id":"small"}')
    assert (await other.read()).endswith(b'"id": "small"}\r\n')
    assert big_in_qemu()  # answered while QEMU still reads the big one
    reply = msgspec.json.decode(await big.read(timeout=30))
    assert reply["id"] == "big" and reply["error"]["class"] == "GenericError"


async def test_exec_oob_overtakes_its_own_client_s_big_command(lanes: Mux) -> None:
    """With oob, a client's exec-oob is answered while its own 600 KB command is still
    being read by QEMU (on one monitor it would wait behind all of those bytes)."""
    client = await RawClient.connect(lanes.path)
    await client.negotiate(oob=True)
    hub = lanes.proxy.hub

    def big_in_qemu() -> bool:
        return b'"big"' in [c.wire_id for up in hub.links for c in up.inflight.values()]

    await client.send(b'{"execute":"query-name","arguments":{"%s":1},"id":"big"}' % (
        b"x" * 600_000))  # fmt: skip
    await until(lanes.proxy, big_in_qemu)
    await client.send(b'{"exec-oob":"query-yank","id":"oob"}')
    assert (await client.read()).endswith(b'"id": "oob"}\r\n')
    assert big_in_qemu()
    assert b'"id": "big"' in await client.read(timeout=30)


async def test_a_client_s_commands_keep_their_order(lanes: Mux) -> None:
    """A client's in-band commands run in the order it sent them, whatever the lanes:
    its `stop` before its `query-status` shows paused, its `cont` before the next shows
    running."""
    (client,) = await negotiated(lanes, 1)
    commands = []
    for i in range(20):
        commands.append(b'{"execute":"%s"}' % (b"stop" if i % 2 == 0 else b"cont"))
        commands.append(b'{"execute":"query-status","id":%d}' % i)
    await client.send(b"".join(commands))
    seen = 0
    while seen < 20:
        line = await client.read()
        if b'"status"' in line:
            state = b'"running": false' if seen % 2 == 0 else b'"running": true'
            assert state in line and line.endswith(b'"id": %d}\r\n' % seen)
            seen += 1


async def test_every_reply_reaches_its_own_command_whatever_goes_with_an_id(
    lanes: Mux,
) -> None:
    """Short in-band commands go without an id and are answered by their place; big ones
    and exec-oob go with one and hold the others back while in QEMU (link.py). Clients
    pipelining all three kinds each get exactly QEMU's answer to each of their own: the
    error names the command QEMU looked up, so a reply given to the wrong command shows."""
    clients = [await RawClient.connect(lanes.path) for _ in range(6)]
    for client in clients:
        await client.negotiate(oob=True)
    pad = b"p" * 6000
    sent: list[list[bytes]] = []
    for c, client in enumerate(clients):
        names, batch = [], []
        for n in range(24):
            name = b"nope-%d-%d" % (c, n)
            names.append(name)
            if n % 6 == 5:  # one command in six is big: it goes with an id
                batch.append(b'{"execute":"%s","arguments":{"x":"%s"},"id":%d}' % (name, pad, n))
            elif n % 8 == 3:  # and exec-oob, with an id, overtaking in-band work
                batch.append(b'{"exec-oob":"%s","id":%d}' % (name, n))
            else:
                batch.append(b'{"execute":"%s","id":%d}' % (name, n))
        sent.append(names)
        await client.send(b"".join(batch))
    for c, client in enumerate(clients):
        got: dict[int, str] = {}
        for _ in range(24):
            reply = msgspec.json.decode(await client.read(timeout=30))
            got[reply["id"]] = reply["error"]["desc"]
        for n, name in enumerate(sent[c]):
            assert got[n] == f"The command {name.decode()} has not been found", (c, n)
    assert all(not up.anonymous and not up.inflight for up in lanes.proxy.hub.links)


def test_monitors_of_two_qemus_are_refused_as_lanes(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one, two = start_qemu(tmp_path / "a", monitors=1), start_qemu(tmp_path / "b", monitors=1)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "qmpmux", "--upstream", f"unix:{one.monitors[0]}",
             "--upstream", f"unix:{two.monitors[0]}", "--listen", f"unix:{tmp_path / 'm'}"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    finally:
        one.stop()
        two.stop()
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()[-1:]
    assert "belong to different processes" in line


async def test_spawn_opens_its_lanes_and_nobody_may_yank_them(tmp_path: Path) -> None:
    sock = tmp_path / "spawn.sock"
    mux = await Running.start(*spawn_args(sock, "--lanes", "3"))
    client = await RawClient.connect(sock)
    await client.negotiate()
    chardevs = msgspec.json.decode(await client.command(b'{"execute":"query-chardev"}'))
    # The lanes, and the lifecycle monitor qmpmux keeps for shutting QEMU down.
    labels = sorted(c["label"] for c in chardevs["return"])
    assert labels == ["qmpmux-lifecycle", "qmpmux0", "qmpmux1", "qmpmux2"]
    yank = b'{"execute":"yank","arguments":{"instances":[{"type":"chardev","id":"qmpmux2"}]}}'
    assert b"refused by qmpmux policy" in await client.command(yank)
    mux.proc.send_signal(signal.SIGTERM)
    assert await client.eof()
    assert await mux.wait() == 0
