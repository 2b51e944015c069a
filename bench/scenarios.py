"""The measurements: each one puts direct and proxied work side by side in the same run.

Machines are noisy, so direct and proxied samples are interleaved (blocks of A/B,
alternating which goes first) and reported as medians and high percentiles; a
difference between the two columns is then qmpmux's cost, not drift.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.harness import (
    Bed,
    BenchError,
    Client,
    Pumped,
    Swarm,
    cpu_seconds,
    load_process,
    pump,
    rss_kib,
)

STOP: tuple[bytes, bytes] = (b'{"execute":"stop"}', b"STOP")
CONT: tuple[bytes, bytes] = (b'{"execute":"cont"}', b"RESUME")
QUERY_STATUS = b'{"execute":"query-status","id":1}'
QUERY_STATUS_BARE = b'{"execute":"query-status"}'
SCHEMA = b'{"execute":"query-qmp-schema","id":1}'
QUERY_NAME = b'{"execute":"query-name","id":1}'
# Answered by qmpmux itself (negotiation is over): a probe of qmpmux's loop alone.
LOCAL_PROBE = b'{"execute":"qmp_capabilities","id":1}'

Cell = float | tuple[float, float] | None


@dataclass(frozen=True)
class Plan:
    """How much of everything to do: `--quick` for a smoke run, the full run otherwise."""

    quick: bool
    latency_count: int
    throughput_rounds: int
    throughput_seconds: float
    fanout_sizes: tuple[int, ...]
    fanout_iterations: int
    schema_count: int
    probe_seconds: float

    @classmethod
    def make(cls, quick: bool) -> Plan:
        if quick:
            return cls(True, 500, 2, 0.5, (100, 1000), 10, 10, 1.5)
        return cls(False, 3000, 6, 0.5, (100, 1000), 50, 30, 5.0)


@dataclass
class Row:
    section: str
    metric: str
    unit: str
    direct: Cell
    qmpmux: Cell
    ratio: Cell = None
    note: str = ""


@dataclass
class Results:
    """Table rows plus every raw figure behind them (for --json)."""

    rows: list[Row] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    printer: Callable[[Row], None] | None = None

    def add(
        self,
        section: str,
        metric: str,
        unit: str,
        direct: Cell,
        qmpmux: Cell,
        *,
        ratio: bool = True,
        note: str = "",
    ) -> None:
        row = Row(section, metric, unit, direct, qmpmux, _ratio(qmpmux, direct) if ratio else None)
        row.note = note
        self.rows.append(row)
        if self.printer is not None:
            self.printer(row)

    def as_json(self) -> dict[str, Any]:
        return {"rows": [asdict(r) for r in self.rows], "data": self.data}


def _ratio(a: Cell, b: Cell) -> Cell:
    if a is None or b is None:
        return None
    if isinstance(a, tuple) and isinstance(b, tuple):
        return (a[0] / b[0] if b[0] else math.nan, a[1] / b[1] if b[1] else math.nan)
    if isinstance(a, float) and isinstance(b, float):
        return a / b if b else math.nan
    return None


def pct(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1), linearly interpolated."""
    if not values:
        return math.nan
    s = sorted(values)
    at = q * (len(s) - 1)
    lo = math.floor(at)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (at - lo)


def p50_p99(values: Sequence[float], scale: float = 1.0) -> tuple[float, float]:
    return (pct(values, 0.5) * scale, pct(values, 0.99) * scale)


def _summary(values: Sequence[float], scale: float) -> dict[str, float]:
    return {
        "n": len(values),
        "min": min(values) * scale if values else math.nan,
        "p50": pct(values, 0.5) * scale,
        "p90": pct(values, 0.9) * scale,
        "p99": pct(values, 0.99) * scale,
        "max": max(values) * scale if values else math.nan,
        "mean": sum(values) / len(values) * scale if values else math.nan,
    }


# --- 1. latency -----------------------------------------------------------------------------


def round_trips(client: Client, first: int, count: int, ids: bool = True) -> list[int]:
    """`count` sequential query-status round trips with ids first.. (or without an id),
    in nanoseconds."""
    sock, line, clock = client.sock, client.line, time.perf_counter_ns
    out = []
    for i in range(first, first + count):
        command = b'{"execute":"query-status","id":%d}' % i if ids else QUERY_STATUS_BARE
        t0 = clock()
        sock.sendall(command)
        reply = line()
        out.append(clock() - t0)
        if not reply.endswith(b'"id": %d}' % i if ids else b"true}}"):
            raise BenchError(f"unexpected reply to query-status {i}: {reply[:200]!r}")
    return out


