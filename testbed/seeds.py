"""Repeated trials: one scenario run once per seed, and the spread of the results over the seeds.

`run SCENARIO --seeds 1,2,3` (or `seeds:` in the scenario) runs the scenario once per seed into
OUT/seed-<s>/, each an ordinary run folder, then writes OUT/summary.json with each strategy's
mean, minimum, maximum and 95% interval of the mean over the seeds, and OUT/report.md with
error bars. `--resume OUT` goes on seed by seed: a finished seed is kept, an interrupted one
resumes from its checkpoint, one not begun starts.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from .report import given_text
from .scenario import Scenario

SUMMARY, REPORT, PLOT = "summary.json", "report.md", "seeds.png"
METRICS = ("time_to_target_s", "bytes_to_target", "final_accuracy", "best_accuracy", "speedup",
           "accuracy_at_baseline_time", "total_bytes_up")
# Student's t, 97.5% quantile, by degrees of freedom (1..30); beyond that the normal 1.96
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def seed_dir(out: Path, seed: int) -> Path:
    return Path(out) / f"seed-{seed}"


def spread(values: list[float | None]) -> dict:
    """Mean, minimum, maximum and the 95% interval of the mean (Student's t) over the values that
    exist (a strategy that did not reach its target in a seed has no time to target there)."""
    xs = [float(v) for v in values if v is not None]
    n = len(xs)
    out = {"n": n, "of": len(values), "mean": None, "min": None, "max": None, "ci95": None}
    if not n:
        return out
    mean = sum(xs) / n
    out.update(mean=mean, min=min(xs), max=max(xs))
    if n > 1:
        sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
        half = (T975[n - 2] if n - 1 <= len(T975) else 1.96) * sd / math.sqrt(n)
        out["ci95"] = [mean - half, mean + half]
    return out


def summarize_seeds(per_seed: dict[int, dict]) -> dict:
    """summary.json of a campaign from each seed's summary.json."""
    first = next(iter(per_seed.values()))
    names = list(dict.fromkeys(n for s in per_seed.values() for n in s.get("strategies", {})))
    strategies = {}
    for name in names:
        runs = [s.get("strategies", {}).get(name, {}) for s in per_seed.values()]
        strategies[name] = {**{m: spread([r.get(m) for r in runs]) for m in METRICS}, "by_class": _classes(runs)}
    unfaithful = {str(seed): s["emulation_warnings"] for seed, s in sorted(per_seed.items())
                  if s.get("emulation_warnings")}
    return {"seeds": sorted(per_seed), "baseline": first.get("baseline"), "target_accuracy": first.get("target_accuracy"),
            "strategies": strategies, "emulation_warnings": unfaithful}


def _classes(runs: list[dict]) -> dict:
    """Per device class over the seeds: its peak memory (the spread of each seed's largest), how
    its node-rounds ended and what it was given (summed over the seeds)."""
    profiles = sorted({p for r in runs for p in (r.get("by_class") or r.get("peak_memory_mb") or {})})
    out = {}
    for p in profiles:
        status: dict[str, int] = {}
        given: dict[str, dict] = {}
        for r in runs:
            c = (r.get("by_class") or {}).get(p, {})
            for k, n in c.get("status", {}).items():
                status[k] = status.get(k, 0) + n
            for key, counts in c.get("given", {}).items():
                _merge(given.setdefault(key, {}), counts)
        out[p] = {"peak_memory_mb": spread([(r.get("peak_memory_mb") or {}).get(p) for r in runs]),
                  "status": status, "given": given}
    return out


def _merge(into: dict, counts: dict) -> None:
    if "range" in counts:
        lo, hi = into.get("range", counts["range"])
        into["range"] = [min(lo, counts["range"][0]), max(hi, counts["range"][1])]
    else:
        for v, n in counts.items():
            into[v] = into.get(v, 0) + n


def run_seeds(sc: Scenario, out: Path, seeds: list[int], *, backend: str | None = None, source: str | None = None,
              resume: bool = False, say=print) -> dict:
    """Run the scenario once per seed (resuming what an interrupted campaign left) and summarize."""
    from .runner import Run
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    per_seed = {}
    for seed in seeds:
        d = seed_dir(out, seed)
        status = _status(d)
        one = sc.model_copy(update={"seed": seed})
        if status == "finished":
            say(f"seed {seed}: finished earlier, kept ({d})")
        else:
            go_on = resume and (d / "checkpoint.pkl").is_file()
            if resume and status is not None and not go_on:
                raise ValueError(f"{d}: seed {seed} stopped before its first round finished (no checkpoint); "
                                 f"remove {d} to run it again")
            say(f"seed {seed}: {'resuming' if go_on else 'running'} into {d}")
            Run(one, d, backend=backend, source=source, resume=go_on).execute()
        per_seed[seed] = json.loads((d / "summary.json").read_text())
    summary = summarize_seeds(per_seed)
    (out / SUMMARY).write_text(json.dumps(summary, indent=2))
    write_seeds_report(out, summary)
    return summary


def is_campaign(out: Path) -> bool:
    return any(Path(out).glob("seed-*/manifest.json"))


def rewrite_campaign(out: Path, recompute: bool = False) -> list[Path]:
    """Rewrite each finished seed's report (and, with `recompute`, its summary) and the
    campaign's summary.json and report: `testbed report` on a folder of `--seeds`."""
    from .report import write_report
    out = Path(out)
    per_seed, paths = {}, []
    for d in sorted(out.glob("seed-*"), key=lambda d: int(d.name.split("-", 1)[1])):
        if _status(d) == "finished":
            paths += write_report(d, recompute=recompute)
            per_seed[int(d.name.split("-", 1)[1])] = json.loads((d / "summary.json").read_text())
    if not per_seed:
        raise ValueError("no finished seed-<s> folder here")
    summary = summarize_seeds(per_seed)
    (out / SUMMARY).write_text(json.dumps(summary, indent=2))
    return [out / SUMMARY, *write_seeds_report(out, summary), *paths]


def _status(d: Path) -> str | None:
    try:
        return json.loads((d / "manifest.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


def _cell(s: dict, scale: float = 1.0, spec: str = ".3f") -> str:
    if s["mean"] is None:
        return f"n/a (0/{s['of']})"
    text = f"{s['mean'] / scale:{spec}}"
    if s["ci95"]:
        text += f" [{s['ci95'][0] / scale:{spec}}, {s['ci95'][1] / scale:{spec}}]"
    return text + (f" ({s['n']}/{s['of']})" if s["n"] < s["of"] else "")


def write_seeds_report(out: Path, summary: dict) -> list[Path]:
    """report.md (means, 95% intervals, how many seeds each figure rests on) and seeds.png (error bars)."""
    rows = summary["strategies"]
    lines = [f"# Repeated trials: seeds {', '.join(map(str, summary['seeds']))}", "",
             f"Baseline {summary['baseline']}, target accuracy {summary['target_accuracy']}. Each cell: the mean "
             "over the seeds, [the 95% interval of the mean], (the number of seeds it rests on, where not all: "
             "a strategy that missed the target in a seed has no time to target there). Each seed's own "
             "report is in its folder.", "",
             "| strategy | time to target (s) | MB to target | final accuracy | best accuracy | speedup "
             "| accuracy at baseline time | MB up in all |",
             "|---|---|---|---|---|---|---|---|"]
    for name, m in rows.items():
        lines.append(f"| {name} | {_cell(m['time_to_target_s'], 1, '.1f')} | {_cell(m['bytes_to_target'], 1e6, '.2f')} "
                     f"| {_cell(m['final_accuracy'])} | {_cell(m['best_accuracy'])} | {_cell(m['speedup'], 1, '.2f')} "
                     f"| {_cell(m['accuracy_at_baseline_time'])} | {_cell(m['total_bytes_up'], 1e6, '.1f')} |")
    lines += ["", "## Device classes", "",
              "Peak memory: the mean over the seeds of the largest peak a device of the class reported "
              "[95% interval]. Node-rounds: how the class's devices ended their rounds, over all seeds. "
              "Given: each field of the plan records, value (node-rounds).", "",
              "| strategy | class | peak memory (MB) | node-rounds ok / dropped / failed | given |", "|---|---|---|---|---|"]
    for name, m in rows.items():
        for p, c in (m.get("by_class") or {}).items():
            st = c["status"]
            lines.append(f"| {name} | {p} | {_cell(c['peak_memory_mb'], 1, '.0f')} | {st.get('ok', 0)} / "
                         f"{st.get('dropped', 0)} / {st.get('failed', 0) + st.get('rejected', 0)} "
                         f"| {given_text(c['given'])} |")
    if summary.get("emulation_warnings"):
        lines += ["", "## Seeds whose emulation was not faithful", "",
                  "The host did not give these seeds' devices what their profiles say, so their times are "
                  "not comparable with the other seeds' (each seed's report has the details):", ""]
        lines += [f"- seed {s}: {w}" for s, ws in summary["emulation_warnings"].items() for w in ws]
    lines += ["", f"![error bars]({PLOT})", "", "Seeds:", ""]
    lines += [f"- [seed {s}](seed-{s}/report.md)" for s in summary["seeds"]]
    (out / REPORT).write_text("\n".join(lines) + "\n")
    _plot(rows, out / PLOT)
    return [out / REPORT, out / PLOT]


def _plot(rows: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(rows)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, metric, label in ((axes[0], "time_to_target_s", "time to target (emulated s)"),
                              (axes[1], "final_accuracy", "final accuracy")):
        for i, name in enumerate(names):
            s = rows[name][metric]
            if s["mean"] is None:
                continue
            lo, hi = s["ci95"] or (s["mean"], s["mean"])
            ax.errorbar([i], [s["mean"]], yerr=[[s["mean"] - lo], [hi - s["mean"]]], fmt="o", capsize=4)
            ax.plot([i, i], [s["min"], s["max"]], "_", color="grey")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle("mean and 95% interval over the seeds (grey: min and max)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
