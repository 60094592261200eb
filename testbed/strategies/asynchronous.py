"""What the asynchronous strategies share: no round barrier, staleness, the in-flight bound.

An asynchronous strategy gets each result as it arrives (`receive`) with its staleness: how many
times the global model changed since the node's task was built from it. It answers with the
next global model when the result completes an aggregation step, or None while it waits
(FedBuff's buffer). testbed/asyncloop.py runs it: a device that finishes gets new work at once,
and at most `max_concurrency` devices train at the same time. Devices train LoRA on every block,
as FedLoRA's, so the comparison with FedLoRA isolates the aggregation.
"""
from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from .base import State, Update
from .fedlora import FedLoRA, FedLoRAParams

STALENESS = ("constant", "polynomial", "hinge")
DEFAULT_A = {"constant": 0.0, "polynomial": 0.5, "hinge": 10.0}


def staleness_weight(kind: str, staleness: int, a: float, b: float) -> float:
    """s(d) for a result d model versions old, FedAsync's three choices (Xie et al. 2019,
    https://arxiv.org/abs/1903.03934): constant 1; polynomial (d + 1)^-a; hinge 1 for d <= b,
    else 1 / (a (d - b) + 1). FedBuff's 1 / sqrt(1 + d) is the polynomial with a = 0.5."""
    if kind == "constant":
        return 1.0
    if kind == "polynomial":
        return float((staleness + 1) ** -a)
    if kind == "hinge":
        return 1.0 if staleness <= b else 1.0 / (a * (staleness - b) + 1.0)
    raise ValueError(f"staleness must be one of {', '.join(STALENESS)}, got {kind!r}")


class AsyncParams(FedLoRAParams):
    max_concurrency: int | None = Field(None, ge=1, description="devices training at once (default: every "
                                        "online device)")
    staleness: Literal["constant", "polynomial", "hinge"] = Field("polynomial", description="s(d), how a result "
                                                                  "d model versions old is weighted")
    staleness_a: float | None = Field(None, ge=0, description="the exponent (polynomial) or slope (hinge); "
                                      "default 0.5 for polynomial, 10 for hinge")
    staleness_b: float = Field(4.0, ge=0, description="hinge: results up to this stale count in full")
    max_staleness: int | None = Field(None, ge=0, description="results staler than this are discarded "
                                      "(default: none)")

    @model_validator(mode="after")
    def _a(self) -> "AsyncParams":
        if self.staleness_a is None:
            self.staleness_a = DEFAULT_A[self.staleness]
        return self


class AsyncStrategy(FedLoRA):
    """A LoRA strategy without a round barrier; subclasses give `receive`."""
    asynchronous: ClassVar[bool] = True
    Params = AsyncParams

    def weight(self, staleness: int) -> float:
        return staleness_weight(self.p.staleness, staleness, self.p.staleness_a, self.p.staleness_b)

    def too_stale(self, staleness: int) -> bool:
        return self.p.max_staleness is not None and staleness > self.p.max_staleness

    @abstractmethod
    def receive(self, update: Update, staleness: int, sent: State, state: State) -> tuple[State | None, dict]:
        """One result, `staleness` model versions old, whose task started from `sent`: the next
        global model if this result completes an aggregation step (else None), and metrics."""

    def aggregate(self, rnd: int, updates: list[Update], state: State) -> tuple[State, dict]:
        """Under a round barrier (not how the testbed runs it): every update fresh, in order."""
        new, metrics = state, {}
        for u in updates:
            got, metrics = self.receive(u, 0, state, new)
            new = got if got is not None else new
        return new, metrics
