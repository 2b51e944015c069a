"""The README's metrics table and the Grafana dashboard name only metrics qmpmux serves,
and the table lists every one of them."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from qmpmux.exporter import Source, registry_for
from qmpmux.host import VmFilesCollector
from qmpmux.hub import Hub
from qmpmux.session import Peer
from tests.playbook import STOP_EVENT, connect, ready_hub

ROOT = Path(__file__).resolve().parent.parent
NAME = re.compile(r"\b(qmpmux_[a-z_]+|process_[a-z_]+)")


def served() -> set[str]:
    """Every sample name a scrape shows after a command, an event and a denial."""
    hub = ready_hub()
    cid = connect(hub)
    hub.client_data(cid, b'{"execute":"query-status"}')
    hub.upstream_data(b'{"return": {}, "id": 0}\r\n')
    hub.upstream_data(STOP_EVENT)
    ro, _ = hub.client_connected(Peer("unix:test", "readonly"))
    hub.client_data(ro, b'{"execute":"qmp_capabilities"}{"execute":"quit"}')
    listeners = (("unix:test", "full"),)
    names = set()
    # One unnamed VM, and VMs with names (which adds qmpmux_vms).
    for sources in ([Source(None, hub, listeners)], [Source("a", hub), Source("b", Hub())]):
        registry = registry_for(lambda: sources)  # noqa: B023 (read at once)
        if sources[0].vm is not None:  # host mode counts its VM files too
            registry.register(VmFilesCollector(lambda: ["up", "refused"]))
        text = generate_latest(registry).decode()
        names |= {s.name for family in text_string_to_metric_families(text) for s in family.samples}
    return names


def test_the_dashboard_queries_only_served_metrics() -> None:
    dashboard = json.loads((ROOT / "docs" / "grafana-qmpmux.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for expr in exprs for name in NAME.findall(expr)}
    assert {"qmpmux_commands_total", "qmpmux_command_duration_seconds_bucket"} <= used
    assert not used - served(), used - served()


def test_the_readme_table_lists_every_metric() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    rows = {m for m in re.findall(r"^\| `([a-z_]+)`", section, re.M)}
    ours = {re.sub(r"_(bucket|sum|count)$", "", n) for n in served() if n.startswith("qmpmux_")}
    assert "qmpmux_command_duration_seconds" in ours
    assert ours == {r for r in rows if r.startswith("qmpmux_")}
