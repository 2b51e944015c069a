"""Policy compilation and decisions, and the property that nothing denied reaches QEMU."""

from __future__ import annotations

import ast
from fnmatch import fnmatchcase
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmpmux import fdargs
from qmpmux.fdargs import FD_ARGUMENTS, numeric_fd
from qmpmux.hub import Action, ToClient, ToUpstream
from qmpmux.policy import (
    DEFAULT_POLICY,
    ESCAPE_HATCHES,
    QMPMUX_PREFIX,
    READONLY_COMMANDS,
    TYPE_CODE_COMMANDS,
    Decision,
    PolicyError,
    ProfileSpec,
    RuleSpec,
    compile_policy,
    long_match,
)
from qmpmux.qjson import Framer, JsonValue, LongString
from qmpmux.session import Peer
from tests.playbook import ready_hub, spelled_out

READONLY = DEFAULT_POLICY.profiles["readonly"]
VM_CONTROL = DEFAULT_POLICY.profiles["vm-control"]
FULL = DEFAULT_POLICY.profiles["full"]

MUTATING = [
    "stop", "cont", "quit", "system_reset", "system_powerdown", "qom-set",
    "human-monitor-command", "transaction", "ringbuf-read", "yank", "migrate", "device_add",
    "object-add", "blockdev-add", "__com.redhat_drive_add", "__org.qmpmux_list-clients",
    "x-exit-preconfig", "Query-Status", "query-status ", "",
]  # fmt: skip


@pytest.mark.parametrize("name", MUTATING)
def test_readonly_denies_everything_that_changes_or_leaks(name: str) -> None:
    assert READONLY.command(name) is Decision.DENY


@pytest.mark.parametrize("name", ["query-status", "qom-list", "query-qmp-schema", "qom-get"])
def test_readonly_allows_reads(name: str) -> None:
    assert READONLY.command(name) is Decision.ALLOW


def test_vm_control_is_readonly_plus_run_state() -> None:
    for name in ("stop", "cont", "system_powerdown", "system_reset", "system_wakeup"):
        assert VM_CONTROL.command(name) is Decision.ALLOW
        assert READONLY.command(name) is Decision.DENY
    for name in READONLY_COMMANDS:
        assert VM_CONTROL.command(name) is Decision.ALLOW
    for name in ("quit", "human-monitor-command", "qom-set", "migrate"):
        assert VM_CONTROL.command(name) is Decision.DENY


def test_full_allows_everything_including_extensions() -> None:
    for name in (*MUTATING[:-3], "anything"):
        assert FULL.command(name) is Decision.ALLOW
    assert FULL.event("__com.example_EVENT") and FULL.command("__com.example_x") is Decision.ALLOW


def test_glob_star_does_not_open_downstream_extensions() -> None:
    policy = compile_policy({"p": ProfileSpec(commands=("*",), events=("*",))})
    p = policy.profiles["p"]
    assert p.command("query-status") is Decision.ALLOW
    assert p.command("__com.redhat_drive_add") is Decision.DENY
    assert not p.event("__com.example_EVENT") and p.event("STOP")
    q = compile_policy({"q": ProfileSpec(commands=("__com.redhat_*",))}).profiles["q"]
    assert q.command("__com.redhat_drive_add") is Decision.ALLOW
    assert q.command("query-status") is Decision.DENY


def test_deny_wins_and_custom_profiles_deny_by_default() -> None:
    spec = ProfileSpec(
        commands=("query-*", "stop"), deny_commands=("query-sev*",), events=("STOP",)
    )
    p = compile_policy({"p": spec}).profiles["p"]
    assert p.command("query-status") is Decision.ALLOW
    assert p.command("query-sev-capabilities") is Decision.DENY
    assert p.command("cont") is Decision.DENY
    assert p.event("STOP") and not p.event("RESUME")


