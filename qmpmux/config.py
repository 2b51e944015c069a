"""Typed configuration: what to proxy, where to listen, who may do what, and the bounds.

The TOML file and the command line both end up in one frozen `Config`. File structs are
msgspec `forbid_unknown_fields` so that a typo fails at load time instead of silently
falling back to a default (a config that fails open is a security bug); every load error
names the key path (`profiles.monitoring.comands`). Addresses are parsed and checked here,
once, before anything listens.
"""

from __future__ import annotations

import functools
import grp
import ipaddress
import pwd
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, TypeVar

import msgspec

from qmpmux.policy import (
    DEFAULT_POLICY,
    Policy,
    PolicyError,
    ProfileSpec,
    RuleSpec,
    compile_policy,
)

DEFAULT_PROFILE = "full"
# Monitors qmpmux opens to a QEMU it spawns (README "Lanes" has the measurements).
DEFAULT_LANES = 4
MAX_LANES = 64


class ConfigError(ValueError):
    """A configuration problem, phrased for the operator (one line, names the culprit)."""


class Limits(msgspec.Struct, forbid_unknown_fields=True, rename="kebab", frozen=True):
    """Bounds that keep one client from hurting others or QEMU."""

    # Largest single client message (QEMU's own error beyond it). QEMU accepts 64 MiB and
    # reads ~276 KB/s per monitor; with lanes a big command holds up only its own client,
    # and what qmpmux sends upstream is never longer than what the client sent.
    max_message_bytes: int = 16 << 20
    # Commands read from one client but not answered yet before qmpmux stops reading it,
    # and every byte qmpmux holds for it (commands, replies waiting, its outbox).
    max_pending: int = 256
    max_pending_bytes: int = 16 << 20
    # Output queued for one client that does not read before it is disconnected.
    outbox_bytes: int = 24 << 20
    # In-band commands in flight upstream. QEMU queues 8 per monitor and stops reading
    # beyond that, which would leave an exec-oob command stuck behind them.
    upstream_window: int = 8
    # In-band commands one client may have in flight upstream. QEMU runs one monitor's
    # queue in order, so another client's command waits behind all of them; two (one
    # running, one queued) keep QEMU as busy as eight do (measured in bench/).
    client_window: int = 2
    # Bytes of commands in flight upstream (both lanes). QEMU reads ~276 KB/s, so bytes,
    # not commands, are what others wait behind; past this budget only one more goes.
    upstream_bytes: int = 256 << 10
    # Clients connected at once, over all listeners; a listener's own `max-clients` caps
    # it further. Each listener keeps `reserve-clients` of the total for itself, so idle
    # connections on one listener can never lock every other listener out.
    max_clients: int = 4096
    reserve_clients: int = 16
    # Seconds a client may take to finish capabilities negotiation before it is closed:
    # a connection that never negotiates only holds a slot (QEMU itself has no such bound,
    # but a QEMU monitor serves one client, not a host's worth).
    negotiation_timeout: float = 30.0


class Address(msgspec.Struct, frozen=True):
    """`unix:PATH`, `tcp:HOST:PORT`, or (listeners only) `systemd:NAME`: the sockets
    inherited from the service manager under that name (`FileDescriptorName=`)."""

    kind: Literal["unix", "tcp", "systemd"]
    path: str = ""
    host: str = ""
    port: int = 0
    name: str = ""

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        if self.kind == "systemd":
            return f"systemd:{self.name}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        # An inherited socket's address is the socket unit's business; a TCP one on a
        # non-loopback address is checked when it is adopted (`server.adopt_listener`).
        if self.kind in ("unix", "systemd"):
            return True
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


class Listener(msgspec.Struct, frozen=True):
    address: Address
    profile: str = DEFAULT_PROFILE
    mode: int = 0o600
    max_clients: int | None = None  # None: only the global bound applies
    # Where its profile was given, for errors: `listen[0].profile` or `--listen ADDR,...`.
    origin: str = ""
    # The unix socket's owner and group (numeric, resolved from names at load time);
    # None leaves qmpmux's own.
    owner: int | None = None
    group: int | None = None
    # Its clients' largest message, below the global limits.max-message-bytes: a tighter
    # bound on what an untrusted listener's clients can make qmpmux parse and answer.
    max_message_bytes: int | None = None


