"""Strategies: the weighted-average rule, block bookkeeping, and the plans of Full and FedLoRA."""
from dataclasses import replace

import numpy as np
import pytest
from pydantic import ValidationError

from emulation.profiles import PROFILES
from testbed.scenario import TrainingConfig
from testbed.strategies import STRATEGIES, Context, NodeInfo, Update
from testbed.strategies.base import block_of, update_counts, weighted_average
from testbed.strategies.fedadapter import FedAdapter
from testbed.strategies.fedia3 import FedIA3
from testbed.strategies.fedlora import FedLoRA
from testbed.strategies.full import Full


def _ctx(num_blocks=6, seed=3, **training):
    return Context(training=TrainingConfig(**training), max_len=64, num_blocks=num_blocks, seed=seed)


def _nodes(k):
    return [NodeInfo(f"n{i}", PROFILES["rpi4"], num_samples=10 * (i + 1)) for i in range(k)]


def _u(node, n, **tensors):
    return Update(node=node, plan=None, tensors={k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()},
                  num_samples=n)


# -- weighted_average ---------------------------------------------------------------------

def test_weighted_average_by_sample_count():
    state = {"w": np.zeros(3, np.float32)}
    ups = [_u("a", 1, w=[1, 2, 3]), _u("b", 3, w=[5, 6, 7])]
    new = weighted_average(ups, state)
    np.testing.assert_allclose(new["w"], [(1 + 15) / 4, (2 + 18) / 4, (3 + 21) / 4], rtol=1e-7)
    assert new["w"].dtype == np.float32 and new["w"].shape == (3,)


def test_tensor_carried_by_some_updates_is_averaged_over_those_only():
    state = {"a": np.zeros(2, np.float32), "b": np.full(2, 9, np.float32), "c": np.full(2, -1, np.float32)}
    ups = [_u("x", 2, a=[2, 4], b=[1, 1]),
           _u("y", 6, a=[10, 20])]
    new = weighted_average(ups, state)
    np.testing.assert_allclose(new["a"], [(2 * 2 + 6 * 10) / 8, (2 * 4 + 6 * 20) / 8])
    np.testing.assert_array_equal(new["b"], [1, 1])        # only x carried b: its value, not a mix with state
    np.testing.assert_array_equal(new["c"], [-1, -1])      # nobody carried c: unchanged
    assert new["c"] is state["c"]


def test_weighted_average_does_not_modify_inputs():
    state = {"w": np.zeros((2, 2), np.float32)}
    u = _u("a", 5, w=[[1, 2], [3, 4]])
    before_state, before_u = state["w"].copy(), u.tensors["w"].copy()
    new = weighted_average([u], state)
    np.testing.assert_array_equal(state["w"], before_state)
    np.testing.assert_array_equal(u.tensors["w"], before_u)
    assert new is not state
    np.testing.assert_array_equal(new["w"], before_u)


def test_weighted_average_zero_samples_falls_back_to_plain_mean():
    state = {"w": np.zeros(1, np.float32)}
    new = weighted_average([_u("a", 0, w=[2]), _u("b", 0, w=[4])], state)
    np.testing.assert_allclose(new["w"], [3.0])


def test_weighted_average_ignores_tensors_not_in_state():
    state = {"w": np.zeros(1, np.float32)}
    new = weighted_average([_u("a", 1, w=[1], extra=[5])], state)
    assert set(new) == {"w"}


def test_weighted_average_no_updates_keeps_state():
    state = {"w": np.arange(3, dtype=np.float32)}
    new = weighted_average([], state)
    np.testing.assert_array_equal(new["w"], state["w"])


# -- block_of / update_counts -------------------------------------------------------------

@pytest.mark.parametrize("name, block", [
    ("bert.encoder.layer.0.attention.self.query.weight", 0),
    ("bert.encoder.layer.5.output.dense.bias", 5),
    ("bert.encoder.layer.11.attention.self.value.lora_A.default.weight", 11),
    ("base_model.model.bert.encoder.layer.3.attention.self.query.lora_B.default.weight", 3),
    ("layer.7.x", 7),
    ("bert.embeddings.word_embeddings.weight", None),
    ("bert.pooler.dense.weight", None),
    ("classifier.bias", None),
    ("mylayer.3.weight", None),           # 'layer' must be a whole path segment
    ("bert.encoder.layer.x.weight", None),
])
def test_block_of(name, block):
    assert block_of(name) == block


def test_update_counts():
    ups = [
        Update("a", None, {"bert.encoder.layer.4.w": 0, "bert.encoder.layer.4.b": 0,
                         "bert.encoder.layer.5.w": 0, "classifier.weight": 0}, 1),
        Update("b", None, {"bert.encoder.layer.5.w": 0, "bert.pooler.dense.weight": 0}, 1),
        Update("c", None, {}, 1),
    ]
    assert update_counts(ups) == {"4": 1, "5": 2, "head": 2}
    assert update_counts([]) == {}


