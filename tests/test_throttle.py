"""Log lines clients trigger at will are rate-limited per listener and globally."""

from __future__ import annotations

import ast
import asyncio
import logging
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qmpmux.config import Limits
from qmpmux.policy import ProfileSpec, compile_policy
from qmpmux.session import Peer
from qmpmux.throttle import LogThrottle
from tests.conftest import start_mux
from tests.playbook import ready_hub
from tests.realqemu import Qemu, RawClient


class Clock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_rate_then_a_summary() -> None:
    clock = Clock()
    t = LogThrottle(rate=1.0, burst=3, global_rate=100.0, global_burst=100, clock=clock)
    assert [t.admit("denial", "unix:a") for _ in range(5)] == ["", "", "", None, None]
    assert t.suppressed() == 2
    clock.now = 10.0
    assert t.admit("denial", "unix:a") == (
        " [2 similar lines suppressed on listener unix:a in the last 10 s]"
    )
    assert t.admit("denial", "unix:a") == "" and t.suppressed() == 0


def test_kinds_are_summarized_apart_and_listeners_have_their_own_bucket() -> None:
    clock = Clock()
    t = LogThrottle(rate=1.0, burst=1, global_rate=100.0, global_burst=100, clock=clock)
    assert t.admit("denial", "unix:a") == ""
    assert t.admit("denial", "unix:a") is None
    assert t.admit("audit-only", "unix:a") is None
    assert t.admit("denial", "unix:b") == ""  # another listener is not starved
    clock.now = 1.0
    assert t.admit("audit-only", "unix:a") == (
        " [1 similar line suppressed on listener unix:a in the last 1 s]"
    )
    assert t.suppressed() == 1  # the denial is still owed


def test_the_global_bucket_bounds_many_listeners() -> None:
    t = LogThrottle(rate=1.0, burst=5, global_rate=1.0, global_burst=8, clock=Clock())
    admitted = [t.admit("denial", f"unix:{i}") for i in range(100) for _ in range(5)]
    assert sum(a is not None for a in admitted) == 8


@given(
    st.lists(
        st.tuples(
            st.floats(0, 3, allow_nan=False),
            st.sampled_from(["unix:a", "unix:b", "tcp:c"]),
            st.sampled_from(["denial", "audit-only"]),
        ),
        max_size=300,
    )
)
def test_bounds_hold_and_nothing_is_lost_silently(
    events: list[tuple[float, str, str]],
) -> None:
    clock = Clock()
    t = LogThrottle(rate=0.5, burst=4, global_rate=1.0, global_burst=6, clock=clock)
    log: list[tuple[float, str]] = []
    reported = 0
    for dt, listener, kind in events:
        clock.now += dt
        note = t.admit(kind, listener)
        if note is not None:
            log.append((clock.now, listener))
            if note:
                m = re.fullmatch(r" \[(\d+) similar lines? suppressed on listener (\S+) .*\]", note)
                assert m is not None and m[2] == listener
                reported += int(m[1])
    assert len(log) + reported + t.suppressed() == len(events)
    for i, (start, _) in enumerate(log):  # every window [start, end]
        for j in range(i, len(log)):
            span = log[j][0] - start
            window = log[i : j + 1]
            assert len(window) <= 6 + 1.0 * span + 1e-9
            for name in ("unix:a", "unix:b", "tcp:c"):
                assert sum(n == name for _, n in window) <= 4 + 0.5 * span + 1e-9


def test_reconnecting_does_not_reset_the_limit(caplog: pytest.LogCaptureFixture) -> None:
    """The flood from the issue: a client reconnecting between bursts of denied commands."""
    clock = Clock()
    hub = ready_hub()
    hub.reload(compile_policy({"ro": ProfileSpec(base="readonly")}))
    hub.log_limit = LogThrottle(clock=clock)
    with caplog.at_level(logging.WARNING, logger="qmpmux.client"):
        for _ in range(50):
            cid, _ = hub.client_connected(Peer("unix:l", profile="ro"))
            hub.client_data(cid, b'{"execute":"qmp_capabilities"}' + b'{"execute":"stop"}' * 30)
            hub.client_closed(cid)
        denials = [r for r in caplog.records if "denied by profile" in r.getMessage()]
        assert len(denials) == hub.log_limit.burst == 20
        clock.now = 60.0
        cid, _ = hub.client_connected(Peer("unix:l", profile="ro"))
        hub.client_data(cid, b'{"execute":"qmp_capabilities"}{"execute":"stop"}')
    last = caplog.records[-1].getMessage()
    assert "[1480 similar lines suppressed on listener unix:l in the last 60 s]" in last


def test_connect_and_disconnect_lines_of_a_reconnect_loop_are_bounded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Connecting is something a client does at will too: a reconnect loop costs the
    log a bounded number of lines, then one summary per kind."""
    clock = Clock()
    hub = ready_hub(limits=Limits(max_clients=1))
    hub.log_limit = LogThrottle(clock=clock)
    with caplog.at_level(logging.INFO, logger="qmpmux.client"):
        for _ in range(1000):
            cid, _ = hub.client_connected(Peer("unix:l"))
            hub.client_connected(Peer("unix:l"))  # refused: max-clients
            hub.client_closed(cid)
        assert len(caplog.records) == hub.log_limit.burst
        clock.now = 60.0
        cid, _ = hub.client_connected(Peer("unix:l"))
    assert "similar lines suppressed on listener unix:l" in caplog.records[-1].getMessage()


def test_denial_lines_stay_one_line_whatever_the_name(caplog: pytest.LogCaptureFixture) -> None:
    hub = ready_hub()
    hub.reload(compile_policy({"ro": ProfileSpec(base="readonly")}))
    cid, _ = hub.client_connected(Peer("unix:l", profile="ro"))
    name = "x\\n\\r\\u2028\\u2029\\u0085\\u000b\\u000c\\u001c\\u001d\\u001ey"
    with caplog.at_level(logging.WARNING, logger="qmpmux.client"):
        hub.client_data(cid, b'{"execute":"qmp_capabilities"}{"execute":"' + name.encode() + b'"}')
    (record,) = caplog.records
    assert len(record.getMessage().splitlines()) == 1


def test_throttle_does_no_io() -> None:
    tree = ast.parse((Path(__file__).parent.parent / "qmpmux" / "throttle.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"__future__", "time", "collections.abc", "typing"}


async def test_a_reconnecting_flood_through_qemu_logs_a_bounded_number_of_lines(
    qemu: Qemu, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mux = await start_mux(qemu, tmp_path, profiles=("readonly",))
    clock = Clock()
    mux.proxy.hub.log_limit = LogThrottle(clock=clock)  # real time would make it a race
    path = mux.sockets["readonly"]
    caplog.set_level(logging.WARNING, logger="qmpmux.client")
    try:
        for _ in range(40):
            client = await RawClient.connect(path)
            await client.negotiate()
            await client.send(b'{"execute":"stop"}' * 5)
            replies = await client.read_n(5)
            assert all(b"refused by qmpmux policy" in r for r in replies)
            await client.close()
        clock.now = 30.0
        client = await RawClient.connect(path)
        await client.negotiate()
        assert b"refused" in await client.command(b'{"execute":"stop"}')
        await client.close()
    finally:
        mux.proxy.stop("test over")
        await asyncio.wait_for(mux.proxy.wait(), 10)
    denials = [r.getMessage() for r in caplog.records if "denied by profile" in r.getMessage()]
    assert len(denials) == 21  # the burst, then the one after the pause
    assert f"[180 similar lines suppressed on listener unix:{path} in the last 30 s]" in denials[-1]