class Config(msgspec.Struct, frozen=True):
    listeners: tuple[Listener, ...]
    upstream: Address | None = None
    spawn: tuple[str, ...] = ()
    # Further monitors of the same QEMU (`--upstream` repeated), and with `--spawn` how
    # many monitors qmpmux opens: each is a lane its clients are spread over.
    more_upstreams: tuple[Address, ...] = ()
    lanes: int = DEFAULT_LANES
    allow_remote: bool = False
    log_level: str = "info"
    log_format: str = "text"  # or "json" (qmpmux/logs.py)
    connect_timeout: float = 5.0
    shutdown_timeout: float = 60.0  # the guest's power-down (--spawn), or the drain
    reconnect: bool = False  # without --spawn: outlive QEMU restarts
    limits: Limits = Limits()
    policy: Policy = DEFAULT_POLICY
    audit: str | None = None  # a file path, or "stderr"
    source: str | None = None  # the config file, re-read on SIGHUP
    metrics: Address | None = None  # where Prometheus scrapes GET /metrics

    def link_count(self) -> int:
        """How many upstream monitors qmpmux holds."""
        return self.lanes if self.spawn else 1 + len(self.more_upstreams)

    def listener_caps(self) -> dict[str, int | None]:
        """Each listener's label (as clients' `listener` shows it) and own max-clients."""
        return {str(lst.address): lst.max_clients for lst in self.listeners}

    def listener_message_bytes(self) -> dict[str, int]:
        """The listeners with their own max-message-bytes, by label."""
        return {
            str(lst.address): lst.max_message_bytes
            for lst in self.listeners
            if lst.max_message_bytes is not None
        }


# --- the config file ------------------------------------------------------------------------


class ListenSpec(msgspec.Struct, forbid_unknown_fields=True, rename="kebab", frozen=True):
    address: str
    profile: str = DEFAULT_PROFILE
    mode: int | None = None  # 0o600 for a unix socket
    max_clients: int | None = None
    owner: str | int | None = None  # a user name or uid
    group: str | int | None = None  # a group name or gid
    max_message_bytes: int | None = None  # at most limits.max-message-bytes


class AuditSpec(msgspec.Struct, forbid_unknown_fields=True, rename="kebab", frozen=True):
    file: str  # a path, or "stderr" (for journald)


class VmFile(msgspec.Struct, forbid_unknown_fields=True, rename="kebab", frozen=True):
    """One VM's part of a TOML config: its QEMU, listeners, limits and policy. In host
    mode each file of the vm-dir is one of these (README "Host mode")."""

    upstream: str | tuple[str, ...] | None = None  # several: monitors of one QEMU
    spawn: tuple[str, ...] = ()
    lanes: int | None = None  # with spawn
    listen: tuple[ListenSpec, ...] = ()
    allow_remote: bool = False
    connect_timeout: float = 5.0
    shutdown_timeout: float = 60.0
    reconnect: bool = False
    limits: Limits = Limits()
    profiles: dict[str, ProfileSpec] = {}
    rules: tuple[RuleSpec, ...] = ()


class FileConfig(VmFile, forbid_unknown_fields=True, rename="kebab", frozen=True):
    """The TOML file given with --config, as written: one VM's, plus the process-wide
    keys (logs, audit, metrics), or with `vm-dir` the host's."""

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    audit: AuditSpec | None = None
    metrics: str | None = None  # unix:PATH or tcp:HOST:PORT
    vm_dir: str | None = None  # host mode: one VmFile per VM in this directory


_File = TypeVar("_File", bound=VmFile)
# Keys of the process, not of one VM: in host mode, only the host config has them.
HOST_KEYS = frozenset(FileConfig.__struct_encode_fields__[len(VmFile.__struct_encode_fields__) :])
_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_UNKNOWN = re.compile(r"Object contains unknown field `(?P<key>[^`]+)`")


def _key_path(error: msgspec.ValidationError | msgspec.DecodeError) -> str:
    """msgspec's `... - at `$.a.b[0]`` as `a.b[0]: ...`, unknown fields named in the path."""
    m = _AT.match(str(error))
    assert m is not None
    msg, path = m["msg"], (m["path"] or "").lstrip(".")
    unknown = _UNKNOWN.match(msg)
    if unknown:
        key = unknown["key"]
        return f"{path}.{key}: unknown key" if path else f"{key}: unknown key"
    return f"{path}: {msg[0].lower()}{msg[1:]}" if path else msg


