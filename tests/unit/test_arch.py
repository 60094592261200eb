"""The blocks, embeddings and head of every family, found without a table per family; tiny
random models made here (2 blocks, small hidden size), nothing downloaded."""
from __future__ import annotations

import pytest

np = pytest.importorskip("numpy")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from node.arch import Layout, LayoutError, block_index, default_lora_targets, layer_count  # noqa: E402

SMALL = dict(vocab_size=120, hidden_size=32, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
CONFIGS = {
    "bert": lambda: transformers.BertConfig(num_hidden_layers=2, **SMALL),
    "roberta": lambda: transformers.RobertaConfig(num_hidden_layers=2, pad_token_id=1, **SMALL),
    "distilbert": lambda: transformers.DistilBertConfig(vocab_size=120, dim=32, n_heads=2, hidden_dim=64, n_layers=2,
                                                        max_position_embeddings=64),
    "llama": lambda: transformers.LlamaConfig(num_hidden_layers=2, num_key_value_heads=2, pad_token_id=0, **SMALL),
    "qwen2": lambda: transformers.Qwen2Config(num_hidden_layers=2, num_key_value_heads=2, pad_token_id=0, **SMALL),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=120, n_embd=32, n_head=2, n_layer=2, n_positions=64,
                                            pad_token_id=0),
}
# what each family's names are, written out by hand: the blocks, the embeddings, the head
EXPECTED = {
    "bert": ("bert.encoder.layer.", "layer", ("bert.embeddings.",), ("classifier.",), "bert.pooler."),
    "roberta": ("roberta.encoder.layer.", "layer", ("roberta.embeddings.",), ("classifier.",), None),
    "distilbert": ("distilbert.transformer.layer.", "layer", ("distilbert.embeddings.",),
                   ("classifier.", "pre_classifier."), None),
    "llama": ("model.layers.", "layers", ("model.embed_tokens.",), ("score.",), None),
    "qwen2": ("model.layers.", "layers", ("model.embed_tokens.",), ("score.",), None),
    "gpt2": ("transformer.h.", "h", ("transformer.wte.", "transformer.wpe."), ("score.",), None),
}


def tiny(family: str, task=None):
    task = task or transformers.AutoModelForSequenceClassification
    torch.manual_seed(0)
    config = CONFIGS[family]()
    config.num_labels = 3
    return task.from_config(config)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_the_layout_of_every_family(family):
    model = tiny(family)
    blocks, segment, embeddings, head, pooler = EXPECTED[family]
    lay = Layout.of(model)
    assert (lay.blocks, lay.segment, lay.count) == (blocks, segment, 2)
    assert (lay.embeddings, lay.head, lay.pooler) == (embeddings, head, pooler)
    assert layer_count(model.config) == 2
    for name, _ in model.named_parameters():
        # the block index read by hand from the expected prefix, against the generic reader
        want = int(name[len(blocks):].split(".")[0]) if name.startswith(blocks) else None
        assert lay.block_of(name) == want, name
        if want is not None:
            assert block_index(name) == want, name
        else:
            assert name.startswith(embeddings + head + ((pooler,) if pooler else ())) or "norm" in name \
                or name.startswith(("transformer.ln_f.", "model.norm.")), name


@pytest.mark.parametrize("family", ["bert", "roberta", "llama", "qwen2", "gpt2"])
def test_lora_with_peft_defaults_reaches_only_the_chosen_block(family):
    from peft import LoraConfig, get_peft_model
    model = tiny(family)
    lay = Layout.of(model)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=list(default_lora_targets(lay.model_type)),
                                                  layers_to_transform=[1], layers_pattern=lay.segment))
    lora = [n for n, _ in peft_model.named_parameters() if "lora_" in n]
    assert lora and all(f".{lay.blocks}1." in n for n in lora), lora


def test_the_causal_lm_of_a_family_has_the_same_blocks():
    lay = Layout.of(tiny("llama", transformers.AutoModelForCausalLM))
    assert (lay.blocks, lay.segment, lay.head) == ("model.layers.", "layers", ("lm_head.",))


