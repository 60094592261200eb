"""Kill the aggregator (SIGKILL: no cleanup, no last words) in the middle of a run, resume it with
`run --resume DIR`, and get the rounds an uninterrupted run gives."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from emulation.cleanup import tagged_processes
from tests.runs import kill_run_processes, read_run, rounds_so_far, run_scenario, start_run, write_scenario

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SCENARIO = {
    "name": "resume-test", "seed": 5, "backend": "process", "zygote": "on", "dilation": "off",
    "model": {"num_layers": 2},
    "data": {"partition": {"kind": "iid"}, "test_size": 40, "train_size": 600, "max_len": 32},
    "training": {"rounds": 3, "local_steps": 4, "batch_size": 16, "lr": 0.01, "target_accuracy": 0.6},
    "nodes": [{"group": "dev", "count": 3, "profile": "host"}],
    # hetlora with self-pruning: the strategy object carries state (ranks) across rounds
    "strategies": {"baseline": "fedlora", "run": [{"name": "fedlora", "params": {"rank": 4}},
                                                 {"name": "hetlora", "params": {"self_prune": True}}]},
}


def _key(rows):
    return {(r["strategy"], r["round"]): r for r in rows}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    sc = write_scenario(d, SCENARIO, "resume.yaml")
    ref, cut = d / "reference", d / "interrupted"
    # side by side: an uninterrupted reference, and the same run whose aggregator is killed
    # outright once hetlora's first round is on disk (no deadline is near: timing cannot matter)
    r = start_run(sc, ref, stdout=subprocess.DEVNULL)
    p = start_run(sc, cut, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not any(r["strategy"] == "hetlora" and r["round"] == 1 for r in rounds_so_far(cut)):
            assert p.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
            time.sleep(0.05)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(30)
        assert r.wait(600) == 0, "the reference run failed"
        killed_id = read_run(cut).run_id
        wrong = run_scenario(sc, cut, "--set", "training.lr=0.1", resume=True, timeout=120, expect_rc=None).proc
        before = rounds_so_far(cut)
        p2 = start_run(sc, cut, resume=True)
        text2, _ = p2.communicate(timeout=600)
    finally:
        for proc in (p, r):
            if proc.poll() is None:
                proc.kill()
        kill_run_processes(ref, cut)
    yield {"ref": ref, "cut": cut, "text": text2, "rc": p2.returncode, "killed_id": killed_id, "wrong": wrong,
           "before": before, "scenario": sc}


def test_resumed_run_finishes_with_the_rounds_of_an_uninterrupted_one(runs):
    assert runs["rc"] == 0, runs["text"][-3000:]
    ref, got = _key(rounds_so_far(runs["ref"])), _key(rounds_so_far(runs["cut"]))
    assert sorted(got) == sorted(ref), "every round once, none lost, none twice"
    for k, r in ref.items():
        assert got[k]["accuracy"] == pytest.approx(r["accuracy"], abs=1e-9), k
        assert got[k]["loss"] == pytest.approx(r["loss"], rel=1e-5), k
        assert [n["node"] for n in got[k]["nodes"]] == [n["node"] for n in r["nodes"]], k
    h = [r for r in rounds_so_far(runs["cut"]) if r["strategy"] == "hetlora"]
    assert [r["round"] for r in h] == [0, 1, 2, 3]


def test_rounds_finished_before_the_kill_are_kept(runs):
    before = _key(runs["before"])
    after = _key(rounds_so_far(runs["cut"]))
    assert ("hetlora", 1) in before
    for k, r in before.items():
        assert after[k] == r


def test_manifest_tells_the_run_was_resumed_and_nothing_is_left(runs):
    cut = read_run(runs["cut"])
    m = cut.manifest
    assert m["status"] == "finished"
    (res,) = m["resumed"]
    assert res["from_run_id"] == runs["killed_id"] and res["strategy"] == "hetlora" and res["round"] >= 1
    assert not (runs["cut"] / "checkpoint.pkl").exists(), "a finished run keeps no checkpoint"
    assert not tagged_processes(runs["killed_id"]) and not tagged_processes(m["run_id"])
    summary = cut.summary
    assert set(summary["strategies"]) == {"fedlora", "hetlora"}


def test_resume_refuses_another_scenario_and_a_finished_run(runs):
    wrong = runs["wrong"]
    assert wrong.returncode == 1
    assert "scenario differs" in wrong.stderr and "training" in wrong.stderr
    again = run_scenario(runs["scenario"], runs["cut"], resume=True, timeout=120, expect_rc=None).proc
    assert again.returncode == 1 and "finished" in again.stderr
