"""Lanes: qmpmux on 1, 4 and 8 monitors of one QEMU, against 8 direct clients on 8 monitors.

QEMU reads each monitor one byte at a time but serves several monitors in parallel, so the
aggregate throughput of many clients, and the latency of a client while another sends a
big command, depend on how many monitors carry them. This scenario starts its own QEMU
with 16 monitors: 8 for direct clients (one each, the native ceiling) and 8 for qmpmux,
restarted with 1, 4 and 8 of them as its lanes. The same lean epoll pump drives both paths.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench.harness import (
    QEMU_BINARY,
    Bed,
    BenchError,
    Client,
    end_process,
    pump,
    running_qmpmux,
    start_qemu,
)
from bench.scenarios import QUERY_STATUS, Plan, Results, p50_p99

MONITORS = 8  # direct ones; as many more for qmpmux's lanes
LANE_COUNTS = (1, 4, 8)
CLIENTS = 64
DEPTH = 8
BIG = 2 << 20  # a 2 MiB command: about 7 s of QEMU's one-byte reads


@contextlib.contextmanager
def _qemu(workdir: Path) -> Iterator[tuple[subprocess.Popen[bytes], list[Path]]]:
    qemu, mons = start_qemu(workdir, 2 * MONITORS)
    try:
        yield qemu, mons
    finally:
        end_process(qemu)


@contextlib.contextmanager
def _qmpmux(workdir: Path, upstreams: list[Path]) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    sock = workdir / f"mux{len(upstreams)}.sock"
    log = workdir / f"qmpmux{len(upstreams)}.log"
    with running_qmpmux(upstreams, [f"unix:{sock}"], log) as proc:
        yield proc, sock


def _rate(socks: list[Client], seconds: float, pids: tuple[int, int]) -> float:
    try:
        run = pump([c.sock for c in socks], QUERY_STATUS, DEPTH, seconds, 0.2, pids)
    finally:
        for c in socks:
            c.close()
    return run.rate


def _big_command_probe(big_path: Path, probe_path: Path, rounds: int) -> tuple[list[int], int]:
    """A client sends a 2 MiB command; meanwhile another client's query-status round
    trips (ns). Returns them and how many completed before the big reply came."""
    big = Client(big_path, timeout=60).negotiate()
    probe = Client(probe_path).negotiate()
    try:
        big.send(b'{"execute":"query-name","arguments":{"%s":1},"id":"big"}' % (b"x" * BIG))
        rtts: list[int] = []
        big.sock.setblocking(False)
        done = False
        while len(rtts) < rounds and not done:
            t0 = time.perf_counter_ns()
            probe.call(QUERY_STATUS)
            rtts.append(time.perf_counter_ns() - t0)
            with contextlib.suppress(BlockingIOError):
                done = bool(big.sock.recv(65536))  # the big reply has come
        before = len(rtts)
        big.sock.setblocking(True)
        if not done:
            big.reply()
        return rtts, before
    finally:
        big.close()
        probe.close()


def lanes(bed: Bed, plan: Plan, res: Results) -> None:
    """Throughput of 64 clients over 1, 4 and 8 lanes against 8 direct monitors, and a
    client's latency while another sends a 2 MiB command (8 lanes vs direct)."""
    if shutil.which(QEMU_BINARY) is None:
        raise BenchError(f"{QEMU_BINARY} not found")
    seconds = plan.throughput_seconds * plan.throughput_rounds
    workdir = Path(tempfile.mkdtemp(prefix="qmpmux-lanes-"))
    data: dict[str, object] = {}
    try:
        with _qemu(workdir) as (qemu, mons):
            direct_mons, mux_mons = mons[:MONITORS], mons[MONITORS:]
            direct = _rate(
                [Client(m).negotiate() for m in direct_mons], seconds, (qemu.pid, qemu.pid)
            )
            data["direct-8-monitors"] = direct
            res.add("lanes", f"8 direct clients on 8 monitors, {DEPTH} in flight each", "cmd/s",
                    direct, None, note=f"{seconds:g} s per point")  # fmt: skip
            for n in LANE_COUNTS:
                with _qmpmux(workdir, mux_mons[:n]) as (mux, sock):
                    clients = [Client(sock).negotiate() for _ in range(CLIENTS)]
                    rate = _rate(clients, seconds, (mux.pid, qemu.pid))
                    data[f"qmpmux-{n}-lanes"] = rate
                    res.add("lanes", f"{CLIENTS} clients through qmpmux, {n} lane(s) vs 8 direct",
                            "cmd/s", direct, rate)  # fmt: skip
                    if n == LANE_COUNTS[-1]:
                        rounds = 2000 if not plan.quick else 300
                        direct_rtts, _ = _big_command_probe(direct_mons[0], direct_mons[1], rounds)
                        mux_rtts, before = _big_command_probe(sock, sock, rounds)
                        d50, d99 = p50_p99(direct_rtts, 1e-3)
                        m50, m99 = p50_p99(mux_rtts, 1e-3)
                        data["big-command"] = {"direct_us": direct_rtts, "qmpmux_us": mux_rtts}
                        res.add("lanes", "query-status p99 while another client sends 2 MiB",
                                "us", d99, m99,
                                note=f"p50 {d50:.0f} / {m50:.0f} us; {before} probes before "
                                     "the big reply")  # fmt: skip
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    res.data["lanes"] = data
