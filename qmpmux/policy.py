"""Who may do what: profiles compiled once into frozen objects the hot path only looks up.

A profile is an allowlist of commands and events (exact names and globs), a denylist
that always wins, and a few switches. Built-in profiles: `full` (everything), `readonly`
(commands that can neither change the VM or the host nor reveal secrets, docs/protocol.md
§10.1) and `vm-control` (readonly plus run-state control). Custom profiles start from
nothing, or from a `base`, and deny whatever they do not allow.

Downstream extensions (docs/protocol.md §12): names starting with `__` are never allowed
by a glob that does not itself start with `__`, so `*` does not open them; a profile must
name them (`__com.example_*`). Deny globs, on the other hand, match them like any name: a
denial must never leave a back door.

Invariants:
- Deny wins over allow; no match means deny. There is no way to fail open.
- Decisions are pure functions of (profile, name, arguments); compiled profiles are
  immutable and replaced wholesale on reload.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase, translate
from typing import Final

import msgspec

from qmpmux.fdargs import FD_COMMANDS, numeric_fd
from qmpmux.qjson import JsonValue, LongString, string_head

EXTENSION_PREFIX: Final = "__"
# qmpmux's own commands live in its own downstream namespace (docs/protocol.md §12).
QMPMUX_PREFIX: Final = "__org.qmpmux_"
WHOAMI: Final = QMPMUX_PREFIX + "whoami"
LIST_CLIENTS: Final = QMPMUX_PREFIX + "list-clients"

FULL: Final = "full"
READONLY: Final = "readonly"
VM_CONTROL: Final = "vm-control"


class PolicyError(ValueError):
    """A policy definition problem; `path` names the offending key (e.g. profiles.x.base)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


class Decision(enum.Enum):
    ALLOW = "allowed"
    DENY = "denied"
    AUDIT = "audit-only"  # would be denied; let through and recorded


# --- configuration shapes -------------------------------------------------------------------


class ProfileSpec(msgspec.Struct, forbid_unknown_fields=True, rename="kebab", frozen=True):
    """A profile as written in the config file."""

    base: str | None = None
    commands: tuple[str, ...] = ()
    deny_commands: tuple[str, ...] = ()
    events: tuple[str, ...] = ()
    deny_events: tuple[str, ...] = ()
    audit_only: bool | None = None
    audit_arguments: bool | None = None
    strip_extensions: bool | None = None
    secret_properties: bool | None = None


class RuleSpec(msgspec.Struct, forbid_unknown_fields=True, rename="kebab", frozen=True):
    """Give `profile` to unix clients whose peer credentials match every field given."""

    profile: str
    uid: int | None = None
    gid: int | None = None
    exe: str | None = None
    listener: str | None = None


# Read-only by design: reads of existing state that neither change the VM or the host nor
# reveal secrets, plus the introspection qmpmux filters per client, `qom-get`, which is
# allowed only with the secret-property restriction below, and the block and chardev
# queries, whose replies qmpmux scrubs of credentials for profiles without
# `secret-properties` (scrub.py). Every read left out, and why: README "Policy".
READONLY_COMMANDS: Final = (
    "qom-list", "qom-list-types", "qom-get",
    "query-acpi-ospm-status", "query-balloon", "query-block", "query-block-exports",
    "query-block-jobs", "query-blockstats", "query-chardev", "query-chardev-backends",
    "query-colo-status", "query-command-line-options", "query-commands",
    "query-cpu-definitions", "query-cpus-fast", "query-current-machine", "query-dirty-rate",
    "query-display-options", "query-dump", "query-dump-guest-memory-capability",
    "query-events", "query-gic-capabilities", "query-hotpluggable-cpus", "query-iothreads",
    "query-jobs", "query-kvm", "query-machines", "query-memdev", "query-memory-devices",
    "query-memory-size-summary", "query-mice", "query-migrate", "query-migrate-capabilities",
    "query-migrate-parameters", "query-name", "query-named-block-nodes", "query-pci",
    "query-pr-managers", "query-qmp-schema", "query-replay", "query-rocker",
    "query-rocker-of-dpa-flows", "query-rocker-of-dpa-groups", "query-rocker-ports",
    "query-rx-filter", "query-sev", "query-sev-capabilities", "query-sgx",
    "query-sgx-capabilities", "query-spice", "query-stats", "query-stats-schemas",
    "query-status", "query-target", "query-tpm", "query-tpm-models", "query-tpm-types",
    "query-uuid", "query-vcpu-dirty-limit", "query-version", "query-vm-generation-id",
    "query-vnc", "query-vnc-servers", "query-xen-replication-status", "query-yank",
    "trace-event-get-state", WHOAMI,
)  # fmt: skip
# Commands that construct an object of a type the client names, running that type's
# instance code (qom/qom-qmp-cmds.c qmp_qom_list_properties and qmp_device_list_properties
# call object_new; target/*/cpu.c model expansion builds a CPU object of the named model).
# Not every type survives being built outside its context: QEMU 7.2 aborts or crashes on
# several (`x-remote-object`, `qio-net-listener`, ...). Introspection that builds objects is
# not a read of existing state, so `readonly` and `vm-control` never run it, whatever the
# type; `full` or a custom profile may, by name.
TYPE_CODE_COMMANDS: Final = (
    "device-list-properties", "qom-list-properties", "query-cpu-model-baseline",
    "query-cpu-model-comparison", "query-cpu-model-expansion",
)  # fmt: skip
# Named explicitly so that a base profile's allowlist can never reopen them.
READONLY_DENIED: Final = (
    "human-monitor-command", "qom-set", "transaction", "ringbuf-read", "yank",
    *TYPE_CODE_COMMANDS,
)  # fmt: skip


