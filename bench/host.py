"""Host mode: one qmpmux serving N VMs (`--vm-dir`), against a single-VM qmpmux.

The scenario starts its own N+1 QEMUs (`-machine none`, one monitor each, `-name vmNNN`):
N for host-mode qmpmux processes, one for a single-VM qmpmux as the reference. It measures,
each host process fresh:

- memory: RSS of a host serving 1 VM and N VMs, idle after ready, and with one negotiated
  client per VM; the marginal cost of a VM is (RSS_N - RSS_1) / (N - 1);
- start-up: exec to the `ready` log line (single-VM) and to `VM(s) up` (host), and to the
  first VM's listener greeting, taken from the log lines' own timestamps;
- round trip: `query-status` to one VM of the N-VM host (the others idle) against the
  single-VM qmpmux, interleaved;
- flood isolation: another VM's client keeps stop/cont pairs in flight (one event per
  command) while a client of one VM measures its round trips; the same flood behind a
  separate single-VM qmpmux is the control (on 2 cores the flood's CPU alone moves p99);
- adding VMs: a host with 3/4 of the VMs serving a client each that loops query-status
  (one load process; back to back, then 100 ms apart), gets the remaining 1/4 as files
  and a SIGHUP; the time until every new listener greets, the serving clients' round
  trips before and during, and every one of their faults (must be 0).

The host's own log (info level, to a file) gives the start-up times; a warning or error
it logs is kept in the JSON (`--json`).
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import math
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.harness import (
    QEMU_BINARY,
    Bed,
    BenchError,
    Client,
    LoadProcess,
    _env,
    connect,
    cpu_seconds,
    end_process,
    popen,
    rss_kib,
    start_load,
)
from bench.scenarios import Plan, Results, _summary, p50_p99, pct, round_trips

PARALLEL = 4  # QEMUs starting at once (2 cores: more only queue)
SETTLE = 0.5  # seconds idle after ready before RSS is read
FLOOD_ROUNDS = 3  # quiet and flooded blocks, alternating
FLOOD_DEPTH = 8  # stop/cont pairs the flooder keeps in flight
PACED_MS = 100  # a paced looping client's pause between a reply and its next command
IDLE_CPU_WINDOW = 2.0  # seconds the N-VM host's idle CPU use is measured over
READY_HOST = "VM(s) up"
READY_SINGLE = " ready: QEMU monitor"


@dataclass
class Vm:
    """A QEMU of the bench, and where a qmpmux in front of it listens."""

    name: str
    qemu: subprocess.Popen[bytes]
    monitor: Path
    listener: Path

    def file_text(self) -> str:
        return f'upstream = "unix:{self.monitor}"\n\n[[listen]]\naddress = "unix:{self.listener}"\n'


def _end_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every process at once, then wait (SIGKILL what is left after 5 s)."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    for proc in procs:
        try:
            proc.wait(max(0.01, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def qemus(workdir: Path, count: int) -> Iterator[list[Vm]]:
    """`count` QEMUs, at most PARALLEL starting at once; all ended however we leave."""
    vms: list[Vm] = []
    try:
        pending: list[Vm] = []
        deadline = time.monotonic() + 30 + count * 0.5
        for n in range(count):
            name = f"vm{n:03d}"
            monitor = workdir / f"{name}.mon"
            args = [
                QEMU_BINARY,
                "-machine",
                "none",
                "-nodefaults",
                "-display",
                "none",
                "-name",
                name,
                "-chardev",
                f"socket,id=mon0,path={monitor},server=on,wait=off",
                "-mon",
                "chardev=mon0,mode=control",
            ]
            with (workdir / f"{name}.qemu.log").open("wb") as log:
                vm = Vm(name, popen(args, log, log), monitor, workdir / f"{name}.sock")
            vms.append(vm)
            pending.append(vm)
            while len(pending) >= PARALLEL or (n == count - 1 and pending):
                for vm in [v for v in pending if v.monitor.exists()]:
                    pending.remove(vm)
                for vm in pending:
                    if vm.qemu.poll() is not None or time.monotonic() > deadline:
                        log_text = (workdir / f"{vm.name}.qemu.log").read_text(errors="replace")
                        raise BenchError(f"QEMU {vm.name} did not start: {log_text[-300:]}")
                time.sleep(0.005)
        yield vms
    finally:
        _end_all([vm.qemu for vm in vms])


# --- a qmpmux and its log --------------------------------------------------------------------


def _stamp(line: str) -> float:
    """A log line's own timestamp (ms resolution), as time.time()."""
    return datetime.datetime.fromisoformat(line.split(" ", 1)[0]).timestamp()


