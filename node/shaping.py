"""In-transport link emulation, for hosts where the kernel cannot shape (no root, no tc).

Each direction is a serialization-delay model: a message of n bytes on a link of rate R
bit/s with one-way latency L occupies the link for L + 8n/R seconds. A message is held back
that long before it is handed to the socket (uplink) or to the node (downlink), so what the
aggregator sees in wall-clock time is what a real slow link would give. Back-to-back
messages queue behind each other, as on a real link. Where the kernel shapes the link
(netns/docker backends) this is switched off (rate 0 = unlimited, latency 0).

A link that follows a rate trace gets a schedule: the rates it changes to and when. A message
that crosses a step is serialized at each rate for the part of it sent under that rate.
"""
from __future__ import annotations

import bisect
import math
import time


class Link:
    def __init__(self, rate_mbit: float = 0.0, latency_ms: float = 0.0, clock=time.monotonic, sleep=time.sleep,
                 schedule: list[tuple[float, float]] = ()):
        """`schedule`: (clock time, Mbit/s) steps; before the first the rate is `rate_mbit`."""
        if rate_mbit < 0 or latency_ms < 0 or any(r < 0 for _, r in schedule):
            raise ValueError("link rate and latency must be >= 0")
        self.rate_bps = rate_mbit * 1e6
        self.latency_s = latency_ms / 1e3
        self._clock, self._sleep = clock, sleep
        self._busy_until = 0.0
        self._steps = sorted((t, r * 1e6) for t, r in schedule)
        self._times = [t for t, _ in self._steps]

    def _serialized_at(self, begin: float, nbytes: int) -> float:
        """When the last bit of `nbytes` is on the wire, if the first goes at `begin`."""
        bits, t = nbytes * 8, begin
        i = bisect.bisect_right(self._times, t)
        while True:
            rate = self._steps[i - 1][1] if i > 0 else self.rate_bps
            until = self._times[i] if i < len(self._times) else math.inf
            if rate <= 0:  # unshaped
                return t
            if t + bits / rate <= until:
                return t + bits / rate
            bits -= (until - t) * rate
            t, i = until, i + 1

    def delay_for(self, nbytes: int, at: float | None = None) -> float:
        """Seconds a message of `nbytes` sent at `at` (default: now) occupies this link
        (serialization + latency)."""
        begin = self._clock() if at is None else at
        return self._serialized_at(begin, nbytes) - begin + self.latency_s

    def transfer(self, nbytes: int) -> float:
        """Block until `nbytes` would have crossed the link; returns the seconds spent.

        Serialization occupies the link (a second message queues behind it); latency does not
        (it is propagation: messages in flight overlap)."""
        start = self._clock()
        sent = self._serialized_at(max(start, self._busy_until), nbytes)
        self._busy_until = sent
        remaining = sent + self.latency_s - self._clock()
        if remaining > 0:
            self._sleep(remaining)
        return self._clock() - start
