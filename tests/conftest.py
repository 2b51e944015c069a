"""Shared fixtures: a uvloop event loop and a fresh real QEMU per test."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
import uvloop

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
