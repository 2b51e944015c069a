"""The test harness itself talks to a real QEMU."""

import asyncio

import uvloop

from tests.realqemu import Qemu, RawClient


async def test_direct_monitor_answers(qemu: Qemu) -> None:
    client = await RawClient.connect(qemu.monitors[1])
    assert client.greeting.startswith(b'{"QMP": {"version": {"qemu": ')
    await client.negotiate()
    reply = await client.command(b'{"execute":"query-status","id":7}')
    assert reply.endswith(b', "id": 7}\r\n')
    await client.close()


async def test_tests_run_on_uvloop() -> None:
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
