"""Playbook tests of file descriptors in the hub: who holds which fd, what goes upstream
with which command, and what is closed when (fds are plain numbers here)."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmpmux import fdargs, fdpass
from qmpmux.config import Limits
from qmpmux.fdargs import RenamedTooLongError, is_numeric, numeric_fd, rename_fds
from qmpmux.fdpass import restore_names
from qmpmux.hub import Action, CloseFds, Hub, PauseClient, ResumeClient, ToClient, ToUpstream
from qmpmux.policy import DEFAULT_POLICY, ProfileSpec, compile_policy
from qmpmux.qjson import JsonValue, encode
from qmpmux.session import Peer
from qmpmux.spelled import Spliced
from qmpmux.wire import command_prefix
from tests.playbook import connect, expect, ready_hub, spelled_out

GETFD = b'{"execute":"getfd","arguments":{"fdname":"tap0"},"id":"g"}'
NO_FD = (
    b'{"id": "g", "error": {"class": "GenericError", '
    b'"desc": "No file descriptor supplied via SCM_RIGHTS"}}\r\n'
)


def _getfd_upstream(client: int, upstream_id: int) -> bytes:
    return b'{"execute":"getfd","arguments":{"fdname":"qmpmux.%d.tap0"},"id":%d}' % (
        client,
        upstream_id,
    )


def test_an_fd_goes_upstream_only_with_the_command_that_takes_it() -> None:
    hub = ready_hub()
    cid = connect(hub)
    # The fd comes ahead, on a byte of its own (as qemu.qmp sends it); a command that
    # takes none leaves it waiting.
    expect(hub.client_data(cid, b" ", [100]), [])
    expect(
        hub.client_data(cid, b'{"execute":"query-status","id":1}'),
        [ToUpstream(b'{"execute":"query-status"}')],
    )
    # A command that carries an fd goes with an id (hub._issue).
    expect(
        hub.client_data(cid, GETFD),
        [PauseClient(cid), ToUpstream(_getfd_upstream(cid, 0), (100,))],
    )
    hub.upstream_data(b'{"return": {}}\r\n')
    expect(
        hub.upstream_data(b'{"return": {}, "id": 0}\r\n'),
        [ToClient(cid, b'{"return": {}, "id": "g"}\r\n'), ResumeClient(cid)],
    )


def test_a_newer_fd_message_replaces_and_closes_waiting_fds() -> None:
    hub = ready_hub()
    cid = connect(hub)
    expect(hub.client_data(cid, b" ", [100, 101]), [])
    expect(hub.client_data(cid, b" ", [102, 103]), [CloseFds((100, 101))])
    actions = hub.client_data(cid, GETFD)
    assert CloseFds((103,)) in actions  # getfd takes the first; QEMU closes the rest
    assert ToUpstream(_getfd_upstream(cid, 0), (102,)) in actions


def test_getfd_without_an_fd_or_with_bad_arguments_is_answered_like_qemu() -> None:
    hub = ready_hub()
    cid = connect(hub)
    expect(hub.client_data(cid, GETFD), [ToClient(cid, NO_FD)])
    # Bad arguments: QEMU refuses before taking the fd, which stays waiting.
    expect(
        hub.client_data(cid, b'{"execute":"getfd","arguments":{"fdname":1},"id":1}', [100]),
        [
            ToClient(
                cid,
                b'{"id": 1, "error": {"class": "GenericError", '
                b'"desc": "Invalid parameter type for \'fdname\', expected: string"}}\r\n',
            )
        ],
    )
    assert ToUpstream(_getfd_upstream(cid, 0), (100,)) in hub.client_data(cid, GETFD)


def test_one_fd_carrying_command_in_qemu_at_a_time() -> None:
    """QEMU with oob reads ahead; a later fd-carrying read would close the fds an earlier
    getfd has not taken yet. Other commands keep flowing meanwhile."""
    hub = ready_hub()
    a, b = connect(hub, oob=True), connect(hub, oob=True)
    assert ToUpstream(_getfd_upstream(a, 0), (100,)) in hub.client_data(a, GETFD, [100])
    expect(hub.client_data(b, GETFD, [200]), [PauseClient(b)])  # waits for a's
    expect(
        hub.client_data(a, b'{"exec-oob":"query-yank","id":"y"}'),
        [ToUpstream(b'{"exec-oob":"query-yank","id":1}')],
    )
    actions = hub.upstream_data(b'{"return": {}, "id": 0}\r\n')
    assert ToUpstream(_getfd_upstream(b, 0), (200,)) in actions


def test_a_departing_client_s_fds_are_closed_here_and_in_qemu() -> None:
    hub = ready_hub()
    cid = connect(hub)
    hub.client_data(cid, GETFD, [100])
    hub.upstream_data(b'{"return": {}, "id": 0}\r\n')
    hub.client_data(cid, b" ", [101])  # waiting, never taken
    actions = hub.client_closed(cid)
    assert CloseFds((101,)) in actions
    assert ToUpstream(b'{"execute":"closefd","arguments":{"fdname":"qmpmux.1.tap0"}}') in actions
    expect(hub.upstream_data(b'{"return": {}}\r\n'), [])  # nobody to answer


def test_a_profile_that_cannot_pass_fds_has_them_closed_at_once() -> None:
    hub = ready_hub()
    hub.reload(DEFAULT_POLICY)
    cid, _ = hub.client_connected(Peer("unix:t", profile="readonly"))
    expect(hub.client_data(cid, b" ", [100]), [CloseFds((100,))])


def test_fds_of_a_gone_or_draining_client_are_closed() -> None:
    hub = ready_hub()
    cid = connect(hub)
    hub.client_eof(cid)
    expect(hub.client_data(cid, b" ", [100]), [CloseFds((100,))])
    expect(hub.client_data(999, b" ", [101]), [CloseFds((101,))])


def test_fd_names_are_per_client_in_every_argument_that_takes_one() -> None:
    hub = ready_hub(limits=Limits(client_window=8))
    cid = connect(hub)
    args = b'{"execute":"netdev_add","arguments":{"type":"tap","id":"n","fds":"a:b","vhostfd":"v"}}'
    (action,) = hub.client_data(cid, args)
    assert isinstance(action, ToUpstream) and type(action.data) is bytes
    assert b'"fds":"qmpmux.1.a:qmpmux.1.b"' in action.data
    assert b'"vhostfd":"qmpmux.1.v"' in action.data
    chardev = (
        b'{"execute":"chardev-add","arguments":{"id":"c","backend":{"type":"socket",'
        b'"data":{"addr":{"type":"fd","data":{"str":"sk"}}}}}}'
    )
    (action,) = hub.client_data(cid, chardev)
    assert isinstance(action, ToUpstream) and b'"str":"qmpmux.1.sk"' in bytes(action.data)
    (action,) = hub.client_data(cid, b'{"execute":"migrate","arguments":{"uri":"fd:m"}}')
    assert isinstance(action, ToUpstream) and b'"uri":"fd:qmpmux.1.m"' in bytes(action.data)


def test_qemu_s_errors_name_the_fd_as_the_client_does() -> None:
    hub = ready_hub()
    cid = connect(hub)
    hub.client_data(cid, b'{"execute":"closefd","arguments":{"fdname":"x"},"id":1}')
    expect(
        hub.upstream_data(
            b'{"error": {"class": "GenericError", '
            b'"desc": "File descriptor named \'qmpmux.1.x\' not found"}}\r\n'
        ),
        [
            ToClient(
                cid,
                b'{"id": 1, "error": {"class": "GenericError", '
                b'"desc": "File descriptor named \'x\' not found"}}\r\n',
            )
        ],
    )


LONG = 4 << 20


def _fed(hub: Hub, cid: int, data: bytes) -> list[Action]:
    """The hub's actions for `data`, read 64 KiB at a time (as a long string is decoded:
    a part a read)."""
    return [
        a
        for at in range(0, len(data), 1 << 16)
        for a in hub.client_data(cid, data[at : at + (1 << 16)])
    ]


def _peak_of_last_read(hub: Hub, cid: int, data: bytes) -> tuple[list[object], int]:
    """The hub's actions for the read that completes `data`, read 64 KiB at a time (a
    long string is decoded a part a read), and the most memory allocated meanwhile."""
    *head, tail = [data[at : at + (1 << 16)] for at in range(0, len(data), 1 << 16)]
    for read in head:
        assert hub.client_data(cid, read) == []
    gc.collect()
    tracemalloc.start()
    try:
        actions: list[object] = list(hub.client_data(cid, tail))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return actions, peak


@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        # QEMU's error for getfd's arguments, found without building the others
        (b'{"fdname":"tap0","pad":"%s"}', b"Parameter 'pad' is unexpected"),
        (b'{"pad":"%s","fdname":"tap0"}', b"Parameter 'pad' is unexpected"),
        (b'{"pad":"%s"}', b"Parameter 'fdname' is missing"),
        (b'{"fdname":"tap0","pad":["%s"]}', b"Parameter 'pad' is unexpected"),
        (b'{"fdname":"%s"}', b"No file descriptor supplied via SCM_RIGHTS"),
        (b'{"fdname":["%s"]}', b"Invalid parameter type for 'fdname', expected: string"),
    ],
)
def test_the_fd_work_on_a_big_command_reads_what_the_policy_read(
    arguments: bytes, error: bytes
) -> None:
    """The fd work reads the arguments the policy read, never the command's text again
    (that built all of it at once: 8 MiB of it held the loop 50 ms)."""
    hub = ready_hub()
    cid = connect(hub)
    data = b'{"execute":"getfd","arguments":%s,"id":1}' % (arguments % (b"x" * LONG))
    actions, peak = _peak_of_last_read(hub, cid, data)
    assert peak < LONG // 8, peak
    (action,) = actions
    assert isinstance(action, ToClient) and error in spelled_out(action.data)


@pytest.mark.parametrize(
    "data",
    [
        b'{"execute":"chardev-add","arguments":{"id":"c","backend":{"type":"file",'
        b'"data":{"out":"/dev/null"}},"pad":"%s"}}',
        b'{"execute":"netdev_add","arguments":{"type":"user","id":"n","pad":"%s"}}',
        b'{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"%s"}}',
    ],
)
def test_a_big_fd_command_without_fd_names_is_never_built(data: bytes) -> None:
    """Only a command that holds an fd name is renamed and so encoded anew; one without
    goes as the client's text, the members no check reads never built."""
    hub = ready_hub()
    cid = connect(hub)
    actions, peak = _peak_of_last_read(hub, cid, data % (b"x" * LONG))
    assert peak < LONG // 8, peak
    (action,) = actions
    assert isinstance(action, ToUpstream) and b"x" * 64 in bytes(action.data)


