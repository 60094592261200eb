"""HetLoRA and FedRA: ranks and allocations, exact truncation / aggregation, and the runner's contract
(the tensors sent to a node are exactly the ones its plan trains) on the real model."""
from dataclasses import replace

import numpy as np
import pytest
from pydantic import ValidationError

from emulation.profiles import PROFILES
from testbed.scenario import TrainingConfig
from testbed.strategies import Context, NodeInfo, Update
from testbed.strategies.base import block_of
from testbed.strategies.fedra import FedRA
from testbed.strategies.hetlora import HetLoRA

D = 3  # width of the toy tensors
Q = "base_model.model.bert.encoder.layer.{}.attention.self.{}.lora_{}.weight"
HEAD = {"base_model.model.classifier.weight": (2, D), "base_model.model.classifier.bias": (2,)}


def _ctx(num_blocks=2, seed=0, profiles=None):
    return Context(training=TrainingConfig(), max_len=16, num_blocks=num_blocks, seed=seed,
                   profiles=profiles or {})


def _node(name, profile, samples=10):
    return NodeInfo(name, PROFILES[profile], samples)


def _state(num_blocks, r, seed=0, targets=("query", "value")):
    """A toy global state: LoRA A (r, D) and B (D, r) per block and target, plus a head."""
    rng = np.random.default_rng(seed)
    st = {}
    for b in range(num_blocks):
        for t in targets:
            st[Q.format(b, t, "A")] = rng.normal(size=(r, D)).astype(np.float32)
            st[Q.format(b, t, "B")] = rng.normal(size=(D, r)).astype(np.float32)
    for k, shape in HEAD.items():
        st[k] = rng.normal(size=shape).astype(np.float32)
    return st


def _update(name, plan, tensors, samples):
    return Update(name, plan, {k: np.asarray(v, np.float32) for k, v in tensors.items()}, samples)


# == HetLoRA ==============================================================================

def test_hetlora_rank_rule_from_cpu_share():
    s = HetLoRA({"rank_min": 2, "rank_max": 16}, _ctx())
    assert s.allowed_ranks() == [2, 4, 8, 16]
    got = {p: s.profile_rank(PROFILES[p]) for p in
           ("rpi4", "jetson-tx2", "xavier-nx", "caff-medium", "caff-weak", "agx-xavier")}
    # 16 x share, rounded down to a power of two: 2.88 -> 2, 4 -> 4, 8 -> 8, 10.6 -> 8, 5.3 -> 4, 16
    assert got == {"rpi4": 2, "jetson-tx2": 4, "xavier-nx": 8, "caff-medium": 8, "caff-weak": 4, "agx-xavier": 16}
    s = HetLoRA({"rank_min": 3, "rank_max": 12, "round_to": "int"}, _ctx())
    assert s.profile_rank(PROFILES["caff-medium"]) == 7          # floor(12 x 0.66)
    assert s.profile_rank(PROFILES["rpi4"]) == 3                 # 2.16 -> at least rank_min
    # relative to the strongest device of the scenario
    ctx = _ctx(profiles={"a": PROFILES["rpi4"], "b": PROFILES["rpi5"]})
    s = HetLoRA({"full_rank_share": "all", "rank_max": 16}, ctx)
    assert s.profile_rank(PROFILES["rpi5"]) == 16 and s.profile_rank(PROFILES["rpi4"]) == 4   # 5.76 -> 4


def test_hetlora_profile_mapping_overrides_rule():
    s = HetLoRA({"ranks": {"rpi4": 4, "agx-xavier": 8}, "rank_max": 8}, _ctx())
    assert s.profile_rank(PROFILES["rpi4"]) == 4
    assert s.profile_rank(PROFILES["agx-xavier"]) == 8
    assert s.profile_rank(PROFILES["jetson-tx2"]) == 2           # unmapped: 8 x 0.25


@pytest.mark.parametrize("params, field", [
    ({"ranks": {"rpi4": 32}, "rank_max": 16}, "rank_max"),
    ({"ranks": {"nope": 2}}, "nope"),
    ({"rank_min": 8, "rank_max": 4}, "rank_min"),
    ({"weighting": "mean"}, "weighting"),
    ({"full_rank_share": 0}, "full_rank_share"),
    ({"prune_decay": 1.0}, "prune_decay"),
])
def test_hetlora_bad_params(params, field):
    with pytest.raises(ValidationError) as err:
        HetLoRA(params, _ctx())
    assert field in str(err.value)


