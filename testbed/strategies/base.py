"""The strategy interface: configure a round (a plan and start tensors per node), aggregate it.

Like Flower's Strategy, nothing else: `configure` gives each sampled node a `Task`,
`aggregate` gives the next global state and the round's metrics. A strategy owns both halves
so that the node only ever executes plans (`node.plan.Plan`): adding a strategy never touches
`node/`. What a strategy learns between rounds is checkpointed through `state_dict()` /
`load_state_dict()`, plain data only, so `run --resume` never depends on the class's layout.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator

from node.plan import HeadSpec, Plan, TrainSpec, block_of

State = dict[str, np.ndarray]


class Params(BaseModel):
    """Per-strategy parameters from the scenario; subclasses add fields. Unknown keys are errors.

    Checks that need the scenario (its profiles, the model's block count) read the `Context`
    passed as pydantic's validation context (`context(info)`); `testbed validate` runs them."""
    model_config = ConfigDict(extra="forbid")
    lr: float | None = Field(None, gt=0, description="overrides training.lr for this strategy")
    local_steps: int | None = Field(None, ge=1, description="overrides training.local_steps")


class HeadParams(Params):
    """Parameters of a strategy that trains LoRA adapters and the task head."""
    pooler: bool = Field(False, description="train and send the BERT pooler with the classifier (peft's "
                         "sequence-classification task saves the classifier alone)")

    def head(self) -> HeadSpec:
        return HeadSpec(train=True, pooler=self.pooler)


class LoraParams(HeadParams):
    """Parameters of a strategy that trains LoRA adapters: by default on peft's target modules
    for the model's architecture (BERT: query and value)."""
    target_modules: list[str] | None = Field(None, min_length=1, description="the modules LoRA adapts; default "
                                             "peft's for the model's architecture")

    @model_validator(mode="after")
    def _peft_targets(self, info: ValidationInfo):
        if self.target_modules is None:
            from node.arch import LayoutError, default_lora_targets
            ctx = context(info)
            config = ctx.model_config if ctx is not None and ctx.model_config is not None else {}
            kind = (config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)) or "bert"
            try:
                self.target_modules = list(default_lora_targets(kind))
            except LayoutError as exc:
                raise ValueError(f"target_modules: {exc}") from None
        return self


def context(info: ValidationInfo) -> "Context | None":
    """The run's Context inside a Params validator (None when validated without one)."""
    ctx = info.context
    return ctx if isinstance(ctx, Context) else None


def check_profile_keys(keys, ctx: "Context", what: str, every: bool = False) -> None:
    """Per-profile keys must name profiles of this scenario (built in or under profiles:), and
    with `every`, cover each profile a device of the run can have (faults may switch one)."""
    unknown = sorted(set(keys) - set(ctx.known_profiles))
    if unknown:
        raise ValueError(f"{what}: unknown profile(s) {unknown}; allowed: {', '.join(sorted(ctx.known_profiles))}")
    missing = sorted(set(ctx.profile_names) - set(keys)) if every else []
    if missing:
        raise ValueError(f"{what}: no entry for profile(s) {missing} that devices of this scenario have")


@dataclass(frozen=True)
class NodeInfo:
    name: str
    profile: Any          # emulation.profiles.Profile
    num_samples: int


@dataclass(frozen=True)
class Task:
    """What one node gets in one round: the plan, the tensors it starts from, and what the
    strategy chose for it (recorded beside the plan in rounds.jsonl)."""
    plan: Plan
    tensors: State
    choices: dict[str, Any] = field(default_factory=dict)


