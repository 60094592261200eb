"""CAFF (Pfeiffer et al., arXiv 2411.07826): train the last n_i blocks that fit each device's budgets.

Known (the paper's abstract and public summaries; docs/strategies.md):
- each device has memory, FLOP and upload budgets; it trains a device-specific number of
  FINAL blocks plus the head in full, the blocks below stay frozen (no backward through them);
- the server averages layer by layer over the devices that trained each layer;
- peak memory counts weights + optimizer state + activations; upload counts only changed params;
- device groups strong / medium / weak with budgets 1.0 / 0.66 / 0.33 of full training.
From the authors' earlier code (github.com/k1l1/CoCoFL): costs normalised so that full
training = 1.0; every group is guaranteed a feasible configuration (the code asserts it); the
upload budget of the medium and weak groups is a fraction drawn from U(0.5, 1.0) each time a
device trains, not tied to the group's compute budget (the strong group's is 1.0); the server's
damped layer-wise average is r x mean + (1 - r) x old, r = the share of the round's devices
that trained the tensor.

Reconstructed here (every choice is a parameter):
- "full training" is the `full` strategy's plan on this model (every block + the head,
  embeddings frozen); the cost model (`testbed.costmodel`) gives FLOPs F(n), the analytic peak
  memory M(n) = weights + gradients and AdamW state of the trained parameters + saved
  activations (the paper's definition), and the upload U(n) for the last n blocks, n = 0 the
  head alone;
- a device's budget fraction b_i is `budgets[profile]` when given, otherwise its cpu_share over
  the largest cpu_share among the scenario's devices (caff-strong/medium/weak: 1.0/0.66/0.33);
- `budget_basis: trainable` (default): the FLOP and memory budgets span what a device can
  choose from, head alone (b = 0) to full training (b = 1): F_i = F(0) + b_i (F(L) - F(0)),
  likewise M_i, so every group is feasible by construction (the forward pass through all
  blocks, a third of full training's FLOPs here, is a cost no configuration avoids).
  `budget_basis: full`: F_i = b_i F(L), M_i = b_i M(L), which leaves the weak group no
  configuration on this model (refused by `testbed validate`);
- `memory: profile` instead compares the cost model's whole-process peak with the profile's memory;
- upload budget = u_i x U(L), u_i from U(upload_factor), drawn for a device whose b_i < 1
  (`upload_for: constrained`, the authors' code) or for every device (`all`), for every round
  (`upload_draw: round`) or once per device (`once`), from a generator seeded by a stable hash
  of (scenario seed, device name[, round]);
- n_i = the largest n in [0, L] whose costs are within the budgets, with a relative tolerance
  `margin` (default 0.02) so that an estimate a fraction of a percent over a boundary does not
  cost a whole block; if nothing fits (possible only with `budget_basis: full` or `memory:
  profile`) the device trains the head and its choices say `caff_over_budget`;
- aggregation: `samples` (default: each tensor averaged over the devices that trained it,
  weighted by sample count, the paper's layer-wise weighted average), `mean` (plain mean over
  them) or `damped` (the authors' code: r x mean + (1 - r) x old); a block nobody trained
  keeps its value. The runner records per-block update counts (fairness).
- CAFF may choose among several pretrained architectures; only one is available here.
"""
from __future__ import annotations

import hashlib
from typing import Literal

import numpy as np
from pydantic import Field, ValidationInfo, model_validator

from node.plan import Plan, TrainSpec

from .base import (Context, NodeInfo, Params, State, Strategy, Task, Update, blocks_of, check_profile_keys,
                   context, weighted_average)


def analytic_mb(cost) -> float:
    """The paper's peak memory of a plan: weights + gradients + optimizer state + saved activations (MB)."""
    m = cost.breakdown["memory_mb"]
    return m["weights"] + m["gradients"] + m["optimizer"] + m["activations"]


class CaffParams(Params):
    budgets: dict[str, float] | None = Field(None, description="profile name -> budget fraction of full training")
    budget_basis: Literal["trainable", "full"] = Field("trainable", description="trainable: a budget b spans head "
                                                       "only (0) to full training (1); full: b x full training")
    memory: Literal["budget", "profile"] = "budget"
    margin: float = Field(0.02, ge=0, lt=0.5, description="relative tolerance at a budget's boundary")
    upload_factor: tuple[float, float] = (0.5, 1.0)
    upload_for: Literal["constrained", "all"] = "constrained"
    upload_draw: Literal["round", "once"] = "round"
    aggregation: Literal["samples", "mean", "damped"] = "samples"
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
            if self.budgets is not None:
                check_profile_keys(self.budgets, ctx, "budgets", every=True)
            problems = Budgets(self, ctx).infeasible()
            if problems:
                raise ValueError("budgets: no configuration fits " + "; ".join(problems))
        return self