def read_file(path: str) -> FileConfig:
    """Load and type-check a TOML config; ConfigError names the file and the key path."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    return decode_file(data, path, FileConfig)


def decode_file(data: bytes, path: str, kind: type[_File]) -> _File:
    """Type-check a TOML config's text; ConfigError names the file and the key path."""
    try:
        return msgspec.toml.decode(data, type=kind)
    except msgspec.ValidationError as exc:  # a subclass of DecodeError: first
        where = _name_profile(data) or _key_path(exc)
        key = where.removesuffix(": unknown key")
        if kind is VmFile and key in HOST_KEYS:
            where = f"{key}: a key of the whole process, given in the host config, not a VM's"
        raise ConfigError(f"{path}: {where}") from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{path}: {_key_path(exc)}") from None


def _name_profile(data: bytes) -> str | None:
    """msgspec says `profiles[...]` for a bad profile; check each one to name it."""
    profiles = msgspec.toml.decode(data).get("profiles")
    if not isinstance(profiles, dict):
        return None
    for name, spec in profiles.items():
        try:
            msgspec.convert(spec, ProfileSpec)
        except msgspec.ValidationError as exc:
            where = _key_path(exc)
            return f"profiles.{name}.{where}" if not where.startswith(":") else None
    return None


def policy_of(file: VmFile, origin: str) -> Policy:
    try:
        return _compiled(tuple(file.profiles.items()), file.rules)
    except PolicyError as exc:
        raise ConfigError(f"{origin}: {exc}") from None


@functools.lru_cache(maxsize=64)
def _compiled(profiles: tuple[tuple[str, ProfileSpec], ...], rules: tuple[RuleSpec, ...]) -> Policy:
    """Compiled once per distinct text: a host's VMs mostly share their policy, and a
    compiled policy is immutable (its per-name memos are pure), so they share the object
    (memory per VM; a SIGHUP that adds VMs does not compile the same policy again)."""
    return compile_policy(dict(profiles), rules)


def listeners_of(file: VmFile, origin: str) -> tuple[Listener, ...]:
    out = []
    for i, spec in enumerate(file.listen):
        where = f"{origin}: listen[{i}]"
        try:
            address = parse_listen_address(spec.address)
        except ConfigError as exc:
            raise ConfigError(f"{where}.address: {exc}") from None
        for key, value in (("mode", spec.mode), ("owner", spec.owner), ("group", spec.group)):
            if value is not None and address.kind != "unix":
                raise ConfigError(f"{where}.{key}: {_unix_only(key, address)}")
        mode = 0o600 if spec.mode is None else spec.mode
        if not 0 <= mode <= 0o777:
            raise ConfigError(f"{where}.mode: expected 0o000..0o777")
        if spec.max_clients is not None and spec.max_clients < 1:
            raise ConfigError(f"{where}.max-clients: expected at least 1")
        if spec.max_message_bytes is not None and spec.max_message_bytes < 64:
            raise ConfigError(f"{where}.max-message-bytes: expected at least 64")
        try:
            owner = None if spec.owner is None else resolve_user(spec.owner)
        except ConfigError as exc:
            raise ConfigError(f"{where}.owner: {exc}") from None
        try:
            group = None if spec.group is None else resolve_group(spec.group)
        except ConfigError as exc:
            raise ConfigError(f"{where}.group: {exc}") from None
        out.append(
            Listener(
                address,
                spec.profile,
                mode,
                spec.max_clients,
                f"{where}.profile",
                owner,
                group,
                spec.max_message_bytes,
            )
        )
    return tuple(out)


_MAX_ID = 4294967294  # (uid_t)-1 means "unchanged" to chown, so it names nobody


def _resolve_id(value: str | int, kind: str, lookup: Callable[[str], int]) -> int:
    """A name or numeric id to an id; ConfigError if there is no such `kind`."""
    if isinstance(value, int) or value.isdigit():
        number = int(value)
        if not 0 <= number <= _MAX_ID:
            raise ConfigError(f"{kind[0]}id {number} out of range 0..{_MAX_ID}")
        return number
    try:
        return lookup(value)
    except (KeyError, ValueError):  # ValueError: a NUL in the name, which names nobody
        raise ConfigError(f"no {kind} {value!r}") from None


def resolve_user(value: str | int) -> int:
    """A user name or numeric uid to a uid; ConfigError if no such user."""
    return _resolve_id(value, "user", lambda name: pwd.getpwnam(name).pw_uid)