def test_hetlora_plans_scale_alpha_with_rank():
    s = HetLoRA({"ranks": {"rpi4": 2, "agx-xavier": 4}, "rank_max": 4, "alpha_per_rank": 1.5}, _ctx(2))
    g = s.global_plan()
    assert g.lora.r == 4 and g.lora.alpha == 6.0 and g.blocks == (0, 1)
    nodes = [_node("weak", "rpi4"), _node("strong", "agx-xavier")]
    tasks = s.configure(1, nodes, _state(2, 4))
    for name, r in (("weak", 2), ("strong", 4)):
        plan = tasks[name].plan
        assert plan.lora.r == r and plan.lora.alpha == 1.5 * r
        assert plan.lora.alpha / plan.lora.r == g.lora.alpha / g.lora.r
        assert plan.blocks == (0, 1) and plan.head.train is True and tasks[name].choices == {"hetlora_rank": r}
        assert all(isinstance(k, str) for k in plan.to_dict()) and all(isinstance(k, str) for k in plan.to_dict()["lora"])
    assert tasks["weak"].plan.train.seed != tasks["strong"].plan.train.seed


def test_hetlora_truncation_gives_exactly_the_leading_slices():
    state = _state(2, 4)
    s = HetLoRA({"ranks": {"rpi4": 2, "agx-xavier": 4}, "rank_max": 4}, _ctx(2))
    tasks = s.configure(1, [_node("weak", "rpi4"), _node("strong", "agx-xavier")], state)
    for name, r in (("weak", 2), ("strong", 4)):
        sent = tasks[name].tensors
        assert set(sent) == set(state)
        for k, v in sent.items():
            if k.endswith("lora_A.weight"):
                assert v.shape == (r, D)
                np.testing.assert_array_equal(v, state[k][:r, :])
            elif k.endswith("lora_B.weight"):
                assert v.shape == (D, r)
                np.testing.assert_array_equal(v, state[k][:, :r])
            else:
                np.testing.assert_array_equal(v, state[k])
            assert v.flags.c_contiguous
    # truncation does not alter the global state
    np.testing.assert_array_equal(state[Q.format(0, "query", "A")], _state(2, 4)[Q.format(0, "query", "A")])


def _two_node_round(params, samples=(1, 3)):
    """Nodes of rank 2 (1 sample) and rank 4 (3 samples) return known tensors; rank_max 4."""
    s = HetLoRA({"ranks": {"rpi4": 2, "agx-xavier": 4}, "rank_max": 4, **params}, _ctx(2))
    state = _state(2, 4)
    nodes = [_node("weak", "rpi4", samples[0]), _node("strong", "agx-xavier", samples[1])]
    tasks = s.configure(1, nodes, state)
    rng = np.random.default_rng(42)
    ret = {n: {k: rng.normal(size=v.shape).astype(np.float32) for k, v in tasks[n].tensors.items()}
           for n in ("weak", "strong")}
    ups = [_update("weak", tasks["weak"].plan, ret["weak"], samples[0]),
           _update("strong", tasks["strong"].plan, ret["strong"], samples[1])]
    new, metrics = s.aggregate(1, ups, state)
    assert "rank_caps" not in metrics  # no self-pruning
    return s, state, ret, new, metrics


def _device_norm(tensors):
    """||Delta W||_F of a device's whole update: every (block, target) module's B A stacked."""
    sq = 0.0
    for b in range(2):
        for t in ("query", "value"):
            sq += np.linalg.norm(tensors[Q.format(b, t, "B")].astype(np.float64) @ tensors[Q.format(b, t, "A")]) ** 2
    return np.sqrt(sq)


