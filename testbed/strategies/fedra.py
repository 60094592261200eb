"""FedRA (Su et al., ECCV 2024, arXiv 2311.11227): random allocation of blocks to devices.

From the paper (abstract and its official code; docs/strategies.md):
- every round the server draws a random allocation matrix M (devices x blocks, 0/1) that
  gives each device as many blocks as its resources allow;
- a device fine-tunes adapters (LoRA) only in its allocated blocks;
- the server averages each block's adapters over the devices that trained it in this round
  (by the current allocation matrix) and writes them into the full model.

From the paper and the official code: a constrained device builds a *smaller* model out of
its allocated blocks only, in order, and fine-tunes LoRA on all of them (`submodel: true`, the
default: the node's trainer runs a model of those blocks alone, so the other blocks cost it
no compute and no activations; the tensors keep their blocks' global names on the wire).
`submodel: false` runs the whole model with LoRA on the allocated blocks instead.

Reconstructed / different here (every choice is a parameter):
- capacity n_i (blocks device i trains), `capacity_from`:
  * `cpu_share` or `memory_mb`: n_i = floor(L x x_i / x_ref), clipped to [min_blocks, L], where
    x is that profile field and x_ref is `reference`: `sampled` = the strongest device sampled
    this round (it trains all L blocks), `all` = the strongest device of the scenario, or a
    number (the value of the field that earns all L blocks);
  * `fixed`: `fixed_blocks`, one number for every device or a profile name -> n mapping
    (every profile a device of the scenario has needs an entry; checked by `testbed validate`);
  rounding down keeps every device within its capacity.
- allocation: each device's n_i distinct blocks drawn uniformly without replacement, from one
  RNG seeded by (scenario seed, round), devices taken in name order, so the matrix is
  reproducible and differs from round to round; nothing forces every block to be covered.
- one LoRA rank on every block and device (`rank` 8, `alpha` default = rank: the official
  code's r 8, alpha 8; query and value here), the task head (the classifier; `pooler: true`
  adds the pooler) trained by every device; each tensor is the plain mean over the devices
  that trained it in the round
  (`weighting: mean`, the official code's per-block average; `samples` weights by sample
  count); a block no device trained keeps its value.
- each device's choices (rounds.jsonl) are `fedra_blocks` (its row of M) and `fedra_capacity` (n_i).
"""
from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import Field, ValidationInfo, model_validator

from node.plan import LoraSpec, Plan

from .base import (LoraParams, NodeInfo, State, Strategy, Task, Update, blocks_of, check_profile_keys, context,
                   weighted_average)

_SALT = 0xFED7A  # keeps this RNG stream apart from the runner's node sampling ([seed, round])


class FedRAParams(LoraParams):
    rank: int = Field(8, ge=1, le=384)
    alpha: float | None = Field(None, gt=0, description="LoRA scaling numerator; default = rank (the "
                                "official code: r 8, alpha 8)")
    dropout: float = Field(0.0, ge=0, lt=1)
    capacity_from: Literal["cpu_share", "memory_mb", "fixed"] = "cpu_share"
    reference: float | Literal["sampled", "all"] = Field(
        "sampled", description="value of the profile field that earns all blocks: a number, "
                               "'sampled' (strongest sampled device) or 'all' (strongest of the scenario)")
    fixed_blocks: int | dict[str, int] | None = Field(None, description="capacity_from fixed: n, or profile -> n")
    min_blocks: int = Field(1, ge=1)
    weighting: Literal["mean", "samples"] = Field("mean", description="mean: each tensor the plain mean over "
                                                  "the devices that trained it (the official code)")
    submodel: bool = Field(True, description="a device runs a model of its allocated blocks alone (the official "
                           "code); false: the whole model with LoRA on its blocks")

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> "FedRAParams":
        if not isinstance(self.reference, str) and self.reference <= 0:
            raise ValueError("reference: must be > 0, 'sampled' or 'all'")
        if self.capacity_from == "fixed":
            if self.fixed_blocks is None:
                raise ValueError("fixed_blocks: capacity_from 'fixed' needs it (a number or profile -> number)")
            values = self.fixed_blocks.values() if isinstance(self.fixed_blocks, dict) else [self.fixed_blocks]
            if any(int(v) < 1 for v in values):
                raise ValueError("fixed_blocks: must be >= 1")
            ctx = context(info)
            if isinstance(self.fixed_blocks, dict) and ctx is not None:
                check_profile_keys(self.fixed_blocks, ctx, "fixed_blocks", every=True)
        elif self.fixed_blocks is not None:
            raise ValueError(f"fixed_blocks: only used with capacity_from 'fixed' (not {self.capacity_from!r})")
        return self


