"""Train/test split and the non-IID split of the training set over the nodes."""
from __future__ import annotations

import numpy as np


def train_test_split(n: int, test_size: int, train_size: int | None, seed: int,
                     test_start: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Training and held-out indices. Without `test_start` the held-out set is cut from all n
    examples with the seed; with it, examples from test_start on are the dataset's own test set,
    of which `test_size` are drawn with the seed (all of them if it has fewer)."""
    rng = np.random.default_rng(seed)
    if test_start is None:
        if test_size >= n:
            raise ValueError(f"data.test_size = {test_size} leaves no training data (dataset has {n} examples)")
        perm = rng.permutation(n)
        test, train = perm[:test_size], perm[test_size:]
    else:
        if not 0 < test_start < n:
            raise ValueError(f"a dataset's own test set must leave training data and hold examples "
                             f"(test_start {test_start} of {n})")
        test = test_start + rng.permutation(n - test_start)[:test_size]
        train = rng.permutation(test_start)
    if train_size is not None:
        train = train[:train_size]
    return np.sort(train), np.sort(test)


def dirichlet(labels: np.ndarray, num_nodes: int, alpha: float, seed: int, min_per_node: int = 1,
              fill: str = "random") -> list[np.ndarray]:
    """Label-skewed shards (Hsu et al. 2019): node i's class mix q_i ~ Dir(alpha), equal sizes.

    Small alpha gives each node few classes. Every example goes to exactly one node; when a
    class runs out, a node's remaining share is filled from the classes with the most left.
    (Splitting each class over the nodes instead cannot give 100 nodes any data at alpha 0.1
    with two classes, which CAFF-style scenarios need.)

    The nodes drawn last get what the others left: once a class has run dry, only the other
    classes. `fill` "random" draws the nodes in a seeded random order, so that this lands on
    nodes at random; "in_order" (the only order before) draws them in the scenario's order,
    which gives the last groups (often the strongest devices) the single-class shards.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if n < num_nodes * min_per_node:
        raise ValueError(f"{n} training examples cannot give {num_nodes} nodes {min_per_node} each")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    pools = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in classes}
    sizes = [len(part) for part in np.array_split(np.arange(n), num_nodes)]
    if fill not in ("random", "in_order"):
        raise ValueError(f"fill must be random or in_order, got {fill!r}")
    order = rng.permutation(num_nodes) if fill == "random" else range(num_nodes)
    shards: list = [None] * num_nodes
    for i in order:
        size = sizes[i]
        want = rng.multinomial(size, rng.dirichlet(np.full(len(classes), alpha)))
        got: list[int] = []
        for c, k in zip(classes, want):
            got.extend(pools[c][:k])
            del pools[c][:k]
        while len(got) < size:  # a class ran dry: top up from the fullest
            c = max(pools, key=lambda c: len(pools[c]))
            k = size - len(got)
            got.extend(pools[c][:k])
            del pools[c][:k]
        shards[i] = np.sort(np.array(got, dtype=np.int64))
    return shards


def iid(n: int, num_nodes: int, seed: int) -> list[np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(s) for s in np.array_split(perm, num_nodes)]