def test_hetlora_default_is_the_papers_sparsity_weighted_zero_padding():
    """One weight per device, ||B A||_F of its whole update over the round's sum; every rank
    slice divided by the total weight, the low-rank device's zero pad included."""
    s, state, ret, new, metrics = _two_node_round({})
    assert (s.p.weighting, s.p.norm_scope, s.p.padding) == ("norm", "device", "zeros")
    nw, ns = _device_norm(ret["weak"]), _device_norm(ret["strong"])
    pw, ps = nw / (nw + ns), ns / (nw + ns)
    assert metrics["norm_weights"] == pytest.approx({"weak": pw, "strong": ps}, rel=1e-9)
    for b in range(2):
        for t in ("query", "value"):
            ka, kb = Q.format(b, t, "A"), Q.format(b, t, "B")
            A_w, A_s, B_w, B_s = ret["weak"][ka], ret["strong"][ka], ret["weak"][kb], ret["strong"][kb]
            np.testing.assert_allclose(new[ka][:2], pw * A_w + ps * A_s[:2], rtol=1e-5)
            np.testing.assert_allclose(new[ka][2:], ps * A_s[2:], rtol=1e-5)     # the zero pad counts
            np.testing.assert_allclose(new[kb][:, :2], pw * B_w + ps * B_s[:, :2], rtol=1e-5)
            np.testing.assert_allclose(new[kb][:, 2:], ps * B_s[:, 2:], rtol=1e-5)
    for k in HEAD:                                    # the head (not in the paper): by sample count
        np.testing.assert_allclose(new[k], 0.25 * ret["weak"][k] + 0.75 * ret["strong"][k], rtol=1e-6)


def test_hetlora_slice_aggregation_by_samples():
    s, state, ret, new, _ = _two_node_round({"weighting": "samples", "padding": "slice"})
    w, st = 1 / 4, 3 / 4
    for b in range(2):
        for t in ("query", "value"):
            ka, kb = Q.format(b, t, "A"), Q.format(b, t, "B")
            A_w, A_s, B_w, B_s = ret["weak"][ka], ret["strong"][ka], ret["weak"][kb], ret["strong"][kb]
            np.testing.assert_allclose(new[ka][:2], w * A_w + st * A_s[:2], rtol=1e-6)   # both hold 0..1
            np.testing.assert_allclose(new[kb][:, :2], w * B_w + st * B_s[:, :2], rtol=1e-6)
            np.testing.assert_array_equal(new[ka][2:], A_s[2:])                     # only the rank-4 node
            np.testing.assert_array_equal(new[kb][:, 2:], B_s[:, 2:])
            assert new[ka].shape == (4, D) and new[kb].shape == (D, 4) and new[ka].dtype == np.float32
    for k in HEAD:
        np.testing.assert_allclose(new[k], w * ret["weak"][k] + st * ret["strong"][k], rtol=1e-6)
    assert not any(np.shares_memory(new[k], state[k]) for k in state if "lora" in k)


def test_hetlora_per_module_norm_weights_with_zero_padding():
    s, state, ret, new, _ = _two_node_round({"norm_scope": "module"})
    for b in range(2):
        for t in ("query", "value"):
            ka, kb = Q.format(b, t, "A"), Q.format(b, t, "B")
            A_w, A_s, B_w, B_s = ret["weak"][ka], ret["strong"][ka], ret["weak"][kb], ret["strong"][kb]
            nw = np.linalg.norm(B_w.astype(np.float64) @ A_w)  # ||B_k A_k||_F, per module
            ns = np.linalg.norm(B_s.astype(np.float64) @ A_s)
            pw, ps = nw / (nw + ns), ns / (nw + ns)
            np.testing.assert_allclose(new[ka][:2], pw * A_w + ps * A_s[:2], rtol=1e-5)
            np.testing.assert_allclose(new[ka][2:], ps * A_s[2:], rtol=1e-5)     # weak node's zero pad counts
            np.testing.assert_allclose(new[kb][:, :2], pw * B_w + ps * B_s[:, :2], rtol=1e-5)
            np.testing.assert_allclose(new[kb][:, 2:], ps * B_s[:, 2:], rtol=1e-5)
    for k in HEAD:                                    # the head stays a sample-weighted average
        np.testing.assert_allclose(new[k], 0.25 * ret["weak"][k] + 0.75 * ret["strong"][k], rtol=1e-6)


