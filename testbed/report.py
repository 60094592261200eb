"""Turn a run folder into numbers and pictures a human can compare.

A run folder holds ``manifest.json``, ``rounds.jsonl`` and (normally)
``summary.json``. This module recomputes the summary when it is missing and
writes ``report.md`` plus three plots next to them. Strategies are compared at
equal *emulated* time (``elapsed_s``), because wall time on the test host says
nothing about the devices being emulated.
"""
from __future__ import annotations

import json
from pathlib import Path

MANIFEST, ROUNDS, SUMMARY, REPORT = "manifest.json", "rounds.jsonl", "summary.json", "report.md"
ACC_PNG, BYTES_PNG, TIMELINE_PNG = "accuracy_vs_time.png", "bytes_vs_time.png", "timeline.png"
ENERGY_PNG = "accuracy_vs_energy.png"
MB = 1e6
_EPS = 1e-9  # float slack when comparing emulated times
_PHASES = [("download_s", "download", "tab:blue"), ("compute_s", "compute", "tab:orange"),
           ("upload_s", "upload", "tab:green"), ("wait_s", "wait", "tab:purple")]
_STYLE = {**{lbl: {"facecolor": c, "edgecolor": "none"} for _, lbl, c in _PHASES},
          "dropped": {"facecolor": "lightgrey", "edgecolor": "grey", "hatch": "//"},
          "failed": {"facecolor": "lightgrey", "edgecolor": "dimgrey", "hatch": "xx"}}


# ---------------------------------------------------------------- summary
def _by_strategy(rounds: list[dict]) -> dict[str, list[dict]]:
    """Group rows per strategy (first-seen order) sorted by round, since the
    log interleaves strategies and may not be ordered."""
    groups: dict[str, list[dict]] = {}
    for row in rounds:
        groups.setdefault(row["strategy"], []).append(row)
    return {k: sorted(v, key=lambda r: r.get("round", 0)) for k, v in groups.items()}


def _elapsed(rows: list[dict]) -> list[float]:
    """Emulated time after each row: ``elapsed_s`` when logged, otherwise the
    running sum of ``wall_s`` (older runs did not log emulated time)."""
    out, t = [], 0.0
    for r in rows:
        t = float(r["elapsed_s"]) if r.get("elapsed_s") is not None else t + float(r.get("wall_s") or 0)
        out.append(t)
    return out


def _acc(row: dict) -> float | None:
    a = row.get("accuracy")
    return None if a is None or a != a else float(a)  # drop None and NaN


def _bytes(row: dict) -> int:
    return int(row.get("bytes_up") or 0) + int(row.get("bytes_down") or 0)


TOP_CHOICES = 4  # a class's most frequent values of a choice that are listed; the rest are counted


def _by_class(rows: list[dict]) -> dict[str, dict]:
    """Per device class (profile): how its devices fared (ok / dropped / failed / rejected, over
    all rounds) and what the strategy gave them: for each field of the plan record, how often
    each value came (the blocks as their number; a number that varies per round as its range)."""
    out: dict[str, dict] = {}
    for r in rows:
        for nd in r.get("nodes") or []:
            c = out.setdefault(str(nd.get("profile", "?")), {"status": {}, "given": {}})
            c["status"][nd.get("status", "?")] = c["status"].get(nd.get("status", "?"), 0) + 1
            for key, value in (nd.get("plan") or {}).items():
                _tally(c["given"], "trained blocks" if key == "blocks" else key,
                       len(value) if key == "blocks" and isinstance(value, list) else value)
    return {p: {"status": c["status"], "given": {k: _top(v) for k, v in c["given"].items()}}
            for p, c in sorted(out.items())}


def _tally(given: dict, key: str, value) -> None:
    if isinstance(value, float):
        lo, hi = given.get(key, {}).get("range", [value, value])
        given[key] = {"range": [min(lo, value), max(hi, value)]}
    else:
        counts = given.setdefault(key, {})
        text = value if isinstance(value, str) else json.dumps(value)
        counts[text] = counts.get(text, 0) + 1


def _top(counts: dict) -> dict:
    if "range" in counts:
        return counts
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])
    out = dict(ranked[:TOP_CHOICES])
    if len(ranked) > TOP_CHOICES:
        out["(others)"] = sum(n for _, n in ranked[TOP_CHOICES:])
    return out


def given_text(given: dict) -> str:
    """A class's plan fields in one line: `caff_blocks 2 (30)`, `caff_upload_factor 0.50-0.99`."""
    parts = []
    for key, counts in given.items():
        if key == "method" and len(counts) == 1:
            continue
        if "range" in counts:
            lo, hi = counts["range"]
            parts.append(f"{key} {lo:.3g}" + (f"-{hi:.3g}" if hi != lo else ""))
        else:
            parts.append(f"{key} " + ", ".join(f"{v} ({n})" for v, n in counts.items()))
    return "; ".join(parts) or "-"


