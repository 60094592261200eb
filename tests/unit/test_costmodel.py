"""The cost model against the real model and the real node trainer.

- parameters: the exact tensors (names, shapes) node.trainer.trainable_state returns;
- activations and FLOPs: byte for byte what autograd saves, and exactly the FLOPs torch's
  FlopCounterMode counts, forward and backward, on the real model;
- peak memory: the node's peak_mem_mb for one round in a fresh process per plan vs the
  prediction, within 20%, with runtime_mb from the idle RSS of each
  child (not fitted to the peaks), and once more with runtime_mb fitted to one plan.
"""
from __future__ import annotations

import sys
from dataclasses import replace
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from node.plan import AdapterSpec, HeadSpec, IA3Spec, LoraSpec, Plan, TrainSpec
from testbed import costmodel as cm

ARCH = cm.MINILM_L6


def _train(B, T, steps):
    return TrainSpec(local_steps=steps, batch_size=B, max_len=T, lr=1e-3, seed=0)


def lora(blocks=None, r=8, B=16, T=32, steps=2, head=True, pooler=True, **kw):
    lo = LoraSpec(**{"r": r, "alpha": 2 * r, "dropout": 0.0, "target_modules": ("query", "value"), **kw})
    return Plan("lora", blocks, head=HeadSpec(head, pooler), lora=lo, train=_train(B, T, steps))


def full(blocks=None, B=16, T=32, steps=2, emb=False, head=True, pooler=True):
    return Plan("full", blocks, head=HeadSpec(head, pooler), train_embeddings=emb, train=_train(B, T, steps))


def adapter(blocks=None, size=24, kind="houlsby", activation="relu", B=16, T=32, steps=2, head=True, pooler=True,
            norms=False):
    return Plan("adapter", blocks, head=HeadSpec(head, pooler),
                adapter=AdapterSpec(size, kind, activation, train_layer_norm=norms), train=_train(B, T, steps))


def ia3(blocks=None, B=16, T=32, steps=2, head=True, pooler=True, **spec):
    return Plan("ia3", blocks, head=HeadSpec(head, pooler), ia3=IA3Spec(**spec), train=_train(B, T, steps))


def sized(plan, B, T):
    """The plan with another batch size and sequence length."""
    return replace(plan, train=replace(plan.train, batch_size=B, max_len=T))


def last(n, **kw):
    return full(list(range(ARCH.layers - n, ARCH.layers)), **kw)


def top(n, ranks=(2, 2, 4, 4, 8, 8), **kw):
    blocks = list(range(ARCH.layers - n, ARCH.layers))
    return lora(blocks, r=max(ranks), rank_pattern={b: ranks[b] for b in blocks}, **kw)


# -- no model needed ----------------------------------------------------------------------------
def test_minilm_sizes():
    assert ARCH.total_params == 22_713_986
    assert ARCH.embedding_params == 11_918_592 and ARCH.block_params == 1_774_464 and ARCH.head_params == 148_610
    assert cm.Arch.from_config({"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 6,
                                "num_attention_heads": 12, "vocab_size": 30522, "max_position_embeddings": 512,
                                "type_vocab_size": 2}) == ARCH


def test_adapter_parameters_closed_form():
    """Houlsby: 2 adapters per block of 2 m d + m + d parameters each; Pfeiffer: 1 per block."""
    d, m, c = 384, 24, 2
    per_adapter = m * d + m + d * m + d
    assert cm.trained_params(ARCH, adapter(pooler=False)) == 6 * 2 * per_adapter + (c * d + c) == 6 * 2 * 18840 + 770
    assert cm.trained_params(ARCH, adapter([5], kind="pfeiffer", head=False)) == 18840
    assert cm.trained_params(ARCH, adapter([5], norms=True, head=False)) == 2 * 18840 + 2 * 2 * d  # + 2 LayerNorms
    names = set(cm.trainable_tensors(ARCH, adapter([2], kind="pfeiffer", pooler=False)))
    assert names == {"bert.encoder.layer.2.output.adapter.down.weight", "bert.encoder.layer.2.output.adapter.down.bias",
                     "bert.encoder.layer.2.output.adapter.up.weight", "bert.encoder.layer.2.output.adapter.up.bias",
                     "classifier.weight", "classifier.bias"}


