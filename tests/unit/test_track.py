"""--track: a run folder exported to a local MLflow store and to TensorBoard event files with the
real libraries, and every value read back."""
from __future__ import annotations

import json

import pytest

from testbed.cli import main
from testbed.track import Target, TrackError, export, flat

ROWS = [{"strategy": "fedlora", "round": 0, "accuracy": 0.5, "loss": 0.7, "elapsed_s": 0.0, "wall_s": 0.0,
         "bytes_up": 0, "bytes_down": 0, "participants": 0, "dropped": 0, "nodes": []},
        {"strategy": "fedlora", "round": 1, "accuracy": 0.6, "loss": 0.6, "elapsed_s": 12.5, "wall_s": 12.5,
         "bytes_up": 100, "bytes_down": 200, "participants": 2, "dropped": 0, "nodes": []},
        {"strategy": "legend", "round": 1, "accuracy": 0.7, "loss": 0.5, "elapsed_s": 8.0, "wall_s": 8.0,
         "bytes_up": 10, "bytes_down": 20, "participants": 2, "dropped": 0, "nodes": []}]
SUMMARY = {"baseline": "fedlora", "status": "finished", "strategies": {
    "fedlora": {"best_accuracy": 0.6, "time_to_target_s": None, "speedup": None,
                "energy": {"total_j": 90.0, "to_target_j": None, "cumulative_j": [0.0, 90.0]}},
    "legend": {"best_accuracy": 0.7, "time_to_target_s": 8.0, "speedup": 1.5,
               "energy": {"total_j": 40.0, "to_target_j": 40.0, "cumulative_j": [40.0]}}}}


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "legend-hour"
    d.mkdir()
    manifest = {"run_id": "r-1", "backend": "process",
                "scenario": {"name": "legend-hour", "seed": 2, "data": {"partition": {"kind": "dirichlet", "alpha": 1.0}},
                             "strategies": {"baseline": "fedlora", "run": [{"name": "fedlora"}, {"name": "legend"}]}}}
    (d / "manifest.json").write_text(json.dumps(manifest))
    (d / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (d / "summary.json").write_text(json.dumps(SUMMARY))
    (d / "report.md").write_text("# Run report: legend-hour\n")
    (d / "keys.json").write_text("{\"secret\": 1}")
    (d / "checkpoint.pkl").write_bytes(b"x")
    return d


def test_a_run_goes_to_mlflow_and_reads_back(run_dir, tmp_path):
    pytest.importorskip("mlflow", reason="the track extra is not installed")
    from mlflow.tracking import MlflowClient
    store = tmp_path / "mlruns"
    export(run_dir, Target("mlflow", str(store)))
    client = MlflowClient(store.resolve().as_uri())
    exp = client.get_experiment_by_name("legend-hour")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.params["seed"] == "2" and run.data.params["data.partition.alpha"] == "1.0"
    assert run.data.tags["fedge.run_id"] == "r-1" and run.data.tags["fedge.status"] == "finished"
    history = client.get_metric_history(run.info.run_id, "fedlora/accuracy")
    assert [(m.step, m.value) for m in history] == [(0, 0.5), (1, 0.6)]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "fedlora/bytes")] == [0, 300]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "fedlora/energy_j")] == [0.0, 90.0]
    assert run.data.metrics["legend/speedup"] == 1.5 and run.data.metrics["legend/energy_to_target_j"] == 40.0
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"manifest.json", "rounds.jsonl", "summary.json", "report.md"} <= files
    assert not files & {"keys.json", "checkpoint.pkl"}, "no keys and no checkpoint leave the folder"


def test_a_run_goes_to_tensorboard_on_emulated_time_and_reads_back(run_dir):
    pytest.importorskip("tensorboard", reason="the track extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    where = export(run_dir, Target("tensorboard"))
    assert where == str(run_dir / "tensorboard")
    events = EventAccumulator(where)
    events.Reload()
    acc = events.Scalars("fedlora/accuracy")
    assert [(e.step, round(e.value, 6), e.wall_time) for e in acc] == [(0, 0.5, 0.0), (1, 0.6, 12.5)]
    assert [e.value for e in events.Scalars("summary/legend/speedup")] == [1.5]
    assert "report/text_summary" in events.Tags()["tensors"]


def test_report_exports_an_existing_run_and_a_bad_target_is_named(run_dir, tmp_path, capsys):
    pytest.importorskip("mlflow", reason="the track extra is not installed")
    assert main(["report", str(run_dir), "--track", f"mlflow={tmp_path / 'store'}"]) == 0
    assert "mlflow: " in capsys.readouterr().out and (tmp_path / "store").is_dir()
    assert main(["report", str(run_dir), "--track", "wandb"]) == 2
    assert "--track 'wandb': one of mlflow, tensorboard" in capsys.readouterr().err
    with pytest.raises(TrackError, match="no rounds.jsonl"):
        export(tmp_path, Target("tensorboard"))


def test_nested_fields_become_dotted_parameters():
    assert flat({"a": {"b": 1, "c": [1, 2]}, "d": "x", "e": {}}) == {"a.b": "1", "a.c": "[1, 2]", "d": "x", "e": "{}"}
