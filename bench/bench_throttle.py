#!/usr/bin/env python
"""What a CPU quota costs a throttled process on this host, against cores shared by weight.

Needs root (cgroups). Each case runs one or more worker processes (torch, one thread) that
multiply a 512x384 matrix by one of 60 384x1536 matrices in a loop for `--seconds`, and counts
products per CPU second of the worker (`time.process_time`). The workers warm up before they
are placed in their cgroup. Cases:

- alone: one worker, no cgroup (the reference);
- quota q / period p: one worker in a cgroup with that CFS quota (`emulation.cgroups.CGroup`,
  the period patched for the case);
- weight, N workers: N workers in cgroups with no quota and CPU weights in the ratio of
  `--shares` (what `cpu_limit: weight` does), all running at once;
- sleep w/s: one worker, no cgroup, that works w ms then sleeps s ms (no kernel throttling).

Printed per case: products per CPU second and its ratio to `alone` (1.00 = the same work costs
the same CPU time; 0.25 = four times the CPU seconds). A quota emulates a CPU q times as fast
only when that ratio is about 1. Nothing asserts; the machine is shared.
"""
from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WORKER = r"""
import os, sys, time, torch
torch.set_num_threads(1)
a = torch.randn(512, 384); w = [torch.randn(384, 1536) for _ in range(60)]
for i in range(100): (a @ w[i % 60]).sum()
print("READY", os.getpid(), flush=True)
sys.stdin.readline()
seconds, work_ms, sleep_ms = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
done, c0, t0 = 0, time.process_time(), time.perf_counter()
while time.perf_counter() - t0 < seconds:
    burst = time.perf_counter()
    while (work_ms <= 0 or (time.perf_counter() - burst) * 1e3 < work_ms) and time.perf_counter() - t0 < seconds:
        (a @ w[done % 60]).sum(); done += 1
    if sleep_ms > 0: time.sleep(sleep_ms / 1e3)
print("RESULT", done / max(1e-9, time.process_time() - c0), flush=True)
"""


def run_case(seconds: float, groups: list[dict | None], work_ms: float = 0, sleep_ms: float = 0) -> list[float]:
    """Start one worker per entry (None = no cgroup, else CGroup.create kwargs + period_us), place
    each, let them all run at once; products per CPU second of each."""
    from emulation import cgroups, probe
    info = probe.cgroup_info()
    run_id = f"bench-throttle-{secrets.token_hex(3)}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs, cgs = [], []
    try:
        for i, g in enumerate(groups):
            p = subprocess.Popen([sys.executable, "-c", WORKER, str(seconds), str(work_ms), str(sleep_ms)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
            procs.append(p)
            pid = int(p.stdout.readline().split()[1])
            if g is not None:
                cgroups.PERIOD_US = g.get("period_us", 100_000)
                cg = cgroups.CGroup(run_id, f"w{i}", info["version"], Path(info["v2_path"]) if info.get("v2_path") else None)
                cgs.append(cg)
                cg.create(g["cpu_share"], 4096, g.get("by_weight", False))
                cg.add(pid)
        for p in procs:
            p.stdin.write("GO\n")
            p.stdin.flush()
        return [float(p.stdout.readline().split()[1]) for p in procs]
    finally:
        cgroups.PERIOD_US = 100_000
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for cg in cgs:
            cg.remove()
        cgroups.remove_run(run_id, info["version"], Path(info["v2_path"]) if info.get("v2_path") else None)


def _sigterm(signum, frame):
    raise KeyboardInterrupt  # the finally blocks remove workers and cgroups, as on Ctrl-C


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=6.0, help="how long each case runs")
    ap.add_argument("--quotas", default="0.25,0.0667", help="quotas to try (cores)")
    ap.add_argument("--periods-ms", default="100,15", help="CFS periods to try with each quota")
    ap.add_argument("--shares", default="1,0.5,0.5,0.25,0.25,0.25", help="cpu_share of each weight-shared worker")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_throttle: needs root (cgroups)")
        return 1
    signal.signal(signal.SIGTERM, _sigterm)
    print(f"load average at start: {os.getloadavg()}")
    ref = run_case(a.seconds, [None])[0]
    rows = [("alone", ref)]
    for q in (float(x) for x in a.quotas.split(",")):
        for period in (int(float(x) * 1000) for x in a.periods_ms.split(",")):
            if q * period >= 1000:  # the kernel's least quota is 1 ms
                rows.append((f"quota {q:g} / period {period // 1000} ms",
                             run_case(a.seconds / q * 0.25, [{"cpu_share": q, "period_us": period}])[0]))
    shares = [float(x) for x in a.shares.split(",")]
    weighted = run_case(a.seconds, [{"cpu_share": s, "by_weight": True} for s in shares])
    for s in sorted(set(shares), reverse=True):
        vals = [v for v, x in zip(weighted, shares) if x == s]
        rows.append((f"weight, {len(shares)} workers: share {s:g} (mean of {len(vals)})", sum(vals) / len(vals)))
    for work, sleep in ((25, 75), (5, 95)):
        rows.append((f"sleep {work}/{sleep} ms", run_case(a.seconds, [None], work, sleep)[0]))
    print(f"{'case':48s} {'products/cpu-s':>15s} {'ratio':>7s}")
    for name, v in rows:
        print(f"{name:48s} {v:15.0f} {v / ref:7.2f}")
    print(f"load average at end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
