"""Where qmpmux spends its time: py-spy samples qmpmux under one bench load.

    python -m bench.profile latency|throughput|fanout [--seconds N] [--out DIR]

The same test bed as `python -m bench` (real QEMU, qmpmux as a subprocess), one load
run through qmpmux for N seconds while `py-spy record --native` (pip install py-spy)
samples the qmpmux process. Samples in epoll_wait are idle; the busy ones are charged
to a libc call (the syscalls) or else to the innermost qmpmux function, and qmpmux
functions are also listed including callees. The collapsed stacks stay in DIR for a
flame graph tool.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.harness import Bed, BenchError, Swarm, bed, end_process, popen, pump
from bench.scenarios import CONT, DEPTH, QUERY_STATUS, STOP

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def run_load(kind: str, seconds: float, b: Bed) -> str:
    """Drive one load through qmpmux for `seconds`; returns what was done."""
    end = time.monotonic() + seconds
    if kind == "latency":
        client = b.mux_client()
        n = 0
        while time.monotonic() < end:
            for _ in range(200):
                client.send(b'{"execute":"query-status","id":%d}' % n)
                client.line()
                n += 1
        client.close()
        return f"{n} sequential query-status"
    if kind == "throughput":
        clients = [b.mux_client() for _ in range(64)]
        result = pump(
            [c.sock for c in clients], QUERY_STATUS, DEPTH, seconds, 0.0, (b.qmpmux_pid, b.qemu_pid)
        )
        for c in clients:
            c.close()
        return f"{result.commands} commands from 64 clients x {DEPTH} in flight"
    swarm = Swarm(b.mux)
    swarm.grow(1000)
    driver = b.mux_client()
    events = 0
    while time.monotonic() < end:
        for command, event in (STOP, CONT):
            driver.send(command)
            swarm.collect(event, 10)
            driver.event(event)
            driver.reply()
            events += 1
    swarm.close()
    driver.close()
    return f"{events} events to 1000 clients"


def _label(frame: str) -> str:
    """`func (path:line)` as `func (file)`, with qmpmux's own files as `qmpmux/x.py`."""
    m = _FRAME.match(frame)
    if m is None:
        return frame
    file = m["file"]
    if "qmpmux/" in file:
        file = "qmpmux/" + file.rsplit("qmpmux/", 1)[1]
    else:
        file = file.rsplit("/", 1)[-1]
    return f"{m['func']} ({file})"


_IDLE = frozenset({"epoll_wait", "epoll_pwait", "epoll_pwait2"})
_ENTRY = ("(qmpmux/__main__.py)", "(qmpmux/cli.py)")


def _own(frames: list[str]) -> str:
    """Who to charge a sample to: a C library call by name (a syscall, mostly), else the
    innermost qmpmux function (time in msgspec, re or the interpreter goes to its caller)."""
    leaf = frames[-1]
    if leaf.endswith("(libc.so.6)") and not leaf.startswith("0x"):
        return leaf
    for f in reversed(frames):
        if f.startswith("gc_collect"):
            return "cyclic garbage collection"
        if "(qmpmux/" in f and not f.endswith(_ENTRY):
            return f
    return leaf


def summarise(collapsed: Path, top: int) -> str:
    """Shares of qmpmux's busy samples: by owner (see `_own`) and including callees."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = idle = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_label(f) for f in stack.split(";")]
        total += count
        if frames[-1].split(" (")[0] in _IDLE:
            idle += count
            continue
        own[_own(frames)] += count
        for f in set(frames):
            if "(qmpmux/" in f and not f.endswith(_ENTRY):
                inclusive[f] += count
    busy = total - idle
    if not busy:
        return "no busy samples"
    out = [
        f"{total} samples, {busy / total:.0%} busy (not in epoll_wait); shares of the busy ones:",
        "",
        "charged to (a libc call, else the innermost qmpmux function):",
    ]
    out += [f"  {n / busy:6.1%}  {f}" for f, n in own.most_common(top)]
    out += ["", "qmpmux functions including callees:"]
    out += [f"  {n / busy:6.1%}  {f}" for f, n in inclusive.most_common(top)]
    return "\n".join(out)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n")[0])
    p.add_argument("load", choices=["latency", "throughput", "fanout"])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--out", type=Path, default=Path("/tmp/qmpmux-profile"))
    p.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    p.add_argument(
        "--python-only",
        action="store_true",
        help="sample Python frames only, without pausing qmpmux (idle time is then "
        "indistinguishable from work inside uvloop)",
    )
    p.add_argument("--top", type=int, default=20)
    args = p.parse_args(argv)
    spy = shutil.which("py-spy")
    if spy is None:
        print("py-spy not found: pip install py-spy", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    collapsed = args.out / f"{args.load}{'-python' if args.python_only else ''}.txt"
    try:
        with bed() as b:
            cmd = [spy, "record", "--pid", str(b.qmpmux_pid), "--rate", str(args.rate)]
            cmd += ["--format", "raw", "--output", str(collapsed)]
            # C frames need qmpmux paused per sample; Python frames alone do not.
            cmd.append("--nonblocking" if args.python_only else "--native")
            with (args.out / "py-spy.log").open("wb") as log:
                recorder = popen(cmd, log, log)
            time.sleep(1.0)  # py-spy attaches
            try:
                did = run_load(args.load, args.seconds, b)
            finally:
                recorder.send_signal(signal.SIGINT)
                try:
                    recorder.wait(30)
                except subprocess.TimeoutExpired:
                    end_process(recorder)
    except BenchError as exc:
        print(f"bench.profile: {exc}", file=sys.stderr)
        return 1
    print(f"{args.load}: {did} in {args.seconds:g} s; stacks in {collapsed}\n")
    print(summarise(collapsed, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
