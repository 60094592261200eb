"""What growing the number of live nodes costs on one host: memory and time to register.

For each node count N: start N nodes of the smoke model (all-minilm-l6-v2, 6 blocks) on a
backend, forked from the node zygote or as separate interpreters, wait until all are
registered (HELLO, WELCOME with their data shard, model loaded, "ready"), then let every node
train one LoRA round (rank 8 on every block, 1 step, batch 16, length 32) in waves of --wave
nodes at a time, as a round samples them. Printed per N:

- register s: from starting the zygote (or the first node) until all N are ready;
- host MB: the host's used memory (total - available) at its peak over the whole run, minus
  before the run; sampled every 0.1 s, so the benchmark process itself (model for the initial
  LoRA state, aggregator) is in it too;
- host MB/node: that over N;
- idle USS / trained USS: each node's private memory (psutil USS: pages only it maps) when all
  are registered, and after every node has trained once (median and max over nodes);
- wave peak MB: the largest rise of host memory while one wave trained (what --wave nodes
  training at once add).

    .venv/bin/python bench/bench_scale.py [--nodes 10,40,80,120] [--wave 10] [--backend process|netns]
                                          [--no-zygote] [--separate 10]

--separate N also runs N separate interpreters (no zygote) for comparison. Traffic stays on
127.0.0.1 (process) or the run's own bridge (netns). Nothing here asserts on time.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from tempfile import TemporaryDirectory

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import psutil  # noqa: E402

from emulation.hostmem import PeakSampler, used_mb  # noqa: E402
from emulation.launch import Launcher  # noqa: E402
from node.data import announce  # noqa: E402
from node.plan import LoraSpec, Plan, TrainSpec  # noqa: E402

PLAN = Plan("lora", (0, 1, 2, 3, 4, 5), lora=LoraSpec(r=8, alpha=16),
            train=TrainSpec(local_steps=1, batch_size=16, max_len=32, lr=0.005, seed=0))


def node_uss(backend, names) -> list[float]:
    out = []
    for n in names:
        p = backend.procs.get(n)
        try:
            out.append(psutil.Process(p.pid).memory_full_info().uss / 2**20)
        except (psutil.Error, AttributeError):
            pass
    return out


def measure(n: int, backend_name: str, zygote: bool, wave: int, base, tensors) -> dict:
    from emulation.backends import BACKENDS
    from emulation.probe import probe
    from emulation.profiles import get_profile
    from node import trainer
    from testbed.aggregator import Aggregator
    run_id = f"bench-scale-{n}-{uuid.uuid4().hex[:6]}"
    names = [f"n{i:03d}" for i in range(n)]
    rng = np.random.default_rng(0)
    shards = {name: rng.choice(8000, size=64, replace=False).astype(np.int32) for name in names}
    spec = trainer.ModelSpec()
    profile = get_profile("host")

    def welcome(name):
        return ({"model": asdict(spec), "data": announce("rotten_tomatoes", 32)},
                {"shard": shards[name]})

    with TemporaryDirectory() as tmp:
        backend = BACKENDS[backend_name](run_id, Path(tmp), probe())
        peak = PeakSampler()
        before = used_mb()
        peak.start()
        agg = None
        try:
            t0 = time.monotonic()
            backend.prepare(asdict(spec), "rotten_tomatoes", zygote)
            agg = Aggregator(run_id, {x: profile.name for x in names}, welcome,
                             bind=backend.bind_address("127.0.0.1"))
            endpoint = f"tcp://{backend.connect_address(agg.bind)}:{agg.port}"
            launcher = Launcher(run_id, endpoint, 1.0)
            for name in names:
                backend.start(launcher.launch(name, profile))
            ready = agg.wait_ready(set(names), 1800, backend.alive)
            register_s = time.monotonic() - t0
            if ready != set(names):
                raise RuntimeError(f"{n - len(ready)} nodes did not register")
            time.sleep(1.0)
            idle = node_uss(backend, names)
            host_idle = used_mb() - before
            wave_peaks = []
            for i in range(0, n, wave):
                start = peak.reset()
                group = names[i:i + wave]
                out = agg.run_round(1 + i // wave, "bench", {x: (PLAN.to_dict(), tensors) for x in group}, 1800,
                                    backend.alive, lambda *a: None)
                ok = sum(1 for r in out.records.values() if r.status == "ok")
                if ok != len(group):
                    bad = {k: r.reason for k, r in out.records.items() if r.status != "ok"}
                    raise RuntimeError(f"wave {i // wave}: {len(group) - ok} nodes failed: {bad}")
                wave_peaks.append(peak.peak - start)
            time.sleep(1.0)
            trained = node_uss(backend, names)
        finally:
            if agg is not None:
                agg.close(say_bye=True)
            backend.teardown()
            peak.stop()
    host = peak.peak - before
    return {"nodes": n, "mode": "zygote" if zygote else "separate", "register_s": register_s, "host_mb": host,
            "host_idle_mb": host_idle, "per_node_mb": host / n,
            "idle_uss_med": statistics.median(idle), "idle_uss_max": max(idle),
            "trained_uss_med": statistics.median(trained), "trained_uss_max": max(trained),
            "wave_peak_mb": max(wave_peaks)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", default="10,40,80,120")
    ap.add_argument("--wave", type=int, default=10, help="nodes that train at the same time")
    ap.add_argument("--backend", default="process", choices=["process", "netns"])
    ap.add_argument("--no-zygote", action="store_true")
    ap.add_argument("--separate", type=int, default=0, help="also run this many separate interpreters")
    a = ap.parse_args(argv)
    from node import trainer
    base, _ = trainer.load_base(trainer.ModelSpec())
    tensors = trainer.trainable_state(trainer.build_model(base, PLAN))
    runs = [(int(x), not a.no_zygote) for x in a.nodes.split(",") if x]
    if a.separate:
        runs.insert(0, (a.separate, False))
    print(f"backend {a.backend}; wave {a.wave}; host {psutil.cpu_count()} cores, "
          f"{psutil.virtual_memory().total / 2**30:.1f} GiB; model all-minilm-l6-v2 (6 blocks)", flush=True)
    cols = ("nodes", "mode", "register_s", "host_idle_mb", "host_mb", "per_node_mb", "idle_uss_med", "idle_uss_max",
            "trained_uss_med", "trained_uss_max", "wave_peak_mb")
    head = ["nodes", "mode", "register s", "host MB idle", "host MB peak", "host MB/node", "idle USS med",
            "idle USS max", "trained USS med", "trained USS max", "wave peak MB"]
    print(" ".join(f"{h:>15}" for h in head))
    for n, z in runs:
        r = measure(n, a.backend, z, a.wave, base, tensors)
        print(" ".join(f"{r[c]:>15.1f}" if isinstance(r[c], float) else f"{r[c]:>15}" for c in cols), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