@pytest.mark.parametrize(
    "place",
    [
        b'"pad":[%s]',
        b'"backend":{"type":"file","data":{"out":[%s]}}',
        b'"data":[%s]',  # (read only where the arguments themselves are a legacy address)
    ],
)
def test_a_big_container_without_a_socket_address_is_never_built(place: bytes) -> None:
    """The search for socket addresses skips, unbuilt, every member whose packed bytes
    cannot hold `"type":"fd"` (built and walked, 350,000 objects held the loop 0.4-0.9 s)."""
    hub = ready_hub()
    cid = connect(hub)
    objects = b",".join([b"{}"] * (1 << 16))  # 4 MiB of Python objects if built
    data = b'{"execute":"chardev-add","arguments":{"id":"c",%s}}' % (place % objects)
    actions, peak = _peak_of_last_read(hub, cid, data)
    assert peak < 1 << 20, peak
    (action,) = actions
    assert isinstance(action, ToUpstream) and objects in bytes(action.data)


def _tap_reads(value: str) -> list[str]:
    """The names QEMU's tap reads in a colon list (net/tap.c get_fds): the text up to
    each colon, then the rest if any (a colon at the end starts no name)."""
    names: list[str] = []
    at = 0
    while at < len(value):
        colon = value.find(":", at)
        names.append(value[at:] if colon < 0 else value[at:colon])
        at = len(value) if colon < 0 else colon + 1
    return names


