"""Host mode against real QEMUs: one qmpmux process, a file per VM (README "Host mode").

Each VM's QEMU is started with its own `-name`, so `query-name` through a VM's listener
says which QEMU a client reached.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from qmpmux.config import HostConfig
from qmpmux.host import Host, read_vm_dir
from tests.realqemu import Qemu, RawClient, start_qemu
from tests.test_cli import Running, one_line_error, run
from tests.test_metrics_qemu import scrape, value


class Vms:
    """QEMUs by name, each in its own directory, and the vm-dir describing them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir = root / "vm.d"
        self.dir.mkdir()
        self.qemus: dict[str, Qemu] = {}

    def qemu(self, name: str) -> Qemu:
        work = self.root / name
        work.mkdir(exist_ok=True)
        qemu = start_qemu(work, monitors=1, extra=["-name", name])
        self.qemus[name] = qemu
        return qemu

    def listener(self, name: str) -> Path:
        return self.root / f"{name}.sock"

    def write(
        self, name: str, extra: str = "", profile: str = "full", listen_as: str | None = None
    ) -> None:
        """The VM's file, written whole and renamed into place, as a tool should; with
        `listen_as`, on the listener of that other VM."""
        monitor = self.qemus[name].monitors[0]
        listener = self.listener(listen_as or name)
        text = (
            f'upstream = "unix:{monitor}"\n{extra}\n'
            f'[[listen]]\naddress = "unix:{listener}"\nprofile = "{profile}"\n'
        )
        self.write_text(name, text)

    def write_text(self, name: str, text: str) -> None:
        tmp = self.dir / f".{name}.tmp"
        tmp.write_text(text)
        tmp.rename(self.dir / f"{name}.toml")

    def stop(self) -> None:
        for qemu in self.qemus.values():
            qemu.stop()


@pytest.fixture
def vms(tmp_path: Path) -> Iterator[Vms]:
    vms = Vms(tmp_path)
    yield vms
    vms.stop()


async def start_host(vms: Vms, *extra: str) -> Running:
    host = await Running.launch("--vm-dir", str(vms.dir), *extra)
    await host.expect("VM(s) up")
    return host


async def client(vms: Vms, name: str) -> RawClient:
    c = await RawClient.connect(vms.listener(name))
    await c.negotiate()
    return c


async def name_of(c: RawClient) -> bytes:
    return await c.command(b'{"execute":"query-name","id":1}')


def named(name: str) -> bytes:
    return b'{"return": {"name": "' + name.encode() + b'"}, "id": 1}\r\n'


async def stop_host(host: Running) -> None:
    host.proc.send_signal(signal.SIGTERM)
    assert await host.wait() == 0


async def test_each_vm_is_its_own_qemu_and_one_dying_or_stalling_costs_only_its_clients(
    vms: Vms,
) -> None:
    for name in ("a", "b", "c"):
        vms.qemu(name)
        vms.write(name)
    host = await start_host(vms)
    clients = {name: await client(vms, name) for name in ("a", "b", "c")}
    for name, c in clients.items():
        assert await name_of(c) == named(name)
    vms.qemus["c"].proc.send_signal(signal.SIGSTOP)  # c's QEMU stalls: c's clients wait
    try:
        await clients["c"].send(b'{"execute":"query-name","id":1}')
        vms.qemus["b"].proc.kill()
        assert await clients["b"].eof()
        assert await name_of(clients["a"]) == named("a")
        assert await name_of(await client(vms, "a")) == named("a")
    finally:
        vms.qemus["c"].proc.send_signal(signal.SIGCONT)
    assert await clients["c"].read() == named("c")
    assert host.proc.returncode is None
    await stop_host(host)


async def test_sighup_adds_and_removes_vms_and_the_others_notice_nothing(vms: Vms) -> None:
    vms.qemu("a")
    vms.qemu("b")
    vms.write("a")
    host = await start_host(vms)
    a = await client(vms, "a")
    assert await name_of(a) == named("a")
    vms.write("b")
    host.proc.send_signal(signal.SIGHUP)
    await host.expect(f"listening on unix:{vms.listener('b')}")
    b = await client(vms, "b")
    assert await name_of(b) == named("b")
    (vms.dir / "b.toml").unlink()
    host.proc.send_signal(signal.SIGHUP)
    assert await b.eof()
    assert not vms.listener("b").exists()
    # a's client: same connection, nothing unasked for, the next line its own reply
    assert await a.command(b'{"execute":"query-name","id":1}') == named("a")
    await stop_host(host)


