"""Ctrl-C (SIGINT) or SIGTERM during a run: finished rounds kept, every sandbox removed."""
from __future__ import annotations

import signal
import time

import pytest

from emulation import netns
from emulation.cleanup import tagged_processes
from tests.runs import read_run, rounds_so_far, start_run, write_scenario

SCENARIO = """
name: interrupt
seed: 5
model: {name: all-minilm-l6-v2, num_layers: 2}
data: {dataset: rotten_tomatoes, test_size: 40, train_size: 300, max_len: 16}
training: {rounds: 50, local_steps: 2, batch_size: 8, lr: 0.001, target_accuracy: 0.99}
nodes: [{group: g, count: 2, profile: host}]
strategies: {baseline: fedlora, run: [{name: fedlora, params: {rank: 2}}]}
"""


@pytest.mark.parametrize("backend,sig", [("process", signal.SIGINT), ("netns", signal.SIGTERM)])
def test_signal_keeps_rounds_and_removes_sandboxes(backend, sig, caps, tmp_path):
    if backend == "netns":
        from emulation.backends import netns_missing
        if netns_missing(caps):
            pytest.skip(f"netns backend unavailable: missing {', '.join(netns_missing(caps))}")
    scenario = write_scenario(tmp_path, SCENARIO, "s.yaml")
    out = tmp_path / "run"
    run = start_run(scenario, out, "--backend", backend)
    try:
        deadline = time.monotonic() + 400
        while len([r for r in rounds_so_far(out) if r["round"] >= 2]) == 0:
            assert run.poll() is None, run.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no round finished in time"
            time.sleep(0.5)
        run.send_signal(sig)
        output, _ = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 130, output[-2000:]
    assert "finished rounds are kept" in output
    result = read_run(out, run)
    manifest = result.manifest
    assert manifest["status"] == "interrupted"
    rows = result.rounds
    assert [r["round"] for r in rows][:3] == [0, 1, 2]
    summary = result.summary
    assert summary["status"] == "interrupted" and summary["strategies"]["fedlora"]["rounds"] >= 2
    assert tagged_processes(manifest["run_id"]) == []
    assert netns.leftovers(netns.run_tag(manifest["run_id"])) == {"namespaces": [], "interfaces": []}