class Opens(enum.Enum):
    """When an escape hatch is open: for any arguments, or for some values of one member."""

    ALWAYS = "always"
    EXEC_URI = "exec: URI"  # migration/exec.c: `exec:CMD` runs CMD with /bin/sh -c
    EXEC_CHANNEL = "exec transport"  # QEMU 8.2+ MigrationChannel {"transport": "exec"}
    PROGRAM = "program path"  # net/tap.c: a script or helper binary the client names


@dataclass(frozen=True)
class EscapeHatch:
    """A command (or one of its arguments) that lets a client run arbitrary commands or
    programs, past any list of allowed and denied QMP commands."""

    command: str
    member: str | None  # None: the command itself
    opens: Opens
    reason: str

    def opened(self, args: Mapping[str, JsonValue] | None) -> bool:
        if self.opens is Opens.ALWAYS:
            return True
        if not args or not self.member:
            return False
        if self.opens is Opens.EXEC_URI:
            return string_head(args, self.member, 5) == "exec:"
        if self.opens is Opens.PROGRAM:  # "no" and "" mean none (net/tap.c)
            program = string_head(args, self.member, 3)
            return program is not None and program not in ("", "no")
        value = args.get(self.member)
        channels = value if isinstance(value, list) else ()
        return any(
            isinstance(c, dict)
            and isinstance(c.get("addr"), dict)
            and c["addr"].get("transport") == "exec"  # type: ignore[union-attr]
            for c in channels
        )


# Every escape hatch in QEMU's schema (7.2, plus 8.2+ migration channels). A hatch is never
# granted by a glob, only by its command's exact name in `commands`: `*` must not turn a
# profile with `deny-commands` into one that can run everything. `transaction` is not here:
# qmpmux checks each of its actions against the profile. `qom-set`, `object-add`,
# `device_add` and the like change the VM but run no command of the client's choosing.
ESCAPE_HATCHES: Final = (
    EscapeHatch("human-monitor-command", None, Opens.ALWAYS,
                "runs any HMP command (stop, netdev_add fd=N, migrate exec:, and HMP-only "
                "ones such as savevm and qemu-io), whatever deny-commands says"),
    EscapeHatch("migrate", "uri", Opens.EXEC_URI, "an exec: URI runs a host shell command"),
    EscapeHatch("migrate", "channels", Opens.EXEC_CHANNEL,
                "an exec transport runs a host command"),
    EscapeHatch("migrate-incoming", "uri", Opens.EXEC_URI,
                "an exec: URI runs a host shell command"),
    EscapeHatch("migrate-incoming", "channels", Opens.EXEC_CHANNEL,
                "an exec transport runs a host command"),
    EscapeHatch("migrate-recover", "uri", Opens.EXEC_URI,
                "an exec: URI runs a host shell command"),
    EscapeHatch("netdev_add", "script", Opens.PROGRAM, "tap: runs the host program it names"),
    EscapeHatch("netdev_add", "downscript", Opens.PROGRAM,
                "tap: runs the host program it names"),
    EscapeHatch("netdev_add", "helper", Opens.PROGRAM,
                "tap, bridge: runs the host program it names"),
)  # fmt: skip
HATCH_COMMANDS: Final = tuple(sorted({h.command for h in ESCAPE_HATCHES}))
_WHOLE_HATCHES: Final = frozenset(h.command for h in ESCAPE_HATCHES if h.member is None)
_ARGUMENT_HATCHES: Final[Mapping[str, tuple[EscapeHatch, ...]]] = {
    name: tuple(h for h in ESCAPE_HATCHES if h.command == name and h.member is not None)
    for name in HATCH_COMMANDS
    if name not in _WHOLE_HATCHES
}

