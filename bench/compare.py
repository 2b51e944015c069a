"""Before and after in the same run: two checkouts' qmpmux on two monitors of one QEMU.

    python -m bench.compare OTHER_CHECKOUT [--count N] [--runs R]

A hot-path change is measured against the code before it. Separate runs drift on a
shared machine by more than such a change moves the round trip, so this starts one QEMU
with three monitors, this checkout's qmpmux on one, OTHER_CHECKOUT's (e.g. a `git
worktree` of the commit before) on another, and uses the third directly, then
interleaves sequential `query-status` round trips over the three in blocks whose order
rotates. It prints each run's medians and what each qmpmux adds to the direct path.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.harness import REPO, Client, end_process, popen, start_qemu, wait_greeting
from bench.scenarios import round_trips

BLOCK = 50


def _qmpmux(checkout: Path, monitor: Path, sock: Path, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(checkout)  # that checkout's qmpmux, whatever is installed
    args = [sys.executable, "-m", "qmpmux", "--listen", f"unix:{sock}"]
    args += ["--upstream", f"unix:{monitor}", "--log-level", "warning"]
    with log.open("wb") as out:
        proc = popen(args, out, out, env)
    wait_greeting(sock, proc, timeout=15)
    return proc


def run(other: Path, count: int) -> dict[str, float]:
    """Median round trip (µs) of `direct`, `this` and `other`, interleaved."""
    workdir = Path(tempfile.mkdtemp(prefix="qmpmux-compare-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        qemu, mons = start_qemu(workdir, 3)
        procs.append(qemu)
        paths = {"direct": mons[2]}
        for name, checkout, mon in (("this", REPO, mons[0]), ("other", other, mons[1])):
            sock = workdir / f"{name}.sock"
            procs.append(_qmpmux(checkout, mon, sock, workdir / f"{name}.log"))
            paths[name] = sock
        clients = {name: Client(path).negotiate() for name, path in paths.items()}
        names = list(clients)
        for client in clients.values():
            round_trips(client, 0, 300)  # warm up
        times: dict[str, list[int]] = {name: [] for name in names}
        for block, first in enumerate(range(0, count, BLOCK)):
            turn = block % len(names)
            for name in names[turn:] + names[:turn]:
                times[name] += round_trips(clients[name], first, min(BLOCK, count - first))
        for client in clients.values():
            client.close()
        return {name: statistics.median(t) / 1e3 for name, t in times.items()}
    finally:
        for proc in reversed(procs):
            end_process(proc)
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n")[0])
    p.add_argument("other", type=Path, help="another checkout of qmpmux (e.g. a git worktree)")
    p.add_argument("--count", type=int, default=6000, help="round trips per path and run")
    p.add_argument("--runs", type=int, default=3, help="runs, each with a fresh QEMU")
    args = p.parse_args(argv)
    if not (args.other / "qmpmux" / "__init__.py").is_file():
        p.error(f"{args.other} is not a qmpmux checkout")
    for _ in range(args.runs):
        m = run(args.other.resolve(), args.count)
        d = m["direct"]
        print(
            f"direct {d:.0f} µs   this {m['this']:.0f} µs (+{m['this'] - d:.0f})   "
            f"other {m['other']:.0f} µs (+{m['other'] - d:.0f})   this - other "
            f"{m['this'] - m['other']:+.0f} µs",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
