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
    assert watch.training_mb(plan) == pytest.approx((cost.state_bytes + cost.saved_bytes) / costmeasure.MB)
    # block 1 only: LoRA A (2 x 32) and B (96 x 2) on c_attn (d -> 3d), and the score head (2 classes x 32)
    assert cost.saved_bytes > 0 and cost.trained_params == (2 * 32 + 96 * 2) + 2 * 32
