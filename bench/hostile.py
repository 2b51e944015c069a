"""Hostile input: another client's round trip while one client sends each costly shape.

A client may send anything, and parsing some shapes costs qmpmux microseconds a byte
(README "Security"): this scenario measures what that costs everyone else. For each
shape a fresh qmpmux (two lanes, a `readonly` and a `full` listener) serves a prober,
which loops `query-status` on the full listener with a short pause, while a load process
(`python -m bench.load hostile`) sends the shape once, as fast as qmpmux reads it. The
direct column is the same prober on a monitor of the same, idle QEMU.
"""

from __future__ import annotations

import contextlib
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bench.harness import (
    QEMU_BINARY,
    Bed,
    BenchError,
    Client,
    end_process,
    running_qmpmux,
    start_load,
    start_qemu,
)
from bench.scenarios import QUERY_STATUS, Plan, Results, pct

E_ACUTE = "\u00e9".encode()  # two bytes; QEMU echoes it as a six-byte \u00e9


def _string_argument(size: int) -> bytes:
    return b'{"execute":"query-status","arguments":{"a":"' + E_ACUTE * (size // 2) + b'"}}'


def _command_name(size: int) -> bytes:
    return b'{"execute":"' + E_ACUTE * (size // 2) + b'"}'


def _stray_bytes(size: int) -> bytes:
    return b'"' + b"\x80" * size + b"\x01"


def _id_of_numbers(size: int) -> bytes:
    return b'{"execute":"x","id":[' + b"0," * (size // 2) + b"0]}"


def _values(size: int) -> bytes:
    # More tokens than QEMU's limit: past it, every token is answered with an error.
    return b'{"execute":"query-status","arguments":{"a":[' + b"0," * (size // 2) + b"0]}}"


def _keys(size: int) -> bytes:
    members = b",".join(b'"k%d":1' % i for i in range(size // 11))
    return b'{"execute":"query-status","arguments":{' + members + b"}}"


def _denied_objects(size: int) -> bytes:
    return b'{"execute":"stop","arguments":{"a":[' + b"{}," * (size // 3) + b"{}]}}"


def _nesting(size: int) -> bytes:
    return b"[" * size


def _number(size: int) -> bytes:
    return b"[" + b"1" * size + b"]"


def _two_byte_nuls(size: int) -> bytes:
    return b'{"execute":"stop","arguments":{"a":"' + b"\xc0\x80" * (size // 2) + b'"}}'


def _escapes(size: int) -> bytes:
    return b'{"execute":"query-status","arguments":{"a":"' + b"\\u00e9" * (size // 6) + b'"}}'


# name -> (listener profile, maker of about `size` bytes of it)
SHAPES: dict[str, tuple[str, Callable[[int], bytes]]] = {
    "string argument": ("full", _string_argument),
    "command name": ("readonly", _command_name),
    "stray bytes": ("readonly", _stray_bytes),
    "id of numbers": ("readonly", _id_of_numbers),
    "values past the token limit": ("full", _values),
    "keys": ("full", _keys),
    "denied, of {}": ("readonly", _denied_objects),
    "nesting": ("readonly", _nesting),
    "number": ("readonly", _number),
    "\\xC0\\x80 string": ("readonly", _two_byte_nuls),
    "escaped string": ("full", _escapes),
}


@contextlib.contextmanager
def _qmpmux(workdir: Path, upstreams: list[Path]) -> Iterator[tuple[Path, Path]]:
    """A fresh qmpmux: (its full listener, its readonly listener)."""
    full, readonly = workdir / "full.sock", workdir / "readonly.sock"
    listens = [f"unix:{full}", f"unix:{readonly},profile=readonly"]
    with running_qmpmux(upstreams, listens, workdir / "qmpmux.log"):
        yield full, readonly


def _probe(path: Path, seconds: float, sent: Callable[[], bool]) -> list[int]:
    """query-status round trips (ns), 0.5 ms apart, until half a second after `sent()`
    (what the kernel still held then is read meanwhile), or for at most `seconds`."""
    client = Client(path).negotiate()
    try:
        rtts: list[int] = []
        end = time.monotonic() + seconds
        tail = None
        while time.monotonic() < (end if tail is None else min(end, tail)):
            t0 = time.perf_counter_ns()
            client.call(QUERY_STATUS)
            rtts.append(time.perf_counter_ns() - t0)
            if tail is None and sent():
                tail = time.monotonic() + 0.5
            time.sleep(0.0005)
        return rtts
    finally:
        client.close()


def _said(proc: subprocess.Popen[bytes]) -> Callable[[], bool]:
    """Whether the load process has written its `sent` line (it writes nothing else)."""
    assert proc.stdout is not None
    out = proc.stdout

    def sent() -> bool:
        return bool(select.select([out], [], [], 0)[0])

    return sent


def _summary(rtts: list[int]) -> tuple[float, float, float]:
    """p50, p99 and worst, in ms."""
    return pct(rtts, 0.5) / 1e6, pct(rtts, 0.99) / 1e6, max(rtts) / 1e6


def hostile(bed: Bed, plan: Plan, res: Results) -> None:
    """Another client's query-status while one sends each shape of SHAPES."""
    if shutil.which(QEMU_BINARY) is None:
        raise BenchError(f"{QEMU_BINARY} not found")
    size = (2 if plan.quick else 8) << 20
    seconds = 1.5 if plan.quick else 4.0
    workdir = Path(tempfile.mkdtemp(prefix="qmpmux-hostile-"))
    data: dict[str, object] = {"bytes": size}
    qemu: subprocess.Popen[bytes] | None = None
    try:
        qemu, mons = start_qemu(workdir, 3)
        direct = _summary(_probe(mons[2], seconds / 2, lambda: False))  # idle QEMU
        data["direct"] = direct
        for name, (profile, _maker) in SHAPES.items():
            with _qmpmux(workdir, mons[:2]) as (full, readonly):
                target = full if profile == "full" else readonly
                load = start_load("hostile", str(target), name, str(size), timeout=30)
                try:
                    got = _summary(_probe(full, seconds, _said(load.proc)))
                finally:
                    sent = load.stop().splitlines()[-1]
            data[name] = {"ms": got, "sender": sent}
            res.add(
                "hostile",
                f"query-status p99 while a {profile} client sends {size >> 20} MiB: {name}",
                "ms",
                direct[1],
                got[1],
                note=f"worst {got[2]:.1f} ms (direct {direct[2]:.1f}); p50 {got[0]:.2f} ms; {sent}",
            )
    finally:
        if qemu is not None:
            end_process(qemu)
        shutil.rmtree(workdir, ignore_errors=True)
    res.data["hostile"] = data
