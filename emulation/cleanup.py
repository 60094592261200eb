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
    return removed
