"""Upstream command ids: the smallest free integers, so upstream commands stay short.

QEMU reads its monitor one byte at a time (~4 us a byte), so a short in-band command
goes with no id at all (link.py), and the others get the smallest integers not in
flight: with at most a few dozen commands outstanding they are one or two digits. An id
returns to the pool only when its reply has arrived, so a late reply can never be
mistaken for a newer command's.
"""

from __future__ import annotations

import heapq


class IdPool:
    """Hands out the smallest integer not currently in use."""

    __slots__ = ("_free", "_next")

    def __init__(self) -> None:
        self._free: list[int] = []
        self._next = 0

    def take(self) -> int:
        if self._free:
            return heapq.heappop(self._free)
        n = self._next
        self._next += 1
        return n

    def give_back(self, n: int) -> None:
        heapq.heappush(self._free, n)