def resolve_group(value: str | int) -> int:
    """A group name or numeric gid to a gid; ConfigError if no such group."""
    return _resolve_id(value, "group", lambda name: grp.getgrnam(name).gr_gid)


def _unix_only(key: str, address: Address) -> str:
    if address.kind == "systemd":
        return (
            f"{key}= does not apply to an inherited socket ({address}): set "
            f"Socket{'Mode' if key == 'mode' else key.capitalize()}= in its .socket unit"
        )
    return f"{key}= applies to unix sockets only, not {address}"


_TCP = re.compile(r"^tcp:(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]]+)):(?P<port>\d{1,5})$")


def no_nul(text: str, where: str) -> str:
    """A path or argument as the system takes it: its calls read C strings, which end at a
    NUL, so one inside would name another file, or run another program, than the one
    written (Python refuses it with a ValueError, at the first use)."""
    if "\0" in text:
        raise ConfigError(f"{where}: {text!r} holds a NUL character")
    return text


def parse_address(text: str) -> Address:
    no_nul(text, f"bad address {text!r}")
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise ConfigError(f"bad address {text!r}: unix:PATH needs a path")
        return Address("unix", path=path)
    m = _TCP.match(text)
    if m:
        port = int(m["port"])
        if not 0 < port < 65536:
            raise ConfigError(f"bad address {text!r}: port out of range")
        host = m["v6"] or m["host"]
        try:
            host.encode("idna")  # as getaddrinfo will (an empty label never resolves)
        except UnicodeError:
            raise ConfigError(f"bad address {text!r}: {host!r} is not a host name") from None
        return Address("tcp", host=host, port=port)
    raise ConfigError(f"bad address {text!r}: expected unix:PATH or tcp:HOST:PORT")


def parse_listen_address(text: str) -> Address:
    """A listener's address: `parse_address`, or `systemd:NAME` (socket activation)."""
    if not text.startswith("systemd:"):
        try:
            return parse_address(text)
        except ConfigError as exc:
            raise ConfigError(f"{exc}, or systemd:NAME") from None
    name = text[len("systemd:") :]
    # The names systemd allows in FileDescriptorName= (systemd.socket(5)).
    if not name or len(name) > 255 or not name.isascii() or not name.isprintable() or ":" in name:
        raise ConfigError(
            f"bad address {text!r}: systemd:NAME needs the FileDescriptorName= of a socket "
            "unit (1 to 255 printable ASCII characters, no ':')"
        )
    return Address("systemd", name=name)


def parse_listener(text: str) -> Listener:
    """`ADDR[,profile=NAME][,mode=OCTAL][,owner=USER][,group=GROUP][,max-clients=N]
    [,max-message-bytes=N]`;
    options are split off the end of the address."""
    address_text, *options = text.split(",")
    address = parse_listen_address(address_text)
    profile, mode, max_clients = DEFAULT_PROFILE, 0o600, None
    max_message_bytes: int | None = None
    owner: int | None = None
    group: int | None = None
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or not value:
            raise ConfigError(f"bad listener option {option!r} in {text!r}: expected KEY=VALUE")
        if key in ("mode", "owner", "group") and address.kind != "unix":
            raise ConfigError(f"{_unix_only(key, address)}, in {text!r}")
        if key == "profile":
            profile = value  # checked against the policy in check()
        elif key == "mode":
            try:
                mode = int(value, 8)
            except ValueError:
                raise ConfigError(f"bad mode {value!r} in {text!r}: expected octal") from None
            if not 0 <= mode <= 0o777:
                raise ConfigError(f"bad mode {value!r} in {text!r}: expected 0..777")
        elif key in ("owner", "group"):
            try:
                if key == "owner":
                    owner = resolve_user(value)
                else:
                    group = resolve_group(value)
            except ConfigError as exc:
                raise ConfigError(f"bad {key} in {text!r}: {exc}") from None
        elif key == "max-clients":
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"bad max-clients {value!r} in {text!r}: expected N >= 1")
            max_clients = int(value)
        elif key == "max-message-bytes":
            if not value.isdigit() or int(value) < 64:
                raise ConfigError(f"bad max-message-bytes {value!r} in {text!r}: expected N >= 64")
            max_message_bytes = int(value)
        else:
            raise ConfigError(f"unknown listener option {key!r} in {text!r}")
    return Listener(
        address, profile, mode, max_clients, f"--listen {text}", owner, group, max_message_bytes
    )


