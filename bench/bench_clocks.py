#!/usr/bin/env python
"""The virtual clock, or released rounds, against the real emulation: one scenario (default
scenarios/legend-ci.yaml, all five strategies) run twice, one run after the other, on this
machine.

- **real**: the machine's default backend (netns as root, with the scenario's `cpu_limit`; the
  process backend elsewhere), dilation as the scenario says;
- the second run, by `--second`: **virtual** (default), `clock: virtual` on the process backend;
  or **released**, the first run again with `release_waits: true` (testbed/release.py).

It prints, per strategy and for the run: whether every round's accuracy is the same in both,
how each device's time in each round (download + compute + upload, emulated seconds) compares
(median and worst of second / real, and how many are within 10%); then the same for the
compute phases alone and for each round's time. The real devices are taken by their CPU model
(without `host_short_s`, the time the host added where it gave a device less than its share),
at the second run's host speed (the median, per round, of second / real CPU seconds of the same
work: the host is not equally fast in two runs); a line "as recorded" compares with the real
times as they were, and says how many real node-rounds the host stretched. The host speed's
median and range follow, each device's times added over its rounds (second / real), and how
far each device's emulated seconds per CPU second differ between the clocks (the CPU model: 1
when both apply the same). Then the real wall time of each run and their
ratio, and each run's host efficiency (training CPU / (cores x real round time)), per strategy
and for the run.
Nothing asserts. Both runs are written under --out (default: a temporary folder, removed).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from testbed.vclock import agreement  # noqa: E402


def run(scenario: str, out: Path, sets: list[str]) -> tuple[float, list[dict], dict]:
    """One run as a user starts it: (real seconds, rounds.jsonl rows, summary)."""
    args = [sys.executable, "-m", "testbed", "run", scenario, "--out", str(out)]
    for s in sets:
        args += ["--set", s]
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines() if line.strip()]
    return took, rows, json.loads((out / "summary.json").read_text())


SECOND = {"virtual": "clock=virtual", "released": "release_waits=true"}


def describe(label: str, ratios: list[float], second: str = "virtual") -> str:
    if not ratios:
        return f"{label:10s} no device answered in both runs"
    within = sum(abs(r - 1) <= 0.10 for r in ratios)
    worst = max(ratios, key=lambda r: abs(r - 1))
    return (f"{label:10s} device-rounds {len(ratios):3d}  {second}/real median {statistics.median(ratios):.3f}  "
            f"worst {worst:.3f}  within 10%: {within}/{len(ratios)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", default="scenarios/legend-ci.yaml")
    ap.add_argument("--set", action="append", default=[], help="a scenario override for both runs")
    ap.add_argument("--out", default=None, help="keep both runs here (default: a temporary folder)")
    ap.add_argument("--second", choices=sorted(SECOND), default="virtual", help="what the second run changes")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(a.out) if a.out else Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        real_s, real, real_sum = run(a.scenario, base / "real", a.set)
        other_s, other, other_sum = run(a.scenario, base / a.second, [*a.set, SECOND[a.second]])
    report(a.scenario, a.set, a.second, agreement(real, other), (real_s, other_s), (real_sum, other_sum))
    return 0


def report(scenario: str, sets: list[str], second: str, agree, took: tuple[float, float],
           summaries: tuple[dict, dict]) -> None:
    print(f"scenario {scenario} {' '.join(sets)}; second run: {second}")
    for name in dict.fromkeys(s for s, *_ in agree.accuracy_pairs):
        same = all(x == y for s, _, x, y in agree.accuracy_pairs if s == name)
        print(describe(name, [r for s, *_, r in agree.device_ratios if s == name], second)
              + f"  accuracy {'identical' if same else 'DIFFERS'} in every round")
    print(describe("all", [r for *_, r in agree.device_ratios], second)
          + f"  accuracy {'identical' if agree.accuracy_identical else 'DIFFERS'} in every round")
    print(describe("recorded", [r for *_, r in agree.recorded_ratios], second)
          + f"  (the real times as recorded: the host stretched {len(agree.host_short)} real node-rounds, "
          f"{sum(s > 0.10 for *_, s in agree.host_short)} by over 10%)")
    print(describe("compute", [r for *_, r in agree.compute_ratios], second) + "  (compute phases alone)")
    print(describe("rounds", [r for *_, r in agree.round_ratios], second).replace("device-rounds", "rounds       ")
          + "  (each round's emulated time)")
    if agree.device_totals:
        worst = [max((r for _, r in totals), key=lambda r: abs(r - 1)) for totals in (agree.compute_totals,
                                                                                     agree.device_totals)]
        print(f"each device over its rounds: compute worst {worst[0]:.3f}, whole time worst {worst[1]:.3f}; "
              f"all rounds' time {second}/real {agree.rounds_total:.3f}")
    speeds = [r for *_, r in agree.host_speed]
    if speeds:
        print(f"host speed: {second}/real CPU seconds of the same work, per round: median {statistics.median(speeds):.3f}, "
              f"{min(speeds):.3f}-{max(speeds):.3f} (the real compute above is taken at the {second} run's speed)")
    if agree.model_ratios:
        worst = max((r for *_, r in agree.model_ratios), key=lambda r: abs(r - 1))
        print(f"CPU model: emulated compute per CPU second, {second}/real: worst {worst:.4f} "
              f"of {len(agree.model_ratios)} device-rounds")
    for s, rnd, x, y in [p for p in agree.accuracy_pairs if p[2] != p[3]]:
        print(f"  accuracy differs: {s} round {rnd}: real {x}, {second} {y}")
    print(f"real wall time: real clock {took[0]:.1f} s, {second} {took[1]:.1f} s, "
          f"ratio {second}/real {took[1] / took[0]:.3f}")
    for name in (summaries[0].get("strategies") or {}):
        eff = [(s.get("strategies") or {}).get(name, {}).get("host_efficiency") or 0 for s in summaries]
        print(f"host efficiency {name:10s} real clock {eff[0]:.2f}, {second} {eff[1]:.2f}")
    print(f"host efficiency, the run: real clock {summaries[0].get('host_efficiency') or 0:.2f}, "
          f"{second} {summaries[1].get('host_efficiency') or 0:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
