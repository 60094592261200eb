"""FedBuff: buffered asynchronous aggregation (Nguyen et al., "Federated Learning with Buffered
Asynchronous Aggregation", AISTATS 2022, https://arxiv.org/abs/2106.06639).

From the paper: each device trains from the model version it downloaded and sends its change
Delta_i = y_i - y_start. The server adds each change to a buffer, scaled by a staleness weight
s(tau_i) = 1 / sqrt(1 + tau_i), tau_i being the server updates since the device's download. Every
K results it applies the buffer, w <- w + eta_g * (1/K) * sum_i s(tau_i) Delta_i, and empties it.
The paper's K is 10.

Reconstructed here, each a parameter:
- server SGD without momentum at eta_g = 1 (`server_lr`): the paper allows any server optimiser;
- the division by K (`normalize: buffer`). Meta's FLSim applies the weighted sum without it, and
  others divide by the sum of the weights (`normalize: weights`);
- every result weighs the same before staleness (`weighting: equal`, as FLSim's default);
  `samples` weighs by the device's sample count;
- the model is the LoRA adapters and the head (FedLoRA's), A and B each buffered separately.
docs/strategies.md#fedbuff says the same, with the sources.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from .asynchronous import AsyncParams, AsyncStrategy
from .base import State, Update


class FedBuffParams(AsyncParams):
    buffer_size: int = Field(10, ge=1, description="K: results per server update")
    server_lr: float = Field(1.0, gt=0, description="eta_g: the server's step on the buffered change")
    normalize: Literal["buffer", "weights"] = Field("buffer", description="divide the buffered sum by K "
                                                    "(buffer) or by the sum of its weights (weights)")
    weighting: Literal["equal", "samples"] = Field("equal", description="a result's weight before staleness")


class FedBuff(AsyncStrategy):
    name = "fedbuff"
    Params = FedBuffParams

    def __init__(self, params: dict, ctx):
        super().__init__(params, ctx)
        self.buffer: dict[str, np.ndarray] = {}
        self.count, self.weight_sum = 0, 0.0

    def receive(self, update: Update, staleness: int, sent: State, state: State) -> tuple[State | None, dict]:
        w = self.weight(staleness) * (update.num_samples if self.p.weighting == "samples" else 1.0)
        for name, y in update.tensors.items():
            delta = np.asarray(y, dtype=np.float64) - np.asarray(sent[name], dtype=np.float64)
            self.buffer[name] = self.buffer.get(name, 0.0) + w * delta
        self.count += 1
        self.weight_sum += w
        if self.count < self.p.buffer_size:
            return None, {}
        denom = self.p.buffer_size if self.p.normalize == "buffer" else self.weight_sum
        new = dict(state)
        for name, acc in self.buffer.items():
            new[name] = (state[name].astype(np.float64) + self.p.server_lr * acc / denom).astype(state[name].dtype)
        metrics = {"buffered": self.count, "weight_sum": self.weight_sum}
        self.buffer, self.count, self.weight_sum = {}, 0, 0.0
        return new, metrics

    def state_dict(self) -> dict:
        return {"buffer": dict(self.buffer), "count": self.count, "weight_sum": self.weight_sum}

    def load_state_dict(self, state: dict) -> None:
        self.buffer = {k: np.asarray(v, dtype=np.float64) for k, v in state.get("buffer", {}).items()}
        self.count, self.weight_sum = int(state.get("count", 0)), float(state.get("weight_sum", 0.0))
