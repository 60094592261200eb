"""A running node becomes another device without a restart: on the process backend the link a
fault sets reaches the node's transport with its next task (the TASK carries the device)."""
from __future__ import annotations

import pytest

from tests.runs import kill_run_processes, run_scenario, write_scenario

# serial: an unshaped upload must take under 50 ms
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.serial]

SCENARIO = """
name: live-device
seed: 2
backend: process
dilation: off
model: {name: all-minilm-l6-v2, num_layers: 2}
data: {dataset: rotten_tomatoes, test_size: 40, train_size: 200, max_len: 16, partition: {kind: iid}}
training: {rounds: 3, local_steps: 2, batch_size: 8, lr: 0.001, target_accuracy: 0.99}
nodes:
  - {group: n, count: 2, profile: host}
strategies:
  baseline: fedlora
  run: [{name: fedlora, params: {rank: 2}}]
faults:
  events:
    - {round: 2, action: link, nodes: [n-1], uplink_mbit: 0.5}
"""


def test_a_slower_uplink_reaches_the_running_node_with_its_next_task(tmp_path):
    sc = write_scenario(tmp_path, SCENARIO, "live.yaml")
    try:
        run = run_scenario(sc, tmp_path / "run", timeout=600)
    finally:
        kill_run_processes(tmp_path / "run")
    ev = [e for r in run.rounds for e in r.get("events", []) if e.get("action") == "link"]
    assert ev and ev[0]["applied"], ev
    node = {r["round"]: {n["node"]: n for n in r["nodes"]} for r in run.rounds if r["round"] > 0}
    assert node[1]["n-1"]["upload_s"] < 0.05, "unshaped before the fault"
    for rnd in (2, 3):
        n1 = node[rnd]["n-1"]
        # the node's own upload at 0.5 Mbit/s: at least its bytes' serialization time
        assert n1["status"] == "ok" and n1["upload_s"] >= 0.95 * n1["bytes_up"] * 8 / 0.5e6, n1
        assert node[rnd]["n-0"]["upload_s"] < 0.05, "the other node is unchanged"
        assert all(n["train_loss"] > 0 for n in node[rnd].values()), "each device's local training loss"
    assert not run.manifest.get("restarts"), "the same process, not a restarted one"
