"""`python -m testbed clean`: remove what crashed runs left behind.

Everything the testbed starts is tagged with its run id (processes carry it in their
environment as TESTBED_RUN), so leftovers are found by tag, never by guessing.
"""
from __future__ import annotations

import os
import signal

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


def clean(run_id: str | None = None) -> list[str]:
    """Kill tagged processes, remove containers and docker networks, then cgroups, namespaces, interfaces."""
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
