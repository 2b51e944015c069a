"""Host mode: one process serving every VM of a host (README "Host mode").

Each VM is a file `NAME.toml` in the vm-dir, in the single-VM config format without the
process-wide keys (logs, audit, metrics); NAME is the VM's name in logs, audit records
and metrics. A directory rather than one file with a table per VM: a management tool
adds or removes a VM by writing (atomically, by rename) or removing that VM's own file,
never by editing a file every VM's tool edits; a file that does not parse refuses only
its VM; and the labels are bounded by the files there are.

The running VMs follow the directory, on SIGHUP and whenever the directory changes
(checked every DIR_POLL seconds with one stat): a new file starts its VM, a removed file
stops it as SIGTERM stops a single-VM qmpmux, and a changed file reloads its profiles
and rules. Its other keys (QEMU, listeners, limits) are not changed under its clients:
that takes removing the file and adding it back. VMs whose files are untouched, and
their clients, see nothing. Each VM is a `Vm`, as in single-VM mode, so one VM's QEMU
dying, flooding or stalling is that VM's alone, and a client reaches only the VM whose
listener it connected to.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import re
import signal
import stat
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import msgspec
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from qmpmux.config import (
    Config,
    ConfigError,
    HostConfig,
    Listener,
    VmFile,
    decode_file,
    vm_config,
)
from qmpmux.exporter import MetricsServer, Source, by_state, registry_for
from qmpmux.logs import vm_context
from qmpmux.metrics import ERROR, OK
from qmpmux.server import StartupError, open_listener
from qmpmux.systemd import Notifier, ServiceState
from qmpmux.upstream import stop_qemu
from qmpmux.vm import Vm

log = logging.getLogger("qmpmux.host")

# What became of a VM file: a VM starting (or waiting for its turn), up, stopping; a VM
# that failed to start or ended; a file refused (invalid, or its addresses taken).
STATES: Final = ("starting", "up", "stopping", "failed", "ended", "refused")
RUNNING: Final = frozenset({"starting", "up", "stopping"})  # these hold their addresses
DIR_POLL: Final = 2.0  # seconds between looks at the vm-dir's modification time
SUFFIX: Final = ".toml"
UNREADABLE: Final = "cannot read it"  # why a file is skipped that is there, all the same
# A VM's name: a label in metrics and logs, and part of nothing else.
VM_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def ignore_signals(loop: asyncio.AbstractEventLoop, signals: tuple[signal.Signals, ...]) -> None:
    """Take `signals` from the loop and have the process itself ignore them: once the loop
    closes its handlers are gone, and one arriving then would kill the process (a second
    SIGTERM as a clean stop ends: exit status -15 instead of 0)."""
    for sig in signals:
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)


def ignore_reloads(loop: asyncio.AbstractEventLoop) -> None:
    """From the first stop signal on, SIGHUP is ignored by the process itself: a reload
    then would say RELOADING=1 and READY=1 after STOPPING=1 (the manager would think it
    runs again), and one arriving as the loop closes would kill it."""
    ignore_signals(loop, (signal.SIGHUP,))


@dataclass
class _Entry:
    """One VM file and what became of it."""

    name: str
    text: bytes  # the file as last acted on: unchanged files are left alone
    config: Config | None = None  # None: refused (its file is wrong)
    vm: Vm | None = None  # made when its turn to start comes
    state: str = "refused"  # one of STATES
    task: asyncio.Task[None] | None = None
    started: asyncio.Future[None] | None = field(default=None, repr=False)
    why: str = ""  # why it is stopping


def read_vm_dir(path: str) -> tuple[dict[str, bytes], dict[str, str]]:
    """The VM files in `path` (name -> text), and the files skipped (file name -> why).
    Dotfiles and names not ending in .toml are not VM files (editors' and tools'
    temporary files); raises OSError if the directory cannot be read."""
    found: dict[str, bytes] = {}
    skipped: dict[str, str] = {}
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.name.startswith(".") or not entry.name.endswith(SUFFIX):
                continue
            name = entry.name[: -len(SUFFIX)]
            if not VM_NAME.fullmatch(name):
                skipped[entry.name] = f"not a VM file (a VM's name is {VM_NAME.pattern}.toml)"
                continue
            try:
                text = _read_regular(entry.path) if entry.is_file() else None
            except OSError as exc:
                skipped[entry.name] = f"{UNREADABLE}: {exc.strerror or exc}"
                continue
            if text is None:
                skipped[entry.name] = "not a regular file"
            else:
                found[name] = text
    return found, skipped


def _read_regular(path: str) -> bytes | None:
    """A regular file's text; None if what the name leads to is something else by the
    time it is opened. Never waits: reading a FIFO waits for a writer and a device may
    never end, and the rescan runs in the loop every VM is served from."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with open(fd, "rb", closefd=False) as file:
            return file.read()
    finally:
        os.close(fd)


