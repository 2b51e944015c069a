"""Downstream `__RFQDN_` extensions: filtered per profile. Real QEMU 7.2 emits none, so a
scripted upstream plays a downstream build that adds `__com.example_` members and events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from qmpmux.config import Address, Config, Listener
from qmpmux.policy import ProfileSpec, compile_policy
from qmpmux.server import Proxy
from qmpmux.upstream import connect
from tests.fakeqemu import FakeQemu
from tests.realqemu import RawClient

POLICY = compile_policy(
    {
        "plain": ProfileSpec(commands=("query-*",), events=("*",), strip_extensions=True),
        "vendor": ProfileSpec(commands=("query-*", "__com.example_*"), events=("*", "__*")),
    }
)
EVENT = (
    b'{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP", '
    b'"data": {"__com.example_reason": "x", "keep": [{"__com.example_y": 1, "z": 2}]}}\r\n'
)
VENDOR_EVENT = b'{"timestamp": {"seconds": 1, "microseconds": 3}, "event": "__com.example_EV"}\r\n'


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[tuple[FakeQemu, dict[str, Path]]]:
    fake = await FakeQemu(tmp_path / "fake.sock").start()
    sockets = {name: tmp_path / f"{name}.sock" for name in ("full", "plain", "vendor")}
    config = Config(
        listeners=tuple(Listener(Address("unix", path=str(p)), n) for n, p in sockets.items()),
        upstream=Address("unix", path=str(tmp_path / "fake.sock")),
        policy=POLICY,
    )
    assert config.upstream is not None
    proxy = Proxy(config)
    await proxy.start(await connect(config.upstream, 5))
    yield fake, sockets
    proxy.stop("test over")
    await asyncio.wait_for(proxy.wait(), 10)
    await fake.close()


async def test_profiles_see_or_lose_extension_members(
    rig: tuple[FakeQemu, dict[str, Path]],
) -> None:
    fake, sockets = rig
    clients = {}
    for name, path in sockets.items():
        clients[name] = await RawClient.connect(path)
        await clients[name].negotiate()
    fake.send(EVENT + VENDOR_EVENT)
    assert await clients["full"].read_n(2) == [EVENT, VENDOR_EVENT]
    assert await clients["vendor"].read_n(2) == [EVENT, VENDOR_EVENT]
    stripped = await clients["plain"].read()
    assert stripped == (
        b'{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP", '
        b'"data": {"keep": [{"z": 2}]}}\r\n'
    )
    # The vendor event never reaches `plain` (no `__*` event pattern): next is a reply.
    await clients["plain"].send(b'{"execute":"query-name","id":"p"}')
    cmd = await fake.next_command()
    fake.answer(cmd, b'{"name": "vm", "__com.example_n": 1}')
    assert await clients["plain"].read() == b'{"return": {"name": "vm"}, "id": "p"}\r\n'


async def test_extension_commands_need_a_pattern_that_names_them(
    rig: tuple[FakeQemu, dict[str, Path]],
) -> None:
    fake, sockets = rig
    plain = await RawClient.connect(sockets["plain"])
    await plain.negotiate()
    reply = await plain.command(b'{"execute":"__com.example_frob","id":1}')
    assert b"refused by qmpmux policy" in reply
    vendor = await RawClient.connect(sockets["vendor"])
    await vendor.negotiate()
    await vendor.send(b'{"execute":"__com.example_frob","id":2}')
    cmd = await fake.next_command()
    assert cmd["execute"] == "__com.example_frob"
    fake.answer(cmd)
    assert await vendor.read() == b'{"return": {}, "id": 2}\r\n'