def test_ia3_parameters_closed_form():
    """(IA)^3 on keys, values (d each) and the feed-forward's inner activations (d_ff) per block."""
    d, f = 384, 1536
    assert cm.trained_params(ARCH, ia3(head=False)) == 6 * (d + d + f) == 13_824
    shapes = cm.trainable_tensors(ARCH, ia3([3], head=False))
    assert shapes == {f"{cm.LORA_PREFIX}bert.encoder.layer.3.attention.self.key.ia3_l": (d, 1),
                      f"{cm.LORA_PREFIX}bert.encoder.layer.3.attention.self.value.ia3_l": (d, 1),
                      f"{cm.LORA_PREFIX}bert.encoder.layer.3.output.dense.ia3_l": (1, f)}


def test_adapter_flops_closed_form():
    """One Pfeiffer adapter in the last block, nothing else training. Forward: the frozen
    model's + 2 N (d m + m d). Backward, from the loss down: the frozen classifier's and
    pooler's input gradients (2 B d c, 2 B d d), then up's weight and input gradients and
    down's weight gradient (3 x 2 N m d); down's input is the frozen projection's output, so
    nothing below it computes a gradient."""
    B, T, m, d, c = 16, 32, 24, 384, 2
    N = B * T
    one = cm.estimate(ARCH, adapter([5], kind="pfeiffer", head=False, B=B, T=T)).breakdown["flops"]
    frozen = cm.estimate(ARCH, full([], B=B, T=T, pooler=False)).breakdown["flops"]   # classifier only
    assert one["forward"] == frozen["forward"] + 2 * N * (d * m + m * d)
    assert one["backward"] == 2 * B * d * c + 2 * B * d * d + 3 * 2 * N * m * d
    two = cm.estimate(ARCH, adapter([4, 5], kind="pfeiffer", head=False, B=B, T=T)).breakdown["flops"]
    # the block-5 adapter now also needs the gradient of its input, and block 5's frozen
    # projections (q, k, v, attention output, intermediate, output) their input gradients,
    # as do the attention matmuls (4 x 2 B T^2 d)
    block5 = 2 * N * m * d + 2 * N * (4 * d * d + 2 * d * 1536) + 4 * 2 * B * T * T * d
    assert two["backward"] == one["backward"] + 3 * 2 * N * m * d + block5


def test_lora_upload_is_far_below_full_and_download_equals_upload():
    lo, fu = cm.estimate(ARCH, lora()), cm.estimate(ARCH, full())
    assert lo.upload_bytes == 4 * (6 * 2 * 8 * (384 + 384) + ARCH.head_params)
    assert lo.upload_bytes < 0.05 * fu.upload_bytes   # 2%: the head is 2/3 of it
    assert cm.estimate(ARCH, top(2)).upload_bytes < lo.upload_bytes
    for plan in (lora(), top(3), full(), last(2), full(emb=True), full([])):
        c = cm.estimate(ARCH, plan)
        assert c.download_bytes == c.upload_bytes == 4 * c.trained_params
        assert c.upload_wire_bytes == c.upload_bytes + c.breakdown["wire"]["header_bytes"]


