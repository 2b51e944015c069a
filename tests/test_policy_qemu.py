"""Policy against a real QEMU: every route a read-only client might use to change the VM,
secrets, events, introspection as the qemu.qmp client sees it, identity, audit."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from qemu.qmp import QMPClient

from qmpmux.fdargs import FD_ARGUMENTS, Kind, numeric_fd
from qmpmux.policy import DEFAULT_POLICY, Decision, ProfileSpec, compile_policy
from qmpmux.qjson import JsonValue
from tests.conftest import Mux, start_mux
from tests.realqemu import Qemu, RawClient, start_qemu

REFUSED = b"refused by qmpmux policy"
POLICY = compile_policy(
    {
        "resume-only": ProfileSpec(
            commands=("query-status", "query-commands", "query-qmp-schema"), events=("RESUME",)
        ),
        "audited": ProfileSpec(base="full", audit_arguments=True),
        # Everything but `stop`: HMP must not be a way around that.
        "star": ProfileSpec(commands=("*",), deny_commands=("stop",)),
        "named-hmp": ProfileSpec(commands=("*", "human-monitor-command"), deny_commands=("stop",)),
        "from-full": ProfileSpec(base="full", deny_commands=("stop",)),
    }
)


@pytest.fixture
async def pmux(qemu: Qemu, tmp_path: Path) -> AsyncIterator[tuple[Mux, list[bytes]]]:
    records: list[bytes] = []
    mux = await start_mux(
        qemu, tmp_path, policy=POLICY, audit=records.append,
        profiles=("full", "readonly", "vm-control", "resume-only", "audited", "star",
                  "named-hmp", "from-full"),
    )  # fmt: skip
    yield mux, records
    mux.proxy.stop("test over")
    await mux.proxy.wait()


async def client(mux: Mux, profile: str, oob: bool = True) -> RawClient:
    c = await RawClient.connect(mux.sockets[profile])
    await c.negotiate(oob=oob)
    return c


ROUTES = [
    b'{"execute":"stop","id":1}',
    b'{"execute":"cont","id":1}',
    b'{"execute":"quit","id":1}',
    b'{"execute":"system_reset","id":1}',
    b'{"execute":"system_powerdown","id":1}',
    b'{"execute":"qom-set","arguments":{"path":"/machine","property":"type","value":"x"},"id":1}',
    b'{"execute":"human-monitor-command","arguments":{"command-line":"stop"},"id":1}',
    b'{"execute":"human-monitor-command","arguments":{"command-line":"info status"},"id":1}',
    b'{"execute":"transaction","arguments":{"actions":[]},"id":1}',
    b'{"exec-oob":"stop","id":1}',
    b'{"exec-oob":"yank","arguments":{"instances":[]},"id":1}',
    b'{"exec-oob":"migrate-pause","id":1}',
    b'{"execute":"__com.redhat_drive_del","arguments":{"id":"x"},"id":1}',
    b'{"execute":"__org.qmpmux_list-clients","id":1}',
    b'{"execute":"ringbuf-read","arguments":{"device":"x","size":1},"id":1}',
    b'{"execute":"migrate","arguments":{"uri":"exec:true"},"id":1}',
]


async def test_readonly_client_cannot_change_the_vm_by_any_route(
    pmux: tuple[Mux, list[bytes]],
) -> None:
    mux, _ = pmux
    watcher = await RawClient.connect(mux.direct)
    await watcher.negotiate()
    ro = await client(mux, "readonly")
    for route in ROUTES:
        reply = await ro.command(route)
        assert REFUSED in reply and reply.startswith(b'{"id": 1, "error": {"class": '), route
    # Duplicate keys: a proxy that read one `execute` and forwarded the other would be a
    # bypass; QEMU's own parser rejects the object, and so does qmpmux.
    reply = await ro.command(b'{"execute":"query-status","execute":"stop","id":2}')
    assert b"JSON parse error, duplicate key" in reply
    # QEMU saw none of it: still running, and the direct watcher got no event at all.
    status = await watcher.command(b'{"execute":"query-status","id":"w"}')
    assert b'"status": "running"' in status
    assert mux.qemu.alive()
    assert await ro.command(b'{"execute":"query-status","id":3}') == status.replace(
        b'"id": "w"', b'"id": 3'
    )


async def test_vm_control_may_stop_but_not_quit(pmux: tuple[Mux, list[bytes]]) -> None:
    mux, _ = pmux
    vc = await client(mux, "vm-control")
    assert (await vc.command(b'{"execute":"stop","id":1}')) == b'{"return": {}, "id": 1}\r\n'
    assert (await vc.command(b'{"execute":"cont","id":2}')) == b'{"return": {}, "id": 2}\r\n'
    assert REFUSED in await vc.command(b'{"execute":"quit","id":3}')
    assert mux.qemu.alive()


async def test_secret_objects_cannot_be_read_back_by_readonly(
    pmux: tuple[Mux, list[bytes]],
) -> None:
    mux, _ = pmux
    full = await client(mux, "full")
    add = b'{"execute":"object-add","arguments":{"qom-type":"secret","id":"sec0","data":"hunter2"}}'
    assert await full.command(add) == b'{"return": {}}\r\n'
    get = b'{"execute":"qom-get","arguments":{"path":"/objects/sec0","property":"%s"},"id":1}'
    assert await full.command(get % b"data") == b'{"return": "hunter2", "id": 1}\r\n'
    ro = await client(mux, "readonly")
    refused = await ro.command(get % b"data")
    assert REFUSED in refused and b"hunter2" not in refused
    # Partial QOM paths resolve too; the property rule does not depend on the path.
    partial = b'{"execute":"qom-get","arguments":{"path":"sec0","property":"data"},"id":1}'
    assert REFUSED in await ro.command(partial)
    assert await ro.command(get % b"format") == b'{"return": "raw", "id": 1}\r\n'


async def test_events_reach_only_profiles_that_allow_them(pmux: tuple[Mux, list[bytes]]) -> None:
    mux, _ = pmux
    narrow = await client(mux, "resume-only")
    full = await client(mux, "full")
    await full.send(b'{"execute":"stop","id":"s"}{"execute":"cont","id":"c"}')
    got = [msgspec.json.decode(x).get("event") for x in await full.read_n(4)]
    assert got == ["STOP", None, "RESUME", None]
    first = msgspec.json.decode(await narrow.read())
    assert first["event"] == "RESUME"  # no STOP before it
    assert REFUSED in await narrow.command(b'{"execute":"stop","id":1}')


@pytest.mark.parametrize("profile", ["readonly", "vm-control", "resume-only"])
async def test_introspection_shows_each_client_its_own_world(
    pmux: tuple[Mux, list[bytes]], profile: str
) -> None:
    mux, _ = pmux
    direct = await RawClient.connect(mux.direct)
    await direct.negotiate()
    everything = {
        c["name"]
        for c in msgspec.json.decode(await direct.command(b'{"execute":"query-commands"}'))[
            "return"
        ]
    }
    full_schema = msgspec.json.decode(await direct.command(b'{"execute":"query-qmp-schema"}'))
    policy = POLICY.profiles[profile]
    qmp = QMPClient("introspection")
    await qmp.connect(str(mux.sockets[profile]))
    try:
        commands = await qmp.execute("query-commands")
        schema = await qmp.execute("query-qmp-schema")
    finally:
        await qmp.disconnect()
    assert isinstance(commands, list) and isinstance(schema, list)
    listed = {c["name"] for c in commands}
    assert all(policy.command(name) is Decision.ALLOW for name in listed)
    allowed = {n for n in everything if policy.command(n) is Decision.ALLOW}
    own = {n for n in ("__org.qmpmux_whoami", "__org.qmpmux_list-clients")
           if policy.command(n) is Decision.ALLOW}  # fmt: skip
    assert listed == allowed | own
    names = {e["name"] for e in schema}
    assert {e["name"] for e in schema if e["meta-type"] == "command"} == listed
    assert all(policy.event(e["name"]) for e in schema if e["meta-type"] == "event")
    for entry in schema:  # every reference resolves inside the narrowed schema
        refs = [entry.get("arg-type"), entry.get("ret-type"), entry.get("element-type")]
        refs += [m.get("type") for m in entry.get("members", [])]
        refs += [v.get("type") for v in entry.get("variants", [])]
        assert all(r in names for r in refs if r), entry
    assert len(schema) < len(full_schema["return"])  # narrowed, not QEMU's whole schema


async def test_full_clients_see_qemus_commands_plus_qmpmux_own(
    pmux: tuple[Mux, list[bytes]],
) -> None:
    mux, _ = pmux
    direct = await RawClient.connect(mux.direct)
    await direct.negotiate()
    qemus = msgspec.json.decode(await direct.command(b'{"execute":"query-commands"}'))
    full = await client(mux, "full")
    reply = msgspec.json.decode(await full.command(b'{"execute":"query-commands"}'))
    names = [c["name"] for c in reply["return"]]
    # QEMU's own list, in QEMU's order, then qmpmux's own commands.
    assert names == [c["name"] for c in qemus["return"]] + [
        "__org.qmpmux_whoami",
        "__org.qmpmux_list-clients",
    ]


async def test_whoami_and_list_clients(pmux: tuple[Mux, list[bytes]]) -> None:
    mux, _ = pmux
    ro = await client(mux, "readonly")
    me = msgspec.json.decode(await ro.command(b'{"execute":"__org.qmpmux_whoami","id":1}'))
    ident = me["return"]
    assert me["id"] == 1 and ident["profile"] == "readonly"
    assert (ident["uid"], ident["pid"]) == (os.getuid(), os.getpid())
    assert ident["exe"] and ident["listener"].endswith("mux-readonly.sock")
    assert REFUSED in await ro.command(b'{"execute":"__org.qmpmux_list-clients","id":2}')
    full = await client(mux, "full")
    listing = msgspec.json.decode(await full.command(b'{"execute":"__org.qmpmux_list-clients"}'))
    clients = listing["return"]
    assert {c["profile"] for c in clients} == {"readonly", "full"}
    assert all({"commands-in-flight", "bytes-queued", "uid"} <= c.keys() for c in clients)


async def test_audit_records_every_command_with_secrets_redacted(
    pmux: tuple[Mux, list[bytes]],
) -> None:
    mux, records = pmux
    aud = await client(mux, "audited")
    add = (b'{"execute":"object-add","arguments":{"qom-type":"secret","id":"s1",'
           b'"data":"hunter2"},"id":1}')  # fmt: skip
    await aud.command(add)
    await aud.command(b'{"execute":"nope","id":2}')
    ro = await client(mux, "readonly")
    await ro.command(b'{"execute":"stop","id":3}')
    await ro.command(b'{"execute":"query-name","id":4}')
    log = [msgspec.json.decode(r) for r in records]
    assert b"hunter2" not in b"".join(records)
    by_command = {r["command"]: r for r in log}
    obj = by_command["object-add"]
    assert obj["arguments"]["data"] == "<redacted>" and obj["arguments"]["id"] == "s1"
    assert obj["decision"] == "allowed" and obj["result"] == "ok" and obj["profile"] == "audited"
    assert by_command["nope"]["result"] == "CommandNotFound"
    stop = by_command["stop"]
    assert stop["decision"] == "denied" and stop["profile"] == "readonly"
    assert "arguments" not in by_command["query-name"]  # arguments are opt-in per profile
    for r in log:
        assert {"time", "client", "listener", "uid", "gid", "pid", "latency_ms"} <= r.keys()
        assert r["uid"] == os.getuid() and r["latency_ms"] >= 0


async def test_nobody_may_yank_the_upstream_connection(pmux: tuple[Mux, list[bytes]]) -> None:
    mux, _ = pmux
    full = await client(mux, "full")
    yanks = msgspec.json.decode(await full.command(b'{"execute":"query-yank"}'))["return"]
    chardevs = [y["id"] for y in yanks if y["type"] == "chardev"]
    assert chardevs  # QEMU lists its monitors; qmpmux's own is among them
    for chardev in chardevs:
        cmd = b'{"execute":"yank","arguments":{"instances":[{"type":"chardev","id":"%s"}]}}'
        reply = await full.command(cmd % chardev.encode())
        assert REFUSED in reply
    assert (await full.command(b'{"execute":"query-name"}')) == b'{"return": {}}\r\n'


def test_default_policy_is_full_for_everyone() -> None:
    assert DEFAULT_POLICY.assign("unix:/x", "full", 0, 0, "x").name == "full"


async def pipeline(c: RawClient, commands: list[bytes]) -> list[dict[str, JsonValue]]:
    """Send every command at once, read one reply each (events skipped), in order."""
    sender = asyncio.create_task(c.send(b"".join(commands)))
    replies: list[dict[str, JsonValue]] = []
    while len(replies) < len(commands):
        message = await c.read_json()  # fails if the connection closed (QEMU died)
        if "event" not in message:
            replies.append(message)  # type: ignore[arg-type]
    await asyncio.wait_for(sender, 10)
    return replies


def call(name: str, **arguments: JsonValue) -> bytes:
    return msgspec.json.encode({"execute": name, "arguments": arguments})


async def still_answers(c: RawClient, mux: Mux) -> None:
    """QEMU is alive and qmpmux's upstream connection still carries commands."""
    assert mux.qemu.alive()
    reply = msgspec.json.decode(await c.command(b'{"execute":"query-status","id":"alive"}'))
    assert reply["id"] == "alive" and reply["return"]["status"] in (
        "running",
        "paused",
        "prelaunch",
    )