def latency(bed: Bed, plan: Plan, res: Results) -> None:
    """Sequential round trips direct, through qmpmux, and through the zero-work relay:
    the relay's figure is what any process in between costs on this machine. The direct
    client also sends the same command without an id (as qmpmux sends a short one
    upstream): the direct path at its fastest, for comparison."""
    n = plan.latency_count
    direct, mux, relay = bed.direct_client(), bed.mux_client(), bed.relay_client()
    try:
        paths = [("direct", direct, True), ("qmpmux", mux, True), ("relay", relay, True),
                 ("bare", direct, False)]  # fmt: skip
        for _name, client, ids in paths:
            round_trips(client, 0, 100, ids)
        times: dict[str, list[int]] = {name: [] for name, _client, _ids in paths}
        block = 50
        cpu0 = cpu_seconds(bed.qmpmux_pid)  # qmpmux idles while the other blocks run
        for b, first in enumerate(range(0, n, block)):
            for name, client, ids in paths if b % 2 == 0 else paths[::-1]:
                times[name] += round_trips(client, first, min(block, n - first), ids)
        cpu = cpu_seconds(bed.qmpmux_pid) - cpu0
    finally:
        for client in (direct, mux, relay):
            client.close()
    us = 1e-3
    res.data["latency"] = {k: _summary(v, us) for k, v in times.items()}
    d, m = p50_p99(times["direct"], us), p50_p99(times["qmpmux"], us)
    r = p50_p99(times["relay"], us)
    res.add(
        "latency",
        f"query-status round trip, {n} sequential, p50 / p99",
        "µs",
        d,
        m,
        note=f"added {m[0] - d[0]:+.0f} / {m[1] - d[1]:+.0f} µs; "
        f"{m[0] - r[0]:+.0f} / {m[1] - r[1]:+.0f} over the relay",
    )
    res.add(
        "latency",
        "the same through a relay that does no work (the hop alone)",
        "µs",
        d,
        r,
        note=f"added {r[0] - d[0]:+.0f} / {r[1] - d[1]:+.0f} µs (bench/relay.py)",
    )
    bare = p50_p99(times["bare"], us)
    res.add(
        "latency",
        "direct without an id, against qmpmux (which sends QEMU none for it)",
        "µs",
        bare,
        m,
        note=f'`,"id":N` costs the direct path {d[0] - bare[0]:+.0f} µs at p50',
    )
    res.data["latency"]["qmpmux_cpu_s"] = cpu
    res.add(
        "cpu",
        f"qmpmux CPU per 10 000 sequential commands (latency run, {n})",
        "s",
        None,
        cpu / n * 1e4,
        ratio=False,
        note="clock-tick (10 ms) resolution",
    )


# --- 6. large replies -----------------------------------------------------------------------


def large_replies(bed: Bed, plan: Plan, res: Results) -> None:
    direct, mux = bed.direct_client(), bed.mux_client()
    times: dict[str, list[int]] = {"direct": [], "qmpmux": []}
    sizes: dict[str, int] = {}
    try:
        paths = [("direct", direct), ("qmpmux", mux)]
        for i in range(plan.schema_count + 2):
            for name, client in paths if i % 2 == 0 else paths[::-1]:
                t0 = time.perf_counter_ns()
                reply = client.call(SCHEMA)
                took = time.perf_counter_ns() - t0
                if not reply.startswith(b'{"return": [') or not reply.endswith(b'"id": 1}'):
                    raise BenchError(f"bad query-qmp-schema reply from {name}: {reply[:100]!r}")
                sizes[name] = len(reply) + 2
                if i >= 2:  # two warm-up rounds
                    times[name].append(took)
    finally:
        direct.close()
        mux.close()
    ms = 1e-6
    res.data["large_replies"] = {
        "bytes": sizes,
        **{k: _summary(v, ms) for k, v in times.items()},
    }
    d, m = p50_p99(times["direct"], ms), p50_p99(times["qmpmux"], ms)
    res.add(
        "large replies",
        f"query-qmp-schema round trip ({sizes['qmpmux'] / 1000:.0f} KB), p50 / p99",
        "ms",
        d,
        m,
        note=f"n={plan.schema_count}; added {m[0] - d[0]:+.2f} ms at p50",
    )


