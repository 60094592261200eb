"""FedAsync: each result is mixed into the global model as it arrives (Xie, Koyejo and Gupta,
"Asynchronous Federated Optimization", 2019, https://arxiv.org/abs/1903.03934).

From the paper: the server updates x_t = (1 - a_t) x_{t-1} + a_t x_new on every arrival, with
a_t = alpha * s(t - tau), where tau is the model version the device started from and s is a
staleness function (constant, polynomial (d + 1)^-a, or hinge; testbed/strategies/asynchronous.py).
The device trains on f(x) + (rho / 2) ||x - x_tau||^2 (the proximal term keeps it near the model it
started from) and sends its whole trained model, not a difference.

Reconstructed here, each a parameter:
- the model is the LoRA adapters and the head (FedLoRA's), and each tensor of A and B is mixed
  separately, as FedLoRA averages them;
- alpha 0.6 and polynomial s with a = 0.5 (the paper's CIFAR-10 setting as other sources report
  it; the paper's text was not at hand), rho 0.005 as `proximal_mu` (in the loss as rho / 2);
- the paper's optional alpha decay is left out (alpha is constant), and the local optimiser is
  the testbed's AdamW, not SGD.
docs/strategies.md#fedasync says the same, with the sources.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
from pydantic import Field

from .asynchronous import AsyncParams, AsyncStrategy
from .base import NodeInfo, State, Task, Update


class FedAsyncParams(AsyncParams):
    mixing: float = Field(0.6, gt=0, le=1, description="alpha: the weight of a fresh result in the global model")
    proximal_mu: float = Field(0.005, ge=0, description="rho: the device's proximal term (rho/2)||x - x_tau||^2")


class FedAsync(AsyncStrategy):
    name = "fedasync"
    Params = FedAsyncParams

    def configure(self, rnd: int, nodes: list[NodeInfo], state: State) -> dict[str, Task]:
        tasks = super().configure(rnd, nodes, state)
        return {n: replace(t, plan=replace(t.plan, train=replace(t.plan.train, proximal_mu=self.p.proximal_mu)))
                for n, t in tasks.items()}

    def receive(self, update: Update, staleness: int, sent: State, state: State) -> tuple[State | None, dict]:
        a_t = self.p.mixing * self.weight(staleness)
        new = dict(state)
        for name, x in update.tensors.items():
            mixed = (1 - a_t) * state[name].astype(np.float64) + a_t * np.asarray(x, dtype=np.float64)
            new[name] = mixed.astype(state[name].dtype)
        return new, {"mixing": a_t}