# -- plans --------------------------------------------------------------------------------

def test_registry():
    assert set(STRATEGIES) == {"full", "fedlora", "fedadapter", "fedia3", "hetlora", "fedra", "legend", "caff",
                               "fedbuff", "fedasync"}
    assert STRATEGIES["full"] is Full and STRATEGIES["fedlora"] is FedLoRA
    assert all(name == cls.name for name, cls in STRATEGIES.items())


def test_full_last_blocks():
    assert Full({"last_blocks": 2}, _ctx(6)).global_plan().blocks == (4, 5)
    assert Full({"last_blocks": 1}, _ctx(6)).global_plan().blocks == (5,)
    assert Full({"last_blocks": 10}, _ctx(6)).global_plan().blocks == (0, 1, 2, 3, 4, 5)
    assert Full({}, _ctx(6)).global_plan().blocks == (0, 1, 2, 3, 4, 5)


def test_full_plan_fields():
    plan = Full({"last_blocks": 2, "lr": 1e-4, "train_embeddings": True}, _ctx(6, local_steps=7, batch_size=4)).global_plan()
    assert plan.method == "full" and plan.lora is None
    assert plan.head.train is True and plan.train_embeddings is True
    assert plan.train.lr == 1e-4                    # strategy lr overrides training.lr
    assert plan.train.local_steps == 7 and plan.train.batch_size == 4 and plan.train.max_len == 64


def test_fedlora_plan():
    plan = FedLoRA({"rank": 4}, _ctx(6)).global_plan()
    assert plan.method == "lora"
    assert plan.blocks == (0, 1, 2, 3, 4, 5)
    assert plan.lora.r == 4
    assert plan.lora.alpha == 8                     # default 2 x rank
    assert plan.lora.target_modules == ("query", "value")
    assert plan.head.train is True
    assert plan.train.lr == TrainingConfig().lr     # no override: training.lr


def test_fedlora_explicit_alpha_and_defaults():
    assert FedLoRA({"rank": 4, "alpha": 3.0}, _ctx()).global_plan().lora.alpha == 3.0
    assert FedLoRA({}, _ctx()).global_plan().lora.r == 8
    assert FedLoRA({}, _ctx()).global_plan().lora.alpha == 16


@pytest.mark.parametrize("cls, params", [(Full, {"last_blocks": 2}), (FedLoRA, {"rank": 4})])
def test_configure_every_node_distinct_seed_same_state(cls, params):
    s = cls(params, _ctx(6, seed=3))
    state = {"w": np.ones(2, np.float32)}
    nodes = _nodes(5)
    out = s.configure(2, nodes, state)
    assert set(out) == {n.name for n in nodes}
    seeds = [out[n.name].plan.train.seed for n in nodes]
    assert len(set(seeds)) == len(nodes)
    for n in nodes:
        plan, tensors = out[n.name].plan, out[n.name].tensors
        assert tensors is state and out[n.name].choices == {}
        # apart from the seed every node gets the global plan
        g = s.global_plan()
        assert replace(plan, train=replace(plan.train, seed=0)) == replace(g, train=replace(g.train, seed=0))
    # seeds depend on the round as well: no node repeats its randomness across rounds
    out3 = s.configure(3, nodes, state)
    assert not set(seeds) & {out3[n.name].plan.train.seed for n in nodes}


MINILM = {"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 6, "num_attention_heads": 12,
          "vocab_size": 30522, "max_position_embeddings": 512, "type_vocab_size": 2}


def test_fedadapter_plan_defaults_per_kind():
    ctx = replace(_ctx(6), model_config=MINILM)
    houlsby = FedAdapter({}, ctx).global_plan()
    assert houlsby.method == "adapter" and houlsby.blocks == (0, 1, 2, 3, 4, 5)
    a = houlsby.adapter
    assert (a.kind, a.size, a.activation, a.train_layer_norm, a.init_std) == ("houlsby", 384 // 16, "gelu", True, 1e-3)
    assert houlsby.head.train and not houlsby.head.pooler
    pf = FedAdapter({"kind": "pfeiffer", "last_blocks": 2, "size": 8}, ctx).global_plan()
    assert pf.blocks == (4, 5) and (pf.adapter.activation, pf.adapter.size, pf.adapter.train_layer_norm) == ("relu", 8, False)
    assert FedAdapter({"activation": "relu", "train_layer_norm": False}, ctx).global_plan().adapter.activation == "relu"


def test_fedadapter_aggregates_by_samples_or_plain_mean():
    ctx = replace(_ctx(), model_config=MINILM)
    ups = [_u("a", 1, w=[4, 0]), _u("b", 3, w=[0, 4])]
    state = {"w": np.zeros(2, np.float32)}
    np.testing.assert_allclose(FedAdapter({}, ctx).aggregate(1, ups, state)[0]["w"], [1, 3])
    np.testing.assert_allclose(FedAdapter({"weighting": "mean"}, ctx).aggregate(1, ups, state)[0]["w"], [2, 2])


BERT_PROJECTIONS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                    "intermediate.dense", "output.dense")
LLAMA_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                     "mlp.up_proj", "mlp.down_proj")


