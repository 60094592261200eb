"""`run --seeds`: one run folder per seed, the spread over them, and a campaign that resumes seed by seed."""
from __future__ import annotations

import json
import shutil

import pytest

from tests.runs import run_scenario, write_scenario

pytestmark = pytest.mark.integration
TINY = """
name: seeds
backend: process
model: {name: all-minilm-l6-v2, num_layers: 1}
data: {dataset: rotten_tomatoes, test_size: 40, train_size: 200, max_len: 16, partition: {kind: iid}}
training: {rounds: 1, local_steps: 1, batch_size: 8, lr: 0.005, target_accuracy: 0.3}
nodes: [{group: a, count: 2, profile: host}]
strategies:
  baseline: fedlora
  run: [{name: fedlora}]
"""


def test_each_seed_runs_and_the_campaign_resumes(tmp_path):
    scenario = write_scenario(tmp_path, TINY, "seeds.yaml")
    out = tmp_path / "campaign"
    run_scenario(scenario, out, "--seeds", "3,4", timeout=600)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [3, 4]
    for seed in (3, 4):
        m = json.loads((out / f"seed-{seed}" / "manifest.json").read_text())
        assert m["status"] == "finished" and m["scenario"]["seed"] == seed
    tt = summary["strategies"]["fedlora"]["time_to_target_s"]
    assert tt["of"] == 2 and tt["n"] == 2  # the target (0.3) is below the majority rate: reached at round 0
    assert "| fedlora |" in (out / "report.md").read_text() and (out / "seeds.png").is_file()
    # a campaign cut short: seed 4 never ran; --resume keeps seed 3 and runs seed 4
    shutil.rmtree(out / "seed-4")
    before = (out / "seed-3" / "rounds.jsonl").read_text()
    r = run_scenario(scenario, out, "--seeds", "3,4", timeout=600, resume=True)
    assert "seed 3: finished earlier, kept" in r.proc.stdout and "seed 4: running" in r.proc.stdout
    assert (out / "seed-3" / "rounds.jsonl").read_text() == before
    assert json.loads((out / "seed-4" / "manifest.json").read_text())["status"] == "finished"