def _split_reads(value: str) -> list[str]:
    """The names af-xdp reads in its colon list (g_strsplit): each colon parts two."""
    return value.split(":") if value else []


def _renamed(names: list[str], prefix: str) -> list[str]:
    return [n if is_numeric(n) else prefix + n for n in names]


@pytest.mark.parametrize(("member", "reads"), [("fds", _tap_reads), ("sock-fds", _split_reads)])
@given(
    st.lists(st.sampled_from(["", "a", "1", "b2", "9x", "\u0663", "é", "q:", ":"]), max_size=12),
    st.sampled_from([1 << 18, 1, 3]),
)
def test_a_colon_list_is_renamed_as_qemu_reads_it(
    member: str, reads: Callable[[str], list[str]], names: list[str], piece: int
) -> None:
    """QEMU reads the renamed list as the client's names, each renamed but the numbers
    (a tap's list as get_fds reads it, af-xdp's as g_strsplit does); the first numeric
    name is the one refused. A long list is renamed in pieces (`piece` characters)."""
    value = ":".join(names)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fdargs, "_PIECE", piece)
        found = rename_fds("netdev_add", {member: value}, "qmpmux.3.", 1 << 30)
        numeric_found = numeric_fd("netdev_add", {member: value})  # searched in pieces
    own = [n for n in reads(value) if not is_numeric(n)]
    if not own:
        assert found is None  # nothing to rename: the command goes as the client wrote it
    else:
        assert found is not None
        renamed, record = found
        text = renamed[member]
        assert isinstance(text, str)
        assert reads(text) == _renamed(reads(value), "qmpmux.3.")
        assert record == {"qmpmux.3." + n: n for n in own}
    numeric = next((n for n in value.split(":") if is_numeric(n)), None)
    assert numeric_found == (None if numeric is None else (member, numeric[:32]))