async def test_a_file_added_is_seen_without_a_signal(vms: Vms) -> None:
    vms.qemu("a")
    host = await start_host(vms)
    vms.write("a")  # a rename into the directory changes its modification time
    await host.expect(f"listening on unix:{vms.listener('a')}")
    assert await name_of(await client(vms, "a")) == named("a")
    await stop_host(host)


async def test_a_bad_vm_file_is_refused_by_key_path_and_the_others_run(vms: Vms) -> None:
    vms.qemu("a")
    vms.write("a")
    vms.write_text("bad", '[[listen]]\naddress = "unix:/tmp/x"\n[limits]\nmax-pending = 0\n')
    vms.write_text("host-key", 'metrics = "tcp:127.0.0.1:9"\n')
    host = await Running.launch("--vm-dir", str(vms.dir))
    lines = [await host.expect("refused"), await host.expect("refused")]
    assert any(f"{vms.dir}/bad.toml: limits.max-pending = 0" in line for line in lines)
    assert any(f"{vms.dir}/host-key.toml: metrics: a key of the whole" in line for line in lines)
    await host.expect("1 of 3 VM(s) up")
    assert await name_of(await client(vms, "a")) == named("a")
    await stop_host(host)


async def test_two_new_files_with_one_listener_start_neither(vms: Vms) -> None:
    vms.qemu("a")
    vms.qemu("b")
    vms.write("a")
    vms.write("b", listen_as="a")
    host = await Running.launch("--vm-dir", str(vms.dir))
    await host.expect("neither starts")
    await host.expect("0 of 2 VM(s) up")
    (vms.dir / "b.toml").unlink()
    host.proc.send_signal(signal.SIGHUP)  # a, refused for the clash, is tried again
    await host.expect(f"listening on unix:{vms.listener('a')}")
    assert await name_of(await client(vms, "a")) == named("a")
    await stop_host(host)


async def test_a_changed_file_reloads_that_vms_policy(vms: Vms) -> None:
    vms.qemu("a")
    ops = '[profiles.ops]\nbase = "readonly"\n'
    vms.write("a", ops, profile="ops")
    host = await start_host(vms)
    a = await client(vms, "a")
    assert await name_of(a) == named("a")
    vms.write("a", ops + 'deny-commands = ["query-name"]\n', profile="ops")
    host.proc.send_signal(signal.SIGHUP)
    await host.expect("policy reloaded")
    reply = await name_of(a)
    assert b"The command query-name has been refused by qmpmux policy" in reply
    # anything but the policy is not changed under the VM's clients
    vms.write("a", ops + "[limits]\nmax-clients = 7\n", profile="ops")
    host.proc.send_signal(signal.SIGHUP)
    await host.expect("changed beyond profiles and rules")
    assert b"refused" in await name_of(a)
    await stop_host(host)


async def test_a_vm_that_reconnects_waits_for_its_qemu_with_clients_held(vms: Vms) -> None:
    monitor = vms.root / "a" / "mon0.sock"  # where vms.qemu("a") will put it
    vms.write_text(
        "a",
        f'upstream = "unix:{monitor}"\nreconnect = true\nconnect-timeout = 0.1\n'
        f'[[listen]]\naddress = "unix:{vms.listener("a")}"\n',
    )
    host = await Running.launch("--vm-dir", str(vms.dir))
    await host.expect("accepting clients, reconnecting")
    await host.expect("VM(s) up")
    early = await RawClient.connect(vms.listener("a"), greeting=False)
    vms.qemu("a")
    await host.expect("reconnected")
    early.greeting = await early.read()
    assert early.greeting.startswith(b'{"QMP"')
    await early.negotiate()
    assert await name_of(early) == named("a")
    await stop_host(host)


