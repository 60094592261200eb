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


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_local_decoder_checkpoint_runs_the_lora_family_and_full_end_to_end(tmp_path, family):
    """A decoder: padded with its end-of-sequence token, LoRA on peft's default targets (Llama:
    q_proj and v_proj; GPT-2: c_attn, whose config counts its blocks as n_layer), per-device
    ranks (HetLoRA), sub-models of its blocks (FedRA), full fine-tuning."""
    checkpoint(tmp_path, family)
    text = SCENARIO.replace("MODEL", f"{{path: {family}}}").replace(
        "run: [{name: fedlora, params: {rank: 2}}, {name: full}]",
        "run: [{name: fedlora, params: {rank: 2}}, {name: hetlora}, {name: fedra}, {name: full}]")
    sc = write_scenario(tmp_path, text, "llama.yaml")
    try:
        run = run_scenario(sc, tmp_path / "run", timeout=600)
    finally:
        kill_run_processes(tmp_path / "run")
    assert run.manifest["model"]["blocks"] == 2
    assert {r["strategy"] for r in run.rounds} == {"fedlora", "hetlora", "fedra", "full"}
    trained = [r for r in run.rounds if r["round"] > 0]
    assert all(r["participants"] == 2 and not r["failed"] for r in trained), [(r["strategy"], r["round"]) for r in trained]
    assert all(r["payload"] for r in trained)


@pytest.mark.parametrize("model, make, strategies, match", [
    ("{path: llama}", "llama", "[{name: legend}, {name: fedlora}]", "strategies legend need a BERT model for now"),
    ("{path: nowhere}", None, None, "model.path: no such checkpoint folder"),
    ("{name: all-minilm-l6-v2, path: bert}", "bert", None, "model: give either name"),
])
def test_a_checkpoint_the_run_cannot_use_is_refused_at_validate(tmp_path, model, make, strategies, match):
    if make:
        checkpoint(tmp_path, make)
    text = SCENARIO.replace("MODEL", model)
    if strategies:
        text = text.replace("run: [{name: fedlora, params: {rank: 2}}, {name: full}]", f"run: {strategies}")
    with pytest.raises(ScenarioError, match=match):
        load(write_scenario(tmp_path, text, "own.yaml"))


def test_lora_targets_follow_the_architecture_or_must_be_named(tmp_path):
    """LoRA strategies take peft's default targets for the model's type; where peft has none
    (DistilBERT), validate says to name them, and named ones are taken."""
    from testbed.rounds import resolved_params
    from testbed.scenario import strategy_context
    checkpoint(tmp_path, "llama")
    sc = load(_scenario(tmp_path, "{path: llama}"))
    assert resolved_params(sc, strategy_context(sc))["fedlora"]["target_modules"] == ["q_proj", "v_proj"]
    checkpoint(tmp_path, "distilbert")
    with pytest.raises(ScenarioError, match=r"params.target_modules: peft has no default LoRA target modules for "
                                            r"'distilbert' models: name them"):
        load(_scenario(tmp_path, "{path: distilbert}"))
    named = SCENARIO.replace("MODEL", "{path: distilbert}").replace(
        "{name: fedlora, params: {rank: 2}}", "{name: fedlora, params: {rank: 2, target_modules: [q_lin, v_lin]}}")
    sc = load(write_scenario(tmp_path, named, "named.yaml"))
    assert resolved_params(sc, strategy_context(sc))["fedlora"]["target_modules"] == ["q_lin", "v_lin"]