def test_base_profiles_are_extended_and_their_denials_kept() -> None:
    specs = {
        "a": ProfileSpec(base="readonly", commands=("stop", "human-monitor-command")),
        "b": ProfileSpec(base="a", deny_commands=("query-name",), strip_extensions=True),
    }
    policy = compile_policy(specs)
    a, b = policy.profiles["a"], policy.profiles["b"]
    assert a.command("stop") is Decision.ALLOW and a.command("query-status") is Decision.ALLOW
    assert a.command("human-monitor-command") is Decision.DENY  # readonly's denial wins
    assert b.command("query-name") is Decision.DENY and b.command("stop") is Decision.ALLOW
    assert b.strip_extensions and not a.strip_extensions


def test_audit_only_lets_through_but_says_so() -> None:
    p = compile_policy({"p": ProfileSpec(base="readonly", audit_only=True)}).profiles["p"]
    assert p.command("stop") is Decision.AUDIT
    assert p.command("query-status") is Decision.ALLOW


@pytest.mark.parametrize(
    ("specs", "rules", "path"),
    [
        ({"full": ProfileSpec()}, [], "profiles.full"),
        ({"p": ProfileSpec(base="nope")}, [], "profiles.p.base"),
        ({"p": ProfileSpec(base="q"), "q": ProfileSpec(base="p")}, [], "profiles."),
        ({"p": ProfileSpec(commands=("ok", "bad name"))}, [], "profiles.p.commands[1]"),
        ({"p": ProfileSpec(deny_events=("[oops",))}, [], "profiles.p.deny-events[0]"),
        ({}, [RuleSpec(profile="nope", uid=1)], "rules[0].profile"),
        ({}, [RuleSpec(profile="full")], "rules[0]"),
        ({}, [RuleSpec(profile="full", uid=-1)], "rules[0].uid"),
        ({}, [RuleSpec(profile="full", gid=2**32 - 1)], "rules[0].gid"),
        (
            {},
            [RuleSpec(profile="full", uid=0), RuleSpec(profile="full", exe="/usr/bin/virsh")],
            "rules[1].exe",
        ),
        ({}, [RuleSpec(profile="full", exe="")], "rules[0].exe"),
    ],
)
def test_bad_policy_names_the_key(
    specs: dict[str, ProfileSpec], rules: list[RuleSpec], path: str
) -> None:
    with pytest.raises(PolicyError) as err:
        compile_policy(specs, rules)
    assert err.value.path.startswith(path)


def test_rules_match_unix_credentials_and_executable() -> None:
    policy = compile_policy(
        {"mon": ProfileSpec(base="readonly")},
        [
            RuleSpec(profile="mon", uid=1000, exe="collectd"),
            RuleSpec(profile="vm-control", gid=50, listener="unix:/a"),
        ],
    )
    assert policy.assign("unix:/a", "full", 1000, 1, "collectd").name == "mon"
    assert policy.assign("unix:/a", "full", 1000, 1, "bash").name == "full"
    assert policy.assign("unix:/a", "full", 7, 50, None).name == "vm-control"
    assert policy.assign("unix:/b", "readonly", 7, 50, None).name == "readonly"
    assert policy.assign("tcp:127.0.0.1:1", "readonly").name == "readonly"  # no creds


@pytest.mark.parametrize("name", TYPE_CODE_COMMANDS)
def test_readonly_profiles_never_build_an_object_of_a_client_chosen_type(name: str) -> None:
    assert READONLY.command(name) is Decision.DENY
    assert VM_CONTROL.command(name) is Decision.DENY
    assert FULL.command(name) is Decision.ALLOW
    # A profile built on readonly cannot reopen them (readonly denies them by name) ...
    child = compile_policy({"c": ProfileSpec(base="readonly", commands=(name, "*"))})
    assert child.profiles["c"].command(name) is Decision.DENY
    # ... but a custom profile of its own may allow them by name.
    own = compile_policy({"o": ProfileSpec(commands=(name,))})
    assert own.profiles["o"].command(name) is Decision.ALLOW


HMC = "human-monitor-command"


