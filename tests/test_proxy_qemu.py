"""qmpmux in front of a real QEMU: routing, fan-out, isolation, OOB, and QEMU going away."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from pathlib import Path

import msgspec
import pytest
from qemu.qmp import QMPClient

from qmpmux.config import Limits
from tests.conftest import Mux, start_mux
from tests.realqemu import Qemu, RawClient


async def negotiated(mux: Mux, n: int = 1, oob: bool = False) -> list[RawClient]:
    clients = [await RawClient.connect(mux.path) for _ in range(n)]
    for c in clients:
        await c.negotiate(oob=oob)
    return clients


async def test_stop_cont_events_reach_20_clients_exactly_once(mux: Mux) -> None:
    clients = await negotiated(mux, 20)
    idle = await RawClient.connect(mux.path)  # never negotiates: must get nothing
    driver = clients[0]
    await driver.send(b'{"execute":"stop","id":"s"}{"execute":"cont","id":"c"}')
    got = await driver.read_n(4)
    assert [msgspec.json.decode(x).get("event") for x in got] == ["STOP", None, "RESUME", None]
    stop_bytes, resume_bytes = got[0], got[2]
    for c in clients[1:]:
        assert await c.read_n(2) == [stop_bytes, resume_bytes]
    # Nothing more arrives for anyone: a sync reply is the very next message.
    for c in clients:
        assert await c.command(b'{"execute":"query-name","id":"sync"}') == (
            b'{"return": {}, "id": "sync"}\r\n'
        )
    await idle.send(b'{"execute":"query-name","id":"idle"}')
    assert b"Expecting capabilities negotiation" in await idle.read()


async def test_50_clients_with_colliding_ids_each_get_their_own_reply(mux: Mux) -> None:
    clients = await negotiated(mux, 50)
    for i, c in enumerate(clients):
        bad = b'{"execute":"qom-list","arguments":{"path":"/nope%d"},"id":1}' % i
        await c.send(bad + b'{"execute":"query-name","id":1}' * 3)
    for i, c in enumerate(clients):
        first = await c.read()
        assert first == (
            b'{"id": 1, "error": {"class": "DeviceNotFound", '
            b'"desc": "Device \'/nope%d\' not found"}}\r\n' % i
        )
        assert await c.read_n(3) == [b'{"return": {}, "id": 1}\r\n'] * 3


async def test_disconnect_with_100_in_flight_disturbs_nobody(mux: Mux) -> None:
    quitter, other = await negotiated(mux, 2)
    await quitter.send(b"".join(b'{"execute":"query-status","id":%d}' % i for i in range(100)))
    await quitter.close()
    for i in range(20):
        reply = await other.command(b'{"execute":"query-name","id":"o%d"}' % i)
        assert reply == b'{"return": {}, "id": "o%d"}\r\n' % i
    # qmpmux is still accepting and serving new clients.
    (late,) = await negotiated(mux, 1)
    assert await late.command(b'{"execute":"query-name","id":0}') == b'{"return": {}, "id": 0}\r\n'


async def test_unclosed_brace_of_one_client_never_swallows_another(mux: Mux) -> None:
    a, b = await negotiated(mux, 2)
    await a.send(b'{"execute":"query-status","id":"a"')  # never closed
    assert await b.command(b'{"execute":"query-name","id":"b"}') == b'{"return": {}, "id": "b"}\r\n'
    await a.send(b"}")
    assert (await a.read()).endswith(b', "id": "a"}\r\n')


async def test_exec_oob_overtakes_in_band_commands_stuck_behind_a_blocked_qemu(
    mux: Mux, tmp_path: Path
) -> None:
    fifo = tmp_path / "block.fifo"
    os.mkfifo(fifo)
    (client,) = await negotiated(mux, 1, oob=True)
    # pmemsave blocks QEMU's main loop opening a FIFO nobody reads (docs/protocol.md A.1).
    block = b'{"execute":"pmemsave","arguments":{"val":0,"size":0,"filename":"%s"},"id":"blk"}'
    await client.send(block % str(fifo).encode())
    await client.send(b"".join(b'{"execute":"query-status","id":%d}' % i for i in range(20)))
    await client.send(b'{"exec-oob":"query-yank","id":"oob"}')
    first = await client.read()
    assert first.startswith(b'{"return": [') and first.endswith(b', "id": "oob"}\r\n')
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # unblocks QEMU
    try:
        assert await client.read() == b'{"return": {}, "id": "blk"}\r\n'
        for i in range(20):
            assert (await client.read()).endswith(b', "id": %d}\r\n' % i)
    finally:
        os.close(fd)


async def test_a_flooding_client_does_not_starve_another(mux: Mux) -> None:
    flood, calm = await negotiated(mux, 2)
    await flood.send(b"".join(b'{"execute":"query-status","id":%d}' % i for i in range(2000)))
    await calm.send(b'{"execute":"query-name","id":"calm"}')
    assert await calm.read() == b'{"return": {}, "id": "calm"}\r\n'
    # Round-robin: the calm reply was not queued behind the flood.
    received = 0
    while True:
        line = await flood.read()
        received += 1
        if line.endswith(b', "id": 1999}\r\n'):
            break
    assert received == 2000


async def test_a_client_that_stops_reading_is_cut_off_alone(
    qemu: Qemu, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    mux = await start_mux(qemu, tmp_path, Limits(outbox_bytes=1 << 20))
    loop = asyncio.get_running_loop()
    hog = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        hog.setblocking(False)
        await loop.sock_connect(hog, str(mux.path))
        # ~4 MB of schema replies that the hog never reads while the others work.
        await loop.sock_sendall(
            hog, b'{"execute":"qmp_capabilities"}' + b'{"execute":"query-qmp-schema"}' * 20
        )
        (calm,) = await negotiated(mux, 1)
        for i in range(30):
            reply = await calm.command(b'{"execute":"query-name","id":%d}' % i)
            assert reply == b'{"return": {}, "id": %d}\r\n' % i
        received = 0
        try:
            while chunk := await asyncio.wait_for(loop.sock_recv(hog, 65536), 10):
                received += len(chunk)
        except ConnectionResetError:
            pass
        assert received < 20 * 200_000  # cut off, not served
        assert mux.proxy.client_count == 1
        assert "connection cut: not reading" in caplog.text
        assert (await calm.command(b'{"execute":"query-status"}')).startswith(b'{"return": ')
    finally:
        hog.close()
        mux.proxy.stop("test over")
        await mux.proxy.wait()


async def test_killing_qemu_mid_burst_closes_every_client(mux: Mux) -> None:
    clients = await negotiated(mux, 5)
    for c in clients:
        await c.send(b'{"execute":"query-qmp-schema"}' * 5)
    os.kill(mux.qemu.proc.pid, signal.SIGKILL)
    for c in clients:
        assert await c.eof(timeout=10)
    assert await asyncio.wait_for(mux.proxy.wait(), 10) == 1


async def test_quit_delivers_shutdown_and_reply_then_closes_with_success(mux: Mux) -> None:
    a, b = await negotiated(mux, 2)
    await a.send(b'{"execute":"quit","id":"q"}')
    event = await a.read()
    assert b'"event": "SHUTDOWN"' in event
    assert await a.read() == b'{"return": {}, "id": "q"}\r\n'
    assert await b.read() == event
    assert await a.eof() and await b.eof()
    assert await asyncio.wait_for(mux.proxy.wait(), 10) == 0


async def test_half_closed_client_still_gets_its_answers(mux: Mux) -> None:
    client = await RawClient.connect(mux.path)
    await client.send(b'{"execute":"qmp_capabilities"}{"execute":"query-name","id":1}')
    client.writer.write_eof()
    assert await client.read() == b'{"return": {}}\r\n'
    assert await client.read() == b'{"return": {}, "id": 1}\r\n'
    assert await client.read() == b""


async def test_idless_commands_as_qmp_shell_sends_them(mux: Mux) -> None:
    client = await RawClient.connect(mux.path)
    await client.send(b'{"execute": "qmp_capabilities"}\n')
    assert await client.read() == b'{"return": {}}\r\n'
    await client.send(b'{"execute": "query-name"}\n{"execute": "query-status"}\n')
    assert await client.read() == b'{"return": {}}\r\n'
    status = await client.read()
    assert status.startswith(b'{"return": {"status": ') and b'"id"' not in status


async def test_qemu_qmp_library_client_runs_concurrent_commands_and_gets_events(mux: Mux) -> None:
    qmp = QMPClient("test")
    await qmp.connect(str(mux.path))
    try:
        assert qmp.greeting is not None
        names = await asyncio.gather(*(qmp.execute("query-name") for _ in range(50)))
        assert names == [{}] * 50
        statuses = await asyncio.gather(
            *(qmp.execute("qom-list", {"path": "/machine"}) for _ in range(10))
        )
        assert all(isinstance(s, list) and s for s in statuses)
        yank = await qmp.execute("query-yank")  # allowed OOB; qemu.qmp negotiated oob
        assert isinstance(yank, list)
        with qmp.listener() as listener:
            await qmp.execute("stop")
            await qmp.execute("cont")
            events = []
            async for event in listener:
                events.append(event["event"])
                if len(events) == 2:
                    break
        assert events == ["STOP", "RESUME"]
    finally:
        await qmp.disconnect()


@pytest.mark.parametrize("oob", [False, True])
async def test_qemu_qmp_library_sees_oob_only_when_offered(mux: Mux, oob: bool) -> None:
    client = await RawClient.connect(mux.path)
    caps = msgspec.json.decode(client.greeting)["QMP"]["capabilities"]
    assert caps == ["oob"]  # QEMU offered it upstream and qmpmux implements exec-oob
    await client.negotiate(oob=oob)
    reply = await client.command(b'{"exec-oob":"query-yank","id":1}')
    if oob:
        assert reply.startswith(b'{"return": [')
    else:
        assert b"'exec-oob' is unexpected" in reply


async def test_the_qmp_shell_tool_works_through_qmpmux(mux: Mux) -> None:
    tool = Path(sys.executable).parent / "qmp-shell"
    if not tool.exists():
        pytest.skip("qmp-shell (from qemu.qmp) is not installed next to this Python")
    proc = await asyncio.create_subprocess_exec(
        str(tool), str(mux.path),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(b"query-status\nquery-name\n"), 20)
    text = out.decode()
    assert "Connected to QEMU 7." in text
    assert '{"return": {"status": "running"' in text and '{"return": {}}' in text


async def test_exec_oob_flood_neither_kills_the_session_nor_starves_others(mux: Mux) -> None:
    big = b'{"exec-oob":"query-name","arguments":{"x":"' + b"A" * 100_000 + b'"}}'
    flooders = await negotiated(mux, 2, oob=True)
    total, received = 6 * len(flooders), 0

    async def count(c: RawClient) -> None:
        nonlocal received
        for _ in range(6):
            assert b"does not support OOB" in await c.read(timeout=60)
            received += 1

    for c in flooders:
        await c.send(big * 6)
    counters = [asyncio.create_task(count(c)) for c in flooders]
    (bystander,) = await negotiated(mux, 1)
    reply = await bystander.command(b'{"execute":"query-name","id":"b"}')
    assert reply == b'{"return": {}, "id": "b"}\r\n'
    assert received < total  # answered while the flood was still being read by QEMU
    await asyncio.gather(*counters)
    assert received == total and not mux.proxy._done.done()
