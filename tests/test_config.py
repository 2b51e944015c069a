"""The config file: typed, strict, errors that name the key, flags that override it."""

from __future__ import annotations

from pathlib import Path

import pytest

from qmpmux.checkconfig import check_config
from qmpmux.cli import parse_args, parse_command_line, reload_policy
from qmpmux.config import ConfigError, HostConfig, read_file
from qmpmux.policy import Decision
from tests.realqemu import BASE_ARGS, qemu_path

EXAMPLE = Path(__file__).resolve().parent.parent / "systemd" / "qmpmux.toml.example"


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "qmpmux.toml"
    path.write_text(text)
    return str(path)


def test_the_shipped_host_example_loads_and_means_what_it_says() -> None:
    config = parse_command_line(["--config", str(EXAMPLE.with_name("qmpmux-host.toml.example"))])
    assert isinstance(config, HostConfig)
    assert config.vm_dir == "/etc/qmpmux/vm.d" and config.metrics is None


def test_the_shipped_example_loads_and_means_what_it_says() -> None:
    config = parse_args(["--config", str(EXAMPLE)])
    assert [str(lst.address) for lst in config.listeners] == [
        "unix:/run/qmpmux/vm1.sock",
        "unix:/run/qmpmux/vm1-monitoring.sock",
    ]
    assert config.listeners[1].profile == "readonly" and config.listeners[1].mode == 0o660
    assert config.listeners[1].max_clients == 64 and config.listeners[0].max_clients is None
    assert config.listener_message_bytes() == {"unix:/run/qmpmux/vm1-monitoring.sock": 65536}
    assert config.limits.reserve_clients == 16 and config.limits.negotiation_timeout == 30
    assert config.audit == "/var/log/qmpmux/vm1-audit.jsonl"
    assert config.reconnect is True
    backup = config.policy.profiles["backup-agent"]
    assert backup.command("blockdev-backup") is Decision.ALLOW
    assert backup.command("block-job-set-speed") is Decision.DENY
    assert backup.command("query-status") is Decision.ALLOW  # from its base
    assert config.policy.profiles["learning"].command("stop") is Decision.AUDIT
    assert config.policy.assign("unix:/x", "readonly", 0, 0, "virsh").name == "full"


