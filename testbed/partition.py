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


FILLS = ("balanced", "random", "in_order")


def dirichlet(labels: np.ndarray, num_nodes: int, alpha: float, seed: int, min_per_node: int = 1,
              fill: str = "balanced") -> list[np.ndarray]:
    """Label-skewed shards (Hsu et al. 2019): node i's class mix q_i ~ Dir(alpha), equal sizes.
    Small alpha gives each node few classes. Every example goes to exactly one node.
    (Splitting each class over the nodes instead cannot give 100 nodes any data at alpha 0.1
    with two classes, which CAFF-style scenarios need.)

    The draws rarely use the classes in the dataset's own proportions, so something must give.
    `fill`:
    - "balanced" (the default): the matrix of q_i x node i's share is fitted to both margins,
      each node's share and each class's count, by iterative proportional fitting: every node
      gets its share, every class is used, and each node's mix is its draw with every class's
      odds scaled by factors common to all nodes. No node absorbs the others' excess.
    - "random" / "in_order": nodes take exactly their share, drawn one after another in a seeded
      random order or in the scenario's order (the only way before `fill` existed); once a class
      has run dry, the nodes still to draw get the other classes only. In the scenario's order
      that put the single-class shards on the last groups, often the strongest devices.
    """
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {', '.join(FILLS)}, got {fill!r}")
    labels = np.asarray(labels)
    n = len(labels)
    if n < num_nodes * min_per_node:
        raise ValueError(f"{n} training examples cannot give {num_nodes} nodes {min_per_node} each")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    pools = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in classes}
    sizes = [len(part) for part in np.array_split(np.arange(n), num_nodes)]
    if fill == "balanced":
        return _balanced(pools, classes, sizes, alpha, rng)
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


def _balanced(pools: dict, classes, sizes: list[int], alpha: float, rng) -> list[np.ndarray]:
    """Counts n[i, c] with each node's share (rows) and every example of each class (columns),
    as near the draws q_i x size_i as both allow (see dirichlet), then the examples."""
    q = rng.dirichlet(np.full(len(classes), alpha), size=len(sizes))
    rows = np.asarray(sizes, dtype=float)
    cols = np.array([len(pools[c]) for c in classes], dtype=float)
    m = np.maximum(q, 1e-12) * rows[:, None]
    for _ in range(10_000):  # iterative proportional fitting; converges in tens of steps here
        m *= (cols / m.sum(0))[None, :]
        m *= (rows / m.sum(1))[:, None]
        if np.abs(m.sum(0) - cols).max() < 1e-6:
            break
    counts = _round_both(m, np.asarray(sizes), cols.astype(np.int64))
    shards = []
    for i in range(len(sizes)):
        got: list[int] = []
        for j, c in enumerate(classes):
            got.extend(pools[c][:counts[i, j]])
            del pools[c][:counts[i, j]]
        shards.append(np.sort(np.array(got, dtype=np.int64)))
    return shards


def _round_both(m: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Whole numbers near m whose rows sum to `rows` and columns to `cols` (both integer, with the
    same total): floors, then +1 where both a row and a column still need one, largest
    remainders first."""
    n = np.floor(m).astype(np.int64)
    need_r, need_c = rows - n.sum(1), cols - n.sum(0)
    for k in np.argsort(-(m - n), axis=None, kind="stable"):
        i, j = divmod(int(k), m.shape[1])
        if need_r[i] > 0 and need_c[j] > 0:
            n[i, j] += 1
            need_r[i] -= 1
            need_c[j] -= 1
    while need_r.sum() > 0:  # a row and a column that still need one, whose cell already had its +1
        i, j = int(np.flatnonzero(need_r > 0)[0]), int(np.flatnonzero(need_c > 0)[0])
        n[i, j] += 1
        need_r[i] -= 1
        need_c[j] -= 1
    return n


def iid(n: int, num_nodes: int, seed: int) -> list[np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(s) for s in np.array_split(perm, num_nodes)]
