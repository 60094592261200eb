"""The measured cost of one step agrees with the analytic BERT walk where both exist, and with a
closed-form FLOP count of a tiny Llama written out here."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from node import trainer  # noqa: E402
from node.plan import HeadSpec, LoraSpec, Plan, TrainSpec  # noqa: E402
from testbed import costmeasure, costmodel as cm  # noqa: E402


def _train(bs=3, length=24):
    return TrainSpec(local_steps=1, batch_size=bs, lr=1e-2, seed=1, max_len=length)


@pytest.fixture(scope="module")
def bert():
    torch.set_num_threads(1)
    return trainer.load_base(trainer.ModelSpec(num_layers=2))[0]


@pytest.mark.parametrize("plan", [
    Plan("lora", [1], head=HeadSpec(pooler=False), lora=LoraSpec(r=4, alpha=8), train=_train()),
    Plan("full", [1], train=_train()),
    Plan("lora", None, lora=LoraSpec(r=2, alpha=4, target_modules=("query", "value", "dense")), train=_train()),
], ids=["lora-top", "full-top", "lora-all-dense"])
def test_on_bert_the_measurement_is_the_analytic_walk(bert, plan):
    arch = cm.Arch.from_config(bert.config)
    got, want = costmeasure.measure(bert, plan), cm.estimate(arch, plan)
    assert got.trained_params == want.trained_params and got.payload_bytes == want.upload_bytes
    assert got.flops_forward == want.breakdown["flops"]["forward"]
    assert got.flops_backward == want.breakdown["flops"]["backward"]
    assert got.saved_bytes == sum(b for _, _, b in cm.activation_detail(arch, plan))
    assert got.weights_bytes == pytest.approx(arch.weights_mb * cm.MB, rel=0.01)  # + buffers (position ids)
    assert got.state_bytes == 16 * got.trained_params
    assert costmeasure.measure(bert, plan) is got, "a plan is measured once"


def test_a_tiny_llamas_forward_flops_in_closed_form():
    """Forward FLOPs of LlamaForSequenceClassification, written out: per block the q and o
    projections (d x d), k and v (d x d_kv, grouped-query), the gated MLP (3 x d x f), attention
    scores and their weighted sum (2 x 2 x T^2 x d); the score head on every position (d x C)."""
    B, T, d, heads, kv, f, C, L, V = 3, 24, 64, 4, 2, 128, 2, 2, 120
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=d, num_attention_heads=heads, num_key_value_heads=kv,
                                      intermediate_size=f, num_hidden_layers=L, max_position_embeddings=64,
                                      pad_token_id=0, num_labels=C)
    model = transformers.AutoModelForSequenceClassification.from_config(config)
    model.requires_grad_(False)
    d_kv = d // heads * kv
    per_block = 2 * B * T * (2 * d * d + 2 * d * d_kv + 3 * d * f) + 2 * 2 * B * T * T * d
    want = L * per_block + 2 * B * T * d * C
    plan = Plan("lora", None, head=HeadSpec(pooler=False), lora=LoraSpec(r=2, alpha=4, target_modules=("q_proj",)),
                train=_train(B, T))
    lora = 2 * B * T * (d * 2 + 2 * d) * L  # A (d -> 2) and B (2 -> d) on every q_proj
    got = costmeasure.measure(model, plan)
    assert got.flops_forward == want + lora
    assert got.trained_params == L * (2 * d + d * 2) + C * d  # LoRA A, B per block + the score head (no bias)
    assert got.saved_bytes > 0 and got.flops_backward > 0


def test_the_host_memory_check_measures_a_family_the_analytic_model_does_not_walk():
    from testbed.hostwatch import HostWatch
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=120, n_embd=32, n_head=2, n_layer=2, n_positions=64, pad_token_id=0)
    model = transformers.AutoModelForSequenceClassification.from_config(config)
    model.requires_grad_(False)
    watch = HostWatch(frozenset({"n0"}), None, None, print, [], base=model)
    plan = Plan("lora", [1], head=HeadSpec(pooler=False), lora=LoraSpec(r=2, alpha=4, target_modules=("c_attn",)),
                train=_train())
    cost = costmeasure.measure(model, plan)
    assert watch.training_mb(plan) == pytest.approx(
        (cost.payload_bytes + cost.live_peak_bytes + cost.retained_bytes) / costmeasure.MB)
    # the round's own tensors hold at least the trained state and what autograd saves
    assert cost.live_peak_bytes >= cost.state_bytes - 4 * cost.trained_params + cost.saved_bytes
    # block 1 only: LoRA A (2 x 32) and B (96 x 2) on c_attn (d -> 3d), and the score head (2 classes x 32)
    assert cost.saved_bytes > 0 and cost.trained_params == (2 * 32 + 96 * 2) + 2 * 32


@pytest.fixture(scope="module")
def llama4():
    """A tiny Llama of 4 blocks, for the block-wise planners."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=120, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=128, num_hidden_layers=4, max_position_embeddings=128,
                                      pad_token_id=0, num_labels=2)
    model = transformers.AutoModelForSequenceClassification.from_config(config)
    model.requires_grad_(False)
    return model


def _llama_ctx(model, profiles=None):
    from testbed.scenario import TrainingConfig
    from testbed.strategies.base import Context
    return Context(training=TrainingConfig(local_steps=2, batch_size=16), max_len=64, num_blocks=4, seed=0,
                   model_config=model.config, profiles=profiles or {},
                   cost_of=lambda plan: costmeasure.estimate(model, plan))


def test_caff_gives_a_llama_the_blocks_its_budget_allows(llama4):
    """Every block of a Llama costs the same to train, so the cost of the last n blocks grows
    linearly from the head's: a budget b of the trainable range buys floor(b x 4) blocks, here 4,
    2 and 0 for budgets 1, 0.5 and 0.05 (whatever the measured figures are)."""
    from emulation.profiles import get_profile
    from testbed.strategies.base import NodeInfo
    from testbed.strategies.caff import Caff
    groups = {"caff-strong": 1.0, "caff-medium": 0.5, "caff-weak": 0.05}
    ctx = _llama_ctx(llama4, {f"{g}-0": get_profile(g) for g in groups})
    s = Caff({"upload_factor": [1.0, 1.0], "budgets": groups}, ctx)
    tasks = s.configure(1, [NodeInfo(n, p, 100) for n, p in ctx.profiles.items()], {})
    got = {n.removesuffix("-0"): (t.choices["caff_blocks"], t.plan.blocks) for n, t in tasks.items()}
    assert got == {"caff-strong": (4, (0, 1, 2, 3)), "caff-medium": (2, (2, 3)), "caff-weak": (0, ())}


def test_legend_caps_a_llamas_depth_by_its_measured_memory(llama4):
    from emulation.profiles import get_profile
    from testbed.strategies.base import NodeInfo
    from testbed.strategies.legend import Legend
    s = Legend({}, _llama_ctx(llama4))
    need = {d: s._cost(d).peak_memory_mb for d in range(1, 5)}
    assert all(need[d] + 1 < need[d + 1] for d in range(1, 4)), need  # MB apart: a profile's memory is whole MB
    assert s._cost(2).breakdown["memory_mb"]["measured"], "the Llama is measured, not walked as a BERT"
    cap = (need[2] + need[3]) / 2
    tasks = s.configure(1, [NodeInfo("small", get_profile("host").with_overrides(memory_mb=int(cap)), 100)], {})
    assert tasks["small"].choices["legend_depth"] == 2 and tasks["small"].plan.blocks == (2, 3)
