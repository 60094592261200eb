"""The `process` backend: one OS process per node on 127.0.0.1, no privileges needed.

Nothing is kernel-enforced here, so the node emulates its profile in user space: its torch
thread count, its CPU speed by stretching compute time (cpu_share), its links with the
in-transport serialization-delay model (node/shaping.py). Memory is measured, not limited.
Each node runs in its own session with PDEATHSIG, so nodes never outlive the runner.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping

from ..launch import Launch, base_env
from ..lifetime import node_preexec
from ..profiles import Profile
from .base import Backend

ROOT = Path(__file__).resolve().parents[2]


def process_env(env: Mapping[str, str]) -> dict[str, str]:
    """A node program's whole environment on this host: ours, `env`, and this code on its path."""
    out = {**os.environ, **env}
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return out


def node_env(run_id: str, threads: int) -> dict[str, str]:
    """The environment of a node program of run `run_id` (no key): also the zygote's."""
    return process_env(base_env(run_id, threads))


class ProcessBackend(Backend):
    name = "process"
    forks_nodes = True  # can fork nodes from a zygote

    def __init__(self, run_id: str, workdir: Path, caps: dict | None = None):
        super().__init__(run_id, workdir, caps)
        self.procs: dict[str, subprocess.Popen] = {}
        self.threads: dict[str, int] = {}  # node -> torch threads it was started with
        self.logs = self.workdir / "logs"
        self.zygote = None

    def prepare(self, spec: dict, data: dict, zygote: bool) -> None:
        if zygote and self.zygote is None:
            from ..zygote import Zygote
            self.zygote = Zygote(spec, data, node_env(self.run_id, 1), self.logs / "zygote.log")

    def zygote_info(self) -> dict | None:
        return None if self.zygote is None else {"pid": self.zygote.pid, "shared_mb": self.zygote.shared_mb}

    def zygote_notes(self, profiles: list[Profile]) -> list[str]:
        if self.zygote is None:
            return []
        return [f"nodes forked from one zygote: {self.zygote.shared_mb:.0f} MB shared copy-on-write; "
                "each node's peak memory still counts the shared pages it uses"]

    def cpu_demand(self, profile: Profile) -> float:
        """No quota here: a training node keeps all its threads busy, however slow it pretends to be."""
        return float(profile.threads)

    def fidelity(self, profiles: list[Profile], dilation: float) -> list[str]:
        notes = ["process backend: CPU speed emulated by stretching compute time (cpu_share), not by a kernel quota",
                 "process backend: memory limits are not enforced, only measured (peak RSS per node)",
                 "process backend: links emulated in the transport (serialization delay + latency), not by tc"]
        fast = sorted({p.name for p in profiles if p.cpu_share > 1})
        if fast:
            notes.append(f"profiles faster than one host core cannot be emulated by stretching: {', '.join(fast)}")
        return notes

    def start(self, launch: Launch) -> None:
        self._spawn(launch, launch.argv(self.emulated(launch.name)))  # nothing is enforced: the node emulates it all

    def set_profile(self, launch: Launch) -> str:
        """Live, from the node's next task (which carries the new device), unless the thread
        count changes (fixed at start)."""
        if launch.limits.threads != self.threads.get(launch.name):
            self.restart(launch)
            return "restarted: thread count changed"
        return "live from the next task"

    def reshape(self, launch: Launch) -> None:
        """The links live in the node's transport: its next task carries the new rates."""

    def _spawn(self, launch: Launch, argv: list[str], preexec=node_preexec, prefix: list[str] = (),
               cgroup_procs: list[str] = (), netns: str | None = None) -> None:
        """Start `python -m node ARGV` in its own session, output to logs/<name>.log: exec'd (after
        `prefix`, e.g. `ip netns exec NS`, and `preexec`), or forked from the zygote, which moves it
        into `cgroup_procs` and the namespace `netns` itself."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{launch.name}.log"
        self.threads[launch.name] = launch.limits.threads
        if self.zygote is not None:
            self.procs[launch.name] = self.zygote.spawn(argv, dict(launch.env), log, cgroup_procs, netns)
            return
        with open(log, "ab") as fh:
            self.procs[launch.name] = subprocess.Popen(
                [*prefix, sys.executable, "-m", "node", *argv], env=process_env(launch.env),
                stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=preexec)

    def alive(self, name: str) -> bool:
        p = self.procs.get(name)
        return p is not None and p.poll() is None

    def exit_reason(self, name: str) -> str | None:
        p = self.procs.get(name)
        if p is None or p.poll() is None:
            return None
        return f"node process exited with code {p.returncode}"

    def nodes(self) -> list[str]:
        return list(self.procs)

    def kill(self, name: str) -> None:
        p = self.procs[name]
        _kill_group(p, signal.SIGKILL)
        p.wait()

    def pause(self, name: str) -> None:
        _kill_group(self.procs[name], signal.SIGSTOP)

    def resume(self, name: str) -> None:
        _kill_group(self.procs[name], signal.SIGCONT)

    def stop(self, name: str, grace_s: float = 3.0) -> None:
        p = self.procs.pop(name, None)
        if p is None:
            return
        _kill_group(p, signal.SIGTERM)
        _kill_group(p, signal.SIGCONT)  # a paused node must run to see its SIGTERM
        try:
            p.wait(grace_s)
        except subprocess.TimeoutExpired:
            _kill_group(p, signal.SIGKILL)
            p.wait()

    def teardown(self) -> None:
        """Stop every node: all signalled first, so 80 nodes take one grace period, not 80."""
        procs = list(self.procs.items())
        for _, p in procs:
            _kill_group(p, signal.SIGTERM)
            _kill_group(p, signal.SIGCONT)  # a paused node must run to see its SIGTERM
        deadline = time.monotonic() + 3.0
        for name, p in procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _kill_group(p, signal.SIGKILL)
                p.wait()
            self.procs.pop(name, None)
        if self.zygote is not None:
            self.zygote.close()


def _kill_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
