"""Host mode's VMs through their lives against real QEMUs: files renamed, removed and
changed while their VMs start, stop or fail, and signals meanwhile (README "Host mode")."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from qmpmux import config as config_module
from qmpmux import host as host_module
from qmpmux.config import Config, HostConfig, VmFile
from qmpmux.host import Host
from qmpmux.hub import UpstreamReady
from qmpmux.vm import Vm
from tests.test_cli import Running
from tests.test_host_qemu import Vms, client, name_of, named, start_host, stop_host, vms
from tests.test_service import NotifySocket, ignores_signal, notify

__all__ = ["notify", "vms"]  # the fixtures, used by name


async def expect_all(host: Running, *texts: str) -> None:
    """Log lines containing each of `texts`, in any order."""
    left = set(texts)
    while left:
        try:
            line = await host.expect("")
        except TimeoutError:
            raise AssertionError(f"not logged: {left}; log: {''.join(host.log)}") from None
        left -= {text for text in left if text in line}


async def test_a_renamed_vm_file_starts_its_vm_under_the_new_name(vms: Vms) -> None:
    # A VM's listener and monitor are held until its old name's VM has stopped; the
    # file under the new name, refused meanwhile, starts once they are free.
    vms.qemu("a")
    vms.write("a")
    host = await start_host(vms)
    assert await name_of(await client(vms, "a")) == named("a")
    (vms.dir / "a.toml").rename(vms.dir / "b.toml")  # seen by the look at the directory
    await host.expect("vm b: refused")
    await host.expect("vm a: VM over")
    await host.expect(f"vm b: listening on unix:{vms.listener('a')}")
    assert await name_of(await client(vms, "a")) == named("a")
    await stop_host(host)


async def test_two_files_with_one_listener_stay_refused_at_every_rescan(vms: Vms) -> None:
    vms.qemu("a")
    vms.qemu("b")
    vms.write("a")
    vms.write("b", listen_as="a")
    host = await Running.launch("--vm-dir", str(vms.dir))
    await host.expect("0 of 2 VM(s) up")
    host.proc.send_signal(signal.SIGHUP)  # nothing changed: which was meant is still unknown
    for _ in range(2):
        assert "neither starts" in await host.expect("refused")
    assert not vms.listener("a").exists()
    await stop_host(host)


async def test_a_vm_stopped_twice_while_it_starts_leaves_no_socket(vms: Vms) -> None:
    # `s` reconnects and its QEMU is not there: it is still trying when SIGTERM comes
    # twice; it stops trying at once, and must not listen for its clients after that,
    # nor leave its socket file behind.
    vms.qemu("a")
    vms.write("a")
    vms.write_text(
        "s",
        f'upstream = "unix:{vms.root / "nowhere.sock"}"\nreconnect = true\n'
        f'connect-timeout = 1\n[[listen]]\naddress = "unix:{vms.listener("s")}"\n',
    )
    host = await Running.launch("--vm-dir", str(vms.dir))
    await expect_all(host, f"vm a: listening on unix:{vms.listener('a')}", "vm s: connecting")
    host.proc.send_signal(signal.SIGTERM)
    host.proc.send_signal(signal.SIGTERM)
    assert await host.wait() == 0
    assert "vm s: stopped before it started" in "".join(host.log)  # not after connect-timeout
    assert not vms.listener("s").exists(), "".join(host.log)


async def test_a_nul_in_a_path_refuses_the_vm_file_and_a_fixed_file_starts(vms: Vms) -> None:
    # A path with a NUL cannot name a file (the system call would see a shorter one):
    # refused with its key, as any other bad value, and never an exception in a VM.
    vms.qemu("a")
    monitor = vms.qemus["a"].monitors[0]
    vms.write_text(
        "a",
        f'upstream = "unix:{monitor}"\n[[listen]]\naddress = "unix:{vms.listener("a")}\\u0000x"\n',
    )
    vms.write_text(  # a user name: resolved as the file is read, by the host itself
        "b",
        f'upstream = "unix:{vms.root / "q"}"\n'
        f'[[listen]]\naddress = "unix:{vms.listener("b")}"\nowner = "a\\u0000b"\n',
    )
    host = await Running.launch("--vm-dir", str(vms.dir))
    assert "a.toml: listen[0].address: " in await host.expect("vm a: refused: ")
    assert "b.toml: listen[0].owner: " in await host.expect("vm b: refused: ")
    await host.expect("0 of 2 VM(s) up")
    vms.write("a")  # fixed: its file changing starts it
    host.proc.send_signal(signal.SIGHUP)
    await host.expect(f"vm a: listening on unix:{vms.listener('a')}")
    assert await name_of(await client(vms, "a")) == named("a")
    await stop_host(host)


async def test_a_qemu_address_that_does_not_resolve_fails_its_vm_or_is_retried(
    vms: Vms,
) -> None:
    # A name that does not resolve is one more way of QEMU not being there: a VM without
    # reconnect fails, one with it listens and keeps trying (README "Host mode").
    for name, port, extra in (("once", 4444, ""), ("again", 4445, "reconnect = true\n")):
        vms.write_text(
            name,
            f'upstream = "tcp:qmpmux-test.invalid:{port}"\nconnect-timeout = 0.1\n{extra}'
            f'[[listen]]\naddress = "unix:{vms.listener(name)}"\n',
        )
    host = await Running.launch("--vm-dir", str(vms.dir))
    await expect_all(
        host,
        "vm once: cannot start: cannot connect to QEMU at tcp:qmpmux-test.invalid:4444: ",
        "vm again: QEMU not reached (cannot connect to QEMU at tcp:qmpmux-test.invalid",
    )
    await host.expect("1 of 2 VM(s) up")
    assert not vms.listener("once").exists()
    assert vms.listener("again").exists()
    await stop_host(host)


async def test_a_defect_in_one_vms_start_fails_that_vm_alone(
    vms: Vms, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # What qmpmux does not expect (a bug: no QEMU can cause it on demand) costs the VM
    # it happened in: logged in its name, its listeners closed, failed until its file
    # changes; the host's bookkeeping and the other VMs go on.
    for name in ("a", "b"):
        vms.qemu(name)
        vms.write(name)
    real_start = Vm.start

    async def start(vm: Vm, wait_for_qemu: bool = False) -> UpstreamReady | None:
        if vm.name == "b":
            raise RuntimeError("a bug")
        return await real_start(vm, wait_for_qemu)

    monkeypatch.setattr(Vm, "start", start)
    host = Host(HostConfig(vm_dir=str(vms.dir)))
    assert host.rescan()
    started = [e.started for e in host.entries.values() if e.started is not None]
    await asyncio.wait_for(asyncio.gather(*started), 10)
    assert {n: e.state for n, e in host.entries.items()} == {"a": "up", "b": "failed"}
    assert [r.getMessage() for r in caplog.records if r.exc_info] == ["failed"]
    assert not vms.listener("b").exists()
    assert await name_of(await client(vms, "a")) == named("a")
    monkeypatch.undo()
    vms.write("b", "# changed")
    assert host.rescan()
    entry = host.entries["b"]
    assert entry.started is not None
    await asyncio.wait_for(entry.started, 10)
    assert await name_of(await client(vms, "b")) == named("b")
    host.stop("test over")
    tasks = [e.task for e in host.entries.values() if e.task is not None]
    await asyncio.wait_for(asyncio.gather(*tasks), 10)


async def test_a_defect_in_reading_one_vm_file_refuses_that_file_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The files are read in their names' order: one that raises what qmpmux does not
    # expect must not end the rescan before the files after it (nor the host at start).
    vm_dir = tmp_path / "vm.d"
    vm_dir.mkdir()
    for name in ("a", "b", "c"):
        (vm_dir / f"{name}.toml").write_text(
            f'upstream = "unix:{tmp_path}/q-{name}"\nconnect-timeout = 0.1\n'
            f'[[listen]]\naddress = "unix:{tmp_path}/l-{name}"\n'
        )
    real_vm_config = config_module.vm_config

    def vm_config(file: VmFile, origin: str) -> Config:
        if origin.endswith("b.toml"):
            raise RuntimeError("a bug")
        return real_vm_config(file, origin)

    monkeypatch.setattr(host_module, "vm_config", vm_config)
    host = Host(HostConfig(vm_dir=str(vm_dir)))
    assert host.rescan()
    states = {n: e.state for n, e in host.entries.items()}
    assert states == {"a": "starting", "b": "refused", "c": "starting"}
    host.stop("test over")
    await asyncio.wait_for(host._done, 10)


async def test_a_vm_file_that_is_not_a_regular_file_is_skipped_and_never_read(
    vms: Vms,
) -> None:
    # Reading a FIFO waits for a writer, and a device may never end: the host would hang
    # in the rescan, every VM with it.
    vms.qemu("a")
    vms.write("a")
    os.mkfifo(vms.dir / "fifo.toml")
    (vms.dir / "zero.toml").symlink_to("/dev/zero")
    host = await Running.launch("--vm-dir", str(vms.dir))
    await expect_all(
        host, "fifo.toml: not a regular file; skipped", "zero.toml: not a regular file; skipped"
    )
    await host.expect("1 of 1 VM(s) up")
    assert await name_of(await client(vms, "a")) == named("a")
    await stop_host(host)


async def test_a_vm_whose_file_cannot_be_read_for_a_while_keeps_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As for the directory: a file there that cannot be read now (its mode changed by a
    # tool, an I/O error; root reads through any mode, so the error is made here) is not
    # a file removed, and its VM's clients are not closed for it.
    vm_dir = tmp_path / "vm.d"
    vm_dir.mkdir()
    (vm_dir / "a.toml").write_text(
        f'upstream = "unix:{tmp_path}/q"\nreconnect = true\nconnect-timeout = 0.1\n'
        f'[[listen]]\naddress = "unix:{tmp_path}/l"\n'
    )
    host = Host(HostConfig(vm_dir=str(vm_dir)))
    assert host.rescan()
    entry = host.entries["a"]
    assert entry.started is not None
    await asyncio.wait_for(entry.started, 10)
    assert entry.state == "up"

    def unreadable(path: str) -> bytes:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(host_module, "_read_regular", unreadable)
    assert host.rescan()
    assert host.entries.get("a") is entry and entry.state == "up"
    assert (tmp_path / "l").exists()
    host.stop("test over")
    await asyncio.wait_for(host._done, 10)


async def test_sigterm_while_the_vms_start_is_never_followed_by_ready(
    vms: Vms, notify: NotifySocket
) -> None:
    # The manager was told the service stops: READY=1 after that (once the VMs started,
    # or around a reload) would say it runs.
    vms.write_text(
        "s",
        f'upstream = "unix:{vms.root / "nowhere.sock"}"\nconnect-timeout = 3\n'
        f'[[listen]]\naddress = "unix:{vms.listener("s")}"\n',
    )
    host = await Running.launch("--vm-dir", str(vms.dir), env={"NOTIFY_SOCKET": notify.address})
    await host.expect("vm s: connecting")
    host.proc.send_signal(signal.SIGTERM)
    await notify.expect(lambda m: "STOPPING=1" in m)
    assert ignores_signal(host.proc.pid, signal.SIGHUP)  # nothing to reload: it stops
    host.proc.send_signal(signal.SIGHUP)
    assert await host.wait() == 0
    notify.read_rest()
    stopping = next(i for i, m in enumerate(notify.messages) if "STOPPING=1" in m)
    assert not any("READY=1" in m for m in notify.messages[stopping:]), notify.messages


async def test_a_file_added_in_the_same_clock_tick_as_the_last_look_is_found(
    tmp_path: Path,
) -> None:
    # A directory's modification time comes from a coarse clock: a file renamed in
    # within the tick in which the last look read it leaves it as it was. Made so here
    # by putting the time back, as the clock would have left it.
    vm_dir = tmp_path / "vm.d"
    vm_dir.mkdir()
    text = (
        'upstream = "unix:{0}/q-{1}"\nconnect-timeout = 0.1\n'
        '[[listen]]\naddress = "unix:{0}/l-{1}"\n'
    )
    host = Host(HostConfig(vm_dir=str(vm_dir)))
    host._dir_stamp = os.stat(vm_dir).st_mtime_ns
    (vm_dir / "a.toml").write_text(text.format(tmp_path, "a"))
    host._look()
    assert list(host.entries) == ["a"]
    seen = os.stat(vm_dir)
    (vm_dir / "b.toml").write_text(text.format(tmp_path, "b"))
    os.utime(vm_dir, ns=(seen.st_atime_ns, seen.st_mtime_ns))
    host._look()
    assert sorted(host.entries) == ["a", "b"]
    assert host._poll is not None
    host._poll.cancel()
    host.stop("test over")
    await asyncio.wait_for(host._done, 10)
