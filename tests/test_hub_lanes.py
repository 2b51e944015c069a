"""Playbook tests of lanes: several upstream monitors of one QEMU behind one hub."""

from __future__ import annotations

from qmpmux.config import Limits
from qmpmux.hub import Broadcast, CloseClient, Exit, Hub, ToClient, ToUpstream, UpstreamReady
from tests.playbook import CAPS_OK, CAPS_OOB, GREETING_OOB, STOP_EVENT, VERSION, connect, expect

STATUS = b'{"execute":"query-status","id":%d}'


def lanes_hub(n: int, limits: Limits | None = None) -> Hub:
    """A hub whose `n` upstream links have all greeted and negotiated."""
    hub = Hub(limits, links=n)
    for link in range(n):
        expect(hub.upstream_data(GREETING_OOB, link), [ToUpstream(CAPS_OOB, link=link)])
    for link in range(n - 1):
        expect(hub.upstream_data(CAPS_OK, link), [])
    expect(hub.upstream_data(CAPS_OK, n - 1), [UpstreamReady(VERSION, True)])
    return hub


def test_clients_spread_over_the_links_by_load() -> None:
    hub = lanes_hub(2)
    a, b = connect(hub), connect(hub)
    expect(hub.client_data(a, STATUS % 1), [ToUpstream(b'{"execute":"query-status"}',
                                                       link=1)])  # fmt: skip
    # The other link is idle now: b goes there.
    expect(hub.client_data(b, STATUS % 1), [ToUpstream(b'{"execute":"query-status"}',
                                                       link=0)])  # fmt: skip


def test_a_client_stays_on_its_link_while_it_has_a_command_there() -> None:
    """All of a client's in-band commands in QEMU are on one monitor: QEMU's order."""
    hub = lanes_hub(2, Limits(client_window=8))
    a = connect(hub)
    (first,) = hub.client_data(a, STATUS % 1)
    (second,) = hub.client_data(a, STATUS % 2)
    assert isinstance(first, ToUpstream) and isinstance(second, ToUpstream)
    assert first.link == second.link


def test_a_big_command_keeps_only_its_own_client_waiting() -> None:
    hub = lanes_hub(2)
    big, other = connect(hub), connect(hub)
    (sent,) = hub.client_data(big, b'{"execute":"query-name","arguments":{"x":"%s"}}' % (
        b"y" * 100_000))  # fmt: skip
    assert isinstance(sent, ToUpstream)
    for i in range(5):  # the other client never lands behind the big command
        (action,) = hub.client_data(other, STATUS % i)
        assert isinstance(action, ToUpstream) and action.link != sent.link
        reply = b'{"return": {}}\r\n'
        expect(hub.upstream_data(reply, action.link),
               [ToClient(other, b'{"return": {}, "id": %d}\r\n' % i)])  # fmt: skip


def test_events_come_once_whichever_link_brings_them_first() -> None:
    hub = lanes_hub(3)
    a = connect(hub)
    expect(hub.upstream_data(STOP_EVENT, 2), [Broadcast(STOP_EVENT, [a])])
    expect(hub.upstream_data(STOP_EVENT, 0), [])
    expect(hub.upstream_data(STOP_EVENT, 1), [])
    # The same bytes again on a link that already sent its copy: a new event.
    expect(hub.upstream_data(STOP_EVENT, 2), [Broadcast(STOP_EVENT, [a])])
    expect(hub.upstream_data(STOP_EVENT, 1), [])
    expect(hub.upstream_data(STOP_EVENT, 0), [])
    assert not hub._event_copies


def test_an_event_precedes_the_reply_of_the_command_that_caused_it() -> None:
    """QEMU writes the event to every monitor before the reply on the command's own: the
    copy on that monitor is delivered first if no other link was quicker."""
    hub = lanes_hub(2)
    a = connect(hub)
    (sent,) = hub.client_data(a, b'{"execute":"stop","id":"s"}')
    assert isinstance(sent, ToUpstream)
    expect(
        hub.upstream_data(STOP_EVENT + b'{"return": {}}\r\n', sent.link),
        [Broadcast(STOP_EVENT, [a]), ToClient(a, b'{"return": {}, "id": "s"}\r\n')],
    )
    expect(hub.upstream_data(STOP_EVENT, 1 - sent.link), [])


