"""Playbook tests of the sans-IO hub: exact inputs, exact actions, no sockets."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import msgspec
import pytest

from qmpmux import scrub, views
from qmpmux.config import Limits
from qmpmux.hub import (
    Audit,
    Broadcast,
    CloseClient,
    Exit,
    Hub,
    PauseClient,
    ResumeClient,
    ToClient,
    ToUpstream,
    UpstreamReady,
)
from qmpmux.policy import ProfileSpec, compile_policy
from qmpmux.session import Peer
from tests.playbook import (
    CAPS_OK,
    CAPS_OOB,
    GREETING_OOB,
    STOP_EVENT,
    VERSION,
    connect,
    expect,
    ready_hub,
    spelled_out,
)

STATUS = b'{"status": "running", "singlestep": false, "running": true}'


def test_upstream_handshake_negotiates_oob_and_reports_ready() -> None:
    hub = Hub()
    expect(hub.upstream_data(GREETING_OOB[:10]), [])
    expect(hub.upstream_data(GREETING_OOB[10:]), [ToUpstream(CAPS_OOB)])
    expect(hub.upstream_data(CAPS_OK), [UpstreamReady(VERSION, True)])


def test_events_before_the_greeting_or_during_negotiation_are_skipped() -> None:
    """QEMU may write an event to a connection made as it starts before greeting it
    (docs/protocol.md §4); it belongs to no client and ends nothing."""
    hub = Hub()
    expect(hub.upstream_data(STOP_EVENT + GREETING_OOB), [ToUpstream(CAPS_OOB)])
    expect(hub.upstream_data(STOP_EVENT), [])
    expect(hub.upstream_data(CAPS_OK), [UpstreamReady(VERSION, True)])


def test_upstream_without_oob_offers_none_to_clients() -> None:
    hub = ready_hub(oob=False)
    cid = connect(hub, negotiate=False)
    expect(
        hub.client_data(
            cid, b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]},"id":1}'
        ),
        [
            ToClient(
                cid,
                b'{"id": 1, "error": {"class": "GenericError", '
                b'"desc": "Capability oob not available"}}\r\n',
            )
        ],
    )


def test_a_reply_from_an_earlier_connection_is_not_taken_for_the_handshake() -> None:
    """A command of an earlier connection still running in QEMU answers on the new one,
    before qmp_capabilities: taken for its reply, the real one would answer a client."""
    hub = Hub()
    hub.upstream_data(GREETING_OOB)
    expect(hub.upstream_data(b'{"return": {"status": "running"}}\r\n'), [])
    expect(hub.upstream_data(CAPS_OK), [UpstreamReady(VERSION, True)])
    cid = connect(hub)
    hub.client_data(cid, b'{"execute":"query-name","id":1}')
    expect(
        hub.upstream_data(b'{"return": {"name": "vm"}}\r\n'),
        [ToClient(cid, b'{"return": {"name": "vm"}, "id": 1}\r\n')],
    )


def test_upstream_refusing_capabilities_ends_the_session() -> None:
    hub = Hub()
    hub.upstream_data(GREETING_OOB)
    err = b'{"id": "qmpmux", "error": {"class": "GenericError", "desc": "nope"}}\r\n'
    expect(hub.upstream_data(err), [Exit(1, "QEMU refused qmp_capabilities: GenericError: nope")])


def test_no_client_is_accepted_before_the_upstream_is_ready() -> None:
    hub = Hub()
    assert hub.client_connected(Peer("unix:x")) == (0, [])


def test_negotiation_mode_replies_exactly_like_qemu() -> None:
    hub = ready_hub()
    cid = connect(hub, negotiate=False)
    expect(
        hub.client_data(cid, b'{"execute":"query-status","id":1}'),
        [
            ToClient(
                cid,
                b'{"id": 1, "error": {"class": "CommandNotFound", "desc": '
                b"\"Expecting capabilities negotiation with 'qmp_capabilities'\"}}\r\n",
            )
        ],
    )
    expect(
        hub.client_data(
            cid, b'{"execute":"qmp_capabilities","arguments":{"enable":["foo"]},"id":6}'
        ),
        [
            ToClient(
                cid,
                b'{"id": 6, "error": {"class": "GenericError", '
                b"\"desc\": \"Parameter 'null' does not accept value 'foo'\"}}\r\n",
            )
        ],
    )
    expect(
        hub.client_data(cid, b'{"execute":"qmp_capabilities","id":"c"}'),
        [ToClient(cid, b'{"return": {}, "id": "c"}\r\n')],
    )
    expect(
        hub.client_data(cid, b'{"execute":"qmp_capabilities","id":"again"}'),
        [
            ToClient(
                cid,
                b'{"id": "again", "error": {"class": "CommandNotFound", "desc": '
                b'"Capabilities negotiation is already complete, command ignored"}}\r\n',
            )
        ],
    )


def test_reply_gets_the_client_id_back_and_a_small_command_goes_without_one() -> None:
    hub = ready_hub()
    cid = connect(hub)
    expect(
        hub.client_data(cid, b'{"execute":"query-status","id":{"deep":[1,2.0]}}'),
        [ToUpstream(b'{"execute":"query-status"}')],
    )
    expect(
        hub.upstream_data(b'{"return": ' + STATUS + b"}\r\n"),
        [ToClient(cid, b'{"return": ' + STATUS + b', "id": {"deep": [1, 2]}}\r\n')],
    )


def test_small_in_band_commands_go_without_an_id_unless_a_big_one_is_ahead() -> None:
    """QEMU answers a monitor's in-band input in order (docs/protocol.md §7.2): replies
    to commands sent without an id are told apart by place. A big command goes as the
    client's own text, which QEMU might fail to parse, with errors that carry no id, so
    it goes with an id, and so does everything behind it until it is answered."""
    hub = ready_hub(limits=Limits(client_window=8))
    a, b = connect(hub), connect(hub)
    expect(hub.client_data(a, b'{"execute":"stop","id":"s"}'), [ToUpstream(b'{"execute":"stop"}')])
    big = b'{"execute":"query-name","arguments":{"x":"%s"},"id":"big"}' % (b"y" * 100_000)
    (sent,) = hub.client_data(a, big)
    assert isinstance(sent, ToUpstream) and bytes(sent.data).endswith(b',"id":0}')
    expect(
        hub.client_data(b, b'{"execute":"cont","id":"c"}'),
        [ToUpstream(b'{"execute":"cont","id":1}')],
    )
    expect(
        hub.upstream_data(b'{"return": {}}\r\n'), [ToClient(a, b'{"return": {}, "id": "s"}\r\n')]
    )
    expect(
        hub.upstream_data(b'{"return": {}, "id": 0}\r\n'),
        [ToClient(a, b'{"return": {}, "id": "big"}\r\n')],
    )
    # A small command with an id is still in QEMU: it holds nothing back.
    expect(
        hub.client_data(b, b'{"execute":"query-uuid","id":"u"}'),
        [ToUpstream(b'{"execute":"query-uuid"}')],
    )
    expect(
        hub.upstream_data(b'{"return": {}, "id": 1}\r\n{"return": {"uuid": "u"}}\r\n'),
        [
            ToClient(b, b'{"return": {}, "id": "c"}\r\n'),
            ToClient(b, b'{"return": {"uuid": "u"}, "id": "u"}\r\n'),
        ],
    )
    expect(
        hub.client_data(b, b'{"execute":"query-uuid","id":"v"}'),
        [ToUpstream(b'{"execute":"query-uuid"}')],
    )
    expect(
        hub.upstream_data(b'{"id": 7, "error": {"class": "GenericError", "desc": "x"}}\r\n'),
        [],  # an id qmpmux did not issue: nobody's reply, the id-less command still waits
    )
    expect(
        hub.upstream_data(b'{"error": {"class": "GenericError", "desc": "x"}}\r\n'),
        [ToClient(b, b'{"id": "v", "error": {"class": "GenericError", "desc": "x"}}\r\n')],
    )


def test_a_big_exec_oob_holds_back_commands_without_an_id_too() -> None:
    """QEMU's errors for text it cannot parse carry no id and take an in-band place, from
    either lane: nothing without an id goes behind a big exec-oob until it is answered."""
    hub = ready_hub()
    a, b = connect(hub, oob=True), connect(hub)
    big = b'{"exec-oob":"query-yank","arguments":{"x":"%s"},"id":"o"}' % (b"y" * 5000)
    (sent,) = hub.client_data(a, big)
    assert isinstance(sent, ToUpstream) and bytes(sent.data).endswith(b',"id":0}')
    expect(
        hub.client_data(b, b'{"execute":"query-status","id":"b"}'),
        [ToUpstream(b'{"execute":"query-status","id":1}')],
    )
    error = b'{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}'
    expect(hub.upstream_data(error + b"\r\n"), [])  # nobody's: logged
    expect(
        hub.upstream_data(b'{"return": {}, "id": 1}\r\n'),
        [ToClient(b, b'{"return": {}, "id": "b"}\r\n')],
    )


def test_replies_with_qemus_non_finite_numbers_keep_their_places() -> None:
    """QEMU prints a non-finite double as `inf` or `nan` (docs/protocol.md §3.3): such a
    reply is its command's, as QEMU wrote it; one that cannot be read at all is answered
    with an error in its place, so the replies after it still go to their commands."""
    hub = ready_hub()
    a, b, c = connect(hub), connect(hub), connect(hub)
    hub.client_data(a, b'{"execute":"query-migrate","id":"a"}')
    hub.client_data(b, b'{"execute":"query-status","id":"b"}')
    expect(
        hub.upstream_data(b'{"return": {"ram": {"mbps": inf}, "s": "nan"}}\r\n'),
        [ToClient(a, b'{"return": {"ram": {"mbps": inf}, "s": "nan"}, "id": "a"}\r\n')],
    )
    hub.client_data(c, b'{"execute":"query-name","id":"c"}')
    expect(
        hub.upstream_data(b'{"return": {"status": broken}}\r\n'),
        [
            ToClient(
                b,
                b'{"id": "b", "error": {"class": "GenericError", '
                b'"desc": "qmpmux could not read QEMU\'s reply"}}\r\n',
            )
        ],
    )
    expect(
        hub.upstream_data(b'{"return": {}}\r\n'), [ToClient(c, b'{"return": {}, "id": "c"}\r\n')]
    )


def test_non_finite_numbers_never_cost_a_reply_its_data_or_the_session() -> None:
    """A reply with QEMU's `inf` is reread by a downstream member's placement, a profile's
    stripping and the audit's error class: each copes, and nothing ends the session."""
    hub = ready_hub()
    hub.audit = True
    a = connect(hub)
    hub.client_data(a, b'{"execute":"query-migrate","id":"a"}')
    out = hub.upstream_data(b'{"return": {"mbps": inf, "node": "__x"}}\r\n')
    assert ToClient(a, b'{"return": {"mbps": inf, "node": "__x"}, "id": "a"}\r\n') in out
    (audit,) = [x for x in out if isinstance(x, Audit)]
    assert msgspec.json.decode(audit.record)["result"] == "ok"
    policy = compile_policy({"plain": ProfileSpec(base="full", strip_extensions=True)})
    hub.reload(policy)
    b, _ = hub.client_connected(Peer("unix:t", profile="plain"))
    hub.client_data(b, b'{"execute":"qmp_capabilities"}')
    event = (
        b'{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "X", '
        b'"data": {"__com.example_r": inf}}\r\n'
    )
    # The stripping profile cannot be given it without the member: it is not given it.
    assert hub.upstream_data(event) == [Broadcast(event, [a])]
    hub.client_data(b, b'{"execute":"query-migrate","id":"b"}')
    out = hub.upstream_data(b'{"return": {"mbps": nan, "__com.example_x": 1}}\r\n')
    assert (
        ToClient(
            b,
            b'{"id": "b", "error": {"class": "GenericError", '
            b'"desc": "qmpmux could not read QEMU\'s reply"}}\r\n',
        )
        in out
    )
    assert not any(isinstance(x, Exit) for x in out)


