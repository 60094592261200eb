"""What this host can enforce: root, cgroups, tc qdiscs (netem?), network namespaces, Docker.

Probed by trying, not by guessing from versions: a qdisc counts as available when adding it to
the loopback device of a throw-away network namespace works. The result goes into
manifest.json and on screen, and `backend: auto` chooses from it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
QDISC_TRIALS = {
    "tbf": ["tbf", "rate", "1mbit", "burst", "32kbit", "latency", "50ms"],
    "htb": ["htb", "default", "1"],
    "netem": ["netem", "delay", "1ms"],
}


def _run(cmd: list[str], timeout: float = 10) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def cgroup_info() -> dict:
    """cgroup version(s) and which controllers can be written here."""
    info = {"v1": [], "v2": [], "v2_path": None}
    for ctrl in ("cpu", "memory", "freezer", "cpuset", "pids"):
        d = CGROUP_ROOT / ctrl
        if d.is_dir() and os.access(d, os.W_OK):
            info["v1"].append(ctrl)
    for cand in (CGROUP_ROOT, CGROUP_ROOT / "unified"):
        f = cand / "cgroup.controllers"
        if f.exists():
            info["v2_path"] = str(cand)
            info["v2"] = f.read_text().split()
            break
    if {"cpu", "memory"} <= set(info["v2"]):
        info["version"] = 2
    elif {"cpu", "memory"} <= set(info["v1"]):
        info["version"] = 1
    else:
        info["version"] = None
    return info


def qdiscs() -> dict[str, bool]:
    """Try each qdisc on lo inside a temporary namespace (root only)."""
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
        return {q: False for q in QDISC_TRIALS}
    ns = f"tbprobe-{uuid.uuid4().hex[:8]}"
    out = {}
    if _run(["ip", "netns", "add", ns]).returncode != 0:
        return {q: False for q in QDISC_TRIALS}
    try:
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        for q, args in QDISC_TRIALS.items():
            r = _run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo", "root", *args])
            out[q] = r.returncode == 0
            _run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", "lo", "root"])
    finally:
        _run(["ip", "netns", "del", ns])
    return out


def docker_info(timeout: float = 3.0) -> dict:
    try:
        import docker
        client = docker.from_env(timeout=timeout)
        version = client.version().get("Version")
        client.close()
        return {"available": True, "version": version}
    except Exception as exc:  # no SDK, no socket, engine down: all mean "no docker"
        return {"available": False, "reason": f"{type(exc).__name__}: {str(exc)[:200]}"}


def probe() -> dict:
    import psutil
    root = os.geteuid() == 0
    q = qdiscs()
    return {
        "root": root,
        "cores": os.cpu_count(),
        "memory_mb": psutil.virtual_memory().total // 2**20,
        "cgroup": cgroup_info(),
        "netns": root and bool(shutil.which("ip")),
        "qdiscs": q,
        "netem": q.get("netem", False),
        "docker": docker_info(),
    }


def describe(caps: dict) -> str:
    """One line for the screen: what this host can enforce."""
    cg = caps["cgroup"]
    cgs = f"cgroup v{cg['version']} ({', '.join(cg['v1'] if cg['version'] == 1 else cg['v2'])})" if cg["version"] \
        else "no writable cpu+memory cgroups"
    q = [k for k, v in caps["qdiscs"].items() if v] or ["none"]
    dock = f"docker {caps['docker'].get('version')}" if caps["docker"]["available"] else "no docker engine"
    return (f"host: {caps['cores']} cores, {caps['memory_mb'] / 1024:.0f} GiB, {'root' if caps['root'] else 'not root'}, "
            f"{cgs}, qdiscs: {' '.join(q)}, netem {'yes' if caps['netem'] else 'no'}, {dock}")
