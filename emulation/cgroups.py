"""One cgroup per node: a CPU quota and a memory limit the kernel enforces.

Both hierarchies are supported: cgroup v1 (separate `cpu` and `memory` mounts, as on this
host) and cgroup v2 (one unified tree with `cpu.max` and `memory.max`, as on most current
hosts). Every group lives under a `fedge/<run id>/` parent, so `clean` finds leftovers by path.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
PARENT = "fedge"
PERIOD_US = 100_000
WEIGHT_PER_CORE = 10_000  # a weight-shared node's weight per core of its share (v1 shares 2-262144, v2 1-10000)


def _write(path: Path, value: str) -> None:
    path.write_text(value)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _count(path: Path, key: str) -> int:
    """One counter of a flat-keyed cgroup file ("key value" lines), 0 where it is absent."""
    for line in _read(path).splitlines():
        k, _, val = line.partition(" ")
        if k == key:
            return int(val)
    return 0


class CGroup:
    """A node's cgroup. `version` 1 uses <root>/cpu/... and <root>/memory/...; 2 uses <v2 root>/..."""

    def __init__(self, run_id: str, name: str, version: int, v2_root: Path | None = None, root: Path = ROOT):
        self.run_id, self.name, self.version = run_id, name, version
        rel = Path(PARENT) / run_id / name
        if version == 1:
            self.dirs = {"cpu": root / "cpu" / rel, "memory": root / "memory" / rel}
        elif version == 2:
            base = Path(v2_root or root)
            self.dirs = {"cpu": base / rel, "memory": base / rel}
            self._v2_base = base
        else:
            raise ValueError(f"cgroup version must be 1 or 2, got {version}")

    # -- lifecycle -------------------------------------------------------------------------
    def create(self, cpu_share: float, memory_mb: int, by_weight: bool = False) -> None:
        """Make the group(s) and set quota = cpu_share x period (or, `by_weight`, no quota and a
        CPU weight proportional to cpu_share), memory limit = memory_mb (no swap)."""
        for attempt in range(3):
            try:
                if self.version == 2:
                    self._enable_v2_controllers()
                for d in set(self.dirs.values()):
                    d.mkdir(parents=True, exist_ok=True)
                break
            except FileNotFoundError:  # another run ending removed the empty `fedge` parent meanwhile
                if attempt == 2:
                    raise
        self.set_limits(cpu_share, memory_mb, by_weight)

    def set_limits(self, cpu_share: float, memory_mb: int, by_weight: bool = False) -> None:
        """Quota (or weight) and memory limit; also on a running group (a device switching power mode).

        A weight shares the cores in proportion to cpu_share while they are contended and caps
        nothing: a group runs uninterrupted instead of being throttled every period, which on
        some hosts costs a throttled process several times its CPU time (docs/architecture.md)."""
        quota = max(1000, int(cpu_share * PERIOD_US))
        weight = cpu_share * WEIGHT_PER_CORE
        limit = int(memory_mb) * 2**20
        if self.version == 1:
            _write(self.dirs["cpu"] / "cpu.cfs_period_us", str(PERIOD_US))
            _write(self.dirs["cpu"] / "cpu.cfs_quota_us", "-1" if by_weight else str(quota))
            _write(self.dirs["cpu"] / "cpu.shares", str(int(min(262144, max(2, round(weight))))) if by_weight else "1024")
            mem, swap = self.dirs["memory"] / "memory.limit_in_bytes", self.dirs["memory"] / "memory.memsw.limit_in_bytes"
            # v1 wants memory <= memory+swap at every moment: raise the outer limit first, lower it last
            raising = swap.exists() and limit > int(_read(mem) or 0)
            for f in ([swap, mem] if raising else [mem, swap]):
                if f is mem or f.exists():
                    _write(f, str(limit))
        else:
            _write(self.dirs["cpu"] / "cpu.max", f"{'max' if by_weight else quota} {PERIOD_US}")
            _write(self.dirs["cpu"] / "cpu.weight", str(int(min(10000, max(1, round(weight))))) if by_weight else "100")
            _write(self.dirs["memory"] / "memory.max", str(limit))
            if (self.dirs["memory"] / "memory.swap.max").exists():
                _write(self.dirs["memory"] / "memory.swap.max", "0")

    def _enable_v2_controllers(self) -> None:
        """cgroup v2 needs +cpu +memory in subtree_control of every ancestor of our groups."""
        cur = self._v2_base
        for part in (PARENT, self.run_id):
            ctl = cur / "cgroup.subtree_control"
            if ctl.exists():
                have = _read(ctl).split()
                for c in ("cpu", "memory"):
                    if c not in have:
                        _write(ctl, f"+{c}")
            cur = cur / part
            cur.mkdir(exist_ok=True)

    def add(self, pid: int) -> None:
        for d in set(self.dirs.values()):
            _write(d / "cgroup.procs", str(pid))

    def procs_files(self) -> list[str]:
        """The files a process writes its pid to, to join this cgroup (every hierarchy)."""
        return [str(d / "cgroup.procs") for d in set(self.dirs.values())]

    def freeze(self, frozen: bool) -> bool:
        """cgroup v2's freezer: every task of the group stops (or runs again) at once. False where
        there is none (v1 without the freezer hierarchy): the caller signals instead."""
        f = self.dirs["cpu"] / "cgroup.freeze"
        if self.version != 2 or not f.exists():
            return False
        _write(f, "1" if frozen else "0")
        return True

    def pids(self) -> list[int]:
        out = set()
        for d in set(self.dirs.values()):
            out.update(int(x) for x in _read(d / "cgroup.procs").split())
        return sorted(out)

    def remove(self, timeout: float = 5.0) -> None:
        """Kill what is left inside, then rmdir (a cgroup with tasks cannot be removed)."""
        deadline = time.monotonic() + timeout
        while True:
            pids = self.pids()
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                for d in set(self.dirs.values()):
                    if d.exists():
                        d.rmdir()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    # -- readings --------------------------------------------------------------------------
    def limits(self) -> dict:
        """The limits as the kernel reports them (tests read them back)."""
        if self.version == 1:
            quota = int(_read(self.dirs["cpu"] / "cpu.cfs_quota_us") or -1)
            period = int(_read(self.dirs["cpu"] / "cpu.cfs_period_us") or PERIOD_US)
            mem = int(_read(self.dirs["memory"] / "memory.limit_in_bytes") or -1)
            weight = int(_read(self.dirs["cpu"] / "cpu.shares") or 1024)
        else:
            q, p = (_read(self.dirs["cpu"] / "cpu.max") or "max 100000").split()
            quota, period = (-1 if q == "max" else int(q)), int(p)
            m = _read(self.dirs["memory"] / "memory.max")
            mem = -1 if m in ("", "max") else int(m)
            weight = int(_read(self.dirs["cpu"] / "cpu.weight") or 100)
        return {"cpu_share": quota / period if quota > 0 else None, "cpu_weight": weight, "memory_bytes": mem}

    def peak_memory_bytes(self) -> int:
        f = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        v = _read(self.dirs["memory"] / f)
        return int(v) if v.isdigit() else 0

    def hit_limit(self) -> bool:
        """Whether the group reached its memory limit: v2 counts it (memory.events `oom`); v1
        does not reliably (failcnt stays 0 when memory+swap is limited too, seen here), so
        there its peak must be within 5% of the limit. Tells a kill by the group's own limit
        from one by the host running out: the kernel counts both in the group's oom_kill."""
        if self.version == 1:
            limit = int(_read(self.dirs["memory"] / "memory.limit_in_bytes") or 0)
            return limit > 0 and self.peak_memory_bytes() >= 0.95 * limit
        return _count(self.dirs["memory"] / "memory.events", "oom") > 0

    def oom_kills(self) -> int:
        """How many processes the kernel killed in this group (for its limit, or for the host's)."""
        return _count(self.dirs["memory"] / ("memory.oom_control" if self.version == 1 else "memory.events"), "oom_kill")