def test_an_unreadable_reply_is_answered_in_its_place_by_its_id_or_its_place() -> None:
    hub = ready_hub()
    a, b = connect(hub), connect(hub, oob=True)
    hub.client_data(a, b'{"execute":"query-status","id":"a"}')  # without an id upstream
    hub.client_data(b, b'{"exec-oob":"query-yank","id":"b"}')  # with id 0
    unreadable = b'{"id": "b", "error": {"class": "GenericError", "desc": "%s"}}\r\n'
    expect(
        hub.upstream_data(b'{"return": [bogus], "id": 0}\r\n'),
        [ToClient(b, unreadable.replace(b"%s", b"qmpmux could not read QEMU's reply"))],
    )
    expect(
        hub.upstream_data(b'{"return": {}}\r\n'), [ToClient(a, b'{"return": {}, "id": "a"}\r\n')]
    )
    expect(hub.upstream_data(b'{"return": {}, "id": null}\r\n'), [])  # not an id of ours


@pytest.mark.parametrize(
    ("client_id", "echoed"),
    [
        (b"", b""),
        (b',"id":null', b', "id": null'),
        (b',"id":"x"', b', "id": "x"'),
        (b',"id":1.0', b', "id": 1'),
        (b',"id":[]', b', "id": []'),
    ],
)
def test_id_absent_stays_absent_and_null_stays_null(client_id: bytes, echoed: bytes) -> None:
    hub = ready_hub()
    cid = connect(hub)
    hub.client_data(cid, b'{"execute":"stop"' + client_id + b"}")
    expect(
        hub.upstream_data(b'{"return": {}}\r\n'),
        [ToClient(cid, b'{"return": {}' + echoed + b"}\r\n")],
    )
    hub.client_data(cid, b'{"execute":"nope"' + client_id + b"}")
    err = b'"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}'
    want = b"{" + echoed[2:] + b", " + err if echoed else b"{" + err
    expect(hub.upstream_data(b"{" + err + b"\r\n"), [ToClient(cid, want + b"\r\n")])


