"""LEGEND (Liu et al., arXiv 2412.20004): LoRA depth and rank distribution per device.

Known (paper abstract and public summaries; docs/strategies.md):
- LoRA only on the top d_i blocks of device i ("LoRA depth", counted from the output), with
  per-block ranks that grow toward the output ("rank distribution");
- the server configures each device from its capabilities with a greedy algorithm so that
  devices finish a round together, and aggregates layer by layer.

Reconstructed here (the paper's text was not available; every choice is a parameter):
- round-time model of device i at depth d: t_i(d) = FLOPs(d) / speed_i + bytes(d) x 8 / bw_i,
  with FLOPs and bytes from `testbed.costmodel` (forward of all blocks + backward of the top d)
  and speed_i (FLOP/s), bw_i (bit/s, up and down) estimated from what the device reported in
  earlier rounds (exponential moving average, weight `ema`), in emulated seconds;
- a first calibration: a device with no history trains at `calibration_depth` (default: all
  blocks, memory permitting) so its speed is measured on the largest plan;
- deadline T (`deadline`): `straggler` (default) - the unavoidable straggler bound, the
  largest predicted time at `min_depth` among the sampled devices with history: no round can
  end sooner than its slowest device at the shallowest plan, so every faster device gets the
  deepest LoRA it can finish by then and the devices finish together; `fastest_full` - the
  fastest device's predicted time at full depth (the forward pass through all blocks is a
  fixed cost, so every device more than ~1.75x slower than the fastest falls to min_depth);
  `quantile` - a quantile (`deadline_quantile`) of the devices' full-depth times;
- greedy: for each device, the largest d in [min_depth, L] whose predicted time is <= T and
  whose predicted peak memory (cost model) fits the profile's memory; a device that cannot
  meet T even at min_depth trains at min_depth;
- the rank distribution: `rank_distribution` is the global (largest) rank of each block,
  doubling every two blocks toward the output by default (2,2,4,4,8,8 on 6 blocks); with
  `rank_scaling: capability` (default) device i trains block b at rank
  max(rank_min, floor(c_i x r_b)), c_i = min(speed_i / the fastest sampled device's speed,
  link_i / the best sampled link), link = the harmonic mean of a device's up- and downlink
  rates (1 for a device with no history): a rank budget from the device's capability, spread
  over its depth so that it grows toward the output, and chosen jointly with the depth (the
  greedy prices each depth with the device's ranks); `rank_scaling: none` gives every device
  the global ranks; alpha = alpha_per_rank x r on every block and device, so a device's
  leading rank slices mean the same on every device;
- aggregation, per layer: each LoRA module zero-padded to its global rank (`padding: zeros`,
  or `slice`: each rank slice over the devices that trained it), weighted by sample count;
  a device receives the leading slices of the global modules (truncation); the head is
  averaged by sample count.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, ValidationInfo, model_validator

from node.plan import LoraSpec, Plan, block_of

from .base import LoraParams, NodeInfo, State, Strategy, Task, Update, blocks_of, context, weighted_average
from .padded import is_lora, padded_average, truncate


class LegendParams(LoraParams):
    rank_distribution: list[int] | None = Field(None, description="rank of each block, input to output")
    alpha_per_rank: float = Field(2.0, gt=0)
    deadline: Literal["straggler", "fastest_full", "quantile"] = Field(
        "straggler", description="straggler: the slowest sampled device's time at min_depth")
    deadline_quantile: float = Field(0.5, ge=0, le=1)
    min_depth: int = Field(1, ge=1)
    calibration_depth: int | None = Field(None, ge=1, description="depth before a device has history; default all")
    ema: float = Field(0.5, gt=0, le=1, description="weight of the newest measurement in the estimates")
    rank_scaling: Literal["capability", "none"] = Field("capability", description="each device's ranks: the "
                                                        "global ones scaled by its capability, or the global ones")
    rank_min: int = Field(1, ge=1)
    padding: Literal["zeros", "slice"] = Field("zeros", description="heterogeneous ranks: zero-padding (zeros) "
                                               "or per rank slice over its trainers (slice)")

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> "LegendParams":
        if self.rank_distribution is not None and any(r < 1 for r in self.rank_distribution):
            raise ValueError("rank_distribution: entries must be >= 1")
        ctx = context(info)
        if ctx is None:
            return self
        L = ctx.num_blocks
        if self.rank_distribution is not None and len(self.rank_distribution) != L:
            raise ValueError(f"rank_distribution: {len(self.rank_distribution)} entries, but the model has {L} "
                             "blocks (one rank per block, input to output)")
        for name in ("min_depth", "calibration_depth"):
            if (getattr(self, name) or 0) > L:
                raise ValueError(f"{name}: {getattr(self, name)} exceeds the model's {L} blocks")
        return self


def default_ranks(num_blocks: int) -> list[int]:
    """2, 2, 4, 4, 8, 8 for 6 blocks: doubling every two blocks toward the output, capped at 8."""
    top = [8, 8, 4, 4, 2, 2]
    return [top[min(num_blocks - 1 - b, len(top) - 1)] for b in range(num_blocks)]


class Legend(Strategy):
    name = "legend"
    Params = LegendParams

    def __init__(self, params: dict, ctx):
        super().__init__(params, ctx)
        self.ranks = list(self.p.rank_distribution or default_ranks(ctx.num_blocks))
        self.speed: dict[str, float] = {}     # FLOP per emulated second
        self.bw_up: dict[str, float] = {}     # bit per emulated second
        self.bw_down: dict[str, float] = {}
        self.deadline_s: float | None = None  # the round time the last greedy aimed at
        self._costs: dict[tuple, object] = {}

    def state_dict(self) -> dict:
        return {"speed": dict(self.speed), "bw_up": dict(self.bw_up), "bw_down": dict(self.bw_down)}

    def load_state_dict(self, state: dict) -> None:
        for key in ("speed", "bw_up", "bw_down"):
            setattr(self, key, {str(n): float(v) for n, v in state.get(key, {}).items()})

    # -- plans -----------------------------------------------------------------------------
    def plan_for(self, depth: int, ranks: list[int] | None = None, rnd: int = 0, index: int = 0) -> Plan:
        """LoRA on the top `depth` blocks, block b at rank ranks[b] (default: the global ranks)."""
        L, k = self.ctx.num_blocks, self.p.alpha_per_rank
        ranks = self.ranks if ranks is None else ranks
        blocks = tuple(range(L - depth, L))
        top = max(ranks[b] for b in blocks)
        lora = LoraSpec(r=top, alpha=k * top, target_modules=tuple(self.p.target_modules),
                        rank_pattern={b: ranks[b] for b in blocks}, alpha_pattern={b: k * ranks[b] for b in blocks})
        return Plan("lora", blocks, head=self.head(), lora=lora, train=self.train_spec(rnd, index))

    def global_plan(self) -> Plan:
        return self.plan_for(self.ctx.num_blocks)

    def _cost(self, depth: int, ranks: list[int] | None = None):
        """Cost-model figures of LoRA at `depth` with `ranks` (the same for every round)."""
        key = (depth, tuple(self.ranks if ranks is None else ranks))
        if key not in self._costs:
            self._costs[key] = self.ctx.cost(self.plan_for(depth, ranks))
        return self._costs[key]

    def predict_s(self, node: str, depth: int, ranks: list[int] | None = None) -> float:
        c = self._cost(depth, ranks)
        return (c.flops_per_round / self.speed[node] + c.download_bytes * 8 / self.bw_down[node]
                + c.upload_bytes * 8 / self.bw_up[node])

    def _fits(self, info: NodeInfo, depth: int, ranks: list[int] | None = None) -> bool:
        return self._cost(depth, ranks).peak_memory_mb <= info.profile.memory_mb

    def _link(self, node: str) -> float:
        return 2 / (1 / self.bw_up[node] + 1 / self.bw_down[node])

    def device_ranks(self, node: str, known: list[str]) -> list[int]:
        """The device's rank of each block: the global ranks scaled by its capability c, the lower
        of its speed and its link relative to the best of the sampled devices with history."""
        if self.p.rank_scaling == "none" or node not in self.speed:
            return list(self.ranks)
        c = min(self.speed[node] / max(self.speed[n] for n in known),
                self._link(node) / max(self._link(n) for n in known))
        return [max(min(self.p.rank_min, r), int(c * r + 1e-9)) for r in self.ranks]

    def _deadline(self, names: list[str], ranks: dict[str, list[int]]) -> float:
        """T: the round time the greedy fits every device's depth to (emulated seconds)."""
        if self.p.deadline == "straggler":
            return max(self.predict_s(n, self.p.min_depth, ranks[n]) for n in names)
        full = [self.predict_s(n, self.ctx.num_blocks, ranks[n]) for n in names]
        return min(full) if self.p.deadline == "fastest_full" else float(np.quantile(full, self.p.deadline_quantile))

    def choose(self, nodes: list[NodeInfo]) -> dict[str, tuple[int, list[int]]]:
        """The greedy: per device, its ranks and the deepest LoRA that meets the deadline and its memory."""
        L, lo = self.ctx.num_blocks, self.p.min_depth
        known = [n.name for n in nodes if n.name in self.speed]
        ranks = {n.name: self.device_ranks(n.name, known) for n in nodes}
        self.deadline_s = deadline = self._deadline(known, ranks) if known else None
        out: dict[str, tuple[int, list[int]]] = {}
        for n in nodes:
            r = ranks[n.name]
            if n.name not in self.speed:  # calibration: measure on the deepest plan that fits
                d = self.p.calibration_depth or L
                while d > lo and not self._fits(n, d, r):
                    d -= 1
            else:
                d = next((cand for cand in range(L, lo - 1, -1)
                          if self.predict_s(n.name, cand, r) <= deadline * (1 + 1e-9) and self._fits(n, cand, r)), lo)
            out[n.name] = (min(L, max(lo, d)), r)
        return out

    def configure(self, rnd: int, nodes: list[NodeInfo], state: State) -> dict[str, Task]:
        chosen = self.choose(nodes)
        tasks = {}
        for i, n in enumerate(nodes):
            depth, ranks = chosen[n.name]
            plan = self.plan_for(depth, ranks, rnd, i)
            pattern = dict(plan.lora.rank_pattern)
            tensors = {k: truncate(k, v, pattern[block_of(k)]) if is_lora(k) else v
                       for k, v in blocks_of(state, plan.blocks).items()}
            tasks[n.name] = Task(plan, tensors, {"legend_depth": depth,
                                                 "legend_ranks": [pattern[b] for b in plan.blocks]})
        return tasks

    # -- learning from the round -----------------------------------------------------------
    def observe(self, u: Update) -> None:
        m, a = u.metrics, self.p.ema
        ranks = list(self.ranks)
        for b, r in u.plan.lora.rank_pattern:
            ranks[b] = r
        c = self._cost(len(u.plan.blocks), ranks)  # the plan the device trained
        samples = {}
        if m.get("compute_s", 0) > 0:
            samples["speed"] = c.flops_per_round / m["compute_s"]
        if m.get("upload_s", 0) > 0 and m.get("bytes_up", 0) > 0:
            samples["up"] = m["bytes_up"] * 8 / m["upload_s"]
        if m.get("download_s", 0) > 0 and m.get("bytes_down", 0) > 0:
            samples["down"] = m["bytes_down"] * 8 / m["download_s"]
        for key, table in (("speed", self.speed), ("up", self.bw_up), ("down", self.bw_down)):
            if key in samples:
                old = table.get(u.node)
                table[u.node] = samples[key] if old is None else (1 - a) * old + a * samples[key]
        # a device measured for compute but not for a link (instant link): treat that link as very fast
        if u.node in self.speed:
            self.bw_up.setdefault(u.node, 1e12)
            self.bw_down.setdefault(u.node, 1e12)

    def aggregate(self, rnd: int, updates: list[Update], state: State) -> tuple[State, dict]:
        for u in updates:
            self.observe(u)
        samples = lambda m, holders, pairs: np.array([u.num_samples for u in holders], dtype=np.float64)  # noqa: E731
        new = padded_average(updates, state, samples, self.p.padding, "legend")
        new.update(weighted_average(updates, {k: v for k, v in state.items() if not is_lora(k)}))
        return new, {"deadline_s": self.deadline_s}
