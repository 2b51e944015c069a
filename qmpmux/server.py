"""The asyncio shell around the hub: listening sockets, client and upstream channels.

Everything here is plumbing: it turns socket readiness into hub inputs and hub actions
into socket operations, flushing each touched channel once per batch so a burst of
replies or an event fan-out costs one `send` per client. No protocol decision is made
here; they all live in `hub.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import gc
import logging
import os
import socket
import stat
import struct
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from qmpmux import metrics
from qmpmux.channel import ANCILLARY_SIZE, SLOW_READER_CUT, Channel, received_fds
from qmpmux.config import Address, Config, ConfigError, Listener
from qmpmux.exporter import MetricsServer, Source, registry_for
from qmpmux.hub import (
    Action,
    Audit,
    Broadcast,
    CloseClient,
    CloseFds,
    Exit,
    Hub,
    Judge,
    PauseClient,
    ResumeClient,
    ToClient,
    ToUpstream,
    UpstreamReady,
    View,
)
from qmpmux.judgement import OFF_LOOP_BYTES, Judgement
from qmpmux.link import UpstreamState
from qmpmux.policy import Policy
from qmpmux.session import Peer
from qmpmux.systemd import Inherited, InheritError, listen_fds
from qmpmux.views import OFF_LOOP_VIEW_BYTES, ViewJob

log = logging.getLogger("qmpmux.server")


# Channel keys: clients are numbered from 1; upstream monitor (link) i is -1 - i.
def _link_key(link: int) -> int:
    return -1 - link


_PEERCRED = struct.Struct("3i")
# Bounds the parsing work one client can cause per loop turn before the budget below has
# seen what its input costs: 1 KiB of the slowest input (~2.4 us a byte) is ~2.5 ms, where
# 4 KiB was 10 ms. Commands are far smaller, and a 16 MiB one is still read 100 times
# faster than QEMU reads it.
CLIENT_READ_SIZE = 1024
# Seconds of hub work per client read, then reads shrink: another client's round trip
# waits for about two such reads under a flood of slow input.
CLIENT_READ_BUDGET = 0.0005
UPSTREAM_READ_SIZE = 262144


@functools.cache
def worker_pool() -> ThreadPoolExecutor:
    """The worker thread big messages are judged on (judgement.py) and long replies viewed
    on (views.py), one for the whole process (every VM's hub in host mode): at most one
    core's worth of such work, one job at a time. While it runs, the event loop's thread
    gets the interpreter back within the switch interval (and the C step under way), set
    here to 0.2 ms (5 ms by default): that is how long a job on megabytes can delay anyone
    else each time the loop wakes, and a round trip wakes it several times. Against 1 ms,
    another client's p99 while an `ops` client's big commands are judged fell from 4.3-6.4
    ms to 1.4-3.5 for three shapes of the hostile benchmark (fd names in a list and in a
    colon list, a socket address behind `{}`; `transaction` and one long fd name, noisier,
    from 3.4-4.7 and 2.0-3.3 to 1.8-6.7 and 0.5-3.7). It matters only while both run."""
    sys.setswitchinterval(0.0002)
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="qmpmux-worker")


def _run_job(job: Judgement | ViewJob) -> None:
    """Run `job` on the worker thread with the cyclic garbage collector off: building a
    container of megabytes (hundreds of thousands of objects) would set off full
    collections, each holding the interpreter for tens of milliseconds, in any thread.
    Everything it builds is freed by reference counting; what the event loop leaves
    for the collector meanwhile waits until the job is done."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        job.run()
    finally:
        if collecting:
            gc.enable()


def _close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _close_unread(conn: socket.socket) -> None:
    """Close a connection qmpmux never read: read away what it sent first (closing with
    input pending resets the connection instead of ending it) and close the fds that
    came with it, which nothing else would."""
    conn.setblocking(False)
    try:
        for _ in range(64):
            data, ancillary, _flags, _addr = conn.recvmsg(65536, ANCILLARY_SIZE)
            _close_fds(received_fds(ancillary))
            if not data:
                break
    except OSError:
        pass
    conn.close()


class StartupError(Exception):
    """qmpmux cannot start; the message is one line for the operator."""


@dataclass
class _Listening:
    listener: Listener
    sock: socket.socket
    label: str
    # A socket qmpmux bound itself, whose file it removes when done. An inherited one
    # (systemd:NAME) belongs to the service manager: closed here, never unlinked or rebound.
    owned: bool = True


def _check_stale_unix(path: str) -> None:
    """Replace a socket file left by a dead process; refuse to steal a live one.

    `unlink` removes a name and never follows it, so the worst a swap between the check
    and the unlink can do is remove an entry someone who may write the directory put
    there; the inode is compared again just before, to refuse what changed meanwhile.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"cannot listen on unix:{path}: file exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        try:
            again = os.lstat(path)
        except FileNotFoundError:
            return  # gone meanwhile: nothing to replace
        if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino):
            raise StartupError(
                f"cannot listen on unix:{path}: it was replaced while qmpmux checked it"
            ) from None
        os.unlink(path)  # nobody accepts on it: stale
        return
    except OSError as exc:
        raise StartupError(f"cannot listen on unix:{path}: {exc.strerror}") from None
    finally:
        probe.close()
    raise StartupError(f"cannot listen on unix:{path}: another process is serving it")


def _bind_unix(
    path: str, mode: int, owner: int | None = None, group: int | None = None
) -> socket.socket:
    """A listening-ready unix socket created with `mode` by `bind` itself, then given to
    `owner`/`group`.

    Linux creates the socket file with 0777 minus the umask (`unix_bind`, net/unix/
    af_unix.c), so the umask alone sets the mode: no `chmod` by path afterwards, which
    would follow a symlink swapped in after `bind`. The umask is process-wide: this runs
    only at start-up (`Proxy.bind`), synchronously, before QEMU is spawned or any client
    accepted, when qmpmux creates no other file, and the old umask is back at once.
    The result is checked without following links; a default ACL on the directory, which
    overrides the umask, is refused rather than widened or narrowed by path.

    Ownership cannot be set the same way: a unix socket has no descriptor for `fchown`
    (`fchown` on the socket fd changes the socket inode, not the file `bind` made), and
    `bind` takes qmpmux's own uid and gid. So the file is born with its final mode and
    qmpmux's owner, which can only keep the intended users out, never let others in, and
    `lchown` (`os.chown(..., follow_symlinks=False)`) gives it away right after: it never
    follows a link swapped in meanwhile. `lstat` then checks that the same inode, still
    a socket, carries the owner and group; otherwise the name is removed and start-up
    fails. (Whoever can swap names in the directory could replace the socket outright:
    the directory's permissions are the boundary, as for any socket.)
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(~mode & 0o777)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise StartupError(f"cannot listen on unix:{path}: it was replaced right after bind")
        if stat.S_IMODE(st.st_mode) != mode:
            os.unlink(path)
            raise StartupError(
                f"cannot listen on unix:{path}: bind created it with mode "
                f"{stat.S_IMODE(st.st_mode):04o}, not {mode:04o} (a default ACL on the directory?)"
            )
        if owner is not None or group is not None:
            _give_away(path, st, owner, group)
    except BaseException:
        sock.close()
        raise
    return sock


def _give_away(path: str, st: os.stat_result, owner: int | None, group: int | None) -> None:
    """lchown the socket `bind` just made, then check by lstat that it took (see above)."""
    try:
        os.chown(path, -1 if owner is None else owner, -1 if group is None else group,
                 follow_symlinks=False)  # fmt: skip
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(path)
        whom = " and ".join(
            f"{key} {value}" for key, value in (("uid", owner), ("gid", group)) if value is not None
        )
        hint = (
            " (needs CAP_CHOWN, or a group qmpmux's user is in)" if exc.errno == errno.EPERM else ""
        )
        raise StartupError(f"cannot give unix:{path} to {whom}: {exc.strerror}{hint}") from None
    after = os.lstat(path)
    if (
        (after.st_dev, after.st_ino) != (st.st_dev, st.st_ino)
        or not stat.S_ISSOCK(after.st_mode)
        or (owner is not None and after.st_uid != owner)
        or (group is not None and after.st_gid != group)
    ):
        raise StartupError(f"cannot listen on unix:{path}: it was replaced while qmpmux owned it")


def open_listener(listener: Listener) -> socket.socket:
    """Bind and listen, with the unix socket's mode set before anyone can connect."""
    address = listener.address
    try:
        if address.kind == "unix":
            _check_stale_unix(address.path)
            sock = _bind_unix(address.path, listener.mode, listener.owner, listener.group)
        elif address.kind == "tcp":
            infos = socket.getaddrinfo(
                address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            family, kind, proto, _, sockaddr = infos[0]
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
        else:
            raise StartupError(f"{address} is inherited, not opened (Proxy.bind adopts it)")
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        raise StartupError(f"cannot listen on {address}: {exc.strerror or exc}") from None
    except ConfigError as exc:
        raise StartupError(str(exc)) from None
    return sock


_FAMILIES = {socket.AF_UNIX: "unix", socket.AF_INET: "tcp", socket.AF_INET6: "tcp"}


def adopt_listener(
    listener: Listener, inherited: Inherited, allow_remote: bool
) -> list[socket.socket]:
    """The sockets the service manager passed under `systemd:NAME`, ready to accept on.

    They are served as they are: qmpmux never binds, listens again, chmods or unlinks
    them (the .socket unit owns their address, mode and owner). A TCP one bound to a
    non-loopback address needs --allow-remote, like a TCP listener of qmpmux's own."""
    try:
        socks = inherited.take(listener.address.name)
    except InheritError as exc:
        raise StartupError(str(exc)) from None
    for sock in socks:
        where = f"{listener.address} (fd {sock.fileno()})"
        if sock.family not in _FAMILIES:
            for s in socks:
                s.detach()
            raise StartupError(f"cannot listen on {where}: not a unix or TCP socket")
        if sock.family != socket.AF_UNIX and not allow_remote:
            host = sock.getsockname()[0]
            if not Address("tcp", host=host, port=1).is_loopback:
                for s in socks:
                    s.detach()
                raise StartupError(
                    f"refusing to listen on non-loopback {where} at {host} without --allow-remote"
                )
        sock.setblocking(False)
    return socks


# Never follow a link at the last component, never become a controlling terminal, and
# never block on a FIFO without a reader while finding out what the target is.
_AUDIT_FLAGS = (
    os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NOCTTY
    | os.O_NONBLOCK
)  # fmt: skip


def _open_audit_file(target: str) -> int:
    """An append descriptor on a regular file owned by us that only we can read.

    A symlink is refused (O_NOFOLLOW); so is anything but a regular file and a file of
    another user. A pre-existing file group- or other-accessible is narrowed to 0600
    through the descriptor (no path lookup to race) and a warning says so: the operator
    asked for an audit log at that path, and the README promises one only its owner can
    read. What it held before may already have been read; the warning says that too.
    """
    try:
        fd = os.open(target, _AUDIT_FLAGS, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StartupError(
                f"cannot open audit log {target}: it is a symbolic link (not followed)"
            ) from None
        raise StartupError(f"cannot open audit log {target}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StartupError(f"cannot open audit log {target}: not a regular file")
        if st.st_uid != os.geteuid():
            raise StartupError(
                f"cannot open audit log {target}: owned by uid {st.st_uid}, not {os.geteuid()}"
            )
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.fchmod(fd, 0o600)
            log.warning(
                "audit log %s had mode %04o; set it to 0600 (earlier records may have been "
                "readable by others)", target, stat.S_IMODE(st.st_mode),
            )  # fmt: skip
        os.set_blocking(fd, True)
    except OSError as exc:
        os.close(fd)
        raise StartupError(f"cannot open audit log {target}: {exc.strerror}") from None
    except StartupError:
        os.close(fd)
        raise
    return fd


def open_audit(target: str) -> Callable[[bytes], None]:
    """A writer of audit records: a file only its owner can read, or stderr (journald)."""
    if target == "stderr":
        stream = sys.stderr.buffer

        def write_stderr(record: bytes) -> None:
            stream.write(record)
            stream.flush()

        return write_stderr
    fd = _open_audit_file(target)

    def write_file(record: bytes) -> None:
        os.write(fd, record)  # one append per record: lines never interleave

    return write_file


def _executable(pid: int) -> str | None:
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return None


def peer_of(sock: socket.socket, label: str, profile: str) -> Peer:
    if sock.family == socket.AF_UNIX:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            pid, uid, gid = _PEERCRED.unpack(raw)
        except OSError:
            return Peer(label, profile)
        return Peer(label, profile, uid=uid, gid=gid, pid=pid, exe=_executable(pid))
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return Peer(label, profile)
    return Peer(label, profile, address=f"{host}:{port}")


RECONNECT_FIRST = 0.1  # seconds before the first reconnect attempt; doubled each failure
RECONNECT_MAX = 5.0  # ... up to this, then retried at this pace forever


@dataclass
class _Waiting:
    """A client that connected while QEMU was away: accepted, not read, not greeted."""

    conn: socket.socket
    entry: _Listening
    deadline: asyncio.TimerHandle


class Proxy:
    """Runs one hub at a time: the upstream socket(s), any number of listeners and clients.

    With `reconnect` (README "Deploying": QEMU restarts) a lost upstream ends only that
    session: its clients are closed, the listeners stay, and `reconnect()` is called
    with backoff until it gives sockets to a QEMU that greets; a fresh hub (same policy,
    limits and client numbering) then serves them, and the clients that connected
    meanwhile, held unread in `_waiting`, get the new QEMU's greeting."""

    def __init__(
        self,
        config: Config,
        hub: Hub | None = None,
        audit: Callable[[bytes], None] | None = None,
        reconnect: Callable[[], Awaitable[list[socket.socket]]] | None = None,
    ) -> None:
        self.config = config
        self.policy = hub.policy if hub is not None else config.policy
        self.vm = hub.vm if hub is not None else None  # its name in host mode
        self._audit = audit
        self.hub = hub or self._new_hub(1)
        self._reconnect = reconnect
        self._metrics: MetricsServer | None = None
        self._loop = asyncio.get_running_loop()
        self._links: list[Channel] = []  # one per upstream monitor, by link index
        self._clients: dict[int, Channel] = {}
        self._deadlines: dict[int, asyncio.TimerHandle] = {}  # negotiation, per client
        self._listening: list[_Listening] = []
        self._waiting: list[_Waiting] = []  # connected while QEMU is away
        self._ready: asyncio.Future[UpstreamReady] = self._loop.create_future()
        self._done: asyncio.Future[int] = self._loop.create_future()
        self._exit: Exit | None = None
        self._reconnecting: asyncio.Task[None] | None = None
        self._draining: asyncio.TimerHandle | None = None
        self._drain_reason = ""
        # The current session's greeting facts, None while QEMU is away; why it went.
        self.upstream: UpstreamReady | None = None
        self.down_reason: str | None = None
        self.hub.queued_bytes = self._queued_bytes

    def _new_hub(self, first_client: int) -> Hub:
        config = self.config
        return Hub(
            config.limits,
            self.policy,
            audit=self._audit is not None,
            listener_caps=config.listener_caps(),
            listener_message_bytes=config.listener_message_bytes(),
            links=config.link_count(),
            first_client=first_client,
            metrics=config.metrics is not None or self.vm is not None,
            vm=self.vm,
            off_loop_bytes=OFF_LOOP_BYTES,
            off_loop_view_bytes=OFF_LOOP_VIEW_BYTES,
        )

    def _queued_bytes(self, client: int) -> int:
        channel = self._clients.get(client)
        return channel.queued if channel is not None else 0

    # --- lifecycle --------------------------------------------------------------------------

    def bind(self, inherited: Inherited | None = None) -> None:
        """Bind every listener, and adopt the inherited ones (`systemd:NAME`), before QEMU
        is touched, so conflicts fail fast.

        Clients that connect early wait in the backlog until `start` has QEMU ready.
        `inherited` is what the service manager passed (read from the environment here
        when not given and a listener asks for it).
        """
        try:
            for listener in self.config.listeners:
                label = str(listener.address)
                if listener.address.kind == "systemd":
                    if inherited is None:
                        inherited = listen_fds()
                    for sock in adopt_listener(listener, inherited, self.config.allow_remote):
                        self._listening.append(_Listening(listener, sock, label, owned=False))
                    continue
                sock = open_listener(listener)
                self._listening.append(_Listening(listener, sock, label))
            self._bind_metrics()
        except StartupError:
            self.unbind()
            raise
        if inherited is not None and inherited.by_name:
            log.warning(
                "inherited socket(s) %s not served: no systemd:NAME listener names them",
                ", ".join(sorted(inherited.by_name)),
            )

    def _bind_metrics(self) -> None:
        """The --metrics socket, bound like a listener (a unix one with mode 0600)."""
        where = self.config.metrics
        if where is None or self._metrics is not None:
            return
        sock = open_listener(Listener(where))
        listeners = tuple((str(lst.address), lst.profile) for lst in self.config.listeners)
        unlink = where.path if where.kind == "unix" else ""
        registry = registry_for(lambda: (Source(None, self.hub, listeners),))
        self._metrics = MetricsServer(sock, registry, unlink)

    async def start(
        self, upstream: socket.socket | Sequence[socket.socket], handshake_timeout: float = 10.0
    ) -> UpstreamReady:
        """Negotiate with QEMU on `upstream` (one monitor, or one per link the hub was made
        for), then accept clients. Raises StartupError."""
        if not self._listening:
            self.bind()
        sockets = [upstream] if isinstance(upstream, socket.socket) else list(upstream)
        try:
            ready = await self._session(sockets, handshake_timeout)
        except StartupError:
            self.unbind()
            raise
        for entry in self._listening:
            self._loop.add_reader(entry.sock.fileno(), self._accept, entry)
            log.info("listening on %s (profile %s)", entry.label, entry.listener.profile)
        if self._metrics is not None:
            await self._metrics.start()
            log.info("serving metrics on %s/metrics", self.config.metrics)
        return ready

    async def start_away(self, reason: str) -> None:
        """Accept clients before QEMU is reached, and reach it as after losing it (with
        `reconnect`): clients wait, unread, until it greets (README "Host mode")."""
        assert self._reconnect is not None, "only a proxy that reconnects waits for QEMU"
        if self._exit is not None:
            return  # stopped while QEMU was being reached: no clients to accept, ever
        if not self._listening:
            self.bind()
        self.upstream, self.down_reason = None, reason
        for entry in self._listening:
            self._loop.add_reader(entry.sock.fileno(), self._accept, entry)
            log.info("listening on %s (profile %s)", entry.label, entry.listener.profile)
        if self._metrics is not None:
            await self._metrics.start()
        self._reconnecting = self._loop.create_task(self._reconnect_loop())

    async def _session(
        self, sockets: list[socket.socket], handshake_timeout: float
    ) -> UpstreamReady:
        """Open the links of the current hub on `sockets` and wait for QEMU's handshake."""
        assert len(sockets) == len(self.hub.links), "one socket per upstream link"
        for link, sock in enumerate(sockets):
            channel = Channel(
                self._loop,
                sock,
                self,
                _link_key(link),
                read_size=UPSTREAM_READ_SIZE,
                outbox_limit=1 << 30,
            )
            self._links.append(channel)
            channel.start()
        # SCM_RIGHTS needs unix sockets.
        self.hub.upstream_fds = all(sock.family == socket.AF_UNIX for sock in sockets)
        try:
            ready = await asyncio.wait_for(asyncio.shield(self._ready), handshake_timeout)
        except TimeoutError:
            greeted = all(up.state is not UpstreamState.GREETING for up in self.hub.links)
            for channel in self._links:
                channel.abort("no greeting")
            if greeted:
                raise StartupError(
                    f"QEMU did not answer qmp_capabilities within {handshake_timeout:g} s "
                    "(is a command an earlier connection left still running?)"
                ) from None
            raise StartupError(
                f"QEMU sent no QMP greeting within {handshake_timeout:g} s "
                "(is another client already connected to that monitor?)"
            ) from None
        self.upstream, self.down_reason = ready, None
        return ready

    async def wait(self) -> int:
        """Wait until the proxy is done (the upstream session ended, or, with reconnect,
        a signal); returns the exit code."""
        return await self._done

    def stop(self, reason: str, code: int = 0) -> None:
        """Close everything, as when QEMU goes away."""
        if self._exit is None:
            self._finish(Exit(code, reason))

    def drain(self, reason: str, timeout: float) -> None:
        """Graceful shutdown (README "Deploying"): stop accepting and reading clients, let
        every command already accepted (in QEMU, or queued to go) get its reply for up to
        `timeout` seconds, then close everything. Called again, it stops waiting."""
        if self._exit is not None:
            return
        if self._draining is not None or self.upstream is None or not self.hub.busy:
            self.stop(reason)
            return
        self.unbind()
        self._close_waiting("qmpmux is shutting down")
        for channel in self._clients.values():
            channel.pause_reading()
        log.info(
            "%s: not accepting clients; waiting up to %g s for the commands in flight",
            reason, timeout,
        )  # fmt: skip
        self._drain_reason = reason
        self._draining = self._loop.call_later(timeout, self._drain_expired, reason, timeout)

    def _drain_expired(self, reason: str, timeout: float) -> None:
        log.warning("commands still in flight after %g s; closing anyway", timeout)
        self.stop(reason)

    def reload(self, policy: Policy) -> None:
        """A new policy for every client, queued commands included (SIGHUP); a hub made
        after QEMU restarts gets it too."""
        self.policy = policy
        self._apply(self.hub.reload(policy))

    @property
    def client_count(self) -> int:
        return len(self._clients)

    # --- QEMU restarts ----------------------------------------------------------------------

    def _lost(self, exit_: Exit) -> None:
        """The upstream went away and qmpmux reconnects: close this session's clients (it
        was with that QEMU), keep listening, and hold new clients until QEMU is back."""
        log.error("upstream session over: %s; closing %d client(s), reconnecting",
                  exit_.reason, len(self._clients))  # fmt: skip
        self.upstream, self.down_reason = None, exit_.reason
        for channel in list(self._clients.values()):
            channel.close(exit_.reason, linger=2.0)
        links, self._links = self._links, []
        for link in links:
            link.abort("session over")  # synchronous: no late event reaches the next hub
        if not self._ready.done():
            self._ready.set_exception(StartupError(exit_.reason))
            self._ready.exception()
        if self._reconnecting is None:
            self._reconnecting = self._loop.create_task(self._reconnect_loop())

    async def _reconnect_loop(self) -> None:
        """Reconnect forever with backoff (RECONNECT_FIRST doubling to RECONNECT_MAX),
        logging when the pace changes, not at every attempt."""
        assert self._reconnect is not None
        delay = RECONNECT_FIRST
        logged: float | None = None
        try:
            while self._exit is None:
                await asyncio.sleep(delay)
                try:
                    sockets = await self._reconnect()
                    self._ready = self._loop.create_future()
                    stats = self.hub.stats  # counters go on across QEMU sessions
                    self.hub = self._new_hub(self.hub.next_client)
                    self.hub.stats = stats
                    self.hub.queued_bytes = self._queued_bytes
                    ready = await self._session(sockets, self.config.connect_timeout)
                except StartupError as exc:
                    self.down_reason = str(exc)
                    for channel in self._links:
                        channel.abort("reconnect failed")
                    self._links = []
                    if logged != delay:
                        log.warning("cannot reconnect to QEMU (%s); retrying every %g s",
                                    exc, delay)  # fmt: skip
                        logged = delay
                    delay = min(delay * 2, RECONNECT_MAX)
                    continue
                version = ready.version.decode("ascii", "replace")
                self.hub.stats.reconnects += 1
                log.info("reconnected: QEMU monitor %s, oob %s", version,
                         "on" if ready.oob else "off")  # fmt: skip
                waiting, self._waiting = self._waiting, []
                for held in waiting:
                    held.deadline.cancel()
                    self._admit(held.conn, held.entry)
                return
        finally:
            self._reconnecting = None

    def _hold(self, conn: socket.socket, entry: _Listening) -> None:
        """A client while QEMU is away: kept unread (what it sends, fds included, stays
        in its socket until a hub reads it) until QEMU is back or its time is up."""
        limit = self.config.limits.max_clients
        if len(self._waiting) + len(self._clients) >= limit:
            self.hub.log_client(
                logging.WARNING, "refusal", entry.label,
                "refusing client on %s: QEMU is away and %d clients wait (max-clients)",
                entry.label, len(self._waiting),
            )  # fmt: skip
            conn.close()
            return
        timeout = self.config.limits.negotiation_timeout
        deadline = self._loop.call_later(timeout, self._waited_too_long, conn, timeout)
        self._waiting.append(_Waiting(conn, entry, deadline))

    def _waited_too_long(self, conn: socket.socket, timeout: float) -> None:
        for held in self._waiting:
            if held.conn is conn:
                self._waiting.remove(held)
                self.hub.log_client(
                    logging.WARNING, "negotiation", held.entry.label,
                    "client on %s: QEMU not back within %g s; closing it", held.entry.label,
                    timeout,
                )  # fmt: skip
                _close_unread(conn)
                return

    def _close_waiting(self, reason: str) -> None:
        waiting, self._waiting = self._waiting, []
        if waiting:
            log.info("closing %d client(s) waiting for QEMU: %s", len(waiting), reason)
        for held in waiting:
            held.deadline.cancel()
            _close_unread(held.conn)

    # --- accepting --------------------------------------------------------------------------

    def _accept(self, entry: _Listening) -> None:
        for _ in range(64):
            try:
                conn, _addr = entry.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.error("accept on %s failed: %s", entry.label, exc.strerror or exc)
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    # Out of descriptors: back off instead of spinning on a readable socket.
                    self._loop.remove_reader(entry.sock.fileno())
                    self._loop.call_later(0.1, self._resume_accept, entry)
                return
            if self.upstream is None:
                self._hold(conn, entry)
            else:
                self._admit(conn, entry)

    def _admit(self, conn: socket.socket, entry: _Listening) -> None:
        """Hand a new connection to the hub, which greets it (or refuses it)."""
        if conn.family != socket.AF_UNIX:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = peer_of(conn, entry.label, entry.listener.profile)
        cid, actions = self.hub.client_connected(peer)
        if not cid:
            conn.close()
            return
        channel = Channel(
            self._loop,
            conn,
            self,
            cid,
            read_size=CLIENT_READ_SIZE,
            outbox_limit=self.config.limits.outbox_bytes,
            recv_fds=True,
            read_budget=CLIENT_READ_BUDGET,
        )
        self._clients[cid] = channel
        self._deadlines[cid] = self._loop.call_later(
            self.config.limits.negotiation_timeout, self._negotiation_deadline, cid
        )
        channel.start()
        self._apply(actions)

    def _negotiation_deadline(self, client: int) -> None:
        del self._deadlines[client]
        self._apply(self.hub.negotiation_deadline(client))

    def _resume_accept(self, entry: _Listening) -> None:
        if self._exit is None:
            self._loop.add_reader(entry.sock.fileno(), self._accept, entry)

    # --- channel events (ChannelHandler) ----------------------------------------------------

    def channel_data(self, key: int, data: bytes, fds: list[int]) -> None:
        if key < 0:
            _close_fds(fds)  # QEMU sends none; never keep what nobody asked for
            if self._links:
                self._apply(self.hub.upstream_data(data, _link_key(key)))
        else:  # the hub owns the fds from here: it hands them on or closes them
            self._apply(self.hub.client_data(key, data, fds))

    def channel_drained(self, key: int) -> None:
        if key > 0:
            self._apply(self.hub.client_drained(key))

    def channel_eof(self, key: int) -> None:
        if key < 0:
            if self._links:
                self._links[_link_key(key)].close("QEMU closed the monitor connection")
        else:
            self._apply(self.hub.client_eof(key))

    def channel_closed(self, key: int, reason: str, error: bool) -> None:
        if key < 0:
            # Not a link of a session already over, nor one qmpmux closes as it exits.
            if self._links and self._exit is None:
                why = f"lost the connection to QEMU: {reason}" if error else reason
                if (
                    self._reconnect is not None
                    and self.upstream is not None
                    and not self.hub.shutdown_seen  # then every monitor goes: the last ends it
                ):
                    # Any monitor lost ends the session: all are reconnected together.
                    self._apply(self.hub.session_over(f"monitor {_link_key(key)}: {why}"))
                else:
                    self._apply(self.hub.upstream_closed(why, _link_key(key)))
            return
        self._clients.pop(key, None)
        deadline = self._deadlines.pop(key, None)
        if deadline is not None:
            deadline.cancel()
        if error:
            self._log_client(
                logging.WARNING, "cut", key, "client %d: connection cut: %s", key, reason
            )
        self._apply(self.hub.client_closed(key, self._disconnect_reason(reason, error)))
        self._maybe_done()

    def _disconnect_reason(self, reason: str, error: bool) -> str:
        """How a client went, as one of metrics.py's fixed reasons (the hub overrides it
        when it asked for the close itself)."""
        if self._exit is not None:
            return metrics.SHUTDOWN
        if not error:
            return metrics.CLOSED
        return metrics.SLOW_READER if reason.startswith(SLOW_READER_CUT) else metrics.IO_ERROR

    def _log_client(self, level: int, kind: str, key: int, message: str, *args: object) -> None:
        flow = self.hub.clients.get(key)
        listener = flow.session.peer.listener if flow is not None else "(unknown)"
        self.hub.log_client(level, kind, listener, message, *args)

    # --- actions ----------------------------------------------------------------------------

    def _apply(self, actions: Iterable[Action]) -> None:
        dirty: set[Channel] = set()
        clients = self._clients
        for action in actions:
            kind = type(action)
            if kind is ToClient:
                assert isinstance(action, ToClient)
                channel = clients.get(action.client)
                if channel is not None:
                    channel.write(action.data)
                    dirty.add(channel)
            elif kind is Broadcast:
                assert isinstance(action, Broadcast)
                # At once: the first client need not wait for the last.
                found = map(clients.get, action.clients)
                Channel.write_all([c for c in found if c is not None], action.data)
            elif kind is ToUpstream:
                assert isinstance(action, ToUpstream)
                link = self._links[action.link]
                link.write(action.data, action.fds)
                dirty.add(link)
            elif kind is CloseFds:
                assert isinstance(action, CloseFds)
                _close_fds(action.fds)
            elif kind is CloseClient:
                assert isinstance(action, CloseClient)
                channel = clients.get(action.client)
                if channel is not None:
                    dirty.discard(channel)
                    channel.close(action.reason)
            elif kind is PauseClient:
                assert isinstance(action, PauseClient)
                if (channel := clients.get(action.client)) is not None:
                    channel.pause_reading()
            elif kind is Judge or kind is View:
                assert isinstance(action, Judge | View)
                self._off_loop(action)
            elif kind is ResumeClient:
                assert isinstance(action, ResumeClient)
                if (channel := clients.get(action.client)) is not None and not self._draining:
                    channel.resume_reading()
            elif kind is UpstreamReady:
                assert isinstance(action, UpstreamReady)
                if not self._ready.done():
                    self._ready.set_result(action)
            elif kind is Audit:
                assert isinstance(action, Audit) and self._audit is not None
                try:
                    self._audit(action.record)
                except OSError as exc:
                    log.error("audit log write failed: %s", exc.strerror or exc)
            elif kind is Exit:
                assert isinstance(action, Exit)
                # Reconnect once a session has served (start-up failures stay fatal), and
                # never while shutting down.
                served = self.upstream is not None or self._reconnecting is not None
                if self._reconnect and served and self._exit is None and not self._draining:
                    self._lost(action)
                else:
                    self._finish(action)
        for channel in dirty:
            channel.flush()
        if self._draining is not None and self._exit is None and not self.hub.busy:
            log.info("every command in flight answered")
            self.stop(self._drain_reason)

    def _off_loop(self, action: Judge | View) -> None:
        """Judge a big message, or view a long reply, on the worker thread; the hub hears
        back on the loop."""
        hub = self.hub
        job = action.job

        def back(_: object) -> None:
            # (a hub made after QEMU restarted never knew the client; once qmpmux exits,
            # nothing more goes to QEMU)
            if self.hub is hub and self._exit is None:
                if isinstance(job, Judgement):
                    self._apply(hub.judged(action.client, job))
                else:
                    self._apply(hub.viewed(action.client, job))

        try:
            self._loop.run_in_executor(worker_pool(), _run_job, job).add_done_callback(back)
        except RuntimeError as exc:  # the interpreter is exiting: the client is lost
            job.error = exc
            self._loop.call_soon(back, None)

    def _finish(self, exit_: Exit) -> None:
        if self._exit is not None:
            return
        self._exit = exit_
        level = logging.INFO if exit_.code == 0 else logging.ERROR
        log.log(level, "upstream session over: %s", exit_.reason)
        self.unbind()
        if self._draining is not None:
            self._draining.cancel()
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        self._close_waiting(exit_.reason)
        for channel in list(self._clients.values()):
            channel.close(exit_.reason, linger=2.0)
        if not self._ready.done():
            self._ready.set_exception(StartupError(exit_.reason))
            self._ready.exception()  # retrieved: start() may already have given up
        self._maybe_done()

    def unbind(self) -> None:
        """Stop listening and remove the unix socket files qmpmux created. An inherited
        socket is only closed here: the service manager keeps its own copy, its file and
        its backlog for the next start."""
        for entry in self._listening:
            self._loop.remove_reader(entry.sock.fileno())
            entry.sock.close()
            if entry.owned and entry.listener.address.kind == "unix":
                with contextlib.suppress(OSError):
                    os.unlink(entry.listener.address.path)
        self._listening.clear()
        if self._metrics is not None:
            self._metrics.close()

    def _maybe_done(self) -> None:
        if self._exit is not None and not self._clients and not self._done.done():
            for link in self._links:
                if not link.closed:
                    link.close("qmpmux exiting", linger=1.0)
            self._done.set_result(self._exit.code)