BUILTIN: Final[Mapping[str, ProfileSpec]] = {
    # `full` names every escape hatch exactly: a glob never grants one.
    FULL: ProfileSpec(
        commands=("*", "__*", *HATCH_COMMANDS), events=("*", "__*"), secret_properties=True
    ),
    READONLY: ProfileSpec(commands=READONLY_COMMANDS, deny_commands=READONLY_DENIED, events=("*",)),
    VM_CONTROL: ProfileSpec(
        base=READONLY,
        commands=("stop", "cont", "system_powerdown", "system_reset", "system_wakeup"),
    ),
}

# QOM properties that hold secrets (secret.data, secret_keyring.serial, tls-creds-psk
# username, passwords): `qom-get` returns them in plaintext (docs/protocol.md §10.3).
SECRET_PROPERTIES: Final = frozenset(
    {"data", "serial", "username", "password", "passwords", "key", "secret", "cookie"}
)

_SECRET_PROPERTY_MAX: Final = max(map(len, SECRET_PROPERTIES))

_PATTERN = re.compile(r"^[A-Za-z0-9_.:*?\[\]!-]+$")


def _short_string(args: Mapping[str, JsonValue], key: str, limit: int) -> str | None:
    """Argument `key` if it is a string of at most `limit` characters, else None (a
    longer one never built: qjson.string_head)."""
    head = string_head(args, key, limit + 1)
    return head if head is not None and len(head) <= limit else None


def _clipped(value: object) -> object:
    """A client's string cut to what a message quotes of it (repr of megabytes costs
    milliseconds); anything else as it is."""
    return value[:128] if isinstance(value, str) else value


def check_pattern(pattern: str, path: str) -> None:
    if not _PATTERN.match(pattern):
        raise PolicyError(path, f"invalid name or glob {pattern!r}")
    depth = 0
    for ch in pattern:
        if ch == "[":
            if depth:
                raise PolicyError(path, f"invalid glob {pattern!r}: nested '['")
            depth = 1
        elif ch == "]" and depth:
            depth = 0
    if depth:
        raise PolicyError(path, f"invalid glob {pattern!r}: unclosed '['")


# One character of a glob, as fnmatch reads it: a set (`[` up to the next `]`, a `]`
# right after `[` or `[!` included) or any single character.
_GLOB_CHAR = re.compile(r"\[!?+\]?+[^\]]*\]|.", re.DOTALL)
_TRANSLATED = re.compile(r"\(\?s:(.*)\)\\[Zz]", re.DOTALL)


@functools.lru_cache(maxsize=256)
def _segments(glob: str) -> tuple[tuple[re.Pattern[str], int], ...]:
    """The glob cut at its `*`s: each piece as a pattern of its fixed width (fnmatch's
    own translation of each of its characters)."""
    pieces: list[list[str]] = [[]]
    for m in _GLOB_CHAR.finditer(glob):
        if m.group() == "*":
            pieces.append([])
        else:
            one = _TRANSLATED.fullmatch(translate(m.group()))
            assert one is not None, "fnmatch translates to (?s:...)\\Z"
            pieces[-1].append(one.group(1))
    return tuple((re.compile("".join(p), re.DOTALL), len(p)) for p in pieces)


