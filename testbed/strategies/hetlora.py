"""HetLoRA (Cho et al., EMNLP 2024, arXiv 2401.06432): a LoRA rank per device.

From the paper (its abstract and its Figure 2; docs/strategies.md):
- every device trains LoRA with its own rank r_i <= r_max, chosen from its capability;
- the server keeps global LoRA modules of rank r_max; a device with rank r_i receives the
  leading slices A[:r_i, :] and B[:, :r_i] ("distribution via truncation");
- the server zero-pads each returned A_i, B_i back to r_max and aggregates them
  ("sparsity-weighted": each device's modules weighted by the Frobenius norm of its
  reconstructed update B_i A_i, normalised over the devices);
- devices may shrink their rank during local training ("rank self-pruning": a penalty on the
  norm of the last ranks, which are dropped by a decay factor gamma when that norm is small).

Reconstructed here (every choice is a parameter):
- rank of a device: `ranks` maps a profile name (built in or defined by the scenario) to a
  rank; other devices get
  rank_max x min(1, cpu_share / full_rank_share), rounded DOWN to the allowed set
  (`round_to: pow2` = powers of two, plus rank_min and rank_max; `int` = any integer),
  and at least rank_min. `full_rank_share: all` means the strongest device of the scenario.
- scaling alpha = alpha_per_rank x r on every device and in the global model. peft scales a
  LoRA update by alpha / r; with a fixed alpha a rank-2 device would multiply its slices by a
  factor r_max / 2 larger than a rank-r_max device, so the same global slice would mean a
  different weight change on each device and aggregation would average incompatible things.
  With alpha proportional to r the scaling is alpha_per_rank everywhere: a device with rank
  r_i uses exactly the leading r_i terms of the global update alpha_per_rank x B A.
- aggregation: the default is the paper's sparsity-weighted zero-padding (`weighting: norm`,
  `padding: zeros`, `norm_scope: device`); the other settings are named variants:
  * `weighting`: `norm` (the paper: device i weighs ||Delta W_i||_F, the Frobenius norm of its
    reconstructed update B_i A_i, normalised over the round's devices) or `samples` (each
    device weighted by its sample count, as FedAvg);
  * `norm_scope`: `device` - one weight per device, the norm of its whole update (every LoRA
    module m stacked: sqrt(sum_m ||B_m A_m||_F^2), the paper's Delta W_i for a model of many
    modules); `module` - a weight per LoRA module (each target of every block) from that
    module's ||B_m A_m||_F;
  * `padding`: `zeros` - the paper's zero-padding: every rank slice is divided by the total
    weight of all devices that sent the module, a low-rank device's zero pad included;
    `slice` - rank slice j (row j of A, column j of B) is averaged over the devices that
    trained it (rank > j), so a zero pad does not shrink the slices a device never saw.
  In both, a slice that no device of the round trained keeps its value (the literal formula
  would reset it to zero whenever no high-rank device is sampled, erasing what they learnt).
  The task head (the classifier, `pooler: true` adds the pooler; not in the paper) is
  averaged by sample count.
- self-pruning (`self_prune`), on the device as in the paper: with k = the allowed rank at or
  below prune_decay x r_i, the plan of a device whose rank can still shrink (k < r_i) carries
  `rank_penalty: {keep: k, weight: prune_penalty}`, so its local loss adds
  prune_penalty x sum_m ||B_m[:, k:] A_m[k:, :]||_F over its LoRA modules m, and the device
  reports tail_share = sum_m ||B_m[:, k:] A_m[k:, :]||_F / sum_m ||B_m A_m||_F of what it
  trained. Below `prune_threshold` the device's rank becomes k from its next round on. A
  result without a (finite, >= 0) tail_share is measured the same way by the server on the
  returned tensors. Ranks only shrink, never below rank_min.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Literal

import numpy as np
from pydantic import Field, ValidationInfo, model_validator

from node.plan import LoraSpec, Plan, RankPenalty

from .base import (LoraParams, NodeInfo, State, Strategy, Task, Update, check_profile_keys, context,
                   weighted_average)
from .padded import A, is_lora, module_of, padded_average, pair, truncate

class HetLoRAParams(LoraParams):
    ranks: dict[str, int] = Field(default_factory=dict, description="profile name -> rank; others use the rule")
    rank_min: int = Field(2, ge=1, le=384)
    rank_max: int = Field(16, ge=1, le=384, description="rank of the global modules (r_max)")
    round_to: Literal["pow2", "int"] = "pow2"
    full_rank_share: float | Literal["all"] = Field(
        1.0, description="cpu_share that earns rank_max; 'all' = the strongest device of the scenario")
    alpha_per_rank: float = Field(2.0, gt=0, description="alpha = alpha_per_rank x r on every device")
    dropout: float = Field(0.0, ge=0, lt=1)
    weighting: Literal["norm", "samples"] = Field("norm", description="norm: the paper's ||B A||_F weights")
    norm_scope: Literal["device", "module"] = Field("device", description="one norm weight per device (its "
                                                    "whole update) or per LoRA module")
    padding: Literal["zeros", "slice"] = Field("zeros", description="zeros: the paper's zero-padding")
    self_prune: bool = False
    prune_decay: float = Field(0.5, gt=0, lt=1, description="gamma: a pruned rank r becomes ~gamma x r")
    prune_threshold: float = Field(0.05, gt=0, lt=1, description="prune when the last ranks carry less "
                                                                "than this share of the update norm")
    prune_penalty: float = Field(0.01, ge=0, description="weight of the device's local penalty on the norm "
                                                         "of its last ranks (self_prune only)")

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> "HetLoRAParams":
        if self.rank_min > self.rank_max:
            raise ValueError(f"rank_min: {self.rank_min} > rank_max {self.rank_max}")
        ctx = context(info)
        if ctx is not None:
            check_profile_keys(self.ranks, ctx, "ranks")
        for prof, r in self.ranks.items():
            if not 1 <= r <= self.rank_max:
                raise ValueError(f"ranks: {prof} has rank {r}, outside 1..rank_max ({self.rank_max}); "
                                 "raise rank_max to use larger ranks")
        if not isinstance(self.full_rank_share, str) and self.full_rank_share <= 0:
            raise ValueError("full_rank_share: must be > 0 or 'all'")
        return self


class HetLoRA(Strategy):
    name = "hetlora"
    Params = HetLoRAParams

    def __init__(self, params: dict, ctx):
        super().__init__(params, ctx)
        self.prune_cap: dict[str, int] = {}              # node -> rank after self-pruning

    def state_dict(self) -> dict:
        return {"prune_cap": dict(self.prune_cap)}

    def load_state_dict(self, state: dict) -> None:
        self.prune_cap = {str(k): int(v) for k, v in state.get("prune_cap", {}).items()}

    # -- ranks -----------------------------------------------------------------------------
    @property
    def r_max(self) -> int:
        return self.p.rank_max

    def allowed_ranks(self) -> list[int]:
        lo, hi = self.p.rank_min, self.p.rank_max
        if self.p.round_to == "int":
            return list(range(lo, hi + 1))
        pows = {2 ** k for k in range(0, 10) if lo <= 2 ** k <= hi}
        return sorted(pows | {lo, hi})

    def _floor_allowed(self, x: float) -> int:
        """The largest allowed rank <= x (rank_min when none is)."""
        ok = [r for r in self.allowed_ranks() if r <= x + 1e-9]
        return ok[-1] if ok else self.p.rank_min

    def _full_share(self) -> float:
        if self.p.full_rank_share == "all":
            shares = [prof.cpu_share for prof in (self.ctx.profiles or {}).values()]
            if not shares:
                raise ValueError("hetlora: full_rank_share 'all' needs the scenario's profiles in the context")
            return max(shares)
        return float(self.p.full_rank_share)

    def profile_rank(self, profile) -> int:
        """The rank a device's profile earns (before self-pruning)."""
        if profile.name in self.p.ranks:
            return self.p.ranks[profile.name]
        share = min(1.0, max(0.0, float(profile.cpu_share)) / self._full_share())
        return self._floor_allowed(self.p.rank_max * share)

    def rank_of(self, node: NodeInfo) -> int:
        r = self.profile_rank(node.profile)
        return min(r, self.prune_cap.get(node.name, r))

    def prune_keep(self, r: int) -> int:
        """The rank a device of rank r would be pruned to (>= r: it cannot shrink)."""
        return self._floor_allowed(math.floor(self.p.prune_decay * r))

    # -- plans -----------------------------------------------------------------------------
    def plan_for(self, r: int, rnd: int = 0, index: int = 0) -> Plan:
        p = self.p
        lora = LoraSpec(r=int(r), alpha=p.alpha_per_rank * r, dropout=p.dropout, target_modules=tuple(p.target_modules))
        return Plan("lora", tuple(range(self.ctx.num_blocks)), head=self.head(), lora=lora, train=self.train_spec(rnd, index))

    def global_plan(self) -> Plan:
        return self.plan_for(self.r_max)

    def configure(self, rnd: int, nodes: list[NodeInfo], state: State) -> dict[str, Task]:
        tasks = {}
        for i, n in enumerate(nodes):
            r = self.rank_of(n)
            tensors = {k: truncate(k, v, r) for k, v in state.items()}
            plan = self.plan_for(r, rnd, i)
            keep = self.prune_keep(r)
            if self.p.self_prune and keep < r:
                plan = replace(plan, rank_penalty=RankPenalty(keep=keep, weight=self.p.prune_penalty))
            tasks[n.name] = Task(plan, tensors, {"hetlora_rank": r})
        return tasks

    # -- aggregation -----------------------------------------------------------------------
    def _pairs(self, u: Update, module: str) -> tuple[np.ndarray, np.ndarray]:
        return pair(u, module, self.r_max, "hetlora")

    def device_norm(self, u: Update) -> float:
        """||Delta W_u||_F of a whole update: sqrt(sum_m ||B_m A_m||_F^2) over its LoRA modules."""
        return math.sqrt(sum(float(np.linalg.norm(b @ a)) ** 2 for a, b in
                             (self._pairs(u, m) for m in sorted({module_of(k) for k in u.tensors if is_lora(k)}))))

    def aggregate(self, rnd: int, updates: list[Update], state: State) -> tuple[State, dict]:
        per_device = ({u.node: self.device_norm(u) for u in updates}
                      if self.p.weighting == "norm" and self.p.norm_scope == "device" else {})

        def weights(module, holders, pairs) -> np.ndarray:
            if self.p.weighting == "samples":
                return np.array([u.num_samples for u in holders], dtype=np.float64)
            if self.p.norm_scope == "device":
                return np.array([per_device[u.node] for u in holders])
            return np.array([np.linalg.norm(b @ a) for a, b in pairs])

        new = padded_average(updates, state, weights, self.p.padding, "hetlora")
        new.update(weighted_average(updates, {k: v for k, v in state.items() if not is_lora(k)}))  # head: samples
        total = sum(per_device.values())
        metrics = {"norm_weights": {n: v / total for n, v in sorted(per_device.items())}} if total > 0 else {}
        if not self.p.self_prune:
            return new, metrics
        for u in updates:
            self._maybe_prune(u)
        return new, {**metrics, "rank_caps": dict(sorted(self.prune_cap.items()))}

    def tail_share(self, u: Update, keep: int) -> float:
        """Share of u's LoRA update norm in its rank slices keep.. (summed over its modules)."""
        tail = total = 0.0
        for m in sorted({module_of(k) for k in u.tensors if is_lora(k)}):
            a, b = self._pairs(u, m)
            total += float(np.linalg.norm(b @ a))
            tail += float(np.linalg.norm(b[:, keep:] @ a[keep:, :]))
        return tail / total if total > 0 else 0.0

    def _maybe_prune(self, u: Update) -> None:
        ranks = [v.shape[0] for k, v in u.tensors.items() if k.endswith(A)]
        if not ranks:
            return
        r = max(ranks)
        keep = self.prune_keep(r)
        if keep >= r:
            return
        share = u.metrics.get("tail_share")  # the device's own measure; metrics are untrusted input
        if not (isinstance(share, (int, float)) and not isinstance(share, bool) and math.isfinite(share)
                and share >= 0):
            share = self.tail_share(u, keep)
        if share < self.p.prune_threshold:
            self.prune_cap[u.node] = min(keep, self.prune_cap.get(u.node, keep))