def test_an_escape_hatch_is_granted_only_by_its_exact_name() -> None:
    policy = compile_policy(
        {
            "star": ProfileSpec(commands=("*",), deny_commands=("stop",)),
            "globbed": ProfileSpec(commands=("human-*", "*-command", "h?man-monitor-command")),
            "named": ProfileSpec(commands=("*", HMC), deny_commands=("stop",)),
            "from-full": ProfileSpec(base="full", deny_commands=("stop",)),
            "from-star": ProfileSpec(base="star"),
            "from-named": ProfileSpec(base="named", deny_commands=("human-*",)),
            "learning": ProfileSpec(commands=("*",), audit_only=True),
        }
    )
    p = policy.profiles
    assert p["star"].command(HMC) is Decision.DENY and p["star"].command("cont") is Decision.ALLOW
    assert p["globbed"].command(HMC) is Decision.DENY
    assert p["named"].command(HMC) is Decision.ALLOW and p["named"].escape_hatches()
    assert p["from-full"].command(HMC) is Decision.ALLOW  # `full` names it exactly
    assert p["from-star"].command(HMC) is Decision.DENY
    assert p["from-named"].command(HMC) is Decision.DENY  # a deny glob still wins
    assert not p["from-named"].escape_hatches() and not p["star"].escape_hatches()
    assert p["learning"].command(HMC) is Decision.AUDIT
    assert FULL.command(HMC) is Decision.ALLOW


HATCH_ARGUMENTS: list[tuple[str, dict[str, JsonValue], dict[str, JsonValue]]] = [
    ("migrate", {"uri": "exec:cat > /tmp/x"}, {"uri": "tcp:127.0.0.1:4444"}),
    ("migrate", {"channels": [{"channel-type": "main", "addr": {"transport": "exec",
                                                                  "args": ["sh"]}}]},
     {"channels": [{"channel-type": "main", "addr": {"transport": "socket", "type": "inet",
                                                      "host": "::1", "port": "1"}}]}),
    ("migrate-incoming", {"uri": "exec:sh"}, {"uri": "defer"}),
    ("migrate-incoming", {"channels": [{"addr": {"transport": "exec", "args": ["sh"]}}]},
     {"uri": "tcp:[::1]:1"}),
    ("migrate-recover", {"uri": "exec:sh"}, {"uri": "unix:/run/r.sock"}),
    ("netdev_add", {"type": "tap", "id": "n", "script": "/tmp/evil"},
     {"type": "tap", "id": "n", "script": "no"}),
    ("netdev_add", {"type": "tap", "id": "n", "downscript": "/tmp/evil"},
     {"type": "tap", "id": "n", "downscript": ""}),
    ("netdev_add", {"type": "bridge", "id": "n", "helper": "/tmp/evil"},
     {"type": "bridge", "id": "n", "br": "br0"}),
]  # fmt: skip


@pytest.mark.parametrize(("name", "opened", "closed"), HATCH_ARGUMENTS)
def test_an_argument_that_runs_host_programs_needs_the_exact_name(
    name: str, opened: dict[str, JsonValue], closed: dict[str, JsonValue]
) -> None:
    policy = compile_policy(
        {"star": ProfileSpec(commands=("*",)), "named": ProfileSpec(commands=(name,))}
    )
    star, named = policy.profiles["star"], policy.profiles["named"]
    assert star.command(name) is Decision.ALLOW
    problem = star.argument_problem(name, opened, frozenset())
    assert problem is not None and "refused by qmpmux policy" in problem
    assert star.argument_problem(name, closed, frozenset()) is None
    assert named.argument_problem(name, opened, frozenset()) is None
    assert FULL.argument_problem(name, opened, frozenset()) is None


def test_every_escape_hatch_is_in_the_table_and_full_names_each() -> None:
    covered = {(h.command, h.member) for h in ESCAPE_HATCHES}
    assert {(name, list(opened)[-1]) for name, opened, _ in HATCH_ARGUMENTS} | {
        (HMC, None)
    } == covered
    assert {h.command for h in FULL.escape_hatches()} == {h.command for h in ESCAPE_HATCHES}
    assert all(h.reason for h in ESCAPE_HATCHES)


