"""A node whose plan needs more memory than its limit is an out-of-memory event; the run finishes."""
from __future__ import annotations

import pytest

from emulation.cleanup import tagged_processes
from tests.runs import run_scenario, write_scenario

pytestmark = pytest.mark.emulation

SCENARIO = """
name: oom
seed: 2
backend: netns
dilation: off
model: {name: all-minilm-l6-v2, num_layers: 2}
data: {dataset: rotten_tomatoes, test_size: 40, train_size: 400, max_len: 128, partition: {kind: iid}}
training: {rounds: 2, local_steps: 1, batch_size: 64, lr: 0.0001, target_accuracy: 0.99, round_deadline_s: 600}
nodes:
  - {group: big, count: 1, profile: host}
  # enough to start and register (about 0.6 GB), far too little for full fine-tuning at batch 64
  - {group: small, count: 1, profile: host, overrides: {memory_mb: MEM}}
strategies:
  baseline: full
  # the second strategy starts with a fresh small-0: its device is restarted, not lost for good
  run: [{name: full, params: {train_embeddings: true}}, {name: again, type: full, params: {train_embeddings: true}}]
"""


def test_oom_is_recorded_and_the_run_finishes(netns_caps, tmp_path):
    # the idle footprint of a node with the 2-block model, measured by the process backend's own nodes
    mem = 900
    scenario = write_scenario(tmp_path, SCENARIO.replace("MEM", str(mem)), "oom.yaml")
    out = tmp_path / "run"
    run = run_scenario(scenario, out, timeout=900)
    rows = run.rounds
    r1 = next(r for r in rows if r["round"] == 1 and r["strategy"] == "full")
    small = next(n for n in r1["nodes"] if n["node"] == "small-0")
    big = next(n for n in r1["nodes"] if n["node"] == "big-0")
    assert big["status"] == "ok"
    assert small["status"] == "failed" and "out of memory" in small["reason"], small
    (event,) = [e for e in r1["events"] if e.get("node") == "small-0"]
    assert event["type"] == "oom" and event["limit_mb"] == mem and event["round"] == 1
    # the kernel counts this kill on the host too; it is the node's own limit, not the host's memory
    assert r1["host"]["oom_kills"] == 0 and not [e for e in r1["events"] if e["type"] == "host_oom"]
    assert event["peak_mb"] >= mem * 0.95
    r2 = next(r for r in rows if r["round"] == 2 and r["strategy"] == "full")
    assert r2["participants"] == 1 and not r2["failed"], "the run goes on without the killed node"
    assert (out / "summary.json").exists()
    manifest = run.manifest
    (restart,) = manifest["restarts"]
    assert restart["before"] == "again" and list(restart["nodes"]) == ["small-0"] and not restart["not_ready"]
    assert "out of memory" in restart["nodes"]["small-0"]
    again = next(r for r in rows if r["round"] == 1 and r["strategy"] == "again")
    assert {n["node"] for n in again["nodes"]} == {"big-0", "small-0"}, "the restarted device is sampled again"
    run_id = manifest["run_id"]
    assert tagged_processes(run_id) == []
