"""CAFF: n_i from memory / FLOP / upload budgets, final blocks only, per-layer aggregation."""
from __future__ import annotations

import numpy as np
import pytest

from emulation.profiles import get_profile
from testbed.scenario import TrainingConfig
from testbed.strategies.base import Context, NodeInfo, Update
from testbed.strategies.caff import Caff, training_mb


@pytest.fixture
def ctx(base):
    profiles = {f"{p}-0": get_profile(p) for p in ("caff-strong", "caff-medium", "caff-weak")}
    return Context(training=TrainingConfig(local_steps=5, batch_size=32), max_len=32,
                   num_blocks=base.config.num_hidden_layers, seed=0, model_config=base.config, profiles=profiles)


def infos(ctx):
    return [NodeInfo(n, p, 100) for n, p in ctx.profiles.items()]


def test_blocks_follow_budgets_and_respect_them(ctx):
    s = Caff({}, ctx)
    tasks = s.configure(1, infos(ctx), {})
    n = {name.split("-0")[0]: t.choices["caff_blocks"] for name, t in tasks.items()}
    assert n["caff-strong"] == 6
    assert n["caff-strong"] >= n["caff-medium"] >= n["caff-weak"]
    assert n["caff-weak"] < 6
    full = s.cost(6)
    for info in infos(ctx):
        k, b = s.blocks_for(info), s.budget(info)
        if k < 0:  # nothing fits: the plan trains the head and says so
            assert tasks[info.name].choices == {"caff_blocks": 0, "caff_over_budget": True}
            assert tasks[info.name].plan.blocks == ()
            assert s.cost(0).flops_per_round > b * full.flops_per_round
            continue
        assert not tasks[info.name].choices["caff_over_budget"]
        assert tasks[info.name].plan.blocks == tuple(range(6 - k, 6))
        c = s.cost(k)
        assert training_mb(c) <= b * training_mb(full) * (1 + 1e-9)
        assert c.flops_per_round <= b * full.flops_per_round * (1 + 1e-9)
        if k < 6:  # the next block would break a budget: greedy is maximal
            nxt = s.cost(k + 1)
            u = s.upload_factor(info, b)
            assert (training_mb(nxt) > b * training_mb(full) or nxt.flops_per_round > b * full.flops_per_round
                    or nxt.upload_bytes > u * b * full.upload_bytes)


def test_budgets_by_profile_name(ctx):
    s = Caff({"budgets": {"caff-strong": 1.0, "caff-medium": 1.0, "caff-weak": 1.0}, "upload_factor": [1, 1]}, ctx)
    assert all(t.choices["caff_blocks"] == 6 for t in s.configure(1, infos(ctx), {}).values())
    # a profile of the scenario without a budget is refused when the strategy is made (and by
    # `testbed validate`), not in the middle of a run
    with pytest.raises(ValueError, match=r"budgets: no entry for profile\(s\) \['caff-medium', 'caff-weak'\]"):
        Caff({"budgets": {"caff-strong": 1.0}}, ctx)


def test_sent_tensors_are_exactly_what_the_plan_trains(ctx, base):
    from node import trainer
    s = Caff({}, ctx)
    state = trainer.trainable_state(trainer.build_model(base, s.global_plan()))
    for name, task in s.configure(1, infos(ctx), state).items():
        own, sent = trainer.trainable_state(trainer.build_model(base, task.plan)), task.tensors
        assert set(own) == set(sent), name
        assert all(own[k].shape == sent[k].shape for k in own)


def test_layerwise_average_over_the_devices_that_trained_each_block(ctx):
    s = Caff({}, ctx)
    k0, k5, head = "bert.encoder.layer.0.output.dense.bias", "bert.encoder.layer.5.output.dense.bias", "classifier.bias"
    state = {k0: np.zeros(2, np.float32), k5: np.zeros(2, np.float32), head: np.zeros(2, np.float32)}
    strong = Update("s", s.plan_for(6), {k0: np.full(2, 4.0, np.float32), k5: np.full(2, 4.0, np.float32),
                                         head: np.full(2, 4.0, np.float32)}, 100, {})
    weak = Update("w", s.plan_for(1), {k5: np.full(2, 1.0, np.float32), head: np.full(2, 1.0, np.float32)}, 300, {})
    new, metrics = s.aggregate(1, [strong, weak], state)
    assert metrics == {}
    np.testing.assert_allclose(new[k0], 4.0)    # only the strong device trains the early block
    np.testing.assert_allclose(new[k5], 1.75)   # (4*100 + 1*300) / 400
    np.testing.assert_allclose(new[head], 1.75)
