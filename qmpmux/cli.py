"""The `qmpmux` command: argv to a checked Config, then run the proxy on uvloop.

Start-up problems (bad address, permissions, QEMU missing or refusing) are reported as
one line on stderr with a non-zero exit status, never as a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import resource
import signal
import sys
from collections.abc import Awaitable, Sequence

import msgspec
import uvloop

from qmpmux import __version__, allocator, logs
from qmpmux.checkconfig import check_config
from qmpmux.config import (
    DEFAULT_LANES,
    Address,
    Config,
    ConfigError,
    FileConfig,
    HostConfig,
    Limits,
    check,
    check_limits,
    check_references,
    listeners_of,
    no_nul,
    parse_address,
    parse_listener,
    policy_of,
    read_file,
    split_spawn,
    upstreams_of,
    vm_key_in,
)
from qmpmux.host import Host, ignore_reloads, ignore_signals
from qmpmux.metrics import ERROR
from qmpmux.policy import BUILTIN, Policy
from qmpmux.server import StartupError, open_audit
from qmpmux.systemd import Inherited, Notifier, ServiceState, listen_fds
from qmpmux.vm import Vm

log = logging.getLogger("qmpmux")

DESCRIPTION = """\
Share one QEMU QMP monitor between many clients. qmpmux holds the only connection to
QEMU's monitor and serves any number of clients, each with its own greeting and
capabilities negotiation, as if it were talking to QEMU alone. Command ids are
rewritten upstream and restored on replies; events reach every negotiated client.
"""

EPILOG = f"""\
commands:
  qmpmux [OPTIONS] --upstream ADDR | --spawn -- QEMU ARGS...
                   run the proxy (this help)
  qmpmux check-config FILE [--upstream ADDR | --spawn -- QEMU ARGS...]
                   validate a config file and print each profile's effective policy,
                   resolved against a real QEMU when one is given (see check-config --help)

addresses:
  unix:PATH        a unix socket (created with mode 0600 unless mode= says otherwise;
                   a stale socket file is replaced, a live one is an error)
  tcp:HOST:PORT    a TCP socket; non-loopback hosts need --allow-remote
  systemd:NAME     (--listen only) the sockets the service manager passed with
                   FileDescriptorName=NAME (socket activation: a .socket unit, or
                   systemd-socket-activate --fdname=NAME); served as they are, never
                   unlinked or rebound

