"""QEMU restarts under --reconnect, and graceful shutdown: real qmpmux and QEMU processes."""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import signal
import socket
from pathlib import Path

import msgspec
import pytest

from tests.fakeqemu import FakeQemu
from tests.realqemu import Qemu, RawClient, start_qemu
from tests.test_cli import Running
from tests.test_hostile_qemu import BLOCK, blocked_qemu_fifo
from tests.test_metrics_qemu import scrape, value
from tests.test_service import NotifySocket


def version_of(greeting: bytes) -> object:
    value = msgspec.json.decode(greeting)
    assert isinstance(value, dict)
    return value["QMP"]["version"]


def kill(vm: Qemu) -> None:
    """Kill QEMU and remove the socket files it leaves, so the next one's are new."""
    vm.proc.kill()
    vm.proc.wait()
    for path in vm.monitors:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def mux_args(sock: Path, vm: Qemu, lanes: int, *extra: str) -> list[str]:
    args = ["--listen", f"unix:{sock}", "--reconnect", *extra]
    for monitor in vm.monitors[:lanes]:
        args += ["--upstream", f"unix:{monitor}"]
    return args


@pytest.mark.parametrize("lanes", [1, 2])
async def test_a_restarted_qemu_is_served_again(tmp_path: Path, lanes: int) -> None:
    """Clients of the old QEMU are closed; one that connects while QEMU is away is
    greeted by the new one; a new client works with it."""
    sock = tmp_path / "m.sock"
    vm = start_qemu(tmp_path, monitors=lanes + 1)  # the last one for a direct look
    mux = await Running.start(*mux_args(sock, vm, lanes))
    try:
        old = await RawClient.connect(sock)
        await old.negotiate()
        kill(vm)
        assert await old.eof(timeout=2)  # closed within 2 s of the kill
        line = await mux.expect("reconnecting")
        assert "QEMU closed the monitor connection" in line
        assert sock.exists()  # the listener stays
        waiting = await RawClient.connect(sock, greeting=False)
        greeted = asyncio.ensure_future(waiting.read(timeout=20))

        vm = start_qemu(tmp_path, monitors=lanes + 1)
        direct = await RawClient.connect(vm.monitors[-1])
        await mux.expect("reconnected")
        greeting = await greeted
        assert greeting.startswith(b'{"QMP": ')
        assert version_of(greeting) == version_of(direct.greeting)
        await waiting.negotiate()
        await direct.negotiate()
        assert await waiting.command(b'{"execute":"query-status"}') == await direct.command(
            b'{"execute":"query-status"}'
        )
        fresh = await RawClient.connect(sock)
        assert fresh.greeting == greeting
        await fresh.negotiate()
        assert (await fresh.command(b'{"execute":"query-version","id":1}')).startswith(
            b'{"return": {"qemu": '
        )
    finally:
        mux.proc.send_signal(signal.SIGTERM)
        assert await mux.wait() == 0
        vm.stop()


async def test_clients_are_greeted_with_the_new_qemus_version(tmp_path: Path) -> None:
    """A restarted QEMU may be another version: new clients see the new greeting. (A
    scripted QEMU plays the new version: a real one cannot change its version.)"""
    sock = tmp_path / "m.sock"
    vm = start_qemu(tmp_path, monitors=1)
    mux = await Running.start(*mux_args(sock, vm, 1))
    fake = FakeQemu(vm.monitors[0])
    try:
        before = await RawClient.connect(sock)
        kill(vm)
        assert await before.eof(timeout=2)
        await mux.expect("reconnecting")
        await fake.start()
        await mux.expect("reconnected")
        after = await RawClient.connect(sock)
        assert fake.greeting is not None
        assert version_of(after.greeting) == version_of(fake.greeting)
        assert version_of(after.greeting) != version_of(before.greeting)
    finally:
        mux.proc.send_signal(signal.SIGTERM)
        assert await mux.wait() == 0
        await fake.close()
        vm.stop()


async def test_a_client_waiting_too_long_is_closed_and_its_fds_with_it(tmp_path: Path) -> None:
    sock = tmp_path / "m.sock"
    vm = start_qemu(tmp_path, monitors=1)
    mux = await Running.start(*mux_args(sock, vm, 1, "--negotiation-timeout", "0.5"))
    notify_r, notify_w = os.pipe()
    try:
        kill(vm)
        await mux.expect("reconnecting")
        loop = asyncio.get_running_loop()
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.setblocking(False)
        await loop.sock_connect(client, str(sock))
        # A command with an fd, sent before any greeting: qmpmux must not keep the fd.
        fds = array.array("i", [notify_w])
        client.sendmsg(
            [b'{"execute":"qmp_capabilities"}'],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())],
        )
        os.close(notify_w)
        notify_w = -1
        async with asyncio.timeout(10):
            assert await loop.sock_recv(client, 4096) == b""  # closed, never greeted
        client.close()
        await mux.expect("QEMU not back within 0.5 s")
        os.set_blocking(notify_r, False)
        assert os.read(notify_r, 1) == b""  # every copy of the write end is closed
    finally:
        os.close(notify_r)
        if notify_w >= 0:
            os.close(notify_w)
        mux.proc.send_signal(signal.SIGTERM)
        assert await mux.wait() == 0
        vm.stop()


