"""Before and after in the same run: two checkouts' qmpmux on two monitors of one QEMU.

    python -m bench.compare OTHER_CHECKOUT [--count N] [--runs R]

A hot-path change is measured against the code before it. Separate runs drift on a
shared machine by more than such a change moves the round trip, so this starts one QEMU
with three monitors, this checkout's qmpmux on one, OTHER_CHECKOUT's (e.g. a `git
worktree` of the commit before) on another, and uses the third directly, then
interleaves sequential `query-status` round trips over the three in blocks whose order
rotates. It prints each run's medians and what each qmpmux adds to the direct path.

Each qmpmux runs from its own checkout (`python -m` imports from the working directory
first; the start checks where each would import from). The first monitor and start
place is some 6 µs faster than the second, so odd runs swap them: judge pairs of runs.
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


def _env(checkout: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(checkout)  # that checkout's qmpmux, whatever is installed
    return env


def _imports_from(checkout: Path) -> Path:
    """Where `python -m qmpmux` run as `_qmpmux` runs it imports qmpmux from: `-m` puts
    the working directory first on the path, so it is the checkout's own too."""
    out = subprocess.run(
        [sys.executable, "-c", "import qmpmux; print(qmpmux.__file__)"],
        cwd=checkout, env=_env(checkout), capture_output=True, check=True,
    )  # fmt: skip
    return Path(out.stdout.decode().strip()).resolve().parent.parent


def _qmpmux(checkout: Path, monitor: Path, sock: Path, log: Path) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "qmpmux", "--listen", f"unix:{sock}"]
    args += ["--upstream", f"unix:{monitor}", "--log-level", "warning"]
    with log.open("wb") as out:
        proc = popen(args, out, out, _env(checkout), cwd=checkout)
    wait_greeting(sock, proc, timeout=15)
    return proc


def run(other: Path, count: int, swap: bool) -> dict[str, float]:
    """Median round trip (µs) of `direct`, `this` and `other`, interleaved; `swap` trades
    the two qmpmux's monitors and start order (each place has its own small bias)."""
    workdir = Path(tempfile.mkdtemp(prefix="qmpmux-compare-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        qemu, mons = start_qemu(workdir, 3)
        procs.append(qemu)
        paths = {"direct": mons[2]}
        places = [("this", REPO, mons[0]), ("other", other, mons[1])]
        if swap:
            places = [("other", other, mons[0]), ("this", REPO, mons[1])]
        for name, checkout, mon in places:
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
    other = args.other.resolve()
    if not (other / "qmpmux" / "__init__.py").is_file():
        p.error(f"{other} is not a qmpmux checkout")
    for checkout in (REPO, other):
        if (found := _imports_from(checkout)) != checkout.resolve():
            p.error(f"qmpmux run from {checkout} would import {found}")
    for n in range(args.runs):
        m = run(other, args.count, swap=n % 2 == 1)
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