def refused(reply: dict[str, JsonValue], error_class: str | None = None) -> str:
    """The desc of a qmpmux policy refusal (of `error_class`, if given)."""
    error = reply.get("error")
    assert isinstance(error, dict), reply
    desc = error["desc"]
    assert isinstance(desc, str) and "refused by qmpmux policy" in desc, reply
    assert error_class is None or error["class"] == error_class, reply
    return desc


async def test_readonly_survives_every_type_qemu_lists(pmux: tuple[Mux, list[bytes]]) -> None:
    """Introspection that builds an object of any type QEMU lists (several abort or crash
    QEMU 7.2) must not be a way for a readonly or vm-control client to kill the VM."""
    mux, _ = pmux
    direct = await RawClient.connect(mux.direct)
    await direct.negotiate()
    listed = await direct.command(b'{"execute":"qom-list-types","arguments":{"abstract":true}}')
    types = [t["name"] for t in msgspec.json.decode(listed)["return"]]
    models = [
        c["name"]
        for c in msgspec.json.decode(await direct.command(b'{"execute":"query-cpu-definitions"}'))[
            "return"
        ]
    ]
    assert types and models
    commands = [
        call(command, typename=name)
        for name in types
        for command in ("qom-list-properties", "device-list-properties")
    ]
    commands += [
        call("query-cpu-model-expansion", type=kind, model={"name": model})
        for model in models
        for kind in ("static", "full")
    ]
    for profile in ("readonly", "vm-control"):
        c = await client(mux, profile)
        replies = await pipeline(c, commands)
        assert len(replies) == len(commands)
        for reply in replies:
            refused(reply)
        await still_answers(c, mux)