def test_a_lost_link_costs_only_the_clients_with_commands_on_it() -> None:
    hub = lanes_hub(2)
    busy, idle, elsewhere = connect(hub), connect(hub), connect(hub)
    (sent,) = hub.client_data(busy, STATUS % 1)
    assert isinstance(sent, ToUpstream)
    (other,) = hub.client_data(elsewhere, STATUS % 1)
    assert isinstance(other, ToUpstream) and other.link != sent.link
    reason = f"lost QEMU monitor link {sent.link}: gone"
    expect(hub.upstream_closed("gone", sent.link), [CloseClient(busy, reason)])
    hub.client_closed(busy)  # as the shell reports once it closed the connection
    # The idle client and the other link's client keep working, on the link left.
    (action,) = hub.client_data(idle, STATUS % 2)
    assert isinstance(action, ToUpstream) and action.link == other.link
    expect(
        hub.upstream_closed("gone too", other.link),
        [CloseClient(idle, "gone too"), CloseClient(elsewhere, "gone too"), Exit(1, "gone too")],
    )


def test_a_client_with_named_fds_stays_on_their_link() -> None:
    """Named fds live in the monitor that received them."""
    hub = lanes_hub(2, Limits(client_window=8))
    a = connect(hub)
    actions = hub.client_data(a, b'{"execute":"getfd","arguments":{"fdname":"t"}}', [100])
    (sent,) = [x for x in actions if isinstance(x, ToUpstream)]
    assert ToClient(a, b'{"return": {}}\r\n') in hub.upstream_data(
        b'{"return": {}, "id": 0}\r\n',
        sent.link,  # it carried an fd: it went with an id
    )
    hog = connect(hub)
    for i in range(4):  # load the fd's link
        hub.client_data(hog, STATUS % i)
    (use,) = hub.client_data(a, b'{"execute":"netdev_add","arguments":{"type":"tap","id":"n",'
                                b'"fd":"t"}}')  # fmt: skip
    assert isinstance(use, ToUpstream) and use.link == sent.link


def test_exec_oob_is_never_stuck_behind_a_big_command_even_its_own() -> None:
    """QEMU reads a monitor's bytes in order: an exec-oob behind a big command's bytes
    would wait for all of them. It overtakes in-band work by design, so it goes to the
    least loaded monitor, even while its own client's big command is on another."""
    hub = lanes_hub(2)
    client = connect(hub, oob=True)
    (big,) = hub.client_data(client, b'{"execute":"query-name","arguments":{"x":"%s"}}' % (
        b"y" * 100_000))  # fmt: skip
    assert isinstance(big, ToUpstream)
    (oob,) = hub.client_data(client, b'{"exec-oob":"query-yank","id":"o"}')
    assert isinstance(oob, ToUpstream) and oob.link != big.link
    expect(
        hub.upstream_data(b'{"return": [], "id": 0}\r\n', oob.link),
        [ToClient(client, b'{"return": [], "id": "o"}\r\n')],
    )


def test_session_over_ends_every_link_and_closes_every_client() -> None:
    """--reconnect: one lost monitor ends the whole session (the shell reconnects all)."""
    hub = lanes_hub(2)
    a, b = connect(hub), connect(hub)
    expect(
        hub.session_over("monitor 1: gone"),
        [CloseClient(a, "monitor 1: gone"), CloseClient(b, "monitor 1: gone"),
         Exit(1, "monitor 1: gone")],
    )  # fmt: skip
    expect(hub.session_over("again"), [])  # once


def test_busy_while_a_command_is_in_qemu_or_queued() -> None:
    """Graceful shutdown waits on `busy`: in flight or queued behind the window."""
    hub = lanes_hub(1, Limits(client_window=1))
    a = connect(hub)
    assert not hub.busy
    (sent,) = hub.client_data(a, STATUS % 1)
    assert isinstance(sent, ToUpstream)
    expect(hub.client_data(a, STATUS % 2), [])  # queued behind its window
    assert hub.busy
    hub.upstream_data(b'{"return": {}}\r\n')  # the first answered, the second sent
    assert hub.busy
    hub.upstream_data(b'{"return": {}}\r\n')
    assert not hub.busy


def test_a_later_hub_numbers_clients_after_the_earlier_one() -> None:
    first = lanes_hub(1)
    connect(first), connect(first)
    later = Hub(first_client=first.next_client)
    expect(later.upstream_data(GREETING_OOB), [ToUpstream(CAPS_OOB)])
    later.upstream_data(CAPS_OK)
    assert connect(later) == 3


