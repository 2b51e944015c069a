"""The Prometheus endpoint (shell): `GET /metrics` on `--metrics ADDR`, from the loop.

The hub only counts (`metrics.py`); everything here runs when Prometheus scrapes: a
collector reads the hub's counters and state and the client library renders them in the
text exposition format. The hot path never calls into `prometheus_client`.

The HTTP side is deliberately tiny: one request per connection, its head bounded in size
(`REQUEST_BYTES`) and time (`REQUEST_TIMEOUT`), at most `CONNECTIONS_MAX` connections at
once, and only `GET`/`HEAD /metrics` answered (404 for other paths, 405 for other
methods). Rendering takes well under a millisecond for qmpmux's few hundred series, so it
runs on the loop itself; no thread, nothing blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Final, NamedTuple

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from qmpmux import __version__
from qmpmux.hub import Hub
from qmpmux.link import UpstreamState
from qmpmux.metrics import DURATION_BUCKETS, RESULTS

log = logging.getLogger("qmpmux.metrics")

REQUEST_BYTES = 8192
REQUEST_TIMEOUT = 5.0
CONNECTIONS_MAX = 16
# The text format generate_latest writes, under the name every Prometheus version takes.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Source(NamedTuple):
    """One VM's metrics as a scrape finds them: its name (None: the only VM, single-VM
    mode), the hub serving it now (a new one per QEMU session, counters carried on) and
    its listeners (label, profile), reported with 0 clients too, so an alert on a
    listener's clients sees no absent series."""

    vm: str | None
    hub: Hub
    listeners: tuple[tuple[str, str], ...] = ()


# qmpmux_vms's states, all reported (0 too): up once QEMU's monitor(s) negotiated.
VM_STATES: Final = ("up", "down")


def by_state(name: str, doc: str, states: Iterable[str], seen: Iterable[str]) -> Metric:
    """A gauge counting `seen` by state, every one of `states` reported (0 too), so an
    alert on one state sees no absent series."""
    counts = Counter(seen)
    family = GaugeMetricFamily(name, doc, labels=["state"])
    for state in states:
        family.add_metric([state], counts[state])
    return family


def _rows(
    kind: type[CounterMetricFamily] | type[GaugeMetricFamily],
    name: str,
    doc: str,
    labels: list[str],
    each: list[tuple[list[str], Source]],
    rows: Callable[[Source], Iterable[tuple[Sequence[str], float]]],
) -> Metric:
    """One family of every source's rows (label values, value), each prefixed with its
    source's `vm` label value when there is one."""
    family = kind(name, doc, labels=labels)
    for at, src in each:
        for values, value in rows(src):
            family.add_metric([*at, *values], value)
    return family


class HubCollector(Collector):
    """Reads `sources()` at every scrape: VMs come and go, and a hub is replaced on
    reconnect. One source without a name (single-VM mode) is rendered with no `vm` label
    at all; anything else gives every sample but `qmpmux_build_info` a leading `vm` label
    (an unnamed source among others: `vm=""`; names must be unique), each metric one
    family holding every VM's samples, and adds `qmpmux_vms`."""

    def __init__(self, sources: Callable[[], Iterable[Source]]) -> None:
        self.sources = sources

    def collect(self) -> Iterable[Metric]:
        sources = sorted(self.sources(), key=lambda source: source.vm or "")
        single = len(sources) == 1 and sources[0].vm is None
        vm = [] if single else ["vm"]
        # Each source with its label values' prefix: [] or [NAME].
        each = [([] if single else [src.vm or ""], src) for src in sources]
        family = GaugeMetricFamily(
            "qmpmux_build_info", "qmpmux's version (always 1)", labels=["version"]
        )
        family.add_metric([__version__], 1)
        yield family
        if not single:
            yield by_state(
                "qmpmux_vms", "VMs configured, by state (up: QEMU's monitor negotiated)",
                VM_STATES,
                ("up" if src.hub.state is UpstreamState.READY else "down" for src in sources),
            )  # fmt: skip
        yield _rows(
            GaugeMetricFamily, "qmpmux_clients", "Clients connected, by listener and profile",
            [*vm, "listener", "profile"], each, _clients,
        )  # fmt: skip
        yield _rows(
            CounterMetricFamily, "qmpmux_commands",
            "Commands judged, by command and result (ok, error, denied)",
            [*vm, "command", "result"], each,
            lambda src: (
                ((name, result), row[index])
                for name, row in sorted(src.hub.stats.commands.items())
                for result, index in RESULTS
                if row[index]
            ),
        )  # fmt: skip
        yield _rows(
            CounterMetricFamily, "qmpmux_denials",
            "Commands refused by policy, by profile and command",
            [*vm, "profile", "command"], each,
            lambda src: sorted(src.hub.stats.denials.items()),
        )  # fmt: skip
        histogram = HistogramMetricFamily(
            "qmpmux_command_duration_seconds",
            "Upstream round trip of commands sent to QEMU (sent to reply read)",
            labels=vm,
        )
        for at, src in each:
            hist = src.hub.stats.hist
            buckets: list[tuple[str, float]] = []
            total = 0.0
            bounds = (*DURATION_BUCKETS, float("inf"))
            for bound, in_bucket in zip(bounds, hist[:-1], strict=True):
                total += in_bucket
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), total))
            histogram.add_metric(at, buckets, sum_value=hist[-1])
        yield histogram
        yield _rows(
            CounterMetricFamily, "qmpmux_events",
            "QEMU events received (once each, whatever the clients)", [*vm, "event"], each,
            lambda src: (((name,), n) for name, n in sorted(src.hub.stats.events.items())),
        )  # fmt: skip
        yield _rows(
            CounterMetricFamily, "qmpmux_client_disconnects", "Clients gone, by reason",
            [*vm, "reason"], each,
            lambda src: (((reason,), n) for reason, n in src.hub.stats.disconnects.items()),
        )  # fmt: skip
        yield _rows(
            GaugeMetricFamily, "qmpmux_upstream_up",
            "1 while QEMU monitor link (lane) is negotiated and open", [*vm, "lane"], each,
            _lanes_up,
        )  # fmt: skip
        yield _rows(
            CounterMetricFamily, "qmpmux_upstream_reconnects",
            "Times qmpmux reconnected to QEMU's monitor", vm, each,
            lambda src: [((), src.hub.stats.reconnects)],
        )  # fmt: skip
        yield _rows(
            GaugeMetricFamily, "qmpmux_inflight_commands",
            "Commands sent to QEMU and not answered yet", vm, each,
            lambda src: [((), sum(link.in_qemu for link in src.hub.links))],
        )  # fmt: skip
        yield _rows(
            CounterMetricFamily, "qmpmux_config_reloads", "Policy reloads (SIGHUP), by result",
            [*vm, "result"], each,
            lambda src: (((result,), n) for result, n in src.hub.stats.reloads.items()),
        )  # fmt: skip


