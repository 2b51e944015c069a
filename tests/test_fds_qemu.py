"""File descriptors through qmpmux to a real QEMU: each client's fd reaches its own
command, names are per client, fdsets are private but for `full`, and nothing leaks."""

from __future__ import annotations

import array
import asyncio
import fcntl
import itertools
import os
import re
import socket
import struct
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import msgspec
import pytest
from qemu.qmp import QMPClient

from qmpmux import fdargs
from qmpmux.policy import ProfileSpec, compile_policy
from qmpmux.qjson import JsonValue
from tests.conftest import Mux, start_mux
from tests.realqemu import Qemu, start_qemu
from tests.test_policy_qemu import FD_SAMPLES

FDP = ProfileSpec(
    commands=("getfd", "closefd", "add-fd", "remove-fd", "query-fdsets", "blockdev-add",
              "query-named-block-nodes", "chardev-add", "query-status")
)  # fmt: skip


class FdClient:
    """A raw client on a plain non-blocking unix socket, so it can pass fds."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    @classmethod
    async def connect(cls, path: Path, oob: bool = False) -> FdClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, str(path))
        client = cls(sock)
        assert (await client.read()).startswith(b'{"QMP"')
        caps = b',"arguments":{"enable":["oob"]}' if oob else b""
        assert await client.command(b'{"execute":"qmp_capabilities"%s}' % caps) == (
            b'{"return": {}}\r\n'
        )
        return client

    def send(self, data: bytes, fds: tuple[int, ...] = ()) -> None:
        """One sendmsg, fds on its first byte (small writes to a unix socket never block)."""
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        assert self.sock.sendmsg([data], ancillary) == len(data)

    async def read(self, timeout: float = 10) -> bytes:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            while b"\n" not in self.buffer:
                chunk = await loop.sock_recv(self.sock, 65536)
                if not chunk:
                    return b""
                self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"

    async def command(self, data: bytes, fds: tuple[int, ...] = ()) -> bytes:
        self.send(data, fds)
        while (line := await self.read()).startswith(b'{"timestamp"'):
            pass
        return line

    def close(self) -> None:
        self.sock.close()


@contextmanager
def peer_socket(path: Path) -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected pair whose accepted end's own address is `path`: QEMU describes a
    socket chardev by that address, which tells whose fd QEMU really holds."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    near = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    near.connect(str(path))
    far, _ = listener.accept()
    listener.close()
    try:
        yield near, far
    finally:
        near.close()
        far.close()


def chardev_add(chardev: str, name: str) -> bytes:
    return (
        b'{"execute":"chardev-add","arguments":{"id":"%s","backend":{"type":"socket",'
        b'"data":{"addr":{"type":"fd","data":{"str":"%s"}},"server":false}}}}'
        % (chardev.encode(), name.encode())
    )


def getfd(name: str) -> bytes:
    return b'{"execute":"getfd","arguments":{"fdname":"%s"}}' % name.encode()


async def chardev_files(direct: Path) -> dict[str, str]:
    """label -> filename, as a direct monitor of the same QEMU sees them."""
    client = await FdClient.connect(direct)
    try:
        reply = msgspec.json.decode(await client.command(b'{"execute":"query-chardev"}'))
    finally:
        client.close()
    return {c["label"]: c["filename"] for c in reply["return"]}


@pytest.fixture
async def fmux(qemu: Qemu, tmp_path: Path) -> AsyncIterator[Mux]:
    audit: list[bytes] = []
    mux = await start_mux(
        qemu, tmp_path, policy=compile_policy({"fdp": FDP}), audit=audit.append,
        profiles=("full", "fdp", "readonly"),
    )  # fmt: skip
    mux.audit = audit  # type: ignore[attr-defined]
    try:
        yield mux
    finally:
        mux.proxy.stop("test over")
        await asyncio.wait_for(mux.proxy.wait(), 10)


@pytest.mark.parametrize("ahead", [False, True], ids=["with-command", "sent-ahead"])
async def test_clients_using_the_same_fd_name_each_reach_their_own_fd(
    fmux: Mux, tmp_path: Path, ahead: bool
) -> None:
    """Three clients `getfd sk` (the fd on the command's bytes as libvirt sends it, or
    ahead on a space as qemu.qmp does) and add a chardev on `sk`: each chardev holds the
    socket its own client passed."""
    clients = [await FdClient.connect(fmux.path) for _ in range(3)]
    with (
        peer_socket(tmp_path / "p0") as (_, s0),
        peer_socket(tmp_path / "p1") as (_, s1),
        peer_socket(tmp_path / "p2") as (_, s2),
    ):
        for i, (client, sock) in enumerate(zip(clients, (s0, s1, s2), strict=True)):
            if ahead:
                client.send(b" ", (sock.fileno(),))
                assert await client.command(getfd("sk")) == b'{"return": {}}\r\n'
            else:
                assert await client.command(getfd("sk"), (sock.fileno(),)) == (
                    b'{"return": {}}\r\n'
                )
            assert await client.command(chardev_add(f"c{i}", "sk")) == b'{"return": {}}\r\n'
        files = await chardev_files(fmux.direct)
    for i in range(3):
        assert files[f"c{i}"] == f"unix:{tmp_path / f'p{i}'}"
    for client in clients:
        client.close()


async def test_pipelined_fd_commands_of_many_clients_never_swap_fds(
    fmux: Mux, tmp_path: Path
) -> None:
    """With oob negotiated upstream QEMU reads ahead of execution; four clients each
    pipeline five getfd + chardev-add pairs at once, and every chardev holds its fd."""
    clients = [await FdClient.connect(fmux.path, oob=oob) for oob in (True, False, True, False)]
    pairs = [[peer_socket(tmp_path / f"s{c}.{i}") for i in range(5)] for c in range(4)]
    socks = [[cm.__enter__() for cm in row] for row in pairs]
    try:
        for c, client in enumerate(clients):
            for i in range(5):
                client.send(getfd(f"n{i}"), (socks[c][i][1].fileno(),))
                client.send(chardev_add(f"x{c}.{i}", f"n{i}"))

        async def replies(client: FdClient) -> list[bytes]:
            return [await client.read() for _ in range(10)]

        for got in await asyncio.gather(*(replies(c) for c in clients)):
            assert got == [b'{"return": {}}\r\n'] * 10
        files = await chardev_files(fmux.direct)
        for c in range(4):
            for i in range(5):
                assert files[f"x{c}.{i}"] == f"unix:{tmp_path / f's{c}.{i}'}"
    finally:
        for row in pairs:
            for cm in row:
                cm.__exit__(None, None, None)
        for client in clients:
            client.close()


async def test_the_qemu_qmp_client_passes_fds_with_send_fd_scm(fmux: Mux, tmp_path: Path) -> None:
    """qemu.qmp sends the fd ahead on one byte of its own; its send_fd_scm needs the
    standard asyncio loop (it reaches into the transport's socket), so it runs in a thread
    of its own while qmpmux serves on this test's uvloop."""

    async def client(fd: int) -> None:
        qmp = QMPClient("fd-test")
        await qmp.connect(str(fmux.path))
        try:
            qmp.send_fd_scm(fd)
            await qmp.execute("getfd", {"fdname": "sk"})
            await qmp.execute("chardev-add", {"id": "q", "backend": {"type": "socket", "data": {
                "addr": {"type": "fd", "data": {"str": "sk"}}, "server": False}}})  # fmt: skip
        finally:
            await qmp.disconnect()

    with peer_socket(tmp_path / "q") as (_, far):
        await asyncio.wait_for(asyncio.to_thread(asyncio.run, client(far.fileno())), 20)
        assert (await chardev_files(fmux.direct))["q"] == f"unix:{tmp_path / 'q'}"


# Each step: (command, pass an fd with it). QEMU's fd numbers differ between the two
# paths, so successful add-fd replies are compared with the numbers masked.
ERRORS = [
    (getfd("a"), False),  # no fd: QEMU's own error
    (b'{"execute":"getfd","arguments":{"fdname":1}}', True),  # refused; the fd waits
    (getfd("a"), False),  # takes the fd that waited
    (b'{"execute":"closefd","arguments":{"fdname":"nope"}}', False),
    (b'{"execute":"closefd","arguments":{"fdname":"a"}}', False),
    (b'{"execute":"closefd","arguments":{"fdname":"a"}}', False),  # gone now
    (chardev_add("c", "missing"), False),
    (b'{"execute":"add-fd"}', False),
    (b'{"execute":"add-fd","arguments":{"fdset-id":"x"}}', True),
    (b'{"execute":"add-fd","arguments":{"fdset-id":7,"opaque":"o"}}', False),  # waited
    (b'{"execute":"add-fd","arguments":{"fdset-id":-1}}', True),
    (b'{"execute":"remove-fd","arguments":{"fdset-id":99}}', False),
    (b'{"execute":"remove-fd","arguments":{"fdset-id":7,"fd":99999}}', False),
    (b'{"execute":"getfd","arguments":{"fdname":"9a"}}', True),
    (b'{"exec-oob":"getfd","arguments":{"fdname":"b"},"id":1}', True),
    (b'{"execute":"getfd","arguments":{"fdname":"b","x":1}}', False),
    (getfd("b"), False),  # the fd passed with the exec-oob still waits
    (b'{"execute":"remove-fd","arguments":{"fdset-id":7}}', False),
]


async def _run_steps(path: Path) -> list[bytes]:
    client = await FdClient.connect(path, oob=True)
    replies = []
    try:
        for data, with_fd in ERRORS:
            r, w = os.pipe()
            try:
                replies.append(await client.command(data, (r,) if with_fd else ()))
            finally:
                os.close(r)
                os.close(w)
    finally:
        client.close()
    return [re.sub(rb'"fd": \d+', b'"fd": N', reply) for reply in replies]


async def test_fd_errors_are_qemu_s_own(fmux: Mux) -> None:
    """The same steps on a direct monitor and through qmpmux give the same bytes."""
    direct = await _run_steps(fmux.direct)
    assert await _run_steps(fmux.path) == direct


_TAPS = itertools.count()
TUNSETIFF = 0x400454CA  # linux/if_tun.h
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000


def _tap_fd() -> int:
    """A new tap device's fd (the device goes with its last fd); a skip on a host
    without /dev/net/tun."""
    name = f"qmx{os.getpid() % 10000}t{next(_TAPS)}"
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR)
    except OSError as exc:
        pytest.skip(f"no tap devices here: {exc}")
    try:
        fcntl.ioctl(
            fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        )
    except OSError as exc:
        os.close(fd)
        pytest.skip(f"no tap devices here: {exc}")
    return fd