def test_colliding_client_ids_are_routed_to_their_owners() -> None:
    hub = ready_hub()
    a, b = connect(hub), connect(hub)
    hub.client_data(a, b'{"execute":"query-name","id":1}')
    hub.client_data(b, b'{"execute":"query-uuid","id":1}')
    expect(
        hub.upstream_data(b'{"return": {"name": "a"}}\r\n{"return": {}}\r\n'),
        [
            ToClient(a, b'{"return": {"name": "a"}, "id": 1}\r\n'),
            ToClient(b, b'{"return": {}, "id": 1}\r\n'),
        ],
    )


def test_local_errors_wait_behind_the_clients_pending_commands() -> None:
    hub = ready_hub()
    cid = connect(hub)
    expect(
        hub.client_data(cid, b'{"execute":"stop","id":1}{"execute":5,"id":2}[3]'),
        [ToUpstream(b'{"execute":"stop"}')],
    )
    expect(
        hub.upstream_data(STOP_EVENT + b'{"return": {}}\r\n'),
        [
            Broadcast(STOP_EVENT, [cid]),
            ToClient(cid, b'{"return": {}, "id": 1}\r\n'),
            ToClient(
                cid,
                b'{"id": 2, "error": {"class": "GenericError", '
                b'"desc": "QMP input member \'execute\' must be a string"}}\r\n',
            ),
            ToClient(
                cid,
                b'{"error": {"class": "GenericError", '
                b'"desc": "QMP input must be a JSON object"}}\r\n',
            ),
        ],
    )


