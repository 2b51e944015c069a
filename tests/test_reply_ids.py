"""A reply to a command sent without an id gets the client's id where QEMU prints it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qmpmux.qjson import qdict_order, qdict_slot
from qmpmux.spelled import Spelled
from qmpmux.wire import WireId, encode_id, rewrite_reply
from tests.playbook import spelled_out

REPLIES = [
    (b'{"return": {}', b"}\r\n"),
    (b'{"return": {"status": "running", "running": true}', b"}\r\n"),
    (b'{"return": [{"name": "x"}]', b"}\r\n"),
    (b'{"return": "}\\r\\n"', b"}\r\n"),
]
ERRORS = [b'"error": {"class": "GenericError", "desc": "x"}}\r\n']
CLIENT_IDS: list[WireId] = [None, b"1", b'"a b"', b"[1, 2]", b"null"]


@pytest.mark.parametrize("wire_id", CLIENT_IDS)
@pytest.mark.parametrize("upstream_id", [0, 7])
def test_a_reply_without_an_id_becomes_what_the_same_with_one_becomes(
    wire_id: WireId, upstream_id: int
) -> None:
    for head, tail in REPLIES:
        with_id = head + b', "id": %d' % upstream_id + tail
        assert rewrite_reply(head + tail, None, wire_id) == rewrite_reply(
            with_id, upstream_id, wire_id
        )
    for body in ERRORS:
        with_id = b'{"id": %d, ' % upstream_id + body
        assert rewrite_reply(b"{" + body, None, wire_id) == rewrite_reply(
            with_id, upstream_id, wire_id
        )


def test_a_long_id_is_added_a_piece_at_a_time() -> None:
    wire_id = encode_id(list(range(20_000)))
    assert isinstance(wire_id, Spelled)
    for line in (b'{"return": {}}\r\n', b'{"error": {"class": "X", "desc": "x"}}\r\n'):
        got = rewrite_reply(line, None, wire_id)
        assert isinstance(got, Spelled)
        assert spelled_out(got) == spelled_out(rewrite_reply(line, None, wire_id.spell()))


@given(st.lists(st.text(min_size=1, max_size=12).filter(lambda k: k != "id"), unique=True))
def test_the_id_lands_where_qemu_inserting_it_last_prints_it(keys: list[str]) -> None:
    ordered = qdict_order(keys)
    slot = qdict_slot(ordered, "id")
    assert [*ordered[:slot], "id", *ordered[slot:]] == qdict_order([*keys, "id"])


def test_a_reply_with_other_members_is_rebuilt_in_qemu_order() -> None:
    members = ["return", "__com.example_101", "__com.example_extra"]
    line = b"{" + b", ".join(b'"%s": 1' % k.encode() for k in qdict_order(members)) + b"}\r\n"
    want = (
        b"{"
        + b", ".join(
            b'"%s": %s' % (k.encode(), b'"x"' if k == "id" else b"1")
            for k in qdict_order([*members, "id"])
        )
        + b"}\r\n"
    )
    assert rewrite_reply(line, None, b'"x"') == want
