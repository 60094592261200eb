"""LEGEND: calibration, the greedy depth choice, memory caps, tensors sent, per-layer aggregation."""
from __future__ import annotations

import numpy as np
import pytest

from emulation.profiles import get_profile
from testbed.scenario import TrainingConfig
from testbed.strategies.base import Context, NodeInfo, Update
from node.plan import HeadSpec, LoraSpec, Plan, TrainSpec
from testbed import costmodel as cm
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


RANKS = (2, 2, 4, 4, 8, 8)


def closed_form(base, d, ranks=RANKS):
    """(FLOPs, bytes down, bytes up) of a round of LoRA on the top d blocks, from the cost model
    for a plan built here (block b at rank ranks[b], the classifier as the head, 5 steps of batch
    16, length 32)."""
    blocks = tuple(range(6 - d, 6))
    lora = LoraSpec(r=max(ranks[b] for b in blocks), alpha=16, rank_pattern={b: ranks[b] for b in blocks})
    c = cm.estimate(cm.Arch.from_config(base.config), Plan("lora", blocks, lora=lora, head=HeadSpec(pooler=False),
                                                            train=TrainSpec(local_steps=5, batch_size=16, max_len=32)))
    return c.flops_per_round, c.download_bytes, c.upload_bytes


def expected(base, devices, rule="straggler", scaling=True):
    """devices: name -> (FLOP/s, downlink bit/s, uplink bit/s).
    - ranks: with scaling, block b at max(1, floor(c r_b)), c = min(speed / the best speed,
      link / the best link), link = 2 / (1/up + 1/down); else the global ranks;
    - the round time at depth d is FLOPs(d) / speed + 8 bytes_down(d) / downlink + 8 bytes_up(d) / uplink;
    - T = the slowest device's time at depth 1 (straggler) or the fastest's at depth 6;
    - each device's depth: the deepest d whose time is within T."""
    link = {n: 2 / (1 / up + 1 / dn) for n, (_, dn, up) in devices.items()}
    best_s, best_l = max(v[0] for v in devices.values()), max(link.values())
    ranks = {n: [max(1, int(min(v[0] / best_s, link[n] / best_l) * r + 1e-9)) for r in RANKS] if scaling
             else list(RANKS) for n, v in devices.items()}
    t = {n: {d: f / s + 8 * bd / dn + 8 * bu / up for d in range(1, 7)
             for f, bd, bu in [closed_form(base, d, ranks[n])]} for n, (s, dn, up) in devices.items()}
    T = max(t[n][1] for n in t) if rule == "straggler" else min(t[n][6] for n in t)
    depth = {n: max([d for d in range(1, 7) if t[n][d] <= T * (1 + 1e-9)], default=1) for n in t}
    return {n: (depth[n], ranks[n]) for n in t}, T


def primed(ctx, devices, **params):
    s = Legend(params, ctx)
    s.speed = {n: v[0] for n, v in devices.items()}
    s.bw_down = {n: v[1] for n, v in devices.items()}
    s.bw_up = {n: v[2] for n, v in devices.items()}
    return s


FAST_LINK = 1e12  # bit/s: the link takes no time


@pytest.mark.parametrize("rule, want", [("straggler", {"fast": 6, "mid": 6, "slow": 1}),
                                        ("fastest_full", {"fast": 6, "mid": 1, "slow": 1})])
def test_depths_follow_the_deadline_rule_for_devices_of_given_speed(ctx, base, rule, want):
    """One rank distribution for all (rank_scaling: none), speeds 4:2:1, links that take no time.
    FLOPs at depth 1 are about 0.57 of depth 6, so under the straggler bound T = t_slow(1) =
    4 F(1) / S both faster devices fit all 6 blocks; under fastest_full T = F(6) / S and a device
    half as fast fits nothing above depth 1."""
    S = 2e10
    devices = {"fast": (S, FAST_LINK, FAST_LINK), "mid": (S / 2, FAST_LINK, FAST_LINK),
               "slow": (S / 4, FAST_LINK, FAST_LINK)}
    want_all, T = expected(base, devices, rule, scaling=False)
    assert {n: d for n, (d, _) in want_all.items()} == want
    f1, f6 = closed_form(base, 1)[0], closed_form(base, 6)[0]
    assert 0.5 < f1 / f6 < 0.65
    s = primed(ctx, devices, deadline=rule, rank_scaling="none")
    assert s.choose(nodes(("fast", "agx-xavier", {}), ("mid", "xavier-nx", {}), ("slow", "jetson-tx2", {}))) == want_all
    assert s.deadline_s == pytest.approx(T, rel=1e-9)


