"""Files qmpmux creates: the audit log and unix listener sockets, against planted links."""

from __future__ import annotations

import logging
import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from qmpmux.config import Address, Listener
from qmpmux.server import StartupError, open_audit, open_listener
from tests.test_cli import one_line_error, run


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# --- the audit log ---------------------------------------------------------------------------


def test_audit_log_is_created_private_and_appended(tmp_path: Path) -> None:
    target = tmp_path / "audit.log"
    target.write_bytes(b"old\n")
    target.chmod(0o600)
    write = open_audit(str(target))
    write(b"new\n")
    assert target.read_bytes() == b"old\nnew\n" and _mode(target) == 0o600
    fresh = tmp_path / "fresh.log"
    open_audit(str(fresh))(b"x\n")
    assert _mode(fresh) == 0o600


@pytest.mark.parametrize("dangling", [False, True])
def test_audit_log_symlink_is_refused(tmp_path: Path, dangling: bool) -> None:
    victim = tmp_path / "victim"
    if not dangling:
        victim.write_bytes(b"")
        victim.chmod(0o644)
    link = tmp_path / "audit.log"
    link.symlink_to(victim)
    with pytest.raises(StartupError, match="symbolic link") as info:
        open_audit(str(link))
    assert "\n" not in str(info.value)
    assert victim.exists() is not dangling or victim.read_bytes() == b""
    if not dangling:
        assert _mode(victim) == 0o644  # untouched


def test_audit_log_too_open_is_narrowed_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    target = tmp_path / "audit.log"
    target.write_bytes(b"")
    target.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="qmpmux.server"):
        open_audit(str(target))(b"r\n")
    assert _mode(target) == 0o600
    assert "had mode 0644; set it to 0600" in caplog.text


def test_audit_log_must_be_a_regular_file(tmp_path: Path) -> None:
    with pytest.raises(StartupError, match="not a regular file"):
        open_audit("/dev/null")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so opening it cannot block
    try:
        with pytest.raises(StartupError, match="not a regular file"):
            open_audit(str(fifo))
    finally:
        os.close(reader)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another user")
def test_audit_log_of_another_user_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "audit.log"
    target.write_bytes(b"")
    target.chmod(0o600)
    os.chown(target, 65534, 65534)
    with pytest.raises(StartupError, match="owned by uid 65534"):
        open_audit(str(target))


async def test_symlinked_audit_log_stops_qmpmux_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "audit.log").symlink_to(tmp_path / "elsewhere")
    code, out = await run(
        "--listen", f"unix:{tmp_path}/m.sock", "--upstream", f"unix:{tmp_path}/none",
        "--audit", str(tmp_path / "audit.log"),
    )  # fmt: skip
    assert code == 1
    assert "symbolic link" in one_line_error(out)
    assert not (tmp_path / "elsewhere").exists()


# --- unix listeners --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o600, 0o660, 0o666])
def test_listener_socket_is_created_with_its_mode(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "l.sock"
    before = os.umask(0)  # a permissive umask must not widen it either
    try:
        sock = open_listener(Listener(Address("unix", path=str(path)), mode=mode))
        assert os.umask(0) == 0  # restored
    finally:
        os.umask(before)
    sock.close()
    assert stat.S_ISSOCK(os.lstat(path).st_mode) and _mode(path) == mode


def test_symlink_swapped_in_after_bind_is_never_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race of a chmod by path: bind, then someone replaces the name by a link."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"")
    victim.chmod(0o644)
    path = tmp_path / "l.sock"

    class Swapping(socket.socket):
        def bind(self, address: Any) -> None:
            super().bind(address)
            if self.family == socket.AF_UNIX:
                os.unlink(address)
                os.symlink(victim, address)

    monkeypatch.setattr(socket, "socket", Swapping)
    with pytest.raises(StartupError, match="replaced right after bind"):
        open_listener(Listener(Address("unix", path=str(path)), mode=0o660))
    assert _mode(victim) == 0o644
    assert os.path.islink(path)  # left alone, not followed nor removed


def test_stale_socket_swapped_during_the_check_is_not_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "l.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a socket file nobody serves
    other = tmp_path / "other.sock"
    replacement = socket.socket(socket.AF_UNIX)
    replacement.bind(str(other))  # while the stale one exists: a different inode
    ino = os.lstat(other).st_ino

    class Swapping(socket.socket):
        def connect(self, address: Any) -> None:
            os.replace(other, address)  # someone else replaces the file meanwhile
            raise ConnectionRefusedError

    monkeypatch.setattr(socket, "socket", Swapping)
    try:
        with pytest.raises(StartupError, match="replaced while qmpmux checked it"):
            open_listener(Listener(Address("unix", path=str(path))))
        assert os.lstat(path).st_ino == ino  # still there
    finally:
        replacement.close()
