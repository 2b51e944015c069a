"""Credentials out of read-only replies, so monitoring can read block and chardev state.

`query-block` and `query-named-block-nodes` show each node's filename as QEMU knows it:
a URL with user info (`http://alice:hunter2@host/disk`, block/curl.c takes it as given),
or a `json:{...}` pseudo-filename that spells every option of a node and its children
(block.c bdrv_refresh_filename), URLs and inline secrets included; `backing_file`,
`backing-filename`, `full-backing-filename` and `backing-image` repeat them for the
backing chain. `query-chardev` shows a backend's `filename` (chardev/char-socket.c
and friends build it from the options). A profile without `secret-properties` gets these
replies with the same structural redaction the audit log applies to arguments
(redact.py, docs/protocol.md §10.3/§10.4): user info in URL-like strings, secret
`key=value` parameters, members whose name says secret, `json:` filenames parsed and
redacted as the structure they are; each replaced by `"<redacted>"`. References to
secret objects (`key-secret`, `password-secret`) are ids and stay.

Invariants: a reply with nothing to scrub is QEMU's bytes exactly; a profile with
`secret-properties` (`full`) never reaches this module. Sans-IO: bytes in, bytes out.
"""

from __future__ import annotations

from typing import Final

import msgspec

from qmpmux.qjson import JsonValue, encode
from qmpmux.redact import scrub_value

# Commands whose replies can carry credentials (see above); each is in `readonly`.
SCRUBBED: Final = frozenset({"query-block", "query-named-block-nodes", "query-chardev"})


def scrub_return(value: bytes) -> bytes:
    """A reply's `return` value without credentials; QEMU's bytes if there were none."""
    decoded: JsonValue = msgspec.json.decode(value)
    scrubbed = scrub_value(decoded)
    if scrubbed == decoded:
        return value
    return encode(scrubbed)
