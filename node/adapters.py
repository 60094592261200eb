"""Bottleneck adapters (Houlsby et al. 2019, https://arxiv.org/abs/1902.00751; Pfeiffer et al.
2021, https://arxiv.org/abs/2005.00247) for BERT-style blocks, in plain torch.

peft has no bottleneck adapter, and the `adapters` library pins an older transformers, so the
trainer adds them itself: an adapter is a child module `adapter` of a sublayer's output module
(BertSelfOutput, BertOutput) and acts, through a forward hook, on the output y of that module's
`dense` projection: y + up(act(down(y))), before the sublayer's dropout, residual and LayerNorm
(Houlsby's position). Its parameters are then named
`bert.encoder.layer.<b>.<sublayer>.adapter.{down,up}.{weight,bias}`, the names that cross the
network; the base model's names do not change.
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

    def attach(self, sublayer_output: nn.Module) -> None:
        """Become `sublayer_output.adapter`, applied to the output of `sublayer_output.dense`."""
        sublayer_output.adapter = self
        sublayer_output.dense.register_forward_hook(self._after_dense)

    def _after_dense(self, module, args, output):
        return self(output)
