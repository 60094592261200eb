"""FedAvg of full fine-tuning (McMahan et al. 2017), the baseline both papers compare with.

Every sampled node trains the same blocks (all by default, or the last `last_blocks`) plus
the head; the server averages each tensor weighted by sample count. Embeddings are large
(11.7M of MiniLM's 22.7M parameters) and are trained only when `train_embeddings` is set.
"""
from __future__ import annotations

from dataclasses import replace

from pydantic import Field

from node.plan import Plan

from .base import NodeInfo, Params, State, Strategy, Task, Update, weighted_average


class FullParams(Params):
    last_blocks: int | None = Field(None, ge=1, description="train only the last n blocks (+ head); None = all")
    train_embeddings: bool = False


class Full(Strategy):
    name = "full"
    Params = FullParams

    def blocks(self) -> list[int]:
        n = self.ctx.num_blocks
        k = min(self.p.last_blocks or n, n)
        return list(range(n - k, n))

    def global_plan(self) -> Plan:
        return Plan("full", tuple(self.blocks()), train_embeddings=self.p.train_embeddings, train=self.train_spec(0))

    def configure(self, rnd: int, nodes: list[NodeInfo], state: State) -> dict[str, Task]:
        plan = self.global_plan()
        return {n.name: Task(replace(plan, train=self.train_spec(rnd, i)), state) for i, n in enumerate(nodes)}

    def aggregate(self, rnd: int, updates: list[Update], state: State) -> tuple[State, dict]:
        return weighted_average(updates, state), {}