def long_match(name: LongString, glob: str) -> bool:
    """fnmatchcase(name, glob) read from the parts of a long name, never joined: the
    pieces between stars match at the start, at the end, and leftmost in between."""
    segments = _segments(glob)
    (first, first_width), (last, last_width) = segments[0], segments[-1]
    if len(segments) == 1:
        return len(name) == first_width and first.fullmatch(name.head(first_width)) is not None
    if first_width + last_width > len(name):
        return False
    if first.fullmatch(name.head(first_width)) is None:
        return False
    if last.fullmatch(name.tail(last_width)) is None:
        return False
    at, stop = first_width, len(name) - last_width
    for pattern, width in segments[1:-1]:
        if width:
            at = name.search(pattern, width, at, stop)
            if at < 0:
                return False
    return True


@dataclass(frozen=True)
class Patterns:
    """Exact names and globs; `__` names only match globs that start with `__`."""

    exact: frozenset[str] = frozenset()
    globs: tuple[str, ...] = ()

    @classmethod
    def of(cls, patterns: Iterable[str]) -> Patterns:
        exact, globs = set(), []
        for p in patterns:
            if any(c in p for c in "*?["):
                globs.append(p)
            else:
                exact.add(p)
        return cls(frozenset(exact), tuple(globs))

    def match(self, name: str | LongString) -> bool:
        """For allowing: `__` names only match globs that start with `__`."""
        if type(name) is str and name in self.exact:
            return True
        extension = name.startswith(EXTENSION_PREFIX)
        globs = (g for g in self.globs if g.startswith(EXTENSION_PREFIX) == extension)
        if isinstance(name, LongString):
            return self._long_match(name, globs)
        return any(fnmatchcase(name, g) for g in globs)

    def match_any(self, name: str | LongString) -> bool:
        """For denying: every glob matches every name it fits, `__` names included."""
        if isinstance(name, LongString):
            return self._long_match(name, self.globs)
        return name in self.exact or any(fnmatchcase(name, g) for g in self.globs)

    def _long_match(self, name: LongString, globs: Iterable[str]) -> bool:
        return any(map(name.equals, self.exact)) or any(long_match(name, g) for g in globs)

    def names(self) -> list[str]:
        return [*sorted(self.exact), *self.globs]


_CACHE_LIMIT: Final = 4096
_CACHED_NAME_MAX: Final = 128  # real command and event names are short; clients' may not be


