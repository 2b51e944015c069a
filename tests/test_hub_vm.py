"""A hub that serves a named VM (one of several in a process) names it in every audit
record; without a name the records are as they always were (README "Running it",
`--audit`)."""

from __future__ import annotations

import pytest

from qmpmux.hub import Audit, Hub, ToClient, ToUpstream, UpstreamReady
from qmpmux.session import Peer
from tests.playbook import CAPS_OK, CAPS_OOB, GREETING_OOB, VERSION, expect

WALLCLOCK = 1767323045.678  # 2026-01-02T03:04:05.678Z
DENIED = (
    b'{"id": 2, "error": {"class": "CommandNotFound", '
    b'"desc": "The command quit has been refused by qmpmux policy"}}\r\n'
)


def audited_hub(vm: str | None) -> Hub:
    hub = Hub(audit=True, vm=vm, clock=lambda: 10.0, wallclock=lambda: WALLCLOCK)
    expect(hub.upstream_data(GREETING_OOB), [ToUpstream(CAPS_OOB)])
    expect(hub.upstream_data(CAPS_OK), [UpstreamReady(VERSION, True)])
    return hub


def record(vm: str | None, client: int, profile: str, rest: bytes) -> bytes:
    member = b"" if vm is None else b'"vm":"' + vm.encode() + b'",'
    return (
        b'{"time":"2026-01-02T03:04:05.678Z",' + member
        + b'"client":%d,"listener":"unix:test","uid":null,"gid":null,"pid":null,' % client
        + b'"profile":"' + profile.encode() + b'",' + rest + b"}\n"
    )  # fmt: skip


@pytest.mark.parametrize("vm", [None, "web1"])
def test_every_audit_record_names_the_vm_of_its_hub(vm: str | None) -> None:
    hub = audited_hub(vm)
    full, _ = hub.client_connected(Peer("unix:test"))
    expect(hub.client_data(full, b'{"execute":"qmp_capabilities"}'),
           [ToClient(full, b'{"return": {}}\r\n')])  # fmt: skip
    expect(
        hub.client_data(full, b'{"execute":"query-status","id":1}'),
        [ToUpstream(b'{"execute":"query-status"}')],
    )
    ok = b'"command":"query-status","decision":"allowed","result":"ok","latency_ms":0.0'
    expect(
        hub.upstream_data(b'{"return": {}}\r\n'),
        [Audit(record(vm, full, "full", ok)), ToClient(full, b'{"return": {}, "id": 1}\r\n')],
    )
    ro, _ = hub.client_connected(Peer("unix:test", "readonly"))
    hub.client_data(ro, b'{"execute":"qmp_capabilities"}')
    denied = b'"command":"quit","decision":"denied","result":"CommandNotFound","latency_ms":0.0'
    expect(
        hub.client_data(ro, b'{"execute":"quit","id":2}'),
        [Audit(record(vm, ro, "readonly", denied)), ToClient(ro, DENIED)],
    )


@pytest.mark.parametrize("read", [1 << 21, 1 << 16], ids=["whole", "in-reads"])
def test_a_megabyte_command_name_is_recorded_cut_and_logged_cut(
    caplog: pytest.LogCaptureFixture, read: int
) -> None:
    """No command name is that long: the record keeps 256 characters and the length,
    the denial log line 80 (formatting all of it held the loop ~13 ms for 4 MiB), whether
    the name came in one read or in many (then it is kept in parts, qjson.LongString)."""
    hub = audited_hub(None)
    ro, _ = hub.client_connected(Peer("unix:test", "readonly"))
    hub.client_data(ro, b'{"execute":"qmp_capabilities"}')
    name = "x" * (1 << 20)
    data = b'{"execute":"' + name.encode() + b'"}'
    with caplog.at_level("WARNING", logger="qmpmux.client"):
        actions = [
            a for at in range(0, len(data), read) for a in hub.client_data(ro, data[at : at + read])
        ]
    (audit, _) = actions
    assert isinstance(audit, Audit)
    assert b'"command":"' + b"x" * 256 + b'","decision":"denied"' in audit.record
    assert audit.record.endswith(b',"command_chars":1048576}\n') and len(audit.record) < 1000
    (line,) = [r.getMessage() for r in caplog.records if "denied" in r.getMessage()]
    assert "'" + "x" * 80 + "'" in line and len(line) < 200