def test_hetlora_per_module_norm_weights_with_slice_padding():
    s, state, ret, new, _ = _two_node_round({"norm_scope": "module", "padding": "slice"})
    ka, kb = Q.format(1, "value", "A"), Q.format(1, "value", "B")
    nw = np.linalg.norm(ret["weak"][kb].astype(np.float64) @ ret["weak"][ka])
    ns = np.linalg.norm(ret["strong"][kb].astype(np.float64) @ ret["strong"][ka])
    np.testing.assert_allclose(new[ka][:2], (nw * ret["weak"][ka] + ns * ret["strong"][ka][:2]) / (nw + ns), rtol=1e-5)
    np.testing.assert_array_equal(new[ka][2:], ret["strong"][ka][2:])


@pytest.mark.parametrize("padding", ["slice", "zeros"])
def test_hetlora_slices_no_one_trained_keep_their_value(padding):
    s = HetLoRA({"ranks": {"rpi4": 2}, "rank_max": 4, "padding": padding, "weighting": "samples"}, _ctx(2))
    state = _state(2, 4)
    tasks = s.configure(1, [_node("a", "rpi4", 2), _node("b", "rpi4", 6)], state)
    ret = {n: {k: v + (1.0 if n == "a" else 3.0) for k, v in tasks[n].tensors.items()} for n in ("a", "b")}
    new, _ = s.aggregate(1, [_update(n, tasks[n].plan, ret[n], 2 if n == "a" else 6) for n in ("a", "b")], state)
    for k in state:
        if k.endswith("lora_A.weight"):
            np.testing.assert_allclose(new[k][:2], state[k][:2] + 2.5, rtol=1e-6)
            np.testing.assert_array_equal(new[k][2:], state[k][2:])
        elif k.endswith("lora_B.weight"):
            np.testing.assert_allclose(new[k][:, :2], state[k][:, :2] + 2.5, rtol=1e-6)
            np.testing.assert_array_equal(new[k][:, 2:], state[k][:, 2:])


def test_hetlora_no_updates_keeps_state():
    s = HetLoRA({"rank_max": 4}, _ctx(2))
    state = _state(2, 4)
    new, _ = s.aggregate(1, [], state)
    assert all(np.array_equal(new[k], state[k]) for k in state)


def test_hetlora_rejects_one_sided_update():
    s = HetLoRA({"ranks": {"rpi4": 2}, "rank_max": 4}, _ctx(1))
    state = _state(1, 4)
    t = dict(s.configure(1, [_node("a", "rpi4")], state)["a"].tensors)
    t.pop(Q.format(0, "query", "B"))
    with pytest.raises(ValueError, match="only one of"):
        s.aggregate(1, [_update("a", None, t, 1)], state)


def test_hetlora_self_pruning_measured_by_the_server_without_a_report():
    s = HetLoRA({"ranks": {"agx-xavier": 4}, "rank_max": 4, "rank_min": 1, "self_prune": True,
                 "prune_decay": 0.5, "prune_threshold": 0.05}, _ctx(1))
    state = _state(1, 4)
    nodes = [_node("quiet", "agx-xavier"), _node("busy", "agx-xavier")]
    tasks = s.configure(1, nodes, state)
    ret = {n: {k: v.copy() for k, v in tasks[n].tensors.items()} for n in ("quiet", "busy")}
    for k, v in ret["quiet"].items():          # the last two ranks of 'quiet' carry ~nothing
        if k.endswith("lora_B.weight"):
            v[:, 2:] = 1e-6
    ups = [_update(n, tasks[n].plan, ret[n], 5) for n in ("quiet", "busy")]
    assert s.tail_share(ups[0], 2) < 0.05 < s.tail_share(ups[1], 2)
    _, metrics = s.aggregate(1, ups, state)
    assert s.prune_cap == {"quiet": 2} and metrics["rank_caps"] == {"quiet": 2}
    assert s.state_dict() == {"prune_cap": {"quiet": 2}}
    tasks2 = s.configure(2, nodes, state)
    assert tasks2["quiet"].plan.lora.r == 2 and tasks2["busy"].plan.lora.r == 4
    assert tasks2["quiet"].tensors[Q.format(0, "query", "A")].shape == (2, D)
    # what it learnt goes on in a strategy restored from a checkpoint
    restored = HetLoRA({"ranks": {"agx-xavier": 4}, "rank_max": 4, "rank_min": 1, "self_prune": True}, _ctx(1))
    restored.load_state_dict(s.state_dict())
    assert restored.configure(2, nodes, state)["quiet"].plan.lora.r == 2
    # without self_prune nothing changes
    s2 = HetLoRA({"ranks": {"agx-xavier": 4}, "rank_max": 4}, _ctx(1))
    s2.aggregate(1, ups, state)
    assert s2.prune_cap == {}


