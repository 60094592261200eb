"""LoRA modules of heterogeneous rank: truncation on the way down, zero-padding on the way up.

The global module of a LoRA target has rank r_max; a device of rank r <= r_max receives its
leading r rank slices (rows of A, columns of B) and returns A (r, in) and B (out, r). The server
places each returned slice in the leading slices of the global module and averages slice by
slice. HetLoRA (a rank per device) and LEGEND (a rank per block and device) share this.
"""
from __future__ import annotations

from typing import Callable, Literal

import numpy as np

from .base import State, Update

A, B = ".lora_A.weight", ".lora_B.weight"
Weights = Callable[[str, list[Update], list[tuple[np.ndarray, np.ndarray]]], np.ndarray]


def is_lora(name: str) -> bool:
    return name.endswith(A) or name.endswith(B)


def module_of(name: str) -> str:
    """The LoRA module a lora_A/lora_B tensor belongs to (its name without the suffix)."""
    return name[: -len(A)] if name.endswith(A) else name[: -len(B)]


def truncate(name: str, value: np.ndarray, r: int) -> np.ndarray:
    """The leading r rank slices of a LoRA tensor (A: rows, B: columns); other tensors as they are."""
    if name.endswith(A):
        return np.ascontiguousarray(value[:r, :])
    if name.endswith(B):
        return np.ascontiguousarray(value[:, :r])
    return value


def pair(u: Update, module: str, r_max: int, who: str) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) of one module of an update, as float64, checked against the global rank."""
    a, b = u.tensors.get(module + A), u.tensors.get(module + B)
    if a is None or b is None:
        raise ValueError(f"{who}: {u.node} sent only one of lora_A/lora_B of {module}")
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or a.shape[0] > r_max:
        raise ValueError(f"{who}: {u.node} sent {module} with A {a.shape}, B {b.shape} "
                         f"(expected A (r, in), B (out, r), r <= {r_max})")
    return np.asarray(a, np.float64), np.asarray(b, np.float64)


def padded_average(updates: list[Update], state: State, weights: Weights,
                   padding: Literal["zeros", "slice"], who: str) -> State:
    """Every LoRA module of `state` averaged over the updates that carry it, each weighted by
    `weights(module, holders, pairs)`:
    - `zeros`: every rank slice is divided by the total weight of all holders of the module, a
      lower-rank holder's zero pad included (zero-padding to the global rank);
    - `slice`: rank slice j is averaged over the holders that trained it (rank > j).
    A slice no holder trained keeps its value. Other tensors are returned as they are."""
    new = dict(state)
    for m in sorted({module_of(k) for k in state if is_lora(k)}):
        holders = [u for u in updates if m + A in u.tensors or m + B in u.tensors]
        if not holders:
            continue
        gA, gB = state[m + A], state[m + B]
        pairs = [pair(u, m, gA.shape[0], who) for u in holders]
        w = weights(m, holders, pairs)
        if not w.sum() > 0:
            w = np.ones(len(holders))
        num_a, num_b = np.zeros(gA.shape, np.float64), np.zeros(gB.shape, np.float64)
        den = np.zeros(gA.shape[0], np.float64)    # weight of the holders that trained each slice
        for wi, (a, b) in zip(w, pairs):
            r = a.shape[0]
            if a.shape[1] != gA.shape[1] or b.shape[0] != gB.shape[0]:
                raise ValueError(f"{who}: {m}: A {a.shape}/B {b.shape} do not fit the global {gA.shape}/{gB.shape}")
            num_a[:r] += wi * a
            num_b[:, :r] += wi * b
            den[:r] += wi
        trained = den > 0
        norm = den if padding == "slice" else np.where(trained, w.sum(), 0.0)
        a_new, b_new = gA.astype(np.float64), gB.astype(np.float64)
        a_new[trained] = num_a[trained] / norm[trained, None]
        b_new[:, trained] = num_b[:, trained] / norm[trained]
        new[m + A], new[m + B] = a_new.astype(gA.dtype), b_new.astype(gB.dtype)
    return new
