"""Playbook helpers: drive the sans-IO hub with exact inputs and compare exact actions."""

from __future__ import annotations

from collections.abc import Sequence

from qmpmux.config import Limits
from qmpmux.hub import Action, Hub, ToClient, ToUpstream, UpstreamReady
from qmpmux.session import Peer
from qmpmux.spelled import Spelled
from qmpmux.wire import Reply

VERSION = b'{"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "test"}'
GREETING_OOB = b'{"QMP": {"version": ' + VERSION + b', "capabilities": ["oob"]}}\r\n'
GREETING_PLAIN = b'{"QMP": {"version": ' + VERSION + b', "capabilities": []}}\r\n'
CAPS_OOB = b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]},"id":"qmpmux"}'
CAPS_PLAIN = b'{"execute":"qmp_capabilities","id":"qmpmux"}'
CAPS_OK = b'{"return": {}, "id": "qmpmux"}\r\n'
STOP_EVENT = b'{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}\r\n'


def spelled_out(data: Reply) -> bytes:
    """A reply's bytes, made at once if qmpmux makes it a piece at a time or keeps it in
    parts."""
    return data.spell() if isinstance(data, Spelled) else bytes(data)


def expect(got: Sequence[Action], want: Sequence[Action]) -> None:
    """Assert the exact action sequence, with a readable diff on mismatch."""
    if list(got) != list(want):
        lines = ["actions differ:", "  got:"]
        lines += [f"    {a!r}" for a in got]
        lines.append("  want:")
        lines += [f"    {a!r}" for a in want]
        raise AssertionError("\n".join(lines))


def ready_hub(oob: bool = True, limits: Limits | None = None) -> Hub:
    """A hub whose upstream handshake is done."""
    hub = Hub(limits)
    expect(
        hub.upstream_data(GREETING_OOB if oob else GREETING_PLAIN),
        [ToUpstream(CAPS_OOB if oob else CAPS_PLAIN)],
    )
    expect(hub.upstream_data(CAPS_OK), [UpstreamReady(VERSION, oob)])
    return hub


def connect(hub: Hub, negotiate: bool = True, oob: bool = False) -> int:
    """Connect a client; optionally negotiate (with oob) and check the exact replies."""
    cid, actions = hub.client_connected(Peer("unix:test"))
    assert cid
    caps = b'["oob"]' if hub.oob else b"[]"
    expect(
        actions,
        [
            ToClient(
                cid, b'{"QMP": {"version": ' + VERSION + b', "capabilities": ' + caps + b"}}\r\n"
            )
        ],
    )
    if negotiate:
        args = b',"arguments":{"enable":["oob"]}' if oob else b""
        got = hub.client_data(cid, b'{"execute":"qmp_capabilities"' + args + b"}")
        expect(got, [ToClient(cid, b'{"return": {}}\r\n')])
    return cid
