"""The host's own memory, which 80+ nodes share: sampled, guarded, and what the kernel did.

Why: each node's memory limit is its device's, but the nodes together can still need more than
the host has (80 LoRA nodes training at once took 17 GB here). Then the kernel's OOM killer
picks a victim; that must be a node (a lost node-round the run reports), never the aggregator
or the zygote (a lost run). So every node we start asks to be first in line
(`oom_score_adj` 1000, which an unprivileged process may raise for itself), the run samples the
host's used memory per round, and counts the kernel's OOM kills (`/proc/vmstat` oom_kill:
kills by a cgroup's limit and by the host running out alike; the caller subtracts the former).
"""
from __future__ import annotations

import threading
from pathlib import Path

import psutil

OOM_SCORE_ADJ = 1000  # the kernel's highest: killed before anything else when the host runs out
VMSTAT = Path("/proc/vmstat")


def kill_me_first(path: str = "/proc/self/oom_score_adj") -> None:
    """Put the calling process first in line for the host's OOM killer (its children inherit it)."""
    try:
        with open(path, "w") as fh:
            fh.write(str(OOM_SCORE_ADJ))
    except OSError:
        pass  # not Linux, or /proc not writable: nothing to protect the aggregator with


def used_mb() -> float:
    """Host memory in use (total - available), MB."""
    vm = psutil.virtual_memory()
    return (vm.total - vm.available) / 2**20


def available_mb() -> float:
    return psutil.virtual_memory().available / 2**20


def oom_kills(path: Path = VMSTAT) -> int | None:
    """Processes the kernel has killed for memory since boot (None where it does not say)."""
    try:
        for line in path.read_text().splitlines():
            key, _, val = line.partition(" ")
            if key == "oom_kill":
                return int(val)
    except (OSError, ValueError):
        pass
    return None


class PeakSampler(threading.Thread):
    """Samples `used_mb()` every `interval` s; `reset()` starts a new window, `peak` is its maximum."""

    def __init__(self, interval: float = 0.1):
        super().__init__(daemon=True, name="host-memory")
        self.interval = interval
        self.peak = used_mb()
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval):
            self.peak = max(self.peak, used_mb())

    def reset(self) -> float:
        self.peak = used_mb()
        return self.peak

    def stop(self) -> None:
        self._done.set()
        if self.is_alive():
            self.join()

    def __enter__(self) -> "PeakSampler":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def training_note(need_mb: float, available: float, trainers: int) -> str | None:
    """What to say when the nodes about to train need more memory than the host has free.

    need_mb: their memory above an idle node (the cost model's estimate, summed)."""
    if trainers == 0 or need_mb <= 0.9 * available:
        return None
    return (f"host memory: {trainers} nodes training at once need about {need_mb:.0f} MB more (cost model) "
            f"but the host has {available:.0f} MB available: the kernel's OOM killer will take nodes (they "
            "are first in line), counted as failed node-rounds; lower training.clients_per_round or the "
            "node counts to avoid it")


__all__ = ["OOM_SCORE_ADJ", "PeakSampler", "available_mb", "kill_me_first", "oom_kills", "training_note",
           "used_mb"]
