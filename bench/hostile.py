"""Hostile input: another client's round trip while one client sends each costly shape.

A client may send anything, and parsing some shapes costs qmpmux microseconds a byte
(README "Security"): this scenario measures what that costs everyone else. For each
shape a fresh qmpmux (two lanes; a `readonly`, a `full`, and an `ops` listener: a
custom profile of every command but `stop`, whose commands are judged argument by
argument where `full`'s are not) serves a prober,
which loops `query-status` on the full listener with a short pause, while a load process
(`python -m bench.load hostile`) sends the shape once, as fast as qmpmux reads it, then
leaves without reading what it is owed; the prober goes on for half a second after, so
what qmpmux does about the leaving client (an echo still being written, a full outbox
to drop) is measured too. The direct column is the same prober on a monitor of a QEMU
whose other monitor the load process sends the same shape to (QEMU reads it far slower
than qmpmux: for a second, then it leaves). Each measurement has a fresh QEMU: what a
shape sent is read by QEMU for seconds after its sender has gone.

Last, QEMU is given BLOCK_NODES block nodes (through the direct monitor) and a
`readonly` client polls `query-named-block-nodes`, whose reply its profile has scrubbed
of credentials (views.py): the walk of every node's value, while the prober goes on.
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


def _repeated(head: bytes, unit: bytes, tail: bytes) -> Callable[[int], bytes]:
    """A maker of `head`, then `unit` over and over for about `size` bytes, then `tail`."""
    return lambda size: head + unit * (size // len(unit)) + tail


def _keys(size: int) -> bytes:
    members = b",".join(b'"k%d":1' % i for i in range(size // 11))
    return b'{"execute":"query-status","arguments":{' + members + b"}}"


QUERY_ARGUMENT = b'{"execute":"query-status","arguments":{"a":'
STOP_ARGUMENT = b'{"execute":"stop","arguments":{"a":'

TRANSACTION = b'{"execute":"transaction","arguments":{"actions":['
NETDEV_FDS = b'{"execute":"netdev_add","arguments":{"type":"tap","id":"n","fds":'
SOCKET_PAD = (
    b'{"execute":"chardev-add","arguments":{"id":"c","backend":{"type":"socket","data":{"p":['
)
SOCKET_FD = b'{}],"addr":{"type":"fd","data":{"str":"sk"}}}}}}'

# name -> (listener profile, maker of about `size` bytes of it)
SHAPES: dict[str, tuple[str, Callable[[int], bytes]]] = {
    "string argument": ("full", _repeated(QUERY_ARGUMENT + b'"', E_ACUTE, b'"}}')),
    "command name": ("readonly", _repeated(b'{"execute":"', E_ACUTE, b'"}')),
    "member name": ("readonly", _repeated(b'{"execute":"query-status","', E_ACUTE, b'":1}')),
    "stray bytes": ("readonly", _repeated(b'"', b"\x80", b"\x01")),
    "id of numbers": ("readonly", _repeated(b'{"execute":"x","id":[', b"0,", b"0]}")),
    # more tokens than QEMU's limit: past it, every token is answered with an error
    "values past the token limit": ("full", _repeated(QUERY_ARGUMENT + b"[", b"0,", b"0]}}")),
    "keys": ("full", _keys),
    "denied, of {}": ("readonly", _repeated(STOP_ARGUMENT + b"[", b"{},", b"{}]}}")),
    "nesting": ("readonly", _repeated(b"", b"[", b"")),
    "number": ("readonly", _repeated(b"[", b"1", b"]")),
    "\\xC0\\x80 string": ("readonly", _repeated(STOP_ARGUMENT + b'"', b"\xc0\x80", b'"}}')),
    "escaped string": ("full", _repeated(QUERY_ARGUMENT + b'"', b"\\u00e9", b'"}}')),
    # Shapes whose judging reads every part (judgement.py), for profiles that grant them:
    "transaction actions": ("ops", _repeated(TRANSACTION, b'{"type":"abort"},', b"{}]}}")),
    "fd names in a list": ("ops", _repeated(NETDEV_FDS + b"[", b'"a",', b'"a"]}}')),
    "fd names in a colon list": ("ops", _repeated(NETDEV_FDS + b'"', b"ab:", b'ab"}}')),
    "one long fd name": ("ops", _repeated(NETDEV_FDS + b'"', b"a", b'"}}')),
    "a socket address behind {}": ("ops", _repeated(SOCKET_PAD, b"{},", SOCKET_FD)),
}
# Block nodes QEMU is given for the readonly client's long reply (~500 bytes each).
BLOCK_NODES = 1000
NODE_ADD = b'{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n%d"}}'
BLOCK_QUERY = b'{"execute":"query-named-block-nodes"}'
OOB_PROBE = b'{"exec-oob":"query-yank","id":1}'

# Shapes qmpmux reads token by token (0.6-1.8 MiB/s) but judges only once complete: sent
# at most this big, so that they arrive within the probe's window and their judging is
# measured (it reads 2-4 values a microsecond: 1 MiB of them is a long task).
MAX_BYTES: dict[str, int] = {
    "transaction actions": 4 << 20,
    "fd names in a list": 2 << 20,
    "a socket address behind {}": 1 << 20,
}


@contextlib.contextmanager
def _qmpmux(workdir: Path, upstreams: list[Path]) -> Iterator[dict[str, Path]]:
    """A fresh qmpmux: its listener of each profile."""
    config = workdir / "ops.toml"
    config.write_text('[profiles.ops]\ncommands = ["*"]\ndeny-commands = ["stop"]\n')
    paths = {name: workdir / f"{name}.sock" for name in ("full", "readonly", "ops")}
    listens = [f"unix:{path},profile={name}" for name, path in paths.items()]
    with running_qmpmux(upstreams, listens, workdir / "qmpmux.log", config):
        yield paths


def _probe(
    path: Path,
    seconds: float,
    sent: Callable[[], bool],
    leave: Callable[[], None],
    oob: bool = False,
) -> list[int]:
    """query-status round trips (ns), 0.5 ms apart, while the load client sends (until
    `sent()`, or for at most `seconds`), then while it leaves (`leave()`: it goes without
    reading what it is owed) and for half a second after: what qmpmux still holds then
    (an echo being written, a full outbox to drop) is handled meanwhile. With `oob`, the
    probe is an exec-oob `query-yank` instead, which QEMU answers without its main
    thread: what it waits for is then the path to QEMU, not QEMU's other work."""
    client = Client(path).negotiate(oob)
    probe = OOB_PROBE if oob else QUERY_STATUS
    try:
        rtts: list[int] = []
        end = time.monotonic() + seconds
        tail = None
        while tail is None or time.monotonic() < tail:
            t0 = time.perf_counter_ns()
            client.call(probe)
            rtts.append(time.perf_counter_ns() - t0)
            if tail is None and (sent() or time.monotonic() >= end):
                leave()
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


