"""Regressions for defects found in review: each test fails on the code before its fix."""

from __future__ import annotations

import itertools
import logging

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmpmux import session as session_module
from qmpmux.config import ConfigError, Limits, check_limits
from qmpmux.hub import Audit, CloseClient, Hub, PauseClient, ToClient
from qmpmux.policy import DEFAULT_POLICY, Decision, Policy, ProfileSpec, compile_policy
from qmpmux.qjson import JsonValue
from qmpmux.redact import redact
from qmpmux.session import Peer
from qmpmux.throttle import LogThrottle
from qmpmux.wire import UpstreamFramer
from tests.conftest import Mux
from tests.playbook import ready_hub, spelled_out
from tests.realqemu import RawClient
from tests.test_extensions import POLICY as EXTENSION_POLICY


def client(
    hub_profile: str, policy: Policy = DEFAULT_POLICY, limits: Limits | None = None
) -> tuple[Hub, int]:
    hub = ready_hub(limits=limits)
    hub.reload(policy)
    cid, _ = hub.client_connected(Peer("unix:t", profile=hub_profile, uid=1, gid=1, pid=1))
    hub.client_data(cid, b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}')
    return hub, cid


def test_a_command_too_big_for_qemu_after_re_encoding_is_refused_here(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(session_module, "MAX_UPSTREAM_BYTES", 64)
    hub, cid = client("full")
    # Over the (lowered) limit upstream: nothing of it may reach QEMU.
    data = b'{"execute":"query-name","arguments":{"a":"' + b"\xc0\x80" * 20 + b'"},"id":1}'
    assert hub.client_data(cid, data) == [
        ToClient(cid, b'{"error": {"class": "GenericError", '
                      b'"desc": "JSON token size limit exceeded"}}\r\n')
    ]  # fmt: skip


def test_client_token_limit_leaves_room_for_qmpmux_id() -> None:
    hub, cid = client("full")
    assert hub.clients[cid].session.framer._max_tokens == 2 * 1024 * 1024 - 8


@pytest.mark.parametrize(
    ("limits", "key"),
    [
        (Limits(max_message_bytes=17 << 20), "max-message-bytes"),
        (Limits(upstream_window=0), "upstream-window"),
        (Limits(upstream_window=9), "upstream-window"),
        (Limits(client_window=-1), "client-window"),
        (Limits(outbox_bytes=-5), "outbox-bytes"),
        (Limits(max_pending_bytes=100), "max-pending-bytes"),
    ],
)
def test_nonsensical_limits_are_refused(limits: Limits, key: str) -> None:
    with pytest.raises(ConfigError, match=f"limits.{key}"):
        check_limits(limits)


def test_queued_bytes_pause_a_client_before_memory_grows() -> None:
    hub, cid = client("full", limits=Limits(max_pending_bytes=200, max_message_bytes=128,
                                            client_window=1))  # fmt: skip
    big = b'{"execute":"query-name","arguments":{"x":"' + b"a" * 40 + b'"}}'
    actions = hub.client_data(cid, big * 6)
    assert PauseClient(cid) in actions


def test_audit_record_survives_the_client_leaving() -> None:
    hub, cid = client("vm-control")
    hub.audit = True
    hub.client_data(cid, b'{"execute":"stop","id":1}')
    hub.client_closed(cid)
    (audit,) = hub.upstream_data(b'{"return": {}}\r\n')
    assert isinstance(audit, Audit)
    record = msgspec.json.decode(audit.record)
    assert (record["command"], record["profile"], record["result"]) == ("stop", "vm-control", "ok")


def test_audit_result_is_the_error_class_not_a_lookalike_in_the_return() -> None:
    hub, cid = client("full")
    hub.audit = True
    hub.client_data(cid, b'{"execute":"qom-get","id":1}')
    reply = b'{"return": "\\"error\\": {\\"class\\": \\"X\\""}\r\n'
    audit = [a for a in hub.upstream_data(reply) if isinstance(a, Audit)]
    assert msgspec.json.decode(audit[0].record)["result"] == "ok"


def test_audit_only_cannot_yank_qmpmux_own_monitor() -> None:
    policy = compile_policy({"learn": ProfileSpec(base="full", audit_only=True)})
    hub, cid = client("learn", policy)
    hub.protected = frozenset({"qmpmux0"})
    hub.clients[cid].session.protected = hub.protected
    yank = b'{"execute":"yank","arguments":{"instances":[{"type":"chardev","id":"qmpmux0"}]}}'
    (reply,) = hub.client_data(cid, yank)
    assert isinstance(reply, ToClient) and b"refused by qmpmux policy" in spelled_out(reply.data)


def test_transaction_cannot_smuggle_what_the_profile_denies() -> None:
    p = compile_policy(
        {"snap": ProfileSpec(commands=("transaction", "blockdev-snapshot-sync"))}
    ).profiles["snap"]
    ok: dict[str, JsonValue] = {
        "actions": [{"type": "blockdev-snapshot-sync", "data": {}}, {"type": "abort"}]
    }
    bad: dict[str, JsonValue] = {
        "actions": [{"type": "blockdev-snapshot-sync"}, {"type": "drive-backup"}]
    }
    assert p.argument_problem("transaction", ok, frozenset()) is None
    assert "drive-backup" in (p.argument_problem("transaction", bad, frozenset()) or "")


def test_deny_globs_also_catch_downstream_extension_names() -> None:
    p = compile_policy({"p": ProfileSpec(base="full", deny_commands=("*drive*",))}).profiles["p"]
    assert p.command("__com.redhat_drive_add") is Decision.DENY
    assert p.command("device_add") is Decision.ALLOW and p.command("drive-backup") is Decision.DENY


def test_long_client_names_are_not_cached() -> None:
    p = compile_policy({"p": ProfileSpec(commands=("query-*",))}).profiles["p"]
    for i in range(20):
        assert p.command("x" * 1000 + str(i)) is Decision.DENY
    assert not p._commands


def test_client_chosen_names_cannot_forge_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    hub, cid = client("readonly")
    forged = b"stop\\nqmpmux: INFO qmpmux.client: client 7: connected, profile full"
    with caplog.at_level(logging.WARNING):
        hub.client_data(cid, b'{"execute":"' + forged + b'"}')
    assert len(caplog.records) == 1 and "\n" not in caplog.records[0].getMessage()


def test_denial_floods_are_not_logged_in_full(caplog: pytest.LogCaptureFixture) -> None:
    hub, cid = client("readonly")
    hub.log_limit = LogThrottle(clock=lambda: 0.0)  # no refill while it runs
    with caplog.at_level(logging.WARNING):
        hub.client_data(cid, b'{"execute":"stop"}' * 200)
    assert len(caplog.records) == 20


def test_extension_commands_check_their_arguments() -> None:
    hub, cid = client("full")
    (reply,) = hub.client_data(cid, b'{"execute":"__org.qmpmux_whoami","arguments":{"x":1}}')
    assert reply == ToClient(cid, b'{"error": {"class": "GenericError", '
                                  b'"desc": "Parameter \'x\' is unexpected"}}\r\n')  # fmt: skip


def test_a_bug_in_one_input_costs_only_that_client(monkeypatch: pytest.MonkeyPatch) -> None:
    hub, cid = client("full")

    def broken(self: object, value: object) -> object:
        raise RuntimeError("bug")

    monkeypatch.setattr(session_module.Session, "judge", broken)
    assert hub.client_data(cid, b'{"execute":"stop"}') == [CloseClient(cid, "internal error")]


def test_redaction_takes_linear_time_and_covers_qom_set() -> None:
    redact("x", {"a": "a." * 100_000})  # took minutes with a backtracking pattern
    assert redact("qom-set", {"path": "s", "property": "data", "value": "pw"})["value"] != "pw"
    assert redact("qom-set", {"path": "s", "property": "type", "value": "t"})["value"] == "t"


def test_pretty_upstream_block_in_many_reads_is_one_message() -> None:
    block = (b"{\r\n" + b"".join(b'    {\r\n        "name": "x%d"\r\n    },\r\n' % i
                                  for i in range(3000)) + b'    "id": 1\r\n}\r\n')  # fmt: skip
    framer = UpstreamFramer()
    out = [m for i in range(0, len(block), 997) for m in framer.feed(block[i : i + 997])]
    assert len(out) == 1 and out[0].startswith(b'{{"name": "x0"}, {"name": "x1"}')


async def test_ids_nested_1024_deep_come_back_as_from_qemu(mux: Mux) -> None:
    deep = b"[" * 1023 + b"1" + b"]" * 1023
    cmd = b'{"execute":"query-name","id":' + deep + b"}"
    replies = []
    for path in (mux.path, mux.direct):
        c = await RawClient.connect(path)
        await c.negotiate()
        replies.append(await c.command(cmd))
    assert replies[0] == replies[1] and replies[0].startswith(b'{"return": {}, "id": [[[')


def test_strip_extensions_leaves_the_clients_id_alone() -> None:
    hub, cid = client("plain", EXTENSION_POLICY)
    hub.client_data(cid, b'{"execute":"query-name","id":{"__tag":7,"n":1}}')
    (reply,) = hub.upstream_data(b'{"return": {"__x": 1, "name": "a"}}\r\n')
    # The id comes back whole, in QEMU's own member order for it.
    assert reply == ToClient(cid, b'{"return": {"name": "a"}, "id": {"n": 1, "__tag": 7}}\r\n')


@settings(max_examples=200, deadline=None)
@given(
    messages=st.lists(
        st.sampled_from(
            [
                b'{"return": {}, "id": 1}\r\n',
                b'{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}\r\n',
                b"{\r\n" + b'    "return": {\r\n    },\r\n    "id": 2\r\n}\r\n',  # pretty
                b'{  \r\n    "id": 4\r\n}\r\n',  # pretty, blanks after its `{`
                b"\r\n",
                b'{"return": 3}\n',
            ]
        ),
        max_size=8,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6),
)
def test_upstream_messages_do_not_depend_on_how_reads_split_them(
    messages: list[bytes], cuts: list[int]
) -> None:
    """A read of exactly one compact line is handed on as it is (the common reply); any
    other read goes through the line splitter: both give what byte-by-byte reading does."""
    stream = b"".join(messages)
    bounds = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    framer = UpstreamFramer()
    got = [m for a, b in itertools.pairwise(bounds) for m in framer.feed(stream[a:b])]
    one = UpstreamFramer()
    want = [m for i in range(len(stream)) for m in one.feed(stream[i : i + 1])]
    assert got == want
    lines = UpstreamFramer()  # a line a read, a pretty block's included
    assert [m for line in stream.splitlines(True) for m in lines.feed(line)] == want
