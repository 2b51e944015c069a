"""The `readonly` profile serves monitoring agents, against a real QEMU: every read it
allows answers as QEMU does, and block filenames carrying credentials reach it scrubbed
(README "Policy", docs/protocol.md §10.1 and §10.3)."""

from __future__ import annotations

import asyncio
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from qmpmux.introspect import replace_return
from qmpmux.policy import READONLY, READONLY_COMMANDS, WHOAMI
from qmpmux.qjson import JsonValue
from qmpmux.scrub import SCRUBBED, scrub_return
from qmpmux.views import OFF_LOOP_VIEW_BYTES
from tests.conftest import Mux, start_mux
from tests.realqemu import Qemu, RawClient, start_qemu

REFUSED = b"refused by qmpmux policy"
SECRET = "hunter2"
IMAGE = bytes(65536)

# Values for required arguments where a generic one would not reach QEMU's code.
ARGUMENTS: dict[tuple[str, str], JsonValue] = {
    ("qom-get", "path"): "/machine",
    ("qom-get", "property"): "type",
    ("qom-list", "path"): "/machine",
    ("query-stats", "target"): "vm",
    ("trace-event-get-state", "name"): "*",
}


def _example(
    command: str, member: str, type_name: str, by_name: dict[str, dict[str, JsonValue]]
) -> JsonValue:
    """A value of a schema type for a required member (schema-driven, no QEMU version's
    command set baked in)."""
    if (command, member) in ARGUMENTS:
        return ARGUMENTS[(command, member)]
    info = by_name[type_name]
    meta = info["meta-type"]
    if meta == "enum":
        values = info["values"]
        assert isinstance(values, list)
        return values[0]
    if meta == "array":
        return []
    if meta == "object":
        return _arguments(command, type_name, by_name)
    json_type = info.get("json-type")
    scalars: dict[str, JsonValue] = {"string": "none", "int": 0, "number": 0, "boolean": False}
    return scalars.get(str(json_type), {})


def _arguments(
    command: str, type_name: str, by_name: dict[str, dict[str, JsonValue]]
) -> dict[str, JsonValue]:
    members = by_name[type_name].get("members") or []
    assert isinstance(members, list)
    out: dict[str, JsonValue] = {}
    for m in members:
        assert isinstance(m, dict)
        if "default" in m:
            continue  # optional (qapi/introspect.json SchemaInfoObjectMember)
        name, kind = m["name"], m["type"]
        assert isinstance(name, str) and isinstance(kind, str)
        out[name] = _example(command, name, kind, by_name)
    return out