def test_exec_oob_goes_straight_up_and_its_reply_overtakes() -> None:
    hub = ready_hub()
    cid = connect(hub, oob=True)
    expect(
        hub.client_data(
            cid,
            b'{"execute":"stop","id":"ib"}{"exec-oob":"yank","arguments":{"instances":[]},"id":"o"}',
        ),
        [ToUpstream(b'{"exec-oob":"yank","arguments":{"instances":[]},"id":0}{"execute":"stop"}')],
    )
    expect(
        hub.upstream_data(b'{"return": {}, "id": 0}\r\n'),
        [ToClient(cid, b'{"return": {}, "id": "o"}\r\n')],
    )


def test_exec_oob_without_oob_enabled_is_refused_in_order() -> None:
    hub = ready_hub()
    cid = connect(hub)  # negotiated without oob: QEMU reads it one command at a time
    hub.client_data(cid, b'{"execute":"stop","id":1}')
    expect(hub.client_data(cid, b'{"exec-oob":"yank","id":2}'), [])
    expect(
        hub.upstream_data(b'{"return": {}}\r\n'),
        [
            ToClient(cid, b'{"return": {}, "id": 1}\r\n'),
            ToClient(
                cid,
                b'{"id": 2, "error": {"class": "GenericError", '
                b'"desc": "QMP input member \'exec-oob\' is unexpected"}}\r\n',
            ),
        ],
    )


