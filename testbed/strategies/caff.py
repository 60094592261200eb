"""CAFF (Pfeiffer et al., arXiv 2411.07826): train the last n_i blocks that fit each device's budgets.

Known (paper abstract and public summaries; docs/strategies.md):
- each device has memory, FLOP and upload budgets; it trains a device-specific number of
  FINAL blocks plus the head in full, the blocks below stay frozen (no backward through them);
- the server averages layer by layer over the devices that trained each layer;
- peak memory counts weights + optimizer state + activations; upload counts only changed params;
- device groups strong / medium / weak with budgets 1.0 / 0.66 / 0.33 of full training.

Reconstructed here (every choice is a parameter):
- "full training" is the `full` strategy's plan on this model: every encoder block + pooler +
  classifier, embeddings frozen; its memory M(L), FLOPs F(L) and upload U(L) come from
  `testbed.costmodel`, as do M(n), F(n), U(n) for the last n blocks;
- a device's budget fraction b_i is `budgets[profile]` when given, otherwise its cpu_share over
  the largest cpu_share among the scenario's devices (caff-strong/medium/weak: 1.0/0.66/0.33);
  memory budget = b_i x M(L) where M is the training memory above the process baseline
  (`memory: budget`, CAFF's setting), or the profile's memory for the whole process
  (`memory: profile`); FLOP budget = b_i x F(L); upload budget = u_i x b_i x U(L), with u_i drawn
  once per device from U(upload_factor) for devices with b_i < 1 (CAFF's public code), 1 otherwise;
- n_i = the largest n in [0, L] with M(n), F(n), U(n) within budget (n = 0: head only); where
  not even the head fits (the forward pass of all blocks alone is about a third of full
  training's FLOPs, so a 0.33 FLOP budget can fall below it) the device trains the head and
  its plan says `caff_over_budget` (in rounds.jsonl);
- aggregation: each tensor averaged over the devices that trained it, weighted by sample count;
  a block nobody trained keeps its value. The runner records per-block update counts (fairness).
- CAFF may choose among several pretrained architectures; only one is available here.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, ValidationInfo, model_validator

from node.plan import Plan

from .base import (NodeInfo, Params, State, Strategy, Task, Update, blocks_of, check_profile_keys, context,
                   weighted_average)


def training_mb(cost) -> float:
    """Memory a round's training needs on top of the process baseline (interpreter, torch, the
    frozen model): weights copy, gradients, optimizer state, activations. CAFF budgets this part."""
    return cost.peak_memory_mb - cost.breakdown["memory_mb"]["runtime"]


class CaffParams(Params):
    budgets: dict[str, float] | None = Field(None, description="profile name -> budget fraction of full training")
    memory: Literal["budget", "profile"] = "budget"
    upload_factor: tuple[float, float] = (0.5, 1.0)
    train_embeddings: bool = False

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> "CaffParams":
        lo, hi = self.upload_factor
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"upload_factor: must satisfy 0 < lo <= hi <= 1, got [{lo}, {hi}]")
        if self.budgets is not None:
            bad = sorted(k for k, b in self.budgets.items() if not b > 0)
            if bad:
                raise ValueError(f"budgets: must be > 0 (a fraction of full training), not for {bad}")
            ctx = context(info)
            if ctx is not None:
                check_profile_keys(self.budgets, ctx, "budgets", every=True)
        return self


class Caff(Strategy):
    name = "caff"
    Params = CaffParams

    def __init__(self, params: dict, ctx):
        super().__init__(params, ctx)
        from ..costmodel import Arch
        self.arch = Arch.from_config(ctx.model_config)
        self._costs: dict[int, object] = {}
        self._upload: dict[str, float] = {}
        self.max_share: float | None = None

    def state_dict(self) -> dict:
        return {"upload": dict(self._upload), "max_share": self.max_share}

    def load_state_dict(self, state: dict) -> None:
        self._upload = {str(n): float(v) for n, v in state.get("upload", {}).items()}
        self.max_share = None if state.get("max_share") is None else float(state["max_share"])

    def plan_for(self, n: int, rnd: int = 0, index: int = 0) -> Plan:
        L = self.ctx.num_blocks
        return Plan("full", tuple(range(L - n, L)), train_embeddings=self.p.train_embeddings,
                    train=self.train_spec(rnd, index))

    def global_plan(self) -> Plan:
        return self.plan_for(self.ctx.num_blocks)

    def cost(self, n: int):
        if n not in self._costs:
            from ..costmodel import estimate
            self._costs[n] = estimate(self.arch, self.plan_for(n))
        return self._costs[n]

    def budget(self, info: NodeInfo) -> float:
        if self.p.budgets is not None:
            if info.profile.name not in self.p.budgets:
                raise ValueError(f"caff: no budget for profile {info.profile.name!r}; budgets: {self.p.budgets}")
            return float(self.p.budgets[info.profile.name])
        return info.profile.cpu_share / (self.max_share or info.profile.cpu_share)

    def upload_factor(self, info: NodeInfo, b: float) -> float:
        if info.name not in self._upload:
            lo, hi = self.p.upload_factor
            seed = [self.ctx.seed, sum(info.name.encode())]
            self._upload[info.name] = 1.0 if b >= 1 else float(np.random.default_rng(seed).uniform(lo, hi))
        return self._upload[info.name]

    def blocks_for(self, info: NodeInfo) -> int:
        """n_i: the most final blocks whose memory, FLOPs and upload fit the device's budgets (-1: none)."""
        L, full = self.ctx.num_blocks, self.cost(self.ctx.num_blocks)
        b = self.budget(info)
        if self.p.memory == "budget":  # CAFF's budget: a share of full training's memory
            mem, used = b * training_mb(full), training_mb
        else:                          # the device's own memory, whole process included
            mem, used = info.profile.memory_mb, (lambda c: c.peak_memory_mb)
        flops, up = b * full.flops_per_round, self.upload_factor(info, b) * b * full.upload_bytes
        fitting = [n for n in range(L + 1) if used(c := self.cost(n)) <= mem * (1 + 1e-9)
                   and c.flops_per_round <= flops * (1 + 1e-9) and c.upload_bytes <= up * (1 + 1e-9)]
        return max(fitting, default=-1)

    def configure(self, rnd: int, nodes: list[NodeInfo], state: State) -> dict[str, Task]:
        if self.max_share is None:  # budgets relative to the strongest device of the scenario
            every = self.ctx.profiles.values() if self.ctx.profiles else [n.profile for n in nodes]
            self.max_share = max(p.cpu_share for p in every)
        tasks = {}
        for i, n in enumerate(nodes):
            k = self.blocks_for(n)
            over = k < 0  # not even the head alone fits: it trains the head, recorded as over budget
            plan = self.plan_for(max(k, 0), rnd, i)
            tasks[n.name] = Task(plan, blocks_of(state, plan.blocks), {"caff_blocks": max(k, 0), "caff_over_budget": over})
        return tasks

    def aggregate(self, rnd: int, updates: list[Update], state: State) -> tuple[State, dict]:
        return weighted_average(updates, state), {}
