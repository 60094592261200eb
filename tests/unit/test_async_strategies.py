"""FedBuff's and FedAsync's arithmetic on small tensors, against values worked by hand."""
from __future__ import annotations

import numpy as np
import pytest

from testbed.strategies import STRATEGIES
from testbed.strategies.asynchronous import staleness_weight
from testbed.strategies.base import Context, Update
from testbed.scenario import TrainingConfig

CTX = Context(training=TrainingConfig(), max_len=32, num_blocks=2, seed=1)


def _u(tensors, samples=10, node="n"):
    return Update(node, None, {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}, samples)


@pytest.mark.parametrize("kind, d, a, b, want", [
    ("constant", 7, 0.5, 4, 1.0),
    ("polynomial", 0, 0.5, 4, 1.0),
    ("polynomial", 3, 0.5, 4, 0.5),          # (3 + 1)^-0.5
    ("polynomial", 8, 1.0, 4, 1 / 9),
    ("hinge", 4, 10, 4, 1.0),                # up to b: in full
    ("hinge", 5, 10, 4, 1 / 11),             # 1 / (10 (5 - 4) + 1)
    ("hinge", 6, 0.5, 4, 0.5),               # 1 / (0.5 x 2 + 1)
])
def test_staleness_functions(kind, d, a, b, want):
    assert staleness_weight(kind, d, a, b) == pytest.approx(want)


def test_fedasync_mixes_each_result_in_with_alpha_times_its_staleness_weight():
    s = STRATEGIES["fedasync"]({"mixing": 0.5}, CTX)      # polynomial, a = 0.5
    state = {"w": np.array([1.0, 2.0], dtype=np.float32)}
    new, m = s.receive(_u({"w": [3.0, 6.0]}), 3, state, state)   # a_t = 0.5 x 4^-0.5 = 0.25
    assert m["mixing"] == pytest.approx(0.25)
    np.testing.assert_allclose(new["w"], [0.75 * 1 + 0.25 * 3, 0.75 * 2 + 0.25 * 6])  # [1.5, 3.0]
    assert new["w"].dtype == np.float32 and state["w"][0] == 1.0, "the old state is not touched"
    fresh, _ = s.receive(_u({"w": [3.0, 6.0]}), 0, state, state)
    np.testing.assert_allclose(fresh["w"], [2.0, 4.0])


def test_fedasync_devices_train_with_its_proximal_term():
    from testbed.strategies.base import NodeInfo
    s = STRATEGIES["fedasync"]({"proximal_mu": 0.01}, CTX)
    (task,) = s.configure(1, [NodeInfo("n", None, 10)], {}).values()
    assert task.plan.train.proximal_mu == 0.01


def test_fedbuff_applies_the_staleness_weighted_mean_change_every_k_results():
    s = STRATEGIES["fedbuff"]({"buffer_size": 2, "server_lr": 1.0}, CTX)  # s(d) = 1/sqrt(1 + d)
    w0 = {"w": np.array([1.0, 1.0], dtype=np.float32)}
    sent_a = {"w": np.array([1.0, 1.0], dtype=np.float32)}
    sent_b = {"w": np.array([0.0, 2.0], dtype=np.float32)}
    none, _ = s.receive(_u({"w": [2.0, 3.0]}), 0, sent_a, w0)         # change [1, 2], weight 1
    assert none is None and s.count == 1
    new, m = s.receive(_u({"w": [4.0, 2.0]}), 3, sent_b, w0)           # change [4, 0], weight 1/2
    # w0 + (1 x [1, 2] + 0.5 x [4, 0]) / K=2 = [1, 1] + [1.5, 1.0]
    np.testing.assert_allclose(new["w"], [2.5, 2.0])
    assert m == {"buffered": 2, "weight_sum": 1.5} and s.count == 0 and not s.buffer


def test_fedbuff_variants_normalize_by_the_weights_and_weigh_by_samples():
    s = STRATEGIES["fedbuff"]({"buffer_size": 2, "normalize": "weights", "weighting": "samples",
                               "staleness": "constant"}, CTX)
    w0 = {"w": np.zeros(1, dtype=np.float32)}
    s.receive(_u({"w": [3.0]}, samples=1), 0, w0, w0)
    new, _ = s.receive(_u({"w": [6.0]}, samples=2), 5, w0, w0)
    np.testing.assert_allclose(new["w"], [(1 * 3 + 2 * 6) / 3])       # 5.0


def test_fedbuff_keeps_its_buffer_through_a_checkpoint():
    s = STRATEGIES["fedbuff"]({"buffer_size": 2}, CTX)
    w0 = {"w": np.zeros(2, dtype=np.float32)}
    s.receive(_u({"w": [2.0, 2.0]}), 0, w0, w0)
    again = STRATEGIES["fedbuff"]({"buffer_size": 2}, CTX)
    again.load_state_dict(s.state_dict())
    new, _ = again.receive(_u({"w": [4.0, 0.0]}), 0, w0, w0)
    np.testing.assert_allclose(new["w"], [3.0, 1.0])


def test_max_staleness_and_validation():
    s = STRATEGIES["fedasync"]({"max_staleness": 2}, CTX)
    assert not s.too_stale(2) and s.too_stale(3)
    assert STRATEGIES["fedasync"]({"staleness": "hinge"}, CTX).p.staleness_a == 10
    with pytest.raises(Exception, match="buffer_size"):
        STRATEGIES["fedbuff"]({"buffer_size": 0}, CTX)