# == FedRA ================================================================================

FEDRA_PROFILES = ["agx-xavier", "xavier-nx", "jetson-tx2", "rpi4", "caff-medium", "caff-weak"]


def _fedra_nodes():
    return [_node(f"n{i}", p, 10 + i) for i, p in enumerate(FEDRA_PROFILES)]


def test_fedra_capacities_from_cpu_share_relative_to_strongest_sampled():
    s = FedRA({}, _ctx(6))
    caps = s.capacities(_fedra_nodes())
    # floor(6 x share / 1.0), at least 1
    assert caps == {"n0": 6, "n1": 3, "n2": 1, "n3": 1, "n4": 3, "n5": 1}
    weak_only = [_node("a", "xavier-nx"), _node("b", "jetson-tx2")]
    assert s.capacities(weak_only) == {"a": 6, "b": 3}            # the strongest *sampled* trains all


def test_fedra_capacity_rules():
    nodes = _fedra_nodes()
    mem = FedRA({"capacity_from": "memory_mb", "min_blocks": 2}, _ctx(6)).capacities(nodes)
    assert mem["n0"] == 6 and mem["n5"] == 2                       # 405 / 31744 x 6 -> 0 -> min_blocks
    assert mem["n4"] == 2                                         # floor(6 x 811/31744) = 0 -> 2
    ref = FedRA({"reference": 0.5}, _ctx(6)).capacities(nodes)
    assert ref["n0"] == 6 and ref["n1"] == 6 and ref["n2"] == 3
    fixed = FedRA({"capacity_from": "fixed", "fixed_blocks": {"agx-xavier": 5, "xavier-nx": 9, "jetson-tx2": 2,
                                                             "rpi4": 1, "caff-medium": 3, "caff-weak": 1}},
                  _ctx(6)).capacities(nodes)
    assert fixed == {"n0": 5, "n1": 6, "n2": 2, "n3": 1, "n4": 3, "n5": 1}
    assert set(FedRA({"capacity_from": "fixed", "fixed_blocks": 2}, _ctx(6)).capacities(nodes).values()) == {2}
    allp = FedRA({"reference": "all"}, _ctx(6, profiles={"x": PROFILES["xavier-nx"], "y": PROFILES["rpi4"]}))
    assert allp.capacities([_node("y", "rpi4")]) == {"y": 2}      # floor(6 x 0.18 / 0.5)
    with pytest.raises(ValueError, match="no entry"):
        FedRA({"capacity_from": "fixed", "fixed_blocks": {"rpi4": 1}}, _ctx(6)).capacities(nodes)


@pytest.mark.parametrize("params, field", [
    ({"capacity_from": "fixed"}, "fixed_blocks"),
    ({"fixed_blocks": 2}, "fixed_blocks"),
    ({"capacity_from": "fixed", "fixed_blocks": {"nope": 1}}, "nope"),
    ({"capacity_from": "flops"}, "capacity_from"),
    ({"min_blocks": 0}, "min_blocks"),
    ({"reference": -1.0}, "reference"),
])
def test_fedra_bad_params(params, field):
    with pytest.raises(ValidationError) as err:
        FedRA(params, _ctx(6))
    assert field in str(err.value)


