"""One VM, start to end: its QEMU (started by qmpmux or connected to), its proxy with its
listeners and clients, its shutdown and its policy reloads.

The single-VM command runs one `Vm` and maps the process's signals onto it; host mode
(`host.py`) runs one per VM file, and a VM ending or failing there ends only that VM.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

import msgspec

from qmpmux.config import Config
from qmpmux.hub import Hub, UpstreamReady
from qmpmux.judgement import OFF_LOOP_BYTES
from qmpmux.policy import Policy
from qmpmux.server import Proxy, StartupError
from qmpmux.systemd import Inherited
from qmpmux.upstream import (
    CONTROL_ID,
    Spawned,
    connect_all,
    exit_status,
    monitor_ids,
    shut_down,
    spawn,
    stop_qemu,
)
from qmpmux.views import OFF_LOOP_VIEW_BYTES

log = logging.getLogger("qmpmux")


class Vm:
    """One QEMU and the proxy in front of it (README "Deploying")."""

    def __init__(
        self,
        config: Config,
        audit: Callable[[bytes], None] | None = None,
        name: str | None = None,
    ) -> None:
        self.config = config
        self.name = name
        hub = Hub(
            config.limits,
            config.policy,
            audit=audit is not None,
            # Nobody may yank qmpmux's own monitors (README "Policy").
            protected=(
                frozenset({*monitor_ids(config.lanes), CONTROL_ID}) if config.spawn else frozenset()
            ),
            listener_caps=config.listener_caps(),
            listener_message_bytes=config.listener_message_bytes(),
            links=config.link_count(),
            metrics=config.metrics is not None or name is not None,
            vm=name,
            off_loop_bytes=OFF_LOOP_BYTES,
            off_loop_view_bytes=OFF_LOOP_VIEW_BYTES,
        )
        self._addresses = (config.upstream, *config.more_upstreams) if config.upstream else ()
        self.proxy = Proxy(
            config, hub, audit=audit, reconnect=self._reconnect if config.reconnect else None
        )
        self.qemu: Spawned | None = None
        self.ready: UpstreamReady | None = None  # the first session's greeting facts
        self._stopping: asyncio.Task[int] | None = None
        self._hurry = asyncio.Event()
        self._connecting: asyncio.Future[list[socket.socket]] | None = None
        self._stopped: str | None = None  # why stop() was called

    async def _reconnect(self) -> list[socket.socket]:
        # One attempt per call: the proxy paces the retries (README "Deploying").
        return await connect_all(self._addresses, 0, quiet=True)

    @property
    def hub(self) -> Hub:
        return self.proxy.hub

    def bind(self, inherited: Inherited | None = None) -> None:
        """Bind the listeners before QEMU is touched: a busy socket must not cost a VM
        start. Raises StartupError."""
        self.proxy.bind(inherited)

    def describe_start(self) -> str:
        config = self.config
        if config.spawn:
            return f"starting QEMU {config.spawn[0]}"
        return f"connecting to QEMU at {config.upstream}"

    async def start(self, wait_for_qemu: bool = False) -> UpstreamReady | None:
        """Start or reach QEMU and negotiate with it, then accept clients. Raises
        StartupError, having closed everything it opened (a QEMU it started included).

        With `wait_for_qemu` (host mode) a VM that reconnects and cannot reach its QEMU
        yet accepts clients anyway and keeps trying: None."""
        config = self.config
        try:
            if config.spawn:
                self.qemu, sockets = await spawn(config.spawn, config.lanes)
            else:
                sockets = await self._connect()
        except StartupError as exc:
            if wait_for_qemu and config.reconnect and self._stopped is None:
                log.warning("QEMU not reached (%s); accepting clients, reconnecting", exc)
                await self.proxy.start_away(str(exc))
                return None
            self.proxy.unbind()
            raise
        try:
            ready = await self.proxy.start(sockets)
        except StartupError as exc:
            if self.qemu is None:
                # Name the monitor: "no greeting" most often means another client holds it.
                raise StartupError(
                    f"cannot use QEMU's monitor at {config.upstream}: {exc}"
                ) from None
            process = self.qemu.process
            try:
                rc = await asyncio.wait_for(process.wait(), 2)
            except TimeoutError:
                await stop_qemu(process, grace=2)
                raise exc from None
            raise StartupError(f"QEMU exited with status {rc} before it was ready") from None
        self.ready = ready
        return ready

    async def _connect(self) -> list[socket.socket]:
        """Reach QEMU's monitor(s), retrying for connect-timeout; a stop() meanwhile ends
        the wait at once (StartupError) instead of when the timeout runs out."""
        self._connecting = asyncio.ensure_future(
            connect_all(self._addresses, self.config.connect_timeout)
        )
        try:
            return await self._connecting
        except asyncio.CancelledError:
            if self._stopped is None:
                raise  # not ours: whoever cancelled the start
            raise StartupError(f"{self._stopped} before QEMU was reached") from None
        finally:
            self._connecting = None

    async def wait(self) -> int:
        """Wait until the VM's session is over; the exit status it stands for: QEMU's own
        when it ended the session, qmpmux's failure when qmpmux lost the connection and
        had to stop QEMU itself."""
        code = await self.proxy.wait()
        if self.qemu is None:
            return code
        process = self.qemu.process
        status = exit_status(await (self._stopping or stop_qemu(process)))
        return status if code == 0 else code

    def stop(self, why: str) -> None:
        """Shut the VM down (SIGTERM, or its file removed in host mode): a QEMU qmpmux
        started powers its guest down; otherwise the commands in flight are answered
        first. Called again, it stops waiting for either."""
        config = self.config
        self._stopped = self._stopped or why
        if self._connecting is not None:
            self._connecting.cancel()  # start() ends with StartupError
        if self.qemu is None:
            log.info("%s: shutting down", why)
            # Commands in QEMU get their replies first (README "Deploying").
            self.proxy.drain(why, config.shutdown_timeout)
        elif self._stopping is None:
            log.info("%s: shutting QEMU down", why)
            # QEMU's exit ends the session, and with it proxy.wait().
            self._stopping = asyncio.get_running_loop().create_task(
                shut_down(self.qemu, config.shutdown_timeout, self._hurry)
            )
        else:
            log.info("%s again: not waiting for the guest", why)
            self._hurry.set()

    def reload(self, policy: Policy) -> None:
        self.proxy.reload(policy)

    def status(self, stopping: bool = False) -> str:
        """One line: how many clients, and QEMU's version and state."""
        proxy = self.proxy
        if self.ready is None:
            return "connecting to QEMU"
        if proxy.upstream is None and proxy.down_reason is not None and not stopping:
            return f"QEMU away, reconnecting ({proxy.down_reason})"
        ready = proxy.upstream or self.ready
        clients = len(proxy.hub.clients)
        try:  # the greeting's version object (docs/protocol.md §4)
            qemu = msgspec.json.decode(ready.version)["qemu"]
            version = f"{qemu['major']}.{qemu['minor']}.{qemu['micro']}"
        except (msgspec.DecodeError, KeyError, TypeError):
            version = "(unknown version)"
        return (
            f"{clients} client{'' if clients == 1 else 's'}; QEMU {version} "
            f"{'session over' if stopping else 'connected'}"
        )
