"""The adapter and (IA)^3 baselines end to end: real nodes train them, the aggregator averages
them, and what crosses the network is what the cost model says the plan trains."""
from __future__ import annotations

import pytest

from tests.runs import run_scenario, write_scenario

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY = """
name: low-parameter
seed: 3
backend: process
dilation: 1
model: {name: all-minilm-l6-v2}
data: {dataset: rotten_tomatoes, test_size: 40, train_size: 200, max_len: 16, partition: {kind: iid}}
training: {rounds: 2, local_steps: 2, batch_size: 8, lr: 0.001, target_accuracy: 0.99, round_deadline_s: 300}
nodes:
  - {group: a, count: 2, profile: host}
strategies:
  baseline: fedadapter
  run:
    - {name: fedadapter}
    - {name: pfeiffer, type: fedadapter, params: {kind: pfeiffer, last_blocks: 2}}
    - {name: fedia3}
"""


def test_adapters_and_ia3_train_and_send_what_their_plans_train(tmp_path):
    from testbed import costmodel as cm
    from testbed.strategies import STRATEGIES, Context
    from testbed.scenario import TrainingConfig
    run = run_scenario(write_scenario(tmp_path, TINY), tmp_path / "run", timeout=600)
    ctx = Context(training=TrainingConfig(), max_len=16, num_blocks=6, seed=3,
                  model_config={"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 6,
                                "num_attention_heads": 12, "vocab_size": 30522, "max_position_embeddings": 512,
                                "type_vocab_size": 2})
    for name, kind, params, method in (("fedadapter", "fedadapter", {}, "adapter"),
                                       ("pfeiffer", "fedadapter", {"kind": "pfeiffer", "last_blocks": 2}, "adapter"),
                                       ("fedia3", "fedia3", {}, "ia3")):
        plan = STRATEGIES[kind](params, ctx).global_plan()
        payload = cm.trained_params(cm.MINILM_L6, plan) * 4
        rows = [r for r in run.rows(name) if r["round"] > 0]
        assert len(rows) == 2 and all(r["participants"] == 2 for r in rows), name
        for r in rows:
            assert all(n["status"] == "ok" and n["plan"]["method"] == method for n in r["nodes"]), r
            sent = r["payload"]["blocks_up"] + r["payload"]["head_up"]
            assert sent == 2 * payload, (name, sent, payload)   # two nodes, each the plan's tensors
            assert r["payload"]["head_up"] == 2 * 770 * 4         # the classifier alone
        assert run.summary["strategies"][name]["final_accuracy"] is not None