listener options (appended with commas):
  profile=NAME     policy profile for clients of this listener (default: full)
  mode=OCTAL       file mode of a unix socket (default: 600)
  owner=USER       owner of a unix socket (name or uid; needs CAP_CHOWN unless it is
                   qmpmux's own user)
  group=GROUP      group of a unix socket (name or gid), e.g. a monitoring group given
                   a readonly listener with mode=660
  max-clients=N    clients this listener may hold at once (default: only --max-clients;
                   every listener keeps limits.reserve-clients slots for itself)
  max-message-bytes=N  the largest message its clients may send, below
                   --max-message-bytes (e.g. 65536 for monitoring agents)
  (for systemd:NAME, mode, owner and group are the .socket unit's SocketMode=,
  SocketUser= and SocketGroup=)

profiles:
  built in: {", ".join(BUILTIN)}; custom ones in the config file's [profiles].
  full: everything; readonly: reads that change nothing and reveal no secret;
  vm-control: readonly plus stop, cont, system_powerdown, system_reset, system_wakeup.

upstream (exactly one):
  --upstream ADDR  connect to an existing QEMU monitor (retried for --connect-timeout
                   seconds while the socket does not exist yet)
  --spawn -- QEMU ARGS...
                   start QEMU with a private QMP monitor added to ARGS; SIGTERM/SIGINT
                   press the guest's power button (system_powerdown), wait up to
                   --shutdown-timeout for it to power off, then quit QEMU, then
                   signal it; qmpmux exits with QEMU's status

signals:
  SIGHUP           reload the --config file's profiles and rules; every client keeps its
                   connection and gets the new policy from its next command (an invalid
                   file is logged and the old policy stays; listeners and limits need a
                   restart)
  SIGTERM, SIGINT  shut down: with --upstream, stop accepting clients and let commands
                   already accepted get QEMU's replies (up to --shutdown-timeout) before
                   clients are closed; with --spawn, power the guest down first; a
                   second signal stops waiting

service manager: with NOTIFY_SOCKET set (systemd Type=notify), qmpmux sends READY=1
once QEMU's monitor is negotiated and every listener is open, a STATUS= line, RELOADING=1
and READY=1 around a SIGHUP reload, STOPPING=1, and WATCHDOG=1 when WATCHDOG_USEC is set.

config file: every key is documented, commented, in systemd/qmpmux.toml.example (in the
source tree; `make install` puts it under PREFIX/share/qmpmux/); the README has the
details of policy, limits and deploying with systemd.

QEMU restarts: with --reconnect (--upstream only), qmpmux outlives its QEMU: when the
monitor goes away every client is closed, the listeners stay, and qmpmux reconnects
with backoff; clients that connect meanwhile get the new QEMU's greeting once it is
back (or are closed after --negotiation-timeout).

exit status: 0 after QEMU shut down cleanly (quit, SHUTDOWN) or on SIGTERM/SIGINT;
1 if QEMU went away unexpectedly (without --reconnect) or qmpmux could not start;
2 for usage errors.

examples:
  qmpmux --listen unix:/run/vm1.qmp --spawn -- qemu-system-x86_64 -machine q35 -m 1G vm1.img
  qmpmux --upstream unix:/run/qemu/vm1.qmp --listen unix:/run/qmpmux/vm1.sock \\
         --listen unix:/run/qmpmux/vm1-ro.sock,profile=readonly,mode=660,group=monitoring
  qmpmux --config /etc/qmpmux/vm1.toml
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qmpmux",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config", metavar="FILE", help="TOML config file (flags given here override it)"
    )
    p.add_argument(
        "--vm-dir",
        metavar="DIR",
        help="host mode: serve every VM whose file DIR/NAME.toml describes it (README "
        '"Host mode"); SIGHUP, or a file added or removed, adds and removes VMs',
    )
    p.add_argument(
        "--upstream",
        metavar="ADDR",
        action="append",
        default=[],
        help="QEMU's QMP monitor to connect to; repeat it for further monitors of the same "
        "QEMU, each a lane clients are spread over",
    )
    p.add_argument(
        "--lanes",
        type=int,
        metavar="N",
        help="with --spawn: how many monitors to open to QEMU, each a lane clients are "
        f"spread over (default: {DEFAULT_LANES})",
    )
    p.add_argument(
        "--listen",
        metavar="ADDR[,profile=NAME][,mode=OCTAL][,owner=USER][,group=GROUP][,max-clients=N]"
        "[,max-message-bytes=N]",
        action="append",
        default=[],
        help="where clients connect (repeatable; replaces the file's listeners)",
    )
    p.add_argument(
        "--allow-remote", action="store_true", help="allow TCP listeners on non-loopback hosts"
    )
    p.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="log verbosity on stderr (default: info)",
    )
    p.add_argument(
        "--log-format",
        choices=["text", "json"],
        help="text: timestamps, or syslog priorities under journald; json: one object a "
        "line, for log shippers (default: text)",
    )
    p.add_argument(
        "--audit",
        metavar="FILE",
        help='write one JSON audit record per command to FILE ("stderr" for journald)',
    )
    p.add_argument(
        "--metrics",
        metavar="ADDR",
        help="serve Prometheus metrics at GET /metrics on ADDR (tcp:127.0.0.1:PORT or "
        "unix:PATH; non-loopback hosts need --allow-remote)",
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        metavar="SECONDS",
        help="how long to retry connecting to --upstream (default: 5)",
    )
    defaults = Limits()
    p.add_argument(
        "--max-clients",
        type=int,
        metavar="N",
        help="refuse connections beyond N clients over all listeners; a listener's "
        f"max-clients=N caps it alone (default: {defaults.max_clients})",
    )
    p.add_argument(
        "--negotiation-timeout",
        type=float,
        metavar="SECONDS",
        help="close a client that has not negotiated capabilities within SECONDS "
        f"(default: {defaults.negotiation_timeout:g})",
    )
    p.add_argument(
        "--max-message-bytes",
        type=int,
        metavar="N",
        help="largest command a client may send; larger gets QEMU's token-size error "
        f"(default: {defaults.max_message_bytes})",
    )
    p.add_argument(
        "--outbox-bytes",
        type=int,
        metavar="N",
        help="output queued for a client that does not read before it is disconnected "
        f"(default: {defaults.outbox_bytes})",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT: with --spawn, how long the guest gets to power down after "
        "system_powerdown before QEMU is told to quit (0 quits at once); with --upstream, "
        "how long commands in flight get to be answered; a second signal stops waiting "
        "(default: 60)",
    )
    p.add_argument(
        "--reconnect",
        action="store_true",
        default=None,
        help="with --upstream: when QEMU goes away, close its clients, keep listening and "
        "reconnect (backoff 0.1 s doubling to 5 s, forever); clients connecting meanwhile "
        "are greeted once QEMU is back, or closed after --negotiation-timeout",
    )
    p.add_argument(
        "--spawn",
        action="store_true",
        help="start QEMU: everything after --spawn [--] is its command line",
    )
    p.add_argument("--version", action="version", version=f"qmpmux {__version__}")
    return p