@contextlib.contextmanager
def _fresh_qemu(workdir: Path, n: int) -> Iterator[list[Path]]:
    """A QEMU of its own for one measurement, with three monitors: what a shape sent
    before is still being read by the QEMU it went to (one byte at a time, for seconds
    after its sender has gone), and must not weigh on the next measurement."""
    where = workdir / f"qemu{n}"
    where.mkdir()
    qemu, mons = start_qemu(where, 3)
    try:
        yield mons
    finally:
        end_process(qemu)


def hostile(bed: Bed, plan: Plan, res: Results) -> None:
    """Another client's query-status while one sends each shape of SHAPES, through
    qmpmux and, as the baseline, with the sender on a direct monitor of its own."""
    if shutil.which(QEMU_BINARY) is None:
        raise BenchError(f"{QEMU_BINARY} not found")
    size = (2 if plan.quick else 8) << 20
    seconds = 1.5 if plan.quick else 4.0
    workdir = Path(tempfile.mkdtemp(prefix="qmpmux-hostile-"))
    data: dict[str, object] = {"bytes": size}
    qemus = iter(range(1 << 16))
    try:
        for name, (profile, _maker) in SHAPES.items():
            sent_bytes = min(size, MAX_BYTES.get(name, size))
            with _fresh_qemu(workdir, next(qemus)) as mons, _qmpmux(workdir, mons[:2]) as ls:
                load = start_load("hostile", str(ls[profile]), name, str(sent_bytes), timeout=30)
                try:
                    got = _summary(
                        _probe(ls["full"], seconds, _said(load.proc), load.proc.terminate)
                    )
                finally:
                    sent = load.stop().splitlines()[-1]
            # QEMU reads the shape far slower than qmpmux: it is never all sent meanwhile
            with _fresh_qemu(workdir, next(qemus)) as mons:
                load = start_load("hostile", str(mons[0]), name, str(sent_bytes), timeout=30)
                try:
                    direct = _summary(_probe(mons[1], 1.0, lambda: False, load.proc.terminate))
                finally:
                    load.stop()
            data[name] = {"ms": got, "direct ms": direct, "sender": sent}
            res.add(
                "hostile",
                f"query-status p99 while a {profile} client sends {sent_bytes >> 20} MiB: {name}",
                "ms",
                direct[1],
                got[1],
                note=f"worst {got[2]:.1f} ms (direct {direct[2]:.1f}); p50 {got[0]:.2f} ms; {sent}",
            )
        with _fresh_qemu(workdir, next(qemus)) as mons:
            data["polled block nodes"] = _polled(workdir, mons, seconds, res)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    res.data["hostile"] = data


def _polled(workdir: Path, mons: list[Path], seconds: float, res: Results) -> dict[str, object]:
    """Another client's query-status while a readonly client polls a long block reply,
    through qmpmux and, as the baseline, on direct monitors of the same QEMU (whose main
    thread builds every reply: the prober waits for that in both)."""
    client = Client(mons[2], timeout=60).negotiate()
    client.send(b"".join(NODE_ADD % n for n in range(BLOCK_NODES)))
    for _ in range(BLOCK_NODES):
        if not client.reply().startswith(b'{"return"'):
            raise BenchError("QEMU refused a block node")
    size = len(client.call(BLOCK_QUERY))
    client.close()

    def probed(poll_on: Path, probe_on: Path) -> tuple[tuple[float, float, float], str]:
        """The prober's figures, and how many replies the poller read meanwhile."""
        load = start_load("poll", str(poll_on), BLOCK_QUERY.decode(), timeout=30)
        try:
            rtts = _probe(probe_on, seconds, lambda: False, lambda: None, oob=True)
        finally:
            polled = load.stop().splitlines()[-1]
        return _summary(rtts), polled

    direct, direct_polled = probed(mons[0], mons[2])
    with _qmpmux(workdir, mons[:2]) as listeners:
        got, polled = probed(listeners["readonly"], listeners["full"])
    res.add(
        "hostile",
        f"exec-oob p99 while a readonly client polls {size >> 10} KB of block nodes",
        "ms",
        direct[1],
        got[1],
        note=f"worst {got[2]:.1f} ms (direct {direct[2]:.1f}); p50 {got[0]:.2f} ms "
        f"(direct {direct[0]:.2f}); polled {polled} (direct {direct_polled})",
    )
    return {"ms": got, "direct ms": direct, "reply bytes": size, "polled": polled}
