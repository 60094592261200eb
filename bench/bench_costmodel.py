#!/usr/bin/env python
"""Cost model against the real node: peak memory predicted vs measured, plan by plan.

Each plan runs one round of node.trainer.train in a fresh interpreter
(testbed.costmodel.measure_round: 1 torch thread, the real all-MiniLM-L6-v2, Rotten Tomatoes).
For each plan this prints:

- idle: RSS of the child with the model loaded and the data tokenized, before anything else;
- measured: the node's peak_mem_mb for the round;
- predicted: estimate(...).peak_memory_mb with runtime_mb = runtime_mb_from_idle(idle) (the
  weights, which transformers pages in lazily, + the code of the training kernels), i.e. not
  fitted to the measured peak;
- err: (predicted - measured) / measured;
- the model's parts: activations autograd saves, the heap retention term (buffers the
  forward frees between kept ones, which glibc keeps resident), the phase that sets the
  peak, and live = the prediction with allocator "returning" (no retention).

`--malloc-fixed` runs the children with MALLOC_MMAP_THRESHOLD_=131072 (glibc then returns
every large buffer at free) and predicts with allocator "returning".
Nothing asserts; this prints figures only. About 2-4 minutes on this 2-core machine
(`--quick`: 3 plans, about 40 s).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from node.plan import LoraSpec, Plan, TrainSpec  # noqa: E402
from testbed import costmodel as cm  # noqa: E402


def lora(blocks=None, B=16, T=32, r=8, **kw):
    lo = LoraSpec(r=r, alpha=2 * r, **kw)
    return Plan("lora", blocks, lora=lo, train=TrainSpec(local_steps=3, batch_size=B, max_len=T, lr=1e-3, seed=0))


def full(blocks=None, B=16, T=32, emb=False):
    return Plan("full", blocks, train_embeddings=emb,
                train=TrainSpec(local_steps=3, batch_size=B, max_len=T, lr=1e-3, seed=0))


PLANS = {
    "lora-all r8 b16 t32": lora(None, 16, 32),
    "lora-all r8 b32 t64": lora(None, 32, 64),
    "lora-top2 (8,4) b16 t64": lora([4, 5], 16, 64, rank_pattern={5: 8, 4: 4}),
    "lora-all r8 b8 t128": lora(None, 8, 128),
    "lora-all r8 b64 t64": lora(None, 64, 64),
    "full-last1 b16 t32": full([5], 16, 32),
    "full-last2 b32 t64": full([4, 5], 32, 64),
    "full-all b16 t64": full(None, 16, 64),
    "full-all+emb b16 t64": full(None, 16, 64, emb=True),
    "full-emb-only b16 t32": full([], 16, 32, emb=True),
    "head-only b32 t64": full([], 32, 64),
    "full-all b32 t128": full(None, 32, 128),
}
QUICK = ["lora-all r8 b16 t32", "full-last2 b32 t64", "full-all+emb b16 t64"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--jobs", type=int, default=2, help="children at a time (each uses 1 thread)")
    ap.add_argument("--malloc-fixed", action="store_true", help="children with MALLOC_MMAP_THRESHOLD_=131072")
    ap.add_argument("--plans", default=None, help="comma-separated plan names (default: all)")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--reuse", default=None, help="take the measurements from a file --json wrote (no children)")
    a = ap.parse_args()
    names = QUICK if a.quick else (a.plans.split(",") if a.plans else list(PLANS))
    env = {"MALLOC_MMAP_THRESHOLD_": "131072"} if a.malloc_fixed else None
    arch = cm.MINILM_L6
    allocator = "returning" if a.malloc_fixed else "glibc"
    t0 = time.time()
    if a.reuse:
        old = {row["plan"]: row for row in json.loads(Path(a.reuse).read_text())}
        names = [n for n in names if n in old]
        results = {n: {k: old[n][k] for k in ("idle_rss_mb", "received_rss_mb", "peak_mb", "compute_s",
                                              "trained_params", "loss")} for n in names}
    else:
        with ThreadPoolExecutor(a.jobs) as ex:
            results = dict(zip(names, ex.map(lambda n: cm.measure_round(PLANS[n], env=env), names)))
    rows = []
    print(f"{'plan':26s} {'idle':>5s} {'measured':>8s} {'predicted':>9s} {'err':>6s}  {'act':>5s} {'retain':>6s} "
          f"{'live':>5s}  phase")
    for n in names:
        r, plan = results[n], PLANS[n]
        runtime = cm.runtime_mb_from_idle(arch, r["idle_rss_mb"])
        c = cm.estimate(arch, plan, runtime_mb=runtime, allocator=allocator)
        c0 = cm.estimate(arch, plan, runtime_mb=runtime, allocator="returning")
        m = c.breakdown["memory_mb"]
        err = (c.peak_memory_mb - r["peak_mb"]) / r["peak_mb"]
        rows.append({"plan": n, **r, "predicted_mb": c.peak_memory_mb, "predicted_live_mb": c0.peak_memory_mb,
                     "activations_mb": m["activations"], "err": err, "phase": m["peak_phase"],
                     "trained_params_model": c.trained_params})
        print(f"{n:26s} {r['idle_rss_mb']:5.0f} {r['peak_mb']:8.0f} {c.peak_memory_mb:9.0f} {err:+6.1%}  "
              f"{m['activations']:5.0f} {m['retained']:6.0f} {c0.peak_memory_mb:5.0f}  {m['peak_phase']}"
              + ("" if r["trained_params"] == c.trained_params else "  TRAINED PARAMS DIFFER"))
    errs = [abs(row["err"]) for row in rows]
    malloc = "fixed threshold" if a.malloc_fixed else "default"
    print(f"({len(names)} plans, {time.time() - t0:.0f} s, malloc {malloc}, "
          f"allocator {allocator!r}; |err| max {max(errs):.1%}, mean {sum(errs) / len(errs):.1%})")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
