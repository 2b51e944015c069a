"""Long replies viewed off the event loop (views.py): the hub hands QEMU's reply to the
shell as a `View` action when its profile's view of it is costly, holds what else comes
for that client meanwhile, and sends it all, in QEMU's order, once the view is back;
every other client is served as before."""

from __future__ import annotations

from qmpmux.hub import Action, Broadcast, CloseClient, Hub, ToClient, View
from qmpmux.policy import DEFAULT_POLICY, Policy, ProfileSpec, compile_policy
from qmpmux.session import Peer
from qmpmux.views import OFF_LOOP_VIEW_BYTES, Memo, ViewJob
from tests.playbook import CAPS_OK, GREETING_OOB, STOP_EVENT, expect, spelled_out

NODE = b'{"node-name": "n%05d", "file": "http://alice:hunter2@host/d%05d", "drv": "http"}'
NODES = b", ".join(NODE % (i, i) for i in range(OFF_LOOP_VIEW_BYTES // 60))
LONG = b'{"return": [' + NODES + b"]}\r\n"
QUERY = b'{"execute":"query-named-block-nodes","id":"q"}'
STATUS = b'{"return": {"status": "running", "running": true}}\r\n'
ENTRY = b'{"name": "c%05d", "arg-type": "0", "ret-type": "0", "meta-type": "command"}'
SCHEMA = (
    b'{"return": [' + b", ".join(ENTRY % i for i in range(OFF_LOOP_VIEW_BYTES // 70)) + b"]}\r\n"
)
SHUTDOWN = (
    b'{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "SHUTDOWN", '
    b'"data": {"guest": false, "reason": "host-qmp-quit"}}\r\n'
)


def views_hub(policy: Policy = DEFAULT_POLICY, off_loop: bool = True) -> Hub:
    hub = Hub(policy=policy, off_loop_view_bytes=OFF_LOOP_VIEW_BYTES if off_loop else None)
    hub.upstream_data(GREETING_OOB)
    hub.upstream_data(CAPS_OK)
    return hub


def client(hub: Hub, profile: str) -> int:
    cid, _ = hub.client_connected(Peer("unix:test", profile))
    expect(
        hub.client_data(cid, b'{"execute":"qmp_capabilities"}'),
        [ToClient(cid, b'{"return": {}}\r\n')],
    )
    return cid


def handed_off(actions: list[Action], cid: int) -> ViewJob:
    """The one action: QEMU's reply to `cid`'s command, handed to be viewed."""
    assert len(actions) == 1 and type(actions[0]) is View, actions
    assert actions[0].client == cid
    return actions[0].job


def run(hub: Hub, cid: int, job: ViewJob) -> list[Action]:
    job.run()  # (the shell runs it on its worker thread)
    return hub.viewed(cid, job)


def sent(actions: list[Action]) -> list[tuple[int, bytes]]:
    """What went to which client, in order (a broadcast as one entry per client)."""
    out: list[tuple[int, bytes]] = []
    for action in actions:
        if isinstance(action, ToClient):
            out.append((action.client, spelled_out(action.data)))
        elif isinstance(action, Broadcast):
            out += [(c, action.data) for c in action.clients]
    return out


def inline_reply(profile: str, reply: bytes = LONG, command: bytes = QUERY) -> bytes:
    """What a hub that views every reply inline sends for `reply` to `command`."""
    hub = views_hub(off_loop=False)
    cid = client(hub, profile)
    hub.client_data(cid, command)
    ((_, data),) = sent(hub.upstream_data(reply))
    return data


def test_a_long_reply_to_scrub_is_viewed_off_the_loop_as_it_would_be_inline() -> None:
    hub = views_hub()
    cid = client(hub, "readonly")
    hub.client_data(cid, QUERY)
    job = handed_off(hub.upstream_data(LONG), cid)
    assert hub.busy  # a graceful shutdown waits for the reply
    got = sent(run(hub, cid, job))
    assert got == [(cid, inline_reply("readonly"))]
    assert b"hunter2" not in got[0][1] and b"<redacted>" in got[0][1]
    assert not hub.busy
    assert hub.clients[cid].reply_bytes == 0 and hub.clients[cid].held is None


def test_a_short_reply_or_one_the_profile_leaves_alone_is_never_handed_off() -> None:
    hub = views_hub()
    ro = client(hub, "readonly")
    full = client(hub, "full")
    short = b'{"return": [' + NODE % (1, 1) + b"]}\r\n"
    for cid, reply in ((ro, short), (full, LONG)):  # full reads credentials: no scrub
        hub.client_data(cid, QUERY)
        ((to, _),) = sent(hub.upstream_data(reply))
        assert to == cid


def test_a_long_reply_polled_again_is_answered_from_memory_on_the_loop() -> None:
    """QEMU's same reply again (a monitor polling) is not viewed again: its view is
    remembered whole and sent at once; a changed reply goes off the loop again."""
    hub = views_hub()
    cid = client(hub, "readonly")
    hub.client_data(cid, QUERY)
    first = sent(run(hub, cid, handed_off(hub.upstream_data(LONG), cid)))
    hub.client_data(cid, QUERY)
    assert sent(hub.upstream_data(LONG)) == first == [(cid, inline_reply("readonly"))]
    changed = LONG.replace(b"n00001", b"m00001")
    hub.client_data(cid, QUERY)
    job = handed_off(hub.upstream_data(changed), cid)
    assert sent(run(hub, cid, job)) == [(cid, inline_reply("readonly", changed))]


def test_what_is_remembered_is_bounded_and_let_go_once_no_client_is_left() -> None:
    memo: Memo[bytes] = Memo(100)
    for key in (b"a" * 30, b"b" * 30):
        memo.get(key, lambda: b"v" * 10, len(key))
    assert memo.peek(b"a" * 30) == b"v" * 10  # 80 bytes held
    memo.get(b"c" * 30, lambda: b"w" * 10, 30)  # past the budget: the rest forgotten
    assert memo.peek(b"a" * 30) is None and memo.peek(b"c" * 30) == b"w" * 10
    assert memo.get(b"d" * 95, lambda: b"x" * 10, 95) == b"x" * 10  # alone past it: made,
    assert memo.peek(b"d" * 95) is None and memo.peek(b"c" * 30) is not None  # not kept
    hub = views_hub()
    cid = client(hub, "readonly")
    profile = hub.clients[cid].session.profile
    hub.client_data(cid, QUERY)
    run(hub, cid, handed_off(hub.upstream_data(LONG), cid))
    assert hub.views.remembered(profile, "query-named-block-nodes", LONG) is not None
    hub.client_closed(cid)
    assert hub.views.remembered(profile, "query-named-block-nodes", LONG) is None


def test_what_comes_behind_a_reply_being_viewed_waits_for_it_in_qemus_order() -> None:
    """QEMU wrote the reply, then an event, then the reply to the client's next command:
    the client gets them in that order; another client gets the event at once."""
    hub = views_hub()
    cid = client(hub, "readonly")
    other = client(hub, "readonly")
    hub.client_data(cid, QUERY)
    hub.client_data(cid, b'{"execute":"query-status","id":"s"}')
    hub.client_data(other, b'{"execute":"query-status","id":"o"}')
    job = handed_off(hub.upstream_data(LONG), cid)
    assert sent(hub.upstream_data(STOP_EVENT)) == [(other, STOP_EVENT)]
    assert sent(hub.upstream_data(STATUS)) == []  # cid's query-status: waits
    status = STATUS[:-3] + b', "id": "o"}\r\n'
    assert sent(hub.upstream_data(STATUS)) == [(other, status)]
    assert hub.clients[cid].reply_bytes > len(LONG)  # what waits counts against its bound
    assert sent(run(hub, cid, job)) == [
        (cid, inline_reply("readonly")),
        (cid, STOP_EVENT),
        (cid, STATUS[:-3] + b', "id": "s"}\r\n'),
    ]
    assert hub.clients[cid].reply_bytes == 0 and hub.clients[cid].held is None
    assert sent(hub.upstream_data(STOP_EVENT)) == [(cid, STOP_EVENT), (other, STOP_EVENT)]


def test_two_long_replies_in_a_row_each_wait_for_their_own_view() -> None:
    hub = views_hub()
    cid = client(hub, "readonly")
    hub.client_data(cid, QUERY)
    hub.client_data(cid, QUERY)
    first = handed_off(hub.upstream_data(LONG), cid)
    second = handed_off(hub.upstream_data(LONG), cid)
    second.run()
    expect(hub.viewed(cid, second), [])  # the first is still out
    got = sent(run(hub, cid, first))
    assert got == [(cid, inline_reply("readonly"))] * 2


def test_a_reload_meanwhile_changes_nothing_the_reply_is_viewed_as_it_arrived() -> None:
    """As inline: a reply is viewed for the profile in force when QEMU's reply arrives."""
    hub = views_hub(compile_policy({"mon": ProfileSpec(base="readonly")}))
    cid = client(hub, "mon")
    hub.client_data(cid, QUERY)
    job = handed_off(hub.upstream_data(LONG), cid)
    hub.reload(compile_policy({"mon": ProfileSpec(base="readonly", secret_properties=True)}))
    assert sent(run(hub, cid, job)) == [(cid, inline_reply("readonly"))]
    hub.client_data(cid, QUERY)  # the next one under the new profile: QEMU's bytes
    assert sent(hub.upstream_data(LONG)) == [(cid, inline_reply("full"))]


def test_replies_and_events_behind_a_view_go_out_before_the_session_ends() -> None:
    """QEMU answers, announces SHUTDOWN and closes while a reply is out to be viewed: the
    hub views it on the spot and sends it all ahead of the close, as inline."""
    for profile, command, reply in (
        ("readonly", QUERY, LONG),
        ("full", b'{"execute":"query-qmp-schema","id":"q"}', SCHEMA),  # full: narrowed too
    ):
        hub = views_hub()
        cid = client(hub, profile)
        quitter = client(hub, "full")
        hub.client_data(cid, command)
        hub.client_data(cid, b'{"execute":"query-status","id":"s"}')
        hub.client_data(quitter, b'{"execute":"quit","id":"x"}')
        handed_off(hub.upstream_data(reply), cid)
        actions = hub.upstream_data(STATUS)
        actions += hub.upstream_data(b'{"return": {}}\r\n' + SHUTDOWN)
        actions += hub.upstream_closed()
        mine = [data for to, data in sent(actions) if to == cid]
        assert len(mine) == 3 and mine[1:] == [STATUS[:-3] + b', "id": "s"}\r\n', SHUTDOWN]
        assert mine[0] == inline_reply(profile, reply, command)
        closing = [a for a in actions if isinstance(a, CloseClient) and a.client == cid]
        assert len(closing) == 1 and actions.index(closing[0]) > max(
            i for i, a in enumerate(actions) if isinstance(a, ToClient) and a.client == cid
        )


def test_a_lost_link_sends_a_reply_it_brought_before_closing_the_client() -> None:
    hub = Hub(links=2, off_loop_view_bytes=OFF_LOOP_VIEW_BYTES)
    for link in (0, 1):
        hub.upstream_data(GREETING_OOB, link)
    for link in (0, 1):
        hub.upstream_data(CAPS_OK, link)
    cid = client(hub, "readonly")
    hub.client_data(cid, QUERY)
    hub.client_data(cid, b'{"execute":"query-status","id":"s"}')
    up = hub.clients[cid].link
    assert up is not None
    handed_off(hub.upstream_data(LONG, up.index), cid)
    actions = hub.upstream_closed("gone", up.index)  # with its query-status in QEMU
    assert sent(actions) == [(cid, inline_reply("readonly"))]
    assert type(actions[-1]) is CloseClient and actions[-1].client == cid


def test_a_client_gone_meanwhile_has_its_view_cancelled_and_nothing_sent() -> None:
    hub = views_hub()
    cid = client(hub, "readonly")
    other = client(hub, "readonly")
    hub.client_data(cid, QUERY)
    job = handed_off(hub.upstream_data(LONG), cid)
    hub.client_closed(cid)
    assert job.line is None  # QEMU's bytes let go of; the worker skips it
    expect(run(hub, cid, job), [])
    assert not hub.busy
    assert sent(hub.upstream_data(STOP_EVENT)) == [(other, STOP_EVENT)]


def test_a_long_reply_that_cannot_be_read_is_withheld_as_inline() -> None:
    hub = views_hub()
    cid = client(hub, "readonly")
    hub.client_data(cid, QUERY)
    broken = LONG[:-4] + b', {"x": inf}]}\r\n'  # QEMU prints a non-finite number so
    job = handed_off(hub.upstream_data(broken), cid)
    got = sent(run(hub, cid, job))
    assert got == [(cid, inline_reply("readonly", broken))]
    assert b"qmpmux could not scrub query-named-block-nodes" in got[0][1]


def test_a_view_that_fails_unexpectedly_costs_its_client_only() -> None:
    hub = views_hub()
    cid = client(hub, "readonly")
    other = client(hub, "readonly")
    hub.client_data(cid, QUERY)
    job = handed_off(hub.upstream_data(LONG), cid)
    job.error = RuntimeError("worker refused")  # e.g. the interpreter exiting
    actions = hub.viewed(cid, job)
    assert CloseClient(cid, "internal error") in actions
    assert sent(hub.upstream_data(STOP_EVENT)) == [(other, STOP_EVENT)]