@dataclass(frozen=True, eq=False)
class Profile:
    """A compiled profile. Lookups are memoised per name (bounded)."""

    name: str
    allow_commands: Patterns
    deny_commands: Patterns
    allow_events: Patterns
    deny_events: Patterns
    audit_only: bool = False
    audit_arguments: bool = False
    strip_extensions: bool = False
    secret_properties: bool = False
    # Numeric fd names reach QEMU's own descriptors (fdargs.py); only the built-in `full`.
    raw_fds: bool = False
    _commands: dict[str, Decision] = field(default_factory=dict, repr=False, compare=False)
    _events: dict[str, bool] = field(default_factory=dict, repr=False, compare=False)

    def command(self, name: str | LongString) -> Decision:
        decision = self._commands.get(name) if type(name) is str else None
        if decision is None:
            allowed = self.allow_commands.match(name) and not self.deny_commands.match_any(name)
            if name in _WHOLE_HATCHES and name not in self.allow_commands.exact:
                allowed = False  # an escape hatch is granted by its exact name only
            if allowed:
                decision = Decision.ALLOW
            else:
                decision = Decision.AUDIT if self.audit_only else Decision.DENY
            if (
                type(name) is str
                and len(name) <= _CACHED_NAME_MAX
                and len(self._commands) < _CACHE_LIMIT
            ):
                self._commands[name] = decision
        return decision

    def event(self, name: str) -> bool:
        allowed = self._events.get(name)
        if allowed is None:
            allowed = self.allow_events.match(name) and not self.deny_events.match_any(name)
            if self.audit_only:
                allowed = True
            if len(self._events) < _CACHE_LIMIT and len(name) <= _CACHED_NAME_MAX:
                self._events[name] = allowed
        return allowed

    def argument_problem(
        self, name: str, args: Mapping[str, JsonValue] | None, protected: frozenset[str]
    ) -> str | None:
        """Argument-level refusals that apply even where the command itself is allowed
        (audit-only profiles are let through them; see `fatal_problem` for the others)."""
        if name == "transaction" and args:
            actions = args.get("actions")
            for action in actions if isinstance(actions, list) else ():
                kind = action.get("type") if isinstance(action, dict) else None
                if (
                    isinstance(kind, str)
                    and kind != "abort"
                    and (self.command(kind) is not Decision.ALLOW)
                ):
                    return (
                        f"transaction action '{kind}' refused by qmpmux policy "
                        f"(profile '{self.name}' may not run it)"
                    )
        hatches = _ARGUMENT_HATCHES.get(name)
        if hatches and name not in self.allow_commands.exact:
            for hatch in hatches:
                if hatch.opened(args):
                    return (
                        f"{name} with this {hatch.member} refused by qmpmux policy: "
                        f"{hatch.reason} (profile '{self.name}' does not name {name} exactly)"
                    )
        if name == "qom-get" and not self.secret_properties and args:
            prop = _short_string(args, "property", _SECRET_PROPERTY_MAX)
            if prop is not None and prop.lower() in SECRET_PROPERTIES:
                return (
                    f"qom-get of property '{prop}' refused by qmpmux policy "
                    f"(profile '{self.name}' may not read secret-bearing properties)"
                )
        return None

    def fatal_problem(
        self, name: str, args: Mapping[str, JsonValue] | None, protected: frozenset[str]
    ) -> str | None:
        """Refusals that audit-only never lets through; `yank` of qmpmux's own connection is
        refused even to `full`."""
        if name == "yank" and args:
            instances = args.get("instances")
            for inst in instances if isinstance(instances, list) else ():
                if (
                    isinstance(inst, dict)
                    and inst.get("type") == "chardev"
                    and (inst.get("id") in protected or not protected)
                ):
                    return (
                        f"yank of chardev {_clipped(inst.get('id'))!r} refused by qmpmux policy: "
                        "it may be qmpmux's own connection to QEMU"
                    )
        if not self.raw_fds and name in FD_COMMANDS:
            found = numeric_fd(name, args)
            if found is not None:
                where, value = found
                return (
                    f"numeric fd {value[:32]!r} in {name} argument '{where[:128]}' refused by "
                    f"qmpmux policy: QEMU would take it as one of its own descriptor numbers "
                    f"(profile '{self.name}'; pass an fd with getfd and use its name)"
                )
        return None

    def escape_hatches(self) -> list[EscapeHatch]:
        """The escape hatches this profile is granted (by exact name, not denied)."""
        return [
            h
            for h in ESCAPE_HATCHES
            if h.command in self.allow_commands.exact
            and not self.deny_commands.match_any(h.command)
        ]

    def describe(self) -> dict[str, object]:
        """The effective policy, for `check-config`."""
        return {
            "commands": self.allow_commands.names(),
            "deny-commands": self.deny_commands.names(),
            "events": self.allow_events.names(),
            "deny-events": self.deny_events.names(),
            "audit-only": self.audit_only,
            "audit-arguments": self.audit_arguments,
            "strip-extensions": self.strip_extensions,
            "secret-properties": self.secret_properties,
            "escape-hatches": [
                f"{h.command}{f' ({h.member})' if h.member else ''}: {h.reason}"
                for h in self.escape_hatches()
            ],
        }


@dataclass(frozen=True)
class Rule:
    profile: Profile
    uid: int | None
    gid: int | None
    exe: str | None
    listener: str | None

    def matches(self, listener: str, uid: int | None, gid: int | None, exe: str | None) -> bool:
        if uid is None and gid is None:
            return False  # not a unix peer: rules never apply
        return (
            (self.uid is None or self.uid == uid)
            and (self.gid is None or self.gid == gid)
            and (self.exe is None or self.exe == exe)
            and (self.listener is None or self.listener == listener)
        )


@dataclass(frozen=True)
class Policy:
    """Every compiled profile plus the rules that assign them to clients."""

    profiles: Mapping[str, Profile]
    rules: tuple[Rule, ...] = ()

    def assign(
        self,
        listener: str,
        listener_profile: str,
        uid: int | None = None,
        gid: int | None = None,
        exe: str | None = None,
    ) -> Profile:
        for rule in self.rules:
            if rule.matches(listener, uid, gid, exe):
                return rule.profile
        return self.profiles[listener_profile]