@pytest.mark.parametrize("piece", [None, 1], ids=["whole", "in-pieces"])
@pytest.mark.parametrize("fds", ["a:", "a", ":", "::", "a::", "a:b:c"])
async def test_a_tap_s_list_of_fd_names_is_read_as_qemu_reads_it(
    fmux: Mux, fds: str, piece: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tap netdev given a colon list of fd names, a real tap fd passed as `a`: QEMU's
    tap reads `a:` as one name (net/tap.c get_fds), and reads qmpmux's renamed list as
    the same names: the reply is a direct monitor's (`a:` once failed through qmpmux,
    `File descriptor named '' has not been found`). `in-pieces`: renamed and written a
    piece at a time, as a list of megabytes is (fdargs._PIECE)."""
    if piece is not None:
        monkeypatch.setattr(fdargs, "_PIECE", piece)
        monkeypatch.setattr(fdargs, "_KEPT_FROM", 0)
    replies = []
    for path in (fmux.direct, fmux.path):
        client = await FdClient.connect(path)
        fd = _tap_fd()
        try:
            assert await client.command(getfd("a"), (fd,)) == b'{"return": {}}\r\n'
        finally:
            os.close(fd)
        netdev = f"tap{next(_TAPS)}".encode()
        args = b'{"type":"tap","id":"%s","fds":"%s"}' % (netdev, fds.encode())
        reply = await client.command(b'{"execute":"netdev_add","arguments":%s}' % args)
        replies.append(re.sub(rb"FD \d+", b"FD N", reply))  # (QEMU's own fd numbers differ)
        client.close()
    assert replies[1] == replies[0]
    assert (replies[0] == b'{"return": {}}\r\n') is (fds in ("a", "a:"))  # one name, a


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_fds_never_leak_over_hundreds_of_clients(fmux: Mux, tmp_path: Path) -> None:
    """Clients that name fds, leave fds waiting, pass fds to a read-only listener, or
    leave mid-command: afterwards QEMU and qmpmux hold as many fds as before."""
    qemu_pid = fmux.qemu.proc.pid
    probe = await FdClient.connect(fmux.path)
    await probe.command(b'{"execute":"query-status"}')
    before = (_fd_count(qemu_pid), _fd_count(os.getpid()))
    for i in range(200):
        r, w = os.pipe()
        try:
            kind = i % 4
            client = await FdClient.connect(fmux.sockets["readonly" if kind == 3 else "fdp"])
            if kind == 0:
                assert await client.command(getfd(f"k{i}"), (r,)) == b'{"return": {}}\r\n'
                add = b'{"execute":"add-fd","arguments":{"opaque":"x"}}'
                assert (await client.command(add, (w,))).startswith(b'{"return": {"fd": ')
            elif kind == 1:
                client.send(b" ", (r, w))  # waiting, never taken
                await client.command(b'{"execute":"query-status"}')
            elif kind == 2:
                client.send(b" ", (r, w))  # replaced by the next, then
                client.send(getfd("late"), (w,))  # left before the reply
            else:
                client.send(b" ", (r, w))  # a read-only client may not pass fds
                await client.command(b'{"execute":"query-status"}')
            client.close()
        finally:
            os.close(r)
            os.close(w)
    # qmpmux closes departed clients' names and fdsets in QEMU with commands of its own;
    # once every client is gone and those are answered, a command after them sees all.
    hub = fmux.proxy.hub

    def cleaning() -> bool:
        systems = [up.system for up in hub.links]
        return any(s.queues[0] or any(s.inflight) for s in systems)

    while hub.clients.keys() - {1} or cleaning():
        await probe.command(b'{"execute":"query-status"}')
    await probe.command(b'{"execute":"query-status"}')
    assert (_fd_count(qemu_pid), _fd_count(os.getpid())) == before
    listing = await probe.command(b'{"execute":"query-fdsets"}')
    assert listing == b'{"return": []}\r\n'
    probe.close()


async def test_the_audit_record_counts_the_fds_a_command_carried(fmux: Mux) -> None:
    client = await FdClient.connect(fmux.path)
    r, w = os.pipe()
    try:
        assert await client.command(getfd("a"), (r,)) == b'{"return": {}}\r\n'
    finally:
        os.close(r)
        os.close(w)
        client.close()
    records = [msgspec.json.decode(line) for line in fmux.audit]  # type: ignore[attr-defined]
    (record,) = [r for r in records if r["command"] == "getfd"]
    assert record["fds"] == 1


def _named(value: JsonValue) -> JsonValue:
    """A numeric-fd sample with the number 9 turned into the name `nope`."""
    if isinstance(value, str):
        return ":".join("nope" if part == "9" else part for part in value.split(":"))
    if isinstance(value, list):
        return [_named(item) for item in value]
    if isinstance(value, dict):
        return {key: _named(item) for key, item in value.items()}
    return value


# One sample per row of fdargs.FD_ARGUMENTS (tests/test_policy_qemu.py keeps them in step
# with the table), less `getfd` (it needs an fd) and the rows QEMU 7.2 crashes on before
# it looks at the fd (x-remote-object; see README "What readonly promises").
NAME_SAMPLES = [
    (command, _named(args))
    for (command, _, _), args in FD_SAMPLES.items()
    if command not in ("getfd", "object-add", "qom-set")
]


async def test_every_fd_argument_is_translated_and_qemu_s_errors_name_the_client_s_fd(
    fmux: Mux, tmp_path: Path
) -> None:
    """Each fd-name argument QEMU has, naming an fd this client never passed: qmpmux's
    reply is byte for byte that of a direct monitor of a twin QEMU (QEMU looked the name
    up in the client's own name space, and its error names the fd as the client does)."""
    commands = [b'{"execute":"%s","arguments":%s}' % (c.encode(), msgspec.json.encode(a))
                for c, a in NAME_SAMPLES]  # fmt: skip
    (tmp_path / "twin").mkdir()
    twin = start_qemu(tmp_path / "twin", monitors=1)  # some of these succeed: fresh state
    replies = {}
    try:
        for path in (twin.monitors[0], fmux.path):
            client = await FdClient.connect(path)
            replies[path] = [await client.command(command) for command in commands]
            client.close()
    finally:
        twin.stop()
    for (command, _), direct, proxied in zip(
        NAME_SAMPLES, replies[twin.monitors[0]], replies[fmux.path], strict=True
    ):
        assert proxied == direct, command
        assert b"qmpmux." not in proxied


async def test_fdsets_hold_each_client_s_own_file_and_stay_private(
    fmux: Mux, tmp_path: Path
) -> None:
    """Two clients `add-fd` files of different sizes and open them as block nodes through
    `/dev/fdset/N`: each node has its own client's file. A profile other than `full` sees
    and removes only its own fdsets; `full` sees QEMU's whole list."""
    sizes = {"a": 1 << 20, "b": 3 << 20}
    clients, fdsets = {}, {}
    for name, size in sizes.items():
        path = tmp_path / f"{name}.img"
        path.write_bytes(b"\0" * size)
        fd = os.open(path, os.O_RDWR)
        try:
            clients[name] = client = await FdClient.connect(fmux.sockets["fdp"])
            reply = msgspec.json.decode(await client.command(b'{"execute":"add-fd"}', (fd,)))
        finally:
            os.close(fd)
        fdsets[name] = reply["return"]["fdset-id"]
        add = (b'{"execute":"blockdev-add","arguments":{"driver":"file","node-name":"%s",'
               b'"filename":"/dev/fdset/%d"}}') % (name.encode(), fdsets[name])  # fmt: skip
        assert await client.command(add) == b'{"return": {}}\r\n'
    nodes = msgspec.json.decode(
        await clients["a"].command(b'{"execute":"query-named-block-nodes"}')
    )["return"]
    assert {n["node-name"]: n["image"]["virtual-size"] for n in nodes} == sizes
    for name, client in clients.items():
        listing = msgspec.json.decode(await client.command(b'{"execute":"query-fdsets"}'))
        assert [s["fdset-id"] for s in listing["return"]] == [fdsets[name]]
    other = b'{"execute":"remove-fd","arguments":{"fdset-id":%d}}' % fdsets["b"]
    assert await clients["a"].command(other) == (
        b'{"error": {"class": "GenericError", "desc": "File descriptor named '
        b"'fdset-id:%d' not found\"}}\r\n" % fdsets["b"]
    )
    full = await FdClient.connect(fmux.path)
    listing = msgspec.json.decode(await full.command(b'{"execute":"query-fdsets"}'))
    assert sorted(s["fdset-id"] for s in listing["return"]) == sorted(fdsets.values())
    for client in (*clients.values(), full):
        client.close()
