"""Rate limits for log lines that clients can trigger at will (sans-IO: the clock is given).

A client decides how often it is denied, let through in audit-only mode or connected,
and reconnecting gives it a fresh session, so nothing per client bounds those lines:
one client wrote 426,000 denial lines (36 MB) in 10 s. Lines are therefore limited per
listener (the only identity a reconnecting client cannot shed) and globally (many
listeners, or many users), each by a token bucket.

Invariants:
- A line is admitted only when both its listener's bucket and the global bucket hold a
  token; it then takes one from each. Over any interval of T seconds at most
  `burst + rate * T` lines per listener and `global_burst + global_rate * T` in all
  are admitted, whatever the clients do.
- Nothing is lost silently: each dropped line is counted per (kind, listener), and the
  next admitted line of that kind and listener carries the count and the time it
  covers ("N similar lines suppressed on listener X in the last T s").
- No I/O, no timers: the caller asks `admit` when a line is due and logs it or not.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

# Listener labels come from the configuration, so the tables stay small; past this many
# listeners they share one bucket rather than grow.
_MAX_KEYS: Final = 1024
_OVERFLOW: Final = "(other listeners)"


class _Bucket:
    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp

    def refill(self, now: float, rate: float, burst: float) -> None:
        if now > self.stamp:
            self.tokens = min(burst, self.tokens + (now - self.stamp) * rate)
        self.stamp = now


class LogThrottle:
    """Token buckets per listener and for everything, with suppressed-line accounting."""

    def __init__(
        self,
        *,
        rate: float = 1.0,
        burst: int = 20,
        global_rate: float = 5.0,
        global_burst: int = 50,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate, self.burst = rate, float(burst)
        self.global_rate, self.global_burst = global_rate, float(global_burst)
        self._clock = clock
        self._global = _Bucket(self.global_burst, clock())
        self._buckets: dict[str, _Bucket] = {}
        # (kind, listener) -> [lines dropped, when the first of them was]
        self._dropped: dict[tuple[str, str], list[float]] = {}

    def admit(self, kind: str, listener: str) -> str | None:
        """None to drop this line; else a note to append to it ("" when none was dropped).

        `kind` names the sort of line ("denial", "audit-only", ...): only lines of one
        kind are counted together as similar.
        """
        now = self._clock()
        if listener not in self._buckets and len(self._buckets) >= _MAX_KEYS:
            listener = _OVERFLOW
        bucket = self._buckets.get(listener)
        if bucket is None:
            bucket = self._buckets[listener] = _Bucket(self.burst, now)
        bucket.refill(now, self.rate, self.burst)
        self._global.refill(now, self.global_rate, self.global_burst)
        key = (kind, listener)
        if bucket.tokens < 1 or self._global.tokens < 1:
            dropped = self._dropped.get(key)
            if dropped is None:
                self._dropped[key] = [1, now]
            else:
                dropped[0] += 1
            return None
        bucket.tokens -= 1
        self._global.tokens -= 1
        dropped = self._dropped.pop(key, None)
        if dropped is None:
            return ""
        count, since = int(dropped[0]), dropped[1]
        lines = "line" if count == 1 else "lines"
        return (
            f" [{count} similar {lines} suppressed on listener {listener} "
            f"in the last {round(max(now - since, 0.0), 1):g} s]"
        )

    def suppressed(self) -> int:
        """Lines dropped and not yet reported."""
        return sum(int(d[0]) for d in self._dropped.values())
