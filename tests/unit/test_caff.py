"""CAFF: n_i from memory / FLOP / upload budgets, final blocks only, layer-wise aggregation.

Expected block counts are computed here from the cost model's figures for plans built in the
test and from the budget definition written out below, not with the strategy's own code."""
from __future__ import annotations

import numpy as np
import pytest

from emulation.profiles import get_profile
from node.plan import Plan, TrainSpec
from testbed import costmodel as cm
from testbed.scenario import ScenarioError, TrainingConfig, parse
from testbed.strategies.base import Context, NodeInfo, Update
from testbed.strategies.caff import Caff

GROUPS = ("caff-strong", "caff-medium", "caff-weak")
TRAIN = TrainSpec(local_steps=5, batch_size=32, max_len=32, lr=1e-3)


@pytest.fixture
def ctx(base):
    profiles = {f"{p}-0": get_profile(p) for p in GROUPS}
    return Context(training=TrainingConfig(local_steps=5, batch_size=32), max_len=32,
                   num_blocks=base.config.num_hidden_layers, seed=0, model_config=base.config, profiles=profiles)


def infos(ctx):
    return [NodeInfo(n, p, 100) for n, p in ctx.profiles.items()]


def costs(arch, L=6):
    """(FLOPs, the paper's peak memory, upload) of training the last n blocks + the head, n = 0..L."""
    out = []
    for n in range(L + 1):
        c = cm.estimate(arch, Plan("full", tuple(range(L - n, L)), train=TRAIN))
        m = c.breakdown["memory_mb"]
        out.append((c.flops_per_round, arch.weights_mb + m["gradients"] + m["optimizer"] + m["activations"],
                    c.upload_bytes))
    return out


def expected_blocks(arch, b, u, margin=0.02, basis="trainable"):
    c = costs(arch)
    span = (lambda k: c[0][k] + b * (c[-1][k] - c[0][k])) if basis == "trainable" else (lambda k: b * c[-1][k])
    budget = (span(0), span(1), u * c[-1][2])
    fits = [n for n in range(7) if all(c[n][k] <= budget[k] * (1 + margin) for k in range(3))]
    return max(fits, default=-1)


def test_the_costs_grow_with_the_blocks_and_the_forward_pass_is_a_fixed_third(base):
    c = costs(cm.Arch.from_config(base.config))
    assert all(c[n][k] < c[n + 1][k] for n in range(6) for k in range(3))
    assert 0.3 < c[0][0] / c[6][0] < 0.4       # head only: the forward through all blocks is paid anyway


def test_blocks_per_group_are_the_budget_definition(ctx, base):
    arch = cm.Arch.from_config(base.config)
    s = Caff({"upload_factor": [1.0, 1.0]}, ctx)  # upload out of the way: compute and memory decide
    tasks = s.configure(1, infos(ctx), {})
    got = {name.split("-0")[0]: t.choices["caff_blocks"] for name, t in tasks.items()}
    want = {g: expected_blocks(arch, b, 1.0) for g, b in zip(GROUPS, (1.0, 0.66, 0.33))}
    assert got == want
    assert want == {"caff-strong": 6, "caff-medium": 4, "caff-weak": 2}  # the figures docs/strategies.md gives
    for name, t in tasks.items():
        assert t.plan.blocks == tuple(range(6 - got[name.split("-0")[0]], 6)) and not t.choices["caff_over_budget"]


def test_the_old_budget_basis_leaves_the_weak_group_nothing_and_validate_says_so(ctx, base):
    arch = cm.Arch.from_config(base.config)
    assert expected_blocks(arch, 0.33, 1.0, basis="full") == -1
    with pytest.raises(ValueError, match=r"budgets: no configuration fits profile caff-weak \(budget 0.33\): "
                                         r"the head alone needs"):
        Caff({"budget_basis": "full"}, ctx)
    doc = {"name": "x", "model": {"name": "all-minilm-l6-v2"}, "data": {"max_len": 32},
           "training": {"batch_size": 32, "local_steps": 5},
           "nodes": [{"group": g, "profile": g} for g in GROUPS],
           "strategies": {"baseline": "caff", "run": [{"name": "caff", "params": {"budget_basis": "full"}}]}}
    with pytest.raises(ScenarioError, match=r"strategies.run\[0\].params.budgets: no configuration fits profile caff-weak"):
        parse(doc)
    parse({**doc, "strategies": {"baseline": "caff", "run": [{"name": "caff"}]}})  # the default basis: feasible


def test_upload_factors_are_stable_distinct_and_redrawn(ctx):
    s = Caff({}, ctx)
    f = s.budgets.upload_factor
    assert f("weak-12", 0.33, 1) != f("weak-21", 0.33, 1)          # a byte sum gave anagrams one factor
    assert f("weak-12", 0.33, 1) == Caff({}, ctx).budgets.upload_factor("weak-12", 0.33, 1)
    assert f("weak-12", 0.33, 1) != f("weak-12", 0.33, 2)          # redrawn every round (the authors' code)
    assert all(0.5 <= f(f"n{i}", 0.66, r) <= 1.0 for i in range(20) for r in range(3))
    assert f("strong-0", 1.0, 1) == 1.0                             # the strong group is not constrained
    once = Caff({"upload_draw": "once", "upload_for": "all"}, ctx).budgets.upload_factor
    assert once("weak-12", 0.33, 1) == once("weak-12", 0.33, 7) and once("strong-0", 1.0, 1) < 1.0


def test_a_small_upload_factor_costs_blocks(ctx, base):
    arch = cm.Arch.from_config(base.config)
    s = Caff({}, ctx)
    for u in (0.5, 0.6, 0.75, 1.0):
        assert s.budgets.blocks_for(get_profile("caff-medium"), u) == expected_blocks(arch, 0.66, u)
    assert expected_blocks(arch, 0.66, 0.5) < expected_blocks(arch, 0.66, 1.0)


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


K0, K5, HEAD = "bert.encoder.layer.0.output.dense.bias", "bert.encoder.layer.5.output.dense.bias", "classifier.bias"


def _round(s):
    state = {K0: np.zeros(2, np.float32), K5: np.zeros(2, np.float32), HEAD: np.zeros(2, np.float32)}
    strong = Update("s", s.plan_for(6), {K0: np.full(2, 4.0, np.float32), K5: np.full(2, 4.0, np.float32),
                                         HEAD: np.full(2, 4.0, np.float32)}, 100, {})
    weak = Update("w", s.plan_for(1), {K5: np.full(2, 1.0, np.float32), HEAD: np.full(2, 1.0, np.float32)}, 300, {})
    new, metrics = s.aggregate(1, [strong, weak], state)
    assert metrics == {}
    return new


@pytest.mark.parametrize("aggregation, k0, k5", [
    ("samples", 4.0, (4 * 100 + 1 * 300) / 400),   # only the strong device trains the early block
    ("mean", 4.0, (4 + 1) / 2),
    ("damped", 0.5 * 4.0 + 0.5 * 0.0, 1.0 * (4 + 1) / 2),  # r = 1/2 of the devices trained block 0, 2/2 block 5
])
def test_layerwise_average_over_the_devices_that_trained_each_block(ctx, aggregation, k0, k5):
    new = _round(Caff({"aggregation": aggregation}, ctx))
    np.testing.assert_allclose(new[K0], k0)
    np.testing.assert_allclose(new[K5], k5)
    np.testing.assert_allclose(new[HEAD], k5)