def split_spawn(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(qmpmux's own arguments, QEMU's command line after `--spawn [--]`)."""
    argv = list(argv)
    if "--spawn" not in argv:
        return argv, []
    at = argv.index("--spawn")
    qemu = argv[at + 1 :]
    if qemu[:1] == ["--"]:
        qemu = qemu[1:]
    if not qemu:
        raise ConfigError("--spawn needs a QEMU command line after it")
    return argv[: at + 1], qemu


# Upstream, qmpmux re-encodes a command; text that costs 2 bytes from a client (U+0000 as
# C0 80) costs 6, so a client message of at most 16 MiB always fits QEMU's 64 MiB.
MAX_MESSAGE_BYTES = 16 << 20


def check_limits(limits: Limits) -> None:
    """Every bound must make sense: a zero window would answer nothing, ever."""
    rules = [
        ("max-message-bytes", limits.max_message_bytes, 64, MAX_MESSAGE_BYTES),
        ("max-pending", limits.max_pending, 1, 1 << 20),
        ("max-pending-bytes", limits.max_pending_bytes, limits.max_message_bytes, 1 << 34),
        ("outbox-bytes", limits.outbox_bytes, 65536, 1 << 34),
        # QEMU stops reading a monitor with 8 commands queued (QMP_REQ_QUEUE_LEN_MAX).
        ("upstream-window", limits.upstream_window, 1, 8),
        ("client-window", limits.client_window, 1, limits.upstream_window),
        ("upstream-bytes", limits.upstream_bytes, 1024, 1 << 30),
        ("max-clients", limits.max_clients, 1, 1 << 20),
        ("reserve-clients", limits.reserve_clients, 0, 1 << 20),
        # Replies qmpmux held for a client are flushed at once when the command they
        # waited behind is answered: they must fit the outbox of a client that reads,
        # with room for one read's worth of small replies (a 4 KiB read of `{}` makes
        # about 175 KB of errors).
        ("outbox-bytes", limits.outbox_bytes, limits.max_pending_bytes + (1 << 20), 1 << 34),
    ]
    if not 0 < limits.negotiation_timeout <= 3600:
        raise ConfigError(
            f"limits.negotiation-timeout = {limits.negotiation_timeout}: expected 0 to 3600"
        )
    for key, value, low, high in rules:
        if not low <= value <= high:
            raise ConfigError(f"limits.{key} = {value}: expected {low} to {high}")


def check(config: Config) -> None:
    """Cross-field rules: exactly one upstream source, nothing remote unless asked."""
    if not config.listeners:
        raise ConfigError("no --listen address given")
    if (config.upstream is None) == (not config.spawn):
        raise ConfigError("give exactly one of --upstream ADDR or --spawn -- QEMU ARGS")
    for listener in config.listeners:
        if not listener.address.is_loopback and not config.allow_remote:
            raise ConfigError(
                f"refusing to listen on non-loopback {listener.address} without --allow-remote"
            )
    metrics = config.metrics
    if metrics is not None and not metrics.is_loopback and not config.allow_remote:
        raise ConfigError(
            f"refusing to serve metrics on non-loopback {metrics} without --allow-remote"
        )
    if metrics is not None and str(metrics) in {str(lst.address) for lst in config.listeners}:
        raise ConfigError(f"--metrics {metrics} is also a --listen address")
    for i, arg in enumerate(config.spawn):
        no_nul(arg, f"{config.source}: spawn[{i}]" if config.source else f"spawn[{i}]")
    if config.reconnect and config.spawn:
        raise ConfigError("--reconnect needs --upstream: with --spawn, QEMU's end is qmpmux's")
    if not 0 <= config.shutdown_timeout <= 3600:
        raise ConfigError(f"shutdown-timeout = {config.shutdown_timeout:g}: expected 0 to 3600")
    check_limits(config.limits)
    if not 1 <= config.lanes <= MAX_LANES:
        raise ConfigError(f"--lanes {config.lanes}: expected 1 to {MAX_LANES}")
    if len(config.more_upstreams) >= MAX_LANES:
        raise ConfigError(f"at most {MAX_LANES} --upstream monitors")
    addresses = [str(a) for a in (config.upstream, *config.more_upstreams) if a is not None]
    if len(set(addresses)) != len(addresses):
        raise ConfigError("the same --upstream address is given twice")
    paths = [str(lst.address) for lst in config.listeners]
    if len(set(paths)) != len(paths):
        raise ConfigError("the same --listen address is given twice")
    for listener in config.listeners:
        own = listener.max_message_bytes
        if own is not None and own > config.limits.max_message_bytes:
            where = (listener.origin or str(listener.address)).removesuffix(".profile")
            raise ConfigError(
                f"{where}: max-message-bytes {own} is over limits.max-message-bytes "
                f"({config.limits.max_message_bytes}): a listener's may only be lower"
            )
    check_references(config.policy, config.listeners, config.source or "config")


def check_references(policy: Policy, listeners: Sequence[Listener], origin: str) -> None:
    """Every name that points somewhere must resolve, or the config fails open: a rule whose
    listener is misspelt never matches, and its clients get their listener's profile.

    Profile names inside the policy (rules, bases) are checked when it is compiled; this
    checks what needs the listeners too. Run at start-up, by check-config and on reload."""
    profiles = ", ".join(sorted(policy.profiles))
    for listener in listeners:
        if listener.profile not in policy.profiles:
            where = listener.origin or f"listener {listener.address}"
            raise ConfigError(
                f"{where}: unknown profile {listener.profile!r} (profiles: {profiles})"
            )
    by_name = {str(listener.address): listener for listener in listeners}
    # An inherited socket may be a unix one: its family is known only once it is adopted.
    unix = [name for name, lst in by_name.items() if lst.address.kind in ("unix", "systemd")]
    for i, rule in enumerate(policy.rules):
        where = f"{origin}: rules[{i}]"
        if rule.listener is not None:
            target = by_name.get(rule.listener)
            if target is None:
                raise ConfigError(
                    f"{where}.listener: no listener {rule.listener!r} "
                    f"(listeners: {', '.join(by_name) or 'none'})"
                )
            if target.address.kind == "tcp":
                raise ConfigError(
                    f"{where}.listener: {rule.listener} is a TCP listener; rules match unix "
                    "peer credentials only, so this rule could never match"
                )
        elif not unix:
            raise ConfigError(
                f"{where}: no unix listener; rules match unix peer credentials only, so "
                "this rule could never match"
            )


def upstreams_of(file: VmFile, origin: str) -> list[Address]:
    """The file's `upstream`, one address or a list of monitors of the same QEMU."""
    texts = [file.upstream] if isinstance(file.upstream, str) else list(file.upstream or ())
    out = []
    for i, text in enumerate(texts):
        try:
            out.append(parse_address(text))
        except ConfigError as exc:
            where = "upstream" if isinstance(file.upstream, str) else f"upstream[{i}]"
            raise ConfigError(f"{origin}: {where}: {exc}") from None
    return out


def vm_config(file: VmFile, origin: str) -> Config:
    """One VM file of host mode as the checked Config its VM runs with; ConfigError names
    the file and the key (README "Host mode")."""
    upstreams = upstreams_of(file, origin)
    try:
        check_limits(file.limits)
    except ConfigError as exc:
        raise ConfigError(f"{origin}: {exc}") from None
    config = Config(
        listeners=listeners_of(file, origin),
        upstream=upstreams[0] if upstreams else None,
        more_upstreams=tuple(upstreams[1:]),
        spawn=file.spawn,
        lanes=file.lanes or DEFAULT_LANES,
        allow_remote=file.allow_remote,
        connect_timeout=file.connect_timeout,
        shutdown_timeout=file.shutdown_timeout,
        reconnect=file.reconnect,
        limits=file.limits,
        policy=policy_of(file, origin),
        source=origin,
    )
    try:
        check(config)
    except ConfigError as exc:
        message = str(exc)
        raise ConfigError(
            message if message.startswith(origin) else f"{origin}: {message}"
        ) from None
    return config


class HostConfig(msgspec.Struct, frozen=True):
    """Host mode: the process-wide settings; each VM is a file in `vm_dir`."""

    vm_dir: str
    allow_remote: bool = False  # for the metrics address; each VM file says its own
    log_level: str = "info"
    log_format: str = "text"
    audit: str | None = None
    metrics: Address | None = None
    source: str | None = None


def vm_key_in(file: FileConfig) -> str | None:
    """The first VM key a host config gives: host mode takes them from each VM's file
    only, so that no VM is configured in two places."""
    for key in VmFile.__struct_fields__:
        if key != "allow_remote" and getattr(file, key) != getattr(_VM_DEFAULTS, key):
            return key.replace("_", "-")
    return None


_VM_DEFAULTS = VmFile()