def test_after_shutdown_the_last_monitor_to_close_ends_the_session_cleanly() -> None:
    """QEMU writes SHUTDOWN to every monitor, the reply to `quit` to its own, then closes
    them all: a monitor that closes first must not cost the reply still on another."""
    hub = lanes_hub(3)
    a, b = connect(hub), connect(hub)
    (sent,) = hub.client_data(a, b'{"execute":"quit","id":1}')
    assert isinstance(sent, ToUpstream)
    hub.client_data(b, STATUS % 2)  # b's command is in QEMU too, on another monitor
    shutdown = (
        b'{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "SHUTDOWN", "data": {}}\r\n'
    )
    for link in range(3):
        hub.upstream_data(shutdown, link)
    others = [link for link in range(3) if link != sent.link]
    # The first to close: b's command there gets no reply now; a keeps waiting for its own.
    b_link = next(link for link in others if hub.links[link].in_qemu)
    expect(hub.upstream_closed("gone", b_link), [CloseClient(b, "QEMU shut down")])
    hub.client_closed(b)  # as the shell reports it
    expect(hub.upstream_data(b'{"return": {}}\r\n', sent.link),
           [ToClient(a, b'{"return": {}, "id": 1}\r\n')])  # fmt: skip
    (last_but_one,) = [link for link in others if link != b_link]
    expect(hub.upstream_closed("gone", last_but_one), [])
    expect(hub.upstream_closed("gone", sent.link), [CloseClient(a, "QEMU shut down"),
                                                    Exit(0, "QEMU shut down")])  # fmt: skip


def test_an_event_comes_once_even_when_its_last_copy_is_on_the_only_monitor_left() -> None:
    """QEMU quitting: SHUTDOWN comes first on one monitor, which then closes with the
    others, and the `quit` reply's monitor is read last: its copy of SHUTDOWN is the
    same event, though no other monitor is left to compare it with."""
    hub = lanes_hub(3)
    a = connect(hub)
    (sent,) = hub.client_data(a, b'{"execute":"quit","id":1}')
    assert isinstance(sent, ToUpstream)
    shutdown = (
        b'{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "SHUTDOWN", "data": {}}\r\n'
    )
    others = [link for link in range(3) if link != sent.link]
    expect(hub.upstream_data(shutdown, others[0]), [Broadcast(shutdown, [a])])
    hub.upstream_data(shutdown, others[1])
    expect(hub.upstream_closed("gone", others[0]), [])
    expect(hub.upstream_closed("gone", others[1]), [])
    expect(
        hub.upstream_data(shutdown + b'{"return": {}}\r\n', sent.link),
        [ToClient(a, b'{"return": {}, "id": 1}\r\n')],
    )


def test_a_monitor_lost_after_a_shutdown_qemu_stays_through_is_lost() -> None:
    """Under -no-shutdown a guest's shutdown pauses QEMU (SHUTDOWN, then STOP) and every
    monitor stays: one that goes after that is lost, as at any other time."""
    hub = lanes_hub(2)
    a = connect(hub)
    (sent,) = hub.client_data(a, STATUS % 1)
    assert isinstance(sent, ToUpstream)
    shutdown = b'{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "SHUTDOWN"}\r\n'
    stop = b'{"timestamp": {"seconds": 1, "microseconds": 3}, "event": "STOP"}\r\n'
    for link in range(2):
        hub.upstream_data(shutdown, link)
    assert hub.shutdown_seen
    for link in range(2):
        hub.upstream_data(stop, link)
    assert not hub.shutdown_seen
    expect(hub.upstream_closed("gone", sent.link),
           [CloseClient(a, f"lost QEMU monitor link {sent.link}: gone")])  # fmt: skip


def test_a_client_stays_on_an_idle_monitor() -> None:
    """A sequential client keeps its monitor while nothing else is there: moving it
    would gain nothing, and choosing costs every command."""
    hub = lanes_hub(4)
    a = connect(hub)
    links = []
    for i in range(6):
        (sent,) = hub.client_data(a, STATUS % i)
        assert isinstance(sent, ToUpstream)
        links.append(sent.link)
        expect(hub.upstream_data(b'{"return": {}}\r\n', sent.link),
               [ToClient(a, b'{"return": {}, "id": %d}\r\n' % i)])  # fmt: skip
    assert len(set(links)) == 1, links
