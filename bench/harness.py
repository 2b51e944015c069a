"""The bench's test bed: one real QEMU with two monitors, qmpmux in front of one of them.

Direct and proxied figures come from the same QEMU in the same run, so machine drift
and QEMU's own costs hit both paths alike. The clients here are deliberately lean
(blocking sockets, raw bytes, CRLF framing, no JSON decoding on the hot path) and the
very same code talks to QEMU directly and through qmpmux, so a difference between the
two columns is qmpmux's cost, not a client library's.

Every process started here dies with the bench: it is ended on exit, Ctrl-C or error,
and asked to die with its parent (PR_SET_PDEATHSIG) should the bench itself be killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

REPO: Final = Path(__file__).resolve().parent.parent
QEMU_BINARY: Final = os.environ.get("QEMU", "qemu-system-x86_64")
CAPABILITIES: Final = b'{"execute":"qmp_capabilities"}'
CAPABILITIES_OOB: Final = b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}'
_PR_SET_PDEATHSIG: Final = 1
_CLK_TCK: Final = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """The test bed failed; the message says what and where to look."""


def _die_with_parent() -> None:
    """Runs in the child before exec: a bench killed with SIGKILL leaves nothing behind."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def popen(
    args: Sequence[str],
    stdout: IO[bytes] | int,
    stderr: IO[bytes] | int,
    env: dict[str, str] | None = None,
    cwd: Path = REPO,
) -> subprocess.Popen[bytes]:
    """Start a helper in its own session (Ctrl-C reaches only the bench, which ends it).

    `python -m` imports from the working directory first: `cwd` picks the checkout."""
    return subprocess.Popen(
        list(args),
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,
        preexec_fn=_die_with_parent,  # noqa: PLW1509 (the bench starts no threads)
        cwd=cwd,
        env=env,
    )


def _env() -> dict[str, str]:
    """This checkout's qmpmux and bench come first on the child's import path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def end_process(proc: subprocess.Popen[bytes], grace: float = 5.0) -> int:
    """SIGTERM, then SIGKILL after `grace` seconds; returns the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


# --- /proc ----------------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """Resident set size (VmRSS) of a process, in KiB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far (utime + stime)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def self_cpu_seconds() -> float:
    """CPU time of the bench process itself (all threads)."""
    t = os.times()
    return t.user + t.system


# --- a lean blocking client -----------------------------------------------------------------


def connect(path: Path, timeout: float) -> socket.socket:
    """A blocking unix socket whose reads and writes fail after `timeout` seconds.

    The timeouts are the kernel's (SO_RCVTIMEO/SO_SNDTIMEO) rather than Python's
    `settimeout`, which would add a poll() before every recv on the hot path.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    whole = int(timeout)
    timeval = struct.pack("ll", whole, int((timeout - whole) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)  # bounds connect() too
    try:
        sock.connect(str(path))  # blocking: waits while the listener's backlog is full
    except OSError:
        sock.close()
        raise
    return sock


class Client:
    """A blocking QMP client on a unix socket that speaks raw bytes and reads CRLF lines.

    `line()` returns the next message without its CRLF; `reply()` skips events.
    """

    __slots__ = ("_buf", "_scan", "events", "greeting", "sock")

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.sock = connect(path, timeout)
        self._buf = bytearray()
        self._scan = 0
        self.events = 0
        self.greeting = self.line()
        while self.greeting.startswith(b'{"timestamp"'):  # QEMU may send one first
            self.greeting = self.line()
        if not self.greeting.startswith(b'{"QMP"'):
            raise BenchError(f"no QMP greeting from {path}: {self.greeting[:200]!r}")

    @property
    def offers_oob(self) -> bool:
        return b'"oob"' in self.greeting

    def negotiate(self, oob: bool = False) -> Client:
        self.sock.sendall(CAPABILITIES_OOB if oob else CAPABILITIES)
        reply = self.reply()
        if not reply.startswith(b'{"return"'):
            raise BenchError(f"qmp_capabilities failed: {reply[:200]!r}")
        return self

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        buf = self._buf
        while True:
            end = buf.find(b"\r\n", self._scan)
            if end >= 0:
                line = bytes(buf[:end])
                del buf[: end + 2]
                self._scan = 0
                return line
            self._scan = max(0, len(buf) - 1)
            chunk = self.sock.recv(262144)
            if not chunk:
                raise BenchError("connection closed")
            buf += chunk

    def reply(self) -> bytes:
        """The next message that is not an event."""
        while True:
            line = self.line()
            if not line.startswith(b'{"timestamp"'):
                return line
            self.events += 1

    def event(self, name: bytes) -> int:
        """Wait for event `name`; returns perf_counter_ns when it was read. Replies met on
        the way are an error: callers read replies with `reply()` afterwards."""
        needle = b'"event": "' + name + b'"'
        while True:
            line = self.line()
            now = time.perf_counter_ns()
            if needle in line:
                self.events += 1
                return now
            if not line.startswith(b'{"timestamp"'):
                raise BenchError(f"expected {name!r}, got {line[:200]!r}")
            self.events += 1

    def call(self, command: bytes) -> bytes:
        self.sock.sendall(command)
        return self.reply()

    def close(self) -> None:
        """Half-close, read what is still coming until EOF, then close: closing with unread
        input would reset the connection, which qmpmux rightly logs as a fault."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + 5
            while self.sock.recv(262144) and time.monotonic() < deadline:
                pass
        self.sock.close()


