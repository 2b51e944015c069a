"""Secrets never reach the audit log (docs/protocol.md §10.4), whatever the profile says."""

from __future__ import annotations

import json
import logging

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qmpmux.hub import Audit, Hub, ToUpstream
from qmpmux.policy import ProfileSpec, compile_policy
from qmpmux.qjson import JsonValue
from qmpmux.redact import REDACTED, encode_record, redact
from qmpmux.scrub import scrub_return
from qmpmux.session import AUDITED_ARGUMENTS_MAX, Peer
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
    assert actions == [ToUpstream(b'{"execute":"stop"}')]
    (audit,) = [a for a in hub.upstream_data(b'{"return": {}}\r\n') if isinstance(a, Audit)]
    record = msgspec.json.decode(audit.record)
    assert record["decision"] == "audit-only" and record["command"] == "stop"
    assert (record["uid"], record["gid"], record["pid"]) == (5, 6, 7)
    assert "would be denied by profile learn" in caplog.text


# Each value hides "hunter2" (or the listed secrets); found verbatim in audit logs before.
STRUCTURE_CASES: list[tuple[str, dict[str, JsonValue], list[str]]] = [
    ("blockdev-add", {"url": "http://u:p@hunter2@host/"}, ["hunter2", "u:p"]),
    ("blockdev-add", {"url": "https://u:p@x@hunter2@host:443/d@isk"}, ["hunter2"]),
    ("chardev-add", {"addr": "tcp:user:hunter2@127.0.0.1:1"}, ["hunter2"]),
    ("chardev-add", {"addr": "TCP:hunter2@127.0.0.1:1"}, ["hunter2"]),
    ("blockdev-add", {"url": "http://user:hun ter2 x@host/"}, ["hun ter2", "ter2 x"]),
    ("blockdev-add", {"url": "ssh://me:hunter2/slash@host/p"}, ["hunter2"]),
    ("blockdev-add", {"url": "nbd+unix://me:hunter2@/exp?socket=/s"}, ["hunter2"]),
    ("migrate", {"uri": "EXEC:hunter2"}, ["hunter2"]),
    ("migrate", {"uri": "  Exec:ssh host hunter2"}, ["hunter2"]),
    ("migrate", {"channels": [{"channel-type": "main",
                               "addr": {"transport": "exec", "args": ["sh", "-c", "hunter2"]}}]},
     ["hunter2"]),
    ("blockdev-add", {"url": "https://host/d?x=1&password=hunter2&y=2"}, ["hunter2"]),
    ("blockdev-add", {"url": "https://host/d?PassWord=hunter2"}, ["hunter2"]),
    ("blockdev-add", {"url": "https://host/d?pass%77ord=hunter2"}, ["hunter2"]),
    ("blockdev-add", {"url": "https://host/d?token=hun:ter2=x y&z=1"}, ["hun:ter2=x y"]),
    ("blockdev-add", {"url": "https://host/d#access_token=hunter2&state=1"}, ["hunter2"]),
    ("blockdev-add", {"url": "https://host/d;api-key=hunter2"}, ["hunter2"]),
    ("blockdev-add", {"url": "http://host/?password=hunt@er2"}, ["hunt", "er2"]),
    ("blockdev-add", {"url": "http://u:hunt&password=er2@host/"}, ["hunt", "er2"]),
    ("blockdev-add", {"filename": "rbd:pool/img:id=admin:key=hunter2\\:x:conf=/c"},
     ["hunter2", "\\:x"]),
    ("blockdev-add", {"opts": "user=admin,password=hun,,ter2,x=1"}, ["hun,,ter2", "ter2"]),
    ("blockdev-add", {"file": 'json:{"driver":"http","password":"hunter2",'
                              '"url":"http://a:b@c/"}'}, ["hunter2", "a:b"]),
    ("blockdev-add", {"file": "json:{not json hunter2"}, ["hunter2"]),
    ("x-anything", {"Password": "hunter2"}, ["hunter2"]),
    ("x-anything", {"a": [{"b": {"PASSWD": "hunter2"}}]}, ["hunter2"]),
    ("x-anything", {"a": {"token": "hunter2", "x-token": "hunter3"}}, ["hunter2", "hunter3"]),
    ("x-anything", {"apiKey": "hunter2", "api_key": "hunter3", "Client_Secret": "hunter4"},
     ["hunter2", "hunter3", "hunter4"]),
    ("x-anything", {"auth": {"user": "u", "pw": "hunter2"}, "sessionId": "hunter3"},
     ["hunter2", "hunter3"]),
    ("x-anything", {"credentials": ["hunter2"], "Cookie": "hunter3"}, ["hunter2", "hunter3"]),
    ("Set_Password", {"protocol": "vnc", "password": "hunter2"}, ["hunter2"]),
    ("HUMAN_MONITOR_COMMAND", {"Command-Line": "change vnc password hunter2"}, ["hunter2"]),
    ("object-add", {"qom-type": "Secret", "id": "s", "DATA": "hunter2"}, ["hunter2"]),
    ("object-add", {"qom-type": "secret", "id": "s", "props": {"data": "hunter2"}},
     ["hunter2"]),
    ("transaction", {"actions": [{"qom-type": "secret", "data": "hunter2"}]}, ["hunter2"]),
    ("qom-set", {"path": "/objects/s", "property": "Password", "value": "hunter2"},
     ["hunter2"]),
]  # fmt: skip