def _clients(src: Source) -> Iterable[tuple[Sequence[str], float]]:
    clients: Counter[tuple[str, str]] = Counter(dict.fromkeys(src.listeners, 0))
    for flow in src.hub.clients.values():
        clients[flow.session.peer.listener, flow.session.profile.name] += 1
    return sorted(clients.items())


def _lanes_up(src: Source) -> Iterable[tuple[Sequence[str], float]]:
    over = src.hub.state is UpstreamState.CLOSED  # the whole session, whatever each link
    for link in src.hub.links:
        up = link.state is UpstreamState.READY and not over
        yield (str(link.index),), 1 if up else 0


def registry_for(sources: Callable[[], Iterable[Source]]) -> CollectorRegistry:
    """A registry with the metrics of every VM `sources()` names at scrape time, and the
    process's own (CPU, memory, fds)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HubCollector(sources))
    ProcessCollector(registry=registry)
    return registry


def _response(status: str, body: bytes, content_type: str, head_only: bool = False) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode("ascii")
    return head if head_only else head + body


class MetricsServer:
    """Serves `registry` on a socket that is already bound and listening (`Proxy.bind`
    made it, with a unix socket's mode set as for a listener)."""

    def __init__(self, sock: socket.socket, registry: CollectorRegistry, unlink: str = "") -> None:
        self._sock = sock
        self._registry = registry
        self._unlink = unlink  # a unix socket's path, removed on close
        self._server: asyncio.Server | None = None
        self._open = 0

    async def start(self) -> None:
        if self._sock.family == socket.AF_UNIX:
            self._server = await asyncio.start_unix_server(
                self._handle, sock=self._sock, limit=REQUEST_BYTES
            )
        else:
            self._server = await asyncio.start_server(
                self._handle, sock=self._sock, limit=REQUEST_BYTES
            )

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        else:
            self._sock.close()
        if self._unlink:
            with contextlib.suppress(OSError):
                os.unlink(self._unlink)
            self._unlink = ""

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open += 1
        try:
            if self._open <= CONNECTIONS_MAX:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    head = await reader.readuntil(b"\r\n\r\n")
                    writer.write(self._answer(head))
                    await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError):  # fmt: skip
            pass  # a scraper that cannot speak in time, or at all, just loses its connection
        finally:
            self._open -= 1
            writer.close()

    def _answer(self, head: bytes) -> bytes:
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return _response("400 Bad Request", b"bad request\n", "text/plain")
        method, target = parts[0], parts[1]
        if method not in (b"GET", b"HEAD"):
            return _response("405 Method Not Allowed", b"GET only\n", "text/plain")
        if target.split(b"?", 1)[0] != b"/metrics":
            return _response("404 Not Found", b"try /metrics\n", "text/plain")
        body = generate_latest(self._registry)
        return _response("200 OK", body, CONTENT_TYPE, head_only=method == b"HEAD")