def parents(v2_root: Path | None = None, root: Path = ROOT) -> list[Path]:
    """The `fedge` directories every run's groups live under (one per hierarchy)."""
    bases = [root / "cpu" / PARENT, root / "memory" / PARENT]
    if v2_root:
        bases.append(Path(v2_root) / PARENT)
    return bases


def leftovers(version: int | None, v2_root: Path | None = None, root: Path = ROOT, run_id: str | None = None) -> list[Path]:
    """Directories of our cgroups (deepest first) that crashed runs left behind; without a
    run id also the `fedge` parents themselves, last."""
    found = []
    for b in parents(v2_root, root):
        if not b.is_dir():
            continue
        runs = [b / run_id] if run_id else [p for p in b.iterdir() if p.is_dir()]
        for r in runs:
            if r.is_dir():
                found.extend(sorted((p for p in r.iterdir() if p.is_dir()), reverse=True))
                found.append(r)
        if run_id is None:
            found.append(b)
    return found


def remove_run(run_id: str, version: int | None, v2_root: Path | None = None, root: Path = ROOT) -> None:
    """After a run: its (emptied) groups, its own directory, and the `fedge` parents unless
    another run still has groups there."""
    for d in leftovers(version, v2_root, root, run_id=run_id):
        try:
            d.rmdir()
        except OSError:  # a group with tasks left: `testbed clean` reports it
            pass
    remove_empty_parents(v2_root, root)


def remove_empty_parents(v2_root: Path | None = None, root: Path = ROOT) -> None:
    """After a run: the `fedge` parents go too unless another run still has groups there."""
    for b in parents(v2_root, root):
        try:
            b.rmdir()
        except OSError:  # missing, or another run's groups are inside
            pass
