"""A round's results on disk (testbed/spill.py): read back exactly, aggregated exactly as in memory."""
from __future__ import annotations

import numpy as np
import pytest

from node.protocol import DTYPES
from testbed.spill import Spill, tensor_sizes, write
from testbed.strategies import Update
from testbed.strategies.base import weighted_average


def test_every_wire_dtype_and_shape_reads_back_bit_for_bit(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {f"t.{d}": (rng.standard_normal((3, 5)) * 100).astype(d) for d in DTYPES}
    tensors.update({"scalar": np.array(2.5, np.float32), "empty": np.zeros((0, 4), np.float32),
                    "strided": np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2]})   # not contiguous
    spilled = write(tmp_path / "n0.bin", tensors)
    assert list(spilled) == list(tensors) and len(spilled) == len(tensors) and "scalar" in spilled
    for name, arr in tensors.items():
        got = spilled[name]
        assert got.dtype == arr.dtype and got.shape == arr.shape and got.tobytes() == arr.tobytes()
    # the file is all the bytes, one tensor after another: 8 dtypes x 15 values, 4 + 0 + 48 bytes
    assert (tmp_path / "n0.bin").stat().st_size == 15 * sum(np.dtype(d).itemsize for d in DTYPES) + 4 + 0 + 48
    (tmp_path / "n0.bin").unlink()
    assert tensor_sizes(spilled) == {n: a.nbytes for n, a in tensors.items()}   # sizes need no read
    assert tensor_sizes(tensors) == tensor_sizes(spilled)


def test_spilled_updates_aggregate_to_the_same_bits_as_held_ones(tmp_path):
    # hand-worked: a = [1, 2] with 1 sample, [3, 4] with 3: (1*[1, 2] + 3*[3, 4]) / 4 = [2.5, 3.5];
    # b only in the second update keeps its value from it; c in neither keeps the old one
    held = [Update("n0", None, {"a": np.array([1, 2], np.float32)}, 1),
            Update("n1", None, {"a": np.array([3, 4], np.float32), "b": np.array([7], np.float32)}, 3)]
    spill = Spill(tmp_path / "spill")
    spilled = [Update(u.node, None, spill.keep(u.node, u.tensors), u.num_samples) for u in held]
    state = {"a": np.zeros(2, np.float32), "b": np.zeros(1, np.float32), "c": np.ones(1, np.float32)}
    new = weighted_average(spilled, state)
    assert new["a"].tolist() == [2.5, 3.5] and new["b"].tolist() == [7.0] and new["c"].tolist() == [1.0]
    # and on random tensors, bit for bit the same as in memory
    rng = np.random.default_rng(1)
    held = [Update(f"n{i}", None, {"w": rng.standard_normal(1000).astype(np.float32)}, int(rng.integers(1, 50)))
            for i in range(7)]
    spilled = [Update(u.node, None, spill.keep(u.node, u.tensors), u.num_samples) for u in held]
    state = {"w": np.zeros(1000, np.float32)}
    assert weighted_average(spilled, state)["w"].tobytes() == weighted_average(held, state)["w"].tobytes()
    spill.clear()
    assert not (tmp_path / "spill").exists()
    spill.clear()  # nothing there: no error


def test_a_result_read_after_its_round_was_cleared_is_an_error_not_zeros(tmp_path):
    spill = Spill(tmp_path / "spill")
    kept = spill.keep("n0", {"w": np.ones(3, np.float32)})
    spill.clear()
    with pytest.raises(FileNotFoundError):
        kept["w"]