def _reached(row: dict, target: float, target_loss: float | None) -> bool:
    """Whether a round reached the target: its loss at or below target_loss when one is set,
    else its accuracy at or above the target accuracy."""
    loss, acc = row.get("loss"), _acc(row)
    return (loss is not None and loss <= target_loss) if target_loss is not None else (acc is not None and acc >= target)


def _energy(rows: list[dict], powers: dict, target: float, target_loss: float | None) -> dict:
    """Joules of the devices sampled in each round (testbed/energy.py): in all, until the target,
    per device class; or the profiles that have no power model."""
    from .energy import Energy, round_energy
    missing = sorted({str(nd.get("profile", "?")) for r in rows for nd in r.get("nodes") or []} - set(powers))
    if missing:
        return {"missing_power": missing}
    total, by_class, to_target, per_round = Energy(), {}, None, []
    for r in rows:
        for cls, e in round_energy(r, powers).items():
            by_class[cls] = by_class.get(cls, Energy()) + e
            total = total + e
        per_round.append(round(total.total_j, 3))
        if to_target is None and _reached(r, target, target_loss):
            to_target = total.total_j
    parts = lambda e: {"total_j": e.total_j, "idle_j": e.idle_j, "compute_j": e.compute_j,  # noqa: E731
                       "radio_j": e.radio_j}
    return {**parts(total), "to_target_j": to_target, "by_class": {c: parts(e) for c, e in sorted(by_class.items())},
            "cumulative_j": per_round}


def _strategy_summary(rows: list[dict], target: float, target_loss: float | None = None,
                      powers: dict | None = None) -> dict:
    times, accs = _elapsed(rows), [_acc(r) for r in rows]
    known = [a for a in accs if a is not None]
    ttt = btt = None
    cum = 0
    for r, t in zip(rows, times):
        cum += _bytes(r)
        if _reached(r, target, target_loss):
            ttt, btt = t, cum
            break
    peaks: dict[str, float] = {}  # profile -> the largest peak memory any of its nodes reported
    for r in rows:
        for nd in r.get("nodes") or []:
            if nd.get("peak_mem_mb"):
                p = str(nd.get("profile", "?"))
                peaks[p] = max(peaks.get(p, 0.0), float(nd["peak_mem_mb"]))
    host = [r["host"]["peak_used_mb"] for r in rows if (r.get("host") or {}).get("peak_used_mb") is not None]
    return {
        "rounds": sum(1 for r in rows if r.get("round", 0) >= 1),
        "peak_memory_mb": dict(sorted(peaks.items())),
        "by_class": _by_class(rows),
        "host_peak_used_mb": max(host, default=None),  # this host's memory in use, all its nodes and the aggregator
        "final_accuracy": accs[-1] if accs else None,
        "best_accuracy": max(known) if known else None,
        "target_accuracy": target,
        "time_to_target_s": ttt,
        "bytes_to_target": btt,
        "total_wall_s": sum(float(r.get("wall_s") or 0) for r in rows),
        "total_bytes_up": sum(int(r.get("bytes_up") or 0) for r in rows),
        "total_bytes_down": sum(int(r.get("bytes_down") or 0) for r in rows),
        # tensor bytes both ways: the blocks (LoRA adapters or whole blocks) and the task head
        "payload_bytes": {part: sum(int((r.get("payload") or {}).get(f"{part}_{way}", 0)) for r in rows
                                    for way in ("up", "down")) for part in ("blocks", "head")},
        "speedup": None,
        "accuracy_at_baseline_time": None,
        "energy": _energy(rows, powers or {}, target, target_loss),
        **_staleness(rows),
    }


