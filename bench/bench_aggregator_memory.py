#!/usr/bin/env python
"""The aggregator's peak memory in one round against the number of nodes: results held in
memory, or spilled to files as they arrive (testbed/spill.py, `aggregator.hold_mb`).

Each case runs in a fresh interpreter: a real testbed.aggregator.Aggregator on 127.0.0.1, N fake
nodes in one child process (bench_aggregator.serve_nodes: each echoes its task's tensors after
--train-s, node i another i x --stagger-s: 0 makes every result arrive at once, the worst case
for memory), and one round as rounds.RoundLoop runs it: Full (last 2 blocks of all-MiniLM-L6-v2,
14.8 MB a node) configures, Aggregator.run_round collects with the runner's check_result (and,
spilled, `keep=Spill.keep`), Full.aggregate averages. It prints the case's peak resident memory
(VmHWM) above its resident memory before the round, the MB of results, the round's wall time,
and whether the spilled aggregate is bit for bit the held one (every case aggregates the same
echoed tensors). Nothing asserts.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for p in (HERE, HERE.parent):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> None:
    """Make VmHWM start from the current RSS (Linux: writing 5 to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def case(n_nodes: int, spilled: bool, train_s: float, stagger_s: float) -> dict:
    import hashlib

    import numpy as np
    from bench_aggregator import SAMPLES, close, payload_state, strategy_for

    from testbed.aggregator import Aggregator
    from testbed.rounds import check_result
    from testbed.spill import Spill
    from testbed.strategies import NodeInfo, Update

    names = [f"node-{i:03d}" for i in range(n_nodes)]
    welcome = lambda name: ({"model": {}, "data": {}}, {"shard": np.arange(10, dtype=np.int32)})  # noqa: E731
    agg = Aggregator("bench-mem", {n: "bench" for n in names}, welcome, bind="127.0.0.1")
    child = subprocess.Popen([sys.executable, str(HERE / "bench_aggregator.py"), "--serve-nodes", agg.endpoint,
                              "--names", ",".join(names), "--train-s", str(train_s), "--stagger-s", str(stagger_s)])
    alive = lambda name: child.poll() is None  # noqa: E731
    tmp = tempfile.TemporaryDirectory(prefix="bench-spill-")
    spill = Spill(Path(tmp.name) / "spill")
    try:
        if agg.wait_ready(set(names), 60.0, alive) != set(names):
            raise RuntimeError("not every fake node registered")
        strat, state = strategy_for("full-last2"), payload_state("full-last2")
        tasks = strat.configure(1, [NodeInfo(n, None, SAMPLES) for n in names], state)
        before_kb = _status_kb("VmRSS")
        _reset_peak()
        t0 = time.perf_counter()
        out = agg.run_round(1, strat.name, {n: (t.plan.to_dict(), t.tensors) for n, t in tasks.items()}, 120.0,
                            alive, lambda n, sent, msg: check_result(sent, msg), keep=spill.keep if spilled else None)
        updates = [Update(n, tasks[n].plan, m.tensors, int(m.meta["samples"]), dict(m.meta))
                   for n, m in sorted(out.results.items())]
        new, _ = strat.aggregate(1, updates, state)
        wall = time.perf_counter() - t0
        peak_kb = _status_kb("VmHWM")
        digest = hashlib.sha256(b"".join(new[k].tobytes() for k in sorted(new))).hexdigest()[:16]
        results_mb = sum(v.nbytes for t in tasks.values() for v in t.tensors.values()) / 1e6
        if len(updates) != n_nodes:
            raise RuntimeError(f"{len(updates)} of {n_nodes} results")
        return {"nodes": n_nodes, "mode": "spilled" if spilled else "held", "stagger_s": stagger_s, "results_mb": results_mb,
                "peak_mb": (peak_kb - before_kb) / 1024, "wall_s": wall, "digest": digest}
    finally:
        spill.clear()
        tmp.cleanup()
        close(agg, child)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", default="8,16,32,64", help="comma-separated node counts")
    ap.add_argument("--train-s", type=float, default=0.5, help="emulated training time per task (sleep)")
    ap.add_argument("--stagger-s", default="0,0.05", help="comma-separated: node i answers i x this many "
                    "seconds after the others' training (0: all at once)")
    ap.add_argument("--case", nargs=3, metavar=("NODES", "MODE", "STAGGER"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.case:
        print(json.dumps(case(int(a.case[0]), a.case[1] == "spilled", a.train_s, float(a.case[2]))))
        return 0
    print(f"{'nodes':>5} {'stagger s':>9} {'mode':<8} {'results MB':>10} {'peak above start MB':>19} "
          f"{'per node MB':>11} {'round s':>7}  aggregate")
    for n, stagger in ((int(x), float(y)) for y in a.stagger_s.split(",") for x in a.nodes.split(",")):
        rows = []
        for mode in ("held", "spilled"):
            proc = subprocess.run([sys.executable, __file__, "--case", str(n), mode, str(stagger),
                                   "--train-s", str(a.train_s)], capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{n:5d} {stagger:9.2f} {mode:<8} failed: {proc.stderr[-800:]}")
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        for r in rows:
            same = "identical" if len({x["digest"] for x in rows}) == 1 else "DIFFERS"
            print(f"{r['nodes']:5d} {r['stagger_s']:9.2f} {r['mode']:<8} {r['results_mb']:10.1f} {r['peak_mb']:19.1f} "
                  f"{r['peak_mb'] / r['nodes']:11.2f} {r['wall_s']:7.2f}  {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
