"""qmpmux as a systemd service, with real processes and no mock of systemd: the units
checked by `systemd-analyze`, socket activation by `systemd-socket-activate`, sd_notify
messages caught on a datagram socket the test owns, socket ownership, help texts."""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgspec
import pytest

from qmpmux.cli import parse_args
from qmpmux.policy import BUILTIN
from qmpmux.systemd import Notifier
from tests.realqemu import BASE_ARGS, Qemu, RawClient, qemu_path, start_qemu
from tests.test_cli import Running, one_line_error, run

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
QMPMUX = Path(sys.executable).parent / "qmpmux"  # the console script of this install


def tool(name: str) -> str:
    """A systemd tool, or skip (fail under CI, which installs the systemd package)."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} missing (CI must install systemd)")
        pytest.skip(f"{name} not installed")
    return path


# --- the units -------------------------------------------------------------------------------


def _units_with_exec_start(tmp_path: Path) -> list[Path]:
    """The shipped units, pointed at this install's qmpmux: `verify` checks that the
    ExecStart binary exists, and /opt/qmpmux is where an operator installs it."""
    out = []
    for unit in sorted([*UNITS.glob("qmpmux*@.*"), UNITS / "qmpmux.service"]):
        text = unit.read_text()
        target = tmp_path / unit.name.replace("@.", "@vm1.")
        target.write_text(text.replace("/opt/qmpmux/bin/qmpmux", str(QMPMUX)))
        out.append(target)
    return out


def test_units_point_at_the_documented_install() -> None:
    for unit, config in (("qmpmux@.service", "%i.toml"), ("qmpmux.service", "host.toml")):
        service = (UNITS / unit).read_text()
        assert f"\nExecStart=/opt/qmpmux/bin/qmpmux --config /etc/qmpmux/{config}\n" in service
        assert "\nType=notify\n" in service
        assert "\nExecReload=/bin/kill -HUP $MAINPID\n" in service
    names = {
        unit.name: re.search(r"^FileDescriptorName=(.*)$", unit.read_text(), re.M)
        for unit in UNITS.glob("*.socket")
    }
    assert {k: m and m[1] for k, m in names.items()} == {
        "qmpmux@.socket": "full",
        "qmpmux-readonly@.socket": "readonly",
    }
    readme = (ROOT / "README.md").read_text()
    for command in (
        "python3 -m venv /opt/qmpmux",
        "systemctl enable --now qmpmux@vm1.socket",
        "systemctl reload qmpmux@vm1",
        "systemctl enable --now qmpmux.service",
        "systemctl reload qmpmux\n",
    ):
        assert command in readme


def test_units_verify_clean(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    units = _units_with_exec_start(tmp_path)
    done = subprocess.run(
        [analyze, "verify", *(f"./{u.name}" for u in units)],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout + done.stderr == "", done.stdout + done.stderr


@pytest.mark.parametrize("unit", ["qmpmux@vm1.service", "qmpmux.service"])
def test_service_hardening_exposure(tmp_path: Path, unit: str) -> None:
    analyze = tool("systemd-analyze")
    units = _units_with_exec_start(tmp_path)
    service = next(u for u in units if u.name == unit)
    done = subprocess.run(
        [analyze, "security", "--offline=true", f"./{service.name}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d)", done.stdout)
    assert m is not None, done.stdout + done.stderr
    # 0.7 as shipped ("SAFE" is below 2.0); qmpmux needs nothing the remaining points grant
    # but root's ownership of root-run QEMU monitors.
    assert float(m[1]) <= 1.0, done.stdout


# --- sd_notify -------------------------------------------------------------------------------


class NotifySocket:
    """The service manager's end of NOTIFY_SOCKET: records every datagram."""

    def __init__(self, address: str) -> None:
        self.address = address  # as NOTIFY_SOCKET says it ('@' = abstract)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.setblocking(False)
        self.messages: list[list[str]] = []

    def read_rest(self) -> None:
        """Keep every message already sent (after the process ended, say)."""
        while True:
            try:
                self.messages.append(self.sock.recv(65536).decode().split("\n"))
            except BlockingIOError:
                return

    async def expect(self, wanted: Callable[[list[str]], bool], timeout: float = 20) -> list[str]:
        """The next message that satisfies `wanted` (every one is kept in `messages`)."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            while True:
                data = await loop.sock_recv(self.sock, 65536)
                fields = data.decode().split("\n")
                self.messages.append(fields)
                if wanted(fields):
                    return fields

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
async def notify(tmp_path: Path) -> AsyncIterator[NotifySocket]:
    # Abstract, as systemd's own is in containers; the path form is used in another test.
    n = NotifySocket(f"@qmpmux-test-{os.getpid()}-{id(tmp_path)}")
    yield n
    n.close()


def _qemu(tmp_path: Path) -> Qemu:
    return start_qemu(tmp_path, monitors=1)


async def whoami(client: RawClient) -> dict[str, object]:
    await client.send(b'{"execute":"__org.qmpmux_whoami"}')
    reply = await client.read_json()
    ret = reply["return"]
    assert isinstance(ret, dict)
    return ret


async def activated(
    tmp_path: Path, env: dict[str, str], names: str, *args: str, sockets: tuple[str, ...]
) -> tuple[asyncio.subprocess.Process, list[Path]]:
    """qmpmux under systemd-socket-activate, listening (through it) on `sockets`."""
    activate = tool("systemd-socket-activate")
    paths = [tmp_path / f"{name}.sock" for name in sockets]
    argv = [activate]
    for path in paths:
        argv += ["-l", str(path)]
    argv += [f"--fdname={names}"]
    for key, value in env.items():
        argv += ["-E", f"{key}={value}"]
    argv += [sys.executable, "-m", "qmpmux", *args]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(20):  # it logs each socket once it listens
        assert proc.stderr is not None
        for _ in paths:
            assert b"Listening on" in await proc.stderr.readline()
    return proc, paths


async def test_socket_activation_with_two_named_sockets_and_notifications(
    tmp_path: Path, notify: NotifySocket
) -> None:
    qemu = _qemu(tmp_path)
    config = tmp_path / "vm1.toml"
    config.write_text(
        f'upstream = "unix:{qemu.monitors[0]}"\n'
        '[[listen]]\naddress = "systemd:full"\n'
        '[[listen]]\naddress = "systemd:readonly"\nprofile = "readonly"\n'
    )
    env = {"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "200000"}
    proc, (full, ro) = await activated(
        tmp_path, env, "full:readonly", "--config", str(config), sockets=("full", "ro")
    )
    try:
        # The first client starts qmpmux (socket activation) and waits in the backlog.
        first = await RawClient.connect(ro)
        await first.negotiate()
        ready = await notify.expect(lambda m: "READY=1" in m)
        v = msgspec.json.decode(first.greeting)["QMP"]["version"]["qemu"]
        version = f"QEMU {v['major']}.{v['minor']}.{v['micro']} connected"
        assert f"STATUS=0 clients; {version}" in ready or f"STATUS=1 client; {version}" in ready
        me = await whoami(first)
        assert me["listener"] == "systemd:readonly" and me["profile"] == "readonly"
        await first.send(b'{"execute":"stop","id":1}')
        assert b"refused by qmpmux policy" in await first.read()

        second = await RawClient.connect(full)
        await second.negotiate()
        assert (await whoami(second))["profile"] == "full"
        await notify.expect(lambda m: f"STATUS=2 clients; {version}" in m)
        await notify.expect(lambda m: m == ["WATCHDOG=1"])

        # SIGHUP: RELOADING=1 with the monotonic time it began, then READY=1.
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        proc.send_signal(signal.SIGHUP)  # systemd-socket-activate exec'd into qmpmux
        reloading = await notify.expect(lambda m: "RELOADING=1" in m)
        usec = [int(f.split("=", 1)[1]) for f in reloading if f.startswith("MONOTONIC_USEC=")]
        assert len(usec) == 1 and before <= usec[0], reloading
        after_reload = await notify.expect(lambda m: "READY=1" in m)
        assert usec[0] <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000, after_reload
        assert (await whoami(second))["profile"] == "full"  # nobody was dropped
        await second.close()
        await notify.expect(lambda m: f"STATUS=1 client; {version}" in m)

        proc.send_signal(signal.SIGTERM)
        await notify.expect(lambda m: "STOPPING=1" in m)
        async with asyncio.timeout(20):
            assert await proc.wait() == 0
        # Inherited sockets belong to the manager: never unlinked.
        assert stat.S_ISSOCK(os.lstat(full).st_mode) and stat.S_ISSOCK(os.lstat(ro).st_mode)
        kinds = [m[0].split("=")[0] for m in notify.messages]
        assert kinds.index("READY") < kinds.index("RELOADING") < kinds.index("STOPPING")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        qemu.stop()


async def test_spawned_qemu_inherits_neither_sockets_nor_variables(tmp_path: Path) -> None:
    notify = NotifySocket(str(tmp_path / "notify"))  # the path form of NOTIFY_SOCKET
    proc, (path,) = await activated(
        tmp_path,
        {"NOTIFY_SOCKET": notify.address},
        "mon",
        "--listen", "systemd:mon", "--shutdown-timeout", "0",
        "--spawn", "--", qemu_path(), *BASE_ARGS,
        sockets=("mon",),
    )  # fmt: skip
    try:
        client = await RawClient.connect(path)
        await client.negotiate()
        await notify.expect(lambda m: "READY=1" in m)
        children = _read(f"/proc/{proc.pid}/task/{proc.pid}/children").split()
        assert len(children) == 1
        qemu = children[0].decode()
        environ = _read(f"/proc/{qemu}/environ").split(b"\0")
        names = {e.split(b"=", 1)[0] for e in environ}
        assert not names & {b"LISTEN_FDS", b"LISTEN_PID", b"LISTEN_FDNAMES", b"NOTIFY_SOCKET"}
        inherited = os.readlink(f"/proc/{proc.pid}/fd/3")
        assert inherited.startswith("socket:")
        theirs = [os.readlink(f"/proc/{qemu}/fd/{fd}") for fd in os.listdir(f"/proc/{qemu}/fd")]
        assert inherited not in theirs
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            await proc.wait()
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        notify.close()


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


async def _activation_error(proc: asyncio.subprocess.Process, trigger: Callable[[], None]) -> str:
    trigger()
    assert proc.stderr is not None
    async with asyncio.timeout(20):
        rest = (await proc.stderr.read()).decode()
        code = await proc.wait()
    assert code == 1, rest
    lines = [ln for ln in rest.splitlines() if ln.startswith("qmpmux")]
    return one_line_error("\n".join(lines))


def _connect(path: Path) -> Callable[[], None]:
    def go() -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(path))
        s.close()

    return go


async def test_an_unknown_socket_name_is_one_line(tmp_path: Path) -> None:
    proc, (path,) = await activated(
        tmp_path, {}, "full", "--listen", "systemd:ro", "--upstream", "unix:/nonexistent",
        sockets=("full",),
    )  # fmt: skip
    line = await _activation_error(proc, _connect(path))
    assert "systemd:ro: no inherited socket named 'ro' (LISTEN_FDNAMES: full;" in line


async def test_a_datagram_socket_is_one_line(tmp_path: Path) -> None:
    activate = tool("systemd-socket-activate")
    path = tmp_path / "dgram.sock"
    proc = await asyncio.create_subprocess_exec(
        activate, "--datagram", "-l", str(path), "--fdname=d",
        sys.executable, "-m", "qmpmux", "--listen", "systemd:d", "--upstream", "unix:/x",
        stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    async with asyncio.timeout(20):
        assert b"Listening on" in await proc.stderr.readline()

    def send() -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.sendto(b"x", str(path))
        s.close()

    line = await _activation_error(proc, send)
    assert "systemd:d: fd 3 is not a stream socket" in line


async def test_sockets_for_another_process_are_refused(tmp_path: Path) -> None:
    env = {**os.environ, "LISTEN_FDS": "1", "LISTEN_PID": "1", "LISTEN_FDNAMES": "full"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qmpmux", "--listen", "systemd:full", "--upstream", "unix:/x",
        env=env, stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(20):
        _, err = await proc.communicate()
    assert proc.returncode == 1
    line = one_line_error(err.decode())
    assert "LISTEN_PID=1 is not qmpmux's pid" in line


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("systemd:full,mode=660", "set SocketMode= in its .socket unit"),
        ("systemd:full,group=daemon", "set SocketGroup= in its .socket unit"),
        ("tcp:127.0.0.1:4444,owner=root", "owner= applies to unix sockets only"),
        ("systemd:", "systemd:NAME needs the FileDescriptorName="),
        ("unix:/tmp/x,group=no-such-group-here", "bad group in"),
        ("unix:/tmp/x,owner=no-such-user-here", "no user 'no-such-user-here'"),
    ],
)
async def test_bad_listener_ownership_is_one_line(listen: str, message: str) -> None:
    code, out = await run("--listen", listen, "--upstream", "unix:/x")
    assert code == 2
    assert message in one_line_error(out)


async def test_an_unknown_group_in_the_file_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        'upstream = "unix:/x"\n[[listen]]\naddress = "unix:/tmp/a.sock"\n'
        '[[listen]]\naddress = "unix:/tmp/b.sock"\ngroup = "no-such-group-here"\n'
    )
    code, out = await run("--config", str(config))
    assert code == 2
    assert f"{config}: listen[1].group: no group 'no-such-group-here'" in one_line_error(out)


# --- ownership -------------------------------------------------------------------------------


def _other_ids() -> tuple[int, int, int]:
    """(a uid that is not ours, a group to give the socket, a group that is not it)."""
    if os.geteuid() != 0:
        pytest.skip("giving a socket to another group and connecting as it needs root")
    nobody = pwd.getpwnam("nobody").pw_uid
    return nobody, grp.getgrnam("daemon").gr_gid, grp.getgrnam("nogroup").gr_gid


def _connects_as(path: Path, uid: int, gid: int) -> str:
    """Connect from a process with exactly these ids: 'greeting' or the error."""
    code = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_UNIX)\n"
        "try:\n s.connect(sys.argv[1])\nexcept OSError as e:\n print(e.strerror); sys.exit()\n"
        "s.settimeout(10); print('greeting' if b'QMP' in s.recv(4096) else 'nothing')\n"
    )
    # The system interpreter: another user may not be able to read this one's tree.
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    done = subprocess.run(
        [python, "-c", code, str(path)],
        user=uid, group=gid, extra_groups=[], capture_output=True, text=True, timeout=30,
        check=False,
    )  # fmt: skip
    return done.stdout.strip() or done.stderr


async def test_a_group_can_use_a_readonly_listener(tmp_path: Path) -> None:
    nobody, daemon, nogroup = _other_ids()
    qemu = _qemu(tmp_path)
    # A directory the other users can reach (pytest's own tree is root's alone).
    shared = Path(tempfile.mkdtemp(prefix="qmpmux-group-"))
    os.chmod(shared, 0o755)
    path = shared / "ro.sock"
    mux = await Running.start(
        "--upstream", f"unix:{qemu.monitors[0]}",
        "--listen", f"unix:{path},profile=readonly,mode=660,owner={nobody},group=daemon",
    )  # fmt: skip
    try:
        st = os.lstat(path)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (nobody, daemon, 0o660)
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, _connects_as, path, 12345, daemon) == "greeting"
        denied = await loop.run_in_executor(None, _connects_as, path, 12345, nogroup)
        assert denied == "Permission denied"
        mux.proc.send_signal(signal.SIGTERM)
        assert await mux.wait() == 0
        assert not path.exists()  # a socket qmpmux bound is its own to remove
    finally:
        if mux.proc.returncode is None:
            mux.proc.kill()
            await mux.proc.wait()
        qemu.stop()
        shutil.rmtree(shared, ignore_errors=True)


# --- help and connect failures ---------------------------------------------------------------


async def test_help_tells_all() -> None:
    code, out = await run("--help")
    assert code == 0
    for word in (
        "check-config",
        "SIGHUP",
        "qmpmux.toml.example",
        "systemd:NAME",
        "owner=USER",
        "group=GROUP",
        "READY=1",
        *BUILTIN,
    ):
        assert word in out, word
    code, out = await run("check-config", "--help")
    assert code == 0
    assert "--spawn" in out and "--upstream" in out


async def test_connect_failures_say_what_is_there(tmp_path: Path) -> None:
    regular = tmp_path / "file"
    regular.write_text("")
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # a socket file nobody listens on
    for target, message in (
        (regular, "it exists but is not a socket"),
        (stale, "a socket file, but nothing is listening on it"),
        (tmp_path / "absent", "no such file"),
    ):
        code, out = await run(
            "--listen", f"unix:{tmp_path}/m.sock", "--upstream", f"unix:{target}",
            "--connect-timeout", "0.1", "--log-level", "warning",
        )  # fmt: skip
        assert code == 1
        assert f"cannot connect to QEMU at unix:{target}: {message}" in one_line_error(out)


def test_a_watchdog_for_another_process_is_not_ours() -> None:
    env = {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1", "NOTIFY_SOCKET": "@x"}
    n = Notifier(env)
    assert n.enabled and n.watchdog is None and env == {}  # and nothing left for children
    assert Notifier({"WATCHDOG_USEC": "1000000"}).watchdog == 1.0


# --- --spawn shutdown ------------------------------------------------------------------------

# A boot sector that behaves as a guest OS does on the ACPI power button: it enables the
# power-button event (PM1_EN), says "R" on the debug console port 0xe9 once it listens,
# polls PM1_STS for the button, then enters S5 through PM1_CNT (SLP_TYP 0, SLP_EN), which
# QEMU's PIIX4 turns into a guest shutdown (`hw/acpi/core.c` acpi_pm1_cnt_write). The PM
# registers are at 0x600, where SeaBIOS puts them on the `pc` machine.
POWER_BUTTON_GUEST = bytes.fromhex(
    "ba0206" "b80001" "ef"  # mov dx,0x602; mov ax,0x100; out dx,ax
    "b052" "e6e9"  # mov al,'R'; out 0xe9,al
    "ba0006" "ed" "a90001" "74f7"  # poll: mov dx,0x600; in ax,dx; test ax,0x100; jz poll
    "ba0406" "b80020" "ef"  # mov dx,0x604; mov ax,0x2000; out dx,ax
    "f4" "ebfd"  # hlt; jmp hlt
)  # fmt: skip


async def _shutdown_events(client: RawClient) -> list[str]:
    """Events up to and including SHUTDOWN, as 'NAME' or 'SHUTDOWN:reason'."""
    seen = []
    while True:
        message = await client.read_json(timeout=30)
        name = message.get("event")
        if name == "SHUTDOWN":
            data = message["data"]
            assert isinstance(data, dict)
            seen.append(f"SHUTDOWN:{data['reason']}")
            return seen
        if isinstance(name, str):
            seen.append(name)


async def test_spawn_sigterm_powers_an_obeying_guest_down(tmp_path: Path) -> None:
    image = tmp_path / "guest.img"
    image.write_bytes(POWER_BUTTON_GUEST.ljust(510, b"\0") + b"\x55\xaa")
    console = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    console.bind(str(tmp_path / "console.sock"))
    console.listen(1)
    console.setblocking(False)
    sock = tmp_path / "vm.sock"
    mux = await Running.start(
        "--listen", f"unix:{sock}", "--spawn", "--", qemu_path(), "-machine", "pc",
        "-nodefaults", "-display", "none",
        "-drive", f"file={image},format=raw,if=floppy",
        "-chardev", f"socket,id=console,path={tmp_path / 'console.sock'}",
        "-device", "isa-debugcon,iobase=0xe9,chardev=console",
    )  # fmt: skip
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(30):
            conn, _ = await loop.sock_accept(console)
            assert await loop.sock_recv(conn, 1) == b"R"  # the guest listens for the button
        client = await RawClient.connect(sock)
        await client.negotiate()
        mux.proc.send_signal(signal.SIGTERM)
        assert await _shutdown_events(client) == ["POWERDOWN", "SHUTDOWN:guest-shutdown"]
        assert await mux.wait() == 0
        assert any("asked the guest to power down" in line for line in mux.log)
        assert not any("quitting QEMU" in line for line in mux.log), mux.log
    finally:
        if mux.proc.returncode is None:
            mux.proc.kill()
            await mux.proc.wait()
        console.close()


async def test_spawn_sigterm_quits_a_guest_that_ignores_the_power_button(tmp_path: Path) -> None:
    sock = tmp_path / "vm.sock"  # `-machine none` has no power button to press
    mux = await Running.start("--listen", f"unix:{sock}", "--shutdown-timeout", "0.5",
                              "--spawn", "--", qemu_path(), *BASE_ARGS)  # fmt: skip
    client = await RawClient.connect(sock)
    await client.negotiate()
    mux.proc.send_signal(signal.SIGTERM)
    assert await _shutdown_events(client) == ["POWERDOWN", "SHUTDOWN:host-qmp-quit"]
    assert await mux.wait() == 0
    assert any("did not power down within 0.5 s; quitting QEMU" in line for line in mux.log)


async def test_a_second_sigterm_stops_waiting_for_the_guest(tmp_path: Path) -> None:
    sock = tmp_path / "vm.sock"
    mux = await Running.start("--listen", f"unix:{sock}", "--shutdown-timeout", "3600",
                              "--spawn", "--", qemu_path(), *BASE_ARGS)  # fmt: skip
    client = await RawClient.connect(sock)
    await client.negotiate()
    mux.proc.send_signal(signal.SIGTERM)
    await mux.expect("asked the guest to power down; waiting up to 3600 s")
    mux.proc.send_signal(signal.SIGTERM)
    assert await _shutdown_events(client) == ["POWERDOWN", "SHUTDOWN:host-qmp-quit"]
    assert await mux.wait() == 0
    assert any("did not power down (asked again to stop)" in line for line in mux.log)


async def test_nobody_may_yank_the_lifecycle_monitor(tmp_path: Path) -> None:
    sock = tmp_path / "vm.sock"
    mux = await Running.start("--listen", f"unix:{sock}", "--shutdown-timeout", "0",
                              "--spawn", "--", qemu_path(), *BASE_ARGS)  # fmt: skip
    try:
        client = await RawClient.connect(sock)
        await client.negotiate()
        chardevs = await client.command(b'{"execute":"query-chardev"}')
        assert b'"qmpmux-lifecycle"' in chardevs  # QEMU's own view: it is there
        reply = await client.command(
            b'{"execute":"yank","arguments":{"instances":'
            b'[{"type":"chardev","id":"qmpmux-lifecycle"}]}}'
        )
        assert b"refused by qmpmux policy" in reply
    finally:
        mux.proc.send_signal(signal.SIGTERM)
        assert await mux.wait() == 0


async def test_a_monitor_held_by_another_client_is_named(tmp_path: Path) -> None:
    """QEMU serves one client per monitor; a second one is accepted but never greeted."""
    vm = start_qemu(tmp_path, monitors=1)
    try:
        holder = await RawClient.connect(vm.monitors[0])
        code, out = await run(
            "--listen", f"unix:{tmp_path}/m.sock", "--upstream", f"unix:{vm.monitors[0]}",
            "--log-level", "error",
        )  # fmt: skip
        assert code == 1 and "Traceback" not in out
        (line,) = [ln for ln in out.splitlines() if ln.startswith("qmpmux: error: ")]
        assert (
            f"cannot use QEMU's monitor at unix:{vm.monitors[0]}: QEMU sent no QMP greeting" in line
        )
        assert "another client already connected to that monitor" in line
        await holder.close()
    finally:
        vm.stop()


_INHERIT_PROBE = """
import os, socket, sys
from qmpmux.systemd import InheritError, listen_fds
hold = os.open(os.devnull, os.O_RDONLY)  # takes fd 3: the socket must come from elsewhere
kind = sys.argv[1]
if kind == "listening":
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(sys.argv[2])
    s.listen()
