"""The qmpmux command as operators run it: argument errors, listeners, spawn, signals."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import sys
from pathlib import Path

import msgspec
import pytest
import uvloop
from prometheus_client.parser import text_string_to_metric_families

from qmpmux import cli
from tests.realqemu import BASE_ARGS, RawClient, qemu_path, start_qemu


async def run(*args: str, timeout: float = 20) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "qmpmux",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, (out + err).decode()


class Running:
    """A qmpmux process that has logged its ready line."""

    def __init__(self, proc: asyncio.subprocess.Process, log: list[str]) -> None:
        self.proc, self.log = proc, log

    @classmethod
    async def launch(cls, *args: str, env: dict[str, str] | None = None) -> Running:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "qmpmux", *args,
            stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            env=None if env is None else {**os.environ, **env},
        )  # fmt: skip
        return cls(proc, [])

    @classmethod
    async def start(cls, *args: str, env: dict[str, str] | None = None) -> Running:
        running = await cls.launch(*args, env=env)
        await running.expect(" ready: ")
        return running

    async def expect(self, text: str) -> str:
        """The next log line containing `text` (the process keeps running)."""
        assert self.proc.stderr is not None
        while True:
            line = (await asyncio.wait_for(self.proc.stderr.readline(), 20)).decode()
            assert line, f"qmpmux exited; log: {''.join(self.log)}"
            self.log.append(line)
            if text in line:
                return line

    async def wait(self) -> int:
        assert self.proc.stderr is not None
        rest = await asyncio.wait_for(self.proc.stderr.read(), 20)
        self.log.append(rest.decode())
        return await self.proc.wait()


def spawn_args(sock: Path, *extra: str) -> list[str]:
    """`-machine none` has no power button: these tests quit QEMU at once on SIGTERM
    (test_service.py covers powering a guest down)."""
    return ["--listen", f"unix:{sock}", *extra, "--shutdown-timeout", "0", "--spawn", "--",
            qemu_path(), *BASE_ARGS]  # fmt: skip


def one_line_error(output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.strip()]
    assert "Traceback" not in output, output
    assert len(lines) == 1 and lines[0].startswith("qmpmux: error: "), output
    return lines[0]


async def test_help_documents_the_command_line() -> None:
    code, out = await run("--help")
    assert code == 0
    for word in (
        "--upstream",
        "--listen",
        "--spawn",
        "profile=",
        "mode=",
        "--allow-remote",
        "--log-level",
        "unix:PATH",
        "tcp:HOST:PORT",
    ):
        assert word in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--listen", "bogus:x", "--upstream", "unix:/x"], "bad address 'bogus:x'"),
        (["--listen", "unix:/tmp/x,profile=nosuch", "--upstream", "unix:/x"], "unknown profile"),
        (["--listen", "unix:/tmp/x,mode=999", "--upstream", "unix:/x"], "bad mode"),
        (["--listen", "tcp:0.0.0.0:4444", "--upstream", "unix:/x"], "without --allow-remote"),
        (["--listen", "unix:/tmp/x"], "exactly one of --upstream"),
        (["--upstream", "unix:/x"], "no --listen"),
        (["--listen", "unix:/tmp/x", "--spawn"], "--spawn needs a QEMU command line"),
        (
            ["--listen", "unix:/tmp/x", "--upstream", "unix:/x", "--metrics", "tcp:0.0.0.0:9"],
            "refusing to serve metrics on non-loopback tcp:0.0.0.0:9 without --allow-remote",
        ),
        (
            ["--listen", "unix:/tmp/x", "--upstream", "unix:/x", "--metrics", "9100"],
            "--metrics: bad",
        ),
    ],
)
async def test_bad_arguments_are_one_clear_line(args: list[str], message: str) -> None:
    code, out = await run(*args)
    assert code == 2
    assert message in one_line_error(out)


async def test_missing_upstream_is_one_line_after_retrying(tmp_path: Path) -> None:
    code, out = await run(
        "--listen",
        f"unix:{tmp_path}/m.sock",
        "--upstream",
        f"unix:{tmp_path}/absent.sock",
        "--connect-timeout",
        "0.3",
        "--log-level",
        "warning",
    )
    assert code == 1
    assert "cannot connect to QEMU" in one_line_error(out)


async def test_an_upstream_name_that_does_not_resolve_is_one_line(tmp_path: Path) -> None:
    code, out = await run(
        "--listen", f"unix:{tmp_path}/m.sock", "--upstream", "tcp:qmpmux-test.invalid:4444",
        "--connect-timeout", "0.3", "--log-level", "warning",
    )  # fmt: skip
    assert code == 1
    assert "cannot connect to QEMU at tcp:qmpmux-test.invalid:4444: " in one_line_error(out)


async def test_missing_qemu_binary_is_one_line(tmp_path: Path) -> None:
    code, out = await run(
        "--listen", f"unix:{tmp_path}/m.sock", "--spawn", "--", "/nonexistent/qemu-system-x86_64"
    )
    assert code == 1
    assert "command not found" in one_line_error(out)


async def test_qemu_refusing_its_arguments_is_reported(tmp_path: Path) -> None:
    code, out = await run(
        *spawn_args(tmp_path / "m.sock", "--log-level", "error"), "-no-such-option"
    )
    assert code == 1
    assert "QEMU exited with status 1 before it was ready" in out
    assert "Traceback" not in out


async def test_spawn_serves_clients_and_sigterm_shuts_qemu_down_cleanly(tmp_path: Path) -> None:
    sock = tmp_path / "vm.sock"
    mux = await Running.start(*spawn_args(sock))
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    client = await RawClient.connect(sock)
    assert msgspec.json.decode(client.greeting)["QMP"]["version"]["qemu"]["major"] >= 7
    await client.negotiate()
    reply = await client.command(b'{"execute":"query-status","id":1}')
    assert reply.startswith(b'{"return": {"status": "running"')
    mux.proc.send_signal(signal.SIGTERM)
    event = msgspec.json.decode(await client.read())
    assert event["event"] == "SHUTDOWN" and event["data"]["reason"] == "host-qmp-quit"
    assert await client.eof()
    assert await mux.wait() == 0
    assert not sock.exists()


async def test_spawned_qemu_quitting_ends_qmpmux_with_its_status(tmp_path: Path) -> None:
    sock = tmp_path / "vm.sock"
    mux = await Running.start(*spawn_args(sock, "--listen", f"unix:{tmp_path}/b.sock,mode=0660"))
    assert stat.S_IMODE(os.stat(tmp_path / "b.sock").st_mode) == 0o660
    client = await RawClient.connect(sock)
    await client.negotiate()
    await client.send(b'{"execute":"quit"}')
    assert b"SHUTDOWN" in await client.read()
    assert await client.read() == b'{"return": {}}\r\n'
    assert await mux.wait() == 0


async def test_live_socket_is_refused_and_stale_one_replaced(tmp_path: Path) -> None:
    sock = tmp_path / "vm.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))
    stale.close()  # a socket file nobody listens on
    mux = await Running.start(*spawn_args(sock))
    try:
        code, out = await run(*spawn_args(sock))
        assert code == 1
        assert "another process is serving it" in one_line_error(out)
        client = await RawClient.connect(sock)  # the first one is unharmed
        await client.negotiate()
    finally:
        mux.proc.send_signal(signal.SIGINT)
        assert await mux.wait() == 0


async def test_tcp_listener_on_loopback(tmp_path: Path) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    mux = await Running.start(
        "--listen",
        f"tcp:127.0.0.1:{port}",
        "--shutdown-timeout",
        "0",
        "--spawn",
        "--",
        qemu_path(),
        *BASE_ARGS,
    )
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await reader.readline()).startswith(b'{"QMP": ')
        writer.close()
    finally:
        mux.proc.send_signal(signal.SIGTERM)
        assert await mux.wait() == 0


async def test_upstream_mode_exits_nonzero_when_qemu_is_killed(tmp_path: Path) -> None:
    vm = start_qemu(tmp_path, monitors=1)
    try:
        mux = await Running.start(
            "--listen", f"unix:{tmp_path}/m.sock", "--upstream", f"unix:{vm.monitors[0]}"
        )
        vm.proc.kill()
        assert await mux.wait() == 1
        assert any("QEMU closed the monitor connection" in line for line in mux.log)
    finally:
        vm.stop()


async def test_sighup_reloads_policy_without_dropping_clients(tmp_path: Path) -> None:
    sock = tmp_path / "vm.sock"
    conf = tmp_path / "qmpmux.toml"
    listen = f'[[listen]]\naddress = "unix:{sock}"\nprofile = "ops"\n'
    conf.write_text(listen + '[profiles.ops]\nbase = "readonly"\n')
    mux = await Running.start(
        "--config", str(conf), "--shutdown-timeout", "0", "--spawn", "--", qemu_path(), *BASE_ARGS
    )
    try:
        client = await RawClient.connect(sock)
        await client.negotiate()
        assert b"refused by qmpmux policy" in await client.command(b'{"execute":"stop"}')
        conf.write_text(listen + '[profiles.ops]\nbase = "vm-control"\n')
        mux.proc.send_signal(signal.SIGHUP)
        await mux.expect("policy reloaded")
        assert await client.command(b'{"execute":"stop","id":1}') == b'{"return": {}, "id": 1}\r\n'
        conf.write_text(listen + "[profiles.ops]\nbase = 'vm-control'\ncomands = []\n")
        mux.proc.send_signal(signal.SIGHUP)
        line = await mux.expect("reload failed")
        assert "profiles.ops.comands: unknown key" in line
        assert await client.command(b'{"execute":"cont","id":2}') == b'{"return": {}, "id": 2}\r\n'
    finally:
        mux.proc.send_signal(signal.SIGTERM)
        assert await mux.wait() == 0


async def test_check_config_resolves_profiles_against_qemu(tmp_path: Path) -> None:
    conf = tmp_path / "qmpmux.toml"
    conf.write_text(
        '[profiles.mon]\ncommands = ["query-statu?", "query-nam?", "nope"]\nevents = ["STOP"]\n'
    )
    # The totals come from a direct monitor of a QEMU of the same binary and arguments:
    # they are whatever this QEMU has, never one version's counts.
    vm = start_qemu(tmp_path, monitors=2)
    try:
        direct = await RawClient.connect(vm.monitors[1])
        await direct.negotiate()
        commands = msgspec.json.decode(await direct.command(b'{"execute":"query-commands"}'))
        schema = msgspec.json.decode(await direct.command(b'{"execute":"query-qmp-schema"}'))
        await direct.close()
        n_commands = len(commands["return"])
        n_events = sum(e["meta-type"] == "event" for e in schema["return"])
        assert n_commands > 2 and n_events > 1
        upstream = ("--upstream", f"unix:{vm.monitors[0]}")
        spawn = ("--spawn", "--", qemu_path(), *BASE_ARGS)
        for source in (upstream, spawn):
            code, out = await run("check-config", str(conf), *source)
            assert code == 0, out
            assert f"commands (2 of {n_commands}): query-name, query-status" in out
            assert f"events (1 of {n_events}): STOP" in out
    finally:
        vm.stop()
    conf.write_text("[profiles.mon]\nbase = 'nope'\n")
    code, out = await run("check-config", str(conf))
    assert code == 2
    assert "profiles.mon.base: unknown profile 'nope'" in one_line_error(out)


async def test_upstream_socket_that_appears_late_is_waited_for(tmp_path: Path) -> None:
    monitor = tmp_path / "mon0.sock"
    mux = await Running.launch("--listen", f"unix:{tmp_path}/m.sock", "--upstream",
                               f"unix:{monitor}", "--connect-timeout", "20")  # fmt: skip
    await mux.expect("waiting up to 20 s for QEMU's monitor")  # QEMU does not exist yet
    vm = start_qemu(tmp_path, monitors=1)
    try:
        await mux.expect(" ready: ")
        client = await RawClient.connect(tmp_path / "m.sock")
        await client.negotiate()
        assert (await client.command(b'{"execute":"query-name"}')) == b'{"return": {}}\r\n'
        mux.proc.send_signal(signal.SIGTERM)
        assert await mux.wait() == 0
    finally:
        vm.stop()


async def scrape_tcp(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: qmpmux\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK"), head
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


async def test_metrics_on_loopback_tcp_from_the_config_file(tmp_path: Path) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    sock = tmp_path / "vm.sock"
    conf = tmp_path / "qmpmux.toml"
    good = f'metrics = "tcp:127.0.0.1:{port}"\n[[listen]]\naddress = "unix:{sock}"\n'
    conf.write_text(good)
    mux = await Running.start(
        "--config", str(conf), "--shutdown-timeout", "0", "--spawn", "--", qemu_path(), *BASE_ARGS
    )
    try:
        client = await RawClient.connect(sock)
        await client.negotiate()
        assert await client.command(b'{"execute":"query-status"}')
        samples = await scrape_tcp(port)
        assert (
            samples["qmpmux_commands_total", (("command", "query-status"), ("result", "ok"))] == 1
        )
        assert samples["qmpmux_clients", (("listener", f"unix:{sock}"), ("profile", "full"))] == 1
        # Reloads are counted by result: a broken file, then a good one.
        conf.write_text(good + "bogus = 1\n")
        mux.proc.send_signal(signal.SIGHUP)
        await mux.expect("reload failed")
        conf.write_text(good)
        mux.proc.send_signal(signal.SIGHUP)
        await mux.expect("policy reloaded")
        samples = await scrape_tcp(port)
        assert samples["qmpmux_config_reloads_total", (("result", "error"),)] == 1
        assert samples["qmpmux_config_reloads_total", (("result", "ok"),)] == 1
        await client.close()
    finally:
        mux.proc.send_signal(signal.SIGTERM)
        assert await mux.wait() == 0


def test_once_serving_is_over_no_stop_signal_can_kill_the_process() -> None:
    """A second SIGTERM right behind the first could arrive after the loop closed and took
    its handlers: the process, done and exiting 0, would die of it (status -15)."""
    stops = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    saved = {sig: signal.getsignal(sig) for sig in stops}

    async def serving() -> int:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, lambda: None)
        return 0

    try:
        assert uvloop.run(cli._until_done(serving())) == 0
        assert all(signal.getsignal(sig) is signal.SIG_IGN for sig in stops)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