def contested(configs: Mapping[str, Config], held: Collection[str] = ()) -> dict[str, list[str]]:
    """The addresses (see `claimed`) that more than one of `configs` names and no VM
    holds, with the names of the VMs that name them: none of those starts (which was
    meant is not for qmpmux to guess)."""
    claims: dict[str, list[str]] = {}
    for name, config in sorted(configs.items()):
        for address in claimed(config):
            if address not in held:
                claims.setdefault(address, []).append(name)
    return {address: names for address, names in claims.items() if len(names) > 1}


def clash(name: str, names: Sequence[str]) -> str:
    """Why VM `name`, one of `names` naming one address, is refused."""
    return f"in VM {', '.join(n for n in names if n != name)}'s file too; neither starts"


class _TakenError(ConfigError):
    """A VM file names a listener or monitor another VM has."""


def claimed(config: Config) -> set[str]:
    """What two VMs may not share: a listener, or a QEMU monitor."""
    upstreams = (config.upstream, *config.more_upstreams) if config.upstream else ()
    return {f"listen {a.address}" for a in config.listeners} | {f"upstream {a}" for a in upstreams}


class Host:
    """Every VM of the vm-dir, each a `Vm` run in its own task, under one process."""

    def __init__(
        self,
        config: HostConfig,
        audit: Callable[[bytes], None] | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self.entries: dict[str, _Entry] = {}
        self._audit = audit
        self._loop = asyncio.get_running_loop()
        self._service = ServiceState(notifier or Notifier({}), self.status)
        self._done: asyncio.Future[int] = self._loop.create_future()
        self._stopping: str | None = None
        self._dir_stamp: int | None = None
        self._look_again = False
        self._poll: asyncio.TimerHandle | None = None
        self._skipped: set[str] = set()
        self._live = 0  # VMs accepted and not over
        # VMs accepted, waiting for their turn to start: one a loop turn, so that adding
        # many never holds the loop for the VMs that serve clients (README "Host mode").
        self._queue: collections.deque[_Entry] = collections.deque()
        self._starter: asyncio.Task[None] | None = None
        # Per rescan: files parsed (name -> text, result), addresses held, contested.
        self._parsed: dict[str, tuple[bytes, Config | ConfigError]] = {}
        self._taken: dict[str, str] = {}
        self._contested: dict[str, list[str]] = {}
        self.reloads = {OK: 0, ERROR: 0}

    # --- running ----------------------------------------------------------------------------

    async def run(self) -> int:
        """Start every VM of the directory, then follow it until SIGTERM; returns 0 when
        every VM has stopped."""
        try:
            self._dir_stamp = os.stat(self.config.vm_dir).st_mtime_ns
        except OSError as exc:
            raise StartupError(f"vm-dir {self.config.vm_dir}: {exc.strerror}") from None
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(sig, self.stop, f"received {sig.name}")
        self._loop.add_signal_handler(signal.SIGHUP, self.reload)
        metrics = await self._serve_metrics()
        self._service.starting(f"starting the VMs of {self.config.vm_dir}")
        self.rescan()
        starting = [e.started for e in self.entries.values() if e.started is not None]
        await asyncio.gather(*starting)
        up = sum(e.state == "up" for e in self.entries.values())
        log.info("ready: %d of %d VM(s) up", up, len(self.entries))
        if self._stopping is None:  # READY=1 after STOPPING=1 would say it runs again
            self._service.ready()
            self._poll = self._loop.call_later(DIR_POLL, self._look)
        try:
            return await self._done
        finally:
            if metrics is not None:
                metrics.close()

    async def _serve_metrics(self) -> MetricsServer | None:
        """One /metrics for every VM, each sample labelled with its VM (README "Metrics")."""
        where = self.config.metrics
        if where is None:
            return None
        registry = registry_for(self.sources)
        registry.register(VmFilesCollector(lambda: [e.state for e in self.entries.values()]))
        server = MetricsServer(
            open_listener(Listener(where)),
            registry,
            where.path if where.kind == "unix" else "",
        )
        await server.start()
        log.info("serving metrics on %s/metrics", where)
        return server

    def sources(self) -> list[Source]:
        """Every VM with a hub (running, or ended or failed: its counters stay)."""
        out = []
        for name, entry in sorted(self.entries.items()):
            if entry.vm is not None:
                listeners = entry.vm.config.listeners
                labels = tuple((str(lst.address), lst.profile) for lst in listeners)
                out.append(Source(name, entry.vm.hub, labels))
        return out

    def stop(self, why: str) -> None:
        """SIGTERM: stop every VM as a single-VM qmpmux stops (again: stop waiting)."""
        ignore_reloads(self._loop)
        self._service.stopping(why)
        self._stopping = why
        if self._poll is not None:
            self._poll.cancel()
        for entry in self.entries.values():
            self._stop_vm(entry, why)
        self._maybe_done()

    def _stop_vm(self, entry: _Entry, why: str) -> None:
        """Stop a running VM; one still reaching its QEMU stops waiting for it, one
        spawning its QEMU is stopped once started (`_serve`), one still waiting for its
        turn is not started (`_start_queued`)."""
        if entry.config is None or entry.state not in ("starting", "up", "stopping"):
            return
        was, entry.state, entry.why = entry.state, "stopping", why
        if entry.vm is None:
            return
        if was != "starting" or not entry.vm.config.spawn:
            self._in_vm(entry.name, entry.vm.stop, why)

    def reload(self) -> None:
        """SIGHUP: bring the running VMs in line with the directory."""
        self._service.reloading()
        try:
            self.reloads[OK if self.rescan() else ERROR] += 1
        finally:
            self._service.reloaded()

    def status(self) -> str:
        """One line for the service manager: VMs by state, and clients in all."""
        states: dict[str, int] = {}
        clients = 0
        for entry in self.entries.values():
            states[entry.state] = states.get(entry.state, 0) + 1
            if entry.vm is not None:
                clients += len(entry.vm.hub.clients)
        shown = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
        return f"VMs: {shown or 'none'}; {clients} client{'' if clients == 1 else 's'}"

    def _look(self) -> None:
        """The directory's modification time changed: a file was added, removed or
        renamed into place. (An edit in place does not change it: SIGHUP.)"""
        self._poll = self._loop.call_later(DIR_POLL, self._look)
        try:
            stamp = os.stat(self.config.vm_dir).st_mtime_ns
        except OSError:
            return  # reported by the rescan that finds it gone
        if stamp != self._dir_stamp or self._look_again:
            # The time comes from a coarse clock: a change within the tick in which a look
            # read it leaves it as it was, so every change is looked at once more.
            self._look_again = stamp != self._dir_stamp
            self._dir_stamp = stamp
            self.rescan()

    # --- following the directory ----------------------------------------------------------

    def rescan(self) -> bool:
        """Start new VMs, stop removed ones, reload changed ones; an unreadable directory
        changes nothing (a VM is never stopped because its directory could not be read).
        Whether the directory could be read."""
        if self._stopping is not None:
            return True
        try:
            found, skipped = read_vm_dir(self.config.vm_dir)
        except OSError as exc:
            log.error("cannot read vm-dir %s: %s; no VM changed", self.config.vm_dir,
                      exc.strerror or exc)  # fmt: skip
            return False
        for name in sorted(skipped.keys() - self._skipped):
            log.warning("%s/%s: %s; skipped", self.config.vm_dir, name, skipped[name])
        self._skipped = set(skipped)
        # A file that is there but cannot be read now is not a file removed: as for the
        # directory, its VM goes on as it is.
        there = {n.removesuffix(SUFFIX) for n, why in skipped.items() if why.startswith(UNREADABLE)}
        for name, entry in list(self.entries.items()):
            if name not in found and name not in there and entry.state not in ("stopping",):
                self._remove(entry)
        self._parsed = {}
        self._contest({n: t for n, t in found.items() if self._starts_anew(n, t)})
        for name, text in sorted(found.items()):
            known = self.entries.get(name)
            if known is None:
                self._add(name, text)
            elif known.text != text and known.state != "stopping":
                self._change(known, text)
        return True

    def _starts_anew(self, name: str, text: bytes) -> bool:
        """Whether this rescan starts `name` as a new VM: a new file, or a changed one
        whose VM is not running (`_change`), a file refused before included."""
        known = self.entries.get(name)
        if known is None:
            return True
        not_running = known.config is None or known.state not in RUNNING
        return known.text != text and not_running

    def _read(self, name: str, text: bytes) -> Config:
        """A VM file as its Config, parsed once per rescan; raises ConfigError."""
        known = self._parsed.get(name)
        if known is not None and known[0] == text:
            if isinstance(known[1], ConfigError):
                raise known[1]
            return known[1]
        path = self._path(name)
        try:
            config = vm_config(decode_file(text, path, VmFile), path)
            for i, listener in enumerate(config.listeners):
                if listener.address.kind == "systemd":
                    raise ConfigError(
                        f"{path}: listen[{i}].address: systemd: sockets are for a single-VM "
                        "service (qmpmux@.service); host mode binds its listeners itself"
                    )
        except ConfigError as exc:
            self._parsed[name] = (text, exc)
            raise
        except Exception as exc:
            # A defect of qmpmux's, not of the file: still the file's VM alone is refused,
            # never the rescan (and the VMs after it) or the host (README "Host mode").
            log.exception("%s: reading it failed", path)
            error = ConfigError(f"{path}: cannot be read ({type(exc).__name__}: {exc})")
            self._parsed[name] = (text, error)
            raise error from None
        self._parsed[name] = (text, config)
        return config

    def _contest(self, new: dict[str, bytes]) -> None:
        """What the running VMs hold, and the addresses more than one file to start
        claims and no VM holds: none of those is started (which one was meant is not for
        qmpmux to guess), at this rescan and the next ones, until one gives it up."""
        self._taken = {}
        for entry in self.entries.values():
            if entry.config is not None and entry.state in RUNNING:
                self._taken.update(dict.fromkeys(claimed(entry.config), entry.name))
        configs: dict[str, Config] = {}
        for name, text in new.items():
            try:
                configs[name] = self._read(name, text)
            except ConfigError:
                continue  # refused on its own account
        self._contested = contested(configs, self._taken.keys())

    def _path(self, name: str) -> str:
        return os.path.join(self.config.vm_dir, name + SUFFIX)

    def _parse(self, name: str, text: bytes) -> Config:
        """A VM file as its Config, if its addresses are free; raises ConfigError."""
        config = self._read(name, text)
        path = self._path(name)
        mine = claimed(config)
        for address in sorted(mine):
            owner = self._taken.get(address)
            if owner is not None and owner != name:
                raise _TakenError(f"{path}: {address} is VM {owner}'s")
        for address in sorted(mine & self._contested.keys()):
            raise _TakenError(f"{path}: {address} is {clash(name, self._contested[address])}")
        self._taken.update(dict.fromkeys(mine, name))
        return config

    def _add(self, name: str, text: bytes) -> None:
        entry = _Entry(name, text)
        self.entries[name] = entry
        try:
            config = self._parse(name, text)
        except ConfigError as exc:
            self._in_vm(name, log.error, "refused: %s", exc)
            if isinstance(exc, _TakenError):
                entry.text = b""  # tried again at every rescan, until it is free
            return
        entry.config = config
        entry.state = "starting"
        entry.started = self._loop.create_future()
        self._live += 1
        self._queue.append(entry)
        if self._starter is None:
            self._starter = self._loop.create_task(self._start_queued())

    async def _start_queued(self) -> None:
        """Start the accepted VMs, one a loop turn (a VM's first step binds its sockets
        and reaches its QEMU: some 0.4 ms; a hundred at once would hold the loop)."""
        try:
            while self._queue:
                entry = self._queue.popleft()
                assert entry.config is not None and entry.started is not None
                if entry.state != "starting":  # stopped before its turn came
                    entry.started.set_result(None)
                    entry.state = "ended"
                    self._live -= 1
                    self._ended(entry)
                    continue
                entry.vm = Vm(entry.config, self._audit, entry.name)
                entry.task = self._loop.create_task(
                    self._serve(entry), context=vm_context(entry.name)
                )
                await asyncio.sleep(0)
        finally:
            self._starter = None

    def _remove(self, entry: _Entry) -> None:
        if entry.config is None or entry.state not in RUNNING:
            del self.entries[entry.name]
            return
        self._stop_vm(entry, "its file was removed")

    def _change(self, entry: _Entry, text: bytes) -> None:
        if entry.config is None or entry.state not in RUNNING:
            del self.entries[entry.name]
            self._add(entry.name, text)  # as new: it was not running
            return
        entry.text = text
        try:
            config = self._parse(entry.name, text)
        except ConfigError as exc:
            self._in_vm(entry.name, log.error, "reload failed, keeping the VM as it is: %s", exc)
            self._count_reload(entry, ERROR)
            return
        running = entry.config
        if msgspec.structs.replace(config, policy=running.policy) != running:
            self._in_vm(
                entry.name, log.warning,
                "its file changed beyond profiles and rules; kept as it runs (remove the "
                "file and add it back to apply that)",
            )  # fmt: skip
            self._count_reload(entry, ERROR)
            return
        entry.config = config
        if entry.vm is not None:
            self._in_vm(entry.name, entry.vm.reload, config.policy)
            entry.vm.config = config
        self._in_vm(entry.name, log.info, "policy reloaded: %d profile(s), %d rule(s)",
                    len(config.policy.profiles), len(config.policy.rules))  # fmt: skip

    def _count_reload(self, entry: _Entry, result: str) -> None:
        if entry.vm is not None:
            entry.vm.hub.stats.reloads[result] += 1

    # --- one VM ---------------------------------------------------------------------------

    def _in_vm(self, name: str, call: Callable[..., object], *args: object) -> None:
        """Call on a VM's behalf: what it logs, and the tasks, readers and timers it
        makes, carry the VM's name (logs.vm_context)."""
        vm_context(name).run(call, *args)

    async def _serve(self, entry: _Entry) -> None:
        vm = entry.vm
        assert vm is not None and entry.started is not None
        try:
            try:
                vm.bind()
                log.info("%s", vm.describe_start())
                ready = await vm.start(wait_for_qemu=True)
            except StartupError as exc:
                if entry.state == "stopping":  # asked to stop before its QEMU was reached
                    log.info("stopped before it started: %s", exc)
                    entry.state = "ended"
                    return
                log.error("cannot start: %s", exc)
                entry.state = "failed"
                return
            finally:
                entry.started.set_result(None)
            if ready is not None:
                version = ready.version.decode("ascii", "replace")
                log.info("ready: QEMU monitor %s, %d listener(s)", version,
                         len(vm.config.listeners))  # fmt: skip
            if entry.state == "starting":
                entry.state = "up"
            else:  # removed, or SIGTERM, while it started
                vm.stop(entry.why)
            code = await vm.wait()
            log.log(logging.INFO if code == 0 else logging.ERROR, "VM over (status %d)", code)
            entry.state = "ended"
        except Exception:
            # A defect of qmpmux's, not of the VM's file or QEMU, costs the VM it happened
            # in: logged in its name, what it opened closed, failed until its file changes;
            # the host's bookkeeping and the other VMs go on (README "Host mode").
            log.exception("failed")
            entry.state = "failed"
            vm.proxy.stop("qmpmux failed", 1)
            if vm.qemu is not None and vm.qemu.process.returncode is None:
                await stop_qemu(vm.qemu.process, grace=2)
        finally:
            self._live -= 1
            self._ended(entry)

    def _ended(self, entry: _Entry) -> None:
        """A VM's task is over: forget it if its file is gone (a file added back while
        it stopped is then found by a rescan), keep it as ended or failed otherwise,
        until its file changes. What it held is free: a file refused for naming it (a
        VM file renamed, or replaced by another) is tried again at once."""
        if self._stopping is not None:
            self._maybe_done()
            return
        if self.entries.get(entry.name) is entry and not os.path.exists(self._path(entry.name)):
            del self.entries[entry.name]
        elif entry.why:  # stopped because its file went, and it is back
            del self.entries[entry.name]
            self._loop.call_soon(self.rescan)
            return
        if any(e.config is None and e.text == b"" for e in self.entries.values()):
            self._loop.call_soon(self.rescan)  # refused for what another VM held (`_add`)

    def _maybe_done(self) -> None:
        if self._stopping is not None and self._live == 0 and not self._done.done():
            self._done.set_result(0)


class VmFilesCollector(Collector):
    """`qmpmux_vm_files{state}`: every VM file by what became of it, refused ones too
    (they have no hub, so no series of their own to alert on). `states()` is read at
    every scrape."""

    def __init__(self, states: Callable[[], Iterable[str]]) -> None:
        self.states = states

    def collect(self) -> Iterable[Metric]:
        yield by_state(
            "qmpmux_vm_files", "VM files of the vm-dir, by what became of them", STATES,
            self.states(),
        )  # fmt: skip
