"""Train/test split and the non-IID split of the training set over the nodes."""
from __future__ import annotations

import numpy as np


def train_test_split(n: int, test_size: int, train_size: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if test_size >= n:
        raise ValueError(f"data.test_size = {test_size} leaves no training data (dataset has {n} examples)")
    perm = np.random.default_rng(seed).permutation(n)
    test, train = perm[:test_size], perm[test_size:]
    if train_size is not None:
        train = train[:train_size]
    return np.sort(train), np.sort(test)


def dirichlet(labels: np.ndarray, num_nodes: int, alpha: float, seed: int, min_per_node: int = 1) -> list[np.ndarray]:
    """Label-skewed shards: for each class, node proportions drawn from Dir(alpha).

    The usual FL benchmark split (Hsu et al. 2019). Small alpha gives nodes few classes.
    Redrawn (bounded) until every node has `min_per_node` examples, as common FL code does.
    """
    labels = np.asarray(labels)
    if len(labels) < num_nodes * min_per_node:
        raise ValueError(f"{len(labels)} training examples cannot give {num_nodes} nodes {min_per_node} each")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(1000):
        shards: list[list[int]] = [[] for _ in range(num_nodes)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(num_nodes, alpha))) * len(idx)).astype(int)[:-1]
            for node, part in enumerate(np.split(idx, cuts)):
                shards[node].extend(part.tolist())
        if min(len(s) for s in shards) >= min_per_node:
            return [np.sort(np.array(s, dtype=np.int64)) for s in shards]
    raise ValueError(f"Dirichlet alpha={alpha} could not give every one of {num_nodes} nodes "
                     f"{min_per_node} examples in 1000 draws; raise alpha or lower data.partition.min_per_node")


def iid(n: int, num_nodes: int, seed: int) -> list[np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(s) for s in np.array_split(perm, num_nodes)]
