"""FedIA3: peft's (IA)^3 in every chosen block of every node, FedAvg of the learned vectors.

A low-parameter baseline beside LoRA and bottleneck adapters. (IA)^3 (Liu et al. 2022,
https://arxiv.org/abs/2205.05638) learns vectors that rescale the attention keys and values and
the inner activations of the feed-forward (the input of its second layer), initialised to ones;
for MiniLM that is 2 x 384 + 1536 = 2,304 parameters per block. The node runs peft's
implementation (plan method `ia3`, `node.plan.IA3Spec`).

From the paper: what is rescaled (keys, values, feed-forward activations) and the ones
initialisation. Reconstructed here (each a parameter): the projections (`targets`, paths inside a
block, with `feedforward` those whose input is rescaled), the blocks (`last_blocks`), the
aggregation weights (`weighting`). The paper's own recipe also adds training losses for few-shot
learning (unlikelihood and length normalisation), which do not apply to this classification
task. The task head: the classifier, as for the LoRA baselines (`pooler: true` adds the pooler).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Literal

from pydantic import Field, model_validator

from node.plan import IA3Spec, Plan

from .base import HeadParams, NodeInfo, State, Strategy, Task, Update, weighted_average


class FedIA3Params(HeadParams):
    targets: list[str] = Field(default_factory=lambda: ["attention.self.key", "attention.self.value", "output.dense"],
                               min_length=1, description="projections whose output (or input, see feedforward) is "
                               "rescaled, as paths inside a block")
    feedforward: list[str] = Field(default_factory=lambda: ["output.dense"],
                                   description="targets whose input is rescaled instead of their output")
    last_blocks: int | None = Field(None, ge=1, description="the last n blocks only; None = all")
    weighting: Literal["samples", "mean"] = "samples"

    @model_validator(mode="after")
    def _a_valid_spec(self):
        self.spec()  # unknown paths, feedforward outside targets: errors at validate time
        return self

    def spec(self) -> IA3Spec:
        return IA3Spec(tuple(self.targets), tuple(self.feedforward))


class FedIA3(Strategy):
    name = "fedia3"
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
