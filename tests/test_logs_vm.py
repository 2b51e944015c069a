"""Log lines of a VM carry its name, in every format, through every callback the VM's
code registers on the loop (qmpmux/logs.py; README "Logs"). Without a VM a line is
exactly what it was."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qmpmux import logs
from qmpmux.logs import VM, vm_context
from tests.conftest import start_mux
from tests.realqemu import Qemu, RawClient, start_qemu

CREATED = 1767323045.678  # 2026-01-02T03:04:05.678Z
STAMP = "2026-01-02T03:04:05.678Z"


@pytest.fixture
def root_restored() -> Iterator[None]:
    """`logs.setup` replaces the root logger's handlers; put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)


def emit(message: str, level: int = logging.INFO, error: bool = False) -> None:
    """A record made as `logging` makes one, at a fixed time, handled in this context."""
    exc_info = None
    if error:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            exc_info = sys.exc_info()
    record = logging.getLogger("qmpmux.hub").makeRecord(
        "qmpmux.hub", level, __file__, 1, message, (), exc_info
    )
    record.created = CREATED
    logging.getLogger("qmpmux.hub").handle(record)


def in_vm(name: str, fn: Callable[[], object]) -> None:
    vm_context(name).run(fn)


@pytest.mark.usefixtures("root_restored")
def test_text_lines_name_the_vm_before_the_message_and_only_then() -> None:
    out = io.StringIO()
    logs.setup("info", "text", out)
    emit("client 3 connected")
    in_vm("web1", lambda: emit("client 3 connected"))
    emit("client 4 connected")
    assert VM.get() is None  # the VM's context stayed its own
    assert out.getvalue() == (
        f"{STAMP} qmpmux: INFO qmpmux.hub: client 3 connected\n"
        f"{STAMP} qmpmux: INFO qmpmux.hub: vm web1: client 3 connected\n"
        f"{STAMP} qmpmux: INFO qmpmux.hub: client 4 connected\n"
    )


@pytest.mark.usefixtures("root_restored")
def test_journald_lines_name_the_vm_and_keep_a_priority_on_every_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "journal"
    with path.open("w") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        logs.setup("info", "text", stream)
        assert isinstance(logging.getLogger().handlers[0].formatter, logs.JournalFormatter)
        emit("denied", logging.WARNING)
        in_vm("web1", lambda: emit("denied", logging.WARNING))
        in_vm("db", lambda: emit("failed", logging.ERROR, error=True))
    lines = path.read_text().splitlines()
    assert lines[:3] == [
        "<4>qmpmux: WARNING qmpmux.hub: denied",
        "<4>qmpmux: WARNING qmpmux.hub: vm web1: denied",
        "<3>qmpmux: ERROR qmpmux.hub: vm db: failed",
    ]
    assert lines[3] == "<3>Traceback (most recent call last):"
    assert lines[-1] == "<3>RuntimeError: boom"
    assert all(line.startswith("<3>") for line in lines[3:])


@pytest.mark.usefixtures("root_restored")
def test_json_records_get_a_vm_member_and_only_then() -> None:
    out = io.StringIO()
    logs.setup("info", "json", out)
    emit("client 3 connected")
    in_vm("web1", lambda: emit("client 3 connected"))
    lines = out.getvalue().splitlines()
    plain = '"level":"info","logger":"qmpmux.hub","message":"client 3 connected"}'
    assert lines[0] == f'{{"time":"{STAMP}",' + plain
    assert json.loads(lines[1]) == {
        "time": STAMP, "vm": "web1", "level": "info", "logger": "qmpmux.hub",
        "message": "client 3 connected",
    }  # fmt: skip


@pytest.mark.usefixtures("root_restored")
def test_a_caller_can_name_the_vm_of_a_record_itself() -> None:
    """A runner that logs about a VM from outside its context (`extra`) is not overridden."""
    out = io.StringIO()
    logs.setup("info", "text", out)
    logging.getLogger("qmpmux.host").info("starting", extra={"vm": "web2"})
    in_vm("web1", lambda: logging.getLogger("qmpmux.host").info("x", extra={"vm": "web2"}))
    assert [line.split(" ", 1)[1] for line in out.getvalue().splitlines()] == [
        "qmpmux: INFO qmpmux.host: vm web2: starting",
        "qmpmux: INFO qmpmux.host: vm web2: x",
    ]


@pytest.mark.usefixtures("root_restored")
async def test_readers_timers_and_tasks_registered_in_a_vm_log_as_that_vm() -> None:
    """What host mode relies on: uvloop copies the registering context into each reader,
    timer and task handle, so a callback logs as the VM whose setup registered it."""
    loop = asyncio.get_running_loop()
    assert type(loop).__module__.startswith("uvloop")
    out = io.StringIO()
    logs.setup("info", "text", out)
    log = logging.getLogger("qmpmux.test")
    a, b = socket.socketpair()
    read: asyncio.Future[None] = loop.create_future()
    timed: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        loop.remove_reader(a.fileno())
        a.recv(1)
        log.info("reader")

        def soon() -> None:  # registered from a callback: the VM's context again
            log.info("soon from reader")
            read.set_result(None)

        loop.call_soon(soon)

    def timer() -> None:
        log.info("timer")
        timed.set_result(None)

    async def task() -> None:
        log.info("task")

    with a, b:
        in_vm("web1", lambda: loop.add_reader(a.fileno(), readable))
        in_vm("web2", lambda: loop.call_later(0, timer))
        await loop.create_task(task(), context=vm_context("web3"))
        b.send(b"x")
        log.info("outside")
        await asyncio.wait_for(asyncio.gather(read, timed), 10)
    lines = sorted(ln.split("qmpmux.test: ", 1)[1] for ln in out.getvalue().splitlines())
    assert lines == [
        "outside",
        "vm web1: reader",
        "vm web1: soon from reader",
        "vm web2: timer",
        "vm web3: task",
    ], out.getvalue()
    assert VM.get() is None


@pytest.mark.usefixtures("root_restored")
async def test_two_proxies_in_two_vms_log_each_client_as_its_own_vm(
    qemu: Qemu, tmp_path: Path
) -> None:
    """Two proxies on two real QEMUs, each started in its VM's context: the lines their
    clients cause (connects, policy denials) name the right VM, though the clients and
    the test itself run outside any VM."""
    (tmp_path / "b").mkdir()
    other = start_qemu(tmp_path / "b")
    out = io.StringIO()
    logs.setup("info", "text", out)
    loop = asyncio.get_running_loop()
    muxes = {}
    try:
        for name, vm, where in (("web1", qemu, tmp_path), ("web2", other, tmp_path / "b")):
            start = start_mux(vm, where, profiles=("readonly",))
            muxes[name] = await loop.create_task(start, context=vm_context(name))
        for name, mux in muxes.items():
            before = len(out.getvalue().splitlines())
            c = await RawClient.connect(mux.sockets["readonly"])
            await c.negotiate()
            assert b"refused by qmpmux policy" in await c.command(b'{"execute":"stop"}')
            # The connect is logged before the greeting is sent, the denial before its reply.
            lines = out.getvalue().splitlines()[before:]
            connect = next(ln for ln in lines if ": connected on " in ln)
            denial = next(ln for ln in lines if "'stop' denied by profile" in ln)
            for line in (connect, denial):
                assert f" qmpmux.client: vm {name}: client " in line, lines
            await c.close()
    finally:
        for mux in muxes.values():
            mux.proxy.stop("test over")
            await asyncio.wait_for(mux.proxy.wait(), 10)
        other.stop()