def wait_greeting(path: Path, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Until `path` accepts a connection and greets, or `proc` dies, or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise BenchError(f"process exited with status {proc.returncode} before greeting")
        try:
            Client(path, timeout=max(0.1, deadline - time.monotonic())).close()
            return
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise BenchError(f"{path} did not accept connections in {timeout:g} s") from None
            time.sleep(0.02)
        except (TimeoutError, BlockingIOError):
            raise BenchError(f"{path} accepted but sent no greeting in {timeout:g} s") from None


@contextlib.contextmanager
def running_qmpmux(
    upstreams: list[Path], listens: list[str], log_path: Path, config: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m qmpmux` on `upstreams` (unix monitors) and `listens` (--listen values,
    the first a unix path it must greet on), logging to `log_path`; ended on leaving.
    `config`: a config file for what flags cannot say (custom profiles)."""
    args = [sys.executable, "-m", "qmpmux", "--log-level", "warning"]
    if config is not None:
        args += ["--config", str(config)]
    for listen in listens:
        args += ["--listen", listen]
    for path in upstreams:
        args += ["--upstream", f"unix:{path}"]
    with log_path.open("ab") as log:
        proc = popen(args, log, log, _env())
    try:
        first = Path(listens[0].removeprefix("unix:").split(",", 1)[0])
        wait_greeting(first, proc, timeout=15)
        yield proc
    finally:
        end_process(proc)


# --- the test bed ---------------------------------------------------------------------------


@dataclass
class Bed:
    """A running QEMU, qmpmux on `mux` in front of its first monitor(s), one monitor used
    `direct`ly, and a zero-work relay (bench/relay.py) on `relay` in front of another."""

    workdir: Path
    qemu: subprocess.Popen[bytes]
    qmpmux: subprocess.Popen[bytes]
    direct: Path
    mux: Path
    qmpmux_log: Path
    relay: Path

    @property
    def qmpmux_pid(self) -> int:
        return self.qmpmux.pid

    @property
    def qemu_pid(self) -> int:
        return self.qemu.pid

    def check_alive(self) -> None:
        for name, proc in (("QEMU", self.qemu), ("qmpmux", self.qmpmux)):
            if proc.poll() is not None:
                raise BenchError(
                    f"{name} exited with status {proc.returncode}; see {self.qmpmux_log}"
                )

    def mux_client(self, oob: bool = False) -> Client:
        return Client(self.mux).negotiate(oob)

    def direct_client(self, oob: bool = False) -> Client:
        """The direct monitor serves one client at a time: close it before the next."""
        return Client(self.direct).negotiate(oob)

    def relay_client(self) -> Client:
        """Like the direct client, one at a time, through the zero-work relay."""
        return Client(self.relay).negotiate()

    def qmpmux_log_lines(self) -> list[str]:
        try:
            return self.qmpmux_log.read_text(errors="replace").splitlines()
        except OSError:
            return []


def qmpmux_command(upstreams: list[Path], listen: Path, profile_to: Path | None) -> list[str]:
    args = [sys.executable]
    if profile_to is not None:
        args += ["-m", "cProfile", "-o", str(profile_to)]
    args += ["-m", "qmpmux", "--listen", f"unix:{listen}"]
    for upstream in upstreams:
        args += ["--upstream", f"unix:{upstream}"]
    return [*args, "--log-level", "warning"]


def start_qemu(workdir: Path, monitors: int) -> tuple[subprocess.Popen[bytes], list[Path]]:
    """`-machine none` QEMU with `monitors` unix QMP monitors in `workdir`, all listening."""
    mons = [workdir / f"mon{n}.sock" for n in range(monitors)]
    args = [QEMU_BINARY, "-machine", "none", "-nodefaults", "-display", "none"]
    for n, path in enumerate(mons):
        args += ["-chardev", f"socket,id=mon{n},path={path},server=on,wait=off"]
        args += ["-mon", f"chardev=mon{n},mode=control"]
    with (workdir / "qemu.log").open("wb") as log:
        qemu = popen(args, log, log)
    deadline = time.monotonic() + 10
    while not all(p.exists() for p in mons):
        if qemu.poll() is not None or time.monotonic() > deadline:
            end_process(qemu)
            text = (workdir / "qemu.log").read_text(errors="replace").strip()
            raise BenchError(f"QEMU did not start: {text[-500:]}")
        time.sleep(0.01)
    return qemu, mons


@contextlib.contextmanager
def bed(profile_to: Path | None = None, lanes: int = 1) -> Iterator[Bed]:
    """Start QEMU, qmpmux (on `lanes` monitors; one more stays direct) and the relay (on
    the last); end them all (and remove the scratch directory) however we leave."""
    if shutil.which(QEMU_BINARY) is None:
        raise BenchError(f"{QEMU_BINARY} not found (set QEMU=/path/to/qemu-system-x86_64)")
    workdir = Path(tempfile.mkdtemp(prefix="qmpmux-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        qemu, mons = start_qemu(workdir, lanes + 2)
        procs.append(qemu)
        relay = workdir / "relay.sock"
        procs.append(start_helper("bench.relay", str(relay), str(mons[-1]), timeout=15))
        mux = workdir / "mux.sock"
        qmpmux_log = workdir / "qmpmux.log"
        with qmpmux_log.open("wb") as log:
            qmpmux = popen(qmpmux_command(mons[:lanes], mux, profile_to), log, log, _env())
        procs.append(qmpmux)
        try:
            wait_greeting(mux, qmpmux, timeout=15)
        except BenchError as exc:
            text = qmpmux_log.read_text(errors="replace").strip()
            raise BenchError(f"qmpmux did not start: {exc}: {text[-1000:]}") from None
        yield Bed(workdir, qemu, qmpmux, mons[lanes], mux, qmpmux_log, relay)
    finally:
        for proc in reversed(procs):
            with contextlib.suppress(Exception):
                end_process(proc)
        shutil.rmtree(workdir, ignore_errors=True)


def load_process(bed_: Bed, kind: str, *args: str, timeout: float = 60.0) -> LoadProcess:
    """Start `python -m bench.load KIND SOCKET ARGS...` and wait for its `ready` line."""
    return start_load(kind, str(bed_.mux), *args, timeout=timeout)


def start_load(kind: str, *args: str, timeout: float) -> LoadProcess:
    """Start `python -m bench.load KIND ARGS...` and wait for its `ready` line."""
    return LoadProcess(start_helper("bench.load", kind, *args, timeout=timeout))


def start_helper(module: str, *args: str, timeout: float) -> subprocess.Popen[bytes]:
    """Start `python -m MODULE ARGS...` and wait for its `ready` line."""
    cmd = [sys.executable, "-m", module, *args]
    proc = popen(cmd, subprocess.PIPE, subprocess.DEVNULL, _env())
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else b""
    if line.strip() != b"ready":
        end_process(proc)
        raise BenchError(f"{' '.join([module, *args[:1]])!r} did not start: {line[:200]!r}")
    return proc


@dataclass
class LoadProcess:
    """A running load generator; `stop()` ends it and returns what it reported."""

    proc: subprocess.Popen[bytes]

    def stop(self) -> str:
        end_process(self.proc)
        assert self.proc.stdout is not None
        text = self.proc.stdout.read().decode(errors="replace").strip()
        self.proc.stdout.close()
        return text


# --- many clients on one epoll --------------------------------------------------------------


class Swarm:
    """Many negotiated clients on one unix socket path, read through one epoll.

    Used for event fan-out (who received what, and when) and for memory figures. A
    client's arrival time is taken once per `epoll.poll()` batch, right after it
    returns, so the bench's own per-socket work does not inflate it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.socks: list[socket.socket] = []
        self.ep = select.epoll()
        self._index: dict[int, int] = {}
        self._tails: list[bytes] = []
        self.counts: dict[bytes, list[int]] = {}

    def __len__(self) -> int:
        return len(self.socks)

    def grow(self, total: int, timeout: float = 60.0) -> None:
        """Connect and negotiate clients until there are `total`."""
        start = len(self.socks)
        for _ in range(start, total):
            sock = connect(self.path, timeout)  # waits while qmpmux's backlog is full
            sock.sendall(CAPABILITIES)
            self._index[sock.fileno()] = len(self.socks)
            self.socks.append(sock)
            self._tails.append(b"")
            for counts in self.counts.values():
                counts.append(0)
            self.ep.register(sock.fileno(), select.EPOLLIN)
        # Each new client must see its greeting and the `return` of qmp_capabilities.
        lines = [0] * (total - start)
        deadline = time.monotonic() + timeout
        waiting = total - start
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{waiting} of {total - start} clients did not negotiate")
            for fd, _ in self.ep.poll(left):
                i = self._index[fd]
                if i < start:
                    continue
                data = self.socks[i].recv(65536)
                if not data:
                    raise BenchError(f"client {i} was disconnected while negotiating")
                before = lines[i - start]
                lines[i - start] += data.count(b"\n")
                if before < 2 <= lines[i - start]:
                    waiting -= 1

    def collect(self, name: bytes, timeout: float) -> tuple[list[int], int]:
        """Read until every client has one more `name` event than before (or time runs
        out). Returns the arrival times (perf_counter_ns) and how many clients missed it."""
        needle = b'"event": "' + name + b'"'
        counts = self.counts.setdefault(name, [0] * len(self.socks))
        want = [c + 1 for c in counts]
        arrived: list[int] = [0] * len(self.socks)
        missing = sum(1 for i, w in enumerate(want) if counts[i] < w)
        socks, tails, index = self.socks, self._tails, self._index
        deadline = time.monotonic() + timeout
        while missing:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready = self.ep.poll(left)
            now = time.perf_counter_ns()
            for fd, _ in ready:
                i = index[fd]
                data = socks[i].recv(65536)
                if not data:
                    raise BenchError(f"client {i} was disconnected")
                data = tails[i] + data if tails[i] else data
                cut = data.rfind(b"\n") + 1
                tails[i] = data[cut:]
                got = data.count(needle, 0, cut)
                if got:
                    had = counts[i]
                    counts[i] = had + got
                    if had < want[i] <= had + got:
                        arrived[i] = now
                        missing -= 1
                self._count_others(i, data[:cut], name)
        return [t for t in arrived if t], missing

    def _count_others(self, i: int, data: bytes, name: bytes) -> None:
        """Count events other than the one being collected (e.g. a late duplicate)."""
        for other, counts in self.counts.items():
            if other != name:
                counts[i] += data.count(b'"event": "' + other + b'"')

    def drain(self, settle: float = 0.2) -> None:
        """Read whatever is still on its way (late or duplicated events) for `settle` s."""
        deadline = time.monotonic() + settle
        while (left := deadline - time.monotonic()) > 0:
            for fd, _ in self.ep.poll(left):
                i = self._index[fd]
                data = self.socks[i].recv(65536)
                if not data:
                    raise BenchError(f"client {i} was disconnected")
                data = self._tails[i] + data
                cut = data.rfind(b"\n") + 1
                self._tails[i] = data[cut:]
                for name, counts in self.counts.items():
                    counts[i] += data.count(b'"event": "' + name + b'"', 0, cut)

    def close(self, timeout: float = 10.0) -> None:
        """Half-close every client and read until EOF (see `Client.close`), then close."""
        open_ = {}
        for fd, i in self._index.items():
            with contextlib.suppress(OSError):
                self.socks[i].shutdown(socket.SHUT_WR)
                open_[fd] = self.socks[i]
        deadline = time.monotonic() + timeout
        while open_ and (left := deadline - time.monotonic()) > 0:
            for fd, _ in self.ep.poll(left):
                sock = open_.get(fd)
                if sock is None:
                    continue
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    self.ep.unregister(fd)
                    del open_[fd]
        self.ep.close()
        for sock in self.socks:
            sock.close()
        self.socks.clear()
        self._index.clear()
        self._tails.clear()


# --- pipelined load -------------------------------------------------------------------------


@dataclass
class Pumped:
    """What one pipelined run measured over its timed window."""

    commands: int
    seconds: float
    bench_cpu: float
    qmpmux_cpu: float
    qemu_cpu: float

    @property
    def rate(self) -> float:
        return self.commands / self.seconds


def _cpu(qmpmux_pid: int, qemu_pid: int) -> tuple[float, float]:
    return cpu_seconds(qmpmux_pid), cpu_seconds(qemu_pid)


def pump(
    socks: Sequence[socket.socket],
    command: bytes,
    depth: int,
    seconds: float,
    warmup: float,
    pids: tuple[int, int],
) -> Pumped:
    """Keep `depth` commands in flight on every socket for `warmup` + `seconds`; count the
    replies that arrive during the timed `seconds` (every reply is one CRLF line).

    Sockets must be negotiated and idle. When the window ends no more commands are sent
    and every outstanding reply is read, so the sockets are idle again afterwards.
    """
    qmpmux_pid, qemu_pid = pids
    ep = select.epoll()
    by_fd = {s.fileno(): s for s in socks}
    bursts = [command * n for n in range(depth + 1)]
    try:
        for sock in socks:
            ep.register(sock.fileno(), select.EPOLLIN)
        for sock in socks:
            sock.sendall(bursts[depth])
        sent = depth * len(socks)
        received = 0
        start = time.perf_counter() + warmup
        end = start + seconds
        mark: tuple[int, float, float, float, float] | None = None
        poll = ep.poll
        while True:
            for fd, _ in poll(1.0):
                sock = by_fd[fd]
                data = sock.recv(65536)
                if not data:
                    raise BenchError("connection closed during the throughput run")
                n = data.count(b"\n")
                if n:
                    received += n
                    sock.sendall(bursts[n] if n <= depth else command * n)
                    sent += n
            now = time.perf_counter()
            if mark is None:
                if now >= start:
                    mark = (received, now, self_cpu_seconds(), *_cpu(qmpmux_pid, qemu_pid))
            elif now >= end:
                qmpmux_cpu, qemu_cpu = _cpu(qmpmux_pid, qemu_pid)
                result = Pumped(
                    received - mark[0],
                    now - mark[1],
                    self_cpu_seconds() - mark[2],
                    qmpmux_cpu - mark[3],
                    qemu_cpu - mark[4],
                )
                break
        deadline = time.monotonic() + 30
        while received < sent:
            if time.monotonic() > deadline:
                raise BenchError(f"{sent - received} replies never arrived")
            for fd, _ in poll(1.0):
                received += by_fd[fd].recv(65536).count(b"\n")
        return result
    finally:
        ep.close()