def test_no_peft_default_is_a_clear_error():
    with pytest.raises(LayoutError, match="peft has no default LoRA target modules for 'distilbert'"):
        default_lora_targets("distilbert")


class _Data:
    """Random token ids and labels in the shape node.trainer.Tokenized has."""

    def __init__(self, n=16, length=12, vocab=120, classes=3):
        g = torch.Generator().manual_seed(0)
        self.input_ids = torch.randint(3, vocab, (n, length), generator=g)
        self.attention_mask = torch.ones(n, length, dtype=torch.long)
        self.labels = torch.randint(0, classes, (n,), generator=g)

    def __len__(self):
        return len(self.labels)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "roberta", "distilbert"])
def test_block_wise_plans_train_only_their_blocks_in_every_family(family):
    """LoRA (peft's default targets; DistilBERT has none there, so its q_lin/v_lin are named) on
    block 1 and full fine-tuning of block 0, with the head, on a tiny model of each family."""
    from node import trainer
    from node.plan import HeadSpec, LoraSpec, Plan, TrainSpec
    model = tiny(family)
    model.requires_grad_(False)
    lay = trainer.layout(model)
    targets = ("q_lin", "v_lin") if family == "distilbert" else default_lora_targets(lay.model_type)
    train = TrainSpec(local_steps=2, batch_size=4, lr=1e-2, seed=1)
    for plan, block in ((Plan("lora", [1], head=HeadSpec(pooler=False), lora=LoraSpec(r=2, alpha=4,
                                                                                       target_modules=targets),
                              train=train), 1),
                        (Plan("full", [0], head=HeadSpec(pooler=False), train=train), 0)):
        init = trainer.trainable_state(trainer.build_model(model, plan))
        out, metrics = trainer.train(model, plan, init, _Data())
        assert metrics["steps"] == 2 and set(out) == set(init)
        blocks = {trainer.block_of(k) for k in out} - {None}
        assert blocks == {block}, (plan.method, sorted(out)[:6])
        heads = [k for k in out if trainer.block_of(k) is None]
        assert heads and all(any(h.rstrip(".") in k for h in lay.head) for k in heads), heads
        assert any(not np.array_equal(out[k], init[k]) for k in out), "something trained"


@pytest.mark.parametrize("family, targets", [("llama", ("q_proj", "v_proj")), ("gpt2", ("c_attn",)),
                                             ("distilbert", ("q_lin", "v_lin")), ("bert", ("query", "value"))])
def test_a_block_of_its_own_rank_in_every_family(family, targets):
    """HetLoRA and LEGEND give blocks their own ranks (rank_pattern): block 1 at rank 4, block 0 at 2."""
    from node import trainer
    from node.plan import HeadSpec, LoraSpec, Plan, TrainSpec
    model = tiny(family)
    plan = Plan("lora", [0, 1], head=HeadSpec(pooler=False),
                lora=LoraSpec(r=2, alpha=4, target_modules=targets, rank_pattern={1: 4}),
                train=TrainSpec(local_steps=1, batch_size=4, lr=1e-2, seed=1))
    state = trainer.trainable_state(trainer.build_model(model, plan))
    a = {k: v for k, v in state.items() if "lora_A" in k}
    assert len(a) == 2 * len(targets)
    for k, v in a.items():
        assert v.shape[0] == {0: 2, 1: 4}[trainer.block_of(k)], (k, v.shape)


@pytest.mark.parametrize("name", ["TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING",
                                  "TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING",
                                  "TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING"])
def test_peft_mappings_read_from_its_source_are_the_ones_peft_imports(name):
    from peft.utils import constants

    from node.arch import peft_mapping
    assert peft_mapping(name) == getattr(constants, name)


def test_validating_a_scenario_of_the_built_in_model_imports_no_torch():
    """`testbed validate` and the start of a run read the built-in model's config and peft's
    mappings without importing torch, transformers or peft (a strategy that reads the block
    layout builds the model on the meta device, which needs them)."""
    import subprocess
    import sys
    code = ("import sys; from testbed.scenario import load; load('scenarios/legend-ci.yaml'); "
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    from pathlib import Path
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]", out.stderr[-2000:]
