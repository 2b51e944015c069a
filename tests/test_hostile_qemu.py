"""Hostile clients against qmpmux in front of a real QEMU: memory a client makes qmpmux
hold, connections that hog slots, commands queued across a policy reload."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

from qmpmux.config import Limits
from qmpmux.hub import Action
from qmpmux.judgement import OFF_LOOP_BYTES, Judgement
from qmpmux.policy import ProfileSpec, compile_policy
from qmpmux.server import Proxy
from tests.conftest import Mux, start_mux
from tests.realqemu import Qemu, RawClient

BLOCK = b'{"execute":"pmemsave","arguments":{"val":0,"size":0,"filename":"%s"},"id":"blk"}'


@contextlib.contextmanager
def blocked_qemu_fifo(tmp_path: Path) -> Iterator[Callable[[], None]]:
    """A FIFO that blocks QEMU's main loop in pmemsave until `unblock()` opens it
    (QEMU's monitor I/O thread keeps reading and greeting meanwhile; docs/protocol.md A.1)."""
    fifo = tmp_path / "block.fifo"
    os.mkfifo(fifo)
    fds: list[int] = []

    def unblock() -> None:
        fds.append(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))

    try:
        yield unblock
    finally:
        if not fds:
            unblock()
        for fd in fds:
            os.close(fd)


async def until(proxy: Proxy, condition: Callable[[], bool], timeout: float = 10) -> None:
    """Wait until `condition` holds after qmpmux handled some input (bounded): checked
    each time the proxy applies the hub's actions, so no polling."""
    reached = asyncio.Event()
    apply = proxy._apply

    def checked(actions: Iterable[Action]) -> None:
        apply(actions)
        if condition():
            reached.set()

    proxy._apply = checked  # type: ignore[method-assign]
    try:
        if not condition():
            await asyncio.wait_for(reached.wait(), timeout)
    finally:
        proxy._apply = apply  # type: ignore[method-assign]


async def stop(mux: Mux) -> None:
    mux.proxy.stop("test over")
    await asyncio.wait_for(mux.proxy.wait(), 10)


async def test_replies_held_behind_a_blocked_qemu_pause_the_client_and_lose_nothing(
    qemu: Qemu, tmp_path: Path
) -> None:
    """A read-only client sends one command QEMU cannot answer yet, then error-provoking
    messages whose replies echo 200 KiB each: qmpmux holds at most its per-client bound
    of them (reading pauses), and when QEMU answers, the client, which reads, gets every
    reply in order and is not cut off."""
    bound = 1 << 20
    limits = Limits(max_pending_bytes=bound, max_message_bytes=256 << 10, outbox_bytes=2 << 20)
    mux = await start_mux(qemu, tmp_path, limits, profiles=("full", "readonly"))
    try:
        with blocked_qemu_fifo(tmp_path) as unblock:
            blocker = await RawClient.connect(mux.sockets["full"])
            await blocker.negotiate()
            await blocker.send(BLOCK % str(tmp_path / "block.fifo").encode())
            ro = await RawClient.connect(mux.sockets["readonly"])
            await ro.negotiate()
            await ro.send(b'{"execute":"query-status","id":"first"}')
            name = b"n" * (200 << 10)
            count = 40  # 8 MB of replies, four times the outbox bound
            sender = asyncio.create_task(
                ro.send(b"".join(b'{"execute":"query-status","%s%d":1}' % (name, i)
                                 for i in range(count)))
            )  # fmt: skip
            hub = mux.proxy.hub
            session = next(f for f in hub.clients.values() if f.session.peer.profile == "readonly")
            # (Paused for what it holds, not while one of its messages is judged.)
            held = asyncio.create_task(
                until(mux.proxy, lambda: session.paused and session.judging is None)
            )
            await asyncio.wait([held, sender], return_when=asyncio.FIRST_COMPLETED)
            assert session.paused, "qmpmux read everything and held it"
            await held
            assert session.reply_bytes + session.queued_bytes < bound + (210 << 10)
            unblock()
            assert await blocker.read() == b'{"return": {}, "id": "blk"}\r\n'
            first = await ro.read()
            assert first.startswith(b'{"return": {"status": ') and b'"first"' in first
            for i in range(count):
                reply = await ro.read()
                assert reply.endswith(b"%d' is unexpected\"}}\r\n" % i), reply[-80:]
            await asyncio.wait_for(sender, 10)
            assert (await ro.command(b'{"execute":"query-name"}')) == b'{"return": {}}\r\n'
    finally:
        await stop(mux)


