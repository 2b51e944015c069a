"""Prometheus metrics and list-clients counts after real traffic through a real QEMU.

Every expectation is derived from what the test sent and what its clients saw, never
from one QEMU version's numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from qmpmux.config import Address, Limits
from tests.conftest import Mux, start_mux
from tests.realqemu import Qemu, RawClient

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def http_get(path: Path, request: bytes) -> tuple[bytes, bytes]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        writer.write(request)
        data = await asyncio.wait_for(reader.read(), 10)  # Connection: close
    except ConnectionResetError:  # closed with part of an oversized request unread
        data = b""
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


async def scrape(path: Path) -> Samples:
    head, body = await http_get(path, b"GET /metrics HTTP/1.1\r\nHost: qmpmux\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK"), head
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def client(mux: Mux, profile: str) -> RawClient:
    c = await RawClient.connect(mux.sockets[profile])
    await c.negotiate()
    return c


async def run(c: RawClient, command: bytes) -> tuple[dict[str, object], list[str]]:
    """Send a command; its reply, and the names of the events that came before it."""
    await c.send(command)
    events: list[str] = []
    while True:
        message = await c.read_json()
        if "event" in message:
            events.append(str(message["event"]))
        else:
            return message, events


@pytest.fixture
async def mmux(qemu: Qemu, tmp_path: Path) -> AsyncIterator[tuple[Mux, Path]]:
    where = tmp_path / "metrics.sock"
    m = await start_mux(
        qemu, tmp_path, profiles=("full", "readonly"), metrics=Address("unix", path=str(where))
    )
    try:
        yield m, where
    finally:
        m.proxy.stop("test over")
        await asyncio.wait_for(m.proxy.wait(), 10)


async def test_counters_follow_the_traffic(mmux: tuple[Mux, Path]) -> None:
    mux, where = mmux
    before = await scrape(where)
    assert value(before, "qmpmux_build_info", version="0.1.0") == 1
    assert value(before, "qmpmux_upstream_up", lane="0") == 1
    assert value(before, "qmpmux_upstream_reconnects_total") == 0
    full_label = str(mux.sockets["full"].as_posix())
    ro_label = str(mux.sockets["readonly"].as_posix())
    assert value(before, "qmpmux_clients", listener=f"unix:{full_label}", profile="full") == 0

    full = await client(mux, "full")
    ro = await client(mux, "readonly")
    during = await scrape(where)
    assert value(during, "qmpmux_clients", listener=f"unix:{full_label}", profile="full") == 1
    assert value(during, "qmpmux_clients", listener=f"unix:{ro_label}", profile="readonly") == 1

    seen: list[str] = []
    ok = 5
    for i in range(ok):
        reply, events = await run(full, b'{"execute":"query-status","id":%d}' % i)
        assert "return" in reply
        seen += events
    reply, events = await run(full, b'{"execute":"query-status","arguments":{"x":1}}')
    assert "error" in reply  # QEMU's own error: forwarded, result "error"
    seen += events
    reply, events = await run(full, b'{"execute":"no-such-command-at-all"}')
    assert "error" in reply  # QEMU does not know it: its name folds into "other"
    seen += events
    for command in (b'{"execute":"stop"}', b'{"execute":"cont"}'):
        reply, events = await run(full, command)
        assert "return" in reply
        seen += events
    denied = 3
    ro_events: list[str] = []  # the same events reach the readonly client too
    for _ in range(denied):
        reply, events = await run(ro, b'{"execute":"stop"}')
        assert "error" in reply
        ro_events += events
    reply, events = await run(ro, b'{"execute":"no-such-command-at-all"}')
    ro_events += events
    listing, _ = await run(full, b'{"execute":"__org.qmpmux_list-clients"}')

    after = await scrape(where)
    total = "qmpmux_commands_total"
    assert value(after, total, command="query-status", result="ok") == ok
    assert value(after, total, command="query-status", result="error") == 1
    assert value(after, total, command="stop", result="ok") == 1
    assert value(after, total, command="stop", result="denied") == denied
    assert value(after, total, command="other", result="error") == 1
    assert value(after, total, command="other", result="denied") == 1
    assert value(after, "qmpmux_denials_total", profile="readonly", command="stop") == denied
    assert value(after, "qmpmux_denials_total", profile="readonly", command="other") == 1
    # Every command QEMU answered is in the round-trip histogram, and nothing else.
    forwarded = ok + 1 + 1 + 2
    assert value(after, "qmpmux_command_duration_seconds_count") == forwarded
    assert value(after, "qmpmux_command_duration_seconds_bucket", le="+Inf") == forwarded
    assert value(after, "qmpmux_command_duration_seconds_sum") > 0
    assert value(after, "qmpmux_inflight_commands") == 0
    # Events count once each, however many clients they reach.
    for name in set(seen):
        assert value(after, "qmpmux_events_total", event=name) == seen.count(name), name
    assert seen.count("STOP") == 1 and seen.count("RESUME") == 1
    assert ro_events == ["STOP", "RESUME"]

    # list-clients: connect time and per-client counts.
    listed = listing["return"]
    assert isinstance(listed, list)
    clients = {c["profile"]: c for c in listed}
    assert clients["full"]["commands"] == forwarded  # list-clients itself not yet answered
    assert clients["full"]["denials"] == 0
    assert clients["full"]["events"] == 2
    assert clients["readonly"]["commands"] == 0
    assert clients["readonly"]["denials"] == denied + 1
    assert clients["readonly"]["events"] == 2
    assert str(clients["full"]["connected-at"]).endswith("Z")

    # Clients going: one closes, one shuts down its sending side (and is answered).
    ro.writer.write_eof()
    assert await ro.eof()
    await full.close()
    gone = await wait_for_sample(where, "qmpmux_client_disconnects_total", 2, "reason")
    assert value(gone, "qmpmux_client_disconnects_total", reason="closed") == 2
    assert value(gone, "qmpmux_clients", listener=f"unix:{full_label}", profile="full") == 0


async def wait_for_sample(where: Path, name: str, total: float, label: str) -> Samples:
    """Scrape until the sum of `name` over `label` reaches `total` (bounded)."""
    async with asyncio.timeout(10):
        while True:
            samples = await scrape(where)
            got = sum(v for (n, labels), v in samples.items() if n == name and labels)
            if got >= total:
                return samples
            await asyncio.sleep(0.01)


async def test_disconnect_reasons_slow_reader_and_negotiation_timeout(
    qemu: Qemu, tmp_path: Path
) -> None:
    where = tmp_path / "metrics.sock"
    mux = await start_mux(
        qemu,
        tmp_path,
        limits=Limits(negotiation_timeout=1.0, outbox_bytes=65536),
        metrics=Address("unix", path=str(where)),
    )
    try:
        slow = await RawClient.connect(mux.path)
        await slow.negotiate()  # well within the timeout: it is cut for not reading
        # Replies it never reads: the outbox passes its bound and the client is cut.
        slow.writer.transport.pause_reading()  # type: ignore[attr-defined]
        big = b'{"execute":"query-qmp-schema"}' * 64
        with contextlib.suppress(ConnectionError):
            await slow.send(big)
        idle = await RawClient.connect(mux.path)  # never negotiates
        assert await idle.eof()
        samples = await wait_for_sample(where, "qmpmux_client_disconnects_total", 2, "reason")
        reasons = "qmpmux_client_disconnects_total"
        assert value(samples, reasons, reason="negotiation_timeout") == 1
        assert value(samples, reasons, reason="cut_slow_reader") == 1
    finally:
        mux.proxy.stop("test over")
        await asyncio.wait_for(mux.proxy.wait(), 10)


async def test_http_side_answers_only_metrics(mmux: tuple[Mux, Path]) -> None:
    _, where = mmux
    head, _ = await http_get(where, b"GET / HTTP/1.1\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404")
    head, _ = await http_get(where, b"POST /metrics HTTP/1.1\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 405")
    head, body = await http_get(where, b"HEAD /metrics HTTP/1.1\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and body == b""
    head, body = await http_get(where, b"garbage\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    # A request head beyond the bound gets the connection closed, nothing else.
    head, body = await http_get(where, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000)
    assert head == b"" and body == b""
    assert await scrape(where)  # still serving
    assert oct(where.stat().st_mode & 0o777) == oct(0o600)
