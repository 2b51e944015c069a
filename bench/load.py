"""Background load for the event-loop blocking measurement, in its own process.

The load runs in a separate process so that it competes with the probing client only
where a real second user would: in qmpmux and QEMU, not in the bench's interpreter.

    python -m bench.load schema SOCKET DEPTH   stream query-qmp-schema, DEPTH in flight
    python -m bench.load fanout SOCKET CLIENTS CLIENTS idle clients, stop/cont in a loop
    python -m bench.load flood SOCKET DEPTH    stop/cont pipelined, DEPTH pairs in flight
    python -m bench.load hostile SOCKET SHAPE BYTES  send one of bench.hostile's shapes
    python -m bench.load poll SOCKET COMMAND        loop one command, one in flight
    python -m bench.load loop LIST OUT PAUSE   a client per socket named in file LIST, each
                                               looping query-status, PAUSE ms between a
                                               reply and the next; its samples go to OUT

It prints `ready` once the load is flowing and, on SIGTERM, one summary line.
"""

from __future__ import annotations

import collections
import contextlib
import json
import resource
import select
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from bench.harness import Client, Swarm
from bench.hostile import SHAPES

SCHEMA = b'{"execute":"query-qmp-schema","id":1}'
STOP = (b'{"execute":"stop"}', b"STOP")
CONT = (b'{"execute":"cont"}', b"RESUME")


_stopping = False


def _on_term(signum: int, frame: FrameType | None) -> None:
    global _stopping
    _stopping = True  # a blocked recv is retried (PEP 475): the loop stops at a safe point


def _ready() -> None:
    sys.stdout.write("ready\n")
    sys.stdout.flush()


def poll(path: Path, command: bytes, depth: int) -> str:
    """Keep `depth` of `command` in flight, a new one for each reply, until stopped."""
    client = Client(path, timeout=60).negotiate()
    client.send(command * depth)
    client.reply()
    replies = 1
    _ready()
    while not _stopping:
        client.send(command)
        client.reply()
        replies += 1
    client.close()  # reads the replies still in flight
    return f"{replies} replies"


def schema(path: Path, depth: int) -> str:
    return poll(path, SCHEMA, depth)


def fanout(path: Path, clients: int) -> str:
    swarm = Swarm(path)
    swarm.grow(clients)
    driver = Client(path, timeout=60).negotiate()
    rounds = lost = 0
    started = time.monotonic()
    _ready()
    while not _stopping:
        for command, event in (STOP, CONT):
            driver.send(command)
            _, missed = swarm.collect(event, timeout=10)
            lost += missed
            driver.event(event)
            driver.reply()
            rounds += 1
    swarm.close()
    driver.close()
    took = time.monotonic() - started
    return f"{rounds} events to {clients} clients in {took:.1f} s, {lost} lost"


def flood(path: Path, depth: int) -> str:
    """Keep `depth` stop/cont pairs in flight: each command QEMU runs emits an event
    (STOP, RESUME), so the event rate is about the command rate."""
    client = Client(path, timeout=60).negotiate()
    pair = STOP[0] + CONT[0]
    client.send(pair * depth)
    in_flight = 2 * depth
    events = replies = errors = 0
    first_error = b""
    _ready()
    started = time.monotonic()
    line = client.line
    while not _stopping:
        got = line()
        if got.startswith(b'{"timestamp"'):
            events += 1
            continue
        replies += 1
        in_flight -= 1
        if not got.startswith(b'{"return"'):
            errors += 1
            first_error = first_error or got[:200]
        if in_flight <= 2 * depth - 2:
            client.send(pair)  # the last command sent is always `cont`: the VM ends running
            in_flight += 2
    took = time.monotonic() - started
    while in_flight:
        if not line().startswith(b'{"timestamp"'):
            in_flight -= 1
    client.close()
    return json.dumps(
        {
            "events": events,
            "replies": replies,
            "seconds": took,
            "errors": errors,
            "first_error": first_error.decode(errors="replace"),
        }
    )


QUERY_STATUS = b'{"execute":"query-status","id":1}'