def test_fedia3_on_another_family_takes_peft_defaults_and_matches_plain_names_anywhere_in_a_block():
    import re
    ctx = replace(_ctx(2), model_config={"model_type": "llama"}, block_projections=LLAMA_PROJECTIONS)
    plan = FedIA3({}, ctx).global_plan()
    assert (plan.ia3.targets, plan.ia3.feedforward) == (("k_proj", "v_proj", "down_proj"), ("down_proj",))
    targets, feedforward = plan.ia3.peft_regexes([1], "layers")
    names = [f"model.layers.{b}.{p}" for b in (0, 1) for p in LLAMA_PROJECTIONS]
    assert [n for n in names if re.fullmatch(targets, n)] == [
        "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.down_proj"]
    assert [n for n in names if re.fullmatch(feedforward, n)] == ["model.layers.1.mlp.down_proj"]
    # BERT's dotted paths stay exact: output.dense is not the attention's output dense
    bert = FedIA3({}, replace(_ctx(2), block_projections=BERT_PROJECTIONS)).global_plan()
    targets, _ = bert.ia3.peft_regexes([0])
    assert [p for p in BERT_PROJECTIONS if re.fullmatch(targets, f"bert.encoder.layer.0.{p}")] == [
        "attention.self.key", "attention.self.value", "output.dense"]
    with pytest.raises(ValidationError, match=r"\['key'\] name no projection of a llama block; its projections: "
                                              r"self_attn.q_proj"):
        FedIA3({"targets": ["key"]}, ctx)
    with pytest.raises(ValidationError, match="peft has no default .IA.\\^3 target modules for 'distilbert'"):
        FedIA3({}, replace(_ctx(2), model_config={"model_type": "distilbert"}))


def test_fedia3_plan():
    plan = FedIA3({}, _ctx(6)).global_plan()
    assert plan.method == "ia3" and plan.blocks == (0, 1, 2, 3, 4, 5) and not plan.head.pooler
    assert plan.ia3.targets == ("attention.self.key", "attention.self.value", "output.dense")
    assert plan.ia3.feedforward == ("output.dense",)
    assert FedIA3({"last_blocks": 1, "targets": ["attention.self.value"], "feedforward": []},
                  _ctx(6)).global_plan().blocks == (5,)


def test_configure_seed_depends_on_scenario_seed():
    a = FedLoRA({}, _ctx(seed=1)).configure(1, _nodes(2), {})
    b = FedLoRA({}, _ctx(seed=2)).configure(1, _nodes(2), {})
    assert a["n0"].plan.train.seed != b["n0"].plan.train.seed


def test_aggregate_is_weighted_average():
    s = FedLoRA({}, _ctx())
    state = {"w": np.zeros(2, np.float32)}
    new, metrics = s.aggregate(1, [_u("a", 1, w=[4, 0]), _u("b", 3, w=[0, 4])], state)
    np.testing.assert_allclose(new["w"], [1, 3])
    assert metrics == {}


@pytest.mark.parametrize("cls, params, field", [
    (FedLoRA, {"rank": 0}, "rank"),
    (FedLoRA, {"rank": 1000}, "rank"),
    (FedLoRA, {"rank_typo": 4}, "rank_typo"),
    (FedLoRA, {"dropout": 1.0}, "dropout"),
    (FedLoRA, {"target_modules": []}, "target_modules"),
    (Full, {"last_blocks": 0}, "last_blocks"),
    (Full, {"lr": 0}, "lr"),
    (Full, {"local_steps": 0}, "local_steps"),
    (Full, {"rank": 4}, "rank"),  # a FedLoRA param is unknown to Full
    (FedAdapter, {"kind": "lora"}, "kind"),
    (FedAdapter, {"size": 0}, "size"),
    (FedAdapter, {"activation": "tanh"}, "activation"),
    (FedIA3, {"targets": ["values"]}, "targets: ['values'] name no projection of a bert block"),
    (FedIA3, {"targets": ["attention.self.key"], "feedforward": ["output.dense"]}, "feedforward"),
])
def test_bad_params_raise_validation_error(cls, params, field):
    with pytest.raises(ValidationError) as err:
        cls(params, replace(_ctx(), block_projections=BERT_PROJECTIONS))
    assert field in str(err.value)
