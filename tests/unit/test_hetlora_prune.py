"""HetLoRA's rank self-pruning on the device: plans carry the penalty, the decision uses what the device reports."""
import numpy as np
import pytest
from pydantic import ValidationError

from emulation.profiles import PROFILES
from testbed.scenario import TrainingConfig
from testbed.strategies import Context, NodeInfo, Update
from node.plan import RankPenalty
from testbed.strategies.hetlora import HetLoRA

D = 3
Q = "base_model.model.bert.encoder.layer.{}.attention.self.{}.lora_{}.weight"
PRUNE = {"ranks": {"agx-xavier": 4, "rpi4": 1}, "rank_min": 1, "rank_max": 4, "self_prune": True,
         "prune_decay": 0.5, "prune_threshold": 0.05}


def _ctx(num_blocks=1):
    return Context(training=TrainingConfig(), max_len=16, num_blocks=num_blocks, seed=0)


def _state(r=4):
    rng = np.random.default_rng(0)
    st = {}
    for t in ("query", "value"):
        st[Q.format(0, t, "A")] = rng.normal(size=(r, D)).astype(np.float32)
        st[Q.format(0, t, "B")] = rng.normal(size=(D, r)).astype(np.float32)
    st["base_model.model.classifier.weight"] = rng.normal(size=(2, D)).astype(np.float32)
    return st


def test_plans_carry_rank_penalty_only_when_self_pruning():
    nodes = [NodeInfo("strong", PROFILES["agx-xavier"], 5), NodeInfo("weak", PROFILES["rpi4"], 5)]
    tasks = HetLoRA(PRUNE, _ctx()).configure(1, nodes, _state())
    assert tasks["strong"].plan.rank_penalty == RankPenalty(keep=2, weight=0.01)   # default prune_penalty
    assert tasks["weak"].plan.rank_penalty is None                                 # rank 1 = rank_min: cannot shrink
    assert tasks["strong"].plan.record()["rank_penalty"] == {"keep": 2, "weight": 0.01}  # as rounds.jsonl keeps it
    tasks = HetLoRA({**PRUNE, "prune_penalty": 0.3}, _ctx()).configure(1, nodes, _state())
    assert tasks["strong"].plan.rank_penalty == RankPenalty(keep=2, weight=0.3)
    off = HetLoRA({**PRUNE, "self_prune": False}, _ctx())
    assert all(t.plan.rank_penalty is None for t in off.configure(1, nodes, _state()).values())
    assert HetLoRA(PRUNE, _ctx()).global_plan().rank_penalty is None
    with pytest.raises(ValidationError, match="prune_penalty"):
        HetLoRA({**PRUNE, "prune_penalty": -0.1}, _ctx())


def _round(metrics: dict[str, dict], quiet: set[str]):
    """One round of rank-4 nodes; the last two ranks of the `quiet` ones carry ~nothing."""
    s = HetLoRA(PRUNE, _ctx())
    state = _state()
    nodes = [NodeInfo(n, PROFILES["agx-xavier"], 5) for n in metrics]
    tasks = s.configure(1, nodes, state)
    ups = []
    for n in metrics:
        t = {k: v.copy() for k, v in tasks[n].tensors.items()}
        if n in quiet:
            for k, v in t.items():
                if k.endswith("lora_B.weight"):
                    v[:, 2:] = 1e-6
        ups.append(Update(n, tasks[n].plan, t, 5, metrics[n]))
    s.aggregate(1, ups, state)
    return s, ups


def test_decision_uses_the_reported_tail_share():
    s, ups = _round({"says-quiet": {"tail_share": 0.0}, "says-busy": {"tail_share": 0.9}}, quiet={"says-busy"})
    assert s.tail_share(ups[0], 2) > 0.05 > s.tail_share(ups[1], 2)          # the tensors say the opposite
    assert s.prune_cap == {"says-quiet": 2}


@pytest.mark.parametrize("reported", [None, "0.0", float("nan"), -1.0, True])
def test_missing_or_malformed_tail_share_falls_back_to_the_server_measure(reported):
    m = {} if reported is None else {"tail_share": reported}
    s, _ = _round({"quiet": dict(m), "busy": dict(m)}, quiet={"quiet"})
    assert s.prune_cap == {"quiet": 2}


# == on the real model: the device runs the plan, its report drives the decision ===========

@pytest.fixture(scope="module")
def model_and_data():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    from node import trainer
    from node.data import load_dataset
    model, tok = trainer.load_base(trainer.ModelSpec(num_layers=2))
    ds = load_dataset("rotten_tomatoes")
    return model, trainer.Tokenized(tok, ds.texts[:32], ds.labels[:32], 16)


@pytest.mark.parametrize("threshold, pruned", [(0.99, True), (0.01, False)])
def test_device_report_matches_the_server_measure_and_decides(model_and_data, threshold, pruned):
    from node import trainer
    model, data = model_and_data
    s = HetLoRA({**PRUNE, "prune_penalty": 0.1, "prune_threshold": threshold, "lr": 1e-2, "local_steps": 2}, _ctx(2))
    state = trainer.trainable_state(trainer.build_model(model, s.global_plan()))
    rng = np.random.default_rng(0)   # a global model that has learnt something: every rank slice non-zero
    state = {k: rng.normal(scale=0.05, size=v.shape).astype(np.float32) if "lora_B" in k else v
             for k, v in state.items()}
    task = s.configure(1, [NodeInfo("dev", PROFILES["agx-xavier"], len(data))], state)["dev"]
    plan, sent = task.plan, task.tensors
    tensors, metrics = trainer.train(model, plan, sent, data)
    u = Update("dev", plan, tensors, metrics["samples"], metrics)
    assert metrics["tail_share"] == pytest.approx(s.tail_share(u, 2), rel=1e-5)
    s.aggregate(1, [u], state)
    assert s.prune_cap == ({"dev": 2} if pruned else {})