LISTEN = (
    'upstream = "unix:/q"\n[[listen]]\naddress = "unix:/run/a.sock"\n'
    '[[listen]]\naddress = "tcp:127.0.0.1:4444"\n'
)
BAD = [
    ('upstream = "unix:/q"\nlisten = [{address = "unix:/s"}]\nlog-levl = "info"\n',
     "log-levl: unknown key"),
    ('upstream = "unix:/q"\n[[listen]]\naddress = "unix:/s"\nprofle = "full"\n',
     "listen[0].profle: unknown key"),
    ('upstream = "unix:/q"\n[limits]\nmax-pending = "many"\n',
     "limits.max-pending: expected `int`, got `str`"),
    ('[profiles.mon]\ncomands = ["query-*"]\n', "profiles.mon.comands: unknown key"),
    ('[profiles.mon]\ncommands = "query-status"\n', "profiles.mon.commands: expected `array`"),
    ('[profiles.mon]\ncommands = ["query status"]\n', "profiles.mon.commands[0]"),
    ('[profiles.mon]\nbase = "redonly"\n', "profiles.mon.base: unknown profile 'redonly'"),
    ('[profiles.readonly]\ncommands = ["stop"]\n', "profiles.readonly: built-in"),
    ('[[rules]]\nuid = 1000\nprofile = "monitoring"\n', "rules[0].profile: unknown profile"),
    ('[[rules]]\nuid = "root"\nprofile = "full"\n', "rules[0].uid: expected `int | null`"),
    ('upstream = "unix:/q"\n[[listen]]\naddress = "unix:/s"\nprofile = "nope"\n',
     "unknown profile 'nope'"),
    ('upstream = "nowhere"\n[[listen]]\naddress = "unix:/s"\n', "bad address 'nowhere'"),
    # Every reference must resolve: a rule that can never match fails open.
    (LISTEN + '[[rules]]\nuid = 1000\nlistener = "/run/a.sock"\nprofile = "readonly"\n',
     "rules[0].listener: no listener '/run/a.sock' (listeners: unix:/run/a.sock, "
     "tcp:127.0.0.1:4444)"),
    (LISTEN + '[[rules]]\nuid = 1\nprofile = "full"\n[[rules]]\ngid = 1\nprofile = "full"\n'
     'listener = "tcp:127.0.0.1:4444"\n', "rules[1].listener: tcp:127.0.0.1:4444 is a TCP"),
    ('upstream = "unix:/q"\n[[listen]]\naddress = "tcp:127.0.0.1:1"\n[[rules]]\nuid = 1\n'
     'profile = "readonly"\n', "rules[0]: no unix listener"),
    (LISTEN + '[[rules]]\nuid = -1\nprofile = "readonly"\n', "rules[0].uid: -1 can never"),
    (LISTEN + '[[rules]]\nexe = "/usr/bin/virsh"\nprofile = "readonly"\n', "rules[0].exe"),
    (LISTEN + '[[listen]]\naddress = "unix:/s"\nprofile = "nope"\n',
     "listen[2].profile: unknown profile 'nope' (profiles: full, readonly, vm-control)"),
    ("this is = not toml =", "qmpmux.toml"),
    ('upstream = "unix:/q"\n[[listen]]\naddress = "unix:/s"\nmax-clients = 0\n',
     "listen[0].max-clients: expected at least 1"),
    ('upstream = "unix:/q"\n[[listen]]\naddress = "unix:/s"\nmax-message-bytes = 63\n',
     "listen[0].max-message-bytes: expected at least 64"),
    ('upstream = "unix:/q"\n[limits]\nmax-message-bytes = 4096\n'
     '[[listen]]\naddress = "unix:/s"\nmax-message-bytes = 8192\n',
     "listen[0]: max-message-bytes 8192 is over limits.max-message-bytes (4096)"),
    ('upstream = "unix:/q"\nlisten = [{address = "unix:/s"}]\n[limits]\nnegotiation-timeout = 0\n',
     "limits.negotiation-timeout"),
    ('upstream = "unix:/q"\nlisten = [{address = "unix:/s"}]\n[limits]\noutbox-bytes = 4194304\n',
     "limits.outbox-bytes"),
    # What the system's calls would cut at a NUL, or never resolve, is refused here, with
    # its key, rather than raised at the first use (in host mode, inside one VM).
    ('upstream = "unix:/q"\n[[listen]]\naddress = "unix:/s\\u0000x"\n',
     "listen[0].address: bad address 'unix:/s\\x00x': 'unix:/s\\x00x' holds a NUL"),
    ('upstream = "tcp:a..b:1"\n[[listen]]\naddress = "unix:/s"\n',
     "upstream: bad address 'tcp:a..b:1': 'a..b' is not a host name"),
    ('upstream = "unix:/q"\n[[listen]]\naddress = "unix:/s"\nowner = "a\\u0000b"\n',
     "listen[0].owner: no user 'a\\x00b'"),
    ('spawn = ["qemu\\u0000x"]\n[[listen]]\naddress = "unix:/s"\n', "spawn[0]: 'qemu\\x00x' holds"),
    (LISTEN + '[audit]\nfile = "/a\\u0000b"\n', "audit.file: '/a\\x00b' holds a NUL"),
    ('vm-dir = "/a\\u0000b"\n', "vm-dir: '/a\\x00b' holds a NUL"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "message"), BAD, ids=range(len(BAD)))
def test_a_bad_file_is_refused_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_args(["--config", write(tmp_path, text)])
    assert message in str(err.value)
    assert str(tmp_path) in str(err.value) or "nope" in str(err.value)


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'upstream = "unix:/file-qemu"\nlog-level = "debug"\n'
        '[[listen]]\naddress = "unix:/file.sock"\nprofile = "readonly"\n'
        "[limits]\nmax-pending = 7\nmax-clients = 9\n",
    )
    config = parse_args(
        ["--config", path, "--listen", "unix:/cli.sock", "--max-clients", "3",
         "--log-level", "warning"]
    )  # fmt: skip
    assert [str(lst.address) for lst in config.listeners] == ["unix:/cli.sock"]
    assert config.listeners[0].profile == "full"
    assert str(config.upstream) == "unix:/file-qemu"
    assert config.limits.max_clients == 3 and config.limits.max_pending == 7
    assert config.log_level == "warning"
    spawned = parse_args(["--config", path, "--spawn", "--", "qemu-system-x86_64"])
    assert spawned.upstream is None and spawned.spawn == ("qemu-system-x86_64",)


