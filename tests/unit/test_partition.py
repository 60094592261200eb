"""Data splits: train/test, Dirichlet label-skewed shards, IID shards."""
import numpy as np
import pytest

from testbed.partition import dirichlet, iid, train_test_split


def _labels(n=2000, classes=4, seed=0):
    return np.random.default_rng(seed).integers(0, classes, size=n)


def _max_class_fraction(labels, shards):
    """Mean over nodes of the share of the node's most common label (1.0 = one class only)."""
    out = []
    for s in shards:
        counts = np.bincount(labels[s], minlength=labels.max() + 1)
        out.append(counts.max() / counts.sum())
    return float(np.mean(out))


# -- dirichlet ----------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.1, 1.0, 100.0])
def test_dirichlet_shards_disjoint_and_cover_everything(alpha):
    labels = _labels()
    shards = dirichlet(labels, num_nodes=8, alpha=alpha, seed=3, min_per_node=5)
    assert len(shards) == 8
    allidx = np.concatenate(shards)
    assert len(allidx) == len(labels), "every example in exactly one shard"
    assert len(np.unique(allidx)) == len(labels), "shards are disjoint"
    np.testing.assert_array_equal(np.sort(allidx), np.arange(len(labels)))
    for s in shards:
        assert s.dtype == np.int64
        assert np.all(np.diff(s) > 0), "each shard is sorted, without repeats"


def test_dirichlet_reproducible_by_seed():
    labels = _labels()
    a = dirichlet(labels, 6, 0.5, seed=11)
    b = dirichlet(labels, 6, 0.5, seed=11)
    c = dirichlet(labels, 6, 0.5, seed=12)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_small_alpha_gives_more_label_skew():
    labels = _labels(n=4000, classes=4)
    skew = {}
    for alpha in (0.05, 100.0):
        # average over seeds so one lucky draw cannot decide it
        skew[alpha] = np.mean([_max_class_fraction(labels, dirichlet(labels, 10, alpha, seed=s, min_per_node=1))
                               for s in range(5)])
    # balanced 4 classes: large alpha ~ 0.25-0.3 per node, tiny alpha close to a single class per node
    assert skew[100.0] < 0.4
    assert skew[0.05] > 0.7
    assert skew[0.05] > skew[100.0] + 0.3


def test_min_per_node_respected():
    labels = _labels(n=500, classes=2)
    for seed in range(5):
        shards = dirichlet(labels, num_nodes=10, alpha=0.3, seed=seed, min_per_node=20)
        assert min(len(s) for s in shards) >= 20
        assert sum(len(s) for s in shards) == 500


def test_impossible_by_count_is_a_clear_error():
    with pytest.raises(ValueError, match="100 training examples cannot give 10 nodes 11 each"):
        dirichlet(_labels(n=100), num_nodes=10, alpha=1.0, seed=0, min_per_node=11)


def test_extreme_skew_still_gives_every_node_its_share():
    # 100 nodes, two classes, alpha 0.1 (CAFF's setting): equal sizes, most nodes nearly one class
    labels = _labels(n=2000, classes=2)
    shards = dirichlet(labels, num_nodes=100, alpha=0.1, seed=0, min_per_node=20)
    assert {len(s) for s in shards} == {20}
    assert len(np.unique(np.concatenate(shards))) == 2000
    purity = np.mean([np.bincount(labels[s], minlength=2).max() / len(s) for s in shards])
    assert purity > 0.85


def test_single_node_gets_everything():
    labels = _labels(n=50)
    (shard,) = dirichlet(labels, 1, 0.1, seed=0)
    np.testing.assert_array_equal(shard, np.arange(50))


# -- train/test split ---------------------------------------------------------------------

def test_train_test_split_disjoint_and_sizes():
    train, test = train_test_split(1000, test_size=200, train_size=None, seed=0)
    assert len(test) == 200 and len(train) == 800
    assert not set(train.tolist()) & set(test.tolist())
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(1000))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)


def test_train_test_split_train_size_limits_train_only():
    train, test = train_test_split(1000, test_size=200, train_size=300, seed=1)
    assert len(train) == 300 and len(test) == 200
    assert not set(train.tolist()) & set(test.tolist())
    # the test set does not depend on train_size
    _, test_all = train_test_split(1000, test_size=200, train_size=None, seed=1)
    np.testing.assert_array_equal(test, test_all)


def test_train_test_split_reproducible_and_seeded():
    a = train_test_split(500, 100, None, seed=5)
    b = train_test_split(500, 100, None, seed=5)
    c = train_test_split(500, 100, None, seed=6)
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_train_test_split_no_training_data_left():
    with pytest.raises(ValueError, match="test_size = 100 leaves no training data"):
        train_test_split(100, test_size=100, train_size=None, seed=0)


