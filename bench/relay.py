"""A relay that does no work: the floor of any process between a client and QEMU.

    python -m bench.relay LISTEN UPSTREAM

Accepts on unix socket LISTEN and connects each client to unix socket UPSTREAM, then
copies bytes both ways as they come: one epoll loop, one `recv` and one `send` per
readable, nothing parsed. A round trip through it pays what any proxy pays on this
machine (two more socket hops, two more process wake-ups) and nothing else, so the
latency scenario can say how much of qmpmux's added latency is qmpmux's own work and
how much the hop itself costs (on a VM a cross-CPU wake-up alone can take tens of µs).

It prints `ready` once it listens, and ends with its parent (the bench) or on SIGTERM.
"""

from __future__ import annotations

import select
import socket
import sys


def serve(listen: str, upstream: str) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(listen)
    server.listen(16)
    poller = select.epoll()
    poller.register(server.fileno(), select.EPOLLIN)
    socks: dict[int, socket.socket] = {}
    peer: dict[int, socket.socket] = {}
    print("ready", flush=True)
    while True:
        for fd, _events in poller.poll():
            if fd == server.fileno():
                client, _ = server.accept()
                up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                up.connect(upstream)
                for a, b in ((client, up), (up, client)):
                    socks[a.fileno()] = a
                    peer[a.fileno()] = b
                    poller.register(a.fileno(), select.EPOLLIN)
                continue
            sock = socks[fd]
            try:
                data = sock.recv(1 << 16)
                if data:
                    peer[fd].sendall(data)  # blocking: the bench's peers always read
                    continue
            except OSError:
                pass
            other = peer[fd]  # one side ended: end the pair
            for s in (sock, other):
                poller.unregister(s.fileno())
                del socks[s.fileno()], peer[s.fileno()]
                s.close()


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2])