def test_flops_grow_with_the_trained_depth_and_the_model_depth():
    fulls = [cm.estimate(ARCH, last(n)) for n in range(ARCH.layers + 1)]   # n = 0: head only
    loras = [cm.estimate(ARCH, top(n)) for n in range(1, ARCH.layers + 1)]
    for seq in (fulls, loras):
        steps = [c.flops_per_step for c in seq]
        assert all(a < b for a, b in zip(steps, steps[1:]))
        mems = [c.peak_memory_mb for c in seq]
        assert all(a < b for a, b in zip(mems, mems[1:]))
    # the forward always runs all L blocks; only the backward depends on n
    assert len({c.breakdown["flops"]["forward"] for c in fulls}) == 1
    # LoRA on the lowest block back-propagates through (almost) everything: CAFF's point
    assert loras[-1].breakdown["flops"]["backward"] > 0.9 * fulls[-1].breakdown["flops"]["backward"] / 2
    deeper = [cm.estimate(cm.Arch(384, 1536, L, 12, 30522, 512, 2), full()) for L in (2, 4, 6, 12)]
    assert all(a.flops_per_step < b.flops_per_step for a, b in zip(deeper, deeper[1:]))
    c = cm.estimate(ARCH, full(steps=7))
    assert c.flops_per_round == 7 * c.flops_per_step


def test_forward_flops_closed_form():
    B, T, d, f, L = 16, 32, 384, 1536, 6
    c = cm.estimate(ARCH, full(B=B, T=T))
    expected = L * (2 * B * T * (4 * d * d + 2 * d * f) + 4 * B * T * T * d) + 2 * B * (d * d + d * 2)
    assert c.breakdown["flops"]["forward"] == expected
    # full training of all blocks: backward = 2x forward, less the input gradient of block 0's q, k, v
    assert c.breakdown["flops"]["backward"] == 2 * expected - 3 * 2 * B * T * d * d


def test_memory_parts():
    c = cm.estimate(ARCH, full(emb=True, B=16, T=64), runtime_mb=500)
    m = c.breakdown["memory_mb"]
    assert m["model_copy"] == pytest.approx(ARCH.weights_mb)
    assert m["gradients"] == m["received"] == pytest.approx(ARCH.weights_mb)
    assert m["optimizer"] == pytest.approx(2 * ARCH.weights_mb)
    assert c.peak_memory_mb == pytest.approx(max(m["phases"].values()))
    more = cm.estimate(ARCH, full(emb=True, B=16, T=64), runtime_mb=600)
    assert more.peak_memory_mb == pytest.approx(c.peak_memory_mb + 100)
    live = cm.estimate(ARCH, full(emb=True, B=16, T=64), runtime_mb=500, allocator="returning")
    assert live.peak_memory_mb < c.peak_memory_mb
    assert cm.estimate(ARCH, full(B=32)).peak_memory_mb > cm.estimate(ARCH, full(B=16)).peak_memory_mb
    # default runtime: framework + kernel code + the frozen weights
    assert cm.estimate(ARCH, lora()).breakdown["memory_mb"]["runtime"] == pytest.approx(
        cm.DEFAULT_FRAMEWORK_MB + cm.DEFAULT_CODE_MB + ARCH.weights_mb)
    plan = last(2, B=32, T=64)
    runtime = cm.calibrate_runtime_mb(ARCH, plan, 900.0)
    assert cm.estimate(ARCH, plan, runtime_mb=runtime).peak_memory_mb == pytest.approx(900.0)


def test_plans_the_trainer_refuses_are_refused():
    with pytest.raises(ValueError, match="blocks 0..5"):
        cm.estimate(ARCH, full([6]))
    with pytest.raises(ValueError, match="at least one block"):
        cm.estimate(ARCH, lora([]))
    with pytest.raises(ValueError, match="match no linear"):
        cm.estimate(ARCH, lora(target_modules=["qkv"]))
    with pytest.raises(ValueError, match="trains no parameter"):
        cm.estimate(ARCH, full([], head=False))
    with pytest.raises(ValueError, match="not one of"):
        cm.estimate(ARCH, Plan("bitfit"))


def test_header_bytes_are_the_protocol_header():
    from node import protocol as P
    for plan in (lora(), top(2), last(1), full(emb=True)):
        tensors = {n: np.zeros(s, np.float32) for n, s in cm.trainable_tensors(ARCH, plan).items()}
        frames = P.encode(P.Message(P.RESULT, run="r" * 12, round=0, meta={}, tensors=tensors))
        assert len(frames[0]) == cm.header_bytes(ARCH, plan, meta_bytes=0)
        c = cm.estimate(ARCH, plan, meta_bytes=0)
        assert P.frames_nbytes(frames) == c.upload_wire_bytes


