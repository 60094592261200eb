"""The training plan (node/plan.py): checked when made, the same after the wire, one naming of blocks."""
from __future__ import annotations

from dataclasses import replace

import msgpack
import pytest

from node.plan import AdapterSpec, HeadSpec, IA3Spec, LoraSpec, Plan, PlanError, RankPenalty, TrainSpec, block_of, pattern_key

LORA = Plan("lora", (4, 5), lora=LoraSpec(r=8, alpha=16, rank_pattern={5: 8, 4: 2}, alpha_pattern={"4": 4}),
            train=TrainSpec(local_steps=3, batch_size=8, lr=0.01, max_len=32, seed=7),
            rank_penalty=RankPenalty(keep=2, weight=0.1))


@pytest.mark.parametrize("plan", [LORA, Plan("full"), Plan("full", (), head=HeadSpec(train=True)),
                                  Plan("full", (0, 1), train_embeddings=True), Plan("lora", lora=LoraSpec(4, 8)),
                                  Plan("adapter", (2, 5), adapter=AdapterSpec(16, "pfeiffer", "gelu", 0.01, True)),
                                  Plan("ia3", (1,), ia3=IA3Spec(("attention.self.value", "intermediate.dense"), ()))])
def test_a_plan_is_the_same_after_the_wire(plan):
    wire = msgpack.unpackb(msgpack.packb(plan.to_dict(), use_bin_type=True), raw=False, strict_map_key=False)
    assert Plan.from_dict(wire) == plan
    assert hash(Plan.from_dict(wire)) == hash(plan)  # frozen: usable as a cache key


def test_construction_normalises_what_the_wire_cannot_keep():
    assert LORA.lora.rank_pattern == ((4, 2), (5, 8)) and LORA.lora.alpha_pattern == ((4, 4.0),)
    assert Plan("full", [3, 1, 3]).blocks == (1, 3)
    d = LORA.to_dict()
    assert d["lora"]["rank_pattern"] == {"4": 2, "5": 8} and d["blocks"] == [4, 5]
    assert d["rank_penalty"] == {"keep": 2, "weight": 0.1} and d["head"] == {"train": True, "pooler": True}


def test_the_rank_pattern_key_format_is_peft_s_and_reaches_attention_projections_only():
    assert pattern_key(3, "query") == "layer.3.attention.self.query"
    lo = LoraSpec(r=4, alpha=8, target_modules=("query", "dense"), rank_pattern={1: 16}, alpha_pattern={1: 32})
    ranks, alphas = lo.peft_patterns()
    assert ranks == {"layer.1.attention.self.query": 16, "layer.1.attention.self.dense": 16}
    assert alphas == {"layer.1.attention.self.query": 32.0, "layer.1.attention.self.dense": 32.0}
    assert lo.rank_at(1, "attention.self.query") == 16
    assert lo.rank_at(1, "attention.output.dense") == 4 and lo.rank_at(1, "intermediate.dense") == 4
    assert lo.rank_at(0, "attention.self.query") == 4


@pytest.mark.parametrize("name, block", [
    ("bert.encoder.layer.0.attention.self.query.weight", 0),
    ("base_model.model.bert.encoder.layer.3.attention.self.query.lora_B.default.weight", 3),
    ("layer.7.x", 7),
    ("bert.embeddings.word_embeddings.weight", None),
    ("classifier.bias", None),
    ("mylayer.3.weight", None),
    ("bert.encoder.layer.x.weight", None),
])
def test_block_of(name, block):
    assert block_of(name) == block


