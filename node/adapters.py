"""Bottleneck adapters (Houlsby et al. 2019, https://arxiv.org/abs/1902.00751; Pfeiffer et al.
2021, https://arxiv.org/abs/2005.00247) for the blocks of any family, in plain torch.

peft has no bottleneck adapter, and the `adapters` library pins an older transformers, so the
trainer adds them itself: an adapter is a child module `adapter` of the module that holds a
sublayer's output projection (BERT: BertSelfOutput and BertOutput, projection `dense`; Llama:
the attention and the MLP, projections o_proj and down_proj; node.arch.sublayer_outputs) and
acts, through a forward hook, on the output y of that projection: y + up(act(down(y))), before
the sublayer's dropout, residual and LayerNorm (Houlsby's position). Its parameters are then
named `<blocks>.<b>.<holder>.adapter.{down,up}.{weight,bias}` (BERT:
`bert.encoder.layer.<b>.attention.output.adapter...`), the names that cross the network; the
base model's names do not change.
"""
from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class Bottleneck(nn.Module):
    """y -> y + up(act(down(y))), d -> size -> d."""

    def __init__(self, d: int, size: int, activation: str = "relu", init_std: float = 1e-3):
        super().__init__()
        self.down = nn.Linear(d, size)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(size, d)
        with torch.no_grad():  # near the identity: small weights, zero biases
            for lin in (self.down, self.up):
                lin.weight.normal_(0.0, init_std)
                lin.bias.zero_()

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.up(self.act(self.down(y)))

    def attach(self, holder: nn.Module, projection: str = "dense") -> None:
        """Become `holder.adapter`, applied to the output of `holder.<projection>`."""
        holder.adapter = self
        getattr(holder, projection).register_forward_hook(self._after_projection)

    def _after_projection(self, module, args, output):
        return self(output)