def test_oob_stream_keeps_its_own_order() -> None:
    hub = ready_hub()
    cid = connect(hub, oob=True)
    hub.client_data(
        cid, b'{"exec-oob":"query-yank","id":"y"}{"exec-oob":"qmp_capabilities","id":7}'
    )
    expect(
        hub.upstream_data(b'{"return": [], "id": 0}\r\n'),
        [
            ToClient(cid, b'{"return": [], "id": "y"}\r\n'),
            ToClient(
                cid,
                b'{"id": 7, "error": {"class": "GenericError", '
                b'"desc": "The command qmp_capabilities does not support OOB"}}\r\n',
            ),
        ],
    )


def test_upstream_window_holds_at_most_eight_in_band_commands() -> None:
    hub = ready_hub(limits=Limits(client_window=8))
    cid = connect(hub)
    actions = hub.client_data(cid, b"".join(b'{"execute":"stop","id":%d}' % i for i in range(10)))
    expect(actions, [ToUpstream(b'{"execute":"stop"}' * 8)])
    expect(
        hub.upstream_data(b'{"return": {}}\r\n'),
        [ToClient(cid, b'{"return": {}, "id": 0}\r\n'), ToUpstream(b'{"execute":"stop"}')],
    )


def test_clients_are_served_round_robin() -> None:
    hub = ready_hub(limits=Limits(upstream_window=1))
    a, b = connect(hub), connect(hub)
    hub.client_data(a, b"".join(b'{"execute":"query-name","id":"a%d"}' % i for i in range(1, 4)))
    hub.client_data(b, b'{"execute":"query-uuid","id":"b1"}')
    order = []
    for _ in range(3):
        (up,) = [x for x in hub.upstream_data(b'{"return": {}}\r\n') if isinstance(x, ToUpstream)]
        order.append(up.data)
    # a1 went first; a was already back in line for a2 when b joined; then b before a3.
    assert order == [
        b'{"execute":"query-name"}',
        b'{"execute":"query-uuid"}',
        b'{"execute":"query-name"}',
    ]
    assert hub.upstream_data(b'{"return": {}}\r\n') == [
        ToClient(a, b'{"return": {}, "id": "a3"}\r\n')
    ]


def test_events_reach_negotiated_clients_as_the_same_bytes() -> None:
    hub = ready_hub()
    a, b = connect(hub), connect(hub)
    connect(hub, negotiate=False)
    (action,) = hub.upstream_data(STOP_EVENT)
    assert action == Broadcast(STOP_EVENT, [a, b])