@pytest.mark.parametrize("make, match", [
    (lambda: Plan("bitfit"), "method .bitfit. is not one of: full, lora, adapter, ia3"),
    (lambda: Plan("adapter"), "plan method adapter needs its adapter spec"),
    (lambda: Plan("full", adapter=AdapterSpec()), "the adapter spec goes with method adapter, not full"),
    (lambda: AdapterSpec(kind="lora"), "adapter.kind must be one of houlsby, pfeiffer"),
    (lambda: AdapterSpec(activation="tanh"), "adapter.activation must be one of relu, gelu, silu"),
    (lambda: AdapterSpec(size=0), "adapter.size must be >= 1"),
    (lambda: AdapterSpec(init_std=0), "adapter.init_std must be a number > 0"),
    (lambda: Plan("adapter", (), adapter=AdapterSpec()), "plan method adapter needs at least one block"),
    (lambda: Plan("ia3"), "plan method ia3 needs its ia3 spec"),
    (lambda: Plan("lora", lora=LoraSpec(4, 8), ia3=IA3Spec()), "the ia3 spec goes with method ia3, not lora"),
    (lambda: IA3Spec(targets=("attention..key", ), feedforward=()), r"ia3.targets: \['attention..key'\] are not "
                                                                      "module paths"),
    (lambda: IA3Spec(targets=("attention.self.key",)), "ia3.feedforward must be among ia3.targets"),
    (lambda: IA3Spec(targets=()), "ia3.targets must name at least one projection"),
    (lambda: Plan("adapter", adapter=AdapterSpec(), train_embeddings=True), "train_embeddings goes with method full, not adapter"),
    (lambda: Plan("lora"), "plan method lora needs its lora spec"),
    (lambda: Plan("lora", (), lora=LoraSpec(4, 8)), "at least one block"),
    (lambda: Plan("full", lora=LoraSpec(4, 8)), "the lora spec goes with method lora, not full"),
    (lambda: Plan("full", rank_penalty=RankPenalty(2, 0.1)), "rank_penalty needs method lora"),
    (lambda: Plan("lora", lora=LoraSpec(4, 8), train_embeddings=True), "train_embeddings goes with method full"),
    (lambda: Plan("full", (-1,)), "plan blocks entry must be >= 0"),
    (lambda: Plan("full", (1.5,)), "plan blocks entry must be an integer"),
    (lambda: Plan("full", train={"lr": 1}), "plan train must be a TrainSpec"),
    (lambda: LoraSpec(0, 8), "lora.r must be >= 1"),
    (lambda: LoraSpec(4, 0), "lora.alpha must be > 0"),
    (lambda: LoraSpec(4, 8, dropout=1.0), r"lora.dropout must be in \[0, 1\)"),
    (lambda: LoraSpec(4, 8, target_modules=()), "lora.target_modules must be a non-empty list"),
    (lambda: LoraSpec(4, 8, rank_pattern={1: 0}), r"lora.rank_pattern\[1\] must be >= 1"),
    (lambda: LoraSpec(4, 8, rank_pattern={"x": 2}), "lora.rank_pattern block must be an integer"),
    (lambda: TrainSpec(lr=0), "train.lr must be > 0"),
    (lambda: TrainSpec(local_steps=0), "train.local_steps must be >= 1"),
    (lambda: TrainSpec(batch_size=True), "train.batch_size must be an integer"),
])
def test_a_bad_plan_is_refused_when_it_is_made(make, match):
    with pytest.raises(PlanError, match=match):
        make()


@pytest.mark.parametrize("rp, match", [
    ({"keep": 0, "weight": 0.1}, "rank_penalty.keep must be >= 1"),
    ({"keep": 2.0, "weight": 0.1}, "rank_penalty.keep must be an integer"),
    ({"keep": True, "weight": 0.1}, "rank_penalty.keep must be an integer"),
    ({"keep": 2, "weight": -0.1}, "rank_penalty.weight must be >= 0"),
    ({"keep": 2, "weight": float("nan")}, "rank_penalty.weight must be a finite number"),
    ({"keep": 2, "weight": "0.1"}, "rank_penalty.weight must be a finite number"),
    ({"keep": 2}, r"plan rank_penalty: missing field\(s\) \['weight'\]"),
    ({"keep": 2, "weight": 0.1, "gamma": 0.5}, r"plan rank_penalty: unknown field\(s\) \['gamma'\]"),
    ([2, 0.1], "plan rank_penalty must be a mapping"),
])
def test_a_bad_rank_penalty_from_the_wire_is_refused(rp, match):
    with pytest.raises(PlanError, match=match):
        Plan.from_dict({**LORA.to_dict(), "rank_penalty": rp})


def test_the_wire_refuses_what_it_does_not_know():
    with pytest.raises(PlanError, match=r"plan: unknown field\(s\) \['legend_depth'\]"):
        Plan.from_dict({**LORA.to_dict(), "legend_depth": 2})
    with pytest.raises(PlanError, match=r"plan: missing field\(s\) \['method'\]"):
        Plan.from_dict({"blocks": [1]})
    with pytest.raises(PlanError, match="a plan must be a mapping"):
        Plan.from_dict(None)


def test_blocks_are_checked_against_the_model():
    assert Plan("full").block_list(3) == [0, 1, 2]
    assert LORA.block_list(6) == [4, 5]
    with pytest.raises(PlanError, match=r"plan names blocks \[4, 5\] but the model has blocks 0..1"):
        LORA.block_list(2)


def test_record_keeps_what_results_show():
    assert LORA.record() == {"method": "lora", "blocks": [4, 5], "rank_penalty": {"keep": 2, "weight": 0.1}}
    assert replace(LORA, rank_penalty=None).record() == {"method": "lora", "blocks": [4, 5]}