_LIMIT_FLAGS = ("max_clients", "max_message_bytes", "outbox_bytes", "negotiation_timeout")


def parse_args(argv: Sequence[str]) -> Config:
    """argv (and the --config file) to a checked single-VM Config; raises ConfigError."""
    config = parse_command_line(argv)
    if isinstance(config, HostConfig):
        raise ConfigError("host mode (vm-dir) given where one VM's config was expected")
    return config


# Flags that configure one VM: in host mode, each VM's file gives them.
_VM_FLAGS = (
    "upstream", "listen", "lanes", "spawn", "reconnect", "connect_timeout",
    "shutdown_timeout", *_LIMIT_FLAGS,
)  # fmt: skip


def parse_command_line(argv: Sequence[str]) -> Config | HostConfig:
    """argv (and the --config file) to a checked Config, or with a vm-dir the host's;
    raises ConfigError."""
    own, qemu = split_spawn(argv)
    args = build_parser().parse_args(own)
    file = read_file(args.config) if args.config else FileConfig()
    origin = args.config or "command line"
    if args.vm_dir or file.vm_dir:
        return _host_config(args, file, origin)
    overrides = {name: getattr(args, name) for name in _LIMIT_FLAGS if getattr(args, name)}
    for name in _LIMIT_FLAGS:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive")
    if args.upstream or qemu:
        upstreams = [parse_address(text) for text in args.upstream]
    else:
        upstreams = upstreams_of(file, origin)
    audit = _audit_of(args, file, origin)
    limits = msgspec.structs.replace(file.limits, **overrides)
    try:
        check_limits(limits)
    except ConfigError as exc:
        raise ConfigError(f"{origin}: {exc}") from None
    config = Config(
        listeners=(
            tuple(parse_listener(text) for text in args.listen)
            if args.listen
            else listeners_of(file, origin)
        ),
        upstream=upstreams[0] if upstreams else None,
        more_upstreams=tuple(upstreams[1:]),
        spawn=tuple(qemu) if qemu else (() if args.upstream else file.spawn),
        lanes=args.lanes or file.lanes or DEFAULT_LANES,
        allow_remote=args.allow_remote or file.allow_remote,
        log_level=args.log_level or file.log_level,
        log_format=args.log_format or file.log_format,
        connect_timeout=args.connect_timeout or file.connect_timeout,
        shutdown_timeout=(
            file.shutdown_timeout if args.shutdown_timeout is None else args.shutdown_timeout
        ),
        reconnect=file.reconnect if args.reconnect is None else args.reconnect,
        limits=limits,
        policy=policy_of(file, origin),
        audit=audit,
        source=args.config,
        metrics=_metrics_address(args.metrics or file.metrics, origin, bool(args.metrics)),
    )
    check(config)
    return config


def _host_config(args: argparse.Namespace, file: FileConfig, origin: str) -> HostConfig:
    for flag in _VM_FLAGS:
        if getattr(args, flag):
            raise ConfigError(
                f"--{flag.replace('_', '-')}: a VM's setting; with --vm-dir, each VM's file "
                "in that directory gives its own"
            )
    key = vm_key_in(file)
    if key is not None:
        raise ConfigError(
            f"{origin}: {key}: a VM's key; with vm-dir, each VM's file in that directory "
            "gives its own"
        )
    config = HostConfig(
        vm_dir=no_nul(args.vm_dir or file.vm_dir or "", f"{origin}: vm-dir"),
        allow_remote=args.allow_remote or file.allow_remote,
        log_level=args.log_level or file.log_level,
        log_format=args.log_format or file.log_format,
        audit=_audit_of(args, file, origin),
        metrics=_metrics_address(args.metrics or file.metrics, origin, bool(args.metrics)),
        source=args.config,
    )
    metrics = config.metrics
    if metrics is not None and not metrics.is_loopback and not config.allow_remote:
        raise ConfigError(
            f"refusing to serve metrics on non-loopback {metrics} without --allow-remote"
        )
    return config


def _audit_of(args: argparse.Namespace, file: FileConfig, origin: str) -> str | None:
    audit = args.audit or (file.audit.file if file.audit else None)
    return None if audit is None else no_nul(audit, f"{origin}: audit.file")


