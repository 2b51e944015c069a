"""`python -m bench [--quick] [--json FILE]`: qmpmux against direct QEMU, in one run.

One QEMU serves two monitors, one behind qmpmux and one used directly, and every
measurement interleaves the two paths, so the table's ratio column is qmpmux's cost on
this machine today. The numbers are for reading, not for passing or failing.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import math
import os
import platform
import re
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

import msgspec

from bench.harness import REPO, Bed, BenchError, bed, end_process, rss_kib
from bench.host import host
from bench.hostile import hostile
from bench.lanes import lanes
from bench.scenarios import Cell, Plan, Results, Row, blocking, fanout, large_replies, latency
from bench.scenarios import throughput as throughput_

SCENARIOS: dict[str, Callable[[Bed, Plan, Results], None]] = {
    "latency": latency,
    "large": large_replies,
    "throughput": throughput_,
    "fanout": fanout,
    "blocking": blocking,
    "lanes": lanes,
    "hostile": hostile,
    "host": host,
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="short run (well under a minute)")
    p.add_argument("--json", metavar="FILE", type=Path, help="also write all figures as JSON")
    p.add_argument(
        "--only",
        metavar="NAMES",
        help=f"comma-separated subset of: {', '.join(SCENARIOS)} (default: all)",
    )
    p.add_argument(
        "--lanes",
        type=int,
        default=1,
        metavar="N",
        help="qmpmux on N monitors of the QEMU (default 1; the lanes scenario sets its own)",
    )
    p.add_argument(
        "--qmpmux-profile",
        metavar="FILE",
        type=Path,
        help="run qmpmux under cProfile and write its stats to FILE (slows qmpmux down)",
    )
    args = p.parse_args(argv)
    names = args.only.split(",") if args.only else list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s): {', '.join(unknown)}")
    args.names = names
    return args


# --- the machine and the versions -----------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str:
    try:
        out = subprocess.run(
            ["git", "--no-optional-locks", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def describe(bed_: Bed) -> dict[str, Any]:
    client = bed_.direct_client()
    try:
        reply = msgspec.json.decode(client.call(b'{"execute":"query-version"}'))
    finally:
        client.close()
    v = reply["return"]
    revision = _git("rev-parse", "--short", "HEAD") or "unknown"
    if _git("status", "--porcelain", "--", "qmpmux"):
        revision += " (qmpmux/ has uncommitted changes)"
    return {
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "loadavg_at_start": os.getloadavg()[0],
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "qemu": "{major}.{minor}.{micro}".format(**v["qemu"])
        + (f" ({v['package'].strip()})" if v.get("package", "").strip() else ""),
        "uvloop": _version("uvloop"),
        "msgspec": _version("msgspec"),
        "qmpmux_revision": revision,
        "qmpmux_pid": bed_.qmpmux_pid,
        "qemu_pid": bed_.qemu_pid,
    }


# --- the table ------------------------------------------------------------------------------


def _num(x: float) -> str:
    if math.isnan(x):
        return "n/a"
    a = abs(x)
    if a >= 100 or x == int(x):
        return f"{x:,.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 0.1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def fmt(cell: Cell, unit: str = "") -> str:
    if cell is None:
        return "-"
    text = f"{_num(cell[0])} / {_num(cell[1])}" if isinstance(cell, tuple) else _num(cell)
    return f"{text} {unit}".rstrip() if unit else text


def fmt_ratio(cell: Cell) -> str:
    if cell is None:
        return ""
    if isinstance(cell, tuple):
        return f"{cell[0]:.2f}x / {cell[1]:.2f}x"
    return f"{cell:.2f}x"


HEADER = ("metric", "direct", "qmpmux", "qmpmux/direct")
WIDTHS = (72, 18, 18, 15)


def format_row(row: Row) -> str:
    cells = (row.metric, fmt(row.direct, row.unit), fmt(row.qmpmux, row.unit), fmt_ratio(row.ratio))
    line = "  ".join(
        c.ljust(w) if i == 0 else c.rjust(w)
        for i, (c, w) in enumerate(zip(cells, WIDTHS, strict=True))
    )
    return line + (f"  {row.note}" if row.note else "")


SECTIONS = ("latency", "throughput", "fan-out", "memory", "cpu", "large replies", "loop blocking")


def print_table(rows: list[Row]) -> None:
    """The rows grouped by section, in the order of the measurements' numbering."""
    rows = sorted(rows, key=lambda r: SECTIONS.index(r.section) if r.section in SECTIONS else 99)
    print(
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w)
            for i, (h, w) in enumerate(zip(HEADER, WIDTHS, strict=True))
        )
    )
    section = ""
    for row in rows:
        if row.section != section:
            section = row.section
            print(f"[{section}]")
        print(format_row(row))


