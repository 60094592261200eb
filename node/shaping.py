"""In-transport link emulation, for hosts where the kernel cannot shape (no root, no tc).

Each direction is a serialization-delay model: a message of n bytes on a link of rate R
bit/s with one-way latency L occupies the link for L + 8n/R seconds. A message is held back
that long before it is handed to the socket (uplink) or to the node (downlink), so what the
aggregator sees in wall-clock time is what a real slow link would give. Back-to-back
messages queue behind each other, as on a real link. Where the kernel shapes the link
(netns/docker backends) this is switched off (rate 0 = unlimited, latency 0).
"""
from __future__ import annotations

import time


class Link:
    def __init__(self, rate_mbit: float = 0.0, latency_ms: float = 0.0, clock=time.monotonic, sleep=time.sleep):
        if rate_mbit < 0 or latency_ms < 0:
            raise ValueError("link rate and latency must be >= 0")
        self.rate_bps = rate_mbit * 1e6
        self.latency_s = latency_ms / 1e3
        self._clock, self._sleep = clock, sleep
        self._busy_until = 0.0

    def delay_for(self, nbytes: int) -> float:
        """Seconds a message of `nbytes` occupies this link (serialization + latency)."""
        serialize = nbytes * 8 / self.rate_bps if self.rate_bps > 0 else 0.0
        return serialize + self.latency_s

    def transfer(self, nbytes: int) -> float:
        """Block until `nbytes` would have crossed the link; returns the seconds spent.

        Serialization occupies the link (a second message queues behind it); latency does not
        (it is propagation: messages in flight overlap)."""
        start = self._clock()
        sent = max(start, self._busy_until) + self.delay_for(nbytes) - self.latency_s
        self._busy_until = sent
        remaining = sent + self.latency_s - self._clock()
        if remaining > 0:
            self._sleep(remaining)
        return self._clock() - start