def _staleness(rows: list[dict]) -> dict:
    """An asynchronous strategy's updates (testbed/asyncloop.py): how stale they were when they
    counted, and how long devices waited for work between tasks."""
    stale = sorted(d for r in rows for d in r.get("staleness") or [])
    if not stale:
        return {}
    idle = [float(nd["idle_s"]) for r in rows for nd in r.get("nodes") or [] if "idle_s" in nd]
    return {"staleness": {"updates": len(stale), "mean": sum(stale) / len(stale), "median": stale[len(stale) // 2],
                          "p90": stale[min(len(stale) - 1, int(0.9 * len(stale)))], "max": stale[-1],
                          "counts": {str(d): stale.count(d) for d in sorted(set(stale))}},
            "device_idle_s": {"mean": sum(idle) / len(idle) if idle else None, "max": max(idle, default=None)}}


def summarize(rounds: list[dict], baseline: str, target_accuracy: float, *,
              majority_rate: float | None = None, target_loss: float | None = None,
              powers: dict | None = None) -> dict:
    """Build the ``summary.json`` dict from ``rounds.jsonl`` rows.

    Speedup is baseline time-to-target / strategy time-to-target (null when
    either never reached the target). Because that is often null, each
    strategy also gets its best accuracy within the baseline's total emulated
    time, which always allows a comparison at equal time.
    """
    groups = _by_strategy(rounds)
    if baseline not in groups:
        raise ValueError(f"baseline strategy {baseline!r} not found in rounds "
                         f"(strategies present: {sorted(groups) or 'none'})")
    strategies = {name: _strategy_summary(rows, target_accuracy, target_loss, powers) for name, rows in groups.items()}
    base_ttt = strategies[baseline]["time_to_target_s"]
    base_end = _elapsed(groups[baseline])[-1]
    for name, s in strategies.items():
        ttt = s["time_to_target_s"]
        if base_ttt is not None and ttt is not None:
            s["speedup"] = base_ttt / ttt if ttt > 0 else (1.0 if base_ttt == 0 else None)
        window = [a for t, a in zip(_elapsed(groups[name]), map(_acc, groups[name]))
                  if t <= base_end + _EPS and a is not None]
        s["accuracy_at_baseline_time"] = max(window) if window else None
    return {"baseline": baseline, "target_accuracy": target_accuracy, "target_loss": target_loss,
            "majority_rate": majority_rate, "strategies": strategies}


# ---------------------------------------------------------------- loading
def load_run(dir: str | Path) -> tuple[dict, list[dict], dict | None]:
    """Read a run folder. A run killed mid-write leaves a partial last line in
    ``rounds.jsonl``; it is skipped so the completed rounds stay usable."""
    d = Path(dir)
    manifest = json.loads((d / MANIFEST).read_text()) if (d / MANIFEST).exists() else {}
    lines = [ln for ln in (d / ROUNDS).read_text().splitlines() if ln.strip()]
    rounds = []
    for i, line in enumerate(lines):
        try:
            rounds.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{d / ROUNDS}: line {i + 1} is not valid JSON") from None
    summary = json.loads((d / SUMMARY).read_text()) if (d / SUMMARY).exists() else None
    return manifest, rounds, summary


def powers_of(manifest: dict) -> dict:
    """Each profile's power model (emulation.profiles.Power): the run's nodes', the scenario's own
    profiles (a fault may switch a device to one) and the built-in ones."""
    from emulation.profiles import PROFILES, Power
    out = {name: p.power for name, p in PROFILES.items() if p.power is not None}
    for name, spec in ((manifest.get("scenario") or {}).get("profiles") or {}).items():
        if spec.get("power"):
            out[name] = Power(**spec["power"])
    for node in manifest.get("nodes") or []:
        prof = node.get("profile") or {}
        if prof.get("power"):
            out[str(prof.get("name"))] = Power(**prof["power"])
    return out


def host_efficiency(manifest: dict, rows: list[dict]) -> float | None:
    """The share of this host's cores that did device work while the rounds ran: the host CPU
    seconds of training of this host's nodes (not remote devices, not other docker engines' nodes)
    over cores x the rounds' real time (their emulated time x the dilation). Evaluation and
    start-up are not rounds. None when the manifest does not say cores and dilation."""
    cores, dilation = (manifest.get("host") or {}).get("cores"), manifest.get("dilation")
    if not cores or not isinstance(dilation, (int, float)):
        return None
    here = {n["name"] for n in manifest.get("nodes") or [] if not n.get("remote") and not n.get("engine")}
    real = sum(_real_s(r, dilation) for r in rows)
    work = sum(float(nd.get("cpu_s") or 0) for r in rows for nd in r.get("nodes") or [] if nd.get("node") in here)
    return work / (cores * real) if real > 0 else None


def aggregator_share(manifest: dict, rows: list[dict]) -> float | None:
    """The largest share of a round's real time that the aggregator's own CPU took
    (`aggregator_cpu_s` / (wall_s x dilation)), over the rounds that record it."""
    dilation = manifest.get("dilation")
    if not isinstance(dilation, (int, float)):
        return None
    shares = [r["aggregator_cpu_s"] / _real_s(r, dilation) for r in rows
              if r.get("aggregator_cpu_s") is not None and _real_s(r, dilation) > 0]
    return max(shares) if shares else None


def _real_s(row: dict, dilation: float) -> float:
    """A round's real seconds: recorded (`real_s`), or, in runs before it was, its emulated time x
    the dilation (the virtual clock's rounds have no such relation)."""
    if row.get("real_s") is not None:
        return float(row["real_s"])
    return float(row.get("wall_s") or 0) * dilation


def with_host_efficiency(summary: dict, manifest: dict, rows: list[dict]) -> dict:
    """`host_efficiency` in the summary: per strategy, and for the run."""
    groups = _by_strategy(rows)
    for name, s in (summary.get("strategies") or {}).items():
        s["host_efficiency"] = host_efficiency(manifest, groups.get(name, []))
        s["aggregator_cpu_share_max"] = aggregator_share(manifest, groups.get(name, []))
    summary["host_efficiency"] = host_efficiency(manifest, rows)
    return summary


def emulation_warnings(manifest: dict, rounds: list[dict]) -> list[str]:
    """What the run's own measurements say the host did not honour (unlike the manifest's
    fidelity notes, which are known before the run): classes that needed more CPU seconds than
    another for the same plan, or that got less CPU than their profile's share."""
    groups = _by_strategy(rounds)
    return [*cpu_disparity(groups), *share_shortfall(groups, manifest), *short_node_rounds(groups)]


def short_node_rounds(groups: dict, tolerance: float = 0.1) -> list[str]:
    """Node-rounds whose compute time the host stretched (`host_short_s`, netns with `cpu_limit:
    weight`) by more than `tolerance` of it: a class-wide share can look fine while single
    rounds of single devices were not emulated faithfully."""
    short, total, worst = 0, 0, (0.0, "")
    for name, rows in groups.items():
        for r in rows:
            for n in r.get("nodes") or []:
                if n.get("status", "ok") != "ok" or "host_short_s" not in n or not n.get("compute_s"):
                    continue
                total += 1
                frac = float(n["host_short_s"]) / float(n["compute_s"])
                short += frac > tolerance
                worst = max(worst, (frac, f"{n['node']} in {name} round {r['round']}"))
    if not short:
        return []
    return [f"in {short} of {total} node-rounds the host gave the device less CPU than its share, which added over "
            f"{tolerance:.0%} to its compute time (worst: {worst[0]:.0%}, {worst[1]}); see host_short_s in rounds.jsonl"]


def _default_summary(manifest: dict, rounds: list[dict]) -> dict:
    """Recompute a missing summary (a run that died before writing it) from the
    baseline and target the manifest's resolved scenario names."""
    scen = manifest.get("scenario") or {}
    baseline = (scen.get("strategies") or {}).get("baseline")
    target = (scen.get("training") or {}).get("target_accuracy")
    if baseline is None or target is None:
        raise ValueError("manifest.json names no baseline or target accuracy: cannot summarize this run")
    if baseline not in _by_strategy(rounds):
        return {"baseline": baseline, "target_accuracy": target, "majority_rate": None, "strategies": {},
                "emulation_warnings": emulation_warnings(manifest, rounds)}
    summary = summarize(rounds, baseline, float(target), majority_rate=(manifest.get("data") or {}).get("majority_rate"),
                        target_loss=(scen.get("training") or {}).get("target_loss"), powers=powers_of(manifest))
    return {**with_host_efficiency(summary, manifest, rounds), "emulation_warnings": emulation_warnings(manifest, rounds)}


# ---------------------------------------------------------------- plots
def _pyplot():
    """matplotlib, headless (reports are produced on servers and in CI); imported when a plot is
    drawn, so that a run's start does not wait for it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _plot_accuracy(groups: dict, summary: dict, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, rows in groups.items():
        pts = [(t, a) for t, a in zip(_elapsed(rows), map(_acc, rows)) if a is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=name)
    if summary.get("target_accuracy") is not None:
        ax.axhline(summary["target_accuracy"], ls="--", color="k", lw=1,
                   label=f"target {summary['target_accuracy']:.3f}")
    if summary.get("majority_rate") is not None:
        ax.axhline(summary["majority_rate"], ls=":", color="grey", lw=1,
                   label=f"majority class {summary['majority_rate']:.3f}")
    ax.set(xlabel="elapsed emulated time (s)", ylabel="accuracy", title="Accuracy vs emulated time")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_bytes(groups: dict, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, rows in groups.items():
        cum, ys = 0, []
        for r in rows:
            cum += _bytes(r)
            ys.append(cum / MB)
        ax.plot(_elapsed(rows), ys, marker="o", ms=3, label=name)
    ax.set(xlabel="elapsed emulated time (s)", ylabel="cumulative traffic up+down (MB)",
           title="Traffic vs emulated time")
    ax.grid(alpha=0.3)
    if groups:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_timeline(groups: dict, path: Path) -> None:
    """Each round starts where the previous one ended in emulated time; within
    it every node's download/compute/upload/wait phases are laid end to end,
    so stragglers and idle waiting are visible at a glance."""
    plt = _pyplot()
    nodes_of = {n: sorted({nd["node"] for r in rows for nd in r.get("nodes") or []}, key=str)
                for n, rows in groups.items()}
    heights = [max(1, len(v)) for v in nodes_of.values()] or [1]
    fig, axes = plt.subplots(len(heights), 1, squeeze=False, sharex=True,
                             figsize=(10, 1.2 + 0.35 * sum(heights) + 0.6 * len(heights)),
                             gridspec_kw={"height_ratios": heights})
    for ax, (name, rows) in zip(axes[:, 0], groups.items()):
        names = nodes_of[name]
        ax.set_title(name, loc="left", fontsize=10)
        if not names:
            ax.text(0.5, 0.5, "no node data", ha="center", va="center", transform=ax.transAxes)
            ax.set_yticks([])
            continue
        ypos = {n: i for i, n in enumerate(names)}
        bars: dict[str, list[tuple[float, float, float]]] = {}  # style -> (y, left, width)
        start = 0.0
        for r, end in zip(rows, _elapsed(rows)):
            for nd in r.get("nodes") or []:  # an asynchronous task starts at its dispatch, not the row's start
                y, t, status = ypos[nd["node"]], float(nd.get("sent_s", start)), nd.get("status", "ok")
                for key, label, _ in _PHASES:
                    dur = float(nd.get(key) or 0)
                    if dur > 0:
                        bars.setdefault(label if status == "ok" else status, []).append((y, t, dur))
                        t += dur
                if status != "ok" and t == float(nd.get("sent_s", start)):  # nothing timed: still mark the loss
                    bars.setdefault(status, []).append((y, t, max(float(nd.get("returned_s", end)) - t, 0)))
            start = end
        for style, items in bars.items():
            y, left, width = zip(*items)
            kw = _STYLE.get(style, _STYLE["failed"])
            ax.barh(y, width, left=left, height=0.8, lw=0.5, **kw)
        ax.set_yticks(range(len(names)), [str(n) for n in names], fontsize=8)
        ax.set_ylim(-0.6, len(names) - 0.4)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    ends = [_elapsed(rows)[-1] for rows in groups.values() if rows]
    if ends and max(ends) > 0:
        axes[-1, 0].set_xlim(0, max(ends))
    axes[-1, 0].set_xlabel("elapsed emulated time (s)")
    from matplotlib.patches import Patch
    legend = [Patch(label=k, **v) for k, v in _STYLE.items()]
    fig.legend(handles=legend, loc="upper right", ncol=6, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- markdown
def _fmt(v, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def effective_share(nodes: list[dict]) -> float | None:
    """Host CPU seconds over emulated compute seconds of the ok node-rounds that report both:
    the share of one host core the devices had, their profile's cpu_share when faithful."""
    ok = [n for n in nodes
          if n.get("status", "ok") == "ok" and (n.get("cpu_s") or 0) > 0 and (n.get("compute_s") or 0) > 0]
    return sum(float(n["cpu_s"]) for n in ok) / sum(float(n["compute_s"]) for n in ok) if ok else None


def cpu_disparity(groups: dict, tolerance: float = 1.5) -> list[str]:
    """Device classes whose training needed more host CPU seconds than another class's for the
    same plan in the same round: their CPU ran slower than their profile says (a throttled CPU
    quota on some hosts; docs/profiles.md, cpu_limit: weight). Median over such rounds of the
    class's mean cpu_s over the cheapest class's; a line per class above `tolerance`."""
    ratios: dict[tuple[str, str], list[float]] = {}
    for name, rows in groups.items():
        for r in rows:
            buckets: dict[str, dict[str, list[float]]] = {}
            for n in r.get("nodes") or []:
                if n.get("status", "ok") == "ok" and (n.get("cpu_s") or 0) > 0:
                    plan = json.dumps(n.get("plan"), sort_keys=True, default=str)
                    buckets.setdefault(plan, {}).setdefault(str(n.get("profile")), []).append(float(n["cpu_s"]))
            for by_class in buckets.values():
                if len(by_class) < 2:
                    continue
                means = {p: sum(v) / len(v) for p, v in by_class.items()}
                cheapest = min(means, key=means.get)
                for p, m in means.items():
                    if p != cheapest:
                        ratios.setdefault((p, cheapest), []).append(m / means[cheapest])
    out = []
    for (p, ref), rs in sorted(ratios.items()):
        med = sorted(rs)[len(rs) // 2]
        if med > tolerance:
            out.append(f"{p} needed {med:.1f}x the host CPU seconds of {ref} for the same plan (median of {len(rs)} "
                       "rounds): its emulated CPU is slower than its profile (with CPU quotas, try cpu_limit: weight)")
    return out


def share_shortfall(groups: dict, manifest: dict, tolerance: float = 0.9) -> list[str]:
    """Device classes whose effective share (host CPU seconds over emulated compute seconds, over
    all their ok node-rounds) fell below `tolerance` x their profile's cpu_share: the host did
    not give them their CPU (other load on it, or too little dilation), so their compute times
    are inflated. Kernel-limited backends only (netns, docker): on the process backend the node
    stretches wall time, which already holds the contention."""
    if manifest.get("backend") not in ("netns", "docker"):
        return []
    shares = {n["profile"]["name"]: float(n["profile"]["cpu_share"]) for n in manifest.get("nodes") or []
              if isinstance(n.get("profile"), dict) and n["profile"].get("cpu_share")}
    by_class: dict[str, list[dict]] = {}
    for rows in groups.values():
        for r in rows:
            for n in r.get("nodes") or []:
                by_class.setdefault(str(n.get("profile")), []).append(n)
    out = []
    for p, nodes in sorted(by_class.items()):
        eff, want = effective_share(nodes), shares.get(p)
        if eff is not None and want and eff < tolerance * min(want, 1.0):
            out.append(f"{p} had an effective share of {eff:.2f} of a host core where its profile says "
                       f"{want:g} ({eff / want:.0%} of its speed): the host did not give it its CPU (other load on "
                       "the host, or too little dilation), so its compute times are inflated")
    return out


def _profile_table(groups: dict) -> list[str]:
    """Mean compute time and peak memory per device profile: the point of the
    testbed is to see how heterogeneous devices cope with each strategy."""
    out = ["| strategy | profile | node-rounds | dropped/failed | mean compute, ok nodes (s) "
           "| mean host cpu (s) | effective cpu share | max peak mem (MB) | given (value (node-rounds)) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for name, rows in groups.items():
        given = {p: c["given"] for p, c in _by_class(rows).items()}
        prof: dict[str, list[dict]] = {}
        for r in rows:
            for nd in r.get("nodes") or []:
                prof.setdefault(str(nd.get("profile", "?")), []).append(nd)
        for p, nds in sorted(prof.items()):
            comp = [float(n["compute_s"]) for n in nds  # lost nodes' partial work would skew it
                    if n.get("compute_s") is not None and n.get("status", "ok") == "ok"]
            mem = [float(n["peak_mem_mb"]) for n in nds if n.get("peak_mem_mb") is not None]
            cpu = [float(n["cpu_s"]) for n in nds if (n.get("cpu_s") or 0) > 0 and n.get("status", "ok") == "ok"]
            lost = sum(1 for n in nds if n.get("status", "ok") != "ok")
            out.append(f"| {name} | {p} | {len(nds)} | {lost} | "
                       f"{_fmt(sum(comp) / len(comp) if comp else None, '.2f')} | {_fmt(sum(cpu) / len(cpu) if cpu else None, '.2f')} | "
                       f"{_fmt(effective_share(nds))} | "
                       f"{_fmt(max(mem) if mem else None, '.0f')} | {given_text(given.get(p, {}))} |")
    return out if len(out) > 2 else ["_No per-node data recorded._"]


def _faults_table(manifest: dict, groups: dict) -> list[str]:
    """Per strategy: faults injected, node-rounds lost (and to what), failed rounds, offline nodes."""
    def lost(rows, pred):
        return sum(1 for r in rows for n in r.get("nodes", []) if n.get("status") != "ok" and pred(n.get("reason") or ""))
    rows_with = [r for rows in groups.values() for r in rows]
    if not (manifest.get("faults") or any(r.get("events") or r.get("failed") or r.get("offline") for r in rows_with)):
        return []
    out = ["", "## Faults and failures", "",
           "| strategy | faults applied | not applied | node-rounds lost to faults | to OOM (own limit or host) | to deadline or errors "
           "| failed rounds | offline node-rounds |", "|---|---|---|---|---|---|---|---|"]
    for name, rows in groups.items():
        ev = [e for r in rows for e in r.get("events") or [] if e.get("type") == "fault"]
        oom = sum(1 for r in rows for e in r.get("events") or [] if e.get("type") == "oom") \
            + lost(rows, lambda why: "host ran out of memory" in why)  # the device's limit, or the host's memory
        by_fault = lost(rows, lambda why: "fault event" in why or "profile change" in why)
        other = lost(rows, lambda why: "fault event" not in why and "profile change" not in why) - oom
        out.append(f"| {name} | {sum(1 for e in ev if e.get('applied'))} | {sum(1 for e in ev if not e.get('applied'))} "
                   f"| {by_fault} | {oom} | {max(0, other)} | {sum(1 for r in rows if r.get('failed'))} "
                   f"| {sum(len(r.get('offline') or []) for r in rows)} |")
    if manifest.get("resumed"):
        out += ["", "Resumed: " + "; ".join(f"{r['strategy']} after round {r['round']} (from {r['from_run_id']})"
                                            for r in manifest["resumed"])]
    return out


def _split(payload: dict | None) -> str:
    """Tensor megabytes of the blocks and of the head, both ways (n/a for runs before the split)."""
    if not payload or not any(payload.values()):
        return "n/a"
    return f"{payload.get('blocks', 0) / MB:.2f} / {payload.get('head', 0) / MB:.2f}"


def _markdown(manifest: dict, summary: dict, groups: dict) -> str:
    scen = manifest.get("scenario") or {}
    host = manifest.get("host") or {}
    lines = [f"# Run report: {scen.get('name', 'unnamed scenario')}", "",
             f"- backend: {manifest.get('backend', 'n/a')}",
             f"- dilation: {manifest.get('dilation', 'n/a')}",
             f"- host: {host.get('cores', 'n/a')} cores, {host.get('memory_mb', 'n/a')} MB memory"
             + (f"; at most {host['peak_used_mb']:.0f} MB in use during rounds" if host.get("peak_used_mb") else "")
             + (f"; {host['oom_kills']} process(es) killed for lack of host memory" if host.get("oom_kills") else ""),
             f"- baseline: {summary.get('baseline')}, "
             + (f"target loss: {_fmt(summary['target_loss'])}" if summary.get("target_loss") is not None
                else f"target accuracy: {_fmt(summary.get('target_accuracy'))}")]
    if summary.get("majority_rate") is not None:
        lines.append(f"- majority-class rate: {_fmt(summary['majority_rate'])}")
    warnings = [*(manifest.get("fidelity") or []), *cpu_disparity(groups), *share_shortfall(groups, manifest)]
    if warnings:
        lines += ["", "## Fidelity warnings", "", "The host could not honour everything the scenario asked:", ""]
        lines += [f"- {w}" for w in warnings]
    if manifest.get("stopped_early"):
        lines += ["", "## Stopped early", ""]
        lines += [f"- {name}: {why}" for name, why in manifest["stopped_early"].items()]
    lines += ["", "## Strategies", "",
              "| strategy | rounds | final acc | best acc | time to target (s) | bytes to target (MB) "
              "| total time (s) | wall (s) | MB up | MB down | of which blocks / head (MB) | speedup "
              "| acc at baseline time |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    strategies = summary.get("strategies") or {}
    for name, s in strategies.items():
        rows = groups.get(name) or []
        total = _elapsed(rows)[-1] if rows else None
        btt = s.get("bytes_to_target")
        lines.append(
            f"| {name} | {s.get('rounds')} | {_fmt(s.get('final_accuracy'))} | {_fmt(s.get('best_accuracy'))} "
            f"| {_fmt(s.get('time_to_target_s'), '.1f')} | {_fmt(None if btt is None else btt / MB, '.2f')} "
            f"| {_fmt(total, '.1f')} | {_fmt(s.get('total_wall_s'), '.1f')} "
            f"| {_fmt((s.get('total_bytes_up') or 0) / MB, '.2f')} "
            f"| {_fmt((s.get('total_bytes_down') or 0) / MB, '.2f')} "
            f"| {_split(s.get('payload_bytes'))} "
            f"| {_fmt(s.get('speedup'), '.2f')} | {_fmt(s.get('accuracy_at_baseline_time'))} |")
    lines += ["", f"Times are emulated seconds. Speedup = baseline ({summary.get('baseline')}) "
                  "time-to-target / strategy time-to-target; above 1 means the strategy reached "
                  "the target sooner."]
    if any(s.get("speedup") is None for s in strategies.values()):
        lines.append("Speedup is n/a where the baseline or the strategy never reached the target; "
                     "compare the \"acc at baseline time\" column instead: each strategy's best "
                     "accuracy within the baseline's total emulated time.")
    eff = {n: s.get("host_efficiency") for n, s in strategies.items() if s.get("host_efficiency") is not None}
    if eff:
        lines += ["", "Host efficiency, the share of this host's cores that did device work while the rounds ran "
                  "(training CPU seconds / (cores x real round time)): "
                  + ", ".join(f"{n} {v:.2f}" for n, v in eff.items())
                  + (f"; the run {summary['host_efficiency']:.2f}." if summary.get("host_efficiency") is not None else ".")]
    agg = {n: s.get("aggregator_cpu_share_max") for n, s in strategies.items() if s.get("aggregator_cpu_share_max")}
    if agg:
        lines += ["", "The aggregator's own CPU took at most this share of a round's real time: "
                  + ", ".join(f"{n} {v:.1%}" for n, v in agg.items()) + "."]
    lines += _energy_table(strategies)
    lines += _staleness_table(strategies)
    lines += _faults_table(manifest, groups)
    lines += ["", "## Per-profile cost", "", *_profile_table(groups), "", "## Plots", "",
              f"![accuracy vs time]({ACC_PNG})", "", f"![bytes vs time]({BYTES_PNG})", "",
              f"![per-node timeline]({TIMELINE_PNG})", ""]
    if any("total_j" in (s.get("energy") or {}) for s in strategies.values()):
        lines += [f"![accuracy vs energy]({ENERGY_PNG})", ""]
    return "\n".join(lines)


def _staleness_table(strategies: dict) -> list[str]:
    """The asynchronous strategies' staleness, and the devices' wait for work between tasks."""
    rows = {n: s for n, s in strategies.items() if s.get("staleness")}
    if not rows:
        return []
    out = ["", "## Staleness (asynchronous strategies)", "",
           "An update's staleness is how many times the global model changed between the device's download "
           "and its result. Idle is a device's wait for its next task after a result (no round barrier: "
           "near 0).", "",
           "| strategy | updates | mean | median | p90 | max | at 0 / 1 / 2 / 3+ | device idle mean / max (s) |",
           "|---|---|---|---|---|---|---|---|"]
    for name, s in rows.items():
        st, idle = s["staleness"], s.get("device_idle_s") or {}
        c = {int(k): v for k, v in st["counts"].items()}
        spread = " / ".join(str(c.get(d, 0)) for d in (0, 1, 2)) + f" / {sum(v for d, v in c.items() if d >= 3)}"
        out.append(f"| {name} | {st['updates']} | {st['mean']:.2f} | {st['median']} | {st['p90']} | {st['max']} "
                   f"| {spread} | {_fmt(idle.get('mean'), '.2f')} / {_fmt(idle.get('max'), '.2f')} |")
    return out


def _energy_table(strategies: dict) -> list[str]:
    """Energy of the devices sampled in each round (testbed/energy.py), per strategy and class."""
    energies = {n: s.get("energy") or {} for n, s in strategies.items()}
    if not any(energies.values()):
        return []
    lines = ["", "## Energy", "",
             "Joules of the devices sampled in each round: on for the round, + training, + radio, from each "
             "profile's power model (emulated seconds).", "",
             "| strategy | energy (kJ) | to target (kJ) | idle / compute / radio (kJ) | per class (kJ) |",
             "|---|---|---|---|---|"]
    for name, e in energies.items():
        if "missing_power" in e:
            lines.append(f"| {name} | n/a: no power model for {', '.join(e['missing_power'])} | | | |")
            continue
        kj = lambda v: _fmt(None if v is None else v / 1e3, ".2f")  # noqa: E731
        per_class = "; ".join(f"{c} {kj(v['total_j'])}" for c, v in e.get("by_class", {}).items())
        lines.append(f"| {name} | {kj(e.get('total_j'))} | {kj(e.get('to_target_j'))} "
                     f"| {kj(e.get('idle_j'))} / {kj(e.get('compute_j'))} / {kj(e.get('radio_j'))} | {per_class} |")
    return lines


def _plot_energy(groups: dict, summary: dict, path: Path) -> bool:
    """Accuracy against the energy the devices have spent so far, per strategy."""
    series = {n: (s.get("energy") or {}).get("cumulative_j") for n, s in (summary.get("strategies") or {}).items()}
    if not any(series.values()):
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, rows in groups.items():
        joules = series.get(name)
        if joules:
            pts = [(j / 1e3, a) for j, a in zip(joules, map(_acc, rows)) if a is not None]
            ax.plot(*zip(*pts), marker="o", ms=3, label=name)
    target = summary.get("target_accuracy")
    if target is not None and summary.get("target_loss") is None:
        ax.axhline(target, color="grey", ls="--", lw=1)
    ax.set_xlabel("energy of the sampled devices (kJ)")
    ax.set_ylabel("accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_report(dir: str | Path, recompute: bool = False) -> list[Path]:
    """Write report.md and the three plots into the run folder; recomputes the
    summary from rounds.jsonl when summary.json is missing (crashed run), or with
    `recompute` (a folder an older version summarized: its summary.json is rewritten,
    keeping the fields only the run knew, such as its status)."""
    d = Path(dir)
    manifest, rounds, summary = load_run(d)
    if summary is None:
        summary = _default_summary(manifest, rounds)
    elif recompute:
        summary = {**summary, **_default_summary(manifest, rounds)}
        (d / SUMMARY).write_text(json.dumps(summary, indent=2))
    groups = _by_strategy(rounds)
    base = summary.get("baseline")
    groups = {k: groups[k] for k in sorted(groups, key=lambda k: k != base)}  # baseline first
    strategies = summary.get("strategies") or {}
    summary = {**summary, "strategies": {k: strategies[k] for k in
                                          sorted(strategies, key=lambda k: k != base)}}
    paths = [d / REPORT, d / ACC_PNG, d / BYTES_PNG, d / TIMELINE_PNG]
    _plot_accuracy(groups, summary, paths[1])
    _plot_bytes(groups, paths[2])
    _plot_timeline(groups, paths[3])
    if _plot_energy(groups, summary, d / ENERGY_PNG):
        paths.append(d / ENERGY_PNG)
    paths[0].write_text(_markdown(manifest, summary, groups))
    return paths