async def test_readonly_reads_every_property_of_a_real_machine(tmp_path: Path) -> None:
    """qom-get runs each property's getter: walk a whole `pc` machine's QOM tree through
    readonly and read every property (QEMU's own qom-test does the same walk)."""
    workdir = tmp_path / "pc"
    workdir.mkdir()
    vm = start_qemu(workdir, extra=("-machine", "pc", "-S"))
    mux = await start_mux(vm, tmp_path, profiles=("readonly",))
    try:
        ro = await client(mux, "readonly")
        paths, properties = ["/"], []
        while paths:  # breadth first, one pipelined batch per level
            listings = await pipeline(ro, [call("qom-list", path=p) for p in paths])
            level, paths = paths, []
            for parent, listing in zip(level, listings, strict=True):
                entries = listing["return"]
                assert isinstance(entries, list)
                for entry in entries:
                    assert isinstance(entry, dict)
                    name, kind = entry["name"], entry["type"]
                    assert isinstance(name, str) and isinstance(kind, str)
                    properties.append((parent, name))
                    if kind.startswith("child<"):
                        paths.append(f"{parent.rstrip('/')}/{name}")
        assert len(properties) > 100  # a pc machine has hundreds of devices
        gets = await pipeline(ro, [call("qom-get", path=p, property=n) for p, n in properties])
        assert sum("return" in g for g in gets) > len(gets) // 2
        await still_answers(ro, mux)
    finally:
        mux.proxy.stop("test over")
        await asyncio.wait_for(mux.proxy.wait(), 10)
        vm.stop()


