"""Playbook tests of what a hostile client can make the hub hold or get away with:
memory it makes qmpmux hold, commands queued across a policy reload."""

from __future__ import annotations

import gc
import tracemalloc

from qmpmux.config import Limits
from qmpmux.hub import CloseClient, Hub, PauseClient, ResumeClient, ToClient, ToUpstream
from qmpmux.policy import ProfileSpec, compile_policy
from qmpmux.qjson import encode
from qmpmux.session import Peer
from qmpmux.spelled import Spelled
from tests.playbook import CAPS_OK, GREETING_OOB, connect, expect, ready_hub, spelled_out

BOUND = 64 * 1024


def test_replies_held_behind_a_slow_command_count_against_the_client_bound() -> None:
    """Local error replies waiting behind an unanswered command are memory qmpmux holds:
    reading pauses once they reach the bound, and resumes only when they are gone."""
    hub = ready_hub(limits=Limits(max_pending_bytes=BOUND, max_message_bytes=32 * 1024))
    cid = connect(hub)
    expect(
        hub.client_data(cid, b'{"execute":"query-status","id":"slow"}'),
        [ToUpstream(b'{"execute":"query-status"}')],
    )
    # QEMU echoes a bad member name in its error: each reply is as big as the input.
    bad = b'{"execute":"query-status","' + b"x" * 20000 + b'":1}'
    session = hub.clients[cid]
    sent = 0
    while sent < 100:
        actions = hub.client_data(cid, bad)
        sent += 1
        held = session.reply_bytes + session.queued_bytes
        assert not [a for a in actions if isinstance(a, ToClient)]  # all wait behind "slow"
        if PauseClient(cid) in actions:
            break
        assert held < BOUND
    assert PauseClient(cid) in actions, "reading never paused"
    assert held - len(bad) - 100 < BOUND <= held  # paused at the bound, not later
    actions = hub.upstream_data(b'{"return": {}}\r\n')
    replies = [a for a in actions if isinstance(a, ToClient)]
    assert len(replies) == sent + 1 and b'"slow"' in spelled_out(replies[0].data)
    assert ResumeClient(cid) not in actions  # the shell still holds them all
    assert session.reply_bytes == 0
    expect(hub.client_drained(cid), [ResumeClient(cid)])


def test_a_client_whose_outbox_is_full_is_paused_not_fed() -> None:
    """Bytes waiting in a client's outbox count too: a client that sends but does not
    read stops being read before qmpmux piles up replies for it."""
    hub = ready_hub(limits=Limits(max_pending_bytes=BOUND, max_message_bytes=32 * 1024))
    outbox = {"n": 0}
    hub.queued_bytes = lambda client: outbox["n"]
    cid = connect(hub)
    outbox["n"] = BOUND  # the shell could not send what it has
    actions = hub.client_data(cid, b"[1]")
    assert PauseClient(cid) in actions
    assert hub.client_drained(cid) == []  # still full
    outbox["n"] = 0
    expect(hub.client_drained(cid), [ResumeClient(cid)])


def _ctl_client(limits: Limits, *commands: str, oob: bool = False) -> tuple[Hub, int]:
    """A hub whose one negotiated client has a custom profile `ctl` allowing `commands`."""
    hub = ready_hub(limits=limits)
    hub.reload(compile_policy({"ctl": ProfileSpec(commands=commands)}))
    cid, _ = hub.client_connected(Peer("unix:t", profile="ctl"))
    caps = b',"arguments":{"enable":["oob"]}' if oob else b""
    hub.client_data(cid, b'{"execute":"qmp_capabilities"' + caps + b"}")
    return hub, cid


def test_a_reload_re_judges_commands_still_queued_inside_qmpmux() -> None:
    """A `stop` waiting for its turn when a reload denies it is answered with the denial,
    in order, and never reaches QEMU."""
    hub, cid = _ctl_client(Limits(client_window=1), "query-status", "stop")
    expect(
        hub.client_data(cid, b'{"execute":"query-status","id":1}{"execute":"stop","id":2}'),
        [ToUpstream(b'{"execute":"query-status"}')],  # stop waits: window of 1
    )
    denying = compile_policy({"ctl": ProfileSpec(commands=("query-status",))})
    expect(hub.reload(denying), [])  # the denial waits behind query-status
    expect(
        hub.upstream_data(b'{"return": {}}\r\n'),
        [
            ToClient(cid, b'{"return": {}, "id": 1}\r\n'),
            ToClient(
                cid,
                b'{"id": 2, "error": {"class": "CommandNotFound", '
                b'"desc": "The command stop has been refused by qmpmux policy"}}\r\n',
            ),
        ],
    )
    assert not hub.clients[cid].queues[0]


