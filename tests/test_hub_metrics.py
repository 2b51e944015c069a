"""What the sans-IO hub counts for metrics: bounded labels, round trips, reasons."""

from __future__ import annotations

import msgspec

from qmpmux.hub import CloseClient, Hub, ToClient, ToUpstream, UpstreamReady
from qmpmux.metrics import DURATION_BUCKETS, NAMES_MAX, OK_AT, OTHER
from qmpmux.session import Peer
from tests.playbook import (
    CAPS_OK,
    CAPS_OOB,
    GREETING_OOB,
    VERSION,
    connect,
    expect,
    ready_hub,
    spelled_out,
)

QUERY_COMMANDS = b'{"execute":"query-commands"}'


def learning_hub(names: list[str], clock: list[float] | None = None) -> Hub:
    """A ready hub that asked QEMU for its commands and got `names`."""
    now = clock or [0.0]
    hub = Hub(metrics=True, clock=lambda: now[0])
    expect(hub.upstream_data(GREETING_OOB), [ToUpstream(CAPS_OOB)])
    expect(
        hub.upstream_data(CAPS_OK),
        [UpstreamReady(VERSION, True), ToUpstream(QUERY_COMMANDS)],
    )
    listing = msgspec.json.encode({"return": [{"name": n} for n in names]})
    expect(hub.upstream_data(listing + b"\r\n"), [])  # qmpmux's own: nobody is answered
    return hub


def test_command_labels_are_what_qemu_advertised_and_the_rest_fold() -> None:
    hub = learning_hub(["query-status", "stop"])
    cid = connect(hub)
    for name in (b"query-status", b"made-up-name"):
        got = hub.client_data(cid, b'{"execute":"' + name + b'"}')
        expect(got, [ToUpstream(b'{"execute":"' + name + b'"}')])
        hub.upstream_data(b'{"return": {}}\r\n')
    rows = hub.stats.commands
    assert rows["query-status"][OK_AT] == 1
    assert rows[OTHER][OK_AT] == 1
    assert "made-up-name" not in rows


def test_labels_are_capped_whatever_qemu_advertises() -> None:
    hub = learning_hub([f"cmd-{i}" for i in range(NAMES_MAX * 2)])
    assert len(hub.stats.commands) <= NAMES_MAX + 1


def test_without_learning_no_extra_command_goes_upstream() -> None:
    hub = ready_hub()  # expects the exact handshake: nothing more than before
    assert set(hub.stats.commands) == {OTHER, "__org.qmpmux_whoami", "__org.qmpmux_list-clients"}


def test_round_trip_is_measured_from_sending_to_the_reply() -> None:
    now = [100.0]
    hub = learning_hub(["query-status"], now)
    cid = connect(hub)
    hub.client_data(cid, b'{"execute":"query-status"}')
    now[0] += 0.003
    hub.upstream_data(b'{"return": {}}\r\n')
    hist = hub.stats.hist
    at = next(i for i, bound in enumerate(DURATION_BUCKETS) if bound >= 0.003)
    assert hist[at] == 1 and sum(hist[:-1]) == 1
    assert abs(hist[-1] - 0.003) < 1e-9


def test_a_reply_that_is_not_plainly_a_success_is_an_error() -> None:
    hub = learning_hub(["query-status"])
    cid = connect(hub)
    hub.client_data(cid, b'{"execute":"query-status"}')
    hub.upstream_data(b'{"error": {"class": "GenericError", "desc": "x"}}\r\n')
    assert hub.stats.commands["query-status"] == [0, 1, 0]


def test_the_hubs_own_close_reason_wins() -> None:
    hub = ready_hub()
    cid, _ = hub.client_connected(Peer("unix:test"))
    expect(
        hub.negotiation_deadline(cid),
        [CloseClient(cid, "did not negotiate within 30 s")],
    )
    hub.client_closed(cid, "closed")  # the shell saw a plain close
    assert hub.stats.disconnects["negotiation_timeout"] == 1
    assert hub.stats.disconnects["closed"] == 0


def test_events_count_once_and_per_client() -> None:
    hub = ready_hub()
    a, b = connect(hub), connect(hub)
    event = b'{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}\r\n'
    hub.upstream_data(event)
    assert hub.stats.events == {"STOP": 1}
    assert [hub.clients[c].events for c in (a, b)] == [1, 1]


def test_denials_count_by_profile_and_client() -> None:
    hub = ready_hub()
    cid, _ = hub.client_connected(Peer("unix:test", "readonly"))
    hub.client_data(cid, b'{"execute":"qmp_capabilities"}')
    got = hub.client_data(cid, b'{"execute":"quit"}')
    assert len(got) == 1 and isinstance(got[0], ToClient) and b"refused" in spelled_out(got[0].data)
    assert hub.stats.denials == {("readonly", OTHER): 1}  # quit was never advertised here
    assert hub.clients[cid].denials == 1
