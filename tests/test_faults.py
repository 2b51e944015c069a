"""Upstream faults, against a scripted fake QEMU: garbage, stray ids, dying, silence."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from qmpmux.config import Address, Config, Listener
from qmpmux.server import Proxy, StartupError
from qmpmux.upstream import connect
from tests.fakeqemu import GREETING, FakeQemu
from tests.realqemu import RawClient


class Rig:
    def __init__(self, fake: FakeQemu, proxy: Proxy, path: Path) -> None:
        self.fake, self.proxy, self.path = fake, proxy, path

    async def client(self) -> RawClient:
        c = await RawClient.connect(self.path)
        await c.negotiate()
        return c

    async def forwarded(self) -> int | None:
        """The upstream id of the next command qmpmux forwards (None: it has none)."""
        cmd = await self.fake.next_command()
        upstream_id = cmd.get("id")
        assert upstream_id is None or isinstance(upstream_id, int)
        return upstream_id


def answer(body: bytes, upstream_id: int | None) -> bytes:
    """QEMU's reply `{"return": BODY}` to a command sent with `upstream_id`."""
    if upstream_id is None:
        return b'{"return": ' + body + b"}\r\n"
    return b'{"return": ' + body + b', "id": %d}\r\n' % upstream_id


def make_config(tmp_path: Path) -> Config:
    return Config(
        listeners=(Listener(Address("unix", path=str(tmp_path / "mux.sock"))),),
        upstream=Address("unix", path=str(tmp_path / "fake.sock")),
    )


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    fake = await FakeQemu(tmp_path / "fake.sock").start()
    config = make_config(tmp_path)
    assert config.upstream is not None
    proxy = Proxy(config)
    await proxy.start(await connect(config.upstream, 5))
    yield Rig(fake, proxy, tmp_path / "mux.sock")
    proxy.stop("test over")
    await asyncio.wait_for(proxy.wait(), 10)
    await fake.close()


async def test_garbage_from_qemu_is_logged_and_skipped(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    client = await rig.client()
    await client.send(b'{"execute":"query-name","id":"x"}')
    uid = await rig.forwarded()
    with caplog.at_level(logging.WARNING):
        rig.fake.send(b'\x00\xffnot json at all\r\n{"half": \r\n')
        rig.fake.send(answer(b"{}", uid))
        assert await client.read() == b'{"return": {}, "id": "x"}\r\n'
    assert "malformed output from QEMU" in caplog.text


async def test_idless_error_and_unknown_ids_are_not_misrouted(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """An error without an id while every command in QEMU has one is QEMU failing to
    parse its input, nobody's reply; so is a reply with an id qmpmux never issued."""
    a, b = await rig.client(), await rig.client()
    # Too big to go without an id (wire.ANONYMOUS_MAX).
    await a.send(b'{"execute":"query-name","arguments":{"x":"%s"},"id":"a"}' % (b"y" * 5000))
    uid = await rig.forwarded()
    assert uid is not None
    with caplog.at_level(logging.WARNING):
        rig.fake.send(b'{"error": {"class": "GenericError", "desc": "JSON parse error"}}\r\n')
        rig.fake.send(b'{"return": {}, "id": 999}\r\n{"return": {}, "id": "__qmp#00001"}\r\n')
        rig.fake.send(answer(b'{"ok": 1}', uid))
        assert await a.read() == b'{"return": {"ok": 1}, "id": "a"}\r\n'
    # b received none of it: its next message is the reply to its own command.
    await b.send(b'{"execute":"query-uuid","id":"b"}')
    uid = await rig.forwarded()
    rig.fake.send(answer(b"{}", uid))
    assert await b.read() == b'{"return": {}, "id": "b"}\r\n'
    assert "without id" in caplog.text and "did not issue" in caplog.text


async def test_qemu_dying_mid_reply_closes_every_client(rig: Rig) -> None:
    a, b = await rig.client(), await rig.client()
    await a.send(b'{"execute":"query-qmp-schema","id":1}')
    await rig.forwarded()
    rig.fake.send(b'{"return": [{"name": "query-sta')
    rig.fake.die()
    assert await a.eof() and await b.eof()
    assert await asyncio.wait_for(rig.proxy.wait(), 10) == 1


async def test_downstream_extension_members_in_replies_survive(rig: Rig) -> None:
    client = await rig.client()
    await client.send(b'{"execute":"query-name","id":"x"}')
    assert await rig.forwarded() is None
    # Printed in QEMU's hash order (docs/protocol.md §3.4), the id's place among them too.
    rig.fake.send(b'{"__com.example_extra": 1, "return": {}, "__com.example_101": []}\r\n')
    assert await client.read() == (
        b'{"__com.example_extra": 1, "return": {}, "id": "x", "__com.example_101": []}\r\n'
    )


@pytest.mark.parametrize(
    ("greeting", "capabilities", "error"),
    [
        (None, True, "no QMP greeting"),
        # A command an earlier connection left running holds QEMU's answer (§9): the
        # error says what did not come, not that nothing did.
        (GREETING, False, "did not answer qmp_capabilities"),
    ],
)
async def test_a_qemu_that_does_not_finish_the_handshake_is_a_startup_error(
    tmp_path: Path, greeting: bytes | None, capabilities: bool, error: str
) -> None:
    fake = await FakeQemu(tmp_path / "fake.sock", greeting, capabilities).start()
    config = make_config(tmp_path)
    assert config.upstream is not None
    proxy = Proxy(config)
    with pytest.raises(StartupError, match=error):
        await proxy.start(await connect(config.upstream, 5), handshake_timeout=0.2)
    assert not (tmp_path / "mux.sock").exists()  # never listened
    await fake.close()