def test_a_reload_lets_through_what_it_still_allows() -> None:
    hub, cid = _ctl_client(Limits(client_window=1), "query-status", "stop")
    hub.client_data(cid, b'{"execute":"query-status","id":1}{"execute":"stop","id":2}')
    widening = compile_policy({"ctl": ProfileSpec(commands=("query-status", "stop", "cont"))})
    expect(hub.reload(widening), [])
    expect(
        hub.upstream_data(b'{"return": {}}\r\n'),
        [
            ToClient(cid, b'{"return": {}, "id": 1}\r\n'),
            ToUpstream(b'{"execute":"stop"}'),
        ],
    )


def test_a_reload_denying_a_queued_exec_oob_releases_the_in_band_queue() -> None:
    """A client's in-band commands wait for its earlier exec-oob; when a reload denies
    that exec-oob, they must not wait forever."""
    limits = Limits(client_window=1, upstream_window=1)
    hub, cid = _ctl_client(limits, "query-status", "yank", "migrate-pause", oob=True)
    other = connect(hub, oob=True)
    # Fill the one-command OOB window with another client's exec-oob.
    expect(
        hub.client_data(other, b'{"exec-oob":"yank","arguments":{"instances":[]},"id":"o"}'),
        [ToUpstream(b'{"exec-oob":"yank","arguments":{"instances":[]},"id":0}')],
    )
    expect(
        hub.client_data(
            cid, b'{"exec-oob":"migrate-pause","id":"p"}{"execute":"query-status","id":"s"}'
        ),
        [],
    )
    denying = compile_policy({"ctl": ProfileSpec(commands=("query-status",))})
    actions = hub.reload(denying)
    assert ToUpstream(b'{"execute":"query-status"}') in actions
    assert any(
        isinstance(a, ToClient) and b"migrate-pause has been refused" in spelled_out(a.data)
        for a in actions
    )


def _listener_hub(caps: dict[str, int | None], limits: Limits) -> Hub:
    hub = ready_hub(limits=limits)
    hub.listener_caps = caps
    return hub


def _join(hub: Hub, listener: str) -> int:
    cid, _ = hub.client_connected(Peer(listener))
    return cid


def test_idle_clients_of_one_listener_cannot_lock_out_another() -> None:
    hub = _listener_hub(
        {"unix:ro": None, "unix:full": None}, Limits(max_clients=10, reserve_clients=3)
    )
    assert all(_join(hub, "unix:ro") for _ in range(7))
    assert not _join(hub, "unix:ro")  # the last 3 slots are the other listener's reserve
    assert all(_join(hub, "unix:full") for _ in range(3))
    assert not _join(hub, "unix:full")  # the global bound still holds


def test_a_listener_s_own_max_clients_caps_it_alone() -> None:
    hub = _listener_hub({"unix:ro": 2, "unix:full": None}, Limits(max_clients=100))
    ro = [_join(hub, "unix:ro") for _ in range(3)]
    assert ro[0] and ro[1] and not ro[2]
    assert all(_join(hub, "unix:full") for _ in range(50))
    hub.client_closed(ro[0])  # a slot comes back when its client leaves
    assert _join(hub, "unix:ro")


def test_a_client_that_never_negotiates_is_closed_at_its_deadline() -> None:
    hub = ready_hub()
    idle = connect(hub, negotiate=False)
    done = connect(hub)
    expect(hub.negotiation_deadline(done), [])
    expect(hub.negotiation_deadline(idle), [CloseClient(idle, "did not negotiate within 30 s")])