def test_missing_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        read_file(str(tmp_path / "absent.toml"))


def test_reload_refuses_a_policy_that_drops_a_listeners_profile(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'upstream = "unix:/q"\n[[listen]]\naddress = "unix:/s"\nprofile = "mon"\n'
        '[profiles.mon]\nbase = "readonly"\n',
    )
    config = parse_args(["--config", path])
    Path(path).write_text('upstream = "unix:/q"\n[[listen]]\naddress = "unix:/s"\n')
    with pytest.raises(ConfigError, match=r"listen\[0\].profile: unknown profile 'mon'"):
        reload_policy(config)


def test_listener_max_clients_and_negotiation_timeout_flags() -> None:
    config = parse_args(
        ["--upstream", "unix:/q", "--listen", "unix:/a,profile=readonly,max-clients=5",
         "--listen", "unix:/b", "--negotiation-timeout", "2.5"]
    )  # fmt: skip
    assert [lst.max_clients for lst in config.listeners] == [5, None]
    assert config.listener_caps() == {"unix:/a": 5, "unix:/b": None}
    assert config.limits.negotiation_timeout == 2.5
    for bad in ("max-clients=0", "max-clients=x", "max-clients=-1"):
        with pytest.raises(ConfigError, match="bad max-clients"):
            parse_args(["--upstream", "unix:/q", "--listen", f"unix:/a,{bad}"])


def test_a_listener_may_lower_max_message_bytes(tmp_path: Path) -> None:
    config = parse_args(
        ["--upstream", "unix:/q", "--listen", "unix:/a,profile=readonly,max-message-bytes=65536",
         "--listen", "unix:/b"]
    )  # fmt: skip
    assert config.listener_message_bytes() == {"unix:/a": 65536}
    path = write(
        tmp_path,
        'upstream = "unix:/q"\n[[listen]]\naddress = "unix:/s"\nmax-message-bytes = 4096\n',
    )
    assert parse_args(["--config", path]).listener_message_bytes() == {"unix:/s": 4096}
    for bad in ("max-message-bytes=63", "max-message-bytes=x"):
        with pytest.raises(ConfigError, match="bad max-message-bytes"):
            parse_args(["--upstream", "unix:/q", "--listen", f"unix:/a,{bad}"])
    with pytest.raises(ConfigError, match="a listener's may only be lower"):
        parse_args(["--upstream", "unix:/q", "--max-message-bytes", "1024",
                    "--listen", "unix:/a,max-message-bytes=2048"])  # fmt: skip


def test_reload_checks_rules_against_the_running_listeners(tmp_path: Path) -> None:
    """Listeners given on the command line are the ones a reloaded rule must name."""
    path = write(tmp_path, 'upstream = "unix:/q"\n')
    config = parse_args(["--config", path, "--listen", "unix:/run/cli.sock"])
    rule = '[[rules]]\nuid = 1000\nprofile = "readonly"\nlistener = "%s"\n'
    Path(path).write_text('upstream = "unix:/q"\n' + rule % "unix:/run/cli.sock")
    assert reload_policy(config).rules[0].listener == "unix:/run/cli.sock"
    Path(path).write_text('upstream = "unix:/q"\n' + rule % "unix:/run/cli")
    with pytest.raises(ConfigError, match=r"rules\[0\].listener: no listener 'unix:/run/cli' "
                       r"\(listeners: unix:/run/cli.sock\)"):  # fmt: skip
        reload_policy(config)


def test_a_command_line_listener_with_an_unknown_profile_names_the_flag() -> None:
    with pytest.raises(ConfigError, match="--listen unix:/s,profile=nope: unknown profile"):
        parse_args(["--upstream", "unix:/q", "--listen", "unix:/s,profile=nope"])