def test_reply_for_a_departed_client_goes_to_nobody(caplog: pytest.LogCaptureFixture) -> None:
    hub = ready_hub()
    a, b = connect(hub), connect(hub)
    hub.client_data(a, b'{"execute":"stop","id":1}')
    expect(hub.client_closed(a), [])
    expect(hub.upstream_data(b'{"return": {}}\r\n'), [])
    hub.client_data(b, b'{"execute":"cont","id":1}')  # id 0 is free again
    expect(
        hub.upstream_data(b'{"return": {}}\r\n'),
        [ToClient(b, b'{"return": {}, "id": 1}\r\n')],
    )


def test_queued_commands_of_a_departed_client_are_never_sent() -> None:
    hub = ready_hub(limits=Limits(upstream_window=1))
    a, b = connect(hub), connect(hub)
    hub.client_data(a, b'{"execute":"query-name"}{"execute":"stop"}')
    hub.client_closed(a)
    hub.client_data(b, b'{"execute":"cont"}')
    expect(
        hub.upstream_data(b'{"return": {}}\r\n'),
        [ToUpstream(b'{"execute":"cont"}')],
    )


def test_unknown_ids_and_idless_errors_are_logged_and_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hub = ready_hub()
    connect(hub)
    with caplog.at_level(logging.WARNING):
        expect(hub.upstream_data(b'{"return": {}}\r\n'), [])
        expect(hub.upstream_data(b'{"return": {}, "id": "__qmp#1"}\r\n'), [])
        expect(hub.upstream_data(b'{"error": {"class": "GenericError", "desc": "x"}}\r\n'), [])
        expect(hub.upstream_data(b"garbage\r\n"), [])
    text = caplog.text
    assert "did not issue" in text and "without id" in text and "malformed" in text


def test_upstream_loss_closes_every_client_and_exits_nonzero() -> None:
    hub = ready_hub()
    a, b = connect(hub), connect(hub)
    hub.client_data(a, b'{"execute":"stop","id":1}')
    reason = "QEMU closed the monitor connection"
    expect(hub.upstream_closed(), [CloseClient(a, reason), CloseClient(b, reason), Exit(1, reason)])


def test_upstream_loss_after_shutdown_is_clean() -> None:
    hub = ready_hub()
    a = connect(hub)
    shutdown = (
        b'{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "SHUTDOWN", "data": {}}\r\n'
    )
    hub.upstream_data(shutdown)
    expect(hub.upstream_closed(), [CloseClient(a, "QEMU shut down"), Exit(0, "QEMU shut down")])


def test_a_client_flooding_commands_is_paused_then_resumed() -> None:
    hub = ready_hub(limits=Limits(max_pending=4, upstream_window=8))
    cid = connect(hub)
    actions = hub.client_data(cid, b'{"execute":"stop"}' * 4)
    assert PauseClient(cid) in actions
    hub.upstream_data(b'{"return": {}}\r\n')
    actions = hub.upstream_data(b'{"return": {}}\r\n')
    assert ResumeClient(cid) in actions


def test_half_closed_client_gets_its_replies_then_is_closed() -> None:
    hub = ready_hub()
    cid = connect(hub)
    hub.client_data(cid, b'{"execute":"stop","id":1}')
    expect(hub.client_eof(cid), [])
    expect(
        hub.upstream_data(b'{"return": {}}\r\n'),
        [
            ToClient(cid, b'{"return": {}, "id": 1}\r\n'),
            CloseClient(cid, "client finished sending"),
        ],
    )


def test_pretty_upstream_output_is_compacted() -> None:
    hub = ready_hub()
    cid = connect(hub)
    hub.client_data(cid, b'{"execute":"query-status","id":"p"}')
    pretty = (
        b'{\r\n    "return": {\r\n        "status": "running",\r\n        "running": true'
        b"\r\n    }\r\n}\r\n"
    )
    expect(
        hub.upstream_data(pretty),
        [ToClient(cid, b'{"return": {"status": "running", "running": true}, "id": "p"}\r\n')],
    )


