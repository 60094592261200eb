"""Asynchronous aggregation with real processes: scenarios/async-ci.yaml (FedLoRA against FedBuff
and FedAsync on uneven devices) on the machine's default backend, and on the virtual clock
(process backend, no dilation), where every check must hold as well."""
from __future__ import annotations

import pytest

from emulation.cleanup import tagged_processes
from tests.runs import kill_run_processes, run_scenario

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ASYNC = ("fedbuff", "fedasync")


# the real clock's run is serial: its idle and wait checks are fractions of a second of real time
# (on the virtual clock they are the loop's own times: a device's next task leaves at its result's
# arrival, whatever else the host runs)
@pytest.fixture(scope="module", params=[pytest.param("real", marks=pytest.mark.serial), "virtual"])
def async_run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("async") / "run"
    # half the scenario's emulated time (8 s: FedAsync is past the kill at step 5 and the restart at
    # step 15 by 4 s) and 40 held-out examples: evaluating every step's model is most of the real time
    short = ["--set", "training.time_budget_s=8", "--set", "data.test_size=40"]
    clock = ["--set", "clock=virtual", "--set", "dilation=off"] if request.param == "virtual" else []
    yield run_scenario("scenarios/async-ci.yaml", out, *short, *clock, timeout=1200)
    kill_run_processes(out)


def test_every_strategy_runs_for_its_time_budget(async_run):
    assert async_run.proc.returncode == 0, async_run.tail()
    budget = async_run.manifest["scenario"]["training"]["time_budget_s"]
    for s in ("fedlora", *ASYNC):
        rows = async_run.rows(s)
        assert rows[-1]["elapsed_s"] >= budget * 0.9 and len(rows) > 3, (s, len(rows))
        assert all(r["accuracy"] is not None for r in rows)
    assert {"staleness", "device_idle_s"} <= set(async_run.summary["strategies"]["fedbuff"])
    assert "## Staleness (asynchronous strategies)" in (async_run.out / "report.md").read_text()
    if async_run.manifest["clock"] == "virtual":  # steps in the order of their arrivals, on one clock
        for s in ASYNC:
            rows = [r for r in async_run.rows(s) if r["round"]]
            assert all("vclock_late" in r for r in rows)
            assert all(a["elapsed_s"] <= b["elapsed_s"] for a, b in zip(rows, rows[1:]))
            ends = [n["returned_s"] for r in rows for n in r["nodes"]]
            assert ends == sorted(ends), "each task ends at its virtual arrival, in order"


def test_no_device_waits_for_a_barrier(async_run):
    """Under FedLoRA the AGXs (4x a TX2) wait for the TX2s every round; without a barrier a device
    that returns a result gets its next task at once."""
    sync_wait = [n["wait_s"] for r in async_run.rows("fedlora") if r["round"] for n in r["nodes"]
                 if n["node"].startswith("agx") and n["status"] == "ok"]
    assert sum(sync_wait) / len(sync_wait) > 0.3, sync_wait
    for s in ASYNC:
        idle = sorted(n["idle_s"] for r in async_run.rows(s) if r["round"] for n in r["nodes"])
        assert idle and idle[len(idle) // 2] < 0.1 and idle[int(0.9 * len(idle))] < 0.25, (s, idle[-10:])
        # each task runs from its dispatch to its return; every node kept training
        tasks = [n for r in async_run.rows(s) if r["round"] for n in r["nodes"]]
        assert {n["node"] for n in tasks} == {"tx2-0", "tx2-1", "agx-0", "agx-1"}
        assert all(n["returned_s"] >= n["sent_s"] for n in tasks)


def test_each_step_records_its_updates_staleness(async_run):
    buff = [r for r in async_run.rows("fedbuff") if r["round"]]
    assert all(r["participants"] == 2 == len(r["staleness"]) for r in buff), "buffer_size 2: two results a step"
    fa = [r for r in async_run.rows("fedasync") if r["round"]]
    assert all(r["participants"] == 1 for r in fa) and [r["round"] for r in fa] == list(range(1, len(fa) + 1))
    # the TX2s' results arrive after the AGXs changed the model: some updates are stale
    assert max(d for r in fa for d in r["staleness"]) >= 1
    assert all(0 < r["metrics"]["mixing"] <= 0.6 for r in fa)


def test_nothing_is_left_behind(async_run):
    assert not tagged_processes(async_run.run_id)


def test_a_device_killed_mid_task_fails_it_and_trains_again_after_its_restart(async_run):
    tasks = [(r["round"], n) for r in async_run.rows("fedasync") if r["round"] for n in r["nodes"]
             if n["node"] == "tx2-1"]
    killed = [(step, n) for step, n in tasks if n["status"] == "failed"]
    assert killed and killed[0][1]["reason"].startswith("killed by a fault event"), tasks[:8]
    assert any(n["status"] == "ok" and step > killed[0][0] for step, n in tasks), "back after its restart"
    faults = {(e["action"], e["node"]) for r in async_run.rows("fedasync") for e in r.get("events", [])
              if e["type"] == "fault"}
    assert {("kill", "tx2-1"), ("restart", "tx2-1")} <= faults