@given(
    st.lists(st.sampled_from(["", "a", "1", "b2", "é", "\U0001f600"]), min_size=1, max_size=20),
    st.integers(min_value=1, max_value=25),
    st.sampled_from([1, 3, 8]),
)
def test_the_names_recorded_of_a_long_colon_list_are_its_first(
    names: list[str], n: int, piece: int
) -> None:
    """The names kept for restore_names are the list's first, split a piece at a time
    (splitting all of a list of megabytes at once took 5 ms in one C call)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fdargs, "_PIECE", piece)
        assert fdargs._first_names(fdargs._cut(":".join(names)), n) == names[:n]


@given(
    st.lists(st.sampled_from(["a", "1", "b2", "\u0663", "é", '"', "\\", "\x00", "\U0001f600"]),
             min_size=1, max_size=12),
    st.sampled_from([1, 3, 8]),
)  # fmt: skip
def test_a_long_colon_list_renamed_is_written_in_its_pieces_as_it_would_be_whole(
    names: list[str], piece: int
) -> None:
    """A colon list renamed in several pieces is never joined: the command's upstream
    text writes each piece (quotes, escapes and QEMU's two-byte NUL as whole), and is
    byte for byte the text of the list joined and encoded at once, several lists too."""
    listed = ":".join(names)
    args: dict[str, JsonValue] = {
        "type": "tap", "fds": listed, "vhostfd": "v", "vhostfds": [listed[::-1], "w", listed],
    }  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fdargs, "_PIECE", piece)
        patch.setattr(fdargs, "_KEPT_FROM", 0)
        whole = rename_fds("netdev_add", args, "qmpmux.3.", 1 << 30)
        long: dict[str, list[str]] = {}
        kept = rename_fds("netdev_add", args, "qmpmux.3.", 1 << 30, long)
    assert whole is not None and kept is not None and kept[1] == whole[1]
    if long:
        assert kept[0]["fds"] in long and "qmpmux" in str(kept[0]["fds"])
    text = command_prefix("netdev_add", kept[0], False, long=long)
    assert bytes(text) == bytes(command_prefix("netdev_add", whole[0], False))
    if long:
        assert isinstance(text, Spliced)


def test_a_colon_list_of_a_million_names_is_renamed_in_one_pass() -> None:
    """Each name handled in Python held the loop 2 s for 2.8 million; QEMU's tap reads
    the first 1024 (MAX_TAP_QUEUES), so only those are recorded for its errors."""
    value = ":".join(f"n{i}" for i in range(1 << 20))
    found = rename_fds("netdev_add", {"type": "tap", "fds": value}, "qmpmux.3.", 1 << 30)
    assert found is not None
    renamed, record = found
    assert isinstance(renamed["fds"], str)
    assert _tap_reads(renamed["fds"]) == _renamed(_tap_reads(value), "qmpmux.3.")
    assert list(record.values()) == [f"n{i}" for i in range(1024)]
    assert numeric_fd("netdev_add", {"fds": value + ":7"}) == ("fds", "7")


def test_names_renamed_past_qemu_s_size_limit_get_qemu_s_error() -> None:
    """Eight million empty names (8 MiB of colons, within QEMU's limits) renamed would
    be 80 MiB: QEMU's own error for input past its limit, and nothing sent or held."""
    hub = ready_hub()
    cid = connect(hub)
    data = b'{"execute":"netdev_add","arguments":{"type":"tap","id":"n","fds":"%s"},"id":1}'
    actions = _fed(hub, cid, data % (b":" * (8 << 20)))
    expect(
        actions,
        [
            ToClient(
                cid,
                b'{"error": {"class": "GenericError", '
                b'"desc": "JSON token size limit exceeded"}}\r\n',
            )
        ],
    )


def test_names_that_would_grow_past_the_room_are_told_before_they_are_renamed() -> None:
    value = ":".join(["a"] * 1000 + ["1"] * 10)  # 1000 names to rename, 10 numbers
    assert rename_fds("netdev_add", {"fds": value}, "q.", 2000) is not None
    with pytest.raises(RenamedTooLongError):
        rename_fds("netdev_add", {"fds": value}, "q.", 1999)
    with pytest.raises(RenamedTooLongError):
        rename_fds("netdev_add", {"fds": "a", "vhostfd": "b"}, "q.", 3)


@pytest.mark.parametrize(
    ("data", "renamed"),
    [
        (
            b'{"execute":"chardev-add","arguments":{"id":"c","pad":"%s","backend":'
            b'{"type":"socket","data":{"addr":{"type":"fd","data":{"str":"sk"}}}}}}',
            b'"str":"qmpmux.1.sk"',
        ),
        (
            b'{"execute":"netdev_add","arguments":{"type":"tap","id":"n","pad":"%s","fd":"tap0"}}',
            b'"fd":"qmpmux.1.tap0"',
        ),
        (
            b'{"execute":"nbd-server-start","arguments":{"pad":"%s","addr":{"type":"fd",'
            b'"str":"sk"}}}',
            b'"str":"qmpmux.1.sk"',
        ),
        (b'{"execute":"migrate","arguments":{"uri":"fd:m","pad":"%s"}}', b'"uri":"fd:qmpmux.1.m"'),
        (  # a one-member socket row: the search starts at that member
            b'{"execute":"qom-set","arguments":{"path":"/objects/v","property":"socket",'
            b'"pad":"%s","value":{"type":"fd","str":"sk"}}}',
            b'"value":{"type":"fd","str":"qmpmux.1.sk"}',
        ),
        (
            b'{"execute":"migrate","arguments":{"pad":"%s","channels":[{"channel-type":'
            b'"main","addr":{"transport":"socket","type":"fd","str":"m"}}]}}',
            b'"str":"qmpmux.1.m"',
        ),
        (  # the arguments themselves one, legacy (the walk looks everywhere)
            b'{"execute":"nbd-server-start","arguments":{"type":"fd","pad":"%s",'
            b'"data":{"str":"sk"}}}',
            b'"data":{"str":"qmpmux.1.sk"}',
        ),
        (b'{"execute":"netdev_add","arguments":{"fds":"a:%s"}}', b'"fds":"qmpmux.1.a:qmpmux.1.x'),
    ],
)
def test_a_big_command_s_fd_names_are_renamed(data: bytes, renamed: bytes) -> None:
    """The arguments the policy read lazily (qjson.DeferredObject) are renamed as a
    small command's: no client name reaches QEMU as it is."""
    hub = ready_hub()
    cid = connect(hub)
    (action,) = _fed(hub, cid, data % (b"x" * LONG))
    assert isinstance(action, ToUpstream) and renamed in bytes(action.data)
    assert b"x" * LONG in bytes(action.data)


def _sockets_reference(value: JsonValue, where: str) -> list[tuple[str, str]]:
    """Every SocketAddress of type fd, walked plainly (the order the walker yields)."""
    found: list[tuple[str, str]] = []
    if isinstance(value, dict):
        if value.get("type") == "fd":
            fd, data = value.get("str"), value.get("data")
            if isinstance(fd, str):
                found.append((f"{where}.str", fd))
            elif isinstance(data, dict) and isinstance(data.get("str"), str):
                found.append((f"{where}.data.str", str(data["str"])))
        children = [(f"{where}.{key}", member) for key, member in value.items()]
    elif isinstance(value, list):
        children = [(f"{where}[{i}]", item) for i, item in enumerate(value)]
    else:
        children = []
    for at, child in children:
        found += _sockets_reference(child, at)
    return found


_SOCKET_PARTS = st.sampled_from(["type", "fd", "str", "data", 'a"type', "x", "tls", 7, None])
_SOCKET_VALUES = st.recursive(
    _SOCKET_PARTS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["type", "str", "data", 'a"type', "b"]), inner, max_size=4
        )
    ),
    max_leaves=24,
)


