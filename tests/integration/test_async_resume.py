"""Kill the aggregator (SIGKILL) while an asynchronous strategy runs, resume it with `run --resume
DIR`, and get every step: those saved before the kill, then the ones after, one clock."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from emulation.cleanup import tagged_processes
from tests.runs import kill_run_processes, read_run, start_run, write_scenario

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SCENARIO = {
    "name": "async-resume", "seed": 6, "backend": "process", "zygote": "on", "dilation": 2,
    "model": {"num_layers": 2},
    "data": {"partition": {"kind": "iid"}, "test_size": 40, "train_size": 600, "max_len": 32},
    "training": {"rounds": 500, "local_steps": 2, "batch_size": 16, "lr": 0.01, "time_budget_s": 8},
    "nodes": [{"group": "dev", "count": 3, "profile": "rpi5"}],
    "strategies": {"baseline": "fedbuff", "run": [{"name": "fedbuff", "params": {"rank": 4, "buffer_size": 2}}]},
}


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    d = tmp_path_factory.mktemp("async-resume")
    sc = write_scenario(d, SCENARIO, "async-resume.yaml")
    out = d / "run"
    p = start_run(sc, out, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while len(list((out / "async-steps").glob("*.pkl"))) < 3:
            assert p.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
            time.sleep(0.05)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(30)
        saved = len(list((out / "async-steps").glob("*.pkl")))
        p2 = start_run(sc, out, resume=True)
        text, _ = p2.communicate(timeout=600)
    finally:
        if p.poll() is None:
            p.kill()
        kill_run_processes(out)
    yield {"out": out, "text": text, "rc": p2.returncode, "saved": saved}


def test_the_resumed_strategy_goes_on_from_its_last_saved_step(resumed):
    assert resumed["rc"] == 0, resumed["text"][-3000:]
    assert f"fedbuff: resuming after step {resumed['saved']} " in resumed["text"], resumed["text"][-2000:]
    run = read_run(resumed["out"])
    rows = run.rows("fedbuff")
    assert [r["round"] for r in rows] == list(range(len(rows))), "every step once, in order"
    assert len(rows) > resumed["saved"] + 1
    times = [r["elapsed_s"] for r in rows]
    assert times == sorted(times) and times[-1] >= 8 * 0.9
    assert all(r["accuracy"] is not None for r in rows)
    assert not (resumed["out"] / "async-steps").exists(), "the steps are dropped once written"
    assert run.manifest["status"] == "finished" and run.manifest["resumed"]
    assert not tagged_processes(run.run_id)
