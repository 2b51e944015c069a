"""Secrets out of command arguments before anything records them (docs/protocol.md §10.4).

Audit logs are kept, shipped and read by more people than the VM's owner, so arguments
that carry secrets are replaced by `"<redacted>"` whatever the profile says. Redaction
follows the structure of the value, never one spelling of it, because the audit records
what a client *sent*, including commands QEMU then rejects for a wrong case or shape:

- Whole arguments, per command (`set_password`'s password, the whole of an HMP command
  line, guest keystrokes, ringbuf input, ...), and `secret`-like QOM objects' members
  wherever an object-add shaped dict appears (also under a legacy `props`). Command,
  type and member names are compared case-insensitively with `_` and `-` alike.
- Members whose name says secret at any depth: the name's letters, lowercased, end in
  password, passwd, pass, pwd, passphrase, secret, token, key, auth, cookie,
  credential(s), session(id) (`Password`, `x-token`, `api_key`, `cookie64`, ...). A
  lowercase hyphenated `*-secret` name (`key-secret`, `password-secret`) is QEMU's
  convention for the *id* of a secret object and is kept, as are `*id` references
  (`keyid`, `passwordid`) and `tls-creds`.
- Inside strings: everything after `exec:` (any case, leading blanks allowed) and the
  arguments of a `transport: exec` migration address; in a URL-like string, everything
  between the first `scheme:` (or `scheme://`) and the LAST `@`, so user info with `@`,
  `:`, `/` or blanks in it goes whole, `tcp:user:pw@host:1` included; the value of any
  `key=value` query, fragment or option parameter whose key says secret; and `json:`
  pseudo-filenames are parsed and redacted as the structure they are.

Over-redaction (a path with an `@`, a boolean named `...-key`) is the accepted price: a
record may lose detail, never leak. Every pattern runs in linear time, since a client
controls these strings.

`encode_record` makes the audit line itself: one JSON object, ASCII only (every
non-ASCII character, including U+0085, U+2028 and U+2029, as a `\\uXXXX` escape), so
no reader's idea of a line separator can split a record.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from typing import Final
from urllib.parse import unquote

import msgspec

from qmpmux.policy import SECRET_PROPERTIES
from qmpmux.qjson import JsonValue

REDACTED: Final = "<redacted>"


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


# Whole arguments, per command (normalized names).
_BY_COMMAND: Final[dict[str, frozenset[str]]] = {
    "set-password": frozenset({"password"}),
    "change-vnc-password": frozenset({"password"}),
    "sev-inject-launch-secret": frozenset({"secret", "packet-header"}),
    "human-monitor-command": frozenset({"command-line"}),
    "send-key": frozenset({"keys"}),
    "input-send-event": frozenset({"events"}),
    "ringbuf-write": frozenset({"data"}),
}
# Members of an object-add shaped dict, per QOM type (normalized names).
_BY_QOM_TYPE: Final[dict[str, frozenset[str]]] = {
    "secret": frozenset({"data", "iv"}),
    "secret-keyring": frozenset({"serial"}),
    "tls-creds-psk": frozenset({"username"}),
}
# A member name is secret when its letters end in one of these.
_SECRET_SUFFIX: Final = re.compile(
    r"(?:passwd|password|passphrase|passcode|pass|pwd|secret|token|key|auth|cookie"
    r"|credentials?|session|sessionid)$"
)
_NOT_LETTER: Final = re.compile(r"[^a-z]+")
# QEMU names a member holding the id of a `secret` object `<what>-secret`.
_REFERENCE: Final = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*-secret")

# `exec:` migration URIs (migration/exec.c); QEMU matches the prefix case-sensitively,
# but a misspelt command is still recorded.
_EXEC: Final = re.compile(r"(?i)\s*exec:")
# The `json:` pseudo-protocol of block filenames (block.c, parse_json_filename).
_JSON: Final = re.compile(r"(?i)\s*json:")
# A scheme can only start where no scheme character precedes it, and the possessive
# quantifiers never backtrack, so the search is linear.
_SCHEME: Final = re.compile(r"(?i)(?<![a-z0-9+.-])[a-z][a-z0-9+.-]*+:(?://)?")
# `key=value` after a query, fragment, option or blank separator (or at the start): the
# value runs to the next `&`, `;`, `#` or `,` (QEMU's `,,` is a literal comma). After a
# `:` (rbd's legacy `rbd:pool/image:id=admin:key=...:conf=...`, block/rbd.c) it runs to
# the next unescaped `:`. Keys start only after a separator and every quantifier is
# possessive, so the search is linear.
_PARAM: Final = re.compile(
    r"(?:(?<=[?&;,#\s])|^)([^=?&;,#:\s]++)=((?:,,|[^,&;#])*+)"
    r"|(?<=:)([^=?&;,#:\s]++)=((?:\\:|[^:])*+)"
)


def secret_key(name: str) -> bool:
    """Whether a member or parameter called `name` holds a secret inline (a short name
    remembered: a reply of QEMU's names the same few dozen members thousands of times;
    scrubbing one of 100 KB took 13 ms, 2.5 ms so)."""
    return _short_secret_key(name) if len(name) <= _REMEMBERED else _secret_key(name)


_REMEMBERED: Final = 64


@functools.lru_cache(maxsize=4096)
def _short_secret_key(name: str) -> bool:
    return _secret_key(name)


def _secret_key(name: str) -> bool:
    if _REFERENCE.fullmatch(name):
        return False
    return _SECRET_SUFFIX.search(_NOT_LETTER.sub("", name.lower())) is not None


def _scrub_text(value: str) -> str:
    if ":" not in value and "=" not in value:  # no scheme, `exec:`, `json:` nor parameter
        return value
    if _EXEC.match(value):
        return "exec:" + REDACTED
    if m := _JSON.match(value):
        try:
            inner: JsonValue = msgspec.json.decode(value[m.end() :])
        except msgspec.DecodeError:
            return "json:" + REDACTED
        scrubbed = _scrub(inner)
        if scrubbed == inner:
            return value  # nothing secret: the filename as it was spelt
        return "json:" + msgspec.json.encode(scrubbed).decode()
    spans: list[tuple[int, int]] = []
    at = value.rfind("@")
    if at > 0 and (scheme := _SCHEME.search(value, 0, at)) is not None:
        spans.append((scheme.end(), at))  # user info runs to the last `@`
    if "=" in value:
        for m in _PARAM.finditer(value):
            group = 1 if m[1] is not None else 3
            if secret_key(unquote(m[group])):
                spans.append(m.span(group + 1))
    if not spans:
        return value
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    out: list[str] = []
    pos = 0
    for start, end in merged:
        out += (value[pos:start], REDACTED)
        pos = end
    out.append(value[pos:])
    return "".join(out)


def _scrub_dict(
    value: dict[str, JsonValue], hide: frozenset[str] = frozenset()
) -> dict[str, JsonValue]:
    qom_type = value.get("qom-type")
    if isinstance(qom_type, str):
        hide = hide | _BY_QOM_TYPE.get(_norm(qom_type), frozenset())
    transport = value.get("transport")
    if isinstance(transport, str) and _norm(transport.strip()) == "exec":
        hide = hide | {"args"}  # MigrationExecCommand (qapi/migration.json)
    out: dict[str, JsonValue] = {}
    for k, v in value.items():
        if secret_key(k) or (hide and _norm(k) in hide):
            out[k] = REDACTED
        elif k == "props" and isinstance(v, dict) and isinstance(qom_type, str):
            out[k] = _scrub_dict(v, hide)  # object-add before QEMU 6.0 nested them here
        else:
            out[k] = _scrub(v)
    return out


def _scrub(value: JsonValue) -> JsonValue:
    if isinstance(value, str):
        return _scrub_text(value)
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    if isinstance(value, dict):
        return _scrub_dict(value)
    return value


def scrub_value(value: JsonValue) -> JsonValue:
    """A copy of any JSON value with the structural redaction above (for replies that
    can carry credentials, scrub.py)."""
    return _scrub(value)


def redact(command: str, arguments: dict[str, JsonValue]) -> dict[str, JsonValue]:
    """A copy of `arguments` safe to log."""
    name = _norm(command)
    hide = _BY_COMMAND.get(name, frozenset())
    if name == "qom-set":
        prop = arguments.get("property")
        if isinstance(prop, str) and (prop.lower() in SECRET_PROPERTIES or secret_key(prop)):
            hide = frozenset({"value"})
    return _scrub_dict(arguments, hide)


def encode_record(record: Mapping[str, object]) -> bytes:
    """One audit line: compact JSON, ASCII only, ending in its single `\\n`.

    msgspec escapes C0 controls but writes U+0085, U+2028 and U+2029 raw, and
    `str.splitlines()` or a JavaScript reader splits a line there; ASCII-only text has
    no separator but `\\n` in any reader. Only a non-ASCII record (rare) pays for the
    round trip through the C-accelerated stdlib encoder.
    """
    data = msgspec.json.encode(record)
    if not data.isascii() or b"\x7f" in data:
        text = json.dumps(json.loads(data), ensure_ascii=True, separators=(",", ":"))
        data = text.replace("\x7f", "\\u007f").encode()  # DEL only occurs inside strings
    return data + b"\n"