def summarise_log(lines: list[str]) -> dict[str, Any]:
    """qmpmux's warnings grouped by shape (numbers masked), plus the last few verbatim."""
    patterns = collections.Counter(re.sub(r"\d+", "N", line)[:200] for line in lines)
    return {"lines": len(lines), "patterns": dict(patterns.most_common(20)), "last": lines[-20:]}


# --- running --------------------------------------------------------------------------------


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through every cleanup


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < 2200:
        print(f"warning: RLIMIT_NOFILE is {hard}; the 1000-client runs need ~2100", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    plan = Plan.make(args.quick)
    res = Results()
    started = time.monotonic()
    meta: dict[str, Any] = {"mode": "quick" if plan.quick else "full", "plan": plan.__dict__}
    status = 0
    with bed(args.qmpmux_profile, lanes=args.lanes) as b:
        meta.update(describe(b))
        keys = ("cpu_model", "cores", "kernel", "python", "qemu", "uvloop", "msgspec")
        for key in (*keys, "loadavg_at_start"):
            print(f"{key:>16}: {meta[key]}")
        print(f"{'qmpmux':>16}: {meta['qmpmux_revision']} (pid {meta['qmpmux_pid']})")
        print(f"{'mode':>16}: {meta['mode']}, qmpmux on {args.lanes} monitor(s)\n")
        res.data["memory"] = {"fresh_idle_kib": rss_kib(b.qmpmux_pid)}
        res.add(
            "memory",
            "qmpmux RSS, fresh, no clients",
            "KiB",
            None,
            float(res.data["memory"]["fresh_idle_kib"]),
            ratio=False,
        )
        res.printer = lambda row: print(format_row(row), flush=True)
        print(format_row(res.rows[0]))
        try:
            for name in args.names:
                t0 = time.monotonic()
                SCENARIOS[name](b, plan, res)
                res.data.setdefault("seconds", {})[name] = round(time.monotonic() - t0, 1)
                b.check_alive()
        except BenchError as exc:
            print(f"\nbench failed: {exc}", file=sys.stderr)
            status = 1
        finally:
            res.printer = None
            qmpmux_status = end_process(b.qmpmux)
            meta["qmpmux_exit_status"] = qmpmux_status
            log = b.qmpmux_log_lines()
            meta["qmpmux_log"] = summarise_log(log)
    meta["wall_seconds"] = round(time.monotonic() - started, 1)
    print(
        f"\nqmpmux {meta['qmpmux_revision']} vs QEMU {meta['qemu']}, {meta['mode']} run, "
        f"{meta['wall_seconds']:g} s, {meta['cpu_model']} x {meta['cores']}\n"
    )
    print_table(res.rows)
    if qmpmux_status != 0:
        print(f"\nqmpmux exited with status {qmpmux_status} on SIGTERM")
    if log:
        print(f"\nqmpmux logged {len(log)} line(s) at warning or above:")
        for pattern, count in meta["qmpmux_log"]["patterns"].items():
            print(f"  {count:6d} x {pattern}")
    if args.json is not None:
        args.json.write_text(json.dumps({"meta": meta, **res.as_json()}, indent=2, default=str))
        print(f"\nwrote {args.json}")
    return status


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    _raise_fd_limit()
    try:
        return run(args)
    except KeyboardInterrupt:
        print("\ninterrupted; QEMU and qmpmux have been stopped", file=sys.stderr)
        return 130
    except SystemExit as exc:
        print("\nstopped by a signal; QEMU and qmpmux have been stopped", file=sys.stderr)
        raise exc
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
