"""FedLoRA: LoRA with one rank on every block of every node, FedAvg of A and B.

The common LoRA baseline of LEGEND, CAFF, HetLoRA and FedRA: adapters on the attention
query and value projections of all blocks, the pooler and classifier trained in full (they
are new for the task), and only those tensors cross the network. Averaging A and B
separately is what these papers' FedLoRA does (it is not the average of the products B·A).
"""
from __future__ import annotations

from pydantic import Field

from .base import NodeInfo, Params, State, Strategy, Update, weighted_average


class FedLoRAParams(Params):
    rank: int = Field(8, ge=1, le=384)
    alpha: float | None = Field(None, gt=0, description="LoRA scaling numerator; default 2 x rank")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["query", "value"], min_length=1)


class FedLoRA(Strategy):
    name = "fedlora"
    Params = FedLoRAParams

    def global_plan(self) -> dict:
        p = self.p
        lora = {"r": p.rank, "alpha": p.alpha or 2 * p.rank, "dropout": p.dropout,
                "target_modules": list(p.target_modules), "rank_pattern": {}}
        return {"method": "lora", "blocks": list(range(self.ctx.num_blocks)), "lora": lora, "head": True,
                **self.train_fields(0)}

    def configure(self, rnd: int, nodes: list[NodeInfo], state: State) -> dict[str, tuple[dict, State]]:
        return {n.name: ({**self.global_plan(), **self.train_fields(rnd, i)}, state) for i, n in enumerate(nodes)}

    def aggregate(self, rnd: int, updates: list[Update], state: State) -> State:
        return weighted_average(updates, state)