async def test_reconnect_is_per_vm(vms: Vms) -> None:
    vms.qemu("a")
    vms.qemu("b")
    vms.write("a", "reconnect = true")
    vms.write("b")
    host = await start_host(vms)
    b = await client(vms, "b")
    a = await client(vms, "a")
    vms.qemus["a"].stop()
    assert await a.eof()
    vms.qemu("a")  # the same monitor path again
    await host.expect("reconnected")
    assert await name_of(await client(vms, "a")) == named("a")
    assert await name_of(b) == named("b")
    await stop_host(host)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--upstream", "unix:/x"], "--upstream: a VM's setting; with --vm-dir"),
        (["--listen", "unix:/x"], "--listen: a VM's setting"),
        (["--max-clients", "3"], "--max-clients: a VM's setting"),
    ],
)
async def test_a_vms_flag_in_host_mode_is_one_line(
    tmp_path: Path, args: list[str], message: str
) -> None:
    code, out = await run("--vm-dir", str(tmp_path), *args)
    assert code == 2
    assert message in one_line_error(out)


async def test_a_vms_key_in_the_host_config_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "host.toml"
    config.write_text(f'vm-dir = "{tmp_path}"\nupstream = "unix:/x"\n')
    code, out = await run("--config", str(config))
    assert code == 2
    assert f"{config}: upstream: a VM's key" in one_line_error(out)


async def test_a_missing_vm_dir_is_one_line(tmp_path: Path) -> None:
    code, out = await run("--vm-dir", str(tmp_path / "nowhere"))
    assert code == 1
    assert "No such file or directory" in one_line_error(out)


def test_only_well_named_toml_files_are_vms(tmp_path: Path) -> None:
    for name in ("web1.toml", "db-2.toml", ".web1.toml.swp", ".hidden.toml", "notes.txt",
                 "bad name.toml", "-x.toml", "web1.toml~"):  # fmt: skip
        (tmp_path / name).write_text("x")
    found, skipped = read_vm_dir(str(tmp_path))
    assert sorted(found) == ["db-2", "web1"]
    assert sorted(skipped) == ["-x.toml", "bad name.toml"]


async def test_sigterm_stops_every_vm_and_removes_their_sockets(vms: Vms) -> None:
    for name in ("a", "b"):
        vms.qemu(name)
        vms.write(name)
    host = await start_host(vms)
    clients = [await client(vms, name) for name in ("a", "b")]
    await stop_host(host)
    for c in clients:
        assert await c.eof()
    assert not vms.listener("a").exists() and not vms.listener("b").exists()
    assert all(qemu.alive() for qemu in vms.qemus.values())  # not qmpmux's to stop


async def test_logs_audit_records_and_metrics_name_the_vm(vms: Vms) -> None:
    for name in ("a", "b"):
        vms.qemu(name)
        vms.write(name, profile="readonly")
    vms.write_text("bad", "upstream = 1\n")
    metrics = vms.root / "metrics.sock"
    audit = vms.root / "audit.log"
    host = await start_host(vms, "--metrics", f"unix:{metrics}", "--audit", str(audit))
    a = await client(vms, "a")
    assert await name_of(a) == named("a")
    assert b"refused" in await a.command(b'{"execute":"stop","id":2}')
    b = await client(vms, "b")
    assert await name_of(b) == named("b")
    samples = await scrape(metrics)
    for name, ok in (("a", 1), ("b", 1)):
        assert value(samples, "qmpmux_commands_total", vm=name, command="query-name",
                     result="ok") == ok  # fmt: skip
    assert value(samples, "qmpmux_commands_total", vm="a", command="stop", result="denied") == 1
    assert value(samples, "qmpmux_commands_total", vm="b", command="stop", result="denied") == 0
    assert value(samples, "qmpmux_vms", state="up") == 2
    # a refused file has no hub, and still shows
    assert value(samples, "qmpmux_vm_files", state="up") == 2
    assert value(samples, "qmpmux_vm_files", state="refused") == 1
    assert value(samples, "qmpmux_vm_files", state="failed") == 0
    await stop_host(host)
    records = [msgspec.json.decode(line) for line in audit.read_bytes().splitlines()]
    assert sorted((r["vm"], r["command"]) for r in records) == [
        ("a", "query-name"), ("a", "stop"), ("b", "query-name"),
    ]  # fmt: skip
    connects = [ln for ln in "".join(host.log).splitlines() if "connected on" in ln]
    assert len(connects) == 2
    assert any(f"vm a: client 1: connected on unix:{vms.listener('a')}" in ln for ln in connects)
    assert any(f"vm b: client 1: connected on unix:{vms.listener('b')}" in ln for ln in connects)


