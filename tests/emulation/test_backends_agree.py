"""The same scenario on every backend: results differ only in timings."""
from __future__ import annotations

from pathlib import Path

import pytest

from emulation.backends import docker_missing
from tests.runs import run_scenario, write_scenario

pytestmark = pytest.mark.emulation
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


def assert_same_learning(backends: list[str], tmp_path: Path) -> None:
    """Each backend's rounds against the process backend's: the same accuracy, loss and bytes."""
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


def test_process_and_kernel_backends_give_the_same_learning(netns_caps, tmp_path):
    assert_same_learning(["process", "netns"], tmp_path)


@pytest.mark.serial  # docker runs side by side were never tried (no engine where the suite is made)
def test_docker_gives_the_same_learning_as_the_process_backend(caps, tmp_path):
    lacking = docker_missing(caps)
    if lacking:
        pytest.skip(f"docker backend unavailable here: {'; '.join(lacking)}")
    assert_same_learning(["process", "docker"], tmp_path)