class FedRA(Strategy):
    name = "fedra"
    Params = FedRAParams

    # -- capacity and allocation -----------------------------------------------------------
    def capacities(self, nodes: list[NodeInfo]) -> dict[str, int]:
        """n_i for each node: how many blocks it trains this round."""
        p, L = self.p, self.ctx.num_blocks
        lo = min(p.min_blocks, L)
        out = {}
        if p.capacity_from == "fixed":
            for n in nodes:
                if isinstance(p.fixed_blocks, dict):
                    if n.profile.name not in p.fixed_blocks:
                        raise ValueError(f"fedra: fixed_blocks has no entry for profile {n.profile.name!r} "
                                         f"(node {n.name})")
                    k = int(p.fixed_blocks[n.profile.name])
                else:
                    k = int(p.fixed_blocks)
                out[n.name] = min(L, max(lo, k))
            return out
        field = p.capacity_from
        if p.reference == "sampled":
            ref = max((float(getattr(n.profile, field)) for n in nodes), default=0.0)
        elif p.reference == "all":
            pool = list((self.ctx.profiles or {}).values()) or [n.profile for n in nodes]
            ref = max(float(getattr(prof, field)) for prof in pool)
        else:
            ref = float(p.reference)
        for n in nodes:
            frac = min(1.0, float(getattr(n.profile, field)) / ref) if ref > 0 else 1.0
            out[n.name] = min(L, max(lo, math.floor(L * frac + 1e-9)))
        return out

    def allocate(self, rnd: int, nodes: list[NodeInfo]) -> dict[str, list[int]]:
        """The round's allocation matrix as node -> sorted list of its blocks."""
        L = self.ctx.num_blocks
        caps = self.capacities(nodes)
        rng = np.random.default_rng([int(self.ctx.seed), int(rnd), _SALT])
        return {name: sorted(int(b) for b in rng.choice(L, size=caps[name], replace=False))
                for name in sorted(caps)}

    def allocation_matrix(self, rnd: int, nodes: list[NodeInfo]) -> np.ndarray:
        """M[i, l] = 1 when nodes[i] trains block l in round rnd."""
        alloc = self.allocate(rnd, nodes)
        m = np.zeros((len(nodes), self.ctx.num_blocks), dtype=np.int8)
        for i, n in enumerate(nodes):
            m[i, alloc[n.name]] = 1
        return m

    # -- plans -----------------------------------------------------------------------------
    def plan_for(self, blocks: list[int], rnd: int = 0, index: int = 0, submodel: bool = False) -> Plan:
        p = self.p
        lora = LoraSpec(r=p.rank, alpha=p.alpha or p.rank, dropout=p.dropout, target_modules=tuple(p.target_modules))
        return Plan("lora", tuple(blocks), head=self.head(), lora=lora, train=self.train_spec(rnd, index),
                    submodel=submodel)

    def global_plan(self) -> Plan:
        return self.plan_for(list(range(self.ctx.num_blocks)))

    def configure(self, rnd: int, nodes: list[NodeInfo], state: State) -> dict[str, Task]:
        alloc = self.allocate(rnd, nodes)
        return {n.name: Task(self.plan_for(alloc[n.name], rnd, i, self.p.submodel), blocks_of(state, alloc[n.name]),
                             {"fedra_blocks": list(alloc[n.name]), "fedra_capacity": len(alloc[n.name])})
                for i, n in enumerate(nodes)}

    def aggregate(self, rnd: int, updates: list[Update], state: State) -> tuple[State, dict]:
        return weighted_average(updates, state, equal=self.p.weighting == "mean"), {}