@dataclass
class Mux:
    """A running qmpmux (single-VM or host) whose log goes to a file we follow."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    exec_at: float  # time.time() just before the exec
    _pos: int = 0
    _tail: str = ""
    lines: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_line(self, text: str, timeout: float) -> str:
        """The next log line containing `text` (polled every 5 ms)."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self._read():
                if text in line:
                    return line
            if self.proc.poll() is not None:
                raise BenchError(f"qmpmux exited ({self.proc.returncode}): {self.lines[-5:]}")
            if time.monotonic() > deadline:
                raise BenchError(f"no {text!r} from qmpmux in {timeout:g} s: {self.lines[-5:]}")
            time.sleep(0.005)

    def faults(self) -> list[str]:
        """Log lines at warning or above so far."""
        self._read()
        return [ln for ln in self.lines if " WARNING " in ln or " ERROR " in ln]

    def _read(self) -> list[str]:
        """The complete lines logged since the last read (also kept in `lines`)."""
        with self.log_path.open("rb") as f:
            f.seek(self._pos)
            chunk = f.read()
        self._pos += len(chunk)
        *done, self._tail = (self._tail + chunk.decode(errors="replace")).split("\n")
        self.lines += done
        return done


def _start(args: list[str], log_path: Path) -> Mux:
    with log_path.open("wb") as log:
        exec_at = time.time()
        proc = popen(
            [sys.executable, "-m", "qmpmux", *args, "--log-level", "info"], log, log, _env()
        )
    return Mux(proc, log_path, exec_at)


