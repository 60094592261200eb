"""`testbed run --track mlflow=... --track tensorboard`: a real run on the process backend
exported as it ends, and each round's accuracy read back from both stores."""
from __future__ import annotations

import pytest

from tests.integration.test_own_model import SCENARIO
from tests.runs import kill_run_processes, run_scenario, write_scenario
from tests.unit.test_local_checkpoints import checkpoint

pytestmark = pytest.mark.integration


def test_a_run_exports_every_round_to_mlflow_and_tensorboard(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="the track extra is not installed")
    pytest.importorskip("tensorboard", reason="the track extra is not installed")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    checkpoint(tmp_path, "bert")
    sc = write_scenario(tmp_path, SCENARIO.replace("MODEL", "{path: bert}"), "track.yaml")
    store = tmp_path / "mlruns"
    try:
        run = run_scenario(sc, tmp_path / "run", f"--track=mlflow={store}", "--track=tensorboard", timeout=600)
    finally:
        kill_run_processes(tmp_path / "run")
    want = [(r["round"], r["accuracy"]) for r in run.rounds if r["strategy"] == "fedlora"]
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # reading a file store, as `mlflow ui` on it needs
    client = MlflowClient(store.resolve().as_uri())
    (found,) = client.search_runs([client.get_experiment_by_name("own-model").experiment_id])
    assert found.data.tags["fedge.run_id"] == run.manifest["run_id"]
    got = [(m.step, m.value) for m in client.get_metric_history(found.info.run_id, "fedlora/accuracy")]
    assert got == want
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("fedlora/accuracy")  # float32 in the event file
    assert [e.step for e in scalars] == [s for s, _ in want]
    assert [e.value for e in scalars] == pytest.approx([a for _, a in want], rel=1e-6)
