"""The same scenario on every backend: results differ only in timings."""
from __future__ import annotations

from pathlib import Path

import pytest

from emulation.backends import docker_missing
from tests.runs import run_scenario, write_scenario

# serial: with an engine it also runs on docker, and docker runs side by side were never tried
pytestmark = [pytest.mark.emulation, pytest.mark.serial]
TINY = """
name: agree
seed: 4
model: {name: all-minilm-l6-v2, num_layers: 2}
data: {dataset: rotten_tomatoes, test_size: 60, train_size: 400, max_len: 16}
training: {rounds: 1, local_steps: 3, batch_size: 8, lr: 0.002, target_accuracy: 0.5}
nodes:
  - {group: a, count: 1, profile: rpi5}
  - {group: b, count: 1, profile: xavier-nx, overrides: {uplink_mbit: 50, downlink_mbit: 50}}
strategies:
  baseline: fedlora
  run: [{name: fedlora, params: {rank: 4}}, {name: full, params: {last_blocks: 1, lr: 0.0005}}]
"""


def run(backend: str, tmp_path: Path) -> tuple[list[dict], dict]:
    scenario = write_scenario(tmp_path, TINY, "agree.yaml")
    result = run_scenario(scenario, tmp_path / backend, "--backend", backend, timeout=900)
    return result.rounds, result.manifest


def test_process_and_kernel_backends_give_the_same_learning(netns_caps, tmp_path):
    backends = ["process", "netns"] + ([] if docker_missing(netns_caps) else ["docker"])
    results = {b: run(b, tmp_path) for b in backends}
    ref_rows, _ = results["process"]
    for b, (rows, manifest) in results.items():
        assert manifest["backend"] == b
        assert [(r["strategy"], r["round"]) for r in rows] == [(r["strategy"], r["round"]) for r in ref_rows]
        for r, ref in zip(rows, ref_rows):
            assert r["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-9), (b, r["strategy"], r["round"])
            assert r["loss"] == pytest.approx(ref["loss"], rel=1e-5), (b, r["strategy"], r["round"])
            assert r["bytes_down"] == ref["bytes_down"]
            assert abs(r["bytes_up"] - ref["bytes_up"]) <= 200 * max(1, len(r["nodes"]))  # timing fields in meta