async def test_idle_connections_on_one_listener_leave_room_for_another(
    qemu: Qemu, tmp_path: Path
) -> None:
    limits = Limits(max_clients=12, reserve_clients=4)
    mux = await start_mux(qemu, tmp_path, limits, profiles=("full", "readonly"))
    idle: list[RawClient] = []
    try:
        for _ in range(8):
            idle.append(await RawClient.connect(mux.sockets["readonly"]))
        refused = await RawClient.connect(mux.sockets["readonly"], greeting=False)
        assert await refused.eof()  # no greeting: closed at once
        for _ in range(4):
            full = await RawClient.connect(mux.sockets["full"])
            await full.negotiate()
            idle.append(full)
        assert (await full.command(b'{"execute":"query-name"}')) == b'{"return": {}}\r\n'
    finally:
        for client in idle:
            await client.close()
        await stop(mux)


async def test_a_listener_s_max_clients_bounds_it_alone(qemu: Qemu, tmp_path: Path) -> None:
    mux = await start_mux(qemu, tmp_path, profiles=("full", "readonly"), listener_caps={
        "readonly": 2})  # fmt: skip
    clients: list[RawClient] = []
    try:
        for _ in range(2):
            clients.append(await RawClient.connect(mux.sockets["readonly"]))
        refused = await RawClient.connect(mux.sockets["readonly"], greeting=False)
        assert await refused.eof()
        full = await RawClient.connect(mux.sockets["full"])
        await full.negotiate()
        clients.append(full)
        await clients[0].close()
        await until(mux.proxy, lambda: mux.proxy.client_count == 2)
        again = await RawClient.connect(mux.sockets["readonly"])
        await again.negotiate()
        clients.append(again)
    finally:
        for client in clients:
            await client.close()
        await stop(mux)


async def test_a_connection_that_never_negotiates_is_closed(qemu: Qemu, tmp_path: Path) -> None:
    mux = await start_mux(qemu, tmp_path, Limits(negotiation_timeout=0.3))
    try:
        working = await RawClient.connect(mux.path)
        await working.negotiate()
        idle = await RawClient.connect(mux.path)
        assert await idle.eof()
        # The working client's deadline passed before the idle one's: it is still served.
        assert (await working.command(b'{"execute":"query-name"}')) == b'{"return": {}}\r\n'
    finally:
        await stop(mux)


async def test_a_reload_denies_commands_still_queued_inside_qmpmux(
    qemu: Qemu, tmp_path: Path
) -> None:
    """A `stop` queued inside qmpmux (QEMU busy, the client's window full) when a reload
    denies it never runs: the client gets the denial in order, QEMU keeps running."""
    ctl = ProfileSpec(commands=("query-status", "stop", "pmemsave"))
    mux = await start_mux(
        qemu, tmp_path, Limits(client_window=1),
        policy=compile_policy({"ctl": ctl}), profiles=("full", "ctl"),
    )  # fmt: skip
    try:
        watcher = await RawClient.connect(mux.direct)
        await watcher.negotiate()
        with blocked_qemu_fifo(tmp_path) as unblock:
            client = await RawClient.connect(mux.sockets["ctl"])
            await client.negotiate()
            await client.send(BLOCK % str(tmp_path / "block.fifo").encode())
            await client.send(b'{"execute":"stop","id":"stop"}')
            session = next(iter(mux.proxy.hub.clients.values()))
            await until(mux.proxy, lambda: len(session.queues[0]) == 1)  # read, waiting its turn
            denying = ProfileSpec(commands=("query-status", "pmemsave"))
            mux.proxy.reload(compile_policy({"ctl": denying}))
            unblock()
            assert await client.read() == b'{"return": {}, "id": "blk"}\r\n'
            assert await client.read() == (
                b'{"id": "stop", "error": {"class": "CommandNotFound", '
                b'"desc": "The command stop has been refused by qmpmux policy"}}\r\n'
            )
        # The monitor runs commands in order: had `stop` been sent, QEMU would be paused.
        status = await watcher.command(b'{"execute":"query-status"}')
        assert b'"running": true' in status
    finally:
        await stop(mux)


async def test_other_clients_are_served_while_a_big_command_is_judged(
    mux: Mux, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A big command is judged on the worker thread (judgement.py): held there until
    # another client has had its reply, it proves the event loop never waited for it.
    started, release = threading.Event(), threading.Event()
    run = Judgement.run

    def held(job: Judgement) -> None:
        started.set()
        release.wait(10)
        run(job)

    monkeypatch.setattr(Judgement, "run", held)
    aborts = b",".join([b'{"type":"abort"}'] * (2 * OFF_LOOP_BYTES // 16))
    big = b'{"execute":"transaction","arguments":{"actions":[' + aborts + b']},"id":"big"}'
    sender, other = await RawClient.connect(mux.path), await RawClient.connect(mux.path)
    await sender.negotiate()
    await other.negotiate()
    try:
        await sender.send(big)
        assert await asyncio.to_thread(started.wait, 10)
        reply = await other.command(b'{"execute":"query-status","id":"q"}')
        assert reply.startswith(b'{"return": {"status": ') and reply.endswith(b'"id": "q"}\r\n')
    finally:
        release.set()
    direct = await RawClient.connect(mux.direct)
    await direct.negotiate()
    assert await sender.read() == await direct.command(big)  # QEMU's own reply, once judged