else:  # connected, not listening
    s, _peer = socket.socketpair()
assert s.fileno() != 3
os.dup2(s.fileno(), 3)  # inheritable, as the service manager passes it
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="x")
inherited = listen_fds()
print("cloexec" if not os.get_inheritable(3) else "inheritable")
print("env-clear" if not any(k.startswith("LISTEN_") for k in os.environ) else "env-left")
try:
    print("took", len(inherited.take("x")))
except InheritError as exc:
    print(exc)
"""


@pytest.mark.parametrize(
    ("kind", "last"),
    [
        ("listening", "took 1"),
        ("connected", "cannot listen on systemd:x: fd 3 is not listening"),
    ],
)
def test_inherited_fds_are_close_on_exec_and_checked(tmp_path: Path, kind: str, last: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _INHERIT_PROBE, kind, str(tmp_path / "l.sock")],
        capture_output=True, text=True, timeout=30, check=False, cwd=ROOT,
    )  # fmt: skip
    lines = done.stdout.splitlines()
    assert lines[:2] == ["cloexec", "env-clear"], done.stdout + done.stderr
    assert lines[2].startswith(last), lines


def test_a_rule_may_name_an_inherited_listener(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        'upstream = "unix:/x"\n[[listen]]\naddress = "systemd:ro"\nprofile = "readonly"\n'
        '[[rules]]\nuid = 0\nlistener = "systemd:ro"\nprofile = "full"\n'
    )
    assert parse_args(["--config", str(config)]).listeners[0].address.name == "ro"


async def test_an_inherited_tcp_socket_on_all_addresses_needs_allow_remote(
    tmp_path: Path,
) -> None:
    activate = tool("systemd-socket-activate")
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    proc = await asyncio.create_subprocess_exec(
        activate, "-l", f"0.0.0.0:{port}", "--fdname=t",
        sys.executable, "-m", "qmpmux", "--listen", "systemd:t", "--upstream", "unix:/x",
        stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    async with asyncio.timeout(20):
        assert b"Listening on" in await proc.stderr.readline()

    def trigger() -> None:
        socket.create_connection(("127.0.0.1", port), timeout=10).close()

    line = await _activation_error(proc, trigger)
    assert (
        "refusing to listen on non-loopback systemd:t (fd 3) at 0.0.0.0 without --allow-remote"
        in line
    )


def ignores_signal(pid: int, sig: signal.Signals) -> bool:
    """Whether process `pid` ignores `sig` (SIG_IGN), from /proc/PID/status."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:"))
    return bool(int(mask, 16) >> (sig - 1) & 1)


async def test_sigterm_before_qemu_is_ready_stops_cleanly_and_never_says_ready(
    tmp_path: Path, notify: NotifySocket
) -> None:
    sock = tmp_path / "mux.sock"
    mux = await Running.launch(
        "--listen", f"unix:{sock}", "--upstream", f"unix:{tmp_path / 'nowhere.sock'}",
        "--connect-timeout", "3600", env={"NOTIFY_SOCKET": notify.address},
    )  # fmt: skip
    await mux.expect("waiting up to 3600 s")  # a stop must not wait that out
    mux.proc.send_signal(signal.SIGTERM)
    await notify.expect(lambda m: "STOPPING=1" in m)
    # From STOPPING=1 on, the process ignores SIGHUP itself: a reload now would say
    # READY=1 again, and one as the loop closes would kill it.
    assert ignores_signal(mux.proc.pid, signal.SIGHUP)
    mux.proc.send_signal(signal.SIGHUP)
    assert await mux.wait() == 0
    assert "qmpmux: error" not in "".join(mux.log)
    notify.read_rest()
    stopping = next(i for i, m in enumerate(notify.messages) if "STOPPING=1" in m)
    assert not any("READY=1" in m or "RELOADING=1" in m for m in notify.messages[stopping:])