class _Image(http.server.BaseHTTPRequestHandler):
    """A read-only disk image over HTTP with byte ranges, as block/curl.c needs."""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(IMAGE)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()

    def do_GET(self) -> None:
        start, end = 0, len(IMAGE) - 1
        if (wanted := self.headers.get("Range")) is not None:
            first, _, last = wanted.partition("=")[2].partition("-")
            start, end = int(first), int(last)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(IMAGE)}")
        else:
            self.send_response(200)
        body = IMAGE[start : end + 1]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def image_url() -> Iterator[str]:
    """`http://alice:hunter2@127.0.0.1:PORT/disk.img`, served on loopback."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Image)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://alice:{SECRET}@127.0.0.1:{server.server_address[1]}/disk.img"
    finally:
        server.shutdown()
        thread.join(10)


async def test_every_readonly_query_answers_as_qemu_does(qemu: Qemu, tmp_path: Path) -> None:
    mux = await start_mux(qemu, tmp_path, profiles=("full", READONLY))
    try:
        direct = await RawClient.connect(mux.direct)
        await direct.negotiate()
        ro = await RawClient.connect(mux.sockets[READONLY])
        await ro.negotiate()
        schema = msgspec.json.decode(await direct.command(b'{"execute":"query-qmp-schema"}'))
        by_name = {e["name"]: e for e in schema["return"]}
        commands = [
            e for e in schema["return"] if e["meta-type"] == "command" and e["name"] != WHOAMI
        ]
        allowed = [e for e in commands if e["name"] in READONLY_COMMANDS]
        # Every monitoring read the issue names is in this QEMU and in the list.
        for name in ("query-block", "query-named-block-nodes", "query-chardev", "query-vnc",
                     "query-cpu-definitions", "query-stats", "query-spice"):  # fmt: skip
            assert name in {e["name"] for e in allowed}, name
        for entry in allowed:
            name = entry["name"]
            args = _arguments(name, entry["arg-type"], by_name)
            line = msgspec.json.encode({"execute": name, "arguments": args, "id": name})
            theirs = msgspec.json.decode(await direct.command(line))
            ours_raw = await ro.command(line)
            assert REFUSED not in ours_raw, (name, ours_raw)
            ours = msgspec.json.decode(ours_raw)
            assert ours["id"] == name
            assert ("return" in ours) == ("return" in theirs), (name, ours, theirs)
            if "return" in ours:
                assert type(ours["return"]) is type(theirs["return"]), name
            else:
                assert ours["error"]["class"] == theirs["error"]["class"], name
        status = msgspec.json.decode(await direct.command(b'{"execute":"query-status"}'))
        assert "status" in status["return"]  # QEMU is still alive and answering
        assert mux.qemu.proc.poll() is None
        await ro.close()
        await direct.close()
    finally:
        mux.proxy.stop("test over")
        await asyncio.wait_for(mux.proxy.wait(), 10)


async def _full_readonly_direct(mux: Mux) -> tuple[RawClient, RawClient, RawClient]:
    """Negotiated clients of the full and readonly listeners and of the direct monitor."""
    clients = []
    for path in (mux.sockets["full"], mux.sockets[READONLY], mux.direct):
        client = await RawClient.connect(path)
        await client.negotiate()
        clients.append(client)
    full, ro, direct = clients
    return full, ro, direct


async def test_block_credentials_are_scrubbed_for_readonly_and_intact_for_full(
    tmp_path: Path, image_url: str
) -> None:
    # A drive given at startup (query-block) and a node a full client adds (blockdev-add).
    vm = start_qemu(
        tmp_path,
        extra=[
            "-drive",
            f"if=none,id=web,format=raw,readonly=on,offset=512,"
            f"file.driver=http,file.url={image_url}",
        ],
    )
    try:
        mux = await start_mux(vm, tmp_path, profiles=("full", READONLY))
        try:
            full, ro, direct = await _full_readonly_direct(mux)
            add = msgspec.json.encode(
                {
                    "execute": "blockdev-add",
                    "arguments": {"driver": "http", "node-name": "web2", "read-only": True,
                                  "url": image_url},
                }
            )  # fmt: skip
            assert await full.command(add) == b'{"return": {}}\r\n'
            # A node whose `json:` filename holds nothing secret (raw with an offset).
            plain = (
                b'{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"plain",'
                b'"offset":512,"file":{"driver":"null-co","size":65536}}}'
            )
            assert await full.command(plain) == b'{"return": {}}\r\n'
            assert REFUSED in await ro.command(add)  # readonly reads, never adds
            for name in sorted(SCRUBBED):
                line = b'{"execute":"' + name.encode() + b'"}'
                qemus = await direct.command(line)
                assert await full.command(line) == qemus  # full: QEMU's bytes exactly
                scrubbed = await ro.command(line)
                assert SECRET not in scrubbed.decode(), (name, scrubbed)
                assert b"alice" not in scrubbed
                if SECRET in qemus.decode():
                    assert b"<redacted>" in scrubbed
                    # Only the credentials go: every host, path and other member stays.
                    assert b"127.0.0.1" in scrubbed and b"disk.img" in scrubbed
                    mine = msgspec.json.decode(scrubbed)["return"]
                    theirs = msgspec.json.decode(qemus)["return"]
                    assert len(mine) == len(theirs)
            block = msgspec.json.decode(await ro.command(b'{"execute":"query-block"}'))
            inserted = block["return"][0]["inserted"]
            assert inserted["file"].startswith("json:{")  # still a json: filename
            nodes = msgspec.json.decode(await ro.command(b'{"execute":"query-named-block-nodes"}'))[
                "return"
            ]
            web2 = next(n for n in nodes if n["node-name"] == "web2")
            assert web2["file"] == image_url.replace(f"alice:{SECRET}", "<redacted>")
            assert web2["drv"] == "http" and web2["ro"] is True
            theirs = msgspec.json.decode(
                await direct.command(b'{"execute":"query-named-block-nodes"}')
            )["return"]
            untouched = next(n for n in nodes if n["node-name"] == "plain")
            assert untouched["file"].startswith("json:{")
            assert untouched == next(n for n in theirs if n["node-name"] == "plain")
            for c in (full, ro, direct):
                await c.close()
        finally:
            mux.proxy.stop("test over")
            await asyncio.wait_for(mux.proxy.wait(), 10)
    finally:
        vm.stop()


async def test_a_long_block_reply_is_scrubbed_off_the_loop_exactly_as_a_short_one(
    tmp_path: Path, image_url: str
) -> None:
    """A reply long enough to be viewed on the worker thread (views.py) is the same scrub
    of QEMU's reply as inline, and another client is answered meanwhile."""
    vm = start_qemu(tmp_path)
    try:
        mux = await start_mux(vm, tmp_path, profiles=("full", READONLY))
        try:
            full, ro, direct = await _full_readonly_direct(mux)
            add = {"driver": "http", "node-name": "web", "read-only": True, "url": image_url}
            line = msgspec.json.encode({"execute": "blockdev-add", "arguments": add})
            assert await full.command(line) == b'{"return": {}}\r\n'
            query = b'{"execute":"query-named-block-nodes"}'
            n = 0
            while len(qemus := await direct.command(query)) < 2 * OFF_LOOP_VIEW_BYTES:
                n += 1
                node = b'{"driver":"null-co","node-name":"n%d","size":512}' % n
                assert await full.command(b'{"execute":"blockdev-add","arguments":%s}' % node) == (
                    b'{"return": {}}\r\n'
                )
            await ro.send(query)
            status = await full.command(b'{"execute":"query-status"}')
            assert b'"status"' in status  # served while the scrub may still run
            scrubbed = await ro.read()
            assert scrubbed == replace_return(qemus, scrub_return)
            assert SECRET.encode() not in scrubbed and b"<redacted>" in scrubbed
            for c in (full, ro, direct):
                await c.close()
        finally:
            mux.proxy.stop("test over")
            await asyncio.wait_for(mux.proxy.wait(), 10)
    finally:
        vm.stop()
