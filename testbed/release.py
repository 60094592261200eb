"""Released rounds (`release_waits`): once every node of a round has done its CPU work, the rest
of its waits passes `factor` (the dilation) times faster in real time.

With dilation D a round lasts D times its emulated length, sized for the moment every device
computes at once. After the last device has done its training, what remains of the round is
sleeping: nodes that stretch their compute time to their device's, and nodes waiting for the
slowest. That part uses no host CPU, so the host idles through it. The aggregator announces the
moment in one file that every node on this host reads (a node polls it only while it waits),
and each node ends its wait at `released_end`. The recorded times do not change: each node
reports its device's compute time as before, and the round's emulated length is worked out
from the nodes' reported times (testbed/rounds.py), not from the real time it took.

The file holds one JSON object, {"key": "<strategy>/<round>", "at": <time.monotonic()>,
"factor": D}. CLOCK_MONOTONIC is one clock for every process of the host, whatever namespace it
is in, so `at` means the same to the aggregator and to a node in a network namespace.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path


class ReleaseFile:
    """The run's release announcements: written by the aggregator, read by the nodes
    (node.device.read_release)."""

    def __init__(self, path: Path, factor: float):
        if not factor > 1:
            raise ValueError(f"a release factor must be > 1, got {factor}")
        self.path, self.factor = Path(path), float(factor)

    def announce(self, key: str) -> float:
        """Release the round `key` now; returns the moment (time.monotonic()). Written to a
        temporary file and renamed, so a node never reads half a record."""
        at = time.monotonic()
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"key": key, "at": at, "factor": self.factor}))
        os.replace(tmp, self.path)
        return at

    def clear(self) -> None:
        """No round is released (a run's start, and its end)."""
        for p in (self.path, self.path.with_name(self.path.name + ".tmp")):
            p.unlink(missing_ok=True)
