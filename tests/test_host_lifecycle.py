"""Host mode's VMs through their lives against real QEMUs: files renamed, removed and
changed while their VMs start, stop or fail, and signals meanwhile (README "Host mode")."""

from __future__ import annotations

import signal

from tests.test_cli import Running
from tests.test_host_qemu import Vms, client, name_of, named, stop_host, vms

__all__ = ["vms"]  # the fixture, used by name


async def expect_all(host: Running, *texts: str) -> None:
    """Log lines containing each of `texts`, in any order."""
    left = set(texts)
    while left:
        try:
            line = await host.expect("")
        except TimeoutError:
            raise AssertionError(f"not logged: {left}; log: {''.join(host.log)}") from None
        left -= {text for text in left if text in line}


async def test_a_nul_in_a_path_refuses_the_vm_file_and_a_fixed_file_starts(vms: Vms) -> None:
    # A path with a NUL cannot name a file (the system call would see a shorter one):
    # refused with its key, as any other bad value, and never an exception in a VM.
    vms.qemu("a")
    monitor = vms.qemus["a"].monitors[0]
    vms.write_text(
        "a",
        f'upstream = "unix:{monitor}"\n[[listen]]\naddress = "unix:{vms.listener("a")}\\u0000x"\n',
    )
    vms.write_text(  # a user name: resolved as the file is read, by the host itself
        "b",
        f'upstream = "unix:{vms.root / "q"}"\n'
        f'[[listen]]\naddress = "unix:{vms.listener("b")}"\nowner = "a\\u0000b"\n',
    )
    host = await Running.launch("--vm-dir", str(vms.dir))
    assert "a.toml: listen[0].address: " in await host.expect("vm a: refused: ")
    assert "b.toml: listen[0].owner: " in await host.expect("vm b: refused: ")
    await host.expect("0 of 2 VM(s) up")
    vms.write("a")  # fixed: its file changing starts it
    host.proc.send_signal(signal.SIGHUP)
    await host.expect(f"vm a: listening on unix:{vms.listener('a')}")
    assert await name_of(await client(vms, "a")) == named("a")
    await stop_host(host)


async def test_a_qemu_address_that_does_not_resolve_fails_its_vm_or_is_retried(
    vms: Vms,
) -> None:
    # A name that does not resolve is one more way of QEMU not being there: a VM without
    # reconnect fails, one with it listens and keeps trying (README "Host mode").
    for name, port, extra in (("once", 4444, ""), ("again", 4445, "reconnect = true\n")):
        vms.write_text(
            name,
            f'upstream = "tcp:qmpmux-test.invalid:{port}"\nconnect-timeout = 0.1\n{extra}'
            f'[[listen]]\naddress = "unix:{vms.listener(name)}"\n',
        )
    host = await Running.launch("--vm-dir", str(vms.dir))
    await expect_all(
        host,
        "vm once: cannot start: cannot connect to QEMU at tcp:qmpmux-test.invalid:4444: ",
        "vm again: QEMU not reached (cannot connect to QEMU at tcp:qmpmux-test.invalid",
    )
    await host.expect("1 of 2 VM(s) up")
    assert not vms.listener("once").exists()
    assert vms.listener("again").exists()
    await stop_host(host)