@dataclass
class Update:
    """One node's result; `metrics` holds its report plus what the aggregator measured (emulated seconds)."""
    node: str
    plan: Plan | None
    tensors: State
    num_samples: int
    metrics: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Context:
    """What a strategy may know about the run: training settings, the model's size, the devices."""
    training: Any         # testbed.scenario.TrainingConfig
    max_len: int
    num_blocks: int
    seed: int
    model_config: Any = None  # the model's config (a dict or HF config; costmodel.Arch reads its sizes)
    profiles: dict = field(default_factory=dict)  # every node of the scenario -> its Profile
    known_profiles: tuple[str, ...] = ()   # profile names per-profile parameters may use
    profile_names: frozenset = frozenset()  # every profile a device of the run can have
    task: str = "classification"  # or causal_lm: the LM head (often tied to the embeddings) stays frozen
    cost_of: Any = None  # plan -> costmodel.Cost for a model the analytic walk does not know (costmeasure.Measured)
    block_projections: tuple[str, ...] = ()  # paths of the linear modules inside one block (unknown: empty)
    block_modules: tuple[str, ...] = ()      # paths of every module inside one block (unknown: empty)

    def __post_init__(self):
        from emulation.profiles import PROFILES
        names = {p.name for p in self.profiles.values()} | set(self.profile_names)
        object.__setattr__(self, "profile_names", frozenset(names))
        object.__setattr__(self, "known_profiles", tuple(sorted({*PROFILES, *self.known_profiles, *names})))

    def cost(self, plan: Plan):
        """One round of `plan` on one device (testbed.costmodel.Cost): the analytic walk of a BERT
        encoder, or the plan measured on the model itself for another family."""
        if self.cost_of is not None:
            return self.cost_of(plan)
        from ..costmodel import Arch, estimate
        return estimate(Arch.from_config(self.model_config), plan)


class Strategy(ABC):
    name: ClassVar[str]
    Params: ClassVar[type[Params]] = Params
    # whether it reads Context.block_projections / block_modules, which need the model built (on
    # the meta device: torch and transformers imported, about 3 s of `testbed validate`)
    reads_block_layout: ClassVar[bool] = False

    def __init__(self, params: dict, ctx: Context):
        self.p = self.Params.model_validate(params, context=ctx)
        self.ctx = ctx

    def head(self) -> HeadSpec:
        """The task head a LoRA-family plan trains: the parameters' choice, or none for a causal
        LM, whose head is the vocabulary projection (tied to the embeddings in many models)."""
        if self.ctx.task == "causal_lm":
            return HeadSpec(train=False)
        return self.p.head()

    # -- the two halves --------------------------------------------------------------------
    @abstractmethod
    def global_plan(self) -> Plan:
        """The plan whose trainable tensors make up the global state (also used to evaluate it)."""

    @abstractmethod
    def configure(self, rnd: int, nodes: list[NodeInfo], state: State) -> dict[str, Task]:
        """For each sampled node: its task."""

    @abstractmethod
    def aggregate(self, rnd: int, updates: list[Update], state: State) -> tuple[State, dict]:
        """The next global state from this round's updates, and the round's metrics."""

    # -- what it learnt, for checkpoints -----------------------------------------------------
    def state_dict(self) -> dict:
        """What this strategy learnt so far, as plain data (str keys, numbers, lists, dicts)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict()` (of a checkpoint)."""

    # -- shared pieces ---------------------------------------------------------------------
    def train_spec(self, rnd: int, node_index: int = 0) -> TrainSpec:
        t = self.ctx.training
        return TrainSpec(local_steps=self.p.local_steps or t.local_steps, batch_size=t.batch_size,
                         lr=self.p.lr or t.lr, weight_decay=t.weight_decay, max_len=self.ctx.max_len,
                         seed=self.ctx.seed * 1_000_003 + rnd * 1009 + node_index)


def blocks_of(state: State, blocks) -> State:
    """The tensors of `state` a node training `blocks` starts from: theirs and the head's."""
    keep = set(blocks)
    return {k: v for k, v in state.items() if block_of(k) is None or block_of(k) in keep}


def weighted_average(updates: list[Update], state: State, equal: bool = False) -> State:
    """Each tensor averaged over the updates that carry it, weighted by their sample counts
    (`equal`: a plain mean over them).

    A tensor no update carries keeps its current value. This one rule is FedAvg when every
    node trains everything, and per-layer averaging when nodes train different blocks.
    """
    new = dict(state)
    for name in state:
        holders = [u for u in updates if name in u.tensors]
        if not holders:
            continue
        w = np.array([1.0 if equal else u.num_samples for u in holders], dtype=np.float64)
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