HMP_STOP = call("human-monitor-command", **{"command-line": "stop"})
HMP_INFO = call("human-monitor-command", **{"command-line": "info status"})


async def test_hmp_is_no_way_around_deny_commands(pmux: tuple[Mux, list[bytes]]) -> None:
    mux, _ = pmux
    star = await client(mux, "star")
    for command in (HMP_STOP, HMP_INFO, b'{"execute":"stop"}'):
        refused(msgspec.json.decode(await star.command(command)), "CommandNotFound")
    # Arguments that run host programs are escape hatches too: not granted by `*`.
    for command in (
        call("migrate", uri="exec:kill -STOP $PPID"),
        call("netdev_add", type="tap", id="n0", script="/bin/true"),
    ):
        reply = msgspec.json.decode(await star.command(command))
        assert "host" in refused(reply, "GenericError")
    status = msgspec.json.decode(await star.command(b'{"execute":"query-status"}'))
    assert status["return"]["status"] == "running"
    migrate = msgspec.json.decode(await star.command(b'{"execute":"query-migrate"}'))
    assert "status" not in migrate["return"]  # no migration ever started
    # Named exactly (or inherited from `full`, which names it), HMP is granted, with
    # everything it implies: check-config says so (tests/test_config.py).
    for profile in ("named-hmp", "from-full"):
        c = await client(mux, profile)
        assert REFUSED in await c.command(b'{"execute":"stop"}')
        assert await c.command(HMP_INFO) == b'{"return": "VM status: running\\r\\n"}\r\n'
    named = await client(mux, "named-hmp")
    assert await named.command(HMP_STOP) == b'{"return": ""}\r\n'
    paused = msgspec.json.decode(await named.command(b'{"execute":"query-status"}'))
    assert paused["return"]["status"] == "paused"


