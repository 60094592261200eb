"""What a node emulates of its device itself, where its sandbox does not.

A slower CPU by stretching the compute phase, and link rates and latency in the transport
(node/shaping.py). The command line gives the first setting. An emulating run repeats the
current one in every TASK, so a device that switches profile mid-run (a power mode, a link
that degrades) does so without a restart, from its next task on. A real device gets none and
is itself.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

CPU_CLOCKS = ("wall", "cpu")


def stretched(wall_s: float, cpu_s: float, share: float, clock: str) -> float:
    """The wall seconds a compute phase of `wall_s` (using `cpu_s` CPU seconds) takes on a CPU
    `share` times as fast. `wall`: the measured wall time, stretched (the process backend: host
    contention has already slowed it by about the dilation). `cpu`: the CPU seconds at the
    share, never less than what already passed (the netns backend's `cpu_limit: weight`: cores
    are shared by weight, not capped, so the CPU seconds are the work done)."""
    if clock == "cpu":
        return max(wall_s, cpu_s / share)
    return wall_s / share


@dataclass(frozen=True)
class Emulated:
    """The device as this node emulates it. `cpu_share`: with the `wall` clock, the fraction of
    the measured speed (at most 1: a node cannot run faster than it does); with the `cpu` clock,
    host cores' worth of throughput (dilated), so it may exceed 1 for a multi-threaded device.
    Rates 0 = unshaped."""
    cpu_share: float = 1.0
    cpu_clock: str = "wall"
    uplink_mbit: float = 0.0
    downlink_mbit: float = 0.0
    latency_ms: float = 0.0

    def __post_init__(self):
        if self.cpu_clock not in CPU_CLOCKS:
            raise ValueError(f"cpu_clock must be one of {', '.join(CPU_CLOCKS)}, got {self.cpu_clock!r}")
        if not self.cpu_share > 0 or (self.cpu_clock == "wall" and self.cpu_share > 1):
            raise ValueError(f"cpu_share must be in (0, 1] with the wall clock, > 0 with the cpu clock; "
                             f"got {self.cpu_share}")
        for name in ("uplink_mbit", "downlink_mbit", "latency_ms"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def stretched(self, wall_s: float, cpu_s: float) -> float:
        return stretched(wall_s, cpu_s, self.cpu_share, self.cpu_clock)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Emulated":
        """From the wire: unknown keys are refused, numbers must be numbers."""
        known = {f.name for f in fields(cls)}
        if not isinstance(d, dict) or set(d) - known:
            raise ValueError(f"device: expected a mapping of {', '.join(sorted(known))}, got {d!r}")
        for k, v in d.items():
            if k != "cpu_clock" and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise ValueError(f"device.{k} must be a number, got {v!r}")
        return cls(**{k: (v if k == "cpu_clock" else float(v)) for k, v in d.items()})
