"""The round's tensor bytes, split into the blocks (LoRA adapters or whole blocks) and the task head."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from node.plan import Plan
from testbed.report import summarize
from testbed.rounds import payload
from testbed.strategies import Task

LORA = "base_model.model.bert.encoder.layer.5.attention.self.query.lora_A.weight"
HEAD = "base_model.model.classifier.weight"


def test_payload_splits_blocks_from_the_head_both_ways():
    down = {LORA: np.zeros((8, 384), np.float32), HEAD: np.zeros((2, 384), np.float32)}
    tasks = {"a": Task(Plan("full"), down), "b": Task(Plan("full"), {HEAD: down[HEAD]})}
    outcome = SimpleNamespace(results={"a": SimpleNamespace(tensors=down)})  # b sent nothing back
    assert payload(tasks, outcome) == {"blocks_down": 8 * 384 * 4, "head_down": 2 * 2 * 384 * 4,
                                       "blocks_up": 8 * 384 * 4, "head_up": 2 * 384 * 4}


def test_the_summary_totals_the_split():
    rows = [{"strategy": "s", "round": 0, "accuracy": 0.5, "elapsed_s": 0, "nodes": []},
            {"strategy": "s", "round": 1, "accuracy": 0.6, "elapsed_s": 1, "nodes": [],
             "payload": {"blocks_down": 10, "head_down": 3, "blocks_up": 7, "head_up": 2}},
            {"strategy": "s", "round": 2, "accuracy": 0.7, "elapsed_s": 2, "nodes": [],
             "payload": {"blocks_down": 1, "head_down": 1, "blocks_up": 1, "head_up": 1}}]
    assert summarize(rows, "s", 0.65)["strategies"]["s"]["payload_bytes"] == {"blocks": 19, "head": 7}