@pytest.mark.parametrize(("command", "arguments", "secrets"), STRUCTURE_CASES)
def test_secrets_are_redacted_by_structure(
    command: str, arguments: dict[str, JsonValue], secrets: list[str]
) -> None:
    line = encode_record({"command": command, "arguments": redact(command, arguments)})
    text = json.dumps(json.loads(line), ensure_ascii=False)
    for secret in secrets:
        assert secret.encode() not in line and secret not in text
    assert REDACTED in text


def test_references_and_plain_values_are_kept() -> None:
    args: dict[str, JsonValue] = {
        "driver": "qcow2", "key-secret": "sec0", "password-secret": "sec1", "keyid": "k",
        "tls-creds": "tls0", "pass-discard-request": True, "host-key-check": {"mode": "none"},
        "file": "https://example.org/a?x=1&y=2#frag", "email": "bob@example.org",
    }  # fmt: skip
    assert redact("blockdev-add", args) == args


@pytest.mark.parametrize(
    "name",
    ["password", "Password", "PASSWD", "pass", "pwd", "secret", "token", "x-token", "X-Auth-Token",
     "api_key", "apiKey", "api-key", "auth", "cookie", "cookie64", "credential", "credentials",
     "session", "session_id", "access_token", "Client_Secret", "passphrase"],
)  # fmt: skip
def test_secret_member_names(name: str) -> None:
    assert redact("x", {name: "s"}) == {name: REDACTED}


@pytest.mark.parametrize(
    "name", ["key-secret", "password-secret", "new-secret", "keyid", "passwordid", "tls-creds",
             "host-key-check", "pass-discard-other", "key-offset", "id", "url"],
)  # fmt: skip
def test_member_names_that_are_not_secrets(name: str) -> None:
    assert redact("x", {name: "s"}) == {name: "s"}


# Property: a secret made of characters that appear nowhere else (non-ASCII "markers",
# each followed by any structural character or none) leaves no trace of any part of it.
_MARKERS = "ÆØÅßΩЖж\u2028\u0085"
_KEYS = ["password", "Password", "PASSWD", "pwd", "token", "X-Token", "api_key", "apiKey",
         "secret", "Cookie", "auth", "credentials", "sessionid"]  # fmt: skip


def _secret(structural: str) -> st.SearchStrategy[str]:
    pair = st.tuples(st.sampled_from(_MARKERS), st.sampled_from(["", *structural]))
    return st.lists(pair, min_size=1, max_size=12).map(lambda ps: "".join(a + b for a, b in ps))


_SCHEMES = st.sampled_from(["http", "HTTPS", "ftp", "ssh", "nbd+tcp", "iscsi", "x-y.z", "tcp"])
_HOSTS = st.sampled_from(["host", "127.0.0.1", "[::1]", "example.org:8080", ""])
_TAILS = st.sampled_from(["", "/", "/d/x", "/d?x=1", ":1", "#f"])
_PREFIXES = st.sampled_from(["", "file=", "see ", "a,b "])


@st.composite
def _embedded(draw: st.DrawFn) -> tuple[JsonValue, str]:
    shape = draw(st.integers(0, 5))
    if shape <= 1:  # user info, with and without `//`: anything up to the host part
        secret = draw(_secret("@:/ ?#&=%+,;"))
        user = draw(st.sampled_from(["", "u:", "user:", "u@x:"]))
        sep = "://" if shape == 0 else ":"
        text = (draw(_PREFIXES) + draw(_SCHEMES) + sep + user + secret + "@" + draw(_HOSTS)
                + draw(_TAILS))  # fmt: skip
        return text, secret
    if shape == 2:  # a query or fragment parameter
        secret = draw(_secret(" @:/?=%+"))
        lead = draw(st.sampled_from(["?", "?a=1&", "#", "?a=b;", "?a=1&b=2&"]))
        key = draw(st.sampled_from(_KEYS))
        tail = draw(st.sampled_from(["", "&z=1", "#frag", ";q=2"]))
        return f"{draw(_SCHEMES)}://{draw(_HOSTS)}/p{lead}{key}={secret}{tail}", secret
    if shape == 3:  # exec:
        secret = draw(_secret(" :/@=&"))
        lead = draw(st.sampled_from(["", " ", "\t"]))
        return lead + draw(st.sampled_from(["exec:", "EXEC:", "Exec:"])) + secret, secret
    secret = draw(_secret(" :/@=&?#"))  # a member at some depth
    value: JsonValue = {draw(st.sampled_from(_KEYS)): secret}
    for _ in range(draw(st.integers(0, 3))):
        wraps: list[JsonValue] = [[value], {"inner": value}, {"x": 1, "list": [1, value]}]
        value = draw(st.sampled_from(wraps))
    return value, secret


