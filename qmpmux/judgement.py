"""One complete client input judged: the session's verdict, and for a command that takes or
names fds, what its arguments say (fdpass.FdFacts). I/O free, and free of the hub's state:
it depends only on the client's session and the message, never on other clients, so the
hub acts on the result wherever it was made.
"""

from __future__ import annotations

from qmpmux.fdpass import FD_RELATED, FdFacts, fd_facts
from qmpmux.qjson import JsonValue, ParseError
from qmpmux.session import Command, Session, Verdict


def judge(
    session: Session, value: JsonValue | ParseError, has_fds: bool
) -> tuple[Verdict, FdFacts | None]:
    """The verdict on `value`, and its fd facts when it is a command that needs them
    (`has_fds`: whether the client has fds waiting)."""
    verdict = session.judge(value)
    if type(verdict) is Command:
        args, verdict.args = verdict.args, None  # a big message's: dropped once read
        if verdict.name in FD_RELATED:
            size = len(verdict.prefix)
            facts = fd_facts(verdict.name, verdict.oob, args, has_fds, session.id, size)
            return verdict, facts
    return verdict, None
