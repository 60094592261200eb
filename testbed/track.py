"""Results where researchers look: a run folder exported to MLflow or TensorBoard.

`--track mlflow[=URI]` (on `run` and `report`) writes each run folder as one MLflow run in the
experiment named after the scenario: the scenario's fields as parameters (dotted names), each
strategy's rounds as metrics (`<strategy>/accuracy`, `loss`, `elapsed_s`, `bytes`, `energy_j`,
step = round), its summary figures at the end, and the folder's files as artifacts (never the
keys file or the checkpoint). The default store is `mlruns/` in the working folder, MLflow's own
default; MLflow keeps that file store in maintenance mode and asks for an opt-in
(MLFLOW_ALLOW_FILE_STORE), which is given here for a local folder only.

`--track tensorboard[=DIR]` writes event files, by default into the run folder's `tensorboard/`
(so `tensorboard --logdir OUT` shows every seed of a campaign): the same per-round scalars, with
the event's time set to the round's emulated time, so TensorBoard's relative time axis is the
emulated one.

Both libraries are optional (`pip install -e '.[track]'`).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

KINDS = ("mlflow", "tensorboard")
NOT_EXPORTED = {"keys.json", "checkpoint.pkl"}  # secrets, and a file only --resume reads
PER_ROUND = ("accuracy", "loss", "perplexity", "exact_match", "elapsed_s", "wall_s", "participants", "dropped")
AT_END = ("best_accuracy", "final_accuracy", "time_to_target_s", "speedup", "accuracy_at_baseline_time",
          "total_wall_s", "total_bytes_up", "total_bytes_down")


class TrackError(ValueError):
    """A --track value that cannot be used."""


@dataclass(frozen=True)
class Target:
    kind: str
    where: str | None = None  # an MLflow tracking URI or a TensorBoard folder (None: the default)

    @classmethod
    def parse(cls, text: str) -> "Target":
        kind, _, where = text.partition("=")
        if kind not in KINDS:
            raise TrackError(f"--track {text!r}: one of {', '.join(KINDS)}, optionally =URI (mlflow) or =DIR "
                             "(tensorboard)")
        module = "mlflow" if kind == "mlflow" else "tensorboard"
        try:
            __import__(module)
        except ImportError:
            raise TrackError(f"--track {kind}: the {module} package is not installed (pip install -e '.[track]')"
                             ) from None
        return cls(kind, where or None)


def export(run_dir: str | Path, target: Target) -> str:
    """Export one run folder; returns where it went."""
    from .report import load_run
    d = Path(run_dir)
    if not (d / "rounds.jsonl").is_file():
        raise TrackError(f"{d}: no rounds.jsonl, nothing to export")
    manifest, rounds, summary = load_run(d)
    if target.kind == "mlflow":
        return _to_mlflow(d, manifest, rounds, summary or {}, target.where)
    return _to_tensorboard(d, rounds, summary or {}, target.where)


def flat(doc, prefix: str = "") -> dict[str, str]:
    """Nested dicts as dotted names; lists and scalars as JSON text (MLflow keeps parameters as text)."""
    if isinstance(doc, dict) and doc:
        return {k: v for key, value in doc.items() for k, v in flat(value, f"{prefix}.{key}" if prefix else key).items()}
    return {prefix: doc if isinstance(doc, str) else json.dumps(doc)}


def _scalars(rounds: list[dict], summary: dict) -> list[tuple[str, float, int, float]]:
    """(name, value, step, emulated time) of every per-round figure of every strategy, in the
    round order the summary's cumulative energy follows (report._by_strategy)."""
    from .report import _by_strategy, _bytes
    out = []
    for name, rows in _by_strategy(rounds).items():
        joules = ((summary.get("strategies") or {}).get(name, {}).get("energy") or {}).get("cumulative_j") or []
        for i, row in enumerate(rows):
            step, t = int(row.get("round", 0)), float(row.get("elapsed_s") or 0.0)
            for key in PER_ROUND:
                value = row.get(key)
                if isinstance(value, (int, float)) and value == value:
                    out.append((f"{name}/{key}", float(value), step, t))
            out.append((f"{name}/bytes", float(_bytes(row)), step, t))
            if i < len(joules):
                out.append((f"{name}/energy_j", float(joules[i]), step, t))
    return out


def _summary_figures(summary: dict) -> dict[str, float]:
    out = {}
    for name, s in (summary.get("strategies") or {}).items():
        for key in AT_END:
            if isinstance(s.get(key), (int, float)):
                out[f"{name}/{key}"] = float(s[key])
        energy = s.get("energy") or {}
        for key in ("total_j", "to_target_j"):
            if isinstance(energy.get(key), (int, float)):
                out[f"{name}/energy_{key}"] = float(energy[key])
    return out


def _to_mlflow(d: Path, manifest: dict, rounds: list[dict], summary: dict, uri: str | None) -> str:
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient
    uri = uri or "mlruns"
    if "://" not in uri and not uri.startswith("sqlite:"):  # a local folder: MLflow's file store
        uri = Path(uri).resolve().as_uri()
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(uri)
    scenario = manifest.get("scenario") or {}
    name = str(scenario.get("name") or d.name)
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp else client.create_experiment(name)
    tags = {"fedge.run_id": str(manifest.get("run_id", "")), "fedge.folder": str(d.resolve()),
            "fedge.backend": str(manifest.get("backend", "")), "fedge.status": str(summary.get("status", ""))}
    run = client.create_run(exp_id, run_name=d.name, tags=tags)
    rid, now = run.info.run_id, int(time.time() * 1000)
    params = [Param(k[:250], v[:6000]) for k, v in flat(scenario).items()]
    metrics = [Metric(n, v, now, step) for n, v, step, _ in _scalars(rounds, summary)]
    metrics += [Metric(n, v, now, 0) for n, v in _summary_figures(summary).items()]
    for i in range(0, max(len(params), len(metrics)), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(rid, metrics=metrics[i:i + 100], params=params[i:i + 100], tags=[])
    client.set_tag(rid, "fedge.strategies", ",".join((summary.get("strategies") or {}).keys()))
    for f in sorted(d.iterdir()):
        if f.name in NOT_EXPORTED or f.name == "tensorboard":
            continue
        if f.is_dir():
            client.log_artifacts(rid, str(f), artifact_path=f.name)
        else:
            client.log_artifact(rid, str(f))
    client.set_terminated(rid)
    return f"{uri} (experiment {name!r}, run {rid})"


def _to_tensorboard(d: Path, rounds: list[dict], summary: dict, where: str | None) -> str:
    from torch.utils.tensorboard import SummaryWriter
    logdir = Path(where) / d.name if where else d / "tensorboard"
    writer = SummaryWriter(str(logdir))
    try:
        for name, value, step, t in _scalars(rounds, summary):
            writer.add_scalar(name, value, global_step=step, walltime=t)
        for name, value in _summary_figures(summary).items():
            writer.add_scalar(f"summary/{name}", value, global_step=0, walltime=0.0)
        report = d / "report.md"
        if report.is_file():
            writer.add_text("report", report.read_text(), global_step=0, walltime=0.0)
    finally:
        writer.close()
    return str(logdir)