# -- the real model -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    from node import trainer
    return trainer.load_base(trainer.ModelSpec())


REAL_PLANS = {
    "lora all r8": lora(),
    "lora top2 ranks 5:8 4:4": lora([4, 5], rank_pattern={5: 8, 4: 4}),
    "full last1 + head": last(1),
    "full all + embeddings": full(emb=True),
    "full embeddings only, no head": full([], emb=True, head=False),
    "head only": full([]),
    "lora q,k,v,dense ranks 3:2, no head": lora([1, 3], target_modules=("query", "key", "value", "dense"),
                                                rank_pattern={3: 2}, head=False),
    "lora output.dense dropout": lora([0, 5], target_modules=("output.dense",), dropout=0.1),
    "lora all r8, classifier only": lora(pooler=False),
    "lora top2, classifier only": lora([4, 5], rank_pattern={5: 8, 4: 4}, pooler=False),
    "full last1 + classifier": last(1, pooler=False),
    "classifier only": full([], pooler=False),
    "submodel of blocks 1,4 (FedRA)": replace(lora([1, 4], rank_pattern={4: 4}, pooler=False), submodel=True),
    "submodel of block 5": replace(lora([5], pooler=False), submodel=True),
    "houlsby adapters, all blocks, classifier": adapter(pooler=False),
    "houlsby adapters gelu + layer norms, top 2": adapter([4, 5], size=8, activation="gelu", norms=True),
    "ia3 all blocks, classifier": ia3(pooler=False),
    "ia3 top 2 with pooler": ia3([4, 5]),
    "ia3 query + intermediate input, block 2, no head": ia3([2], targets=("attention.self.query", "intermediate.dense"),
                                                            feedforward=("intermediate.dense",), head=False),
    "pfeiffer adapters silu, blocks 0,3, no head": adapter([0, 3], size=16, kind="pfeiffer", activation="silu",
                                                           head=False),
}


def test_arch_from_the_real_config(base):
    model, _ = base
    arch = cm.Arch.from_config(model.config)
    assert arch == ARCH
    assert arch.total_params == sum(p.numel() for p in model.parameters())


@pytest.mark.filterwarnings("ignore:The following rank_pattern keys")  # the trainer's "dense" key: see costmodel
@pytest.mark.parametrize("name", list(REAL_PLANS))
def test_trained_tensors_are_exactly_the_trainers(base, name):
    from node import trainer
    model, _ = base
    plan = REAL_PLANS[name]
    real = {k: v.shape for k, v in trainer.trainable_state(trainer.build_model(model, plan)).items()}
    assert cm.trainable_tensors(ARCH, plan) == real
    n = sum(int(np.prod(s)) for s in real.values())
    assert cm.trained_params(ARCH, plan) == cm.estimate(ARCH, plan).trained_params == n


def _saved_and_flops(model, tok, plan):
    """(bytes autograd saves, one count per storage; forward FLOPs; backward FLOPs) of one step."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from node import trainer
    texts = ["a short review", "a much longer and quite verbose review of a film", "meh"][:plan.train.batch_size]
    data = trainer.Tokenized(tok, texts, [0, 1, 0][:len(texts)], plan.train.max_len)  # whole tensors: a slice
    m = trainer.build_model(model, plan)                                             # would pin its parent
    m.train()
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), FlopCounterMode(display=False) as fwd:
        out = m(input_ids=data.input_ids, attention_mask=data.attention_mask, labels=data.labels)
    with FlopCounterMode(display=False) as bwd:
        out.loss.backward()
    return sum(seen.values()), fwd.get_total_flops(), bwd.get_total_flops()


@pytest.mark.filterwarnings("ignore:The following rank_pattern keys")
def test_saved_activations_and_flops_are_autograds(base):
    """Forward and backward of the real model: saved bytes (saved_tensors_hooks) and FLOPs
    (FlopCounterMode) equal the model's, for every kind of plan."""
    model, tok = base
    for name, plan in REAL_PLANS.items():
        plan = sized(plan, 3, 24)
        saved, fwd, bwd = _saved_and_flops(model, tok, plan)
        c = cm.estimate(ARCH, plan)
        assert sum(b for _, _, b in cm.activation_detail(ARCH, plan)) == saved, name
        assert c.breakdown["flops"]["forward"] == fwd, name
        assert c.breakdown["flops"]["backward"] == bwd, name


