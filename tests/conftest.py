"""Shared fixtures: a uvloop event loop and a fresh real QEMU per test."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvloop

from qmpmux.config import Address, Config, Limits, Listener
from qmpmux.policy import DEFAULT_POLICY, Policy
from qmpmux.server import Proxy
from qmpmux.upstream import connect_all
from tests.realqemu import Qemu, start_qemu


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Tests run on uvloop, as qmpmux does in production."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
def qemu(tmp_path: Path) -> Iterator[Qemu]:
    """A `-machine none` QEMU with two independent QMP monitors (proxy + direct)."""
    vm = start_qemu(tmp_path)
    try:
        yield vm
    finally:
        vm.stop()


@dataclass
class Mux:
    """qmpmux running in the test's event loop in front of a real QEMU."""

    proxy: Proxy
    path: Path  # where clients connect (profile full)
    direct: Path  # a second, independent monitor of the same QEMU, for comparison
    qemu: Qemu
    sockets: dict[str, Path]  # one listener per profile given to start_mux


async def start_mux(
    qemu: Qemu,
    tmp_path: Path,
    limits: Limits | None = None,
    policy: Policy = DEFAULT_POLICY,
    profiles: tuple[str, ...] = ("full",),
    audit: Callable[[bytes], None] | None = None,
    listener_caps: Mapping[str, int] | None = None,
    lanes: int = 1,
    metrics: Address | None = None,
) -> Mux:
    """qmpmux on the first `lanes` monitors of `qemu`; the next one stays direct."""
    sockets = {name: tmp_path / f"mux-{name}.sock" for name in profiles}
    config = Config(
        listeners=tuple(
            Listener(
                Address("unix", path=str(path)),
                profile=name,
                max_clients=(listener_caps or {}).get(name),
            )
            for name, path in sockets.items()
        ),
        upstream=Address("unix", path=str(qemu.monitors[0])),
        more_upstreams=tuple(Address("unix", path=str(p)) for p in qemu.monitors[1:lanes]),
        limits=limits or Limits(),
        policy=policy,
        metrics=metrics,
    )
    assert config.upstream is not None
    proxy = Proxy(config, audit=audit)
    await proxy.start(await connect_all((config.upstream, *config.more_upstreams), 5))
    direct = qemu.monitors[lanes]
    return Mux(proxy, sockets.get("full", tmp_path / "none"), direct, qemu, sockets)


@pytest.fixture
async def mux(qemu: Qemu, tmp_path: Path) -> AsyncIterator[Mux]:
    m = await start_mux(qemu, tmp_path)
    try:
        yield m
    finally:
        m.proxy.stop("test over")
        await asyncio.wait_for(m.proxy.wait(), 10)