async def test_check_config_checks_the_host_config_and_every_vm_file(tmp_path: Path) -> None:
    vm_dir = tmp_path / "vm.d"
    vm_dir.mkdir()
    host = tmp_path / "host.toml"
    host.write_text(f'vm-dir = "{vm_dir}"\n')
    listen = '[[listen]]\naddress = "unix:{}"\n'
    (vm_dir / "web1.toml").write_text('upstream = "unix:/q1"\n' + listen.format("/l1"))
    (vm_dir / "web2.toml").write_text('upstream = "unix:/q1"\n' + listen.format("/l2"))
    (vm_dir / "db.toml").write_text('upstream = "unix:/q3"\n' + listen.format("/l3"))
    code, out = await run("check-config", str(host))
    assert code == 2
    assert "  db: valid (1 listener(s)" in out
    assert "  web1: refused: upstream unix:/q1 is in VM web2's file too; neither starts" in out
    (vm_dir / "web2.toml").write_text('upstream = "unix:/q2"\nmetrics = "unix:/m"\n')
    code, out = await run("check-config", str(host))
    assert code == 2
    assert "  web1: valid" in out
    assert f"  web2: refused: {vm_dir}/web2.toml: metrics: a key of the whole process" in out
    (vm_dir / "web2.toml").unlink()
    assert (await run("check-config", str(host)))[0] == 0
    code, out = await run("check-config", "--vm", str(host))
    assert code == 2
    assert f"{host}: vm-dir: a key of the whole process" in one_line_error(out)


async def test_vms_added_together_start_one_a_loop_turn(tmp_path: Path) -> None:
    # Adding many VMs must not hold the loop for the clients of those already serving:
    # each new VM's first step (binding, reaching QEMU) gets a loop turn of its own.
    vm_dir = tmp_path / "vm.d"
    vm_dir.mkdir()
    for i in range(5):
        (vm_dir / f"vm{i}.toml").write_text(
            f'upstream = "unix:{tmp_path}/q{i}"\nconnect-timeout = 0.1\n'
            f'[[listen]]\naddress = "unix:{tmp_path}/l{i}"\n'
        )
    host = Host(HostConfig(vm_dir=str(vm_dir)))
    assert host.rescan()
    made = []
    for _ in range(5):
        made.append(sum(e.vm is not None for e in host.entries.values()))
        await asyncio.sleep(0)
    assert made == [0, 1, 2, 3, 4]
    host.stop("test over")
    tasks = [e.task for e in host.entries.values() if e.task is not None]
    await asyncio.wait_for(asyncio.gather(*tasks), 10)


async def test_a_vm_that_failed_to_start_holds_no_listener(vms: Vms) -> None:
    vms.qemu("b")
    vms.write_text(
        "a",
        f'upstream = "unix:{vms.root / "nowhere.sock"}"\nconnect-timeout = 0.1\n'
        f'[[listen]]\naddress = "unix:{vms.listener("a")}"\n',
    )
    host = await start_host(vms)
    assert any("vm a: cannot start" in line for line in host.log)
    vms.write("b", listen_as="a")
    host.proc.send_signal(signal.SIGHUP)
    await host.expect(f"vm b: listening on unix:{vms.listener('a')}")
    assert await name_of(await client(vms, "a")) == named("b")
    await stop_host(host)


async def test_a_vm_removed_while_it_reaches_its_qemu_stops_at_once(vms: Vms) -> None:
    host = await start_host(vms)
    vms.write_text(
        "s",
        f'upstream = "unix:{vms.root / "nowhere.sock"}"\nconnect-timeout = 3600\n'
        f'[[listen]]\naddress = "unix:{vms.listener("s")}"\n',
    )
    host.proc.send_signal(signal.SIGHUP)
    await host.expect("vm s: connecting to QEMU")
    (vms.dir / "s.toml").unlink()
    host.proc.send_signal(signal.SIGHUP)  # not an hour later: now
    await host.expect("vm s: stopped before it started")
    assert not vms.listener("s").exists()
    await stop_host(host)