async def test_the_service_manager_hears_reconnecting_not_stopping(tmp_path: Path) -> None:
    notify = NotifySocket(str(tmp_path / "notify"))
    sock = tmp_path / "m.sock"
    vm = start_qemu(tmp_path, monitors=1)
    try:
        mux = await Running.start(*mux_args(sock, vm, 1), env={"NOTIFY_SOCKET": notify.address})
        await notify.expect(lambda fields: "READY=1" in fields)
        kill(vm)
        status = await notify.expect(lambda f: any("reconnecting" in x for x in f))
        assert "STOPPING=1" not in status
        vm = start_qemu(tmp_path, monitors=1)
        await notify.expect(lambda f: any(x.endswith(" connected") for x in f))
        assert not any("STOPPING=1" in fields for fields in notify.messages)
        mux.proc.send_signal(signal.SIGTERM)
        assert await mux.wait() == 0
        await notify.expect(lambda fields: "STOPPING=1" in fields)
    finally:
        notify.close()
        vm.stop()


async def in_flight(client: RawClient, wanted: int) -> None:
    """Until qmpmux counts `wanted` commands of `client`'s in QEMU (bounded; each round
    is a real request to qmpmux, answered by qmpmux itself)."""
    async with asyncio.timeout(10):
        while True:
            reply = await client.command(b'{"execute":"__org.qmpmux_list-clients"}')
            clients = msgspec.json.decode(reply)["return"]
            if sum(c["commands-in-flight"] for c in clients) == wanted:
                return


async def test_sigterm_lets_commands_in_flight_finish(tmp_path: Path) -> None:
    sock = tmp_path / "m.sock"
    vm = start_qemu(tmp_path, monitors=1)
    mux = await Running.start("--listen", f"unix:{sock}", "--upstream", f"unix:{vm.monitors[0]}")
    try:
        busy = await RawClient.connect(sock)
        await busy.negotiate()
        watcher = await RawClient.connect(sock)
        await watcher.negotiate()
        with blocked_qemu_fifo(tmp_path) as unblock:
            fifo = tmp_path / "block.fifo"
            # One write, so one read: pmemsave and `after` go to QEMU (the client's
            # window is 2), `queued` waits inside qmpmux; all three are answered.
            await busy.send(
                BLOCK % str(fifo).encode()
                + b'{"execute":"query-status","id":"after"}'
                + b'{"execute":"query-status","id":"queued"}'
            )
            await in_flight(watcher, 2)
            mux.proc.send_signal(signal.SIGTERM)
            await mux.expect("waiting up to")
            with pytest.raises((FileNotFoundError, ConnectionRefusedError)):
                await RawClient.connect(sock, greeting=False)  # no longer accepting
            unblock()
            assert await busy.read_json() == {"return": {}, "id": "blk"}
            after = await busy.read_json()
            assert after["id"] == "after" and "return" in after
            queued = await busy.read_json()
            assert queued["id"] == "queued" and "return" in queued
            assert await busy.eof()
            assert await watcher.eof()
        assert await mux.wait() == 0
        assert any("every command in flight answered" in line for line in mux.log)
    finally:
        if mux.proc.returncode is None:
            mux.proc.kill()
            await mux.proc.wait()
        vm.stop()


async def test_sigterm_stops_waiting_after_the_shutdown_timeout(tmp_path: Path) -> None:
    sock = tmp_path / "m.sock"
    vm = start_qemu(tmp_path, monitors=1)
    mux = await Running.start("--listen", f"unix:{sock}", "--upstream", f"unix:{vm.monitors[0]}",
                              "--shutdown-timeout", "0.5")  # fmt: skip
    try:
        busy = await RawClient.connect(sock)
        await busy.negotiate()
        watcher = await RawClient.connect(sock)
        await watcher.negotiate()
        with blocked_qemu_fifo(tmp_path):
            await busy.send(BLOCK % str(tmp_path / "block.fifo").encode())
            await in_flight(watcher, 1)
            mux.proc.send_signal(signal.SIGTERM)
            await mux.expect("waiting up to 0.5 s")
            await mux.expect("still in flight after 0.5 s")
            assert await busy.eof()
            assert await mux.wait() == 0
    finally:
        if mux.proc.returncode is None:
            mux.proc.kill()
            await mux.proc.wait()
        vm.stop()


