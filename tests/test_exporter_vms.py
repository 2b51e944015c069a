"""The Prometheus exposition of several VMs: one `vm` label on every qmpmux sample, one
family per metric, `qmpmux_vms`; and of the only, unnamed VM: exactly as before
(qmpmux/exporter.py; README "Metrics")."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from qmpmux import __version__
from qmpmux.config import Address, Listener
from qmpmux.exporter import MetricsServer, Source, registry_for
from qmpmux.hub import Hub, ToUpstream
from qmpmux.server import open_listener
from qmpmux.session import Peer
from tests.conftest import Mux, start_mux
from tests.playbook import STOP_EVENT, connect, ready_hub
from tests.realqemu import Qemu, RawClient, start_qemu
from tests.test_hub_metrics import learning_hub
from tests.test_metrics_qemu import http_get

LISTENERS = (("unix:test", "full"), ("unix:idle", "readonly"))
Sample = tuple[str, frozenset[tuple[str, str]], float]

# A scrape of `busy_hub()` by the single-VM exporter before VMs had names, process_*
# series left out: an unnamed source must still render exactly this.
BEFORE = """\
# HELP qmpmux_build_info qmpmux's version (always 1)
# TYPE qmpmux_build_info gauge
qmpmux_build_info{version="{VERSION}"} 1.0
# HELP qmpmux_clients Clients connected, by listener and profile
# TYPE qmpmux_clients gauge
qmpmux_clients{listener="unix:idle",profile="readonly"} 0.0
qmpmux_clients{listener="unix:test",profile="full"} 1.0
# HELP qmpmux_commands_total Commands judged, by command and result (ok, error, denied)
# TYPE qmpmux_commands_total counter
qmpmux_commands_total{command="query-status",result="ok"} 1.0
qmpmux_commands_total{command="query-status",result="error"} 1.0
qmpmux_commands_total{command="stop",result="denied"} 1.0
# HELP qmpmux_denials_total Commands refused by policy, by profile and command
# TYPE qmpmux_denials_total counter
qmpmux_denials_total{command="stop",profile="readonly"} 1.0
# HELP qmpmux_command_duration_seconds Upstream round trip of commands sent to QEMU (sent to reply read)
# TYPE qmpmux_command_duration_seconds histogram
qmpmux_command_duration_seconds_bucket{le="0.0001"} 0.0
qmpmux_command_duration_seconds_bucket{le="0.00025"} 0.0
qmpmux_command_duration_seconds_bucket{le="0.0005"} 0.0
qmpmux_command_duration_seconds_bucket{le="0.001"} 0.0
qmpmux_command_duration_seconds_bucket{le="0.0025"} 0.0
qmpmux_command_duration_seconds_bucket{le="0.005"} 0.0
qmpmux_command_duration_seconds_bucket{le="0.01"} 1.0
qmpmux_command_duration_seconds_bucket{le="0.025"} 1.0
qmpmux_command_duration_seconds_bucket{le="0.05"} 1.0
qmpmux_command_duration_seconds_bucket{le="0.1"} 1.0
qmpmux_command_duration_seconds_bucket{le="0.25"} 2.0
qmpmux_command_duration_seconds_bucket{le="0.5"} 2.0
qmpmux_command_duration_seconds_bucket{le="1.0"} 2.0
qmpmux_command_duration_seconds_bucket{le="2.5"} 2.0
qmpmux_command_duration_seconds_bucket{le="5.0"} 2.0
qmpmux_command_duration_seconds_bucket{le="10.0"} 2.0
qmpmux_command_duration_seconds_bucket{le="+Inf"} 2.0
qmpmux_command_duration_seconds_count 2.0
qmpmux_command_duration_seconds_sum 0.2578125
# HELP qmpmux_events_total QEMU events received (once each, whatever the clients)
# TYPE qmpmux_events_total counter
qmpmux_events_total{event="STOP"} 1.0
# HELP qmpmux_client_disconnects_total Clients gone, by reason
# TYPE qmpmux_client_disconnects_total counter
qmpmux_client_disconnects_total{reason="closed"} 1.0
qmpmux_client_disconnects_total{reason="cut_slow_reader"} 0.0
qmpmux_client_disconnects_total{reason="io_error"} 0.0
qmpmux_client_disconnects_total{reason="negotiation_timeout"} 0.0
qmpmux_client_disconnects_total{reason="internal_error"} 0.0
qmpmux_client_disconnects_total{reason="upstream_lost"} 0.0
qmpmux_client_disconnects_total{reason="shutdown"} 0.0
# HELP qmpmux_upstream_up 1 while QEMU monitor link (lane) is negotiated and open
# TYPE qmpmux_upstream_up gauge
qmpmux_upstream_up{lane="0"} 1.0
# HELP qmpmux_upstream_reconnects_total Times qmpmux reconnected to QEMU's monitor
# TYPE qmpmux_upstream_reconnects_total counter
qmpmux_upstream_reconnects_total 2.0
# HELP qmpmux_inflight_commands Commands sent to QEMU and not answered yet
# TYPE qmpmux_inflight_commands gauge
qmpmux_inflight_commands 1.0
# HELP qmpmux_config_reloads_total Policy reloads (SIGHUP), by result
# TYPE qmpmux_config_reloads_total counter
qmpmux_config_reloads_total{result="ok"} 0.0
qmpmux_config_reloads_total{result="error"} 1.0
"""  # noqa: E501 (the exposition's lines as they are)


def run(hub: Hub, now: list[float], cid: int, command: bytes, reply: bytes, took: float) -> None:
    """One command of `cid` through the hub, QEMU answering `reply` after `took` s."""
    (sent,) = hub.client_data(cid, command)
    assert isinstance(sent, ToUpstream)
    assert b'"id"' not in bytes(sent.data)  # a small in-band command goes without one
    now[0] += took
    hub.upstream_data(reply)


def busy_hub() -> Hub:
    """Something in every family: two timed commands (one failed), one still in flight,
    an event, a denial, a disconnect, reconnects and a failed reload."""
    now = [100.0]
    hub = learning_hub(["query-status", "stop"], now)
    cid = connect(hub)
    ok = b'{"return": {}}\r\n'
    failed = b'{"error": {"class": "GenericError", "desc": "x"}}\r\n'
    run(hub, now, cid, b'{"execute":"query-status"}', ok, 0.0078125)
    run(hub, now, cid, b'{"execute":"query-status"}', failed, 0.25)
    hub.client_data(cid, b'{"execute":"stop"}')
    hub.upstream_data(STOP_EVENT)
    ro, _ = hub.client_connected(Peer("unix:test", "readonly"))
    hub.client_data(ro, b'{"execute":"qmp_capabilities"}{"execute":"stop"}')
    hub.client_closed(ro, "closed")
    hub.stats.reconnects += 2
    hub.stats.reloads["error"] += 1
    return hub


def scrape(*sources: Source) -> str:
    text = generate_latest(registry_for(lambda: sources)).decode()
    return "".join(line + "\n" for line in text.splitlines() if "process_" not in line)


def samples(text: str) -> list[Sample]:
    return [
        (s.name, frozenset(s.labels.items()), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


async def http_samples(path: Path) -> list[Sample]:
    head, body = await http_get(path, b"GET /metrics HTTP/1.1\r\nHost: qmpmux\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK"), head
    return samples(body.decode())


def test_one_unnamed_source_is_scraped_exactly_as_before() -> None:
    assert scrape(Source(None, busy_hub(), LISTENERS)) == BEFORE.replace("{VERSION}", __version__)


def test_every_sample_of_each_vm_gets_its_vm_label_in_one_family_per_metric() -> None:
    """Each VM's own scrape (as if alone), its samples given `vm=NAME`, is exactly what
    the VMs' combined scrape holds, besides build_info and qmpmux_vms."""
    hubs = {"web1": busy_hub(), "web2": ready_hub(), "db": Hub()}  # db: QEMU not there yet
    connect(hubs["web2"])
    hubs["web2"].upstream_data(STOP_EVENT)
    hubs["web2"].upstream_data(STOP_EVENT)
    listeners = {"web1": LISTENERS, "web2": (("unix:w2", "full"),), "db": ()}
    sources = [Source(vm, hub, listeners[vm]) for vm, hub in hubs.items()]
    text = scrape(*sources)
    families = [f.name for f in text_string_to_metric_families(text)]
    assert len(families) == len(set(families)), families  # one family per name
    assert [ln for ln in text.splitlines() if ln.startswith("# TYPE qmpmux_vms ")]
    want: Counter[Sample] = Counter()
    for vm, hub in hubs.items():
        alone = scrape(Source(None, hub, listeners[vm]))
        for name, labels, value in samples(alone):
            if name != "qmpmux_build_info":
                want[name, labels | {("vm", vm)}, value] += 1
    got = Counter(samples(text))
    assert got.pop(("qmpmux_build_info", frozenset({("version", __version__)}), 1.0)) == 1
    assert got.pop(("qmpmux_vms", frozenset({("state", "up")}), 2.0)) == 1
    assert got.pop(("qmpmux_vms", frozenset({("state", "down")}), 1.0)) == 1
    assert got == want
    vms = {dict(labels).get("vm") for name, labels, _ in samples(text)}
    assert vms == {None, "web1", "web2", "db"}  # None: build_info and qmpmux_vms only
    assert ("qmpmux_events_total", frozenset({("vm", "web2"), ("event", "STOP")}), 2.0) in want