# -- iid ----------------------------------------------------------------------------------

@pytest.mark.parametrize("n, k", [(100, 4), (103, 4), (7, 7), (10, 3)])
def test_iid_sizes_and_cover(n, k):
    shards = iid(n, k, seed=0)
    sizes = [len(s) for s in shards]
    assert len(shards) == k
    assert sum(sizes) == n
    assert max(sizes) - min(sizes) <= 1
    np.testing.assert_array_equal(np.sort(np.concatenate(shards)), np.arange(n))


def test_iid_reproducible_and_shuffled():
    a, b = iid(1000, 4, seed=2), iid(1000, 4, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    # shuffled: shard 0 is not simply the first quarter
    assert not np.array_equal(a[0], np.arange(250))


# -- which nodes get the leftovers --------------------------------------------------------

def _purity(labels, shard) -> float:
    counts = np.bincount(labels[shard], minlength=2)
    return counts.max() / counts.sum()


def test_in_order_the_single_class_shards_are_the_last_nodes():
    """Drawn in the nodes' order, once a class runs dry every later node gets the other class
    only: the single-class shards that appear by running dry form a suffix of the order."""
    labels = np.repeat([0, 1], 6000)  # balanced, two classes (as Rotten Tomatoes)
    suffixes = 0
    for seed in range(30):
        shards = dirichlet(labels, 16, 1.0, seed, fill="in_order")
        pure = [bool(_purity(labels, s) == 1.0) for s in shards]
        first_dry = next((i for i in range(16) if all(pure[i:])), 16)
        suffixes += first_dry < 16 and first_dry > 0
        assert all(pure[first_dry:])
    assert suffixes >= 10, "running dry happens often at alpha 1 with 16 nodes"


@pytest.mark.parametrize("fill", ["balanced", "random"])
def test_no_place_in_the_order_gets_the_leftovers(fill):
    """Over 200 seeds (16 nodes, two balanced classes, alpha 1): in the nodes' order the last
    node's shard is far purer than the first's; balanced, or in a random order, the two are alike."""
    labels = np.repeat([0, 1], 6000)

    def mean_purity(fill, node):
        return np.mean([_purity(labels, dirichlet(labels, 16, 1.0, s, fill=fill)[node]) for s in range(200)])
    assert mean_purity("in_order", 15) > mean_purity("in_order", 0) + 0.15
    assert abs(mean_purity(fill, 15) - mean_purity(fill, 0)) < 0.06
    with pytest.raises(ValueError, match="fill must be one of balanced, random, in_order"):
        dirichlet(labels, 4, 1.0, 0, fill="sorted")


def test_balanced_uses_every_class_exactly_with_equal_shares_and_no_single_class_leftovers():
    """4 nodes, 1720 and 2280 examples of two classes, alpha 3 (the smoke scenario's split): drawn
    one after another, some node ends up with one class in 14 of 50 seeds (a class ran dry);
    balanced, no node ever does, every example is used once, and every node gets its share."""
    labels = np.array([0] * 1720 + [1] * 2280)
    pure = {fill: sum(_purity(labels, s) == 1.0 for seed in range(50) for s in dirichlet(labels, 4, 3.0, seed, 16, fill))
            for fill in ("balanced", "in_order")}
    assert pure["balanced"] == 0 and pure["in_order"] > 0
    shards = dirichlet(labels, 4, 3.0, 7, 16)
    assert sorted(np.concatenate(shards)) == list(range(len(labels)))
    assert [len(s) for s in shards] == [1000] * 4


def test_balanced_scales_every_nodes_odds_by_one_common_factor():
    """With two classes, fitting the drawn mixes to both margins multiplies each node's odds of
    class 1 against class 0 by the same factor: got odds / drawn odds is one constant (up to
    rounding). The draws are replayed from the seed: the pools' permutations, then q."""
    labels = np.array([0] * 3000 + [1] * 9000)
    shards = dirichlet(labels, 6, 2.0, 5)
    rng = np.random.default_rng(5)
    for c in (0, 1):
        rng.permutation(np.flatnonzero(labels == c))
    draws = rng.dirichlet([2.0, 2.0], size=6)
    got = np.array([np.bincount(labels[s], minlength=2) for s in shards], dtype=float)
    factor = (got[:, 1] / got[:, 0]) / (draws[:, 1] / draws[:, 0])
    assert np.allclose(factor, factor[0], rtol=0.02)
    assert got[:, 1].sum() == 9000 and set(got.sum(1)) == {2000}
