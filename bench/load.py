"""Background load for the event-loop blocking measurement, in its own process.

The load runs in a separate process so that it competes with the probing client only
where a real second user would: in qmpmux and QEMU, not in the bench's interpreter.

    python -m bench.load schema SOCKET DEPTH   stream query-qmp-schema, DEPTH in flight
    python -m bench.load fanout SOCKET CLIENTS CLIENTS idle clients, stop/cont in a loop

It prints `ready` once the load is flowing and, on SIGTERM, one summary line.
"""

from __future__ import annotations

import resource
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from bench.harness import Client, Swarm

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


def schema(path: Path, depth: int) -> str:
    client = Client(path, timeout=60).negotiate()
    client.send(SCHEMA * depth)
    client.reply()
    replies = 1
    _ready()
    while not _stopping:
        client.send(SCHEMA)
        client.reply()
        replies += 1
    client.close()  # reads the replies still in flight
    return f"{replies} schema replies"


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


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the bench ends us
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    kind, path, arg = argv[0], Path(argv[1]), int(argv[2])
    summary = schema(path, arg) if kind == "schema" else fanout(path, arg)
    print(summary, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
