"""The trainer executes plans on the real pretrained model (cut to 2 blocks for speed)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from node import trainer  # noqa: E402
from node.data import load_dataset  # noqa: E402
from node.plan import AdapterSpec, HeadSpec, IA3Spec, LoraSpec, Plan, RankPenalty, TrainSpec  # noqa: E402


@pytest.fixture(scope="module")
def base():
    torch.set_num_threads(1)
    model, tok = trainer.load_base(trainer.ModelSpec(num_layers=2, seed=0))
    ds = load_dataset("rotten_tomatoes")
    data = trainer.Tokenized(tok, ds.texts[:64], ds.labels[:64], 16)
    return model, data


def lora_plan(blocks=None, lora=None, rank_penalty=None, head=None, **train):
    t = {"local_steps": 2, "batch_size": 8, "lr": 1e-2, "seed": 1, **train}
    return Plan("lora", blocks, head=head or HeadSpec(), lora=lora or LoraSpec(r=4, alpha=8), train=TrainSpec(**t),
                rank_penalty=rank_penalty)


def full_plan(blocks, **kw):
    return Plan("full", blocks, train=TrainSpec(local_steps=2, batch_size=8, lr=1e-2, seed=1), **kw)


def adapter_plan(blocks=None, **spec):
    return Plan("adapter", blocks, head=HeadSpec(pooler=False), adapter=AdapterSpec(**spec),
                train=TrainSpec(local_steps=2, batch_size=8, lr=1e-2, seed=1))


def ia3_plan(blocks=None, **spec):
    return Plan("ia3", blocks, head=HeadSpec(pooler=False), ia3=IA3Spec(**spec),
                train=TrainSpec(local_steps=2, batch_size=8, lr=1e-2, seed=1))


def test_dataset_is_real_labelled_text():
    ds = load_dataset("rotten_tomatoes")
    assert len(ds) > 10_000 and set(ds.labels) == {0, 1} and ds.classes == ("rotten", "fresh")
    with pytest.raises(ValueError, match="allowed: rotten_tomatoes, 20newsgroups"):
        load_dataset("imagenet")


def test_head_is_identical_wherever_it_is_built():
    a, _ = trainer.load_base(trainer.ModelSpec(num_layers=2, seed=5))
    b, _ = trainer.load_base(trainer.ModelSpec(num_layers=2, seed=5))
    assert torch.equal(a.classifier.weight, b.classifier.weight)


def test_lora_plan_trains_and_sends_only_adapters_and_head(base):
    model, data = base
    m = trainer.build_model(model, lora_plan(blocks=[1], lora=LoraSpec(r=2, alpha=4, rank_pattern={1: 4})))
    state = trainer.trainable_state(m)
    assert all("lora_" in k or "classifier" in k or "pooler" in k for k in state)
    assert not any("layer.0." in k for k in state)
    assert state["base_model.model.bert.encoder.layer.1.attention.self.query.lora_A.weight"].shape == (4, 384)
    assert sum(v.size for v in state.values()) < 0.05 * sum(p.numel() for p in model.parameters())


def test_the_classifier_alone_is_the_head_without_the_pooler(base):
    model, _ = base
    for plan in (lora_plan(blocks=[1], head=HeadSpec(pooler=False)), full_plan([1], head=HeadSpec(pooler=False))):
        state = trainer.trainable_state(trainer.build_model(model, plan))
        assert any("classifier" in k for k in state) and not any("pooler" in k for k in state), sorted(state)
    with_pooler = trainer.trainable_state(trainer.build_model(model, lora_plan(blocks=[1])))
    assert {k for k in with_pooler if "pooler" in k} == {"base_model.model.bert.pooler.dense.weight",
                                                          "base_model.model.bert.pooler.dense.bias"}


def test_full_plan_unfreezes_only_chosen_blocks(base):
    model, _ = base
    m = trainer.build_model(model, full_plan([1]))
    state = trainer.trainable_state(m)
    assert any(k.startswith("bert.encoder.layer.1.") for k in state)
    assert not any(k.startswith(("bert.encoder.layer.0.", "bert.embeddings.")) for k in state)
    assert "classifier.weight" in state
    with pytest.raises(ValueError, match="blocks 0..1"):
        trainer.build_model(model, full_plan([5]))


def test_train_changes_tensors_deterministically_and_leaves_base_frozen(base):
    model, data = base
    plan = lora_plan()
    init = trainer.trainable_state(trainer.build_model(model, plan))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out1, m1 = trainer.train(model, plan, init, data)
    out2, _ = trainer.train(model, plan, init, data)
    assert set(out1) == set(init)
    assert any(not np.allclose(out1[k], init[k]) for k in init)
    for k in out1:
        np.testing.assert_array_equal(out1[k], out2[k])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert m1["samples"] == 16 and m1["peak_mem_mb"] > 50 and m1["compute_s"] > 0


def test_an_adapter_plan_trains_and_sends_adapters_head_and_chosen_layer_norms(base):
    model, data = base
    plan = adapter_plan([1], size=4, kind="houlsby", train_layer_norm=True)
    state = trainer.trainable_state(trainer.build_model(model, plan))
    p = "bert.encoder.layer.1."
    expected = {f"{p}{place}.{part}" for place in ("attention.output", "output")
                for part in ("adapter.down.weight", "adapter.down.bias", "adapter.up.weight", "adapter.up.bias",
                             "LayerNorm.weight", "LayerNorm.bias")} | {"classifier.weight", "classifier.bias"}
    assert set(state) == expected
    assert state[f"{p}output.adapter.down.weight"].shape == (4, 384) and state[f"{p}output.adapter.up.weight"].shape == (384, 4)
    out, metrics = trainer.train(model, plan, state, data)
    assert all(not np.array_equal(out[k], state[k]) for k in state if ".up." in k or "classifier" in k)
    assert metrics["trained_params"] == 2 * (4 * 384 + 4 + 384 * 4 + 384) + 2 * 2 * 384 + 2 * 384 + 2


def test_an_adapter_is_y_plus_up_act_down_y_on_the_projection_output(base):
    """By hand: the adapted projection's output equals W x + b + up(act(down(W x + b)))."""
    model, _ = base
    for activation, act in (("relu", torch.relu), ("gelu", torch.nn.functional.gelu)):
        m = trainer.build_model(model, adapter_plan([1], size=4, kind="pfeiffer", activation=activation,
                                                   init_std=0.1))
        dense = model.bert.encoder.layer[1].output.dense            # the base's, unadapted
        ad = dict(m.named_parameters())
        p = "bert.encoder.layer.1.output.adapter."
        x = torch.randn(2, 3, 1536, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            y = x @ dense.weight.T + dense.bias
            h = act(y @ ad[p + "down.weight"].T + ad[p + "down.bias"])
            expected = y + h @ ad[p + "up.weight"].T + ad[p + "up.bias"]
            torch.testing.assert_close(m.bert.encoder.layer[1].output.dense(x), expected)
            torch.testing.assert_close(m.bert.encoder.layer[0].output.dense(x), model.bert.encoder.layer[0].output.dense(x))
        assert not hasattr(m.bert.encoder.layer[1].attention.output, "adapter")   # pfeiffer: feed-forward only


def test_an_ia3_plan_rescales_keys_values_and_the_feed_forward_input(base):
    """By hand: with vectors l, the key projection gives (W x + b) * l_k, and the feed-forward's
    second layer W2 (h * l_ff) + b2; only the planned blocks' modules are touched, the attention
    output's `dense` never (peft's suffix matching would take it for `output.dense`)."""
    model, data = base
    plan = ia3_plan([1])
    m = trainer.build_model(model, plan)
    state = trainer.trainable_state(m)
    p = "base_model.model.bert.encoder.layer.1."
    assert set(state) == {p + "attention.self.key.ia3_l", p + "attention.self.value.ia3_l", p + "output.dense.ia3_l",
                          "base_model.model.classifier.weight", "base_model.model.classifier.bias"}
    g = torch.Generator().manual_seed(0)
    l_k, l_ff = torch.rand(384, 1, generator=g), torch.rand(1, 1536, generator=g)
    trainer.load_trainable(m, {**state, p + "attention.self.key.ia3_l": l_k.numpy(), p + "output.dense.ia3_l": l_ff.numpy()})
    layer, ref = m.base_model.model.bert.encoder.layer[1], model.bert.encoder.layer[1]
    x, h = torch.randn(2, 3, 384, generator=g), torch.randn(2, 3, 1536, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(layer.attention.self.key(x), ref.attention.self.key(x) * l_k.flatten())
        torch.testing.assert_close(layer.output.dense(h), ref.output.dense(h * l_ff.flatten()))
        torch.testing.assert_close(layer.attention.output.dense(x), ref.attention.output.dense(x))
        torch.testing.assert_close(m.base_model.model.bert.encoder.layer[0].attention.self.key(x),
                                   model.bert.encoder.layer[0].attention.self.key(x))
    out, metrics = trainer.train(model, plan, state, data)
    assert not np.array_equal(out[p + "output.dense.ia3_l"], state[p + "output.dense.ia3_l"])
    assert metrics["trained_params"] == 384 + 384 + 1536 + 770


def test_load_trainable_rejects_foreign_tensors(base):
    model, _ = base
    m = trainer.build_model(model, lora_plan())
    with pytest.raises(ValueError, match="does not train"):
        trainer.load_trainable(m, {"bert.embeddings.word_embeddings.weight": np.zeros((2, 2), np.float32)})
    key = next(iter(trainer.trainable_state(m)))
    with pytest.raises(ValueError, match="shape"):
        trainer.load_trainable(m, {key: np.zeros((1, 1), np.float32)})


def test_evaluate_reports_accuracy(base):
    model, data = base
    plan = lora_plan()
    res = trainer.evaluate(model, plan, trainer.trainable_state(trainer.build_model(model, plan)), data)
    assert 0 <= res["accuracy"] <= 1 and res["loss"] > 0


def test_evaluation_by_length_gives_what_the_full_width_gives(base):
    """Batches in order of length, cut to their longest example: the same predictions and loss
    as every example at the full padded width, computed here directly."""
    model, data = base
    plan = lora_plan()
    built = trainer.build_model(model, plan)
    built.eval()
    with torch.no_grad():
        out = built(input_ids=data.input_ids, attention_mask=data.attention_mask, labels=data.labels)
    want_acc = float((out.logits.argmax(-1) == data.labels).float().mean())
    res = trainer.evaluate(model, plan, trainer.trainable_state(built), data, batch_size=8)
    assert res["accuracy"] == want_acc and res["loss"] == pytest.approx(float(out.loss), rel=1e-5)
    lengths = data.attention_mask.sum(1)
    batches = list(trainer.length_batches(data.attention_mask, 8))
    assert sorted(int(i) for idx, _ in batches for i in idx) == list(range(len(data)))
    assert all(w == int(lengths[idx].max()) for idx, w in batches)
    assert sum(len(idx) * w for idx, w in batches) < len(data) * data.input_ids.shape[1], "less padding computed"


@pytest.mark.parametrize("plan", [
    full_plan([1]),
    full_plan([0, 1], train_embeddings=True),
    full_plan([]),
    lora_plan(blocks=[1]),
    replace(lora_plan(blocks=[1]), head=HeadSpec(pooler=False)),
    full_plan([1], head=HeadSpec(pooler=False)),
    adapter_plan([1], train_layer_norm=True),
    adapter_plan(kind="pfeiffer"),
    ia3_plan([1]),
], ids=["full-top", "full-all-emb", "head-only", "lora", "lora-classifier", "full-top-classifier",
        "houlsby-adapters-norms", "pfeiffer-adapters", "ia3"])
def test_frozen_weights_are_shared_and_the_base_is_never_written(base, plan):
    model, data = base
    m = trainer.build_model(model, plan)
    base_ids = {id(p): k for k, p in model.named_parameters()}
    for name, p in m.named_parameters():
        key = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        heads = trainer.head_prefixes(plan.head, trainer.layout(model))
        own_head = bool(heads) and key.startswith(heads)
        if p.requires_grad or own_head or ".original_module." in name:
            assert id(p) not in base_ids, f"{name} trains (or is the head): it must be the model's own copy"
        else:
            assert base_ids.get(id(p)) == key, f"{name} is frozen: it must be the base's tensor, not a copy"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train(model, plan, trainer.trainable_state(m), data)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _tail_share(state, keep):
    """HetLoRA's measure on returned tensors: sum_m ||B_m[:, keep:] A_m[keep:]|| / sum_m ||B_m A_m||."""
    tail = total = 0.0
    for k, a in state.items():
        if k.endswith("lora_A.weight"):
            a, b = a.astype(np.float64), state[k.replace("lora_A", "lora_B")].astype(np.float64)
            tail += np.linalg.norm(b[:, keep:] @ a[keep:, :])
            total += np.linalg.norm(b @ a)
    return tail / total


def _nonzero_b(model, plan):
    """Start tensors whose lora_B is not peft's zeros, so every rank slice carries update norm."""
    rng = np.random.default_rng(0)
    init = trainer.trainable_state(trainer.build_model(model, plan))
    return {k: rng.normal(scale=0.05, size=v.shape).astype(np.float32) if "lora_B" in k else v
            for k, v in init.items()}


def test_rank_penalty_shrinks_the_tail_and_reports_it(base):
    model, data = base
    plan = lora_plan(local_steps=4)
    init = _nonzero_b(model, plan)
    plain, m_plain = trainer.train(model, plan, init, data)
    pen, m_pen = trainer.train(model, replace(plan, rank_penalty=RankPenalty(keep=2, weight=0.1)), init, data)
    assert "tail_share" not in m_plain
    assert m_pen["tail_share"] == pytest.approx(_tail_share(pen, 2), rel=1e-6)     # measured on the device
    assert m_pen["tail_share"] < 0.5 * _tail_share(plain, 2)
    # weight 0 adds exactly nothing: the result is the plain plan's, and it still reports the share
    zero, m_zero = trainer.train(model, replace(plan, rank_penalty=RankPenalty(keep=2, weight=0.0)), init, data)
    assert all(np.array_equal(zero[k], plain[k]) for k in plain)
    assert m_zero["tail_share"] == pytest.approx(_tail_share(plain, 2), rel=1e-6)


def test_rank_penalty_ignores_modules_at_or_below_keep(base):
    model, data = base
    plan = lora_plan(lora=LoraSpec(r=2, alpha=4, rank_pattern={1: 4}))
    init = _nonzero_b(model, plan)
    out, m = trainer.train(model, replace(plan, rank_penalty=RankPenalty(keep=2, weight=0.1)), init, data)
    assert m["tail_share"] == pytest.approx(_tail_share(out, 2), rel=1e-6) and m["tail_share"] > 0
    # every module has rank <= keep: no penalty, no tail
    plan = lora_plan(lora=LoraSpec(r=2, alpha=4))
    init = _nonzero_b(model, plan)
    plain, _ = trainer.train(model, plan, init, data)
    same, m = trainer.train(model, replace(plan, rank_penalty=RankPenalty(keep=2, weight=1.0)), init, data)
    assert all(np.array_equal(same[k], plain[k]) for k in plain) and m["tail_share"] == 0.0


def test_a_bad_plan_from_the_wire_is_an_error_reply_before_any_training(base):
    """The node reads the TASK's plan with Plan.from_dict: what it refuses never reaches the trainer
    (tests/unit/test_plan.py has every refusal); the agent answers such a task with an ERROR."""
    from node.agent import Agent
    from node import protocol as P
    agent = Agent.__new__(Agent)
    agent.downlink = agent.uplink = None
    sent = []
    agent.phase = lambda *a, **k: sent.append(("phase", a))
    bad = {**lora_plan().to_dict(), "rank_penalty": {"keep": 0, "weight": 0.1}}
    with pytest.raises(ValueError, match="rank_penalty.keep must be >= 1"):
        agent.on_task(P.Message(P.TASK, meta={"plan": bad}), 0)
    assert sent == []  # not even the "train" heartbeat went out


def test_a_task_with_another_device_trains_as_that_device(base):
    """A profile changed mid-run reaches an emulated node in its next TASK: it trains and
    stretches its compute to the new share, without a restart."""
    from node.agent import Agent
    from node.device import Emulated
    from node import protocol as P
    model, data = base
    agent = Agent.__new__(Agent)
    agent.name, agent.base, agent.data, agent.run_id, agent.warmed = "n", model, data, "r", False
    agent.become(Emulated(0.5, "cpu"))
    sent = []
    agent.phase = lambda *a, **k: None
    agent.send = lambda type_, rnd=0, meta=None, tensors=None, link=None, block=True: sent.append(meta)
    slower = Emulated(0.05, "cpu", 0.0, 80.0, 0.0)
    init = trainer.trainable_state(trainer.build_model(model, lora_plan()))
    agent.on_task(P.Message(P.TASK, meta={"plan": lora_plan().to_dict(), "device": slower.to_dict()}, tensors=init),
                  1_000_000)
    assert agent.device == slower
    (meta,) = sent
    # CPU seconds at a 0.05 share: 20x the CPU time (hand-computed from the rule, not the code)
    assert meta["compute_s"] >= meta["cpu_s"] / 0.05 * 0.99
    assert meta["download_s"] >= 1_000_000 * 8 / 80e6  # the new downlink: 0.1 s for 1 MB at 80 Mbit/s


def test_a_proximal_term_keeps_the_trained_tensors_near_where_they_started(base):
    model, data = base
    init = trainer.trainable_state(trainer.build_model(model, lora_plan()))

    def moved(mu):
        out, _ = trainer.train(model, lora_plan(local_steps=4, proximal_mu=mu), init, data)
        return sum(float(((out[k] - init[k]) ** 2).sum()) for k in init)
    free, held = moved(0.0), moved(1e4)
    assert held < 0.5 * free, (held, free)


def test_the_first_tasks_warm_up_changes_neither_its_result_nor_the_random_state(base):
    """A node's first task begins with one untimed step (trainer.warm_up): what it trains and
    the process's random state afterwards are those of a node that did not warm up."""
    import torch
    model, data = base
    plan = lora_plan()
    init = trainer.trainable_state(trainer.build_model(model, plan))
    torch.manual_seed(123)
    cold, _ = trainer.train(model, plan, dict(init), data)
    after_cold = torch.rand(3)
    torch.manual_seed(123)
    trainer.warm_up(model, plan, dict(init), data)
    warm, _ = trainer.train(model, plan, dict(init), data)
    assert torch.equal(torch.rand(3), after_cold)
    assert cold.keys() == warm.keys() and all(np.array_equal(cold[k], warm[k]) for k in cold)