# --- 2. throughput (and 5. CPU per command) -------------------------------------------------

# (path, clients, oob): each client keeps DEPTH commands in flight.
DEPTH = 8
POINTS: tuple[tuple[str, int, bool], ...] = (
    ("direct", 1, False),
    ("direct", 1, True),
    ("qmpmux", 1, False),
    ("qmpmux", 8, False),
    ("qmpmux", 64, False),
)


def _point_clients(bed: Bed, path: str, clients: int, oob: bool) -> list[Client]:
    if path == "direct":
        return [bed.direct_client(oob)]
    return [bed.mux_client(oob) for _ in range(clients)]


def _aggregate(runs: list[Pumped]) -> dict[str, float]:
    commands = sum(r.commands for r in runs)
    seconds = sum(r.seconds for r in runs)
    return {
        "rate_median": pct([r.rate for r in runs], 0.5),
        "rates": [r.rate for r in runs],  # type: ignore[dict-item]
        "commands": commands,
        "seconds": seconds,
        "qmpmux_cpu_per_10k": sum(r.qmpmux_cpu for r in runs) / commands * 1e4,
        "qemu_cpu_per_10k": sum(r.qemu_cpu for r in runs) / commands * 1e4,
        "qmpmux_cpu_share": sum(r.qmpmux_cpu for r in runs) / seconds,
        "qemu_cpu_share": sum(r.qemu_cpu for r in runs) / seconds,
        "bench_cpu_share": sum(r.bench_cpu for r in runs) / seconds,
    }


def throughput(bed: Bed, plan: Plan, res: Results) -> None:
    runs: dict[tuple[str, int, bool], list[Pumped]] = {p: [] for p in POINTS}
    warmup = min(0.2, plan.throughput_seconds / 4)
    for r in range(plan.throughput_rounds):
        for point in POINTS if r % 2 == 0 else POINTS[::-1]:
            bed.check_alive()
            clients = _point_clients(bed, *point)
            try:
                runs[point].append(
                    pump(
                        [c.sock for c in clients],
                        QUERY_STATUS,
                        DEPTH,
                        plan.throughput_seconds,
                        warmup,
                        (bed.qmpmux_pid, bed.qemu_pid),
                    )
                )
            finally:
                for c in clients:
                    c.close()
    agg = {f"{p}-{n}-{'oob' if oob else 'plain'}": _aggregate(v) for (p, n, oob), v in runs.items()}
    res.data["throughput"] = {"depth": DEPTH, "points": agg}
    plain, oob = agg["direct-1-plain"], agg["direct-1-oob"]
    per_point = plan.throughput_rounds * plan.throughput_seconds
    sec = "throughput"
    res.add(
        sec,
        f"1 direct client, {DEPTH} in flight, no oob",
        "cmd/s",
        plain["rate_median"],
        None,
        note=f"{per_point:g} s per point; bench client CPU {plain['bench_cpu_share']:.0%}",
    )
    res.add(sec, f"1 direct client, {DEPTH} in flight, oob", "cmd/s", oob["rate_median"], None)
    for n in (1, 8, 64):
        a = agg[f"qmpmux-{n}-plain"]
        note = (
            f"qmpmux CPU {a['qmpmux_cpu_share']:.0%}, QEMU {a['qemu_cpu_share']:.0%}, "
            f"bench client {a['bench_cpu_share']:.0%}"
        )
        label = f"{n} client{'s' if n > 1 else ''} x {DEPTH} in flight through qmpmux"
        res.add(sec, f"{label} vs direct no-oob", "cmd/s", plain["rate_median"], a["rate_median"])
        res.add(
            sec, f"{label} vs direct oob", "cmd/s", oob["rate_median"], a["rate_median"], note=note
        )
    for n in (1, 8, 64):
        a = agg[f"qmpmux-{n}-plain"]
        res.add(
            "cpu",
            f"qmpmux CPU per 10 000 proxied commands ({n} client{'s' if n > 1 else ''})",
            "s",
            None,
            a["qmpmux_cpu_per_10k"],
            ratio=False,
        )
    res.add(
        "cpu",
        "QEMU CPU per 10 000 commands (direct no-oob vs 8 clients via qmpmux)",
        "s",
        plain["qemu_cpu_per_10k"],
        agg["qmpmux-8-plain"]["qemu_cpu_per_10k"],
    )


# --- 3. event fan-out, 4. memory, 5. CPU per delivery ---------------------------------------