def test_ranks_scale_with_capability_and_are_chosen_with_the_depth(ctx, base):
    """Speeds 4:2:1 on links that take no time: ranks x1, x1/2, x1/4 (at least 1), growing toward
    the output; depths from the round times with those ranks."""
    S = 2e10
    devices = {"fast": (S, FAST_LINK, FAST_LINK), "mid": (S / 2, FAST_LINK, FAST_LINK),
               "slow": (S / 4, FAST_LINK, FAST_LINK)}
    want, T = expected(base, devices)
    assert [r for _, r in want.values()] == [[2, 2, 4, 4, 8, 8], [1, 1, 2, 2, 4, 4], [1, 1, 1, 1, 2, 2]]
    s = primed(ctx, devices)
    assert (s.p.rank_scaling, s.p.deadline) == ("capability", "straggler")  # the defaults
    assert s.choose(nodes(("fast", "agx-xavier", {}), ("mid", "xavier-nx", {}), ("slow", "jetson-tx2", {}))) == want
    assert s.deadline_s == pytest.approx(T, rel=1e-9)


def test_a_slow_link_makes_the_straggler_and_lowers_its_ranks(ctx, base):
    """a and b compute equally fast, c at 2/3 of their speed; b's links are 0.1 Mbit/s, the others'
    50: b's capability is its link's 1/500, so it trains rank 1 everywhere."""
    S = 2e10
    devices = {"a": (S, 50e6, 50e6), "b": (S, 0.1e6, 0.1e6), "c": (S / 1.5, 50e6, 50e6)}
    want, T = expected(base, devices)
    assert want["b"][1] == [1] * 6 and want["a"][1] == list(RANKS)
    s = primed(ctx, devices)
    got = s.choose(nodes(("a", "agx-xavier", {}), ("b", "agx-xavier", {}), ("c", "agx-xavier", {})))
    assert got == want
    assert s.deadline_s == pytest.approx(T, rel=1e-9)


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
    for depth, ranks in ((1, RANKS), (3, [1, 1, 2, 2, 4, 4]), (6, [1, 1, 1, 1, 2, 2])):
        s.choose = lambda ns, d=depth, r=ranks: {n.name: (d, list(r)) for n in ns}
        task = s.configure(1, infos, state)["a"]
        own, sent = trainer.trainable_state(trainer.build_model(base, task.plan)), task.tensors
        assert set(own) == set(sent)
        assert all(own[k].shape == sent[k].shape for k in own)
        assert set(task.plan.blocks) == set(range(6 - depth, 6))
        assert task.choices == {"legend_depth": depth, "legend_ranks": list(ranks[6 - depth:])}
        for k, v in sent.items():  # the leading rank slices of the global modules (truncation)
            g = state[k]
            np.testing.assert_array_equal(v, g[:v.shape[0]] if "lora_A" in k else g[:, :v.shape[1]] if "lora_B" in k else g)


A5 = "base_model.model.bert.encoder.layer.5.attention.self.query.lora_A.weight"
B5 = "base_model.model.bert.encoder.layer.5.attention.self.query.lora_B.weight"
A0 = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
B0 = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"
HEAD = "base_model.model.classifier.modules_to_save.weight"


def _agg(ctx, padding):
    """Block 5 (global rank 4): `deep` trained all 4 slices with value 3 (100 samples), `shallow`
    2 slices with value 1 (300 samples); block 0 only `deep` (5)."""
    s = Legend({"padding": padding}, ctx)
    f = lambda shape, v: np.full(shape, v, np.float32)  # noqa: E731
    state = {A5: f((4, 3), 0), B5: f((3, 4), 0), A0: f((2, 3), 0), B0: f((3, 2), 0), HEAD: f(2, 0)}
    deep = Update("deep", s.plan_for(6), {A5: f((4, 3), 3), B5: f((3, 4), 3), A0: f((2, 3), 5), B0: f((3, 2), 5),
                                          HEAD: f(2, 1)}, 100, {})
    shallow = Update("shallow", s.plan_for(1), {A5: f((2, 3), 1), B5: f((3, 2), 1), HEAD: f(2, 3)}, 300, {})
    new, metrics = s.aggregate(1, [deep, shallow], state)
    assert metrics == {"deadline_s": None}  # no greedy ran before this round
    np.testing.assert_allclose(new[A0], 5.0)     # only the deep node trained block 0
    np.testing.assert_allclose(new[HEAD], 2.5)   # (1 x 100 + 3 x 300) / 400
    return new


def test_per_layer_aggregation_zero_pads_heterogeneous_ranks(ctx):
    new = _agg(ctx, "zeros")
    np.testing.assert_allclose(new[A5][:2], (3 * 100 + 1 * 300) / 400)   # both trained slices 0-1
    np.testing.assert_allclose(new[A5][2:], 3 * 100 / 400)               # shallow's zero pad counts
    np.testing.assert_allclose(new[B5][:, 2:], 3 * 100 / 400)


def test_per_layer_aggregation_per_slice(ctx):
    new = _agg(ctx, "slice")
    np.testing.assert_allclose(new[A5][:2], (3 * 100 + 1 * 300) / 400)
    np.testing.assert_allclose(new[A5][2:], 3.0)                          # only deep trained them


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
    assert t.choose(infos) == s.choose(infos)