def test_core_modules_do_no_io() -> None:
    """The protocol core is sans-IO: it never imports asyncio, socket or the shell."""
    core = [
        "qjson",
        "wire",
        "ids",
        "session",
        "hub",
        "policy",
        "introspect",
        "redact",
        "scrub",
        "config",
        "fdargs",
        "throttle",
    ]
    banned = {"asyncio", "socket", "selectors", "uvloop", "qmpmux.server", "qmpmux.channel"}
    root = Path(__file__).resolve().parent.parent / "qmpmux"
    for name in core:
        tree = ast.parse((root / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                mods = {node.module or ""}
            else:
                continue
            assert not mods & banned, f"{name}.py imports {mods & banned}"


def test_a_client_gets_at_most_its_share_of_the_window() -> None:
    hub = ready_hub(limits=Limits(upstream_window=8, client_window=2))
    a, b = connect(hub), connect(hub)
    expect(
        hub.client_data(a, b'{"execute":"query-name"}' * 5),
        [ToUpstream(b'{"execute":"query-name"}{"execute":"query-name"}')],
    )
    expect(hub.client_data(b, b'{"execute":"query-uuid"}'),
           [ToUpstream(b'{"execute":"query-uuid"}')])  # fmt: skip
    expect(
        hub.upstream_data(b'{"return": {}}\r\n'),
        [ToClient(a, b'{"return": {}}\r\n'), ToUpstream(b'{"execute":"query-name"}')],
    )


def test_out_of_band_commands_are_windowed_and_keep_their_lead() -> None:
    hub = ready_hub(limits=Limits(client_window=2))
    cid = connect(hub, oob=True)
    oob = b"".join(b'{"exec-oob":"query-yank","id":"o%d"}' % i for i in range(4))
    expect(
        hub.client_data(cid, oob + b'{"execute":"query-name","id":"ib"}'),
        [ToUpstream(b'{"exec-oob":"query-yank","id":0}{"exec-oob":"query-yank","id":1}')],
    )
    # The in-band command waits until the client's earlier exec-oob commands are out.
    expect(
        hub.upstream_data(b'{"return": [], "id": 0}\r\n{"return": [], "id": 1}\r\n'),
        [
            ToClient(cid, b'{"return": [], "id": "o0"}\r\n'),
            ToClient(cid, b'{"return": [], "id": "o1"}\r\n'),
            ToUpstream(
                b'{"exec-oob":"query-yank","id":0}{"exec-oob":"query-yank","id":1}'
                b'{"execute":"query-name"}'
            ),
        ],
    )


def test_a_reply_polled_again_is_scrubbed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """readonly's block replies are scrubbed of credentials; the same bytes from QEMU
    again (a monitor polling) reuse the scrubbed reply, a changed one is scrubbed anew."""
    calls: list[bytes] = []
    real = scrub.scrub_return

    def counted(value: bytes) -> bytes:
        calls.append(value)
        return real(value)

    monkeypatch.setattr(views, "scrub_return", counted)
    hub = ready_hub()
    cid, _ = hub.client_connected(Peer("unix:test", "readonly"))
    hub.client_data(cid, b'{"execute":"qmp_capabilities"}')
    leaky = b'{"return": [{"file": "http://alice:hunter2@host/d"}]}\r\n'
    clean = b'{"return": [{"file": "http://host/d"}]}\r\n'
    scrubbed = b'{"return": [{"file": "http://<redacted>@host/d"}], "id": %d}\r\n'
    for i, (reply, want) in enumerate([(leaky, scrubbed), (leaky, scrubbed), (clean, clean)]):
        hub.client_data(cid, b'{"execute":"query-block","id":%d}' % i)
        (action,) = hub.upstream_data(reply)
        assert isinstance(action, ToClient)
        expected = want % i if want is scrubbed else clean[:-3] + b', "id": %d}\r\n' % i
        assert spelled_out(action.data) == expected
    assert [len(v) for v in calls] == [len(b'[{"file": "http://alice:hunter2@host/d"}]'),
                                       len(b'[{"file": "http://host/d"}]')]  # fmt: skip
