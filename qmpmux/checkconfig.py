"""`qmpmux check-config FILE [--upstream ADDR | --spawn -- QEMU ARGS...]`.

Validates a config file exactly as `qmpmux --config` would and prints the effective
policy: listeners, rules, and for every profile what it allows. Given a QEMU (to connect
to, or to start for the purpose), the patterns are resolved against that QEMU's real
`query-commands` and `query-qmp-schema` events, so an operator sees the concrete list a
client will get before anyone connects.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from fnmatch import fnmatchcase
from pathlib import Path

import msgspec

from qmpmux.config import (
    Address,
    Config,
    ConfigError,
    FileConfig,
    VmFile,
    check_references,
    decode_file,
    listeners_of,
    parse_address,
    policy_of,
    read_file,
    split_spawn,
    vm_config,
    vm_key_in,
)
from qmpmux.host import SUFFIX, clash, contested, read_vm_dir
from qmpmux.policy import BUILTIN, LIST_CLIENTS, WHOAMI, Decision, Policy, Profile
from qmpmux.upstream import monitor_args

_TIMEOUT = 10.0


class _Monitor:
    """A minimal blocking QMP client, enough to ask QEMU what it has."""

    def __init__(self, sock: socket.socket) -> None:
        sock.settimeout(_TIMEOUT)
        self.file = sock.makefile("rb")
        self.sock = sock
        self.file.readline()  # greeting
        self.call("qmp_capabilities")

    def call(self, command: str) -> object:
        self.sock.sendall(msgspec.json.encode({"execute": command, "id": command}))
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("QEMU closed the monitor")
            msg = msgspec.json.decode(line)
            if isinstance(msg, dict) and msg.get("id") == command:
                if "error" in msg:
                    raise ConnectionError(f"{command}: {msg['error']}")
                return msg.get("return")


def _connect(address: Address) -> socket.socket:
    if address.kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(address.path)
    else:
        sock = socket.create_connection((address.host, address.port), _TIMEOUT)
    return sock


def _introspect(monitor: _Monitor) -> tuple[list[str], list[str]]:
    commands = monitor.call("query-commands")
    schema = monitor.call("query-qmp-schema")
    assert isinstance(commands, list) and isinstance(schema, list)
    names = sorted(c["name"] for c in commands if isinstance(c, dict))
    events = sorted(e["name"] for e in schema if isinstance(e, dict) and e["meta-type"] == "event")
    return names, events


def query_qemu(upstream: Address | None, qemu: Sequence[str]) -> tuple[list[str], list[str]]:
    """(commands, events) of a running QEMU, or of one started just for this."""
    if upstream is not None:
        with _connect(upstream) as sock:
            return _introspect(_Monitor(sock))
    ours, theirs = socket.socketpair()
    try:
        proc = subprocess.Popen(
            [*qemu, *monitor_args(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
        )
    finally:
        theirs.close()
    try:
        with ours:
            return _introspect(_Monitor(ours))
    finally:
        proc.terminate()
        proc.wait(_TIMEOUT)


def _allowed(profile: Profile, names: list[str], events: bool) -> list[str]:
    if events:
        return [n for n in names if profile.event(n)]
    return [n for n in names if profile.command(n) is Decision.ALLOW]


def render(policy: Policy, qemu: tuple[list[str], list[str]] | None) -> str:
    lines = []
    for rule in policy.rules:
        match = ", ".join(
            f"{k}={v}"
            for k, v in (("uid", rule.uid), ("gid", rule.gid), ("exe", rule.exe),
                         ("listener", rule.listener))
            if v is not None
        )  # fmt: skip
        lines.append(f"rule: {match} -> profile {rule.profile.name}")
    for name, profile in policy.profiles.items():
        lines.append(f"profile {name}:")
        info = profile.describe()
        switches = ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in info.items()
                             if isinstance(v, bool))  # fmt: skip
        lines.append(f"  {switches}")
        hatches = info["escape-hatches"]
        assert isinstance(hatches, list)
        if hatches:
            lines.append(
                "  escape hatches granted: this profile can in effect run every command, "
                "whatever its deny-commands say:"
            )
            lines.extend(f"    {hatch}" for hatch in hatches)
        if qemu is None:
            for key in ("commands", "deny-commands", "events", "deny-events"):
                value = info[key]
                assert isinstance(value, list)
                lines.append(f"  {key}: {', '.join(value) or '(none)'}")
            continue
        commands, events = qemu
        allowed = _allowed(profile, commands, events=False)
        lines.append(f"  commands ({len(allowed)} of {len(commands)}): {', '.join(allowed)}")
        audited = [n for n in commands if profile.command(n) is Decision.AUDIT]
        if audited:
            lines.append(f"  audit-only, would be denied ({len(audited)}): {', '.join(audited)}")
        allowed = _allowed(profile, events, events=True)
        lines.append(f"  events ({len(allowed)} of {len(events)}): {', '.join(allowed)}")
        lines.extend(_dead_denials(profile, [*commands, WHOAMI, LIST_CLIENTS], events))
    return "\n".join(lines)


_BUILTIN_DENIALS = frozenset(
    p for spec in BUILTIN.values() for p in (*spec.deny_commands, *spec.deny_events)
)


def _dead_denials(profile: Profile, commands: list[str], events: list[str]) -> list[str]:
    """A deny pattern that matches nothing this QEMU has is most likely a typo, and a typo
    in a denial fails open: say so. (Built-in denials name commands some targets lack.)"""
    out = []
    for key, names, patterns in (
        ("deny-commands", commands, profile.deny_commands),
        ("deny-events", events, profile.deny_events),
    ):
        for pattern in patterns.names():
            if pattern not in _BUILTIN_DENIALS and not any(fnmatchcase(n, pattern) for n in names):
                out.append(
                    f"  warning: {key} {pattern!r} matches nothing this QEMU has, so it "
                    "denies nothing (a typo?)"
                )
    return out


def vm_config_file(path: str) -> VmFile:
    """A host-mode VM file, checked as host mode checks it (ConfigError otherwise)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    file = decode_file(data, path, VmFile)
    vm_config(file, path)
    return file