@given(_embedded(), st.sampled_from(["blockdev-add", "migrate", "x-custom", "object-add"]))
def test_random_secrets_never_reach_the_record(case: tuple[JsonValue, str], command: str) -> None:
    value, secret = case
    line = encode_record({"arguments": redact(command, {"v": value})})
    assert secret.encode() not in line
    text = json.dumps(json.loads(line), ensure_ascii=False)
    assert not any(ch in text for ch in _MARKERS), (value, text)


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda kids: st.lists(kids) | st.dictionaries(st.text(), kids),
)


@given(st.text(), _JSON_VALUES)
def test_every_record_is_one_line(name: str, arguments: JsonValue) -> None:
    record = {"command": name, "arguments": arguments, "profile": "p\u2028\u0085\u2029\x7f\n"}
    line = encode_record(record)
    assert line.count(b"\n") == 1 and line.endswith(b"\n") and line.isascii()
    assert len(line.decode().splitlines()) == 1
    assert json.loads(line) == record


def audited_client() -> tuple[Hub, int]:
    """A hub writing audit records, and a negotiated client whose profile records
    arguments."""
    policy = compile_policy({"p": ProfileSpec(base="readonly", audit_arguments=True)})
    hub = ready_hub()
    hub.audit = True
    hub.reload(policy)
    cid, _ = hub.client_connected(Peer("unix:t", profile="p"))
    hub.client_data(cid, b'{"execute":"qmp_capabilities"}')
    return hub, cid


def test_line_separators_in_a_command_stay_inside_its_record() -> None:
    """A client's U+2028/U+0085/U+2029 never split the audit file for a line reader."""
    hub, cid = audited_client()
    command = '{"execute":"x\u2028y\u0085z","arguments":{"a":"1\u20292\u2028"}}'
    actions = hub.client_data(cid, command.encode())
    (audit,) = [a for a in actions if isinstance(a, Audit)]
    assert audit.record.count(b"\n") == 1
    assert len(audit.record.decode().splitlines()) == 1
    record = json.loads(audit.record)
    assert record["command"] == "x\u2028y\u0085z" and record["arguments"]["a"] == "1\u20292\u2028"


def test_arguments_too_big_to_record_are_recorded_by_size() -> None:
    """audit-arguments records arguments up to 64 KiB of the client's text; past that
    only their size: redacting and encoding a megabyte of them held the loop 25-65 ms."""
    hub, cid = audited_client()
    records = []
    for size in (AUDITED_ARGUMENTS_MAX - 8, AUDITED_ARGUMENTS_MAX + 1):
        text = b'{"a":"' + b"x" * (size - 8) + b'"}'
        assert len(text) == size
        actions = hub.client_data(cid, b'{"execute":"quit","arguments":' + text + b"}")
        (audit,) = [a for a in actions if isinstance(a, Audit)]
        records.append(json.loads(audit.record))
    whole, sized = records
    assert whole["arguments"]["a"] == "x" * (AUDITED_ARGUMENTS_MAX - 16)
    assert "arguments" not in sized and sized["arguments_bytes"] == AUDITED_ARGUMENTS_MAX + 1


def test_replies_without_credentials_stay_qemus_bytes() -> None:
    """scrub.py: a reply with nothing to scrub is passed on byte for byte."""
    plain = b'[{"node-name": "n0", "file": "/var/lib/img.qcow2", "cache": {"direct": false}}]'
    assert scrub_return(plain) is plain
    # A `json:` filename (block.c bdrv_refresh_filename) with nothing secret in it.
    spelt = b'[{"file": "json:{\\"offset\\": 512, \\"driver\\": \\"raw\\"}"}]'
    assert scrub_return(spelt) is spelt
    secret = (
        b'[{"file": "json:{\\"file\\": {\\"url\\": \\"https://bob:pw@h/x\\"}}",'
        b' "backing_file": "ssh://u:pw@h/y", "key-secret": "sec0"}]'
    )
    scrubbed = scrub_return(secret)
    assert b"pw" not in scrubbed and b"bob" not in scrubbed
    assert b'"key-secret": "sec0"' in scrubbed  # a reference to a secret object stays
    assert b"https://<redacted>@h/x" in scrubbed