def fanout(bed: Bed, plan: Plan, res: Results) -> None:
    pid = bed.qmpmux_pid
    ms = 1e-6
    memory: dict[str, float] = {"before_clients_kib": rss_kib(pid)}
    stages: dict[str, Any] = {}
    swarm = Swarm(bed.mux)
    direct, driver = bed.direct_client(), bed.mux_client()
    try:
        for size in plan.fanout_sizes:
            swarm.grow(size)
            time.sleep(0.1)
            memory[f"with_{size}_clients_kib"] = rss_kib(pid)
            stages[str(size)] = _fanout_stage(bed, plan, swarm, direct, driver)
            memory[f"with_{size}_clients_after_fanout_kib"] = rss_kib(pid)
    finally:
        swarm.close()
        direct.close()
        driver.close()
    time.sleep(0.3)
    memory["after_clients_left_kib"] = rss_kib(pid)
    res.data["fanout"] = stages
    res.data["memory"].update(memory)
    for size in plan.fanout_sizes:
        st = stages[str(size)]
        d = p50_p99(st["direct_ns"], ms)
        m = p50_p99(st["last_ns"], ms)
        first = p50_p99(st["first_ns"], ms)
        res.add(
            "fan-out",
            f"stop/cont → event at the last of {size} clients, p50 / p99",
            "ms",
            d,
            m,
            note=f"first client {first[0]:.2f} / {first[1]:.2f} ms; direct = 1 direct client",
        )
        res.add(
            "fan-out",
            f"events lost / duplicated ({size} clients, {st['expected']} expected)",
            "count",
            None,
            (float(st["lost"]), float(st["duplicated"])),
            ratio=False,
        )
    for key in ("direct_ns", "last_ns", "first_ns"):
        for st in stages.values():
            st[key] = _summary(st[key], ms)
    base = memory["before_clients_kib"]
    top = max(plan.fanout_sizes)
    res.add("memory", "qmpmux RSS before the fan-out clients", "KiB", None, base, ratio=False)
    for size in plan.fanout_sizes:
        res.add(
            "memory",
            f"qmpmux RSS with {size} idle negotiated clients",
            "KiB",
            None,
            memory[f"with_{size}_clients_kib"],
            ratio=False,
            note=f"after fan-out: {memory[f'with_{size}_clients_after_fanout_kib']:.0f} KiB",
        )
    per_client = (memory[f"with_{top}_clients_kib"] - base) / top
    memory["marginal_kib_per_client"] = per_client
    res.add("memory", "marginal RSS per idle client", "KiB", None, per_client, ratio=False)
    res.add(
        "memory",
        "qmpmux RSS after all clients left",
        "KiB",
        None,
        memory["after_clients_left_kib"],
        ratio=False,
    )
    for size in plan.fanout_sizes:
        st = stages[str(size)]
        res.add(
            "cpu",
            f"qmpmux CPU per 10 000 event deliveries ({size} clients)",
            "s",
            None,
            st["cpu_per_10k_deliveries"],
            ratio=False,
            note=f"{st['deliveries']} deliveries",
        )


def _fanout_stage(
    bed: Bed, plan: Plan, swarm: Swarm, direct: Client, driver: Client
) -> dict[str, Any]:
    """`fanout_iterations` x (stop, cont) on each path, alternating which path goes first.

    Direct: from sending on the direct monitor to the event on that same client.
    qmpmux: from the driver's send to the event at the first and the last swarm client.
    Every swarm client must see every event once, whichever path caused it.
    """
    before = {name: list(counts) for name, counts in swarm.counts.items()}
    cpu0 = cpu_seconds(bed.qmpmux_pid)
    direct_ns: list[int] = []
    first_ns: list[int] = []
    last_ns: list[int] = []
    clock = time.perf_counter_ns
    timeout = 10.0
    issued = 0
    for i in range(plan.fanout_iterations):
        for path in ("direct", "qmpmux") if i % 2 == 0 else ("qmpmux", "direct"):
            for command, event in (STOP, CONT):
                if path == "direct":
                    t0 = clock()
                    direct.send(command)
                    direct_ns.append(direct.event(event) - t0)
                    direct.reply()
                    swarm.collect(event, timeout)
                    driver.event(event)
                else:
                    t0 = clock()
                    driver.send(command)
                    arrived, _ = swarm.collect(event, timeout)
                    if arrived:
                        first_ns.append(min(arrived) - t0)
                        last_ns.append(max(arrived) - t0)
                    driver.event(event)
                    driver.reply()
                    direct.event(event)
                issued += 1
    swarm.drain()
    cpu = cpu_seconds(bed.qmpmux_pid) - cpu0
    expected_each = issued // 2  # per event name, per client
    lost = duplicated = deliveries = 0
    for name, counts in swarm.counts.items():
        old = before.get(name, [])
        for i, count in enumerate(counts):
            got = count - (old[i] if i < len(old) else 0)
            deliveries += got
            lost += max(0, expected_each - got)
            duplicated += max(0, got - expected_each)
    deliveries += 2 * issued  # the driver and the stop/cont issuer's events are extra work
    return {
        "clients": len(swarm),
        "events_issued": issued,
        "expected": expected_each * 2 * len(swarm),
        "lost": lost,
        "duplicated": duplicated,
        "deliveries": deliveries,
        "qmpmux_cpu_s": cpu,
        "cpu_per_10k_deliveries": cpu / deliveries * 1e4 if deliveries else math.nan,
        "direct_ns": direct_ns,
        "first_ns": first_ns,
        "last_ns": last_ns,
    }