class Budgets:
    """The cost side of CAFF: what each configuration costs, what each device may spend."""

    def __init__(self, p: CaffParams, ctx: Context):
        self.p, self.ctx = p, ctx
        t = ctx.training
        self.train = TrainSpec(local_steps=p.local_steps or t.local_steps, batch_size=t.batch_size,
                               lr=p.lr or t.lr, weight_decay=t.weight_decay, max_len=ctx.max_len)
        self.max_share = max((prof.cpu_share for prof in ctx.profiles.values()), default=None)
        self._costs: dict[int, object] = {}

    def plan(self, n: int, train: TrainSpec | None = None) -> Plan:
        L = self.ctx.num_blocks
        return Plan("full", tuple(range(L - n, L)), train_embeddings=self.p.train_embeddings, train=train or self.train)

    def cost(self, n: int):
        if n not in self._costs:
            self._costs[n] = self.ctx.cost(self.plan(n))
        return self._costs[n]

    def fraction(self, profile) -> float:
        if self.p.budgets is not None:
            if profile.name not in self.p.budgets:
                raise ValueError(f"caff: no budget for profile {profile.name!r}; budgets: {self.p.budgets}")
            return float(self.p.budgets[profile.name])
        return profile.cpu_share / (self.max_share or profile.cpu_share)

    def _scaled(self, b: float, value) -> float:
        """A budget b of the quantity `value(n)`: over the trainable range, or of full training."""
        full, head = value(self.cost(self.ctx.num_blocks)), value(self.cost(0))
        return head + b * (full - head) if self.p.budget_basis == "trainable" else b * full

    def blocks_for(self, profile, upload_factor: float) -> int:
        """n_i: the most final blocks whose memory, FLOPs and upload fit the budgets (-1: none)."""
        b, tol = self.fraction(profile), 1 + self.p.margin
        flops = self._scaled(b, lambda c: c.flops_per_round)
        if self.p.memory == "budget":
            mem, used = self._scaled(b, analytic_mb), analytic_mb
        else:  # the device's own memory, the whole process included
            mem, used = profile.memory_mb, (lambda c: c.peak_memory_mb)
        up = upload_factor * self.cost(self.ctx.num_blocks).upload_bytes
        fitting = [n for n in range(self.ctx.num_blocks + 1)
                   if used(c := self.cost(n)) <= mem * tol and c.flops_per_round <= flops * tol
                   and c.upload_bytes <= up * tol]
        return max(fitting, default=-1)

    def upload_factor(self, node: str, b: float, rnd: int) -> float:
        """u_i, drawn from a generator seeded by a stable hash (never the same for two names)."""
        if b >= 1 and self.p.upload_for == "constrained":
            return 1.0
        key = f"{self.ctx.seed}/{node}" + (f"/{rnd}" if self.p.upload_draw == "round" else "")
        seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
        return float(np.random.default_rng(seed).uniform(*self.p.upload_factor))

    def infeasible(self) -> list[str]:
        """Every profile of the scenario for which not even the head fits its budgets (at the
        smallest upload factor a device of it can draw)."""
        out = []
        for prof in {p.name: p for p in self.ctx.profiles.values()}.values():
            b = self.fraction(prof)
            u = 1.0 if b >= 1 and self.p.upload_for == "constrained" else self.p.upload_factor[0]
            if self.blocks_for(prof, u) < 0:
                head = self.cost(0)
                out.append(f"profile {prof.name} (budget {b:g}): the head alone needs {head.flops_per_round / 1e9:.1f} "
                           f"GFLOP, {analytic_mb(head):.0f} MB; its budget allows "
                           f"{self._scaled(b, lambda c: c.flops_per_round) / 1e9:.1f} GFLOP, "
                           f"{self._scaled(b, analytic_mb):.0f} MB (budget_basis {self.p.budget_basis}, "
                           f"memory {self.p.memory})")
        return out


class Caff(Strategy):
    name = "caff"
    Params = CaffParams

    def __init__(self, params: dict, ctx):
        super().__init__(params, ctx)
        self.budgets = Budgets(self.p, ctx)

    def plan_for(self, n: int, rnd: int = 0, index: int = 0) -> Plan:
        return self.budgets.plan(n, self.train_spec(rnd, index))

    def global_plan(self) -> Plan:
        return self.plan_for(self.ctx.num_blocks)

    def cost(self, n: int):
        return self.budgets.cost(n)

    def configure(self, rnd: int, nodes: list[NodeInfo], state: State) -> dict[str, Task]:
        tasks = {}
        for i, n in enumerate(nodes):
            b = self.budgets.fraction(n.profile)
            u = self.budgets.upload_factor(n.name, b, rnd)
            k = self.budgets.blocks_for(n.profile, u)
            plan = self.plan_for(max(k, 0), rnd, i)  # nothing fits: the head, recorded as over budget
            tasks[n.name] = Task(plan, blocks_of(state, plan.blocks),
                                 {"caff_blocks": max(k, 0), "caff_over_budget": k < 0, "caff_budget": round(b, 4),
                                  "caff_upload_factor": round(u, 4)})
        return tasks

    def aggregate(self, rnd: int, updates: list[Update], state: State) -> tuple[State, dict]:
        if self.p.aggregation != "damped":
            return weighted_average(updates, state, equal=self.p.aggregation == "mean"), {}
        mean = weighted_average(updates, state, equal=True)
        new = dict(state)
        for name, v in mean.items():
            r = sum(name in u.tensors for u in updates) / len(updates) if updates else 0.0
            if r > 0:
                new[name] = (r * v.astype(np.float64) + (1 - r) * state[name].astype(np.float64)).astype(state[name].dtype)
        return new, {}
