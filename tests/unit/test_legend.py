"""LEGEND: calibration, the greedy depth choice, memory caps, tensors sent, per-layer aggregation."""
from __future__ import annotations

import numpy as np
import pytest

from emulation.profiles import get_profile
from testbed.scenario import TrainingConfig
from testbed.strategies.base import Context, NodeInfo, Update
from testbed.strategies.legend import Legend, default_ranks


@pytest.fixture
def ctx(base):
    return Context(training=TrainingConfig(local_steps=5, batch_size=16), max_len=32,
                   num_blocks=base.config.num_hidden_layers, seed=0, model_config=base.config)


def nodes(*specs):
    return [NodeInfo(name, get_profile(profile).with_overrides(**kw), 100) for name, profile, kw in specs]


def report(strategy, node, plan, compute_s, up_s, down_s, bytes_up, bytes_down):
    return Update(node, plan, {}, 100, {"compute_s": compute_s, "upload_s": up_s, "download_s": down_s,
                                        "bytes_up": bytes_up, "bytes_down": bytes_down})


def test_default_rank_distribution_grows_toward_the_output():
    assert default_ranks(6) == [2, 2, 4, 4, 8, 8]
    r = default_ranks(12)
    assert r == sorted(r) and r[-1] == 8


def test_first_round_calibrates_at_full_depth(ctx):
    s = Legend({}, ctx)
    tasks = s.configure(1, nodes(("a", "agx-xavier", {}), ("b", "jetson-tx2", {})), {})
    assert {n: t.choices["legend_depth"] for n, t in tasks.items()} == {"a": 6, "b": 6}
    assert {n: t.plan.blocks for n, t in tasks.items()} == {"a": tuple(range(6)), "b": tuple(range(6))}


def test_slow_devices_get_shallower_lora_and_meet_the_deadline(ctx):
    s = Legend({}, ctx)
    infos = nodes(("fast", "agx-xavier", {}), ("mid", "xavier-nx", {}), ("slow", "jetson-tx2", {}))
    full = s.plan_for(6)
    c = s._cost(6)
    # measured at full depth: compute 10 / 20 / 40 s (speed 4:2:1), links fast
    for name, t in (("fast", 10.0), ("mid", 20.0), ("slow", 40.0)):
        s.observe(report(s, name, full, t, 0.1, 0.1, c.upload_bytes, c.download_bytes))
    depths = s.choose_depths(infos)
    assert depths["fast"] == 6
    assert depths["fast"] >= depths["mid"] >= depths["slow"] >= 1
    assert depths["slow"] < 6
    deadline = s.predict_s("fast", 6)
    for n in ("mid", "slow"):
        d = depths[n]
        assert s.predict_s(n, d) <= deadline * (1 + 1e-9) or d == s.p.min_depth
        if d < 6:
            assert s.predict_s(n, d + 1) > deadline  # greedy: the next deeper plan would be late


def test_slow_link_lowers_depth(ctx):
    s = Legend({}, ctx)
    infos = nodes(("a", "agx-xavier", {}), ("b", "agx-xavier", {}))
    full = s.plan_for(6)
    c = s._cost(6)
    s.observe(report(s, "a", full, 10.0, 0.1, 0.1, c.upload_bytes, c.download_bytes))
    s.observe(report(s, "b", full, 10.0, 30.0, 30.0, c.upload_bytes, c.download_bytes))  # 60x slower link
    d = s.choose_depths(infos)
    assert d["a"] == 6 and d["b"] < 6


def test_memory_cap_limits_depth(ctx):
    s = Legend({}, ctx)
    need = {d: s._cost(d).peak_memory_mb for d in range(1, 7)}
    assert need[1] < need[6]
    cap = int((need[2] + need[3]) / 2)
    tasks = s.configure(1, nodes(("small", "host", {"memory_mb": cap})), {})
    assert tasks["small"].choices["legend_depth"] == 2 and tasks["small"].plan.blocks == (4, 5)


def test_sent_tensors_are_exactly_what_the_plan_trains(ctx, base):
    from node import trainer
    s = Legend({}, ctx)
    state = trainer.trainable_state(trainer.build_model(base, s.global_plan()))
    assert state["base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"].shape == (2, 384)
    assert state["base_model.model.bert.encoder.layer.5.attention.self.value.lora_B.weight"].shape == (384, 8)
    infos = nodes(("a", "host", {}))
    for depth in (1, 3, 6):
        s.choose_depths = lambda ns, d=depth: {n.name: d for n in ns}
        task = s.configure(1, infos, state)["a"]
        own, sent = trainer.trainable_state(trainer.build_model(base, task.plan)), task.tensors
        assert set(own) == set(sent)
        assert all(own[k].shape == sent[k].shape for k in own)
        assert set(task.plan.blocks) == set(range(6 - depth, 6))


def test_per_layer_aggregation(ctx):
    s = Legend({}, ctx)
    k_top = "base_model.model.bert.encoder.layer.5.attention.self.query.lora_A.weight"
    k_low = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
    k_head = "base_model.model.classifier.modules_to_save.weight"
    state = {k_top: np.zeros((8, 4), np.float32), k_low: np.zeros((2, 4), np.float32), k_head: np.zeros(2, np.float32)}
    deep = Update("deep", s.plan_for(6), {k_top: np.full((8, 4), 3.0, np.float32), k_low: np.full((2, 4), 5.0, np.float32),
                                          k_head: np.full(2, 1.0, np.float32)}, 100, {})
    shallow = Update("shallow", s.plan_for(1), {k_top: np.full((8, 4), 1.0, np.float32),
                                                k_head: np.full(2, 3.0, np.float32)}, 300, {})
    new, metrics = s.aggregate(1, [deep, shallow], state)
    assert metrics == {"deadline_s": None}  # no greedy ran before this round
    np.testing.assert_allclose(new[k_top], 1.5)     # (3*100 + 1*300) / 400
    np.testing.assert_allclose(new[k_low], 5.0)     # only the deep node trained block 0
    np.testing.assert_allclose(new[k_head], 2.5)


def test_bad_params(ctx):
    with pytest.raises(ValueError, match="rank_distribution: 2 entries, but the model has 6 blocks"):
        Legend({"rank_distribution": [2, 4]}, ctx)
    with pytest.raises(ValueError, match="min_depth: 7 exceeds the model's 6 blocks"):
        Legend({"min_depth": 7}, ctx)


def test_what_it_learnt_survives_a_checkpoint(ctx):
    s = Legend({}, ctx)
    c = s._cost(6)
    s.observe(report(s, "a", s.plan_for(6), 10.0, 2.0, 4.0, c.upload_bytes, c.download_bytes))
    state = s.state_dict()
    assert state == {"speed": {"a": c.flops_per_round / 10.0}, "bw_up": {"a": c.upload_bytes * 8 / 2.0},
                     "bw_down": {"a": c.download_bytes * 8 / 4.0}}
    t = Legend({}, ctx)
    t.load_state_dict(state)
    infos = nodes(("a", "agx-xavier", {}), ("b", "agx-xavier", {}))
    assert t.choose_depths(infos) == s.choose_depths(infos)