# --- 7. event-loop blocking -----------------------------------------------------------------


def _probe(direct: Client, mux: Client, seconds: float) -> dict[str, list[int]]:
    """Alternate query-name on both paths and a qmpmux-answered probe for `seconds`.

    Loads: "schema stream xN" is another client of qmpmux keeping N query-qmp-schema
    (207 KB replies, ~17 ms of QEMU's time each) in flight; "fan-out 1000" is 1000 idle
    qmpmux clients receiving the events of a stop/cont loop run through qmpmux.
    """
    out: dict[str, list[int]] = {"direct": [], "qmpmux": [], "direct_local": [], "qmpmux_local": []}
    clock = time.perf_counter_ns
    probes = (
        ("direct", direct, QUERY_NAME),
        ("qmpmux", mux, QUERY_NAME),
        ("direct_local", direct, LOCAL_PROBE),
        ("qmpmux_local", mux, LOCAL_PROBE),
    )
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for key, client, command in probes:
            t0 = clock()
            client.send(command)
            client.reply()
            out[key].append(clock() - t0)
    return out


def blocking(bed: Bed, plan: Plan, res: Results) -> None:
    loads: list[tuple[str, tuple[str, ...] | None, float]] = [
        ("idle", None, plan.probe_seconds / 2),
        ("schema stream x1", ("schema", "1"), plan.probe_seconds),
        ("schema stream x8", ("schema", "8"), plan.probe_seconds),
        ("fan-out 1000", ("fanout", "1000"), plan.probe_seconds),
        ("idle", None, plan.probe_seconds / 2),
    ]
    samples: dict[str, dict[str, list[int]]] = {}
    summaries: dict[str, str] = {}
    direct, mux = bed.direct_client(), bed.mux_client()
    try:
        for label, load, seconds in loads:
            bed.check_alive()
            gen = load_process(bed, *load) if load is not None else None
            try:
                got = _probe(direct, mux, seconds)
            finally:
                if gen is not None:
                    summaries[label] = gen.stop()
            into = samples.setdefault(label, {})
            for k, v in got.items():
                into.setdefault(k, []).extend(v)
    finally:
        direct.close()
        mux.close()
    ms = 1e-6
    res.data["blocking"] = {
        label: {k: _summary(v, ms) for k, v in s.items()} | {"load": summaries.get(label, "")}
        for label, s in samples.items()
    }
    idle = samples["idle"]
    for label, s in samples.items():
        for probe, what in (("", "query-name"), ("_local", "local reply")):
            d = p50_p99(s["direct" + probe], ms)
            m = p50_p99(s["qmpmux" + probe], ms)
            note = ""
            if label != "idle":
                di = p50_p99(idle["direct" + probe], ms)
                mi = p50_p99(idle["qmpmux" + probe], ms)
                note = (
                    f"added vs idle: direct {d[0] - di[0]:+.2f} / {d[1] - di[1]:+.2f}, "
                    f"qmpmux {m[0] - mi[0]:+.2f} / {m[1] - mi[1]:+.2f} ms"
                )
            elif probe:
                note = "a 2nd qmp_capabilities: answered by qmpmux itself, by QEMU directly"
            res.add(
                "loop blocking",
                f"{what} round trip, {label}, p50 / p99",
                "ms",
                d,
                m,
                note=note,
            )