def hostile(path: Path, shape: str, size: int) -> str:
    """Send `size` bytes of one of bench.hostile's SHAPES once, as fast as they are read;
    write `sent` when the kernel has taken the last byte, then keep the connection (its
    replies unread) until stopped."""
    data = SHAPES[shape][1](size)
    client = Client(path, timeout=60).negotiate()
    client.sock.settimeout(0.2)  # so that a stop is seen while qmpmux reads slowly
    _ready()
    started = time.monotonic()
    view = memoryview(data)
    while view and not _stopping:
        with contextlib.suppress(TimeoutError):
            view = view[client.sock.send(view[: 1 << 16]) :]
    took = time.monotonic() - started
    if not view:
        print("sent", flush=True)
    while not _stopping:
        time.sleep(0.05)
    client.sock.close()  # without reading: it may owe megabytes of replies
    done = len(data) - len(view)
    return f"{done >> 10} KiB sent in {took:.1f} s" if view else f"sent in {took:.2f} s"


def loop(listing: Path, out: Path, pause: float) -> str:
    """A client per socket, each with at most one query-status in flight, `pause` seconds
    after its last reply (0: at once), on one epoll. Every reply's completion time
    (monotonic, comparable with the bench's) and round trip go to `out`; anything but a
    query-status reply, and any EOF, is counted as a fault."""
    clients = [Client(Path(p), timeout=60).negotiate() for p in listing.read_text().split()]
    ep = select.epoll()
    by_fd = {c.sock.fileno(): i for i, c in enumerate(clients)}
    sent = [0.0] * len(clients)
    tails = [b""] * len(clients)
    done_at: list[float] = []
    rtts: list[float] = []
    eofs = unexpected = 0
    first_unexpected = b""
    clock = time.monotonic
    start = clock()
    # (when, client): sends due, in time order (the pause is the same for every client);
    # the first ones spread over one pause so that the clients do not move in step.
    due = collections.deque((start + pause * i / len(clients), i) for i in range(len(clients)))
    for fd in by_fd:
        ep.register(fd, select.EPOLLIN)
    _ready()
    while not _stopping:
        now = clock()
        while due and due[0][0] <= now:
            _, i = due.popleft()
            sent[i] = now
            clients[i].sock.sendall(QUERY_STATUS)
        wait = min(0.5, max(0.0, due[0][0] - now)) if due else 0.5
        for fd, _ in ep.poll(wait):
            i = by_fd[fd]
            sock = clients[i].sock
            data = sock.recv(65536)
            now = clock()
            if not data:
                eofs += 1
                ep.unregister(fd)
                continue
            data = tails[i] + data
            cut = data.rfind(b"\n") + 1
            tails[i] = data[cut:]
            for reply in data[:cut].splitlines():
                if reply.startswith(b'{"return": {') and reply.endswith(b'"id": 1}'):
                    done_at.append(now)
                    rtts.append(now - sent[i])
                    if pause:
                        due.append((now + pause, i))
                    else:
                        sent[i] = now
                        sock.sendall(QUERY_STATUS)
                else:
                    unexpected += 1
                    first_unexpected = first_unexpected or reply[:200]
    ep.close()
    for c in clients:
        c.close()  # reads the reply still in flight
    out.write_text(json.dumps({"done_at": done_at, "rtts": rtts}))
    return json.dumps(
        {
            "clients": len(clients),
            "replies": len(rtts),
            "eofs": eofs,
            "unexpected": unexpected,
            "first_unexpected": first_unexpected.decode(errors="replace"),
        }
    )


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the bench ends us
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    kind, path = argv[0], Path(argv[1])
    if kind == "loop":
        summary = loop(path, Path(argv[2]), float(argv[3]) / 1e3)
    elif kind == "hostile":
        summary = hostile(path, argv[2], int(argv[3]))
    elif kind == "poll":
        summary = poll(path, argv[2].encode(), 1)
    else:
        run = {"schema": schema, "fanout": fanout, "flood": flood}[kind]
        summary = run(path, int(argv[2]))
    print(summary, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
