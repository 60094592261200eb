"""FedIA3: peft's (IA)^3 in every chosen block of every node, FedAvg of the learned vectors.

A low-parameter baseline beside LoRA and bottleneck adapters. (IA)^3 (Liu et al. 2022,
https://arxiv.org/abs/2205.05638) learns vectors that rescale the attention keys and values and
the inner activations of the feed-forward (the input of its second layer), initialised to ones;
for MiniLM that is 2 x 384 + 1536 = 2,304 parameters per block. The node runs peft's
implementation (plan method `ia3`, `node.plan.IA3Spec`).

From the paper: what is rescaled (keys, values, feed-forward activations) and the ones
initialisation. Reconstructed here (each a parameter): the projections (`targets`, paths inside a
block, with `feedforward` those whose input is rescaled; by default BERT's key, value and output
dense, and for another family peft's own per-architecture mapping, e.g. Llama's k_proj, v_proj
and down_proj), the blocks (`last_blocks`), the
aggregation weights (`weighting`). The paper's own recipe also adds training losses for few-shot
learning (unlikelihood and length normalisation), which do not apply to this classification
task. The task head: the classifier, as for the LoRA baselines (`pooler: true` adds the pooler).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Literal

from pydantic import Field, ValidationInfo, model_validator

from node.plan import IA3Spec, Plan

from .base import HeadParams, NodeInfo, State, Strategy, Task, Update, context, weighted_average


BERT_TARGETS = ("attention.self.key", "attention.self.value", "output.dense")  # exact paths (see IA3Spec)
BERT_FEEDFORWARD = ("output.dense",)


def default_targets(model_type: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(targets, feedforward) by default: the paper's keys, values and feed-forward input; for
    BERT as exact paths, for other families peft's own mapping per architecture."""
    if model_type == "bert":
        return BERT_TARGETS, BERT_FEEDFORWARD
    from node.arch import peft_mapping
    FEEDFORWARD = peft_mapping("TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING")
    TARGETS = peft_mapping("TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING")
    if model_type not in TARGETS:
        raise ValueError(f"targets: peft has no default (IA)^3 target modules for {model_type!r} models: name "
                         "them in targets (and feedforward)")
    return tuple(TARGETS[model_type]), tuple(FEEDFORWARD.get(model_type, ()))


class FedIA3Params(HeadParams):
    targets: list[str] | None = Field(None, min_length=1, description="projections whose output (or input, see "
                                      "feedforward) is rescaled, inside a block; default: the model's keys, values "
                                      "and feed-forward output layer")
    feedforward: list[str] | None = Field(None, description="targets whose input is rescaled instead of their output")
    last_blocks: int | None = Field(None, ge=1, description="the last n blocks only; None = all")
    weighting: Literal["samples", "mean"] = "samples"

    @model_validator(mode="after")
    def _a_valid_spec(self, info: ValidationInfo):
        ctx = context(info)
        config = ctx.model_config if ctx is not None and ctx.model_config is not None else {}
        kind = (config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)) or "bert"
        if self.targets is None or self.feedforward is None:
            targets, feedforward = default_targets(kind)
            self.targets = list(targets) if self.targets is None else self.targets
            if self.feedforward is None:  # the family's feed-forward layer, where it is a target
                self.feedforward = [t for t in feedforward if t in self.targets]
        spec = self.spec()  # bad paths, feedforward outside targets: errors at validate time
        known = ctx.block_projections if ctx is not None else ()
        missing = [t for t in spec.targets if known and not any(IA3Spec.matches(t, p) for p in known)]
        if missing:
            raise ValueError(f"targets: {missing} name no projection of a {kind} block; its projections: "
                             f"{', '.join(known)}")
        return self

    def spec(self) -> IA3Spec:
        return IA3Spec(tuple(self.targets), tuple(self.feedforward))


class FedIA3(Strategy):
    name = "fedia3"
    reads_block_layout = True
    Params = FedIA3Params

    def global_plan(self) -> Plan:
        n = self.ctx.num_blocks
        k = min(self.p.last_blocks or n, n)
        return Plan("ia3", tuple(range(n - k, n)), head=self.head(),
                    ia3=self.p.spec(), train=self.train_spec(0))

    def configure(self, rnd: int, nodes: list[NodeInfo], state: State) -> dict[str, Task]:
        plan = self.global_plan()
        return {n.name: Task(replace(plan, train=self.train_spec(rnd, i)), state) for i, n in enumerate(nodes)}

    def aggregate(self, rnd: int, updates: list[Update], state: State) -> tuple[State, dict]:
        return weighted_average(updates, state, equal=self.p.weighting == "mean"), {}
