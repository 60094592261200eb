"""Where things are in a transformer of any family: its blocks, embeddings, task head.

Block-wise strategies (LEGEND's depth, CAFF's last n blocks, FedRA's allocation) address "the
model's transformer blocks". Families name them differently: BERT and RoBERTa
`<backbone>.encoder.layer.N`, DistilBERT `distilbert.transformer.layer.N`, Llama, Qwen2,
Mistral and Phi `model.layers.N`, GPT-2 `transformer.h.N`. `Layout.of(model)` finds them without
a table per family: the blocks are the `ModuleList` of the backbone with one entry per hidden
layer, and its attribute name is what peft calls `layers_pattern`. The task head is what the
task model adds around the backbone (`base_model_prefix`), and the default LoRA targets are
peft's own per-architecture mapping.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

BLOCK_SEGMENTS = ("layer", "layers", "h")  # the block lists' names in the families above
BLOCK_NAME = re.compile(r"(?:^|\.)(layer|layers|h)\.(\d+)\.")  # group 1: the list's name, 2: the index


class LayoutError(ValueError):
    """A model whose blocks, or whose defaults, cannot be found."""


def block_index(name: str) -> int | None:
    """Index of the block a parameter or module name belongs to, in any family above (None:
    embeddings, head, final norm, anything outside the blocks)."""
    m = BLOCK_NAME.search(name)
    return int(m.group(2)) if m else None


def _first_int(config, keys) -> int | None:
    """The first of `keys` a config (a dict or an HF config) sets to an integer."""
    for key in keys:
        value = getattr(config, key, None) if not isinstance(config, dict) else config.get(key)
        if isinstance(value, int):
            return value
    return None


def layer_count(config) -> int:
    """The number of transformer blocks a config declares (num_hidden_layers; GPT-2: n_layer)."""
    value = _first_int(config, ("num_hidden_layers", "n_layer", "n_layers", "num_layers"))
    if value is not None:
        return value
    raise LayoutError("the model's config declares no number of layers (num_hidden_layers, n_layer or n_layers)")


@functools.cache
def peft_mapping(name: str) -> dict[str, list[str]]:
    """One of peft's per-architecture module mappings (`peft.utils.constants.<name>`), read from
    peft's installed source as the dict literal it is: importing it runs peft's package init,
    which imports torch and transformers (about 3 s, most of `testbed validate`'s time). Where
    a later peft no longer writes it as a literal, it is imported."""
    import ast
    import importlib.util
    from pathlib import Path
    spec = importlib.util.find_spec("peft")
    if spec is not None and spec.submodule_search_locations:
        source = Path(list(spec.submodule_search_locations)[0]) / "utils" / "constants.py"
        for node in ast.parse(source.read_text()).body:
            if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [name]:
                try:
                    return ast.literal_eval(node.value)
                except ValueError:
                    break
    from peft.utils import constants
    return getattr(constants, name)


def default_lora_targets(model_type: str) -> tuple[str, ...]:
    """peft's default LoRA target modules for an architecture."""
    MAPPING = peft_mapping("TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING")
    if model_type not in MAPPING:
        raise LayoutError(f"peft has no default LoRA target modules for {model_type!r} models: name them in the "
                          "strategy's target_modules")
    return tuple(MAPPING[model_type])


def hidden_size(config) -> int:
    """The width of the residual stream (hidden_size; GPT-2 n_embd; DistilBERT dim)."""
    value = _first_int(config, ("hidden_size", "n_embd", "dim", "d_model"))
    if value is not None:
        return value
    raise LayoutError("the model's config declares no hidden size (hidden_size, n_embd or dim)")


def sublayer_outputs(projections) -> tuple[str, str]:
    """The attention's and the feed-forward's output projections among a block's projections
    (paths inside the block, in the order the block defines them): the last projection of the
    first child that holds any (the attention) and the block's last projection. BERT:
    attention.output.dense and output.dense; Llama: self_attn.o_proj and mlp.down_proj; GPT-2:
    attn.c_proj and mlp.c_proj; DistilBERT: attention.out_lin and ffn.lin2."""
    projections = list(projections)
    if not projections:
        raise LayoutError("the block has no linear projections")
    first = projections[0].split(".")[0]
    attention = [p for p in projections if p.split(".")[0] == first][-1]
    if attention == projections[-1]:
        raise LayoutError(f"cannot tell the attention's output projection from the feed-forward's among "
                          f"{', '.join(projections)}")
    return attention, projections[-1]


def adapter_sites(projections, kind: str) -> tuple[tuple[str, str], ...]:
    """Where a block gets its bottleneck adapters: (holder, projection) paths inside a block, after
    the attention's and the feed-forward's output projections (houlsby) or the feed-forward's
    only (pfeiffer). BERT: (attention.output, dense) and (output, dense)."""
    attention, feedforward = sublayer_outputs(projections)
    chosen = (attention, feedforward) if kind == "houlsby" else (feedforward,)
    return tuple((p.rpartition(".")[0], p.rpartition(".")[2]) for p in chosen)


@dataclass(frozen=True)
class Layout:
    """Parameter-name prefixes of one model's parts (each ends with '.')."""
    model_type: str
    blocks: str                  # the block list, e.g. "bert.encoder.layer."; block b is blocks + f"{b}."
    segment: str                 # its last name: peft's layers_pattern ("layer", "layers", "h")
    count: int
    embeddings: tuple[str, ...]  # the input side of the backbone (token and position embeddings)
    head: tuple[str, ...]        # what the task adds around the backbone (classifier, score, ...)
    pooler: str | None           # BERT-style pooler inside the backbone, trained with the head or not

    @classmethod
    def of(cls, model) -> "Layout":
        """The layout of a transformers task model (…ForSequenceClassification, …ForCausalLM)."""
        import torch
        count = layer_count(model.config)
        prefix = getattr(model, "base_model_prefix", "") or ""
        backbone = getattr(model, prefix, None) if prefix else None
        found = [name for name, m in model.named_modules()
                 if isinstance(m, torch.nn.ModuleList) and len(m) == count and name.split(".")[-1] in BLOCK_SEGMENTS]
        if len(found) != 1:
            raise LayoutError(f"cannot find the {count} transformer blocks of this {model.config.model_type} model "
                              f"(ModuleLists named {', '.join(BLOCK_SEGMENTS)} with {count} entries: {found or 'none'})")
        blocks = found[0]
        head = tuple(sorted({f"{n.split('.')[0]}." for n, _ in model.named_parameters()
                             if backbone is not None and not n.startswith(f"{prefix}.")}))
        pooler = f"{prefix}.pooler." if backbone is not None and getattr(backbone, "pooler", None) is not None else None
        return cls(model.config.model_type, f"{blocks}.", blocks.split(".")[-1], count,
                   _embeddings(model, prefix, backbone), head, pooler)

    def block_of(self, name: str) -> int | None:
        """The block index of a parameter of this model (None outside the blocks)."""
        if not name.startswith(self.blocks) and f".{self.blocks}" not in name:
            return None
        return block_index(name)


def _embeddings(model, prefix: str, backbone) -> tuple[str, ...]:
    """Prefixes of the backbone's embedding modules: an `embeddings` module where the family has
    one (BERT, RoBERTa, DistilBERT), else its token embeddings and any position embeddings
    (Llama: embed_tokens; GPT-2: wte and wpe)."""
    import torch
    if backbone is None:
        return ()
    if isinstance(getattr(backbone, "embeddings", None), torch.nn.Module):
        return (f"{prefix}.embeddings.",)
    names = {id(m): n for n, m in backbone.named_modules()}
    found = [f"{prefix}.{names[id(m)]}." for m in backbone.children() if isinstance(m, torch.nn.Embedding)]
    return tuple(found)
