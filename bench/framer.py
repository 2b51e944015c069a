"""What one client's input costs the reader: time per feed() and memory, per hostile shape.

    python -m bench.framer [--size BYTES]

Each shape is fed to a Framer in 16 KiB reads, as the shell reads a client (server.py
CLIENT_READ_SIZE). It prints the longest feed() before the last one (the steady state),
the last one (where the message completes: decoding, unpacking), and the memory an
unfinished copy of the message holds (tracemalloc), as a multiple of its size. Then the
happy path: 100k single-message feeds of `query-status`. The numbers are for reading;
tests/test_qjson.py checks the same properties by counting, not timing.
"""

from __future__ import annotations

import argparse
import gc
import time
import timeit
import tracemalloc
from collections.abc import Callable

from qmpmux.qjson import Framer

READ_SIZE = 16384


def shapes(size: int) -> dict[str, bytes]:
    head = b'{"execute":"query-status","id":"'
    keys = b",".join(b'"k%d":1' % i for i in range(size // 11))
    return {
        "string of 0x80 bytes": head + b"\x80" * size + b'"}',
        "string of C0 80": head + b"\xc0\x80" * (size // 2) + b'"}',
        "string of \\u0000 escapes": head + b"\\u0000" * (size // 6) + b'"}',
        "ASCII string": head + b"a" * size + b'"}',
        "string of e-acute": head + "\u00e9".encode() * (size // 2) + b'"}',
        "0x80 bytes, then a stray": b'"' + b"\x80" * size + b"\x01",
        "lone surrogate escapes": head + b"\\ud800" * (size // 6) + b'"}',
        "[[[[ past the nesting limit": b"[" * size,
        '"[" + "{},"*N': b"[" + b"{}," * (size // 3) + b"{}]",
        "{}{}{} tiny messages": b"{}" * (size // 2),
        "long number": b"[" + b"1" * size + b"]",
        "long float": b"[1." + b"1" * size + b"]",
        "long keyword": b"[" + b"a" * size + b"]",
        "many keys": b"{" + keys + b"}",
        "many keys in an argument": b'{"execute":"x","arguments":{' + keys + b"}}",
        "error recovery": b"\x04" + b"x" * size + b"\n",
    }


def feed_times(data: bytes) -> tuple[float, float]:
    """The longest feed() before the last, and the last (seconds)."""
    framer = Framer(max_message_bytes=2 * len(data))
    times = []
    for i in range(0, len(data), READ_SIZE):
        start = time.perf_counter()
        framer.feed(data[i : i + READ_SIZE])
        times.append(time.perf_counter() - start)
    return max(times[:-1], default=0.0), times[-1]


def partial_memory(data: bytes) -> int:
    """Bytes held by a Framer fed all of ``data`` but its last two bytes."""
    unfinished = data[:-2]
    reads = [unfinished[i : i + READ_SIZE] for i in range(0, len(unfinished), READ_SIZE)]
    gc.collect()
    tracemalloc.start()
    try:
        framer = Framer(max_message_bytes=2 * len(data))
        for read in reads:
            framer.feed(read)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return held


def best_of(runs: int, measure: Callable[[], tuple[float, float]]) -> tuple[float, float]:
    results = [measure() for _ in range(runs)]
    return min(r[0] for r in results), min(r[1] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1 << 20, help="bytes per shape")
    args = parser.parse_args()
    print(f"{'shape':30} {'steady feed':>12} {'last feed':>10} {'unfinished':>11}")
    for name, data in shapes(args.size).items():
        steady, last = best_of(2, lambda data=data: feed_times(data))  # type: ignore[misc]
        held = partial_memory(data)
        print(f"{name:30} {steady * 1e3:9.2f} ms {last * 1e3:7.2f} ms {held / len(data):10.2f}x")
    messages = [b'{"execute":"query-status","id":%d}' % n for n in range(100_000)]
    framer = Framer()
    took = min(timeit.repeat(lambda: [framer.feed(m) for m in messages], number=1, repeat=5))
    print(f"happy path: {took * 10:.2f} us per feed of one query-status")


if __name__ == "__main__":
    main()
