"""FedLoRA: LoRA with one rank on every block of every node, FedAvg of A and B.

The common LoRA baseline of LEGEND, CAFF, HetLoRA and FedRA: adapters on the attention
query and value projections of all blocks, the classifier trained in full (it is new for the
task; `pooler: true` trains the BERT pooler too), and only those tensors cross the network. Averaging A and B
separately is what these papers' FedLoRA does (it is not the average of the products B·A).
"""
from __future__ import annotations

from dataclasses import replace

from pydantic import Field

from node.plan import LoraSpec, Plan

from .base import LoraParams, NodeInfo, State, Strategy, Task, Update, weighted_average


class FedLoRAParams(LoraParams):
    rank: int = Field(8, ge=1, le=384)
    alpha: float | None = Field(None, gt=0, description="LoRA scaling numerator; default 2 x rank")
    dropout: float = Field(0.0, ge=0, lt=1)


class FedLoRA(Strategy):
    name = "fedlora"
    Params = FedLoRAParams

    def lora_spec(self) -> LoraSpec:
        p = self.p
        return LoraSpec(r=p.rank, alpha=p.alpha or 2 * p.rank, dropout=p.dropout, target_modules=tuple(p.target_modules))

    def global_plan(self) -> Plan:
        return Plan("lora", tuple(range(self.ctx.num_blocks)), head=self.head(), lora=self.lora_spec(),
                    train=self.train_spec(0))

    def configure(self, rnd: int, nodes: list[NodeInfo], state: State) -> dict[str, Task]:
        plan = self.global_plan()
        return {n.name: Task(replace(plan, train=self.train_spec(rnd, i)), state) for i, n in enumerate(nodes)}

    def aggregate(self, rnd: int, updates: list[Update], state: State) -> tuple[State, dict]:
        return weighted_average(updates, state), {}
