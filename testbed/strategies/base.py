"""The strategy interface: configure a round (a plan and start tensors per node), aggregate it.

Like Flower's Strategy, nothing else. A strategy owns both halves so that the node only
ever executes plans: adding a strategy never touches `node/`.
"""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

State = dict[str, np.ndarray]
_BLOCK = re.compile(r"(?:^|\.)layer\.(\d+)\.")


def block_of(name: str) -> int | None:
    """Encoder block index a tensor belongs to (None for embeddings / head)."""
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else None


class Params(BaseModel):
    """Per-strategy parameters from the scenario; subclasses add fields. Unknown keys are errors."""
    model_config = ConfigDict(extra="forbid")
    lr: float | None = Field(None, gt=0, description="overrides training.lr for this strategy")
    local_steps: int | None = Field(None, ge=1, description="overrides training.local_steps")


@dataclass
class NodeInfo:
    name: str
    profile: Any          # emulation.profiles.Profile
    num_samples: int


@dataclass
class Update:
    """One node's result; `metrics` holds its report plus what the aggregator measured (emulated seconds)."""
    node: str
    plan: dict
    tensors: State
    num_samples: int
    metrics: dict = field(default_factory=dict)


@dataclass
class Context:
    """What a strategy may know about the run: training settings, model size, seed."""
    training: Any         # testbed.scenario.TrainingConfig
    max_len: int
    num_blocks: int
    seed: int
    model_config: Any = None  # the HF config of the pretrained model (cost models read its sizes)
    profiles: dict = field(default_factory=dict)  # every node of the scenario -> its Profile


class Strategy(ABC):
    name: ClassVar[str]
    Params: ClassVar[type[Params]] = Params

    def __init__(self, params: dict, ctx: Context):
        self.p = self.Params.model_validate(params)
        self.ctx = ctx

    # -- the two halves --------------------------------------------------------------------
    @abstractmethod
    def global_plan(self) -> dict:
        """The plan whose trainable tensors make up the global state (also used to evaluate it)."""

    @abstractmethod
    def configure(self, rnd: int, nodes: list[NodeInfo], state: State) -> dict[str, tuple[dict, State]]:
        """For each sampled node: (plan, tensors it starts from)."""

    @abstractmethod
    def aggregate(self, rnd: int, updates: list[Update], state: State) -> State:
        """The next global state from this round's updates."""

    # -- shared pieces ---------------------------------------------------------------------
    def train_fields(self, rnd: int, node_index: int = 0) -> dict:
        t = self.ctx.training
        return {"local_steps": self.p.local_steps or t.local_steps, "batch_size": t.batch_size,
                "lr": self.p.lr or t.lr, "weight_decay": t.weight_decay, "max_len": self.ctx.max_len,
                "seed": self.ctx.seed * 1_000_003 + rnd * 1009 + node_index}


def weighted_average(updates: list[Update], state: State) -> State:
    """Each tensor averaged over the updates that carry it, weighted by their sample counts.

    A tensor no update carries keeps its current value. This one rule is FedAvg when every
    node trains everything, and per-layer averaging when nodes train different blocks.
    """
    new = dict(state)
    for name in state:
        holders = [u for u in updates if name in u.tensors]
        if not holders:
            continue
        w = np.array([u.num_samples for u in holders], dtype=np.float64)
        w = w / w.sum() if w.sum() > 0 else np.full(len(holders), 1 / len(holders))
        acc = np.zeros(state[name].shape, dtype=np.float64)
        for wi, u in zip(w, holders):
            acc += wi * u.tensors[name]
        new[name] = acc.astype(state[name].dtype)
    return new


def update_counts(updates: list[Update]) -> dict[str, int]:
    """How many nodes updated each block this round (CAFF's fairness view)."""
    counts: dict[str, int] = {}
    for u in updates:
        blocks = {block_of(n) for n in u.tensors}
        for b in blocks:
            key = "head" if b is None else str(b)
            counts[key] = counts.get(key, 0) + 1
    return counts