def test_check_config_says_what_an_escape_hatch_implies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        'upstream = "unix:/q"\n[[listen]]\naddress = "unix:/s"\n'
        '[profiles.star]\ncommands = ["*"]\ndeny-commands = ["stop"]\n'
        '[profiles.named]\ncommands = ["*", "human-monitor-command"]\n'
        'deny-commands = ["stop"]\n'
        '[profiles.from-full]\nbase = "full"\ndeny-commands = ["stop"]\n',
    )
    assert check_config([path]) == 0
    out = capsys.readouterr().out
    sections = dict((chunk.split(":", 1)[0], chunk) for chunk in out.split("\nprofile ")[1:])
    implied = "escape hatches granted: this profile can in effect run every command"
    for name in ("named", "from-full", "full"):
        assert (
            implied in sections[name] and "human-monitor-command: runs any HMP" in sections[name]
        ), name
    for name in ("star", "readonly", "vm-control"):
        assert "escape hatches" not in sections[name], name
    assert "migrate (uri): an exec: URI" in sections["full"]


def test_check_config_refuses_a_rule_naming_no_listener(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        '[[listen]]\naddress = "unix:/s"\n[[rules]]\nuid = 0\nlistener = "unix:/t"\n'
        'profile = "readonly"\n',
    )
    assert check_config([path]) == 2
    assert "rules[0].listener: no listener 'unix:/t' (listeners: unix:/s)" in (
        capsys.readouterr().err
    )


def test_check_config_warns_of_a_denial_that_matches_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A misspelt deny pattern denies nothing: against a real QEMU, check-config says so."""
    path = write(
        tmp_path,
        '[profiles.ops]\ncommands = ["*"]\ndeny-commands = ["sotp", "quit", "migrate*"]\n'
        'events = ["*"]\ndeny-events = ["SHUTDOWN", "RESUMED"]\n'
        '[profiles.mon]\nbase = "readonly"\ndeny-commands = ["__org.qmpmux_whoami"]\n',
    )
    assert check_config([path, "--spawn", "--", qemu_path(), *BASE_ARGS]) == 0
    warnings = [line.strip() for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert warnings == [
        "warning: deny-commands 'sotp' matches nothing this QEMU has, so it denies nothing "
        "(a typo?)",
        "warning: deny-events 'RESUMED' matches nothing this QEMU has, so it denies nothing "
        "(a typo?)",
    ]


def test_metrics_address_from_flag_or_file(tmp_path: Path) -> None:
    base = ["--listen", "unix:/tmp/x", "--upstream", "unix:/x"]
    assert parse_args(base).metrics is None
    config = parse_args([*base, "--metrics", "tcp:0.0.0.0:9707", "--allow-remote"])
    assert str(config.metrics) == "tcp:0.0.0.0:9707"  # off loopback only when allowed
    path = write(tmp_path, 'metrics = "unix:/run/qmpmux/metrics.sock"\n')
    assert str(parse_args([*base, "--config", path]).metrics) == "unix:/run/qmpmux/metrics.sock"
    bad = write(tmp_path, 'metrics = "somewhere"\n')
    with pytest.raises(ConfigError, match="metrics: bad address 'somewhere'"):
        parse_args([*base, "--config", bad])
    with pytest.raises(ConfigError, match="also a --listen address"):
        parse_args([*base, "--metrics", "unix:/tmp/x"])


def test_reconnect_comes_from_the_file_or_the_flag_and_never_with_spawn(tmp_path: Path) -> None:
    conf = write(tmp_path, 'upstream = "unix:/q.sock"\nreconnect = true\n[[listen]]\n'
                 'address = "unix:/tmp/x.sock"\n')  # fmt: skip
    assert parse_args(["--config", conf]).reconnect is True
    plain = ["--upstream", "unix:/q.sock", "--listen", "unix:/tmp/x.sock"]
    assert parse_args(plain).reconnect is False
    assert parse_args([*plain, "--reconnect"]).reconnect is True
    with pytest.raises(ConfigError, match="--reconnect needs --upstream"):
        parse_args(["--listen", "unix:/tmp/x.sock", "--reconnect", "--spawn", "--", "qemu"])