def _resolve(
    name: str, specs: Mapping[str, ProfileSpec], path: str, seen: tuple[str, ...] = ()
) -> ProfileSpec:
    """Flatten a profile's base chain: lists are united, switches inherited unless set."""
    if name in seen:
        raise PolicyError(path, f"profile base cycle: {' -> '.join((*seen, name))}")
    spec = specs[name]
    if spec.base is None:
        return spec
    if spec.base not in specs:
        raise PolicyError(f"{path}.base", f"unknown profile {spec.base!r}")
    base = _resolve(spec.base, specs, f"profiles.{spec.base}", (*seen, name))

    def pick(own: bool | None, inherited: bool | None) -> bool | None:
        return inherited if own is None else own

    return ProfileSpec(
        commands=base.commands + spec.commands,
        deny_commands=base.deny_commands + spec.deny_commands,
        events=base.events + spec.events,
        deny_events=base.deny_events + spec.deny_events,
        audit_only=pick(spec.audit_only, base.audit_only),
        audit_arguments=pick(spec.audit_arguments, base.audit_arguments),
        strip_extensions=pick(spec.strip_extensions, base.strip_extensions),
        secret_properties=pick(spec.secret_properties, base.secret_properties),
    )


# uid_t and gid_t are 32 bits; (uid_t)-1 means "no change" and is never a process's id.
_ID_MAX: Final = 2**32 - 2
_NAME_MAX: Final = 255  # a file name, as /proc/PID/exe ends in one


def _check_rule(rule: RuleSpec, path: str) -> None:
    """A rule condition that can never match would fail open: its clients would get their
    listener's profile instead. (Listener names are checked against the listeners, which
    the config knows: config.check_references.)"""
    for key, value in (("uid", rule.uid), ("gid", rule.gid)):
        if value is not None and not 0 <= value <= _ID_MAX:
            raise PolicyError(f"{path}.{key}", f"{value} can never be a {key} (0 to {_ID_MAX})")
    exe = rule.exe
    if exe is not None and (
        not exe or "/" in exe or exe in (".", "..") or len(exe.encode()) > _NAME_MAX
    ):
        raise PolicyError(
            f"{path}.exe",
            f"{exe!r} can never match: exe is the executable's file name, without a directory",
        )


def compile_policy(
    custom: Mapping[str, ProfileSpec] | None = None, rules: Sequence[RuleSpec] = ()
) -> Policy:
    """Check and compile profiles and rules; raises PolicyError naming the bad key."""
    custom = custom or {}
    for name in custom:
        if name in BUILTIN:
            raise PolicyError(f"profiles.{name}", "built-in profiles cannot be redefined")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise PolicyError(f"profiles.{name}", "profile names use letters, digits, _ . -")
    specs: dict[str, ProfileSpec] = {**BUILTIN, **custom}
    profiles: dict[str, Profile] = {}
    for name, spec in specs.items():
        path = f"profiles.{name}"
        for key in ("commands", "deny_commands", "events", "deny_events"):
            for i, pattern in enumerate(getattr(spec, key)):
                check_pattern(pattern, f"{path}.{key.replace('_', '-')}[{i}]")
        flat = _resolve(name, specs, path)
        profiles[name] = Profile(
            name=name,
            allow_commands=Patterns.of(flat.commands),
            deny_commands=Patterns.of(flat.deny_commands),
            allow_events=Patterns.of(flat.events),
            deny_events=Patterns.of(flat.deny_events),
            audit_only=bool(flat.audit_only),
            audit_arguments=bool(flat.audit_arguments),
            strip_extensions=bool(flat.strip_extensions),
            secret_properties=bool(flat.secret_properties),
            raw_fds=name == FULL,
        )
    compiled_rules = []
    for i, rule in enumerate(rules):
        if rule.profile not in profiles:
            raise PolicyError(f"rules[{i}].profile", f"unknown profile {rule.profile!r}")
        if rule.uid is None and rule.gid is None and rule.exe is None:
            raise PolicyError(f"rules[{i}]", "a rule needs at least one of uid, gid, exe")
        _check_rule(rule, f"rules[{i}]")
        compiled_rules.append(
            Rule(profiles[rule.profile], rule.uid, rule.gid, rule.exe, rule.listener)
        )
    return Policy(profiles, tuple(compiled_rules))


DEFAULT_POLICY: Final = compile_policy()