def test_numeric_fds_are_refused_to_every_profile_but_full() -> None:
    args: dict[str, JsonValue] = {"type": "tap", "id": "n0", "fd": "9"}
    learning = compile_policy({"l": ProfileSpec(commands=("*",), audit_only=True)})
    from_full = compile_policy({"f": ProfileSpec(base="full")})
    for profile in (learning.profiles["l"], from_full.profiles["f"]):
        problem = profile.fatal_problem("netdev_add", args, frozenset())
        assert problem is not None and "numeric fd '9'" in problem
    assert FULL.fatal_problem("netdev_add", args, frozenset()) is None
    named: dict[str, JsonValue] = {"type": "tap", "id": "n0", "fd": "tap0", "fds": "a:b"}
    assert learning.profiles["l"].fatal_problem("netdev_add", named, frozenset()) is None


@pytest.mark.parametrize(
    ("value", "numeric"), [("9", True), ("09", True), ("9x", True), ("x9", False), ("", False),
                           ("٣", False), ("fd3", False)]
)  # fmt: skip
def test_numeric_means_what_qemu_means(value: str, numeric: bool) -> None:
    """monitor_fd_param parses a value as a number when its first character is a digit."""
    assert (numeric_fd("getfd", {"fdname": value}) is not None) is numeric


def test_fd_values_are_found_at_any_depth_and_in_lists() -> None:
    legacy: dict[str, JsonValue] = {
        "id": "c0",
        "backend": {"type": "socket", "data": {"addr": {"type": "fd", "data": {"str": "7"}}}},
    }
    assert numeric_fd("chardev-add", legacy) == ("backend.data.addr.data.str", "7")
    nested: dict[str, JsonValue] = {
        "driver": "qcow2", "node-name": "n",
        "file": {"driver": "nbd", "server": {"type": "fd", "str": "3"}},
    }  # fmt: skip
    assert numeric_fd("blockdev-add", nested) == ("file.server.str", "3")
    assert numeric_fd("netdev_add", {"type": "tap", "id": "n", "vhostfds": "a:4"}) == (
        "vhostfds",
        "4",
    )
    assert numeric_fd("device_add", {"driver": "x", "ebpf-rss-fds": ["a", "5"]}) is not None
    deep: JsonValue = {"type": "fd", "str": "6"}
    for _ in range(5000):  # deeper than Python's recursion limit: must not raise
        deep = {"x": deep}
    assert numeric_fd("blockdev-add", {"deep": deep}) is not None
    assert numeric_fd("qom-set", {"path": "/x", "property": "fd", "value": "8"}) is not None
    assert numeric_fd("qom-set", {"path": "/x", "property": "size", "value": "8"}) is None
    assert numeric_fd("query-status", {"fd": "9"}) is None
    assert {row.command for row in FD_ARGUMENTS} >= {"netdev_add", "getfd", "migrate"}


def test_qom_get_of_secret_properties_needs_the_switch() -> None:
    args: dict[str, JsonValue] = {"path": "/objects/sec0", "property": "data"}
    assert READONLY.argument_problem("qom-get", args, frozenset()) is not None
    assert FULL.argument_problem("qom-get", args, frozenset()) is None
    ok: dict[str, JsonValue] = {"path": "/machine", "property": "type"}
    assert READONLY.argument_problem("qom-get", ok, frozenset()) is None


def test_nobody_may_yank_qmpmux_upstream_chardev() -> None:
    mine: dict[str, JsonValue] = {"instances": [{"type": "chardev", "id": "qmpmux0"}]}
    other: dict[str, JsonValue] = {
        "instances": [{"type": "chardev", "id": "serial0"}, {"type": "block-node"}]
    }
    protected = frozenset({"qmpmux0"})
    assert FULL.fatal_problem("yank", mine, protected) is not None
    assert FULL.fatal_problem("yank", other, protected) is None
    # Upstream chardev unknown (--upstream mode): every chardev yank is refused.
    assert FULL.fatal_problem("yank", other, frozenset()) is not None