def _check_host(path: str, file: FileConfig) -> int:
    """A host config, and every VM file of its vm-dir, as host mode would take them: one
    line per VM (valid, or why host mode refuses it)."""
    key = vm_key_in(file)
    if key is not None:
        print(f"qmpmux: error: {path}: {key}: a VM's key; with vm-dir, each VM's file in "
              "that directory gives its own", file=sys.stderr)  # fmt: skip
        return 2
    assert file.vm_dir is not None
    try:
        found, skipped = read_vm_dir(file.vm_dir)
    except OSError as exc:
        print(f"qmpmux: error: vm-dir {file.vm_dir}: {exc.strerror}", file=sys.stderr)
        return 2
    print(f"{path}: valid; vm-dir {file.vm_dir}: {len(found)} VM file(s)")
    for name, why in sorted(skipped.items()):
        print(f"  {name}: skipped: {why}")
    configs: dict[str, Config] = {}
    problems: dict[str, str] = {}
    for name in sorted(found):
        vm_path = os.path.join(file.vm_dir, name + SUFFIX)
        try:
            configs[name] = vm_config(decode_file(found[name], vm_path, VmFile), vm_path)
        except ConfigError as exc:
            problems[name] = str(exc)
    for address, names in sorted(contested(configs).items()):
        for name in names:
            problems.setdefault(name, f"{address} is {clash(name, names)}")
    for name in sorted(found):
        if name in problems:
            print(f"  {name}: refused: {problems[name]}")
        else:
            config = configs[name]
            print(f"  {name}: valid ({len(config.listeners)} listener(s), "
                  f"{len(config.policy.profiles)} profile(s))")  # fmt: skip
    bad = len(problems)
    return 2 if bad else 0


def check_config(argv: Sequence[str]) -> int:
    try:
        own, qemu = split_spawn(argv)
    except ConfigError as exc:
        print(f"qmpmux: error: {exc}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(
        prog="qmpmux check-config",
        description="Validate a qmpmux config file exactly as `qmpmux --config FILE` would\n"
        "and print its effective policy: listeners, rules, what each profile allows.\n"
        "Given a QEMU, patterns are resolved against its real commands and events, and\n"
        "a deny pattern that matches nothing there is reported (a typo denies nothing).",
        epilog="examples:\n"
        "  qmpmux check-config /etc/qmpmux/vm1.toml\n"
        "  qmpmux check-config /etc/qmpmux/vm1.toml --upstream unix:/run/qemu/vm1.qmp\n"
        "  qmpmux check-config vm1.toml --spawn -- qemu-system-x86_64 -machine q35\n"
        "  qmpmux check-config /etc/qmpmux/host.toml   (host mode: every VM file too)\n"
        "  qmpmux check-config --vm /etc/qmpmux/vm.d/web1.toml\n"
        "exit status: 0 valid, 2 invalid (one line naming the key), 1 QEMU unreachable.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("file", metavar="FILE")
    parser.add_argument(
        "--upstream", metavar="ADDR", help="resolve against this running QEMU's monitor"
    )
    parser.add_argument(
        "--vm",
        action="store_true",
        help="FILE is one VM's file of a host-mode vm-dir (no process-wide keys); a host "
        "config (with vm-dir) is recognised by itself, and every VM file of its vm-dir "
        "is checked",
    )
    parser.add_argument(
        "--spawn",
        action="store_true",
        help="start a QEMU just for this, with a private monitor: everything after "
        "--spawn [--] is its command line; it is stopped afterwards",
    )
    args = parser.parse_args(own)
    notes: list[str] = []
    try:
        if args.vm:
            file: VmFile = vm_config_file(args.file)
        else:
            file = read_file(args.file)
            if isinstance(file, FileConfig) and file.vm_dir is not None:
                return _check_host(args.file, file)
        policy = policy_of(file, args.file)
        listeners = listeners_of(file, args.file)
        if listeners or not policy.rules:
            check_references(policy, listeners, args.file)
        else:  # listeners will come from the command line: rules can only be checked then
            notes.append("rules' listeners not checked: the file defines no listeners")
        upstream = parse_address(args.upstream) if args.upstream else None
    except ConfigError as exc:
        print(f"qmpmux: error: {exc}", file=sys.stderr)
        return 2
    resolved = None
    if upstream is not None or qemu:
        try:
            resolved = query_qemu(upstream, qemu)
        except (OSError, ConnectionError, subprocess.SubprocessError) as exc:
            print(f"qmpmux: error: cannot ask QEMU: {exc}", file=sys.stderr)
            return 1
    print(f"{args.file}: valid")
    for note in notes:
        print(f"note: {note}")
    print(render(policy, resolved))
    return 0