def test_fedra_allocation_sizes_distinct_in_range():
    s = FedRA({}, _ctx(6))
    nodes = _fedra_nodes()
    caps = s.capacities(nodes)
    for rnd in range(1, 21):
        alloc = s.allocate(rnd, nodes)
        assert set(alloc) == {n.name for n in nodes}
        for name, blocks in alloc.items():
            assert len(blocks) == caps[name] == len(set(blocks))
            assert all(isinstance(b, int) and 0 <= b < 6 for b in blocks)
            assert blocks == sorted(blocks)
        m = s.allocation_matrix(rnd, nodes)
        assert m.shape == (6, 6) and list(m.sum(axis=1)) == [caps[n.name] for n in nodes]


def test_fedra_allocation_random_per_round_and_reproducible():
    nodes = _fedra_nodes()
    a, b = FedRA({}, _ctx(6, seed=0)), FedRA({}, _ctx(6, seed=0))
    rounds = [a.allocate(r, nodes) for r in range(1, 11)]
    assert rounds == [b.allocate(r, nodes) for r in range(1, 11)]             # same seed: same matrices
    assert len({str(x) for x in rounds}) > 1                                  # differs across rounds
    assert rounds[0] != rounds[1]
    other = [FedRA({}, _ctx(6, seed=1)).allocate(r, nodes) for r in range(1, 11)]
    assert other != rounds                                                     # depends on the seed
    assert a.allocate(3, list(reversed(nodes))) == rounds[2]                   # not on the list order
    # every block of a constrained node turns up over the rounds (uniform choice)
    seen = {blk for r in rounds for blk in r["n3"]}
    assert len(seen) >= 4


def test_fedra_configure_sends_exactly_allocated_blocks_and_head():
    s = FedRA({"rank": 4}, _ctx(6))
    state = _state(6, 4)
    nodes = _fedra_nodes()
    tasks = s.configure(5, nodes, state)
    alloc = s.allocate(5, nodes)
    for i, n in enumerate(nodes):
        plan, sent, choices = tasks[n.name].plan, tasks[n.name].tensors, tasks[n.name].choices
        blocks = alloc[n.name]
        assert list(plan.blocks) == blocks == choices["fedra_blocks"] and choices["fedra_capacity"] == len(blocks)
        assert plan.to_dict()["lora"] == {"r": 4, "alpha": 4, "dropout": 0.0, "target_modules": ["query", "value"],
                                          "rank_pattern": {}, "alpha_pattern": {}}
        assert plan.head.train is True and all(isinstance(k, str) for k in plan.to_dict())
        expected = {k for k in state if block_of(k) in blocks} | set(HEAD)
        assert set(sent) == expected
        assert all(sent[k] is state[k] for k in sent)
    assert len({tasks[n.name].plan.train.seed for n in nodes}) == len(nodes)


@pytest.mark.parametrize("weighting, both", [("mean", (4 + 8) / 2),                # the official code
                                             ("samples", (4 * 1 + 8 * 3) / 4)])   # the variant
def test_fedra_aggregate_per_block_over_its_trainers(weighting, both):
    s = FedRA({"capacity_from": "fixed", "fixed_blocks": 2, "weighting": weighting}, _ctx(6))
    assert FedRA({}, _ctx(6)).p.weighting == "mean"
    state = _state(6, 4)
    nodes = [_node("a", "rpi4", 1), _node("b", "rpi4", 3)]
    tasks = s.configure(1, nodes, state)
    ret = {n: {k: v + (4.0 if n == "a" else 8.0) for k, v in tasks[n].tensors.items()} for n in ("a", "b")}
    new, _ = s.aggregate(1, [_update(n, tasks[n].plan, ret[n], 1 if n == "a" else 3) for n in ("a", "b")], state)
    ba, bb = set(tasks["a"].choices["fedra_blocks"]), set(tasks["b"].choices["fedra_blocks"])
    for k in state:
        blk = block_of(k)
        if blk is None or (blk in ba and blk in bb):
            np.testing.assert_allclose(new[k], state[k] + both, rtol=1e-6)
        elif blk in ba:
            np.testing.assert_allclose(new[k], state[k] + 4, rtol=1e-6)
        elif blk in bb:
            np.testing.assert_allclose(new[k], state[k] + 8, rtol=1e-6)
        else:                                                   # no one trained it: unchanged
            np.testing.assert_array_equal(new[k], state[k])
    assert len(ba | bb) < 6                                    # this seed leaves blocks untrained


