"""Scenario faults with real processes: scenarios/faults-ci.yaml on the machine's default backend
(netns as root, where links are cut by the kernel; the process backend elsewhere, where link
faults are recorded as not applied)."""
from __future__ import annotations

import pytest

from emulation.cleanup import tagged_processes
from emulation.netns import leftovers
from tests.runs import kill_run_processes, run_scenario

# serial: a round must end at its deadline with the devices that made it in time
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.serial]


@pytest.fixture(scope="module")
def faults_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "run"
    # the exit code is the first test's to check: the others still read what the run wrote
    yield run_scenario("scenarios/faults-ci.yaml", out, timeout=900, expect_rc=None)
    kill_run_processes(out)


def _node(row, name):
    return next((n for n in row["nodes"] if n["node"] == name), None)


def _faults(row):
    return {(e["action"], e["node"]): e for e in row.get("events", []) if e.get("type") == "fault"}


def test_the_run_survives_every_fault_and_finishes(faults_run):
    assert faults_run.proc.returncode == 0, faults_run.tail()
    m = faults_run.manifest
    assert m["status"] == "finished"
    assert {r["strategy"] for r in faults_run.rounds} == {"fedlora", "hetlora"}
    assert all(max(r["round"] for r in faults_run.rows(s)) == 5 for s in ("fedlora", "hetlora"))
    assert m["faults"]["injected"] >= 10
    assert faults_run.summary["strategies"]


@pytest.mark.parametrize("strategy", ["fedlora", "hetlora"])
def test_a_node_killed_mid_round_is_recorded_and_comes_back_after_restart(faults_run, strategy):
    r2 = faults_run.row(strategy, 2)
    assert _faults(r2)[("kill", "pi-0")]["applied"]
    killed = _node(r2, "pi-0")
    assert killed["status"] == "failed" and killed["reason"].startswith("killed by a fault event"), killed
    assert _faults(faults_run.row(strategy, 3))[("restart", "pi-0")]["applied"]
    later = [_node(faults_run.row(strategy, r), "pi-0") for r in (4, 5)]
    assert any(n and n["status"] == "ok" for n in later), "the restarted node re-registers and is sampled again"


@pytest.mark.parametrize("strategy", ["fedlora", "hetlora"])
def test_a_paused_node_misses_the_deadline_and_is_dropped_not_waited_for(faults_run, strategy):
    r2 = faults_run.row(strategy, 2)
    paused = _node(r2, "pi-1")
    assert paused["status"] == "dropped" and paused["reason"].startswith("paused by a fault event"), paused
    deadline = faults_run.manifest["scenario"]["training"]["round_deadline_s"]
    assert r2["wall_s"] < deadline * 1.5, "the round ends at its deadline"
    assert r2["participants"] == 2 and not r2["failed"]
    resumed = [e for r in faults_run.rows(strategy) for e in r.get("events", [])
               if e.get("action") == "resume" and e["node"] == "pi-1"]
    assert resumed and resumed[0]["applied"] and "duration_s" in resumed[0]["why"]


def test_link_faults_cut_the_node_off_where_the_backend_can(faults_run):
    backend = faults_run.manifest["backend"]
    r3 = faults_run.row("fedlora", 3)
    cut = _faults(r3)[("cut_link", "agx-0")]
    if backend == "process":  # links live in the node's transport: said, not faked
        assert not cut["applied"] and "netns or docker" in cut["how"]
        return
    assert cut["applied"]
    node = _node(r3, "agx-0")
    assert node["status"] == "dropped" and node["reason"].startswith("link cut by a fault event"), node
    # fewer results than min_results (2): the round is recorded as failed, the run goes on
    assert r3["failed"] == (r3["participants"] < 2)
    restored = [e for r in faults_run.rows("fedlora") for e in r.get("events", [])
                if e.get("action") == "restore_link" and e["node"] == "agx-0"]
    assert restored and restored[0]["applied"]


def test_profile_change_and_availability_are_recorded(faults_run):
    backend = faults_run.manifest["backend"]
    ev = _faults(faults_run.row("fedlora", 4))[("profile", "agx-1")]
    assert ev["applied"] and ev["how"].startswith("jetson-tx2: ")
    if backend in ("netns", "process"):  # same thread count: the same process, a new device from its next task
        assert "live" in ev["how"] and "restarted" not in ev["how"], ev
        # the switched node trains as a TX2 (0.25 of a core) from that task on. In emulated seconds, per CPU
        # second: netns, the CPU seconds at 0.25 / dilation (or a quota of that): 4 (an AGX: 1); process, the
        # wall time (at least the CPU time) / 0.25 / dilation 2: at least 2 (an AGX: 0.5)
        per_cpu_s = 4.0 if backend == "netns" else 2.0
        after = [n for r in faults_run.rows("fedlora") if r["round"] >= 4 for n in r["nodes"]
                 if n["node"] == "agx-1" and n["status"] == "ok"]
        assert after and all(n["compute_s"] >= 0.95 * per_cpu_s * n["cpu_s"] for n in after), after
    else:
        assert "restarted" in ev["how"]
    restored = faults_run.manifest["faults"]["restored_between_strategies"]
    assert any(e["action"] == "profile" and e["node"] == "agx-1" and e["applied"] for e in restored)
    # probability 0.9 per node and round, seeded: the same nodes offline under both strategies
    offline = {s: [r["offline"] for r in faults_run.rows(s) if r["round"]] for s in ("fedlora", "hetlora")}
    assert offline["fedlora"] == offline["hetlora"] and any(offline["fedlora"])
    for r in faults_run.rounds:
        assert not set(r.get("offline") or []) & {n["node"] for n in r["nodes"]}, "offline nodes are not sampled"


def test_nothing_is_left_behind(faults_run):
    run_id = faults_run.run_id
    assert not tagged_processes(run_id)
    from emulation.netns import run_tag
    left = leftovers(run_tag(run_id))
    assert not left["namespaces"] and not left["interfaces"], left
