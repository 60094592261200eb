"""FedAdapter: bottleneck adapters in every chosen block of every node, FedAvg of the adapters.

The adapter baseline CAFF compares against (CAFF, https://arxiv.org/abs/2411.07826, compares
with LoRA and adapter fine-tuning). peft has no bottleneck adapter, so the node's trainer adds
them itself (`node/adapters.py`, plan method `adapter`).

From the papers:
- Houlsby et al. 2019 (https://arxiv.org/abs/1902.00751): two adapters per block, after the
  attention output projection and after the feed-forward output projection, before the
  residual and LayerNorm; down-projection, nonlinearity, up-projection, a skip connection;
  near-identity initialisation; the LayerNorms train too (`train_layer_norm`).
- Pfeiffer et al. 2021 (https://arxiv.org/abs/2005.00247): one adapter per block, after the
  feed-forward (`kind: pfeiffer`).

Reconstructed (each a parameter):
- `size`: the bottleneck width; default hidden / 16 (the reduction factor AdapterHub uses for
  both kinds; 24 for MiniLM's 384).
- `activation`: default gelu for Houlsby (the authors' code), relu for Pfeiffer (AdapterHub's
  configuration).
- `init_std`: both projections normal(0, 1e-3) with zero biases (the authors' code draws a
  truncated normal of that scale).
- Pfeiffer's adapter sits here where Houlsby's second one does (on the projection's output,
  before the residual); AdapterHub's Pfeiffer configuration takes the adapter's input after
  the block's LayerNorm instead.
- `weighting`: FedAvg by samples (`samples`, as the other baselines) or the plain mean.
The task head: the classifier trains and crosses the network as in the LoRA baselines
(`pooler: true` adds the BERT pooler).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Literal

from pydantic import Field, ValidationInfo, model_validator

from node.arch import LayoutError, adapter_sites, hidden_size
from node.plan import AdapterSpec, Plan

from .base import HeadParams, NodeInfo, State, Strategy, Task, Update, context, weighted_average

DEFAULT_ACTIVATION = {"houlsby": "gelu", "pfeiffer": "relu"}


class FedAdapterParams(HeadParams):
    kind: Literal["houlsby", "pfeiffer"] = "houlsby"
    size: int | None = Field(None, ge=1, description="bottleneck width; default hidden size / 16")
    activation: Literal["relu", "gelu", "silu"] | None = Field(
        None, description="default gelu for houlsby, relu for pfeiffer")
    init_std: float = Field(1e-3, gt=0)
    train_layer_norm: bool | None = Field(None, description="train the adapted sublayers' LayerNorms; "
                                          "default true for houlsby (the paper), false for pfeiffer")
    last_blocks: int | None = Field(None, ge=1, description="adapters in the last n blocks only; None = all")
    weighting: Literal["samples", "mean"] = "samples"

    @model_validator(mode="after")
    def _norms_where_the_block_has_them(self, info: ValidationInfo):
        """train_layer_norm needs a LayerNorm beside each adapted projection, as in BERT's
        post-norm sublayers; pre-norm families (Llama, GPT-2) have none there, so Houlsby's
        default is false on them."""
        ctx = context(info)
        if ctx is None or not ctx.block_projections:
            return self
        try:
            sites = adapter_sites(ctx.block_projections, self.kind)
        except LayoutError as exc:
            raise ValueError(f"kind: {exc}") from None
        norms = all(f"{holder}.LayerNorm" in ctx.block_modules for holder, _ in sites)
        if self.train_layer_norm and not norms:
            raise ValueError(f"train_layer_norm: the adapted sublayers ({', '.join(f'{h}.{p}' for h, p in sites)}) "
                             "have no LayerNorm of their own in this model's blocks (pre-norm); allowed: false")
        if self.train_layer_norm is None and not norms:  # (None stays: resolved as before on BERT)
            self.train_layer_norm = False
        return self


class FedAdapter(Strategy):
    name = "fedadapter"
    reads_block_layout = True
    Params = FedAdapterParams

    def adapter_spec(self) -> AdapterSpec:
        p = self.p
        hidden = hidden_size(self.ctx.model_config)
        norms = p.kind == "houlsby" if p.train_layer_norm is None else p.train_layer_norm
        return AdapterSpec(size=p.size or max(1, hidden // 16), kind=p.kind,
                           activation=p.activation or DEFAULT_ACTIVATION[p.kind], init_std=p.init_std,
                           train_layer_norm=norms)

    def global_plan(self) -> Plan:
        n = self.ctx.num_blocks
        k = min(self.p.last_blocks or n, n)
        return Plan("adapter", tuple(range(n - k, n)), head=self.head(), adapter=self.adapter_spec(),
                    train=self.train_spec(0))

    def configure(self, rnd: int, nodes: list[NodeInfo], state: State) -> dict[str, Task]:
        plan = self.global_plan()
        return {n.name: Task(replace(plan, train=self.train_spec(rnd, i)), state) for i, n in enumerate(nodes)}

    def aggregate(self, rnd: int, updates: list[Update], state: State) -> tuple[State, dict]:
        return weighted_average(updates, state, equal=self.p.weighting == "mean"), {}