def test_the_sources_are_read_at_every_scrape() -> None:
    """VMs come and go and a reconnect replaces a hub: each scrape sees the current set;
    no VM at all still says so (qmpmux_vms 0)."""
    current: list[Source] = []
    registry = registry_for(lambda: current)

    def now() -> list[Sample]:
        text = generate_latest(registry).decode()
        return [s for s in samples(text) if s[0].startswith("qmpmux_vms") or "vm" in dict(s[1])]

    assert set(now()) == {
        ("qmpmux_vms", frozenset({("state", "down")}), 0.0),
        ("qmpmux_vms", frozenset({("state", "up")}), 0.0),
    }
    current.append(Source("web1", Hub()))
    up = ("qmpmux_upstream_up", frozenset({("vm", "web1"), ("lane", "0")}))
    assert (*up, 0.0) in now()
    current[0] = Source("web1", ready_hub())
    assert (*up, 1.0) in now()
    assert ("qmpmux_vms", frozenset({("state", "up")}), 1.0) in now()
    current.clear()
    assert all(name == "qmpmux_vms" for name, _, _ in now())


async def test_two_real_vms_scraped_together_are_each_one_labelled(
    qemu: Qemu, tmp_path: Path
) -> None:
    """Two proxies on two real QEMUs, each with its own (single-VM) endpoint, and one
    endpoint over both as host mode builds it: the combined scrape is each VM's own
    scrape with `vm` added, after different traffic through each."""
    (tmp_path / "b").mkdir()
    other = start_qemu(tmp_path / "b")
    dirs = {"web1": tmp_path, "web2": tmp_path / "b"}
    muxes: dict[str, Mux] = {}
    clients: list[RawClient] = []
    combined: MetricsServer | None = None
    try:
        for vm, q in (("web1", qemu), ("web2", other)):
            own = Address("unix", path=str(dirs[vm] / "metrics.sock"))
            muxes[vm] = await start_mux(q, dirs[vm], profiles=("full", "readonly"), metrics=own)

        def sources() -> list[Source]:
            return [
                Source(vm, m.proxy.hub, tuple((str(lst.address), lst.profile)
                                              for lst in m.proxy.config.listeners))
                for vm, m in muxes.items()
            ]  # fmt: skip

        path = tmp_path / "all.sock"
        combined = MetricsServer(
            open_listener(Listener(Address("unix", path=str(path)))), registry_for(sources)
        )
        await combined.start()
        for vm, queries in (("web1", 2), ("web2", 3)):
            c = await RawClient.connect(muxes[vm].sockets["full"])
            await c.negotiate()
            for _ in range(queries):
                assert b'"return"' in await c.command(b'{"execute":"query-status"}')
            ro = await RawClient.connect(muxes[vm].sockets["readonly"])
            await ro.negotiate()
            clients += (c, ro)
            if vm == "web2":
                assert b"refused" in await ro.command(b'{"execute":"stop"}')
        want: Counter[Sample] = Counter()
        for vm in muxes:
            for name, labels, value in await http_samples(dirs[vm] / "metrics.sock"):
                if name.startswith("qmpmux_") and name != "qmpmux_build_info":
                    want[name, labels | {("vm", vm)}, value] += 1
        got = Counter(s for s in await http_samples(path) if s[0].startswith("qmpmux_"))
        assert got.pop(("qmpmux_build_info", frozenset({("version", __version__)}), 1.0)) == 1
        assert got.pop(("qmpmux_vms", frozenset({("state", "up")}), 2.0)) == 1
        assert got.pop(("qmpmux_vms", frozenset({("state", "down")}), 0.0)) == 1
        assert got == want
        status = "qmpmux_commands_total", "query-status", "ok"
        for vm, count in (("web1", 2.0), ("web2", 3.0)):
            labels = frozenset({("vm", vm), ("command", status[1]), ("result", status[2])})
            assert want[status[0], labels, count] == 1
        denied = frozenset({("vm", "web2"), ("profile", "readonly"), ("command", "stop")})
        assert want["qmpmux_denials_total", denied, 1.0] == 1
    finally:
        for c in clients:
            await c.close()
        if combined is not None:
            combined.close()
        for m in muxes.values():
            m.proxy.stop("test over")
            await asyncio.wait_for(m.proxy.wait(), 10)
        other.stop()