# --- property: for any profile, no denied command is ever forwarded ------------------------

NAMES = st.sampled_from(
    ["query-status", "stop", "cont", "quit", "qom-set", "qom-get", "yank", "transaction",
     "human-monitor-command", "__com.redhat_x", "query-sev", "system_reset", "migrate",
     "__org.qmpmux_whoami", "query-commands"]
) | st.from_regex(r"\A[a-z_][a-z0-9_-]{0,12}\Z")  # fmt: skip
PATTERNS = NAMES | st.sampled_from(["*", "query-*", "__*", "q*", "*-*", "[qs]*", "?top"])


@settings(max_examples=300, deadline=None)
@given(
    allow=st.lists(PATTERNS, max_size=5),
    deny=st.lists(PATTERNS, max_size=3),
    base=st.sampled_from([None, "readonly", "vm-control", "full"]),
    # (name, by exec-oob, answer everything QEMU holds right after sending it)
    commands=st.lists(st.tuples(NAMES, st.booleans(), st.booleans()), min_size=1, max_size=12),
)
def test_nothing_denied_ever_reaches_qemu(
    allow: list[str],
    deny: list[str],
    base: str | None,
    commands: list[tuple[str, bool, bool]],
) -> None:
    """Every denied command is refused locally, and every allowed one reaches QEMU.

    QEMU's part is played by answering each forwarded command, so the client's share of
    the upstream window keeps draining and every command of the example gets its turn.
    The commands carry no arguments: the profile's decision on the name alone decides.
    """
    spec = ProfileSpec(base=base, commands=tuple(allow), deny_commands=tuple(deny))
    policy = compile_policy({"p": spec})
    profile = policy.profiles["p"]
    hub = ready_hub()  # the default windows: 8 in flight upstream, 2 per client
    hub.reload(policy)
    cid, _ = hub.client_connected(Peer("unix:t", profile="p"))
    hub.client_data(cid, b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}')
    forwarded: list[str] = []
    held: list[int | None] = []  # upstream ids QEMU has not answered yet (None: none)
    replies: dict[int, bytes] = {}

    def run(actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, ToUpstream):
                sent = Framer().feed(bytes(action.data))  # one write may carry several
                assert sent, action
                for command in sent:
                    assert isinstance(command, dict), action
                    name = command.get("execute", command.get("exec-oob"))
                    assert isinstance(name, str), action
                    assert profile.command(name) is Decision.ALLOW, name
                    forwarded.append(name)
                    upstream_id = command.get("id")
                    assert upstream_id is None or type(upstream_id) is int, action
                    held.append(upstream_id)
            else:
                assert isinstance(action, ToClient), action
                reply = msgspec.json.decode(spelled_out(action.data))
                assert reply["id"] not in replies, action  # one reply per command
                replies[reply["id"]] = spelled_out(action.data)

    def answer_all() -> None:
        while held:  # in order, as QEMU answers one monitor's in-band commands
            upstream_id = held.pop(0)
            if upstream_id is None:
                run(hub.upstream_data(b'{"return": []}\r\n'))
            else:
                run(hub.upstream_data(b'{"return": [], "id": %d}\r\n' % upstream_id))

    for i, (name, oob, answer) in enumerate(commands):
        key = b"exec-oob" if oob else b"execute"
        run(hub.client_data(cid, b'{"%s":"%s","id":%d}' % (key, name.encode(), i)))
        if answer:
            answer_all()
    answer_all()

    assert sorted(replies) == list(range(len(commands)))
    expected: list[str] = []
    for i, (name, _, _) in enumerate(commands):
        if profile.command(name) is Decision.DENY:
            assert replies[i] == (
                b'{"id": %d, "error": {"class": "CommandNotFound", "desc": "The command %s '
                b'has been refused by qmpmux policy"}}\r\n' % (i, name.encode())
            )
        else:
            assert b'"return": ' in replies[i], replies[i]
            if not name.startswith(QMPMUX_PREFIX):  # qmpmux's own: answered by the hub
                expected.append(name)
    assert sorted(forwarded) == sorted(expected)