# One sample per row of fdargs.FD_ARGUMENTS: the row's argument with the numeric fd "9".
FD_SAMPLES: dict[tuple[str, tuple[str, ...], Kind], dict[str, JsonValue]] = {
    ("getfd", ("fdname",), Kind.NAME): {"fdname": "9"},
    ("closefd", ("fdname",), Kind.NAME): {"fdname": "9"},
    ("add_client", ("fdname",), Kind.NAME): {"protocol": "vnc", "fdname": "9"},
    ("netdev_add", ("fd",), Kind.NAME): {"type": "tap", "id": "n0", "fd": "9"},
    ("netdev_add", ("fds",), Kind.NAMES): {"type": "tap", "id": "n0", "fds": "tap0:9"},
    ("netdev_add", ("vhostfd",), Kind.NAME): {"type": "vhost-vdpa", "id": "n0", "vhostfd": "9"},
    ("netdev_add", ("vhostfds",), Kind.NAMES): {"type": "tap", "id": "n0", "fds": "a:b",
                                                "vhostfds": "c:9"},
    ("netdev_add", ("sock-fds",), Kind.NAMES): {"type": "af-xdp", "id": "n0", "ifname": "e",
                                                "sock-fds": "9"},
    ("netdev_add", (), Kind.SOCKET): {"type": "stream", "id": "n0",
                                      "addr": {"type": "fd", "str": "9"}},
    ("device_add", ("fd",), Kind.NAME): {"driver": "x-pci-proxy-dev", "id": "d0", "fd": "9"},
    ("device_add", ("vhostfd",), Kind.NAME): {"driver": "vhost-vsock-pci", "guest-cid": 3,
                                              "vhostfd": "9"},
    ("device_add", ("ebpf-rss-fds",), Kind.NAME): {"driver": "virtio-net-pci",
                                                   "ebpf-rss-fds": ["a", "9"]},
    ("object-add", ("fd",), Kind.NAME): {"qom-type": "x-remote-object", "id": "r0", "fd": "9",
                                         "devid": "d0"},
    ("object-add", (), Kind.SOCKET): {"qom-type": "x-vfio-user-server", "id": "v0",
                                      "device": "d0", "socket": {"type": "fd", "str": "9"}},
    ("qom-set", ("value",), Kind.NAME): {"path": "/objects/r0", "property": "fd", "value": "9"},
    ("qom-set", ("value",), Kind.SOCKET): {"path": "/objects/v0", "property": "socket",
                                           "value": {"type": "fd", "str": "9"}},
    ("chardev-add", (), Kind.SOCKET): {"id": "c0", "backend": {"type": "socket", "data": {
        "addr": {"type": "fd", "data": {"str": "9"}}, "server": False}}},
    ("chardev-change", (), Kind.SOCKET): {"id": "c0", "backend": {"type": "udp", "data": {
        "remote": {"type": "fd", "data": {"str": "9"}}}}},
    ("nbd-server-start", (), Kind.SOCKET): {"addr": {"type": "fd", "data": {"str": "9"}}},
    ("blockdev-add", (), Kind.SOCKET): {"driver": "raw", "node-name": "b0", "file": {
        "driver": "nbd", "server": {"type": "fd", "str": "9"}, "export": "e"}},
    ("blockdev-reopen", (), Kind.SOCKET): {"options": [{"driver": "nbd", "node-name": "b0",
                                                        "server": {"type": "fd", "str": "9"}}]},
    ("block-export-add", (), Kind.SOCKET): {"type": "vhost-user-blk", "id": "e0",
                                            "node-name": "b0",
                                            "addr": {"type": "fd", "str": "9"}},
    ("migrate", ("uri",), Kind.URI): {"uri": "fd:9"},
    ("migrate", ("channels",), Kind.SOCKET): {"channels": [{"channel-type": "main", "addr": {
        "transport": "socket", "type": "fd", "str": "9"}}]},
    ("migrate-incoming", ("uri",), Kind.URI): {"uri": "fd:9"},
    ("migrate-incoming", ("channels",), Kind.SOCKET): {"channels": [{"channel-type": "main",
        "addr": {"transport": "socket", "type": "fd", "str": "9"}}]},
    ("migrate-recover", ("uri",), Kind.URI): {"uri": "fd:9"},
    ("dump-guest-memory", ("protocol",), Kind.URI): {"paging": False, "protocol": "fd:9"},
}  # fmt: skip