@given(_SOCKET_VALUES, st.sampled_from([(1024, 4096), (3, 2), (0, 1)]))
def test_socket_addresses_are_found_as_a_plain_walk_finds_them(
    value: JsonValue, bounds: tuple[int, int]
) -> None:
    """The walker (only containers walked, places spelled only for what it finds, and
    skipped at once when no dict's `type` is "fd": told in Python for a few values, past
    them in C by the JSON text of runs of members) finds what a plain recursive walk
    does, in document order (the first numeric one is the one refused)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fdargs, "_LOOKED_AT", bounds[0])
        patch.setattr(fdargs, "_RUN", bounds[1])
        assert list(fdargs._sockets(value, "addr")) == _sockets_reference(value, "addr")


def _fdset_hub() -> tuple[Hub, int, int]:
    hub = ready_hub(limits=Limits(client_window=8))
    fdp = ProfileSpec(commands=("add-fd", "remove-fd", "query-fdsets"))
    hub.reload(compile_policy({"fdp": fdp}))
    a, _ = hub.client_connected(Peer("unix:t", profile="fdp"))
    b, _ = hub.client_connected(Peer("unix:t", profile="fdp"))
    for cid in (a, b):
        hub.client_data(cid, b'{"execute":"qmp_capabilities"}')
    hub.client_data(a, b'{"execute":"add-fd","id":1}', [100])
    hub.upstream_data(b'{"return": {"fd": 20, "fdset-id": 0}, "id": 0}\r\n')
    hub.client_data(b, b'{"execute":"add-fd","id":1}', [101])
    hub.upstream_data(b'{"return": {"fd": 21, "fdset-id": 1}, "id": 0}\r\n')
    return hub, a, b


def test_fdsets_of_other_clients_are_invisible_to_a_profile_other_than_full() -> None:
    hub, a, _b = _fdset_hub()
    hub.client_data(a, b'{"execute":"query-fdsets","id":"q"}')
    expect(
        hub.upstream_data(
            b'{"return": [{"fds": [{"fd": 21}], "fdset-id": 1}, '
            b'{"fds": [{"fd": 20}], "fdset-id": 0}]}\r\n'
        ),
        [ToClient(a, b'{"return": [{"fds": [{"fd": 20}], "fdset-id": 0}], "id": "q"}\r\n')],
    )
    expect(
        hub.client_data(a, b'{"execute":"remove-fd","arguments":{"fdset-id":1},"id":2}'),
        [
            ToClient(
                a,
                b'{"id": 2, "error": {"class": "GenericError", '
                b'"desc": "File descriptor named \'fdset-id:1\' not found"}}\r\n',
            )
        ],
    )


def test_a_departing_client_s_fdsets_are_removed() -> None:
    hub, a, _b = _fdset_hub()
    actions = hub.client_closed(a)
    assert ToUpstream(b'{"execute":"remove-fd","arguments":{"fdset-id":0}}') in actions


_NAME_CHARS = st.sampled_from(["a", "b", "7", ".", "é", '"', "\\", "\x00", "\U0001f600", "'"])


@settings(max_examples=200, deadline=None)
@given(
    names=st.lists(st.text(_NAME_CHARS, min_size=1, max_size=6), min_size=1, max_size=90),
    quoted=st.lists(st.integers(min_value=0), min_size=1, max_size=3),
    around=st.sampled_from(["File descriptor named '%s' has not been found", "%s", "x%s: %s"]),
)
def test_names_put_back_where_the_prefix_occurs_are_those_put_back_name_by_name(
    names: list[str], quoted: list[int], around: str
) -> None:
    """A command of many names (a NameRecord) has them put back in QEMU's error where
    qmpmux's prefix occurs, not name by name, with the same result."""
    args: dict[str, JsonValue] = {"type": "tap", "fds": [*names, *(f"n{i}" for i in range(70))]}
    renamed = rename_fds("netdev_add", args, "qmpmux.3.", 1 << 30)
    assert renamed is not None
    record = renamed[1]
    upstream = list(record)
    shown = [upstream[i % len(upstream)] for i in quoted]
    desc = around.replace("%s", "{}").format(*(shown * 2)[: around.count("%s")])
    reply = b'{"id": 1, "error": {"class": "GenericError", "desc": ' + encode(desc) + b"}}\r\n"
    assert len(record) > fdpass._BY_NAME
    assert restore_names(reply, record) == restore_names(reply, dict(record))


