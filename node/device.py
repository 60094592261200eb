"""What a node emulates of its device itself, where its sandbox does not.

A slower CPU by stretching the compute phase, and link rates and latency in the transport
(node/shaping.py). The command line gives the first setting. An emulating run repeats the
current one in every TASK, so a device that switches profile mid-run (a power mode, a link
that degrades) does so without a restart, from its next task on. A real device gets none and
is itself.
"""
from __future__ import annotations

import json
import math

from dataclasses import asdict, dataclass, fields

CPU_CLOCKS = ("wall", "cpu", "virtual")


def stretched(wall_s: float, cpu_s: float, share: float, clock: str) -> float:
    """The wall seconds a compute phase of `wall_s` (using `cpu_s` CPU seconds) takes on a CPU
    `share` times as fast. `wall`: the measured wall time, stretched (the process backend: host
    contention has already slowed it by about the dilation). `cpu`: the CPU seconds at the
    share, never less than what already passed (the netns backend's `cpu_limit: weight`: cores
    are shared by weight, not capped, so the CPU seconds are the work done). `virtual`: the CPU
    seconds at the share, whatever the wall time (`clock: virtual`: nothing waits; the
    aggregator orders the results on its virtual clock)."""
    if clock == "virtual":
        return cpu_s / share
    if clock == "cpu":
        return max(wall_s, cpu_s / share)
    return wall_s / share


@dataclass(frozen=True)
class Emulated:
    """The device as this node emulates it. `cpu_share`: with the `wall` clock, the fraction of
    the measured speed (at most 1: a node cannot run faster than it does); with the `cpu` clock,
    host cores' worth of throughput (dilated), so it may exceed 1 for a multi-threaded device;
    with the `virtual` clock, the same undilated, and nothing is slept.
    Rates 0 = unshaped. `rate_steps`: a link trace's steps, (seconds from the task's arrival,
    uplink, downlink Mbit/s), replayed by the transport (node/shaping.py)."""
    cpu_share: float = 1.0
    cpu_clock: str = "wall"
    uplink_mbit: float = 0.0
    downlink_mbit: float = 0.0
    latency_ms: float = 0.0
    rate_steps: tuple[tuple[float, float, float], ...] = ()
    nice: float = 0.0  # the virtual clock: the niceness that gives it its share's CPU weight (weight_nice)

    def __post_init__(self):
        if self.cpu_clock not in CPU_CLOCKS:
            raise ValueError(f"cpu_clock must be one of {', '.join(CPU_CLOCKS)}, got {self.cpu_clock!r}")
        if not self.cpu_share > 0 or (self.cpu_clock == "wall" and self.cpu_share > 1):
            raise ValueError(f"cpu_share must be in (0, 1] with the wall clock, > 0 with the cpu clock; "
                             f"got {self.cpu_share}")
        for name in ("uplink_mbit", "downlink_mbit", "latency_ms"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.nice <= 19:
            raise ValueError(f"nice must be in [0, 19], got {self.nice}")
        for step in self.rate_steps:
            if len(step) != 3 or not all(isinstance(v, float) and v >= 0 for v in step):
                raise ValueError(f"rate_steps: each step is (seconds, uplink, downlink), numbers >= 0; got {step!r}")

    @property
    def waits(self) -> bool:
        """Whether the node sleeps to make its compute phase last as long as the device's."""
        return self.cpu_clock != "virtual" and (self.cpu_share != 1 or self.cpu_clock != "wall")

    def stretched(self, wall_s: float, cpu_s: float) -> float:
        return stretched(wall_s, cpu_s, self.cpu_share, self.cpu_clock)

    def host_short(self, wall_s: float, cpu_s: float) -> float:
        """With the `cpu` clock, the part of the stretched time that the host added by giving the
        device less CPU than its share (wall time beyond the CPU seconds at the share); else 0."""
        return max(0.0, wall_s - cpu_s / self.cpu_share) if self.cpu_clock == "cpu" else 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Emulated":
        """From the wire: unknown keys are refused, numbers must be numbers."""
        known = {f.name for f in fields(cls)}
        if not isinstance(d, dict) or set(d) - known:
            raise ValueError(f"device: expected a mapping of {', '.join(sorted(known))}, got {d!r}")
        steps = d.get("rate_steps", ())
        if not isinstance(steps, (list, tuple)) or not all(
                isinstance(s, (list, tuple)) and all(_number(v) for v in s) for s in steps):
            raise ValueError(f"device.rate_steps must be a list of [seconds, uplink, downlink], got {steps!r}")
        for k, v in d.items():
            if k not in ("cpu_clock", "rate_steps") and not _number(v):
                raise ValueError(f"device.{k} must be a number, got {v!r}")
        return cls(**{k: (v if k == "cpu_clock" else float(v)) for k, v in d.items() if k != "rate_steps"},
                   rate_steps=tuple(tuple(float(v) for v in s) for s in steps))


def released_end(end: float, at: float, factor: float) -> float:
    """When a wait due to end at `end` ends once its round is released at `at` (the same clock):
    what remained of it after `at` passes `factor` times faster (testbed/release.py)."""
    return end if at >= end else at + (end - at) / factor


def read_release(path: str, key: str) -> tuple[float, float] | None:
    """(at, factor) of the release of round `key` from the run's release file, or None while it
    is not released (no file, another round's record, or a record that is not one)."""
    try:
        with open(path) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("key") != key:
        return None
    at, factor = rec.get("at"), rec.get("factor")
    if not (_number(at) and _number(factor) and factor > 1):
        return None
    return float(at), float(factor)


def weight_nice(share: float, largest: float) -> int:
    """The virtual clock's stand-in for the netns backend's CPU weights: the niceness at which a
    node of `share` gets about share / largest of the CPU weight of the run's largest share, when
    more nodes train at once than there are cores. Each step of niceness divides the kernel's
    weight by 1.25, so a device at half the largest share gets nice 3 (1.25^3 = 1.95). Without
    it, nodes that share a core share it equally, and the fastest device then measures more
    CPU seconds (measured: 7-9% on legend-ci) than under the real clock, where it has the larger
    weight and fewer switches."""
    if largest <= share:
        return 0
    return min(19, round(math.log(largest / share) / math.log(1.25)))


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
