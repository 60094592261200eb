"""`python -m testbed run | validate | report | calibrate | clean` (the CLI contract: docs/architecture.md)."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def cmd_validate(args) -> int:
    from .scenario import ScenarioError, expand_nodes, load
    bad = 0
    for path in args.scenarios:
        try:
            sc = load(path, args.set)
            nodes = expand_nodes(sc)
            print(f"{path}: ok ({sc.name}: {len(nodes)} nodes, {len(sc.strategies.run)} strategies, "
                  f"baseline {sc.strategies.baseline})")
        except ScenarioError as exc:
            bad += 1
            print(exc, file=sys.stderr)
    return 1 if bad else 0


TRACK_HELP = ("also export the results: mlflow (to ./mlruns, or =URI) or tensorboard (event files in the run "
              "folder, or =DIR); may repeat (optional packages: pip install -e '.[track]')")


def _targets(values: list[str]):
    """The --track values, checked before anything runs (None: a bad one, already said)."""
    from .track import Target, TrackError
    try:
        return [Target.parse(v) for v in values]
    except TrackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def _track(out: Path, targets) -> int:
    """Export a run folder, or each seed's folder of a campaign, to every --track target."""
    from .seeds import is_campaign
    from .track import TrackError, export
    folders = sorted(p.parent for p in out.glob("seed-*/rounds.jsonl")) if is_campaign(out) else [out]
    bad = 0
    for target in targets:
        for folder in folders:
            try:
                print(f"{target.kind}: {folder} -> {export(folder, target)}")
            except (TrackError, OSError) as exc:
                bad += 1
                print(f"error: --track {target.kind}: {exc}", file=sys.stderr)
    return 1 if bad else 0


def cmd_run(args) -> int:
    from .runner import Run, RunError
    from .scenario import ScenarioError, load
    try:
        sc = load(args.scenario, args.set)
    except ScenarioError as exc:
        print(exc, file=sys.stderr)
        return 2
    targets = _targets(args.track)
    if targets is None:
        return 2
    if args.resume:
        if args.out:
            print("error: --resume DIR continues the run in DIR; leave out --out", file=sys.stderr)
            return 2
        out = Path(args.resume)
    else:
        out = Path(args.out) if args.out else Path("runs") / f"{sc.name}"
    if not args.out and not args.resume and out.exists():
        i = 2
        while (Path("runs") / f"{sc.name}-{i}").exists():
            i += 1
        out = Path("runs") / f"{sc.name}-{i}"
    seeds = _seeds(args.seeds) if args.seeds else sc.seeds
    try:
        if seeds:
            from .seeds import run_seeds
            run_seeds(sc, out, seeds, backend=args.backend, source=str(args.scenario), resume=bool(args.resume))
            print(f"results of seeds {', '.join(map(str, seeds))} in {out} (summary.json, report.md)")
            return _track(out, targets)
        summary = Run(sc, out, backend=args.backend, source=str(args.scenario), resume=bool(args.resume)).execute()
    except (RunError, ValueError) as exc:  # ValueError: a backend this host cannot run, bad data settings
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted: finished rounds are kept in {out}", file=sys.stderr)
        if targets and (out / "rounds.jsonl").is_file():
            _track(out, targets)
        return 130
    print(f"results in {out}: " + ", ".join(
        f"{name} acc {s['final_accuracy']:.3f}" + (f" speedup {s['speedup']:.2f}x" if s.get("speedup") else "")
        for name, s in summary.get("strategies", {}).items()))
    return _track(out, targets)


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"error: --seeds {text!r}: a comma-separated list of integers, e.g. 1,2,3") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"error: --seeds {text!r}: each seed once, at least one")
    return seeds


def cmd_report(args) -> int:
    from .report import write_report
    from .seeds import is_campaign, rewrite_campaign
    targets = _targets(args.track)
    if targets is None:
        return 2
    try:
        paths = (rewrite_campaign(args.dir, args.recompute) if is_campaign(args.dir)
                 else write_report(args.dir, args.recompute))
    except (OSError, ValueError) as exc:
        print(f"error: {args.dir}: {exc}", file=sys.stderr)
        return 1
    for p in paths:
        print(p)
    return _track(Path(args.dir), targets)


def cmd_clean(args) -> int:
    from emulation.cleanup import LiveRunError, clean
    try:
        removed = clean(run_id=args.run, force=args.force)
    except LiveRunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for item in removed:
        print(f"removed {item}")
    print(f"{len(removed)} leftover(s) removed")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m testbed",
                                 description="Federated fine-tuning of transformers on emulated edge devices.")
    ap.add_argument("--log-level", default="WARNING")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a scenario end to end")
    r.add_argument("scenario")
    r.add_argument("--out", help="results folder (default runs/<scenario name>)")
    r.add_argument("--backend", choices=["auto", "process", "netns", "docker"], help="override the scenario's backend")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a scenario field")
    r.add_argument("--resume", metavar="DIR", help="continue the interrupted run in DIR from its last finished "
                   "round (same scenario file and --set options)")
    r.add_argument("--seeds", metavar="S1,S2,...", help="run the scenario once per seed (repeated trials); "
                   "OUT/summary.json gives each strategy's mean and 95%% interval (overrides the scenario's seeds:)")
    r.add_argument("--track", action="append", default=[], metavar="mlflow[=URI]|tensorboard[=DIR]", help=TRACK_HELP)
    r.set_defaults(fn=cmd_run)
    v = sub.add_parser("validate", help="check scenario files and explain every error")
    v.add_argument("scenarios", nargs="+")
    v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    v.set_defaults(fn=cmd_validate)
    p = sub.add_parser("report", help="(re)write report.md and plots of a run folder or a --seeds campaign")
    p.add_argument("dir", help="a run folder, or the folder of a --seeds campaign (each seed's report and the "
                   "campaign's summary and report are rewritten)")
    p.add_argument("--recompute", action="store_true",
                   help="recompute summary.json from rounds.jsonl (a folder an older version summarized)")
    p.add_argument("--track", action="append", default=[], metavar="mlflow[=URI]|tensorboard[=DIR]", help=TRACK_HELP)
    p.set_defaults(fn=cmd_report)
    from .calibrate import add_parser as add_calibrate
    add_calibrate(sub)
    c = sub.add_parser("clean", help="remove every sandbox, process and network object the testbed left behind")
    c.add_argument("--run", help="only this run id (default: all runs)")
    c.add_argument("--force", action="store_true", help="also the objects of runs whose orchestrator is alive")
    c.set_defaults(fn=cmd_clean)
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return args.fn(args)