async def test_a_reloaded_policy_outlives_a_qemu_restart(tmp_path: Path) -> None:
    sock = tmp_path / "m.sock"
    vm = start_qemu(tmp_path, monitors=1)
    conf = tmp_path / "qmpmux.toml"
    head = f'upstream = "unix:{vm.monitors[0]}"\nreconnect = true\n'
    listen = f'[[listen]]\naddress = "unix:{sock}"\nprofile = "ops"\n'
    conf.write_text(head + listen + '[profiles.ops]\nbase = "readonly"\n')
    mux = await Running.start("--config", str(conf))
    try:
        conf.write_text(head + listen + '[profiles.ops]\nbase = "vm-control"\n')
        mux.proc.send_signal(signal.SIGHUP)
        await mux.expect("policy reloaded")
        kill(vm)
        await mux.expect("reconnecting")
        vm = start_qemu(tmp_path, monitors=1)
        await mux.expect("reconnected")
        client = await RawClient.connect(sock)
        await client.negotiate()
        # `stop` is vm-control's, not readonly's: the new session has the reloaded policy.
        assert await client.command(b'{"execute":"stop","id":1}') == b'{"return": {}, "id": 1}\r\n'
    finally:
        mux.proc.send_signal(signal.SIGTERM)
        assert await mux.wait() == 0
        vm.stop()


async def test_sigterm_while_qemu_is_away_closes_waiting_clients(tmp_path: Path) -> None:
    sock = tmp_path / "m.sock"
    vm = start_qemu(tmp_path, monitors=1)
    mux = await Running.start(*mux_args(sock, vm, 1))
    try:
        kill(vm)
        await mux.expect("reconnecting")
        waiting = await RawClient.connect(sock, greeting=False)
        await mux.expect("retrying every")  # the first attempt failed: the client waits
        mux.proc.send_signal(signal.SIGTERM)
        # Closed, never greeted: held by qmpmux (EOF), or still in the listener's backlog
        # when it closed (reset), whichever the signal met.
        with contextlib.suppress(ConnectionResetError):
            assert await waiting.read() == b""
        assert await mux.wait() == 0
        assert not sock.exists()
    finally:
        if mux.proc.returncode is None:
            mux.proc.kill()
            await mux.proc.wait()
        vm.stop()


async def test_a_qemu_that_never_greets_at_start_up_is_still_fatal(tmp_path: Path) -> None:
    """--reconnect is for QEMU restarts: a monitor that fails before the first session
    keeps today's start-up failure (status 1), so a wrong address is not retried forever."""
    path = tmp_path / "q.sock"
    fake = await FakeQemu(path, greeting=b'{"not": "qmp"}\r\n').start()
    try:
        mux = await Running.launch(
            "--listen", f"unix:{tmp_path}/m.sock", "--upstream", f"unix:{path}", "--reconnect"
        )
        assert await mux.wait() == 1
        assert any("did not greet with QMP" in line for line in mux.log)
        assert not any("reconnecting" in line for line in mux.log)
    finally:
        await fake.close()


async def test_one_lost_monitor_of_several_reconnects_them_all(tmp_path: Path) -> None:
    sock = tmp_path / "m.sock"
    vm = start_qemu(tmp_path, monitors=3)
    mux = await Running.start(*mux_args(sock, vm, 2))
    try:
        client = await RawClient.connect(sock)
        await client.negotiate()
        direct = await RawClient.connect(vm.monitors[2])
        await direct.negotiate()
        # QEMU drops qmpmux's second monitor connection (its server socket stays).
        yank = b'{"execute":"yank","arguments":{"instances":[{"type":"chardev","id":"mon1"}]}}'
        assert await direct.command(yank) == b'{"return": {}}\r\n'
        assert await client.eof(timeout=2)
        line = await mux.expect("reconnecting")
        assert "monitor 1" in line
        await mux.expect("reconnected")
        fresh = await RawClient.connect(sock)
        await fresh.negotiate()
        assert (await fresh.command(b'{"execute":"query-status"}')).startswith(b'{"return": ')
    finally:
        mux.proc.send_signal(signal.SIGTERM)
        assert await mux.wait() == 0
        vm.stop()


async def test_metrics_go_on_across_a_qemu_restart(tmp_path: Path) -> None:
    """Counters carry over to the next QEMU session; the restart is counted, and the
    clients it cost are counted as lost with the upstream."""
    sock, where = tmp_path / "m.sock", tmp_path / "metrics.sock"
    vm = start_qemu(tmp_path, monitors=1)
    mux = await Running.start(*mux_args(sock, vm, 1, "--metrics", f"unix:{where}"))
    try:
        old = await RawClient.connect(sock)
        await old.negotiate()
        assert b"return" in await old.command(b'{"execute":"query-status"}')
        kill(vm)
        assert await old.eof(timeout=2)
        await mux.expect("reconnecting")
        away = await scrape(where)
        assert value(away, "qmpmux_upstream_up", lane="0") == 0
        vm = start_qemu(tmp_path, monitors=1)
        await mux.expect("reconnected")
        fresh = await RawClient.connect(sock)
        await fresh.negotiate()
        assert b"return" in await fresh.command(b'{"execute":"query-status"}')
        back = await scrape(where)
        assert value(back, "qmpmux_upstream_up", lane="0") == 1
        assert value(back, "qmpmux_upstream_reconnects_total") == 1
        ok = {"command": "query-status", "result": "ok"}
        assert value(back, "qmpmux_commands_total", **ok) == 2  # one per session
        lost = value(back, "qmpmux_client_disconnects_total", reason="upstream_lost")
        assert lost == 1
    finally:
        mux.proc.send_signal(signal.SIGTERM)
        assert await mux.wait() == 0
        vm.stop()