def test_denied_command_is_answered_locally_in_order() -> None:
    hub = ready_hub()
    hub.reload(DEFAULT_POLICY)
    cid, _ = hub.client_connected(Peer("unix:t", profile="readonly"))
    hub.client_data(cid, b'{"execute":"qmp_capabilities"}')
    assert hub.client_data(cid, b'{"execute":"query-status","id":1}') == [
        ToUpstream(b'{"execute":"query-status"}')
    ]
    assert hub.client_data(cid, b'{"execute":"stop","id":2}') == []  # waits behind id 1
    assert hub.upstream_data(b'{"return": {}}\r\n') == [
        ToClient(cid, b'{"return": {}, "id": 1}\r\n'),
        ToClient(
            cid,
            b'{"id": 2, "error": {"class": "CommandNotFound", '
            b'"desc": "The command stop has been refused by qmpmux policy"}}\r\n',
        ),
    ]


def test_the_fd_table_is_core_code() -> None:
    """fdargs sits on the hot path of the sans-IO core: it imports only data types, re and
    msgspec (I/O free)."""
    tree = ast.parse(Path(fdargs.__file__).read_text())
    imported = {
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    allowed = {"__future__", "enum", "re", "msgspec", "collections.abc", "dataclasses", "typing"}
    assert imported <= allowed | {"qmpmux.qjson"}, imported


# --- long names ------------------------------------------------------------------------

# Pieces of globs, each with a text it matches (`*` matches any).
GLOB_PIECES = {
    "*": "",
    "?": "c",
    "a": "a",
    "-": "-",
    "[ab]": "b",
    "[!a]": "!",
    "[]a]": "]",
    "[!]": "[!]",  # no set: `[!]` is literal (fnmatch's reading)
    "[*]": "*",
    "[a-c]": "b",
    "[": "[",
}


@st.composite
def parted(draw: st.DrawFn, text: str) -> LongString:
    """`text` cut anywhere into parts, as a long string token is decoded."""
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=6)))
    return LongString(text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True))


@settings(max_examples=500, deadline=None)
@given(
    pieces=st.lists(st.sampled_from(sorted(GLOB_PIECES)), max_size=8),
    fillers=st.lists(st.text(alphabet="ab-*[]!c", max_size=4), min_size=8, max_size=8),
    other=st.text(alphabet="ab-*[]!c", max_size=30),
    data=st.data(),
)
def test_a_glob_matches_a_long_name_in_parts_as_it_matches_it_whole(
    pieces: list[str], fillers: list[str], other: str, data: st.DataObject
) -> None:
    glob = "".join(pieces)
    fitting = "".join(
        GLOB_PIECES[p] + (f if p == "*" else "") for p, f in zip(pieces, fillers, strict=False)
    )
    for name in (fitting, other):
        assert long_match(data.draw(parted(name)), glob) == fnmatchcase(name, glob), name


@settings(max_examples=200, deadline=None)
@given(name=st.text(alphabet="qury-stopz_.", max_size=24), data=st.data())
def test_a_profile_decides_on_a_long_name_as_on_the_same_name_whole(
    name: str, data: st.DataObject
) -> None:
    policy = compile_policy(
        {"p": ProfileSpec(commands=("query-*", "stop", "__*"), deny_commands=("*-z", "q?e*s"))}
    )
    profile = policy.profiles["p"]
    assert profile.command(data.draw(parted(name))) is profile.command(name)


def test_a_piece_between_stars_is_found_across_any_cut() -> None:
    name = "zz-abcd-zz-abcd"
    for glob in ("*abcd*", "z*b[c]?-*d", "*-a*-a*", "*?cd-*", "*bcd-zz-a*", "*dd*"):
        for i in range(len(name) + 1):
            for j in range(i, len(name) + 1):
                long = LongString((name[:i], name[i:j], name[j:]))
                assert long_match(long, glob) == fnmatchcase(name, glob), (glob, i, j)
