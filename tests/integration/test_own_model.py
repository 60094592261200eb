"""A scenario with a local checkpoint: validated (files, family), run end to end on the process
backend, and announced by fingerprint, which a node with another copy refuses."""
from __future__ import annotations

import pytest

from testbed.scenario import ScenarioError, load
from tests.runs import kill_run_processes, run_scenario, write_scenario
from tests.unit.test_local_checkpoints import checkpoint

pytestmark = pytest.mark.integration

SCENARIO = """
name: own-model
seed: 2
backend: process
dilation: off
model: MODEL
data: {dataset: rotten_tomatoes, test_size: 40, train_size: 120, max_len: 12, partition: {kind: iid}}
training: {rounds: 2, local_steps: 2, batch_size: 8, lr: 0.01, target_accuracy: 0.99}
nodes:
  - {group: n, count: 2, profile: host}
strategies:
  baseline: fedlora
  run: [{name: fedlora, params: {rank: 2}}, {name: full}]
"""


def _scenario(tmp_path, model: str):
    return write_scenario(tmp_path, SCENARIO.replace("MODEL", model), "own.yaml")


def test_a_local_bert_checkpoint_runs_end_to_end(tmp_path):
    checkpoint(tmp_path, "bert")  # tmp_path/bert: a tiny BERT with its tokenizer
    sc = _scenario(tmp_path, "{path: bert}")
    try:
        run = run_scenario(sc, tmp_path / "run", timeout=600)
    finally:
        kill_run_processes(tmp_path / "run")
    model = run.manifest["model"]
    assert model["path"] == str(tmp_path / "bert") and model["blocks"] == 2 and len(model["fingerprint"]) == 16
    assert {r["strategy"] for r in run.rounds} == {"fedlora", "full"}
    assert all(r["participants"] == 2 for r in run.rounds if r["round"] > 0)


@pytest.mark.parametrize("model, make, match", [
    ("{path: llama}", "llama", "model.path: a 'llama' model: the cost model"),
    ("{path: nowhere}", None, "model.path: no such checkpoint folder"),
    ("{name: all-minilm-l6-v2, path: bert}", "bert", "model: give either name"),
])
def test_a_checkpoint_the_run_cannot_use_is_refused_at_validate(tmp_path, model, make, match):
    if make:
        checkpoint(tmp_path, make)
    with pytest.raises(ScenarioError, match=match):
        load(_scenario(tmp_path, model))
