"""Big messages judged off the event loop (judgement.py): the hub hands them to the shell
as `Judge` actions, holds the client's later input meanwhile, and acts on the verdict
when it comes back, exactly as it would have inline."""

from __future__ import annotations

import pytest

from qmpmux.config import Limits
from qmpmux.hub import (
    Action,
    CloseClient,
    CloseFds,
    Hub,
    Judge,
    PauseClient,
    ResumeClient,
    ToClient,
    ToUpstream,
)
from qmpmux.judgement import OFF_LOOP_BYTES, Judgement
from qmpmux.policy import DEFAULT_POLICY, Policy, ProfileSpec, compile_policy
from qmpmux.session import Peer, Session
from qmpmux.spelled import Spliced
from tests.playbook import CAPS_OK, GREETING_OOB, expect, spelled_out

ABORTS = b",".join([b'{"type":"abort"}'] * (OFF_LOOP_BYTES // 16))
BIG = b'{"execute":"transaction","arguments":{"actions":[' + ABORTS + b']},"id":"big"}'
BIG_REPLY = b'{"return": {}, "id": "big"}\r\n'
PARSE_ERROR = (
    b'{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}\r\n'
)


def off_loop_hub(policy: Policy = DEFAULT_POLICY) -> Hub:
    hub = Hub(policy=policy, off_loop_bytes=OFF_LOOP_BYTES)
    hub.upstream_data(GREETING_OOB)
    hub.upstream_data(CAPS_OK)
    return hub


def client(hub: Hub, profile: str = "full") -> int:
    cid, _ = hub.client_connected(Peer("unix:test", profile))
    expect(
        hub.client_data(cid, b'{"execute":"qmp_capabilities"}'),
        [ToClient(cid, b'{"return": {}}\r\n')],
    )
    return cid


def send_big(
    hub: Hub, cid: int, message: bytes, after: bytes = b"", fds: list[int] | None = None
) -> Judgement:
    """Send `message` 1 KiB a read (as the shell reads a client; `fds` with the first)
    with `after` in its last read; the hub must hand it to be judged and pause the
    client."""
    cut = (len(message) - 1) // 1024 * 1024
    for i in range(0, cut, 1024):
        expect(hub.client_data(cid, message[i : i + 1024], fds if i == 0 and fds else ()), [])
    actions = hub.client_data(cid, message[cut:] + after)
    assert len(actions) == 2 and type(actions[0]) is Judge, actions
    expect(actions[1:], [PauseClient(cid)])
    job = actions[0].job
    assert actions[0].client == cid and job.verdict is None
    return job


def upstream(actions: list[Action]) -> list[bytes]:
    """The commands sent to QEMU, as bytes."""
    out = []
    for action in actions:
        if isinstance(action, ToUpstream):
            data = action.data
            out.append(b"".join(data.parts) if isinstance(data, Spliced) else spelled_out(data))
    return out


def test_a_big_command_waits_for_its_verdict_and_the_client_input_behind_it_too() -> None:
    hub = off_loop_hub()
    cid = client(hub)
    job = send_big(hub, cid, BIG, after=b'{]{"execute":"query-status","id":"q"}')
    job.run()
    assert job.error is None
    actions = hub.judged(cid, job)
    assert actions[0] == ResumeClient(cid)
    # The parse error waits for the reply before it; the command after it goes up after.
    assert not [a for a in actions if isinstance(a, ToClient)]
    status = b'{"execute":"query-status","id":1}'
    assert upstream(actions) == [BIG[: -len(b'"big"}')] + b"0}" + status]
    expect(
        hub.upstream_data(b'{"return": {}, "id": 0}\r\n'),
        [ToClient(cid, BIG_REPLY), ToClient(cid, PARSE_ERROR)],
    )
    expect(
        hub.upstream_data(b'{"return": {}, "id": 1}\r\n'),
        [ToClient(cid, b'{"return": {}, "id": "q"}\r\n')],
    )


def test_a_reload_while_a_command_is_judged_judges_it_again_under_the_new_policy() -> None:
    allowing = compile_policy({"ctl": ProfileSpec(commands=("transaction", "query-status"))})
    hub = off_loop_hub(allowing)
    cid = client(hub, "ctl")
    job = send_big(hub, cid, BIG, after=b"{]")
    job.run()  # allowed by the profile it was judged under
    hub.reload(compile_policy({"ctl": ProfileSpec(commands=("query-status",))}))
    actions = hub.judged(cid, job)
    (again,) = [a for a in actions if isinstance(a, Judge)]
    assert not upstream(actions) and not [a for a in actions if isinstance(a, ToClient)]
    assert len(again.job.waiting) == 1  # the parse error, still behind it
    again.job.run()
    actions = hub.judged(cid, again.job)
    assert not upstream(actions)
    denial = (
        b'{"id": "big", "error": {"class": "CommandNotFound", '
        b'"desc": "The command transaction has been refused by qmpmux policy"}}\r\n'
    )
    replies = [spelled_out(a.data) for a in actions if isinstance(a, ToClient)]
    assert replies == [denial, PARSE_ERROR]


def test_a_client_gone_while_its_command_is_judged_is_forgotten() -> None:
    hub = off_loop_hub()
    cid = client(hub)
    job = send_big(hub, cid, BIG)
    hub.client_closed(cid)
    job.run()
    expect(hub.judged(cid, job), [])
    assert not hub.busy


def test_a_client_that_stops_sending_is_answered_before_it_is_closed() -> None:
    hub = off_loop_hub()
    cid = client(hub)
    job = send_big(hub, cid, BIG)
    expect(hub.client_eof(cid), [])  # not closed: its command has not even been judged
    assert hub.busy  # a graceful shutdown waits for it too
    job.run()
    assert upstream(hub.judged(cid, job))
    expect(
        hub.upstream_data(b'{"return": {}, "id": 0}\r\n'),
        [ToClient(cid, BIG_REPLY), CloseClient(cid, "client finished sending")],
    )


def test_a_judgement_that_fails_costs_its_client_the_connection_and_nobody_else(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hub = off_loop_hub()
    cid, other = client(hub), client(hub)
    job = send_big(hub, cid, BIG)
    job.error = RuntimeError("a bug")
    expect(hub.judged(cid, job), [CloseClient(cid, "internal error")])
    assert "client 1: internal error" in caplog.text
    expect(
        hub.client_data(other, b'{"execute":"query-status","id":"q"}'),
        [ToUpstream(b'{"execute":"query-status"}')],
    )


def test_a_big_getfd_judged_off_the_loop_takes_the_fd_that_came_before_it() -> None:
    # The fd facts are read with the verdict (fdpass.fd_facts): whether the client has an
    # fd waiting is taken when the message is handed off, and nothing changes it meanwhile.
    hub = off_loop_hub()
    cid = client(hub)
    name = "n" * OFF_LOOP_BYTES
    message = b'{"execute":"getfd","arguments":{"fdname":"%s"},"id":"g"}' % name.encode()
    job = send_big(hub, cid, message, fds=[100])
    assert job.has_fds
    job.run()
    actions = hub.judged(cid, job)
    renamed = b'{"execute":"getfd","arguments":{"fdname":"qmpmux.%d.%s"},"id":0}'
    sent = [a for a in actions if isinstance(a, ToUpstream)]
    assert len(sent) == 1 and sent[0].fds == (100,)
    assert upstream(actions) == [renamed % (cid, name.encode())]
    assert hub.clients[cid].fd_names == {name}


@pytest.mark.parametrize("bound", [16 << 10, 4 << 10])
def test_judging_pauses_the_client_no_longer_than_inline_judging_would(bound: int) -> None:
    # Under its bound, a client reads on once its message is judged (an oob client must
    # be able to send an exec-oob past a stuck command); over it, it stays paused.
    limits = Limits(max_pending_bytes=bound)
    paused = []
    for off_loop_bytes in (None, OFF_LOOP_BYTES):
        hub = Hub(limits, off_loop_bytes=off_loop_bytes)
        hub.upstream_data(GREETING_OOB)
        hub.upstream_data(CAPS_OK)
        cid = client(hub)
        hub.client_data(cid, b'{"execute":"query-status","id":"q"}')  # (the window: 2)
        for i in range(0, len(BIG), 1024):
            for action in hub.client_data(cid, BIG[i : i + 1024]):
                if isinstance(action, Judge):
                    action.job.run()
                    hub.judged(cid, action.job)
        paused.append(hub.clients[cid].paused)
    assert paused[0] == paused[1] == (len(BIG) >= bound)


def test_a_command_judged_for_a_client_the_hub_is_closing_goes_nowhere() -> None:
    hub = off_loop_hub()
    cid = client(hub)
    name = b"n" * OFF_LOOP_BYTES
    job = send_big(hub, cid, b'{"execute":"getfd","arguments":{"fdname":"%s"}}' % name, fds=[100])
    actions = hub.session_over("QEMU went away")  # closes every client (and their fds)
    assert CloseClient(cid, "QEMU went away") in actions and CloseFds((100,)) in actions
    job.run()
    expect(hub.judged(cid, job), [])  # no command, no error for a client being closed
    assert job.cancelled and job.value is None


def test_a_client_gone_cancels_its_judgement_and_lets_go_of_its_input() -> None:
    hub = off_loop_hub()
    cid = client(hub)
    job = send_big(hub, cid, BIG, after=b'{"execute":"query-status"}')
    assert job.waiting
    hub.client_closed(cid)
    assert job.cancelled and job.value is None and not job.waiting
    job.run()  # (as the worker thread would, later): nothing is judged
    assert job.verdict is None and job.error is None


def test_a_reload_and_back_while_judging_still_judges_again() -> None:
    allowing = compile_policy({"ctl": ProfileSpec(commands=("transaction",))})
    hub = off_loop_hub(allowing)
    cid = client(hub, "ctl")
    job = send_big(hub, cid, BIG)
    hub.reload(compile_policy({"ctl": ProfileSpec(commands=("query-status",))}))
    hub.reload(allowing)  # the very profile it was handed off under, again
    assert job.profile is hub.clients[cid].session.profile
    job.run()
    assert [a for a in hub.judged(cid, job) if isinstance(a, Judge)]  # judged anew


def test_a_judgement_keeps_what_went_wrong_for_the_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    hub = off_loop_hub()
    cid = client(hub)
    job = send_big(hub, cid, BIG)

    def broken(session: Session, value: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(Session, "judge", broken)
    job.run()
    assert isinstance(job.error, RuntimeError) and job.verdict is None
    expect(hub.judged(cid, job), [CloseClient(cid, "internal error")])
