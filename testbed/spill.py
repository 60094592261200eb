"""A round's results on disk instead of in memory, read back one tensor at a time.

Why: a round of full fine-tuning on 80 devices returns 80 copies of the model (91 MB each for
all-MiniLM-L6-v2: 7.3 GB), and the aggregator would hold them all until the round ends. With
`aggregator.hold_mb` set below a round's expected results, each accepted result is written to a
file as it arrives and its message is dropped. The strategy then reads the tensors back one at a
time while it aggregates, so the aggregator's memory is one model's worth whatever the number of
nodes.

Why not fold each result into a running sum as it arrives: the sum would then depend on the
arrival order in its last bits, and a run would no longer give the same model twice, nor the
same model on the real and the virtual clock. The strategies still aggregate in node order, on
the same float32 values, so the result is bit for bit the one they would get in memory.
"""
from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np


class SpilledTensors(Mapping):
    """One result's tensors in a file of their raw bytes, one after another: a read-only mapping
    name -> array that reads the tensor from the file each time it is asked for."""

    def __init__(self, path: Path, index: dict[str, tuple[int, str, tuple[int, ...]]]):
        self.path, self.index = Path(path), index   # name -> (offset, dtype, shape)

    def __getitem__(self, name: str) -> np.ndarray:
        offset, dtype, shape = self.index[name]
        count = int(np.prod(shape, dtype=np.int64))
        return np.fromfile(self.path, dtype=dtype, count=count, offset=offset).reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)

    def sizes(self) -> dict[str, int]:
        """Each tensor's bytes, without reading it."""
        return {n: int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize for n, (_, d, s) in self.index.items()}


def tensor_sizes(tensors: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Each tensor's bytes; a spilled result's without reading it back."""
    if isinstance(tensors, SpilledTensors):
        return tensors.sizes()
    return {n: int(np.asarray(v).nbytes) for n, v in tensors.items()}


def write(path: Path, tensors: Mapping[str, np.ndarray]) -> SpilledTensors:
    """The tensors written to `path` (raw, C order), as a SpilledTensors over that file."""
    index, offset = {}, 0
    with open(path, "wb") as fh:
        for name, arr in tensors.items():
            arr = np.asarray(arr)
            arr = arr if arr.flags.c_contiguous else arr.copy(order="C")
            fh.write(arr.reshape(-1).view(np.uint8).data)
            index[name] = (offset, arr.dtype.name, tuple(arr.shape))
            offset += arr.nbytes
    return SpilledTensors(path, index)


class Spill:
    """The folder a run's rounds spill their results to (`<run>/spill`): emptied when a round
    ends and removed with the run."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def keep(self, node: str, tensors: Mapping[str, np.ndarray]) -> SpilledTensors:
        self.folder.mkdir(parents=True, exist_ok=True)
        return write(self.folder / f"{node}.bin", tensors)

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
