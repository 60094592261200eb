"""A local Hugging Face checkpoint folder of any family loads, pads, trains and evaluates: tiny
random models and a word-level tokenizer made here and saved to a temporary folder."""
from __future__ import annotations

import pytest

np = pytest.importorskip("numpy")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from node import trainer  # noqa: E402
from node.arch import default_lora_targets  # noqa: E402
from node.plan import HeadSpec, LoraSpec, Plan, TrainSpec  # noqa: E402
from tests.unit.test_arch import CONFIGS  # noqa: E402

WORDS = "the a film is good bad great awful plot acting long short fun dull".split()
TEXTS = ["the film is good", "a bad plot", "great acting", "awful and dull", "the plot is fun", "long and dull"] * 4
LABELS = [0, 1, 0, 1, 0, 1] * 4
DECODERS = ("llama", "qwen2", "gpt2")


def tokenizer(decoder: bool):
    """A word-level tokenizer over WORDS; a decoder's has no pad token (as GPT-2's and Llama's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    specials = ["<unk>", "</s>"] + ([] if decoder else ["[PAD]", "[CLS]", "[SEP]"])
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    kw = {"eos_token": "</s>"} if decoder else {"pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]"}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **kw)


def checkpoint(tmp_path, family: str):
    torch.manual_seed(0)
    config = CONFIGS[family]()
    model = transformers.AutoModel.from_config(config)
    folder = tmp_path / family
    model.save_pretrained(folder)
    tokenizer(family in DECODERS).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_a_local_checkpoint_of_every_family_trains_lora_on_a_block(tmp_path, family):
    spec = trainer.ModelSpec("local", num_labels=2, path=checkpoint(tmp_path, family))
    base, tok = trainer.load_base(spec)
    assert tok.pad_token is not None and base.config.pad_token_id == tok.pad_token_id
    data = trainer.Tokenized(tok, TEXTS, LABELS, 8)
    lay = trainer.layout(base)
    targets = ("q_lin", "v_lin") if family == "distilbert" else default_lora_targets(lay.model_type)
    plan = Plan("lora", [1], head=HeadSpec(pooler=False), lora=LoraSpec(r=2, alpha=4, target_modules=targets),
                train=TrainSpec(local_steps=3, batch_size=8, lr=1e-2, seed=1))
    init = trainer.trainable_state(trainer.build_model(base, plan))
    out, metrics = trainer.train(base, plan, init, data)
    assert {trainer.block_of(k) for k in out} == {1, None} and metrics["loss"] > 0
    res = trainer.evaluate(base, plan, out, data)
    assert 0 <= res["accuracy"] <= 1 and res["loss"] > 0


def test_bfloat16_weights_train_and_report_float32(tmp_path):
    spec = trainer.ModelSpec("local", num_labels=2, path=checkpoint(tmp_path, "llama"), dtype="bfloat16")
    base, tok = trainer.load_base(spec)
    assert next(base.parameters()).dtype == torch.bfloat16
    plan = Plan("lora", [0, 1], head=HeadSpec(pooler=False), lora=LoraSpec(r=2, alpha=4, target_modules=("q_proj",)),
                train=TrainSpec(local_steps=2, batch_size=8, lr=1e-2, seed=1))
    init = trainer.trainable_state(trainer.build_model(base, plan))
    out, _ = trainer.train(base, plan, init, trainer.Tokenized(tok, TEXTS, LABELS, 8))
    assert all(v.dtype.name == "float32" for v in out.values())


def test_a_folder_without_weights_or_tokenizer_or_config_is_named(tmp_path):
    folder = checkpoint(tmp_path, "bert")
    (tmp_path / "bert" / "model.safetensors").unlink()
    with pytest.raises(trainer.ModelError, match="has no weights"):
        trainer.check_checkpoint(folder)
    (tmp_path / "bert" / "tokenizer.json").unlink()
    (tmp_path / "bert" / "tokenizer_config.json").unlink()
    (tmp_path / "bert" / "config.json").unlink()
    with pytest.raises(trainer.ModelError, match="has no config.json and no weights and no a tokenizer"):
        trainer.check_checkpoint(folder)
    with pytest.raises(trainer.ModelError, match="no such checkpoint folder"):
        trainer.check_checkpoint(str(tmp_path / "nothing"))


def test_an_architecture_without_a_classification_head_is_refused(tmp_path):
    folder = tmp_path / "clip"
    transformers.CLIPTextModel(transformers.CLIPTextConfig(vocab_size=120, hidden_size=32, intermediate_size=64,
                                                           num_hidden_layers=2, num_attention_heads=2,
                                                           max_position_embeddings=64)).save_pretrained(folder)
    tokenizer(False).save_pretrained(folder)
    with pytest.raises(trainer.ModelError, match="clip"):
        trainer.load_base(trainer.ModelSpec("local", num_labels=2, path=str(folder)))


def test_the_fingerprint_follows_the_files(tmp_path):
    folder = checkpoint(tmp_path, "gpt2")
    first = trainer.checkpoint_fingerprint(folder)
    assert trainer.checkpoint_fingerprint(folder) == first and len(first) == 16
    with open(tmp_path / "gpt2" / "config.json", "a") as fh:
        fh.write(" ")
    assert trainer.checkpoint_fingerprint(folder) != first


FACTS = [("color of the sky ?", "blue"), ("color of grass ?", "green"), ("color of snow ?", "white"),
         ("color of coal ?", "black"), ("color of blood ?", "red"), ("color of the sun ?", "yellow")]


def _words_tokenizer(extra):
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", *sorted(set(extra))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


def test_instruction_tuning_a_tiny_llama_lowers_the_held_out_loss(tmp_path):
    """causal_lm: the loss is on the response tokens only; after LoRA training on the records the
    loss on them (a memorization check) falls and the responses are predicted."""
    words = [w for p, r in FACTS for w in (p + " " + r).split()]
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(set(words)) + 2, hidden_size=32, num_attention_heads=2,
                                      num_key_value_heads=2, intermediate_size=64, num_hidden_layers=2,
                                      max_position_embeddings=32)
    folder = tmp_path / "llama-lm"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    _words_tokenizer(words).save_pretrained(folder)
    base, tok = trainer.load_base(trainer.ModelSpec("local", path=str(folder), task="causal_lm"))
    data = trainer.TokenizedPairs(tok, [p for p, _ in FACTS] * 4, [r for _, r in FACTS] * 4, 12)
    # the prompt's tokens carry no loss: each record has its response and the end-of-sequence
    assert all(int((row != -100).sum()) == 2 for row in data.labels)
    plan = Plan("lora", None, head=HeadSpec(train=False),
                lora=LoraSpec(r=8, alpha=16, target_modules=default_lora_targets("llama")),
                train=TrainSpec(local_steps=60, batch_size=8, lr=3e-2, seed=1))
    init = trainer.trainable_state(trainer.build_model(base, plan))
    before = trainer.evaluate(base, plan, init, data)
    out, _ = trainer.train(base, plan, init, data)
    after = trainer.evaluate(base, plan, out, data)
    # measured: loss 2.89 -> 2.39, next-token accuracy on the responses 0.08 -> 1.0 (frozen, untied lm_head)
    assert after["loss"] < 0.9 * before["loss"] and after["perplexity"] < before["perplexity"], (before, after)
    assert before["accuracy"] < 0.5 <= 0.9 <= after["accuracy"], (before, after)
    # exact match: a record counts when its whole response (2 tokens: the answer and the end) is
    # right, so with every record's 2 tokens it is at most the token accuracy, and 1 when that is 1
    assert before["exact_match"] <= before["accuracy"] and after["accuracy"] == 1.0 == after["exact_match"]
    assert not any("lm_head" in k or "embed" in k for k in out), "the head does not train under LoRA here"


# the adapters' holders in block 1, written out by hand: after the attention's output projection
# and after the feed-forward's (houlsby), the latter only (pfeiffer)
ADAPTER_HOLDERS = {
    "bert": ("bert.encoder.layer.1.attention.output.", "bert.encoder.layer.1.output."),
    "distilbert": ("distilbert.transformer.layer.1.attention.", "distilbert.transformer.layer.1.ffn."),
    "llama": ("model.layers.1.self_attn.", "model.layers.1.mlp."),
    "gpt2": ("transformer.h.1.attn.", "transformer.h.1.mlp."),
}


@pytest.mark.parametrize("family", list(ADAPTER_HOLDERS))
@pytest.mark.parametrize("kind", ["houlsby", "pfeiffer"])
def test_bottleneck_adapters_sit_after_each_familys_sublayer_output_projections(tmp_path, family, kind):
    from node.plan import AdapterSpec
    spec = trainer.ModelSpec("local", num_labels=2, path=checkpoint(tmp_path, family))
    base, tok = trainer.load_base(spec)
    plan = Plan("adapter", [1], head=HeadSpec(pooler=False), adapter=AdapterSpec(size=4, kind=kind),
                train=TrainSpec(local_steps=2, batch_size=8, lr=1e-2, seed=1))
    init = trainer.trainable_state(trainer.build_model(base, plan))
    holders = ADAPTER_HOLDERS[family] if kind == "houlsby" else ADAPTER_HOLDERS[family][1:]
    want = {f"{h}adapter.{lin}.{p}" for h in holders for lin in ("down", "up") for p in ("weight", "bias")}
    assert {k for k in init if ".adapter." in k} == want
    out, metrics = trainer.train(base, plan, init, trainer.Tokenized(tok, TEXTS, LABELS, 8))
    assert set(out) == set(init) and metrics["loss"] > 0
    assert any(not np.allclose(out[k], init[k]) for k in want), "the adapters trained"