def test_saved_activations_without_dropout(base):
    """No dropout: masks disappear and attention runs torch's CPU flash kernel (whose FLOPs
    FlopCounterMode does not count, so only the bytes are compared)."""
    import copy
    import dataclasses
    import torch
    model, tok = base
    for attn, hidden in ((0.0, 0.1), (0.0, 0.0), (0.1, 0.0)):
        m = copy.deepcopy(model)
        for mod in m.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = attn if mod in [layer.attention.self.dropout for layer in m.bert.encoder.layer] else hidden
        arch = dataclasses.replace(ARCH, attention_dropout=attn, hidden_dropout=hidden)
        for plan in (last(2), lora([3, 5]), full(emb=True)):
            plan = sized(plan, 3, 24)
            saved, _, _ = _saved_and_flops(m, tok, plan)
            assert sum(b for _, _, b in cm.activation_detail(arch, plan)) == saved, (attn, hidden, plan)


# -- peak memory of the real node ---------------------------------------------------------------
MEMORY_PLANS = {
    "lora r8 all blocks, classifier, b16 t32": lora(B=16, T=32, pooler=False),  # the LoRA strategies' default
    "full last 2 blocks, batch 32, len 64": last(2, B=32, T=64),
    "full with embeddings, batch 16, len 64": full(emb=True, B=16, T=64),
    "houlsby adapters, classifier, b16 t32": adapter(B=16, T=32, pooler=False),
}


@pytest.mark.skipif(sys.platform != "linux", reason="RSS and the glibc heap model are Linux-specific")
def test_peak_memory_measured_by_the_node_vs_predicted_within_20_percent():
    pytest.importorskip("torch")
    pytest.importorskip("psutil")
    names = list(MEMORY_PLANS)
    # one fresh interpreter per plan (1 torch thread, 2 local steps), two at a time: ~30 s here
    with ThreadPoolExecutor(2) as ex:
        measured = dict(zip(names, ex.map(lambda n: cm.measure_round(MEMORY_PLANS[n], examples=64), names)))
    rows, failures = [], []
    for n in names:
        r, plan = measured[n], MEMORY_PLANS[n]
        c = cm.estimate(ARCH, plan, runtime_mb=cm.runtime_mb_from_idle(ARCH, r["idle_rss_mb"]))
        assert r["trained_params"] == c.trained_params, n
        err = c.peak_memory_mb / r["peak_mb"] - 1
        rows.append(f"{n:40s} idle {r['idle_rss_mb']:6.0f}  measured {r['peak_mb']:6.0f}  "
                    f"predicted {c.peak_memory_mb:6.0f} MB  {err:+.1%}")
        if abs(err) > 0.20:
            failures.append(n)
    # runtime fitted to one plan's peak instead: the other two plans
    first = names[0]
    runtime = cm.calibrate_runtime_mb(ARCH, MEMORY_PLANS[first], measured[first]["peak_mb"])
    for n in names[1:]:
        pred = cm.estimate(ARCH, MEMORY_PLANS[n], runtime_mb=runtime).peak_memory_mb
        err = pred / measured[n]["peak_mb"] - 1
        rows.append(f"{n:40s} runtime fitted on {first!r}: predicted {pred:6.0f} MB  {err:+.1%}")
        if abs(err) > 0.20:
            failures.append(f"{n} (fitted runtime)")
    print("\n" + "\n".join(rows))
    assert not failures, "\n".join(rows)