def test_every_fd_argument_has_a_sample_that_it_catches() -> None:
    rows = {(row.command, row.path, row.kind): row for row in FD_ARGUMENTS}
    assert rows.keys() == FD_SAMPLES.keys()
    for (command, _, _), args in FD_SAMPLES.items():
        found = numeric_fd(command, args)
        assert found is not None and found[1] == "9", command
        assert numeric_fd(command, msgspec.json.decode(
            msgspec.json.encode(args).replace(b'"9"', b'"fd9"').replace(b":9", b":fd9")
        )) is None, command  # fmt: skip


async def test_numeric_fds_never_reach_qemu_but_from_full(pmux: tuple[Mux, list[bytes]]) -> None:
    mux, _ = pmux
    star = await client(mux, "star")  # may run every command these arguments belong to
    commands = [call(command, **args) for (command, _, _), args in FD_SAMPLES.items()]
    for command, reply in zip(FD_SAMPLES, await pipeline(star, commands), strict=True):
        assert "numeric fd '9'" in refused(reply, "GenericError"), command
    await still_answers(star, mux)
    # `full` passes them through: QEMU's own errors show QEMU parsed them (safe values).
    full = await client(mux, "full")
    tap = await full.command(call("netdev_add", type="tap", id="n0", fd="9x"))
    assert b"Invalid file descriptor number '9x'" in tap
    closefd = await full.command(call("closefd", fdname="9"))
    assert b"File descriptor named '9' not found" in closefd
    await still_answers(full, mux)
