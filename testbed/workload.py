"""What the nodes learn and the aggregator measures: the data split and the model.

Every node's shard (indices only: a node reads the same dataset itself), the held-out set the
aggregator evaluates the global model on, and the frozen pretrained base, loaded once.
"""
from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np

from node import trainer
from node.data import InstructionSet, announce, load_dataset
from node.plan import Plan

from . import partition
from .scenario import NodeSpec, Scenario, model_spec


class Workload:
    def __init__(self, sc: Scenario, nodes: list[NodeSpec]):
        self.sc = sc
        self._split(nodes)
        self.spec = model_spec(sc)
        # a local checkpoint: every node checks its copy against this hash of its files
        self.model_fingerprint = trainer.checkpoint_fingerprint(self.spec.path) if self.spec.path else None
        self.base, tok = trainer.load_base(self.spec)
        self.test = trainer.examples(tok, self.dataset, self.test_idx, sc.data.max_len)
        self.num_blocks = trainer.num_blocks(self.base)

    def _split(self, nodes: list[NodeSpec]) -> None:
        sc = self.sc
        source = self.source = sc.data.source(sc.model.task)
        ds = self.dataset = load_dataset(source)
        train, test = partition.train_test_split(len(ds), sc.data.test_size, sc.data.train_size, sc.seed,
                                                 ds.test_start)
        if isinstance(ds, InstructionSet):  # causal_lm: no labels, so no label skew and no majority class
            parts = partition.iid(len(train), len(nodes), sc.seed)
            self.shards = {node.name: train[p].astype(np.int32) for node, p in zip(nodes, parts)}
            self.test_idx, self.majority_rate, self.shard_labels = test, None, {}
            return
        labels = np.asarray(ds.labels)
        if sc.data.partition.kind == "iid":
            parts = partition.iid(len(train), len(nodes), sc.seed)
        else:
            parts = partition.dirichlet(labels[train], len(nodes), sc.data.partition.alpha, sc.seed,
                                        sc.data.partition.min_per_node, sc.data.partition.fill)
        self.shards = {node.name: train[p].astype(np.int32) for node, p in zip(nodes, parts)}
        self.test_idx = test
        counts = np.bincount(labels[test], minlength=len(ds.classes))
        self.majority_rate = float(counts.max() / counts.sum())
        self.shard_labels = {k: np.bincount(labels[v], minlength=len(ds.classes)).tolist()
                             for k, v in self.shards.items()}

    def welcome(self, name: str) -> tuple[dict, dict]:
        """A node's WELCOME: the model to build, the data settings and its shard."""
        meta = {"model": asdict(self.spec), "model_fingerprint": self.model_fingerprint,
                "data": announce(self.source, self.sc.data.max_len)}
        return meta, {"shard": self.shards[name]}

    def initial_state(self, plan: Plan) -> dict[str, np.ndarray]:
        """The untrained global model's trainable tensors under `plan`."""
        return trainer.trainable_state(trainer.build_model(self.base, plan))

    def evaluate(self, plan: Plan, state: dict) -> tuple[dict, float]:
        """Accuracy and loss of the global model on the held-out set, and the seconds it took."""
        t = time.perf_counter()
        res = trainer.evaluate(self.base, plan, state, self.test)
        return res, time.perf_counter() - t

    def manifest(self) -> dict:
        ds = self.dataset
        return {"data": {"dataset": ds.name, "source": self.source.to_dict(), "fingerprint": ds.fingerprint,
                         "classes": len(getattr(ds, "classes", ())), "own_test_set": ds.test_start is not None,
                         "train": int(sum(len(s) for s in self.shards.values())),
                         "test": len(self.test_idx), "majority_rate": self.majority_rate},
                "model": {**asdict(self.spec), "blocks": self.num_blocks, "fingerprint": self.model_fingerprint}}
