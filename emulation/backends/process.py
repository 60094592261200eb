"""The `process` backend: one OS process per node on 127.0.0.1, no privileges needed.

Nothing is kernel-enforced here, so the node emulates its profile in user space: its torch
thread count, its CPU speed by stretching compute time (cpu_share), its links with the
in-transport serialization-delay model (node/shaping.py). Memory is measured, not limited.
Each node runs in its own session with PDEATHSIG, so nodes never outlive the runner.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..hostmem import kill_me_first
from ..profiles import Profile
from .base import RUN_ENV, Backend

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def _node_preexec() -> None:
    """In a node before exec: it dies with the runner, and is the first the host's OOM killer takes."""
    _die_with_parent()
    kill_me_first()


def node_command(name: str, profile: Profile, endpoint: str, dilation: float, shape_in_transport: bool = True) -> list[str]:
    """The `python -m node` command line for a profile; link rates divided by dilation.

    cpu_share is NOT divided: stretching is relative to the compute time the node measures,
    which host contention has already inflated by about the dilation factor.
    """
    cmd = [sys.executable, "-m", "node", "--connect", endpoint, "--name", name, "--profile", profile.name,
           "--threads", str(profile.threads), "--cpu-share", f"{min(1.0, profile.cpu_share):.6g}"]
    if shape_in_transport:
        cmd += ["--uplink-mbit", f"{profile.uplink_mbit / dilation:.6g}",
                "--downlink-mbit", f"{profile.downlink_mbit / dilation:.6g}",
                "--latency-ms", f"{profile.latency_ms * dilation:.6g}"]
    return cmd


def node_env(run_id: str, threads: int) -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env.update({RUN_ENV: run_id, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)})
    return env


class ProcessBackend(Backend):
    name = "process"
    forks_nodes = True  # can fork nodes from a zygote

    def __init__(self, run_id: str, workdir: Path, caps: dict | None = None):
        super().__init__(run_id, workdir, caps)
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs = self.workdir / "logs"
        self.zygote = None

    def prepare(self, spec: dict, dataset: str, zygote: bool) -> None:
        if zygote and self.zygote is None:
            from ..zygote import Zygote
            self.zygote = Zygote(spec, dataset, node_env(self.run_id, 1), self.logs / "zygote.log")

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

    def start(self, name: str, profile: Profile, endpoint: str, dilation: float) -> None:
        self._spawn(name, node_command(name, profile, endpoint, dilation), profile.threads)

    def _spawn(self, name: str, cmd: list[str], threads: int, preexec=_node_preexec) -> None:
        """Start a node program in its own session, output to logs/<name>.log."""
        self.logs.mkdir(parents=True, exist_ok=True)
        if self.zygote is not None:
            self._fork(name, cmd, threads)
            return
        with open(self.logs / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen([*cmd, *self.auth_args()],
                                                env={**node_env(self.run_id, threads), **self.auth_env(name)},
                                                stdin=subprocess.DEVNULL,
                                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                                preexec_fn=preexec)

    def _fork(self, name: str, cmd: list[str], threads: int, cgroup_procs: list[str] = (),
              netns: str | None = None) -> None:
        """The same node program forked from the zygote: `cmd` is `python -m node ARGS`."""
        assert cmd[1:3] == ["-m", "node"], cmd
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), **self.auth_env(name)}
        self.procs[name] = self.zygote.spawn([*cmd[3:], *self.auth_args()], env, self.logs / f"{name}.log",
                                             cgroup_procs, netns)

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
