"""Secrets never reach the audit log (reference section 11.1), whatever the profile says."""

from __future__ import annotations

import logging

import msgspec
import pytest

from qmpmux.hub import Audit, ToUpstream
from qmpmux.policy import ProfileSpec, compile_policy
from qmpmux.qjson import JsonValue
from qmpmux.redact import REDACTED, redact
from qmpmux.session import Peer
from tests.playbook import ready_hub

CASES: list[tuple[str, dict[str, JsonValue], list[str]]] = [
    ("set_password", {"protocol": "vnc", "password": "s3cret"}, ["s3cret"]),
    ("change-vnc-password", {"password": "s3cret"}, ["s3cret"]),
    ("object-add", {"qom-type": "secret", "id": "k", "data": "s3cret", "iv": "ivv"},
     ["s3cret", "ivv"]),
    ("object-add", {"qom-type": "secret_keyring", "id": "k", "serial": 1234567}, ["1234567"]),
    ("object-add", {"qom-type": "tls-creds-psk", "id": "t", "username": "alice"}, ["alice"]),
    ("sev-inject-launch-secret", {"packet-header": "hdr", "secret": "s3cret"},
     ["hdr", "s3cret"]),
    ("blockdev-add", {"driver": "https", "node-name": "n",
                      "url": "https://bob:pw@example.org/disk", "cookie": "session=abc"},
     ["bob:pw", "session=abc"]),
    ("netdev_add", {"type": "l2tpv3", "id": "n", "txcookie": 1, "rxcookie": 2, "cookie64": True},
     ['"txcookie":1', '"rxcookie":2', '"cookie64":true']),
    ("human-monitor-command", {"command-line": "change vnc password s3cret"}, ["s3cret"]),
    ("migrate", {"uri": "exec:ssh user@host secret-cmd"}, ["secret-cmd"]),
    ("send-key", {"keys": [{"type": "qcode", "data": "p"}]}, ['"data":"p"']),
    ("input-send-event", {"events": [{"type": "key"}]}, ['"type":"key"']),
    ("ringbuf-write", {"device": "r", "data": "typed password"}, ["typed password"]),
]  # fmt: skip


@pytest.mark.parametrize(("command", "arguments", "secrets"), CASES)
def test_secrets_are_redacted(
    command: str, arguments: dict[str, JsonValue], secrets: list[str]
) -> None:
    text = msgspec.json.encode(redact(command, arguments)).decode()
    for secret in secrets:
        assert secret not in text
    assert REDACTED in text


def test_references_to_secrets_are_kept() -> None:
    args: dict[str, JsonValue] = {"driver": "luks", "key-secret": "sec0", "node-name": "n"}
    assert redact("blockdev-add", args) == args


def test_audit_only_profile_lets_commands_through_and_records_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    policy = compile_policy({"learn": ProfileSpec(base="readonly", audit_only=True)})
    hub = ready_hub()
    hub.audit = True
    hub.reload(policy)
    cid, _ = hub.client_connected(Peer("unix:t", profile="learn", uid=5, gid=6, pid=7))
    hub.client_data(cid, b'{"execute":"qmp_capabilities"}')
    with caplog.at_level(logging.WARNING):
        actions = hub.client_data(cid, b'{"execute":"stop","id":1}')
    assert actions == [ToUpstream(b'{"execute":"stop","id":0}')]
    (audit,) = [
        a for a in hub.upstream_data(b'{"return": {}, "id": 0}\r\n') if isinstance(a, Audit)
    ]
    record = msgspec.json.decode(audit.record)
    assert record["decision"] == "audit-only" and record["command"] == "stop"
    assert (record["uid"], record["gid"], record["pid"]) == (5, 6, 7)
    assert "would be denied by profile learn" in caplog.text