def _greets_at(path: Path, mux: Mux, timeout: float) -> tuple[float, float]:
    """Poll `path` (every 2 ms) until it accepts a connection, then read its greeting; the
    time.time() of both."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock = connect(path, 10)
        except (FileNotFoundError, ConnectionRefusedError):
            if mux.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"{path} never accepted (qmpmux {mux.proc.poll()})") from None
            time.sleep(0.002)
            continue
        accepted = time.time()
        with sock:
            data = b""
            while b"\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    raise BenchError(f"{path} closed before its greeting")
                data += chunk
            return accepted, time.time()


def _greet_all(vms: list[Vm], t0: float, timeout: float) -> dict[str, float]:
    """Connect to every VM's listener as soon as it is there and read its greeting, all at
    once (one greeting does not wait behind another); monotonic seconds from `t0` to each
    greeting. The connections are closed right after the greeting (nothing unread)."""
    ep = select.epoll()
    pending = {vm.name: vm for vm in vms}
    waiting: dict[int, tuple[str, socket.socket, bytes]] = {}
    greeted: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    try:
        while pending or waiting:
            for name, vm in list(pending.items()):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.connect(str(vm.listener))
                except (FileNotFoundError, ConnectionRefusedError):
                    sock.close()
                    continue
                sock.setblocking(False)
                waiting[sock.fileno()] = (name, sock, b"")
                ep.register(sock.fileno(), select.EPOLLIN)
                del pending[name]
            for fd, _ in ep.poll(0.002):
                name, sock, data = waiting[fd]
                chunk = sock.recv(65536)
                now = time.monotonic()
                if not chunk:
                    raise BenchError(f"{name}'s listener closed before its greeting")
                data += chunk
                if b"\r\n" in data:
                    greeted[name] = now - t0
                    ep.unregister(fd)
                    del waiting[fd]
                    sock.close()
                else:
                    waiting[fd] = (name, sock, data)
            if time.monotonic() > deadline:
                missing = sorted([*pending, *(w[0] for w in waiting.values())])
                raise BenchError(f"{len(missing)} added VMs never greeted: {missing[:5]}")
    finally:
        ep.close()
        for _, sock, _ in waiting.values():
            sock.close()
    return greeted


@dataclass
class Started:
    mux: Mux
    first_accept_s: float  # exec to the first VM's listener accepting a connection
    first_greeting_s: float  # exec to its greeting
    ready_s: float  # exec to the ready line


def start_single(vm: Vm, workdir: Path, tag: str) -> Started:
    mux = _start(
        ["--upstream", f"unix:{vm.monitor}", "--listen", f"unix:{vm.listener}"],
        workdir / f"single-{tag}.log",
    )
    try:
        accepted, greeted = _greets_at(vm.listener, mux, 30)
        ready = _stamp(mux.wait_line(READY_SINGLE, 30))
    except BaseException:
        end_process(mux.proc)
        raise
    return Started(mux, accepted - mux.exec_at, greeted - mux.exec_at, ready - mux.exec_at)


def write_vm_dir(vm_dir: Path, vms: list[Vm]) -> None:
    vm_dir.mkdir(exist_ok=True)
    for old in vm_dir.glob("*.toml"):
        old.unlink()
    for vm in vms:
        (vm_dir / f"{vm.name}.toml").write_text(vm.file_text())


def start_host(vm_dir: Path, first: Vm, workdir: Path, tag: str, count: int) -> Started:
    mux = _start(["--vm-dir", str(vm_dir)], workdir / f"host-{tag}.log")
    try:
        accepted, greeted = _greets_at(first.listener, mux, 60)
        line = mux.wait_line(READY_HOST, 120)
        if f"ready: {count} of {count} VM(s) up" not in line:
            raise BenchError(f"host mode did not start every VM: {line}")
    except BaseException:
        end_process(mux.proc)
        raise
    at = mux.exec_at
    return Started(mux, accepted - at, greeted - at, _stamp(line) - at)


@contextlib.contextmanager
def running(started: Started) -> Iterator[Mux]:
    try:
        yield started.mux
    finally:
        end_process(started.mux.proc)


def _clients(vms: list[Vm]) -> list[Client]:
    out: list[Client] = []
    try:
        for vm in vms:
            out.append(Client(vm.listener).negotiate())
    except BaseException:
        _close(out)
        raise
    return out


def _close(clients: list[Client]) -> None:
    for c in clients:
        c.close()


def _idle_rss(pid: int) -> int:
    time.sleep(SETTLE)
    return rss_kib(pid)


# --- the load processes ----------------------------------------------------------------------


def _summary_of(load: LoadProcess) -> dict[str, Any]:
    text = load.stop()
    try:
        out: dict[str, Any] = json.loads(text.splitlines()[-1])
    except (ValueError, IndexError):
        raise BenchError(f"load generator said {text[:300]!r}") from None
    return out


# --- the scenario ----------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return pct(values, 0.5)


def _max(values: list[float]) -> float:
    """The largest value, NaN for none (a short add may see no paced reply)."""
    return max(values, default=math.nan)


def host(bed: Bed, plan: Plan, res: Results) -> None:
    """Everything in the module docstring, in one run."""
    if shutil.which(QEMU_BINARY) is None:
        raise BenchError(f"{QEMU_BINARY} not found")
    n = 20 if plan.quick else 200
    reps = 1 if plan.quick else 3  # starts of the N-VM host (the others: 2 more)
    workdir = Path(tempfile.mkdtemp(prefix="qmpmux-host-"))
    data: dict[str, Any] = {"vms": n}
    res.data["host"] = data
    try:
        t0 = time.monotonic()
        with qemus(workdir, n + 1) as all_vms:
            data["qemu_start_s"] = time.monotonic() - t0
            ref, vms = all_vms[n], all_vms[:n]
            vm_dir = workdir / "vm.d"
            _startup_and_memory(workdir, vm_dir, ref, vms, reps, data, res)
            _traffic(workdir, vm_dir, ref, vms, plan, data, res)
            for pause_ms in (0, PACED_MS):
                _add_by_sighup(workdir, vm_dir, vms, pause_ms, data, res)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _startup_and_memory(
    workdir: Path,
    vm_dir: Path,
    ref: Vm,
    vms: list[Vm],
    reps: int,
    data: dict[str, Any],
    res: Results,
) -> None:
    n = len(vms)
    times: dict[str, list[Started]] = {"single": [], "host1": [], f"host{n}": []}
    rss: dict[str, int] = {}
    for rep in range(reps + 2 if reps > 1 else 1):  # single and host of 1: quick to start
        s = start_single(ref, workdir, f"{rep}")
        with running(s) as mux:
            times["single"].append(s)
            rss.setdefault("single", _idle_rss(mux.pid))
        write_vm_dir(vm_dir, vms[:1])
        s = start_host(vm_dir, vms[0], workdir, f"1-{rep}", 1)
        with running(s) as mux:
            times["host1"].append(s)
            if rep == 0:
                rss["host1"] = _idle_rss(mux.pid)
                clients = _clients(vms[:1])
                rss["host1_clients"] = _idle_rss(mux.pid)
                _close(clients)
        if rep >= reps:
            continue
        write_vm_dir(vm_dir, vms)
        s = start_host(vm_dir, vms[0], workdir, f"{n}-{rep}", n)
        with running(s) as mux:
            times[f"host{n}"].append(s)
            if rep == 0:
                rss[f"host{n}"] = _idle_rss(mux.pid)
                cpu0, at = cpu_seconds(mux.pid), time.monotonic()
                time.sleep(IDLE_CPU_WINDOW)
                data["idle_cpu_share"] = (cpu_seconds(mux.pid) - cpu0) / (time.monotonic() - at)
                clients = _clients(vms)
                rss[f"host{n}_clients"] = _idle_rss(mux.pid)
                _close(clients)
                faults = mux.faults()
                if faults:
                    data["startup_faults"] = faults[:20]
    ready = {k: _median([s.ready_s for s in v]) * 1e3 for k, v in times.items()}
    first = {k: _median([s.first_greeting_s for s in v]) * 1e3 for k, v in times.items()}
    accept = {k: _median([s.first_accept_s for s in v]) * 1e3 for k, v in times.items()}
    data["first_accept_ms"] = {
        k: [round(s.first_accept_s * 1e3, 1) for s in v] for k, v in times.items()
    }
    data["startup_ms"] = {k: [round(s.ready_s * 1e3, 1) for s in v] for k, v in times.items()}
    data["first_greeting_ms"] = {
        k: [round(s.first_greeting_s * 1e3, 1) for s in v] for k, v in times.items()
    }
    data["rss_kib"] = rss
    hn = f"host{n}"
    marginal = (rss[hn] - rss["host1"]) / (n - 1)
    marginal_c = (rss[f"{hn}_clients"] - rss["host1_clients"]) / (n - 1)
    data["marginal_rss_kib"] = {"idle": marginal, "one_client_each": marginal_c}
    add = res.add
    add(
        "host memory",
        "RSS: single-VM qmpmux | host of 1 VM, fresh, idle",
        "KiB",
        float(rss["single"]),
        float(rss["host1"]),
        ratio=False,
    )
    add(
        "host memory",
        f"RSS: host of 1 VM | host of {n} VMs, fresh, idle",
        "KiB",
        float(rss["host1"]),
        float(rss[hn]),
        ratio=False,
        note=f"{marginal:.0f} KiB per VM (target <= 256); idle CPU over "
        f"{IDLE_CPU_WINDOW:g} s: {data['idle_cpu_share']:.1%}",
    )
    add(
        "host memory",
        f"RSS with 1 client per VM: host of 1 | {n} VMs",
        "KiB",
        float(rss["host1_clients"]),
        float(rss[f"{hn}_clients"]),
        ratio=False,
        note=f"{marginal_c:.0f} KiB per VM with its client",
    )
    reps_note = f"median of {len(times[hn])} ({len(times['single'])} single-VM)"
    add(
        "host start-up",
        f"exec to ready: single-VM qmpmux | host of {n} VMs",
        "ms",
        ready["single"],
        ready[hn],
        note=f"{reps_note}; host of 1 VM {ready['host1']:.0f} ms",
    )
    per_vm = ready[hn] / n
    marginal_t = (ready[hn] - ready["host1"]) / (n - 1)
    data["startup_per_vm_ms"] = {"total_over_n": per_vm, "marginal": marginal_t}
    add(
        "host start-up",
        f"per VM: single-VM qmpmux | host of {n}, total / {n}",
        "ms",
        ready["single"],
        per_vm,
        note=f"marginal (host {n} - host 1) / {n - 1}: {marginal_t:.2f} ms per VM",
    )
    add(
        "host start-up",
        f"exec to the first VM greeting: single-VM | host of {n}",
        "ms",
        first["single"],
        first[hn],
        note=f"host of 1 VM {first['host1']:.0f} ms",
    )
    add(
        "host start-up",
        f"exec to the first VM's listener accepting: single-VM | host of {n}",
        "ms",
        accept["single"],
        accept[hn],
        note=f"host of 1 VM {accept['host1']:.0f} ms",
    )


def _traffic(
    workdir: Path,
    vm_dir: Path,
    ref: Vm,
    vms: list[Vm],
    plan: Plan,
    data: dict[str, Any],
    res: Results,
) -> None:
    """Round trips against the N-VM host and a single-VM qmpmux; then flood isolation."""
    n = len(vms)
    count = plan.latency_count
    write_vm_dir(vm_dir, vms)
    with (
        running(start_single(ref, workdir, "rtt")) as single,
        running(start_host(vm_dir, vms[0], workdir, f"{n}-rtt", n)) as mux,
    ):
        a, b = Client(ref.listener).negotiate(), Client(vms[0].listener).negotiate()
        time.sleep(1.0)  # both settled after their start
        try:
            round_trips(a, 0, 100)
            round_trips(b, 0, 100)
            times: dict[str, list[int]] = {"single": [], "host": []}
            paths = [("single", a), ("host", b)]
            for k, first in enumerate(range(0, count, 50)):
                for name, client in paths if k % 2 == 0 else paths[::-1]:
                    times[name] += round_trips(client, first, min(50, count - first))
        finally:
            a.close()
        us = 1e-3
        data["rtt_us"] = {k: _summary(v, us) for k, v in times.items()}
        s_, h_ = p50_p99(times["single"], us), p50_p99(times["host"], us)
        res.add(
            "host round trip",
            f"query-status, {count} sequential, single-VM | 1 of {n} VMs",
            "µs",
            s_,
            h_,
            note="p50 / p99; the other VMs idle",
        )
        try:
            _flood(vms[1], mux, (ref, single), b, count, data, res)
        finally:
            b.close()
        faults = mux.faults()
        if faults:
            data["traffic_faults"] = faults[:20]


def _flood(
    flooded: Vm,
    mux: Mux,
    other: tuple[Vm, Mux],
    probe: Client,
    count: int,
    data: dict[str, Any],
    res: Results,
) -> None:
    """The probe's round trips quiet, while another VM of its host is flooded, and while
    a VM behind a separate single-VM qmpmux is flooded (the same load on the machine's 2
    cores, but no shared loop: what the machine alone costs). In alternating blocks (a
    new flooder each), `count` round trips of each in all."""
    rounds = FLOOD_ROUNDS if count >= 1000 else 1
    block = count // rounds
    cases = {"same host": (flooded, mux), "separate qmpmux": other}
    rtts: dict[str, list[int]] = {"quiet": [], **{k: [] for k in cases}}
    sums: dict[str, dict[str, float]] = {k: {} for k in cases}
    for r in range(rounds):
        rtts["quiet"] += round_trips(probe, 0, block)
        for name in list(cases) if r % 2 == 0 else list(cases)[::-1]:
            vm, owner = cases[name]
            load = start_load("flood", str(vm.listener), str(FLOOD_DEPTH), timeout=120)
            try:
                cpu0 = (cpu_seconds(owner.pid), cpu_seconds(vm.qemu.pid), time.monotonic())
                rtts[name] += round_trips(probe, 0, block)
                cpu1 = (cpu_seconds(owner.pid), cpu_seconds(vm.qemu.pid), time.monotonic())
            finally:
                summary = _summary_of(load)
            got = {
                "events": summary["events"],
                "seconds": summary["seconds"],
                "errors": summary["errors"],
                "qmpmux_cpu": cpu1[0] - cpu0[0],
                "qemu_cpu": cpu1[1] - cpu0[1],
                "wall": cpu1[2] - cpu0[2],
            }
            for key, value in got.items():
                sums[name][key] = sums[name].get(key, 0.0) + value
    q = p50_p99(rtts["quiet"], 1e-3)
    data["flood"] = {
        "rounds": rounds,
        "depth_pairs": FLOOD_DEPTH,
        "quiet_us": _summary(rtts["quiet"], 1e-3),
    }
    for name, t in sums.items():
        rate = t["events"] / t["seconds"]
        shares = (t["qmpmux_cpu"] / t["wall"], t["qemu_cpu"] / t["wall"])
        f = p50_p99(rtts[name], 1e-3)
        data["flood"][name] = {
            **t,
            "events_per_s": rate,
            "flooded_qmpmux_cpu_share": shares[0],
            "flooded_qemu_cpu_share": shares[1],
            "probe_us": _summary(rtts[name], 1e-3),
        }
        target = " (target <= +2000)" if name == "same host" else ""
        res.add(
            "host round trip",
            f"query-status of VM 0, quiet | another VM flooded ({name})",
            "µs",
            q,
            f,
            note=f"p99 {f[1] - q[1]:+.0f} µs{target}; {rate:,.0f} events/s, CPU of the "
            f"flooded VM's qmpmux {shares[0]:.0%} and QEMU {shares[1]:.0%}, "
            f"{t['errors']:.0f} flood errors",
        )


def _add_by_sighup(
    workdir: Path, vm_dir: Path, vms: list[Vm], pause_ms: int, data: dict[str, Any], res: Results
) -> None:
    """A host of 3/4 of the VMs, a client each looping query-status (`pause_ms` between
    a reply and the next command; 0 saturates this machine), gets the last 1/4 by SIGHUP."""
    n = len(vms)
    serving, added = vms[: n * 3 // 4], vms[n * 3 // 4 :]
    write_vm_dir(vm_dir, serving)
    staging = workdir / "staging"
    staging.mkdir(exist_ok=True)
    for vm in added:
        (staging / f"{vm.name}.toml").write_text(vm.file_text())
    listing = workdir / "serving.txt"
    listing.write_text("\n".join(str(vm.listener) for vm in serving))
    out = workdir / "loop.json"
    with running(start_host(vm_dir, serving[0], workdir, "add", len(serving))) as mux:
        load = start_load("loop", str(listing), str(out), str(pause_ms), timeout=120)
        try:
            time.sleep(1.0)  # warm
            cpu_b = cpu_seconds(mux.pid)
            time.sleep(1.0)  # the baseline window
            t0 = time.monotonic()
            cpu0 = cpu_seconds(mux.pid)
            for vm in added:
                os.rename(staging / f"{vm.name}.toml", vm_dir / f"{vm.name}.toml")
            mux.proc.send_signal(signal.SIGHUP)
            greeted = _greet_all(added, t0, 60)
            t1 = time.monotonic()
            cpu1 = cpu_seconds(mux.pid)
            time.sleep(0.5)  # and a while after
        finally:
            summary = _summary_of(load)
        faults = mux.faults()
    samples = json.loads(out.read_text())
    pairs = list(zip(samples["done_at"], samples["rtts"], strict=True))
    window = t1 - t0
    cpu_before, cpu_during = cpu0 - cpu_b, (cpu1 - cpu0) / window
    before = [r for t, r in pairs if t0 - 1.0 <= t < t0]
    during = [r for t, r in pairs if t0 <= t <= t1]
    b99, d99 = pct(before, 0.99) * 1e3, pct(during, 0.99) * 1e3
    b50, d50 = pct(before, 0.5) * 1e3, pct(during, 0.5) * 1e3
    bad = summary["eofs"] + summary["unexpected"]
    # The longest time no client got a reply: how long qmpmux's loop stood still (with
    # 150 clients each sending 10 times a second, a few ms normally).
    gap_before, gap_during = _longest_gap(pairs, t0 - 1.0, t0), _longest_gap(pairs, t0, t1)
    kind = f"{pause_ms} ms apart" if pause_ms else "back to back"
    data[f"add_pause_{pause_ms}ms"] = {
        **summary,
        "serving": len(serving),
        "added": len(added),
        "all_greeted_s": t1 - t0,
        "greeted_s": greeted,
        "before_ms": _summary(before, 1e3),
        "during_ms": _summary(during, 1e3),
        "faults": faults[:20],
        "qmpmux_cpu_share": {"before": cpu_before, "during": cpu_during},
        "longest_gap_ms": {"before": gap_before * 1e3, "during": gap_during * 1e3},
    }
    res.add(
        "host add",
        f"{len(added)} VMs added by SIGHUP: time until every new listener greets ({kind})",
        "ms",
        None,
        window * 1e3,
        ratio=False,
        note=f"first {min(greeted.values()) * 1e3:.0f} ms, median "
        f"{_median(list(greeted.values())) * 1e3:.0f} ms; {len(serving)} VMs serving",
    )
    res.add(
        "host add",
        f"{len(serving)} clients' query-status, {kind}: 1 s before | during the add",
        "ms",
        (b50, b99),
        (d50, d99),
        note=f"p50 / p99; max {_max(before) * 1e3:.0f} | {_max(during) * 1e3:.0f} ms; "
        f"no reply for {gap_before * 1e3:.0f} | {gap_during * 1e3:.0f} ms at most; "
        f"{len(during)} replies during; {bad} faults (must be 0); {len(faults)} qmpmux "
        f"warnings; qmpmux CPU {cpu_before:.0%} | {cpu_during:.0%}",
    )


def _longest_gap(pairs: list[tuple[float, float]], start: float, end: float) -> float:
    """The longest time within [start, end] in which no client received a reply."""
    times = [start, *sorted(t for t, _ in pairs if start <= t <= end), end]
    return max(b - a for a, b in itertools.pairwise(times))
