"""A node started by hand (`python -m node --connect ...`, as on a real Pi) joins a run."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

TINY = """
name: tiny-remote
seed: 3
backend: BACKEND
model: {name: all-minilm-l6-v2, num_layers: 2}
data: {dataset: rotten_tomatoes, test_size: 40, train_size: 300, max_len: 16, partition: {kind: iid}}
training: {rounds: 2, local_steps: 2, batch_size: 8, lr: 0.001, target_accuracy: 0.99, round_deadline_s: 300}
nodes:
  - {group: emu, count: 1, profile: host}
  - {group: pi, count: 1, profile: rpi4, backend: remote}
strategies:
  baseline: fedlora
  run: [{name: fedlora, params: {rank: 2}}]
aggregator: {bind: 127.0.0.1, port: PORT, register_timeout_s: 240}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def procs():
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.parametrize("backend", ["process", "netns"])
def test_hand_started_node_joins_and_trains(backend, tmp_path, procs):
    if backend == "netns":
        from emulation.backends import netns_missing
        from emulation.probe import probe
        missing = netns_missing(probe())
        if missing:
            pytest.skip(f"netns backend unavailable: missing {', '.join(missing)}")
    port = free_port()
    scenario = tmp_path / "tiny.yaml"
    scenario.write_text(textwrap.dedent(TINY).replace("PORT", str(port)).replace("BACKEND", backend))
    out = tmp_path / "run"
    run = subprocess.Popen([sys.executable, "-m", "testbed", "run", str(scenario), "--out", str(out)],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    procs.append(run)
    node = subprocess.Popen([sys.executable, "-m", "node", "--connect", f"tcp://127.0.0.1:{port}",
                             "--name", "pi-0", "--profile", "rpi4", "--threads", "1"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    procs.append(node)
    output, _ = run.communicate(timeout=600)
    assert run.returncode == 0, output[-3000:]
    assert "pi-0" in output and "to join: python -m node --connect" in output
    assert node.wait(timeout=60) == 0, "the node must leave cleanly when the aggregator says BYE"
    rows = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r["round"] > 0]
    assert len(trained) == 2
    for r in trained:
        status = {n["node"]: n["status"] for n in r["nodes"]}
        assert status == {"emu-0": "ok", "pi-0": "ok"}