# == the runner's contract on the real model ==============================================

@pytest.fixture(scope="module")
def base():
    from node.trainer import ModelSpec, load_base
    return load_base(ModelSpec(num_layers=2))[0]


def _check_contract(base, strategy, nodes, rounds=(1, 2, 3)):
    from node.trainer import build_model, load_trainable, trainable_state
    state = trainable_state(build_model(base, strategy.global_plan()))
    for rnd in rounds:
        tasks = strategy.configure(rnd, nodes, state)
        for name, task in tasks.items():
            plan, sent = task.plan, task.tensors
            model = build_model(base, plan)
            own = trainable_state(model)
            assert set(own) == set(sent), name
            assert {k: v.shape for k, v in own.items()} == {k: v.shape for k, v in sent.items()}, name
            load_trainable(model, sent)                       # the node accepts them as they are
        # what nodes send back has those names and shapes, and aggregates into the global shapes
        ups = [Update(n, t.plan, {k: v + 0.01 for k, v in t.tensors.items()}, 5) for n, t in tasks.items()]
        new, _ = strategy.aggregate(rnd, ups, state)
        assert {k: v.shape for k, v in new.items()} == {k: v.shape for k, v in state.items()}
        state = new
    return state


def test_hetlora_contract_on_real_model(base):
    s = HetLoRA({"rank_min": 2, "rank_max": 8}, _ctx(2))
    nodes = [_node("weak", "rpi4"), _node("mid", "jetson-tx2"), _node("strong", "agx-xavier")]
    assert [s.rank_of(n) for n in nodes] == [2, 2, 8]
    nodes.append(_node("nx", "xavier-nx"))
    assert s.rank_of(nodes[-1]) == 4
    _check_contract(base, s, nodes)


def test_fedra_contract_on_real_model(base):
    s = FedRA({"rank": 4}, _ctx(2))
    nodes = [_node("weak", "rpi4"), _node("nx", "xavier-nx"), _node("strong", "agx-xavier")]
    assert s.capacities(nodes) == {"weak": 1, "nx": 1, "strong": 2}
    _check_contract(base, s, nodes)


def test_fedra_devices_run_a_submodel_of_their_blocks(base):
    """The official code's execution: a device's model is its allocated blocks alone, in order.
    Trained tensors: LoRA A (8, 384) and B (384, 8) on query and value of each allocated block,
    named by its block in the whole model, and the classifier (2 x 384 + 2)."""
    from node.trainer import build_model, trainable_state
    from testbed import costmodel as cm
    s = FedRA({"capacity_from": "fixed", "fixed_blocks": 1}, _ctx(2))
    assert s.p.submodel is True
    task = s.configure(1, [_node("a", "rpi4")], trainable_state(build_model(base, s.global_plan())))["a"]
    (blk,) = task.choices["fedra_blocks"]
    assert task.plan.submodel and task.plan.blocks == (blk,)
    model = build_model(base, task.plan)
    assert len(model.base_model.model.bert.encoder.layer) == 1          # one block runs, not two
    state = trainable_state(model)
    want = {Q.format(blk, t, ab) for t in ("query", "value") for ab in "AB"} | set(HEAD)
    assert set(state) == want and set(task.tensors) == want
    assert sum(v.size for v in state.values()) == 2 * (8 * 384 + 384 * 8) + 2 * 384 + 2
    # what the submodel saves: the forward of the block it does not run (below its LoRA block, so
    # no backward), per step 2 N (4 d^2 + 2 d f) for the linear layers + 4 B T^2 d for attention
    arch = cm.Arch.from_config(base.config)
    sub, whole = cm.estimate(arch, task.plan), cm.estimate(arch, replace(task.plan, submodel=False))
    t = task.plan.train
    B, T, d, f = t.batch_size, t.max_len, 384, 1536
    one_block = 2 * B * T * (4 * d * d + 2 * d * f) + 4 * B * T * T * d
    assert sub.trained_params == whole.trained_params
    assert blk == 1  # seed 0 draws the top block, so the block left out lies below it: forward only
    assert whole.flops_per_round - sub.flops_per_round == pytest.approx(t.local_steps * one_block, rel=1e-9)