def _metrics_address(text: str | None, origin: str, flag: bool) -> Address | None:
    if text is None:
        return None
    try:
        return parse_address(text)
    except ConfigError as exc:
        raise ConfigError(f"{'--metrics' if flag else f'{origin}: metrics'}: {exc}") from None


def reload_policy(config: Config) -> Policy:
    """Re-read the config file's profiles and rules (SIGHUP). Raises ConfigError."""
    assert config.source is not None
    file = read_file(config.source)
    policy = policy_of(file, config.source)
    check_references(policy, config.listeners, config.source)
    return policy


async def serve(
    config: Config, inherited: Inherited | None = None, notifier: Notifier | None = None
) -> int:
    """Run one VM until its session ends; returns the process exit status."""
    loop = asyncio.get_running_loop()
    audit = open_audit(config.audit) if config.audit else None
    vm = Vm(config, audit)
    vm.bind(inherited)  # before QEMU is touched: a busy socket must not cost a VM start
    service = ServiceState(notifier or Notifier({}), vm.status)
    service.starting(vm.describe_start())

    stopping: list[str] = []

    def on_signal(name: str) -> None:
        if not stopping:
            ignore_reloads(loop)
        stopping.append(name)
        service.stopping(f"received {name}")
        vm.stop(f"received {name}")

    def on_reload() -> None:
        # The manager waits for READY=1 after RELOADING=1, whatever the outcome.
        service.reloading()
        try:
            _reload()
        finally:
            service.reloaded()

    def _reload() -> None:
        if config.source is None:
            log.warning("SIGHUP ignored: no --config file to reload")
            return
        try:
            policy = reload_policy(config)
        except ConfigError as exc:
            log.error("reload failed, keeping the current policy: %s", exc)
            vm.hub.stats.reloads[ERROR] += 1
            return
        vm.reload(policy)
        log.info("policy reloaded from %s: %d profile(s), %d rule(s)",
                 config.source, len(policy.profiles), len(policy.rules))  # fmt: skip

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    loop.add_signal_handler(signal.SIGHUP, on_reload)
    try:
        ready = await vm.start()
    except StartupError as exc:
        if stopping:  # asked to stop before QEMU was ready: that is not a failure
            log.info("received %s before QEMU was ready: %s", stopping[0], exc)
            return 0
        service.stopping(str(exc))
        raise
    assert ready is not None, "only host mode waits for QEMU"
    # Start-up objects (modules, code, config) are never garbage: keep the collector's full
    # passes, which stall every client, from walking them again and again.
    gc.collect()
    gc.freeze()
    log.info(
        "ready: QEMU monitor %s, oob %s, %d listener(s)",
        ready.version.decode("ascii", "replace"),
        "on" if ready.oob else "off",
        len(config.listeners),
    )
    if not stopping:
        service.ready()
    await vm.proxy.wait()
    service.stopping(vm.status(stopping=True))
    return await vm.wait()


async def serve_host(config: HostConfig, notifier: Notifier | None = None) -> int:
    """Run every VM of the vm-dir until SIGTERM (README "Host mode")."""
    audit = open_audit(config.audit) if config.audit else None
    host = Host(config, audit, notifier)
    # Modules and code are never garbage (see serve); VMs come and go, so only what
    # exists before the first one starts is frozen.
    gc.collect()
    gc.freeze()
    return await host.run()


async def _until_done(run: Awaitable[int]) -> int:
    """`run`, after which no signal can kill the process on its way out: what serves is
    over, whatever comes now (a second SIGTERM right behind the first) is too late."""
    try:
        return await run
    finally:
        stops = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        ignore_signals(asyncio.get_running_loop(), stops)


def _raise_fd_limit() -> None:
    """Every client is a descriptor; the default soft limit (1024) is too low for a hub."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["check-config"]:
        return check_config(argv[1:])
    try:
        config = parse_command_line(argv)
    except ConfigError as exc:
        print(f"qmpmux: error: {exc}", file=sys.stderr)
        return 2
    logs.setup(config.log_level, config.log_format)
    _raise_fd_limit()
    allocator.map_big_blocks()
    # Read (and removed from the environment) before anything else runs, so no child
    # inherits them; see qmpmux/systemd.py.
    notifier = Notifier()
    inherited = listen_fds()
    try:
        if isinstance(config, HostConfig):
            return uvloop.run(_until_done(serve_host(config, notifier)))
        return uvloop.run(_until_done(serve(config, inherited, notifier)))
    except StartupError as exc:
        print(f"qmpmux: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
