"""Nodes forked from the zygote behave like nodes started as their own interpreters."""
from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest

from emulation.backends.process import node_env
from emulation.cleanup import tagged_processes
from emulation.launch import Launcher
from emulation.zygote import Zygote, ZygoteError
from tests.runs import run_scenario, write_scenario

pytestmark = pytest.mark.integration
SPEC = {"name": "all-minilm-l6-v2", "num_labels": 2, "num_layers": 2, "seed": 0}

SCENARIO = """
name: zy
seed: 1
backend: process
model: {name: all-minilm-l6-v2, num_layers: 2}
data: {dataset: rotten_tomatoes, test_size: 40, train_size: 400, max_len: 16, partition: {kind: iid}}
training: {rounds: 2, local_steps: 2, batch_size: 8, lr: 0.005, target_accuracy: 0.6}
nodes:
  - {group: a, count: 3, profile: host}
strategies:
  baseline: fedlora
  run: [{name: fedlora}]
"""


def _run(tmp_path: Path, zygote: str, *sets: str) -> tuple[dict, list[dict]]:
    scenario = write_scenario(tmp_path, SCENARIO, "zy.yaml")
    run = run_scenario(scenario, tmp_path / f"run-{zygote}", "--set", f"zygote={zygote}", *sets, timeout=600)
    assert tagged_processes(run.run_id) == []
    assert not (run.out / "spill").exists()
    return run.manifest, run.rounds


def test_forked_nodes_train_exactly_like_separate_interpreters(tmp_path):
    """The separate interpreters' run also spills every round's results to files
    (`aggregator.hold_mb: 0`, testbed/spill.py): its aggregates must come out the same too."""
    m_fork, forked = _run(tmp_path, "on")
    m_exec, separate = _run(tmp_path, "off", "--set", "aggregator.hold_mb=0")
    assert all(r["spilled_mb"] == 0 for r in forked if r["round"] >= 1)
    assert all(r["spilled_mb"] > 0 for r in separate if r["round"] >= 1)
    assert m_fork["zygote"]["shared_mb"] > 100 and m_exec["zygote"] is None
    assert any("zygote" in note for note in m_fork["fidelity"])
    # training is deterministic: the same plan on the same shard gives the same numbers (up to
    # float rounding: buffers at other addresses can take other SIMD paths)
    assert [r["accuracy"] for r in forked] == [r["accuracy"] for r in separate]
    assert [r["loss"] for r in forked] == pytest.approx([r["loss"] for r in separate], rel=1e-5)
    assert all(r["participants"] == 3 for r in forked if r["round"] >= 1)


@pytest.fixture
def zygote(tmp_path):
    run = f"zytest-{uuid.uuid4().hex[:6]}"
    z = Zygote(SPEC, "rotten_tomatoes", node_env(run, 1), tmp_path / "zygote.log")
    yield z, run
    z.close()


def test_a_sandbox_it_cannot_enter_is_an_error_and_the_zygote_goes_on(zygote, tmp_path):
    z, run = zygote
    with pytest.raises(ZygoteError, match="could not enter its sandbox.*/nonexistent/netns"):
        z.spawn(["--help"], {}, tmp_path / "bad.log", netns="/nonexistent/netns")
    child = z.spawn(["--help"], {}, tmp_path / "help.log")
    assert child.wait(30) == 0
    assert "usage: python -m node" in (tmp_path / "help.log").read_text()


def test_closing_the_zygote_ends_its_nodes(zygote, tmp_path):
    z, run = zygote
    # nobody listens on port 1: the node keeps waiting for its aggregator
    child = z.spawn(["--connect", "tcp://127.0.0.1:1", "--name", "n0"], {}, tmp_path / "n0.log")
    time.sleep(1.0)
    assert child.poll() is None and os.getpgid(child.pid) == child.pid, "own process group, like Popen"
    # when the host runs out of memory the kernel takes a node, not the zygote that holds them all
    assert _oom_adj(child.pid) == "1000" and _oom_adj(z.pid) == _oom_adj(os.getpid())
    assert {p.pid for p in tagged_processes(run)} >= {z.pid, child.pid}, "`clean` finds both by the run tag"
    z.close()
    assert child.wait(10) is not None
    deadline = time.monotonic() + 10
    while tagged_processes(run) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert tagged_processes(run) == []


def _oom_adj(pid: int) -> str:
    return Path(f"/proc/{pid}/oom_score_adj").read_text().strip()


def test_a_node_started_as_its_own_interpreter_is_first_for_the_oom_killer(tmp_path):
    from emulation.backends.process import ProcessBackend
    from emulation.profiles import get_profile
    b = ProcessBackend(f"zytest-{uuid.uuid4().hex[:6]}", tmp_path)
    try:
        b.start(Launcher(b.run_id, "tcp://127.0.0.1:1", 1.0).launch("n0", get_profile("host")))  # nobody listens: it waits
        assert _oom_adj(b.procs["n0"].pid) == "1000"
    finally:
        b.teardown()
    assert tagged_processes(b.run_id) == []
