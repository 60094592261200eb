"""`python -m testbed clean`: remove what crashed runs left behind.

Everything the testbed starts is tagged with its run id (processes carry it in their
environment as TESTBED_RUN), so leftovers are found by tag, never by guessing. A run whose
orchestrator is still alive is not a leftover: while it runs it holds a marker (`LiveRun`), and
clean refuses to touch it unless forced.
"""
from __future__ import annotations

import json
import os
import signal
import tempfile
from pathlib import Path

import psutil

from .backends.base import RUN_ENV


def tagged_processes(run_id: str | None = None) -> list[psutil.Process]:
    me = os.getpid()
    found = []
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == me:
            continue
        try:
            tag = proc.environ().get(RUN_ENV)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess, OSError):
            continue
        if tag and (run_id is None or tag == run_id):
            found.append(proc)
    return found


LIVE_DIR_ENV = "FEDGE_LIVE_DIR"  # where live runs leave their marker (default: the temp folder)


class LiveRunError(RuntimeError):
    """clean was asked to remove a run whose orchestrator is alive."""


def live_dir() -> Path:
    return Path(os.environ.get(LIVE_DIR_ENV) or Path(tempfile.gettempdir()) / "fedge-live")


class LiveRun:
    """A marker that run `run_id` is alive in this process, for as long as the `with` lasts."""

    def __init__(self, run_id: str):
        self.path = live_dir() / run_id

    def __enter__(self) -> "LiveRun":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = psutil.Process()
        self.path.write_text(json.dumps({"pid": me.pid, "started": me.create_time()}))
        return self

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)


def live_runs() -> dict[str, int]:
    """Run id -> pid of each run whose orchestrator is alive (markers of dead ones are dropped)."""
    out = {}
    for marker in sorted(live_dir().glob("*")) if live_dir().is_dir() else []:
        try:
            d = json.loads(marker.read_text())
            if abs(psutil.Process(int(d["pid"])).create_time() - float(d["started"])) < 0.01:  # not a reused pid
                out[marker.name] = int(d["pid"])
                continue
        except (OSError, ValueError, KeyError, psutil.Error):
            pass
        marker.unlink(missing_ok=True)
    return out


def clean(run_id: str | None = None, force: bool = False) -> list[str]:
    """Kill tagged processes, remove containers and docker networks, then cgroups, namespaces,
    interfaces. Refuses (LiveRunError) a live run's, or every run's while any is live, unless forced."""
    live = {r: pid for r, pid in live_runs().items() if pid != os.getpid()}
    hit = sorted(live) if run_id is None else [r for r in live if r == run_id]
    if hit and not force:
        which = ", ".join(f"{r} (pid {live[r]})" for r in hit)
        raise LiveRunError(f"run(s) still running: {which}. Cleaning would break them: stop them first (Ctrl-C "
                           "or kill PID, which cleans up), clean one crashed run with --run ID, or --force")
    removed = []
    procs = tagged_processes(run_id)
    for p in procs:
        try:
            tag = p.environ().get(RUN_ENV)
            p.send_signal(signal.SIGKILL)
            removed.append(f"process {p.pid} of run {tag}")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    psutil.wait_procs(procs, timeout=5)
    from .backends.docker import clean as clean_docker  # containers, then networks, labelled fedge.run
    from .backends.docker import clean_engines
    removed += clean_docker(run_id)
    removed += clean_engines(run_id)  # and on every other engine a run used (scenario engines:)
    removed += _clean_kernel_objects(run_id)
    return removed


def _clean_kernel_objects(run_id: str | None) -> list[str]:
    if os.geteuid() != 0:
        return []
    from . import cgroups, netns
    from .probe import cgroup_info
    removed = []
    info = cgroup_info()
    for d in cgroups.leftovers(info.get("version"), info.get("v2_path"), run_id=run_id):
        try:
            for pid in (d / "cgroup.procs").read_text().split():
                os.kill(int(pid), signal.SIGKILL)
            d.rmdir()
            removed.append(f"cgroup {d}")
        except OSError:
            pass
    tag = netns.run_tag(run_id) if run_id else None  # namespaces and interfaces carry the run's tag
    for ns in netns.leftovers(tag)["namespaces"]:
        netns.Namespace(ns).delete()
        removed.append(f"namespace {ns}")
    for ifname in netns.leftovers(tag)["interfaces"]:  # deleting namespaces removed their veths
        netns.sh("ip", "link", "del", ifname, check=False)
        removed.append(f"interface {ifname}")
    return removed
