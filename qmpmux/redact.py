"""Secrets out of command arguments before anything records them (reference section 11.1).

Audit logs are kept, shipped and read by more people than the VM's owner, so arguments
that carry secrets are replaced by `"<redacted>"` whatever the profile says: passwords,
secret objects' data, inline cookies, the whole of an HMP command line, guest keystrokes
and console input, `exec:` migration commands, and user info in any URL. Names that only
reference a secret (`password-secret`, `key-secret`, `tls-creds`, ...) are kept.
"""

from __future__ import annotations

import re
from typing import Final

from qmpmux.policy import SECRET_PROPERTIES
from qmpmux.qjson import JsonValue

REDACTED: Final = "<redacted>"

# Whole arguments, per command.
_BY_COMMAND: Final[dict[str, frozenset[str]]] = {
    "set_password": frozenset({"password"}),
    "change-vnc-password": frozenset({"password"}),
    "sev-inject-launch-secret": frozenset({"secret", "packet-header"}),
    "human-monitor-command": frozenset({"command-line"}),
    "send-key": frozenset({"keys"}),
    "input-send-event": frozenset({"events"}),
    "ringbuf-write": frozenset({"data"}),
}
# object-add members, per QOM type.
_BY_QOM_TYPE: Final[dict[str, frozenset[str]]] = {
    "secret": frozenset({"data", "iv"}),
    "secret_keyring": frozenset({"serial"}),
    "tls-creds-psk": frozenset({"username"}),
}
# Members that hold a secret inline wherever they appear (curl `cookie`, l2tpv3 cookies).
_ANYWHERE: Final = frozenset({"cookie", "txcookie", "rxcookie", "cookie64", "password"})
# Linear time: the scheme can only start where no scheme character precedes it, and the
# possessive quantifiers never backtrack (a client controls these strings).
_USERINFO: Final = re.compile(r"(?i)(?<![a-z0-9+.-])([a-z][a-z0-9+.-]*+://)[^/@\s]*+@")


def _scrub(value: JsonValue) -> JsonValue:
    if isinstance(value, str):
        if value.startswith("exec:"):
            return "exec:" + REDACTED
        return _USERINFO.sub(r"\1" + REDACTED + "@", value)
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    if isinstance(value, dict):
        return {k: REDACTED if k in _ANYWHERE else _scrub(v) for k, v in value.items()}
    return value


def redact(command: str, arguments: dict[str, JsonValue]) -> dict[str, JsonValue]:
    """A copy of `arguments` safe to log."""
    hide = _BY_COMMAND.get(command, frozenset())
    if command == "qom-set":
        prop = arguments.get("property")
        if isinstance(prop, str) and prop.lower() in SECRET_PROPERTIES:
            hide = frozenset({"value"})
    if command == "object-add":
        qom_type = arguments.get("qom-type")
        hide = _BY_QOM_TYPE.get(qom_type, frozenset()) if isinstance(qom_type, str) else hide
    return {k: REDACTED if k in hide or k in _ANYWHERE else _scrub(v) for k, v in arguments.items()}