def test_many_names_are_never_put_back_name_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """250,000 names took the loop 275 ms to put back in a one-line error, name by name."""
    args: dict[str, JsonValue] = {"type": "tap", "fds": [f"n{i}" for i in range(250_000)]}
    renamed = rename_fds("netdev_add", args, "qmpmux.3.", 1 << 30)
    assert renamed is not None
    desc = "File descriptor named 'qmpmux.3.n4711' has not been found"
    reply = b'{"id": 1, "error": {"class": "GenericError", "desc": ' + encode(desc) + b"}}\r\n"
    written = _names_encoded(monkeypatch)
    assert b"named 'n4711' has" in restore_names(reply, renamed[1])
    assert len(written) <= 2


def test_a_name_too_long_to_put_back_stays_as_qemu_knows_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Putting back a name of 8 MiB in QEMU's error held the loop 89 ms: one over
    _LONGEST characters is left as QEMU knows it, and never encoded."""
    long = "a" * (fdpass._LONGEST + 1)
    renamed = rename_fds("netdev_add", {"type": "tap", "fd": long}, "qmpmux.3.", 1 << 30)
    assert renamed is not None
    desc = f"File descriptor named 'qmpmux.3.{long}' has not been found"
    reply = b'{"id": 1, "error": {"class": "GenericError", "desc": ' + encode(desc) + b"}}\r\n"
    written = _names_encoded(monkeypatch)
    assert restore_names(reply, renamed[1]) == reply
    assert written == []


def _names_encoded(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names fdpass writes as QEMU would from now on (each a pass over the reply's
    names, when put back name by name)."""
    written: list[str] = []
    text = fdpass._json_text

    def json_text(name: str) -> bytes:
        written.append(name)
        return text(name)

    monkeypatch.setattr(fdpass, "_json_text", json_text)
    return written