def test_echoes_too_long_to_write_at_once_are_written_as_they_are_sent() -> None:
    """QEMU reports a stray byte with the whole string before it, each non-ASCII byte as
    \\uXXXX (6x), and echoes ids and command names in full: written at once, a
    megabyte of such input holds the loop 15-140 ms. The hub hands the shell a recipe
    (Spelled) that holds about the input's size and makes QEMU's exact bytes in pieces;
    short ones stay plain bytes."""
    hub = ready_hub()
    cid, _ = hub.client_connected(Peer("unix:test", "readonly"))  # answered by qmpmux
    hub.client_data(cid, b'{"execute":"qmp_capabilities"}')
    stray = b"\x80" * (1 << 20)
    name = "\u00e9" * 50_000
    error = b'{"error": {"class": '
    cases = [
        (b'"' + stray + b"\x01",
         error + b'"GenericError", "desc": '
         + encode("JSON parse error, stray '\"" + "\ufffd" * len(stray) + "\x01'") + b"}}\r\n"),
        (b'{"execute":"nope","id":[' + b"0," * 100_000 + b"0]}",
         b'{"id": ' + encode([0] * 100_001) + b', "error": {"class": "CommandNotFound", '
         b'"desc": "The command nope has been refused by qmpmux policy"}}\r\n'),
        (b'{"execute":"' + name.encode() + b'"}',
         error + b'"CommandNotFound", "desc": '
         + encode(f"The command {name} has been refused by qmpmux policy") + b"}}\r\n"),
    ]  # fmt: skip
    for data, want in cases:
        (reply,) = hub.client_data(cid, data)
        assert isinstance(reply, ToClient) and isinstance(reply.data, Spelled)
        assert len(reply.data) < len(data) + 128  # what qmpmux holds for it: the input
        assert reply.data.spell() == want
    (reply,) = hub.client_data(cid, b'{"execute":"nope","id":[0,0]}')
    assert isinstance(reply, ToClient) and type(reply.data) is bytes
    # QEMU's own replies get a long id back the same way.
    full = connect(hub)
    ids = b"[" + b'"\xc3\xa9",' * 50_000 + b"1]"
    (command,) = hub.client_data(full, b'{"execute":"query-status","id":' + ids + b"}")
    assert command == ToUpstream(b'{"execute":"query-status"}')
    (reply,) = hub.upstream_data(b'{"return": {}}\r\n')
    assert isinstance(reply, ToClient) and isinstance(reply.data, Spelled)
    assert reply.data.spell() == (
        b'{"return": {}, "id": ' + encode(["\u00e9"] * 50_000 + [1]) + b"}\r\n"
    )


def test_a_listener_with_its_own_max_message_bytes_bounds_its_clients_alone() -> None:
    """An untrusted listener (agents) may be given a tighter max-message-bytes: its
    clients get QEMU's token-size error past it, the other listeners' clients do not."""
    hub = ready_hub()
    hub.listener_message_bytes = {"unix:agents": 128}
    agent, _ = hub.client_connected(Peer("unix:agents", "readonly"))
    hub.client_data(agent, b'{"execute":"qmp_capabilities"}')
    other = connect(hub)
    big = b'{"execute":"query-status","id":"' + b"x" * 200 + b'"}'
    actions = hub.client_data(agent, big)
    replies = [a.data for a in actions if isinstance(a, ToClient)]
    assert replies[0] == (
        b'{"error": {"class": "GenericError", "desc": "JSON token size limit exceeded"}}\r\n'
    )  # and what QEMU makes of the rest of the input, as it would
    assert not [a for a in actions if isinstance(a, ToUpstream)]
    actions = hub.client_data(other, big)
    assert [a for a in actions if isinstance(a, ToUpstream)]  # goes to QEMU


def test_a_client_whose_queued_commands_a_reload_denied_can_move_lanes() -> None:
    """A reload that empties a client's queue leaves it listed on its old monitor; its
    next command may go to another, and must be sent from there, not wait forever."""
    hub = Hub(Limits(upstream_window=1), links=2)
    for link in range(2):
        hub.upstream_data(GREETING_OOB, link)
    for link in range(2):
        hub.upstream_data(CAPS_OK, link)
    hub.reload(compile_policy({"ctl": ProfileSpec(commands=("query-status", "stop"))}))
    busy = [connect(hub), connect(hub)]
    sent = [hub.client_data(c, b'{"execute":"query-status","id":1}') for c in busy]
    ctl, _ = hub.client_connected(Peer("unix:t", profile="ctl"))
    hub.client_data(ctl, b'{"execute":"qmp_capabilities"}')
    expect(hub.client_data(ctl, b'{"execute":"stop","id":"s"}'), [])  # both windows full
    denying = compile_policy({"ctl": ProfileSpec(commands=("query-status",))})
    hub.reload(denying)  # answers the stop with its denial; ctl has nothing queued now
    listed = hub.clients[ctl].link
    # Its next command may go to either monitor (both are busy): it waits for a window.
    expect(hub.client_data(ctl, b'{"execute":"query-status","id":"q"}'), [])
    assert hub.clients[ctl].link is not None
    out = []
    for (action,) in sent:  # the two others' replies come: both windows free again
        assert isinstance(action, ToUpstream)
        out += hub.upstream_data(b'{"return": {}}\r\n', action.link)
    assert [a for a in out if isinstance(a, ToUpstream)], (listed, out)  # it went


def test_an_idle_client_costs_the_hub_a_few_kib() -> None:
    # What the hub holds per connected, negotiated client (its flow, session and reader):
    # 4.7 KiB on CPython 3.11; the reader's attributes past CPython's shared-key dict
    # limit once made it 6.1 (README Benchmarks, memory per idle client).
    hub = ready_hub()
    connect(hub)
    gc.collect()
    tracemalloc.start()
    try:
        for _ in range(200):
            connect(hub)
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held / 200 < 5.5 * 1024, held / 200
